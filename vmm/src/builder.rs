//! Building a microVM from a [`VmConfig`] and booting it.
//!
//! The order matters on PVM hosts and is kept for both kinds: guest memory
//! is registered before the irqchip exists (PLATFORM.md: 0.1 ms instead of
//! 7 ms per slot), and every device is on its bus before a vCPU runs.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kvm_ioctls::IoEventAddress;
use vm_memory::{Address, GuestMemoryMmap};

use crate::arch::x86_64::{self as arch, boot::configure_boot, layout, mptable::setup_mptable};
use crate::config::{ConfigError, ConsoleOutput, VmConfig};
use crate::devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use crate::devices::legacy::serial::{COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use crate::devices::legacy::{ConsoleSink, LineWatch, Serial, I8042};
use crate::devices::stdin::StdinForwarder;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::vsock::backend::{
    InProcessBackend, UdsBackend, VsockBackend, VsockHub,
};
use crate::devices::virtio::vsock::{Vsock, VsockEvents};
use crate::devices::virtio::Interrupt;
use crate::devices::{Bus, BusError};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::exit::ExitSignal;
use crate::host::HostKind;
use crate::kernel_cmdline::{self, CmdlineError};
use crate::loader::{self, LoaderError};
use crate::machine::{BootTimes, Machine};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::VmError;
use crate::vstate::{Vcpu, Vm};

/// The console line that marks a guest kernel panic.
const KERNEL_PANIC_LINE: &str = "Kernel panic - not syncing";

impl Machine {
    /// Boots a microVM: validates `config`, builds the VM, and starts its
    /// vCPUs. Returns once the guest runs; use [`Machine::wait`] to wait for
    /// it to power off.
    pub fn boot(config: &VmConfig) -> Result<Machine, BuildError> {
        let requested = Instant::now();
        let kvm = Kvm::new().map_err(BuildError::KvmOpen)?;
        let host = HostKind::detect();
        config.validate(kvm.get_max_vcpus(), host_memory_bytes())?;
        log::debug!("host: {host}, KVM max vCPUs {}", kvm.get_max_vcpus());

        let vm = Vm::new(&kvm)?;
        let memory = create_guest_memory(config.mem_bytes())?;
        vm.register_memory(&memory)?;
        vm.create_irqchip()?;

        let kernel = loader::load_kernel(&memory, &config.kernel)?;
        let initrd = config
            .initrd
            .as_deref()
            .map(|path| loader::load_initrd(&memory, path, kernel.end))
            .transpose()?;
        let exit = Arc::new(ExitSignal::new().map_err(BuildError::EventFd)?);
        let mut mmio = Bus::new();
        let vsock = attach_vsock(&vm, &memory, &mut mmio, config)?;
        let cmdline = kernel_cmdline::build(
            host,
            std::slice::from_ref(&vsock.cmdline),
            &config.cmdline_extra,
        )?;
        configure_boot(
            &memory,
            &kernel.entry,
            &cmdline,
            initrd.as_ref(),
            kernel.setup_header.as_ref(),
        )
        .map_err(|e| BuildError::Arch(e.to_string()))?;
        setup_mptable(&memory, config.vcpus).map_err(|e| BuildError::Arch(e.to_string()))?;

        let agent_ready = LineWatch::containing(ember_agent::READY_LINE);
        let kernel_panic = LineWatch::containing(KERNEL_PANIC_LINE);
        exit.close_on_exit(agent_ready.clone());
        let sink = ConsoleSink::new(
            console_writer(&config.console)?,
            vec![agent_ready.clone(), kernel_panic.clone()],
        );
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let input_drained = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        let serial = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            input_drained.try_clone().map_err(BuildError::EventFd)?,
            sink,
        )));

        let mut pio = Bus::new();
        pio.insert(
            u64::from(COM1_PORT),
            u64::from(COM1_PORT_LEN),
            serial.clone(),
        )?;
        pio.insert(
            u64::from(I8042_PORT_BASE),
            u64::from(I8042_PORT_LEN),
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);

        let mut subscribers: Vec<Subscriber> =
            vec![Arc::new(Mutex::new(VsockEvents::new(vsock.device.clone())))];
        if config.interactive {
            subscribers.push(Arc::new(Mutex::new(StdinForwarder::new(
                host_stdin()?,
                input_drained,
                serial.clone(),
            ))));
        }
        let event_loop = EventLoop::start(subscribers)?;

        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(BuildError::Kvm)?;
        let first_run = Arc::new(OnceLock::new());
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
            vcpus.push(Vcpu::new(
                id,
                fd,
                pio.clone(),
                mmio.clone(),
                exit.clone(),
                first_run.clone(),
            ));
        }
        let cmdline = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut machine = Machine {
            vcpus: Vec::with_capacity(vcpus.len()),
            event_loop,
            vm,
            memory,
            exit,
            serial,
            agent_ready,
            kernel_panic,
            host,
            times: BootTimes {
                requested,
                first_run,
            },
            cmdline,
            vsock: vsock.device,
            vsock_connector: vsock.connector,
        };
        // Pushed one by one so that a failure stops the vCPUs already
        // running when `machine` is dropped.
        for vcpu in vcpus {
            machine.vcpus.push(vcpu.start()?);
        }
        Ok(machine)
    }
}

