//! Why a microVM stopped, and how its threads tell the owner.
//!
//! vCPU threads and devices report the first reason the VM must end; the
//! owner blocks on an eventfd until one arrives. Later reports are dropped:
//! the first cause is the one worth telling.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The reason a microVM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042 controller: with
    /// `reboot=k` this is how the guest powers off (there are no reboots in
    /// a microVM).
    Reset,
    /// KVM reported a system event (shutdown/reset/crash).
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*` type.
        kind: u32,
    },
    /// The guest triple-faulted.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// KVM failed to run a vCPU, or the guest did something KVM cannot
    /// handle (on PVM hosts: an instruction the emulator cannot execute).
    Failed {
        /// The vCPU concerned.
        vcpu: u8,
        /// What happened, with the guest RIP when known.
        message: String,
    },
    /// The owner asked the VM to stop.
    Stopped,
}

impl VmExit {
    /// Whether the guest ended on its own terms (power off), as opposed to
    /// a crash or an error.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::Stopped)
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest powered off"),
            VmExit::SystemEvent { kind } => write!(f, "guest system event {kind}"),
            VmExit::TripleFault { vcpu } => write!(f, "guest triple fault on vCPU {vcpu}"),
            VmExit::Failed { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            VmExit::Stopped => write!(f, "stopped by the VMM"),
        }
    }
}

/// Something with waiters that must wake when the VM stops, so nobody
/// waits for what cannot come (a console line, a doorbell ring). Devices
/// implement it; this module knows none of them.
pub trait WakeOnExit: Send + Sync + std::fmt::Debug {
    /// The VM stopped: wake every waiter.
    fn vm_stopped(&self);
}

/// A one-shot, first-wins report of why the VM must stop.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
    /// What to wake when the VM stops.
    wake: Mutex<Vec<Arc<dyn WakeOnExit>>>,
}

impl ExitSignal {
    /// A signal that has not fired.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
            wake: Mutex::new(Vec::new()),
        })
    }

    /// Records `exit` unless a reason was already recorded, and wakes the
    /// owner.
    pub fn report(&self, exit: VmExit) {
        let mut reason = lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
            // An eventfd write fails only when the counter would overflow,
            // which a single writer cannot cause.
            let _ = self.event.write(1);
            for waiter in lock(&self.wake).iter() {
                waiter.vm_stopped();
            }
        }
    }

    /// Wakes the waiters of `waiter` when the VM stops.
    pub fn wake_on_exit(&self, waiter: Arc<dyn WakeOnExit>) {
        lock(&self.wake).push(waiter);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        lock(&self.reason).clone()
    }

    /// The eventfd that becomes readable once a reason is recorded.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// Locks `mutex`, recovering from poisoning: the data is a plain record a
/// panicking holder cannot leave half-written.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_report_wins() {
        let signal = ExitSignal::new().unwrap();
        assert_eq!(signal.reason(), None);
        signal.report(VmExit::Reset);
        signal.report(VmExit::TripleFault { vcpu: 1 });
        assert_eq!(signal.reason(), Some(VmExit::Reset));
        assert_eq!(signal.event().read().unwrap(), 1);
    }
}
