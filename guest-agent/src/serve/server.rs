//! Serving the host: one epoll loop over the signals (a signalfd), the
//! listening socket, the one connection being served and the pipes of the
//! one invocation running.
//!
//! Nothing blocks but `epoll_wait`, whose timeout is the invocation's next
//! deadline (timeout, kill grace, drain); there is no timer descriptor to
//! arm and disarm. The connection is non-blocking both ways: frames to the
//! host queue in memory and go out with one `send` per loop turn, and while
//! too much is queued the output pipes are left unread, so a slow host
//! slows the invocation down instead of growing the agent without bound.
//!
//! One connection at a time: the listening socket is registered
//! `EPOLLONESHOT` and re-armed only when the connection ends, so a second
//! host connection waits in the backlog.
//!
//! The VM's function runtime (see [`function`](crate::function)) lives in
//! the same loop, across connections: its pipes are served whoever is
//! connected, and its answers go to the connection that asked, if it is
//! still there.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Instant;

use thiserror::Error;

use crate::boot::reaper::{self, Signals};
use crate::function::{self, Function};
use crate::protocol::{
    decode_frame, encode_frame_into, peek_header, AgentMessage, ErrorKind, ErrorReply, FrameKind,
    FunctionInvoke, FunctionLoad, FunctionStart, Hello, HostMessage, Invoke, Refresh,
    AGENT_VSOCK_PORT,
};
use crate::serve::cgroup::Cgroups;
use crate::serve::invoke::{Invocation, Runner, Stream};
use crate::{console, sys};

/// Test-only: `unix:<path>` makes the agent listen on a Unix socket at
/// `<path>` instead of vsock, so that tests can run it as PID 1 of a PID
/// namespace on a host. Honoured only outside the initial PID namespace,
/// i.e. never when the agent is a real machine's init (a guest, where the
/// kernel would hand a `KEY=value` from its command line to init's
/// environment). It also turns the effects of [`Refresh`] off (the host's
/// clock and entropy pool are not the test's to change) and cgroups off
/// unless [`ENV_TEST_CGROUP`] is `1`.
pub const ENV_TEST_LISTEN: &str = "EMBER_AGENT_TEST_LISTEN";

/// Test-only, with [`ENV_TEST_LISTEN`]: `1` lets the agent use the cgroup2
/// hierarchy it mounts, for a test that gave it a cgroup namespace of its
/// own (without one it would create groups in the host's hierarchy).
pub const ENV_TEST_CGROUP: &str = "EMBER_AGENT_TEST_CGROUP";

/// Inode number of the initial PID namespace (`PROC_PID_INIT_INO`).
const INITIAL_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Queued output above which the output pipes are no longer read...
const HIGH_WATER: usize = 1 << 20;
/// ...until the queue is below this.
const LOW_WATER: usize = 256 << 10;

/// Least room offered to one read from the connection.
const READ_SIZE: usize = 64 * 1024;

/// Buffers above this are given back to the allocator once empty (a 32 MiB
/// Invoke must not stay resident for the agent's whole life).
const KEEP_CAPACITY: usize = 1 << 20;

/// RNDADDENTROPY = _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

// epoll tokens. The invocation's pipes carry its generation in the upper
// bits, so an event left over from a previous invocation (whose descriptor
// number a new pipe may reuse) is recognised and dropped rather than acted
// on with a blocking read.
const TOKEN_SIGNAL: u64 = 0;
const TOKEN_LISTEN: u64 = 1;
const TOKEN_CONN: u64 = 2;
const TOKEN_STDIN: u64 = 3;
const TOKEN_STDOUT: u64 = 4;
const TOKEN_STDERR: u64 = 5;
// The function runtime's pipes, with its own generation.
const TOKEN_FN_REQUEST: u64 = 6;
const TOKEN_FN_RESPONSE: u64 = 7;
const TOKEN_FN_STDOUT: u64 = 8;
const TOKEN_FN_STDERR: u64 = 9;
const TOKEN_KIND_BITS: u32 = 8;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    /// AF_VSOCK, any CID, this port.
    Vsock { port: u32 },
    /// Test-only: a Unix socket at this path.
    Unix { path: PathBuf },
}

/// How to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServeOptions {
    pub(crate) listen: Listen,
    /// Running under a test on a host (see [`ENV_TEST_LISTEN`]).
    pub(crate) test_mode: bool,
    /// Put invocations in cgroups.
    pub(crate) cgroups: bool,
}

