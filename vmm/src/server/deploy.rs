//! Functions deployed over the API: `PUT /v1/functions/{name}` with a
//! bundle (`application/zip`) and its settings in the query; the template
//! is made in the background, in a jailed template worker (the library's
//! default, [`crate::create_function`]), on a blocking thread, at most
//! [`DeployConfig::max_builds`] at once with at most
//! [`DeployConfig::max_waiting_builds`] waiting (429 beyond).
//!
//! A deployment is checked before anything is written: the name
//! ([`valid_name`]), the settings ([`parse_settings`]), the bundle (staged
//! by the bundle code, which refuses path escapes, links out and
//! oversized archives, and must hold the handler's module) and the spec as
//! the library checks it (handler and environment). Only then are the
//! bundle and the record written, and the answer is `202`.
//!
//! Templates are stored content-addressed under the data directory
//! (`templates/<key>`, the key the library's template cache uses: the
//! bundle's contents, the settings as the runtime gets them and the VM's
//! inputs), so a deployment whose template exists already (the same
//! bundle and settings again, or a restart) is ready without a build. One
//! record per name ([`super::records`]) says which version serves and how
//! the latest build went. A re-deployment builds the new version while
//! the old one keeps serving, then switches at once; a failed build leaves
//! the old version serving and reports `failed` for the new one. While a
//! name's build runs, another `PUT` or a `DELETE` of it is refused (409).
//! A build running when the server stopped is `failed` after a restart
//! (its log says so), never silently rebuilt. Templates no record refers
//! to are removed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::functions::{valid_name, FunctionSet, NewFunction, PoolLimits, ServedFunction};
use super::records::{
    now_unix_ms, Latest, Record, RecordError, RecordStore, Settings, Status, Version, BUNDLES_DIR,
    TEMPLATES_DIR,
};
use crate::function::{
    bundle, function_key, Function, FunctionError, FunctionSpec, TemplateOptions, MANIFEST_FILE,
};

/// Largest bundle a `PUT` may carry, by default.
pub const DEFAULT_MAX_BUNDLE_BYTES: usize = 32 << 20;
/// Most bytes of a failed build's log kept (its end).
pub const LOG_TAIL_BYTES: usize = 8 << 10;
/// Guest memory of a deployed function unless its settings say.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Most functions deployed at once, by default.
pub const DEFAULT_MAX_FUNCTIONS: usize = 256;
/// The range `memory_mib` may take.
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = 128..=8192;

/// How a server deploys functions.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// Where records, templates and uploaded bundles are kept.
    pub data_dir: PathBuf,
    /// The VM templates are made in (kernel, initramfs, the python image,
    /// isolation); `mem_mib` is each function's `memory_mib`.
    pub template: TemplateOptions,
    /// Most builds running at once.
    pub max_builds: usize,
    /// Most accepted builds waiting for one of those; more get 429.
    pub max_waiting_builds: usize,
    /// Largest bundle (413 beyond).
    pub max_bundle_bytes: usize,
    /// Most names deployed (each keeps up to two templates on disk); a
    /// deployment of a new name beyond is refused (409) until one is
    /// deleted. Re-deploying a name always fits.
    pub max_functions: usize,
}

impl DeployConfig {
    /// Deploys into `data_dir`, templates made in the default guest (the
    /// kernel, initramfs and python image of `scripts/setup`), one build
    /// at a time, four waiting.
    pub fn new(data_dir: PathBuf, isolation: Option<crate::isolation::Isolation>) -> Self {
        let mut template = TemplateOptions::new(
            crate::paths::default_kernel(),
            crate::paths::default_initrd(),
            Some(crate::paths::default_python_image()),
        );
        template.isolation = isolation;
        DeployConfig {
            data_dir,
            template,
            max_builds: 1,
            max_waiting_builds: 4,
            max_bundle_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            max_functions: DEFAULT_MAX_FUNCTIONS,
        }
    }
}

/// The default data directory: `/var/lib/ember` for root, else
/// `$XDG_DATA_HOME/ember` (`~/.local/share/ember`).
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/ember");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("ember")
}

/// A deployment request that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Malformed name, settings or bundle: nothing was written.
    #[error("{0}")]
    BadRequest(String),
    /// The bundle is over the limit.
    #[error("the bundle is {0} bytes or more, over the limit of {1}")]
    TooLarge(u64, usize),
    /// No such deployed function.
    #[error("no function {0:?}")]
    NotFound(String),
    /// The function cannot change now (a build of it runs) or at all
    /// (it comes from `--functions`).
    #[error("{0}")]
    Conflict(String),
    /// Every build place is taken.
    #[error("{running} builds run and {waiting} wait already; try again later")]
    Busy {
        /// Builds running at most.
        running: usize,
        /// Builds waiting at most.
        waiting: usize,
    },
    /// The server could not write or read its data directory.
    #[error("{0}")]
    Internal(String),
}

