//! `ember bench http`: drives `POST /v1/invocations` (or, with a function,
//! `POST /v1/functions/{name}/invocations`) of a local server from a fixed
//! number of keep-alive connections for a bounded time, and reports
//! throughput and latency percentiles.
//!
//! Each connection runs on its own thread and sends its next request as
//! soon as the previous one is answered (a closed loop): the concurrency
//! is the number of requests in flight. No request starts after the
//! duration; those in flight then finish (each is bounded by the
//! invocation's timeout), so the run stops by itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::stats::{ms, Stats};
use crate::server::client::{Client, ClientError, Target};
use crate::server::guard::AuthToken;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server.
    pub target: Target,
    /// Connections, each with one request in flight.
    pub concurrency: usize,
    /// How long to send requests for.
    pub duration: Duration,
    /// The command each invocation runs (without `function`).
    pub argv: Vec<String>,
    /// Invoke this function with this event instead of running `argv`.
    pub function: Option<FunctionLoad>,
    /// Each invocation's `timeout_ms`.
    pub timeout_ms: u64,
    /// The server's bearer token, if it wants one.
    pub auth_token: Option<AuthToken>,
}

/// A function to invoke, and the event every invocation sends.
#[derive(Debug, Clone)]
pub struct FunctionLoad {
    /// Its name on the server.
    pub name: String,
    /// The event (JSON).
    pub event: Vec<u8>,
}

/// The result of a load test.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// The server.
    pub target: String,
    /// The function invoked, if any (else `true` in a sandbox).
    pub function: Option<String>,
    /// Connections.
    pub concurrency: usize,
    /// From the first request to the last answer, in seconds.
    pub elapsed_s: f64,
    /// Requests answered or failed.
    pub requests: u64,
    /// Requests answered 200 whose command exited 0 (a function: whose
    /// handler returned).
    pub ok: u64,
    /// Everything else, by kind: `http_<status>`, `exit_<code>`,
    /// `timeout`, `handler_error`, `io`, `malformed`.
    pub errors: BTreeMap<String, u64>,
    /// Successful invocations per second.
    pub throughput_per_s: f64,
    /// Client-side latency of the successful requests.
    pub latency_ms: Stats,
    /// The server's `host.total_ms` of the successful requests (a
    /// function: `timings_ms.total`).
    pub server_total_ms: Stats,
    /// The restore time of the sandboxes used (`host.restore_ms`; a
    /// function: `timings_ms.restore`, resuming a recycled clone).
    pub restore_ms: Stats,
    /// Time waiting for a sandbox (`host.queue_ms`; a function:
    /// `timings_ms.queue`).
    pub queue_ms: Stats,
    /// Share of successful requests served by a warm sandbox (a function:
    /// by a recycled clone that had served before).
    pub warm_ratio: f64,
}

impl LoadReport {
    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A human-readable summary.
    pub fn to_table(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{}: {} connections, {:.1} s\nrequests {}, ok {}, errors: {errors}\nthroughput {:.2} invocations/s, warm {:.0}%\n{}{}{}{}{}",
            self.target,
            self.concurrency,
            self.elapsed_s,
            self.requests,
            self.ok,
            self.throughput_per_s,
            self.warm_ratio * 100.0,
            Stats::header("ms"),
            self.latency_ms.row("latency (client)"),
            self.server_total_ms.row("server total"),
            self.restore_ms.row(if self.function.is_some() {
                "restore or resume (clone used)"
            } else {
                "restore (sandbox used)"
            }),
            self.queue_ms.row("queue"),
        )
    }
}

/// The load test could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad parameters.
    #[error("invalid load test: {0}")]
    Config(String),
    /// The server does not answer `GET /v1/health` with 200.
    #[error("the server is not ready: {0}")]
    NotReady(String),
}

#[derive(Default)]
struct Tally {
    requests: u64,
    errors: BTreeMap<String, u64>,
    latency: Vec<f64>,
    server_total: Vec<f64>,
    restore: Vec<f64>,
    queue: Vec<f64>,
    warm: u64,
}

impl Tally {
    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.latency.extend(other.latency);
        self.server_total.extend(other.server_total);
        self.restore.extend(other.restore);
        self.queue.extend(other.queue);
        self.warm += other.warm;
    }
}

