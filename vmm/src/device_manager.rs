//! The devices of an ember microVM, wired to its VM: COM1, the i8042 reset
//! line, a vsock device on the first virtio-mmio slot and, when the VM has
//! a root drive, a read-only virtio-blk device on the second (the guest's
//! `/dev/vda`) and, when it has a code drive, another on the third (the
//! guest's `/dev/vdb`, or `/dev/vda` without a root drive). Created fresh
//! for a boot, or from saved state for a snapshot restore.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout;
use crate::config::ConsoleOutput;
use crate::devices::bus::lock;
use crate::devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use crate::devices::legacy::serial::{SerialArgs, SerialState, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use crate::devices::legacy::{ConsoleSink, LineWatch, Serial, I8042};
use crate::devices::rate_limiter::{IoLimits, RateLimitConfig, RateLimitError, RateLimiter};
use crate::devices::stdin::StdinForwarder;
use crate::devices::virtio::block::disk::{DiskError, DiskImage};
use crate::devices::virtio::block::{
    BlockArgs, BlockError, BlockEvents, BlockState, MmioBlock, ROOT_DRIVE_ID,
};
use crate::devices::virtio::mmio::{RestoreError, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::vsock::backend::{
    InProcessBackend, UdsBackend, VsockBackend, VsockHub,
};
use crate::devices::virtio::vsock::{
    MmioVsock, Vsock, VsockArgs, VsockError, VsockEvents, VsockState,
};
use crate::devices::virtio::Interrupt;
use crate::devices::{Bus, BusError, Persist};
use crate::event_loop::Subscriber;
use crate::exit::ExitSignal;
use crate::vstate::vm::VmError;
use crate::vstate::Vm;

/// The console line that marks a guest kernel panic.
const KERNEL_PANIC_LINE: &str = "Kernel panic - not syncing";
/// The virtio-mmio slot of the vsock device.
const VSOCK_SLOT: usize = 0;
/// The virtio-mmio slot of the root drive: declared after the vsock
/// device, and the only disk, so the guest names it `/dev/vda`.
const ROOT_DRIVE_SLOT: usize = 1;
/// The guest's name for the root drive.
pub const ROOT_DRIVE_GUEST_DEVICE: &str = "/dev/vda";
/// The virtio-mmio slot of the code drive: declared after the root drive,
/// so the guest names it after it.
const CODE_DRIVE_SLOT: usize = 2;
/// The code drive's virtio-blk serial (`VIRTIO_BLK_T_GET_ID`).
pub const CODE_DRIVE_ID: &str = "ember-code";

/// The guest's name for the code drive of a VM with (or without) a root
/// drive: virtio-blk disks are named in the order they are declared.
pub fn code_drive_guest_device(has_root_drive: bool) -> &'static str {
    if has_root_drive {
        "/dev/vdb"
    } else {
        "/dev/vda"
    }
}

/// How the devices connect to the host.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Where the console goes.
    pub console: ConsoleOutput,
    /// Whether the host's stdin feeds the console.
    pub interactive: bool,
    /// The guest's vsock context ID.
    pub vsock_cid: u64,
    /// Firecracker-style vsock Unix socket, if wanted.
    pub vsock_uds: Option<PathBuf>,
    /// The read-only root drive, if the VM has one.
    pub root_drive: Option<Arc<DiskImage>>,
    /// Rate limits on the root drive and vsock (not part of the devices'
    /// saved state: a restored clone gets the ones given here).
    pub io_limits: IoLimits,
    /// The read-only code drive, if the VM has one.
    pub code_drive: Option<Arc<DiskImage>>,
}

/// Every device's state, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialState,
    /// The vsock device's transport and queues.
    pub vsock: VsockState,
    /// The root drive, if the VM has one.
    pub block: Option<BlockState>,
    /// The code drive, if the VM has one.
    pub code: Option<BlockState>,
}

