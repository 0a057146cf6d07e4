//! A recycled function clone in a jailed worker: one worker holds the
//! clone and serves every event sent to it, the clone reset in place to
//! the template between them ([`RecycledFunction`]), so the recycled path
//! keeps its point (no restore, no process per event) without running the
//! tenant's code in the caller's process.
//!
//! The worker ends with its clone: once an outcome says the clone was not
//! reused (a timeout, the vsock path, a failed reset), the worker exits
//! and the next event needs a new [`JailedRecycledFunction`].

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::function::{
    from_wire, output_to, read_message, read_message_by, read_reply, to_wire, write_message,
    write_request, Reply, Request, WireOutcome, MAX_ANSWER, MAX_REQUEST,
};
use super::{describe_exit, start, Isolation, WorkerError, WorkerProcess};
use crate::agent::invoke_grace;
use crate::function::{
    Function, FunctionError, FunctionInvokeOptions, FunctionOutcome, Manifest, RecycleInfo,
    RecycleOptions, RecycledFunction,
};
use crate::host::HostKind;
use crate::ready::RESTORE_CONNECT_TIMEOUT;
use crate::snapshot::{ResetReport, RestoreOptions, Snapshot};

/// The worker's third argument for recycled mode.
pub const RECYCLED_MODE: &str = "recycled";

/// What the parent sends once, before the first event.
#[derive(Serialize, Deserialize)]
struct Setup {
    manifest: Vec<u8>,
    verify: bool,
    io_limits: crate::devices::rate_limiter::IoLimits,
}

/// A reset report as it crosses the wire.
#[derive(Serialize, Deserialize)]
struct WireRecycle {
    invocation: u64,
    pages: u64,
    guest_pages: u64,
    host_pages: u64,
    device_pages: u64,
    kernel_ran: bool,
    mappings_dropped: bool,
    reset_us: u64,
    reused: bool,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    outcome: WireOutcome,
    recycle: Option<WireRecycle>,
}

fn to_wire_recycle(info: RecycleInfo) -> WireRecycle {
    let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    WireRecycle {
        invocation: info.invocation,
        pages: n(info.reset.pages),
        guest_pages: n(info.reset.guest_pages),
        host_pages: n(info.reset.host_pages),
        device_pages: n(info.reset.device_pages),
        kernel_ran: info.reset.kernel_ran,
        mappings_dropped: info.reset.mappings_dropped,
        reset_us: u64::try_from(info.reset.duration.as_micros()).unwrap_or(u64::MAX),
        reused: info.reused,
    }
}

fn from_wire_recycle(wire: WireRecycle) -> RecycleInfo {
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    RecycleInfo {
        invocation: wire.invocation,
        reset: ResetReport {
            pages: n(wire.pages),
            guest_pages: n(wire.guest_pages),
            host_pages: n(wire.host_pages),
            device_pages: n(wire.device_pages),
            kernel_ran: wire.kernel_ran,
            mappings_dropped: wire.mappings_dropped,
            duration: Duration::from_micros(wire.reset_us),
        },
        reused: wire.reused,
    }
}

/// The parent's handle on a jailed worker holding one recycled clone of a
/// function; the worker is killed when this is dropped.
#[derive(Debug)]
pub struct JailedRecycledFunction {
    worker: Option<(WorkerProcess, UnixStream)>,
    function: Arc<Function>,
}

impl JailedRecycledFunction {
    /// Starts a worker that makes a recycled clone of `function` and waits
    /// until the clone is made.
    pub fn new(
        function: Arc<Function>,
        options: &RecycleOptions,
        isolation: &Isolation,
    ) -> Result<Self, FunctionError> {
        if function.manifest().hot_path.is_none() {
            return Err(FunctionError::BadRequest(
                "only functions with a hot path (e.g. python3) can be recycled".into(),
            ));
        }
        let (mut worker, mut control) = start(
            function.snapshot(),
            &RestoreOptions::default(),
            isolation,
            Some(RECYCLED_MODE),
        )
        .map_err(worker_error)?;
        let setup = Setup {
            manifest: function.manifest().to_json()?,
            verify: options.verify,
            io_limits: options.io_limits,
        };
        write_message(&mut control, &setup).map_err(worker_error)?;
        let made: Result<Result<(), String>, WorkerError> = read_message_by(
            &control,
            MAX_ANSWER,
            Instant::now() + RESTORE_CONNECT_TIMEOUT,
        );
        match made {
            Ok(Ok(())) => Ok(JailedRecycledFunction {
                worker: Some((worker, control)),
                function,
            }),
            Ok(Err(message)) => Err(FunctionError::Worker(message)),
            Err(e) => {
                let status = worker.finish(Duration::from_secs(1));
                Err(FunctionError::Worker(format!(
                    "the recycled worker did not start ({e}); {}",
                    describe_exit(status)
                )))
            }
        }
    }

    /// The function this clone serves.
    pub fn function(&self) -> &Arc<Function> {
        &self.function
    }