/// Runs the load test.
pub fn run(config: &LoadConfig) -> Result<LoadReport, LoadError> {
    if config.concurrency == 0 || config.duration.is_zero() {
        return Err(LoadError::Config(
            "concurrency and duration must be positive".into(),
        ));
    }
    if let Some(function) = &config.function {
        if !crate::server::functions::valid_name(&function.name) {
            return Err(LoadError::Config(format!(
                "{:?} is not a function name ({})",
                function.name,
                crate::server::functions::NAME_RULE
            )));
        }
    }
    // Per read: the invocation's timeout, plus the server's queue and
    // restore time, plus slack.
    let io_timeout = Duration::from_millis(config.timeout_ms) + Duration::from_secs(120);
    let mut probe = Client::new(config.target.clone(), Duration::from_secs(10))
        .with_token(config.auth_token.clone());
    match probe.request("GET", "/v1/health", None) {
        Ok(r) if r.status == 200 => {}
        Ok(r) => return Err(LoadError::NotReady(format!("health answered {}", r.status))),
        Err(e) => return Err(LoadError::NotReady(e.to_string())),
    }
    // Health needs no token; a protected route says whether ours is good.
    match probe.request("GET", "/metrics", None) {
        Ok(r) if r.status == 401 => {
            return Err(LoadError::NotReady(if config.auth_token.is_some() {
                "the server refused the bearer token".into()
            } else {
                "the server wants a bearer token (--auth-token-file)".into()
            }))
        }
        Ok(_) => {}
        Err(e) => return Err(LoadError::NotReady(e.to_string())),
    }
    let (uri, body) = match &config.function {
        Some(function) => (
            format!(
                // The envelope carries the server's timings this tallies.
                "/v1/functions/{}/invocations?timeout_ms={}&envelope=1",
                function.name, config.timeout_ms
            ),
            function.event.clone(),
        ),
        None => (
            "/v1/invocations".to_string(),
            serde_json::to_vec(&serde_json::json!({
                "argv": config.argv,
                "timeout_ms": config.timeout_ms,
            }))
            .map_err(|e| LoadError::Config(e.to_string()))?,
        ),
    };
    let started = Instant::now();
    let deadline = started + config.duration;
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..config.concurrency)
            .map(|_| {
                let mut client = Client::new(config.target.clone(), io_timeout)
                    .with_token(config.auth_token.clone());
                let (uri, body) = (&uri, &body);
                let function = config.function.is_some();
                scope.spawn(move || {
                    let mut tally = Tally::default();
                    while Instant::now() < deadline {
                        one_request(&mut client, uri, body, function, &mut tally);
                    }
                    tally
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Tally::default();
    for t in tallies {
        all.merge(t);
    }
    let ok = all.latency.len() as u64;
    Ok(LoadReport {
        target: match &config.target {
            Target::Tcp(a) => format!("http://{a}"),
            Target::Unix(p) => format!("unix:{}", p.display()),
        },
        function: config.function.as_ref().map(|f| f.name.clone()),
        concurrency: config.concurrency,
        elapsed_s: elapsed,
        requests: all.requests,
        ok,
        errors: all.errors,
        throughput_per_s: if elapsed > 0.0 {
            ok as f64 / elapsed
        } else {
            0.0
        },
        latency_ms: Stats::of(all.latency),
        server_total_ms: Stats::of(all.server_total),
        restore_ms: Stats::of(all.restore),
        queue_ms: Stats::of(all.queue),
        warm_ratio: if ok > 0 {
            all.warm as f64 / ok as f64
        } else {
            0.0
        },
    })
}

fn one_request(client: &mut Client, uri: &str, body: &[u8], function: bool, tally: &mut Tally) {
    let sent = Instant::now();
    let result = client.request("POST", uri, Some(body));
    let latency = ms(sent.elapsed());
    tally.requests += 1;
    let response = match result {
        Ok(r) => r,
        Err(ClientError::Io(_)) => return tally.error("io".into()),
        Err(_) => return tally.error("malformed".into()),
    };
    if response.status != 200 {
        return tally.error(format!("http_{}", response.status));
    }
    let Ok(json) = response.json() else {
        return tally.error("malformed".into());
    };
    if function {
        return tally_function(&json, latency, tally);
    }
    if json["timed_out"].as_bool() == Some(true) {
        return tally.error("timeout".into());
    }
    match json["exit_code"].as_i64() {
        Some(0) => {}
        Some(code) => return tally.error(format!("exit_{code}")),
        None => return tally.error("signal".into()),
    }
    let host = &json["host"];
    let f = |key: &str| host[key].as_f64().unwrap_or(0.0);
    tally.latency.push(latency);
    tally.server_total.push(f("total_ms"));
    tally.restore.push(f("restore_ms"));
    tally.queue.push(f("queue_ms"));
    if host["warm"].as_bool() == Some(true) {
        tally.warm += 1;
    }
}

/// The same load as a function load test, through the library in this
/// process: one in-process recycled clone per connection, each invoked in
/// a closed loop for the same time. What the HTTP run costs beyond it is
/// the server's and the worker's share.
#[derive(Debug, Clone, Serialize)]
pub struct LibraryReport {
    /// Clones, each with one invocation in flight.
    pub concurrency: usize,
    /// From the first invocation to the last result, in seconds.
    pub elapsed_s: f64,
    /// Invocations whose handler returned.
    pub ok: u64,
    /// Invocations that failed or whose handler did not return.
    pub errors: u64,
    /// Successful invocations per second.
    pub throughput_per_s: f64,
    /// Request to the clone reset after the result: the server answers
    /// after the reset too, so the HTTP client's latency holds it.
    pub latency_ms: Stats,
}

impl LibraryReport {
    /// A human-readable summary.
    pub fn to_table(&self) -> String {
        format!(
            "library (in-process recycled clones): {} clones, {:.1} s\nok {}, errors {}\nthroughput {:.2} invocations/s\n{}{}",
            self.concurrency,
            self.elapsed_s,
            self.ok,
            self.errors,
            self.throughput_per_s,
            Stats::header("ms"),
            self.latency_ms.row("latency (request -> clone reset)"),
        )
    }
}

/// Runs `event` against the function in `dir` through the library, as
/// [`LibraryReport`] says, with `concurrency` clones for `duration`.
pub fn run_library(
    dir: &std::path::Path,
    event: &[u8],
    concurrency: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<LibraryReport, LoadError> {
    use crate::function::{Function, FunctionInvokeOptions, HandlerResult, RecycleOptions};
    if concurrency == 0 || duration.is_zero() {
        return Err(LoadError::Config(
            "concurrency and duration must be positive".into(),
        ));
    }
    let function = std::sync::Arc::new(
        Function::open(dir).map_err(|e| LoadError::Config(format!("{}: {e}", dir.display())))?,
    );
    let options = FunctionInvokeOptions {
        timeout,
        ..FunctionInvokeOptions::in_process()
    };
    let mut clones = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clones.push(
            function
                .recycled(&RecycleOptions::default())
                .map_err(|e| LoadError::Config(format!("a recycled clone: {e}")))?,
        );
    }
    let started = Instant::now();
    let deadline = started + duration;
    let results: Vec<(Vec<f64>, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = clones
            .into_iter()
            .map(|mut clone| {
                let (options, function) = (&options, &function);
                scope.spawn(move || {
                    let (mut latency, mut errors) = (Vec::new(), 0u64);
                    while Instant::now() < deadline {
                        match clone.invoke(event, options) {
                            Ok(o)
                                if matches!(
                                    o.result,
                                    HandlerResult::Json { .. } | HandlerResult::Bytes { .. }
                                ) =>
                            {
                                latency.push(ms(o.timings.total));
                            }
                            _ => errors += 1,
                        }
                        if !clone.is_usable() {
                            match function.recycled(&RecycleOptions::default()) {
                                Ok(fresh) => clone = fresh,
                                Err(_) => break,
                            }
                        }
                    }
                    (latency, errors)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let errors = results.iter().map(|(_, e)| e).sum();
    let latency: Vec<f64> = results.into_iter().flat_map(|(l, _)| l).collect();
    let ok = latency.len() as u64;
    Ok(LibraryReport {
        concurrency,
        elapsed_s: elapsed,
        ok,
        errors,
        throughput_per_s: if elapsed > 0.0 {
            ok as f64 / elapsed
        } else {
            0.0
        },
        latency_ms: Stats::of(latency),
    })
}

/// Counts one answered function invocation.
fn tally_function(json: &serde_json::Value, latency: f64, tally: &mut Tally) {
    match json["result"]["kind"].as_str() {
        Some("json" | "bytes") => {}
        Some("timed_out") => return tally.error("timeout".into()),
        Some(_) => return tally.error("handler_error".into()),
        None => return tally.error("malformed".into()),
    }
    let timings = &json["timings_ms"];
    let f = |key: &str| timings[key].as_f64().unwrap_or(0.0);
    tally.latency.push(latency);
    tally.server_total.push(f("total"));
    tally.restore.push(f("restore"));
    tally.queue.push(f("queue"));
    if json["recycle"]["invocation"]
        .as_u64()
        .is_some_and(|n| n > 1)
    {
        tally.warm += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_function_name_is_refused_before_any_request() {
        let config = LoadConfig {
            target: Target::Tcp("127.0.0.1:1".parse().unwrap()),
            concurrency: 1,
            duration: Duration::from_secs(1),
            argv: Vec::new(),
            function: Some(FunctionLoad {
                name: "../metrics".into(),
                event: b"{}".to_vec(),
            }),
            timeout_ms: 1000,
            auth_token: None,
        };
        let err = run(&config).unwrap_err();
        assert!(
            matches!(&err, LoadError::Config(m) if m.contains("not a function name")),
            "{err}"
        );
    }

    #[test]
    fn report_figures_are_stats_with_counts() {
        let latency = Stats::of((1..=100).map(f64::from));
        let report = LoadReport {
            target: "http://127.0.0.1:1".into(),
            function: None,
            concurrency: 1,
            elapsed_s: 1.0,
            requests: 100,
            ok: 100,
            errors: BTreeMap::new(),
            throughput_per_s: 100.0,
            latency_ms: latency,
            server_total_ms: Stats::of([1.0, 2.0]),
            restore_ms: Stats::default(),
            queue_ms: Stats::default(),
            warm_ratio: 1.0,
        };
        assert_eq!(
            (latency.n, latency.p50, latency.p99),
            (100, 50.0, Some(99.0))
        );
        let table = report.to_table();
        assert!(table.contains(&latency.row("latency (client)")), "{table}");
        assert!(table.contains(&Stats::header("ms")), "{table}");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["latency_ms"]["n"], 100);
        assert!(
            json["server_total_ms"]["p99"].is_null(),
            "2 samples make no p99"
        );
    }
}
