//! Invoking a function: one fresh clone of its template per event.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_protocol::hotpath::{
    RequestHeader, ResponseStatus, REQUEST_ENTROPY_LEN, REQUEST_FLAG_PING, REQUEST_FLAG_STREAM,
    REQUEST_FLAG_VIA_PIPE, REQUEST_HEADER_LEN, RESPONSE_FLAG_STDERR_TRUNCATED,
    RESPONSE_FLAG_STDOUT_TRUNCATED,
};
use ember_protocol::protocol::{FunctionInvoke, FunctionResult, HotPathPages, MAX_TIMEOUT_MS};
use serde::Serialize;

use super::cancel::InvocationCancel;
use super::guest_clock::ClockReading;
use super::guest_rng::KEY_LEN;
use super::manifest::Manifest;
use super::output::{output_hook, LiveOutput, OutputSink};
use super::{buffers, interrupt_on, FunctionError};
use crate::agent::{invoke_grace, AgentClient};
use crate::config::ConsoleOutput;
use crate::machine::Machine;
use crate::ready::RESTORE_CONNECT_TIMEOUT;
use crate::refresh::{fill_random, fresh_refresh};
use crate::snapshot::working_set::{touched_pages, PageRun};
use crate::snapshot::{GuestWrite, PreparedClone, RestoreOptions, Snapshot};
use crate::vstate::stats::GuestKernelWork;
use vm_memory::{Bytes, GuestAddress};

/// How long a clone's first timer interrupt is held back: longer than any
/// hot-path invocation should take, short enough that a clone which does
/// run long (or takes the vsock path) gets its tick back soon.
pub(super) const CLONE_TIMER_DELAY: Duration = Duration::from_millis(500);

/// How one invocation should run.
#[derive(Debug, Clone)]
pub struct FunctionInvokeOptions {
    /// Wall-clock limit from the request; the clone is destroyed at it.
    pub timeout: Duration,
    /// Most bytes of stdout and stderr together that are kept.
    pub max_output_bytes: u64,
    /// Use the vsock path even where the hot path would do (benchmarks).
    pub force_vsock: bool,
    /// Where the clone's console goes.
    pub console: ConsoleOutput,
    /// seccomp filters on the clone's threads (on by default).
    pub seccomp: bool,
    /// Run the clone in its own jailed worker process (see
    /// [`crate::worker`]): the default. `None` runs it in this process,
    /// as root, next to the caller's memory: an explicit choice, only for
    /// trusted code and for measuring the VMM itself
    /// ([`FunctionInvokeOptions::in_process`]).
    pub isolation: Option<crate::isolation::Isolation>,
    /// Install the control seccomp filter ([`crate::seccomp::Filter::Control`])
    /// on the calling thread as soon as the clone runs, before any byte
    /// from the guest is read: for a worker process, whose every thread
    /// is then filtered. The thread can then never start a thread or open
    /// a file again.
    #[doc(hidden)]
    pub filter_caller: bool,
    /// The clone's I/O rate limits (default: unlimited; not taken from
    /// the template).
    pub io_limits: crate::devices::rate_limiter::IoLimits,
    /// Stream the handler's output to this sink while it runs (line by
    /// line on the hot path; at the end on the vsock path). The outcome
    /// still holds the whole output, within `max_output_bytes`.
    pub output: Option<OutputSink>,
    /// Cancels the invocation from another thread: it ends with
    /// [`FunctionError::Cancelled`], its clone stopped (or its worker
    /// killed), never reused.
    pub cancel: Option<InvocationCancel>,
}

impl Default for FunctionInvokeOptions {
    fn default() -> Self {
        FunctionInvokeOptions {
            timeout: Duration::from_secs(60),
            max_output_bytes: 1 << 20,
            force_vsock: false,
            console: ConsoleOutput::default(),
            seccomp: true,
            isolation: Some(crate::isolation::Isolation::default()),
            filter_caller: false,
            io_limits: Default::default(),
            output: None,
            cancel: None,
        }
    }
}

