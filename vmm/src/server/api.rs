//! The JSON bodies of the HTTP API (`openapi.yaml` describes them) and
//! the checks a request passes before it reaches the pool.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::records::{Settings, Status, Version};
use crate::agent::OutputStream;
use crate::function::{
    FunctionInvokeOptions, FunctionOutcome, FunctionTimings, HandlerResult, InvocationPath,
};
use crate::pool::PoolOutcome;
use crate::sandbox::{ExitStatus, FileIn, Invocation};

/// What the server accepts in one request; over a limit is a 400 (the
/// body size limit is a 413).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `timeout_ms` a request may ask for.
    pub max_timeout_ms: u64,
    /// Largest `max_output_bytes` a request may ask for.
    pub max_output_bytes: u64,
    /// Most bytes of `argv` and `env` together (each string counts its
    /// length plus one).
    pub max_args_bytes: usize,
    /// Most bytes of stdin and `files_in` data together, decoded. The
    /// whole invocation must fit one agent frame (32 MiB).
    pub max_input_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_timeout_ms: 300_000,
            max_output_bytes: ember_protocol::protocol::DEFAULT_MAX_OUTPUT_BYTES,
            max_args_bytes: 256 << 10,
            max_input_bytes: 24 << 20,
            max_body_bytes: 64 << 20,
        }
    }
}

impl Limits {
    /// Checks that every request within these limits fits one agent frame.
    pub fn validate(&self) -> Result<(), String> {
        let frame = ember_protocol::protocol::MAX_FRAME_LEN as usize;
        // Paths, modes and framing take far less than 1 MiB.
        if self.max_args_bytes + self.max_input_bytes + (1 << 20) > frame {
            return Err(format!(
                "max_args_bytes + max_input_bytes must stay 1 MiB under the agent's {frame}-byte frame"
            ));
        }
        if self.max_timeout_ms == 0
            || self.max_timeout_ms > ember_protocol::protocol::MAX_TIMEOUT_MS
        {
            return Err(format!(
                "max_timeout_ms must be in 1..={}",
                ember_protocol::protocol::MAX_TIMEOUT_MS
            ));
        }
        Ok(())
    }
}

/// `POST /v1/invocations` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvocationRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: a fresh work directory).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input as text.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Standard input as base64 (instead of `stdin`).
    #[serde(default)]
    pub stdin_b64: Option<String>,
    /// Wall-clock limit (default: 60 s, or the server's limit if lower).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Cap on stdout plus stderr (default: 16 MiB, or the server's limit).
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// Files written into the work directory first.
    #[serde(default)]
    pub files_in: Vec<FileInRequest>,
    /// Files read back afterwards, relative to the work directory.
    #[serde(default)]
    pub collect: Vec<String>,
}

