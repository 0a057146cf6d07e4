//! The functions a server serves: those of `ember serve --functions DIR`
//! (opened once at start, read-only) and those deployed over the API
//! (added, replaced and removed while serving, see [`super::deploy`]),
//! each invoked in recycled clones kept between
//! invocations (see [`super::recycled`]) or, for functions without a hot
//! path or with `recycle` off, in a fresh clone per invocation; at most
//! `max_live` invocations run at once, with a bounded queue in front.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::cancel::Cancel;
use super::fair_slots::{Closed, FairSlot, FairSlots};
use super::memory::{Charge, MemoryBudget};
use super::metrics::{FunctionCounters, FunctionLoad};
use super::recycled::{ChargedClone, IdleClones, RecycledClone};
use super::ServerError;
use crate::function::{
    Function, FunctionError, FunctionInvokeOptions, FunctionOutcome, MANIFEST_FILE,
};

/// Longest function name.
pub const MAX_NAME_LEN: usize = 64;

/// The rule [`valid_name`] checks, for messages.
pub const NAME_RULE: &str = "[A-Za-z0-9_.-]{1,64}, not starting with a dot";

/// Whether `name` can name a function: `[A-Za-z0-9_.-]{1,64}`, not
/// starting with `.` (so never `.` or `..`, and never one of the dot
/// files a deployment keeps next to its record and bundle: `.upload-N`,
/// `.check-N`, `.NAME.json.tmp`; a record so named would also be skipped
/// at a restart).
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !name.starts_with('.')
}

/// How a [`FunctionSet`] shares the host.
#[derive(Debug, Clone)]
pub struct FunctionSetConfig {
    /// Most invocations running at once, over all functions.
    pub max_live: usize,
    /// Most requests waiting for a slot; more are refused (429).
    pub max_queue: usize,
    /// Most invocations of any one function running at once (at most
    /// `max_live`; `None`: `max_live`). Below `max_live`, one busy
    /// function leaves slots for the others.
    pub max_live_per_function: Option<usize>,
    /// Most requests for any one function waiting (at most `max_queue`;
    /// `None`: `max_queue`); more are refused (429).
    pub max_queue_per_function: Option<usize>,
    /// Longest wait for a slot (then 503).
    pub queue_timeout: Duration,
    /// On shutdown, how long running invocations may go on.
    pub shutdown_grace: Duration,
    /// Serve functions that have a hot path from recycled clones, reset
    /// in place between invocations (the default); off: a fresh clone per
    /// invocation, destroyed after it.
    pub recycle: bool,
    /// Most recycled clones kept between invocations, over all functions
    /// (the least recently used goes first).
    pub max_idle: usize,
    /// How long a recycled clone may wait unused before it is destroyed.
    pub idle_timeout: Duration,
    /// Idle recycled clones kept ready for each function that recycles:
    /// made at start (or deployment) and after invocations take them,
    /// never expired (within `max_idle` in all and the memory cap).
    pub min_warm_per_function: usize,
    /// Most host memory the clones (running and idle) may be charged, in
    /// bytes; each is charged its worker's memory limit (guest memory +
    /// VMM overhead). When a new clone would go over, idle clones are
    /// destroyed first (least recently used), then the invocation is
    /// refused (429). `None`: no cap.
    pub max_memory_bytes: Option<u64>,
    /// Run every clone in its own jailed worker process: the default.
    /// `None` runs them in the server's process, for trusted code only.
    pub isolation: Option<crate::isolation::Isolation>,
}

impl Default for FunctionSetConfig {
    fn default() -> Self {
        FunctionSetConfig {
            max_live: 8,
            max_queue: 64,
            max_live_per_function: None,
            max_queue_per_function: None,
            isolation: Some(crate::isolation::Isolation::default()),
            queue_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            recycle: true,
            max_idle: 8,
            idle_timeout: Duration::from_secs(60),
            min_warm_per_function: 0,
            max_memory_bytes: None,
        }
    }
}

