//! Saving and restoring the KVM state of x86_64 vCPUs and of the VM (the
//! in-kernel PIC, IOAPIC, PIT and kvm-clock), for snapshots.
//!
//! Saving needs the vCPUs paused (out of `KVM_RUN`): every `KVM_GET_*` here
//! reads what KVM holds for a vCPU that is not running. Restoring needs a
//! fresh VM with guest memory registered (before the irqchip, see
//! `shared/PLATFORM.md`), the in-kernel irqchip and the PIT created, and
//! fresh vCPUs that have never run. The order of calls is:
//!
//! 1. `kvm.create_vm()`, `arch::setup_vm`, register memory, create the
//!    irqchip and PIT2 (same `kvm_pit_config` as the snapshotted VM).
//! 2. [`restore_vm`] (interrupt controllers, PIT, clock).
//! 3. For each vCPU: `vm.create_vcpu(id)` and [`restore_vcpu`].
//!
//! Restoring does not call [`saveable_msrs`]: the MSR list travels in the
//! state, so a restore costs only the `KVM_SET_*` ioctls.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring vCPU or VM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl, e.g. `KVM_GET_REGS`.
        op: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A list does not fit KVM's flexible-array structure.
    #[error("cannot build the {what} list for KVM: {source}")]
    Fam {
        /// `MSR` or `CPUID`.
        what: &'static str,
        /// Why it does not fit.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the list.
    #[error("KVM restored only {set} of {total} MSRs; it refused MSR {index:#x} = {value:#x}")]
    MsrRejected {
        /// How many MSRs KVM accepted.
        set: usize,
        /// How many were given.
        total: usize,
        /// The first MSR KVM refused.
        index: u32,
        /// Its value.
        value: u64,
    },
    /// The saved XSAVE area is not the 4 KiB `kvm_xsave` this VMM restores.
    #[error("the saved XSAVE area has {0} words, expected 1024 (4 KiB)")]
    XsaveSize(usize),
}

/// What `KVM_GET_*` calls on one vCPU return: everything a paused x86_64
/// vCPU needs to resume where it stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87, SSE, AVX, ... state) as `kvm_xsave`'s 1024
    /// 32-bit words. Used instead of `KVM_GET_FPU`, which misses MXCSR on
    /// PVM hosts and all AVX state everywhere.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// DR0-DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// The in-kernel local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending or injected exceptions, interrupts, NMI, SMM state.
    pub vcpu_events: kvm_vcpu_events,
    /// MSR index and value pairs, in restore order.
    pub msrs: Vec<(u32, u64)>,
    /// The vCPU's CPUID table.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The vCPU's TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// An in-kernel interrupt controller's state (`kvm_irqchip`, which has no
/// `Debug` of its own).
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IrqchipState(pub kvm_irqchip);

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The payload is a union of chip layouts; its id says which.
        f.debug_struct("IrqchipState")
            .field("chip_id", &self.0.chip_id)
            .finish_non_exhaustive()
    }
}

/// VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT and the
/// kvm-clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: IrqchipState,
    /// The slave 8259 PIC.
    pub pic_slave: IrqchipState,
    /// The IOAPIC.
    pub ioapic: IrqchipState,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvm-clock (guest nanoseconds since boot).
    pub clock: kvm_clock_data,
}

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: compared against the guest TSC, so restored after it.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Legacy kvm-clock wall clock MSR (shares its state with the `_NEW` one).
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// Legacy kvm-clock system time MSR (shares its state with the `_NEW` one).
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// kvm-clock wall clock: writing it makes KVM write the wall clock at the
/// guest physical address it holds.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvm-clock per-vCPU time info page.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// KVM async page faults: enable and shared area.
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// KVM async page faults: the interrupt vector for "page ready".
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// `IA32_PRED_CMD`: a write-only command (IBPB).
const MSR_IA32_PRED_CMD: u32 = 0x49;
/// `IA32_FLUSH_CMD`: a write-only command (L1D flush).
const MSR_IA32_FLUSH_CMD: u32 = 0x10b;