impl ServeOptions {
    /// The guest's settings, unless a test asked otherwise through the
    /// environment outside a guest. Returns what to warn about, too.
    pub(crate) fn from_env() -> (Self, Option<String>) {
        let guest = ServeOptions {
            listen: Listen::Vsock {
                port: AGENT_VSOCK_PORT,
            },
            test_mode: false,
            cgroups: true,
        };
        let Some(value) = std::env::var_os(ENV_TEST_LISTEN) else {
            return (guest, None);
        };
        if in_initial_pid_namespace() {
            return (
                guest,
                Some(format!(
                    "ignoring {ENV_TEST_LISTEN}: it is for tests, and this agent is a machine's init"
                )),
            );
        }
        match value.as_bytes().strip_prefix(b"unix:") {
            Some(path) if !path.is_empty() => (
                ServeOptions {
                    listen: Listen::Unix {
                        path: PathBuf::from(OsStr::from_bytes(path)),
                    },
                    test_mode: true,
                    cgroups: std::env::var_os(ENV_TEST_CGROUP).is_some_and(|v| v == "1"),
                },
                None,
            ),
            _ => (
                guest,
                Some(format!(
                    "ignoring {ENV_TEST_LISTEN}={}: expected unix:<path>",
                    value.to_string_lossy()
                )),
            ),
        }
    }
}

/// Whether this process is in the initial PID namespace; when that cannot
/// be told (no /proc), the answer that keeps test switches off.
pub(crate) fn in_initial_pid_namespace() -> bool {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `st` is writable.
    if unsafe { libc::stat(c"/proc/self/ns/pid".as_ptr(), &mut st) } != 0 {
        return true;
    }
    st.st_ino == INITIAL_PID_NS_INO
}

/// Setting up or running the server failed.
#[derive(Debug, Error)]
pub(crate) enum ServeError {
    #[error("epoll_create1: {source}")]
    Epoll { source: io::Error },
    #[error(transparent)]
    Signals(#[from] reaper::ReaperError),
    #[error("listen on {what}: {source}")]
    Listen { what: String, source: io::Error },
    #[error("register with epoll: {source}")]
    Register { source: io::Error },
    #[error("epoll_wait: {source}")]
    Wait { source: io::Error },
}

/// The one connection being served.
struct Conn {
    fd: OwnedFd,
    /// Bytes received and not yet decoded.
    inbuf: Vec<u8>,
    /// Frames to send, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// After a fatal error: send what is queued, read nothing more, close.
    closing: bool,
    /// The epoll events it is registered for.
    events: u32,
}

impl Conn {
    fn pending(&self) -> usize {
        self.out.len().saturating_sub(self.out_pos)
    }

    fn queue(&mut self, msg: &AgentMessage) {
        if let Err(err) = encode_frame_into(&mut self.out, FrameKind::Agent, msg) {
            // Only an Exit with collected files near the frame limit can get
            // here; the host still needs an answer.
            let reply = AgentMessage::Error(ErrorReply {
                kind: ErrorKind::Internal,
                message: format!("reply could not be encoded: {err}"),
            });
            let _ = encode_frame_into(&mut self.out, FrameKind::Agent, &reply);
        }
    }

