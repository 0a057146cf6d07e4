//! Running one [`Invoke`]: work directory and input files, pipes, cgroup,
//! the process itself (see [`spawn`](crate::serve::spawn)), output forwarding with
//! a cap, the timeout, and the exit report with usage and collected files.
//!
//! The state machine here does no waiting of its own: the server's event
//! loop tells it when a pipe is ready, when the main process was reaped and
//! when a deadline it asked for has come.
//!
//! Each system call costs about half a millisecond in ember's test guests,
//! so the path is counted (strace, release build): for a plain invocation
//! (no stdin, files or collect; cgroups on) the agent makes 17 system calls
//! from reading the Invoke frame to sending Exit (18 with `memory.peak`),
//! and the child 12 up to and including `execve`. There is no fork (see
//! [`spawn`](crate::serve::spawn)), and the work directory, cgroup and pipes come
//! from a [`Slot`] staged while the agent was idle. Each file in or out
//! adds 3 to 4 calls, plus 4 to switch the file system identity once.
//!
//! Measured in a test guest (`ember run -- true`): request to `clone` under
//! 1 ms, `clone` to the child's `execve` taking over about 90 ms, and the
//! main process's exit to the Exit frame about 4 ms; the rest is the
//! program (for busybox `true`, about 450 ms of exec and exit).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::protocol::{
    encode_frame_into, AgentMessage, ErrorKind, Exit, ExitStatus, FileIn, FileOut, FrameKind,
    Invoke, Usage, MAX_CHUNK, MAX_COLLECT_BYTES,
};
use crate::serve::cgroup::{CgroupError, Cgroups, InvocationCgroup};
use crate::serve::spawn::{self, Plan, SpawnError, Stack};
use crate::{sys, SANDBOX_GID, SANDBOX_UID};

/// Where work directories are made: `/tmp/inv-<n>`.
const WORK_ROOT: &str = "/tmp";

/// Directories searched for an `argv[0]` without a slash, in order.
const PATH: [&str; 2] = ["/bin", "/usr/bin"];

/// The agent's umask, set once when the runner is made.
const UMASK: libc::mode_t = 0o022;

/// Between SIGTERM at the timeout and SIGKILL to whatever is left.
const TERM_GRACE: Duration = Duration::from_millis(100);

/// After the main process exited and everything else was killed, how long
/// to wait for the output pipes to reach end of file before giving up on
/// them. With a cgroup every writer is dead by then; without one, a process
/// that left the process group may hold a pipe open for ever.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Bytes read from an output pipe at once: a whole default pipe buffer.
const READ_SIZE: usize = 64 * 1024;

/// Starting an invocation failed; nothing of it is left running.
#[derive(Debug, Error)]
pub(crate) enum InvokeError {
    #[error("work directory {path}: {source}")]
    WorkDir { path: String, source: io::Error },
    #[error("files_in {path}: {source}")]
    FileIn { path: String, source: io::Error },
    #[error("cwd {path}: {source}")]
    Cwd { path: String, source: io::Error },
    #[error("pipe: {source}")]
    Pipe { source: io::Error },
    #[error("stdin: {source}")]
    Stdin { source: io::Error },
    #[error("argv, env or cwd holds a NUL byte")]
    Nul,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

impl InvokeError {
    /// What to tell the host.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            InvokeError::Pipe { .. } | InvokeError::Cgroup(_) => ErrorKind::Internal,
            InvokeError::Spawn(SpawnError::Clone { .. } | SpawnError::LowFd { .. }) => {
                ErrorKind::Internal
            }
            _ => ErrorKind::SpawnFailed,
        }
    }
}

/// The output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Starts invocations; owns what they share.
pub(crate) struct Runner {
    next_id: u64,
    cgroups: Cgroups,
    stack: Stack,
    devnull: Option<OwnedFd>,
    /// The next invocation's slot, made while nothing waits for it.
    staged: Option<Slot>,
    /// Groups of ended invocations, removed while nothing waits.
    cleanup: Vec<InvocationCgroup>,
    /// Read buffer for the output pipes, reused so its pages are faulted
    /// in once.
    scratch: Vec<u8>,
}

