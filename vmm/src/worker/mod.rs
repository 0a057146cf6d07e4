//! One jailed VMM process per sandbox.
//!
//! When isolation is asked for, the VM does not run in the caller's
//! process: the caller spawns `ember __worker` with new mount, network,
//! IPC, UTS and PID namespaces, hands it four file descriptors — a control
//! socket, the snapshot's `state` and `memory` files and `/dev/kvm` — and
//! puts it in its own cgroups. The worker jails itself ([`crate::jail`]),
//! restores the snapshot, reseeds the clone, installs seccomp filters,
//! reports ready on the control socket and from then on relays bytes
//! between the control socket and the guest agent. The parent speaks the
//! agent protocol over the control socket exactly as it would in-process,
//! so a compromised worker is just one more untrusted peer.
//!
//! A worker serves one sandbox and exits when the control socket closes.
//! Other modes use the same spawn and jail: [`function`] (one function
//! invocation), [`recycled`] (one recycled function clone serving many
//! invocations) and [`template`] (building a function template: the boot,
//! the tenant's import and warm-up).

pub use crate::cgroup;
pub mod function;
pub mod recycled;
mod stderr;
pub mod template;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ember_protocol::protocol::Hello;

use self::cgroup::{Limits, WorkerCgroup};
use crate::agent::AgentClient;
use crate::deadline::DeadlineStream;
pub use crate::isolation::{default_worker_exe, Isolation, WORKER_EXE_ENV, WORKER_SUBCOMMAND};
use crate::jail::{self, IdLease, JailConfig};
use crate::ready::{ReadyTimings, RESTORE_CONNECT_TIMEOUT};
use crate::refresh::fresh_refresh;
use crate::snapshot::{RestoreOptions, Snapshot};

/// Descriptor numbers the worker is started with.
const CONTROL_FD: RawFd = 3;
const STATE_FD: RawFd = 4;
const MEMORY_FD: RawFd = 5;
const KVM_FD: RawFd = 6;
/// The snapshot's drives follow from descriptor 7 on: the root drive if
/// the worker is told so by its `with-drive` argument, then the code drive
/// if by `with-code-drive`.
const FIRST_DRIVE_FD: RawFd = 7;
/// The argument that says the worker got a root drive.
const WITH_DRIVE: &str = "with-drive";
/// The argument that says the worker got a code drive.
const WITH_CODE_DRIVE: &str = "with-code-drive";
/// The test hook argument of [`Isolation::forge_stderr`].
const FORGE_STDERR: &str = "forge-stderr";
/// Prefix of the worker argument carrying the clone's I/O limits (JSON).
const IO_LIMITS_ARG: &str = "io-limits=";
/// Longest status line a worker may send.
const MAX_LINE: usize = 4096;
/// How long a finished worker's last stderr lines may take to show.
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// Memory a worker may use beyond its guest's RAM.
const VMM_OVERHEAD_BYTES: u64 = 64 << 20;

/// The parent's handle on a running worker; kills and reaps it on drop.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    cgroup: Option<WorkerCgroup>,
    /// The worker's uid/gid, free again once it is gone.
    _ids: IdLease,
    /// The thread showing the worker's stderr.
    stderr: Option<std::thread::JoinHandle<()>>,
    reaped: Option<ExitStatus>,
}

impl WorkerProcess {
    /// The worker's PID (as the host sees it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `grace` for the worker to exit by itself (it does once
    /// its control socket closes), then kills it; returns how it ended.
    pub fn finish(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            if !wait_exit(self.child.id(), grace) {
                let _ = self.child.kill();
            }
            self.reaped = self.child.wait().ok();
            // Kills whatever of the worker is left.
            self.cgroup = None;
            stderr::finish(self.stderr.take(), STDERR_GRACE);
        }
        self.reaped
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.cgroup = None;
            stderr::finish(self.stderr.take(), STDERR_GRACE);
        }
    }
}

/// Waits for process `pid` to exit, at most `timeout`, without reaping it.
fn wait_exit(pid: u32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes integers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = RawFd::try_from(fd) else {
        return false;
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is a fresh pidfd that nothing else owns.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut pollfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pollfd, 1, ms) > 0 }
}

/// Describes how a worker ended, for errors.
pub fn describe_exit(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) if s.signal() == Some(libc::SIGSYS) => {
            "the worker was killed by seccomp (a forbidden system call)".into()
        }
        Some(s) if s.signal().is_some() => {
            format!(
                "the worker was killed by signal {}",
                s.signal().unwrap_or(0)
            )
        }
        Some(s) => format!("the worker exited with {}", s.code().unwrap_or(-1)),
        None => "the worker's status is unknown".into(),
    }
}