/// MSR ranges (inclusive) never saved, whatever KVM lists:
const EXCLUDED_MSRS: &[(u32, u32, &str)] = &[
    // Duplicates: reads return the same KVM state as MSR_KVM_*_NEW, which
    // is restored through those.
    (MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME, "legacy kvm-clock"),
    // Write-only commands: nothing to read back.
    (MSR_IA32_PRED_CMD, MSR_IA32_PRED_CMD, "command"),
    (MSR_IA32_FLUSH_CMD, MSR_IA32_FLUSH_CMD, "command"),
    // Nested-virtualization capabilities (IA32_VMX_*): read-only feature
    // reports, and ember gives the guest no VMX.
    (0x480, 0x491, "VMX capability"),
    // x2APIC registers: the LAPIC state is saved whole with KVM_GET_LAPIC.
    (0x800, 0x8ff, "x2APIC"),
    // Hyper-V synthetic MSRs: ember enables no Hyper-V enlightenment.
    (0x4000_0000, 0x4000_00ff, "Hyper-V"),
];

/// MSRs saved although `KVM_GET_MSR_INDEX_LIST` does not list them: the
/// MTRRs (KVM emulates them but lists none, and ember's boot code sets
/// `IA32_MTRR_DEF_TYPE`, so a fresh vCPU would differ): default type, the
/// eleven fixed-range MTRRs and KVM's eight variable-range pairs. Those a
/// vCPU without the MTRR CPUID bit cannot read are dropped by [`save_vcpu`].
const EXTRA_MSRS: &[u32] = &[
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x250, 0x258, 0x259, // fixed 64K, 16K
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // fixed 4K
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // variable 0-3
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f, // variable 4-7
];

fn excluded(index: u32) -> bool {
    EXCLUDED_MSRS
        .iter()
        .any(|&(first, last, _)| (first..=last).contains(&index))
}

/// Rank of an MSR in restore order; a stable sort by it keeps KVM's order
/// otherwise.
fn restore_rank(index: u32) -> u8 {
    match index {
        // TSC_DEADLINE is an absolute guest-TSC value: with the TSC not yet
        // restored, KVM would arm the timer against the fresh vCPU's TSC.
        MSR_IA32_TSC => 0,
        // The vector first, so the "wake all" KVM queues when async PF is
        // enabled goes to the guest's vector.
        MSR_KVM_ASYNC_PF_INT => 1,
        MSR_IA32_TSC_DEADLINE => 3,
        _ => 2,
    }
}

/// Sorts MSR indices into restore order (see [`restore_rank`]).
fn order_for_restore<T>(items: &mut [T], index: impl Fn(&T) -> u32) {
    items.sort_by_key(|item| restore_rank(index(item)));
}

/// The MSRs a snapshot saves: `KVM_GET_MSR_INDEX_LIST` less those listed in
/// `EXCLUDED_MSRS` (legacy kvm-clock duplicates, write-only commands, VMX
/// capabilities, x2APIC registers, Hyper-V), plus the MTRRs (`EXTRA_MSRS`),
/// in restore order (`IA32_TSC` first, `IA32_TSC_DEADLINE` last).
///
/// Some listed MSRs exist only with CPUID features the vCPU lacks (PMU,
/// MCE control, ...); [`save_vcpu`] drops those when KVM will not read them.
/// Computed once per process.
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    static CACHE: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = CACHE.get() {
        return Ok(list.clone());
    }
    let list = kvm.get_msr_index_list().map_err(|source| StateError::Kvm {
        op: "KVM_GET_MSR_INDEX_LIST",
        source,
    })?;
    let mut msrs: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&index| !excluded(index))
        .collect();
    for &extra in EXTRA_MSRS {
        if !msrs.contains(&extra) {
            msrs.push(extra);
        }
    }
    order_for_restore(&mut msrs, |&index| index);
    // A racing thread may have filled the cache; both lists are the same.
    Ok(CACHE.get_or_init(|| msrs).clone())
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, source }
}

/// The vCPU's TSC as the guest reads it.
pub fn read_tsc(vcpu: &VcpuFd) -> Result<u64, StateError> {
    read_msrs(vcpu, &[MSR_IA32_TSC])?
        .first()
        .map(|m| m.1)
        .ok_or(StateError::MsrRejected {
            set: 0,
            total: 1,
            index: MSR_IA32_TSC,
            value: 0,
        })
}

