//! Recycled clones: one microVM of a function serving many invocations,
//! reset in place to the template between them
//! ([`crate::snapshot::ResettableClone`]), so an invocation pays for the
//! pages it dirtied instead of for a new VM.
//!
//! A recycled clone only ever serves its own function. Whatever leaves it
//! in a state a reset does not cover ends it: a timeout, a runtime that
//! did not answer, the vsock path (it uses the agent and the vsock
//! device), a failed reset or verification. The next invocation then
//! needs a new clone ([`RecycledFunction::is_usable`] says so; a
//! [`FunctionPool`] replaces it by itself).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::invoke::{finish_output, run_vsock, timeout_ms, CLONE_TIMER_DELAY};
use super::output::output_hook;
use super::{Function, FunctionError, FunctionInvokeOptions, FunctionOutcome, HandlerResult};
use crate::config::ConsoleOutput;
use crate::snapshot::{ResetError, ResetReport, ResettableClone, RestoreOptions};

/// Environment variable that turns reset verification on for every
/// recycled clone (`1`): after each reset, every guest page, register and
/// device state is compared with the template, and a difference fails the
/// clone loudly. Slow; for tests and audits.
pub const VERIFY_RESET_ENV: &str = "EMBER_VERIFY_RESET";

/// How recycled clones are made.
#[derive(Debug, Clone)]
pub struct RecycleOptions {
    /// Where a clone's console goes.
    pub console: ConsoleOutput,
    /// seccomp filters on the clone's threads (on by default).
    pub seccomp: bool,
    /// Verify every reset against the template (see [`VERIFY_RESET_ENV`]).
    pub verify: bool,
    /// The clone's I/O rate limits, for its whole life (default: none).
    pub io_limits: crate::devices::rate_limiter::IoLimits,
}

impl Default for RecycleOptions {
    fn default() -> Self {
        RecycleOptions {
            console: ConsoleOutput::default(),
            seccomp: true,
            verify: std::env::var(VERIFY_RESET_ENV).is_ok_and(|v| v == "1"),
            io_limits: Default::default(),
        }
    }
}

/// What the reset after an invocation did (a recycled clone's teardown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecycleInfo {
    /// The clone served this many invocations, this one included.
    pub invocation: u64,
    /// The reset (all zero when there was none: the clone ended).
    #[serde(flatten)]
    pub reset: ResetReport,
    /// The reset (and verification, when on) succeeded: the clone serves
    /// the next invocation. Otherwise it is destroyed.
    pub reused: bool,
}

/// One microVM of a function that serves invocations one after another,
/// reset to the template after each.
#[derive(Debug)]
pub struct RecycledFunction {
    function: Arc<Function>,
    clone: Option<ResettableClone>,
    verify: bool,
    invocations: u64,
}

impl Function {
    /// Makes a recycled clone of this function (see [`RecycledFunction`]).
    pub fn recycled(
        self: &Arc<Self>,
        options: &RecycleOptions,
    ) -> Result<RecycledFunction, FunctionError> {
        if self.manifest().hot_path.is_none() {
            return Err(FunctionError::BadRequest(
                "only functions with a hot path (e.g. python3) can be recycled".into(),
            ));
        }
        let restore = RestoreOptions {
            console: options.console.clone(),
            seccomp: options.seccomp,
            timer_delay: Some(CLONE_TIMER_DELAY),
            prefault: self.manifest().working_set.clone(),
            io_limits: options.io_limits,
            ..RestoreOptions::default()
        };
        let clone = self.snapshot().prepare_resettable(&restore)?;
        let mut recycled = RecycledFunction {
            function: Arc::clone(self),
            clone: Some(clone),
            verify: options.verify,
            invocations: 0,
        };
        if recycled.verify {
            recycled.verify_now()?;
        }
        Ok(recycled)
    }
}

impl RecycledFunction {
    /// The function this clone serves.
    pub fn function(&self) -> &Arc<Function> {
        &self.function
    }

    /// Whether the clone can serve another invocation.
    pub fn is_usable(&self) -> bool {
        self.clone.is_some()
    }