impl From<RecordError> for DeployError {
    fn from(e: RecordError) -> Self {
        DeployError::Internal(e.to_string())
    }
}

/// The settings of a `PUT` query: `runtime` (`python3`, the default),
/// `handler` (`MODULE:FUNCTION`, required), `memory_mib`, `timeout_ms`
/// (at most `max_timeout_ms`; default 60 s or that) and repeated
/// `env=K=V` (a later `K` replaces an earlier one). Anything else, or a
/// setting given twice, is refused.
pub fn parse_settings(query: &str, max_timeout_ms: u64) -> Result<Settings, String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|e| format!("malformed query: {e}"))?;
    let (mut runtime, mut handler, mut memory_mib, mut timeout_ms) = (None, None, None, None);
    let (mut min_warm, mut max_live, mut max_queue) = (None, None, None);
    let mut env: Vec<(String, String)> = Vec::new();
    for (key, value) in pairs {
        let once = |slot: &mut Option<String>| match slot.replace(value.clone()) {
            None => Ok(()),
            Some(_) => Err(format!("{key} is given twice")),
        };
        match key.as_str() {
            "runtime" => once(&mut runtime)?,
            "handler" => once(&mut handler)?,
            "memory_mib" => once(&mut memory_mib)?,
            "timeout_ms" => once(&mut timeout_ms)?,
            "min_warm" => once(&mut min_warm)?,
            "max_live" => once(&mut max_live)?,
            "max_queue" => once(&mut max_queue)?,
            "env" => {
                let Some((k, v)) = value.split_once('=') else {
                    return Err(format!("env takes K=V, got {value:?}"));
                };
                let valid_key = !k.is_empty()
                    && !k.starts_with(|c: char| c.is_ascii_digit())
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid_key {
                    return Err(format!(
                        "env name {k:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
                    ));
                }
                env.retain(|(old, _)| old != k);
                env.push((k.to_owned(), v.to_owned()));
            }
            other => {
                return Err(format!(
                    "unknown setting {other:?} (runtime, handler, memory_mib, timeout_ms, env, \
                     min_warm, max_live, max_queue)"
                ))
            }
        }
    }
    let runtime = runtime.unwrap_or_else(|| "python3".into());
    if runtime != "python3" {
        return Err(format!(
            "runtime {runtime:?} cannot be deployed over the API (python3 only)"
        ));
    }
    let handler = handler.ok_or("handler=MODULE:FUNCTION is required")?;
    let Some((module, function)) = handler.split_once(':') else {
        return Err(format!("handler {handler:?} is not MODULE:FUNCTION"));
    };
    bundle::check_module_name(module).map_err(|e| e.to_string())?;
    if function.is_empty() || !function.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return Err(format!("{function:?} is not a python function name"));
    }
    let number = |what: &str, text: Option<String>| -> Result<Option<u64>, String> {
        text.map(|t| {
            t.parse::<u64>()
                .map_err(|_| format!("{what} {t:?} is not a number"))
        })
        .transpose()
    };
    let memory_mib = match number("memory_mib", memory_mib)? {
        None => DEFAULT_MEMORY_MIB,
        Some(mib) => u32::try_from(mib)
            .ok()
            .filter(|m| MEMORY_MIB_RANGE.contains(m))
            .ok_or_else(|| {
                format!(
                    "memory_mib {mib} is not in {}..={}",
                    MEMORY_MIB_RANGE.start(),
                    MEMORY_MIB_RANGE.end()
                )
            })?,
    };
    let timeout_ms = number("timeout_ms", timeout_ms)?
        .unwrap_or(ember_protocol::protocol::DEFAULT_TIMEOUT_MS.min(max_timeout_ms));
    if timeout_ms == 0 || timeout_ms > max_timeout_ms {
        return Err(format!(
            "timeout_ms {timeout_ms} is not in 1..={max_timeout_ms}"
        ));
    }
    // Bounded here; the server's own caps (--max-live, --max-queue,
    // --max-idle, --max-memory-mib) bound them again when served.
    let bounded = |what: &str, text: Option<String>, range: std::ops::RangeInclusive<u64>| {
        number(what, text)?
            .map(|n| {
                if range.contains(&n) {
                    usize::try_from(n).map_err(|_| format!("{what} {n} is too large"))
                } else {
                    Err(format!(
                        "{what} {n} is not in {}..={}",
                        range.start(),
                        range.end()
                    ))
                }
            })
            .transpose()
    };
    let pool = PoolLimits {
        min_warm: bounded("min_warm", min_warm, 0..=MAX_POOL_SETTING)?,
        max_live: bounded("max_live", max_live, 1..=MAX_POOL_SETTING)?,
        max_queue: bounded("max_queue", max_queue, 0..=MAX_POOL_SETTING)?,
    };
    Ok(Settings {
        runtime,
        handler,
        memory_mib,
        timeout_ms,
        env,
        pool,
    })
}

