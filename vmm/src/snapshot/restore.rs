//! Restoring a snapshot into a running microVM.
//!
//! [`Snapshot::open`] reads and checks the state file once; every
//! [`Snapshot::restore`] after that builds a clone from it. A restore does
//! no work proportional to guest memory: the `memory` file is mapped
//! copy-on-write and pages come in as the guest touches them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::contents::SnapshotState;
use super::memory::validate_layout;
use super::template_memory::{next_template_id, TemplateMemory};
use super::working_set::{prefault, PageRun};
use super::{map_memory, open_memory_file, read_state, SnapshotError, MEMORY_FILE, STATE_FILE};
use crate::arch::x86_64::interrupts::postpone_oneshot_timer;
use crate::arch::x86_64::state::{restore_vcpu, restore_vm};
use crate::builder::host_memory_bytes;
use crate::config::ConsoleOutput;
use crate::device_manager::{DeviceError, DeviceOptions, DeviceSet};
use crate::devices::bus::lock;
use crate::devices::doorbell::Doorbell;
use crate::devices::virtio::block::disk::{
    drive_for_clone, DiskError, DiskImage, DriveSpec, SnapshotDrive,
};
use crate::host::HostKind;
use crate::machine::{Machine, StepClock};
use crate::vstate::Vm;

/// How a clone connects to the host.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where the clone's console goes (discarded by default).
    pub console: ConsoleOutput,
    /// Firecracker-style vsock Unix socket for the clone, if wanted.
    pub vsock_uds: Option<PathBuf>,
    /// Run the clone in its own jailed worker process
    /// ([`crate::Sandbox::restore`] only; [`Snapshot::restore`] always runs
    /// in the calling process).
    pub isolation: Option<crate::isolation::Isolation>,
    /// Filter the clone's vCPU and event-loop threads with seccomp
    /// ([`crate::seccomp`]); on by default.
    pub seccomp: bool,
    /// Bytes written into the clone's memory before its vCPUs first run
    /// (a function's request, a fresh kernel RNG key).
    pub guest_writes: Vec<GuestWrite>,
    /// Guest pages to populate before the clone runs (its expected working
    /// set, see [`super::working_set`]).
    pub prefault: Vec<PageRun>,
    /// Push the clone's first LAPIC timer interrupt out to at least this
    /// long after the restore (see
    /// [`crate::arch::x86_64::interrupts::postpone_oneshot_timer`]).
    pub timer_delay: Option<Duration>,
    /// The clone's root drive instead of the file the snapshot recorded:
    /// it must have the recorded size, and the same content (not
    /// checked). In-process clones only.
    pub root_drive: Option<PathBuf>,
    /// The clone's code drive instead of the file the snapshot recorded:
    /// no larger than it (the guest keeps the capacity it read at boot, a
    /// file system on the new file reads only within its own size), for
    /// a drive the guest has not mounted yet (a base snapshot's
    /// placeholder). In-process clones only.
    pub code_drive: Option<PathBuf>,
    /// The clone's I/O rate limits (default: unlimited). A snapshot holds
    /// no limiter state: every clone starts with the limits asked for
    /// here, its buckets full, whatever its template had.
    pub io_limits: crate::devices::rate_limiter::IoLimits,
}

/// A write into a clone's guest-physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWrite {
    /// Guest-physical address of the first byte.
    pub addr: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            console: ConsoleOutput::default(),
            vsock_uds: None,
            isolation: None,
            seccomp: true,
            guest_writes: Vec::new(),
            prefault: Vec::new(),
            timer_delay: None,
            root_drive: None,
            code_drive: None,
            io_limits: Default::default(),
        }
    }
}

/// An opened, validated snapshot, ready to be restored any number of
/// times.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
    pub(super) state: SnapshotState,
    memory: File,
    /// The root drive, opened with the snapshot (for jailed clones too).
    root_drive: Option<SnapshotDrive>,
    /// The code drive, likewise.
    code_drive: Option<SnapshotDrive>,
    /// This opened snapshot's identity: resettable clones are only ever
    /// reset to the snapshot they came from.
    pub(super) template_id: u64,
    /// The memory file mapped read-only, for resets (made on first use).
    template: std::sync::OnceLock<TemplateMemory>,
}

