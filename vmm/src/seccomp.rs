//! Per-thread seccomp filters: what a thread that touches guest input may
//! ask of the host kernel.
//!
//! Three allow-lists, built from what the threads were seen to call
//! (`strace -f` on `ember run`, `ember boot` and the integration tests) plus
//! their rare paths (error reports, log lines, thread exit); every allowed
//! system call says why in one line:
//!
//! - [`Filter::Vcpu`]: a vCPU thread, from right before its first KVM_RUN:
//!   KVM_RUN and KVM_GET_REGS, eventfd and console writes, locks, memory
//!   allocation, the kick signal and thread exit. It opens, reads and
//!   creates nothing.
//! - [`Filter::EventLoop`]: the device event loop, from the start of its
//!   thread, before it handles any event: epoll, eventfds, stdin, the
//!   in-process vsock backend's socket pairs, plus the same base. It
//!   creates no socket of its own and connects nowhere.
//! - [`Filter::EventLoopVsockUds`]: the same, for a microVM with a
//!   Firecracker-style vsock Unix socket: it may also create `AF_UNIX`
//!   stream sockets and `connect` them (a guest connection to host port
//!   `P` is a connection to `<uds>_P`). seccomp cannot say *where*: it
//!   sees `connect`'s arguments as numbers, and the path is in memory
//!   behind a pointer that a filter cannot read (and that another thread
//!   could change after a check anyway). So this filter allows connecting
//!   to any Unix socket the process can reach; a microVM without a vsock
//!   Unix socket (every jailed worker) gets the filter without both calls,
//!   and a jailed worker's empty root has no socket to reach.
//! - [`Filter::Control`]: a worker process's main thread once its microVM
//!   runs: a superset of the two above (it shares their devices and fds)
//!   plus waiting (`poll`), kicking and joining the vCPU threads, the agent
//!   and parent connections (socket pair, read timeouts), fresh entropy and
//!   process exit. It creates no thread and opens no file, so it must be
//!   installed after [`crate::Machine`] has started.
//! - [`Filter::Waiter`]: the outer process of a jailed worker, from right
//!   after it forked the jailed child: wait, re-raise the child's signal,
//!   exit. Nothing else, not even memory allocation.
//!
//! Anything else kills the whole process (`SECCOMP_RET_KILL_PROCESS`, seen
//! by the parent as death by `SIGSYS`): a thread that does something it
//! never does is compromised, and so is the process it belongs to. No
//! filter lets memory become executable (`mmap`/`mprotect` without
//! `PROT_EXEC`, anonymous mappings only).
//!
//! [`crate::VmConfig::seccomp`] and [`crate::snapshot::RestoreOptions`]
//! (`seccomp`, on by default) switch the thread filters on; `Machine::start`
//! then fails if a thread could not install its filter, and no thread serves
//! the guest unfiltered. Filters are per thread (inherited by threads a
//! filtered thread creates) and leave the embedding application's other
//! threads alone; but a violation ends the whole process, which is why
//! serving untrusted tenants means one worker process per microVM. The vsock
//! Unix-socket backend's accept and handshake threads (host-side clients
//! only, no guest input) are not filtered.
//!
//! Each filter is compiled once per process. Installing one costs ~0.1 ms
//! on the test hosts (vCPU ~70 µs, event loop ~120 µs, control ~160 µs),
//! almost all of it the kernel precomputing its per-syscall action cache,
//! which grows with the number of allowed system calls; the threads install
//! theirs in parallel.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The KVM ioctl request numbers a filter lets through.
mod kvm_ioctl {
    use kvm_bindings::{kvm_regs, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
}

/// A thread's filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// A vCPU thread.
    Vcpu,
    /// The device event-loop thread of a microVM without a vsock Unix
    /// socket.
    EventLoop,
    /// The device event-loop thread of a microVM with a vsock Unix socket
    /// (it connects to `<uds>_<port>`).
    EventLoopVsockUds,
    /// A worker process's control thread, once its microVM runs.
    Control,
    /// The outer process of a jailed worker, which only waits for its
    /// jailed child (PID 1 of the worker's namespace) and exits as it did.
    Waiter,
}

