//! Benchmarks that print figures: cold boot, snapshot restore
//! ([`restore`]), function invocations ([`function`]) and load on a running
//! `ember serve` ([`http`]). Every figure is a
//! [`Stats`]: nearest-rank percentiles with the sample count, no p99 from
//! fewer than 100 samples.
//!
//! A boot is measured from the moment a fresh `ember` process is spawned,
//! so process start, dynamic loading and VMM setup are all counted. The
//! child reports its own timestamps on stderr as CLOCK_MONOTONIC
//! nanoseconds, which both processes share.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

pub mod density;
pub mod function;
pub mod http;
pub mod noisy;
pub mod stats;

pub use stats::{ms, Stats};

use crate::config::VmConfig;
use crate::sandbox::{Invocation, Sandbox};
use crate::snapshot::{RestoreOptions, Snapshot};

/// Environment variable that makes `ember boot` print [`TIMINGS_PREFIX`].
pub const TIMINGS_ENV: &str = "EMBER_BENCH_TIMINGS";
/// Start of the stderr line carrying a boot's timestamps.
pub const TIMINGS_PREFIX: &str = "ember-timings:";

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// An `Instant` of this process as CLOCK_MONOTONIC nanoseconds (Rust's
/// `Instant` is CLOCK_MONOTONIC on Linux).
pub fn instant_ns(at: Instant) -> u64 {
    let ago = Instant::now().saturating_duration_since(at);
    monotonic_ns().saturating_sub(u64::try_from(ago.as_nanos()).unwrap_or(u64::MAX))
}

/// The line `ember boot` prints for the benchmark.
pub fn timings_line(first_run: Option<Instant>, ready: Option<Instant>) -> String {
    let ns = |t: Option<Instant>| t.map(instant_ns).unwrap_or(0);
    format!(
        "{TIMINGS_PREFIX} first_run_ns={} ready_ns={}",
        ns(first_run),
        ns(ready)
    )
}

fn parse_timings(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix(TIMINGS_PREFIX)?;
    let field = |key: &str| -> Option<u64> {
        rest.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    Some((field("first_run_ns")?, field("ready_ns")?))
}

/// One cold boot.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BootSample {
    /// Spawn of the `ember` process until the agent's ready line.
    pub ready_ms: f64,
    /// Spawn until the first KVM_RUN: the VMM's own share.
    pub vmm_ms: f64,
}

/// The result of `ember bench boot`.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// Boots measured.
    pub iterations: usize,
    /// vCPUs per VM.
    pub vcpus: u8,
    /// Guest memory.
    pub mem_mib: u32,
    /// Process spawn to agent ready.
    pub ready_ms: Stats,
    /// Process spawn to first KVM_RUN.
    pub vmm_ms: Stats,
    /// The guest's share: first KVM_RUN to agent ready.
    pub guest_ms: Stats,
    /// Every sample.
    pub samples: Vec<BootSample>,
}

impl BootReport {
    fn new(config: &VmConfig, samples: Vec<BootSample>) -> Self {
        BootReport {
            iterations: samples.len(),
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            ready_ms: Stats::of(samples.iter().map(|s| s.ready_ms)),
            vmm_ms: Stats::of(samples.iter().map(|s| s.vmm_ms)),
            guest_ms: Stats::of(samples.iter().map(|s| s.ready_ms - s.vmm_ms)),
            samples,
        }
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let vmm_share = if self.ready_ms.p50 > 0.0 {
            100.0 * self.vmm_ms.p50 / self.ready_ms.p50
        } else {
            0.0
        };
        format!(
            "cold boot, {} iterations, {} vCPU(s), {} MiB\n{}{}{}{}VMM share of boot (p50): {vmm_share:.3}%\n",
            self.iterations,
            self.vcpus,
            self.mem_mib,
            Stats::header("ms"),
            self.ready_ms.row("process start -> agent ready"),
            self.vmm_ms.row("process start -> first KVM_RUN"),
            self.guest_ms.row("first KVM_RUN -> agent ready"),
        )
    }
}

