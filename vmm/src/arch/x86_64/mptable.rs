//! The Intel MultiProcessor Specification 1.4 table.
//!
//! ember guests have no ACPI, so this table is how the guest kernel learns
//! its CPUs (one LAPIC each), the IOAPIC and how ISA IRQs are wired to it.
//! It is written at the EBDA ([`MPTABLE_START`]), where Linux looks for the
//! floating pointer structure.

use std::mem::size_of;

use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{IOAPIC_NUM_PINS, IOAPIC_START, LAPIC_START, MPTABLE_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// A VM needs at least one CPU.
    #[error("the MP table needs at least one CPU")]
    NoCpus,
    /// More CPUs than APIC IDs are left (the IOAPIC takes the ID after the last CPU).
    #[error("{0} CPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// The table does not fit in guest memory.
    #[error("the MP table ({size} bytes at {addr:#x}) does not fit in guest memory")]
    NotEnoughMemory {
        /// Where the table would start.
        addr: u64,
        /// Its size in bytes.
        size: usize,
    },
    /// Writing to guest memory failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

/// Most vCPUs the MP table can describe: APIC IDs are 8 bits, the IOAPIC
/// takes the one after the last CPU and 0xff means "all".
pub const MAX_CPUS: u8 = 254;

// Entry type codes (MP spec 1.4, table 4-3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

// Interrupt types (table 4-8).
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus" (ISA: active high, edge).
const MP_IRQ_FLAGS_DEFAULT: u16 = 0;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const IOAPIC_USABLE: u8 = 1;

/// Version of the local APICs KVM emulates.
const LAPIC_VERSION: u8 = 0x14;
/// Version of the IOAPIC KVM emulates.
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6, model 0, stepping 0. Informational only.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags from CPUID.1:EDX: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_BUS_ID: u8 = 0;
/// Destination APIC ID meaning "every local APIC".
const ALL_APICS: u8 = 0xff;

/// MP floating pointer structure (16 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature1: u8,
    feature2: u8,
    feature3: [u8; 3],
}

/// MP configuration table header (44 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    ext_table_length: u16,
    ext_table_checksum: u8,
    reserved: u8,
}

/// Processor entry (20 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    entry_type: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

/// Bus entry (8 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    entry_type: u8,
    busid: u8,
    bustype: [u8; 6],
}

/// I/O APIC entry (8 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    entry_type: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

/// I/O interrupt assignment entry (8 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    entry_type: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

/// Local interrupt assignment entry (8 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcLintsrc {
    entry_type: u8,
    irqtype: u8,
    irqflag: u16,
    srcbusid: u8,
    srcbusirq: u8,
    destapic: u8,
    destapiclint: u8,
}

// SAFETY: all these structs are `repr(C, packed)` aggregates of integers
// and byte arrays: no padding, no pointers, and every bit pattern is valid.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: see `MpfIntel`.
unsafe impl ByteValued for MpcTable {}
// SAFETY: see `MpfIntel`.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: see `MpfIntel`.
unsafe impl ByteValued for MpcBus {}
// SAFETY: see `MpfIntel`.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: see `MpfIntel`.
unsafe impl ByteValued for MpcIntsrc {}
// SAFETY: see `MpfIntel`.
unsafe impl ByteValued for MpcLintsrc {}

// The sizes the MP specification defines.
const _: () = assert!(size_of::<MpfIntel>() == 16);
const _: () = assert!(size_of::<MpcTable>() == 44);
const _: () = assert!(size_of::<MpcCpu>() == 20);
const _: () = assert!(size_of::<MpcBus>() == 8);
const _: () = assert!(size_of::<MpcIoapic>() == 8);
const _: () = assert!(size_of::<MpcIntsrc>() == 8);
const _: () = assert!(size_of::<MpcLintsrc>() == 8);

/// Number of configuration table entries for `num_cpus` CPUs: the CPUs, one
/// bus, one IOAPIC, one I/O interrupt per IOAPIC pin, two local interrupts.
fn entry_count(num_cpus: u8) -> usize {
    usize::from(num_cpus) + 2 + IOAPIC_NUM_PINS as usize + 2
}