/// The devices of one microVM.
pub struct DeviceSet {
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) agent_ready: Arc<LineWatch>,
    pub(crate) kernel_panic: Arc<LineWatch>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) vsock: Arc<Mutex<Vsock>>,
    /// The same device with its transport, for snapshots.
    pub(crate) vsock_mmio: MmioVsock,
    pub(crate) vsock_connector: InProcessBackend,
    /// Whether the vsock device has a host Unix socket (its event loop
    /// then needs `socket`/`connect`).
    pub(crate) vsock_uds: bool,
    /// The root drive's device, if the VM has one.
    pub(crate) block: Option<MmioBlock>,
    /// The same for the code drive.
    pub(crate) code: Option<MmioBlock>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    /// Kernel parameters declaring the virtio-mmio devices.
    pub(crate) cmdline_params: Vec<String>,
    /// The event-loop backends; taken once when the loop starts.
    pub(crate) subscribers: Vec<Subscriber>,
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSet")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field("cmdline_params", &self.cmdline_params)
            .finish_non_exhaustive()
    }
}

impl DeviceSet {
    /// Creates the devices and wires them to `vm` (irqfds, ioeventfds);
    /// with `saved`, they start in that state instead of power-on state.
    pub fn create(
        vm: &Vm,
        memory: &GuestMemoryMmap,
        options: &DeviceOptions,
        saved: Option<&DeviceStates>,
    ) -> Result<Self, DeviceError> {
        let exit = Arc::new(ExitSignal::new().map_err(DeviceError::EventFd)?);
        let agent_ready = LineWatch::containing(ember_protocol::READY_LINE);
        let kernel_panic = LineWatch::containing(KERNEL_PANIC_LINE);
        exit.wake_on_exit(agent_ready.clone());

        let sink = ConsoleSink::new(
            console_writer(&options.console)?,
            vec![agent_ready.clone(), kernel_panic.clone()],
        );
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let input_drained = eventfd()?;
        let drained_for_serial = input_drained.try_clone().map_err(DeviceError::EventFd)?;
        let serial = match saved {
            Some(state) => Serial::restore(
                SerialArgs {
                    irq: serial_irq,
                    drained: drained_for_serial,
                    sink,
                },
                &state.serial,
            )
            .map_err(DeviceError::SerialState)?,
            None => Serial::new(serial_irq, drained_for_serial, sink),
        };
        let serial = Arc::new(Mutex::new(serial));

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

        let mut mmio = Bus::new();
        let vsock = attach_vsock(vm, memory, &mut mmio, options, saved.map(|s| &s.vsock))?;

        let mut subscribers: Vec<Subscriber> = vec![Arc::new(Mutex::new(VsockEvents::new(
            vsock.mmio.device.clone(),
        )))];
        let mut cmdline_params = vec![vsock.cmdline];
        let mut drives = Drives {
            vm,
            memory,
            mmio: &mut mmio,
            subscribers: &mut subscribers,
            cmdline_params: &mut cmdline_params,
            limits: &options.io_limits.disk,
        };
        let block = drives.attach(
            DriveSlot::Root,
            options.root_drive.as_ref(),
            saved.map(|s| s.block.as_ref()),
        )?;
        let code = drives.attach(
            DriveSlot::Code,
            options.code_drive.as_ref(),
            saved.map(|s| s.code.as_ref()),
        )?;
        if options.interactive {
            subscribers.push(Arc::new(Mutex::new(StdinForwarder::new(
                dup_fd(libc::STDIN_FILENO)?,
                input_drained,
                serial.clone(),
            ))));
        }
        Ok(DeviceSet {
            exit,
            agent_ready,
            kernel_panic,
            serial,
            vsock: vsock.mmio.device.clone(),
            vsock_mmio: vsock.mmio,
            vsock_connector: vsock.connector,
            vsock_uds: options.vsock_uds.is_some(),
            block,
            code,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            cmdline_params,
            subscribers,
        })
    }

