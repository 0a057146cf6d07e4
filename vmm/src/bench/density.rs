//! The density benchmark: how much host memory one idle warm clone of a
//! function costs when a server holds many of them.
//!
//! It builds the server's own [`FunctionSet`] around one function with a
//! minimum of `count` warm clones (each in its jailed worker unless
//! in-process), lets it make them ([`FunctionSet::top_up`]), and measures
//! the host twice: with the clones made and never invoked, and after each
//! has served one invocation and been reset (the steady state of a busy
//! server). Two figures per clone, each the difference from before the
//! clones were made divided by their number:
//!
//! - PSS of this process and every process under it (the workers and
//!   their jailed children): each page counted once over the processes
//!   sharing it, the template's page cache included;
//! - the growth of the workers' cgroups' memory (jailed clones only):
//!   anonymous memory, page cache the workers brought in first, and the
//!   kernel memory the host accounts to cgroups (page tables, KVM's
//!   allocations that are charged);
//! - the drop in the host's `MemAvailable`: counts all kernel memory the
//!   clones cost (KVM's shadow page tables included), but anything else
//!   running on the host moves it too (0 when it rose).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::function::{Function, FunctionError, FunctionInvokeOptions};
use crate::isolation::Isolation;
use crate::server::functions::{FunctionSet, FunctionSetConfig};
use crate::server::ServerError;

/// What can stop the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum DensityError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("the function has no hot path, so the server does not keep warm clones of it")]
    NoHotPath,
    #[error("only {made} of {wanted} warm clones could be made (see the warnings above)")]
    TooFew { made: usize, wanted: usize },
    #[error("invocation {0} of a warm clone: {1}")]
    Invoke(usize, FunctionError),
    #[error("invocation {0} of a warm clone was not kept for reuse")]
    NotReused(usize),
    #[error("cannot read the host's memory figures from /proc")]
    Proc,
}

/// Host memory per clone, in KiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerClone {
    /// PSS of this process tree, per clone.
    pub pss_kib: f64,
    /// Growth of the workers' cgroups' memory, per clone (`None`:
    /// in-process, or no cgroups).
    pub cgroup_kib: Option<f64>,
    /// Drop of `MemAvailable`, per clone.
    pub mem_available_kib: f64,
}

/// The benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct DensityReport {
    /// Clones held.
    pub clones: usize,
    /// Whether each ran in a jailed worker.
    pub jailed: bool,
    /// Processes in this tree while they were held.
    pub processes: usize,
    /// Wall time to make them all (start of `top_up` -> all idle).
    pub make_s: f64,
    /// Made, never invoked.
    pub made: PerClone,
    /// After one invocation each, reset and idle again.
    pub invoked: PerClone,
    /// PSS of this process before any clone (KiB).
    pub baseline_pss_kib: u64,
}

impl DensityReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The report as a table.
    pub fn to_table(&self) -> String {
        let mib = |kib: f64| kib / 1024.0;
        let cell = |kib: Option<f64>| kib.map_or("-".to_string(), |k| format!("{:.2}", mib(k)));
        format!(
            "{n} idle warm clones of one function held by one server's function set ({how}; \
             {procs} processes)\n\
             made in {make:.1} s (top-up start -> {n} idle: {per:.0} ms per clone, one at a time)\n\
             host memory per idle clone (difference from before any clone / {n}):\n\
             {h:<42} {p:>8} {c:>16} {a:>20}\n\
             {r1:<42} {p1:>8.2} {c1:>16} {a1:>20.2}\n\
             {r2:<42} {p2:>8.2} {c2:>16} {a2:>20.2}\n",
            n = self.clones,
            how = if self.jailed {
                "each in its jailed worker"
            } else {
                "in-process"
            },
            procs = self.processes,
            make = self.make_s,
            per = self.make_s * 1000.0 / self.clones.max(1) as f64,
            h = "(MiB)",
            p = "PSS",
            c = "workers' cgroups",
            a = "MemAvailable drop",
            c1 = cell(self.made.cgroup_kib),
            c2 = cell(self.invoked.cgroup_kib),
            r1 = "made, never invoked",
            p1 = mib(self.made.pss_kib),
            a1 = mib(self.made.mem_available_kib),
            r2 = "after one invocation each (reset, idle)",
            p2 = mib(self.invoked.pss_kib),
            a2 = mib(self.invoked.mem_available_kib),
        )
    }
}

/// A snapshot of the host's memory figures.
struct HostMemory {
    tree_pss_kib: u64,
    processes: usize,
    cgroup_kib: Option<u64>,
    mem_available_kib: u64,
}