/// One served version of a function.
#[derive(Debug)]
pub struct ServedFunction {
    /// Its name (the URL's `{name}`).
    pub name: String,
    /// This version's id, unique in the set and never reused (a deployed
    /// function gets a new one per version): its recycled clones are
    /// kept under it.
    pub index: usize,
    /// Where its template is.
    pub dir: PathBuf,
    /// The opened template.
    pub function: Arc<Function>,
    /// Its invocation counters (kept over the versions of one name).
    pub counters: Arc<FunctionCounters>,
    /// Deployed over the API (`PUT /v1/functions/{name}`), not found in
    /// the `--functions` directory (those are read-only).
    pub deployed: bool,
    /// Its invocations' timeout when the request names none.
    pub timeout: Option<Duration>,
    /// Its share of the set's slots and queue.
    limit: FunctionLimit,
    /// Replaced or removed: no new invocation, and no clone is kept.
    retired: AtomicBool,
    /// What each of its clones is charged on the memory budget.
    clone_bytes: u64,
}

impl ServedFunction {
    /// Whether it was replaced or removed.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Its invocations running now.
    pub fn live(&self) -> usize {
        self.limit
            .max_live
            .saturating_sub(self.limit.permits.available_permits())
    }
}

/// A function to add to a set: `(name, template dir, function)` and how
/// it is served.
#[derive(Debug)]
pub struct NewFunction {
    /// Its name.
    pub name: String,
    /// Its template's directory.
    pub dir: PathBuf,
    /// The opened template.
    pub function: Function,
    /// Deployed over the API.
    pub deployed: bool,
    /// Its invocations' default timeout.
    pub timeout: Option<Duration>,
    /// Its own pool limits (deployed functions may have them).
    pub limits: PoolLimits,
}

/// A deployed function's own pool limits; each `None` takes the server's
/// per-function default (`--function-min-warm`, `--function-max-live`,
/// `--function-max-queue`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLimits {
    /// Idle clones kept ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_warm: Option<usize>,
    /// Most invocations running at once (at most the server's
    /// `--max-live`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live: Option<usize>,
    /// Most requests waiting (at most the server's `--max-queue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
}

impl PoolLimits {
    /// Whether every limit is the server's.
    pub fn is_default(&self) -> bool {
        *self == PoolLimits::default()
    }
}

/// What an invocation runs in: an idle clone, or the charge for a new one.
#[derive(Debug)]
pub(crate) enum CloneLease {
    Idle(ChargedClone),
    New(Charge),
}

/// The functions a server serves, by name: those of the `--functions`
/// directory, opened at start, and those deployed over the API, added,
/// replaced and removed while serving.
#[derive(Debug)]
pub struct FunctionSet {
    functions: RwLock<BTreeMap<String, Arc<ServedFunction>>>,
    next_index: AtomicUsize,
    limiter: Limiter,
    idle: IdleClones,
    memory: Arc<MemoryBudget>,
    /// Woken when an invocation takes an idle clone, or a function is
    /// added (see [`Self::top_up`]).
    warm_wanted: tokio::sync::Notify,
    /// The first [`Self::top_up`] has run: the functions served at start
    /// have their warm minimum (or as much of it as fits).
    warmed: AtomicBool,
    config: FunctionSetConfig,
}

