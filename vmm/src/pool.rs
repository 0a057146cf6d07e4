//! A pool of warm sandboxes: provisioned concurrency for one snapshot.
//!
//! A [`Pool`] keeps [`PoolConfig::warm`] sandboxes restored from one
//! [`Snapshot`] and connected to their agents, so an invocation skips the
//! restore. Every sandbox serves exactly one invocation and is destroyed
//! afterwards; background refill threads restore replacements. At most
//! [`PoolConfig::max_live`] sandboxes exist at once (warm, being restored,
//! or running an invocation); an invocation that finds no warm sandbox
//! restores one on demand if that limit allows, and otherwise waits in a
//! FIFO queue of at most [`PoolConfig::max_queue`] callers. Past that it
//! fails at once with [`PoolError::Busy`].
//!
//! The API is blocking: [`Pool::invoke`] returns when the invocation has
//! ended. It is `Sync`, so share it (`Arc<Pool>`) between threads; async
//! callers run it on a blocking thread (`tokio::task::spawn_blocking`),
//! as `ember serve` does.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ember::pool::{Pool, PoolConfig};
//! use ember::snapshot::{ensure_cached_snapshot, Snapshot};
//! use ember::{paths, Invocation, VmConfig};
//!
//! let config = VmConfig::new(paths::default_kernel(), Some(paths::default_initrd()));
//! let snapshot = Arc::new(Snapshot::open(&ensure_cached_snapshot(&config, |_| {})?)?);
//! let pool = Pool::new(snapshot, PoolConfig { warm: 2, max_live: 4, ..PoolConfig::default() })?;
//! let result = pool.invoke(&Invocation::new(["echo", "hello"]))?;
//! assert_eq!(result.outcome.stdout, b"hello\n");
//! println!("warm: {}, restore {:?}", result.warm, result.restore);
//! pool.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/pool.rs` runs a few invocations in parallel
//! (`cargo run --release --example pool`).
//!
//! Shutdown ([`Pool::shutdown`], or dropping the pool) stops accepting
//! work, destroys the warm sandboxes, stops the refill threads and waits
//! up to [`PoolConfig::shutdown_grace`] for running invocations; isolated
//! sandboxes still running after that have their worker process killed.
//! (An in-process sandbox cannot be stopped from outside its invocation:
//! it ends with its own timeout.)

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::agent::OutputStream;
use crate::sandbox::{Invocation, Outcome, Sandbox, SandboxError};
use crate::snapshot::{RestoreOptions, Snapshot};

/// How a [`Pool`] sizes itself.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Sandboxes kept restored and idle, ready for an invocation.
    pub warm: usize,
    /// Most sandboxes alive at once: warm, being restored, or in use.
    /// At least 1 and at least `warm`.
    pub max_live: usize,
    /// Most callers waiting for a sandbox; one more gets
    /// [`PoolError::Busy`]. 0 refuses whenever `max_live` is reached.
    pub max_queue: usize,
    /// Longest wait in the queue before [`PoolError::QueueTimeout`].
    pub queue_timeout: Duration,
    /// How sandboxes are restored (console, isolation).
    pub restore_options: RestoreOptions,
    /// Threads restoring warm sandboxes in the background (at least 1
    /// when `warm` > 0).
    pub refill_threads: usize,
    /// Tries per on-demand restore before the invocation fails.
    pub restore_attempts: u32,
    /// Longest pause of a refill thread after failed restores (the pause
    /// doubles from 10 ms with each failure in a row).
    pub max_backoff: Duration,
    /// How long shutdown waits for running invocations before it kills
    /// isolated workers.
    pub shutdown_grace: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            warm: 1,
            max_live: 4,
            max_queue: 16,
            queue_timeout: Duration::from_secs(60),
            restore_options: RestoreOptions::default(),
            refill_threads: 2,
            restore_attempts: 3,
            max_backoff: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The first pause after a failed background restore.
const MIN_BACKOFF: Duration = Duration::from_millis(10);

/// An invocation's [`Outcome`] and what the pool adds to it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolOutcome {
    /// What the sandbox reported.
    pub outcome: Outcome,
    /// Host-side restore time of the sandbox used: request until its agent
    /// was connected and reseeded (spent before the request arrived for a
    /// warm sandbox).
    pub restore: Duration,
    /// Time waiting for a sandbox slot in the queue.
    pub queue: Duration,
    /// The sandbox came warm from the pool (`false`: restored on demand).
    pub warm: bool,
}