/// Spawns a worker for a clone of `snapshot` and waits until its agent is
/// connected and reseeded. Returns the process, an agent client speaking
/// through it, and the timings.
pub fn spawn(
    snapshot: &Snapshot,
    options: &RestoreOptions,
    isolation: &Isolation,
) -> Result<(WorkerProcess, AgentClient, ReadyTimings), WorkerError> {
    let started = Instant::now();
    let mode = isolation.violate_seccomp.then_some("violate-seccomp");
    let (mut worker, control) = start(snapshot, options, isolation, mode)?;
    // One deadline for the whole ready line: a worker sending it a byte at
    // a time gets no more time than a silent one.
    let mut control = DeadlineStream::new(control);
    control
        .set_deadline(Some(Instant::now() + RESTORE_CONNECT_TIMEOUT))
        .map_err(WorkerError::Io)?;
    let line = match read_line(&mut control) {
        Ok(line) => line,
        Err(e) => {
            let status = worker.finish(Duration::from_secs(1));
            return Err(WorkerError::Died(format!("{e}; {}", describe_exit(status))));
        }
    };
    let ready = parse_ready(&line).ok_or_else(|| WorkerError::Failed(line.clone()))?;
    let control = control.into_inner();
    control.set_read_timeout(None).map_err(WorkerError::Io)?;
    let agent = AgentClient::attach(control, ready.hello)
        .map_err(|e| WorkerError::Failed(e.to_string()))?;
    // The agent's greeting reaches the parent with the ready line.
    let timings = ReadyTimings {
        start: ready.restore,
        agent: started.elapsed(),
        ready: started.elapsed(),
    };
    Ok((worker, agent, timings))
}

/// Starts a worker in `mode` (its third argument, if any) for a clone of
/// `snapshot`, already inside its cgroups; returns it and the parent's end
/// of its control socket.
/// Kills (SIGKILL) and reaps the workers this process started that still
/// run, and returns how many there were: for a process about to end. A
/// worker started from the main thread dies with it (parent-death
/// signal), but one started from another thread (a server's blocking
/// pool: a template build, a clone) would outlive the process.
pub fn kill_own_workers() -> usize {
    let me = std::process::id();
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent is the field after the command, which may hold
        // spaces and parentheses itself.
        let parent = stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(me) {
            continue;
        }
        let is_worker = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline.split(|b| *b == 0).nth(1) == Some(WORKER_SUBCOMMAND.as_bytes())
        });
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        if !is_worker {
            continue;
        }
        // SAFETY: `pid` is our own child, not reaped yet (it is in /proc
        // with us as its parent), so the number cannot name another
        // process; kill and waitpid take plain integers.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        killed += 1;
    }
    killed
}

/// A worker's default memory limit for a clone of `snapshot`: its guest
/// memory plus the VMM's own.
pub fn memory_limit_bytes(snapshot: &Snapshot) -> u64 {
    (u64::from(snapshot.mem_mib()) << 20) + VMM_OVERHEAD_BYTES
}

fn start(
    snapshot: &Snapshot,
    options: &RestoreOptions,
    isolation: &Isolation,
    mode: Option<&str>,
) -> Result<(WorkerProcess, UnixStream), WorkerError> {
    if options.vsock_uds.is_some() {
        return Err(WorkerError::Unsupported(
            "a vsock Unix socket cannot be reached from inside the jail",
        ));
    }
    if options.root_drive.is_some() {
        return Err(WorkerError::Unsupported(
            "a jailed clone uses the snapshot's own root drive",
        ));
    }
    let limits = Limits {
        memory_bytes: isolation
            .memory_limit_bytes
            .unwrap_or_else(|| memory_limit_bytes(snapshot)),
        cpus: u32::from(snapshot.vcpus()),
    };
    let state =
        File::open(snapshot.dir().join(crate::snapshot::STATE_FILE)).map_err(WorkerError::Io)?;
    let memory = snapshot
        .memory_file()
        .try_clone()
        .map_err(WorkerError::Io)?;
    let kvm = File::open("/dev/kvm").map_err(WorkerError::Io)?;
    // Opened (beneath the snapshot directory) and checked with the
    // snapshot; a drive that could not be is not handed over.
    let drive = snapshot.root_drive_file();
    let code_drive = snapshot.code_drive_file();
    let mut fds = vec![state.as_raw_fd(), memory.as_raw_fd(), kvm.as_raw_fd()];
    fds.extend(drive.map(AsRawFd::as_raw_fd));
    fds.extend(code_drive.map(AsRawFd::as_raw_fd));
    let mut args: Vec<String> = mode.map(String::from).into_iter().collect();
    args.extend(drive.is_some().then(|| WITH_DRIVE.to_string()));
    args.extend(code_drive.is_some().then(|| WITH_CODE_DRIVE.to_string()));
    args.extend(io_limits_arg(&options.io_limits)?);
    let ids = isolation.ids.lease()?;
    launch(isolation, ids, limits, &fds, &args, false)
}

