//! `ember bench function`: what an invocation costs on each path, measured
//! the same way in the same run:
//!
//! - `fresh`: [`Function::invoke`], a new clone restored per event;
//! - `prepared`: clones made ahead ([`Function::prepare`], not timed), the
//!   request written and the clone started ([`Function::invoke_prepared`]);
//! - `recycled`: a [`FunctionPool`] of clones reset in place after each
//!   invocation;
//! - `recycled_stream`: the same with the output streamed
//!   ([`FunctionInvokeOptions::output`], to a sink that only counts), so
//!   what streaming costs is the difference of two paths of one run;
//! - `vsock`: the agent path, a new clone per event.
//!
//! Every path's headline, `e2e_ms`, runs from the request to the moment the
//! host holds the parsed result. Teardown (destroying a clone, or resetting
//! a recycled one) comes after the result and is reported on its own; it
//! still occupies the clone's thread, so `per_s` (invocations over the
//! section's wall time at `concurrency`) includes it.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::own_memory_kib;
use super::stats::{ms, Stats};
use crate::function::Manifest;
use crate::function::{
    Function, FunctionError, FunctionInvokeOptions, FunctionOutcome, FunctionPool, FunctionSpec,
    FunctionTimings, HandlerResult, InvocationPath, OutputSink, PoolOptions, RecycleInfo,
    RecycleOptions,
};
use crate::sandbox::{ExitStatus, Invocation, Sandbox};
use crate::snapshot::RestoreOptions;
use crate::vstate::stats::GuestKernelWork;
use ember_protocol::protocol::{CODE_DIR, FUNCTION_DIR};

/// The built-in echo handler (`examples/functions/echo.py`).
const ECHO_PY: &str = include_str!("../../../examples/functions/echo.py");

/// The event sent when none is given.
pub const DEFAULT_EVENT: &[u8] = br#"{"hello": "ember"}"#;

/// The echo function's spec, its handler written into the cache directory.
pub fn echo_spec() -> Result<FunctionSpec, FunctionError> {
    let dir = crate::paths::cache_dir().join("handlers");
    std::fs::create_dir_all(&dir).map_err(|e| FunctionError::Io(dir.clone(), e))?;
    let file: PathBuf = dir.join("echo.py");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(ECHO_PY) {
        std::fs::write(&file, ECHO_PY).map_err(|e| FunctionError::Io(file.clone(), e))?;
    }
    let mut spec = FunctionSpec::python3(file, "handler");
    spec.warmup_event = Some(br#"{"warm": true}"#.to_vec());
    Ok(spec)
}

/// A path [`run`] can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchPath {
    /// A fresh clone per event.
    Fresh,
    /// Clones prepared ahead.
    Prepared,
    /// Clones reset in place.
    Recycled,
    /// Clones reset in place, the output streamed.
    RecycledStream,
    /// The agent path.
    Vsock,
}

impl BenchPath {
    /// Every path, in report order.
    pub const ALL: [BenchPath; 5] = [
        BenchPath::Fresh,
        BenchPath::Prepared,
        BenchPath::Recycled,
        BenchPath::RecycledStream,
        BenchPath::Vsock,
    ];

    /// Its name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            BenchPath::Fresh => "fresh",
            BenchPath::Prepared => "prepared",
            BenchPath::Recycled => "recycled",
            BenchPath::RecycledStream => "recycled_stream",
            BenchPath::Vsock => "vsock",
        }
    }

    /// The path called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct FunctionBenchConfig {
    /// Invocations on each hot path (fresh, prepared, recycled).
    pub iterations: usize,
    /// Invocations in flight at once.
    pub concurrency: usize,
    /// vsock-path invocations.
    pub vsock_iterations: usize,
    /// Measure one cold `python3 -c pass` in a fresh clone.
    pub cold: bool,
    /// Times to run the function's handler in a new `python3 -c` in a
    /// fresh clone (import and call, as without a template); 0: never.
    pub cold_handler_iterations: usize,
    /// The paths to measure.
    pub paths: Vec<BenchPath>,
    /// The event every invocation gets.
    pub event: Vec<u8>,
}

