//! Building a microVM from a [`VmConfig`] and booting it.
//!
//! The order matters on PVM hosts and is kept for both kinds: guest memory
//! is registered before the irqchip exists (PLATFORM.md: 0.1 ms instead of
//! 7 ms per slot), and every device is on its bus before a vCPU runs.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::{self as arch, boot::configure_boot, mptable::setup_mptable};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceOptions, DeviceSet};
use crate::devices::doorbell::Doorbell;
use crate::devices::virtio::block::disk::DiskImage;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::host::HostKind;
use crate::kernel_cmdline::{self, CmdlineError};
use crate::loader::{self, LoaderError};
use crate::machine::{BootTimes, Machine, StepClock};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::stats::KvmStats;
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::VmError;
use crate::vstate::{Vcpu, Vm};

impl Machine {
    /// Boots a microVM: validates `config`, builds the VM, and starts its
    /// vCPUs. Returns once the guest runs; use [`Machine::wait`] to wait for
    /// it to power off.
    pub fn boot(config: &VmConfig) -> Result<Machine, BuildError> {
        let requested = Instant::now();
        let kvm = crate::vstate::kvm().map_err(BuildError::KvmOpen)?;
        let host = HostKind::detect();
        config.validate(kvm.get_max_vcpus(), host_memory_bytes())?;
        log::debug!("host: {host}, KVM max vCPUs {}", kvm.get_max_vcpus());

        let vm = Vm::new(kvm)?;
        let memory = create_guest_memory(config.mem_bytes())?;
        vm.register_memory(&memory)?;
        vm.create_irqchip()?;

        let kernel = loader::load_kernel(&memory, &config.kernel)?;
        let initrd = config
            .initrd
            .as_deref()
            .map(|path| loader::load_initrd(&memory, path, kernel.end))
            .transpose()?;
        let devices = DeviceSet::create(&vm, &memory, &device_options(config)?, None)?;
        let cmdline = kernel_cmdline::build(host, &devices.cmdline_params, &config.cmdline_extra)?;
        configure_boot(
            &memory,
            &kernel.entry,
            &cmdline,
            initrd.as_ref(),
            kernel.setup_header.as_ref(),
        )
        .map_err(|e| BuildError::Arch(e.to_string()))?;
        setup_mptable(&memory, config.vcpus).map_err(|e| BuildError::Arch(e.to_string()))?;

        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(BuildError::Kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(id))
                .map_err(BuildError::Kvm)?;
            arch::configure_vcpu(
                &memory,
                &fd,
                &supported_cpuid,
                id,
                config.vcpus,
                host,
                &kernel.entry,
            )
            .map_err(|e| BuildError::Arch(format!("vCPU {id}: {e}")))?;
            vcpus.push(fd);
        }
        let cmdline = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        Machine::start(
            vm,
            memory,
            devices,
            vcpus,
            host,
            StepClock::start(requested),
            cmdline,
            config.seccomp,
            Arc::new(Doorbell::new()),
        )
    }

    /// Starts a built VM: the device event loop, then one thread per vCPU;
    /// with `seccomp`, each thread is filtered before it serves the guest
    /// ([`crate::seccomp`]). The guest's doorbell rings `doorbell` (made
    /// by the caller, so that an output hook can be set before any vCPU
    /// runs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        vm: Vm,
        memory: GuestMemoryMmap,
        mut devices: DeviceSet,
        vcpus: Vec<VcpuFd>,
        host: HostKind,
        mut clock: StepClock,
        cmdline: String,
        seccomp: bool,
        doorbell: Arc<Doorbell>,
    ) -> Result<Machine, BuildError> {
        let requested = clock.started();
        let started = clock.resumed();
        // Only a microVM with a vsock Unix socket may create and connect
        // Unix sockets.
        let filter = seccomp.then(|| crate::seccomp::Filter::event_loop(devices.vsock_uds));
        let event_loop = EventLoop::start(std::mem::take(&mut devices.subscribers), filter)?;
        clock.step("start event loop");
        let first_run = Arc::new(OnceLock::new());
        devices.exit.wake_on_exit(doorbell.clone());
        // Opened while this thread still holds the vCPU fds; diagnostics
        // only, so a KVM without binary statistics just has none.
        let vcpu_stats = vcpus
            .iter()
            .map(KvmStats::open_vcpu)
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|e| log::debug!("no vCPU statistics: {e}"))
            .unwrap_or_default();
        let vcpus: Vec<Vcpu> = vcpus
            .into_iter()
            .zip(0u8..)
            .map(|(fd, id)| {
                Vcpu::new(
                    id,
                    fd,
                    devices.pio.clone(),
                    devices.mmio.clone(),
                    devices.exit.clone(),
                    first_run.clone(),
                )
                .with_doorbell(doorbell.clone())
            })
            .collect();
        let mut machine = Machine {
            vcpus: Vec::with_capacity(vcpus.len()),
            event_loop,
            vm,
            memory,
            devices,
            host,
            times: BootTimes {
                requested,
                started,
                first_run,
                steps: Vec::new(),
            },
            cmdline,
            doorbell,
            seccomp,
            vcpu_stats,
        };
        // Started one by one so that a failure stops the vCPUs already
        // running when `machine` is dropped.
        for vcpu in vcpus {
            machine.vcpus.push(vcpu.start(seccomp)?);
        }
        // Each thread installs its seccomp filter before it serves the
        // guest; waiting for their verdicts only after all were started
        // lets them do so in parallel.
        machine.event_loop.started()?;
        for vcpu in &mut machine.vcpus {
            vcpu.started()?;
        }
        clock.step("start vCPU threads");
        machine.times.steps = clock.into_steps();
        Ok(machine)
    }
}

/// The device side of a config; opens the root and code drives, if any.
pub(crate) fn device_options(config: &VmConfig) -> Result<DeviceOptions, DeviceError> {
    let root_drive = config
        .root_drive
        .as_deref()
        .map(DiskImage::open)
        .transpose()?
        .map(Arc::new);
    let code_drive = config
        .code_drive
        .as_deref()
        .map(DiskImage::open)
        .transpose()?
        .map(Arc::new);
    Ok(DeviceOptions {
        console: config.console.clone(),
        interactive: config.interactive,
        vsock_cid: config.vsock_cid,
        vsock_uds: config.vsock_uds.clone(),
        root_drive,
        io_limits: config.io_limits,
        code_drive,
    })
}

/// The host's physical memory.
pub(crate) fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    u64::try_from(pages).unwrap_or(0) * u64::try_from(page_size).unwrap_or(0)
}

/// A microVM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The config is out of bounds.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available to this user?)")]
    KvmOpen(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM: {0}")]
    Kvm(kvm_ioctls::Error),
    /// VM setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be allocated.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel or initramfs could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The kernel command line is invalid.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// Architectural setup (boot info, MP table, vCPU registers) failed.
    #[error("x86_64 setup: {0}")]
    Arch(String),
    /// The devices could not be created.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The device event loop could not start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// A vCPU thread could not start.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}