/// Largest `min_warm`, `max_live` or `max_queue` a deployment may ask for
/// (the workers' uid range is 1,000 wide).
const MAX_POOL_SETTING: u64 = 1000;

/// The end of `text`, at most `max` bytes (cut at a character boundary).
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// The deployed functions of a server and their builds.
#[derive(Debug)]
pub struct Deployer {
    config: DeployConfig,
    store: RecordStore,
    functions: Arc<FunctionSet>,
    /// Every record, as on disk.
    records: Mutex<BTreeMap<String, Record>>,
    /// Names with an upload or a build in progress.
    busy: Mutex<BTreeSet<String>>,
    /// Versions replaced or removed, while anything still holds them.
    retired: Mutex<Vec<Weak<ServedFunction>>>,
    /// One permit per build running at once.
    builds: Arc<tokio::sync::Semaphore>,
    /// One bundle checked (unpacked into scratch space) at a time: a zip
    /// bomb costs at most one bundle limit of disk, however many PUTs
    /// come at once.
    checks: tokio::sync::Semaphore,
    /// Builds accepted and not finished (running or waiting).
    accepted: AtomicUsize,
    /// How long a replaced or removed version's invocations may go on.
    grace: Duration,
    /// Largest `timeout_ms` a function may have.
    max_timeout_ms: u64,
    next_upload: AtomicU64,
}

/// A deployment admitted (its name reserved, a build place taken) whose
/// bundle is not read yet; dropped, it gives both back.
#[derive(Debug)]
pub struct Admitted {
    deployer: Arc<Deployer>,
    name: String,
    settings: Settings,
    armed: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.armed {
            self.deployer.release(&self.name);
        }
    }
}

impl Admitted {
    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is one insert or remove.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Deployer {
    /// Opens the data directory and serves every deployed function whose
    /// template is there (`functions` gets them). Blocking.
    pub fn open(
        config: DeployConfig,
        functions: Arc<FunctionSet>,
        max_timeout_ms: u64,
    ) -> Result<Arc<Deployer>, DeployError> {
        if config.max_builds == 0 {
            return Err(DeployError::Internal(
                "max_builds must be at least 1".into(),
            ));
        }
        let store = RecordStore::open(&config.data_dir)?;
        // No build runs now: what an earlier process left is garbage.
        let bundles = config.data_dir.join(BUNDLES_DIR);
        if let Ok(entries) = std::fs::read_dir(&bundles) {
            for entry in entries.flatten() {
                let _ = remove_any(&entry.path());
            }
        }
        let deployer = Deployer {
            builds: Arc::new(tokio::sync::Semaphore::new(config.max_builds)),
            checks: tokio::sync::Semaphore::new(1),
            grace: functions.config().shutdown_grace,
            config,
            store,
            functions,
            records: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
            retired: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            max_timeout_ms,
            next_upload: AtomicU64::new(0),
        };
        for mut record in deployer.store.load_all()? {
            let name = record.name.clone();
            if deployer.functions.get(&name).is_some() {
                tracing::warn!(
                    function = %name,
                    "a deployed function has the name of one in --functions; that one serves"
                );
                continue;
            }
            let mut changed = false;
            if record.latest.status == Status::Building {
                record.latest.status = Status::Failed;
                record.latest.log_tail =
                    Some("the server stopped before this build finished; deploy it again".into());
                record.latest.updated_unix_ms = now_unix_ms();
                changed = true;
            }
            if let Some(active) = record.active.clone() {
                match deployer.serve(&name, &active) {
                    Ok(()) => tracing::info!(
                        function = %name,
                        template = %active.template,
                        handler = %active.settings.handler,
                        "deployed function"
                    ),
                    Err(e) => {
                        tracing::warn!(function = %name, error = %e, "deployed function does not open");
                        record.active = None;
                        record.latest.status = Status::Failed;
                        record.latest.log_tail = Some(tail(&e.to_string(), LOG_TAIL_BYTES));
                        record.latest.updated_unix_ms = now_unix_ms();
                        changed = true;
                    }
                }
            }
            if changed {
                deployer.store.save(&record)?;
            }
            lock(&deployer.records).insert(name, record);
        }
        deployer.collect_garbage();
        Ok(Arc::new(deployer))
    }

    /// Where version `template`'s template is.
    fn template_dir(&self, template: &str) -> PathBuf {
        self.config.data_dir.join(TEMPLATES_DIR).join(template)
    }

    /// Opens `version`'s template and serves it as `name` (replacing the
    /// version served, which is returned retired).
    fn serve(&self, name: &str, version: &Version) -> Result<(), DeployError> {
        let dir = self.template_dir(&version.template);
        let function = Function::open(&dir).map_err(|e| DeployError::Internal(e.to_string()))?;
        self.functions
            .insert(NewFunction {
                name: name.to_owned(),
                dir,
                function,
                deployed: true,
                timeout: Some(Duration::from_millis(version.settings.timeout_ms)),
                limits: version.settings.pool,
            })
            .map_err(|e| DeployError::Internal(e.to_string()))?;
        Ok(())
    }

    /// The record of `name`, if it was deployed.
    pub fn record(&self, name: &str) -> Option<Record> {
        lock(&self.records).get(name).cloned()
    }

    /// Every record, by name.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.records).values().cloned().collect()
    }

