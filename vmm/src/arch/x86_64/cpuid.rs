//! The CPUID table a vCPU sees.
//!
//! It starts from what KVM supports (`KVM_GET_SUPPORTED_CPUID`) and then
//! describes ember's topology (one package, one thread per core, a core per
//! vCPU, APIC ID = vCPU index), hides what the guest should not use (PMU,
//! thermal and power management) and, on the PVM host, the features that
//! cost a lot or cannot run there (see `shared/PLATFORM.md`).

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::host::HostKind;

/// Errors building or setting the CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The vCPU count is 0 or larger than ember's topology describes.
    #[error("invalid vCPU count {0} (must be 1..={MAX_VCPUS})")]
    InvalidVcpuCount(u8),
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU index {id} is out of range for {count} vCPUs")]
    InvalidVcpuId {
        /// The vCPU index.
        id: u8,
        /// The vCPU count.
        count: u8,
    },
    /// The table has more entries than `kvm_cpuid2` holds.
    #[error("the CPUID table is too large: {0}")]
    TooManyEntries(#[source] vmm_sys_util::fam::Error),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot get the CPUID KVM supports: {0}")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("cannot set the vCPU's CPUID: {0}")]
    Set(#[source] kvm_ioctls::Error),
}

/// Most vCPUs the topology (and the MP table) describes: APIC IDs are 8
/// bits, the IOAPIC takes one and 0xff is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;

/// Leaf 0x1 EBX: CLFLUSH line size, bits 15..8, in 8-byte units.
const CLFLUSH_LINE_SIZE: u32 = 8;
/// Leaf 0x1 ECX bit 13: CMPXCHG16B.
const LEAF1_ECX_CX16: u32 = 1 << 13;
/// Leaf 0x1 ECX bit 15: perfmon and debug capability (`IA32_PERF_CAPABILITIES`).
const LEAF1_ECX_PDCM: u32 = 1 << 15;
/// Leaf 0x1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x6 EAX bit 2: the APIC timer keeps running in deep C-states.
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaf 0x80000001 EDX bit 27: RDTSCP.
const EXT_EDX_RDTSCP: u32 = 1 << 27;

/// Topology level types of leaves 0xB and 0x1F (ECX bits 15..8).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// KVM's hypervisor signature leaf and its value, "KVMKVMKVM\0\0\0".
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM's paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

/// `KVM_FEATURE_ASYNC_PF` (leaf 0x40000001 EAX bit).
pub const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
/// `KVM_FEATURE_ASYNC_PF_VMEXIT`.
pub const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
/// `KVM_FEATURE_ASYNC_PF_INT`.
pub const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;

/// Gets what KVM supports, the input of [`build_cpuid`]. Call once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)
}

/// Number of APIC ID bits the cores of a `count`-vCPU package take.
fn core_shift(count: u8) -> u32 {
    u32::BITS - u32::from(count.saturating_sub(1)).leading_zeros()
}

/// Replaces bits `lo..=hi` of `reg` with `value` (truncated to the field).
fn set_field(reg: &mut u32, lo: u32, hi: u32, value: u32) {
    let mask = (u32::MAX >> (31 - (hi - lo))) << lo;
    *reg = (*reg & !mask) | ((value << lo) & mask);
}

/// The subleaves of an extended topology leaf (0xB or 0x1F): an SMT level
/// of one thread, a core level holding the `count` vCPUs, then the
/// terminating subleaf. EDX is the x2APIC ID in all of them.
fn topology_subleaves(function: u32, vcpu_id: u8, count: u8) -> [kvm_cpuid_entry2; 3] {
    let subleaf = |index: u32, shift: u32, logical: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: logical,
        ecx: (level_type << 8) | index,
        edx: u32::from(vcpu_id),
        ..Default::default()
    };
    [
        subleaf(0, 0, 1, LEVEL_TYPE_SMT),
        subleaf(1, core_shift(count), u32::from(count), LEVEL_TYPE_CORE),
        subleaf(2, 0, 0, 0),
    ]
}