impl HostMemory {
    fn now() -> Result<Self, DensityError> {
        let (tree_pss_kib, processes) = tree_pss_kib();
        Ok(HostMemory {
            tree_pss_kib,
            processes,
            cgroup_kib: crate::worker::cgroup::workers_memory_bytes().map(|b| b >> 10),
            mem_available_kib: mem_available_kib().ok_or(DensityError::Proc)?,
        })
    }

    fn per_clone(&self, before: &HostMemory, clones: usize) -> PerClone {
        let n = clones.max(1) as f64;
        PerClone {
            pss_kib: self.tree_pss_kib.saturating_sub(before.tree_pss_kib) as f64 / n,
            cgroup_kib: match (self.cgroup_kib, before.cgroup_kib) {
                (Some(now), Some(then)) => Some(now.saturating_sub(then) as f64 / n),
                _ => None,
            },
            mem_available_kib: before
                .mem_available_kib
                .saturating_sub(self.mem_available_kib) as f64
                / n,
        }
    }
}

/// Holds `count` warm clones of `function` (jailed unless `isolation` is
/// `None`), invokes each once with `event`, and reports the memory.
pub fn run(
    name: &str,
    function: Function,
    count: usize,
    isolation: Option<Isolation>,
    event: &[u8],
) -> Result<DensityReport, DensityError> {
    if function.manifest().hot_path.is_none() {
        return Err(DensityError::NoHotPath);
    }
    let jailed = isolation.is_some();
    let dir = function.snapshot().dir().to_path_buf();
    let config = FunctionSetConfig {
        max_live: 1,
        max_idle: count,
        min_warm_per_function: count,
        idle_timeout: Duration::from_secs(24 * 3600),
        isolation: isolation.clone(),
        ..FunctionSetConfig::default()
    };
    let set = Arc::new(FunctionSet::new(
        vec![(name.to_string(), dir, function)],
        config,
    )?);
    settle();
    let before = HostMemory::now()?;
    let started = Instant::now();
    let made = set.top_up();
    let make_s = started.elapsed().as_secs_f64();
    if made < count {
        return Err(DensityError::TooFew {
            made,
            wanted: count,
        });
    }
    settle();
    let after_make = HostMemory::now()?;
    let served = set.get(name).ok_or(DensityError::Proc)?;
    // Oldest first, so each invocation takes a clone not yet invoked (an
    // invoked one goes back as the most recent).
    let options = FunctionInvokeOptions {
        isolation,
        ..FunctionInvokeOptions::default()
    };
    for i in 0..count {
        let clone = set.lease_oldest(&served).ok_or(DensityError::TooFew {
            made: i,
            wanted: count,
        })?;
        let outcome = set
            .invoke_in(&served, (clone, Duration::ZERO), event, &options, None)
            .map_err(|e| DensityError::Invoke(i, e))?;
        if !outcome.recycle.is_some_and(|r| r.reused) {
            return Err(DensityError::NotReused(i));
        }
    }
    settle();
    let after_invoke = HostMemory::now()?;
    let report = DensityReport {
        clones: count,
        jailed,
        processes: after_invoke.processes,
        make_s,
        made: after_make.per_clone(&before, count),
        invoked: after_invoke.per_clone(&before, count),
        baseline_pss_kib: before.tree_pss_kib,
    };
    drop(set);
    Ok(report)
}

/// Lets freed memory and exited processes show in /proc.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// PSS of this process and all its descendants (KiB), and how many they
/// are.
fn tree_pss_kib() -> (u64, usize) {
    let me = std::process::id();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = parent_of(pid) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![me];
    let mut at = 0;
    while let Some(&pid) = tree.get(at) {
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == pid)
                .map(|(p, _)| *p),
        );
        at += 1;
    }
    let pss = tree.iter().filter_map(|pid| pss_kib(*pid)).sum();
    (pss, tree.len())
}

/// A process's parent, from `/proc/PID/stat` (the field after the
/// command, which may itself hold spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss:")
}

fn mem_available_kib() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// `NAME   1234 kB` in a /proc text.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_and_parents_parse() {
        assert_eq!(
            kib_field("Rss:  10 kB\nPss:   7 kB\n", "Pss:"),
            Some(7),
            "the field, not one it starts like"
        );
        assert_eq!(kib_field("Pss: x kB\n", "Pss:"), None);
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        let (pss, processes) = tree_pss_kib();
        assert!(pss > 0 && processes >= 1);
    }
}