/// Boots `config` `iterations` times, each in a fresh `exe boot` process
/// whose agent powers off as soon as it is ready.
pub fn boot(exe: &Path, config: &VmConfig, iterations: u32) -> Result<BootReport, BenchError> {
    let mut samples = Vec::new();
    for i in 0..iterations {
        let sample = boot_once(exe, config)?;
        log::info!("boot {}: ready after {:.1} ms", i + 1, sample.ready_ms);
        samples.push(sample);
    }
    Ok(BootReport::new(config, samples))
}

fn boot_once(exe: &Path, config: &VmConfig) -> Result<BootSample, BenchError> {
    let mut cmd = Command::new(exe);
    cmd.arg("boot")
        .arg("--kernel")
        .arg(&config.kernel)
        .args(["--vcpus", &config.vcpus.to_string()])
        .args(["--mem-mib", &config.mem_mib.to_string()])
        .args(["--console", "/dev/null"])
        .arg(format!(
            "--cmdline-extra={} {}",
            config.cmdline_extra,
            ember_protocol::AgentMode::PowerOff.cmdline_param()
        ))
        .env(TIMINGS_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(initrd) = &config.initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    if let Some(drive) = &config.root_drive {
        cmd.arg("--root-drive").arg(drive);
    }
    let spawned_ns = monotonic_ns();
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(BenchError::Spawn)?;
    let mut timings = None;
    let mut stderr_tail = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(t) = parse_timings(&line) {
                timings = Some(t);
            } else {
                stderr_tail.push(line);
            }
        }
    }
    let status = child.wait().map_err(BenchError::Spawn)?;
    let elapsed = started.elapsed();
    let (first_run_ns, ready_ns) = match timings {
        Some((f, r)) if status.success() && f > 0 && r > 0 => (f, r),
        _ => {
            return Err(BenchError::Boot(format!(
                "{status} after {elapsed:?}: {}",
                stderr_tail.join(" / ")
            )))
        }
    };
    let ms = |ns: u64| Duration::from_nanos(ns.saturating_sub(spawned_ns)).as_secs_f64() * 1e3;
    Ok(BootSample {
        ready_ms: ms(ready_ns),
        vmm_ms: ms(first_run_ns),
    })
}

/// A benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The `ember` child could not be started or waited for.
    #[error("cannot run ember: {0}")]
    Spawn(std::io::Error),
    /// The child did not boot to agent ready and power off.
    #[error("boot did not reach the agent: {0}")]
    Boot(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_round_trip() {
        let now = Instant::now();
        let line = timings_line(Some(now), None);
        let (first, ready) = parse_timings(&line).unwrap();
        assert!(first > 0);
        assert_eq!(ready, 0);
        assert!(parse_timings("something else").is_none());
    }
}

/// The result of `ember bench restore`.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The snapshot restored.
    pub snapshot: String,
    /// Guest memory of each clone.
    pub mem_mib: u32,
    /// vCPUs of each clone.
    pub vcpus: u8,
    /// Clones measured.
    pub iterations: usize,
    /// Clones alive at once.
    pub concurrency: usize,
    /// Each clone ran in its own jailed worker process.
    pub isolated: bool,
    /// Restore request until the restored vCPUs run: every step.
    pub restore_ms: Stats,
    /// Of which the last part: the clone's threads started until its
    /// vCPUs run (what is left on a request's path when a clone is
    /// prepared ahead, [`Snapshot::prepare`]).
    pub start_ms: Stats,
    /// Restore request until the agent's first frame.
    pub agent_ms: Stats,
    /// Restore request until `true` has run and the clone is destroyed
    /// (VM fd closed, memory unmapped).
    pub e2e_ms: Stats,
    /// Host memory (PSS) per live clone beyond what the process had before,
    /// with `concurrency` clones connected and idle. Shared snapshot pages
    /// count once, divided among the clones mapping them.
    pub pss_kib_per_clone: f64,
    /// Private memory per live clone (anonymous pages: guest pages the
    /// clone wrote, VMM heap and stacks): its cost beyond the shared
    /// snapshot pages.
    pub private_kib_per_clone: f64,
    /// Baseline measured in the same run: opening `/dev/kvm`, creating an
    /// empty VM and one vCPU, and closing them (what every restore must at
    /// least pay).
    pub baseline_create_vm_ms: Stats,
    /// Median time of each restore step, in order (where `restore_ms` goes).
    pub restore_steps_p50_ms: Vec<(String, f64)>,
}

