//! x86_64 specifics: the guest memory layout and everything the VMM writes
//! into guest memory or into a vCPU before the kernel's first instruction.
//!
//! Order of calls for a cold boot (restore needs none of this but
//! [`setup_vm`]):
//!
//! 1. `kvm.create_vm()`, then [`setup_vm`] (before any vCPU exists).
//! 2. Guest memory from [`layout::ram_regions`] (after
//!    [`layout::validate_mem_size`]), registered with KVM *before* the
//!    in-kernel irqchip is created (see `shared/PLATFORM.md`); then the
//!    irqchip.
//! 3. Load the kernel (and the initrd at [`layout::initrd_load_addr`]),
//!    pick [`BootEntry::from_loader_result`], then [`configure_system`] once.
//! 4. [`supported_cpuid`] once, then for each vCPU: `vm.create_vcpu(id)`
//!    and [`configure_vcpu`].

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod state;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use vm_memory::GuestMemoryMmap;

use crate::host::HostKind;

pub use boot::{configure_boot, BootEntry, BootError, InitrdRegion};
pub use cpuid::{build_cpuid, set_cpuid, supported_cpuid, CpuidError, MAX_VCPUS};
pub use gdt::GdtError;
pub use interrupts::{set_lint, InterruptError};
pub use layout::LayoutError;
pub use mptable::{setup_mptable, MptableError};
pub use msr::{setup_msrs, MsrError};
pub use regs::{setup_fpu, setup_regs, setup_sregs, RegsError};

/// Any error of the x86_64 setup.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("cannot set the KVM TSS address: {0}")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("cannot set the KVM identity map address: {0}")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    /// Memory layout error.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Boot information error.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// MP table error.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// CPUID error.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// MSR error.
    #[error(transparent)]
    Msr(#[from] MsrError),
    /// Register setup error.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// Descriptor table error.
    #[error(transparent)]
    Gdt(#[from] GdtError),
    /// Local APIC error.
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
}

/// Sets the VM-wide x86 state KVM needs before the first vCPU is created:
/// the addresses of the TSS and identity-map page KVM uses to emulate real
/// mode on Intel, both inside the MMIO gap so they never shadow RAM or a
/// device. Does not create the irqchip: register guest memory first.
pub fn setup_vm(vm: &VmFd) -> Result<(), ArchError> {
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(ArchError::SetIdentityMap)?;
    // u64 -> usize is lossless on x86_64.
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(ArchError::SetTssAddress)
}

/// Writes the VM-wide boot structures into guest memory: the command line
/// and boot information (see [`configure_boot`]) and the MP table for
/// `vcpu_count` vCPUs. Call once, after the kernel and initrd are loaded.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    entry: &BootEntry,
    cmdline: &Cmdline,
    initrd: Option<&InitrdRegion>,
    setup_header: Option<&setup_header>,
    vcpu_count: u8,
) -> Result<(), ArchError> {
    configure_boot(mem, entry, cmdline, initrd, setup_header)?;
    setup_mptable(mem, vcpu_count)?;
    Ok(())
}