impl Filter {
    /// The filter's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Vcpu => "vCPU",
            Filter::EventLoop => "event loop",
            Filter::EventLoopVsockUds => "event loop (vsock Unix socket)",
            Filter::Control => "control",
            Filter::Waiter => "waiter",
        }
    }

    /// The event-loop filter for a microVM with (`true`) or without a
    /// vsock Unix socket.
    pub fn event_loop(vsock_uds: bool) -> Self {
        if vsock_uds {
            Filter::EventLoopVsockUds
        } else {
            Filter::EventLoop
        }
    }

    /// The compiled filter (compiled on first use, once per process).
    pub fn program(self) -> Result<&'static BpfProgram, SeccompError> {
        static VCPU: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
        static EVENT_LOOP: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
        static EVENT_LOOP_UDS: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
        static CONTROL: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
        static WAITER: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
        let cell = match self {
            Filter::Vcpu => &VCPU,
            Filter::EventLoop => &EVENT_LOOP,
            Filter::EventLoopVsockUds => &EVENT_LOOP_UDS,
            Filter::Control => &CONTROL,
            Filter::Waiter => &WAITER,
        };
        cell.get_or_init(|| compile(self).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|message| SeccompError::Compile {
                filter: self.name(),
                message: message.clone(),
            })
    }

    /// Installs the filter on the calling thread (and on threads it creates
    /// from now on). There is no way back.
    pub fn install(self) -> Result<(), SeccompError> {
        let program = self.program()?;
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            filter: self.name(),
            source,
        })
    }
}

/// The end of a filter a new thread installs before doing anything else.
#[derive(Debug)]
pub struct ThreadFilter {
    filter: Filter,
    verdict: std::sync::mpsc::SyncSender<Result<(), SeccompError>>,
}

/// The starting thread's end: whether the new thread got its filter.
/// (The receiver sits in a mutex only so that handles holding it are
/// `Sync`.)
#[derive(Debug)]
pub struct FilterVerdict(std::sync::Mutex<std::sync::mpsc::Receiver<Result<(), SeccompError>>>);

impl Filter {
    /// Compiles the filter now, so the new thread only installs it, and
    /// pairs the thread's end with the starter's.
    pub fn for_thread(self) -> Result<(ThreadFilter, FilterVerdict), SeccompError> {
        self.program()?;
        let (verdict, receiver) = std::sync::mpsc::sync_channel(1);
        Ok((
            ThreadFilter {
                filter: self,
                verdict,
            },
            FilterVerdict(std::sync::Mutex::new(receiver)),
        ))
    }
}

impl ThreadFilter {
    /// Installs the filter on the calling thread and reports the verdict;
    /// false when it failed, and the thread must then end unserved.
    pub fn install(self) -> bool {
        let result = self.filter.install();
        let installed = result.is_ok();
        // The starter may have given up waiting; the verdict still holds.
        let _ = self.verdict.send(result);
        installed
    }
}

impl FilterVerdict {
    /// Waits for the thread's verdict; `None` when it ended before giving
    /// one.
    pub fn wait(self) -> Option<Result<(), SeccompError>> {
        let receiver = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        receiver.recv().ok()
    }
}

/// The vCPU threads' filter.
pub fn vcpu_filter() -> Result<&'static BpfProgram, SeccompError> {
    Filter::Vcpu.program()
}

/// The device event loop's filter.
pub fn event_loop_filter() -> Result<&'static BpfProgram, SeccompError> {
    Filter::EventLoop.program()
}

/// A worker process's control-thread filter.
pub fn control_filter() -> Result<&'static BpfProgram, SeccompError> {
    Filter::Control.program()
}

/// A filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not compile (a bug in this module).
    #[error("cannot build the {filter} seccomp filter: {message}")]
    Compile {
        /// Which filter.
        filter: &'static str,
        /// Why.
        message: String,
    },
    /// The kernel refused the filter (`prctl` or `seccomp` failed).
    #[error("cannot install the {filter} seccomp filter: {source}")]
    Install {
        /// Which filter.
        filter: &'static str,
        /// Why.
        source: seccompiler::Error,
    },
}

