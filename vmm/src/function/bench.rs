//! `ember bench function`: what an invocation costs, restore to result, on
//! the hot path and on the vsock path, next to a cold `python3 -c pass` in
//! a fresh clone and a bare restore measured in the same run.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{
    Function, FunctionError, FunctionInvokeOptions, FunctionOutcome, FunctionSpec, HandlerResult,
    InvocationPath,
};
use crate::bench::Percentiles;
use crate::sandbox::{ExitStatus, Invocation, Sandbox};
use crate::snapshot::RestoreOptions;

/// The built-in echo handler (`examples/functions/echo.py`).
const ECHO_PY: &str = include_str!("../../../examples/functions/echo.py");

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

/// What to measure.
#[derive(Debug, Clone)]
pub struct FunctionBenchConfig {
    /// Hot-path invocations (and bare restores).
    pub iterations: usize,
    /// Invocations in flight at once.
    pub concurrency: usize,
    /// vsock-path invocations.
    pub vsock_iterations: usize,
    /// Measure one cold `python3 -c pass` in a fresh clone.
    pub cold: bool,
}

/// Timings of one path, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct PathFigures {
    /// Invocations measured.
    pub invocations: usize,
    /// Which path they took (the last one's, if they differ).
    pub path: Option<InvocationPath>,
    /// Request to result, teardown excluded.
    pub result_ms: Percentiles,
    /// Request to vCPUs running.
    pub restore_ms: Percentiles,
    /// vCPUs running to result.
    pub run_ms: Percentiles,
    /// The handler alone (runtime's clock; hot path only).
    pub handler_ms: Option<Percentiles>,
    /// Destroying the clone.
    pub teardown_ms: Percentiles,
    /// Request to clone destroyed.
    pub total_ms: Percentiles,
    /// Invocations per second over the run.
    pub throughput_per_s: f64,
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
    /// Baseline: restore a clone and destroy it, nothing delivered.
    pub bare_restore_ms: Percentiles,
    /// The hot path (absent for functions without one).
    pub hot: Option<PathFigures>,
    /// The hot path into clones prepared ahead (`Function::prepare`, not
    /// timed): restore is then only writing the request and starting.
    pub prepared: Option<PathFigures>,
    /// The vsock path.
    pub vsock: Option<PathFigures>,
    /// A cold `python3 -c pass` in a fresh clone, request to exit.
    pub cold_python_ms: Option<f64>,
}

/// Runs the benchmark.
pub fn run(
    function: &Function,
    config: &FunctionBenchConfig,
) -> Result<FunctionBenchReport, FunctionError> {
    let event = br#"{"hello": "ember"}"#;
    let mut bare = Vec::with_capacity(config.iterations);
    for _ in 0..config.iterations {
        let started = Instant::now();
        let machine = function.snapshot().restore(&RestoreOptions::default())?;
        drop(machine);
        bare.push(ms(started.elapsed()));
    }
    let run = |iterations: usize, mode: Mode| {
        measure(function, event, iterations, config.concurrency, mode)
    };
    let hot_path = function.manifest().hot_path.is_some();
    let hot = hot_path
        .then(|| run(config.iterations, Mode::Restore))
        .transpose()?;
    let prepared = hot_path
        .then(|| run(config.iterations, Mode::Prepared))
        .transpose()?;
    let vsock = (config.vsock_iterations > 0)
        .then(|| run(config.vsock_iterations, Mode::Vsock))
        .transpose()?;
    let cold_python_ms = config.cold.then(|| cold_python(function)).transpose()?;
    Ok(FunctionBenchReport {
        function: function.snapshot().dir().display().to_string(),
        handler: format!(
            "{} {}",
            function.manifest().runtime,
            function.manifest().handler
        ),
        concurrency: config.concurrency,
        bare_restore_ms: Percentiles::of(bare),
        hot,
        prepared,
        vsock,
        cold_python_ms,
    })
}

/// How the measured invocations are made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `Function::invoke`: restore, deliver, destroy.
    Restore,
    /// `Function::prepare` untimed, then `Function::invoke_prepared`: the
    /// request path of a caller that keeps clones prepared ahead.
    Prepared,
    /// `Function::invoke` on the vsock path.
    Vsock,
}

