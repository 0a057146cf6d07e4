//! Function invocations in a jailed worker: the parent sends the worker
//! the function's manifest and one event; the worker restores the clone,
//! runs the invocation (hot path or vsock path) exactly as
//! [`Function::invoke`] does in-process, sends the outcome back and exits.
//!
//! The worker is untrusted by the parent like the guest: its answer is one
//! length-prefixed postcard message, bounded before anything is allocated
//! for it, and the outputs in it are capped again. A streaming request's
//! output comes first, as [`Reply::Output`] messages under the same bounds
//! and the same deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{describe_exit, start, Isolation, WorkerError};
use crate::agent::invoke_grace;
use crate::deadline::DeadlineStream;
use crate::function::interrupt_on;
use crate::function::{
    Function, FunctionError, FunctionInvokeOptions, FunctionOutcome, FunctionTimings,
    HandlerResult, InvocationCancel, InvocationPath, Manifest, OutputSink, OutputStream,
};
use crate::host::HostKind;
use crate::ready::RESTORE_CONNECT_TIMEOUT;
use crate::snapshot::{RestoreOptions, Snapshot};

/// The worker's third argument for function mode.
pub const FUNCTION_MODE: &str = "function";
/// Largest request a worker reads: an event of up to 64 MiB and a manifest.
pub(super) const MAX_REQUEST: u32 = (64 << 20) + (2 << 20);
/// Largest answer the parent reads: a 24 MiB result plus capped outputs.
pub(super) const MAX_ANSWER: u32 = 96 << 20;

#[derive(Serialize, Deserialize)]
pub(super) struct Request {
    pub(super) manifest: Vec<u8>,
    pub(super) event: Vec<u8>,
    pub(super) timeout_ms: u64,
    pub(super) max_output_bytes: u64,
    pub(super) force_vsock: bool,
    pub(super) io_limits: crate::devices::rate_limiter::IoLimits,
    /// Send the handler's output as it is written ([`Reply::Output`]).
    pub(super) stream: bool,
}

/// What a worker sends for one request: output chunks while the handler
/// runs (streaming requests only), then the answer.
#[derive(Serialize, Deserialize)]
pub(super) enum Reply<T> {
    /// A chunk of the handler's output. (Encoded the same for every `T`:
    /// the worker's sink sends it as a `Reply<()>`.)
    Output(OutputStream, Vec<u8>),
    /// The answer; nothing follows it.
    Done(Result<T, String>),
}

#[derive(Serialize, Deserialize)]
enum WireResult {
    Json(String),
    Bytes(Vec<u8>),
    Error(String, String, String),
    TimedOut,
    RuntimeExited(String),
}

#[derive(Serialize, Deserialize)]
pub(super) struct WireOutcome {
    result: WireResult,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    output_truncated: bool,
    path: u8,
    restore_us: u64,
    run_us: u64,
    handler_us: Option<u64>,
    teardown_us: u64,
}

/// Parent side: one invocation of `function` in a fresh jailed worker.
pub fn invoke(
    function: &Function,
    event: &[u8],
    options: &FunctionInvokeOptions,
    isolation: &Isolation,
) -> Result<FunctionOutcome, FunctionError> {
    invoke_watched(function, event, options, isolation, |_| true)
}