impl FunctionInvokeOptions {
    /// The default options, but the clone runs in this process (no jail):
    /// only for trusted code, benchmarks of the VMM itself, and what needs
    /// the clone's machine ([`Function::prepare`]).
    pub fn in_process() -> Self {
        FunctionInvokeOptions {
            isolation: None,
            ..FunctionInvokeOptions::default()
        }
    }
}

/// Which way an event went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvocationPath {
    /// Through guest memory and the doorbell, no guest-kernel work.
    Hot,
    /// Event through memory, but the response was too large for its
    /// buffer and came back through the agent.
    HotWithVsockResult,
    /// Through the agent over vsock.
    Vsock,
}

/// What the handler returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum HandlerResult {
    /// A JSON value.
    Json {
        /// The value.
        value: serde_json::Value,
    },
    /// Raw bytes.
    Bytes {
        /// The bytes.
        #[serde(serialize_with = "serialize_lossy")]
        bytes: Vec<u8>,
    },
    /// The handler raised.
    Error {
        /// The exception's type.
        #[serde(rename = "type")]
        error_type: String,
        /// Its message.
        message: String,
        /// The formatted traceback.
        traceback: String,
    },
    /// The handler ran past the timeout; the clone was destroyed.
    TimedOut,
    /// The runtime process ended without answering.
    RuntimeExited {
        /// How.
        status: String,
    },
}

fn serialize_lossy<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(bytes))
}

/// Where an invocation's time went (host clock). Serialized as
/// milliseconds (`restore_ms`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FunctionTimings {
    /// Request to the clone's vCPUs running.
    #[serde(rename = "restore_ms", serialize_with = "as_ms")]
    pub restore: Duration,
    /// vCPUs running to the response (the handler plus getting the event
    /// in and the result out).
    #[serde(rename = "run_ms", serialize_with = "as_ms")]
    pub run: Duration,
    /// The handler alone, as the runtime measured it (hot path only).
    #[serde(rename = "handler_ms", serialize_with = "as_opt_ms")]
    pub handler: Option<Duration>,
    /// Destroying the clone.
    #[serde(rename = "teardown_ms", serialize_with = "as_ms")]
    pub teardown: Duration,
    /// Request to the outcome, teardown included.
    #[serde(rename = "total_ms", serialize_with = "as_ms")]
    pub total: Duration,
    /// Isolated invocations only: what the jailed worker added around its
    /// own restore, run and teardown (spawning it, jailing it, sending the
    /// request and reading the answer): `total` minus those three.
    #[serde(rename = "isolation_ms", serialize_with = "as_opt_ms")]
    pub isolation: Option<Duration>,
}

impl FunctionTimings {
    /// Sets restore, run, teardown and total from the instants that bound
    /// them: the request, the vCPUs running, the host holding the parsed
    /// result, the teardown (or reset) done.
    pub(super) fn set_phases(
        &mut self,
        requested: Instant,
        running: Instant,
        answered: Instant,
        done: Instant,
    ) {
        self.restore = running.saturating_duration_since(requested);
        self.run = answered.saturating_duration_since(running);
        self.teardown = done.saturating_duration_since(answered);
        self.total = done.saturating_duration_since(requested);
    }
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn as_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => as_ms(d, s),
        None => s.serialize_none(),
    }
}

/// The outcome of one invocation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionOutcome {
    /// What the handler returned.
    pub result: HandlerResult,
    /// What it printed to stdout.
    #[serde(serialize_with = "serialize_lossy")]
    pub stdout: Vec<u8>,
    /// What it printed to stderr.
    #[serde(serialize_with = "serialize_lossy")]
    pub stderr: Vec<u8>,
    /// Output beyond the limit was dropped.
    pub output_truncated: bool,
    /// Which way the event went.
    pub path: InvocationPath,
    /// Where the time went.
    pub timings: FunctionTimings,
    /// For a recycled clone: what its reset did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recycle: Option<super::RecycleInfo>,
    /// How much guest-kernel work the invocation caused, from KVM's
    /// counters (in-process clones; `None` where KVM keeps none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_kernel: Option<GuestKernelWork>,
}