/// What an invocation needs that does not depend on its request: made
/// ahead of time (at boot, so that a snapshot of the idle agent holds one,
/// and after each invocation) because in ember's test guests it takes
/// about 60 ms, most of it making the cgroup.
struct Slot {
    /// `/tmp/inv-<n>`, empty, owned by the sandbox user.
    workdir: String,
    cgroup: Option<InvocationCgroup>,
    /// (read end, write end)
    stdout: (OwnedFd, OwnedFd),
    stderr: (OwnedFd, OwnedFd),
}

impl Runner {
    /// A runner placing invocations in cgroups as `cgroups` allows.
    pub(crate) fn new(cgroups: Cgroups) -> Self {
        // SAFETY: umask only sets the calling process's file mode mask.
        // Set, not assumed: files_in modes are fixed up against it, and the
        // invoked programs inherit it.
        unsafe { libc::umask(UMASK) };
        let mut runner = Runner {
            next_id: 1,
            cgroups,
            stack: Stack::new(),
            // An empty stdin is /dev/null: cheaper than a pipe to close.
            devnull: sys::open(c"/dev/null", libc::O_RDONLY, 0).ok(),
            staged: None,
            cleanup: Vec::new(),
            scratch: vec![0; READ_SIZE],
        };
        runner.idle_work();
        runner
    }

    /// Work that no request waits for: removes the cgroups of ended
    /// invocations and stages the next slot. Failures are left for
    /// [`start`](Self::start) to meet again and report.
    pub(crate) fn idle_work(&mut self) {
        for group in std::mem::take(&mut self.cleanup) {
            if let Err(busy) = group.try_remove() {
                self.cleanup.push(busy);
            }
        }
        if self.staged.is_none() {
            self.staged = self.make_slot().ok();
        }
    }

    fn make_slot(&mut self) -> Result<Slot, InvokeError> {
        let (workdir, id) = self.make_workdir()?;
        let stdout = sys::pipe().map_err(|source| InvokeError::Pipe { source })?;
        let stderr = sys::pipe().map_err(|source| InvokeError::Pipe { source })?;
        let cgroup = if self.cgroups.enabled {
            let mut n = id;
            Some(InvocationCgroup::create(self.cgroups, &mut n)?)
        } else {
            None
        };
        Ok(Slot {
            workdir,
            cgroup,
            stdout,
            stderr,
        })
    }

    /// Prepares and starts `invoke` (already validated). On error nothing
    /// is left running.
    pub(crate) fn start(&mut self, invoke: Invoke) -> Result<Invocation, InvokeError> {
        let slot = match self.staged.take() {
            Some(slot) => slot,
            None => self.make_slot()?,
        };
        let Slot {
            workdir,
            cgroup,
            stdout: (stdout_r, stdout_w),
            stderr: (stderr_r, stderr_w),
        } = slot;
        let timeout = Duration::from_millis(invoke.timeout_ms);
        let max_output = invoke.max_output_bytes;
        let launched = self.launch(invoke, &workdir, cgroup.as_ref(), stdout_w, stderr_w);
        let (pid, started, feeder, collect) = match launched {
            Ok(launched) => launched,
            Err(err) => {
                // A child that failed exited with 127; the reaper collects
                // it like any orphan.
                self.cleanup.extend(cgroup);
                return Err(err);
            }
        };
        Ok(Invocation {
            pid,
            started,
            deadline: started + timeout,
            phase: Phase::Running,
            drain_until: None,
            stdin: feeder,
            stdout: Some(stdout_r),
            stderr: Some(stderr_r),
            exited: None,
            timed_out: false,
            forwarded: 0,
            max_output,
            truncated: false,
            collect,
            workdir,
            cgroup,
            peak_kib: None,
        })
    }