/// Prepares vCPU `vcpu_id` (of `vcpu_count`) to enter the kernel at
/// `entry`: CPUID (built from `supported_cpuid`, see [`build_cpuid`]),
/// boot MSRs, general, special and FPU registers (writing the boot GDT,
/// IDT and page tables into `mem`) and the LAPIC's LINT0/LINT1.
///
/// Needs the in-kernel irqchip to exist (for the LAPIC). Application
/// processors get the same state; KVM holds them in wait-for-SIPI until the
/// boot processor starts them, which resets their registers.
pub fn configure_vcpu(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    supported_cpuid: &CpuId,
    vcpu_id: u8,
    vcpu_count: u8,
    host: HostKind,
    entry: &BootEntry,
) -> Result<(), ArchError> {
    let cpuid = build_cpuid(supported_cpuid, vcpu_id, vcpu_count, host)?;
    set_cpuid(vcpu, &cpuid)?;
    setup_msrs(vcpu)?;
    setup_regs(vcpu, entry)?;
    setup_sregs(mem, vcpu, entry)?;
    setup_fpu(vcpu)?;
    set_lint(vcpu)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;
    use linux_loader::cmdline::Cmdline;
    use vm_memory::GuestAddress;

    use super::*;

    /// The whole sequence on a real VM with two vCPUs, in the documented order.
    #[test]
    fn boot_setup_on_kvm() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        setup_vm(&vm).unwrap();

        let mem_size = 64 << 20;
        layout::validate_mem_size(mem_size).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&layout::ram_regions(mem_size)).unwrap();
        // Guest memory is not registered with KVM here: nothing runs.
        vm.create_irq_chip().unwrap();

        let entry = BootEntry::Pvh {
            entry: GuestAddress(0x100_0000),
        };
        let initrd = InitrdRegion {
            addr: layout::initrd_load_addr(&mem, 0x10_0000, GuestAddress(0x200_0000)).unwrap(),
            size: 0x10_0000,
        };
        let cmdline = Cmdline::try_from("console=ttyS0", layout::CMDLINE_MAX_SIZE).unwrap();
        configure_system(&mem, &entry, &cmdline, Some(&initrd), None, 2).unwrap();

        let supported = supported_cpuid(&kvm).unwrap();
        for id in 0..2u8 {
            let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
            configure_vcpu(&mem, &vcpu, &supported, id, 2, HostKind::detect(), &entry).unwrap();
            assert_eq!(vcpu.get_regs().unwrap().rip, 0x100_0000);
        }
    }

    /// The boot state is runnable: the vCPU executes a few instructions at
    /// the entry point (through the identity page tables for Linux64) and
    /// exits on their port write with the boot pointer register intact.
    #[test]
    fn first_instructions_run_on_kvm() {
        use kvm_bindings::kvm_userspace_memory_region;
        use kvm_ioctls::VcpuExit;
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

        // mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt -- same bytes in 32- and 64-bit mode.
        const CODE: [u8; 8] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4];
        let kvm = Kvm::new().unwrap();
        let supported = supported_cpuid(&kvm).unwrap();
        for entry in [
            BootEntry::Pvh {
                entry: GuestAddress(layout::HIMEM_START),
            },
            BootEntry::Linux64 {
                entry: GuestAddress(layout::HIMEM_START),
            },
        ] {
            let vm = kvm.create_vm().unwrap();
            setup_vm(&vm).unwrap();
            let mem =
                GuestMemoryMmap::from_ranges(&layout::ram_regions(layout::MIN_MEM_SIZE)).unwrap();
            for (slot, region) in mem.iter().enumerate() {
                let host = mem.get_host_address(region.start_addr()).unwrap();
                let region = kvm_userspace_memory_region {
                    slot: slot as u32,
                    guest_phys_addr: region.start_addr().0,
                    memory_size: region.len(),
                    userspace_addr: host as u64,
                    flags: 0,
                };
                // SAFETY: the region is a live mapping owned by `mem`, which
                // outlives the VM (both are dropped at the end of this iteration, VM first).
                unsafe { vm.set_user_memory_region(region).unwrap() };
            }
            vm.create_irq_chip().unwrap();
            mem.write_slice(&CODE, GuestAddress(layout::HIMEM_START))
                .unwrap();
            let cmdline = Cmdline::try_from("console=ttyS0", 64).unwrap();
            configure_system(&mem, &entry, &cmdline, None, None, 1).unwrap();

            let mut vcpu = vm.create_vcpu(0).unwrap();
            configure_vcpu(&mem, &vcpu, &supported, 0, 1, HostKind::detect(), &entry).unwrap();
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0x3f8, &b"A"[..])),
                other => panic!("{entry:?}: unexpected exit {other:?}"),
            }
            let regs = vcpu.get_regs().unwrap();
            assert_eq!(regs.rip, layout::HIMEM_START + 7, "{entry:?}");
            match entry {
                BootEntry::Pvh { .. } => assert_eq!(regs.rbx, layout::PVH_INFO_START),
                BootEntry::Linux64 { .. } => assert_eq!(regs.rsi, layout::ZERO_PAGE_START),
            }
            drop(vcpu);
            drop(vm);
        }
    }
}