    /// The largest bundle accepted.
    pub fn max_bundle_bytes(&self) -> usize {
        self.config.max_bundle_bytes
    }

    /// Admits a deployment of `name` with the settings of `query`, before
    /// its bundle is read: the name and settings are valid, the name is
    /// not being built or served from `--functions`, and a build place is
    /// free.
    pub fn admit(self: &Arc<Self>, name: &str, query: &str) -> Result<Admitted, DeployError> {
        if !valid_name(name) {
            return Err(DeployError::BadRequest(format!(
                "{name:?} is not a function name ({})",
                super::functions::NAME_RULE
            )));
        }
        let settings =
            parse_settings(query, self.max_timeout_ms).map_err(DeployError::BadRequest)?;
        if self.functions.get(name).is_some_and(|f| !f.deployed) {
            return Err(DeployError::Conflict(format!(
                "{name} is served from the --functions directory, which is read-only"
            )));
        }
        {
            // Both at once (only here): a new name counts from its
            // admission, so concurrent ones cannot pass the cap together.
            let records = lock(&self.records);
            let mut busy = lock(&self.busy);
            if busy.contains(name) {
                return Err(DeployError::Conflict(format!(
                    "a deployment of {name} is in progress; wait until its status is ready or failed"
                )));
            }
            let deployed =
                records.len() + busy.iter().filter(|b| !records.contains_key(*b)).count();
            if !records.contains_key(name) && deployed >= self.config.max_functions {
                return Err(DeployError::Conflict(format!(
                    "{deployed} functions are deployed (or being deployed), the most this server \
                     keeps; delete one first"
                )));
            }
            busy.insert(name.to_owned());
        }
        let most = self.config.max_builds + self.config.max_waiting_builds;
        let taken = self
            .accepted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < most).then_some(n + 1)
            });
        if taken.is_err() {
            lock(&self.busy).remove(name);
            return Err(DeployError::Busy {
                running: self.config.max_builds,
                waiting: self.config.max_waiting_builds,
            });
        }
        Ok(Admitted {
            deployer: self.clone(),
            name: name.to_owned(),
            settings,
            armed: true,
        })
    }

    /// Gives back an admission's name and build place.
    fn release(&self, name: &str) {
        lock(&self.busy).remove(name);
        self.accepted.fetch_sub(1, Ordering::SeqCst);
    }

    /// Takes the bundle of an admitted deployment: checks it, writes it
    /// and the record (`building`), and starts the build in the
    /// background. Returns the record.
    ///
    /// Runs as a task of its own: a client that goes away while this
    /// waits drops only the wait, never a deployment half done (a record
    /// written `building` whose build was never started, with the name
    /// released under it).
    pub async fn accept(
        self: &Arc<Self>,
        admitted: Admitted,
        bundle: axum::body::Bytes,
    ) -> Result<Record, DeployError> {
        let deployer = self.clone();
        tokio::spawn(async move { deployer.accept_here(admitted, bundle).await })
            .await
            .map_err(|e| DeployError::Internal(format!("the deployment task failed: {e}")))?
    }

    async fn accept_here(
        self: &Arc<Self>,
        mut admitted: Admitted,
        bundle: axum::body::Bytes,
    ) -> Result<Record, DeployError> {
        let deployer = self.clone();
        let name = admitted.name.clone();
        let settings = admitted.settings.clone();
        let checking = self
            .checks
            .acquire()
            .await
            .map_err(|e| DeployError::Internal(format!("the bundle check was closed: {e}")))?;
        let prepared =
            tokio::task::spawn_blocking(move || deployer.prepare(&name, settings, &bundle))
                .await
                .map_err(|e| DeployError::Internal(format!("the deployment task failed: {e}")))??;
        drop(checking);
        // From here the build owns the name and the place.
        admitted.armed = false;
        let record = prepared.record.clone();
        let deployer = self.clone();
        tokio::spawn(async move { deployer.build(prepared).await });
        Ok(record)
    }

    /// Checks and writes the bundle, and writes the record. Blocking.
    fn prepare(
        &self,
        name: &str,
        settings: Settings,
        bytes: &[u8],
    ) -> Result<Prepared, DeployError> {
        let n = self.next_upload.fetch_add(1, Ordering::Relaxed);
        let bundles = self.config.data_dir.join(BUNDLES_DIR);
        let upload = bundles.join(format!(".upload-{n}.zip"));
        let checked = (|| {
            let io =
                |e: std::io::Error| DeployError::Internal(format!("{}: {e}", upload.display()));
            std::fs::write(&upload, bytes).map_err(io)?;
            let (spec, options) = self.spec(&upload, &settings);
            check_bundle(&upload, &bundles.join(format!(".check-{n}")), &spec)?;
            crate::function::check_spec(&spec, &options)
                .map_err(|e| DeployError::BadRequest(e.to_string()))?;
            let bundle_path = bundles.join(format!("{name}.zip"));
            std::fs::rename(&upload, &bundle_path).map_err(io)?;
            let spec = self.spec(&bundle_path, &settings).0;
            // The request was checked already: what fails here is the
            // server's (a missing kernel or image).
            let template =
                function_key(&spec, &options).map_err(|e| DeployError::Internal(e.to_string()))?;
            Ok((spec, options, bundle_path, template))
        })();
        let (spec, mut options, bundle_path, template) = match checked {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_file(&upload);
                return Err(e);
            }
        };
        options.mem_mib = settings.memory_mib;
        let version = Version {
            settings,
            bundle_sha256: crate::cache_key::hex(&Sha256::digest(bytes)),
            template,
            created_unix_ms: now_unix_ms(),
        };
        let record = {
            let mut records = lock(&self.records);
            let mut record = records.get(name).cloned().unwrap_or_else(|| Record {
                name: name.to_owned(),
                active: None,
                latest: latest(version.clone(), Status::Building, None),
            });
            record.latest = latest(version, Status::Building, None);
            if let Err(e) = self.store.save(&record) {
                let _ = std::fs::remove_file(&bundle_path);
                return Err(e.into());
            }
            records.insert(name.to_owned(), record.clone());
            record
        };
        Ok(Prepared {
            record,
            spec,
            options,
            bundle: bundle_path,
        })
    }

    /// The spec and VM of a deployment of the bundle at `code`.
    fn spec(&self, code: &Path, settings: &Settings) -> (FunctionSpec, TemplateOptions) {
        let (module, function) = settings
            .handler
            .split_once(':')
            .unwrap_or((settings.handler.as_str(), ""));
        let mut spec = FunctionSpec::python3_bundle(code, module, function);
        spec.env = settings.env.clone();
        let mut options = self.config.template.clone();
        options.mem_mib = settings.memory_mib;
        (spec, options)
    }

    /// Makes the template (unless it exists), then serves it or records
    /// why not.
    async fn build(self: Arc<Self>, prepared: Prepared) {
        let name = prepared.record.name.clone();
        let version = prepared.record.latest.version.clone();
        let permit = self.builds.clone().acquire_owned().await;
        let dir = self.template_dir(&version.template);
        let started = std::time::Instant::now();
        tracing::info!(function = %name, template = %version.template, "building");
        let built = {
            let (spec, options, dir) =
                (prepared.spec.clone(), prepared.options.clone(), dir.clone());
            tokio::task::spawn_blocking(move || {
                if !dir.join(MANIFEST_FILE).exists() {
                    crate::paths::build_cache_entry(
                        &dir,
                        MANIFEST_FILE,
                        |building| crate::create_function(&spec, &options, building).map(drop),
                        FunctionError::Io,
                    )?;
                }
                Function::open(&dir)
            })
            .await
        };
        drop(permit);
        let _ = std::fs::remove_file(&prepared.bundle);
        let result = match built {
            Ok(Ok(function)) => Ok(function),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the build task failed: {e}")),
        };
        let old = match result {
            Ok(function) => {
                let replaced = self.functions.insert(NewFunction {
                    name: name.clone(),
                    dir,
                    function,
                    deployed: true,
                    timeout: Some(Duration::from_millis(version.settings.timeout_ms)),
                    limits: version.settings.pool,
                });
                // Before the record lets go of its template.
                if let Ok(Some(old)) = &replaced {
                    self.note_retired(old);
                }
                tracing::info!(
                    function = %name,
                    build_ms = super::api::ms(started.elapsed()),
                    "deployed"
                );
                self.finish(&name, |record| {
                    record.active = Some(version.clone());
                    record.latest.status = Status::Ready;
                });
                replaced.ok().flatten()
            }
            Err(message) => {
                tracing::warn!(function = %name, error = %message, "build failed");
                self.finish(&name, |record| {
                    record.latest.status = Status::Failed;
                    record.latest.log_tail = Some(tail(&message, LOG_TAIL_BYTES));
                });
                None
            }
        };
        self.release(&name);
        if let Some(old) = old {
            let left = self.functions.retire(&old, self.grace).await;
            if left > 0 {
                tracing::warn!(function = %name, running = left, "replaced version still running");
            }
        }
        self.collect_garbage();
    }

    /// Updates `name`'s record with `change` and saves it.
    fn finish(&self, name: &str, change: impl FnOnce(&mut Record)) {
        let mut records = lock(&self.records);
        let Some(record) = records.get_mut(name) else {
            return;
        };
        change(record);
        record.latest.updated_unix_ms = now_unix_ms();
        if let Err(e) = self.store.save(record) {
            tracing::error!(function = %name, error = %e, "cannot save the function record");
        }
    }

    /// Stops serving `name` (new invocations get 404, running ones finish
    /// within the shutdown grace, its idle clones are destroyed) and
    /// removes its record and templates.
    ///
    /// Runs as a task of its own, like [`Deployer::accept`]: the retiring
    /// can take the whole shutdown grace, and a client that gives up
    /// meanwhile must not leave the name reserved for good, its record
    /// behind, or its idle clones (and their memory charge) unretired.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), DeployError> {
        let (deployer, name) = (self.clone(), name.to_owned());
        tokio::spawn(async move { deployer.delete_here(&name).await })
            .await
            .map_err(|e| DeployError::Internal(format!("the deletion task failed: {e}")))?
    }

    async fn delete_here(&self, name: &str) -> Result<(), DeployError> {
        if self.functions.get(name).is_some_and(|f| !f.deployed) {
            return Err(DeployError::Conflict(format!(
                "{name} is served from the --functions directory, which is read-only"
            )));
        }
        if !lock(&self.busy).insert(name.to_owned()) {
            return Err(DeployError::Conflict(format!(
                "a deployment of {name} is in progress; delete it once it is ready or failed"
            )));
        }
        let result = async {
            if !lock(&self.records).contains_key(name) {
                return Err(DeployError::NotFound(name.to_owned()));
            }
            if let Some(old) = self.functions.remove(name) {
                self.note_retired(&old);
                let left = self.functions.retire(&old, self.grace).await;
                if left > 0 {
                    tracing::warn!(function = %name, running = left, "deleted function still running");
                }
            }
            self.store.remove(name)?;
            lock(&self.records).remove(name);
            tracing::info!(function = %name, "deleted");
            Ok(())
        }
        .await;
        lock(&self.busy).remove(name);
        self.collect_garbage();
        result
    }

    /// Keeps `old`'s template until nothing uses `old` any more.
    fn note_retired(&self, old: &Arc<ServedFunction>) {
        lock(&self.retired).push(Arc::downgrade(old));
    }

    /// Removes the templates no record refers to and no retired version
    /// still in use has (a request that took a slot of it just before it
    /// was replaced may yet make a clone of it; retiring gives up after
    /// the grace, and another name's deployment collects meanwhile).
    fn collect_garbage(&self) {
        let mut kept: BTreeSet<String> = lock(&self.records)
            .values()
            .flat_map(|r| r.templates().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        lock(&self.retired).retain(|old| match old.upgrade() {
            Some(old) => {
                if let Some(key) = old.dir.file_name().and_then(|k| k.to_str()) {
                    kept.insert(key.to_owned());
                }
                true
            }
            None => false,
        });
        let templates = self.config.data_dir.join(TEMPLATES_DIR);
        let Ok(entries) = std::fs::read_dir(&templates) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // Dot files are a build's lock and staging directory (swept
            // by the next build); the lock of an unused key goes.
            if let Some(hidden) = name.strip_prefix('.') {
                if hidden
                    .strip_suffix(".lock")
                    .is_some_and(|key| !kept.contains(key))
                {
                    let _ = remove_any(&entry.path());
                }
                continue;
            }
            if kept.contains(name) {
                continue;
            }
            match remove_any(&entry.path()) {
                Ok(()) => tracing::info!(template = %name, "unused template removed"),
                Err(e) => tracing::warn!(template = %name, error = %e, "cannot remove template"),
            }
        }
    }
}

