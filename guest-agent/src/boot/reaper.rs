//! Signals to PID 1 and reaping of every process that ends up its child.
//!
//! The signals the agent acts on are blocked and taken synchronously: with
//! `sigwaitinfo` when there is nothing else to wait for, and through a
//! signalfd in the server's event loop. Either way no handler runs in the
//! middle of other code and nothing polls.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::sys;

/// Signals that ask PID 1 to power off: what busybox `reboot` (SIGTERM),
/// `halt` (SIGUSR1) and `poweroff` (SIGUSR2) send to init.
pub(crate) const POWER_OFF_SIGNALS: [libc::c_int; 3] =
    [libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2];

/// A signal or wait operation failed.
#[derive(Debug, Error)]
pub(crate) enum ReaperError {
    #[error("block signals: {source}")]
    Block { source: io::Error },
    #[error("wait for signals: {source}")]
    Wait { source: io::Error },
    #[error("reap children: {source}")]
    Reap { source: io::Error },
    #[error("signalfd: {source}")]
    SignalFd { source: io::Error },
}

/// What woke the agent up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// At least one child changed state: reap.
    Child,
    /// A request to power off, with the signal that carried it.
    PowerOff(libc::c_int),
}

/// The agent's signals, blocked so that they wait to be taken by [`wait`].
///
/// [`wait`]: Signals::wait
pub(crate) struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGCHLD and the power-off signals for the (only) thread.
    /// Done first thing, so a signal that arrives during setup stays pending
    /// instead of being dropped.
    pub(crate) fn block() -> Result<Self, ReaperError> {
        let [term, usr1, usr2] = POWER_OFF_SIGNALS;
        let set = sigset(&[libc::SIGCHLD, term, usr1, usr2]);
        // SAFETY: `set` is an initialised signal set; no old mask is asked for.
        let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(ReaperError::Block {
                source: sys::last_error(),
            });
        }
        Ok(Signals { set })
    }

    /// A non-blocking signalfd that reads the agent's signals, for an event
    /// loop. The signals stay blocked, so `wait` and the power-off path
    /// keep working alongside it.
    pub(crate) fn signalfd(&self) -> Result<OwnedFd, ReaperError> {
        // SAFETY: `self.set` is an initialised signal set; -1 asks for a new
        // descriptor.
        let fd = unsafe { libc::signalfd(-1, &self.set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        sys::owned(fd).map_err(|source| ReaperError::SignalFd { source })
    }

    /// Blocks until one of the agent's signals is pending and takes it.
    pub(crate) fn wait(&self) -> Result<Event, ReaperError> {
        loop {
            // SAFETY: `self.set` is an initialised signal set; no siginfo is
            // asked for.
            let signo = unsafe { libc::sigwaitinfo(&self.set, std::ptr::null_mut()) };
            if signo == libc::SIGCHLD {
                return Ok(Event::Child);
            }
            if signo > 0 {
                return Ok(Event::PowerOff(signo));
            }
            // EINTR: a stop/continue by a tracer; just wait again.
            if sys::errno() != libc::EINTR {
                return Err(ReaperError::Wait {
                    source: sys::last_error(),
                });
            }
        }
    }
}

/// Whether any child is left after reaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Children {
    /// Some children are still running.
    Running,
    /// No child is left (and so, for PID 1, no user process at all).
    None,
}

/// Takes every pending signal from a signalfd made by
/// [`Signals::signalfd`]: whether SIGCHLD was among them, and the first
/// power-off signal, if any.
pub(crate) fn read_signalfd(fd: &OwnedFd) -> Result<(bool, Option<libc::c_int>), ReaperError> {
    // SAFETY: signalfd_siginfo is plain integers; all-zero is valid.
    let mut infos: [libc::signalfd_siginfo; 8] = unsafe { std::mem::zeroed() };
    let mut child = false;
    let mut power_off = None;
    loop {
        // SAFETY: `infos` is writable for its whole size.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                infos.as_mut_ptr().cast(),
                std::mem::size_of_val(&infos),
            )
        };
        if n < 0 {
            return match sys::errno() {
                libc::EINTR => continue,
                libc::EAGAIN => Ok((child, power_off)),
                _ => Err(ReaperError::Wait {
                    source: sys::last_error(),
                }),
            };
        }
        let count = n.unsigned_abs() / std::mem::size_of::<libc::signalfd_siginfo>();
        for info in infos.iter().take(count) {
            let signo = libc::c_int::try_from(info.ssi_signo).unwrap_or(0);
            if signo == libc::SIGCHLD {
                child = true;
            } else if POWER_OFF_SIGNALS.contains(&signo) && power_off.is_none() {
                power_off = Some(signo);
            }
        }
        // A short read means the queue is empty: save the EAGAIN call.
        if count < infos.len() {
            return Ok((child, power_off));
        }
    }
}

/// Reaps every child that has exited, without blocking, and calls
/// `on_exit(pid, wait_status)` for each.
pub(crate) fn reap(
    mut on_exit: impl FnMut(libc::pid_t, libc::c_int),
) -> Result<Children, ReaperError> {
    reap_with_usage(|pid, status, _| on_exit(pid, status))
}

/// [`reap`], also handing over each child's resource usage (`wait4`, the
/// same one system call as `waitpid`).
pub(crate) fn reap_with_usage(
    mut on_exit: impl FnMut(libc::pid_t, libc::c_int, &libc::rusage),
) -> Result<Children, ReaperError> {
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain integers; all-zero is valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `usage` are valid places for the kernel to
        // store into; WNOHANG keeps the call from blocking.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
        match pid {
            0 => return Ok(Children::Running),
            pid if pid > 0 => on_exit(pid, status, &usage),
            _ => {
                return match sys::errno() {
                    libc::ECHILD => Ok(Children::None),
                    libc::EINTR => continue,
                    _ => Err(ReaperError::Reap {
                        source: sys::last_error(),
                    }),
                }
            }
        }
    }
}

/// Waits until a child exits or `deadline` passes; returns whether SIGCHLD
/// came. SIGCHLD must be blocked (see [`Signals::block`]).
pub(crate) fn wait_for_child(deadline: Instant) -> Result<bool, ReaperError> {
    let set = sigset(&[libc::SIGCHLD]);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let timeout = timespec(left);
        // SAFETY: `set` and `timeout` are initialised; no siginfo is asked for.
        let signo = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if signo > 0 {
            return Ok(true);
        }
        match sys::errno() {
            libc::EAGAIN => return Ok(false),
            libc::EINTR => continue,
            _ => {
                return Err(ReaperError::Wait {
                    source: sys::last_error(),
                })
            }
        }
    }
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole set; sigaddset only fails
    // for invalid signal numbers, and these are libc's constants.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for &signo in signals {
            libc::sigaddset(set.as_mut_ptr(), signo);
        }
        set.assume_init()
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 1e9; c_long is 64 bits on every target ember supports.
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    }
}