    /// Writes the input files, sets up stdin and starts the process in the
    /// slot's directory and group. The output pipes' write ends are closed
    /// once the child has its copies.
    fn launch(
        &mut self,
        invoke: Invoke,
        workdir: &str,
        cgroup: Option<&InvocationCgroup>,
        stdout_w: OwnedFd,
        stderr_w: OwnedFd,
    ) -> Result<(libc::pid_t, Instant, Option<Feeder>, Vec<String>), InvokeError> {
        let Invoke {
            argv,
            env,
            cwd,
            stdin,
            files_in,
            collect,
            ..
        } = invoke;
        let (cwd, relative_cwd) = match cwd {
            Some(abs) if abs.starts_with('/') => (abs, None),
            Some(rel) => (join(workdir, &rel), Some(rel)),
            None => (workdir.to_owned(), None),
        };
        if !files_in.is_empty() || relative_cwd.is_some() {
            let _fs = SandboxFs::enter();
            let mut made = BTreeSet::new();
            write_files(workdir, &files_in, &mut made)?;
            if let Some(rel) = &relative_cwd {
                make_dirs(workdir, rel, true, &mut made).map_err(|source| InvokeError::Cwd {
                    path: cwd.clone(),
                    source,
                })?;
            }
        }
        drop(files_in);
        let (stdin_child, stdin_pipe, feeder) = self.stdin(stdin)?;

        let programs = program_candidates(argv.first().map_or("", String::as_str));
        // validate() ruled NUL bytes out; the conversions cannot fail.
        let to_c = |s: String| sys::cstring(s).map_err(|_| InvokeError::Nul);
        let programs = programs.into_iter().map(to_c).collect::<Result<_, _>>()?;
        let argv = argv.into_iter().map(to_c).collect::<Result<_, _>>()?;
        let env = env
            .into_iter()
            .map(|(key, value)| to_c(format!("{key}={value}")))
            .collect::<Result<_, _>>()?;
        let mut plan = Plan::new(programs, argv, env, to_c(cwd)?);
        plan.stdin = stdin_child;
        plan.stdout = stdout_w.as_raw_fd();
        plan.stderr = stderr_w.as_raw_fd();
        plan.cgroup_procs = cgroup.map(InvocationCgroup::procs_fd);
        plan.uid = SANDBOX_UID;
        plan.gid = SANDBOX_GID;

        let started = Instant::now();
        let spawned = spawn::spawn(&plan, &mut self.stack);
        // The child's ends: it has its copies (or is gone). Closed now, so
        // that the pipes reach end of file when the invocation is done.
        drop((stdin_pipe, stdout_w, stderr_w));
        Ok((spawned?, started, feeder, collect))
    }

    /// Makes `/tmp/inv-<n>` owned by the sandbox user. `mkdir` never
    /// follows a symlink a previous invocation may have planted under the
    /// next name: the name is then taken and the next `n` tried.
    fn make_workdir(&mut self) -> Result<(String, u64), InvokeError> {
        let mut attempts = 0;
        loop {
            let id = self.next_id;
            self.next_id += 1;
            let dir = format!("{WORK_ROOT}/inv-{id}");
            let err = |source| InvokeError::WorkDir {
                path: dir.clone(),
                source,
            };
            let path = sys::cstring(dir.as_str()).map_err(err)?;
            // SAFETY: `path` is NUL-terminated.
            if unsafe { libc::mkdir(path.as_ptr(), 0o755) } != 0 {
                let source = sys::last_error();
                attempts += 1;
                if source.raw_os_error() == Some(libc::EEXIST) && attempts < 64 {
                    continue;
                }
                return Err(err(source));
            }
            // SAFETY: as above; chown does not follow anything here, the
            // directory was just made by us.
            if unsafe { libc::chown(path.as_ptr(), SANDBOX_UID, SANDBOX_GID) } != 0 {
                return Err(err(sys::last_error()));
            }
            return Ok((dir, id));
        }
    }