/// Like [`invoke`], and `started` learns the worker's PID as soon as it
/// runs (the worker is not reaped before this returns, so the PID names
/// it until then): a caller that may need to stop the invocation keeps
/// it. When `started` returns false the worker is ended at once and the
/// invocation fails.
pub fn invoke_watched(
    function: &Function,
    event: &[u8],
    options: &FunctionInvokeOptions,
    isolation: &Isolation,
    started: impl FnOnce(u32) -> bool,
) -> Result<FunctionOutcome, FunctionError> {
    let snapshot = function.snapshot();
    let (mut worker, mut control) = start(
        snapshot,
        &RestoreOptions::default(),
        isolation,
        Some(FUNCTION_MODE),
    )
    .map_err(worker_error)?;
    if !started(worker.pid()) {
        let _ = worker.finish(Duration::ZERO);
        return Err(FunctionError::Worker("stopped before it ran".into()));
    }
    let request = Request {
        manifest: function.manifest().to_json()?,
        event: event.to_vec(),
        timeout_ms: u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX),
        max_output_bytes: options.max_output_bytes,
        force_vsock: options.force_vsock,
        io_limits: options.io_limits,
        stream: options.output.is_some(),
    };
    write_message(&mut control, &request).map_err(worker_error)?;
    // The worker enforces the timeout itself; this bound is for a worker
    // that does not. It is one deadline for the whole answer: a worker
    // trickling it gets no more time than a silent one, and is killed.
    let limit = options.timeout + invoke_grace(HostKind::detect()) + RESTORE_CONNECT_TIMEOUT;
    let answer: Result<Result<WireOutcome, String>, WorkerError> =
        read_reply(&control, Instant::now() + limit, options);
    let cancelled = options
        .cancel
        .as_ref()
        .is_some_and(InvocationCancel::is_cancelled);
    // A cancelled invocation's worker is killed at once.
    let grace = if cancelled {
        Duration::ZERO
    } else {
        Duration::from_secs(1)
    };
    let status = worker.finish(grace);
    if cancelled {
        return Err(FunctionError::Cancelled);
    }
    match answer {
        Ok(Ok(wire)) => Ok(from_wire(wire, options.max_output_bytes)),
        Ok(Err(message)) => Err(FunctionError::Worker(message)),
        Err(WorkerError::Io(e)) if crate::deadline::is_timeout(&e) => {
            // The worker did not say which path it took: the one it would.
            Ok(FunctionOutcome {
                result: HandlerResult::TimedOut,
                stdout: Vec::new(),
                stderr: Vec::new(),
                output_truncated: false,
                path: function.path_for(event, options),
                timings: FunctionTimings::default(),
                recycle: None,
                guest_kernel: None,
            })
        }
        Err(e) => Err(FunctionError::Worker(format!(
            "{e}; {}",
            describe_exit(status)
        ))),
    }
}

fn worker_error(e: WorkerError) -> FunctionError {
    FunctionError::Worker(e.to_string())
}

/// Worker side: serves one function request on `control`, jailed, with
/// `snapshot` opened from the descriptors the parent handed over.
pub(super) fn serve(control: &mut UnixStream, snapshot: Snapshot) -> Result<(), WorkerError> {
    let request: Request = read_message(control, MAX_REQUEST)?;
    // Before the clone runs: the filtered thread can make no descriptor.
    let output = request.stream.then(|| output_to(control)).transpose()?;
    let answer = run(snapshot, request, output).map_err(|e| e.to_string());
    write_message(control, &Reply::Done(answer))
}

/// Worker side: a sink that sends each chunk to the parent on `control`
/// (from the invoking thread, so it never interleaves with the answer).
pub(super) fn output_to(control: &UnixStream) -> Result<OutputSink, WorkerError> {
    let control = Mutex::new(control.try_clone().map_err(WorkerError::Io)?);
    Ok(OutputSink::new(move |stream, bytes| {
        let mut control = control.lock().unwrap_or_else(|e| e.into_inner());
        // A parent that went away also misses the answer; nothing to do.
        let _ = write_message(&mut *control, &Reply::<()>::Output(stream, bytes.to_vec()));
    }))
}

/// Parent side: reads a worker's replies to one request until its answer,
/// all by `deadline`. Output chunks go to `options.output`, at most
/// `options.max_output_bytes` of them in all: output the request did not
/// ask for, an empty chunk or one past that limit ends the wait with an
/// error (the caller then ends the worker).
/// Cancelling the invocation (`options.cancel`) shuts the socket down,
/// which ends the wait with an error (the caller then ends the worker).
pub(super) fn read_reply<T: for<'de> Deserialize<'de>>(
    control: &UnixStream,
    deadline: Instant,
    options: &FunctionInvokeOptions,
) -> Result<Result<T, String>, WorkerError> {
    let _interrupt = interrupt_socket(control, options)?;
    // A second descriptor of the same socket: the caller keeps its own.
    let mut stream = DeadlineStream::new(control.try_clone().map_err(WorkerError::Io)?);
    stream
        .set_deadline(Some(deadline))
        .map_err(WorkerError::Io)?;
    let mut room = options.max_output_bytes;
    loop {
        match read_message(&mut stream, MAX_ANSWER)? {
            Reply::Done(answer) => return Ok(answer),
            Reply::Output(which, bytes) => {
                // An honest worker streams only when asked, never an empty
                // chunk, never past the cap: a worker that does is not read
                // on (and spun on) until the deadline, but ended now.
                let Some(sink) = options.output.as_ref().filter(|_| !bytes.is_empty()) else {
                    return Err(WorkerError::Failed("output it was not asked for".into()));
                };
                if bytes.len() as u64 > room {
                    return Err(WorkerError::Failed("output past its limit".into()));
                }
                room -= bytes.len() as u64;
                sink.send(which, &bytes);
            }
        }
    }
}