/// One of [`InvocationRequest::files_in`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInRequest {
    /// Relative to the work directory.
    pub path: String,
    /// Contents, base64.
    pub data_b64: String,
    /// Permission bits (default 0o644 = 420).
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl InvocationRequest {
    /// The invocation, if the request is within `limits` and valid; the
    /// message says what is wrong otherwise.
    pub fn into_invocation(self, limits: &Limits) -> Result<Invocation, String> {
        let args_bytes: usize = self.argv.iter().map(|a| a.len() + 1).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>();
        if args_bytes > limits.max_args_bytes {
            return Err(format!(
                "argv and env take {args_bytes} bytes, over the limit of {}",
                limits.max_args_bytes
            ));
        }
        let timeout_ms = self
            .timeout_ms
            .unwrap_or(ember_protocol::protocol::DEFAULT_TIMEOUT_MS.min(limits.max_timeout_ms));
        if timeout_ms == 0 || timeout_ms > limits.max_timeout_ms {
            return Err(format!(
                "timeout_ms {timeout_ms} is not in 1..={}",
                limits.max_timeout_ms
            ));
        }
        let max_output_bytes = self.max_output_bytes.unwrap_or(
            ember_protocol::protocol::DEFAULT_MAX_OUTPUT_BYTES.min(limits.max_output_bytes),
        );
        if max_output_bytes > limits.max_output_bytes {
            return Err(format!(
                "max_output_bytes {max_output_bytes} is over the limit of {}",
                limits.max_output_bytes
            ));
        }
        let stdin = match (self.stdin, self.stdin_b64) {
            (Some(_), Some(_)) => return Err("give stdin or stdin_b64, not both".into()),
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => b64()
                .decode(encoded)
                .map_err(|e| format!("stdin_b64 is not valid base64: {e}"))?,
            (None, None) => Vec::new(),
        };
        let mut input_bytes = stdin.len();
        let mut files_in = Vec::with_capacity(self.files_in.len());
        for (i, file) in self.files_in.into_iter().enumerate() {
            // Decoded size is at most 3/4 of the encoded one: refuse early.
            if input_bytes + file.data_b64.len() / 4 * 3 > limits.max_input_bytes {
                return Err(input_over(limits));
            }
            let data = b64()
                .decode(&file.data_b64)
                .map_err(|e| format!("files_in[{i}].data_b64 is not valid base64: {e}"))?;
            input_bytes += data.len();
            files_in.push(FileIn {
                path: file.path,
                data,
                mode: file.mode,
            });
        }
        if input_bytes > limits.max_input_bytes {
            return Err(input_over(limits));
        }
        let invocation = Invocation {
            argv: self.argv,
            env: self.env.into_iter().collect(),
            cwd: self.cwd,
            stdin,
            timeout_ms,
            max_output_bytes,
            files_in,
            collect: self.collect,
        };
        invocation.validate()?;
        Ok(invocation)
    }
}

fn input_over(limits: &Limits) -> String {
    format!(
        "stdin and files_in take more than the limit of {} bytes",
        limits.max_input_bytes
    )
}

/// Everything about a finished invocation but its output: the body of the
/// streaming `exit` event, and part of [`InvocationResponse`].
#[derive(Debug, Clone, Serialize)]
pub struct InvocationSummary {
    /// The server's id of the invocation (also in the log line).
    pub id: String,
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// The timeout stopped it.
    pub timed_out: bool,
    /// Output beyond `max_output_bytes` was dropped.
    pub output_truncated: bool,
    /// Resources used in the guest.
    pub usage: UsageBody,
    /// One per `collect` path.
    pub files_out: Vec<FileOutBody>,
    /// Host-side timings.
    pub host: HostBody,
}

/// Guest resource usage (the numbers to bill by).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct UsageBody {
    /// Wall-clock time of the function.
    pub wall_ms: u64,
    /// User CPU time.
    pub cpu_user_ms: u64,
    /// System CPU time.
    pub cpu_sys_ms: u64,
    /// Peak memory.
    pub max_rss_kib: u64,
}

/// A collected file.
#[derive(Debug, Clone, Serialize)]
pub struct FileOutBody {
    /// As asked for.
    pub path: String,
    /// Contents (base64), when read.
    pub data_b64: Option<String>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// Where the host's time went.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HostBody {
    /// Restore of the sandbox used (before the request, if warm).
    pub restore_ms: f64,
    /// Waiting in the queue for a sandbox slot.
    pub queue_ms: f64,
    /// Running the invocation: request to the agent until its exit report.
    pub invoke_ms: f64,
    /// The whole request, as the server saw it.
    pub total_ms: f64,
    /// The sandbox came warm from the pool (`false`: restored on demand).
    pub warm: bool,
}

/// `POST /v1/invocations` answer.
#[derive(Debug, Clone, Serialize)]
pub struct InvocationResponse {
    /// Everything but the output.
    #[serde(flatten)]
    pub summary: InvocationSummary,
    /// Standard output as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    /// Standard output, exact, base64: only when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    /// Standard error as UTF-8 (invalid sequences replaced).
    pub stderr: String,
    /// Standard error, exact, base64: only when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
}

