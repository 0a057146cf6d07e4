//! The VM's function runtime: one long-lived process, started once
//! ([`HostMessage::FunctionStart`](crate::protocol::HostMessage::FunctionStart),
//! usually at template time) and then serving one event at a time over
//! the pipes of the [runtime pipe protocol](crate::function::runtime_pipe), across
//! host connections.
//!
//! The runtime runs as the sandbox user, in a session and a cgroup
//! (`fn-<n>`) of its own, in [`FUNCTION_DIR`] (a root-owned directory on
//! `/run`'s tmpfs holding the start's `files_in`), with exactly the start's
//! environment, plus `EMBER_HOT_PATH=1` when the hot path was asked for and
//! granted (the doorbell page through `/dev/mem`, and an `RLIMIT_MEMLOCK` of
//! [`HOT_PATH_MEMLOCK`]). Its stdout and stderr are drained all the time
//! into buffers of [`OUTPUT_BUFFER`] bytes each (the rest is dropped and
//! the next answer says `output_truncated`), and go out with the next
//! answer.
//!
//! Like an invocation, the runtime never blocks the agent: its pipes are
//! non-blocking and served from the server's event loop, an event is
//! written as far as the pipe takes it and the rest when it drains, and a
//! runtime that breaks the protocol, stops answering or exits is killed
//! (its whole cgroup) and reported, never waited for without a deadline.
//!
//! What the host gets:
//! - `FunctionStart`: [`FunctionReady`] once the runtime wrote `READY`
//!   (with its buffers' guest-physical pages for the hot path, see
//!   [`pagemap`](crate::function::pagemap)), or `Error(SpawnFailed)` (no `READY`
//!   within `ready_timeout_ms`, an exit, garbage) quoting the end of its
//!   stderr. The runtime is killed then.
//! - `FunctionInvoke`: a [`FunctionResult`]: `status` and `result` from
//!   the runtime's `RESULT`; `stdout`/`stderr` its captured sections
//!   followed by what reached fds 1 and 2 since the last answer, all
//!   together cut to `max_output_bytes` (and [`MAX_RESULT_OUTPUT`]). At
//!   `timeout_ms` the runtime is killed and the result has `timed_out`
//!   and no status; when the runtime exits meanwhile, `runtime_exit` says
//!   how (the result too, if it finished writing one first). A runtime
//!   that breaks the protocol is killed and the host gets
//!   `Error(Internal)`.
//! - `FunctionCollect(wait_ms)`: the `RESULT` a hot-path runtime wrote
//!   without an `EVENT`, as a [`FunctionResult`], waiting for it up to
//!   `wait_ms` (then as for a timeout). The agent keeps one such `RESULT`
//!   until it is collected; a `FunctionInvoke` drops it.
//!
//! A connection that goes away does not end the runtime; an event it sent
//! still runs to its end (or timeout) and the result is dropped. Only a
//! start still waiting for `READY` is killed with its connection.

mod pagemap;
pub mod runtime_pipe;

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::hotpath::{DOORBELL_FD, MAX_BUFFER_BYTES};
use crate::protocol::{
    AgentMessage, ErrorKind, ErrorReply, ExitStatus, FileIn, FunctionInvoke, FunctionLoad,
    FunctionReady, FunctionResult, FunctionStart, HotPathPages, CODE_DIR, FUNCTION_DIR,
    MAX_TIMEOUT_MS, PYTHON_RUNTIME_PATH,
};
use crate::serve::cgroup::InvocationCgroup;
use crate::serve::invoke::{self, Runner};
use crate::serve::spawn::{self, HotPath, Plan};
use crate::{console, sys, SANDBOX_GID, SANDBOX_UID};
use runtime_pipe::{Message, ReadyInfo, ResponseReader, RuntimeResult};

/// Bytes kept of the runtime's fd 1 and of its fd 2 between answers.
pub(crate) const OUTPUT_BUFFER: usize = 1 << 20;

/// Most bytes of stdout and stderr together in one answer.
pub(crate) const MAX_RESULT_OUTPUT: u64 = 4 << 20;

/// `RLIMIT_MEMLOCK` of a hot-path runtime: both buffers at their largest,
/// plus the kernel's default 8 MiB.
pub(crate) const HOT_PATH_MEMLOCK: u64 = 2 * MAX_BUFFER_BYTES as u64 + (8 << 20);

/// ember's python3 runtime, installed at [`PYTHON_RUNTIME_PATH`] for every
/// start: the host names it in `argv`, it is never one of the function's
/// files.
const PYTHON_RUNTIME: &[u8] = include_bytes!("../../runtimes/python3/ember_runtime.py");

/// Prefixes of environment variables that make a program run code of the
/// caller's choosing before its own (the dynamic loader's `LD_PRELOAD`,
/// `LD_LIBRARY_PATH`...; python's `PYTHONPATH`, `PYTHONSTARTUP`...): a
/// runtime whose environment has one never gets `/dev/mem`.
const CODE_INJECTING_ENV: [&str; 2] = ["LD_", "PYTHON"];

/// Bytes of stderr quoted in a start failure.
const STDERR_TAIL: usize = 2048;

/// After killing the runtime: how long to wait for its exit.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// After its exit: how long to wait for its pipes to reach their end
/// (a process that left the cgroup, or without cgroups, may hold them).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Size asked for the request and response pipes: an event or a result of
/// up to 1 MiB then moves in one `write` and one `read`.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Descriptors the runtime gets from the agent: 0-2, the pipes on 3 and 4,
/// and for the hot path the doorbell on 5.
const FIRST_CLOSED_FD: RawFd = DOORBELL_FD + 1;

/// The runtime's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// One of the runtime's output pipes and what was read from it.
struct Output {
    fd: Option<OwnedFd>,
    data: Vec<u8>,
    dropped: bool,
    /// The last read filled what it asked for: more may be waiting.
    last_full: bool,
}

