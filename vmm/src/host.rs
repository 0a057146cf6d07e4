//! What kind of KVM this host offers, and what a guest needs to run on it.
//!
//! ember runs on two kinds of `/dev/kvm`: hardware virtualization (VMX/SVM),
//! and the nested "PVM" module whose guest kernel mode is run by an
//! instruction emulator. The second cannot hide CPU features through CPUID
//! and cannot execute some instructions in guest kernel mode, so the guest
//! kernel has to be told on its command line (see `shared/PLATFORM.md`).

use std::path::Path;

/// The flavour of KVM behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HostKind {
    /// Hardware-assisted KVM (Intel VMX or AMD SVM).
    Kvm,
    /// The `kvm_pvm` module: guest user mode runs natively, guest kernel
    /// mode is emulated, and CPUID leaves 0x1, 0x7 and 0xD are forced to
    /// host values.
    Pvm,
}

impl HostKind {
    /// Detects the host kind from the loaded kernel modules (once per
    /// process: modules do not change under a running VMM's feet).
    pub fn detect() -> Self {
        static KIND: std::sync::OnceLock<HostKind> = std::sync::OnceLock::new();
        *KIND.get_or_init(|| Self::from_sysfs(Path::new("/sys/module")))
    }

    fn from_sysfs(modules: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Kvm
        }
    }
}

/// Guest kernel parameters a PVM host needs (see `shared/PLATFORM.md`).
///
/// PVM forces CPUID leaves 0x1, 0x7 and 0xD to host values, so features
/// whose instructions its CPL0 emulator cannot run must be switched off on
/// the command line; the `ember_*` switches enable our kernel patch.
const PVM_GUEST_PARAMS: &[&str] = &[
    // XSAVE/XRSTOR/XGETBV are not emulated; FXSAVE is.
    "noxsave",
    // POPCNT, CLAC/STAC and INVPCID are not emulated; without ERMS/FSRM
    // the kernel copies with `rep movsq`, ~8x cheaper than `rep movsb` here.
    "clearcpuid=popcnt,smap,erms,fsrm,invpcid",
    // Paranoid entry with FSGSBASE uses LSL/RDPID.
    "nofsgsbase",
    // A restored clone would replay every TSC-deadline tick it missed.
    "lapic=notscdeadline",
    // Restoring the async-PF MSR injects an expensive "wake all".
    "no-kvmapf",
    // The three behaviours our kernel patch fixes (kernel-config/).
    "ember_skip_int3_selftest",
    "ember_syscall_fault",
    "ember_skip_fpu_fwait",
];

impl HostKind {
    /// Extra guest kernel parameters this host needs; none on hardware KVM.
    pub fn guest_params(self) -> &'static [&'static str] {
        match self {
            HostKind::Kvm => &[],
            HostKind::Pvm => PVM_GUEST_PARAMS,
        }
    }
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostKind::Kvm => "hardware KVM",
            HostKind::Pvm => "PVM (nested, emulated guest kernel mode)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_from_its_module() {
        let dir = std::env::temp_dir().join(format!("ember-host-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(HostKind::from_sysfs(&dir), HostKind::Kvm);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(HostKind::from_sysfs(&dir), HostKind::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hardware_kvm_needs_no_parameters() {
        assert!(HostKind::Kvm.guest_params().is_empty());
        assert!(HostKind::Pvm.guest_params().contains(&"noxsave"));
        assert!(HostKind::Pvm
            .guest_params()
            .contains(&"ember_syscall_fault"));
    }
}