    fn error(&mut self, kind: ErrorKind, message: String) {
        self.queue(&AgentMessage::Error(ErrorReply { kind, message }));
    }
}

/// What a read from the connection found.
enum Received {
    /// Bytes (or nothing yet).
    Data,
    /// The host closed its end, or the connection broke.
    Closed,
}

/// The agent's server.
pub(crate) struct Server {
    epoll: OwnedFd,
    signals: OwnedFd,
    listener: OwnedFd,
    /// What the listener is, for messages.
    listen_name: String,
    conn: Option<Conn>,
    inv: Option<Invocation>,
    /// Generation of `inv`, in its pipes' epoll tokens.
    inv_gen: u64,
    /// The output pipes are out of the epoll set (too much queued).
    paused: bool,
    runner: Runner,
    /// An invocation was started since the runner's idle work last ran.
    idle_due: bool,
    /// The VM's function runtime, once started (kept when dead, to say
    /// why).
    function: Option<Function>,
    /// Generation of `function`, in its pipes' epoll tokens.
    fn_gen: u64,
    /// The runtime's request pipe is in the epoll set (an event is being
    /// written).
    fn_writing: bool,
    /// Numbers the runtimes' cgroups.
    fn_next_id: u64,
    urandom: Option<OwnedFd>,
    test_mode: bool,
}

impl Server {
    /// Sets everything up, listening included, so that once this returns
    /// a host connection is accepted (into the backlog until [`run`]).
    ///
    /// [`run`]: Server::run
    pub(crate) fn new(signals: &Signals, opts: &ServeOptions) -> Result<Self, ServeError> {
        // SAFETY: epoll_create1 takes only flags.
        let epoll = sys::owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
            .map_err(|source| ServeError::Epoll { source })?;
        let signal_fd = signals.signalfd()?;
        let (listener, listen_name) = listen(&opts.listen)?;
        let cgroups = if opts.cgroups {
            match Cgroups::setup() {
                Ok(cgroups) => cgroups,
                Err(err) => {
                    console::warn(&err);
                    Cgroups::DISABLED
                }
            }
        } else {
            console::warn(&"test mode without cgroups: invocations are killed by process group");
            Cgroups::DISABLED
        };
        let server = Server {
            epoll,
            signals: signal_fd,
            listener,
            listen_name,
            conn: None,
            inv: None,
            inv_gen: 0,
            paused: false,
            runner: Runner::new(cgroups),
            idle_due: false,
            function: None,
            fn_gen: 0,
            fn_writing: false,
            fn_next_id: 1,
            // Opened at boot, so that the first Refresh after a restore
            // costs no open.
            urandom: sys::open(c"/dev/urandom", libc::O_WRONLY, 0).ok(),
            test_mode: opts.test_mode,
        };
        server
            .ctl(
                libc::EPOLL_CTL_ADD,
                server.signals.as_raw_fd(),
                libc::EPOLLIN,
                TOKEN_SIGNAL,
            )
            .and_then(|()| server.arm_listener(libc::EPOLL_CTL_ADD))
            .map_err(|source| ServeError::Register { source })?;
        if server.test_mode {
            console::info(format_args!("listening on {}", server.listen_name));
        }
        Ok(server)
    }