/// Most descriptors a worker is handed besides its control socket.
const MAX_HANDED_FDS: usize = jail::MAX_MOVED_FDS - 1;

/// Spawns `ember __worker <id> <id> <args>` as `ids`, in new namespaces
/// and (if asked) its own cgroups with `limits`, with its control socket
/// as descriptor 3 and `fds` as 4, 5, ...; with `stdout_to_stderr` its
/// stdout goes where its stderr goes (prefixed and escaped by the parent).
fn launch(
    isolation: &Isolation,
    ids: IdLease,
    limits: Limits,
    fds: &[RawFd],
    args: &[String],
    stdout_to_stderr: bool,
) -> Result<(WorkerProcess, UnixStream), WorkerError> {
    if fds.len() > MAX_HANDED_FDS {
        return Err(WorkerError::Unsupported(
            "too many descriptors for a worker",
        ));
    }
    let cgroup = if isolation.cgroups {
        WorkerCgroup::create(&cgroup::unique_name(), limits).map_err(WorkerError::Cgroup)?
    } else {
        None
    };
    // Opened here: the child joins by writing "0" (itself), which needs no
    // allocation between fork and exec.
    let procs = match &cgroup {
        Some(group) => group.procs_files().map_err(WorkerError::Cgroup)?,
        None => Vec::new(),
    };
    let procs_fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let (control, theirs) = UnixStream::pair().map_err(WorkerError::Io)?;
    let mut all_fds = vec![theirs.as_raw_fd()];
    all_fds.extend_from_slice(fds);
    let (stderr_ours, stderr_theirs) = std::io::pipe().map_err(WorkerError::Io)?;
    let stdout = if stdout_to_stderr {
        Stdio::from(stderr_theirs.try_clone().map_err(WorkerError::Io)?)
    } else {
        Stdio::null()
    };
    // A worker started from the main thread dies with the caller, even one
    // killed by a signal (no destructor runs then): `ember invoke` or
    // `function create` interrupted leaves no VM behind. (The parent-death
    // signal follows the spawning thread, so a worker started from any
    // other thread, which may end first, relies on its owner's handle.)
    // SAFETY: gettid and getpid take no arguments.
    let die_with_caller = unsafe { libc::gettid() == libc::getpid() };
    let caller = std::process::id();
    let mut command = Command::new(&isolation.worker_exe);
    command
        .arg(WORKER_SUBCOMMAND)
        .arg(ids.id().to_string())
        .arg(ids.id().to_string())
        .args(args)
        .args(isolation.forge_stderr.then_some(FORGE_STDERR))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr_theirs);
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls on integers it captured by value
    // (`procs_fds` and `all_fds` are only read).
    unsafe {
        command.pre_exec(move || {
            // Into the worker's cgroups before anything else runs: every
            // process and thread of the worker, the guest's included, is
            // born inside its limits.
            for fd in &procs_fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if die_with_caller {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The caller may have died before the signal was armed.
                if u32::try_from(libc::getppid()).ok() != Some(caller) {
                    libc::_exit(1);
                }
            }
            // Control socket and descriptors to 3, 4, ...; new
            // namespaces, the network's included.
            jail::detach_into_namespaces(&all_fds, true)?;
            Ok(())
        });
    }
    let child = command.spawn().map_err(WorkerError::Spawn)?;
    // Drops the child's end of the stderr pipe too, so the forwarder sees
    // the end of the output once the worker is gone.
    drop((theirs, procs, command));
    let stderr = stderr::forward(stderr_ours, child.id());
    let worker = WorkerProcess {
        child,
        cgroup,
        _ids: ids,
        stderr,
        reaped: None,
    };
    Ok((worker, control))
}

/// What a worker reports once ready.
struct ReadyLine {
    hello: Hello,
    /// The worker's restore, from its request until the vCPUs ran.
    restore: Duration,
}