    /// Every device's state. Only meaningful while nothing runs: vCPUs
    /// paused and the event loop stopped.
    pub fn state(&self) -> DeviceStates {
        DeviceStates {
            serial: lock(&self.serial).save(),
            vsock: self.vsock_mmio.save(),
            block: self.block.as_ref().map(Persist::save),
            code: self.code.as_ref().map(Persist::save),
        }
    }
}

/// Which drive a virtio-blk slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DriveSlot {
    Root,
    Code,
}

/// What attaching a drive needs of the device set being made.
struct Drives<'a> {
    vm: &'a Vm,
    memory: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    subscribers: &'a mut Vec<Subscriber>,
    cmdline_params: &'a mut Vec<String>,
    /// The disk limits; each drive gets buckets of its own.
    limits: &'a RateLimitConfig,
}

impl Drives<'_> {
    /// Attaches `disk` in `slot`, fresh or from its `saved` state (`None`:
    /// a boot; `Some(None)`: a snapshot without that drive).
    fn attach(
        &mut self,
        slot: DriveSlot,
        disk: Option<&Arc<DiskImage>>,
        saved: Option<Option<&BlockState>>,
    ) -> Result<Option<MmioBlock>, DeviceError> {
        let state = match (disk, saved) {
            (None, None | Some(None)) => return Ok(None),
            // The caller picked the file; restoring checks that it fits
            // the guest's idea of the drive.
            (Some(_), Some(Some(state))) => Some(state),
            (Some(_), None) => None,
            (None, Some(Some(_))) => return Err(DeviceError::DriveMissing),
            (Some(_), Some(None)) => return Err(DiskError::NoDriveInSnapshot.into()),
        };
        let Some(disk) = disk else { return Ok(None) };
        attach_block(self, slot, disk, state).map(Some)
    }
}

/// The vsock device as attached to a VM.
struct AttachedVsock {
    mmio: MmioVsock,
    connector: InProcessBackend,
    cmdline: String,
}