/// Reads `indices` with as few `KVM_GET_MSRS` calls as possible: one when
/// KVM reads them all. KVM stops at the first MSR it refuses and returns
/// how many it read; that one is dropped and reading goes on after it.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| StateError::Fam {
            what: "MSR",
            source,
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let read = read.min(rest.len());
        out.extend(
            msrs.as_slice()
                .iter()
                .take(read)
                .map(|entry| (entry.index, entry.data)),
        );
        if let Some(&refused) = rest.get(read) {
            // Listed by KVM but not readable for this vCPU (e.g. PMU
            // counters with the PMU hidden in CPUID): the guest cannot use
            // it either, so there is no state to keep.
            log::debug!("MSR {refused:#x} is not readable on this vCPU; not saved");
            rest = rest.get(read + 1..).unwrap_or(&[]);
        } else {
            rest = &[];
        }
    }
    Ok(out)
}

/// Saves the state of a paused vCPU. `msrs` is the list to save, normally
/// [`saveable_msrs`]; those KVM cannot read for this vCPU are left out.
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, StateError> {
    // MP state first: KVM_GET_MP_STATE makes KVM process a pending INIT or
    // SIPI, which can change the registers read after it.
    let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    // KVM_GET_XSAVE fails (EINVAL) rather than truncate when the guest's
    // XSAVE area is larger than 4 KiB, which needs dynamic features (AMX)
    // this process never asks for.
    let xsave = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debug_regs = vcpu
        .get_debug_regs()
        .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(vcpu, msrs)?;
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    // Not every KVM reports it (it needs KVM_CAP_GET_TSC_KHZ).
    let tsc_khz = vcpu.get_tsc_khz().ok();
    Ok(VcpuState {
        regs,
        sregs,
        xsave: xsave.region.to_vec(),
        xcrs,
        debug_regs,
        lapic,
        mp_state,
        vcpu_events,
        msrs,
        cpuid,
        tsc_khz,
    })
}

/// Whether a saved MSR is written back on restore.
fn restorable(index: u32, value: u64) -> bool {
    // The wall clock MSR holds a guest physical address that KVM writes the
    // wall clock to on every write. 0 means the guest never set it, and
    // writing 0 would make KVM scribble over guest page 0.
    !(index == MSR_KVM_WALL_CLOCK_NEW && value == 0)
}

/// Restores a vCPU saved by [`save_vcpu`] into a fresh vCPU (created on a
/// VM with the in-kernel irqchip, never run).
///
/// The order matters to KVM:
/// 1. CPUID: KVM checks much of what follows against it (CR4 bits in
///    sregs, XCR0 and XSAVE components, which MSRs exist, LAPIC timer
///    modes, KVM paravirtual features).
/// 2. TSC frequency, before anything reads or writes the TSC.
/// 3. MP state, early: KVM_SET_VCPU_EVENTS (last) may latch an INIT or set
///    the SIPI vector, which must land on the restored MP state.
/// 4. regs, then sregs: sregs sets CR0/CR4/EFER and the APIC base, whose
///    x2APIC mode decides how KVM_SET_LAPIC reads the APIC ID.
/// 5. XSAVE, XCRs, debug registers.
/// 6. LAPIC, before the MSRs: KVM ignores a TSC_DEADLINE write unless the
///    LAPIC timer is already in TSC-deadline mode.
/// 7. MSRs, IA32_TSC first and TSC_DEADLINE last; all must be accepted.
/// 8. vCPU events last, so no earlier call clears or overrides a pending
///    exception, NMI or interrupt.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|source| StateError::Fam {
        what: "CPUID",
        source,
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    if let Some(saved) = state.tsc_khz {
        match vcpu.get_tsc_khz() {
            Ok(current) if current != saved => {
                // Needs KVM_CAP_TSC_CONTROL (absent on PVM hosts). Without it
                // the guest's TSC runs at this host's rate; kvm-clock, which
                // Linux keeps time with, scales correctly regardless.
                if let Err(e) = vcpu.set_tsc_khz(saved) {
                    log::warn!(
                        "snapshot TSC is {saved} kHz, this host's {current} kHz, \
                         and KVM cannot scale it ({e}); guest TSC rate differs"
                    );
                }
            }
            _ => {}
        }
    }

    load_vcpu_registers(vcpu, state)
}