impl FunctionSet {
    /// Opens every function in `dir`: each subdirectory holding a
    /// `function.json` is one, named after the subdirectory. Names that
    /// are not [`NAME_RULE`] are skipped with a warning; a
    /// function that does not open is an error.
    pub fn open(dir: &Path, config: FunctionSetConfig) -> Result<FunctionSet, ServerError> {
        let bad = |e: std::io::Error| {
            ServerError::Config(format!("cannot read functions in {}: {e}", dir.display()))
        };
        if dir.join(MANIFEST_FILE).exists() {
            tracing::warn!(
                dir = %dir.display(),
                "the functions directory is itself a function; it serves its subdirectories only"
            );
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(bad)? {
            let path = entry.map_err(bad)?.path();
            // Symlinks to template directories count.
            if !path.is_dir() || !path.join(MANIFEST_FILE).is_file() {
                continue;
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                tracing::warn!(dir = %path.display(), "function name is not UTF-8; skipped");
                continue;
            };
            if !valid_name(&name) {
                tracing::warn!(
                    dir = %path.display(),
                    "function name is not {NAME_RULE}; skipped"
                );
                continue;
            }
            found.push((name, path));
        }
        found.sort();
        if found.is_empty() {
            tracing::warn!(dir = %dir.display(), "no functions found");
        }
        let mut functions = Vec::with_capacity(found.len());
        for (name, path) in found {
            let function =
                Function::open(&path).map_err(|e| ServerError::Function(name.clone(), e))?;
            let manifest = function.manifest();
            tracing::info!(
                function = %name,
                dir = %path.display(),
                runtime = %manifest.runtime,
                handler = %manifest.handler,
                hot_path = manifest.hot_path.is_some(),
                hot_path_capacity_bytes = function.hot_path_capacity(),
                "function"
            );
            functions.push((name, path, function));
        }
        Self::new(functions, config)
    }

    /// A set of functions opened already: `(name, template dir, function)`.
    pub fn new(
        functions: Vec<(String, PathBuf, Function)>,
        config: FunctionSetConfig,
    ) -> Result<FunctionSet, ServerError> {
        if config.max_live == 0 {
            return Err(ServerError::Config("max_live must be at least 1".into()));
        }
        if config.max_live_per_function == Some(0) {
            return Err(ServerError::Config(
                "max_live_per_function must be at least 1".into(),
            ));
        }
        let set = FunctionSet {
            functions: RwLock::new(BTreeMap::new()),
            next_index: AtomicUsize::new(0),
            limiter: Limiter::new(&config),
            idle: IdleClones::new(config.max_idle),
            memory: MemoryBudget::new(config.max_memory_bytes),
            warm_wanted: tokio::sync::Notify::new(),
            warmed: AtomicBool::new(false),
            config,
        };
        for (name, dir, function) in functions {
            if set.get(&name).is_some() {
                return Err(ServerError::Config(format!("function {name} given twice")));
            }
            let replaced = set.insert(NewFunction {
                name,
                dir,
                function,
                deployed: false,
                timeout: None,
                limits: PoolLimits::default(),
            })?;
            debug_assert!(replaced.is_none());
        }
        Ok(set)
    }

    /// A set without functions.
    pub fn empty() -> FunctionSet {
        Self::new(Vec::new(), FunctionSetConfig::default()).expect("an empty set is valid")
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Arc<ServedFunction>>> {
        // Every change is one insert or remove: a panic elsewhere leaves
        // the map consistent.
        self.functions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Arc<ServedFunction>>> {
        self.functions.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The function called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<ServedFunction>> {
        self.read().get(name).cloned()
    }

    /// Every function, by name (as they are now).
    pub fn list(&self) -> Vec<Arc<ServedFunction>> {
        self.read().values().cloned().collect()
    }

    /// Their names, in order.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Serves `new` under its name from now on, with a new index; returns
    /// the version it replaced, retired (its running invocations finish;
    /// destroy its idle clones with [`FunctionSet::retire`]).
    pub fn insert(&self, new: NewFunction) -> Result<Option<Arc<ServedFunction>>, ServerError> {
        if !valid_name(&new.name) {
            return Err(ServerError::Config(format!(
                "{:?} is not a function name ({NAME_RULE})",
                new.name
            )));
        }
        let clone_bytes = clone_memory_bytes(&new.function, self.config.isolation.as_ref());
        let mut functions = self.write();
        let counters = functions
            .get(&new.name)
            .map_or_else(Default::default, |old| old.counters.clone());
        let served = Arc::new(ServedFunction {
            name: new.name.clone(),
            index: self.next_index.fetch_add(1, Ordering::SeqCst),
            dir: new.dir,
            function: Arc::new(new.function),
            counters,
            deployed: new.deployed,
            timeout: new.timeout,
            limit: FunctionLimit::new(&self.config, &new.limits),
            retired: AtomicBool::new(false),
            clone_bytes,
        });
        let old = functions.insert(new.name, served);
        if let Some(old) = &old {
            old.retired.store(true, Ordering::SeqCst);
        }
        self.warm_wanted.notify_one();
        Ok(old)
    }

    /// Stops serving `name`: returns the version that was served, retired.
    pub fn remove(&self, name: &str) -> Option<Arc<ServedFunction>> {
        let old = self.write().remove(name)?;
        old.retired.store(true, Ordering::SeqCst);
        Some(old)
    }

    /// Finishes retiring `function` (replaced or removed): its waiting
    /// requests are refused (503), its idle clones destroyed, and this
    /// waits until its running invocations ended, at most `grace`;
    /// returns how many still run.
    pub async fn retire(&self, function: &ServedFunction, grace: Duration) -> usize {
        function.retired.store(true, Ordering::SeqCst);
        function.limit.permits.close();
        self.destroy_idle_of(function).await;
        let deadline = Instant::now() + grace;
        loop {
            let live = function.live();
            if live == 0 || Instant::now() >= deadline {
                // A clone put back as the last invocation ended.
                self.destroy_idle_of(function).await;
                return live;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn destroy_idle_of(&self, function: &ServedFunction) {
        let mut clones = Vec::new();
        while let Some(clone) = self.idle.take(function.index) {
            clones.push(clone);
        }
        destroy(clones).await;
    }

    /// How the set shares the host.
    pub fn config(&self) -> &FunctionSetConfig {
        &self.config
    }

    /// Recycled clones of `function` idle now.
    pub fn idle_count(&self, function: &ServedFunction) -> usize {
        self.idle.count(function.index)
    }

    /// Invocations running, requests waiting and recycled clones idle.
    pub fn load(&self) -> FunctionLoad {
        FunctionLoad {
            idle: self.idle.len(),
            ..self.limiter.load()
        }
    }

    /// Waits for a slot to run one invocation of `function` in: at once,
    /// or in the queue.
    pub(crate) async fn acquire(&self, function: &ServedFunction) -> Result<Slot, Refusal> {
        if function.is_retired() {
            return Err(Refusal::Retired);
        }
        self.limiter
            .acquire(&function.limit, function.index)
            .await
            .map_err(|refusal| match refusal {
                Refusal::ShuttingDown if function.is_retired() && !self.is_closed() => {
                    Refusal::Retired
                }
                other => other,
            })
    }

    /// Refuses new invocations from now on (waiting ones too), and
    /// destroys the idle clones.
    pub async fn close(&self) {
        self.limiter.close();
        for function in self.list() {
            function.limit.permits.close();
        }
        destroy(self.idle.take_all()).await;
    }

    /// Whether `function` is served from recycled clones.
    pub fn recycles(&self, function: &ServedFunction) -> bool {
        self.config.recycle && function.function.manifest().hot_path.is_some()
    }

    /// Host memory charged now by the clones, and the cap.
    pub fn memory(&self) -> (u64, Option<u64>) {
        (self.memory.charged(), self.memory.cap())
    }

    /// What one invocation of `function` runs in: its most recently used
    /// idle clone, or room on the memory budget for a new one (making
    /// room by destroying idle clones, least recently used first).
    /// Blocking: the clones destroyed end their workers.
    pub(crate) fn lease(&self, function: &ServedFunction) -> Result<CloneLease, Refusal> {
        if self.recycles(function) {
            if let Some(clone) = self.idle.take(function.index) {
                self.warm_wanted.notify_one();
                return Ok(CloneLease::Idle(clone));
            }
        }
        loop {
            if let Some(charge) = self.memory.try_charge(function.clone_bytes) {
                return Ok(CloneLease::New(charge));
            }
            match self.idle.take_oldest() {
                Some(evicted) => drop(evicted),
                None => {
                    return Err(Refusal::MemoryFull {
                        cap_bytes: self.memory.cap().unwrap_or(u64::MAX),
                    })
                }
            }
        }
    }

    /// The least recently used idle clone of `function`, if any (for
    /// going through every idle clone once).
    pub(crate) fn lease_oldest(&self, function: &ServedFunction) -> Option<ChargedClone> {
        self.idle.take_oldest_of(function.index)
    }

    /// The recycled clone `lease` stands for: the idle one, or one made
    /// now (the time it took is returned). Blocking.
    pub(crate) fn recycled_clone(
        &self,
        function: &ServedFunction,
        lease: CloneLease,
        options: &FunctionInvokeOptions,
    ) -> Result<(ChargedClone, Duration), FunctionError> {
        match lease {
            CloneLease::Idle(clone) => Ok((clone, Duration::ZERO)),
            CloneLease::New(charge) => {
                let requested = Instant::now();
                let clone = RecycledClone::make(
                    &function.function,
                    options.isolation.as_ref(),
                    options.io_limits,
                )?;
                let made = requested.elapsed();
                function.counters.observe_make(made);
                Ok((ChargedClone { clone, charge }, made))
            }
        }
    }

    /// Runs `event` in `clone` of `function` (made in `made`, counted in
    /// the outcome's restore time; zero for an idle one); the clone is
    /// kept for the next invocation if it can serve one. `cancel`, armed
    /// with the clone's worker, is disarmed as soon as the call returns,
    /// before the clone is put back: a cancellation after that point must
    /// not kill a worker another invocation has taken. Blocking.
    pub(crate) fn invoke_in(
        &self,
        function: &ServedFunction,
        (mut clone, made): (ChargedClone, Duration),
        event: &[u8],
        options: &FunctionInvokeOptions,
        cancel: Option<&Cancel>,
    ) -> Result<FunctionOutcome, FunctionError> {
        let result = clone.clone.invoke(event, options);
        // Cancelled before the disarm: its worker may be dead or dying.
        let cancelled = cancel.is_some_and(Cancel::disarm);
        let reset = match &result {
            Ok(o) => o
                .recycle
                .as_ref()
                .filter(|r| r.reused)
                .map(|r| r.reset.duration),
            Err(_) => None,
        };
        // A server shutting down keeps nothing (its idle clones are gone
        // already), nor does a retired version.
        let reusable = reset.is_some() && !cancelled && !self.is_closed() && !function.is_retired();
        function
            .counters
            .observe_recycle(made.is_zero(), reset.filter(|_| reusable));
        // Dropped here, on this blocking thread: ending a worker waits.
        let mut dropped = if reusable {
            self.idle.put(function.index, clone)
        } else {
            vec![clone]
        };
        // Retired while it was put back: nobody takes it any more.
        if reusable && function.is_retired() {
            while let Some(clone) = self.idle.take(function.index) {
                dropped.push(clone);
            }
        }
        drop(dropped);
        result.map(|mut outcome| {
            outcome.timings.restore += made;
            outcome.timings.total += made;
            outcome
        })
    }

    /// Makes idle clones until each function that recycles has
    /// `min_warm_per_function` of them, one at a time, within `max_idle`
    /// in all and the memory budget (warm clones never push out others).
    /// Blocking; returns how many it made.
    pub fn top_up(&self) -> usize {
        let mut made = 0;
        for function in self.list() {
            let want = function.limit.min_warm;
            if want == 0 || !self.recycles(&function) {
                continue;
            }
            while !self.is_closed()
                && !function.is_retired()
                && self.idle.count(function.index) < want
                && self.idle.len() < self.config.max_idle
            {
                let Some(charge) = self.memory.try_charge(function.clone_bytes) else {
                    break;
                };
                let clone = match RecycledClone::make(
                    &function.function,
                    self.config.isolation.as_ref(),
                    Default::default(),
                ) {
                    Ok(clone) => clone,
                    Err(e) => {
                        tracing::warn!(function = %function.name, error = %e, "a warm clone could not be made");
                        break;
                    }
                };
                drop(
                    self.idle
                        .put(function.index, ChargedClone { clone, charge }),
                );
                made += 1;
                // Closed or retired while it was being made: `close` and
                // `retire` have emptied the list already, so nothing else
                // would end this clone.
                if self.is_closed() {
                    drop(self.idle.take_all());
                } else if function.is_retired() {
                    while let Some(clone) = self.idle.take(function.index) {
                        drop(clone);
                    }
                }
            }
        }
        self.warmed.store(true, Ordering::SeqCst);
        made
    }

    /// Whether the functions served at start have had their warm minimum
    /// made (see [`FunctionSetConfig::min_warm_per_function`]).
    pub fn is_warmed(&self) -> bool {
        self.warmed.load(Ordering::SeqCst)
    }

    /// Waits until an invocation takes an idle clone or a function is
    /// added, or `at_most`.
    pub async fn warm_wanted(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.warm_wanted.notified()).await;
    }

    /// Destroys the recycled clones idle for longer than the idle
    /// timeout.
    pub async fn expire_idle(&self) {
        let minimum: BTreeMap<usize, usize> = self
            .list()
            .iter()
            .map(|f| (f.index, f.limit.min_warm))
            .collect();
        let keep = |index: usize| minimum.get(&index).copied().unwrap_or(0);
        destroy(self.idle.expire(self.config.idle_timeout, keep)).await;
    }

    /// Whether [`FunctionSet::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.limiter.is_closed()
    }

    /// Waits until no clone is alive, at most the shutdown grace; returns
    /// how many still are.
    pub async fn drain(&self) -> usize {
        let deadline = Instant::now() + self.config.shutdown_grace;
        loop {
            let live = self.load().live;
            if live == 0 || Instant::now() >= deadline {
                return live;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What one clone of `function` is charged: its worker's memory limit.
fn clone_memory_bytes(function: &Function, isolation: Option<&crate::isolation::Isolation>) -> u64 {
    let default = crate::worker::memory_limit_bytes(function.snapshot());
    isolation
        .and_then(|i| i.memory_limit_bytes)
        .unwrap_or(default)
}

/// Ends `clones` on a blocking thread (ending a worker waits for it).
async fn destroy(clones: Vec<ChargedClone>) {
    if !clones.is_empty() {
        let _ = tokio::task::spawn_blocking(move || drop(clones)).await;
    }
}

/// Why an invocation got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Every slot is taken and the queue is full.
    Busy { max_live: usize, max_queue: usize },
    /// Every slot of this function is taken and its queue is full.
    FunctionBusy { max_live: usize, max_queue: usize },
    /// No slot became free in time.
    QueueTimeout(Duration),
    /// A new clone would take the clones' memory over the cap, and no
    /// idle clone is left to make room.
    MemoryFull { cap_bytes: u64 },
    /// The server is shutting down.
    ShuttingDown,
    /// This version of the function was replaced or removed meanwhile.
    Retired,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Busy {
                max_live,
                max_queue,
            } => write!(
                f,
                "all {max_live} function slots are busy and {max_queue} callers wait already"
            ),
            Refusal::FunctionBusy {
                max_live,
                max_queue,
            } => write!(
                f,
                "all {max_live} slots of this function are busy and {max_queue} of its callers \
                 wait already"
            ),
            Refusal::QueueTimeout(d) => write!(f, "no function slot became free within {d:?}"),
            Refusal::MemoryFull { cap_bytes } => write!(
                f,
                "the clones' memory is at the server's cap of {} MiB",
                cap_bytes >> 20
            ),
            Refusal::ShuttingDown => write!(f, "the server is shutting down"),
            Refusal::Retired => write!(f, "the function was removed or replaced meanwhile"),
        }
    }
}

/// A slot to run one clone in; freed when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    _slot: FairSlot,
    _function_permit: OwnedSemaphorePermit,
    /// How long the request waited for it.
    pub queued: Duration,
}

/// One function's share: at most `max_live` of its invocations running,
/// at most `max_queue` waiting, and `min_warm` idle clones kept ready.
#[derive(Debug)]
struct FunctionLimit {
    permits: Arc<Semaphore>,
    max_live: usize,
    max_queue: usize,
    min_warm: usize,
    queued: AtomicUsize,
}

impl FunctionLimit {
    /// The function's share: its own limits where it has them, else the
    /// set's per-function ones, never over the set's.
    fn new(config: &FunctionSetConfig, own: &PoolLimits) -> Self {
        let max_live = own
            .max_live
            .or(config.max_live_per_function)
            .map_or(config.max_live, |n| n.clamp(1, config.max_live));
        FunctionLimit {
            permits: Arc::new(Semaphore::new(max_live)),
            max_live,
            max_queue: own
                .max_queue
                .or(config.max_queue_per_function)
                .map_or(config.max_queue, |n| n.min(config.max_queue)),
            min_warm: own.min_warm.unwrap_or(config.min_warm_per_function),
            queued: AtomicUsize::new(0),
        }
    }
}

/// Takes a place in `queued` if fewer than `max` are taken.
fn enqueue(queued: &AtomicUsize, max: usize) -> Option<InQueue<'_>> {
    queued
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
            (q < max).then_some(q + 1)
        })
        .ok()
        .map(|_| InQueue(queued))
}

/// At most `max_live` slots, shared fairly between functions
/// ([`FairSlots`]: a slot that frees goes to the waiting function that runs
/// the fewest); at most `max_queue` waiters.
#[derive(Debug)]
struct Limiter {
    slots: Arc<FairSlots>,
    max_live: usize,
    max_queue: usize,
    queue_timeout: Duration,
    queued: AtomicUsize,
}

/// Leaves the queue when dropped (also when the request is abandoned).
struct InQueue<'a>(&'a AtomicUsize);

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Limiter {
    fn new(config: &FunctionSetConfig) -> Self {
        Limiter {
            slots: FairSlots::new(config.max_live),
            max_live: config.max_live,
            max_queue: config.max_queue,
            queue_timeout: config.queue_timeout,
            queued: AtomicUsize::new(0),
        }
    }

    fn close(&self) {
        self.slots.close();
    }

    fn is_closed(&self) -> bool {
        self.slots.is_closed()
    }

    fn load(&self) -> FunctionLoad {
        FunctionLoad {
            live: self.slots.live(),
            queued: self.queued.load(Ordering::SeqCst),
            idle: 0,
        }
    }

    /// A slot for an invocation of function number `index`, whose own
    /// limits are `function`: its own permit first (so its waiters queue
    /// behind each other), then one of the set's slots, fairly shared.
    async fn acquire(&self, function: &FunctionLimit, index: usize) -> Result<Slot, Refusal> {
        let started = Instant::now();
        let at_once = match function.permits.clone().try_acquire_owned() {
            Ok(own) => match self.slots.try_acquire(index) {
                Ok(Some(slot)) => {
                    return Ok(Slot {
                        _slot: slot,
                        _function_permit: own,
                        queued: Duration::ZERO,
                    })
                }
                Ok(None) => Some(own),
                Err(Closed) => return Err(Refusal::ShuttingDown),
            },
            Err(TryAcquireError::Closed) => return Err(Refusal::ShuttingDown),
            Err(TryAcquireError::NoPermits) => None,
        };
        if self.slots.is_closed() {
            return Err(Refusal::ShuttingDown);
        }
        let Some(_in_function_queue) = enqueue(&function.queued, function.max_queue) else {
            return Err(Refusal::FunctionBusy {
                max_live: function.max_live,
                max_queue: function.max_queue,
            });
        };
        let Some(_in_queue) = enqueue(&self.queued, self.max_queue) else {
            return Err(Refusal::Busy {
                max_live: self.max_live,
                max_queue: self.max_queue,
            });
        };
        let wait = async {
            let own = match at_once {
                Some(own) => own,
                None => function
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Closed)?,
            };
            let slot = self.slots.acquire(index).await?;
            Ok::<_, Closed>((slot, own))
        };
        match tokio::time::timeout(self.queue_timeout, wait).await {
            Ok(Ok((slot, own))) => Ok(Slot {
                _slot: slot,
                _function_permit: own,
                queued: started.elapsed(),
            }),
            Ok(Err(Closed)) => Err(Refusal::ShuttingDown),
            Err(_) => Err(Refusal::QueueTimeout(self.queue_timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["probe", "a", "A.b-c_9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            ".upload-1",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    /// Runs `future` on a current-thread runtime with timers.
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn limiter_queues_refuses_and_closes() {
        block_on(async {
            let config = FunctionSetConfig {
                max_live: 1,
                max_queue: 1,
                queue_timeout: Duration::from_millis(50),
                shutdown_grace: Duration::ZERO,
                isolation: None,
                ..FunctionSetConfig::default()
            };
            let limiter = Arc::new(Limiter::new(&config));
            let function = Arc::new(FunctionLimit::new(&config, &PoolLimits::default()));
            let first = limiter.acquire(&function, 0).await.unwrap();
            assert_eq!(first.queued, Duration::ZERO);
            assert_eq!(
                limiter.load(),
                FunctionLoad {
                    live: 1,
                    queued: 0,
                    idle: 0
                }
            );
            // One waits (and times out); meanwhile a third is refused.
            let waiter = tokio::spawn({
                let (limiter, function) = (limiter.clone(), function.clone());
                async move { limiter.acquire(&function, 0).await.map(|_| ()) }
            });
            while limiter.load().queued == 0 {
                tokio::task::yield_now().await;
            }
            assert!(matches!(
                limiter.acquire(&function, 0).await,
                Err(Refusal::FunctionBusy { .. } | Refusal::Busy { .. })
            ));
            assert_eq!(
                waiter.await.unwrap(),
                Err(Refusal::QueueTimeout(Duration::from_millis(50)))
            );
            assert_eq!(limiter.load().queued, 0);
            assert_eq!(function.queued.load(Ordering::SeqCst), 0);
            drop(first);
            let second = limiter.acquire(&function, 0).await.unwrap();
            drop(second);
            limiter.close();
            assert_eq!(
                limiter.acquire(&function, 0).await.unwrap_err(),
                Refusal::ShuttingDown
            );
        });
    }

    #[test]
    fn a_functions_own_limits_win_within_the_sets() {
        let config = FunctionSetConfig {
            max_live: 4,
            max_queue: 8,
            max_live_per_function: Some(3),
            min_warm_per_function: 1,
            isolation: None,
            ..FunctionSetConfig::default()
        };
        let server_defaults = FunctionLimit::new(&config, &PoolLimits::default());
        assert_eq!(
            (
                server_defaults.max_live,
                server_defaults.max_queue,
                server_defaults.min_warm
            ),
            (3, 8, 1)
        );
        let own = FunctionLimit::new(
            &config,
            &PoolLimits {
                min_warm: Some(0),
                max_live: Some(2),
                max_queue: Some(1),
            },
        );
        assert_eq!((own.max_live, own.max_queue, own.min_warm), (2, 1, 0));
        let greedy = FunctionLimit::new(
            &config,
            &PoolLimits {
                max_live: Some(100),
                max_queue: Some(100),
                ..PoolLimits::default()
            },
        );
        assert_eq!(
            (greedy.max_live, greedy.max_queue),
            (4, 8),
            "never over the set's"
        );
    }

    /// A function at its own cap queues behind itself: another function
    /// still gets one of the free slots at once.
    #[test]
    fn a_busy_function_leaves_slots_for_the_others() {
        block_on(async {
            let config = FunctionSetConfig {
                max_live: 3,
                max_queue: 8,
                max_live_per_function: Some(2),
                max_queue_per_function: Some(1),
                queue_timeout: Duration::from_secs(5),
                isolation: None,
                ..FunctionSetConfig::default()
            };
            let limiter = Arc::new(Limiter::new(&config));
            let slow = Arc::new(FunctionLimit::new(&config, &PoolLimits::default()));
            let hot = FunctionLimit::new(&config, &PoolLimits::default());
            let running = [
                limiter.acquire(&slow, 1).await.unwrap(),
                limiter.acquire(&slow, 1).await.unwrap(),
            ];
            // The slow function's third call waits for its own slot...
            let waiter = tokio::spawn({
                let (limiter, slow) = (limiter.clone(), slow.clone());
                async move { limiter.acquire(&slow, 1).await.map(|s| s.queued) }
            });
            while slow.queued.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            // ...its fourth finds its queue full...
            assert_eq!(
                limiter.acquire(&slow, 1).await.unwrap_err(),
                Refusal::FunctionBusy {
                    max_live: 2,
                    max_queue: 1
                }
            );
            // ...and the hot function runs at once on the third slot.
            let hot_slot = limiter.acquire(&hot, 2).await.unwrap();
            assert_eq!(hot_slot.queued, Duration::ZERO);
            assert_eq!(limiter.load().live, 3);
            // The waiter gets a slot once one of its own ends.
            drop(hot_slot);
            assert_eq!(slow.queued.load(Ordering::SeqCst), 1, "still its own cap");
            drop(running);
            assert!(waiter.await.unwrap().is_ok());
        });
    }
}