/// Syscall rules under construction: a syscall is allowed unconditionally,
/// or when one of its rules (a conjunction of argument checks) matches.
#[derive(Default)]
struct AllowList(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl AllowList {
    /// Allows `nr` whatever its arguments.
    fn any(&mut self, nr: libc::c_long) {
        self.0.insert(nr, None);
    }

    /// Allows `nr` when all of `conditions` hold (in addition to any other
    /// rule for it).
    fn when(
        &mut self,
        nr: libc::c_long,
        conditions: Vec<SeccompCondition>,
    ) -> Result<(), seccompiler::BackendError> {
        let rule = SeccompRule::new(conditions)?;
        // `None`: already allowed whatever the arguments.
        if let Some(rules) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(rule);
        }
        Ok(())
    }

    fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect()
    }
}

/// Argument `index` (as a 32-bit value) equals `value`.
fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// Argument `index` (as a 32-bit value) has none of the bits of `mask`.
fn arg_clear(index: u8, mask: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )
}

/// Argument `index` (as a 32-bit value) has all of the bits of `mask`.
fn arg_set(index: u8, mask: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        mask,
    )
}

/// A 64-bit argument (a pointer) is null.
fn arg_null(index: u8) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)
}

fn compile(filter: Filter) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut allow = AllowList::default();
    if filter == Filter::Waiter {
        waiter(&mut allow);
    } else {
        common(&mut allow)?;
    }
    match filter {
        Filter::Vcpu => vcpu(&mut allow)?,
        Filter::EventLoop => event_loop(&mut allow)?,
        Filter::EventLoopVsockUds => {
            event_loop(&mut allow)?;
            vsock_uds(&mut allow)?;
        }
        Filter::Control => {
            vcpu(&mut allow)?;
            event_loop(&mut allow)?;
            control(&mut allow)?;
        }
        Filter::Waiter => {}
    }
    SeccompFilter::new(
        allow.into_rules(),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}

/// What every filtered thread needs: locks, memory, time, writes to
/// eventfds and stderr, signal return and thread exit.
fn common(allow: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
    // Mutex, Condvar, Once and channel waits and wakes; thread join.
    allow.any(libc::SYS_futex);
    // Eventfd signals (irqfds, exit event, device wakes), console output,
    // log lines to stderr.
    allow.any(libc::SYS_write);
    // malloc: grow or trim the main heap.
    allow.any(libc::SYS_brk);
    // malloc: large blocks and thread arenas (anonymous, never executable).
    allow.when(
        libc::SYS_mmap,
        vec![
            arg_clear(2, PROT_EXEC)?,
            arg_set(3, libc::MAP_ANONYMOUS as u64)?,
        ],
    )?;
    // malloc: commit arena pages (never executable).
    allow.when(libc::SYS_mprotect, vec![arg_clear(2, PROT_EXEC)?])?;
    // malloc: free large blocks; thread exit: free the signal stack.
    allow.any(libc::SYS_munmap);
    // realloc of large blocks.
    allow.any(libc::SYS_mremap);
    // malloc trim and glibc's thread exit release pages; nothing else.
    allow.when(
        libc::SYS_madvise,
        vec![arg_eq(2, libc::MADV_DONTNEED as u64)?],
    )?;
    // Instant::now when the vDSO is unavailable.
    allow.any(libc::SYS_clock_gettime);
    // Return from a signal handler (the vCPU kick, or any handler the
    // embedding application installed).
    allow.any(libc::SYS_rt_sigreturn);
    // The kernel resumes an interrupted timed wait (futex, poll) after a
    // signal or SIGSTOP/SIGCONT this way.
    allow.any(libc::SYS_restart_syscall);
    // Thread exit: Rust std removes its stack-overflow signal stack.
    allow.any(libc::SYS_sigaltstack);
    // Thread exit (glibc blocks signals), pthread_kill.
    allow.any(libc::SYS_rt_sigprocmask);
    // Thread exit.
    allow.any(libc::SYS_exit);
    Ok(())
}