/// Builds the CPUID table of vCPU `vcpu_id` out of `vcpu_count`, from the
/// table KVM supports.
///
/// - 0x1: initial APIC ID, logical processor count, CLFLUSH size, the
///   hypervisor bit, HTT when there are several vCPUs, no PDCM (no PMU).
/// - 0x4: cores per package; L1/L2 private to a core, L3 shared by all.
/// - 0xB and 0x1F (when KVM lists them): SMT level of 1 thread, core level
///   of `vcpu_count`, x2APIC ID = `vcpu_id`.
/// - 0x6: only ARAT is kept (the LAPIC timer never stops, so the guest
///   needs no broadcast timer); no turbo, HWP or energy controls.
/// - 0xA: zero, no guest PMU.
/// - 0x40000000: "KVMKVMKVM", max leaf 0x40000001; 0x40000001: KVM's features.
/// - On [`HostKind::Pvm`]: no async page faults (restoring their MSR
///   injects a costly wake-up), no RDTSCP and no CMPXCHG16B (the emulator
///   cannot run them in guest kernel mode).
pub fn build_cpuid(
    supported: &CpuId,
    vcpu_id: u8,
    vcpu_count: u8,
    host: HostKind,
) -> Result<CpuId, CpuidError> {
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(CpuidError::InvalidVcpuCount(vcpu_count));
    }
    if vcpu_id >= vcpu_count {
        return Err(CpuidError::InvalidVcpuId {
            id: vcpu_id,
            count: vcpu_count,
        });
    }
    let count = u32::from(vcpu_count);

    // The topology leaves are rebuilt whole below.
    let has_leaf = |f: u32| supported.as_slice().iter().any(|e| e.function == f);
    let topology_leaves: Vec<u32> = [0xB, 0x1F].into_iter().filter(|f| has_leaf(*f)).collect();
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| !topology_leaves.contains(&e.function))
        .copied()
        .collect();
    for function in topology_leaves {
        entries.extend(topology_subleaves(function, vcpu_id, vcpu_count));
    }
    for function in [KVM_CPUID_SIGNATURE, KVM_CPUID_FEATURES] {
        if !entries.iter().any(|e| e.function == function) {
            entries.push(kvm_cpuid_entry2 {
                function,
                ..Default::default()
            });
        }
    }

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                set_field(&mut e.ebx, 8, 15, CLFLUSH_LINE_SIZE);
                set_field(&mut e.ebx, 16, 23, count);
                set_field(&mut e.ebx, 24, 31, u32::from(vcpu_id));
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.ecx &= !LEAF1_ECX_PDCM;
                if vcpu_count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                // PVM forces leaf 0x1 to host values except this bit, and
                // its CPL0 emulator cannot run CMPXCHG16B (SLUB uses it).
                if host == HostKind::Pvm {
                    e.ecx &= !LEAF1_ECX_CX16;
                }
            }
            // Subleaves with cache type 0 (EAX bits 4..0) mean "no more caches".
            0x4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                // Both fields hold "number - 1"; the cores field has 6 bits.
                set_field(&mut e.eax, 26, 31, count.min(64) - 1);
                let sharing = if level <= 2 { 0 } else { count - 1 };
                set_field(&mut e.eax, 14, 25, sharing);
            }
            0x6 => {
                e.eax &= LEAF6_EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xA => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            KVM_CPUID_SIGNATURE => {
                e.eax = KVM_CPUID_FEATURES;
                let word = |i: usize| {
                    u32::from_le_bytes([
                        KVM_SIGNATURE[i],
                        KVM_SIGNATURE[i + 1],
                        KVM_SIGNATURE[i + 2],
                        KVM_SIGNATURE[i + 3],
                    ])
                };
                e.ebx = word(0);
                e.ecx = word(4);
                e.edx = word(8);
            }
            KVM_CPUID_FEATURES if host == HostKind::Pvm => {
                e.eax &= !(KVM_FEATURE_ASYNC_PF
                    | KVM_FEATURE_ASYNC_PF_VMEXIT
                    | KVM_FEATURE_ASYNC_PF_INT);
            }
            0x8000_0001 if host == HostKind::Pvm => {
                e.edx &= !EXT_EDX_RDTSCP;
            }
            _ => {}
        }
    }

    CpuId::from_entries(&entries).map_err(CpuidError::TooManyEntries)
}