/// Milliseconds, as a float rounded to microseconds.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl InvocationSummary {
    /// The summary of `result`; `total` is the request's time so far.
    pub fn new(id: &str, result: &PoolOutcome, total: Duration) -> Self {
        let o = &result.outcome;
        let (exit_code, signal) = match o.status {
            ExitStatus::Code(c) => (Some(c), None),
            ExitStatus::Signal(s) => (None, Some(s)),
        };
        InvocationSummary {
            id: id.to_string(),
            exit_code,
            signal,
            timed_out: o.timed_out,
            output_truncated: o.output_truncated,
            usage: UsageBody {
                wall_ms: o.usage.wall_ms,
                cpu_user_ms: o.usage.cpu_user_ms,
                cpu_sys_ms: o.usage.cpu_sys_ms,
                max_rss_kib: o.usage.max_rss_kib,
            },
            files_out: o
                .files_out
                .iter()
                .map(|f| FileOutBody {
                    path: f.path.clone(),
                    data_b64: f.data.as_deref().map(|d| b64().encode(d)),
                    error: f.error.clone(),
                })
                .collect(),
            host: HostBody {
                restore_ms: ms(result.restore),
                queue_ms: ms(result.queue),
                invoke_ms: ms(o.timings.invoke),
                total_ms: ms(total),
                warm: result.warm,
            },
        }
    }
}

/// Text for JSON, plus base64 when the bytes are not valid UTF-8.
fn text_and_b64(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(b64().encode(bytes)),
        ),
    }
}

impl InvocationResponse {
    /// The answer for `result`.
    pub fn new(summary: InvocationSummary, result: &PoolOutcome) -> Self {
        let (stdout, stdout_b64) = text_and_b64(&result.outcome.stdout);
        let (stderr, stderr_b64) = text_and_b64(&result.outcome.stderr);
        InvocationResponse {
            summary,
            stdout,
            stdout_b64,
            stderr,
            stderr_b64,
        }
    }
}

/// One line of a streaming answer (`application/x-ndjson`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// A chunk of standard output.
    Stdout(ChunkBody),
    /// A chunk of standard error.
    Stderr(ChunkBody),
    /// The invocation ended; the last line.
    Exit(InvocationSummary),
    /// The invocation failed; the last line.
    Error(ErrorBody),
}

/// An output chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkBody {
    /// The chunk as UTF-8 (invalid sequences replaced).
    pub data: String,
    /// The chunk, exact, base64: only when it is not valid UTF-8 (a
    /// multi-byte character split between chunks counts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl StreamEvent {
    /// The event for an output chunk.
    pub fn output(stream: OutputStream, chunk: &[u8]) -> Self {
        let (data, data_b64) = text_and_b64(chunk);
        let body = ChunkBody { data, data_b64 };
        match stream {
            OutputStream::Stdout => StreamEvent::Stdout(body),
            OutputStream::Stderr => StreamEvent::Stderr(body),
        }
    }

    /// The event as one NDJSON line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!("{{\"type\":\"error\",\"error\":\"cannot encode event: {e}\"}}").into_bytes()
        });
        line.push(b'\n');
        line
    }
}

/// `POST /v1/functions/{name}/invocations` query parameters (the body is
/// the event).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionQuery {
    /// Wall-clock limit (default: 60 s, or the server's limit if lower).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Cap on stdout plus stderr (default: 1 MiB, or the server's limit).
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// `1`: answer with the JSON envelope (result, output, timings) as a
    /// 200 whatever the handler did, instead of the handler's result.
    #[serde(default)]
    pub envelope: Option<String>,
    /// `1`: answer `application/x-ndjson` events (see the server docs).
    #[serde(default)]
    pub stream: Option<String>,
}

/// A query flag: `1`/`true` or `0`/`false` (absent: false).
pub fn flag(name: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("0" | "false") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(other) => Err(format!("{name}={other:?} is not 1, 0, true or false")),
    }
}