/// A snapshot of the pool's gauges and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Warm sandboxes waiting for an invocation.
    pub warm: usize,
    /// Sandboxes being restored (refills and on-demand restores).
    pub restoring: usize,
    /// Sandboxes running an invocation.
    pub in_use: usize,
    /// All of the above: sandboxes alive now.
    pub live: usize,
    /// Callers waiting for a sandbox.
    pub queued: usize,
    /// The pool no longer accepts invocations.
    pub closed: bool,
    /// Successful restores.
    pub restores: u64,
    /// Failed restores (each try counts).
    pub restore_failures: u64,
    /// Invocations given a warm sandbox.
    pub warm_hits: u64,
    /// Invocations given a sandbox restored on demand.
    pub on_demand: u64,
    /// Callers refused with [`PoolError::Busy`].
    pub rejected: u64,
    /// Callers that gave up with [`PoolError::QueueTimeout`].
    pub queue_timeouts: u64,
}

/// Why the pool could not serve an invocation.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration is unusable.
    #[error("invalid pool configuration: {0}")]
    Config(String),
    /// A refill thread could not be started.
    #[error("cannot start a refill thread: {0}")]
    Thread(std::io::Error),
    /// The invocation is invalid; no sandbox was used.
    #[error("invalid invocation: {0}")]
    Invalid(String),
    /// Every sandbox slot is taken and the queue is full.
    #[error("all {max_live} sandboxes are busy and {max_queue} callers wait already")]
    Busy {
        /// The pool's `max_live`.
        max_live: usize,
        /// The pool's `max_queue`.
        max_queue: usize,
    },
    /// The caller waited in the queue for too long.
    #[error("no sandbox became free within {0:?}")]
    QueueTimeout(Duration),
    #[error("the sandbox pool is shutting down")]
    ShuttingDown,
    /// Restoring a sandbox failed (after every attempt).
    #[error("cannot restore a sandbox: {0}")]
    Restore(SandboxError),
    /// The sandbox could not run the invocation.
    #[error(transparent)]
    Invoke(SandboxError),
}

/// A pool of warm sandboxes of one snapshot. See the [module docs](self).
#[derive(Debug)]
pub struct Pool {
    shared: Arc<Shared>,
    refillers: Mutex<Vec<JoinHandle<()>>>,
    /// Held through a shutdown, so a second caller waits for the first.
    shutting_down: Mutex<()>,
}

#[derive(Debug)]
struct Shared {
    snapshot: Arc<Snapshot>,
    config: PoolConfig,
    state: Mutex<State>,
    /// Signalled on every change of `state` that someone may wait for.
    changed: Condvar,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    restores: AtomicU64,
    restore_failures: AtomicU64,
    warm_hits: AtomicU64,
    on_demand: AtomicU64,
    rejected: AtomicU64,
    queue_timeouts: AtomicU64,
}

/// A restored sandbox and how long its restore took.
#[derive(Debug)]
struct Ready {
    sandbox: Sandbox,
    restore: Duration,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<Ready>,
    /// Background restores in progress.
    refilling: usize,
    /// On-demand restores in progress.
    on_demand: usize,
    /// Leases alive.
    in_use: usize,
    /// Tickets of the callers waiting, first come first served.
    queue: VecDeque<u64>,
    next_ticket: u64,
    /// pidfds of the isolated workers (and their descendants) of the
    /// leases alive, by lease.
    workers: HashMap<u64, Vec<OwnedFd>>,
    next_lease: u64,
    closed: bool,
}

/// What a caller got a right to.
enum Claim {
    Warm(Box<Ready>),
    Restore,
}

impl State {
    fn live(&self) -> usize {
        self.ready.len() + self.refilling + self.on_demand + self.in_use
    }

    /// Takes a warm sandbox, or a slot to restore one in.
    fn claim(&mut self, max_live: usize) -> Option<Claim> {
        if let Some(ready) = self.ready.pop_front() {
            self.in_use += 1;
            Some(Claim::Warm(Box::new(ready)))
        } else if self.live() < max_live {
            self.on_demand += 1;
            Some(Claim::Restore)
        } else {
            None
        }
    }

