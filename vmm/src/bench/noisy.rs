//! The noisy-neighbour benchmark: an echo function's invocation latency
//! while a neighbour clone idles, hammers its disk unthrottled, and
//! hammers it under a rate limit.
//!
//! The neighbour is a sandbox whose root drive is the python3 image; it
//! reads the python binary with direct I/O (every byte from the device,
//! none from its page cache) in a loop, for a fixed window, while this
//! thread invokes the echo function (a fresh clone per event) back to
//! back and records each invocation's latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::stats::{ms, Stats};
use crate::devices::rate_limiter::{IoLimits, RateLimitConfig};
use crate::function::{Function, FunctionError, FunctionInvokeOptions, HandlerResult};
use crate::sandbox::{Invocation, Sandbox, SandboxError};
use crate::snapshot::{RestoreOptions, Snapshot};

/// The neighbour's loop: the python binary's size once, then a line per
/// direct-I/O read of the whole file, for `$1` seconds of guest uptime
/// (`read` is a shell builtin: the clock costs no process).
const HAMMER: &str = r#"f=$(readlink -f /usr/bin/python3)
stat -c %s "$f"
read t0 _ < /proc/uptime
end=$(( ${t0%.*} + $1 ))
while read t _ < /proc/uptime && [ "${t%.*}" -lt "$end" ]; do
    dd if="$f" of=/dev/null bs=64k iflag=direct 2>/dev/null || exit 1
    echo
done
"#;

/// What to run.
#[derive(Debug, Clone)]
pub struct NoisyConfig {
    /// How long each phase lasts.
    pub window: Duration,
    /// The neighbour's disk limit in the limited phase, bytes per second.
    pub disk_limit: u64,
    /// The event sent to the echo function.
    pub event: Vec<u8>,
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseFigures {
    /// What the neighbour did.
    pub phase: String,
    /// Echo invocation latency, request to result (ms).
    pub echo_ms: Stats,
    /// What the neighbour read, MiB/s over the window (0 when idle).
    pub neighbour_mib_per_s: f64,
}

/// The benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct NoisyReport {
    /// Length of each phase (s).
    pub window_s: f64,
    /// The limit of the last phase (MiB/s).
    pub disk_limit_mib_per_s: f64,
    /// The phases, in order: idle, unthrottled, limited.
    pub phases: Vec<PhaseFigures>,
}

impl NoisyReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The report as a table.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "echo function latency beside a disk-hammering neighbour ({:.0} s per phase, \
             fresh clone per event)\n",
            self.window_s
        );
        out += &Stats::header("ms");
        for phase in &self.phases {
            out += &phase.echo_ms.row(&phase.phase);
        }
        out += "neighbour's direct reads:\n";
        for phase in &self.phases {
            out += &format!(
                "  {:<42} {:>8.2} MiB/s\n",
                phase.phase, phase.neighbour_mib_per_s
            );
        }
        out
    }
}

/// The benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum NoisyError {
    /// The echo function failed.
    #[error("echo function: {0}")]
    Function(#[from] FunctionError),
    /// The echo handler did not answer with a result.
    #[error("the echo handler failed: {0}")]
    Handler(String),
    /// The neighbour failed.
    #[error("neighbour: {0}")]
    Sandbox(#[from] SandboxError),
    /// The neighbour's loop printed something unexpected.
    #[error("neighbour's loop: {0}")]
    Neighbour(String),
}

/// Runs the three phases: `echo` invoked back to back beside a clone of
/// `neighbour` (which must have the python3 image as its root drive).
pub fn run(
    echo: &Arc<Function>,
    neighbour: &Snapshot,
    config: &NoisyConfig,
) -> Result<NoisyReport, NoisyError> {
    let limited = IoLimits {
        disk: RateLimitConfig::bandwidth(config.disk_limit),
        ..IoLimits::default()
    };
    let phases = [
        ("neighbour idle", None),
        ("neighbour hammering its disk", Some(IoLimits::default())),
        (
            "neighbour hammering, disk limited",
            Some(limited).filter(|l| l.is_limited()),
        ),
    ];
    let mut figures = Vec::new();
    for (name, hammer) in phases {
        if name.ends_with("limited") && hammer.is_none() {
            continue;
        }
        figures.push(phase(echo, neighbour, config, name, hammer)?);
    }
    Ok(NoisyReport {
        window_s: config.window.as_secs_f64(),
        disk_limit_mib_per_s: config.disk_limit as f64 / f64::from(1 << 20),
        phases: figures,
    })
}

fn phase(
    echo: &Arc<Function>,
    neighbour: &Snapshot,
    config: &NoisyConfig,
    name: &str,
    hammer: Option<IoLimits>,
) -> Result<PhaseFigures, NoisyError> {
    let options = RestoreOptions {
        io_limits: hammer.unwrap_or_default(),
        ..RestoreOptions::default()
    };
    let mut sandbox = Sandbox::restore(neighbour, &options)?;
    let window = config.window;
    // Idle, the neighbour is kept alive, untouched, until the phase ends.
    let (idle, worker) = match hammer {
        None => (Some(sandbox), None),
        Some(_) => (
            None,
            Some(std::thread::spawn(move || {
                let secs = window.as_secs().max(1).to_string();
                let mut inv = Invocation::new(["sh", "-c", HAMMER, "hammer", secs.as_str()]);
                // The loop ends itself; this only bounds a stuck one.
                inv.timeout_ms = u64::try_from(window.as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_add(300_000);
                let outcome = sandbox.invoke(&inv);
                (outcome, sandbox)
            })),
        ),
    };
    let started = Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < window {
        let t = Instant::now();
        let outcome = echo.invoke(&config.event, &FunctionInvokeOptions::default())?;
        if !matches!(
            outcome.result,
            HandlerResult::Json { .. } | HandlerResult::Bytes { .. }
        ) {
            return Err(NoisyError::Handler(format!("{:?}", outcome.result)));
        }
        latencies.push(ms(t.elapsed()));
    }
    let neighbour_mib_per_s = match worker {
        None => 0.0,
        Some(worker) => {
            let (outcome, _sandbox) = worker
                .join()
                .map_err(|_| NoisyError::Neighbour("its thread panicked".into()))?;
            let outcome = outcome?;
            if outcome.status != crate::sandbox::ExitStatus::Code(0) {
                return Err(NoisyError::Neighbour(format!(
                    "{:?}: {}",
                    outcome.status,
                    String::from_utf8_lossy(&outcome.stderr)
                )));
            }
            let out = String::from_utf8_lossy(&outcome.stdout);
            let mut lines = out.lines();
            let size: u64 = lines
                .next()
                .and_then(|l| l.trim().parse().ok())
                .ok_or_else(|| NoisyError::Neighbour(format!("no file size in {out:?}")))?;
            let passes = lines.count() as u64;
            let elapsed = Duration::from_millis(outcome.usage.wall_ms.max(1));
            (passes * size) as f64 / f64::from(1 << 20) / elapsed.as_secs_f64()
        }
    };
    drop(idle);
    Ok(PhaseFigures {
        phase: name.to_string(),
        echo_ms: Stats::of(latencies),
        neighbour_mib_per_s,
    })
}
