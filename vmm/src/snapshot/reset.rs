//! Resetting a clone in place: after an invocation, a [`ResettableClone`]
//! is returned to its template's exact state (guest memory, every vCPU
//! register, the interrupt controllers, the PIT and the clock) without
//! destroying the VM, so the next invocation pays for what the last one
//! dirtied rather than for a new VM.
//!
//! **Memory.** The clone's memory is the template's `memory` file mapped
//! copy-on-write, and KVM logs the pages the guest writes (manual-protect
//! mode: reading the log re-protects nothing). The VMM records the pages
//! it writes itself (a request, a key). A reset copies the template's
//! content back into exactly those pages, then re-arms the log for them.
//! Pages keep their host and KVM mappings, so the next invocation takes no
//! fault on pages it touched before: cost follows the pages dirtied, not
//! the guest's size.
//!
//! **Devices** are not reset: a reset requires their state to equal the
//! template's (before and after the memory copy, so nothing ran in
//! between) and fails otherwise. An invocation that used a device (the
//! vsock path, a disk read) changed queue indices, and its clone is
//! destroyed by its owner, never reused.
//!
//! **Shadow paging.** Without EPT/NPT (PVM hosts, or `ept=0`), KVM builds
//! shadow page tables from the guest's and keeps them in sync by trapping
//! the guest's writes to them. Copying page-table pages back from the
//! host bypasses that, so a mapping the last invocation made could
//! survive in KVM's shadow. Page tables change only when the guest kernel
//! runs (a pure user-mode invocation on the hot path changes only
//! accessed/dirty bits, which KVM sets and which the warm-up already set
//! for the pages a handler uses). So the reset reads KVM's statistics: if
//! the guest kernel ran during the invocation (emulated instructions
//! beyond the doorbell's, guest page faults, injected interrupts, trapped
//! page-table writes), it drops and re-adds the memory slots, which makes
//! KVM discard every shadow page; the next invocation rebuilds them from
//! the restored tables. On hosts with EPT/NPT the CPU walks the guest's
//! tables in guest memory, so restored content is what it reads; stale
//! translations can only be in the guest's TLB (tagged by VPID/ASID, so a
//! VM entry keeps them). The reset makes KVM drop them: it loads the
//! control registers through a CR4 with PGE flipped, so `KVM_SET_SREGS`
//! sees a change and resets the vCPU's MMU context, and KVM loads the root
//! again with a flush of the guest's TLB before the next entry
//! (`kvm_mmu_load`). On shadow-paging hosts the same reload also re-syncs
//! the shadow pages KVM had let the guest write without trapping
//! ("unsync" leaf tables) against the restored memory.
//!
//! **Verification** ([`ResettableClone::verify`]) compares every guest page
//! the clone has ever written, every vCPU register set, the VM's
//! interrupt controllers and PIT and the device states against the
//! template, and reports any difference.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_pit_state2;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::restore::Snapshot;
use super::template_memory::{TemplateMemory, PAGE};
use super::working_set::touched_pages;
use crate::arch::x86_64::interrupts::postpone_oneshot_timer;
use crate::arch::x86_64::state::{
    load_vcpu_registers, restore_vm, save_vcpu, save_vm, StateError, VcpuState, MSR_IA32_TSC,
};
use crate::devices::virtio::mmio::MmioTransportState;
use crate::exit::VmExit;
use crate::host::HostKind;
use crate::machine::Machine;
use crate::vstate::stats::{GuestKernelWork, KvmStats, StatsError};
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::{VmError, PAGES_PER_WORD};
use crate::vstate::Vcpu;

/// CR4.PGE: global pages (flipping it flushes every TLB entry).
const X86_CR4_PGE: u64 = 1 << 7;
/// Most pages a clone keeps writable between resets (32 MiB): beyond,
/// pages a reset finds unchanged are write-protected again.
const HOT_PAGES_MAX: u64 = 8192;

/// Per-VM counter: guest writes to page tables KVM shadows.
const VM_COUNTERS: [&str; 1] = ["mmu_pte_write"];

/// What one reset did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResetReport {
    /// Guest pages copied back from the template.
    pub pages: usize,
    /// Of which the guest wrote (KVM's dirty log).
    pub guest_pages: usize,
    /// Of which the VMM wrote (requests, keys).
    pub host_pages: usize,
    /// Of which a device wrote (found by comparing content, after the
    /// block device served a request).
    pub device_pages: usize,
    /// The guest kernel ran during the invocation.
    pub kernel_ran: bool,
    /// KVM's mappings of guest memory were dropped (shadow paging and the
    /// guest kernel ran): the next invocation faults its pages in again.
    pub mappings_dropped: bool,
    /// How long the reset took.
    #[serde(skip)]
    pub duration: Duration,
}