/// What the resets of the recycled path did.
#[derive(Debug, Clone, Serialize)]
pub struct ResetFigures {
    /// Guest pages copied back per reset.
    pub pages: Stats,
    /// Of which the guest wrote.
    pub guest_pages: Stats,
    /// Invocations during which the guest kernel ran.
    pub kernel_ran: usize,
    /// Resets that dropped KVM's mappings (shadow paging, kernel ran).
    pub mappings_dropped: usize,
    /// Clones destroyed and replaced (a reset that could not be done).
    pub replaced: u64,
    /// Clones made in all (`concurrency` up front, plus replacements).
    pub clones: u64,
    /// This process's memory (PSS, KiB) with the pool made, before the
    /// first invocation.
    pub pss_kib_before: u64,
    /// The same after the last invocation.
    pub pss_kib_after: u64,
    /// Anonymous memory (KiB) before the first invocation.
    pub anon_kib_before: u64,
    /// The same after the last invocation.
    pub anon_kib_after: u64,
}

/// Figures of one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathFigures {
    /// Which path the invocations took (the last one's).
    pub path: Option<InvocationPath>,
    /// Request to the host holding the parsed result.
    pub e2e_ms: Stats,
    /// Invocations per second over the section's wall time, at
    /// `concurrency` (teardown or reset included).
    pub per_s: f64,
    /// Request to vCPUs running: restoring a clone (fresh, vsock),
    /// writing the request and starting it (prepared), writing it and
    /// resuming the reset clone (recycled).
    pub restore_ms: Stats,
    /// vCPUs running to the host holding the parsed result.
    pub run_ms: Stats,
    /// The handler alone (the runtime's clock; hot path only).
    pub handler_ms: Option<Stats>,
    /// After the result: destroying the clone, or resetting it (recycled).
    pub teardown_ms: Stats,
    /// Request to the clone destroyed (or reset).
    pub total_ms: Stats,
    /// The recycled path's resets.
    pub reset: Option<ResetFigures>,
    /// Output bytes the sink got in all (streaming paths).
    pub streamed_bytes: Option<usize>,
    /// Guest-kernel work per invocation (KVM's counters; in-process
    /// clones where KVM keeps them).
    pub guest_kernel: Option<GuestKernelFigures>,
}

/// Guest-kernel work per invocation, from KVM's counters.
#[derive(Debug, Clone, Serialize)]
pub struct GuestKernelFigures {
    /// Instructions KVM emulated (on PVM hosts: every guest-kernel
    /// instruction, and MMIO stores such as the doorbell's two).
    pub emulated_instructions: Stats,
    /// Page faults reflected to the guest kernel.
    pub guest_page_faults: Stats,
    /// Interrupts injected.
    pub injected_interrupts: Stats,
    /// Exits from guest mode to KVM (faults, MMIO, interrupts, halts).
    pub exits: Stats,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionBenchReport {
    /// The function.
    pub function: String,
    /// Its runtime and handler.
    pub handler: String,
    /// Invocations in flight at once.
    pub concurrency: usize,
    /// A fresh clone per event.
    pub fresh: Option<PathFigures>,
    /// Clones prepared ahead (preparation not timed).
    pub prepared: Option<PathFigures>,
    /// Clones reset in place.
    pub recycled: Option<PathFigures>,
    /// Clones reset in place, the output streamed.
    pub recycled_stream: Option<PathFigures>,
    /// The agent path.
    pub vsock: Option<PathFigures>,
    /// Cold `python3 -c pass` in a fresh clone, request to exit.
    pub cold_python_ms: Option<Stats>,
    /// The handler run by a new `python3 -c` in a fresh clone (import and
    /// one call), request to exit.
    pub cold_handler_ms: Option<Stats>,
}

/// Runs the benchmark.
pub fn run(
    function: &Arc<Function>,
    config: &FunctionBenchConfig,
) -> Result<FunctionBenchReport, FunctionError> {
    let hot = function.manifest().hot_path.is_some();
    let wants = |p: BenchPath| config.paths.contains(&p);
    let measure =
        |mode: BenchPath, iterations: usize| -> Result<Option<PathFigures>, FunctionError> {
            if !wants(mode) || iterations == 0 || (mode != BenchPath::Vsock && !hot) {
                return Ok(None);
            }
            measure(
                function,
                &config.event,
                iterations,
                config.concurrency,
                mode,
            )
            .map(Some)
        };
    let fresh = measure(BenchPath::Fresh, config.iterations)?;
    let prepared = measure(BenchPath::Prepared, config.iterations)?;
    let recycled = measure(BenchPath::Recycled, config.iterations)?;
    let recycled_stream = measure(BenchPath::RecycledStream, config.iterations)?;
    let vsock = measure(BenchPath::Vsock, config.vsock_iterations)?;
    let cold_python_ms = config
        .cold
        .then(|| cold_python(function).map(|ms| Stats::of([ms])))
        .transpose()?;
    let cold_handler_ms = match config.cold_handler_iterations {
        0 => None,
        n => {
            let command = cold_handler_command(function.manifest())?;
            let times = (0..n)
                .map(|_| cold_command(function, &command, &config.event))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Stats::of(times))
        }
    };
    Ok(FunctionBenchReport {
        function: function.snapshot().dir().display().to_string(),
        handler: format!(
            "{} {}",
            function.manifest().runtime,
            function.manifest().handler
        ),
        concurrency: config.concurrency,
        fresh,
        prepared,
        recycled,
        recycled_stream,
        vsock,
        cold_python_ms,
        cold_handler_ms,
    })
}