impl Output {
    fn new(fd: OwnedFd) -> Self {
        Output {
            fd: Some(fd),
            data: Vec::new(),
            dropped: false,
            last_full: false,
        }
    }

    /// Reads what the pipe has, within the buffer; beyond it, reads and
    /// drops. One read, unless `drain` and reads come back full.
    fn read(&mut self, scratch: &mut Vec<u8>, drain: bool) {
        while let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) {
            let room = OUTPUT_BUFFER.saturating_sub(self.data.len());
            let (got, asked) = if room > 0 {
                let want = room.min(runtime_pipe::READ_SIZE);
                (runtime_pipe::read_append(fd, &mut self.data, want), want)
            } else {
                scratch.clear();
                let got = runtime_pipe::read_append(fd, scratch, runtime_pipe::READ_SIZE);
                if matches!(got, Ok(Some(n)) if n > 0) {
                    self.dropped = true;
                }
                (got, runtime_pipe::READ_SIZE)
            };
            match got {
                Ok(Some(0)) | Err(_) => {
                    // End of file (or a broken pipe): dropping the
                    // descriptor also takes it out of the epoll set.
                    self.fd = None;
                    self.last_full = false;
                }
                Ok(None) => self.last_full = false,
                Ok(Some(n)) => self.last_full = n == asked,
            }
            if !(drain && self.last_full) {
                break;
            }
        }
    }

    fn take(&mut self) -> (Vec<u8>, bool) {
        let dropped = std::mem::take(&mut self.dropped);
        (std::mem::take(&mut self.data), dropped)
    }
}

/// An event being written to the request pipe.
struct EventWriter {
    header: Vec<u8>,
    event: Vec<u8>,
    /// Bytes written, over header and event.
    written: usize,
}

impl EventWriter {
    /// Writes as much as the pipe takes; `Ok(true)` once all is written.
    fn write(&mut self, fd: RawFd) -> io::Result<bool> {
        loop {
            let header = self.header.get(self.written..).unwrap_or_default();
            let event_from = self.written.saturating_sub(self.header.len());
            let event = self.event.get(event_from..).unwrap_or_default();
            if header.is_empty() && event.is_empty() {
                return Ok(true);
            }
            let iov = [
                libc::iovec {
                    iov_base: header.as_ptr() as *mut libc::c_void,
                    iov_len: header.len(),
                },
                libc::iovec {
                    iov_base: event.as_ptr() as *mut libc::c_void,
                    iov_len: event.len(),
                },
            ];
            // SAFETY: both iovecs describe live, readable slices; writev
            // only reads them.
            let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
            if n < 0 {
                match sys::errno() {
                    libc::EINTR => continue,
                    libc::EAGAIN => return Ok(false),
                    _ => return Err(sys::last_error()),
                }
            }
            self.written += n.unsigned_abs();
        }
    }
}

/// A request the host waits for.
#[derive(Debug, Clone, Copy)]
struct Call {
    started: Instant,
    deadline: Instant,
    /// Output bytes the answer may carry.
    budget: u64,
    /// The connection that asked is still there.
    waiter: bool,
}

/// What the host is owed when the runtime ends.
#[derive(Debug, Clone, Copy)]
enum Owed {
    Nothing,
    Ready { waiter: bool },
    Result(Call),
}

/// Why the runtime is ending.
#[derive(Debug, Clone)]
enum Cause {
    /// It exited on its own.
    Exited,
    /// An event ran past its time limit (or a collect found nothing).
    TimedOut,
    /// No `READY` in time.
    NotReady(u64),
    /// It broke the pipe protocol.
    Protocol(String),
    /// It closed its response pipe, or a pipe failed.
    Pipe(String),
    /// The connection that started it went away before `READY`.
    Disconnected,
}

impl Cause {
    fn describe(&self, exit: Option<ExitStatus>) -> String {
        let exit = exit.map_or_else(|| "not reaped yet".to_owned(), describe_exit);
        match self {
            Cause::Exited => format!("the runtime exited ({exit})"),
            Cause::TimedOut => format!("the runtime ran out of time and was killed ({exit})"),
            Cause::NotReady(ms) => {
                format!("the runtime sent no READY within {ms} ms and was killed ({exit})")
            }
            Cause::Protocol(what) => {
                format!("the runtime broke the pipe protocol ({what}) and was killed ({exit})")
            }
            Cause::Pipe(what) => format!("{what}; the runtime was killed ({exit})"),
            Cause::Disconnected => {
                format!("the host went away before READY; the runtime was killed ({exit})")
            }
        }
    }
}

enum Phase {
    /// Waiting for `READY`.
    Starting {
        deadline: Instant,
        timeout_ms: u64,
        waiter: bool,
    },
    /// Ready, nothing asked.
    Idle,
    /// An event or a collect waits for its `RESULT`.
    Call(Call),
    /// Killed or exited: waiting for the exit and the pipes' end, then the
    /// host gets what it is owed.
    Ending {
        cause: Cause,
        owed: Owed,
        /// When it was killed (by the agent).
        killed_at: Option<Instant>,
        /// When it was reaped.
        exited_at: Option<Instant>,
        /// A `RESULT` read meanwhile.
        late: Option<RuntimeResult>,
    },
    /// Gone.
    Dead,
}

