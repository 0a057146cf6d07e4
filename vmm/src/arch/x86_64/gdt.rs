//! Segment descriptors for the boot GDT, and their `kvm_segment` form.
//!
//! KVM loads segment registers from `kvm_sregs`, not from the GDT, but the
//! guest reads the GDT as soon as it reloads a selector, so the table in
//! guest memory and the registers must agree: both come from the same
//! descriptor values here.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{BOOT_GDT_MAX_ENTRIES, BOOT_GDT_START, BOOT_IDT_START};

/// Errors writing the boot descriptor tables.
#[derive(Debug, thiserror::Error)]
pub enum GdtError {
    /// The GDT could not be written to guest memory.
    #[error("cannot write the boot GDT to guest memory: {0}")]
    WriteGdt(#[source] GuestMemoryError),
    /// The IDT could not be written to guest memory.
    #[error("cannot write the boot IDT to guest memory: {0}")]
    WriteIdt(#[source] GuestMemoryError),
}

/// GDT index of the code segment in the boot GDTs (selector 0x8).
pub const CODE_INDEX: u8 = 1;
/// GDT index of the data segment in the boot GDTs (selector 0x10).
pub const DATA_INDEX: u8 = 2;
/// GDT index of the TSS in the boot GDTs (selector 0x18).
pub const TSS_INDEX: u8 = 3;

/// Builds a segment descriptor.
///
/// `flags` holds the access byte in bits 7..0 (P, DPL, S, type) and the
/// G/DB/L/AVL nibble in bits 15..12, the layout of descriptor bits 55..40.
/// `limit` is 20 bits, in 4 KiB units when G is set.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT for the 64-bit Linux boot protocol: null, 64-bit code
/// (L=1), flat 4 GiB data, and a busy 64-bit TSS.
pub const BOOT_GDT_64: [u64; BOOT_GDT_MAX_ENTRIES] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The boot GDT for PVH, which starts in 32-bit protected mode: null, flat
/// 4 GiB 32-bit code, flat 4 GiB data, and the 32-bit busy TSS of 0x68
/// bytes the PVH ABI asks for.
pub const BOOT_GDT_32: [u64; BOOT_GDT_MAX_ENTRIES] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

fn bit(entry: u64, shift: u32) -> u8 {
    ((entry >> shift) & 1) as u8
}

/// Base address encoded in a descriptor.
fn base(entry: u64) -> u64 {
    ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff)
}

/// Segment limit in bytes (minus one) encoded in a descriptor: the raw
/// 20-bit field, scaled to 4 KiB units when G is set.
fn limit(entry: u64) -> u32 {
    let raw = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    if bit(entry, 55) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The `kvm_segment` (the hidden part of a segment register) that loading
/// GDT entry number `index` holding `entry` would produce.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        // A segment that is not present cannot be used; KVM wants that said explicitly.
        unusable: 1 - present,
        padding: 0,
    }
}

/// Writes `table` at [`BOOT_GDT_START`] and a null IDT entry at [`BOOT_IDT_START`].
pub fn write_boot_tables(
    mem: &GuestMemoryMmap,
    table: &[u64; BOOT_GDT_MAX_ENTRIES],
) -> Result<(), GdtError> {
    let mut bytes = [0u8; BOOT_GDT_MAX_ENTRIES * 8];
    for (chunk, entry) in bytes.chunks_exact_mut(8).zip(table) {
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(GdtError::WriteGdt)?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(GdtError::WriteIdt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_encoding() {
        // Reference values: the classic Linux boot GDT encodings.
        assert_eq!(BOOT_GDT_64[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT_64[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT_64[3], 0x008f_8b00_0000_ffff);
        assert_eq!(BOOT_GDT_32[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT_32[3], 0x0000_8b00_0000_0067);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn segment_round_trip() {
        let seg = kvm_segment_from_gdt(gdt_entry(0xa09b, 0x10_0000, 0xfffff), CODE_INDEX);
        assert_eq!(seg.base, 0x10_0000);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.type_, 0xb);
        assert_eq!((seg.present, seg.dpl, seg.s), (1, 0, 1));
        assert_eq!((seg.l, seg.db, seg.g, seg.avl), (1, 0, 1, 0));
        assert_eq!(seg.unusable, 0);

        let seg = kvm_segment_from_gdt(gdt_entry(0x00f3, 0x1234_5678, 0xabcde), 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.selector, 40);
        assert_eq!((seg.dpl, seg.type_, seg.g), (3, 3, 0));

        let tss = kvm_segment_from_gdt(BOOT_GDT_32[3], TSS_INDEX);
        assert_eq!(
            (tss.limit, tss.type_, tss.s, tss.selector),
            (0x67, 0xb, 0, 0x18)
        );

        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn tables_in_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(u64::MAX, GuestAddress(BOOT_IDT_START))
            .unwrap();
        write_boot_tables(&mem, &BOOT_GDT_64).unwrap();
        for (i, want) in BOOT_GDT_64.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *want);
        }
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn tables_outside_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10000), 0x1000)]).unwrap();
        assert!(matches!(
            write_boot_tables(&mem, &BOOT_GDT_32),
            Err(GdtError::WriteGdt(_))
        ));
    }
}