fn measure(
    function: &Arc<Function>,
    event: &[u8],
    iterations: usize,
    concurrency: usize,
    mode: BenchPath,
) -> Result<PathFigures, FunctionError> {
    let concurrency = concurrency.clamp(1, iterations.max(1));
    // The VMM's own paths, in this process (a jailed invocation adds a
    // worker's spawn and jail: `ember invoke --verbose` shows it).
    let streamed = Arc::new(AtomicUsize::new(0));
    let counted = streamed.clone();
    let options = FunctionInvokeOptions {
        force_vsock: mode == BenchPath::Vsock,
        output: (mode == BenchPath::RecycledStream).then(|| {
            OutputSink::new(move |_, bytes| {
                counted.fetch_add(bytes.len(), Ordering::Relaxed);
            })
        }),
        ..FunctionInvokeOptions::in_process()
    };
    let recycles = matches!(mode, BenchPath::Recycled | BenchPath::RecycledStream);
    let pool = recycles
        .then(|| {
            FunctionPool::new(
                Arc::clone(function),
                PoolOptions {
                    min: concurrency,
                    max: concurrency,
                    recycle: RecycleOptions::default(),
                },
            )
        })
        .transpose()?;
    let invoke = |options: &FunctionInvokeOptions| match (mode, &pool) {
        (BenchPath::Prepared, _) => function
            .prepare(options)
            .and_then(|clone| function.invoke_prepared(clone, event, options)),
        (BenchPath::Recycled | BenchPath::RecycledStream, Some(pool)) => {
            pool.invoke(event, options)
        }
        _ => function.invoke(event, options),
    };
    // Each outcome is kept as a small sample in a table filled in up front,
    // so the memory figures below are the clones' and the VMM's, not the
    // benchmark's own growing record.
    let outcomes: Mutex<Vec<Sample>> = Mutex::new(vec![Sample::default(); iterations]);
    let filled = AtomicUsize::new(0);
    let memory_before = own_memory_kib();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<FunctionError>> = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::SeqCst) < iterations {
                    match invoke(&options) {
                        Ok(outcome)
                            if matches!(
                                outcome.result,
                                HandlerResult::Json { .. } | HandlerResult::Bytes { .. }
                            ) =>
                        {
                            let at = filled.fetch_add(1, Ordering::SeqCst);
                            if let Some(slot) = lock(&outcomes).get_mut(at) {
                                *slot = Sample::of(&outcome);
                            }
                        }
                        Ok(outcome) => {
                            lock(&failure).get_or_insert(FunctionError::BadRequest(format!(
                                "the benchmark's handler failed: {:?}",
                                outcome.result
                            )));
                            return;
                        }
                        Err(e) => {
                            lock(&failure).get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    if let Some(e) = lock(&failure).take() {
        return Err(e);
    }
    let memory_after = own_memory_kib();
    let mut outcomes = std::mem::take(&mut *lock(&outcomes));
    outcomes.truncate(filled.load(Ordering::SeqCst));
    let stats = |f: &dyn Fn(&Sample) -> f64| Stats::of(outcomes.iter().map(f));
    let handlers: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.timings.handler.map(ms))
        .collect();
    let reset = pool.as_ref().map(|pool| {
        let resets: Vec<_> = outcomes.iter().filter_map(|o| o.recycle).collect();
        let pool_stats = pool.stats();
        let (pss_before, anon_before) = memory_before.unwrap_or_default();
        let (pss_after, anon_after) = memory_after.unwrap_or_default();
        ResetFigures {
            pages: Stats::of(resets.iter().map(|r| r.reset.pages as f64)),
            guest_pages: Stats::of(resets.iter().map(|r| r.reset.guest_pages as f64)),
            kernel_ran: resets.iter().filter(|r| r.reset.kernel_ran).count(),
            mappings_dropped: resets.iter().filter(|r| r.reset.mappings_dropped).count(),
            replaced: pool_stats.replaced,
            clones: pool_stats.created,
            pss_kib_before: pss_before,
            pss_kib_after: pss_after,
            anon_kib_before: anon_before,
            anon_kib_after: anon_after,
        }
    });
    let works: Vec<_> = outcomes.iter().filter_map(|o| o.guest_kernel).collect();
    let guest_kernel = (!works.is_empty()).then(|| GuestKernelFigures {
        emulated_instructions: Stats::of(works.iter().map(|w| w.emulated_instructions as f64)),
        guest_page_faults: Stats::of(works.iter().map(|w| w.guest_page_faults as f64)),
        injected_interrupts: Stats::of(works.iter().map(|w| w.injected_interrupts as f64)),
        exits: Stats::of(works.iter().map(|w| w.exits as f64)),
    });
    Ok(PathFigures {
        path: outcomes.last().and_then(|o| o.path),
        guest_kernel,
        e2e_ms: stats(&|o| ms(o.timings.restore + o.timings.run)),
        per_s: outcomes.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        restore_ms: stats(&|o| ms(o.timings.restore)),
        run_ms: stats(&|o| ms(o.timings.run)),
        handler_ms: (!handlers.is_empty()).then(|| Stats::of(handlers)),
        teardown_ms: stats(&|o| ms(o.timings.teardown)),
        total_ms: stats(&|o| ms(o.timings.total)),
        reset,
        streamed_bytes: options
            .output
            .is_some()
            .then(|| streamed.load(Ordering::Relaxed)),
    })
}

/// What the benchmark keeps of one outcome.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    path: Option<InvocationPath>,
    timings: FunctionTimings,
    recycle: Option<RecycleInfo>,
    guest_kernel: Option<GuestKernelWork>,
}