/// The function runtime.
pub(crate) struct Function {
    pid: libc::pid_t,
    cgroup: Option<InvocationCgroup>,
    request: Option<OwnedFd>,
    response: Option<OwnedFd>,
    stdout: Output,
    stderr: Output,
    reader: ResponseReader,
    scratch: Vec<u8>,
    writer: Option<EventWriter>,
    /// How it ended, once reaped.
    exit: Option<ExitStatus>,
    /// A `RESULT` it sent unasked, for `FunctionCollect`.
    stash: Option<RuntimeResult>,
    /// The hot path was asked for...
    hot_path: bool,
    /// ...and this grant failed.
    hot_path_denied: Option<String>,
    /// Started without its function, which a `FunctionLoad` gives it
    /// (once).
    awaiting_code: bool,
    started: Instant,
    phase: Phase,
    /// `READY` (and whether the host still waits for it), or the call
    /// and the `RESULT` that answers it: answered in [`tick`](Self::tick),
    /// after the output read in the same loop turn. The phase moved on
    /// already (to `Idle`).
    ready: Option<(ReadyInfo, bool)>,
    answer: Option<(Call, RuntimeResult)>,
    /// When and how a pipe broke with the runtime (as far as the agent
    /// knows) alive: usually it is exiting, and its exit comes next; if
    /// not within [`KILL_WAIT`], it is killed.
    broken: Option<(Instant, String)>,
    /// Messages for the connection.
    replies: Vec<AgentMessage>,
    /// Why it is dead.
    dead_reason: String,
}

/// A start that failed; nothing of it is left running.
pub(crate) type StartError = (ErrorKind, String);

