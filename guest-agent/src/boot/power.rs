//! Ending the guest.
//!
//! The guest has no ACPI. Its kernel runs with `reboot=k`, so a restart goes
//! through the i8042 reset line (port 0x64), which ember's VMM takes as the
//! end of the VM, as Firecracker does. "Power off" is therefore a reboot
//! system call.

use std::io;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::boot::reaper::{self, Children};
use crate::{console, sys, POWER_OFF_LINE};

/// How long processes get to exit on SIGTERM before SIGKILL. The wait ends
/// as soon as the last child is gone, so a guest with nothing left running
/// (the usual case) does not wait at all.
const GRACE: Duration = Duration::from_secs(1);

/// Powering off failed; the agent is still running.
#[derive(Debug, Error)]
pub(crate) enum PowerError {
    #[error("reboot(RB_AUTOBOOT): {source}")]
    Reboot { source: io::Error },
    #[error("kill(-1, {signal}): {source}")]
    Kill {
        signal: &'static str,
        source: io::Error,
    },
}

/// Prints [`POWER_OFF_LINE`], ends every process, syncs and resets the
/// guest. Returns only if the reset itself failed.
pub(crate) fn power_off() -> PowerError {
    console::raw(POWER_OFF_LINE);
    // Flush before anything is killed, in case ending them goes wrong...
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    terminate_all();
    // ...and again for what the processes wrote while handling SIGTERM.
    // SAFETY: as above.
    unsafe { libc::sync() };
    // SAFETY: RB_AUTOBOOT takes no argument; on success the call does not
    // return (the guest resets, or, inside a PID namespace, this process is
    // ended).
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    PowerError::Reboot {
        source: sys::last_error(),
    }
}

/// SIGTERM to every process, a grace period that ends when the last child
/// exits, then SIGKILL to the rest. Failures are reported and skipped: the
/// reset that follows ends everything anyway.
fn terminate_all() {
    // kill(-1) reaches every process but PID 1 itself (and kernel threads).
    // SAFETY: sending a signal has no memory-safety preconditions.
    if unsafe { libc::kill(-1, libc::SIGTERM) } != 0 {
        // ESRCH: there is no other process, so nothing to wait for.
        if sys::errno() != libc::ESRCH {
            console::error(&kill_error(libc::SIGTERM));
        }
        return;
    }
    let deadline = Instant::now() + GRACE;
    loop {
        match reaper::reap(|_, _| {}) {
            Ok(Children::None) => return,
            Ok(Children::Running) => {}
            Err(err) => {
                console::error(&err);
                break;
            }
        }
        match reaper::wait_for_child(deadline) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => {
                console::error(&err);
                break;
            }
        }
    }
    // SAFETY: as above.
    if unsafe { libc::kill(-1, libc::SIGKILL) } != 0 && sys::errno() != libc::ESRCH {
        console::error(&kill_error(libc::SIGKILL));
    }
}

fn kill_error(signo: libc::c_int) -> PowerError {
    PowerError::Kill {
        signal: sys::signal_name(signo),
        source: sys::last_error(),
    }
}
