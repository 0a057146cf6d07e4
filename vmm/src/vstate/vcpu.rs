//! vCPU threads: one per vCPU, each looping on KVM_RUN and dispatching
//! port I/O and MMIO exits to the buses.
//!
//! Stopping a vCPU must be race-free: the owner sets a flag and sends the
//! thread a signal whose handler sets `immediate_exit` in the thread's
//! `kvm_run`. A signal that lands before KVM_RUN makes the next KVM_RUN
//! return at once; one that lands inside it interrupts it. Either way the
//! loop sees the flag.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::doorbell::{Doorbell, DOORBELL_ADDR};
use crate::devices::Bus;
use crate::exit::{ExitSignal, VmExit};
use crate::seccomp::{Filter, FilterVerdict, SeccompError};

thread_local! {
    // Const-initialised and without destructor, so the signal handler can
    // read it without lazy initialisation.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // the vCPU loop while the VcpuFd (which owns the mapping) is alive
        // and cleared before it is dropped. The handler runs on that thread.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALL.call_once(|| {
        let result = register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno());
        let _ = RESULT.set(result);
    });
    match RESULT.get() {
        Some(Ok(())) => Ok(()),
        Some(Err(errno)) => Err(VcpuError::Signal(std::io::Error::from_raw_os_error(*errno))),
        None => Err(VcpuError::Signal(std::io::Error::other(
            "handler not installed",
        ))),
    }
}

/// A configured vCPU, ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    first_run: Arc<OnceLock<Instant>>,
    doorbell: Option<Arc<Doorbell>>,
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    Stop(VmExit),
    /// The doorbell asked this vCPU to stop where it is (the VM has not
    /// exited; its owner pauses it).
    Park,
    /// KVM_EXIT_INTERNAL_ERROR: described once the exit's borrow ends.
    InternalError,
}

impl Vcpu {
    /// Wraps a configured vCPU fd. `first_run` records when any vCPU of the
    /// VM first entered KVM_RUN.
    pub fn new(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        first_run: Arc<OnceLock<Instant>>,
    ) -> Self {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            exit,
            first_run,
            doorbell: None,
        }
    }

    /// Hands writes to the hot-path doorbell page to `doorbell`.
    pub fn with_doorbell(mut self, doorbell: Arc<Doorbell>) -> Self {
        self.doorbell = Some(doorbell);
        self
    }

    /// Starts the vCPU's thread. With `seccomp`, the thread installs the
    /// vCPU filter before its first KVM_RUN (it never runs the guest
    /// unfiltered); [`VcpuHandle::started`] says whether it could.
    pub fn start(self, seccomp: bool) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        // seccomp: compiled (once per process) before the thread starts,
        // installed by the thread before its first KVM_RUN.
        let (filter, installed) = seccomp
            .then(|| Filter::Vcpu.for_thread())
            .transpose()
            .map_err(VcpuError::Seccomp)?
            .unzip();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("ember-vcpu{id}"))
            .spawn(move || {
                if filter.is_some_and(|f| !f.install()) {
                    return self;
                }
                self.run(&thread_stop)
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            id,
            stop,
            thread: Some(thread),
            installed,
        })
    }

    fn run(mut self, stop: &AtomicBool) -> Vcpu {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run()));
        self.first_run.get_or_init(Instant::now);
        while !stop.load(Ordering::SeqCst) {
            match self.run_once() {
                Next::Continue | Next::InternalError => {}
                Next::Park => break,
                Next::Stop(reason) => {
                    self.exit.report(reason);
                    break;
                }
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        self.complete_pending_io();
        self
    }

    /// An IN or MMIO read we just answered only lands in the guest's
    /// registers on the next KVM_RUN: enter once more with `immediate_exit`
    /// set, which completes it and returns at once, so the vCPU's state is
    /// whole (a snapshot taken now resumes correctly).
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => log::debug!("vCPU {}: final KVM_RUN: {e}", self.id),
            Ok(exit) => log::debug!("vCPU {}: final KVM_RUN exited with {exit:?}", self.id),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// The vCPU's KVM fd (for state save and restore).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    fn run_once(&mut self) -> Next {
        let (id, pio, mmio, doorbell) = (self.id, &self.pio, &self.mmio, &self.doorbell);
        let next = match self.fd.run() {
            Ok(VcpuExit::MmioWrite(DOORBELL_ADDR, data)) => match doorbell {
                Some(bell) if bell.ring(data) => Next::Park,
                _ => Next::Continue,
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                Next::Continue
            }
            // With the in-kernel irqchip KVM handles HLT itself; should one
            // reach us anyway, running again is the right answer.
            Ok(VcpuExit::Hlt) => Next::Continue,
            Ok(VcpuExit::Shutdown) => Next::Stop(VmExit::TripleFault { vcpu: id }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Next::Stop(VmExit::SystemEvent { kind }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(VmExit::Failed {
                vcpu: id,
                message: format!("KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"),
            }),
            Ok(VcpuExit::InternalError) => Next::InternalError,
            Ok(other) => Next::Stop(VmExit::Failed {
                vcpu: id,
                message: format!("unexpected KVM exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(VmExit::Failed {
                vcpu: id,
                message: format!("KVM_RUN: {e}"),
            }),
        };
        match next {
            Next::InternalError => Next::Stop(VmExit::Failed {
                vcpu: id,
                message: self.describe_internal_error(),
            }),
            next => next,
        }
    }

    /// Says where the guest was when KVM gave up on it: on PVM hosts this is
    /// usually an instruction the emulator cannot execute at CPL0.
    fn describe_internal_error(&mut self) -> String {
        // SAFETY: reading the `internal` member of the exit union is valid
        // right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|e| format!("unknown ({e})"));
        format!("KVM internal error (suberror {suberror}) at guest rip {rip}")
    }
}

/// The owner's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vcpu>>,
    /// seccomp: the thread's verdict on its filter, until collected.
    installed: Option<FilterVerdict>,
}

impl VcpuHandle {
    /// Waits until the thread installed its seccomp filter (if it was to):
    /// an error means it did not and ended without running the guest.
    pub fn started(&mut self) -> Result<(), VcpuError> {
        match self.installed.take().map(FilterVerdict::wait) {
            None => Ok(()),
            Some(Some(result)) => result.map_err(VcpuError::Seccomp),
            Some(None) => Err(VcpuError::Spawn(std::io::Error::other(
                "the vCPU thread ended before it ran",
            ))),
        }
    }

    /// Asks the vCPU to leave KVM_RUN and end its thread (without waiting).
    pub fn kick(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = &self.thread {
            if let Err(e) = thread.kill(kick_signal()) {
                log::warn!("cannot signal vCPU {}: {e}", self.id);
            }
        }
    }

    /// Stops the vCPU, waits for its thread and returns the vCPU (paused,
    /// with any pending I/O completed), or `None` if it was already stopped.
    pub fn stop(&mut self) -> Option<Vcpu> {
        self.kick();
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(vcpu) => Some(vcpu),
            Err(_) => {
                log::error!("vCPU {} thread panicked", self.id);
                None
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A vCPU thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn a vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// The vCPU seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(SeccompError),
}