/// A clone of a function's template, built but not started
/// ([`Function::prepare`]); dropping it destroys it.
#[derive(Debug)]
pub struct PreparedFunction {
    clone: PreparedClone,
}

/// The invocation timeout in milliseconds, checked.
pub(crate) fn timeout_ms(options: &FunctionInvokeOptions) -> Result<u64, FunctionError> {
    let timeout_ms = u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(FunctionError::BadRequest(format!(
            "timeout {timeout_ms} ms is not in 1..={MAX_TIMEOUT_MS}"
        )));
    }
    Ok(timeout_ms)
}

/// An opened function template, ready to be invoked any number of times
/// (concurrently too: every invocation is its own clone).
#[derive(Debug)]
pub struct Function {
    snapshot: Snapshot,
    manifest: Manifest,
}

impl Function {
    /// Opens the function template in `dir`.
    pub fn open(dir: &Path) -> Result<Self, FunctionError> {
        let snapshot = Snapshot::open(dir)?;
        let manifest = Manifest::read(dir, u64::from(snapshot.mem_mib()) << 20)?;
        Ok(Function { snapshot, manifest })
    }

    /// A function from an opened snapshot and its manifest (a jailed
    /// worker gets them as a descriptor and bytes).
    pub fn from_parts(snapshot: Snapshot, manifest: Manifest) -> Self {
        Function { snapshot, manifest }
    }

    /// The template's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The template's snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The largest event that takes the hot path (0: none does).
    pub fn hot_path_capacity(&self) -> u64 {
        self.manifest.hot_path.as_ref().map_or(0, |p| {
            p.request.len.saturating_sub(REQUEST_HEADER_LEN as u64)
        })
    }