impl RestoreReport {
    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let ratio = if self.baseline_create_vm_ms.p50 > 0.0 {
            self.restore_ms.p50 / self.baseline_create_vm_ms.p50
        } else {
            0.0
        };
        let steps: String = self
            .restore_steps_p50_ms
            .iter()
            .map(|(name, ms)| format!("  {name:<34} {ms:>9.3}\n"))
            .collect();
        let step_sum: f64 = self.restore_steps_p50_ms.iter().map(|s| s.1).sum();
        format!(
            "restore {}{}: {} iterations, {} at once, {} vCPU(s), {} MiB\n{}{}{}{}{}{}per live clone: PSS {:.0} KiB, private {:.0} KiB\nrestore p50 / bare create-VM p50: {ratio:.2}x (same run)\nrestore steps (p50 of each, ms; they sum to {step_sum:.3}):\n{steps}",
            self.snapshot,
            if self.isolated { " (isolated workers)" } else { "" },
            self.iterations,
            self.concurrency,
            self.vcpus,
            self.mem_mib,
            Stats::header("ms"),
            self.restore_ms.row("restore (request -> vCPUs run)"),
            self.start_ms.row("  of which start (threads -> vCPUs run)"),
            self.agent_ms.row("agent (request -> first frame)"),
            self.e2e_ms.row("end to end (`true`, clone destroyed)"),
            self.baseline_create_vm_ms.row("baseline: create VM + vCPU"),
            self.pss_kib_per_clone,
            self.private_kib_per_clone,
        )
    }
}

/// This process's memory: (PSS, anonymous), in KiB.
pub fn own_memory_kib() -> Option<(u64, u64)> {
    process_memory_kib("self")
}

/// A process's memory (`pid` or `self`): (PSS, anonymous), in KiB.
fn process_memory_kib(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("Pss:")?, field("Anonymous:")?))
}

/// One clone's figures.
struct CloneSample {
    /// An isolated clone's worker memory (PSS, anonymous) while idle.
    worker_memory: Option<(u64, u64)>,
    restore_ms: f64,
    start_ms: f64,
    agent_ms: f64,
    e2e_ms: f64,
    steps: Vec<(&'static str, Duration)>,
}

/// Restores `snapshot` `iterations` times, `concurrency` clones at a time
/// (each on its own thread, all connected before any invokes), runs `true`
/// in each and tears it down.
pub fn restore(
    snapshot: &Snapshot,
    options: &RestoreOptions,
    iterations: usize,
    concurrency: usize,
) -> Result<RestoreReport, BenchError> {
    let concurrency = concurrency.clamp(1, iterations.max(1));
    let baseline = (0..iterations.clamp(5, 50))
        .map(|_| create_vm_baseline())
        .collect::<Result<Vec<_>, _>>()?;
    let mut samples = Vec::with_capacity(iterations);
    let mut pss_per_clone = Vec::new();
    let mut private_per_clone = Vec::new();
    let mut left = iterations;
    while left > 0 {
        let batch = left.min(concurrency);
        left -= batch;
        let before = own_memory_kib();
        let barrier = std::sync::Barrier::new(batch + 1);
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..batch)
                .map(|_| scope.spawn(|| restore_once(snapshot, options, &barrier)))
                .collect();
            barrier.wait();
            // Every clone is restored and connected (or has failed): this
            // is the memory of `batch` idle clones.
            let during = own_memory_kib();
            barrier.wait();
            let results = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(BenchError::Boot("clone thread panicked".into())))
                })
                .collect::<Vec<_>>();
            // In-process clones grow this process; isolated ones are
            // measured in their workers (where PSS divides the shared
            // snapshot pages among the workers mapping them).
            let workers: Vec<(u64, u64)> = results
                .iter()
                .filter_map(|r| r.as_ref().ok().and_then(|s| s.worker_memory))
                .collect();
            if !workers.is_empty() {
                let n = workers.len() as f64;
                pss_per_clone.push(workers.iter().map(|w| w.0 as f64).sum::<f64>() / n);
                private_per_clone.push(workers.iter().map(|w| w.1 as f64).sum::<f64>() / n);
            } else if let (Some(b), Some(d)) = (before, during) {
                pss_per_clone.push(d.0.saturating_sub(b.0) as f64 / batch as f64);
                private_per_clone.push(d.1.saturating_sub(b.1) as f64 / batch as f64);
            }
            results
        });
        for result in results {
            samples.push(result?);
        }
    }
    Ok(RestoreReport {
        snapshot: snapshot.dir().display().to_string(),
        mem_mib: snapshot.mem_mib(),
        vcpus: snapshot.vcpus(),
        iterations: samples.len(),
        concurrency,
        isolated: options.isolation.is_some(),
        restore_ms: Stats::of(samples.iter().map(|s| s.restore_ms)),
        start_ms: Stats::of(samples.iter().map(|s| s.start_ms)),
        agent_ms: Stats::of(samples.iter().map(|s| s.agent_ms)),
        e2e_ms: Stats::of(samples.iter().map(|s| s.e2e_ms)),
        pss_kib_per_clone: Stats::of(pss_per_clone).p50,
        private_kib_per_clone: Stats::of(private_per_clone).p50,
        baseline_create_vm_ms: Stats::of(baseline),
        restore_steps_p50_ms: step_medians(&samples),
    })
}