/// A clone that can be reset to its template in place (see the module
/// documentation). Made by [`Snapshot::prepare_resettable`]; its vCPUs are
/// parked (not running) except between [`ResettableClone::resume`] and
/// [`ResettableClone::park`]. Dropping it destroys the VM.
#[derive(Debug)]
pub struct ResettableClone {
    machine: Machine,
    /// The vCPUs while parked.
    parked: Vec<Vcpu>,
    template_id: u64,
    /// The template's vCPU states, the one-shot timer pushed out as for a
    /// fresh clone.
    vcpu_states: Vec<VcpuState>,
    /// The PIT as a fresh clone has it (created, never restored).
    initial_pit: kvm_pit_state2,
    /// Guest-physical pages the VMM wrote since the last reset.
    host_written: Vec<u64>,
    vm_stats: KvmStats,
    /// The guest-kernel counters and the VM's when the vCPUs last resumed.
    baseline: Option<(GuestKernelWork, u64)>,
    shadow_paging: bool,
    /// Doorbell rings the owner expects per run (each is one emulated
    /// store on PVM hosts, not guest-kernel work).
    expected_emulations: u64,
}

impl Snapshot {
    /// Builds a clone that can be reset in place: like
    /// [`Snapshot::prepare`] with KVM's dirty log on, started once and
    /// parked, and reset (so it is exactly the template, parked, ready for
    /// a request to be written and [`ResettableClone::resume`]).
    pub fn prepare_resettable(
        &self,
        options: &super::RestoreOptions,
    ) -> Result<ResettableClone, super::SnapshotError> {
        let prepared = self.prepare_tracked(options, true)?;
        let timer_delay = options.timer_delay;
        let mut machine = prepared.start()?;
        let initial_pit = machine
            .vm()
            .fd()
            .get_pit2()
            .map_err(super::SnapshotError::Kvm)?;
        let vcpu_states = self
            .state
            .vcpu_states
            .iter()
            .map(|state| {
                let mut state = state.clone();
                if let Some(delay) = timer_delay {
                    let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
                    postpone_oneshot_timer(&mut state.lapic, ns);
                }
                state
            })
            .collect();
        let parked = machine.park_vcpus();
        let vm_stats =
            KvmStats::open(machine.vm().fd(), &VM_COUNTERS).map_err(ResetError::Stats)?;
        let mut clone = ResettableClone {
            machine,
            parked,
            template_id: self.template_id,
            vcpu_states,
            initial_pit,
            host_written: Vec::new(),
            vm_stats,
            baseline: None,
            shadow_paging: shadow_paging(HostKind::detect()),
            expected_emulations: 0,
        };
        // The clone ran briefly: put it back, dropping KVM's mappings (it
        // is not known what ran).
        clone.reset(self)?;
        Ok(clone)
    }
}

/// Whether KVM shadows the guest's page tables on this host.
fn shadow_paging(host: HostKind) -> bool {
    if host == HostKind::Pvm {
        return true;
    }
    let enabled = |path: &str| {
        std::fs::read_to_string(path)
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
            .ok()
    };
    // Either module's flag says two-dimensional paging is on; a host where
    // neither can be read is assumed to shadow (the safe answer).
    !(enabled("/sys/module/kvm_intel/parameters/ept").unwrap_or(false)
        || enabled("/sys/module/kvm_amd/parameters/npt").unwrap_or(false))
}