impl Snapshot {
    /// Reads `dir/state`, checks it (format, version, checksum, internal
    /// consistency) and that `dir/memory` is large enough for its layout.
    /// The root drive it records is opened beneath `dir` only
    /// ([`super::beneath`]): a state naming any other file gets no drive.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        // The state is read before the memory file is opened, so a damaged
        // state reports itself rather than a missing memory file.
        let state: SnapshotState = read_state(&dir.join(STATE_FILE))?;
        let memory = open_memory_file(&dir.join(MEMORY_FILE))?;
        let anchor = super::beneath::open_dir(dir).map_err(|e| SnapshotError::Io(dir.into(), e))?;
        let drive = |spec: &DriveSpec| {
            let name = spec.path();
            let shown = dir.join(&name);
            match super::beneath::open_beneath(&anchor, &name) {
                Ok(file) => DiskImage::from_file(file, shown),
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    Err(DiskError::OutsideSnapshot { path: name })
                }
                Err(source) => Err(DiskError::Open {
                    path: shown,
                    source,
                }),
            }
        };
        Self::from_parts(dir, state, memory, drive)
    }

    /// Opens a snapshot from a state file image already read (a jailed
    /// worker parses it after dropping its privileges) and already open
    /// files: the memory file and the root and code drives the parent
    /// opened and checked (`None`: it had none, or could not open it).
    /// Each drive must still be the one the state records. `dir` is only
    /// for messages.
    pub fn from_state_bytes(
        dir: &Path,
        state: &[u8],
        memory: File,
        root_drive: Option<File>,
        code_drive: Option<File>,
    ) -> Result<Snapshot, SnapshotError> {
        let state: SnapshotState = super::format::decode_state(state)?;
        let mut root_drive = Some(root_drive);
        let mut code_drive = Some(code_drive);
        let given = move |spec: &DriveSpec| {
            let slot = if spec.path == super::CODE_DRIVE_FILE.as_bytes() {
                &mut code_drive
            } else {
                &mut root_drive
            };
            match slot.take().flatten() {
                Some(file) => DiskImage::from_file(file, spec.path()),
                None => Err(DiskError::Unavailable(
                    "the parent process handed over no drive".into(),
                )),
            }
        };
        Self::from_parts(dir, state, memory, given)
    }

    fn from_parts(
        dir: &Path,
        state: SnapshotState,
        memory: File,
        mut open_drive: impl FnMut(&DriveSpec) -> Result<DiskImage, DiskError>,
    ) -> Result<Snapshot, SnapshotError> {
        state.validate().map_err(SnapshotError::Invalid)?;
        let len = memory
            .metadata()
            .map_err(|e| SnapshotError::Io(dir.join(MEMORY_FILE), e))?
            .len();
        validate_layout(&state.memory, len)?;
        let root_drive = state
            .devices
            .block
            .as_ref()
            .map(|b| SnapshotDrive::new(&b.drive, open_drive(&b.drive)));
        let code_drive = state
            .devices
            .code
            .as_ref()
            .map(|b| SnapshotDrive::new(&b.drive, open_drive(&b.drive)));
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            state,
            memory,
            root_drive,
            code_drive,
            template_id: next_template_id(),
            template: std::sync::OnceLock::new(),
        })
    }

    /// The template's memory, mapped read-only on first use.
    pub(super) fn template_memory(&self) -> std::io::Result<&TemplateMemory> {
        if let Some(template) = self.template.get() {
            return Ok(template);
        }
        let template = TemplateMemory::map(&self.memory, &self.state.memory)?;
        Ok(self.template.get_or_init(|| template))
    }

    /// The root drive's file, when the snapshot has one and it could be
    /// opened and checked (a jailed worker is handed this descriptor).
    pub fn root_drive_file(&self) -> Option<&File> {
        self.root_drive.as_ref().and_then(SnapshotDrive::file)
    }

    /// The code drive's file, likewise.
    pub fn code_drive_file(&self) -> Option<&File> {
        self.code_drive.as_ref().and_then(SnapshotDrive::file)
    }

    /// The snapshot's memory file (shared by every clone).
    pub fn memory_file(&self) -> &File {
        &self.memory
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of vCPUs of every clone.
    pub fn vcpus(&self) -> u8 {
        self.state.vcpus
    }

    /// Guest RAM of every clone, in MiB.
    pub fn mem_mib(&self) -> u32 {
        self.state.mem_mib
    }

    /// The kvm-clock value every clone starts at (guest nanoseconds).
    pub fn clock_ns(&self) -> u64 {
        self.state.vm.clock.clock
    }

    /// The guest kernel's command line.
    pub fn kernel_cmdline(&self) -> &str {
        &self.state.kernel_cmdline
    }

    /// Refuses a restore whose requested shape differs from the
    /// snapshot's: a clone's vCPUs and memory are fixed by it.
    pub fn check_shape(
        &self,
        vcpus: Option<u8>,
        mem_mib: Option<u32>,
    ) -> Result<(), SnapshotError> {
        let mismatch = |what: &str, asked: u64, has: u64| {
            SnapshotError::Mismatch(format!(
                "the snapshot has {has} {what}, {asked} were asked for"
            ))
        };
        if let Some(v) = vcpus.filter(|v| *v != self.state.vcpus) {
            return Err(mismatch("vCPUs", v.into(), self.state.vcpus.into()));
        }
        if let Some(m) = mem_mib.filter(|m| *m != self.state.mem_mib) {
            return Err(mismatch(
                "MiB of memory",
                m.into(),
                self.state.mem_mib.into(),
            ));
        }
        Ok(())
    }

    /// Builds and starts a clone. Returns once its vCPUs run.
    pub fn restore(&self, options: &RestoreOptions) -> Result<Machine, SnapshotError> {
        self.prepare(options)?.start()
    }

    /// Builds a clone without starting it: everything of a restore but
    /// the device thread and the vCPU threads, so that a clone can be made
    /// ahead of the request it will serve (whose bytes can still be written
    /// into its memory, [`PreparedClone::memory`]) and started in a fraction
    /// of a restore.
    pub fn prepare(&self, options: &RestoreOptions) -> Result<PreparedClone, SnapshotError> {
        self.prepare_tracked(options, false)
    }

    /// [`Snapshot::prepare`], with KVM logging the pages the guest writes
    /// when `dirty_log` is set (for in-place resets).
    pub(super) fn prepare_tracked(
        &self,
        options: &RestoreOptions,
        dirty_log: bool,
    ) -> Result<PreparedClone, SnapshotError> {
        let mut clock = StepClock::start(Instant::now());
        let state = &self.state;
        let host = HostKind::detect();
        if host != state.host {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot was taken on {}, this host is {host}",
                state.host
            )));
        }
        if u64::from(state.mem_mib) << 20 > host_memory_bytes() {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot needs {} MiB of memory, more than this host has",
                state.mem_mib
            )));
        }
        let kvm = crate::vstate::kvm().map_err(SnapshotError::Kvm)?;
        if usize::from(state.vcpus) > kvm.get_max_vcpus() {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot has {} vCPUs, KVM allows {}",
                state.vcpus,
                kvm.get_max_vcpus()
            )));
        }
        clock.step("checks, open /dev/kvm");
        let mut vm = Vm::new(kvm)?;
        if dirty_log {
            vm.enable_dirty_log()?;
        }
        clock.step("create VM");
        // Memory before the irqchip (PLATFORM.md): the other order costs
        // ~7 ms per slot on PVM hosts.
        let memory = map_memory(&self.memory, &state.memory)?;
        clock.step("map memory");
        if !options.prefault.is_empty() {
            prefault(&memory, &options.prefault);
            clock.step("prefault working set");
        }
        vm.register_memory(&memory)?;
        clock.step("register memory");
        vm.create_irqchip()?;
        clock.step("create irqchip + PIT");
        // A clone keeps time with kvm-clock and the LAPIC; a re-armed PIT
        // would only cost emulated interrupt work (PLATFORM.md).
        restore_vm(vm.fd(), &state.vm, false)?;
        clock.step("restore irqchip + clock");

        for write in &options.guest_writes {
            memory
                .write_slice(&write.bytes, GuestAddress(write.addr))
                .map_err(|e| {
                    SnapshotError::Mismatch(format!(
                        "cannot write {} bytes at guest address {:#x}: {e}",
                        write.bytes.len(),
                        write.addr
                    ))
                })?;
        }
        clock.step("guest writes");

        let seccomp = options.seccomp;
        let timer_delay = options.timer_delay;
        let options = DeviceOptions {
            console: options.console.clone(),
            interactive: false,
            vsock_cid: state.vsock_cid,
            vsock_uds: options.vsock_uds.clone(),
            root_drive: drive_for_clone(self.root_drive.as_ref(), options.root_drive.as_deref())
                .map_err(DeviceError::from)?,
            io_limits: options.io_limits,
            code_drive: match (&self.code_drive, &options.code_drive) {
                (Some(drive), Some(path)) => Some(drive.replaced_by(path)),
                (None, Some(_)) => Some(Err(DiskError::NoDriveInSnapshot)),
                (drive, None) => drive_for_clone(drive.as_ref(), None).transpose(),
            }
            .transpose()
            .map_err(DeviceError::from)?,
        };
        // A replaced code drive is recorded as what it is (the guest keeps
        // the capacity it read at boot): a snapshot of this clone then
        // names the new file.
        let replaced;
        let saved = match (&options.code_drive, &state.devices.code) {
            (Some(disk), Some(code)) if code.drive.size != disk.size() => {
                let mut devices = state.devices.clone();
                if let Some(code) = devices.code.as_mut() {
                    code.drive = disk.spec();
                }
                replaced = devices;
                &replaced
            }
            _ => &state.devices,
        };
        let devices = DeviceSet::create(&vm, &memory, &options, Some(saved))?;
        // Connections the guest remembers do not exist on this host; it
        // hears so when the host first connects (a clone that never does
        // takes no interrupt for it).
        lock(&devices.vsock).defer_transport_reset();
        clock.step("create devices");
        // Restoring vCPU state on another thread while the devices are
        // created was measured no faster: the ioctls serialize in KVM.
        let mut vcpus = Vec::with_capacity(state.vcpu_states.len());
        let mut lapics = Vec::new();
        for (id, vcpu_state) in state.vcpu_states.iter().enumerate() {
            let fd = vm.fd().create_vcpu(id as u64).map_err(SnapshotError::Kvm)?;
            clock.step("create vCPU");
            match timer_delay {
                Some(delay) => {
                    let mut vcpu_state = vcpu_state.clone();
                    let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
                    postpone_oneshot_timer(&mut vcpu_state.lapic, ns);
                    restore_vcpu(&fd, &vcpu_state)?;
                    lapics.push(vcpu_state.lapic);
                }
                None => restore_vcpu(&fd, vcpu_state)?,
            }
            clock.step("restore vCPU state");
            vcpus.push(fd);
        }
        Ok(PreparedClone {
            clock_ns: state.vm.clock.clock,
            vm,
            memory,
            devices,
            vcpus,
            lapics,
            host,
            clock,
            cmdline: state.kernel_cmdline.clone(),
            seccomp,
            doorbell: Arc::new(Doorbell::new()),
        })
    }
}