    /// The worker's PID (as the host sees it), while it serves.
    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(|(w, _)| w.pid())
    }

    /// Whether the clone can serve another invocation.
    pub fn is_usable(&self) -> bool {
        self.worker.is_some()
    }

    /// Runs one invocation in the worker's clone, which resets it (see
    /// [`RecycledFunction::invoke`]); an error, or an outcome whose clone
    /// was not reused, ends the worker.
    pub fn invoke(
        &mut self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, FunctionError> {
        let requested = Instant::now();
        let Some((mut worker, control)) = self.worker.take() else {
            return Err(FunctionError::BadRequest(
                "this recycled clone ended; make a new one".into(),
            ));
        };
        crate::function::check_timeout(options)?;
        let request = Request {
            manifest: Vec::new(),
            event: event.to_vec(),
            timeout_ms: u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX),
            max_output_bytes: options.max_output_bytes,
            force_vsock: options.force_vsock,
            // The clone's limits were set when it was made (`Setup`).
            io_limits: options.io_limits,
            stream: options.output.is_some(),
        };
        // The worker enforces the timeout itself; this bounds one that
        // does not, trickling or silent, or that reads no request (this
        // worker served guests before: it may be compromised).
        let limit = options.timeout + invoke_grace(HostKind::detect()) + RESTORE_CONNECT_TIMEOUT;
        let deadline = Instant::now() + limit;
        let answer: Result<Result<Answer, String>, WorkerError> =
            write_request(&control, &request, deadline, options)
                .and_then(|()| read_reply(&control, deadline, options));
        if options
            .cancel
            .as_ref()
            .is_some_and(crate::function::InvocationCancel::is_cancelled)
        {
            // Whatever it answered, its clone is not kept.
            worker.finish(Duration::ZERO);
            return Err(FunctionError::Cancelled);
        }
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(message)) => {
                worker.finish(Duration::from_secs(1));
                return Err(FunctionError::Worker(message));
            }
            Err(e) => {
                let status = worker.finish(Duration::from_secs(1));
                return Err(FunctionError::Worker(format!(
                    "the recycled worker gave no answer ({e}); {}",
                    describe_exit(status)
                )));
            }
        };
        let mut outcome = from_wire(answer.outcome, options.max_output_bytes);
        outcome.recycle = answer.recycle.map(from_wire_recycle);
        if outcome.recycle.is_some_and(|r| r.reused) {
            self.worker = Some((worker, control));
        } else {
            // Closing the control socket ends the worker.
            drop(control);
            worker.finish(Duration::from_secs(5));
        }
        let t = &mut outcome.timings;
        t.total = requested.elapsed();
        t.isolation = Some(t.total.saturating_sub(t.restore + t.run + t.teardown));
        Ok(outcome)
    }
}

fn worker_error(e: WorkerError) -> FunctionError {
    FunctionError::Worker(e.to_string())
}

/// Worker side: makes the recycled clone, then serves events until the
/// control socket closes or the clone ends.
pub(super) fn serve(control: &mut UnixStream, snapshot: Snapshot) -> Result<(), WorkerError> {
    let setup: Setup = read_message(control, MAX_REQUEST)?;
    let made = (|| {
        let mem_bytes = u64::from(snapshot.mem_mib()) << 20;
        let manifest = Manifest::from_json(&setup.manifest, mem_bytes)?;
        let function = Arc::new(Function::from_parts(snapshot, manifest));
        let options = RecycleOptions {
            verify: setup.verify,
            io_limits: setup.io_limits,
            ..RecycleOptions::default()
        };
        function.recycled(&options)
    })();
    let mut clone = match made {
        Ok(clone) => {
            write_message(control, &Ok::<(), String>(()))?;
            clone
        }
        Err(e) => return write_message(control, &Err::<(), String>(e.to_string())),
    };
    // Made once, while this thread may still make descriptors.
    let output = output_to(control)?;
    loop {
        let request: Request = match read_message(control, MAX_REQUEST) {
            Ok(request) => request,
            // The parent is done with this clone.
            Err(WorkerError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let output = request.stream.then(|| output.clone());
        let answer = run(&mut clone, &request, output).map_err(|e| e.to_string());
        write_message(control, &Reply::Done(answer))?;
        if !clone.is_usable() {
            return Ok(());
        }
    }
}

fn run(
    clone: &mut RecycledFunction,
    request: &Request,
    output: Option<crate::function::OutputSink>,
) -> Result<Answer, FunctionError> {
    let options = FunctionInvokeOptions {
        timeout: Duration::from_millis(request.timeout_ms),
        max_output_bytes: request.max_output_bytes,
        force_vsock: request.force_vsock,
        output,
        // This process is the jail.
        ..FunctionInvokeOptions::in_process()
    };
    let mut outcome = clone.invoke(&request.event, &options)?;
    let recycle = outcome.recycle.take().map(to_wire_recycle);
    Ok(Answer {
        outcome: to_wire(outcome),
        recycle,
    })
}