/// Everything of [`restore_vcpu`] but CPUID and the TSC frequency (steps
/// 3-8): what resetting a vCPU that already runs with the snapshot's CPUID
/// needs (KVM refuses a different CPUID once a vCPU ran, and setting the
/// same one again costs ~0.1 ms on PVM hosts).
pub fn load_vcpu_registers(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs)
        .map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kvm_err("KVM_SET_SREGS"))?;

    let mut xsave = kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(StateError::XsaveSize(state.xsave.len()));
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: KVM_SET_XSAVE reads the guest's XSAVE size, which exceeds the
    // 4 KiB of `kvm_xsave` only for dynamically enabled features (AMX) that
    // need arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM); ember never requests them,
    // so KVM reads exactly this struct.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(kvm_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(kvm_err("KVM_SET_LAPIC"))?;

    let mut entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .filter(|&&(index, value)| restorable(index, value))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // Saved lists are already in this order; a state file written by other
    // code may not be.
    order_for_restore(&mut entries, |entry| entry.index);
    let msrs = Msrs::from_entries(&entries).map_err(|source| StateError::Fam {
        what: "MSR",
        source,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        let refused = entries.get(set).copied().unwrap_or_default();
        return Err(StateError::MsrRejected {
            set,
            total: entries.len(),
            index: refused.index,
            value: refused.data,
        });
    }

    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<IrqchipState, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(IrqchipState(chip))
}