    /// The child's stdin (and the pipe end behind it, to close after the
    /// start), and what is left to feed it.
    fn stdin(
        &mut self,
        data: Vec<u8>,
    ) -> Result<(RawFd, Option<OwnedFd>, Option<Feeder>), InvokeError> {
        if data.is_empty() {
            if let Some(null) = &self.devnull {
                // Lent, not duplicated: the child dup3()s it onto 0.
                return Ok((null.as_raw_fd(), None, None));
            }
        }
        let (read, write) = sys::pipe().map_err(|source| InvokeError::Pipe { source })?;
        if data.is_empty() {
            return Ok((read.as_raw_fd(), Some(read), None));
        }
        // Non-blocking, so that feeding a program that does not read can
        // never stall the agent; the read end (the child's) stays blocking.
        sys::set_nonblocking(write.as_raw_fd()).map_err(|source| InvokeError::Stdin { source })?;
        let mut feeder = Feeder {
            fd: write,
            data,
            pos: 0,
        };
        // Fill the pipe now: small inputs are then done before the start.
        match feeder.write() {
            Ok(true) => Ok((read.as_raw_fd(), Some(read), None)),
            Ok(false) => Ok((read.as_raw_fd(), Some(read), Some(feeder))),
            Err(source) => Err(InvokeError::Stdin { source }),
        }
    }

    /// Whether and how processes get cgroups.
    pub(crate) fn cgroups(&self) -> Cgroups {
        self.cgroups
    }

    /// The stack [`spawn`] runs children on.
    pub(crate) fn stack(&mut self) -> &mut Stack {
        &mut self.stack
    }

    /// `/dev/null`, open for reading, if it could be opened.
    pub(crate) fn devnull(&self) -> Option<RawFd> {
        self.devnull.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Hands over a group whose processes were killed, to be removed by
    /// [`idle_work`](Self::idle_work).
    pub(crate) fn retire(&mut self, group: InvocationCgroup) {
        self.cleanup.push(group);
    }

    /// Reads what one output pipe has and queues it as frames on `out`.
    pub(crate) fn read_output(&mut self, inv: &mut Invocation, stream: Stream, out: &mut Vec<u8>) {
        inv.read_output(stream, &mut self.scratch, out);
    }

    /// Ends a finished invocation: reads the collected files and the peak
    /// memory, removes the cgroup, and returns the exit report.
    pub(crate) fn finish(&mut self, inv: Invocation) -> Exit {
        let Invocation {
            started,
            exited,
            timed_out,
            truncated,
            collect,
            workdir,
            cgroup,
            peak_kib,
            ..
        } = inv;
        let (status, rusage, ended) = match exited {
            Some(exited) => (exited.status, exited.rusage, exited.at),
            // Not reached: finish is only called once the exit was seen.
            None => (libc::SIGKILL, zero_rusage(), Instant::now()),
        };
        // Removed later: see idle_work.
        self.cleanup.extend(cgroup);
        let max_rss = u64::try_from(rusage.ru_maxrss).unwrap_or(0);
        Exit {
            status: exit_status(status),
            timed_out,
            output_truncated: truncated,
            usage: Usage {
                wall_ms: millis(ended.saturating_duration_since(started)),
                cpu_user_ms: timeval_ms(rusage.ru_utime),
                cpu_sys_ms: timeval_ms(rusage.ru_stime),
                max_rss_kib: max_rss.max(peak_kib.unwrap_or(0)),
            },
            files_out: collect_files(&workdir, &collect),
        }
    }

    /// Kills whatever is left of an invocation nobody waits for any more
    /// (the connection went away). The reaper collects the processes.
    pub(crate) fn abort(&mut self, mut inv: Invocation) {
        inv.kill_all();
        self.cleanup.extend(inv.cgroup.take());
    }
}

/// A running invocation.
pub(crate) struct Invocation {
    /// The main process, leader of the invocation's session and group.
    pid: libc::pid_t,
    started: Instant,
    deadline: Instant,
    phase: Phase,
    /// How long to wait for end of file after the main process exited.
    drain_until: Option<Instant>,
    stdin: Option<Feeder>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    exited: Option<Exited>,
    timed_out: bool,
    forwarded: u64,
    max_output: u64,
    truncated: bool,
    collect: Vec<String>,
    workdir: String,
    /// Until it was found empty and removed.
    cgroup: Option<InvocationCgroup>,
    /// The group's `memory.peak`, read when the main process exited.
    peak_kib: Option<u64>,
}

/// Where an invocation is on its way to the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the timeout.
    Running,
    /// Timed out: SIGTERM sent, SIGKILL for all at `kill_at`.
    Terminating { kill_at: Instant },
    /// Everything was sent SIGKILL.
    Killed,
}