fn parse_ready(line: &str) -> Option<ReadyLine> {
    let rest = line.strip_prefix("ready ")?;
    let field = |key: &str| -> Option<&str> {
        rest.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
    };
    Some(ReadyLine {
        hello: Hello {
            protocol_version: field("protocol")?.parse().ok()?,
            agent_version: field("agent")?.to_string(),
        },
        restore: Duration::from_micros(field("restore_us")?.parse().ok()?),
    })
}

/// Reads one line byte by byte (nothing after it is consumed), bounded.
fn read_line(stream: &mut impl Read) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "worker closed its control socket",
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ if line.len() >= MAX_LINE => {
                return Err(std::io::Error::other("worker status line too long"))
            }
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// The worker side: `ember __worker <uid> <gid>`, started by [`spawn`].
/// Returns the process exit code.
pub fn worker_main(args: &[String]) -> i32 {
    // A jailed pip run has no control socket: it becomes pip.
    if args.get(2).map(String::as_str) == Some(crate::function::pip_jail::PIP_MODE) {
        return crate::function::pip_jail::serve(args);
    }
    // SAFETY: fd 3 was set up by the parent for us alone.
    let mut control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    match run_worker(args, &mut control) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(control, "error {e}");
            1
        }
    }
}

fn run_worker(args: &[String], control: &mut UnixStream) -> Result<(), WorkerError> {
    let id = |i: usize| -> Result<u32, WorkerError> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .ok_or(WorkerError::Unsupported(
                "usage: ember __worker <uid> <gid>",
            ))
    };
    let config = JailConfig {
        uid: id(0)?,
        gid: id(1)?,
        ..JailConfig::default()
    };
    if args.iter().any(|a| a == FORGE_STDERR) {
        // What a compromised worker would try: pass for the parent's log
        // lines, move the cursor, clear the terminal line.
        eprint!(
            "\nember: error: forged by the worker\n\
             {{\"level\":\"INFO\",\"fields\":{{\"message\":\"forged by the worker\"}}}}\n\
             \r\x1b[2Kforged by the worker\n"
        );
    }
    if args.get(2).map(String::as_str) == Some(template::TEMPLATE_MODE) {
        return template::serve(control, config);
    }
    jail::become_namespace_init()?;

    // Everything from the host was opened by the parent: the worker opens
    // no file by name.
    // SAFETY: fds 4 to 6 (and the drives after them) were set up by the parent
    // for us alone.
    let state = unsafe { File::from_raw_fd(STATE_FD) };
    // SAFETY: as above.
    let memory = unsafe { File::from_raw_fd(MEMORY_FD) };
    // SAFETY: as above.
    let kvm = unsafe { kvm_ioctls::Kvm::from_raw_fd(KVM_FD) };
    let mut next_fd = FIRST_DRIVE_FD;
    let mut handed = |flag: &str| {
        let fd = args.iter().skip(2).any(|a| a == flag).then_some(next_fd)?;
        next_fd += 1;
        // SAFETY: the parent handed this descriptor over for us alone, as
        // the flag says.
        Some(unsafe { File::from_raw_fd(fd) })
    };
    let drive = handed(WITH_DRIVE);
    let code_drive = handed(WITH_CODE_DRIVE);
    crate::vstate::use_kvm(kvm);
    jail::close_fds_from(next_fd as u32)?;
    // Read (not parsed) with the privileges it was opened with.
    let mut state_bytes = Vec::new();
    state
        .take(crate::snapshot::format::HEADER_LEN + crate::snapshot::MAX_STATE_LEN + 1)
        .read_to_end(&mut state_bytes)
        .map_err(WorkerError::Io)?;
    // Read while /sys is still visible; cached for the restore.
    crate::host::HostKind::detect();
    // A recycled clone's reset reads its own page map to find the pages a
    // device wrote: that worker gets a /proc of its PID namespace.
    let recycled = args.iter().skip(2).any(|a| a == recycled::RECYCLED_MODE);
    jail::enter_root_with(&[], recycled)?;
    jail::drop_privileges(&JailConfig {
        dumpable: recycled,
        ..config
    })?;
    // The state file is untrusted input: parsed only now, jailed. It can
    // name no file; the drive is the one the parent opened beneath the
    // snapshot directory, and must still match what the state records.
    let snapshot = Snapshot::from_state_bytes(
        Path::new("(worker)"),
        &state_bytes,
        memory,
        drive,
        code_drive,
    )?;

    if args.iter().skip(2).any(|a| a == function::FUNCTION_MODE) {
        return function::serve(control, snapshot);
    }
    if recycled {
        return recycled::serve(control, snapshot);
    }
    let options = RestoreOptions {
        io_limits: io_limits_from_args(args)?,
        ..RestoreOptions::default()
    };
    let mut machine = snapshot.restore(&options)?;
    // From here on the control thread only talks to the agent, relays
    // bytes and tears down: filtered before the first byte from the guest.
    crate::seccomp::Filter::Control
        .install()
        .map_err(|e| WorkerError::Failed(e.to_string()))?;
    let deadline = Instant::now() + RESTORE_CONNECT_TIMEOUT;
    let agent = AgentClient::connect_refreshed(&machine, fresh_refresh(), deadline)
        .map_err(|e| WorkerError::Failed(e.to_string()))?;
    if args.iter().skip(2).any(|a| a == "violate-seccomp") {
        // SAFETY: socket() takes integers; the filter kills us first.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
    // Known once a vCPU ran, which it has if the agent answered.
    let restore = machine.times().vmm_setup().unwrap_or_default();
    let hello = agent.hello().clone();
    writeln!(
        control,
        "ready protocol={} agent={} restore_us={}",
        hello.protocol_version,
        hello.agent_version.replace(char::is_whitespace, "_"),
        restore.as_micros()
    )
    .map_err(WorkerError::Io)?;
    relay(control, agent.into_stream());
    machine.stop();
    Ok(())
}

