//! How to run sandboxes isolated, each in a jailed worker process
//! ([`crate::worker`]): a setting of restores ([`crate::snapshot`]) and of
//! the pool, kept below both so that the snapshot layer need not import the
//! workers that use it.

use std::path::PathBuf;

use crate::jail::IdRange;

/// How to run isolated workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The `ember` binary (it has the hidden worker subcommand).
    pub worker_exe: PathBuf,
    /// The uids/gids workers run as: each live worker has its own.
    pub ids: IdRange,
    /// Put each worker in its own cgroups (memory, CPU, tasks).
    pub cgroups: bool,
    /// The worker's memory limit (guest RAM included); by default its
    /// guest's RAM plus 64 MiB for the VMM.
    pub memory_limit_bytes: Option<u64>,
    /// Test hook: the worker writes lines meant to pass for the parent's
    /// own log lines (and terminal escapes) to its stderr, to prove the
    /// parent shows them only escaped and prefixed.
    #[doc(hidden)]
    pub forge_stderr: bool,
    /// Test hook: the worker makes a forbidden system call once its
    /// filters are in place, to prove a violation kills it (and only it).
    #[doc(hidden)]
    pub violate_seccomp: bool,
}

/// The hidden subcommand of the `ember` binary that runs a worker (a
/// jailed pip run is one too, in its own mode).
pub const WORKER_SUBCOMMAND: &str = "__worker";

/// The environment variable naming the `ember` binary that jailed workers
/// run, for programs that use the library without being `ember` themselves.
pub const WORKER_EXE_ENV: &str = "EMBER_WORKER_EXE";

/// The `ember` binary a default [`Isolation`] starts workers from:
/// [`WORKER_EXE_ENV`] if set; this very program if it is `ember`; an
/// `ember` next to it or one directory up (cargo's `target/debug/deps`
/// test and bench binaries); else `ember` from `PATH`.
pub fn default_worker_exe() -> PathBuf {
    if let Some(exe) = std::env::var_os(WORKER_EXE_ENV) {
        return exe.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "ember") {
            return exe;
        }
        let beside = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("ember"))
            .find(|candidate| candidate.is_file());
        if let Some(found) = beside {
            return found;
        }
    }
    PathBuf::from("ember")
}

impl Default for Isolation {
    /// Workers from [`default_worker_exe`], with the default jail: what the
    /// library's options use unless in-process is chosen explicitly.
    fn default() -> Self {
        Isolation::new(default_worker_exe())
    }
}

impl Isolation {
    /// Isolation with `worker_exe` and the default jail.
    pub fn new(worker_exe: impl Into<PathBuf>) -> Self {
        Isolation {
            worker_exe: worker_exe.into(),
            ids: IdRange::default(),
            cgroups: true,
            memory_limit_bytes: None,
            forge_stderr: false,
            violate_seccomp: false,
        }
    }
}
