//! The guest physical memory map of an ember microVM.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM, left zero)
//! 0x0000_0500  boot GDT (4 entries)             BOOT_GDT_START
//! 0x0000_0520  boot IDT (1 null entry)          BOOT_IDT_START
//! 0x0000_7000  zero page (Linux boot_params)    ZERO_PAGE_START
//!              or PVH hvm_start_info            PVH_INFO_START
//! 0x0000_7040  PVH module list (initrd)         PVH_MODLIST_START
//! 0x0000_7100  PVH memory map table             PVH_MEMMAP_START
//! 0x0000_8000  boot stack, grows down from      BOOT_STACK_POINTER
//! 0x0000_9000  identity page tables: PML4, PDPTE (0xa000), PDE (0xb000)
//! 0x0002_0000  kernel command line (64 KiB)     CMDLINE_START
//! 0x0009_fc00  EBDA: Intel MP table             EBDA_START
//! 0x000a_0000  (legacy VGA / BIOS area, reserved in the E820 map)
//! 0x0010_0000  high memory: kernel, initrd, the rest of RAM   HIMEM_START
//! 0xc000_0000  32-bit MMIO gap (no RAM)         MMIO_GAP_START
//! 0xc000_0000    the function hot path's doorbell page (DOORBELL_ADDR)
//! 0xd000_0000    virtio-mmio devices, 4 KiB slots, IRQ 5..=23
//! 0xfec0_0000    IOAPIC
//! 0xfee0_0000    LAPIC
//! 0xfffb_c000    KVM identity map page, then the KVM TSS (3 pages)
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3 GiB
//! ```
//!
//! Everything below [`HIMEM_START`] that the VMM writes lives in the first
//! RAM region, which [`MIN_MEM_SIZE`] guarantees to exist.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Errors of the memory layout helpers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The requested guest memory is smaller than ember supports.
    #[error("guest memory of {0} bytes is below the minimum of {MIN_MEM_SIZE} bytes")]
    MemTooSmall(u64),
    /// The requested guest memory is larger than ember supports.
    #[error("guest memory of {0} bytes is above the maximum of {MAX_MEM_SIZE} bytes")]
    MemTooLarge(u64),
    /// The requested guest memory is not a whole number of pages.
    #[error("guest memory of {0} bytes is not a multiple of {PAGE_SIZE} bytes")]
    MemNotAligned(u64),
    /// Guest memory has no RAM region at address 0, so nothing can be placed below 4 GiB.
    #[error("guest memory has no RAM region starting at address 0")]
    NoLowMemory,
    /// The initrd does not fit between the end of the kernel and the top of low RAM.
    #[error(
        "initrd of {initrd_size} bytes does not fit between the kernel end {kernel_end:#x} \
         and the top of low memory {low_mem_end:#x}"
    )]
    InitrdDoesNotFit {
        /// Size of the initrd in bytes.
        initrd_size: usize,
        /// First guest address after the kernel image.
        kernel_end: u64,
        /// First guest address after the RAM below the MMIO gap.
        low_mem_end: u64,
    },
}

/// Size of a guest page; every RAM region and the initrd are aligned to it.
pub const PAGE_SIZE: u64 = 0x1000;

/// Start of the boot GDT the VMM writes for the first vCPU instructions.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT (null, code, data, TSS).
pub const BOOT_GDT_MAX_ENTRIES: usize = 4;
/// Start of the boot IDT: a single null entry, so any exception before the
/// kernel installs its own IDT triple-faults instead of jumping to garbage.
pub const BOOT_IDT_START: u64 = 0x520;