/// Two's complement of the byte sum: the value that makes `bytes` plus it sum to 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the whole table (floating pointer followed by the configuration
/// table) as it must appear in guest memory at `base`.
fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;

    // Entries first: the header needs their length and checksum.
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let bsp = if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        let entry = MpcCpu {
            entry_type: MP_PROCESSOR,
            apicid: cpu,
            apicver: LAPIC_VERSION,
            cpuflag: CPU_ENABLED | bsp,
            cpufeature: CPU_SIGNATURE,
            featureflag: CPU_FEATURES,
            reserved: [0; 2],
        };
        entries.extend_from_slice(entry.as_slice());
    }
    let bus = MpcBus {
        entry_type: MP_BUS,
        busid: ISA_BUS_ID,
        bustype: *b"ISA   ",
    };
    entries.extend_from_slice(bus.as_slice());
    let ioapic = MpcIoapic {
        entry_type: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: IOAPIC_USABLE,
        apicaddr: IOAPIC_START as u32,
    };
    entries.extend_from_slice(ioapic.as_slice());
    // Identity wiring: ISA IRQ n -> IOAPIC pin n, matching KVM's default GSI routing.
    for irq in 0..IOAPIC_NUM_PINS as u8 {
        let intsrc = MpcIntsrc {
            entry_type: MP_INTSRC,
            irqtype: MP_IRQ_INT,
            irqflag: MP_IRQ_FLAGS_DEFAULT,
            srcbus: ISA_BUS_ID,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        entries.extend_from_slice(intsrc.as_slice());
    }
    // The legacy PIC reaches the BSP through LINT0 (virtual wire mode); NMIs reach every CPU on LINT1.
    let extint = MpcLintsrc {
        entry_type: MP_LINTSRC,
        irqtype: MP_IRQ_EXTINT,
        irqflag: MP_IRQ_FLAGS_DEFAULT,
        srcbusid: ISA_BUS_ID,
        srcbusirq: 0,
        destapic: 0,
        destapiclint: 0,
    };
    entries.extend_from_slice(extint.as_slice());
    let nmi = MpcLintsrc {
        entry_type: MP_LINTSRC,
        irqtype: MP_IRQ_NMI,
        irqflag: MP_IRQ_FLAGS_DEFAULT,
        srcbusid: ISA_BUS_ID,
        srcbusirq: 0,
        destapic: ALL_APICS,
        destapiclint: 1,
    };
    entries.extend_from_slice(nmi.as_slice());

    // Bounded by MAX_CPUS: 44 + 254 * 20 + 28 * 8 bytes and 282 entries fit in u16.
    let table_len = size_of::<MpcTable>() + entries.len();
    let mut header = MpcTable {
        signature: *b"PCMP",
        length: table_len as u16,
        spec: 4,
        checksum: 0,
        oem: *b"EMBER   ",
        productid: *b"MICROVM     ",
        oemcount: entry_count(num_cpus) as u16,
        lapic: LAPIC_START as u32,
        ..Default::default()
    };
    let mut sum_input = header.as_slice().to_vec();
    sum_input.extend_from_slice(&entries);
    header.checksum = checksum(&sum_input);

    let table_addr = base + size_of::<MpfIntel>() as u64;
    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        // The table sits in the EBDA, far below 4 GiB.
        physptr: table_addr as u32,
        // In 16-byte paragraphs.
        length: 1,
        specification: 4,
        ..Default::default()
    };
    mpf.checksum = checksum(mpf.as_slice());

    let mut out = Vec::with_capacity(size_of::<MpfIntel>() + table_len);
    out.extend_from_slice(mpf.as_slice());
    out.extend_from_slice(header.as_slice());
    out.extend_from_slice(&entries);
    Ok(out)
}