impl FunctionQuery {
    /// The invocation options, if the query is within `limits`; the message
    /// says what is wrong otherwise.
    pub fn into_options(self, limits: &Limits) -> Result<FunctionInvokeOptions, String> {
        let defaults = FunctionInvokeOptions::default();
        let timeout_ms = self
            .timeout_ms
            .unwrap_or(ember_protocol::protocol::DEFAULT_TIMEOUT_MS.min(limits.max_timeout_ms));
        if timeout_ms == 0 || timeout_ms > limits.max_timeout_ms {
            return Err(format!(
                "timeout_ms {timeout_ms} is not in 1..={}",
                limits.max_timeout_ms
            ));
        }
        let max_output_bytes = self
            .max_output_bytes
            .unwrap_or(defaults.max_output_bytes.min(limits.max_output_bytes));
        if max_output_bytes > limits.max_output_bytes {
            return Err(format!(
                "max_output_bytes {max_output_bytes} is over the limit of {}",
                limits.max_output_bytes
            ));
        }
        Ok(FunctionInvokeOptions {
            timeout: Duration::from_millis(timeout_ms),
            max_output_bytes,
            ..defaults
        })
    }
}

/// `POST /v1/functions/{name}/invocations` answer: what the handler made
/// of the event.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionInvocationResponse {
    /// The server's id of the invocation (also in the log line).
    pub id: String,
    /// The function.
    pub function: String,
    /// What the handler returned, tagged by `kind`; a `bytes` result also
    /// comes exact as `bytes_b64`.
    pub result: serde_json::Value,
    /// Standard output as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    /// Standard output, exact, base64: only when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    /// Standard error as UTF-8 (invalid sequences replaced).
    pub stderr: String,
    /// Standard error, exact, base64: only when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    /// Output beyond `max_output_bytes` (or the hot path's buffer) was
    /// dropped.
    pub output_truncated: bool,
    /// Which way the event went.
    pub path: InvocationPath,
    /// Where the time went.
    pub timings_ms: FunctionTimingsBody,
    /// The recycled clone that served it; absent for a fresh clone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recycle: Option<RecycleBody>,
}

/// The recycled clone an invocation ran in.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RecycleBody {
    /// The clone's invocations so far, this one included (1: made for it).
    pub invocation: u64,
    /// Whether the clone was reset and kept for the next invocation.
    pub reused: bool,
    /// Its reset after this invocation.
    pub reset_ms: f64,
}

/// A function invocation's timings, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FunctionTimingsBody {
    /// Waiting for a slot (the server's `--max-live`).
    pub queue: f64,
    /// Request to the clone's vCPUs running.
    pub restore: f64,
    /// vCPUs running to the response.
    pub run: f64,
    /// The handler alone, as the runtime measured it (hot path only).
    pub handler: Option<f64>,
    /// Destroying the clone.
    pub teardown: f64,
    /// Restore to the clone destroyed (queue not included).
    pub total: f64,
}

impl FunctionTimingsBody {
    /// `t` in milliseconds, with the time queued.
    pub fn new(t: &FunctionTimings, queue: Duration) -> Self {
        FunctionTimingsBody {
            queue: ms(queue),
            restore: ms(t.restore),
            run: ms(t.run),
            handler: t.handler.map(ms),
            teardown: ms(t.teardown),
            total: ms(t.total),
        }
    }
}

/// A handler result as JSON: as it serializes, plus `bytes_b64` (exact)
/// for a `bytes` result.
pub fn handler_result_json(result: &HandlerResult) -> serde_json::Value {
    let mut value = serde_json::to_value(result).unwrap_or_else(
        |e| serde_json::json!({"kind": "error", "type": "EncodeError", "message": e.to_string(), "traceback": ""}),
    );
    if let (HandlerResult::Bytes { bytes }, Some(object)) = (result, value.as_object_mut()) {
        object.insert("bytes_b64".into(), b64().encode(bytes).into());
    }
    value
}