fn restore_once(
    snapshot: &Snapshot,
    options: &RestoreOptions,
    barrier: &std::sync::Barrier,
) -> Result<CloneSample, BenchError> {
    let sandbox = Sandbox::restore(snapshot, options);
    // Both barrier waits happen whatever the outcome, so no thread hangs.
    barrier.wait();
    let worker_memory = sandbox
        .as_ref()
        .ok()
        .and_then(Sandbox::worker_pid)
        .and_then(|pid| process_memory_kib(&pid.to_string()));
    barrier.wait();
    let mut sandbox = sandbox.map_err(|e| BenchError::Boot(e.to_string()))?;
    let ready = sandbox.ready_timings();
    let steps = sandbox
        .machine()
        .map(|m| m.times().steps.clone())
        .unwrap_or_default();
    let start = sandbox
        .machine()
        .and_then(|m| m.times().start_to_run())
        .unwrap_or_default();
    let invoke_started = Instant::now();
    let outcome = sandbox
        .invoke(&Invocation::new(["true"]))
        .map_err(|e| BenchError::Boot(e.to_string()))?;
    if outcome.status != crate::sandbox::ExitStatus::Code(0) {
        return Err(BenchError::Boot(format!(
            "`true` ended with {:?}",
            outcome.status
        )));
    }
    // Destroying the clone (closing the VM fd, unmapping its memory) is
    // part of the end-to-end figure.
    drop(sandbox);
    // The wait at the barriers is not the clone's time.
    let e2e = ready.ready + invoke_started.elapsed();
    Ok(CloneSample {
        worker_memory,
        restore_ms: ms(ready.start),
        start_ms: ms(start),
        agent_ms: ms(ready.agent),
        e2e_ms: ms(e2e),
        steps,
    })
}

/// The median of each named step across samples, in first-seen order.
fn step_medians(samples: &[CloneSample]) -> Vec<(String, f64)> {
    let mut names: Vec<&'static str> = Vec::new();
    for (name, _) in samples.iter().flat_map(|s| &s.steps) {
        if !names.contains(name) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            // A step that repeats (one per vCPU) counts as its total.
            let per_sample = samples.iter().map(|s| {
                s.steps
                    .iter()
                    .filter(|(n, _)| *n == name)
                    .map(|(_, d)| d.as_secs_f64() * 1e3)
                    .sum::<f64>()
            });
            (name.to_string(), Stats::of(per_sample).p50)
        })
        .collect()
}

/// Creates and destroys an empty VM with one vCPU: the floor under any
/// restore, measured on the same host in the same run.
fn create_vm_baseline() -> Result<f64, BenchError> {
    let started = Instant::now();
    let kvm = crate::vstate::kvm().map_err(|e| BenchError::Boot(e.to_string()))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| BenchError::Boot(e.to_string()))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| BenchError::Boot(e.to_string()))?;
    drop(vcpu);
    drop(vm);
    Ok(started.elapsed().as_secs_f64() * 1e3)
}