impl Function {
    /// Writes the files, starts the runtime and returns it waiting for
    /// `READY`. `start` was validated. `next_id` numbers the cgroups.
    pub(crate) fn start(
        start: FunctionStart,
        runner: &mut Runner,
        next_id: &mut u64,
    ) -> Result<Function, StartError> {
        let FunctionStart {
            argv,
            env,
            files_in,
            hot_path,
            ready_timeout_ms,
            code_drive,
            wait_for_code,
        } = start;
        let spawn_failed = |what: &str, err: &dyn std::fmt::Display| {
            (ErrorKind::SpawnFailed, format!("{what}: {err}"))
        };
        let internal = |what: &str, err: &dyn std::fmt::Display| {
            (ErrorKind::Internal, format!("{what}: {err}"))
        };
        prepare_dir(files_in).map_err(|err| spawn_failed(FUNCTION_DIR, &err))?;
        install_python_runtime().map_err(|err| spawn_failed(PYTHON_RUNTIME_PATH, &err))?;
        let cwd = match &code_drive {
            Some(device) => {
                mount_code_drive(device).map_err(|err| spawn_failed(device, &err))?;
                CODE_DIR
            }
            None => FUNCTION_DIR,
        };
        let injecting = code_injecting_var(&env).map(str::to_owned);

        let pipe = || sys::pipe().map_err(|err| internal("pipe", &err));
        let (request_r, request_w) = pipe()?;
        let (response_r, response_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        // The child's ends for fds 3 and 4 must not be 3 or 4 themselves.
        let request_r = above(request_r, FIRST_CLOSED_FD).map_err(|e| internal("fcntl", &e))?;
        let response_w = above(response_w, FIRST_CLOSED_FD).map_err(|e| internal("fcntl", &e))?;
        for fd in [&request_w, &response_r, &stdout_r, &stderr_r] {
            sys::set_nonblocking(fd.as_raw_fd()).map_err(|e| internal("fcntl", &e))?;
        }
        for fd in [&request_w, &response_r] {
            // Best effort: a smaller pipe only means more reads and writes.
            // SAFETY: F_SETPIPE_SZ only resizes the pipe's buffer.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        }

        let to_c = |s: String| sys::cstring(s).map_err(|_| internal("argv or env", &"NUL byte"));
        let programs = invoke::program_candidates(argv.first().map_or("", String::as_str))
            .into_iter()
            .map(to_c)
            .collect::<Result<_, _>>()?;
        let argv = argv.into_iter().map(to_c).collect::<Result<_, _>>()?;
        let env = env
            .into_iter()
            .map(|(key, value)| to_c(format!("{key}={value}")))
            .collect::<Result<_, _>>()?;
        let mut plan = Plan::new(programs, argv, env, to_c(cwd.to_owned())?);
        plan.stdin = runner
            .devnull()
            .ok_or_else(|| internal("/dev/null", &"could not be opened at boot"))?;
        plan.stdout = stdout_w.as_raw_fd();
        plan.stderr = stderr_w.as_raw_fd();
        plan.pipes = Some((request_r.as_raw_fd(), response_w.as_raw_fd()));
        plan.close_from = Some(FIRST_CLOSED_FD);
        plan.uid = SANDBOX_UID;
        plan.gid = SANDBOX_GID;
        // The doorbell is a page of guest-physical address space the VMM
        // traps writes to; the runtime maps it from /dev/mem, which only
        // root may open. Without it the runtime serves over its pipes.
        // Never to a runtime whose environment runs other code first.
        let mut devmem_error = injecting.filter(|_| hot_path).map(|var| {
            format!(
                "no /dev/mem for a runtime whose environment sets {var} \
                 (LD_* and PYTHON* variables run code before the runtime's own)"
            )
        });
        let doorbell = if hot_path && devmem_error.is_none() {
            open_devmem().and_then(|fd| above(fd, FIRST_CLOSED_FD))
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        };
        match &doorbell {
            Ok(fd) => plan
                .grant_hot_path(HotPath {
                    doorbell: fd.as_raw_fd(),
                    memlock: memlock_limit(HOT_PATH_MEMLOCK),
                })
                .map_err(|err| internal("environment", &err))?,
            Err(err) if hot_path && devmem_error.is_none() => {
                devmem_error = Some(format!("open /dev/mem: {err}"));
            }
            Err(_) => {}
        }
        // Last: from here on a failure has a group to remove.
        let cgroup = if runner.cgroups().enabled {
            let group = InvocationCgroup::create_named(runner.cgroups(), "fn", next_id)
                .map_err(|err| internal("cgroup", &err))?;
            *next_id += 1;
            Some(group)
        } else {
            None
        };
        plan.cgroup_procs = cgroup.as_ref().map(InvocationCgroup::procs_fd);

        let started = Instant::now();
        let spawned = spawn::spawn_reporting(&plan, runner.stack());
        // The child's ends: it has its copies (or is gone).
        drop((request_r, response_w, stdout_w, stderr_w, doorbell));
        let (pid, denied) = match spawned {
            Ok(spawned) => spawned,
            Err(err) => {
                if let Some(group) = cgroup {
                    runner.retire(group);
                }
                let kind = match err {
                    spawn::SpawnError::Child { .. } => ErrorKind::SpawnFailed,
                    _ => ErrorKind::Internal,
                };
                return Err((kind, format!("function runtime: {err}")));
            }
        };
        let timeout_ms = ready_timeout_ms.min(MAX_TIMEOUT_MS);
        Ok(Function {
            pid,
            cgroup,
            request: Some(request_w),
            response: Some(response_r),
            stdout: Output::new(stdout_r),
            stderr: Output::new(stderr_r),
            reader: ResponseReader::new(),
            scratch: Vec::new(),
            writer: None,
            exit: None,
            stash: None,
            hot_path,
            awaiting_code: wait_for_code,
            hot_path_denied: denied.map(|denied| denied.to_string()).or(devmem_error),
            started,
            phase: Phase::Starting {
                deadline: started + Duration::from_millis(timeout_ms),
                timeout_ms,
                waiter: true,
            },
            ready: None,
            answer: None,
            broken: None,
            replies: Vec::new(),
            dead_reason: String::new(),
        })
    }

    /// The runtime's pid.
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The response pipe, until its end.
    pub(crate) fn response_fd(&self) -> Option<RawFd> {
        self.response.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// An output pipe, until its end.
    pub(crate) fn output_fd(&self, stream: Stream) -> Option<RawFd> {
        match stream {
            Stream::Stdout => self.stdout.fd.as_ref(),
            Stream::Stderr => self.stderr.fd.as_ref(),
        }
        .map(AsRawFd::as_raw_fd)
    }

    /// The request pipe, until the runtime failed.
    pub(crate) fn request_fd(&self) -> Option<RawFd> {
        self.request.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The request pipe while an event is being written to it.
    pub(crate) fn writing_fd(&self) -> Option<RawFd> {
        self.writer
            .as_ref()
            .and(self.request.as_ref())
            .map(AsRawFd::as_raw_fd)
    }

    /// Whether it is gone (a new one may be started).
    pub(crate) fn is_dead(&self) -> bool {
        matches!(self.phase, Phase::Dead)
    }

    /// Whether the connection waits for an answer from it.
    pub(crate) fn has_waiter(&self) -> bool {
        if self.ready.as_ref().is_some_and(|(_, waiter)| *waiter)
            || self.answer.as_ref().is_some_and(|(call, _)| call.waiter)
        {
            return true;
        }
        match &self.phase {
            Phase::Starting { waiter, .. } => *waiter,
            Phase::Call(call) => call.waiter,
            Phase::Ending { owed, .. } => match owed {
                Owed::Nothing => false,
                Owed::Ready { waiter } => *waiter,
                Owed::Result(call) => call.waiter,
            },
            Phase::Idle | Phase::Dead => false,
        }
    }

    /// The cgroup, for removal once the runtime is dead.
    pub(crate) fn take_cgroup(&mut self) -> Option<InvocationCgroup> {
        if self.is_dead() {
            self.cgroup.take()
        } else {
            None
        }
    }

    /// Messages for the connection.
    pub(crate) fn take_replies(&mut self) -> Vec<AgentMessage> {
        std::mem::take(&mut self.replies)
    }

    /// Starts delivering an event. Errors are for the host right away;
    /// otherwise the answer comes from [`tick`](Self::tick).
    pub(crate) fn invoke(
        &mut self,
        invoke: FunctionInvoke,
        now: Instant,
    ) -> Result<(), ErrorReply> {
        self.check_idle()?;
        if !self.reader.is_idle() {
            return Err(error(
                ErrorKind::Busy,
                "the function runtime is writing a result nobody asked for; collect it first",
            ));
        }
        self.stash = None;
        let FunctionInvoke {
            event,
            timeout_ms,
            max_output_bytes,
        } = invoke;
        let call = Call {
            started: now,
            deadline: now + Duration::from_millis(timeout_ms.min(MAX_TIMEOUT_MS)),
            budget: max_output_bytes.min(MAX_RESULT_OUTPUT),
            waiter: true,
        };
        self.phase = Phase::Call(call);
        self.writer = Some(EventWriter {
            header: runtime_pipe::event_header(event.len(), timeout_ms),
            event,
            written: 0,
        });
        self.write_event();
        Ok(())
    }

    /// Gives a runtime started with `wait_for_code` its function: writes
    /// the files, mounts the code drive, sends `LOAD`; the answer
    /// (`READY`, or the start failure with the runtime's traceback) comes
    /// from [`tick`](Self::tick) as for a start.
    pub(crate) fn load(&mut self, load: FunctionLoad, now: Instant) -> Result<(), ErrorReply> {
        self.check_idle()?;
        if !self.awaiting_code {
            return Err(error(
                ErrorKind::BadRequest,
                "the function runtime already has its function",
            ));
        }
        let FunctionLoad {
            args,
            env,
            files_in,
            code_drive,
            ready_timeout_ms,
        } = load;
        write_files(files_in)
            .map_err(|err| error(ErrorKind::SpawnFailed, &format!("{FUNCTION_DIR}: {err}")))?;
        if let Some(device) = &code_drive {
            mount_code_drive(device)
                .map_err(|err| error(ErrorKind::SpawnFailed, &format!("{device}: {err}")))?;
        }
        self.awaiting_code = false;
        self.stash = None;
        let timeout_ms = ready_timeout_ms.min(MAX_TIMEOUT_MS);
        self.started = now;
        self.phase = Phase::Starting {
            deadline: now + Duration::from_millis(timeout_ms),
            timeout_ms,
            waiter: true,
        };
        let (header, body) = runtime_pipe::load_message(&args, &env);
        self.writer = Some(EventWriter {
            header,
            event: body,
            written: 0,
        });
        self.write_event();
        Ok(())
    }

    /// Asks for the `RESULT` a hot-path runtime sent (or will send within
    /// `wait_ms`) without an event.
    pub(crate) fn collect(&mut self, wait_ms: u64, now: Instant) -> Result<(), ErrorReply> {
        self.check_idle()?;
        let call = Call {
            started: now,
            deadline: now + Duration::from_millis(wait_ms.min(MAX_TIMEOUT_MS)),
            budget: MAX_RESULT_OUTPUT,
            waiter: true,
        };
        match self.stash.take() {
            // Answered in tick, after this turn's output was read.
            Some(result) => self.answer = Some((call, result)),
            None => self.phase = Phase::Call(call),
        }
        Ok(())
    }

    fn check_idle(&self) -> Result<(), ErrorReply> {
        if self.has_waiter() {
            return Err(error(
                ErrorKind::Busy,
                "the function runtime's last answer is not out yet",
            ));
        }
        match &self.phase {
            Phase::Idle => match &self.broken {
                Some((_, what)) => Err(error(
                    ErrorKind::BadRequest,
                    &format!("no function runtime: {what}"),
                )),
                None => Ok(()),
            },
            Phase::Starting { .. } => Err(error(
                ErrorKind::Busy,
                "the function runtime is still starting",
            )),
            Phase::Call(_) => Err(error(
                ErrorKind::Busy,
                "the function runtime is busy with another event",
            )),
            Phase::Ending { .. } | Phase::Dead => Err(error(
                ErrorKind::BadRequest,
                &format!("no function runtime: {}", self.describe_end()),
            )),
        }
    }

    fn describe_end(&self) -> String {
        match &self.phase {
            Phase::Ending { cause, .. } => cause.describe(self.exit),
            _ => self.dead_reason.clone(),
        }
    }

    /// The request pipe can take more.
    pub(crate) fn on_request_writable(&mut self) {
        self.write_event();
    }

    fn write_event(&mut self) {
        let (Some(writer), Some(fd)) = (&mut self.writer, &self.request) else {
            return;
        };
        match writer.write(fd.as_raw_fd()) {
            Ok(false) => {}
            Ok(true) => self.writer = None,
            Err(err) => {
                self.writer = None;
                self.request = None;
                self.broken = Some((
                    Instant::now(),
                    format!("writing the event to fd 3 failed: {err}"),
                ));
            }
        }
    }

    /// The response pipe has data (or its end).
    pub(crate) fn on_response(&mut self) {
        let Some(fd) = self.response_fd() else { return };
        let budget = match &self.phase {
            Phase::Call(call) => call.budget,
            Phase::Ending {
                owed: Owed::Result(call),
                ..
            } => call.budget,
            _ => MAX_RESULT_OUTPUT,
        };
        let outcome = match self.reader.read_from(fd, &mut self.scratch, budget) {
            Ok(outcome) => outcome,
            Err(runtime_pipe::ReadError::Protocol(err)) => {
                self.response = None;
                return self.fail(Cause::Protocol(err.to_string()));
            }
            Err(runtime_pipe::ReadError::Io(err)) => {
                self.response = None;
                return self.fail(Cause::Pipe(format!("reading fd 4 failed: {err}")));
            }
        };
        for message in outcome.messages {
            self.on_message(message);
        }
        if outcome.eof {
            self.response = None;
            let ending = matches!(self.phase, Phase::Ending { .. } | Phase::Dead);
            if self.broken.is_none() && !ending {
                self.broken = Some((
                    Instant::now(),
                    "the runtime closed its response pipe (fd 4)".into(),
                ));
            }
        }
    }

    fn on_message(&mut self, message: Message) {
        let violation = match (&mut self.phase, message) {
            (Phase::Starting { waiter, .. }, Message::Ready(info)) => {
                self.ready = Some((info, *waiter));
                self.phase = Phase::Idle;
                return;
            }
            (Phase::Call(call), Message::Result(result)) if self.writer.is_none() => {
                self.answer = Some((*call, result));
                self.phase = Phase::Idle;
                return;
            }
            (Phase::Call(_), Message::Result(_)) => "RESULT before it read the whole event",
            (Phase::Idle, Message::Result(result)) if self.stash.is_none() => {
                self.stash = Some(result);
                return;
            }
            (Phase::Ending { late, .. }, Message::Result(result)) => {
                *late = Some(result);
                return;
            }
            (Phase::Ending { .. } | Phase::Dead, Message::Ready(_)) => return,
            (Phase::Dead, Message::Result(_)) => return,
            (_, Message::Ready(_)) => "a second READY",
            (Phase::Starting { .. }, Message::Result(_)) => "RESULT before READY",
            (_, Message::Result(_)) => "a RESULT nobody asked for",
        };
        self.fail(Cause::Protocol(violation.into()));
    }

    /// An output pipe has data (or its end).
    pub(crate) fn on_output(&mut self, stream: Stream) {
        let output = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        output.read(&mut self.scratch, false);
    }

    /// The runtime was reaped.
    pub(crate) fn on_exit(&mut self, status: libc::c_int, now: Instant) {
        self.exit = Some(invoke::exit_status(status));
        match &mut self.phase {
            Phase::Ending { exited_at, .. } => *exited_at = Some(now),
            Phase::Dead => {}
            _ => {
                self.fail(Cause::Exited);
                if let Phase::Ending { exited_at, .. } = &mut self.phase {
                    *exited_at = Some(now);
                }
            }
        }
    }

    /// The connection went away.
    pub(crate) fn disconnected(&mut self) {
        if let Some((_, waiter)) = &mut self.ready {
            *waiter = false;
        }
        if let Some((call, _)) = &mut self.answer {
            call.waiter = false;
        }
        match &mut self.phase {
            Phase::Starting { .. } => self.fail(Cause::Disconnected),
            Phase::Call(call) => call.waiter = false,
            Phase::Ending { owed, .. } => match owed {
                Owed::Ready { waiter } => *waiter = false,
                Owed::Result(call) => call.waiter = false,
                Owed::Nothing => {}
            },
            Phase::Idle | Phase::Dead => {}
        }
        self.replies.clear();
    }

    /// The next moment [`tick`](Self::tick) has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let broken = self
            .broken
            .as_ref()
            .filter(|_| !matches!(self.phase, Phase::Ending { .. } | Phase::Dead))
            .map(|(at, _)| *at + KILL_WAIT);
        let phase = match &self.phase {
            Phase::Starting { deadline, .. } => Some(*deadline),
            Phase::Call(call) => Some(call.deadline),
            Phase::Ending {
                killed_at,
                exited_at,
                ..
            } => match (exited_at, killed_at) {
                (Some(at), _) => Some(*at + DRAIN_GRACE),
                (None, Some(at)) => Some(*at + KILL_WAIT),
                // Exited on its own: the exit is on its way (SIGCHLD).
                (None, None) => None,
            },
            Phase::Idle | Phase::Dead => None,
        };
        phase.into_iter().chain(broken).min()
    }

    /// Acts on what this loop turn brought and on the deadlines.
    pub(crate) fn tick(&mut self, now: Instant) {
        if let Some((info, waiter)) = self.ready.take() {
            self.drain_outputs();
            let reply = self.ready_reply(info, now);
            if waiter {
                self.replies.push(AgentMessage::FunctionReady(reply));
            }
        }
        if let Some((call, result)) = self.answer.take() {
            self.drain_outputs();
            let reply = self.result_reply(call, Some(result), false, now);
            if call.waiter {
                self.replies.push(AgentMessage::FunctionResult(reply));
            }
        }
        if let Some((at, what)) = self.broken.take() {
            if now >= at + KILL_WAIT {
                self.fail(Cause::Pipe(what));
            } else {
                self.broken = Some((at, what));
            }
        }
        match &self.phase {
            Phase::Starting {
                deadline,
                timeout_ms,
                ..
            } if now >= *deadline => {
                let ms = *timeout_ms;
                self.fail(Cause::NotReady(ms));
            }
            Phase::Call(call) if now >= call.deadline => self.fail(Cause::TimedOut),
            Phase::Ending {
                killed_at,
                exited_at,
                ..
            } => {
                let pipes_done =
                    self.response.is_none() && self.stdout.fd.is_none() && self.stderr.fd.is_none();
                let done = match (exited_at, killed_at) {
                    (Some(at), _) => pipes_done || now >= *at + DRAIN_GRACE,
                    (None, Some(at)) => now >= *at + KILL_WAIT,
                    (None, None) => false,
                };
                if done {
                    self.end(now);
                }
            }
            _ => {}
        }
    }

    /// Kills the runtime (unless it is gone) and waits for its end.
    fn fail(&mut self, cause: Cause) {
        let owed = match &self.phase {
            Phase::Starting { waiter, .. } => Owed::Ready { waiter: *waiter },
            Phase::Call(call) => Owed::Result(*call),
            Phase::Idle => Owed::Nothing,
            Phase::Ending { .. } | Phase::Dead => return,
        };
        let killed_at = if self.exit.is_none() {
            self.kill();
            Some(Instant::now())
        } else {
            None
        };
        self.writer = None;
        self.request = None;
        self.broken = None;
        // (A READY or RESULT read in this turn is still answered by tick:
        // it came before the failure.)
        self.phase = Phase::Ending {
            cause,
            owed,
            killed_at,
            // (on_exit sets it when it is the exit that ended it.)
            exited_at: self.exit.map(|_| Instant::now()),
            late: None,
        };
    }

    /// SIGKILL to the whole runtime: its cgroup, or its process group.
    fn kill(&self) {
        if let Some(group) = &self.cgroup {
            if group.kill().is_ok() {
                return;
            }
        }
        // SAFETY: kill has no memory-safety preconditions; the runtime leads
        // its own process group (it called setsid).
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }

    /// The runtime is gone: tell whoever waits, close everything.
    fn end(&mut self, now: Instant) {
        let Phase::Ending {
            cause, owed, late, ..
        } = std::mem::replace(&mut self.phase, Phase::Dead)
        else {
            return;
        };
        // Whatever is still in the pipes (nothing blocks: they are
        // non-blocking, and the writers are gone or given up on).
        self.drain_outputs();
        let description = cause.describe(self.exit);
        match owed {
            Owed::Ready { waiter } => {
                if waiter {
                    let (stderr, _) = self.stderr.take();
                    let message = format!(
                        "function runtime did not start: {description}{}",
                        stderr_tail(&stderr)
                    );
                    self.replies.push(AgentMessage::Error(ErrorReply {
                        kind: ErrorKind::SpawnFailed,
                        message,
                    }));
                }
            }
            Owed::Result(call) => {
                let reply = match cause {
                    Cause::Exited => Some(self.result_reply(call, late, false, now)),
                    Cause::TimedOut => Some(self.result_reply(call, None, true, now)),
                    _ => None,
                };
                if call.waiter {
                    self.replies.push(match reply {
                        Some(result) => AgentMessage::FunctionResult(result),
                        None => AgentMessage::Error(ErrorReply {
                            kind: ErrorKind::Internal,
                            message: format!("function runtime failed: {description}"),
                        }),
                    });
                }
            }
            Owed::Nothing => console::warn(&format_args!("function runtime: {description}")),
        }
        self.dead_reason = description;
        self.response = None;
        self.stdout.fd = None;
        self.stderr.fd = None;
        self.stash = None;
        self.scratch = Vec::new();
    }

    /// Reads the rest of output that did not fit the last reads.
    fn drain_outputs(&mut self) {
        for output in [&mut self.stdout, &mut self.stderr] {
            if output.last_full {
                output.read(&mut self.scratch, true);
            }
        }
    }

    fn ready_reply(&mut self, info: ReadyInfo, now: Instant) -> FunctionReady {
        let (hot_path, hot_path_error) = if self.hot_path {
            match self.translate(info) {
                Ok(pages) => (Some(pages), None),
                Err(err) => (None, Some(err)),
            }
        } else {
            (None, None)
        };
        let (stdout, _) = self.stdout.take();
        let (stderr, _) = self.stderr.take();
        FunctionReady {
            hot_path,
            hot_path_error,
            startup_ms: invoke::millis(now.saturating_duration_since(self.started)),
            stdout,
            stderr,
        }
    }

    fn translate(&self, info: ReadyInfo) -> Result<HotPathPages, String> {
        if let Some(denied) = &self.hot_path_denied {
            return Err(format!("the hot path could not be granted: {denied}"));
        }
        let (request, response) = info
            .hot_path
            .ok_or("the runtime announced no hot-path buffers in READY")?;
        runtime_pipe::check_buffer("request", request)?;
        runtime_pipe::check_buffer("response", response)?;
        let overlap = request.addr < response.addr.saturating_add(response.len)
            && response.addr < request.addr.saturating_add(request.len);
        if overlap {
            return Err("the request and response buffers overlap".into());
        }
        let mut buffers =
            pagemap::translate(self.pid, &[("request", request), ("response", response)])?
                .into_iter();
        match (buffers.next(), buffers.next()) {
            (Some(request), Some(response)) => Ok(HotPathPages { request, response }),
            _ => Err("pagemap lookup returned too few buffers".into()),
        }
    }

    /// The answer to a call: the runtime's sections first, then what its
    /// fds 1 and 2 had, within the call's budget.
    fn result_reply(
        &mut self,
        call: Call,
        result: Option<RuntimeResult>,
        timed_out: bool,
        now: Instant,
    ) -> FunctionResult {
        let (out_fd, out_dropped) = self.stdout.take();
        let (err_fd, err_dropped) = self.stderr.take();
        let (status, result, mut stdout, mut stderr, mut truncated) = match result {
            Some(r) => (Some(r.status), r.result, r.stdout, r.stderr, r.truncated),
            None => (None, Vec::new(), Vec::new(), Vec::new(), false),
        };
        let mut room = call
            .budget
            .saturating_sub((stdout.len() + stderr.len()) as u64);
        for (section, extra) in [(&mut stdout, out_fd), (&mut stderr, err_fd)] {
            let take = usize::try_from(room).unwrap_or(usize::MAX).min(extra.len());
            section.extend_from_slice(extra.get(..take).unwrap_or_default());
            room -= take as u64;
            truncated |= take < extra.len();
        }
        FunctionResult {
            status: status.filter(|_| !timed_out),
            result: if timed_out { Vec::new() } else { result },
            stdout,
            stderr,
            output_truncated: truncated || out_dropped || err_dropped,
            timed_out,
            runtime_exit: self.exit,
            wall_ms: invoke::millis(now.saturating_duration_since(call.started)),
        }
    }
}

fn error(kind: ErrorKind, message: &str) -> ErrorReply {
    ErrorReply {
        kind,
        message: message.to_owned(),
    }
}

fn describe_exit(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(code) => format!("exit code {code}"),
        ExitStatus::Signal(signo) => format!("killed by signal {signo}"),
    }
}

/// The end of what the runtime printed on stderr, for an error message.
fn stderr_tail(stderr: &[u8]) -> String {
    if stderr.is_empty() {
        return "; it printed nothing on stderr".into();
    }
    let start = stderr.len().saturating_sub(STDERR_TAIL);
    let tail = String::from_utf8_lossy(stderr.get(start..).unwrap_or_default());
    let cut = if start > 0 { "..." } else { "" };
    format!("; stderr: {cut}{}", tail.trim_end())
}

/// The `RLIMIT_MEMLOCK` to give a hot-path runtime: at least `want`, never
/// less than the agent's own (which the runtime would otherwise inherit).
fn memlock_limit(want: u64) -> [u64; 2] {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `current` is a valid rlimit to store into.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } != 0 {
        return [want, want];
    }
    [current.rlim_cur.max(want), current.rlim_max.max(want)]
}

/// `fd` itself when it is at least `min`, else a close-on-exec copy that is.
/// `/dev/mem` for reading and writing, uncached (the doorbell is device
/// memory, not RAM).
fn open_devmem() -> io::Result<OwnedFd> {
    let fd = sys::open(
        c"/dev/mem",
        libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC,
        0,
    )?;
    Ok(fd)
}

fn above(fd: OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= min {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, owned below.
    let copy = sys::cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: `copy` was just made and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Makes [`FUNCTION_DIR`] afresh (root-owned, 0755) and writes the files
/// into it as root: readable by the sandbox user, never writable by it
/// unless the host asked, no set-id bits.
fn prepare_dir(files: Vec<FileIn>) -> io::Result<()> {
    let parent = FUNCTION_DIR
        .rsplit_once('/')
        .map_or("/", |(parent, _)| parent);
    make_dir_path(parent)?;
    let dir = sys::cstring(FUNCTION_DIR)?;
    // SAFETY: `dir` is NUL-terminated.
    if unsafe { libc::mkdir(dir.as_ptr(), 0o755) } != 0 {
        if sys::errno() != libc::EEXIST {
            return Err(sys::last_error());
        }
        // Left by a runtime that died: start clean.
        std::fs::remove_dir_all(FUNCTION_DIR)?;
        // SAFETY: as above.
        sys::cvt(unsafe { libc::mkdir(dir.as_ptr(), 0o755) })?;
    }
    write_files(files)
}

/// Writes `files` into [`FUNCTION_DIR`] (which exists: it is the waiting
/// runtime's working directory, so it is not made again), readable by the
/// runtime.
fn write_files(mut files: Vec<FileIn>) -> io::Result<()> {
    for file in &mut files {
        file.mode = match file.mode & 0o777 {
            0 => 0o644,
            mode => mode | 0o444,
        };
    }
    let mut made = BTreeSet::new();
    invoke::write_files(FUNCTION_DIR, &files, &mut made).map_err(io::Error::other)
}

/// Mounts the code drive `device` (ext4) read-only, without devices or
/// set-id programs, at [`CODE_DIR`], unless something already is (a
/// runtime started again in the same VM). Says on the console how long
/// the mount took: it is emulated guest-kernel work on PVM hosts.
fn mount_code_drive(device: &str) -> io::Result<()> {
    let started = Instant::now();
    let source = sys::cstring(device)?;
    let target = sys::cstring(CODE_DIR)?;
    // SAFETY: NUL-terminated strings; mount(2) keeps no reference to them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"ext4".as_ptr(),
            libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOATIME,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = sys::last_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        let hint = if err.raw_os_error() == Some(libc::ENOENT) {
            format!(" (the root image needs an empty {CODE_DIR}: rebuild it with rootfs/build-python-image.sh)")
        } else {
            String::new()
        };
        return Err(io::Error::new(
            err.kind(),
            format!("mount it read-only as ext4 on {CODE_DIR}: {err}{hint}"),
        ));
    }
    console::info(format_args!(
        "code drive {device} mounted on {CODE_DIR} in {} ms",
        started.elapsed().as_millis()
    ));
    Ok(())
}

/// Writes [`PYTHON_RUNTIME`] to [`PYTHON_RUNTIME_PATH`], root-owned and
/// read-only for everyone else, in a root-owned directory.
fn install_python_runtime() -> io::Result<()> {
    let (dir, _) = PYTHON_RUNTIME_PATH
        .rsplit_once('/')
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    make_dir_path(dir)?;
    let path = sys::cstring(PYTHON_RUNTIME_PATH)?;
    let fd = sys::open(
        &path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0o644,
    )?;
    sys::write_all(fd.as_raw_fd(), PYTHON_RUNTIME)
}

/// The first variable of `env` that would run code of its own before the
/// program's (see [`CODE_INJECTING_ENV`]).
fn code_injecting_var(env: &[(String, String)]) -> Option<&str> {
    env.iter().map(|(key, _)| key.as_str()).find(|key| {
        CODE_INJECTING_ENV
            .iter()
            .any(|prefix| key.starts_with(prefix))
    })
}

/// `mkdir -p` for an absolute path, 0755.
fn make_dir_path(path: &str) -> io::Result<()> {
    let mut end = 0;
    while end < path.len() {
        end = path
            .get(end + 1..)
            .and_then(|rest| rest.find('/'))
            .map_or(path.len(), |i| end + 1 + i);
        let Some(prefix) = path.get(..end).filter(|p| !p.is_empty()) else {
            continue;
        };
        let cpath = sys::cstring(prefix)?;
        // SAFETY: `cpath` is NUL-terminated.
        if unsafe { libc::mkdir(cpath.as_ptr(), 0o755) } != 0 && sys::errno() != libc::EEXIST {
            return Err(sys::last_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_injecting_variables() {
        let env = |keys: &[&str]| -> Vec<(String, String)> {
            keys.iter()
                .map(|k| ((*k).to_owned(), "x".to_owned()))
                .collect()
        };
        assert_eq!(code_injecting_var(&env(&["PATH", "LANG", "EMBER_X"])), None);
        assert_eq!(
            code_injecting_var(&env(&["A", "LD_PRELOAD"])),
            Some("LD_PRELOAD")
        );
        assert_eq!(
            code_injecting_var(&env(&["PYTHONPATH"])),
            Some("PYTHONPATH")
        );
        assert_eq!(code_injecting_var(&env(&["MY_LD_THING"])), None);
    }

    #[test]
    fn stderr_tails() {
        assert_eq!(stderr_tail(b""), "; it printed nothing on stderr");
        assert_eq!(stderr_tail(b"boom\n"), "; stderr: boom");
        let long = vec![b'x'; STDERR_TAIL + 10];
        let tail = stderr_tail(&long);
        assert!(tail.starts_with("; stderr: ...x"));
        assert_eq!(tail.len(), "; stderr: ...".len() + STDERR_TAIL);
    }

    #[test]
    fn memlock_is_never_lowered() {
        let [soft, hard] = memlock_limit(HOT_PATH_MEMLOCK);
        assert!(soft >= HOT_PATH_MEMLOCK && hard >= soft);
        assert_eq!(memlock_limit(0)[1], {
            let mut current = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit(2) writes one rlimit into `current`, which
            // lives for the call.
            unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) };
            current.rlim_max
        });
    }

    #[test]
    fn event_writer_writes_header_and_event() {
        let (r, w) = sys::pipe().unwrap();
        sys::set_nonblocking(w.as_raw_fd()).unwrap();
        let event: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut writer = EventWriter {
            header: runtime_pipe::event_header(event.len(), 5),
            event: event.clone(),
            written: 0,
        };
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut file = std::fs::File::from(r);
            std::io::Read::read_to_end(&mut file, &mut all).unwrap();
            all
        });
        while !writer.write(w.as_raw_fd()).unwrap() {
            let mut fds = [libc::pollfd {
                fd: w.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            }];
            // SAFETY: poll(2) on one pollfd in `fds`, which lives for the
            // call.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
        }
        drop(w);
        let all = reader.join().unwrap();
        let mut expected = b"EVENT 200000 5\n".to_vec();
        expected.extend_from_slice(&event);
        assert!(all == expected);
    }

    #[test]
    fn dir_paths() {
        let base = std::env::temp_dir().join(format!("ember-fn-dirs-{}", std::process::id()));
        let path = base.join("a/b/c");
        make_dir_path(path.to_str().unwrap()).unwrap();
        assert!(path.is_dir());
        make_dir_path(path.to_str().unwrap()).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