struct Exited {
    status: libc::c_int,
    rusage: libc::rusage,
    at: Instant,
}

impl Invocation {
    /// The main process.
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The pipe that feeds stdin, while there is input left.
    pub(crate) fn stdin_fd(&self) -> Option<RawFd> {
        self.stdin.as_ref().map(|feeder| feeder.fd.as_raw_fd())
    }

    /// An output pipe, until its end of file.
    pub(crate) fn output_fd(&self, stream: Stream) -> Option<RawFd> {
        match stream {
            Stream::Stdout => self.stdout.as_ref(),
            Stream::Stderr => self.stderr.as_ref(),
        }
        .map(AsRawFd::as_raw_fd)
    }

    /// Feeds stdin as far as the pipe takes it; closes it when done or when
    /// the program closed its end.
    pub(crate) fn write_stdin(&mut self) {
        if let Some(feeder) = &mut self.stdin {
            match feeder.write() {
                Ok(false) => {}
                // Done, or EPIPE (the program does not want the rest).
                Ok(true) | Err(_) => self.stdin = None,
            }
        }
    }

    fn read_output(&mut self, stream: Stream, scratch: &mut [u8], out: &mut Vec<u8>) {
        let slot = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        let Some(fd) = slot else { return };
        // One read per readiness event: epoll said there is data (or end of
        // file), so this does not block, and the pipe needs no O_NONBLOCK.
        // SAFETY: `scratch` is writable for its whole length.
        let n = unsafe { libc::read(fd.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len()) };
        if n < 0 {
            match sys::errno() {
                libc::EINTR | libc::EAGAIN => {}
                _ => *slot = None,
            }
            return;
        }
        if n == 0 {
            // End of file; dropping the descriptor also takes it out of
            // the epoll set.
            *slot = None;
            return;
        }
        let data = scratch.get(..n.unsigned_abs()).unwrap_or_default();
        self.forward(stream, data, out);
    }

    /// Queues output as frames, within the cap.
    fn forward(&mut self, stream: Stream, data: &[u8], out: &mut Vec<u8>) {
        let room = self.max_output.saturating_sub(self.forwarded);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
        if take < data.len() {
            self.truncated = true;
        }
        let kept = data.get(..take).unwrap_or_default();
        for chunk in kept.chunks(MAX_CHUNK) {
            let msg = match stream {
                Stream::Stdout => AgentMessage::Stdout(chunk.to_vec()),
                Stream::Stderr => AgentMessage::Stderr(chunk.to_vec()),
            };
            // Cannot fail: a chunk is far below the frame limit.
            let _ = encode_frame_into(out, FrameKind::Agent, &msg);
        }
        self.forwarded += take as u64;
    }

    /// The main process was reaped: everything else in the invocation is
    /// killed now, and the pipes are drained to their end.
    pub(crate) fn main_exited(&mut self, status: libc::c_int, rusage: libc::rusage) {
        let now = Instant::now();
        self.exited = Some(Exited {
            status,
            rusage,
            at: now,
        });
        // Before the kill: what the killed processes still held counts.
        self.peak_kib = self.cgroup.as_ref().and_then(InvocationCgroup::peak_kib);
        self.kill_all();
        self.stdin = None;
        self.drain_until = Some(now + DRAIN_GRACE);
    }

    /// The next moment [`tick`](Self::tick) has something to do, if any.
    /// `output_paused`: the output pipes are not being read (the host is
    /// slow), so the drain must not be given up on.
    pub(crate) fn next_deadline(&self, output_paused: bool) -> Option<Instant> {
        if self.exited.is_some() {
            return self.drain_until.filter(|_| !output_paused);
        }
        match self.phase {
            Phase::Running => Some(self.deadline),
            Phase::Terminating { kill_at } => Some(kill_at),
            Phase::Killed => None,
        }
    }