/// A vCPU thread: run the guest and serve port I/O and MMIO exits.
fn vcpu(allow: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    // Run the guest.
    allow.when(libc::SYS_ioctl, vec![arg_eq(1, kvm_ioctl::KVM_RUN())?])?;
    // Say where the guest was on KVM_EXIT_INTERNAL_ERROR.
    allow.when(libc::SYS_ioctl, vec![arg_eq(1, kvm_ioctl::KVM_GET_REGS())?])?;
    Ok(())
}

/// The event loop: virtqueue notifications, vsock host sockets, the root
/// drive, stdin.
fn event_loop(allow: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    const AF_UNIX: u64 = libc::AF_UNIX as u64;
    const STREAM_CLOEXEC: u64 = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64;
    // Wait for the next event.
    allow.any(libc::SYS_epoll_wait);
    // Watch and unwatch host sockets and stdin.
    allow.any(libc::SYS_epoll_ctl);
    // Consume eventfds (ioeventfds, hub, stop), read stdin.
    allow.any(libc::SYS_read);
    // virtio-blk: read the root drive into guest memory.
    allow.any(libc::SYS_pread64);
    // Read from a host socket (std's UnixStream::read).
    allow.any(libc::SYS_recvfrom);
    // Write to a connected host socket (std's UnixStream::write); no
    // destination address.
    allow.when(libc::SYS_sendto, vec![arg_null(4)?])?;
    // Make a new host socket non-blocking (std's set_nonblocking).
    allow.when(libc::SYS_ioctl, vec![arg_eq(1, libc::FIONBIO)?])?;
    // In-process backend: a guest connection to a listening host port.
    allow.when(
        libc::SYS_socketpair,
        vec![arg_eq(0, AF_UNIX)?, arg_eq(1, STREAM_CLOEXEC)?],
    )?;
    // The guest half-closed a connection.
    allow.any(libc::SYS_shutdown);
    // Closed connections; the loop's own fds at exit.
    allow.any(libc::SYS_close);
    // Debug builds of std check that an fd is open before closing it.
    allow.when(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)?])?;
    // A throttled device arms its rate limiter's timer.
    allow.any(libc::SYS_timerfd_settime);
    Ok(())
}

/// The vsock Unix-socket backend: a guest connection to host port `P` is
/// a new connection to `<uds>_P` (which path cannot be checked here).
fn vsock_uds(allow: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    const AF_UNIX: u64 = libc::AF_UNIX as u64;
    const STREAM_CLOEXEC: u64 = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64;
    // A guest connection to `<uds>_<port>`: a Unix stream socket only.
    allow.when(
        libc::SYS_socket,
        vec![arg_eq(0, AF_UNIX)?, arg_eq(1, STREAM_CLOEXEC)?],
    )?;
    // Connect that socket.
    allow.any(libc::SYS_connect);
    Ok(())
}

/// A jailed worker's outer process: wait for the child, then exit with its
/// status or die by its signal (`libc::_exit` and `raise`, nothing else).
fn waiter(allow: &mut AllowList) {
    // waitpid.
    allow.any(libc::SYS_wait4);
    // Reset the child's fatal signal to its default action...
    allow.any(libc::SYS_rt_sigaction);
    // ...and raise it (glibc blocks signals around tgkill).
    allow.any(libc::SYS_rt_sigprocmask);
    allow.any(libc::SYS_getpid);
    allow.any(libc::SYS_gettid);
    allow.any(libc::SYS_tgkill);
    // A signal interrupting waitpid.
    allow.any(libc::SYS_rt_sigreturn);
    allow.any(libc::SYS_restart_syscall);
    // _exit.
    allow.any(libc::SYS_exit_group);
}