fn measure(
    function: &Function,
    event: &[u8],
    iterations: usize,
    concurrency: usize,
    mode: Mode,
) -> Result<PathFigures, FunctionError> {
    let options = FunctionInvokeOptions {
        force_vsock: mode == Mode::Vsock,
        ..FunctionInvokeOptions::default()
    };
    let invoke = |options: &FunctionInvokeOptions| match mode {
        Mode::Prepared => function
            .prepare(options)
            .and_then(|clone| function.invoke_prepared(clone, event, options)),
        Mode::Restore | Mode::Vsock => function.invoke(event, options),
    };
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<FunctionOutcome>> = Mutex::new(Vec::with_capacity(iterations));
    let failure: Mutex<Option<FunctionError>> = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.min(iterations) {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::SeqCst) < iterations {
                    match invoke(&options) {
                        Ok(outcome) if matches!(outcome.result, HandlerResult::Json { .. }) => {
                            lock(&outcomes).push(outcome);
                        }
                        Ok(outcome) => {
                            lock(&failure).get_or_insert(FunctionError::Garbage(format!(
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
    let outcomes = std::mem::take(&mut *lock(&outcomes));
    let figures = |f: &dyn Fn(&FunctionOutcome) -> Duration| {
        Percentiles::of(outcomes.iter().map(|o| ms(f(o))))
    };
    let handlers: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.timings.handler.map(ms))
        .collect();
    Ok(PathFigures {
        invocations: outcomes.len(),
        path: outcomes.last().map(|o| o.path),
        result_ms: figures(&|o| o.timings.restore + o.timings.run),
        restore_ms: figures(&|o| o.timings.restore),
        run_ms: figures(&|o| o.timings.run),
        handler_ms: (!handlers.is_empty()).then(|| Percentiles::of(handlers)),
        teardown_ms: figures(&|o| o.timings.teardown),
        total_ms: figures(&|o| o.timings.total),
        throughput_per_s: outcomes.len() as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// One cold `python3 -c pass` through the agent of a fresh clone.
fn cold_python(function: &Function) -> Result<f64, FunctionError> {
    let started = Instant::now();
    let mut sandbox = Sandbox::restore(function.snapshot(), &RestoreOptions::default())
        .map_err(|e| FunctionError::Garbage(format!("cold python clone: {e}")))?;
    let mut invocation = Invocation::new(["python3", "-c", "pass"]);
    invocation.timeout_ms = 300_000;
    let outcome = sandbox
        .invoke(&invocation)
        .map_err(|e| FunctionError::Garbage(format!("cold python: {e}")))?;
    if outcome.status != ExitStatus::Code(0) {
        return Err(FunctionError::Garbage(format!(
            "cold python3 -c pass: {:?}: {}",
            outcome.status,
            String::from_utf8_lossy(&outcome.stderr)
        )));
    }
    Ok(ms(started.elapsed()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for FunctionBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "function {} ({})", self.function, self.handler)?;
        writeln!(f, "concurrency {}", self.concurrency)?;
        writeln!(
            f,
            "{:<44} {:>9} {:>9} {:>9} {:>9}",
            "(ms)", "min", "p50", "p99", "max"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, p: &Percentiles| {
            writeln!(
                f,
                "{name:<44} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                p.min, p.p50, p.p99, p.max
            )
        };
        row(
            f,
            "baseline: bare restore + teardown",
            &self.bare_restore_ms,
        )?;
        for (name, figures) in [
            ("hot path", &self.hot),
            ("hot path, clone prepared ahead", &self.prepared),
            ("vsock path", &self.vsock),
        ] {
            let Some(p) = figures else { continue };
            writeln!(
                f,
                "{name} ({} invocations, {:.1}/s):",
                p.invocations, p.throughput_per_s
            )?;
            row(f, "  restore -> result", &p.result_ms)?;
            row(f, "    restore (request -> vCPU runs)", &p.restore_ms)?;
            row(f, "    run (vCPU runs -> result)", &p.run_ms)?;
            if let Some(h) = &p.handler_ms {
                row(f, "      of which the handler", h)?;
            }
            row(f, "  teardown", &p.teardown_ms)?;
            row(f, "  total (request -> clone destroyed)", &p.total_ms)?;
        }
        if let Some(cold) = self.cold_python_ms {
            writeln!(f, "cold `python3 -c pass` in a fresh clone: {cold:.0} ms")?;
        }
        if let Some(hot) = &self.hot {
            let p50 = hot.result_ms.p50.max(1e-9);
            writeln!(
                f,
                "hot path result p50 = {:.2}x a bare restore+teardown",
                p50 / self.bare_restore_ms.p50.max(1e-9)
            )?;
            if let Some(prepared) = &self.prepared {
                writeln!(
                    f,
                    "prepared clone: result p50 {:.2} ms ({:.2}x the restoring hot path)",
                    prepared.result_ms.p50,
                    prepared.result_ms.p50 / p50
                )?;
            }
            if let Some(vsock) = &self.vsock {
                writeln!(
                    f,
                    "vsock path / hot path (p50): {:.0}x",
                    vsock.result_ms.p50 / p50
                )?;
            }
            if let Some(cold) = self.cold_python_ms {
                writeln!(f, "cold python / hot path (p50): {:.0}x", cold / p50)?;
            }
        }
        Ok(())
    }
}
