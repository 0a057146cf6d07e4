//! One cgroup v2 per invocation, so that the whole invocation, including a
//! process that double-forked or called `setsid`, can be killed at once
//! (`cgroup.kill`) and its peak memory read (`memory.peak`).
//!
//! `init` mounts the cgroup2 hierarchy on [`CGROUP_ROOT`]; this module only
//! turns the memory controller on for the children of the root and creates,
//! kills and removes `inv-<n>` groups under it.
//!
//! In ember's test guests making a group costs about 45 ms and removing one
//! about 30 ms (memory cgroup setup and teardown is a lot of emulated
//! kernel work), so neither happens between a request and its answer.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use thiserror::Error;

use crate::sys;

/// Where init mounts the cgroup2 hierarchy.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

const SUBTREE_CONTROL: &CStr = c"/sys/fs/cgroup/cgroup.subtree_control";

/// Setting up or using a cgroup failed.
#[derive(Debug, Error)]
pub(crate) enum CgroupError {
    #[error("cgroup2 is not usable at {CGROUP_ROOT} ({source}); invocations are killed by process group only, so a process that leaves its group can outlive its invocation")]
    Unavailable { source: io::Error },
    #[error("create cgroup {path}: {source}")]
    Create { path: String, source: io::Error },
    #[error("open the control files of {path}: {source}")]
    Files { path: String, source: io::Error },
}

/// Whether invocations get a cgroup, and what it can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cgroups {
    /// cgroup2 is mounted at [`CGROUP_ROOT`] and groups can be made.
    pub(crate) enabled: bool,
    /// The memory controller is on for the groups (so `memory.peak` exists).
    pub(crate) memory: bool,
}

impl Cgroups {
    /// No cgroups: invocations are killed by process group.
    pub(crate) const DISABLED: Cgroups = Cgroups {
        enabled: false,
        memory: false,
    };

    /// Turns on the memory controller for the root's children (three system
    /// calls, once at boot). Any cgroup2 mount has `cgroup.subtree_control`,
    /// so failing to open it means there is no usable hierarchy.
    ///
    /// Only the memory controller: `memory.peak` is all the agent reads, and
    /// each controller adds kernel work to every group created.
    pub(crate) fn setup() -> Result<Cgroups, CgroupError> {
        let fd = sys::open(SUBTREE_CONTROL, libc::O_WRONLY, 0)
            .map_err(|source| CgroupError::Unavailable { source })?;
        // Fails when the kernel has no memory controller, or (in a test
        // namespace rooted at a non-root group) when the group has members;
        // groups work without it, memory.peak just is not there.
        let memory = sys::write_all(fd.as_raw_fd(), b"+memory").is_ok();
        Ok(Cgroups {
            enabled: true,
            memory,
        })
    }
}

/// One invocation's cgroup, with the control files the invocation path
/// uses opened ahead of time: groups are made before they are needed (at
/// boot, so a snapshot holds one ready, and after each invocation), which
/// leaves one `write` to kill the group and one `pread` for its peak memory
/// on the path that counts.
#[derive(Debug)]
pub(crate) struct InvocationCgroup {
    /// `/sys/fs/cgroup/inv-<n>`.
    dir: String,
    /// `cgroup.procs`, for the child to move itself in with.
    procs: OwnedFd,
    /// `cgroup.kill`.
    kill: OwnedFd,
    /// `memory.peak`, when the memory controller is on.
    peak: Option<OwnedFd>,
    /// Times removal found the group busy.
    busy: u8,
}

impl InvocationCgroup {
    /// Creates `/sys/fs/cgroup/inv-<n>`, trying the next `n` while the name
    /// is taken, and opens its control files.
    pub(crate) fn create(cgroups: Cgroups, n: &mut u64) -> Result<InvocationCgroup, CgroupError> {
        Self::create_named(cgroups, "inv", n)
    }

    /// Creates `/sys/fs/cgroup/<prefix>-<n>`, likewise.
    pub(crate) fn create_named(
        cgroups: Cgroups,
        prefix: &str,
        n: &mut u64,
    ) -> Result<InvocationCgroup, CgroupError> {
        let mut attempts = 0;
        let dir = loop {
            let dir = format!("{CGROUP_ROOT}/{prefix}-{n}");
            let path = sys::cstring(dir.as_str()).map_err(|source| CgroupError::Create {
                path: dir.clone(),
                source,
            })?;
            // SAFETY: `path` is NUL-terminated.
            if unsafe { libc::mkdir(path.as_ptr(), 0o755) } == 0 {
                break dir;
            }
            let source = sys::last_error();
            attempts += 1;
            if source.raw_os_error() != Some(libc::EEXIST) || attempts >= 64 {
                return Err(CgroupError::Create { path: dir, source });
            }
            *n += 1;
        };
        let open =
            |name: &CStr, flags| file(&dir, name).and_then(|path| sys::open(&path, flags, 0));
        let fds = open(c"cgroup.procs", libc::O_WRONLY)
            .and_then(|procs| Ok((procs, open(c"cgroup.kill", libc::O_WRONLY)?)));
        match fds {
            Ok((procs, kill)) => Ok(InvocationCgroup {
                peak: cgroups
                    .memory
                    .then(|| open(c"memory.peak", libc::O_RDONLY).ok())
                    .flatten(),
                dir,
                procs,
                kill,
                busy: 0,
            }),
            Err(source) => {
                rmdir(&dir);
                Err(CgroupError::Files { path: dir, source })
            }
        }
    }

    /// `cgroup.procs`, open for writing.
    pub(crate) fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// SIGKILLs every process in the group (`cgroup.kill`, Linux 5.14+).
    pub(crate) fn kill(&self) -> io::Result<()> {
        sys::write_all(self.kill.as_raw_fd(), b"1")
    }

    /// The group's peak memory use in KiB, if the memory controller is on.
    pub(crate) fn peak_kib(&self) -> Option<u64> {
        let fd = self.peak.as_ref()?;
        let mut buf = [0u8; 32];
        // SAFETY: `buf` is writable for its length. pread at 0: the file
        // may have been read before.
        let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let text = buf.get(..usize::try_from(n).ok()?)?;
        let bytes: u64 = std::str::from_utf8(text).ok()?.trim().parse().ok()?;
        Some(bytes / 1024)
    }

    /// Removes the group; returns it back if it is still busy (a killed
    /// process that has not finished exiting) and worth another try.
    pub(crate) fn try_remove(mut self) -> Result<(), InvocationCgroup> {
        match sys::cstring(self.dir.as_str()) {
            // SAFETY: `path` is NUL-terminated.
            Ok(path) if unsafe { libc::rmdir(path.as_ptr()) } == 0 => Ok(()),
            // A process stuck exiting for several invocations: give up on
            // the group rather than retry for ever.
            Ok(_) if sys::errno() == libc::EBUSY && self.busy < 3 => {
                self.busy += 1;
                Err(self)
            }
            // Anything else (gone already, ...) will not get better.
            _ => Ok(()),
        }
    }
}

fn file(dir: &str, name: &CStr) -> io::Result<CString> {
    let mut path = Vec::with_capacity(dir.len() + 1 + name.count_bytes());
    path.extend_from_slice(dir.as_bytes());
    path.push(b'/');
    path.extend_from_slice(name.to_bytes());
    sys::cstring(path)
}

fn rmdir(dir: &str) {
    if let Ok(path) = sys::cstring(dir) {
        // SAFETY: `path` is NUL-terminated.
        unsafe { libc::rmdir(path.as_ptr()) };
    }
}
