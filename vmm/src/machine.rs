//! A running microVM: its vCPU threads, device event loop and exit signal.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use crate::device_manager::DeviceSet;
use crate::devices::bus::lock;
use crate::devices::doorbell::Doorbell;
use crate::devices::legacy::LineWatch;
use crate::event_loop::EventLoop;
use crate::exit::VmExit;
use crate::host::HostKind;
use crate::vstate::stats::{GuestKernelWork, KvmStats};
use crate::vstate::vcpu::VcpuError;
use crate::vstate::{Vcpu, VcpuHandle, Vm};

/// Timestamps of a boot or restore, for benchmarks and `--verbose`.
#[derive(Debug, Clone)]
pub struct BootTimes {
    /// When `Machine::boot` (or the restore, or the preparation of a
    /// prepared clone) was called.
    pub requested: Instant,
    /// When the threads were asked to start: `requested` for a boot or a
    /// restore, later for a clone prepared ahead
    /// ([`crate::snapshot::PreparedClone::start`]).
    pub started: Instant,
    /// When the first vCPU entered KVM_RUN (shared with the vCPU threads).
    pub first_run: Arc<OnceLock<Instant>>,
    /// How long each step of building the VM took, in order.
    pub steps: Vec<(&'static str, Duration)>,
}

/// Records how long each step of a build takes.
#[derive(Debug)]
pub(crate) struct StepClock {
    started: Instant,
    resumed: Option<Instant>,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl StepClock {
    pub(crate) fn start(at: Instant) -> Self {
        StepClock {
            started: at,
            resumed: None,
            last: at,
            steps: Vec::with_capacity(16),
        }
    }

    /// Marks the start of a prepared clone, which may have waited since
    /// its last step: the wait is no step. The steps so far are kept, and
    /// so is the original start.
    pub(crate) fn restart(&mut self) {
        let now = Instant::now();
        self.resumed = Some(now);
        self.last = now;
    }

    /// When [`StepClock::restart`] was called, else the start.
    pub(crate) fn resumed(&self) -> Instant {
        self.resumed.unwrap_or(self.started)
    }

    /// Ends the step called `name`.
    pub(crate) fn step(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps
            .push((name, now.saturating_duration_since(self.last)));
        self.last = now;
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    pub(crate) fn into_steps(self) -> Vec<(&'static str, Duration)> {
        self.steps
    }
}

impl BootTimes {
    /// Time the VMM spent before the guest first ran, once it has: every
    /// step, from the request (a prepared clone's preparation included).
    pub fn vmm_setup(&self) -> Option<Duration> {
        self.first_run
            .get()
            .map(|t| t.saturating_duration_since(self.requested))
    }

    /// From the threads' start to the guest's first run: for a prepared
    /// clone, the part of a restore left on the request's path.
    pub fn start_to_run(&self) -> Option<Duration> {
        self.first_run
            .get()
            .map(|t| t.saturating_duration_since(self.started))
    }
}

/// A booted microVM. Dropping it stops the guest and joins every thread.
#[derive(Debug)]
pub struct Machine {
    // Field order is drop order: threads stop before the VM fd closes, and
    // the VM fd closes before guest memory is unmapped.
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) event_loop: EventLoop,
    pub(crate) vm: Vm,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) devices: DeviceSet,
    pub(crate) host: HostKind,
    pub(crate) times: BootTimes,
    pub(crate) cmdline: String,
    pub(crate) doorbell: Arc<Doorbell>,
    /// The vCPU threads are seccomp-filtered (resumed ones too).
    pub(crate) seccomp: bool,
    /// Each vCPU's KVM counters (empty where KVM has none).
    pub(crate) vcpu_stats: Vec<KvmStats>,
}

impl Machine {
    /// Blocks until the guest stops, and returns why.
    pub fn wait(&mut self) -> VmExit {
        loop {
            if let Some(exit) = self.wait_timeout(Duration::from_secs(3600)) {
                return exit;
            }
        }
    }

    /// Blocks until the guest stops or `timeout` passes.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<VmExit> {
        if self.devices.exit.reason().is_none() {
            let mut pollfd = libc::pollfd {
                fd: self.devices.exit.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: `pollfd` is a valid, initialised array of one entry
            // that outlives the call.
            let _ = unsafe { libc::poll(&mut pollfd, 1, ms) };
        }
        let exit = self.devices.exit.reason()?;
        self.halt();
        Some(self.classify(exit))
    }

