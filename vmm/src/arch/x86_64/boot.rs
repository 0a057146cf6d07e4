//! Boot information for the guest kernel: the command line, the E820
//! memory map and the initrd's place, written as a PVH `hvm_start_info` or
//! as a Linux `boot_params` zero page depending on how the kernel boots.

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, XLF_KERNEL_64,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::KernelLoaderResult;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion,
};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// Errors writing the boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel is a bzImage without a 64-bit entry point.
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")]
    NoEntry64,
    /// The command line could not be turned into a C string.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line, NUL included, is longer than the room reserved for it.
    #[error("kernel command line of {0} bytes exceeds the {CMDLINE_MAX_SIZE} bytes reserved")]
    CmdlineTooLong(usize),
    /// The command line is longer than the bzImage says its kernel accepts.
    #[error("kernel command line of {len} bytes exceeds the kernel's limit of {max} bytes")]
    CmdlineTooLongForKernel {
        /// Length of the command line, without the NUL.
        len: usize,
        /// The limit from the bzImage header (`cmdline_size`).
        max: u32,
    },
    /// The command line could not be written to guest memory.
    #[error("cannot write the kernel command line to guest memory: {0}")]
    WriteCmdline(#[source] GuestMemoryError),
    /// Guest RAM does not start at 0 or does not reach past 1 MiB.
    #[error("guest memory has no RAM region from 0 past {HIMEM_START:#x}")]
    NoLowMemory,
    /// The memory map has more entries than the boot protocol can carry.
    #[error("the E820 map has {0} entries, more than the boot protocol carries")]
    TooManyE820Entries(usize),
    /// The initrd does not fit the 32-bit fields of the boot protocol.
    #[error("initrd at {addr:#x} of {size} bytes is beyond the boot protocol's 4 GiB reach")]
    InitrdTooHigh {
        /// Guest address of the initrd.
        addr: u64,
        /// Size of the initrd in bytes.
        size: usize,
    },
    /// linux-loader could not write the boot structures.
    #[error("cannot write the boot parameters: {0}")]
    Configure(#[source] linux_loader::configurator::Error),
}

/// How the vCPU enters the kernel, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// The PVH boot protocol: 32-bit protected mode, paging off, RBX pointing
    /// at an `hvm_start_info`. Used for ELF `vmlinux` images with a PVH note.
    Pvh {
        /// The kernel's PVH entry point.
        entry: GuestAddress,
    },
    /// The 64-bit Linux boot protocol: long mode with identity-mapped page
    /// tables, RSI pointing at the `boot_params` zero page.
    Linux64 {
        /// The kernel's 64-bit entry point (`startup_64`).
        entry: GuestAddress,
    },
}

/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel
/// (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;

impl BootEntry {
    /// Chooses how to boot a kernel linux-loader has loaded: PVH when the ELF
    /// image has a PVH entry note; otherwise the 64-bit Linux protocol, at the
    /// ELF entry or, for a bzImage, at its 64-bit entry point.
    pub fn from_loader_result(result: &KernelLoaderResult) -> Result<Self, BootError> {
        if let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap {
            return Ok(BootEntry::Pvh { entry });
        }
        match result.setup_header {
            Some(hdr) => {
                if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                    return Err(BootError::NoEntry64);
                }
                let entry = result
                    .kernel_load
                    .checked_add(BZIMAGE_ENTRY64_OFFSET)
                    .ok_or(BootError::NoEntry64)?;
                Ok(BootEntry::Linux64 { entry })
            }
            None => Ok(BootEntry::Linux64 {
                entry: result.kernel_load,
            }),
        }
    }

    /// The entry point address.
    pub fn entry(&self) -> GuestAddress {
        match self {
            BootEntry::Pvh { entry } | BootEntry::Linux64 { entry } => *entry,
        }
    }
}

/// Where the initrd was loaded in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest address of its first byte.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: usize,
}

/// The kind of an E820 memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the guest must not use it as RAM.
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

impl E820Entry {
    fn new(addr: u64, end: u64, kind: E820Kind) -> Self {
        E820Entry {
            addr,
            size: end - addr,
            kind,
        }
    }
}