    /// Acts on the deadlines that have passed: SIGTERM at the timeout,
    /// SIGKILL after the grace, giving up on the pipes after the drain.
    pub(crate) fn tick(&mut self, now: Instant, output_paused: bool) {
        if self.exited.is_some() {
            if !output_paused && self.drain_until.is_some_and(|until| now >= until) {
                self.stdout = None;
                self.stderr = None;
            }
            return;
        }
        match self.phase {
            Phase::Running if now >= self.deadline => {
                self.timed_out = true;
                self.stdin = None;
                // The group gets a chance to clean up; processes that left
                // it get the SIGKILL below (from the cgroup).
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(-self.pid, libc::SIGTERM) };
                self.phase = Phase::Terminating {
                    kill_at: now + TERM_GRACE,
                };
            }
            Phase::Terminating { kill_at } if now >= kill_at => self.kill_all(),
            _ => {}
        }
    }

    /// Whether the exit report can be made: the main process was reaped and
    /// both output pipes reached their end (or were given up on).
    pub(crate) fn is_finished(&self) -> bool {
        self.exited.is_some() && self.stdout.is_none() && self.stderr.is_none()
    }

    /// SIGKILL to everything in the invocation: the whole cgroup, or the
    /// process group when there is no cgroup (or killing it failed).
    fn kill_all(&mut self) {
        self.phase = Phase::Killed;
        if let Some(group) = &self.cgroup {
            if group.kill().is_ok() {
                return;
            }
        }
        // SAFETY: kill has no memory-safety preconditions. ESRCH (the group
        // is empty) is the good case.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }
}

/// Input for the program's stdin, fed through a non-blocking pipe.
struct Feeder {
    fd: OwnedFd,
    data: Vec<u8>,
    pos: usize,
}

impl Feeder {
    /// Writes as much as the pipe takes; `Ok(true)` when all is written.
    fn write(&mut self) -> io::Result<bool> {
        while let Some(rest) = self.data.get(self.pos..).filter(|rest| !rest.is_empty()) {
            // SAFETY: `rest` is valid for reads of its length.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                return match sys::errno() {
                    libc::EAGAIN => Ok(false),
                    libc::EINTR => continue,
                    _ => Err(sys::last_error()),
                };
            }
            self.pos += n.unsigned_abs();
        }
        Ok(true)
    }
}

/// Makes file system objects as the sandbox user for as long as it lives
/// (`setfsuid`/`setfsgid`): what the agent creates for an invocation is
/// owned by that user without a `chown` per file, and what it reads back
/// for one is only what that user could read, whatever symlinks the
/// program left.
struct SandboxFs;

impl SandboxFs {
    fn enter() -> Self {
        // SAFETY: setfsgid/setfsuid only change this thread's file system
        // credentials; the agent is single-threaded.
        unsafe {
            libc::setfsgid(SANDBOX_GID);
            libc::setfsuid(SANDBOX_UID);
        }
        SandboxFs
    }
}

impl Drop for SandboxFs {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; back to root's (the agent runs as root).
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
    }
}

/// The paths `execve` tries for `argv[0]`: itself when it has a slash,
/// else each [`PATH`] directory's entry.
pub(crate) fn program_candidates(program: &str) -> Vec<String> {
    if program.contains('/') {
        vec![program.to_owned()]
    } else {
        PATH.iter().map(|dir| join(dir, program)).collect()
    }
}

pub(crate) fn join(dir: &str, rel: &str) -> String {
    let mut path = String::with_capacity(dir.len() + 1 + rel.len());
    path.push_str(dir);
    path.push('/');
    path.push_str(rel);
    path
}

/// Makes the directories of `rel` under `base` (all of them with `all`,
/// else all but the last component); `made` remembers them across calls so
/// that each costs one `mkdir` per invocation.
pub(crate) fn make_dirs(
    base: &str,
    rel: &str,
    all: bool,
    made: &mut BTreeSet<String>,
) -> io::Result<()> {
    let mut ends: Vec<usize> = rel
        .match_indices('/')
        .map(|(i, _)| i)
        .filter(|&i| i > 0)
        .collect();
    if all {
        ends.push(rel.len());
    }
    for end in ends {
        let Some(prefix) = rel.get(..end) else {
            continue;
        };
        if prefix.ends_with('/') || prefix.ends_with("/.") || prefix == "." || made.contains(prefix)
        {
            continue;
        }
        let path = sys::cstring(join(base, prefix))?;
        // SAFETY: `path` is NUL-terminated.
        if unsafe { libc::mkdir(path.as_ptr(), 0o755) } != 0 && sys::errno() != libc::EEXIST {
            return Err(sys::last_error());
        }
        made.insert(prefix.to_owned());
    }
    Ok(())
}