    /// Stops the guest now (if it still runs) and returns why it stopped.
    pub fn stop(&mut self) -> VmExit {
        self.devices.exit.report(VmExit::Stopped);
        self.halt();
        let exit = self.devices.exit.reason().unwrap_or(VmExit::Stopped);
        self.classify(exit)
    }

    /// A guest kernel panic reboots through the i8042 like a power-off
    /// does (`panic=1 reboot=k`); the console tells them apart.
    fn classify(&self, exit: VmExit) -> VmExit {
        match (&exit, self.devices.kernel_panic.seen()) {
            (VmExit::Reset, Some((_, line))) => VmExit::Failed {
                vcpu: 0,
                message: format!("guest kernel panic: {}", line.trim()),
            },
            _ => exit,
        }
    }

    fn halt(&mut self) {
        self.pause();
        self.doorbell.wake();
    }

    /// Stops every vCPU (completing in-flight I/O) and the device event
    /// loop, and returns the vCPUs, so their state can be saved. The
    /// machine does not run again.
    pub(crate) fn pause(&mut self) -> Vec<Vcpu> {
        for vcpu in &self.vcpus {
            vcpu.kick();
        }
        let vcpus = self.vcpus.iter_mut().filter_map(VcpuHandle::stop).collect();
        self.event_loop.stop();
        lock(&self.devices.serial).flush();
        vcpus
    }

    /// Stops the vCPU threads (not the device event loop) and returns the
    /// vCPUs, paused with any in-flight I/O completed, for their state to
    /// be reset; [`Machine::resume_vcpus`] runs them again.
    pub(crate) fn park_vcpus(&mut self) -> Vec<Vcpu> {
        for vcpu in &self.vcpus {
            vcpu.kick();
        }
        let vcpus = self.vcpus.iter_mut().filter_map(VcpuHandle::stop).collect();
        self.vcpus.clear();
        vcpus
    }

    /// Runs vCPUs parked by [`Machine::park_vcpus`] again, each on a new
    /// thread filtered as the machine's first ones were.
    pub(crate) fn resume_vcpus(&mut self, vcpus: Vec<Vcpu>) -> Result<(), VcpuError> {
        for vcpu in vcpus {
            self.vcpus.push(vcpu.start(self.seccomp)?);
        }
        for vcpu in &mut self.vcpus {
            vcpu.started()?;
        }
        Ok(())
    }

    /// How much guest-kernel work the vCPUs did so far (all zero where KVM
    /// keeps no statistics).
    pub fn guest_kernel_work(&self) -> GuestKernelWork {
        GuestKernelWork::read(&self.vcpu_stats)
            .inspect_err(|e| log::debug!("vCPU statistics: {e}"))
            .unwrap_or_default()
    }

    /// The console line the agent prints when it is ready.
    pub fn agent_ready(&self) -> &LineWatch {
        &self.devices.agent_ready
    }

    /// A shared handle on [`Machine::agent_ready`], for another thread.
    pub fn agent_ready_watch(&self) -> Arc<LineWatch> {
        self.devices.agent_ready.clone()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Boot timestamps.
    pub fn times(&self) -> &BootTimes {
        &self.times
    }

    /// The host kind the VM was set up for.
    pub fn host(&self) -> HostKind {
        self.host
    }

    /// The kernel command line the guest was booted with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Opens a stream connection to `port` in the guest over vsock. The
    /// stream works at once; it reads end-of-file if the guest refuses.
    pub fn connect_vsock(&self, port: u32) -> std::io::Result<UnixStream> {
        self.devices.vsock_connector.connect(port)
    }

    /// Accepts the guest's connections to host port `port`.
    pub fn listen_vsock(&self, port: u32) -> Receiver<UnixStream> {
        self.devices.vsock_connector.listen(port)
    }

    /// The hot-path doorbell (see [`crate::devices::doorbell`]).
    pub fn doorbell(&self) -> &Arc<Doorbell> {
        &self.doorbell
    }

    /// The guest's vsock context ID.
    pub fn vsock_cid(&self) -> u64 {
        lock(&self.devices.vsock).cid()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.devices.exit.report(VmExit::Stopped);
        self.halt();
    }
}
