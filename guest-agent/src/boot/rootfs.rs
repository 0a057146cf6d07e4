//! Switching from the initramfs to the root drive
//! ([`CMDLINE_ROOT`](crate::CMDLINE_ROOT), e.g. `ember.root=/dev/vda`).
//!
//! Right after the basic mounts (see [`init`](crate::boot::init)), the agent
//! mounts the drive read-only as ext4 on [`NEW_ROOT`], mounts fresh tmpfs
//! file systems on its `/tmp` (1777), `/run` (0755) and `/var/tmp` (1777),
//! so that every write stays private to the guest and the drive is never
//! written, moves `/dev`, `/proc` and `/sys` (with what is mounted under
//! them: `/dev/pts`, `/dev/shm`, the cgroup2 hierarchy) into it, and makes
//! it the root like `switch_root` does: `chdir` into it,
//! `mount(".", "/", MS_MOVE)`, `chroot(".")`, `chdir("/")`. The agent stays
//! PID 1; it runs from memory, so nothing of the initramfs is needed any
//! more (its files stay in memory, unreachable; not worth the system calls
//! to delete).
//!
//! Everything after the switch (work directories under `/tmp`, the
//! function directory under `/run`, programs on the `PATH`) is then the
//! drive's. The drive must have the mount points `/dev`, `/proc`, `/sys`,
//! `/tmp` and `/run` (`/var/tmp` is optional). If a step fails before the
//! switch, what was done is undone and the agent keeps serving from the
//! initramfs, after saying why on the console.
//!
//! Twelve system calls, none of them per file.

use std::ffi::{CStr, CString};
use std::io;

use thiserror::Error;

use crate::sys;

/// Test-only: a block device to use as the root drive as if the kernel
/// command line named it (`EMBER_AGENT_TEST_ROOT=/dev/loop3`), for tests
/// that run the agent as PID 1 of a PID namespace on a host. Honoured only
/// there, like [`ENV_TEST_LISTEN`](crate::ENV_TEST_LISTEN).
pub const ENV_TEST_ROOT: &str = "EMBER_AGENT_TEST_ROOT";

/// Where the drive is mounted before it becomes the root.
pub(crate) const NEW_ROOT: &CStr = c"/ember-root";

/// What failed.
#[derive(Debug, Error)]
pub(crate) enum RootError {
    #[error("root drive {device}: {step}: {source}; serving from the initramfs")]
    Undone {
        device: String,
        step: String,
        source: io::Error,
    },
    #[error("root drive {device}: {step}: {source}; the root file system may be unusable")]
    Late {
        device: String,
        step: String,
        source: io::Error,
    },
}

/// The root device a test asked for, outside a real guest.
pub(crate) fn test_device() -> Option<String> {
    let value = std::env::var(ENV_TEST_ROOT)
        .ok()
        .filter(|v| !v.is_empty())?;
    if crate::serve::server::in_initial_pid_namespace() {
        return None;
    }
    Some(value)
}

/// One step to take back if a later one fails.
enum Undo {
    Unmount(CString),
    /// Move the mount at `.0` back to `.1`.
    MoveBack(CString, &'static CStr),
}

/// Mounts `device` and makes it the root. On `Err(Undone)` the initramfs
/// is still the root, with its mounts where they were. Returns warnings
/// about what was left out.
pub(crate) fn switch_root(device: &str) -> Result<Vec<String>, RootError> {
    let mut undo = Vec::new();
    let result = switch(device, &mut undo);
    if let Err(RootError::Undone { .. }) = &result {
        for step in undo.iter().rev() {
            // Best effort: these undo what just succeeded.
            // SAFETY: NUL-terminated paths; no data pointer.
            unsafe {
                match step {
                    Undo::Unmount(target) => {
                        libc::umount2(target.as_ptr(), libc::MNT_DETACH);
                    }
                    Undo::MoveBack(from, to) => {
                        libc::mount(
                            from.as_ptr(),
                            to.as_ptr(),
                            std::ptr::null(),
                            libc::MS_MOVE,
                            std::ptr::null(),
                        );
                    }
                }
            }
        }
    }
    result
}

fn switch(device: &str, undo: &mut Vec<Undo>) -> Result<Vec<String>, RootError> {
    let undone = |step: &str, source: io::Error| RootError::Undone {
        device: device.to_owned(),
        step: step.to_owned(),
        source,
    };
    let late = |step: &str, source: io::Error| RootError::Late {
        device: device.to_owned(),
        step: step.to_owned(),
        source,
    };
    let new_root = NEW_ROOT.to_string_lossy();
    let under =
        |path: &str| sys::cstring(format!("{new_root}{path}")).map_err(|err| undone("path", err));
    let source = sys::cstring(device).map_err(|err| undone("device name", err))?;

    // SAFETY: NUL-terminated path.
    if unsafe { libc::mkdir(NEW_ROOT.as_ptr(), 0o755) } != 0 && sys::errno() != libc::EEXIST {
        return Err(undone(&format!("mkdir {new_root}"), sys::last_error()));
    }
    mount(
        &source,
        NEW_ROOT,
        Some(c"ext4"),
        libc::MS_RDONLY | libc::MS_NOATIME,
        None,
    )
    .map_err(|err| undone(&format!("mount it read-only as ext4 on {new_root}"), err))?;
    undo.push(Undo::Unmount(NEW_ROOT.to_owned()));

    let mut warnings = Vec::new();
    for (path, mode, required) in [
        ("/tmp", c"mode=1777", true),
        ("/run", c"mode=0755", true),
        ("/var/tmp", c"mode=1777", false),
    ] {
        let target = under(path)?;
        match mount(
            c"tmpfs",
            &target,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(mode),
        ) {
            Ok(()) => undo.push(Undo::Unmount(target)),
            Err(err) if required => {
                return Err(undone(&format!("mount a tmpfs on its {path}"), err));
            }
            Err(err) => warnings.push(format!(
                "root drive {device}: no tmpfs on its {path} ({err}): it stays read-only"
            )),
        }
    }

    for from in [c"/dev", c"/proc", c"/sys"] {
        let path = from.to_string_lossy();
        let target = under(&path)?;
        mount(from, &target, None, libc::MS_MOVE, None)
            .map_err(|err| undone(&format!("move {path} into it"), err))?;
        undo.push(Undo::MoveBack(target, from));
    }

    // SAFETY: NUL-terminated path.
    if unsafe { libc::chdir(NEW_ROOT.as_ptr()) } != 0 {
        return Err(undone(&format!("chdir {new_root}"), sys::last_error()));
    }
    if let Err(err) = mount(c".", c"/", None, libc::MS_MOVE, None) {
        // SAFETY: NUL-terminated path.
        unsafe { libc::chdir(c"/".as_ptr()) };
        return Err(undone("move it onto /", err));
    }
    // SAFETY: NUL-terminated path.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(late("chroot", sys::last_error()));
    }
    // SAFETY: NUL-terminated path.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(late("chdir /", sys::last_error()));
    }
    Ok(warnings)
}

fn mount(
    source: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    // SAFETY: NUL-terminated strings or null pointers; mount(2) keeps no
    // reference to them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(sys::last_error())
    }
}