/// The vsock device as attached to a VM.
struct AttachedVsock {
    device: Arc<Mutex<Vsock>>,
    connector: InProcessBackend,
    /// Its `virtio_mmio.device=` kernel parameter.
    cmdline: String,
}

/// Puts a vsock device in the first virtio-mmio slot: interrupt through an
/// irqfd, queue notifications through ioeventfds.
fn attach_vsock(
    vm: &Vm,
    memory: &GuestMemoryMmap,
    mmio: &mut Bus,
    config: &VmConfig,
) -> Result<AttachedVsock, BuildError> {
    const SLOT: usize = 0;
    let (Some(addr), Some(irq)) = (
        layout::virtio_mmio_addr(SLOT),
        layout::virtio_mmio_irq(SLOT),
    ) else {
        return Err(BuildError::Arch("no virtio-mmio slot left".into()));
    };
    let interrupt = Arc::new(Interrupt::new(
        EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?,
    ));
    vm.register_irqfd(interrupt.irqfd(), irq)?;

    let hub = VsockHub::new().map_err(BuildError::EventFd)?;
    let (backend, connector): (Box<dyn VsockBackend>, InProcessBackend) = match &config.vsock_uds {
        Some(path) => {
            let uds =
                UdsBackend::start(path, hub.clone()).map_err(|source| BuildError::VsockUds {
                    path: path.clone(),
                    source,
                })?;
            let connector = uds.in_process().clone();
            (Box::new(uds), connector)
        }
        None => {
            let in_process = InProcessBackend::new(hub.clone());
            (Box::new(in_process.clone()), in_process)
        }
    };
    let device = Vsock::new(config.vsock_cid, interrupt.clone(), backend, hub)
        .map_err(BuildError::EventFd)?;
    let notify = IoEventAddress::Mmio(addr.raw_value() + QUEUE_NOTIFY_OFFSET);
    for (index, event) in device.queue_events().iter().enumerate() {
        vm.fd()
            .register_ioevent(event, &notify, index as u32)
            .map_err(BuildError::Kvm)?;
    }
    let device = Arc::new(Mutex::new(device));
    let transport = MmioTransport::new(device.clone(), memory.clone(), interrupt)
        .map_err(|e| BuildError::Arch(format!("virtio queue: {e}")))?;
    mmio.insert(
        addr.raw_value(),
        MMIO_WINDOW_SIZE,
        Arc::new(Mutex::new(transport)),
    )?;
    Ok(AttachedVsock {
        device,
        connector,
        cmdline: format!("virtio_mmio.device=4K@{:#x}:{irq}", addr.raw_value()),
    })
}

fn console_writer(console: &ConsoleOutput) -> Result<Box<dyn std::io::Write + Send>, BuildError> {
    Ok(match console {
        ConsoleOutput::Stdout => Box::new(dup_fd(libc::STDOUT_FILENO)?),
        ConsoleOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| BuildError::Console {
                path: path.clone(),
                source,
            })?)
        }
        ConsoleOutput::Sink => Box::new(std::io::sink()),
    })
}

fn host_stdin() -> Result<File, BuildError> {
    dup_fd(libc::STDIN_FILENO)
}

/// An unbuffered `File` on a duplicate of one of our standard fds.
fn dup_fd(fd: i32) -> Result<File, BuildError> {
    // SAFETY: dup() on a standard fd number has no memory-safety
    // preconditions; the result is checked below.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(BuildError::EventFd(std::io::Error::last_os_error()));
    }
    // SAFETY: `dup` is a freshly duplicated fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(dup) })
}

/// The host's physical memory.
fn host_memory_bytes() -> u64 {
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
    /// An eventfd or fd duplicate could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The console file cannot be created.
    #[error("cannot create console file {path}: {source}")]
    Console {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Device ranges collide.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The device event loop could not start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// A vCPU thread could not start.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The vsock Unix socket cannot be created.
    #[error("cannot listen on vsock socket {path}: {source}")]
    VsockUds {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}