/// A worker's control thread once its microVM runs.
fn control(allow: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    // Wait for the VM's exit event (Machine::wait_timeout) or a socket.
    allow.any(libc::SYS_poll);
    // Kick a vCPU out of KVM_RUN: its own signal only.
    allow.when(
        libc::SYS_tgkill,
        vec![arg_eq(2, vmm_sys_util::signal::SIGRTMIN() as u64)?],
    )?;
    // pthread_kill asks for the process ID before tgkill.
    allow.any(libc::SYS_getpid);
    // Read timeouts on the agent and parent connections.
    allow.when(
        libc::SYS_setsockopt,
        vec![
            arg_eq(1, libc::SOL_SOCKET as u64)?,
            arg_eq(2, libc::SO_RCVTIMEO as u64)?,
        ],
    )?;
    allow.when(
        libc::SYS_setsockopt,
        vec![
            arg_eq(1, libc::SOL_SOCKET as u64)?,
            arg_eq(2, libc::SO_SNDTIMEO as u64)?,
        ],
    )?;
    // UnixStream::try_clone (the agent client's writer half).
    allow.when(
        libc::SYS_fcntl,
        vec![arg_eq(1, libc::F_DUPFD_CLOEXEC as u64)?],
    )?;
    // Fresh entropy for a restored guest.
    allow.any(libc::SYS_getrandom);
    // The worker is done.
    allow.any(libc::SYS_exit_group);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    const FILTERS: [Filter; 5] = [
        Filter::Vcpu,
        Filter::EventLoop,
        Filter::EventLoopVsockUds,
        Filter::Control,
        Filter::Waiter,
    ];

    #[test]
    fn every_filter_compiles() {
        for filter in FILTERS {
            let program = filter.program().unwrap();
            assert!(!program.is_empty(), "{}", filter.name());
            // The kernel's limit is 4096 instructions.
            assert!(program.len() < 1024, "{}: {}", filter.name(), program.len());
            // Compiled once: the same program every time.
            assert!(std::ptr::eq(program, filter.program().unwrap()));
        }
        assert!(vcpu_filter().is_ok() && event_loop_filter().is_ok() && control_filter().is_ok());
    }

    #[test]
    fn ioctl_numbers() {
        assert_eq!(kvm_ioctl::KVM_RUN(), 0xae80);
        assert_eq!(kvm_ioctl::KVM_GET_REGS(), 0x8090_ae81);
    }

    /// Runs `work` on a thread that installed `filter` first, lets the
    /// thread exit, and returns what `work` returned (dropped here, not on
    /// the filtered thread). A missing allowance kills this test process
    /// (SIGSYS).
    fn on_filtered_thread<T: Send + 'static>(
        filter: Filter,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            filter.install().unwrap();
            work()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn vcpu_filter_allows_a_vcpu_threads_work() {
        // Eventfd writes, locks, allocation, a log line, thread exit; no fd
        // is created or closed on a vCPU thread.
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let theirs = irq.try_clone().unwrap();
        let theirs = on_filtered_thread(Filter::Vcpu, move || {
            theirs.write(1).unwrap();
            let lock = std::sync::Mutex::new(vec![0u8; 1 << 20]);
            lock.lock().unwrap().resize(4 << 20, 1);
            let _ = std::time::Instant::now();
            eprintln!("seccomp test: vCPU filter installed");
            theirs
        });
        assert_eq!(irq.read().unwrap(), 1);
        drop(theirs);
    }

    #[test]
    fn event_loop_filter_allows_an_event_loops_work() {
        // Eventfds, socket pairs, non-blocking, send/recv, half-close,
        // epoll, close, thread exit.
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        wake.write(1).unwrap();
        // Created by the loop's owner, like the event manager's.
        let epoll = Epoll::new().unwrap();
        on_filtered_thread(Filter::EventLoop, move || {
            let (a, mut b) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let event = EpollEvent::new(EventSet::IN, 1);
            epoll
                .ctl(ControlOperation::Add, wake.as_raw_fd(), event)
                .unwrap();
            let mut events = [EpollEvent::default(); 4];
            assert_eq!(epoll.wait(-1, &mut events).unwrap(), 1);
            assert_eq!(wake.read().unwrap(), 1);
            b.write_all(b"x").unwrap();
            let mut byte = [0u8];
            (&a).read_exact(&mut byte).unwrap();
            let mut theirs = theirs;
            theirs.write_all(b"hello").unwrap();
            theirs.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = String::new();
        ours.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
    }
}