    /// The clone's guest memory, between invocations (for audits); `None`
    /// once the clone ended.
    pub fn guest_memory(&self) -> Option<&vm_memory::GuestMemoryMmap> {
        self.clone.as_ref().map(|c| c.machine().memory())
    }

    /// Invocations served so far.
    pub fn invocations(&self) -> u64 {
        self.invocations
    }

    /// Runs one invocation in this clone and resets it. The outcome's
    /// `recycle` says what the reset did and whether the clone is still
    /// usable; an error also ends the clone.
    pub fn invoke(
        &mut self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, FunctionError> {
        let requested = Instant::now();
        let timeout_ms = timeout_ms(options)?;
        let Some(mut clone) = self.clone.take() else {
            return Err(FunctionError::BadRequest(
                "this recycled clone ended; make a new one".into(),
            ));
        };
        self.invocations += 1;
        let function = Arc::clone(&self.function);
        let snapshot = function.snapshot();
        let deadline = requested + options.timeout;
        let hot = function.hot_pages_for(event, options);
        let seq = function.manifest().next_seq;
        let mut live = function.live_output(options);
        let mut flags = 0;
        if let (Some(live), Some(pages)) = (&live, function.streams_on(options)) {
            let memory = clone.machine().memory().clone();
            let hook = output_hook(memory, pages.response.clone(), seq, live.queue().clone());
            clone.machine().doorbell().set_output_hook(Some(hook));
            flags |= ember_protocol::hotpath::REQUEST_FLAG_STREAM;
        }
        let writes = function.request_writes(
            clone.machine().memory(),
            clone.guest_tsc(),
            hot.map(|_| event),
            timeout_ms,
            flags,
        )?;
        for write in &writes {
            clone.write(write.addr, &write.bytes).map_err(reset_error)?;
        }
        clone.resume(snapshot).map_err(reset_error)?;
        let running = Instant::now();
        let outcome = match hot {
            Some(pages) => function.run_hot(
                clone.machine_mut(),
                pages,
                seq,
                deadline,
                options,
                live.as_mut(),
            ),
            None => run_vsock(clone.machine(), event, timeout_ms, deadline, options),
        };
        let answered = Instant::now();
        clone.park();
        clone.machine().doorbell().set_output_hook(None);
        let outcome = finish_output(outcome, live);
        // Every doorbell ring (DONE, WAITING if the vCPU got that far
        // before it was parked, one per output chunk, and any other a
        // guest made) is one emulated store on PVM hosts, not guest-kernel
        // work: exactly these are expected.
        let rings = clone.machine().doorbell().rings();
        clone.expect_doorbell_rings(rings.waiting + rings.done + rings.output + rings.other);
        let work = clone.kernel_work();
        // Only a clean hot-path answer leaves a clone a reset can restore.
        let clean = outcome.as_ref().is_ok_and(|o| {
            hot.is_some()
                && o.path == super::InvocationPath::Hot
                && !matches!(
                    o.result,
                    HandlerResult::TimedOut | HandlerResult::RuntimeExited { .. }
                )
                && clone.machine().doorbell().rings().done > 0
        });
        let report = if clean {
            match clone.reset(snapshot) {
                Ok(report) => Some(report),
                Err(e) => {
                    log::warn!(
                        "recycled clone of {}: reset failed: {e}",
                        snapshot.dir().display()
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut info = RecycleInfo {
            invocation: self.invocations,
            reset: report.unwrap_or_default(),
            reused: false,
        };
        if report.is_some() {
            self.clone = Some(clone);
            if self.verify {
                self.verify_now()?;
            }
            info.reused = self.clone.is_some();
        }
        let done = Instant::now();
        let mut outcome = outcome?;
        outcome
            .timings
            .set_phases(requested, running, answered, done);
        outcome.recycle = Some(info);
        outcome.guest_kernel = work;
        Ok(outcome)
    }

    /// Compares the (reset, parked) clone with its template; a difference
    /// ends the clone and is returned as an error.
    fn verify_now(&mut self) -> Result<(), FunctionError> {
        let Some(clone) = &self.clone else {
            return Ok(());
        };
        if let Err(e) = clone.verify(self.function.snapshot()) {
            self.clone = None;
            return Err(reset_error(e));
        }
        Ok(())
    }
}

fn reset_error(e: ResetError) -> FunctionError {
    FunctionError::Reset(e)
}

/// Sizes of a [`FunctionPool`].
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Clones made up front and kept.
    pub min: usize,
    /// Most clones alive at once; invocations beyond wait for one.
    pub max: usize,
    /// How the clones are made.
    pub recycle: RecycleOptions,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            min: 1,
            max: 4,
            recycle: RecycleOptions::default(),
        }
    }
}

/// What a pool did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Clones alive (idle or serving).
    pub live: usize,
    /// Clones idle, reset and ready.
    pub idle: usize,
    /// Clones made.
    pub created: u64,
    /// Clones destroyed because they could not be reset.
    pub replaced: u64,
    /// Invocations served.
    pub invocations: u64,
}

#[derive(Debug, Default)]
struct PoolState {
    idle: Vec<RecycledFunction>,
    stats: PoolStats,
}

/// Recycled clones of one function: an invocation takes an idle clone (or
/// makes one, up to `max`), and gives it back reset, or destroys it if it
/// cannot be reset.
#[derive(Debug)]
pub struct FunctionPool {
    function: Arc<Function>,
    options: PoolOptions,
    state: Mutex<PoolState>,
    returned: Condvar,
}

impl FunctionPool {
    /// A pool for `function` with `options.min` clones made up front.
    pub fn new(function: Arc<Function>, options: PoolOptions) -> Result<Self, FunctionError> {
        if options.max == 0 || options.min > options.max {
            return Err(FunctionError::BadRequest(format!(
                "pool sizes min {} max {}: need 1 <= max and min <= max",
                options.min, options.max
            )));
        }
        let pool = FunctionPool {
            function,
            options,
            state: Mutex::new(PoolState::default()),
            returned: Condvar::new(),
        };
        for _ in 0..pool.options.min {
            let clone = pool.function.recycled(&pool.options.recycle)?;
            let mut state = pool.lock();
            state.stats.created += 1;
            state.stats.live += 1;
            state.idle.push(clone);
        }
        Ok(pool)
    }