/// Saves the VM-wide state: PICs, IOAPIC, PIT and kvm-clock. The vCPUs
/// must be paused.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores [`save_vm`]'s state into a fresh VM whose irqchip and PIT2
/// exist already.
///
/// With `restore_pit` false the PIT stays as KVM created it, disarmed: a
/// restored PIT re-arms its timer, and on PVM hosts the IRQ0 it then raises
/// costs tens of milliseconds of emulated guest-kernel time, while Linux
/// keeps time with the LAPIC and kvm-clock (see `shared/PLATFORM.md`).
///
/// The clock is set to the saved kvm-clock value, so the guest's monotonic
/// clock continues from the snapshot instant; wall-clock time is the
/// agent's job after the restore.
pub fn restore_vm(vm: &VmFd, state: &VmState, restore_pit: bool) -> Result<(), StateError> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(&chip.0)
            .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    if restore_pit {
        vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    }
    // KVM_GET_CLOCK reports flags (TSC_STABLE, REALTIME, HOST_TSC) that
    // KVM_SET_CLOCK rejects on older kernels; and with REALTIME it would
    // advance the clock by the snapshot's age. Only the value is restored.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    use super::*;
    use crate::arch::x86_64::{build_cpuid, set_cpuid, setup_msrs, supported_cpuid};
    use crate::host::HostKind;

    /// A VM as the VMM builds one: memory, irqchip, PIT2, one vCPU.
    struct TestVm {
        vcpu: VcpuFd,
        vm: VmFd,
        _mem: GuestMemoryMmap,
    }

    fn test_vm(kvm: &Kvm) -> TestVm {
        let vm = kvm.create_vm().unwrap();
        crate::arch::x86_64::setup_vm(&vm).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: `mem` lives in the returned TestVm, dropped after the VM.
            unsafe { vm.set_user_memory_region(region).unwrap() };
        }
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        TestVm {
            vcpu,
            vm,
            _mem: mem,
        }
    }

    fn msr_value(state: &VcpuState, index: u32) -> Option<u64> {
        state.msrs.iter().find(|m| m.0 == index).map(|m| m.1)
    }

    #[test]
    fn saveable_msrs_are_ordered_and_filtered() {
        let kvm = Kvm::new().unwrap();
        let msrs = saveable_msrs(&kvm).unwrap();
        assert!(!msrs.is_empty());
        assert_eq!(msrs.first(), Some(&MSR_IA32_TSC));
        if msrs.contains(&MSR_IA32_TSC_DEADLINE) {
            assert_eq!(msrs.last(), Some(&MSR_IA32_TSC_DEADLINE));
        }
        assert!(msrs.iter().all(|&m| !excluded(m)));
        assert!(msrs.contains(&MSR_KVM_SYSTEM_TIME_NEW));
        assert!(msrs.contains(&crate::arch::x86_64::msr::MSR_MTRR_DEF_TYPE));
        // Cached: the same list again.
        assert_eq!(saveable_msrs(&kvm).unwrap(), msrs);
        let all = kvm.get_msr_index_list().unwrap();
        let dropped: Vec<String> = all
            .as_slice()
            .iter()
            .filter(|m| !msrs.contains(m))
            .map(|m| format!("{m:#x}"))
            .collect();
        println!(
            "{} MSRs listed by KVM, {} saveable; excluded: {dropped:?}",
            all.as_slice().len(),
            msrs.len()
        );
    }

    #[test]
    fn vcpu_and_vm_round_trip() {
        let kvm = Kvm::new().unwrap();
        let msr_list = saveable_msrs(&kvm).unwrap();
        let supported = supported_cpuid(&kvm).unwrap();

        let a = test_vm(&kvm);
        let cpuid = build_cpuid(&supported, 0, 1, HostKind::detect()).unwrap();
        set_cpuid(&a.vcpu, &cpuid).unwrap();
        setup_msrs(&a.vcpu).unwrap();
        let mut regs = a.vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.r15 = 42;
        regs.rip = 0x10_0000;
        regs.rflags = 0x2;
        a.vcpu.set_regs(&regs).unwrap();
        let mut sregs = a.vcpu.get_sregs().unwrap();
        sregs.cr0 |= 0x1; // protected mode
        sregs.gdt.base = 0x500;
        sregs.gdt.limit = 0x1f;
        a.vcpu.set_sregs(&sregs).unwrap();
        let lstar = kvm_msr_entry {
            index: crate::arch::x86_64::msr::MSR_LSTAR,
            data: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        assert_eq!(
            a.vcpu
                .set_msrs(&Msrs::from_entries(&[lstar]).unwrap())
                .unwrap(),
            1
        );

        let vm_state = save_vm(&a.vm).unwrap();
        let saved = save_vcpu(&a.vcpu, &msr_list).unwrap();
        assert_eq!(saved.regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(msr_value(&saved, lstar.index), Some(lstar.data));
        // Set at boot by setup_msrs, not listed by KVM: saved all the same.
        assert_eq!(
            msr_value(&saved, crate::arch::x86_64::msr::MSR_MTRR_DEF_TYPE),
            Some(0x806)
        );
        println!(
            "saved {} of {} MSRs; not readable: {:?}",
            saved.msrs.len(),
            msr_list.len(),
            msr_list
                .iter()
                .filter(|&&m| msr_value(&saved, m).is_none())
                .map(|m| format!("{m:#x}"))
                .collect::<Vec<_>>()
        );

        // The state survives serialization.
        let bytes = postcard::to_stdvec(&(&saved, &vm_state)).unwrap();
        let (saved, vm_state): (VcpuState, VmState) = postcard::from_bytes(&bytes).unwrap();
        println!("serialized vCPU + VM state: {} bytes", bytes.len());

        let b = test_vm(&kvm);
        restore_vm(&b.vm, &vm_state, true).unwrap();
        restore_vcpu(&b.vcpu, &saved).unwrap();
        let again = save_vcpu(&b.vcpu, &msr_list).unwrap();
        let vm_again = save_vm(&b.vm).unwrap();

        assert_eq!(again.regs, saved.regs);
        for (name, x, y) in [
            ("cr0", again.sregs.cr0, saved.sregs.cr0),
            ("cr3", again.sregs.cr3, saved.sregs.cr3),
            ("cr4", again.sregs.cr4, saved.sregs.cr4),
            ("efer", again.sregs.efer, saved.sregs.efer),
            ("apic_base", again.sregs.apic_base, saved.sregs.apic_base),
            ("gdt.base", again.sregs.gdt.base, saved.sregs.gdt.base),
        ] {
            assert_eq!(x, y, "sregs.{name}");
        }
        assert_eq!(again.sregs.cs, saved.sregs.cs);
        assert_eq!(again.xsave, saved.xsave);
        assert_eq!(again.xcrs, saved.xcrs);
        assert_eq!(again.mp_state, saved.mp_state);
        assert_eq!(again.lapic.regs, saved.lapic.regs);
        assert_eq!(again.cpuid, saved.cpuid);
        // Every MSR but the TSC (which ticked) reads back as saved.
        let differ: Vec<String> = saved
            .msrs
            .iter()
            .filter(|&&(index, value)| {
                index != MSR_IA32_TSC && msr_value(&again, index) != Some(value)
            })
            .map(|&(index, value)| {
                format!("{index:#x}: {value:#x} -> {:x?}", msr_value(&again, index))
            })
            .collect();
        assert!(differ.is_empty(), "MSRs differ after restore: {differ:?}");
        // The restored TSC continued from the saved one, not from zero.
        let (tsc0, tsc1) = (
            msr_value(&saved, MSR_IA32_TSC).unwrap(),
            msr_value(&again, MSR_IA32_TSC).unwrap(),
        );
        println!("IA32_TSC saved {tsc0}, after restore {tsc1}");

        for (x, y) in vm_again.pit.channels.iter().zip(&vm_state.pit.channels) {
            // count_load_time is host ktime at load; KVM rebases it on restore.
            assert_eq!((x.count, x.mode, x.gate), (y.count, y.mode, y.gate));
        }
        // SAFETY: `pic` is the union member for the PIC chip ids.
        unsafe {
            assert_eq!(
                format!("{:?}", vm_again.pic_master.0.chip.pic),
                format!("{:?}", vm_state.pic_master.0.chip.pic)
            );
        }
        // The clock continues from the snapshot (it runs, so only >=).
        assert!(vm_again.clock.clock >= vm_state.clock.clock);
    }

    #[test]
    fn restore_without_pit_leaves_it_disarmed() {
        let kvm = Kvm::new().unwrap();
        let a = test_vm(&kvm);
        let mut pit = a.vm.get_pit2().unwrap();
        // Channel 0 in mode 2 (rate generator), as a guest kernel leaves it.
        pit.channels[0].mode = 2;
        pit.channels[0].count = 1193;
        a.vm.set_pit2(&pit).unwrap();
        let state = save_vm(&a.vm).unwrap();
        assert_eq!(state.pit.channels[0].mode, 2);

        let b = test_vm(&kvm);
        let fresh = b.vm.get_pit2().unwrap();
        restore_vm(&b.vm, &state, false).unwrap();
        assert_eq!(
            b.vm.get_pit2().unwrap().channels[0].mode,
            fresh.channels[0].mode
        );
        let c = test_vm(&kvm);
        restore_vm(&c.vm, &state, true).unwrap();
        assert_eq!(c.vm.get_pit2().unwrap().channels[0].mode, 2);
    }

    #[test]
    fn wrong_xsave_size_is_an_error() {
        let kvm = Kvm::new().unwrap();
        let a = test_vm(&kvm);
        let mut state = save_vcpu(&a.vcpu, &saveable_msrs(&kvm).unwrap()).unwrap();
        state.xsave.truncate(10);
        let b = test_vm(&kvm);
        assert!(matches!(
            restore_vcpu(&b.vcpu, &state),
            Err(StateError::XsaveSize(10))
        ));
    }

    /// How long one vCPU takes to save and to restore here. Run with
    /// `--nocapture` to see the numbers.
    #[test]
    fn vcpu_save_restore_timing() {
        let kvm = Kvm::new().unwrap();
        let msr_list = saveable_msrs(&kvm).unwrap();
        let supported = supported_cpuid(&kvm).unwrap();
        let a = test_vm(&kvm);
        let cpuid = build_cpuid(&supported, 0, 1, HostKind::detect()).unwrap();
        set_cpuid(&a.vcpu, &cpuid).unwrap();
        setup_msrs(&a.vcpu).unwrap();
        let saved = save_vcpu(&a.vcpu, &msr_list).unwrap();

        const ROUNDS: u32 = 20;
        let mut save = std::time::Duration::ZERO;
        let mut restore = std::time::Duration::ZERO;
        let mut restore_vm_time = std::time::Duration::ZERO;
        let vm_state = save_vm(&a.vm).unwrap();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            let _ = save_vcpu(&a.vcpu, &msr_list).unwrap();
            save += start.elapsed();

            let b = test_vm(&kvm);
            let start = Instant::now();
            restore_vm(&b.vm, &vm_state, false).unwrap();
            restore_vm_time += start.elapsed();
            let start = Instant::now();
            restore_vcpu(&b.vcpu, &saved).unwrap();
            restore += start.elapsed();
        }
        println!(
            "one vCPU ({} MSRs): save {:?}, restore {:?}; restore_vm {:?} (mean of {ROUNDS})",
            saved.msrs.len(),
            save / ROUNDS,
            restore / ROUNDS,
            restore_vm_time / ROUNDS
        );
    }
}
