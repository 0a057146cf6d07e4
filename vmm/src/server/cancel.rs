//! Cancelling a function invocation whose client went away: the jailed
//! worker running it is killed (so its clone is never reused) and the
//! invocation's slot frees as soon as the blocking call sees the worker
//! gone. The library's own handle ([`Cancel::token`], given to the
//! invocation) is cancelled too: it stops an in-process clone, and ends a
//! jailed invocation's wait for its worker at once.
//!
//! The worker is named by a pidfd opened while the server still holds the
//! worker's handle (so it cannot have been reaped and its PID reused): a
//! signal through it reaches that process or nobody.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::function::InvocationCancel;

#[derive(Debug, Default)]
struct State {
    cancelled: bool,
    worker: Option<OwnedFd>,
}

/// One invocation's cancellation: armed with its worker while it runs.
#[derive(Debug, Default)]
pub struct Cancel {
    state: Mutex<State>,
    token: InvocationCancel,
}

impl Cancel {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The invocation runs in worker `pid` from now on (the caller holds
    /// the worker's handle, unreaped). Returns false (and kills it) if the
    /// invocation was cancelled already.
    pub fn arm(&self, pid: u32) -> bool {
        let fd = pidfd_open(pid);
        let mut state = self.lock();
        if state.cancelled {
            if let Some(fd) = &fd {
                kill(fd);
            }
            return false;
        }
        state.worker = fd;
        true
    }

    /// The invocation's call returned: its worker is no longer ours to
    /// kill. Returns whether the invocation was cancelled meanwhile (its
    /// worker may have been killed after the call returned, so its clone
    /// must not be kept for another invocation).
    pub fn disarm(&self) -> bool {
        let mut state = self.lock();
        state.worker = None;
        state.cancelled
    }

    /// The library's handle on the invocation, for
    /// [`crate::function::FunctionInvokeOptions::cancel`].
    pub fn token(&self) -> InvocationCancel {
        self.token.clone()
    }

    /// Cancels the invocation: its worker, if it runs in one now, is
    /// killed (and an in-process clone stopped). Returns whether a worker
    /// was killed.
    pub fn cancel(&self) -> bool {
        let killed = {
            let mut state = self.lock();
            state.cancelled = true;
            match state.worker.take() {
                Some(fd) => {
                    kill(&fd);
                    true
                }
                None => false,
            }
        };
        self.token.cancel();
        killed
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }
}

/// Cancels the invocation when the request's future (or the task that
/// streams its answer) is dropped before it finished: the client went
/// away. Set to `None` once the invocation ended.
pub(super) struct CancelOnDrop(pub(super) Option<Arc<Cancel>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            cancel.cancel();
        }
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes integers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` is a fresh pidfd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn kill(fd: &OwnedFd) {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags; a
    // process that exited already gives ESRCH, which is fine.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that would run for a minute.
    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_cancelled_invocation_kills_its_worker_whenever_it_is_armed() {
        let mut child = sleeper();
        let cancel = Cancel::default();
        assert!(cancel.arm(child.id()));
        assert!(cancel.cancel());
        assert!(cancel.is_cancelled());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));

        // Cancelled before it was armed: killed when armed.
        let mut child = sleeper();
        let cancel = Cancel::default();
        assert!(!cancel.cancel());
        assert!(!cancel.arm(child.id()));
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));

        // Disarmed: nothing to kill.
        let cancel = Cancel::default();
        assert!(cancel.arm(std::process::id()));
        assert!(!cancel.disarm());
        assert!(!cancel.cancel());
        // Cancelled while armed: disarming says so (the clone is not kept).
        let mut child = sleeper();
        let cancel = Cancel::default();
        assert!(cancel.arm(child.id()));
        assert!(cancel.cancel());
        assert!(cancel.disarm());
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
