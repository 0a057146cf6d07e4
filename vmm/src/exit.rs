//! Why a microVM stopped, and how its threads tell the owner.
//!
//! vCPU threads and devices report the first reason the VM must end; the
//! owner blocks on an eventfd until one arrives. Later reports are dropped:
//! the first cause is the one worth telling.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::lock;
use crate::devices::doorbell::Doorbell;
use crate::devices::legacy::LineWatch;

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

/// A one-shot, first-wins report of why the VM must stop.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
    /// Console watches to close when the VM stops, so nobody waits for a
    /// line that cannot come.
    watches: Mutex<Vec<Arc<LineWatch>>>,
    /// The hot-path doorbell, whose waiters must wake when the VM stops.
    doorbell: Mutex<Option<Arc<Doorbell>>>,
}

impl ExitSignal {
    /// A signal that has not fired.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
            watches: Mutex::new(Vec::new()),
            doorbell: Mutex::new(None),
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
            for watch in lock(&self.watches).iter() {
                watch.close();
            }
            if let Some(bell) = lock(&self.doorbell).as_ref() {
                bell.wake();
            }
        }
    }

    /// Wakes the waiters of `doorbell` when the VM stops.
    pub fn wake_on_exit(&self, doorbell: Arc<Doorbell>) {
        *lock(&self.doorbell) = Some(doorbell);
    }

    /// Closes `watch` when the VM stops.
    pub fn close_on_exit(&self, watch: Arc<LineWatch>) {
        lock(&self.watches).push(watch);
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