    /// Restores a clone in this process, delivers `event`, returns what
    /// the handler made of it, and destroys the clone, whatever
    /// `options.isolation` says. [`Function::invoke`] (in
    /// [`crate::dispatch`], which sits above [`crate::worker`]) picks a
    /// jailed worker or this; a jailed worker itself calls this.
    pub fn invoke_in_process(
        &self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, FunctionError> {
        let requested = Instant::now();
        let clone = self.prepare(options)?;
        self.run(clone, event, options, requested)
    }

    /// Builds a clone ready for one event, without starting it: a caller
    /// that keeps a few of these ahead of requests takes the restore off
    /// the request's path ([`Function::invoke_prepared`]). Memory the
    /// template's calibration found hot is populated; the clone's timer
    /// is pushed out when it starts.
    pub fn prepare(
        &self,
        options: &FunctionInvokeOptions,
    ) -> Result<PreparedFunction, FunctionError> {
        let restore = RestoreOptions {
            console: options.console.clone(),
            seccomp: options.seccomp,
            timer_delay: Some(CLONE_TIMER_DELAY),
            prefault: self.manifest.working_set.clone(),
            io_limits: options.io_limits,
            ..RestoreOptions::default()
        };
        Ok(PreparedFunction {
            clone: self.snapshot.prepare(&restore)?,
        })
    }

    /// Delivers `event` to a clone made by [`Function::prepare`] (of this
    /// function), starts it, and returns what the handler made of it; the
    /// clone is destroyed. `options.isolation` does not apply: the clone
    /// is in this process.
    pub fn invoke_prepared(
        &self,
        clone: PreparedFunction,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, FunctionError> {
        self.run(clone, event, options, Instant::now())
    }

    fn run(
        &self,
        clone: PreparedFunction,
        event: &[u8],
        options: &FunctionInvokeOptions,
        requested: Instant,
    ) -> Result<FunctionOutcome, FunctionError> {
        let timeout_ms = timeout_ms(options)?;
        let hot = self.hot_pages_for(event, options);
        let seq = self.manifest.next_seq;
        let deadline = requested + options.timeout;
        let mut live = self.live_output(options);
        let mut flags = 0;
        if let (Some(live), Some(pages)) = (&live, self.streams_on(options)) {
            let memory = clone.clone.memory().clone();
            let hook = output_hook(memory, pages.response.clone(), seq, live.queue().clone());
            clone.clone.doorbell().set_output_hook(Some(hook));
            flags |= REQUEST_FLAG_STREAM;
        }
        let mut machine = self.start(clone, hot.map(|_| event), timeout_ms, flags)?;
        if options.filter_caller {
            if let Err(e) = crate::seccomp::Filter::Control.install() {
                machine.stop();
                return Err(e.into());
            }
        }
        let running = Instant::now();
        let outcome = match hot {
            Some(pages) => self.run_hot(&mut machine, pages, seq, deadline, options, live.as_mut()),
            None => run_vsock(&machine, event, timeout_ms, deadline, options),
        };
        let outcome = finish_output(outcome, live);
        // The host holds the parsed result (or knows there is none).
        let answered = Instant::now();
        let work = machine.guest_kernel_work();
        drop(machine);
        let done = Instant::now();
        let mut outcome = outcome?;
        outcome
            .timings
            .set_phases(requested, running, answered, done);
        outcome.guest_kernel = Some(work);
        Ok(outcome)
    }

    /// Writes one request into a prepared clone and starts it: a fresh
    /// CRNG key and, for a hot-path runtime, the request (with `event` in
    /// memory, or without it: "read it from your pipe").
    fn start(
        &self,
        clone: PreparedFunction,
        event: Option<&[u8]>,
        timeout_ms: u64,
        extra_flags: u32,
    ) -> Result<Machine, FunctionError> {
        let memory = clone.clone.memory();
        let tsc = clone.clone.guest_tsc();
        for write in self.request_writes(memory, tsc, event, timeout_ms, extra_flags)? {
            memory
                .write_slice(&write.bytes, GuestAddress(write.addr))
                .map_err(|e| FunctionError::GuestMemory(e.to_string()))?;
        }
        Ok(clone.clone.start()?)
    }

    /// What the host writes into a clone's memory (`memory`, the
    /// template's content) for one request, in order: the host's wall
    /// clock, a fresh CRNG key and, for a hot-path runtime, the event and
    /// then the request header (whose sequence number the runtime polls).
    /// The clone must start with kvm-clock at the snapshot's value, now;
    /// `guest_tsc` is its TSC now.
    pub(super) fn request_writes(
        &self,
        memory: &vm_memory::GuestMemoryMmap,
        guest_tsc: Option<u64>,
        event: Option<&[u8]>,
        timeout_ms: u64,
        extra_flags: u32,
    ) -> Result<Vec<GuestWrite>, FunctionError> {
        let mut writes = Vec::new();
        if let Some(clock) = &self.manifest.guest_clock {
            let reading = ClockReading {
                kvmclock_ns: self.snapshot.clock_ns(),
                tsc: guest_tsc,
            };
            writes.extend(clock.sync_writes(memory, reading, unix_time_ns()));
        }
        if let Some(rng) = &self.manifest.guest_rng {
            let mut key = [0u8; KEY_LEN];
            fill_random(&mut key);
            writes.extend(rng.reseed_writes(key));
        }
        if let Some(pages) = &self.manifest.hot_path {
            let mut header = request_header(self.manifest.next_seq, event, timeout_ms);
            header.flags |= extra_flags;
            if let Some(event) = event {
                writes.extend(buffers::writes(
                    &pages.request,
                    REQUEST_HEADER_LEN as u64,
                    event,
                )?);
            }
            writes.extend(buffers::writes(&pages.request, 0, &header.encode())?);
        }
        Ok(writes)
    }

    /// The hot-path pages, if `event` takes the hot path under `options`.
    pub(super) fn hot_pages_for(
        &self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Option<&HotPathPages> {
        self.manifest
            .hot_path
            .as_ref()
            .filter(|_| !options.force_vsock)
            .filter(|_| event.len() as u64 <= self.hot_path_capacity())
    }

    /// Which path `event` takes under `options`.
    pub fn path_for(&self, event: &[u8], options: &FunctionInvokeOptions) -> InvocationPath {
        match self.hot_pages_for(event, options) {
            Some(_) => InvocationPath::Hot,
            None => InvocationPath::Vsock,
        }
    }

    /// Runs one hot-path request (`event`, or a ping) in a clone and
    /// returns the guest pages the clone touched: the working set later
    /// clones get populated up front.
    pub(crate) fn calibrate(&self, event: Option<&[u8]>) -> Result<Vec<PageRun>, FunctionError> {
        let Some(pages) = &self.manifest.hot_path else {
            return Ok(Vec::new());
        };
        let options = FunctionInvokeOptions::default();
        let flags = if event.is_some() {
            0
        } else {
            REQUEST_FLAG_PING
        };
        let payload = event.unwrap_or_default();
        let restore = RestoreOptions {
            timer_delay: Some(CLONE_TIMER_DELAY),
            ..RestoreOptions::default()
        };
        let clone = PreparedFunction {
            clone: self.snapshot.prepare(&restore)?,
        };
        let deadline = Instant::now() + options.timeout;
        let mut machine = self.start(clone, Some(payload), 60_000, flags)?;
        let outcome = self.run_hot(
            &mut machine,
            pages,
            self.manifest.next_seq,
            deadline,
            &options,
            None,
        )?;
        if outcome.path != InvocationPath::Hot || outcome.result == HandlerResult::TimedOut {
            return Err(FunctionError::Template(format!(
                "the calibration request did not take the hot path: {:?}",
                outcome.result
            )));
        }
        touched_pages(machine.memory()).map_err(|e| FunctionError::GuestMemory(e.to_string()))
    }

    /// The state of a streaming invocation, if `options` asks for one.
    pub(super) fn live_output(&self, options: &FunctionInvokeOptions) -> Option<LiveOutput> {
        let sink = options.output.clone()?;
        Some(LiveOutput::new(sink, options.max_output_bytes))
    }

    /// The hot-path pages through which output streams live under
    /// `options` (any event size: a large event still leaves the runtime
    /// its response buffer and doorbell); `None` on the vsock path.
    pub(super) fn streams_on(&self, options: &FunctionInvokeOptions) -> Option<&HotPathPages> {
        self.manifest
            .hot_path
            .as_ref()
            .filter(|_| !options.force_vsock && options.output.is_some())
    }

    /// Waits for the clone's "done" ring and reads the response from its
    /// memory; output the clone streams meanwhile goes to `live`'s sink.
    pub(super) fn run_hot(
        &self,
        machine: &mut Machine,
        pages: &HotPathPages,
        seq: u64,
        deadline: Instant,
        options: &FunctionInvokeOptions,
        mut live: Option<&mut LiveOutput>,
    ) -> Result<FunctionOutcome, FunctionError> {
        let bell = machine.doorbell().clone();
        let cancel = options.cancel.as_ref();
        let _interrupt = interrupt_on(cancel, {
            let bell = bell.clone();
            move || bell.wake()
        });
        let cancelled = || cancel.is_some_and(InvocationCancel::is_cancelled);
        let mut outputs_seen = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // A stopping VM wakes the doorbell's waiters too.
            let exit = &machine.devices.exit;
            let streaming = live.is_some();
            let (rings, rang) = bell.wait_until(left, |r| {
                r.done > 0
                    || exit.reason().is_some()
                    || (streaming && r.output != outputs_seen)
                    || cancelled()
            });
            if let Some(live) = live.as_deref_mut() {
                outputs_seen = rings.output;
                live.drain();
            }
            if cancelled() {
                machine.stop();
                return Err(FunctionError::Cancelled);
            }
            let rang = rang && rings.done > 0;
            if rang {
                let response = buffers::read_response(machine.memory(), &pages.response, seq)?;
                if response.header.status == ResponseStatus::ViaPipe {
                    return collect_via_agent(machine, deadline, options);
                }
                let truncated = response.header.flags
                    & (RESPONSE_FLAG_STDOUT_TRUNCATED | RESPONSE_FLAG_STDERR_TRUNCATED)
                    != 0;
                let (stdout, stderr, cut) =
                    cap_output(response.stdout, response.stderr, options.max_output_bytes);
                let handler = (response.header.handler_ns > 0)
                    .then(|| Duration::from_nanos(response.header.handler_ns));
                let outcome = FunctionOutcome {
                    result: handler_result(Some(response.header.status), response.result),
                    stdout,
                    stderr,
                    output_truncated: truncated || cut,
                    path: InvocationPath::Hot,
                    timings: FunctionTimings {
                        handler,
                        ..FunctionTimings::default()
                    },
                    recycle: None,
                    guest_kernel: None,
                };
                return Ok(outcome);
            }
            if let Some(exit) = machine.devices.exit.reason() {
                return Err(FunctionError::Stopped(exit));
            }
            if left.is_zero() {
                machine.stop();
                return Ok(timed_out(InvocationPath::Hot));
            }
        }
    }
}

/// Ends a streaming invocation's output: what the outcome holds was not
/// streamed yet and goes to the sink after everything that was; the
/// outcome then holds the whole output. An error keeps what streamed.
pub(super) fn finish_output(
    outcome: Result<FunctionOutcome, FunctionError>,
    live: Option<LiveOutput>,
) -> Result<FunctionOutcome, FunctionError> {
    let Some(live) = live else {
        return outcome;
    };
    match outcome {
        Ok(mut outcome) => {
            let (stdout, stderr, cut) = live.finish(&outcome.stdout, &outcome.stderr);
            outcome.stdout = stdout;
            outcome.stderr = stderr;
            outcome.output_truncated |= cut;
            Ok(outcome)
        }
        Err(e) => {
            live.finish(&[], &[]);
            Err(e)
        }
    }
}

/// The vsock path: the agent hands the event to the runtime's pipe.
pub(super) fn run_vsock(
    machine: &Machine,
    event: &[u8],
    timeout_ms: u64,
    deadline: Instant,
    options: &FunctionInvokeOptions,
) -> Result<FunctionOutcome, FunctionError> {
    let connect_deadline = Instant::now() + RESTORE_CONNECT_TIMEOUT;
    let mut agent = AgentClient::connect_refreshed(machine, fresh_refresh(), connect_deadline)?;
    let _interrupt = interrupt_agent(&agent, options)?;
    let invoke = FunctionInvoke {
        event: event.to_vec(),
        timeout_ms: deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .clamp(1, u128::from(timeout_ms)) as u64,
        max_output_bytes: options.max_output_bytes,
    };
    let result = agent
        .invoke_function(&invoke, deadline + invoke_grace(machine.host()))
        .map_err(|e| cancelled_or(e.into(), options))?;
    Ok(outcome_of(result, InvocationPath::Vsock, options))
}

/// While the returned guard lives, cancelling the invocation shuts the
/// agent's connection down, which ends any wait for it.
fn interrupt_agent(
    agent: &AgentClient,
    options: &FunctionInvokeOptions,
) -> Result<Option<super::cancel::Registered>, FunctionError> {
    let Some(cancel) = &options.cancel else {
        return Ok(None);
    };
    let connection = agent
        .interrupter()
        .map_err(|e| FunctionError::Io("agent connection".into(), e))?;
    Ok(interrupt_on(Some(cancel), move || {
        let _ = connection.shutdown(std::net::Shutdown::Both);
    }))
}

/// `error`, or [`FunctionError::Cancelled`] if that is what caused it.
pub(crate) fn cancelled_or(error: FunctionError, options: &FunctionInvokeOptions) -> FunctionError {
    match &options.cancel {
        Some(cancel) if cancel.is_cancelled() => FunctionError::Cancelled,
        _ => error,
    }
}

/// A hot-path response that did not fit its buffer: the runtime sent it to
/// the agent, which hands it over.
fn collect_via_agent(
    machine: &Machine,
    deadline: Instant,
    options: &FunctionInvokeOptions,
) -> Result<FunctionOutcome, FunctionError> {
    let connect_deadline = Instant::now() + RESTORE_CONNECT_TIMEOUT;
    let mut agent = AgentClient::connect_refreshed(machine, fresh_refresh(), connect_deadline)?;
    let _interrupt = interrupt_agent(&agent, options)?;
    let result = agent
        .collect_function(deadline + invoke_grace(machine.host()))
        .map_err(|e| cancelled_or(e.into(), options))?;
    Ok(outcome_of(
        result,
        InvocationPath::HotWithVsockResult,
        options,
    ))
}

fn outcome_of(
    result: FunctionResult,
    path: InvocationPath,
    options: &FunctionInvokeOptions,
) -> FunctionOutcome {
    let handler = if result.timed_out {
        HandlerResult::TimedOut
    } else if let (None, Some(status)) = (result.status, result.runtime_exit) {
        HandlerResult::RuntimeExited {
            status: format!("{status:?}"),
        }
    } else {
        handler_result(result.status, result.result)
    };
    let (stdout, stderr, cut) = cap_output(result.stdout, result.stderr, options.max_output_bytes);
    FunctionOutcome {
        result: handler,
        stdout,
        stderr,
        output_truncated: result.output_truncated || cut,
        path,
        timings: FunctionTimings::default(),
        recycle: None,
        guest_kernel: None,
    }
}

pub(crate) fn timed_out(path: InvocationPath) -> FunctionOutcome {
    FunctionOutcome {
        result: HandlerResult::TimedOut,
        stdout: Vec::new(),
        stderr: Vec::new(),
        output_truncated: false,
        path,
        timings: FunctionTimings::default(),
        recycle: None,
        guest_kernel: None,
    }
}

/// The guest is not trusted to have honoured the output limit.
pub(crate) fn cap_output(
    mut stdout: Vec<u8>,
    mut stderr: Vec<u8>,
    max: u64,
) -> (Vec<u8>, Vec<u8>, bool) {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let cut = stdout.len().saturating_add(stderr.len()) > max;
    stdout.truncate(max);
    stderr.truncate(max - stdout.len());
    (stdout, stderr, cut)
}

/// What a runtime's status and result bytes mean.
fn handler_result(status: Option<ResponseStatus>, result: Vec<u8>) -> HandlerResult {
    match status {
        Some(ResponseStatus::Json) => match serde_json::from_slice(&result) {
            Ok(value) => HandlerResult::Json { value },
            Err(e) => HandlerResult::Error {
                error_type: "InvalidResult".into(),
                message: format!("the runtime's JSON result does not parse: {e}"),
                traceback: String::new(),
            },
        },
        Some(ResponseStatus::Bytes) => HandlerResult::Bytes { bytes: result },
        Some(ResponseStatus::Error) => {
            let object: serde_json::Value = serde_json::from_slice(&result).unwrap_or_default();
            let field = |name: &str| {
                object
                    .get(name)
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let mut message = field("message");
            if object.is_null() {
                message = String::from_utf8_lossy(&result).into_owned();
            }
            HandlerResult::Error {
                error_type: field("type"),
                message,
                traceback: field("traceback"),
            }
        }
        // A chunk of output where the response belongs: no answer either.
        Some(ResponseStatus::ViaPipe | ResponseStatus::Output) | None => {
            HandlerResult::RuntimeExited {
                status: "no answer".into(),
            }
        }
    }
}

/// For the template's warm-up: `Err` with a readable reason unless the
/// handler succeeded.
pub(crate) fn check_handler_result(
    status: Option<ResponseStatus>,
    result: &[u8],
) -> Result<(), String> {
    match handler_result(status, result.to_vec()) {
        HandlerResult::Json { .. } | HandlerResult::Bytes { .. } => Ok(()),
        HandlerResult::Error {
            error_type,
            message,
            traceback,
        } => Err(format!("{error_type}: {message}\n{traceback}")),
        other => Err(format!("{other:?}")),
    }
}

/// A request header for `seq`: the event in memory (`Some`) or on the
/// runtime's pipe (`None`).
fn request_header(seq: u64, event: Option<&[u8]>, timeout_ms: u64) -> RequestHeader {
    let mut entropy = [0u8; REQUEST_ENTROPY_LEN];
    fill_random(&mut entropy);
    RequestHeader {
        seq,
        flags: if event.is_some() {
            0
        } else {
            REQUEST_FLAG_VIA_PIPE
        },
        event_len: event.map_or(0, |e| e.len() as u32),
        timeout_ms: u32::try_from(timeout_ms).unwrap_or(u32::MAX),
        unix_time_ns: unix_time_ns(),
        entropy,
    }
}

/// The host's wall clock, nanoseconds since the Unix epoch.
pub(crate) fn unix_time_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_decode() {
        assert_eq!(
            handler_result(Some(ResponseStatus::Json), b"{\"a\":1}".to_vec()),
            HandlerResult::Json {
                value: serde_json::json!({"a": 1})
            }
        );
        assert!(matches!(
            handler_result(Some(ResponseStatus::Json), b"{".to_vec()),
            HandlerResult::Error { .. }
        ));
        let error = br#"{"type":"ValueError","message":"bad","traceback":"tb"}"#;
        assert_eq!(
            handler_result(Some(ResponseStatus::Error), error.to_vec()),
            HandlerResult::Error {
                error_type: "ValueError".into(),
                message: "bad".into(),
                traceback: "tb".into()
            }
        );
        // A runtime's non-JSON error text is kept as the message.
        assert!(matches!(
            handler_result(Some(ResponseStatus::Error), b"oops".to_vec()),
            HandlerResult::Error { message, .. } if message == "oops"
        ));
        assert!(check_handler_result(Some(ResponseStatus::Bytes), b"x").is_ok());
        assert!(check_handler_result(Some(ResponseStatus::Error), error).is_err());
        assert!(check_handler_result(None, b"").is_err());
    }

    #[test]
    fn outcomes_serialize_timings_in_milliseconds() {
        let outcome = FunctionOutcome {
            result: HandlerResult::Json {
                value: serde_json::json!(1),
            },
            stdout: b"o".to_vec(),
            stderr: Vec::new(),
            output_truncated: false,
            path: InvocationPath::Hot,
            timings: FunctionTimings {
                restore: Duration::from_micros(1500),
                handler: None,
                ..FunctionTimings::default()
            },
            recycle: None,
            guest_kernel: None,
        };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["timings"]["restore_ms"], 1.5);
        assert!(json["timings"]["handler_ms"].is_null());
        assert_eq!(json["path"], "hot");
        assert_eq!(
            json["result"],
            serde_json::json!({"kind": "json", "value": 1})
        );
        assert_eq!(json["stdout"], "o");
    }

    #[test]
    fn output_is_capped() {
        let (out, err, cut) = cap_output(vec![1; 10], vec![2; 10], 15);
        assert_eq!((out.len(), err.len(), cut), (10, 5, true));
        let (out, err, cut) = cap_output(vec![1; 3], vec![2; 3], 15);
        assert_eq!((out.len(), err.len(), cut), (3, 3, false));
    }

    #[test]
    fn request_headers() {
        let header = request_header(2, Some(b"{}"), 1000);
        assert_eq!((header.seq, header.flags, header.event_len), (2, 0, 2));
        let header = request_header(2, None, u64::MAX);
        assert_eq!(header.flags, REQUEST_FLAG_VIA_PIPE);
        assert_eq!(header.timeout_ms, u32::MAX);
    }
}