/// Writes `files_in` under `workdir` (as the sandbox user, see
/// [`SandboxFs`], or as whoever the caller is).
pub(crate) fn write_files(
    workdir: &str,
    files: &[FileIn],
    made: &mut BTreeSet<String>,
) -> Result<(), InvokeError> {
    let mut written = BTreeSet::new();
    for file in files {
        let err = |source| InvokeError::FileIn {
            path: file.path.clone(),
            source,
        };
        make_dirs(workdir, &file.path, false, made).map_err(err)?;
        let path = sys::cstring(join(workdir, &file.path)).map_err(err)?;
        let mode = file.mode & 0o7777;
        let fd = sys::open(
            &path,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
            mode,
        )
        .map_err(err)?;
        sys::write_all(fd.as_raw_fd(), &file.data).map_err(err)?;
        // open applied the umask (and leaves an existing file's mode):
        // only then is a second call needed.
        if mode & UMASK != 0 || written.contains(file.path.as_str()) {
            // SAFETY: fchmod on a descriptor we own.
            if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
                return Err(err(sys::last_error()));
            }
        }
        // A second files_in entry for the same path must get its own mode.
        written.insert(file.path.as_str());
    }
    Ok(())
}

/// Reads back the `collect` paths, within [`MAX_COLLECT_BYTES`] overall.
fn collect_files(workdir: &str, paths: &[String]) -> Vec<FileOut> {
    if paths.is_empty() {
        return Vec::new();
    }
    let _fs = SandboxFs::enter();
    let mut budget = MAX_COLLECT_BYTES;
    paths
        .iter()
        .map(
            |path| match read_collected(&join(workdir, path), &mut budget) {
                Ok(data) => FileOut {
                    path: path.clone(),
                    data: Some(data),
                    error: None,
                },
                Err(error) => FileOut {
                    path: path.clone(),
                    data: None,
                    error: Some(error),
                },
            },
        )
        .collect()
}

fn read_collected(path: &str, budget: &mut u64) -> Result<Vec<u8>, String> {
    let cpath = sys::cstring(path).map_err(|err| err.to_string())?;
    // O_NONBLOCK: a FIFO left under a collected name must not hang the
    // agent (it is refused below as not a regular file). O_NOFOLLOW: the
    // last component is not followed; SandboxFs bounds the rest.
    let fd = sys::open(
        &cpath,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW,
        0,
    )
    .map_err(|err| err.to_string())?;
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(sys::last_error().to_string());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err("not a regular file".into());
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size > *budget {
        return Err(format!(
            "{size} bytes is over what is left of the {MAX_COLLECT_BYTES}-byte collect limit ({budget})"
        ));
    }
    let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
    let mut len = 0;
    // Up to the size fstat gave: a file still growing is cut there.
    while let Some(rest) = data.get_mut(len..).filter(|rest| !rest.is_empty()) {
        // SAFETY: `rest` is writable for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            if sys::errno() == libc::EINTR {
                continue;
            }
            return Err(sys::last_error().to_string());
        }
        if n == 0 {
            break;
        }
        len += n.unsigned_abs();
    }
    data.truncate(len);
    *budget -= len as u64;
    Ok(data)
}