    /// Serves until a power-off signal arrives; returns that signal.
    pub(crate) fn run(&mut self) -> Result<libc::c_int, ServeError> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            let timeout = self.timeout_ms();
            // SAFETY: `events` is writable for the count passed.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout,
                )
            };
            if n < 0 {
                if sys::errno() == libc::EINTR {
                    continue;
                }
                return Err(ServeError::Wait {
                    source: sys::last_error(),
                });
            }
            for event in events.iter().take(n.unsigned_abs() as usize) {
                let (token, flags) = (event.u64, event.events);
                if let Some(signo) = self.dispatch(token, flags) {
                    return Ok(signo);
                }
            }
            self.after_events();
        }
    }

    /// Handles one event; returns a power-off signal if one came.
    fn dispatch(&mut self, token: u64, flags: u32) -> Option<libc::c_int> {
        match token {
            TOKEN_SIGNAL => return self.on_signals(),
            TOKEN_LISTEN => self.on_accept(),
            TOKEN_CONN => self.on_conn(flags),
            _ if (TOKEN_FN_REQUEST..=TOKEN_FN_STDERR).contains(&(token & 0xff)) => {
                if token >> TOKEN_KIND_BITS != self.fn_gen {
                    return None;
                }
                let Some(function) = &mut self.function else {
                    return None;
                };
                match token & ((1 << TOKEN_KIND_BITS) - 1) {
                    TOKEN_FN_REQUEST => function.on_request_writable(),
                    TOKEN_FN_RESPONSE => function.on_response(),
                    TOKEN_FN_STDOUT => function.on_output(function::Stream::Stdout),
                    TOKEN_FN_STDERR => function.on_output(function::Stream::Stderr),
                    _ => {}
                }
            }
            _ => {
                if token >> TOKEN_KIND_BITS != self.inv_gen {
                    return None;
                }
                let (Some(inv), Some(conn)) = (&mut self.inv, &mut self.conn) else {
                    return None;
                };
                match token & ((1 << TOKEN_KIND_BITS) - 1) {
                    TOKEN_STDIN => inv.write_stdin(),
                    TOKEN_STDOUT if !self.paused => {
                        self.runner.read_output(inv, Stream::Stdout, &mut conn.out)
                    }
                    TOKEN_STDERR if !self.paused => {
                        self.runner.read_output(inv, Stream::Stderr, &mut conn.out)
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// Work left after a batch of events: deadlines, the end of the
    /// invocation, sending, and what to wait for next.
    fn after_events(&mut self) {
        self.function_tick();
        if let Some(inv) = &mut self.inv {
            inv.tick(Instant::now(), self.paused);
            if inv.is_finished() {
                if let Some(inv) = self.inv.take() {
                    let exit = self.runner.finish(inv);
                    self.paused = false;
                    if let Some(conn) = &mut self.conn {
                        conn.queue(&AgentMessage::Exit(exit));
                    }
                }
            }
        }
        self.flush();
        // Once the answer is out (or nobody is left to read it): clean up
        // after the invocation and stage the next one.
        let answered = match &self.conn {
            Some(conn) => conn.pending() == 0,
            None => true,
        };
        if self.idle_due && self.inv.is_none() && answered {
            self.idle_due = false;
            self.runner.idle_work();
        }
        let done = self
            .conn
            .as_ref()
            .is_some_and(|conn| conn.closing && conn.pending() == 0);
        if done {
            self.close_conn();
        }
        self.update_interest();
    }

    /// `epoll_wait`'s timeout: until the invocation's or the function
    /// runtime's next deadline.
    fn timeout_ms(&self) -> libc::c_int {
        let inv = self
            .inv
            .as_ref()
            .and_then(|inv| inv.next_deadline(self.paused));
        let function = self.function.as_ref().and_then(Function::next_deadline);
        let Some(deadline) = inv.into_iter().chain(function).min() else {
            return -1;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up: waking a little early would only turn around.
        let ms = left.as_micros().div_ceil(1000);
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    }

    fn on_signals(&mut self) -> Option<libc::c_int> {
        let (child, power_off) = match reaper::read_signalfd(&self.signals) {
            Ok(taken) => taken,
            Err(err) => {
                console::error(&err);
                // Reap anyway: a lost SIGCHLD must not leave zombies.
                (true, None)
            }
        };
        if power_off.is_some() {
            return power_off;
        }
        if child {
            let inv = &mut self.inv;
            let function = &mut self.function;
            let now = Instant::now();
            let reaped = reaper::reap_with_usage(|pid, status, usage| {
                if let Some(inv) = inv.as_mut().filter(|inv| inv.pid() == pid) {
                    inv.main_exited(status, *usage);
                }
                if let Some(function) = function.as_mut().filter(|f| f.pid() == pid) {
                    function.on_exit(status, now);
                }
            });
            if let Err(err) = reaped {
                console::error(&err);
            }
        }
        None
    }

    fn on_accept(&mut self) {
        // SAFETY: null address arguments: the peer's address is not wanted.
        let fd = unsafe {
            libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        let fd = match sys::owned(fd) {
            Ok(fd) if self.conn.is_none() => fd,
            // Cannot happen (the listener is re-armed only without a
            // connection); refuse rather than drop the one being served.
            Ok(_) => return,
            Err(err) => {
                // EAGAIN (the peer gave up) and the like: wait for the next.
                if err.raw_os_error() != Some(libc::EAGAIN) {
                    console::warn(&format_args!("accept on {}: {err}", self.listen_name));
                }
                if let Err(err) = self.arm_listener(libc::EPOLL_CTL_MOD) {
                    console::warn(&format_args!("re-arm {}: {err}", self.listen_name));
                }
                return;
            }
        };
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if let Err(err) = self.ctl(
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            events as i32,
            TOKEN_CONN,
        ) {
            console::warn(&format_args!("register connection: {err}"));
            drop(fd);
            let _ = self.arm_listener(libc::EPOLL_CTL_MOD);
            return;
        }
        let mut conn = Conn {
            fd,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            closing: false,
            events,
        };
        conn.queue(&AgentMessage::Hello(Hello::current()));
        self.conn = Some(conn);
    }

    fn on_conn(&mut self, flags: u32) {
        let readable = flags
            & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
            != 0;
        let Some(conn) = &mut self.conn else { return };
        if !readable || conn.closing {
            // EPOLLOUT: after_events sends.
            return;
        }
        match receive(conn) {
            Received::Data => self.handle_frames(),
            // The end of the host's side is the end of the conversation,
            // half-closed or not: whatever is running is killed (see the
            // protocol docs), and frames still buffered are not acted on.
            Received::Closed => self.close_conn(),
        }
    }

    /// Decodes and handles every complete frame received.
    fn handle_frames(&mut self) {
        let mut used = 0;
        loop {
            let Some(conn) = &mut self.conn else { return };
            if conn.closing {
                break;
            }
            let buf = conn.inbuf.get(used..).unwrap_or_default();
            match decode_frame::<HostMessage>(buf, FrameKind::Host) {
                Ok(Some((msg, len))) => {
                    used += len;
                    self.handle(msg);
                }
                Ok(None) => break,
                Err(err) => {
                    self.fatal(err.error_kind(), err.to_string());
                    break;
                }
            }
        }
        if let Some(conn) = &mut self.conn {
            conn.inbuf.drain(..used.min(conn.inbuf.len()));
            if conn.inbuf.is_empty() && conn.inbuf.capacity() > KEEP_CAPACITY {
                conn.inbuf = Vec::new();
            }
        }
    }

    fn handle(&mut self, msg: HostMessage) {
        match msg {
            HostMessage::Ping(n) => self.reply(&AgentMessage::Pong(n)),
            HostMessage::Refresh(refresh) => match refresh.validate() {
                Err(message) => self.fatal(ErrorKind::BadRequest, message),
                Ok(()) => match self.refresh(&refresh) {
                    Ok(()) => self.reply(&AgentMessage::Refreshed),
                    Err(err) => self.reply_error(ErrorKind::Internal, format!("refresh: {err}")),
                },
            },
            HostMessage::Invoke(invoke) => self.start(invoke),
            HostMessage::FunctionStart(start) => self.function_start(start),
            HostMessage::FunctionInvoke(invoke) => self.function_invoke(invoke),
            HostMessage::FunctionCollect(wait_ms) => self.function_collect(wait_ms),
            HostMessage::FunctionLoad(load) => self.function_load(load),
        }
    }

    /// Whether the connection waits for the function runtime.
    fn function_busy(&self) -> bool {
        self.function.as_ref().is_some_and(Function::has_waiter)
    }

    fn start(&mut self, invoke: Invoke) {
        if self.inv.is_some() {
            return self.reply_error(
                ErrorKind::Busy,
                "an invocation is already running on this connection".into(),
            );
        }
        if self.function_busy() {
            return self.reply_error(
                ErrorKind::Busy,
                "a function call is in progress on this connection".into(),
            );
        }
        if let Err(message) = invoke.validate() {
            return self.fatal(ErrorKind::BadRequest, message);
        }
        self.idle_due = true;
        let inv = match self.runner.start(invoke) {
            Ok(inv) => inv,
            Err(err) => return self.reply_error(err.kind(), err.to_string()),
        };
        self.inv_gen += 1;
        self.paused = false;
        let gen = self.inv_gen << TOKEN_KIND_BITS;
        let mut registered = Ok(());
        for (fd, events, token) in [
            (inv.stdin_fd(), libc::EPOLLOUT, TOKEN_STDIN),
            (inv.output_fd(Stream::Stdout), libc::EPOLLIN, TOKEN_STDOUT),
            (inv.output_fd(Stream::Stderr), libc::EPOLLIN, TOKEN_STDERR),
        ] {
            if let Some(fd) = fd {
                registered = registered
                    .and_then(|()| self.ctl(libc::EPOLL_CTL_ADD, fd, events, gen | token));
            }
        }
        if let Err(err) = registered {
            self.runner.abort(inv);
            return self.reply_error(ErrorKind::Internal, format!("register pipes: {err}"));
        }
        self.inv = Some(inv);
    }

    fn function_start(&mut self, start: FunctionStart) {
        if let Err(message) = start.validate() {
            return self.fatal(ErrorKind::BadRequest, message);
        }
        if self.inv.is_some() {
            return self.reply_error(
                ErrorKind::Busy,
                "an invocation is running on this connection".into(),
            );
        }
        if self.function.as_ref().is_some_and(|f| !f.is_dead()) {
            return self.reply_error(
                ErrorKind::Busy,
                "a function runtime is already running in this VM".into(),
            );
        }
        self.retire_function();
        self.function = None;
        let function = match Function::start(start, &mut self.runner, &mut self.fn_next_id) {
            Ok(function) => function,
            Err((kind, message)) => return self.reply_error(kind, message),
        };
        self.fn_gen += 1;
        self.fn_writing = false;
        let gen = self.fn_gen << TOKEN_KIND_BITS;
        let mut registered = Ok(());
        for (fd, token) in [
            (function.response_fd(), TOKEN_FN_RESPONSE),
            (
                function.output_fd(function::Stream::Stdout),
                TOKEN_FN_STDOUT,
            ),
            (
                function.output_fd(function::Stream::Stderr),
                TOKEN_FN_STDERR,
            ),
        ] {
            if let Some(fd) = fd {
                registered = registered
                    .and_then(|()| self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN, gen | token));
            }
        }
        self.function = Some(function);
        if let Err(err) = registered {
            // Not expected; the runtime is useless without its pipes.
            if let Some(function) = &mut self.function {
                function.disconnected();
            }
            self.reply_error(
                ErrorKind::Internal,
                format!("register the function runtime's pipes: {err}"),
            );
        }
    }

    /// Answers `Busy` (and returns true) while an invocation runs: the
    /// function runtime is not served meanwhile.
    fn refuse_if_busy(&mut self) -> bool {
        if self.inv.is_some() {
            self.reply_error(
                ErrorKind::Busy,
                "an invocation is running on this connection".into(),
            );
        }
        self.inv.is_some()
    }

    fn function_invoke(&mut self, invoke: FunctionInvoke) {
        if let Err(message) = invoke.validate() {
            return self.fatal(ErrorKind::BadRequest, message);
        }
        if self.refuse_if_busy() {
            return;
        }
        let now = Instant::now();
        let result = match &mut self.function {
            Some(function) => function.invoke(invoke, now),
            None => Err(no_runtime()),
        };
        if let Err(err) = result {
            self.reply(&AgentMessage::Error(err));
        }
    }

    fn function_load(&mut self, load: FunctionLoad) {
        if let Err(message) = load.validate() {
            return self.fatal(ErrorKind::BadRequest, message);
        }
        if self.refuse_if_busy() {
            return;
        }
        let now = Instant::now();
        let result = match &mut self.function {
            Some(function) => function.load(load, now),
            None => Err(no_runtime()),
        };
        if let Err(err) = result {
            self.reply(&AgentMessage::Error(err));
        }
    }

    fn function_collect(&mut self, wait_ms: u64) {
        if self.refuse_if_busy() {
            return;
        }
        let now = Instant::now();
        let result = match &mut self.function {
            Some(function) => function.collect(wait_ms, now),
            None => Err(no_runtime()),
        };
        if let Err(err) = result {
            self.reply(&AgentMessage::Error(err));
        }
    }

    /// The function runtime's share of a loop turn: its deadlines and
    /// answers, the request pipe's place in the epoll set, and the end of
    /// a dead one.
    fn function_tick(&mut self) {
        let Some(function) = &mut self.function else {
            return;
        };
        function.tick(Instant::now());
        let replies = function.take_replies();
        let writing = function.writing_fd();
        if let Some(conn) = &mut self.conn {
            for reply in &replies {
                conn.queue(reply);
            }
        }
        match (writing, self.fn_writing) {
            (Some(fd), false) => {
                let token = (self.fn_gen << TOKEN_KIND_BITS) | TOKEN_FN_REQUEST;
                match self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLOUT, token) {
                    Ok(()) => self.fn_writing = true,
                    Err(err) => console::warn(&format_args!("register fd 3: {err}")),
                }
            }
            (None, true) => {
                // Unless its descriptor was closed already, which took it
                // out of the set (and its number may be another's now).
                if let Some(fd) = self.function.as_ref().and_then(Function::request_fd) {
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
                }
                self.fn_writing = false;
            }
            _ => {}
        }
        self.retire_function();
    }

    /// Hands a dead runtime's cgroup to the runner for removal.
    fn retire_function(&mut self) {
        if let Some(group) = self.function.as_mut().and_then(Function::take_cgroup) {
            self.runner.retire(group);
            self.idle_due = true;
        }
    }

    /// Adds entropy to the kernel's pool, credited, and sets the wall
    /// clock. Two system calls; /dev/urandom was opened at boot.
    fn refresh(&self, refresh: &Refresh) -> io::Result<()> {
        if self.test_mode {
            // Dry run: the host's pool and clock are not the test's.
            return Ok(());
        }
        let urandom = self
            .urandom
            .as_ref()
            .ok_or_else(|| io::Error::other("/dev/urandom could not be opened at boot"))?;
        // struct rand_pool_info { int entropy_count (bits); int buf_size;
        // u32 buf[]; }. The kernel copies it from user memory byte-wise,
        // so the Vec's alignment does not matter.
        let len = refresh.entropy.len();
        let bits = i32::try_from(len * 8).map_err(io::Error::other)?;
        let size = i32::try_from(len).map_err(io::Error::other)?;
        let mut info = Vec::with_capacity(8 + len);
        info.extend_from_slice(&bits.to_ne_bytes());
        info.extend_from_slice(&size.to_ne_bytes());
        info.extend_from_slice(&refresh.entropy);
        // SAFETY: `info` holds a complete rand_pool_info of `len` bytes.
        if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
            return Err(io::Error::other(format!(
                "RNDADDENTROPY: {}",
                sys::last_error()
            )));
        }
        let time = libc::timespec {
            tv_sec: libc::time_t::try_from(refresh.unix_time_ns / 1_000_000_000)
                .map_err(io::Error::other)?,
            // Below 1e9.
            tv_nsec: (refresh.unix_time_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `time` is a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
            return Err(io::Error::other(format!(
                "clock_settime: {}",
                sys::last_error()
            )));
        }
        Ok(())
    }

    fn reply(&mut self, msg: &AgentMessage) {
        if let Some(conn) = &mut self.conn {
            conn.queue(msg);
        }
    }

    fn reply_error(&mut self, kind: ErrorKind, message: String) {
        if let Some(conn) = &mut self.conn {
            conn.error(kind, message);
        }
    }

    /// A request that ends the connection: say why, stop reading, and close
    /// once the reply is out. A running invocation goes with it.
    fn fatal(&mut self, kind: ErrorKind, message: String) {
        if let Some(conn) = &mut self.conn {
            conn.error(kind, message);
            conn.closing = true;
            conn.inbuf = Vec::new();
        }
        if let Some(inv) = self.inv.take() {
            self.runner.abort(inv);
        }
    }

    /// Sends what is queued, as far as the socket takes it.
    fn flush(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        while let Some(rest) = conn.out.get(conn.out_pos..).filter(|rest| !rest.is_empty()) {
            // SAFETY: `rest` is valid for reads of its length. MSG_NOSIGNAL:
            // a closed peer is an error here, not a SIGPIPE.
            let n = unsafe {
                libc::send(
                    conn.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                match sys::errno() {
                    libc::EINTR => continue,
                    libc::EAGAIN => break,
                    _ => return self.close_conn(),
                }
            }
            conn.out_pos += n.unsigned_abs();
        }
        if conn.out_pos >= conn.out.len() {
            conn.out.clear();
            conn.out_pos = 0;
            if conn.out.capacity() > KEEP_CAPACITY {
                conn.out = Vec::new();
            }
        } else if conn.out_pos > conn.out.len() / 2 {
            conn.out.drain(..conn.out_pos);
            conn.out_pos = 0;
        }
    }

    /// Drops the connection (and the invocation it was waiting for) and
    /// takes the next one.
    fn close_conn(&mut self) {
        if let Some(inv) = self.inv.take() {
            self.runner.abort(inv);
        }
        if let Some(function) = &mut self.function {
            function.disconnected();
        }
        self.paused = false;
        // Closing the descriptor also removes it from the epoll set.
        if self.conn.take().is_some() {
            if let Err(err) = self.arm_listener(libc::EPOLL_CTL_MOD) {
                console::warn(&format_args!("re-arm {}: {err}", self.listen_name));
            }
        }
    }

    /// Registers for writability while frames are queued, and takes the
    /// output pipes out of the epoll set while too much is.
    fn update_interest(&mut self) {
        let Some(conn) = &self.conn else { return };
        let pending = conn.pending();
        let mut events = libc::EPOLLRDHUP as u32;
        if !conn.closing {
            events |= libc::EPOLLIN as u32;
        }
        if pending > 0 {
            events |= libc::EPOLLOUT as u32;
        }
        if events != conn.events {
            let fd = conn.fd.as_raw_fd();
            if self
                .ctl(libc::EPOLL_CTL_MOD, fd, events as i32, TOKEN_CONN)
                .is_ok()
            {
                if let Some(conn) = &mut self.conn {
                    conn.events = events;
                }
            }
        }
        let Some(inv) = &self.inv else { return };
        let gen = self.inv_gen << TOKEN_KIND_BITS;
        let pipes = [
            (inv.output_fd(Stream::Stdout), TOKEN_STDOUT),
            (inv.output_fd(Stream::Stderr), TOKEN_STDERR),
        ];
        // Removed rather than registered for no events: a pipe at end of
        // file reports EPOLLHUP whatever it is registered for.
        if !self.paused && pending > HIGH_WATER {
            self.paused = true;
            for (fd, _) in pipes {
                if let Some(fd) = fd {
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
                }
            }
        } else if self.paused && pending < LOW_WATER {
            self.paused = false;
            for (fd, token) in pipes {
                if let Some(fd) = fd {
                    let _ = self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN, gen | token);
                }
            }
        }
    }

    fn arm_listener(&self, op: libc::c_int) -> io::Result<()> {
        self.ctl(
            op,
            self.listener.as_raw_fd(),
            libc::EPOLLIN | libc::EPOLLONESHOT,
            TOKEN_LISTEN,
        )
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: libc::c_int, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event (ignored for DEL).
        sys::cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) }).map(drop)
    }
}

fn no_runtime() -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::BadRequest,
        message: "no function runtime: none was started".into(),
    }
}