/// The Linux "zero page" (`struct boot_params`, 4 KiB) for the 64-bit Linux boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The PVH `hvm_start_info` structure (56 bytes). Shares the zero page's
/// place: a guest boots with one protocol or the other, never both.
pub const PVH_INFO_START: u64 = ZERO_PAGE_START;
/// The PVH module list (one `hvm_modlist_entry`, 32 bytes, for the initrd).
pub const PVH_MODLIST_START: u64 = 0x7040;
/// The PVH memory map table (`hvm_memmap_table_entry`, 24 bytes each).
pub const PVH_MEMMAP_START: u64 = 0x7100;
/// How many PVH memory map entries fit before the boot stack page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((BOOT_STACK_START - PVH_MEMMAP_START) / 24) as usize;

/// Lowest address of the boot stack page.
pub const BOOT_STACK_START: u64 = 0x8000;
/// Initial RSP/RBP for the 64-bit Linux boot protocol (16-byte aligned, top of the stack page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page map level 4 table (64-bit Linux boot protocol only).
pub const PML4_START: u64 = 0x9000;
/// Identity-mapping page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Identity-mapping page directory: 512 2 MiB pages, the first GiB.
pub const PDE_START: u64 = 0xb000;

/// Where the kernel command line is written (NUL-terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Room reserved for the command line, NUL included. Note that x86 Linux
/// 6.1 itself keeps only the first 2048 bytes (`COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Start of the Extended BIOS Data Area, where the MP table goes: Linux
/// scans the last KiB of the 640 KiB base memory for the MP floating pointer.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// First address of "high" memory (1 MiB); [`EBDA_START`]..here is reserved in the E820 map.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap (1 GiB).
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// Where RAM continues when the guest has more than fits below the gap.
pub const RAM_ABOVE_4G_START: u64 = MMIO_GAP_END;

/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xD000_0000;

/// The hot-path doorbell page (`ember_protocol::hotpath`): in the gap, clear
/// of every device.
pub const DOORBELL_ADDR: u64 = ember_protocol::hotpath::DOORBELL_ADDR;
const _: () =
    assert!(DOORBELL_ADDR >= MMIO_GAP_START && DOORBELL_ADDR + PAGE_SIZE <= VIRTIO_MMIO_START);
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// IRQ (IOAPIC pin / GSI) of the first virtio-mmio device. IRQs below are
/// left to legacy devices (1: i8042, 4: serial).
pub const VIRTIO_MMIO_IRQ_BASE: u32 = 5;
/// Number of IOAPIC pins (the KVM in-kernel IOAPIC has 24).
pub const IOAPIC_NUM_PINS: u32 = 24;
/// Number of virtio-mmio device slots: one per IRQ in `VIRTIO_MMIO_IRQ_BASE..IOAPIC_NUM_PINS`.
pub const VIRTIO_MMIO_SLOT_COUNT: usize = (IOAPIC_NUM_PINS - VIRTIO_MMIO_IRQ_BASE) as usize;

/// The IOAPIC's MMIO base (Linux's `IO_APIC_DEFAULT_PHYS_BASE`).
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// The local APIC's MMIO base (Linux's `APIC_DEFAULT_PHYS_BASE`).
pub const LAPIC_START: u64 = 0xFEE0_0000;

/// Where KVM keeps the three-page TSS it needs for real-mode emulation on
/// Intel (`KVM_SET_TSS_ADDR`); inside the MMIO gap, away from any device.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Where KVM keeps its identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Smallest guest memory ember accepts (32 MiB): enough for the low boot
/// structures, a small kernel at 16 MiB and an initramfs.
pub const MIN_MEM_SIZE: u64 = 32 << 20;
/// Largest guest memory ember accepts (32 GiB). With the gap, the highest
/// guest physical address is then 33 GiB, below the 64 GiB of a 36-bit
/// physical address width, the smallest any x86-64 CPU reports; a sandbox
/// microVM needs far less anyway.
pub const MAX_MEM_SIZE: u64 = 32 << 30;