pub(crate) fn exit_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn timeval_ms(tv: libc::timeval) -> u64 {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let usecs = u64::try_from(tv.tv_usec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(usecs / 1000)
}

/// An all-zero `rusage`.
pub(crate) fn zero_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers, for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(exit_status(0), ExitStatus::Code(0));
        assert_eq!(exit_status(7 << 8), ExitStatus::Code(7));
        assert_eq!(exit_status(libc::SIGKILL), ExitStatus::Signal(9));
        assert_eq!(exit_status(libc::SIGTERM | 0x80), ExitStatus::Signal(15));
    }

    #[test]
    fn timevals() {
        assert_eq!(
            timeval_ms(libc::timeval {
                tv_sec: 2,
                tv_usec: 345_999
            }),
            2345
        );
        assert_eq!(
            timeval_ms(libc::timeval {
                tv_sec: -1,
                tv_usec: 0
            }),
            0
        );
    }

    fn inv_for_output(max_output: u64) -> Invocation {
        Invocation {
            pid: 0,
            started: Instant::now(),
            deadline: Instant::now(),
            phase: Phase::Running,
            drain_until: None,
            stdin: None,
            stdout: None,
            stderr: None,
            exited: None,
            timed_out: false,
            forwarded: 0,
            max_output,
            truncated: false,
            collect: Vec::new(),
            workdir: String::new(),
            cgroup: None,
            peak_kib: None,
        }
    }

    fn frames(mut buf: &[u8]) -> Vec<AgentMessage> {
        let mut msgs = Vec::new();
        while let Some((msg, used)) =
            crate::protocol::decode_frame::<AgentMessage>(buf, FrameKind::Agent).unwrap()
        {
            msgs.push(msg);
            buf = &buf[used..];
        }
        assert!(buf.is_empty());
        msgs
    }

    #[test]
    fn output_is_chunked_and_capped() {
        let mut inv = inv_for_output(MAX_CHUNK as u64 * 2 + 10);
        let mut out = Vec::new();
        inv.forward(Stream::Stdout, &vec![1; MAX_CHUNK + 5], &mut out);
        assert!(!inv.truncated);
        inv.forward(Stream::Stderr, &vec![2; MAX_CHUNK + 100], &mut out);
        assert!(inv.truncated);
        inv.forward(Stream::Stdout, &[3; 10], &mut out);
        let msgs = frames(&out);
        let lens: Vec<(bool, usize)> = msgs
            .iter()
            .map(|m| match m {
                AgentMessage::Stdout(d) => (true, d.len()),
                AgentMessage::Stderr(d) => (false, d.len()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            lens,
            [(true, MAX_CHUNK), (true, 5), (false, MAX_CHUNK), (false, 5)]
        );
        assert_eq!(inv.forwarded, MAX_CHUNK as u64 * 2 + 10);
    }

    #[test]
    fn zero_cap_forwards_nothing() {
        let mut inv = inv_for_output(0);
        let mut out = Vec::new();
        inv.forward(Stream::Stdout, b"x", &mut out);
        assert!(out.is_empty());
        assert!(inv.truncated);
    }

    #[test]
    fn dirs_are_made_once() {
        let base = std::env::temp_dir().join(format!("ember-agent-dirs-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let base_s = base.to_str().unwrap();
        let mut made = BTreeSet::new();
        make_dirs(base_s, "a/b/c.txt", false, &mut made).unwrap();
        assert!(base.join("a/b").is_dir());
        assert!(!base.join("a/b/c.txt").exists());
        make_dirs(base_s, "a/./d//e", true, &mut made).unwrap();
        assert!(base.join("a/d/e").is_dir());
        assert!(made.contains("a") && made.contains("a/b") && made.contains("a/./d"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn collected_files_are_bounded() {
        let base = std::env::temp_dir().join(format!("ember-agent-collect-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("small"), b"hello").unwrap();
        std::fs::create_dir_all(base.join("dir")).unwrap();
        let path = |name: &str| base.join(name).to_str().unwrap().to_owned();
        let mut budget = 7;
        assert_eq!(
            read_collected(&path("small"), &mut budget).unwrap(),
            b"hello"
        );
        assert_eq!(budget, 2);
        assert!(read_collected(&path("small"), &mut budget)
            .unwrap_err()
            .contains("collect limit"));
        assert!(read_collected(&path("dir"), &mut budget)
            .unwrap_err()
            .contains("not a regular file"));
        assert!(read_collected(&path("missing"), &mut budget).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