/// The worker argument for `limits`, if any is set.
fn io_limits_arg(
    limits: &crate::devices::rate_limiter::IoLimits,
) -> Result<Option<String>, WorkerError> {
    if !limits.is_limited() {
        return Ok(None);
    }
    let json = serde_json::to_string(limits).map_err(|e| WorkerError::Failed(e.to_string()))?;
    Ok(Some(format!("{IO_LIMITS_ARG}{json}")))
}

/// The I/O limits the parent passed (none: unlimited).
fn io_limits_from_args(
    args: &[String],
) -> Result<crate::devices::rate_limiter::IoLimits, WorkerError> {
    match args
        .iter()
        .skip(2)
        .find_map(|a| a.strip_prefix(IO_LIMITS_ARG))
    {
        None => Ok(Default::default()),
        Some(json) => serde_json::from_str(json)
            .map_err(|e| WorkerError::Failed(format!("bad {IO_LIMITS_ARG} argument: {e}"))),
    }
}

/// Copies bytes both ways until either side closes.
fn relay(control: &mut UnixStream, mut agent: UnixStream) {
    let _ = agent.set_read_timeout(None);
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = [
        libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: agent.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let (from, to): (&mut UnixStream, &mut UnixStream) = if i == 0 {
                (&mut *control, &mut agent)
            } else {
                (&mut agent, &mut *control)
            };
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// A worker could not be started or failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A file or socket operation failed.
    #[error("worker: {0}")]
    Io(std::io::Error),
    /// The worker binary could not be started.
    #[error("cannot start the sandbox worker: {0}")]
    Spawn(std::io::Error),
    /// The worker's cgroups could not be set up.
    #[error("cannot set up the worker's cgroups: {0}")]
    Cgroup(std::io::Error),
    /// The worker reported a failure.
    #[error("sandbox worker failed: {0}")]
    Failed(String),
    /// The worker died before it was ready.
    #[error("sandbox worker died: {0}")]
    Died(String),
    /// A configuration isolation cannot serve.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The jail could not be entered.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// The snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::rate_limiter::{IoLimits, RateLimitConfig};

    #[test]
    fn io_limits_reach_the_worker_intact() {
        assert!(io_limits_arg(&IoLimits::default()).unwrap().is_none());
        let limits = IoLimits {
            disk: RateLimitConfig::bandwidth(3 << 20),
            vsock: RateLimitConfig::bandwidth(1 << 20),
        };
        let arg = io_limits_arg(&limits).unwrap().unwrap();
        let args = ["60000", "60000", "function", arg.as_str()].map(String::from);
        assert_eq!(io_limits_from_args(&args).unwrap(), limits);
        assert_eq!(
            io_limits_from_args(&args[..3]).unwrap(),
            IoLimits::default()
        );
        let bad = ["1", "1", "io-limits={"].map(String::from);
        assert!(io_limits_from_args(&bad)
            .unwrap_err()
            .to_string()
            .contains("io-limits"));
    }
}