impl FunctionInvocationResponse {
    /// The answer for `outcome` of function `function`.
    pub fn new(id: &str, function: &str, outcome: &FunctionOutcome, queue: Duration) -> Self {
        let (stdout, stdout_b64) = text_and_b64(&outcome.stdout);
        let (stderr, stderr_b64) = text_and_b64(&outcome.stderr);
        FunctionInvocationResponse {
            id: id.to_string(),
            function: function.to_string(),
            result: handler_result_json(&outcome.result),
            stdout,
            stdout_b64,
            stderr,
            stderr_b64,
            output_truncated: outcome.output_truncated,
            path: outcome.path,
            timings_ms: FunctionTimingsBody::new(&outcome.timings, queue),
            recycle: outcome.recycle.map(|r| RecycleBody {
                invocation: r.invocation,
                reused: r.reused,
                reset_ms: ms(r.reset.duration),
            }),
        }
    }
}

/// One function of `GET /v1/functions`.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionInfo {
    /// Its name: `POST /v1/functions/{name}/invocations`.
    pub name: String,
    /// `python3` or `exec`.
    pub runtime: String,
    /// The handler.
    pub handler: String,
    /// Small events and results go through guest memory.
    pub hot_path: bool,
    /// The largest event that takes the hot path, in bytes (0: none).
    pub hot_path_capacity_bytes: u64,
    /// Its latest version's state: `building`, `ready` or `failed`.
    pub status: Status,
    /// A version of it serves invocations now (an older one while the
    /// latest builds or after it failed).
    pub serving: bool,
    /// Deployed over the API (else from the `--functions` directory).
    pub deployed: bool,
}

/// `GET /v1/functions/{name}` (and `PUT`'s) answer: the function's state.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStatusBody {
    /// The function's listing.
    #[serde(flatten)]
    pub info: FunctionInfo,
    /// This document: `/v1/functions/{name}`.
    pub status_url: String,
    /// Where it is invoked.
    pub invocations_url: String,
    /// The latest version's settings (deployed functions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
    /// The latest version's template (its content key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The latest version's bundle, SHA-256 hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_sha256: Option<String>,
    /// When the latest version was deployed, ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_unix_ms: Option<u64>,
    /// When its status last changed, ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_unix_ms: Option<u64>,
    /// The end of the failed build's log: the error, with the runtime's
    /// output and traceback when the import failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    /// The version serving, when it is not the latest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<Version>,
}

/// A function answer that is not the handler's result: the handler
/// raised, timed out or its runtime died (`kind` says which), or the
/// clone failed (`failed`).
#[derive(Debug, Clone, Serialize)]
pub struct FunctionErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// `error`, `timed_out`, `runtime_exited` or `failed`.
    pub kind: &'static str,
    /// The exception's type (`error`).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// The exception's message (`error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The end of the traceback (`error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    /// The server's id of the invocation.
    pub id: String,
}

/// `GET /v1/functions` answer.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionList {
    /// By name.
    pub functions: Vec<FunctionInfo>,
}