impl ResettableClone {
    /// The running (or parked) machine: its doorbell, memory, exit state.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Mutable access, to stop a clone whose invocation timed out.
    pub fn machine_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }

    /// Writes `bytes` into guest memory at `addr` and records the pages
    /// for the next reset. Only while parked.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ResetError> {
        self.machine
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| {
                ResetError::Memory(format!(
                    "cannot write {} bytes at guest address {addr:#x}: {e}",
                    bytes.len()
                ))
            })?;
        let end = addr.saturating_add(bytes.len() as u64);
        let mut page = addr & !(PAGE - 1);
        while page < end {
            self.host_written.push(page);
            page += PAGE;
        }
        Ok(())
    }

    /// The first vCPU's TSC as the guest would read it now (parked only).
    pub fn guest_tsc(&self) -> Option<u64> {
        crate::arch::x86_64::state::read_tsc(self.parked.first()?.fd()).ok()
    }

    /// Says how many doorbell rings (emulated MMIO stores on PVM hosts) a
    /// run is expected to make, so they are not taken for guest-kernel
    /// work.
    pub fn expect_doorbell_rings(&mut self, rings: u64) {
        self.expected_emulations = rings;
    }

    /// Runs the parked vCPUs: the LAPIC timer is armed (pushed out as for a
    /// fresh clone, counting from now) and the clock set to the template's.
    pub fn resume(&mut self, snapshot: &Snapshot) -> Result<(), ResetError> {
        self.check_template(snapshot)?;
        if self.parked.is_empty() {
            return Err(ResetError::NotParked);
        }
        for (vcpu, state) in self.parked.iter().zip(&self.vcpu_states) {
            vcpu.fd()
                .set_lapic(&state.lapic)
                .map_err(|e| ResetError::Kvm("KVM_SET_LAPIC", e))?;
        }
        restore_clock(&self.machine, snapshot)?;
        self.baseline = Some(self.counters()?);
        let parked = std::mem::take(&mut self.parked);
        self.machine.resume_vcpus(parked).map_err(ResetError::Vcpu)
    }

    /// Stops the vCPUs wherever they are (a reset puts everything back).
    pub fn park(&mut self) {
        if self.parked.is_empty() {
            self.parked = self.machine.park_vcpus();
        }
    }

    /// Puts the parked clone back into the template's state. An error
    /// means the clone must not be used again (drop it).
    pub fn reset(&mut self, snapshot: &Snapshot) -> Result<ResetReport, ResetError> {
        let started = Instant::now();
        self.check_template(snapshot)?;
        if self.parked.is_empty() {
            return Err(ResetError::NotParked);
        }
        if let Some(exit) = self.machine.devices.exit.reason() {
            return Err(ResetError::Stopped(exit));
        }
        let block_served = self.check_devices(snapshot)?;
        let kernel_ran = self.kernel_ran()?;
        let drop_mappings = kernel_ran && self.shadow_paging;
        let template = template_of(snapshot)?;
        let mut report = ResetReport {
            kernel_ran,
            mappings_dropped: drop_mappings,
            ..ResetReport::default()
        };
        self.host_written.sort_unstable();
        self.host_written.dedup();
        let memory = self.machine.memory.clone();
        for (slot, region) in memory.iter().enumerate() {
            let slot = u32::try_from(slot).map_err(|_| ResetError::Memory("slot".into()))?;
            let start = region.start_addr().0;
            let pages = region.len() / PAGE;
            let bitmap = self
                .machine
                .vm()
                .dirty_bitmap(slot, pages)
                .map_err(ResetError::Vm)?;
            // A page the guest wrote goes back to the template's content
            // and stays writable: its bit is not cleared, so it is
            // reported, and compared (restored if changed), after every
            // later invocation too. Pages a handler writes every time then
            // take no write fault (a shadow-page fault exit, ~50 us on PVM
            // hosts); many are written back with the same bytes (reference
            // counts), so "unchanged" does not mean "not written". Only
            // when this set grows past HOT_PAGES_MAX are the unchanged
            // pages cleared (write-protected), to follow the current
            // working set at the cost of one fault each.
            let mut unwritten = vec![0u64; bitmap.len()];
            for (word_index, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let page = word_index as u64 * PAGES_PER_WORD + bit;
                    if page >= pages {
                        continue;
                    }
                    if restore_if_changed(&memory, template, start + page * PAGE)? {
                        report.guest_pages += 1;
                    } else {
                        unwritten[word_index] |= 1 << bit;
                    }
                }
            }
            for &gpa in &self.host_written {
                if gpa >= start && gpa - start < region.len() {
                    // A page both sides wrote is copied once.
                    let page = (gpa - start) / PAGE;
                    let word =
                        bitmap.get(usize::try_from(page / PAGES_PER_WORD).unwrap_or(usize::MAX));
                    if word.is_some_and(|w| w & (1 << (page % PAGES_PER_WORD)) != 0) {
                        continue;
                    }
                    copy_back(&memory, template, gpa)?;
                    report.host_pages += 1;
                }
            }
            let logged: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
            if !drop_mappings && logged > HOT_PAGES_MAX && unwritten.iter().any(|&w| w != 0) {
                self.machine
                    .vm()
                    .clear_dirty(slot, pages, &mut unwritten)
                    .map_err(ResetError::Vm)?;
            }
        }
        // The block device wrote the data it read into guest memory, which
        // KVM does not log: find those pages by content. Bounded by the
        // pages the clone ever wrote, and only after a disk read.
        if block_served.root.is_some() || block_served.code.is_some() {
            report.device_pages = restore_differing_pages(&memory, template)?;
        }
        report.pages = report.guest_pages + report.host_pages + report.device_pages;
        self.host_written.clear();
        if drop_mappings {
            self.machine
                .vm()
                .reregister_memory(&memory)
                .map_err(ResetError::Vm)?;
        }
        let devices = &self.machine.devices;
        for (served, saved, attached) in [
            (
                &block_served.root,
                &snapshot.state.devices.block,
                &devices.block,
            ),
            (
                &block_served.code,
                &snapshot.state.devices.code,
                &devices.code,
            ),
        ] {
            if let (Some(observed), Some(saved)) = (served, saved) {
                let block = attached
                    .as_ref()
                    .ok_or(ResetError::DevicesChanged("block"))?;
                crate::devices::bus::lock(&block.transport)
                    .reset_to(observed, &saved.transport)
                    .map_err(|e| ResetError::Device(e.to_string()))?;
            }
        }
        // Nothing a device did may have landed while memory was copied.
        if self.check_devices(snapshot)?.any() {
            return Err(ResetError::DevicesChanged("block"));
        }
        for (vcpu, state) in self.parked.iter().zip(&self.vcpu_states) {
            // KVM_SET_SREGS resets the vCPU's MMU context (and the next
            // entry then loads its root with a flush of the guest's TLB)
            // only when CR0, CR3, CR4 or EFER change; the template's are
            // likely the ones the vCPU has. Loading them from a CR4 with
            // PGE flipped makes KVM see a change, so translations the
            // last invocation cached never survive the reset.
            let mut flipped = state.sregs;
            flipped.cr4 ^= X86_CR4_PGE;
            vcpu.fd()
                .set_sregs(&flipped)
                .map_err(|e| ResetError::Kvm("KVM_SET_SREGS", e))?;
            load_vcpu_registers(vcpu.fd(), state).map_err(ResetError::State)?;
        }
        restore_vm(self.machine.vm().fd(), &snapshot.state.vm, false).map_err(ResetError::State)?;
        self.machine
            .vm()
            .fd()
            .set_pit2(&self.initial_pit)
            .map_err(|e| ResetError::Kvm("KVM_SET_PIT2", e))?;
        self.machine.doorbell().reset();
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Compares the parked clone with its template: every guest page the
    /// clone ever wrote (the others are the template's file pages by
    /// construction), every vCPU's registers, the interrupt controllers,
    /// the PIT and the devices. Meant right after [`ResettableClone::reset`].
    pub fn verify(&self, snapshot: &Snapshot) -> Result<(), ResetError> {
        self.check_template(snapshot)?;
        if self.parked.is_empty() {
            return Err(ResetError::NotParked);
        }
        let template = template_of(snapshot)?;
        let memory = self.machine.memory();
        // KVM writes the pages the vCPUs' paravirtual MSRs point to
        // (kvm-clock, wall clock, steal time) whenever it loads those MSRs,
        // exactly as when a fresh clone is restored: they hold the time of
        // loading, not the template's bytes.
        let loaded = kvm_written_pages(&self.vcpu_states);
        let differ: Vec<u64> = pages_unlike_template(memory, template)?
            .into_iter()
            .filter(|gpa| !loaded.contains(gpa))
            .collect();
        if !differ.is_empty() {
            let shown: Vec<String> = differ.iter().take(8).map(|a| format!("{a:#x}")).collect();
            return Err(ResetError::Verify(format!(
                "{} guest pages differ from the template: {}",
                differ.len(),
                shown.join(", ")
            )));
        }
        for (vcpu, expected) in self.parked.iter().zip(&self.vcpu_states) {
            let indices: Vec<u32> = expected.msrs.iter().map(|m| m.0).collect();
            let actual = save_vcpu(vcpu.fd(), &indices).map_err(ResetError::State)?;
            compare_vcpu(vcpu.id(), expected, &actual)?;
        }
        let vm = save_vm(self.machine.vm().fd()).map_err(ResetError::State)?;
        let template_vm = &snapshot.state.vm;
        for (name, a, b) in [
            ("master PIC", &vm.pic_master, &template_vm.pic_master),
            ("slave PIC", &vm.pic_slave, &template_vm.pic_slave),
            ("IOAPIC", &vm.ioapic, &template_vm.ioapic),
        ] {
            if encode(a)? != encode(b)? {
                return Err(ResetError::Verify(format!("the {name} differs")));
            }
        }
        // A channel's load time is when KVM loaded its count: now.
        let timeless = |mut pit: kvm_pit_state2| {
            for channel in &mut pit.channels {
                channel.count_load_time = 0;
            }
            encode(&pit)
        };
        if timeless(vm.pit)? != timeless(self.initial_pit)? {
            return Err(ResetError::Verify("the PIT differs".into()));
        }
        if self.check_devices(snapshot)?.any() {
            return Err(ResetError::Verify(
                "the block device's state differs".into(),
            ));
        }
        Ok(())
    }

    fn check_template(&self, snapshot: &Snapshot) -> Result<(), ResetError> {
        if snapshot.template_id != self.template_id {
            return Err(ResetError::WrongTemplate);
        }
        Ok(())
    }

    /// Compares the devices with the template's. The serial port and the
    /// vsock device must be unchanged; the block device may have served
    /// requests (a guest kernel reading its disk), and its state then is
    /// returned, for [`ResettableClone::reset`] to put back.
    fn check_devices(&self, snapshot: &Snapshot) -> Result<BlocksServed, ResetError> {
        let now = self.machine.devices.state();
        let template = &snapshot.state.devices;
        if now.serial != template.serial {
            return Err(ResetError::DevicesChanged("serial"));
        }
        if now.vsock != template.vsock {
            return Err(ResetError::DevicesChanged("vsock"));
        }
        // The drive itself is the clone's for its life (a snapshot records
        // it by a name in its directory, a clone has it open): only the
        // device's registers and queues can change.
        let served =
            |now: Option<crate::devices::virtio::block::BlockState>,
             template: &Option<crate::devices::virtio::block::BlockState>| {
                match (now, template) {
                    (Some(now), Some(template)) if now.transport != template.transport => {
                        Ok(Some(now.transport))
                    }
                    (Some(_), Some(_)) | (None, None) => Ok(None),
                    _ => Err(ResetError::DevicesChanged("block")),
                }
            };
        Ok(BlocksServed {
            root: served(now.block, &template.block)?,
            code: served(now.code, &template.code)?,
        })
    }

    /// The guest-kernel counters of the vCPUs, and the VM's page-table
    /// write count.
    fn counters(&self) -> Result<(GuestKernelWork, u64), ResetError> {
        if self.machine.vcpu_stats.is_empty() {
            return Err(ResetError::Stats(StatsError::Format(
                "no vCPU statistics".into(),
            )));
        }
        let work = GuestKernelWork::read(&self.machine.vcpu_stats).map_err(ResetError::Stats)?;
        let pte_writes = self
            .vm_stats
            .read(&VM_COUNTERS)
            .map_err(ResetError::Stats)?;
        Ok((work, pte_writes.first().copied().unwrap_or(0)))
    }

    /// What the guest kernel did since the last resume; `None` when that
    /// is unknown (taken as "it ran").
    pub fn kernel_work(&self) -> Option<GuestKernelWork> {
        let (before, _) = self.baseline?;
        let (now, _) = self.counters().ok()?;
        Some(now.since(&before))
    }

    /// Whether the guest kernel ran since the last resume (true when that
    /// is unknown).
    fn kernel_ran(&self) -> Result<bool, ResetError> {
        let Some((before, pte_before)) = self.baseline else {
            return Ok(true);
        };
        let (now, pte_now) = self.counters()?;
        let work = now.since(&before);
        log::debug!(
            "reset: {work:?}, {} page-table writes",
            pte_now.wrapping_sub(pte_before)
        );
        Ok(work.emulated_instructions > self.expected_emulations
            || work.guest_page_faults != 0
            || work.injected_interrupts != 0
            || pte_now != pte_before)
    }
}

