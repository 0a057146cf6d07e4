//! Early guest setup: file systems, console, hostname.
//!
//! Every step is tried whatever the others did, and failures are collected
//! rather than fatal: a guest without, say, `/dev/shm` is still worth
//! reporting ready and debugging.

use std::ffi::CStr;
use std::io;

use thiserror::Error;

use crate::{sys, HOSTNAME};

/// A setup step that failed.
#[derive(Debug, Error)]
pub(crate) enum InitError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: String,
        source: io::Error,
    },
    #[error("create mount point {path}: {source}")]
    MountPoint { path: String, source: io::Error },
    #[error("open /dev/console as stdin/stdout/stderr: {source}")]
    Console { source: io::Error },
    #[error("set hostname to {HOSTNAME:?}: {source}")]
    Hostname { source: io::Error },
}

/// One file system the guest needs.
struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: &'static CStr,
    /// Create the mount point before mounting instead of after a failed
    /// try: a fresh devtmpfs never has `pts` or `shm`, so trying first would
    /// only add a failing system call.
    mkdir_first: bool,
}

/// In order: `/dev` first, because the later ones live under it and the
/// console may have to be opened from it.
const MOUNTS: [Mount; 7] = [
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: libc::MS_NOSUID,
        data: c"mode=0755",
        mkdir_first: false,
    },
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: c"",
        mkdir_first: false,
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: c"",
        mkdir_first: false,
    },
    // After sysfs, which provides the mount point (with CONFIG_CGROUPS).
    // Invocations each get a group in it (see cgroup.rs).
    Mount {
        source: c"cgroup2",
        target: c"/sys/fs/cgroup",
        fstype: c"cgroup2",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: c"",
        mkdir_first: false,
    },
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: c"mode=0620,ptmxmode=0666",
        mkdir_first: true,
    },
    Mount {
        source: c"shm",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=1777",
        mkdir_first: true,
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=1777",
        mkdir_first: false,
    },
];

/// Mounts the basic file systems, makes sure stdio is the console and sets
/// the hostname. Returns what failed, for the caller to report once the
/// console is usable.
pub(crate) fn setup() -> Vec<InitError> {
    let mut errors = Vec::new();
    for mount in &MOUNTS {
        if let Err(err) = mount_one(mount) {
            errors.push(err);
        }
    }
    // After the mounts: if the kernel found no /dev/console in the image,
    // devtmpfs brings one.
    if let Err(err) = ensure_console() {
        errors.push(err);
    }
    if let Err(err) = set_hostname() {
        errors.push(err);
    }
    errors
}

fn mount_one(m: &Mount) -> Result<(), InitError> {
    if m.mkdir_first {
        make_mount_point(m.target)?;
    }
    match try_mount(m) {
        Ok(()) => Ok(()),
        // The same file system is already mounted there (a kernel that
        // mounts devtmpfs itself, or a restarted agent): that is the goal.
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) && !m.mkdir_first => {
            make_mount_point(m.target)?;
            try_mount(m).map_err(|source| mount_error(m, source))
        }
        Err(source) => Err(mount_error(m, source)),
    }
}

fn try_mount(m: &Mount) -> io::Result<()> {
    let data = if m.data.is_empty() {
        std::ptr::null()
    } else {
        m.data.as_ptr().cast()
    };
    // SAFETY: every string is a NUL-terminated literal and `data` is either
    // null or one of them; mount(2) reads them and keeps no reference.
    let rc = unsafe {
        libc::mount(
            m.source.as_ptr(),
            m.target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            data,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(sys::last_error())
    }
}

fn mount_error(m: &Mount, source: io::Error) -> InitError {
    InitError::Mount {
        fstype: m.fstype.to_string_lossy().into_owned(),
        target: m.target.to_string_lossy().into_owned(),
        source,
    }
}

fn make_mount_point(path: &CStr) -> Result<(), InitError> {
    // SAFETY: `path` is a NUL-terminated string.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } == 0 || sys::errno() == libc::EEXIST {
        return Ok(());
    }
    Err(InitError::MountPoint {
        path: path.to_string_lossy().into_owned(),
        source: sys::last_error(),
    })
}

/// The kernel opens `/dev/console` as fds 0, 1 and 2 before it runs
/// `/init`, unless the image has no such node. Only in that case do the work.
fn ensure_console() -> Result<(), InitError> {
    // SAFETY: F_GETFD only queries the descriptor table; on a closed fd it
    // fails with EBADF and changes nothing.
    if unsafe { libc::fcntl(libc::STDIN_FILENO, libc::F_GETFD) } != -1 {
        return Ok(());
    }
    // No O_CLOEXEC: stdio must survive into the programs the agent starts.
    // O_NOCTTY: PID 1 must not take the console as its controlling tty, or
    // a hangup or ^C there would reach it.
    // SAFETY: the path is a NUL-terminated literal.
    let fd = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return Err(InitError::Console {
            source: sys::last_error(),
        });
    }
    for target in 0..=2 {
        // SAFETY: `fd` is open; dup2 onto 0..=2 replaces whatever was there,
        // which is what we want for stdio.
        if fd != target && unsafe { libc::dup2(fd, target) } < 0 {
            return Err(InitError::Console {
                source: sys::last_error(),
            });
        }
    }
    if fd > 2 {
        // SAFETY: `fd` is a spare copy of the console, now duplicated onto
        // 0..=2, and closed once.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn set_hostname() -> Result<(), InitError> {
    // SAFETY: the pointer and length describe the bytes of a &'static str.
    let rc = unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(InitError::Hostname {
            source: sys::last_error(),
        })
    }
}
