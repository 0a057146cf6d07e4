//! Model-specific registers a vCPU boots with.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// Errors setting the boot MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list does not fit a `kvm_msrs` structure.
    #[error("cannot build the MSR list: {0}")]
    Build(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("cannot set MSRs: {0}")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM stopped at an MSR it does not accept.
    #[error("KVM set only {set} of {total} boot MSRs; it refused MSR {rejected:#x}")]
    Partial {
        /// How many MSRs KVM set.
        set: usize,
        /// How many were asked for.
        total: usize,
        /// The first MSR KVM refused.
        rejected: u32,
    },
}

/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `IA32_STAR`: SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `IA32_LSTAR`: 64-bit SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `IA32_CSTAR`: compatibility-mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `IA32_FMASK`: RFLAGS mask for SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `IA32_KERNEL_GS_BASE`: the GS base SWAPGS swaps in.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE` bit 0: fast string operations (`rep movs/stos`).
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// `IA32_MTRR_DEF_TYPE` bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back, for `IA32_MTRR_DEF_TYPE` bits 7..0.
pub const MTRR_MEM_TYPE_WB: u64 = 6;

/// The MSRs and values a vCPU boots with: the system call entry MSRs
/// cleared (the kernel sets them up), fast strings enabled (Linux picks
/// `rep movs/stos` memcpy/memset from it, much cheaper on an emulated
/// kernel), and MTRRs on with write-back as the default memory type, so
/// the guest does not run all of RAM uncached.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Sets [`boot_msr_entries`] on `vcpu`. `KVM_SET_MSRS` stops at the first
/// MSR it refuses and returns how many it set, so a short count is an
/// error naming that MSR.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            total: entries.len(),
            rejected: entries.get(set).map_or(0, |e| e.index),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;

    use super::*;

    #[test]
    fn entries() {
        let entries = boot_msr_entries();
        assert_eq!(entries.len(), 10);
        let get = |index| entries.iter().find(|e| e.index == index).unwrap().data;
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(MSR_LSTAR), 0);
    }

    #[test]
    fn on_kvm() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_msrs(&vcpu).unwrap();

        let entries = boot_msr_entries();
        let mut msrs = Msrs::from_entries(
            &entries
                .iter()
                .map(|e| kvm_msr_entry {
                    index: e.index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), entries.len());
        for (got, want) in msrs.as_slice().iter().zip(&entries) {
            assert_eq!(got.index, want.index);
            // MISC_ENABLE has bits KVM sets on its own; ours must be among them.
            assert_eq!(got.data & want.data, want.data, "MSR {:#x}", want.index);
        }
    }
}