/// Whether `needle` occurs anywhere in `memory` (an audit: e.g. that no
/// trace of an invocation's data is left after a reset). Reads every page,
/// so it populates the whole mapping; the clone must not be running.
pub fn guest_memory_contains(memory: &vm_memory::GuestMemoryMmap, needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    memory.iter().any(|region| {
        let len = usize::try_from(region.len()).unwrap_or(0);
        // SAFETY: the region's mapping is `len` bytes and lives as long as
        // `memory`; with the vCPUs parked nothing writes it while memmem
        // reads, and memmem only reads both buffers within their lengths.
        let found = unsafe {
            libc::memmem(
                region.as_ptr().cast(),
                len,
                needle.as_ptr().cast(),
                needle.len(),
            )
        };
        !found.is_null()
    })
}

/// The snapshot's memory as the template's pages to copy back from.
fn template_of(snapshot: &Snapshot) -> Result<&TemplateMemory, ResetError> {
    snapshot
        .template_memory()
        .map_err(|e| ResetError::Memory(format!("cannot map the template's memory: {e}")))
}

/// Sets the clock to the template's kvm-clock value: the guest's monotonic
/// clock continues from the snapshot instant, as in a fresh clone.
fn restore_clock(machine: &Machine, snapshot: &Snapshot) -> Result<(), ResetError> {
    let clock = kvm_bindings::kvm_clock_data {
        clock: snapshot.state.vm.clock.clock,
        ..Default::default()
    };
    machine
        .vm()
        .fd()
        .set_clock(&clock)
        .map_err(|e| ResetError::Kvm("KVM_SET_CLOCK", e))
}