fn run(
    snapshot: Snapshot,
    request: Request,
    output: Option<OutputSink>,
) -> Result<WireOutcome, FunctionError> {
    let mem_bytes = u64::from(snapshot.mem_mib()) << 20;
    let manifest = Manifest::from_json(&request.manifest, mem_bytes)?;
    let function = Function::from_parts(snapshot, manifest);
    let options = FunctionInvokeOptions {
        timeout: Duration::from_millis(request.timeout_ms),
        max_output_bytes: request.max_output_bytes,
        force_vsock: request.force_vsock,
        io_limits: request.io_limits,
        // The worker's main thread decodes hot-path responses and agent
        // frames: filtered from the moment the clone runs.
        filter_caller: true,
        output,
        // This process is the jail.
        ..FunctionInvokeOptions::in_process()
    };
    let outcome = function.invoke_in_process(&request.event, &options)?;
    Ok(to_wire(outcome))
}

pub(super) fn to_wire(outcome: FunctionOutcome) -> WireOutcome {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    WireOutcome {
        result: match outcome.result {
            HandlerResult::Json { value } => WireResult::Json(value.to_string()),
            HandlerResult::Bytes { bytes } => WireResult::Bytes(bytes),
            HandlerResult::Error {
                error_type,
                message,
                traceback,
            } => WireResult::Error(error_type, message, traceback),
            HandlerResult::TimedOut => WireResult::TimedOut,
            HandlerResult::RuntimeExited { status } => WireResult::RuntimeExited(status),
        },
        stdout: outcome.stdout,
        stderr: outcome.stderr,
        output_truncated: outcome.output_truncated,
        path: match outcome.path {
            InvocationPath::Hot => 0,
            InvocationPath::HotWithVsockResult => 1,
            InvocationPath::Vsock => 2,
        },
        restore_us: us(outcome.timings.restore),
        run_us: us(outcome.timings.run),
        handler_us: outcome.timings.handler.map(us),
        teardown_us: us(outcome.timings.teardown),
    }
}

pub(super) fn from_wire(wire: WireOutcome, max_output_bytes: u64) -> FunctionOutcome {
    let result = match wire.result {
        WireResult::Json(text) => match serde_json::from_str(&text) {
            Ok(value) => HandlerResult::Json { value },
            Err(e) => HandlerResult::Error {
                error_type: "InvalidResult".into(),
                message: format!("the worker's JSON result does not parse: {e}"),
                traceback: String::new(),
            },
        },
        WireResult::Bytes(bytes) => HandlerResult::Bytes { bytes },
        WireResult::Error(error_type, message, traceback) => HandlerResult::Error {
            error_type,
            message,
            traceback,
        },
        WireResult::TimedOut => HandlerResult::TimedOut,
        WireResult::RuntimeExited(status) => HandlerResult::RuntimeExited { status },
    };
    let (stdout, stderr, cut) =
        crate::function::cap_output(wire.stdout, wire.stderr, max_output_bytes);
    FunctionOutcome {
        result,
        stdout,
        stderr,
        output_truncated: wire.output_truncated || cut,
        path: match wire.path {
            0 => InvocationPath::Hot,
            1 => InvocationPath::HotWithVsockResult,
            _ => InvocationPath::Vsock,
        },
        timings: FunctionTimings {
            restore: Duration::from_micros(wire.restore_us),
            run: Duration::from_micros(wire.run_us),
            handler: wire.handler_us.map(Duration::from_micros),
            teardown: Duration::from_micros(wire.teardown_us),
            total: Duration::ZERO,
            isolation: None,
        },
        recycle: None,
        guest_kernel: None,
    }
}

pub(super) fn write_message<T: Serialize>(
    stream: &mut impl Write,
    message: &T,
) -> Result<(), WorkerError> {
    let payload =
        postcard::to_allocvec(message).map_err(|e| WorkerError::Failed(format!("encode: {e}")))?;
    let len = u32::try_from(payload.len())
        .map_err(|_| WorkerError::Failed("message over 4 GiB".into()))?;
    stream
        .write_all(&len.to_le_bytes())
        .and_then(|()| stream.write_all(&payload))
        .map_err(WorkerError::Io)
}