/// A clone built from a snapshot but not started (see
/// [`Snapshot::prepare`]). Dropping it destroys it.
#[derive(Debug)]
pub struct PreparedClone {
    vm: Vm,
    memory: GuestMemoryMmap,
    devices: DeviceSet,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// The LAPIC states with the timer pushed out, loaded again at the
    /// start: the timer counts from when the state is loaded, and a clone
    /// may wait before it starts.
    lapics: Vec<kvm_bindings::kvm_lapic_state>,
    host: HostKind,
    clock: StepClock,
    cmdline: String,
    seccomp: bool,
    /// The snapshot's kvm-clock value, set again at the start: a clone
    /// prepared ahead starts with the clock a fresh restore has.
    clock_ns: u64,
    doorbell: Arc<Doorbell>,
}

impl PreparedClone {
    /// The clone's memory, to write a request into before it starts.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The first vCPU's TSC as the guest would read it now.
    pub fn guest_tsc(&self) -> Option<u64> {
        crate::arch::x86_64::state::read_tsc(self.vcpus.first()?).ok()
    }

    /// The doorbell the started clone will ring (to set an output hook
    /// before any vCPU runs).
    pub fn doorbell(&self) -> &Arc<Doorbell> {
        &self.doorbell
    }

    /// Starts the clone's threads. Returns once its vCPUs run.
    pub fn start(mut self) -> Result<Machine, SnapshotError> {
        self.clock.restart();
        for (fd, lapic) in self.vcpus.iter().zip(&self.lapics) {
            fd.set_lapic(lapic).map_err(SnapshotError::Kvm)?;
        }
        if !self.lapics.is_empty() {
            self.clock.step("re-arm LAPIC timers");
        }
        let clock = kvm_bindings::kvm_clock_data {
            clock: self.clock_ns,
            ..Default::default()
        };
        self.vm.fd().set_clock(&clock).map_err(SnapshotError::Kvm)?;
        self.clock.step("set kvm-clock");
        Ok(Machine::start(
            self.vm,
            self.memory,
            self.devices,
            self.vcpus,
            self.host,
            self.clock,
            self.cmdline,
            self.seccomp,
            self.doorbell,
        )?)
    }
}
