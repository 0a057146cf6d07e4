//! The register state a vCPU starts the kernel with.
//!
//! The values are computed by pure functions ([`boot_regs`],
//! [`boot_sregs`], [`boot_fpu`]) and applied by thin ioctl wrappers, so the
//! interesting part is testable without `/dev/kvm`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::boot::BootEntry;
use super::gdt::{
    kvm_segment_from_gdt, write_boot_tables, GdtError, BOOT_GDT_32, BOOT_GDT_64, CODE_INDEX,
    DATA_INDEX, TSS_INDEX,
};
use super::layout::{
    BOOT_GDT_MAX_ENTRIES, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START,
    PDPTE_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// Errors setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// `KVM_SET_REGS` failed.
    #[error("cannot set the general purpose registers: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_GET_SREGS` failed.
    #[error("cannot get the special registers: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("cannot set the special registers: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("cannot set the FPU registers: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// The boot GDT or IDT could not be written.
    #[error(transparent)]
    Gdt(#[from] GdtError),
    /// The identity page tables could not be written.
    #[error("cannot write the boot page tables to guest memory: {0}")]
    WritePageTables(#[source] GuestMemoryError),
}

/// RFLAGS with only the always-one bit 1 set: interrupts off.
const RFLAGS_RESERVED: u64 = 0x2;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page table entry flags: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry flag: this entry maps a 2 MiB page.
const PDE_PAGE_SIZE: u64 = 0x80;

/// The boot GDT for a boot protocol.
fn boot_gdt(entry: &BootEntry) -> &'static [u64; BOOT_GDT_MAX_ENTRIES] {
    match entry {
        BootEntry::Pvh { .. } => &BOOT_GDT_32,
        BootEntry::Linux64 { .. } => &BOOT_GDT_64,
    }
}

/// General purpose registers at the kernel entry: RIP at the entry point,
/// interrupts off, and the boot information pointer where the protocol
/// wants it (PVH: RBX = `hvm_start_info`; Linux: RSI = zero page, with a
/// small stack).
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        BootEntry::Linux64 { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Special registers at the kernel entry, starting from `base` (what
/// `KVM_GET_SREGS` returned, so the APIC base and the other fields this
/// does not set keep KVM's reset values).
///
/// PVH: 32-bit protected mode, paging off, flat 4 GiB segments, CR0 =
/// PE | ET, CR4 = 0, EFER = 0. Linux64: long mode, CR3 at the identity page
/// tables, CR0 = PE | ET | PG, CR4 = PAE, EFER = LME | LMA. Both point GDTR
/// and IDTR at the tables [`write_boot_structures`] writes.
pub fn boot_sregs(base: &kvm_sregs, entry: &BootEntry) -> kvm_sregs {
    let gdt = boot_gdt(entry);
    let code = kvm_segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = kvm_segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);

    let mut sregs = *base;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT_MAX_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            // CR0 is set whole rather than OR-ed into the reset value, which
            // has the cache-disable bits (CD, NW) set.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// Writes the identity page tables mapping the first GiB with 2 MiB pages:
/// enough for the kernel's 64-bit entry code, which builds its own tables.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(RegsError::WritePageTables)?;
    mem.write_obj(PDE_START | PTE_PRESENT_RW, GuestAddress(PDPTE_START))
        .map_err(RegsError::WritePageTables)?;
    let mut pde = [0u8; 512 * 8];
    for (i, chunk) in pde.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | PDE_PAGE_SIZE | PTE_PRESENT_RW;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pde, GuestAddress(PDE_START))
        .map_err(RegsError::WritePageTables)
}

/// Writes the guest memory structures the boot registers refer to: the
/// boot GDT and IDT and, for Linux64, the identity page tables.
pub fn write_boot_structures(mem: &GuestMemoryMmap, entry: &BootEntry) -> Result<(), RegsError> {
    write_boot_tables(mem, boot_gdt(entry))?;
    if let BootEntry::Linux64 { .. } = entry {
        write_page_tables(mem)?;
    }
    Ok(())
}

/// FPU state at boot: the x87 control word and MXCSR as after `FNINIT`
/// and reset (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Sets the general purpose registers for `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry)).map_err(RegsError::SetRegs)
}