/// The pages the clone has ever written (its copy-on-write pages, from
/// `/proc/self/pagemap`) whose content differs from the template's.
fn pages_unlike_template(
    memory: &vm_memory::GuestMemoryMmap,
    template: &TemplateMemory,
) -> Result<Vec<u64>, ResetError> {
    let runs = touched_pages(memory).map_err(|e| ResetError::Memory(e.to_string()))?;
    let mut page = vec![0u8; PAGE as usize];
    let mut differ = Vec::new();
    for run in runs.iter().filter(|r| r.write) {
        for i in 0..u64::from(run.pages) {
            let gpa = run.addr + i * PAGE;
            memory
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| ResetError::Memory(e.to_string()))?;
            let expected = template
                .page(gpa)
                .ok_or_else(|| ResetError::Memory(format!("no template page at {gpa:#x}")))?;
            if page != expected {
                differ.push(gpa);
            }
        }
    }
    Ok(differ)
}

/// Copies back every page the clone has written whose content differs
/// from the template's; returns how many.
fn restore_differing_pages(
    memory: &vm_memory::GuestMemoryMmap,
    template: &TemplateMemory,
) -> Result<usize, ResetError> {
    let differ = pages_unlike_template(memory, template)?;
    for &gpa in &differ {
        copy_back(memory, template, gpa)?;
    }
    Ok(differ.len())
}