pub(super) fn read_message<T: for<'de> Deserialize<'de>>(
    stream: &mut impl Read,
    max: u32,
) -> Result<T, WorkerError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(WorkerError::Io)?;
    let len = u32::from_le_bytes(len);
    if len > max {
        return Err(WorkerError::Failed(format!(
            "a {len}-byte message, over {max}"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).map_err(WorkerError::Io)?;
    postcard::from_bytes(&payload).map_err(|e| WorkerError::Failed(format!("decode: {e}")))
}

/// Parent side: sends `request` to a worker by `deadline`. A worker that
/// reads no more (one an earlier guest compromised) holds this thread no
/// longer than one that never answers; cancelling the invocation shuts
/// the socket down, which ends the write at once.
pub(super) fn write_request(
    control: &UnixStream,
    request: &Request,
    deadline: Instant,
    options: &FunctionInvokeOptions,
) -> Result<(), WorkerError> {
    let _interrupt = interrupt_socket(control, options)?;
    let mut stream = DeadlineStream::new(control.try_clone().map_err(WorkerError::Io)?);
    stream
        .set_deadline(Some(deadline))
        .map_err(WorkerError::Io)?;
    write_message(&mut stream, request)
}

/// While the returned guard lives, cancelling the invocation shuts
/// `control` down, which ends any read or write on it.
fn interrupt_socket(
    control: &UnixStream,
    options: &FunctionInvokeOptions,
) -> Result<Option<crate::function::Registered>, WorkerError> {
    let Some(cancel) = &options.cancel else {
        return Ok(None);
    };
    let socket = control.try_clone().map_err(WorkerError::Io)?;
    Ok(interrupt_on(Some(cancel), move || {
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }))
}

/// Reads one message from a worker's `control` socket by `deadline`: one
/// deadline for the whole message, so a worker trickling its answer gets
/// no more time than a silent one.
pub(super) fn read_message_by<T: for<'de> Deserialize<'de>>(
    control: &UnixStream,
    max: u32,
    deadline: Instant,
) -> Result<T, WorkerError> {
    // A second descriptor of the same socket: the caller keeps its own.
    let mut stream = DeadlineStream::new(control.try_clone().map_err(WorkerError::Io)?);
    stream
        .set_deadline(Some(deadline))
        .map_err(WorkerError::Io)?;
    read_message(&mut stream, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_cross_the_wire() {
        let outcome = FunctionOutcome {
            result: HandlerResult::Bytes {
                bytes: vec![0, 255, 1],
            },
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
            output_truncated: false,
            path: InvocationPath::HotWithVsockResult,
            timings: FunctionTimings {
                restore: Duration::from_micros(1500),
                run: Duration::from_micros(20),
                handler: Some(Duration::from_micros(7)),
                teardown: Duration::from_micros(3),
                total: Duration::ZERO,
                isolation: None,
            },
            recycle: None,
            guest_kernel: None,
        };
        let back = from_wire(to_wire(outcome.clone()), 1 << 20);
        assert_eq!(back, outcome);
        // The parent caps what a worker claims.
        let back = from_wire(to_wire(outcome.clone()), 4);
        assert_eq!((back.stdout.len(), back.stderr.len()), (3, 1));
        assert!(back.output_truncated);
    }

    #[test]
    fn a_trickled_answer_ends_at_its_deadline() {
        let (mut worker, control) = UnixStream::pair().unwrap();
        let trickler = std::thread::spawn(move || {
            // An honest length, then a byte every 20 ms.
            if worker.write_all(&1000u32.to_le_bytes()).is_err() {
                return;
            }
            for _ in 0..200 {
                if worker.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let started = Instant::now();
        let Err(err) = read_message_by::<WireOutcome>(
            &control,
            MAX_ANSWER,
            started + Duration::from_millis(200),
        ) else {
            panic!("a trickled answer must not be read whole");
        };
        let elapsed = started.elapsed();
        assert!(
            matches!(&err, WorkerError::Io(e) if crate::deadline::is_timeout(e)),
            "{err}"
        );
        assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
        drop(control);
        trickler.join().unwrap();
    }

    fn big_request() -> Request {
        Request {
            manifest: Vec::new(),
            event: vec![0; 8 << 20],
            timeout_ms: 1000,
            max_output_bytes: 0,
            force_vsock: false,
            io_limits: Default::default(),
            stream: false,
        }
    }

    /// Runs `write_request` on a thread; what it returned, if it did
    /// within `wait`.
    fn write_to_a_worker_that_reads_nothing(
        deadline: Duration,
        options: FunctionInvokeOptions,
        wait: Duration,
    ) -> Option<Result<(), WorkerError>> {
        let (worker, control) = UnixStream::pair().unwrap();
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let written = write_request(
                &control,
                &big_request(),
                Instant::now() + deadline,
                &options,
            );
            let _ = done.send(written);
        });
        let result = result.recv_timeout(wait).ok();
        // Unblocks a writer that is still stuck.
        drop(worker);
        result
    }

    #[test]
    fn a_worker_that_reads_no_request_holds_the_parent_until_the_deadline_only() {
        let started = Instant::now();
        let written = write_to_a_worker_that_reads_nothing(
            Duration::from_millis(200),
            FunctionInvokeOptions::in_process(),
            Duration::from_secs(3),
        )
        .expect("the write must end by its deadline");
        let err = written.expect_err("nobody read it");
        assert!(
            matches!(&err, WorkerError::Io(e) if crate::deadline::is_timeout(e)),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn cancelling_ends_a_request_write_at_once() {
        let cancel = InvocationCancel::new();
        let options = FunctionInvokeOptions {
            cancel: Some(cancel.clone()),
            ..FunctionInvokeOptions::in_process()
        };
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.cancel();
        });
        let written = write_to_a_worker_that_reads_nothing(
            Duration::from_secs(60),
            options,
            Duration::from_secs(3),
        )
        .expect("a cancel must end the write");
        assert!(written.is_err());
        canceller.join().unwrap();
    }

    /// A worker that sends `chunks` as output, then nothing.
    fn flooding_worker(chunks: Vec<Vec<u8>>) -> (std::thread::JoinHandle<()>, UnixStream) {
        let (mut worker, control) = UnixStream::pair().unwrap();
        let flood = std::thread::spawn(move || {
            for chunk in chunks {
                let reply = Reply::<()>::Output(OutputStream::Stdout, chunk);
                if write_message(&mut worker, &reply).is_err() {
                    return;
                }
            }
            // Holds the socket open, answering nothing, until the parent
            // closes it.
            let _ = worker.read(&mut [0u8; 1]);
        });
        (flood, control)
    }

    #[test]
    fn output_a_worker_was_not_asked_for_ends_the_wait() {
        let cases: [(&str, Vec<Vec<u8>>, bool); 3] = [
            ("not streaming", vec![b"x".to_vec()], false),
            ("empty chunks", vec![Vec::new(); 10_000], true),
            ("past the cap", vec![vec![b'x'; 600], vec![b'y'; 600]], true),
        ];
        for (case, chunks, stream) in cases {
            let (flood, control) = flooding_worker(chunks);
            let sent = std::sync::Arc::new(Mutex::new(0usize));
            let seen = sent.clone();
            let options = FunctionInvokeOptions {
                max_output_bytes: 1000,
                output: stream
                    .then(|| OutputSink::new(move |_, bytes| *seen.lock().unwrap() += bytes.len())),
                ..FunctionInvokeOptions::in_process()
            };
            let started = Instant::now();
            let answer =
                read_reply::<WireOutcome>(&control, started + Duration::from_secs(5), &options);
            let Err(err) = answer else {
                panic!("{case}: an answer from a worker that gave none");
            };
            assert!(
                !matches!(&err, WorkerError::Io(e) if crate::deadline::is_timeout(e)),
                "{case}: waited for the deadline: {err}"
            );
            assert!(started.elapsed() < Duration::from_secs(2), "{case}");
            assert!(*sent.lock().unwrap() <= 1000, "{case}");
            drop(control);
            flood.join().unwrap();
        }
    }

    #[test]
    fn oversized_and_garbage_messages_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(MAX_ANSWER + 1).to_le_bytes()).unwrap();
        assert!(read_message::<WireOutcome>(&mut b, MAX_ANSWER).is_err());
        a.write_all(&3u32.to_le_bytes()).unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).unwrap();
        assert!(read_message::<WireOutcome>(&mut b, MAX_ANSWER).is_err());
    }
}