// The fixed low structures must not overlap each other.
const _: () = assert!(BOOT_GDT_START + (BOOT_GDT_MAX_ENTRIES as u64) * 8 <= BOOT_IDT_START);
const _: () = assert!(PVH_INFO_START + 56 <= PVH_MODLIST_START);
const _: () = assert!(PVH_MODLIST_START + 32 <= PVH_MEMMAP_START);
const _: () = assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_START);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PDE_START + 4096 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(
    VIRTIO_MMIO_START + VIRTIO_MMIO_SLOT_COUNT as u64 * VIRTIO_MMIO_SLOT_SIZE <= IOAPIC_START
);
const _: () = assert!(MIN_MEM_SIZE > HIMEM_START);

/// Checks that `mem_size` is a guest memory size ember can lay out.
pub fn validate_mem_size(mem_size: u64) -> Result<(), LayoutError> {
    if mem_size < MIN_MEM_SIZE {
        return Err(LayoutError::MemTooSmall(mem_size));
    }
    if mem_size > MAX_MEM_SIZE {
        return Err(LayoutError::MemTooLarge(mem_size));
    }
    if mem_size & (PAGE_SIZE - 1) != 0 {
        return Err(LayoutError::MemNotAligned(mem_size));
    }
    Ok(())
}

/// Splits `mem_size` bytes of guest RAM around the MMIO gap: RAM starts at
/// 0 and runs up to the gap; what does not fit below it continues at 4 GiB.
///
/// The result feeds `GuestMemoryMmap::from_ranges` and the KVM memory
/// slots. Call [`validate_mem_size`] first: this function does not check
/// bounds (a size of 0 gives no region).
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let mut regions = Vec::with_capacity(2);
    let low = mem_size.min(MMIO_GAP_START);
    if low > 0 {
        // u64 -> usize is lossless on x86_64, the only target of this module.
        regions.push((GuestAddress(0), low as usize));
    }
    let high = mem_size - low;
    if high > 0 {
        regions.push((GuestAddress(RAM_ABOVE_4G_START), high as usize));
    }
    regions
}

/// Guest address of virtio-mmio slot `index`, if there is such a slot.
pub fn virtio_mmio_addr(index: usize) -> Option<GuestAddress> {
    (index < VIRTIO_MMIO_SLOT_COUNT)
        .then(|| GuestAddress(VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SLOT_SIZE))
}

/// IRQ (GSI) of virtio-mmio slot `index`, if there is such a slot.
pub fn virtio_mmio_irq(index: usize) -> Option<u32> {
    (index < VIRTIO_MMIO_SLOT_COUNT).then(|| VIRTIO_MMIO_IRQ_BASE + index as u32)
}

/// First address past the RAM that starts at 0 (at most [`MMIO_GAP_START`]).
pub fn low_mem_end(mem: &GuestMemoryMmap) -> Result<GuestAddress, LayoutError> {
    let region = mem
        .find_region(GuestAddress(0))
        .ok_or(LayoutError::NoLowMemory)?;
    let end = region.start_addr().raw_value().saturating_add(region.len());
    Ok(GuestAddress(end.min(MMIO_GAP_START)))
}