/// Puts a vsock device in its virtio-mmio slot: interrupt through an irqfd,
/// queue notifications through ioeventfds.
fn attach_vsock(
    vm: &Vm,
    memory: &GuestMemoryMmap,
    mmio: &mut Bus,
    options: &DeviceOptions,
    saved: Option<&VsockState>,
) -> Result<AttachedVsock, DeviceError> {
    let (Some(addr), Some(irq)) = (
        layout::virtio_mmio_addr(VSOCK_SLOT),
        layout::virtio_mmio_irq(VSOCK_SLOT),
    ) else {
        return Err(DeviceError::NoSlot);
    };
    let interrupt = Arc::new(Interrupt::new(eventfd()?));
    vm.register_irqfd(interrupt.irqfd(), irq)?;

    let hub = VsockHub::new().map_err(DeviceError::EventFd)?;
    let (backend, connector): (Box<dyn VsockBackend>, InProcessBackend) = match &options.vsock_uds {
        Some(path) => {
            let uds =
                UdsBackend::start(path, hub.clone()).map_err(|source| DeviceError::VsockUds {
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
    options.io_limits.validate()?;
    let args = VsockArgs {
        cid: options.vsock_cid,
        interrupt,
        backend,
        hub,
        memory: memory.clone(),
        tx_limiter: RateLimiter::new(&options.io_limits.vsock)?,
        rx_limiter: RateLimiter::new(&options.io_limits.vsock)?,
    };
    let vsock = match saved {
        Some(state) => MmioVsock::restore(args, state)?,
        None => MmioVsock::new(args)?,
    };
    register_queue_events(vm, addr.raw_value(), lock(&vsock.device).queue_events())?;
    mmio.insert(addr.raw_value(), MMIO_WINDOW_SIZE, vsock.transport.clone())?;
    Ok(AttachedVsock {
        mmio: vsock,
        connector,
        cmdline: format!("virtio_mmio.device=4K@{:#x}:{irq}", addr.raw_value()),
    })
}

/// Makes the guest's writes of queue index `i` to the notify register of
/// the device at `addr` signal `events[i]` (an ioeventfd: no vCPU exit to
/// the VMM's own code).
fn register_queue_events(vm: &Vm, addr: u64, events: &[EventFd]) -> Result<(), DeviceError> {
    let notify = IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET);
    for (index, event) in (0u32..).zip(events) {
        vm.fd()
            .register_ioevent(event, &notify, index)
            .map_err(DeviceError::Ioevent)?;
    }
    Ok(())
}

/// Puts a drive's block device in its virtio-mmio slot (interrupt
/// through an irqfd, queue notifications through an ioeventfd), its
/// backend on the event loop, and its kernel parameters on the command
/// line, limited by `limits`.
fn attach_block(
    at: &mut Drives<'_>,
    slot: DriveSlot,
    disk: &Arc<DiskImage>,
    saved: Option<&BlockState>,
) -> Result<MmioBlock, DeviceError> {
    let (index, id) = match slot {
        DriveSlot::Root => (ROOT_DRIVE_SLOT, ROOT_DRIVE_ID),
        DriveSlot::Code => (CODE_DRIVE_SLOT, CODE_DRIVE_ID),
    };
    let vm = at.vm;
    let (Some(addr), Some(irq)) = (
        layout::virtio_mmio_addr(index),
        layout::virtio_mmio_irq(index),
    ) else {
        return Err(DeviceError::NoSlot);
    };
    let interrupt = Arc::new(Interrupt::new(eventfd()?));
    vm.register_irqfd(interrupt.irqfd(), irq)?;
    let args = BlockArgs {
        disk: disk.clone(),
        id,
        interrupt,
        memory: at.memory.clone(),
        limiter: RateLimiter::new(at.limits)?,
    };
    let block = match saved {
        Some(state) => MmioBlock::restore(args, state)?,
        None => MmioBlock::new(args)?,
    };
    register_queue_events(
        vm,
        addr.raw_value(),
        std::slice::from_ref(lock(&block.device).queue_event()),
    )?;
    at.mmio
        .insert(addr.raw_value(), MMIO_WINDOW_SIZE, block.transport.clone())?;
    at.subscribers
        .push(Arc::new(Mutex::new(BlockEvents::new(block.device.clone()))));
    at.cmdline_params.push(format!(
        "virtio_mmio.device=4K@{:#x}:{irq}",
        addr.raw_value()
    ));
    // The agent mounts the root drive at boot; the code drive only when a
    // function start names it.
    if slot == DriveSlot::Root {
        at.cmdline_params.push(format!(
            "{}={ROOT_DRIVE_GUEST_DEVICE}",
            ember_protocol::CMDLINE_ROOT
        ));
    }
    Ok(block)
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

fn console_writer(console: &ConsoleOutput) -> Result<Box<dyn std::io::Write + Send>, DeviceError> {
    Ok(match console {
        ConsoleOutput::Stdout => Box::new(dup_fd(libc::STDOUT_FILENO)?),
        ConsoleOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| DeviceError::Console {
                path: path.clone(),
                source,
            })?)
        }
        ConsoleOutput::Sink => Box::new(std::io::sink()),
    })
}

/// An unbuffered `File` on a duplicate of one of our standard fds.
fn dup_fd(fd: i32) -> Result<File, DeviceError> {
    // SAFETY: dup() on a standard fd number has no memory-safety
    // preconditions; the result is checked below.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(DeviceError::EventFd(std::io::Error::last_os_error()));
    }
    // SAFETY: `dup` is a freshly duplicated fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(dup) })
}

impl From<BlockError> for DeviceError {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::EventFd(e) => DeviceError::EventFd(e),
            BlockError::Drive(e) => DeviceError::Drive(e),
            BlockError::Transport(e) => DeviceError::Restore(e),
        }
    }
}