/// Writes the boot GDT/IDT (and page tables) into guest memory and sets the
/// special registers for `entry`.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    entry: &BootEntry,
) -> Result<(), RegsError> {
    write_boot_structures(mem, entry)?;
    let base = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(&base, entry))
        .map_err(RegsError::SetSregs)
}

/// Sets the FPU registers to their boot values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;

    use super::*;

    const PVH: BootEntry = BootEntry::Pvh {
        entry: GuestAddress(0x100_0000),
    };
    const LINUX: BootEntry = BootEntry::Linux64 {
        entry: GuestAddress(0x100_0200),
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn regs_pvh() {
        let regs = boot_regs(&PVH);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!((regs.rsp, regs.rsi), (0, 0));
    }

    #[test]
    fn regs_linux() {
        let regs = boot_regs(&LINUX);
        assert_eq!(regs.rip, 0x100_0200);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rflags, 0x2);
    }

    #[test]
    fn sregs_pvh() {
        let base = kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let s = boot_sregs(&base, &PVH);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!(s.apic_base, 0xfee0_0900);
        assert_eq!(
            (s.cs.selector, s.cs.type_, s.cs.db, s.cs.l),
            (0x8, 0xb, 1, 0)
        );
        assert_eq!((s.cs.base, s.cs.limit, s.cs.g), (0, 0xffff_ffff, 1));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (seg.selector, seg.type_, seg.base, seg.limit, seg.present),
                (0x10, 0x3, 0, 0xffff_ffff, 1)
            );
        }
        assert_eq!((s.tr.selector, s.tr.limit, s.tr.type_), (0x18, 0x67, 0xb));
        assert_eq!((s.gdt.base, s.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((s.idt.base, s.idt.limit), (BOOT_IDT_START, 7));
    }

    #[test]
    fn sregs_linux() {
        let s = boot_sregs(&kvm_sregs::default(), &LINUX);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cr4, X86_CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x8, 1, 0));
        assert_eq!(s.ss.selector, 0x10);
        assert_eq!(s.tr.selector, 0x18);
    }

    #[test]
    fn page_tables() {
        let mem = mem();
        write_boot_structures(&mem, &LINUX).unwrap();
        let read = |addr: u64| -> u64 { mem.read_obj(GuestAddress(addr)).unwrap() };
        assert_eq!(read(PML4_START), 0xa003);
        assert_eq!(read(PDPTE_START), 0xb003);
        for i in 0..512u64 {
            assert_eq!(read(PDE_START + i * 8), (i << 21) | 0x83);
        }
        assert_eq!(read(BOOT_GDT_START + 8), BOOT_GDT_64[1]);
    }

    #[test]
    fn pvh_writes_no_page_tables() {
        let mem = mem();
        write_boot_structures(&mem, &PVH).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, BOOT_GDT_32[1]);
    }

    #[test]
    fn fpu_values() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    /// One real vCPU: KVM accepts the register values of both protocols.
    #[test]
    fn on_kvm() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mem = mem();
        for entry in [LINUX, PVH] {
            setup_regs(&vcpu, &entry).unwrap();
            setup_sregs(&mem, &vcpu, &entry).unwrap();
            setup_fpu(&vcpu).unwrap();

            let regs = vcpu.get_regs().unwrap();
            assert_eq!(regs, boot_regs(&entry));
            let sregs = vcpu.get_sregs().unwrap();
            let want = boot_sregs(&sregs, &entry);
            assert_eq!(
                (sregs.cr0, sregs.cr3, sregs.cr4),
                (want.cr0, want.cr3, want.cr4)
            );
            assert_eq!(sregs.efer, want.efer);
            assert_eq!(sregs.cs, want.cs);
            assert_eq!(sregs.ss, want.ss);
            assert_eq!(vcpu.get_fpu().unwrap().fcw, 0x37f);
            // Some KVMs (the PVM host) report MXCSR as 0 through KVM_GET_FPU;
            // the XSAVE legacy area (bytes 24..28) has the real value.
            assert_eq!(vcpu.get_xsave().unwrap().region[6], 0x1f80);
        }
    }
}