/// The guest pages KVM itself writes when a vCPU's paravirtual MSRs are
/// loaded: those MSRs hold guest-physical addresses (bit 0: enabled).
fn kvm_written_pages(states: &[VcpuState]) -> Vec<u64> {
    const PARAVIRT_MSRS: [u32; 5] = [
        0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
        0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
        0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
        0x4b56_4d03, // MSR_KVM_STEAL_TIME
        0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    ];
    let mut pages: Vec<u64> = states
        .iter()
        .flat_map(|s| &s.msrs)
        .filter(|(index, value)| PARAVIRT_MSRS.contains(index) && *value != 0)
        .map(|(_, value)| value & !(PAGE - 1))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// Copies the template's page at `gpa` into the clone if the clone's
/// differs; says whether it did.
fn restore_if_changed(
    memory: &vm_memory::GuestMemoryMmap,
    template: &TemplateMemory,
    gpa: u64,
) -> Result<bool, ResetError> {
    let expected = template
        .page(gpa)
        .ok_or_else(|| ResetError::Memory(format!("no template page at {gpa:#x}")))?;
    let slice = memory
        .get_slice(GuestAddress(gpa), PAGE as usize)
        .map_err(|e| ResetError::Memory(format!("guest page {gpa:#x}: {e}")))?;
    // SAFETY: `slice` is 4096 bytes of guest memory mapped for as long as
    // `memory` lives; the vCPUs are parked, and the only other writer, a
    // device, has been checked idle, so nothing changes it while it is
    // compared.
    let current = unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), PAGE as usize) };
    if current == expected {
        return Ok(false);
    }
    copy_back(memory, template, gpa)?;
    Ok(true)
}