/// Computes the E820 map for guest RAM laid out as `ram` (start, length)
/// regions, sorted by address. The region at 0 is split into base memory
/// below the EBDA, a reserved range from the EBDA to 1 MiB (MP table,
/// legacy VGA and BIOS areas, as on a PC), and RAM from 1 MiB up; every
/// other region is RAM. The MMIO gap is simply absent.
pub fn e820_map(ram: &[(GuestAddress, usize)]) -> Result<Vec<E820Entry>, BootError> {
    let mut map = Vec::with_capacity(ram.len() + 2);
    match ram.first() {
        Some((start, len)) if start.raw_value() == 0 && *len as u64 > HIMEM_START => {
            map.push(E820Entry::new(0, EBDA_START, E820Kind::Ram));
            map.push(E820Entry::new(EBDA_START, HIMEM_START, E820Kind::Reserved));
            map.push(E820Entry::new(HIMEM_START, *len as u64, E820Kind::Ram));
        }
        _ => return Err(BootError::NoLowMemory),
    }
    for (start, len) in &ram[1..] {
        map.push(E820Entry {
            addr: start.raw_value(),
            size: *len as u64,
            kind: E820Kind::Ram,
        });
    }
    Ok(map)
}

/// The (start, length) of every region of `mem`, in address order.
fn mem_regions(mem: &GuestMemoryMmap) -> Vec<(GuestAddress, usize)> {
    let mut regions: Vec<_> = mem
        .iter()
        // u64 -> usize is lossless on x86_64.
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    regions.sort_by_key(|r| r.0);
    regions
}

/// Writes the command line, NUL-terminated, at [`CMDLINE_START`]; returns
/// its length without the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, BootError> {
    let cstring = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = cstring.as_bytes_with_nul();
    if bytes.len() > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(bytes.len()));
    }
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::WriteCmdline)?;
    Ok(bytes.len() - 1)
}

/// Builds the PVH start info and memory map table.
fn pvh_params(e820: &[E820Entry], initrd: Option<&InitrdRegion>) -> Result<BootParams, BootError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        // Bounded by PVH_MEMMAP_MAX_ENTRIES above.
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(initrd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        modules.push(hvm_modlist_entry {
            paddr: initrd.addr.raw_value(),
            size: initrd.size as u64,
            ..Default::default()
        });
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    Ok(params)
}