/// Writes an MP table describing `num_cpus` vCPUs (APIC IDs 0..num_cpus,
/// vCPU 0 the bootstrap processor), an ISA bus, and the IOAPIC (ID
/// `num_cpus`) with ISA IRQs 0..23 wired to its pins 0..23.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    let base = GuestAddress(MPTABLE_START);
    let not_enough = || MptableError::NotEnoughMemory {
        addr: base.raw_value(),
        size: bytes.len(),
    };
    let last = base
        .checked_add(bytes.len() as u64 - 1)
        .ok_or_else(not_enough)?;
    if !vm_memory::GuestMemoryBackend::address_in_range(mem, last) {
        return Err(not_enough());
    }
    mem.write_slice(&bytes, base).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn read_table(mem: &GuestMemoryMmap) -> (MpfIntel, MpcTable, Vec<u8>) {
        let mpf: MpfIntel = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        let table_addr = GuestAddress(u64::from(mpf.physptr));
        let header: MpcTable = mem.read_obj(table_addr).unwrap();
        let mut table = vec![0u8; usize::from(header.length)];
        mem.read_slice(&mut table, table_addr).unwrap();
        (mpf, header, table)
    }

    #[test]
    fn checksums_and_counts() {
        let mem = mem();
        for cpus in [1u8, 2, 7, MAX_CPUS] {
            setup_mptable(&mem, cpus).unwrap();
            let (mpf, header, table) = read_table(&mem);

            assert_eq!(&mpf.signature, b"_MP_");
            assert_eq!(sum(mpf.as_slice()), 0, "floating pointer checksum");
            assert_eq!(u64::from(mpf.physptr), MPTABLE_START + 16);
            assert_eq!(&header.signature, b"PCMP");
            assert_eq!(sum(&table), 0, "configuration table checksum");
            assert_eq!({ header.oemcount }, entry_count(cpus) as u16);
            assert_eq!({ header.lapic }, 0xFEE0_0000);
            assert_eq!(
                usize::from(header.length),
                44 + 20 * usize::from(cpus) + 8 * (2 + 24 + 2)
            );
        }
    }

    #[test]
    fn entries() {
        let mem = mem();
        setup_mptable(&mem, 3).unwrap();
        let (_, header, table) = read_table(&mem);
        let mut off = size_of::<MpcTable>();
        let mut cpus = Vec::new();
        let mut intsrcs = Vec::new();
        let mut lintsrcs = Vec::new();
        let mut ioapic = None;
        for _ in 0..header.oemcount {
            match table[off] {
                MP_PROCESSOR => {
                    cpus.push(MpcCpu::from_slice(&table[off..off + 20]).copied().unwrap());
                    off += 20;
                }
                MP_BUS => {
                    let bus = MpcBus::from_slice(&table[off..off + 8]).copied().unwrap();
                    assert_eq!(&bus.bustype, b"ISA   ");
                    off += 8;
                }
                MP_IOAPIC => {
                    ioapic = MpcIoapic::from_slice(&table[off..off + 8]).copied();
                    off += 8;
                }
                MP_INTSRC => {
                    intsrcs.push(
                        MpcIntsrc::from_slice(&table[off..off + 8])
                            .copied()
                            .unwrap(),
                    );
                    off += 8;
                }
                MP_LINTSRC => {
                    lintsrcs.push(
                        MpcLintsrc::from_slice(&table[off..off + 8])
                            .copied()
                            .unwrap(),
                    );
                    off += 8;
                }
                t => panic!("unexpected entry type {t}"),
            }
        }
        assert_eq!(off, table.len());

        assert_eq!(cpus.len(), 3);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu.apicid), i);
            let bsp = if i == 0 { CPU_BOOTPROCESSOR } else { 0 };
            assert_eq!(cpu.cpuflag, CPU_ENABLED | bsp);
        }
        let ioapic = ioapic.unwrap();
        assert_eq!(ioapic.apicid, 3);
        assert_eq!({ ioapic.apicaddr }, 0xFEC0_0000);
        assert_eq!(intsrcs.len(), 24);
        for (i, src) in intsrcs.iter().enumerate() {
            assert_eq!(src.irqtype, MP_IRQ_INT);
            assert_eq!(usize::from(src.srcbusirq), i);
            assert_eq!(usize::from(src.dstirq), i);
            assert_eq!(src.dstapic, 3);
        }
        assert_eq!(lintsrcs.len(), 2);
        assert_eq!(
            (lintsrcs[0].irqtype, lintsrcs[0].destapiclint),
            (MP_IRQ_EXTINT, 0)
        );
        assert_eq!(
            (lintsrcs[1].irqtype, lintsrcs[1].destapiclint),
            (MP_IRQ_NMI, 1)
        );
    }

    #[test]
    fn cpu_count_limits() {
        let mem = mem();
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
        assert!(matches!(
            setup_mptable(&mem, MAX_CPUS + 1),
            Err(MptableError::TooManyCpus(255))
        ));
        assert!(setup_mptable(&mem, MAX_CPUS).is_ok());
    }

    #[test]
    fn memory_too_small() {
        // RAM ends in the middle of where the table would go.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xa0000)]).unwrap();
        assert!(setup_mptable(&mem, 1).is_ok());
        assert!(matches!(
            setup_mptable(&mem, 100),
            Err(MptableError::NotEnoughMemory { .. })
        ));
    }
}
