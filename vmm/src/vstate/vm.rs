//! The KVM VM: memory slots, the in-kernel interrupt controllers, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64 as arch;

/// A KVM VM and what was set up on it.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and its architectural fixtures (TSS, identity map).
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        arch::setup_vm(&fd).map_err(|e| VmError::Arch(e.to_string()))?;
        Ok(Vm { fd })
    }

    /// Registers every region of `mem` as a KVM memory slot.
    ///
    /// Must come before [`Vm::create_irqchip`]: on PVM hosts the first slot
    /// registered after the irqchip costs ~7 ms instead of 0.1 ms.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory(e.to_string()))?;
            let slot = u32::try_from(slot).map_err(|_| VmError::Memory("too many slots".into()))?;
            let descriptor = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region's host mapping is owned by `mem`, which the
            // caller keeps alive for as long as the VM exists (Machine holds
            // both and drops the VM first).
            unsafe { self.fd.set_user_memory_region(descriptor) }.map_err(VmError::SetMemory)?;
        }
        Ok(())
    }

    /// Creates the in-kernel PIC, IOAPIC and LAPICs, and the PIT.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::Pit)
    }

    /// Makes writes to `event` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|e| VmError::Irqfd(gsi, e))
    }

    /// The raw VM fd, for vCPU creation.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

/// The VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("cannot create the KVM VM: {0}")]
    Create(kvm_ioctls::Error),
    /// Architectural VM setup failed.
    #[error("cannot set up the VM: {0}")]
    Arch(String),
    /// Guest memory is not usable as a memory slot.
    #[error("guest memory: {0}")]
    Memory(String),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory with KVM: {0}")]
    SetMemory(kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("cannot create the in-kernel irqchip: {0}")]
    Irqchip(kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("cannot route an irqfd to GSI {0}: {1}")]
    Irqfd(u32, kvm_ioctls::Error),
}