/// Where to load an initrd of `initrd_size` bytes: page-aligned, as high as
/// possible in the RAM below the MMIO gap, so the kernel (loaded low, ending
/// at `kernel_end`) and its early allocations stay clear of it.
pub fn initrd_load_addr(
    mem: &GuestMemoryMmap,
    initrd_size: usize,
    kernel_end: GuestAddress,
) -> Result<GuestAddress, LayoutError> {
    let low_end = low_mem_end(mem)?.raw_value();
    let does_not_fit = || LayoutError::InitrdDoesNotFit {
        initrd_size,
        kernel_end: kernel_end.raw_value(),
        low_mem_end: low_end,
    };
    let start = low_end
        .checked_sub(initrd_size as u64)
        .ok_or_else(does_not_fit)?
        & !(PAGE_SIZE - 1);
    if start < kernel_end.raw_value() {
        return Err(does_not_fit());
    }
    Ok(GuestAddress(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_regions_below_gap() {
        assert_eq!(
            ram_regions(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        assert_eq!(
            ram_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START as usize)]
        );
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn ram_regions_around_gap() {
        assert_eq!(
            ram_regions(5 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (2 * GIB) as usize),
            ]
        );
        let total: usize = ram_regions(MAX_MEM_SIZE).iter().map(|r| r.1).sum();
        assert_eq!(total as u64, MAX_MEM_SIZE);
    }

    #[test]
    fn mem_size_validation() {
        assert!(validate_mem_size(MIN_MEM_SIZE).is_ok());
        assert!(validate_mem_size(MAX_MEM_SIZE).is_ok());
        assert_eq!(
            validate_mem_size(MIN_MEM_SIZE - PAGE_SIZE),
            Err(LayoutError::MemTooSmall(MIN_MEM_SIZE - PAGE_SIZE))
        );
        assert_eq!(
            validate_mem_size(MAX_MEM_SIZE + PAGE_SIZE),
            Err(LayoutError::MemTooLarge(MAX_MEM_SIZE + PAGE_SIZE))
        );
        assert_eq!(
            validate_mem_size(MIN_MEM_SIZE + 1),
            Err(LayoutError::MemNotAligned(MIN_MEM_SIZE + 1))
        );
    }

    #[test]
    fn virtio_slots() {
        assert_eq!(VIRTIO_MMIO_SLOT_COUNT, 19);
        assert_eq!(virtio_mmio_addr(0), Some(GuestAddress(VIRTIO_MMIO_START)));
        assert_eq!(virtio_mmio_irq(0), Some(5));
        assert_eq!(
            virtio_mmio_addr(VIRTIO_MMIO_SLOT_COUNT - 1),
            Some(GuestAddress(0xD001_2000))
        );
        assert_eq!(virtio_mmio_irq(VIRTIO_MMIO_SLOT_COUNT - 1), Some(23));
        assert_eq!(virtio_mmio_addr(VIRTIO_MMIO_SLOT_COUNT), None);
        assert_eq!(virtio_mmio_irq(VIRTIO_MMIO_SLOT_COUNT), None);
    }

    #[test]
    fn initrd_at_top_of_low_memory() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(64 * MIB)).unwrap();
        let kernel_end = GuestAddress(16 * MIB + 0x12345);
        let addr = initrd_load_addr(&mem, 0x1800, kernel_end).unwrap();
        assert_eq!(addr, GuestAddress(64 * MIB - 0x2000));
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);

        // Exactly filling the space above the kernel is fine.
        let size = (64 * MIB - 17 * MIB) as usize;
        assert_eq!(
            initrd_load_addr(&mem, size, GuestAddress(17 * MIB)).unwrap(),
            GuestAddress(17 * MIB)
        );
        // One byte more is not.
        assert!(matches!(
            initrd_load_addr(&mem, size + 1, GuestAddress(17 * MIB)),
            Err(LayoutError::InitrdDoesNotFit { .. })
        ));
        // Larger than all of memory.
        assert!(initrd_load_addr(&mem, (128 * MIB) as usize, GuestAddress(0)).is_err());
    }

    #[test]
    fn initrd_stays_below_gap() {
        // 5 GiB: 3 GiB low, 2 GiB high. The initrd goes below the gap, not at the top of RAM.
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(5 * GIB)).unwrap();
        assert_eq!(low_mem_end(&mem).unwrap(), GuestAddress(MMIO_GAP_START));
        let addr = initrd_load_addr(&mem, 0x1000, GuestAddress(16 * MIB)).unwrap();
        assert_eq!(addr, GuestAddress(MMIO_GAP_START - 0x1000));
    }

    #[test]
    fn no_low_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(4 * GIB), 0x10000)]).unwrap();
        assert_eq!(low_mem_end(&mem), Err(LayoutError::NoLowMemory));
    }
}
