//! The KVM VM: memory slots, the in-kernel interrupt controllers, irqfds.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::arch::x86_64 as arch;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Bits of a dirty bitmap: one per 4 KiB page, 64 to a word.
pub const PAGES_PER_WORD: u64 = 64;

/// A KVM VM and what was set up on it.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    /// Guest writes are logged (manual-protect mode) for in-place resets.
    dirty_log: bool,
}

impl Vm {
    /// Creates the VM and its architectural fixtures (TSS, identity map).
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        arch::setup_vm(&fd).map_err(|e| VmError::Arch(e.to_string()))?;
        Ok(Vm {
            fd,
            dirty_log: false,
        })
    }

    /// Logs the pages the guest writes from now on, in manual-protect
    /// mode: reading the log does not write-protect anything, clearing it
    /// re-protects only the pages cleared, so a reset costs what the guest
    /// dirtied, not what it has mapped. Must come before
    /// [`Vm::register_memory`].
    pub fn enable_dirty_log(&mut self) -> Result<(), VmError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        // Without KVM_DIRTY_LOG_INITIALLY_SET: a slot starts clean.
        cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        self.fd.enable_cap(&cap).map_err(VmError::DirtyLog)?;
        self.dirty_log = true;
        Ok(())
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
                flags: if self.dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
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

    /// Drops and re-adds every memory slot of `mem`: KVM then discards
    /// every mapping it built for them, shadow page tables included. A
    /// host that shadows the guest's page tables (no EPT/NPT) only notices
    /// the guest's own writes to them; after the VMM rewrote guest page
    /// tables behind KVM's back, this is what makes KVM read them afresh.
    /// The slots come back with empty dirty logs.
    pub fn reregister_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = u32::try_from(slot).map_err(|_| VmError::Memory("too many slots".into()))?;
            let descriptor = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: 0,
                userspace_addr: 0,
            };
            // SAFETY: a zero size deletes the slot; no host memory is named.
            unsafe { self.fd.set_user_memory_region(descriptor) }.map_err(VmError::SetMemory)?;
        }
        self.register_memory(mem)
    }

    /// The pages of slot `slot` (`pages` long) the guest wrote since the
    /// log was last cleared: one bit per page. Nothing is re-protected.
    pub fn dirty_bitmap(&self, slot: u32, pages: u64) -> Result<Vec<u64>, VmError> {
        let bytes =
            usize::try_from(pages << 12).map_err(|_| VmError::Memory("slot too large".into()))?;
        self.fd
            .get_dirty_log(slot, bytes)
            .map_err(VmError::DirtyLog)
    }

    /// Clears the bits set in `bitmap` (as returned by
    /// [`Vm::dirty_bitmap`] for the whole slot) and write-protects those
    /// pages again, so the log sees their next write.
    pub fn clear_dirty(&self, slot: u32, pages: u64, bitmap: &mut [u64]) -> Result<(), VmError> {
        let num_pages = u32::try_from(pages)
            .ok()
            .filter(|_| (bitmap.len() as u64) * PAGES_PER_WORD >= pages)
            .ok_or_else(|| VmError::Memory(format!("dirty bitmap too short for {pages} pages")))?;
        let mut clear = kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `clear` names `bitmap`, which holds at least `num_pages`
        // bits and outlives the call; KVM only reads it.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(VmError::DirtyLog(kvm_ioctls::Error::last()));
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
    /// Dirty-page logging could not be enabled, read or cleared.
    #[error("KVM dirty log: {0}")]
    DirtyLog(kvm_ioctls::Error),
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