    /// The function the pool serves.
    pub fn function(&self) -> &Arc<Function> {
        &self.function
    }

    /// Counters and sizes.
    pub fn stats(&self) -> PoolStats {
        let state = self.lock();
        PoolStats {
            idle: state.idle.len(),
            ..state.stats
        }
    }

    /// Runs one invocation in a recycled clone of the pool.
    pub fn invoke(
        &self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, FunctionError> {
        let mut clone = self.take(options.timeout)?;
        let outcome = clone.invoke(event, options);
        let mut state = self.lock();
        state.stats.invocations += 1;
        if clone.is_usable() {
            state.idle.push(clone);
        } else {
            state.stats.live -= 1;
            state.stats.replaced += 1;
            drop(state);
            // Destroying the VM happens outside the lock.
            drop(clone);
            if let Err(e) = self.refill() {
                log::warn!("pool of {}: cannot replace a clone: {e}", self.describe());
            }
        }
        self.returned.notify_one();
        outcome
    }

    /// An idle clone, a new one if the pool may grow, or the first one
    /// returned within `wait`.
    fn take(&self, wait: Duration) -> Result<RecycledFunction, FunctionError> {
        let deadline = Instant::now() + wait;
        let mut state = self.lock();
        loop {
            if let Some(clone) = state.idle.pop() {
                return Ok(clone);
            }
            if state.stats.live < self.options.max {
                state.stats.live += 1;
                state.stats.created += 1;
                drop(state);
                return self
                    .function
                    .recycled(&self.options.recycle)
                    .inspect_err(|_| {
                        self.lock().stats.live -= 1;
                    });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FunctionError::BadRequest(format!(
                    "all {} clones stayed busy for {wait:?}",
                    self.options.max
                )));
            }
            state = self
                .returned
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Makes clones until `min` are alive.
    fn refill(&self) -> Result<(), FunctionError> {
        while self.lock().stats.live < self.options.min {
            let clone = self.function.recycled(&self.options.recycle)?;
            let mut state = self.lock();
            state.stats.live += 1;
            state.stats.created += 1;
            state.idle.push(clone);
            self.returned.notify_one();
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.function.snapshot().dir().display().to_string()
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