/// Reads what the connection has into its buffer, with room for the whole
/// frame being received once its header is known (and checked).
fn receive(conn: &mut Conn) -> Received {
    let want = match peek_header(&conn.inbuf, FrameKind::Host) {
        Ok(Some(header)) => header
            .frame_len()
            .saturating_sub(conn.inbuf.len())
            .max(READ_SIZE),
        _ => READ_SIZE,
    };
    conn.inbuf.reserve(want);
    let spare = conn.inbuf.spare_capacity_mut();
    // SAFETY: `spare` is writable for its length; read initialises the
    // first `n` bytes, which set_len then covers.
    let n = unsafe { libc::read(conn.fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    if n < 0 {
        return match sys::errno() {
            libc::EINTR | libc::EAGAIN => Received::Data,
            _ => Received::Closed,
        };
    }
    if n == 0 {
        return Received::Closed;
    }
    let len = conn.inbuf.len() + n.unsigned_abs();
    // SAFETY: the kernel wrote `n` bytes right after the old length, within
    // the capacity reserved above.
    unsafe { conn.inbuf.set_len(len) };
    Received::Data
}

/// Opens the listening socket.
fn listen(listen: &Listen) -> Result<(OwnedFd, String), ServeError> {
    match listen {
        Listen::Vsock { port } => {
            let name = format!("vsock port {port}");
            let err = |source| ServeError::Listen {
                what: name.clone(),
                source,
            };
            // SAFETY: socket takes only integers.
            let fd = sys::owned(unsafe {
                libc::socket(
                    libc::AF_VSOCK,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    0,
                )
            })
            .map_err(err)?;
            // SAFETY: sockaddr_vm is plain data; all-zero is valid.
            let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_cid = libc::VMADDR_CID_ANY;
            addr.svm_port = *port;
            bind_listen(&fd, &addr).map_err(err)?;
            Ok((fd, name))
        }
        Listen::Unix { path } => {
            let name = format!("unix:{}", path.display());
            let err = |source| ServeError::Listen {
                what: name.clone(),
                source,
            };
            // SAFETY: socket takes only integers.
            let fd = sys::owned(unsafe {
                libc::socket(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    0,
                )
            })
            .map_err(err)?;
            // SAFETY: sockaddr_un is plain data; all-zero is valid.
            let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_os_str().as_bytes();
            if bytes.len() >= addr.sun_path.len() {
                return Err(err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "socket path too long",
                )));
            }
            for (slot, &byte) in addr.sun_path.iter_mut().zip(bytes) {
                *slot = byte as libc::c_char;
            }
            // A socket file left by an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
            bind_listen(&fd, &addr).map_err(err)?;
            Ok((fd, name))
        }
    }
}

fn bind_listen<A>(fd: &OwnedFd, addr: &A) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<A>()).map_err(io::Error::other)?;
    // SAFETY: `addr` is a complete socket address of the family the socket
    // was made with, `len` bytes long.
    sys::cvt(unsafe { libc::bind(fd.as_raw_fd(), (addr as *const A).cast(), len) })?;
    // SAFETY: listen takes only integers.
    sys::cvt(unsafe { libc::listen(fd.as_raw_fd(), 8) })?;
    Ok(())
}