/// Sets `cpuid` as `vcpu`'s CPUID table (`KVM_SET_CPUID2`). Must happen
/// before the vCPU first runs.
pub fn set_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuidError> {
    vcpu.set_cpuid2(cpuid).map_err(CpuidError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 0x4 || function == 0xB || function == 0x1F {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A table shaped like KVM's on an Intel host, with every bit set in the
    /// registers the rules touch, so cleared bits show.
    fn supported() -> CpuId {
        let ones = [u32::MAX; 4];
        CpuId::from_entries(&[
            entry(0x0, 0, [0x1F, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(0x1, 0, [0x806f2, 0x0000_00ff, 0x7fff_ffff, 0xefff_ffff]),
            // L1d, L2, L3, terminator.
            entry(0x4, 0, [0xfc00_4121, 0, 0, 0]),
            entry(0x4, 1, [0xfc00_4143, 0, 0, 0]),
            entry(0x4, 2, [0xfc00_4163, 0, 0, 0]),
            entry(0x4, 3, [0, 0, 0, 0]),
            entry(0x6, 0, ones),
            entry(0xA, 0, ones),
            entry(0xB, 0, [1, 2, 0x100, 7]),
            entry(0xB, 1, [4, 16, 0x201, 7]),
            entry(0x1F, 0, [1, 2, 0x100, 7]),
            entry(KVM_CPUID_SIGNATURE, 0, [0x4000_0001, 0, 0, 0]),
            entry(KVM_CPUID_FEATURES, 0, [0x0100_7eff, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    fn build(id: u8, count: u8, host: HostKind) -> CpuId {
        build_cpuid(&supported(), id, count, host).unwrap()
    }

    #[test]
    fn shift() {
        let shifts: Vec<u32> = [1u8, 2, 3, 4, 5, 8, 9, 128, 129, 254]
            .iter()
            .map(|c| core_shift(*c))
            .collect();
        assert_eq!(shifts, vec![0, 1, 2, 2, 3, 3, 4, 7, 8, 8]);
    }

    #[test]
    fn field() {
        let mut r = u32::MAX;
        set_field(&mut r, 16, 23, 3);
        assert_eq!(r, 0xff03_ffff);
        set_field(&mut r, 0, 31, 5);
        assert_eq!(r, 5);
        set_field(&mut r, 26, 31, 0x7f);
        assert_eq!(r, 0xfc00_0005);
    }

    #[test]
    fn leaf_1() {
        let l = find(&build(2, 3, HostKind::Kvm), 0x1, 0);
        assert_eq!(l.ebx >> 24, 2, "initial APIC ID");
        assert_eq!((l.ebx >> 16) & 0xff, 3, "logical processors");
        assert_eq!((l.ebx >> 8) & 0xff, 8, "CLFLUSH size");
        assert_eq!(l.ebx & 0xff, 0xff, "brand index kept");
        assert_ne!(l.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l.ecx & LEAF1_ECX_PDCM, 0);
        assert_ne!(l.edx & LEAF1_EDX_HTT, 0);

        let l = find(&build(0, 1, HostKind::Kvm), 0x1, 0);
        assert_eq!(l.ebx >> 16, 1);
        assert_eq!(l.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf_4() {
        let c = build(0, 6, HostKind::Kvm);
        for (index, sharing) in [(0, 0), (1, 0), (2, 5)] {
            let l = find(&c, 0x4, index);
            assert_eq!(l.eax >> 26, 5, "cores per package - 1, subleaf {index}");
            assert_eq!((l.eax >> 14) & 0xfff, sharing, "sharing, subleaf {index}");
            assert_eq!(l.eax & 0x3fff, [0x121, 0x143, 0x163][index as usize]);
        }
        assert_eq!(find(&c, 0x4, 3).eax, 0);
    }

    #[test]
    fn topology_leaves() {
        let c = build(5, 6, HostKind::Kvm);
        for function in [0xB, 0x1F] {
            let subleaves: Vec<_> = c
                .as_slice()
                .iter()
                .filter(|e| e.function == function)
                .collect();
            assert_eq!(subleaves.len(), 3, "leaf {function:#x}");
            let smt = find(&c, function, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            let core = find(&c, function, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = find(&c, function, 2);
            assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5));
            for s in subleaves {
                assert_eq!(s.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            }
        }
        // A single vCPU: the core level holds one core, shift 0.
        let core = find(&build(0, 1, HostKind::Kvm), 0xB, 1);
        assert_eq!((core.eax, core.ebx), (0, 1));
    }

    #[test]
    fn topology_leaf_not_invented() {
        let only_basic = CpuId::from_entries(&[entry(0x1, 0, [0; 4])]).unwrap();
        let c = build_cpuid(&only_basic, 0, 2, HostKind::Kvm).unwrap();
        assert!(!c
            .as_slice()
            .iter()
            .any(|e| e.function == 0xB || e.function == 0x1F));
        // The hypervisor leaves are always there.
        assert_eq!(find(&c, KVM_CPUID_SIGNATURE, 0).eax, KVM_CPUID_FEATURES);
        assert_eq!(find(&c, KVM_CPUID_FEATURES, 0).eax, 0);
    }

    #[test]
    fn power_and_pmu_leaves() {
        let c = build(0, 1, HostKind::Kvm);
        let l6 = find(&c, 0x6, 0);
        assert_eq!((l6.eax, l6.ebx, l6.ecx, l6.edx), (LEAF6_EAX_ARAT, 0, 0, 0));
        let la = find(&c, 0xA, 0);
        assert_eq!((la.eax, la.ebx, la.ecx, la.edx), (0, 0, 0, 0));
    }

    #[test]
    fn hypervisor_leaves() {
        let c = build(0, 1, HostKind::Kvm);
        let sig = find(&c, KVM_CPUID_SIGNATURE, 0);
        assert_eq!(sig.eax, 0x4000_0001);
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name, b"KVMKVMKVM\0\0\0");
        // On hardware KVM, the features are KVM's own.
        assert_eq!(find(&c, KVM_CPUID_FEATURES, 0).eax, 0x0100_7eff);
        assert_ne!(find(&c, 0x8000_0001, 0).edx & EXT_EDX_RDTSCP, 0);
    }

    #[test]
    fn pvm_rules() {
        let c = build(0, 2, HostKind::Pvm);
        let features = find(&c, KVM_CPUID_FEATURES, 0).eax;
        assert_eq!(features & KVM_FEATURE_ASYNC_PF, 0);
        assert_eq!(features & KVM_FEATURE_ASYNC_PF_VMEXIT, 0);
        assert_eq!(features & KVM_FEATURE_ASYNC_PF_INT, 0);
        assert_eq!(
            features,
            0x0100_7eff
                & !(KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_VMEXIT | KVM_FEATURE_ASYNC_PF_INT)
        );
        assert_eq!(find(&c, 0x1, 0).ecx & LEAF1_ECX_CX16, 0);
        let ext = find(&c, 0x8000_0001, 0);
        assert_eq!(ext.edx & EXT_EDX_RDTSCP, 0);
        assert_eq!(ext.edx, 0x2c10_0800 & !EXT_EDX_RDTSCP);
        assert_eq!(ext.ecx, 0x121);
    }

    #[test]
    fn invalid_counts() {
        let s = supported();
        assert!(matches!(
            build_cpuid(&s, 0, 0, HostKind::Kvm),
            Err(CpuidError::InvalidVcpuCount(0))
        ));
        assert!(matches!(
            build_cpuid(&s, 0, 255, HostKind::Kvm),
            Err(CpuidError::InvalidVcpuCount(255))
        ));
        assert!(matches!(
            build_cpuid(&s, 2, 2, HostKind::Kvm),
            Err(CpuidError::InvalidVcpuId { id: 2, count: 2 })
        ));
        assert!(build_cpuid(&s, 253, 254, HostKind::Kvm).is_ok());
    }

    #[test]
    fn other_leaves_untouched() {
        let c = build(1, 2, HostKind::Pvm);
        assert_eq!(find(&c, 0x0, 0), find(&supported(), 0x0, 0));
    }

    #[test]
    fn on_kvm() {
        let kvm = Kvm::new().unwrap();
        let supported = supported_cpuid(&kvm).unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(1).unwrap();
        let cpuid = build_cpuid(&supported, 1, 2, HostKind::detect()).unwrap();
        set_cpuid(&vcpu, &cpuid).unwrap();
        let got = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = find(&got, 0x1, 0);
        assert_eq!(leaf1.ebx >> 24, 1);
    }
}