impl From<VsockError> for DeviceError {
    fn from(e: VsockError) -> Self {
        match e {
            VsockError::EventFd(e) => DeviceError::EventFd(e),
            VsockError::Transport(e) => DeviceError::Restore(e),
        }
    }
}

/// The devices could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd or fd duplicate could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// Registering an interrupt with KVM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Registering a queue notification with KVM failed.
    #[error("cannot register a virtio queue notification: {0}")]
    Ioevent(kvm_ioctls::Error),
    /// Device ranges collide.
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("no virtio-mmio slot left")]
    NoSlot,
    /// The console file cannot be created.
    #[error("cannot create console file {path}: {source}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The vsock Unix socket cannot be created.
    #[error("cannot listen on vsock socket {path}: {source}")]
    VsockUds {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Saved serial state is inconsistent.
    #[error("{0}")]
    SerialState(String),
    /// Saved virtio state is inconsistent.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The root drive cannot be used.
    #[error(transparent)]
    Drive(#[from] DiskError),
    /// A rate limit is invalid or its timer cannot be made.
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
    /// The saved state has a root drive, but none was given.
    #[error("the snapshot has a root drive, but no drive file was opened for it")]
    DriveMissing,
}

#[cfg(test)]
mod tests {
    use super::DeviceStates;

    /// The devices' part of a snapshot `state` payload as written by ember
    /// before the devices' states had one trait (`ember snapshot create
    /// --root-drive`): serial, the vsock transport (three queues) and a
    /// root drive's transport (one queue) with its drive, no code drive.
    const DEVICES_V4: [u8; 137] = [
        0x0c, 0x00, 0x05, 0x01, 0x13, 0x60, 0x0b, 0xb0, 0x00, 0x00, 0x0f, 0x80, 0x80, 0x80, 0x80,
        0x10, 0x02, 0x00, 0x00, 0x00, 0x01, 0x03, 0x80, 0x02, 0x80, 0x02, 0x01, 0x80, 0x80, 0xce,
        0x01, 0x80, 0xa0, 0xce, 0x01, 0x80, 0xc0, 0xce, 0x01, 0x03, 0x03, 0x00, 0x80, 0x02, 0x80,
        0x02, 0x01, 0x80, 0x80, 0xcf, 0x01, 0x80, 0xa0, 0xcf, 0x01, 0x80, 0xc0, 0xcf, 0x01, 0x03,
        0x03, 0x00, 0x10, 0x10, 0x01, 0x80, 0x80, 0xcd, 0x01, 0x80, 0x82, 0xcd, 0x01, 0x80, 0xa0,
        0xcd, 0x01, 0x00, 0x00, 0x00, 0x01, 0x0f, 0xe6, 0x84, 0x80, 0x80, 0x10, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x01, 0x80, 0x02, 0x80, 0x02, 0x01, 0x80, 0x80, 0xc0, 0x01, 0x80, 0xa0, 0xc0,
        0x01, 0x80, 0xc0, 0xc0, 0x01, 0x09, 0x09, 0x00, 0x05, 0x64, 0x72, 0x69, 0x76, 0x65, 0x80,
        0x80, 0xc0, 0x49, 0x95, 0xc1, 0xe9, 0x04, 0xe4, 0xda, 0xb4, 0xb1, 0x0d, 0x92, 0xdb, 0xbc,
        0x4c, 0x00,
    ];

    #[test]
    fn saved_device_states_keep_their_encoding() {
        let states: DeviceStates = postcard::from_bytes(&DEVICES_V4).unwrap();
        assert_eq!(states.vsock.transport.queues.len(), 3);
        assert_eq!(states.vsock.transport.queues[0].max_size, 256);
        let block = states.block.as_ref().unwrap();
        assert_eq!(block.transport.queues.len(), 1);
        assert_eq!(block.drive.path, b"drive");
        assert!(states.code.is_none());
        assert_eq!(postcard::to_stdvec(&states).unwrap(), DEVICES_V4);
    }
}