/// Copies the template's page at `gpa` into the clone.
fn copy_back(
    memory: &vm_memory::GuestMemoryMmap,
    template: &TemplateMemory,
    gpa: u64,
) -> Result<(), ResetError> {
    let page = template
        .page(gpa)
        .ok_or_else(|| ResetError::Memory(format!("no template page at {gpa:#x}")))?;
    memory
        .write_slice(page, GuestAddress(gpa))
        .map_err(|e| ResetError::Memory(format!("guest page {gpa:#x}: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ResetError> {
    postcard::to_allocvec(value).map_err(|e| ResetError::Verify(e.to_string()))
}

/// The LAPIC's current-count register: computed from the time of reading.
const APIC_TMCCT: usize = 0x390;

/// Compares a vCPU's state read back after a reset with what was loaded.
/// Left out: `IA32_TSC` (it counts on) and the LAPIC timer's current count.
fn compare_vcpu(id: u8, expected: &VcpuState, actual: &VcpuState) -> Result<(), ResetError> {
    let differs = |what: &str| ResetError::Verify(format!("vCPU {id}: {what} differs"));
    if encode(&expected.regs)? != encode(&actual.regs)? {
        return Err(differs("the general registers"));
    }
    if encode(&expected.sregs)? != encode(&actual.sregs)? {
        return Err(differs("the system registers"));
    }
    if expected.xsave != actual.xsave {
        return Err(differs("the XSAVE area"));
    }
    if encode(&expected.xcrs)? != encode(&actual.xcrs)? {
        return Err(differs("XCR0"));
    }
    if encode(&expected.debug_regs)? != encode(&actual.debug_regs)? {
        return Err(differs("the debug registers"));
    }
    if encode(&expected.mp_state)? != encode(&actual.mp_state)? {
        return Err(differs("the MP state"));
    }
    if encode(&expected.vcpu_events)? != encode(&actual.vcpu_events)? {
        return Err(differs("the pending events"));
    }
    let mut lapic_expected = expected.lapic;
    let mut lapic_actual = actual.lapic;
    for lapic in [&mut lapic_expected, &mut lapic_actual] {
        for byte in &mut lapic.regs[APIC_TMCCT..APIC_TMCCT + 4] {
            *byte = 0;
        }
    }
    if lapic_expected.regs != lapic_actual.regs {
        return Err(differs("the LAPIC"));
    }
    for &(index, value) in &expected.msrs {
        if index == MSR_IA32_TSC {
            continue;
        }
        let got = actual.msrs.iter().find(|m| m.0 == index).map(|m| m.1);
        if got != Some(value) {
            return Err(ResetError::Verify(format!(
                "vCPU {id}: MSR {index:#x} is {got:?}, the template has {value:#x}"
            )));
        }
    }
    Ok(())
}

/// A clone could not be reset (it must then be destroyed), or differs from
/// its template after a reset.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The clone belongs to another template.
    #[error("the clone was made from another template")]
    WrongTemplate,
    /// The operation needs the vCPUs parked.
    #[error("the clone's vCPUs are running")]
    NotParked,
    /// The VM stopped (powered off, crashed, was stopped at a timeout).
    #[error("the clone stopped: {0}")]
    Stopped(VmExit),
    /// A device was used that is not reset in place (serial, vsock), or
    /// one changed during the reset.
    #[error("the {0} device's state changed (the invocation used it)")]
    DevicesChanged(&'static str),
    /// A device could not be put back into the template's state.
    #[error("device reset: {0}")]
    Device(String),
    /// Guest memory could not be read, written or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A KVM VM call failed.
    #[error(transparent)]
    Vm(VmError),
    /// A KVM call failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// vCPU or VM state could not be loaded or read.
    #[error(transparent)]
    State(StateError),
    /// KVM's statistics could not be read.
    #[error(transparent)]
    Stats(StatsError),
    /// The vCPU threads could not be started again.
    #[error(transparent)]
    Vcpu(VcpuError),
    /// Verification found a difference from the template.
    #[error("reset verification failed: {0}")]
    Verify(String),
}

/// The block devices' states where they differ from the template's (they
/// served requests since).
struct BlocksServed {
    root: Option<MmioTransportState>,
    code: Option<MmioTransportState>,
}

impl BlocksServed {
    fn any(&self) -> bool {
        self.root.is_some() || self.code.is_some()
    }
}
