//! Host cgroup limits for worker processes (and the jail pip runs in):
//! memory, CPU and process count.
//!
//! cgroup v2 is used when its controllers are available at
//! `/sys/fs/cgroup`; otherwise the v1 `memory`, `cpu` and `pids`
//! hierarchies, under the cgroup ember itself runs in. A host with neither
//! gets a warning, once: workers then run with rlimits only.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const ROOT: &str = "/sys/fs/cgroup";
/// CFS period for the CPU limit.
const CPU_PERIOD_US: u64 = 100_000;
/// Tasks (threads included) a worker may have.
const MAX_TASKS: u64 = 256;

#[derive(Debug, Clone)]
enum Layout {
    /// cgroup v2: the parent directory for worker groups.
    V2(PathBuf),
    /// cgroup v1: the parent directory in each of memory, cpu, pids.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

/// One worker's cgroups, removed on drop (after the worker is gone).
#[derive(Debug)]
pub struct WorkerCgroup {
    dirs: Vec<PathBuf>,
}

/// The limits of one worker.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory, guest RAM included.
    pub memory_bytes: u64,
    /// CPU bandwidth, in CPUs (the worker's vCPU count).
    pub cpus: u32,
}

fn layout() -> Option<&'static Layout> {
    static LAYOUT: OnceLock<Option<Layout>> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let found = detect();
            match &found {
                Some(Layout::V2(dir)) => log::debug!("worker cgroups: v2 under {}", dir.display()),
                Some(Layout::V1 { memory, .. }) => {
                    log::debug!("worker cgroups: v1 under {}", memory.display())
                }
                None => log::warn!(
                    "no usable cgroup memory/cpu controllers on this host: \
                     sandbox workers are limited by rlimits only"
                ),
            }
            found
        })
        .as_ref()
}

fn detect() -> Option<Layout> {
    let controllers = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"));
    if let Ok(controllers) = controllers {
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("cpu") && has("pids") {
            let parent = Path::new(ROOT).join("ember");
            let enable = "+memory +cpu +pids";
            let ok = std::fs::write(Path::new(ROOT).join("cgroup.subtree_control"), enable).is_ok()
                && std::fs::create_dir_all(&parent).is_ok()
                && std::fs::write(parent.join("cgroup.subtree_control"), enable).is_ok();
            return ok.then_some(Layout::V2(parent));
        }
    }
    // v1: create the workers' parent under our own group in each hierarchy.
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own_path = |controller: &str| -> Option<PathBuf> {
        let rel = own.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.trim_start_matches('/').to_string())
        })?;
        let dir = Path::new(ROOT)
            .join(controller)
            .join(rel)
            .join("ember-workers");
        std::fs::create_dir_all(&dir).ok()?;
        Some(dir)
    };
    Some(Layout::V1 {
        memory: own_path("memory")?,
        cpu: own_path("cpu")?,
        pids: own_path("pids")?,
    })
}

/// Memory charged to all workers' cgroups together (their parent's
/// usage: anonymous memory, page cache they brought in, and kernel memory
/// the host accounts to cgroups), in bytes; `None` without cgroups.
pub fn workers_memory_bytes() -> Option<u64> {
    let file = match layout()? {
        Layout::V2(dir) => dir.join("memory.current"),
        Layout::V1 { memory, .. } => memory.join("memory.usage_in_bytes"),
    };
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value)
}

/// A cgroup name no other worker of this host has: this process's PID and
/// a counter.
pub fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "worker-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl WorkerCgroup {
    /// Creates cgroups named `name` with `limits`, empty; `Ok(None)` when
    /// the host has no usable controllers. A process joins them through
    /// [`WorkerCgroup::procs_files`].
    pub fn create(name: &str, limits: Limits) -> std::io::Result<Option<Self>> {
        let Some(layout) = layout() else {
            return Ok(None);
        };
        let quota = u64::from(limits.cpus.max(1)) * CPU_PERIOD_US;
        // Removed again on drop if a step below fails.
        let mut group = WorkerCgroup { dirs: Vec::new() };
        let mut make = |parent: &Path| -> std::io::Result<PathBuf> {
            let dir = parent.join(name);
            if let Err(e) = std::fs::create_dir(&dir) {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
                // Left by an ember that was killed before it could remove
                // it (names are per pid, and pids come round again): an
                // empty group is removed and made anew; a populated one
                // refuses and the error stands.
                std::fs::remove_dir(&dir)?;
                std::fs::create_dir(&dir)?;
            }
            group.dirs.push(dir.clone());
            Ok(dir)
        };
        match layout {
            Layout::V2(parent) => {
                let dir = make(parent)?;
                write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                write(&dir, "memory.swap.max", "0").ok();
                write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir, "pids.max", &MAX_TASKS.to_string())?;
            }
            Layout::V1 { memory, cpu, pids } => {
                let dir = make(memory)?;
                write(
                    &dir,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?;
                let dir = make(cpu)?;
                write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
                let dir = make(pids)?;
                write(&dir, "pids.max", &MAX_TASKS.to_string())?;
            }
        }
        Ok(Some(group))
    }

    /// The groups' `cgroup.procs` files, open for writing: a process that
    /// writes `0` to each joins the groups, and every process and thread
    /// it starts from then on is born in them.
    pub fn procs_files(&self) -> std::io::Result<Vec<File>> {
        self.dirs
            .iter()
            .map(|dir| {
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
            })
            .collect()
    }

    /// The processes in the groups.
    fn tasks(&self) -> Vec<libc::pid_t> {
        let mut pids: Vec<libc::pid_t> = self
            .dirs
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .filter(|pid| *pid > 0)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The cgroup directories (for tests and diagnostics).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        // The owner drops this after reaping the worker, but its jailed
        // child may still be dying (or, if something went wrong, running):
        // nothing of the worker outlives its handle.
        for _ in 0..50 {
            let left = self.tasks();
            if left.is_empty() {
                break;
            }
            for pid in left {
                // SAFETY: kill takes integers; a task that has exited
                // meanwhile makes it fail harmlessly.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        for dir in self.dirs.iter().rev() {
            // Fails while a task is still inside: the owner drops this only
            // after reaping the worker.
            if let Err(e) = std::fs::remove_dir(dir) {
                log::debug!("cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
}
