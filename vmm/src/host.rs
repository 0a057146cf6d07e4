//! What kind of KVM this host offers, and what a guest needs to run on it.
//!
//! ember runs on two kinds of `/dev/kvm`: hardware virtualization (VMX/SVM),
//! and the nested "PVM" module whose guest kernel mode is run by an
//! instruction emulator. The second cannot hide CPU features through CPUID
//! and cannot execute some instructions in guest kernel mode, so the guest
//! kernel has to be told on its command line (see `shared/PLATFORM.md`).

use std::path::Path;

/// The flavour of KVM behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware-assisted KVM (Intel VMX or AMD SVM).
    Kvm,
    /// The `kvm_pvm` module: guest user mode runs natively, guest kernel
    /// mode is emulated, and CPUID leaves 0x1, 0x7 and 0xD are forced to
    /// host values.
    Pvm,
}

impl HostKind {
    /// Detects the host kind from the loaded kernel modules.
    pub fn detect() -> Self {
        Self::from_sysfs(Path::new("/sys/module"))
    }

    fn from_sysfs(modules: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Kvm
        }
    }
}