impl Sample {
    fn of(outcome: &FunctionOutcome) -> Self {
        Sample {
            path: Some(outcome.path),
            timings: outcome.timings,
            recycle: outcome.recycle,
            guest_kernel: outcome.guest_kernel,
        }
    }
}

/// One cold `python3 -c pass` through the agent of a fresh clone.
fn cold_python(function: &Function) -> Result<f64, FunctionError> {
    let command = ColdCommand {
        argv: ["python3", "-c", "pass"].map(String::from).to_vec(),
        cwd: None,
    };
    cold_command(function, &command, b"")
}

/// A command for the agent of a fresh clone.
struct ColdCommand {
    argv: Vec<String>,
    cwd: Option<String>,
}

/// What a new interpreter does to serve one event without a template:
/// import the handler from where the template's runtime found it (the
/// function directory, or the code drive with its installed
/// dependencies), call it with the event from stdin, print the result's
/// length.
fn cold_handler_command(manifest: &Manifest) -> Result<ColdCommand, FunctionError> {
    let unsupported = || {
        FunctionError::BadRequest(format!(
            "a cold handler run needs a python3 function, not {} {}",
            manifest.runtime, manifest.handler
        ))
    };
    if manifest.runtime != "python3" {
        return Err(unsupported());
    }
    let (target, name) = manifest.handler.rsplit_once(':').ok_or_else(unsupported)?;
    let (dir, module, site) = match target.strip_suffix(".py") {
        Some(stem) => (FUNCTION_DIR, stem, false),
        None => (CODE_DIR, target, true),
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|part| {
                !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    if !valid(module) || !valid(name) || name.contains('.') {
        return Err(unsupported());
    }
    let site = if site {
        format!("import site; site.addsitedir('{CODE_DIR}/.ember-site')\n")
    } else {
        String::new()
    };
    let script = format!(
        "import importlib, json, sys\n\
         sys.path.insert(0, '{dir}')\n\
         {site}\
         handler = getattr(importlib.import_module('{module}'), '{name}')\n\
         data = sys.stdin.buffer.read()\n\
         result = handler(json.loads(data) if data else None, None)\n\
         out = result if isinstance(result, (bytes, bytearray)) else json.dumps(result).encode()\n\
         print(len(out))\n"
    );
    Ok(ColdCommand {
        argv: vec!["python3".into(), "-c".into(), script],
        cwd: Some(dir.into()),
    })
}

/// Runs `command` with `stdin` through the agent of a fresh clone;
/// request to exit, in ms.
fn cold_command(
    function: &Function,
    command: &ColdCommand,
    stdin: &[u8],
) -> Result<f64, FunctionError> {
    let started = Instant::now();
    let mut sandbox = Sandbox::restore(function.snapshot(), &RestoreOptions::default())
        .map_err(|e| FunctionError::Startup(format!("cold python clone: {e}")))?;
    let mut invocation = Invocation::new(command.argv.iter().cloned());
    invocation.cwd.clone_from(&command.cwd);
    invocation.stdin = stdin.to_vec();
    invocation.timeout_ms = 600_000;
    let outcome = sandbox
        .invoke(&invocation)
        .map_err(|e| FunctionError::Startup(format!("cold python: {e}")))?;
    if outcome.status != ExitStatus::Code(0) {
        return Err(FunctionError::Startup(format!(
            "cold python3 -c: {:?}: {}",
            outcome.status,
            String::from_utf8_lossy(&outcome.stderr)
        )));
    }
    Ok(ms(started.elapsed()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FunctionBenchReport {
    /// The paths measured, with their names.
    fn sections(&self) -> [(&'static str, &Option<PathFigures>); 5] {
        [
            ("fresh", &self.fresh),
            ("prepared", &self.prepared),
            ("recycled", &self.recycled),
            ("recycled_stream", &self.recycled_stream),
            ("vsock", &self.vsock),
        ]
    }
}

impl fmt::Display for FunctionBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "function {} ({})", self.function, self.handler)?;
        writeln!(
            f,
            "concurrency {}; e2e = request -> host holds the parsed result; p99 only from >= 100 samples",
            self.concurrency
        )?;
        write!(f, "{}", Stats::header("ms"))?;
        for (name, figures) in self.sections() {
            let Some(p) = figures else { continue };
            writeln!(f, "{name} ({:.1} invocations/s):", p.per_s)?;
            let (restore, teardown) = match name {
                "recycled" | "recycled_stream" => {
                    ("write request + resume", "reset (after the result)")
                }
                "prepared" => ("write request + start", "teardown (after the result)"),
                _ => (
                    "restore (request -> vCPUs run)",
                    "teardown (after the result)",
                ),
            };
            write!(f, "{}", p.e2e_ms.row("  e2e"))?;
            write!(f, "{}", p.restore_ms.row(&format!("    {restore}")))?;
            write!(
                f,
                "{}",
                p.run_ms.row("    run (vCPUs run -> parsed result)")
            )?;
            if let Some(h) = &p.handler_ms {
                write!(f, "{}", h.row("      of which the handler"))?;
            }
            write!(f, "{}", p.teardown_ms.row(&format!("  {teardown}")))?;
            write!(
                f,
                "{}",
                p.total_ms.row("  total (request -> teardown done)")
            )?;
            if let Some(k) = &p.guest_kernel {
                let row = |s: &Stats, name: &str| s.row(name);
                writeln!(
                    f,
                    "  guest-kernel work per invocation, KVM's counters (n = invocations):"
                )?;
                write!(
                    f,
                    "{}{}{}{}",
                    row(&k.guest_page_faults, "    guest page faults (count)"),
                    row(
                        &k.emulated_instructions,
                        "    emulated instructions (count)"
                    ),
                    row(&k.exits, "    exits to KVM (count)"),
                    row(&k.injected_interrupts, "    injected interrupts (count)")
                )?;
            }
            if let Some(bytes) = p.streamed_bytes {
                writeln!(f, "  output streamed to the sink: {bytes} bytes in all")?;
            }
            if let Some(r) = &p.reset {
                write!(f, "{}", r.pages.row("  pages restored per reset (count)"))?;
                write!(f, "{}", r.guest_pages.row("    of which the guest wrote"))?;
                writeln!(
                    f,
                    "  guest kernel ran in {} of {} invocations ({} dropped KVM's mappings); {} clones made, {} replaced",
                    r.kernel_ran, p.e2e_ms.n, r.mappings_dropped, r.clones, r.replaced
                )?;
                writeln!(
                    f,
                    "  process memory before the first / after the last invocation: PSS {} / {} KiB, anonymous {} / {} KiB",
                    r.pss_kib_before, r.pss_kib_after, r.anon_kib_before, r.anon_kib_after
                )?;
            }
        }
        if let Some(cold) = &self.cold_python_ms {
            writeln!(
                f,
                "cold `python3 -c pass` in a fresh clone, request -> exit: {:.0} ms (n={})",
                cold.p50, cold.n
            )?;
        }
        if let Some(cold) = &self.cold_handler_ms {
            writeln!(
                f,
                "the handler in a new `python3 -c` in a fresh clone (import + one call), request -> exit: p50 {:.0} ms, max {:.0} ms (n={})",
                cold.p50, cold.max, cold.n
            )?;
        }
        // Ratios of e2e p50s, each pair measured the same way in this run.
        let e2e = |p: &Option<PathFigures>| p.as_ref().map(|p| p.e2e_ms);
        let ratio =
            |f: &mut fmt::Formatter<'_>, a: &str, x: Option<Stats>, b: &str, y: Option<Stats>| {
                if let (Some(x), Some(y)) = (x, y) {
                    writeln!(
                        f,
                        "e2e p50 {a} / {b}: {:.1}x ({a} n={}, {b} n={})",
                        x.p50 / y.p50.max(1e-9),
                        x.n,
                        y.n
                    )?;
                }
                Ok(())
            };
        ratio(
            f,
            "fresh",
            e2e(&self.fresh),
            "recycled",
            e2e(&self.recycled),
        )?;
        ratio(
            f,
            "fresh",
            e2e(&self.fresh),
            "prepared",
            e2e(&self.prepared),
        )?;
        ratio(
            f,
            "recycled_stream",
            e2e(&self.recycled_stream),
            "recycled",
            e2e(&self.recycled),
        )?;
        ratio(f, "vsock", e2e(&self.vsock), "fresh", e2e(&self.fresh))?;
        ratio(
            f,
            "cold python",
            self.cold_python_ms,
            "fresh",
            e2e(&self.fresh),
        )?;
        ratio(
            f,
            "cold handler",
            self.cold_handler_ms,
            "fresh",
            e2e(&self.fresh),
        )?;
        Ok(())
    }
}