/// The `hvm_start_info` magic ("xEn3" with the high bit of each byte cleared).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `boot_params.hdr.boot_flag`.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header`: "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `boot_params.hdr.type_of_loader`: "undefined" boot loader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Kernel alignment for a vmlinux booted without its own setup header.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Builds the Linux zero page.
fn linux_params(
    e820: &[E820Entry],
    cmdline_len: usize,
    initrd: Option<&InitrdRegion>,
    hdr: Option<&setup_header>,
) -> Result<boot_params, BootError> {
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    let mut params = boot_params::default();
    // A bzImage's own header carries fields its decompressor relies on
    // (alignment, init_size, ...): start from it when there is one.
    if let Some(hdr) = hdr {
        params.hdr = *hdr;
        // In a bzImage header, `cmdline_size` is the kernel's limit, for the loader to respect.
        let max = hdr.cmdline_size;
        if max != 0 && cmdline_len as u64 > u64::from(max) {
            return Err(BootError::CmdlineTooLongForKernel {
                len: cmdline_len,
                max,
            });
        }
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        // Below CMDLINE_MAX_SIZE: the cast cannot truncate.
        params.hdr.cmdline_size = cmdline_len as u32;
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // Below the EBDA: the cast cannot truncate.
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    if let Some(initrd) = initrd {
        let too_high = || BootError::InitrdTooHigh {
            addr: initrd.addr.raw_value(),
            size: initrd.size,
        };
        params.hdr.ramdisk_image =
            u32::try_from(initrd.addr.raw_value()).map_err(|_| too_high())?;
        params.hdr.ramdisk_size = u32::try_from(initrd.size).map_err(|_| too_high())?;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    // Bounded by E820_MAX_ENTRIES_ZEROPAGE (128) above.
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes everything the kernel reads at boot besides its own image: the
/// command line at [`CMDLINE_START`] and, for [`BootEntry::Pvh`], an
/// `hvm_start_info` at [`PVH_INFO_START`] (with module list and memory
/// map), or, for [`BootEntry::Linux64`], a `boot_params` zero page at
/// [`ZERO_PAGE_START`]. `setup_header` is the bzImage header linux-loader
/// returned, if any (ignored for PVH). Call once per VM, after loading the
/// kernel and the initrd.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    entry: &BootEntry,
    cmdline: &Cmdline,
    initrd: Option<&InitrdRegion>,
    setup_header: Option<&setup_header>,
) -> Result<(), BootError> {
    let cmdline_len = write_cmdline(mem, cmdline)?;
    let e820 = e820_map(&mem_regions(mem))?;
    match entry {
        BootEntry::Pvh { .. } => {
            let params = pvh_params(&e820, initrd)?;
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configure)
        }
        BootEntry::Linux64 { .. } => {
            let zero_page = linux_params(&e820, cmdline_len, initrd, setup_header)?;
            let params = BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{ram_regions, MMIO_GAP_START};
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn cmdline(s: &str) -> Cmdline {
        Cmdline::try_from(s, CMDLINE_MAX_SIZE).unwrap()
    }

    fn read_memmap(mem: &GuestMemoryMmap, info: &hvm_start_info) -> Vec<(u64, u64, u32)> {
        (0..u64::from(info.memmap_entries))
            .map(|i| {
                let e: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(info.memmap_paddr + i * 24))
                    .unwrap();
                (e.addr, e.size, e.type_)
            })
            .collect()
    }

    #[test]
    fn e820_128m() {
        let map = e820_map(&ram_regions(128 * MIB)).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry::new(0, 0x9fc00, E820Kind::Ram),
                E820Entry::new(0x9fc00, 0x10_0000, E820Kind::Reserved),
                E820Entry::new(0x10_0000, 128 * MIB, E820Kind::Ram),
            ]
        );
    }

    #[test]
    fn e820_5g() {
        let map = e820_map(&ram_regions(5 * GIB)).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry::new(0, 0x9fc00, E820Kind::Ram),
                E820Entry::new(0x9fc00, 0x10_0000, E820Kind::Reserved),
                E820Entry::new(0x10_0000, MMIO_GAP_START, E820Kind::Ram),
                E820Entry::new(4 * GIB, 6 * GIB, E820Kind::Ram),
            ]
        );
    }

    #[test]
    fn e820_needs_low_memory() {
        assert!(matches!(e820_map(&[]), Err(BootError::NoLowMemory)));
        assert!(matches!(
            e820_map(&[(GuestAddress(0), 0x8_0000)]),
            Err(BootError::NoLowMemory)
        ));
        assert!(matches!(
            e820_map(&[(GuestAddress(4 * GIB), GIB as usize)]),
            Err(BootError::NoLowMemory)
        ));
    }

    #[test]
    fn pvh_128m_with_initrd() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(128 * MIB)).unwrap();
        let initrd = InitrdRegion {
            addr: GuestAddress(120 * MIB),
            size: 0x12345,
        };
        let entry = BootEntry::Pvh {
            entry: GuestAddress(0x100_0000),
        };
        configure_boot(&mem, &entry, &cmdline("console=ttyS0"), Some(&initrd), None).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336ec578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(
            read_memmap(&mem, &info),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x10_0000 - 0x9fc00, 2),
                (0x10_0000, 127 * MIB, 1),
            ]
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (120 * MIB, 0x12345));

        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn pvh_5g_without_initrd() {
        // Mapped with MAP_NORESERVE: only the touched low pages cost memory.
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(5 * GIB)).unwrap();
        let entry = BootEntry::Pvh {
            entry: GuestAddress(0x100_0000),
        };
        configure_boot(&mem, &entry, &cmdline("quiet"), None, None).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.modlist_paddr, 0);
        assert_eq!(
            read_memmap(&mem, &info),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x10_0000 - 0x9fc00, 2),
                (0x10_0000, MMIO_GAP_START - 0x10_0000, 1),
                (4 * GIB, 2 * GIB, 1),
            ]
        );
    }

    #[test]
    fn linux_zero_page() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(128 * MIB)).unwrap();
        let initrd = InitrdRegion {
            addr: GuestAddress(100 * MIB),
            size: 4096,
        };
        let entry = BootEntry::Linux64 {
            entry: GuestAddress(0x100_0000),
        };
        configure_boot(&mem, &entry, &cmdline("a=b"), Some(&initrd), None).unwrap();

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 3);
        assert_eq!({ hdr.ramdisk_image }, (100 * MIB) as u32);
        assert_eq!({ hdr.ramdisk_size }, 4096);
        assert_eq!(params.e820_entries, 3);
        let table = params.e820_table;
        let e = table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (HIMEM_START, 127 * MIB, 1)
        );
        let e = table[1];
        assert_eq!({ e.r#type }, 2);
    }

    #[test]
    fn linux_keeps_bzimage_header() {
        let mut hdr = setup_header {
            init_size: 0x1234_0000,
            kernel_alignment: 0x20_0000,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            ..Default::default()
        };
        hdr.version = 0x020f;
        let params = linux_params(
            &e820_map(&ram_regions(64 * MIB)).unwrap(),
            0,
            None,
            Some(&hdr),
        )
        .unwrap();
        let got = params.hdr;
        assert_eq!({ got.init_size }, 0x1234_0000);
        assert_eq!({ got.kernel_alignment }, 0x20_0000);
        assert_eq!({ got.version }, 0x020f);
        assert_eq!(got.type_of_loader, 0xff);
        assert_eq!({ got.ramdisk_image }, 0);
        // The kernel's limit is left as the kernel stated it.
        assert_eq!({ got.cmdline_size }, 2047);
        let e820 = e820_map(&ram_regions(64 * MIB)).unwrap();
        assert!(linux_params(&e820, 2047, None, Some(&hdr)).is_ok());
        assert!(matches!(
            linux_params(&e820, 2048, None, Some(&hdr)),
            Err(BootError::CmdlineTooLongForKernel {
                len: 2048,
                max: 2047
            })
        ));
    }

    #[test]
    fn cmdline_too_long() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(64 * MIB)).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let entry = BootEntry::Pvh {
            entry: GuestAddress(0x100_0000),
        };
        let cmdline = Cmdline::try_from(&long, CMDLINE_MAX_SIZE + 1).unwrap();
        assert!(matches!(
            configure_boot(&mem, &entry, &cmdline, None, None),
            Err(BootError::CmdlineTooLong(n)) if n == CMDLINE_MAX_SIZE + 1
        ));
    }

    #[test]
    fn entry_from_loader_result() {
        let mut result = KernelLoaderResult {
            kernel_load: GuestAddress(0x100_0000),
            kernel_end: 0x200_0000,
            setup_header: None,
            pvh_boot_cap: PvhBootCapability::PvhEntryPresent(GuestAddress(0x100_1000)),
        };
        assert_eq!(
            BootEntry::from_loader_result(&result).unwrap(),
            BootEntry::Pvh {
                entry: GuestAddress(0x100_1000)
            }
        );
        result.pvh_boot_cap = PvhBootCapability::PvhEntryNotPresent;
        assert_eq!(
            BootEntry::from_loader_result(&result).unwrap(),
            BootEntry::Linux64 {
                entry: GuestAddress(0x100_0000)
            }
        );
        result.kernel_load = GuestAddress(HIMEM_START);
        result.setup_header = Some(setup_header {
            xloadflags: XLF_KERNEL_64,
            ..Default::default()
        });
        let entry = BootEntry::from_loader_result(&result).unwrap();
        assert_eq!(entry.entry(), GuestAddress(HIMEM_START + 0x200));
        result.setup_header = Some(setup_header::default());
        assert!(matches!(
            BootEntry::from_loader_result(&result),
            Err(BootError::NoEntry64)
        ));
    }
}