/// What a build needs.
#[derive(Debug)]
struct Prepared {
    record: Record,
    spec: FunctionSpec,
    options: TemplateOptions,
    bundle: PathBuf,
}

fn latest(version: Version, status: Status, log_tail: Option<String>) -> Latest {
    Latest {
        version,
        status,
        log_tail,
        updated_unix_ms: now_unix_ms(),
    }
}

/// Stages the bundle at `code` into `scratch` (removed after) as the build
/// will, so what the bundle code refuses (not a zip, path escapes, links
/// out, over the limits) and a missing handler module are a 400 now.
fn check_bundle(code: &Path, scratch: &Path, spec: &FunctionSpec) -> Result<(), DeployError> {
    let crate::function::Runtime::Python3Bundle { module, .. } = &spec.runtime else {
        return Ok(());
    };
    let _ = remove_any(scratch);
    let staged =
        bundle::stage(code, scratch).and_then(|_| bundle::check_module(code, scratch, module));
    let _ = remove_any(scratch);
    // The client named no path: say "the bundle", not where the server
    // keeps its upload.
    staged.map_err(|e| {
        let message = e
            .to_string()
            .replace(&scratch.display().to_string(), "the bundle")
            .replace(&code.display().to_string(), "the bundle");
        DeployError::BadRequest(format!("bad bundle: {message}"))
    })
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults_and_repeated_env() {
        let s = parse_settings("handler=app.main:handler", 300_000).unwrap();
        assert_eq!(
            s,
            Settings {
                runtime: "python3".into(),
                handler: "app.main:handler".into(),
                memory_mib: DEFAULT_MEMORY_MIB,
                timeout_ms: 60_000,
                env: vec![],
                pool: PoolLimits::default(),
            }
        );
        let s = parse_settings(
            "runtime=python3&handler=m:f&memory_mib=512&timeout_ms=900&env=A=1&env=B=x%3Dy&env=A=2",
            1000,
        )
        .unwrap();
        assert_eq!((s.memory_mib, s.timeout_ms), (512, 900));
        assert_eq!(
            s.env,
            vec![("B".into(), "x=y".into()), ("A".into(), "2".into())]
        );
        assert_eq!(
            parse_settings("handler=m:f", 1000).unwrap().timeout_ms,
            1000
        );
        let s = parse_settings("handler=m:f&min_warm=3&max_live=2&max_queue=0", 1000).unwrap();
        assert_eq!(
            s.pool,
            PoolLimits {
                min_warm: Some(3),
                max_live: Some(2),
                max_queue: Some(0),
            }
        );
        for (query, needle) in [
            ("handler=m:f&max_live=0", "max_live 0 is not in 1..=1000"),
            ("handler=m:f&min_warm=1001", "min_warm 1001"),
            ("handler=m:f&max_queue=-1", "not a number"),
            ("handler=m:f&min_warm=1&min_warm=2", "twice"),
        ] {
            let error = parse_settings(query, 1000).unwrap_err();
            assert!(error.contains(needle), "{query}: {error}");
        }
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        for (query, needle) in [
            ("", "handler"),
            ("handler=nocolon", "MODULE:FUNCTION"),
            ("handler=1bad:f", "module"),
            ("handler=m:f-g", "function name"),
            ("handler=m:f&runtime=exec", "python3 only"),
            ("handler=m:f&memory_mib=64", "memory_mib"),
            ("handler=m:f&memory_mib=abc", "not a number"),
            ("handler=m:f&timeout_ms=0", "timeout_ms"),
            ("handler=m:f&timeout_ms=300001", "timeout_ms"),
            ("handler=m:f&env=NOEQUALS", "K=V"),
            ("handler=m:f&env=1A=x", "variable name"),
            ("handler=m:f&env=A%20B=x", "variable name"),
            ("handler=m:f&handler=m:g", "twice"),
            ("handler=m:f&bogus=1", "unknown setting"),
        ] {
            let err = parse_settings(query, 300_000).unwrap_err();
            assert!(err.contains(needle), "{query}: {err}");
        }
    }

    /// A build that was running when the server stopped is `failed` after
    /// a restart (not rebuilt), and templates no record uses are removed.
    #[test]
    fn a_restart_fails_interrupted_builds_and_removes_unused_templates() {
        let data = std::env::temp_dir().join(format!("ember-deployer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let store = RecordStore::open(&data).unwrap();
        let version = Version {
            settings: parse_settings("handler=app:handler", 1000).unwrap(),
            bundle_sha256: "00".into(),
            template: "kept".into(),
            created_unix_ms: 1,
        };
        store
            .save(&Record {
                name: "interrupted".into(),
                active: None,
                latest: latest(version, Status::Building, None),
            })
            .unwrap();
        let templates = data.join(TEMPLATES_DIR);
        for dir in ["kept", "unused"] {
            std::fs::create_dir_all(templates.join(dir)).unwrap();
        }
        std::fs::write(templates.join(".unused.lock"), b"").unwrap();
        std::fs::write(data.join(BUNDLES_DIR).join("interrupted.zip"), b"PK").unwrap();
        let deployer = Deployer::open(
            DeployConfig::new(data.clone(), None),
            Arc::new(FunctionSet::empty()),
            1000,
        )
        .unwrap();
        let record = deployer.record("interrupted").unwrap();
        assert_eq!(record.latest.status, Status::Failed);
        assert!(record
            .latest
            .log_tail
            .as_deref()
            .is_some_and(|l| l.contains("stopped before this build finished")));
        // Saved so: a second restart reads it failed.
        assert_eq!(store.load_all().unwrap(), vec![record]);
        let mut left: Vec<String> = std::fs::read_dir(&templates)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["kept"]);
        assert!(std::fs::read_dir(data.join(BUNDLES_DIR))
            .unwrap()
            .next()
            .is_none());
        let _ = std::fs::remove_dir_all(&data);
    }

    /// A deletion removes the record (on disk too) and its templates, and
    /// gives the name back: it can be deployed again, and a second
    /// deletion is a 404.
    #[test]
    fn a_deletion_removes_the_record_and_frees_the_name() {
        let data = std::env::temp_dir().join(format!("ember-deployer-del-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let store = RecordStore::open(&data).unwrap();
        let version = Version {
            settings: parse_settings("handler=app:handler", 1000).unwrap(),
            bundle_sha256: "00".into(),
            template: "gone".into(),
            created_unix_ms: 1,
        };
        store
            .save(&Record {
                name: "f".into(),
                active: None,
                latest: latest(version, Status::Failed, Some("boom".into())),
            })
            .unwrap();
        std::fs::create_dir_all(data.join(TEMPLATES_DIR).join("gone")).unwrap();
        let deployer = Deployer::open(
            DeployConfig::new(data.clone(), None),
            Arc::new(FunctionSet::empty()),
            1000,
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            deployer.delete("f").await.unwrap();
            assert!(matches!(
                deployer.delete("f").await,
                Err(DeployError::NotFound(_))
            ));
        });
        assert!(deployer.record("f").is_none());
        assert!(store.load_all().unwrap().is_empty());
        assert!(!data.join(TEMPLATES_DIR).join("gone").exists());
        drop(deployer.admit("f", "handler=app:handler").unwrap());
        let _ = std::fs::remove_dir_all(&data);
    }

    /// Beyond `max_functions` names, a new one is refused (a name being
    /// deployed counts); re-deploying one that is there always fits.
    #[test]
    fn deployments_of_new_names_stop_at_the_cap() {
        let data = std::env::temp_dir().join(format!("ember-deployer-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let store = RecordStore::open(&data).unwrap();
        let version = Version {
            settings: parse_settings("handler=app:handler", 1000).unwrap(),
            bundle_sha256: "00".into(),
            template: "t".into(),
            created_unix_ms: 1,
        };
        store
            .save(&Record {
                name: "old".into(),
                active: None,
                latest: latest(version, Status::Failed, None),
            })
            .unwrap();
        let mut config = DeployConfig::new(data.clone(), None);
        config.max_functions = 2;
        let deployer = Deployer::open(config, Arc::new(FunctionSet::empty()), 1000).unwrap();
        let query = "handler=app:handler";
        let new = deployer.admit("new", query).unwrap();
        let err = deployer.admit("third", query).unwrap_err();
        assert!(
            matches!(&err, DeployError::Conflict(m) if m.contains("delete one first")),
            "{err}"
        );
        // A re-deployment of a name that is there fits.
        drop(deployer.admit("old", query).unwrap());
        drop(new);
        drop(deployer.admit("third", query).unwrap());
        let _ = std::fs::remove_dir_all(&data);
    }

    #[test]
    fn tails_keep_the_end_on_a_character_boundary() {
        assert_eq!(tail("short", 10), "short");
        let t = tail("ééééé", 3);
        assert!(t.ends_with('é') && t.len() <= 3 + "…".len(), "{t}");
    }
}