/// Every error answer: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<Invocation, String> {
        let req: InvocationRequest = serde_json::from_str(json).map_err(|e| e.to_string())?;
        req.into_invocation(&Limits::default())
    }

    #[test]
    fn a_full_request_converts() {
        let inv = request(
            r#"{"argv":["cat"],"env":{"B":"2","A":"1"},"stdin_b64":"aGk=","timeout_ms":500,
                "max_output_bytes":10,"files_in":[{"path":"x","data_b64":"AA==","mode":493}],
                "collect":["x"]}"#,
        )
        .unwrap();
        assert_eq!(inv.stdin, b"hi");
        assert_eq!(
            inv.env,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!((inv.timeout_ms, inv.max_output_bytes), (500, 10));
        assert_eq!(inv.files_in[0].data, [0]);
        assert_eq!(inv.files_in[0].mode, 0o755);
    }

    #[test]
    fn defaults_and_limits() {
        let inv = request(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!(inv.timeout_ms, ember_protocol::protocol::DEFAULT_TIMEOUT_MS);
        for (json, needle) in [
            (r#"{"argv":["true"],"timeout_ms":300001}"#, "timeout_ms"),
            (r#"{"argv":["true"],"timeout_ms":0}"#, "timeout_ms"),
            (
                r#"{"argv":["true"],"max_output_bytes":99999999999}"#,
                "max_output_bytes",
            ),
            (
                r#"{"argv":["true"],"stdin":"a","stdin_b64":"YQ=="}"#,
                "not both",
            ),
            (r#"{"argv":["true"],"stdin_b64":"!!"}"#, "base64"),
            (r#"{"argv":[]}"#, "argv is empty"),
            (
                r#"{"argv":["true"],"files_in":[{"path":"/abs","data_b64":""}]}"#,
                "relative",
            ),
            (r#"{"argv":["true"],"bogus":1}"#, "unknown field"),
        ] {
            let err = request(json).unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
        let big = "x".repeat(300 << 10);
        let err = request(&format!(r#"{{"argv":["echo","{big}"]}}"#)).unwrap_err();
        assert!(err.contains("argv and env"), "{err}");
    }

    #[test]
    fn function_queries() {
        let query = |q: &str| -> Result<FunctionInvokeOptions, String> {
            let q: FunctionQuery = serde_urlencoded_like(q)?;
            q.into_options(&Limits {
                max_timeout_ms: 90_000,
                max_output_bytes: 1000,
                ..Limits::default()
            })
        };
        let o = query("").unwrap();
        assert_eq!(
            (o.timeout, o.max_output_bytes),
            (Duration::from_secs(60), 1000)
        );
        let o = query("timeout_ms=5,max_output_bytes=7").unwrap();
        assert_eq!(
            (o.timeout, o.max_output_bytes),
            (Duration::from_millis(5), 7)
        );
        assert!(query("timeout_ms=0").unwrap_err().contains("timeout_ms"));
        assert!(query("timeout_ms=90001")
            .unwrap_err()
            .contains("timeout_ms"));
        assert!(query("max_output_bytes=1001")
            .unwrap_err()
            .contains("max_output_bytes"));
    }

    /// `k=v,k=v` into a query struct (through JSON: enough for numbers).
    fn serde_urlencoded_like<T: serde::de::DeserializeOwned>(q: &str) -> Result<T, String> {
        let map: serde_json::Map<String, serde_json::Value> = q
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (
                    k.to_string(),
                    serde_json::Value::from(v.parse::<u64>().unwrap()),
                )
            })
            .collect();
        serde_json::from_value(map.into()).map_err(|e| e.to_string())
    }

    #[test]
    fn bytes_results_come_exact_too() {
        let v = handler_result_json(&HandlerResult::Bytes {
            bytes: vec![0xff, b'a'],
        });
        assert_eq!(v["kind"], "bytes");
        assert_eq!(v["bytes"], "\u{fffd}a");
        assert_eq!(v["bytes_b64"], "/2E=");
        let v = handler_result_json(&HandlerResult::TimedOut);
        assert_eq!(v, serde_json::json!({"kind": "timed_out"}));
    }

    #[test]
    fn default_limits_fit_a_frame() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn non_utf8_output_also_comes_as_base64() {
        assert_eq!(text_and_b64(b"ok"), ("ok".into(), None));
        let (text, b64) = text_and_b64(&[0xff, b'a']);
        assert_eq!(text, "\u{fffd}a");
        assert_eq!(b64.as_deref(), Some("/2E="));
        let line = StreamEvent::output(OutputStream::Stderr, b"e").to_line();
        assert_eq!(line, b"{\"type\":\"stderr\",\"data\":\"e\"}\n");
    }
}