    /// A refill thread has work: waiting callers go first.
    fn needs_refill(&self, config: &PoolConfig) -> bool {
        !self.closed
            && self.queue.is_empty()
            && self.ready.len() + self.refilling < config.warm
            && self.live() < config.max_live
    }

    fn leave_queue(&mut self, ticket: u64) {
        self.queue.retain(|t| *t != ticket);
    }
}

fn lock(mutex: &Mutex<State>) -> MutexGuard<'_, State> {
    // Nothing panics while holding the lock; if something did, the state
    // is still consistent enough to shut down.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// Creates a pool of clones of `snapshot` and starts refilling it in
    /// the background. One sandbox is restored before this returns (it
    /// becomes the first warm one, or is destroyed if `warm` is 0), so an
    /// unusable snapshot or configuration fails here rather than on the
    /// first invocation.
    pub fn new(snapshot: Arc<Snapshot>, config: PoolConfig) -> Result<Pool, PoolError> {
        if config.max_live == 0 {
            return Err(PoolError::Config("max_live must be at least 1".into()));
        }
        if config.warm > config.max_live {
            return Err(PoolError::Config(format!(
                "warm ({}) must not exceed max_live ({})",
                config.warm, config.max_live
            )));
        }
        if config.warm > 0 && config.refill_threads == 0 {
            return Err(PoolError::Config(
                "a warm pool needs at least one refill thread".into(),
            ));
        }
        if config.restore_attempts == 0 {
            return Err(PoolError::Config(
                "restore_attempts must be at least 1".into(),
            ));
        }
        let threads = if config.warm > 0 {
            config.refill_threads
        } else {
            0
        };
        let shared = Arc::new(Shared {
            snapshot,
            config,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            counters: Counters::default(),
        });
        let pool = Pool {
            shared,
            refillers: Mutex::new(Vec::with_capacity(threads.max(1))),
            shutting_down: Mutex::new(()),
        };
        // The first restore checks the snapshot and the configuration. It
        // runs on the first refill thread, which lives as long as the pool,
        // so no sandbox of the pool depends on the caller's thread (a child
        // process can be tied to the thread that spawned it, as with
        // PR_SET_PDEATHSIG).
        let (probe_tx, probe_rx) = std::sync::mpsc::channel();
        let shared = pool.shared.clone();
        pool.spawn_thread(0, move || {
            match shared.restore_retrying() {
                Ok(ready) if shared.config.warm > 0 => lock(&shared.state).ready.push_back(ready),
                Ok(ready) => drop(ready),
                Err(e) => {
                    let _ = probe_tx.send(Err(e));
                    return;
                }
            }
            let _ = probe_tx.send(Ok(()));
            if shared.config.warm > 0 {
                shared.refill_loop();
            }
        })?;
        probe_rx
            .recv()
            .unwrap_or_else(|_| Err(PoolError::Config("the first restore's thread died".into())))?;
        for i in 1..threads {
            let shared = pool.shared.clone();
            pool.spawn_thread(i, move || shared.refill_loop())?;
        }
        Ok(pool)
    }

    fn spawn_thread(&self, i: usize, f: impl FnOnce() + Send + 'static) -> Result<(), PoolError> {
        let handle = std::thread::Builder::new()
            .name(format!("ember-refill-{i}"))
            .spawn(f)
            .map_err(PoolError::Thread)?;
        self.refillers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
        Ok(())
    }

    /// The snapshot the pool restores.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.shared.snapshot
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// Runs `invocation` in a sandbox of its own (warm if one is ready),
    /// collecting its output. Blocks while queued and while it runs.
    pub fn invoke(&self, invocation: &Invocation) -> Result<PoolOutcome, PoolError> {
        invocation.validate().map_err(PoolError::Invalid)?;
        self.acquire()?.invoke(invocation)
    }

    /// Like [`Pool::invoke`], handing output to `on_output` as it arrives
    /// (the outcome's `stdout` and `stderr` stay empty).
    pub fn invoke_streaming(
        &self,
        invocation: &Invocation,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<PoolOutcome, PoolError> {
        invocation.validate().map_err(PoolError::Invalid)?;
        self.acquire()?.invoke_streaming(invocation, on_output)
    }

    /// Takes a sandbox for one invocation: a warm one, or one restored now
    /// if `max_live` allows, or the next one free after waiting in the
    /// queue. Fails at once with [`PoolError::Busy`] when the queue is
    /// full. Useful to know that a sandbox is there before committing to
    /// an answer (the server sends its status line only then); dropping
    /// the lease unused destroys the sandbox.
    ///
    /// A sandbox restored on demand is restored on the calling thread
    /// (warm ones on the pool's own threads); the server uses each lease
    /// on the thread that acquired it.
    pub fn acquire(&self) -> Result<Lease, PoolError> {
        let shared = &self.shared;
        let config = &shared.config;
        let started = Instant::now();
        let mut state = lock(&shared.state);
        if state.closed {
            return Err(PoolError::ShuttingDown);
        }
        // Nobody jumps the queue.
        let claimed = if state.queue.is_empty() {
            state.claim(config.max_live)
        } else {
            None
        };
        let claim = match claimed {
            Some(claim) => claim,
            None => {
                if state.queue.len() >= config.max_queue {
                    shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(PoolError::Busy {
                        max_live: config.max_live,
                        max_queue: config.max_queue,
                    });
                }
                let ticket = state.next_ticket;
                state.next_ticket += 1;
                state.queue.push_back(ticket);
                let deadline = started + config.queue_timeout;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        state.leave_queue(ticket);
                        shared.changed.notify_all();
                        shared
                            .counters
                            .queue_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(PoolError::QueueTimeout(config.queue_timeout));
                    }
                    state = shared
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    if state.closed {
                        state.leave_queue(ticket);
                        shared.changed.notify_all();
                        return Err(PoolError::ShuttingDown);
                    }
                    if state.queue.front() == Some(&ticket) {
                        if let Some(claim) = state.claim(config.max_live) {
                            state.queue.pop_front();
                            // The next in line may be served too, and
                            // refill threads may now have work.
                            shared.changed.notify_all();
                            break claim;
                        }
                    }
                }
            }
        };
        let queue = started.elapsed();
        match claim {
            Claim::Warm(ready) => {
                // A warm sandbox left: the refill threads have work.
                shared.changed.notify_all();
                shared.counters.warm_hits.fetch_add(1, Ordering::Relaxed);
                let id = state.register(&ready.sandbox);
                drop(state);
                Ok(Lease::new(shared.clone(), id, *ready, queue, true))
            }
            Claim::Restore => {
                drop(state);
                let result = shared.restore_retrying();
                let mut state = lock(&shared.state);
                state.on_demand -= 1;
                match result {
                    Ok(ready) => {
                        state.in_use += 1;
                        let id = state.register(&ready.sandbox);
                        drop(state);
                        shared.counters.on_demand.fetch_add(1, Ordering::Relaxed);
                        Ok(Lease::new(shared.clone(), id, ready, queue, false))
                    }
                    Err(e) => {
                        shared.changed.notify_all();
                        Err(e)
                    }
                }
            }
        }
    }

    /// The pool's gauges and counters now.
    pub fn stats(&self) -> PoolStats {
        let c = &self.shared.counters;
        let state = lock(&self.shared.state);
        PoolStats {
            warm: state.ready.len(),
            restoring: state.refilling + state.on_demand,
            in_use: state.in_use,
            live: state.live(),
            queued: state.queue.len(),
            closed: state.closed,
            restores: c.restores.load(Ordering::Relaxed),
            restore_failures: c.restore_failures.load(Ordering::Relaxed),
            warm_hits: c.warm_hits.load(Ordering::Relaxed),
            on_demand: c.on_demand.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            queue_timeouts: c.queue_timeouts.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting invocations: callers waiting and new ones get
    /// [`PoolError::ShuttingDown`]; running invocations go on. Does not
    /// wait.
    pub fn close(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.changed.notify_all();
    }

    /// Shuts the pool down: [`Pool::close`], destroys the warm sandboxes,
    /// stops the refill threads (a restore in progress is finished and
    /// destroyed), waits up to [`PoolConfig::shutdown_grace`] for running
    /// invocations, then kills the workers of isolated sandboxes still
    /// running and waits for their leases to end. Returns the number of
    /// in-process sandboxes still running an invocation (0 unless the
    /// grace ran out: each stops at its own timeout). Idempotent; a
    /// concurrent call waits for the first to finish.
    pub fn shutdown(&self) -> usize {
        let _one_at_a_time = self
            .shutting_down
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let warm = {
            let mut state = lock(&self.shared.state);
            state.closed = true;
            std::mem::take(&mut state.ready)
        };
        self.shared.changed.notify_all();
        drop(warm);
        let refillers = std::mem::take(
            &mut *self
                .refillers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in refillers {
            let _ = handle.join();
        }
        let deadline = Instant::now() + self.shared.config.shutdown_grace;
        let mut state = self.shared.wait_idle(deadline);
        if state.in_use + state.on_demand > 0 && !state.workers.is_empty() {
            for pidfd in state.workers.values().flatten() {
                kill_pidfd(pidfd);
            }
            // A killed worker breaks its invocation's connection at once.
            drop(state);
            state = self
                .shared
                .wait_idle(Instant::now() + Duration::from_secs(10));
        }
        state.in_use + state.on_demand
    }
}

impl Drop for Pool {
    /// Same as [`Pool::shutdown`].
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl State {
    /// Records a new lease (and its worker, to kill at shutdown).
    fn register(&mut self, sandbox: &Sandbox) -> u64 {
        let id = self.next_lease;
        self.next_lease += 1;
        if let Some(pid) = sandbox.worker_pid() {
            let pidfds = process_tree(pid).into_iter().filter_map(open_pidfd);
            self.workers.insert(id, pidfds.collect());
        }
        id
    }
}

/// `pid` and its descendants, from `/proc`.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut i = 0;
    while let Some(&p) = found.get(i) {
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children"));
            let children = children.iter().flat_map(|c| c.split_whitespace());
            found.extend(children.filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    found
}

/// A pidfd for `pid`: it keeps naming that process, never a later one
/// with the same number. The worker is our unreaped child while its
/// lease lives, so its number is still its own here (a descendant's
/// could have been reused in the instant since `/proc` was read).
fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes integers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn kill_pidfd(pidfd: &OwnedFd) {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

impl Shared {
    /// One restore, counted.
    fn restore_once(&self) -> Result<Ready, SandboxError> {
        match Sandbox::restore(&self.snapshot, &self.config.restore_options) {
            Ok(sandbox) => {
                self.counters.restores.fetch_add(1, Ordering::Relaxed);
                Ok(Ready {
                    restore: sandbox.ready_timings().ready,
                    sandbox,
                })
            }
            Err(e) => {
                self.counters
                    .restore_failures
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!("sandbox restore failed: {e}");
                Err(e)
            }
        }
    }

    /// Up to `restore_attempts` restores in a row, for a caller waiting.
    fn restore_retrying(&self) -> Result<Ready, PoolError> {
        let mut attempt = 1;
        loop {
            match self.restore_once() {
                Ok(ready) => return Ok(ready),
                Err(e) if attempt >= self.config.restore_attempts => {
                    return Err(PoolError::Restore(e))
                }
                Err(_) => attempt += 1,
            }
        }
    }

    /// A refill thread: restores while the pool is short of warm
    /// sandboxes, sleeps on the condition variable otherwise.
    fn refill_loop(&self) {
        let mut failures: u32 = 0;
        loop {
            let mut state = lock(&self.state);
            while !state.needs_refill(&self.config) {
                if state.closed {
                    return;
                }
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.refilling += 1;
            drop(state);
            let result = self.restore_once();
            let mut state = lock(&self.state);
            state.refilling -= 1;
            match result {
                Ok(ready) if state.closed => {
                    drop(state);
                    drop(ready);
                    self.changed.notify_all();
                    return;
                }
                Ok(ready) => {
                    failures = 0;
                    state.ready.push_back(ready);
                    self.changed.notify_all();
                }
                Err(_) => {
                    self.changed.notify_all();
                    // Bounded exponential backoff; shutdown cuts it short.
                    let pause = MIN_BACKOFF
                        .saturating_mul(1 << failures.min(16))
                        .min(self.config.max_backoff);
                    failures = failures.saturating_add(1);
                    state = self.wait_while(state, Instant::now() + pause, |s| !s.closed);
                }
            }
        }
    }

    /// Waits until no sandbox is in use or being restored on demand, or
    /// `deadline`; returns the locked state.
    fn wait_idle(&self, deadline: Instant) -> MutexGuard<'_, State> {
        let state = lock(&self.state);
        self.wait_while(state, deadline, |s| s.in_use + s.on_demand > 0)
    }

    /// Waits on the pool's changes while `busy(state)` holds, at most until
    /// `deadline`; returns the locked state.
    fn wait_while<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
        busy: impl Fn(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while busy(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state
    }
}

/// One sandbox taken from a [`Pool`] for one invocation. Dropping it
/// destroys the sandbox and frees its slot.
#[derive(Debug)]
pub struct Lease {
    shared: Arc<Shared>,
    id: u64,
    sandbox: Option<Sandbox>,
    restore: Duration,
    queue: Duration,
    warm: bool,
}

impl Lease {
    fn new(shared: Arc<Shared>, id: u64, ready: Ready, queue: Duration, warm: bool) -> Self {
        Lease {
            shared,
            id,
            sandbox: Some(ready.sandbox),
            restore: ready.restore,
            queue,
            warm,
        }
    }

    /// The sandbox came warm from the pool (`false`: restored on demand).
    pub fn warm(&self) -> bool {
        self.warm
    }

    /// How long the sandbox took to restore.
    pub fn restore_time(&self) -> Duration {
        self.restore
    }

    /// How long the caller waited in the queue.
    pub fn queue_time(&self) -> Duration {
        self.queue
    }

    /// Runs `invocation`, collecting its output; the sandbox is destroyed
    /// afterwards.
    pub fn invoke(self, invocation: &Invocation) -> Result<PoolOutcome, PoolError> {
        self.run(|sandbox| sandbox.invoke(invocation))
    }

    /// Runs `invocation`, handing output to `on_output` as it arrives; the
    /// sandbox is destroyed afterwards.
    pub fn invoke_streaming(
        self,
        invocation: &Invocation,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<PoolOutcome, PoolError> {
        self.run(|sandbox| sandbox.invoke_streaming(invocation, on_output))
    }

    /// Like [`Lease::invoke_streaming`], but `on_output` may stop the
    /// invocation (see [`Sandbox::invoke_streaming_until`]).
    pub fn invoke_streaming_until(
        self,
        invocation: &Invocation,
        on_output: impl FnMut(OutputStream, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<PoolOutcome, PoolError> {
        self.run(|sandbox| sandbox.invoke_streaming_until(invocation, on_output))
    }

    fn run(
        mut self,
        f: impl FnOnce(&mut Sandbox) -> Result<Outcome, SandboxError>,
    ) -> Result<PoolOutcome, PoolError> {
        let Some(mut sandbox) = self.sandbox.take() else {
            return Err(PoolError::Invoke(SandboxError::AlreadyUsed));
        };
        let result = f(&mut sandbox);
        // Destroyed before the slot is given back.
        drop(sandbox);
        let outcome = result.map_err(PoolError::Invoke)?;
        Ok(PoolOutcome {
            outcome,
            restore: self.restore,
            queue: self.queue,
            warm: self.warm,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.sandbox.take());
        let mut state = lock(&self.shared.state);
        state.in_use -= 1;
        state.workers.remove(&self.id);
        drop(state);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn pool_and_lease_cross_threads() {
        assert_send_sync::<Pool>();
        assert_send_sync::<Lease>();
    }

    #[test]
    fn claims_respect_max_live_and_refill_yields_to_the_queue() {
        let config = PoolConfig {
            warm: 1,
            max_live: 2,
            ..PoolConfig::default()
        };
        let mut state = State::default();
        assert!(state.needs_refill(&config));
        assert!(matches!(state.claim(2), Some(Claim::Restore)));
        assert!(matches!(state.claim(2), Some(Claim::Restore)));
        assert!(state.claim(2).is_none(), "max_live reached");
        assert!(!state.needs_refill(&config), "no slot left to refill");
        state.on_demand = 0;
        state.queue.push_back(7);
        assert!(!state.needs_refill(&config), "waiting callers go first");
        state.queue.clear();
        state.closed = true;
        assert!(!state.needs_refill(&config));
    }
}
