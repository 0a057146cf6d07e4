//! The wire protocol between the host VMM and the agent.
//!
//! Both sides exchange frames over one byte stream (vsock in the guest; the
//! host may hold a Unix socket end of it). A frame is an 8-byte header
//! followed by a payload:
//!
//! ```text
//! b'E' b'M' version kind len(u32 LE) | payload (len bytes)
//! ```
//!
//! `version` is [`PROTOCOL_VERSION`], `kind` says who sent it
//! ([`FrameKind`]) and the payload is the [postcard] encoding of a
//! [`HostMessage`] (kind 1) or an [`AgentMessage`] (kind 2). A reader checks
//! the whole header, `len` against [`MAX_FRAME_LEN`] included, before it
//! allocates anything for the payload, and postcard never allocates beyond
//! the bytes it was given, so every inner length is bounded by the frame.
//! Lists hold at most [`MAX_LIST_LEN`] entries, refused while decoding, so
//! a decoded message never takes much more memory than its frame (tiny
//! encoded entries, such as empty strings, would otherwise take 24 to 72
//! bytes each in memory).
//!
//! A conversation: the agent sends [`AgentMessage::Hello`] on every
//! connection it accepts. After a snapshot restore the host sends
//! [`HostMessage::Refresh`] first (fresh entropy and wall-clock time), then
//! one [`HostMessage::Invoke`]; the agent streams [`AgentMessage::Stdout`] /
//! [`AgentMessage::Stderr`] chunks and ends with [`AgentMessage::Exit`] (or
//! [`AgentMessage::Error`]). A malformed frame earns an `Error` and the end
//! of the connection. The agent serves one connection at a time and one
//! invocation at a time (another `Invoke` meanwhile is answered `Busy`).
//! When the host closes the connection, or only shuts down its writing
//! half, the running invocation is killed whole: keep the connection open
//! until `Exit`.

use std::fmt;
use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version byte of every frame. Bumped on any incompatible change of the
/// header or of the messages.
pub const PROTOCOL_VERSION: u8 = 1;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"EM";

/// Length of a frame header.
pub const HEADER_LEN: usize = 8;

/// Largest payload a frame may carry (32 MiB). Larger lengths are refused
/// from the header alone.
pub const MAX_FRAME_LEN: u32 = 32 << 20;

/// vsock port the agent listens on (any CID).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Largest data chunk in one [`AgentMessage::Stdout`] / [`AgentMessage::Stderr`].
pub const MAX_CHUNK: usize = 32 * 1024;

/// Longest timeout an [`Invoke`] may ask for: 24 hours.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

/// Most entries in each list of an [`Invoke`] (argv, env, files_in, collect).
pub const MAX_LIST_LEN: usize = 4096;

/// Longest path (in bytes) an [`Invoke`] may name; Linux's PATH_MAX.
pub const MAX_PATH_LEN: usize = 4096;

/// Most bytes the agent reads back for all of [`Invoke::collect`] together
/// (8 MiB); files past it come back with an error instead of data.
pub const MAX_COLLECT_BYTES: u64 = 8 << 20;

/// Fewest entropy bytes a [`Refresh`] must carry.
pub const MIN_REFRESH_ENTROPY: usize = 32;

/// Most entropy bytes a [`Refresh`] may carry.
pub const MAX_REFRESH_ENTROPY: usize = 256;

/// Who sent a frame: the `kind` byte of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A [`HostMessage`], from the host to the agent.
    Host = 1,
    /// An [`AgentMessage`], from the agent to the host.
    Agent = 2,
}

impl FrameKind {
    /// The kind with this header byte, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(FrameKind::Host),
            2 => Some(FrameKind::Agent),
            _ => None,
        }
    }
}

/// A frame header, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Who sent the frame.
    pub kind: FrameKind,
    /// Payload length in bytes, at most [`MAX_FRAME_LEN`].
    pub len: u32,
}

impl FrameHeader {
    /// Checks a header in this order: magic, version, kind (it must be
    /// `expect`), length.
    pub fn parse(bytes: &[u8; HEADER_LEN], expect: FrameKind) -> Result<Self, ProtocolError> {
        let [m0, m1, version, kind, l0, l1, l2, l3] = *bytes;
        if [m0, m1] != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        if FrameKind::from_byte(kind) != Some(expect) {
            return Err(ProtocolError::UnexpectedKind);
        }
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if len > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge(len));
        }
        Ok(FrameHeader { kind: expect, len })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [l0, l1, l2, l3] = self.len.to_le_bytes();
        let [m0, m1] = MAGIC;
        [m0, m1, PROTOCOL_VERSION, self.kind as u8, l0, l1, l2, l3]
    }

    /// Header plus payload length in bytes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// Reading, writing or decoding a frame failed.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The frame does not start with [`MAGIC`].
    #[error("bad frame magic")]
    BadMagic,
    /// The frame has another [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    /// The frame's kind byte is unknown or not the one expected from this
    /// peer.
    #[error("unexpected frame kind")]
    UnexpectedKind,
    /// The frame's length is over [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_LEN}")]
    FrameTooLarge(u32),
    /// The payload is not a valid message (or has bytes left over).
    #[error("undecodable payload: {0}")]
    Decode(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

impl ProtocolError {
    /// The [`ErrorKind`] to tell the peer about this error.
    pub fn error_kind(&self) -> ErrorKind {
        match self {
            ProtocolError::Io(_) => ErrorKind::Internal,
            ProtocolError::BadMagic
            | ProtocolError::UnexpectedKind
            | ProtocolError::Decode(_)
            | ProtocolError::Truncated => ErrorKind::MalformedFrame,
            ProtocolError::UnsupportedVersion(_) => ErrorKind::UnsupportedVersion,
            ProtocolError::FrameTooLarge(_) => ErrorKind::FrameTooLarge,
        }
    }
}

/// A message from the host to the agent (frame kind [`FrameKind::Host`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Run a command.
    Invoke(Invoke),
    /// Answered with [`AgentMessage::Pong`] carrying the same number.
    Ping(u64),
    /// Fresh entropy and time after a snapshot restore.
    Refresh(Refresh),
    /// Start the VM's long-lived function runtime (template time);
    /// answered with [`AgentMessage::FunctionReady`].
    FunctionStart(FunctionStart),
    /// Deliver one event to the running function runtime through its
    /// request pipe; answered with [`AgentMessage::FunctionResult`].
    FunctionInvoke(FunctionInvoke),
    /// Fetch the response a hot-path runtime sent on its response pipe
    /// because it did not fit its buffer
    /// ([`crate::hotpath::ResponseStatus::ViaPipe`]); answered with
    /// [`AgentMessage::FunctionResult`]. The `u64` is the wait limit in ms.
    FunctionCollect(u64),
    /// Give a runtime started with [`FunctionStart::wait_for_code`] (and
    /// `READY` already) its function: files, code drive, handler; answered
    /// with [`AgentMessage::FunctionReady`] once it loaded the handler.
    FunctionLoad(FunctionLoad),
}

/// Where a function runtime's files go in the guest (a tmpfs, so they are
/// part of the snapshot's memory); it is also the runtime's working
/// directory.
pub const FUNCTION_DIR: &str = "/run/ember/function";

/// Where the agent installs ember's python3 runtime (root-owned, outside
/// [`FUNCTION_DIR`], so that no file of the function can take its place)
/// before it starts a function runtime.
pub const PYTHON_RUNTIME_PATH: &str = "/run/ember/runtime/ember_runtime.py";

/// Where the agent mounts a function's code drive (read-only, `nodev`,
/// `nosuid`), when [`FunctionStart::code_drive`] names one; the runtime
/// then starts in it.
pub const CODE_DIR: &str = "/var/task";

/// Starts a function runtime: a process that stays alive, serves one event
/// at a time on its pipes, and (with `hot_path`) through guest memory.
///
/// The agent writes `files_in` into [`FUNCTION_DIR`], starts `argv` there as
/// the sandbox user in a cgroup of its own with exactly `env`, stdin from
/// `/dev/null`, stdout/stderr captured, fd 3 the request pipe and fd 4 the
/// response pipe (see the runtime protocol in the README), and waits until
/// the runtime writes `READY`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionStart {
    /// Program and arguments (`argv[0]` as for [`Invoke::argv`]).
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub argv: Vec<String>,
    /// The whole environment.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub env: Vec<(String, String)>,
    /// Files written into [`FUNCTION_DIR`] first.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub files_in: Vec<FileIn>,
    /// Hand the runtime the hot-path doorbell (`/dev/mem` on
    /// [`crate::hotpath::DOORBELL_FD`]) and report its buffers'
    /// guest-physical pages.
    pub hot_path: bool,
    /// How long the runtime may take to write `READY`, 1 to
    /// [`MAX_TIMEOUT_MS`].
    pub ready_timeout_ms: u64,
    /// The guest device of the function's code drive (`/dev/vdb`), an ext4
    /// image the agent mounts read-only at [`CODE_DIR`] before the start
    /// (once: a later start with the same device finds it mounted).
    #[serde(default)]
    pub code_drive: Option<String>,
    /// The runtime starts without a function (a base snapshot's): it
    /// writes `READY` once set up, then waits for a `LOAD` message on its
    /// request pipe, sent by [`HostMessage::FunctionLoad`].
    #[serde(default)]
    pub wait_for_code: bool,
}

impl FunctionStart {
    /// Checks what the agent would refuse; the message says why.
    pub fn validate(&self) -> Result<(), String> {
        let mut as_invoke = Invoke::new(self.argv.iter().cloned());
        as_invoke.env.clone_from(&self.env);
        as_invoke.files_in.clone_from(&self.files_in);
        as_invoke.timeout_ms = self.ready_timeout_ms;
        if let Some(device) = &self.code_drive {
            let name = device.strip_prefix("/dev/vd").unwrap_or_default();
            if name.len() != 1 || !name.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(format!(
                    "code drive {device:?} is not a virtio disk (/dev/vda to /dev/vdz)"
                ));
            }
        }
        as_invoke.validate()
    }
}

/// A waiting runtime's function (see [`FunctionStart::wait_for_code`]).
///
/// The agent writes `files_in` into [`FUNCTION_DIR`], mounts `code_drive`
/// at [`CODE_DIR`] as for [`FunctionStart`], and sends the runtime
/// `LOAD <len>` and a JSON object `{"args": [...], "env": [[k, v]...]}`
/// on its request pipe; the runtime adds `env` to its environment, loads
/// the handler `args` name (the arguments a runtime started with its
/// function would have had after its own path) and writes `READY` again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionLoad {
    /// The handler, as the runtime's arguments.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub args: Vec<String>,
    /// Variables added to the runtime's environment before the import.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub env: Vec<(String, String)>,
    /// Files written into [`FUNCTION_DIR`] first.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub files_in: Vec<FileIn>,
    /// The code drive's guest device, as [`FunctionStart::code_drive`].
    pub code_drive: Option<String>,
    /// How long the runtime may take to load the handler and write
    /// `READY`, 1 to [`MAX_TIMEOUT_MS`].
    pub ready_timeout_ms: u64,
}

impl FunctionLoad {
    /// Checks what the agent would refuse; the message says why.
    pub fn validate(&self) -> Result<(), String> {
        let start = FunctionStart {
            argv: std::iter::once("runtime".to_owned())
                .chain(self.args.iter().cloned())
                .collect(),
            env: self.env.clone(),
            files_in: self.files_in.clone(),
            hot_path: false,
            ready_timeout_ms: self.ready_timeout_ms,
            code_drive: self.code_drive.clone(),
            wait_for_code: false,
        };
        start.validate()
    }
}

/// One event for the function runtime, delivered on its request pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionInvoke {
    /// The event's bytes (JSON text for the python runtime).
    #[serde(with = "bytes")]
    pub event: Vec<u8>,
    /// Wall-clock limit for the handler, 1 to [`MAX_TIMEOUT_MS`]; at the
    /// limit the runtime is killed and the result says `timed_out`.
    pub timeout_ms: u64,
    /// Most bytes of stdout and stderr together that are kept.
    pub max_output_bytes: u64,
}

impl FunctionInvoke {
    /// Checks what the agent would refuse; the message says why.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(format!(
                "timeout_ms {} is not in 1..={MAX_TIMEOUT_MS}",
                self.timeout_ms
            ));
        }
        Ok(())
    }
}

/// A guest buffer as the host sees it: guest-physical pages, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestBuffer {
    /// The buffer's length in bytes.
    pub len: u64,
    /// Where the buffer starts in its first page.
    pub first_page_offset: u64,
    /// Guest-physical address of each 4 KiB page the buffer covers.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub pages: Vec<u64>,
}

/// The hot-path buffers of a waiting runtime (see [`crate::hotpath`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotPathPages {
    /// The request buffer (host writes).
    pub request: GuestBuffer,
    /// The response buffer (runtime writes).
    pub response: GuestBuffer,
}

/// Sent first by the host after a snapshot restore, so that clones of one
/// snapshot neither share random state nor keep the snapshot's clock.
///
/// The agent adds the entropy to the kernel's pool (credited) and sets
/// `CLOCK_REALTIME`, then answers [`AgentMessage::Refreshed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refresh {
    /// Random bytes from the host, [`MIN_REFRESH_ENTROPY`] to
    /// [`MAX_REFRESH_ENTROPY`] of them.
    #[serde(with = "bytes")]
    pub entropy: Vec<u8>,
    /// The host's wall-clock time, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
}

impl Refresh {
    /// Checks what the agent would refuse; the message says why.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.entropy.len();
        if !(MIN_REFRESH_ENTROPY..=MAX_REFRESH_ENTROPY).contains(&n) {
            return Err(format!(
                "refresh: {n} entropy bytes, expected {MIN_REFRESH_ENTROPY} to {MAX_REFRESH_ENTROPY}"
            ));
        }
        Ok(())
    }
}

/// One command to run in the guest.
///
/// The agent runs `argv` as the unprivileged sandbox user, in a session,
/// process group and cgroup of its own, in a fresh work directory
/// `/tmp/inv-<n>`, with exactly `env` as its environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoke {
    /// Program and arguments. `argv[0]` without a `/` is looked up in
    /// `/bin:/usr/bin`; with one, it is a path (relative to the cwd).
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub argv: Vec<String>,
    /// The whole environment (nothing is inherited); keys without `=`.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub env: Vec<(String, String)>,
    /// Working directory: `None` is the work directory; a relative path is
    /// created inside the work directory; an absolute one is used as is.
    pub cwd: Option<String>,
    /// Bytes fed to the program's standard input, which is then closed.
    #[serde(with = "bytes")]
    pub stdin: Vec<u8>,
    /// Wall-clock limit from the start, 1 to [`MAX_TIMEOUT_MS`]. At the
    /// limit the whole invocation gets SIGTERM, then SIGKILL shortly after.
    pub timeout_ms: u64,
    /// Most bytes of stdout and stderr together that are forwarded; the rest
    /// is drained and dropped, and [`Exit::output_truncated`] is set.
    pub max_output_bytes: u64,
    /// Files written into the work directory before the start.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub files_in: Vec<FileIn>,
    /// Paths, relative to the work directory, read back after the exit
    /// (at most [`MAX_COLLECT_BYTES`] together) into [`Exit::files_out`].
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub collect: Vec<String>,
}

/// Default [`Invoke::timeout_ms`] of [`Invoke::new`]: 60 s.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// Default [`Invoke::max_output_bytes`] of [`Invoke::new`]: 16 MiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 16 << 20;

impl Invoke {
    /// An invocation of `argv` with no environment, no stdin, no files,
    /// [`DEFAULT_TIMEOUT_MS`] and [`DEFAULT_MAX_OUTPUT_BYTES`].
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Invoke {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            files_in: Vec::new(),
            collect: Vec::new(),
        }
    }

    /// Checks everything the agent would refuse before running anything;
    /// the message says what is wrong. Both sides call it: the host to fail
    /// early, the agent because the host is not trusted to have.
    pub fn validate(&self) -> Result<(), String> {
        check_count("argv", self.argv.len())?;
        check_count("env", self.env.len())?;
        check_count("files_in", self.files_in.len())?;
        check_count("collect", self.collect.len())?;
        match self.argv.first() {
            None => return Err("argv is empty".into()),
            Some(program) if program.is_empty() => return Err("argv[0] is empty".into()),
            Some(_) => {}
        }
        for (i, arg) in self.argv.iter().enumerate() {
            check_no_nul(&format_args!("argv[{i}]"), arg)?;
        }
        for (key, value) in &self.env {
            check_no_nul(&format_args!("env key {key:?}"), key)?;
            check_no_nul(&format_args!("env {key:?}"), value)?;
            if key.is_empty() || key.contains('=') {
                return Err(format!("env key {key:?} is empty or contains '='"));
            }
        }
        if let Some(cwd) = &self.cwd {
            check_no_nul(&"cwd", cwd)?;
            if cwd.is_empty() || cwd.len() > MAX_PATH_LEN {
                return Err("cwd is empty or too long".into());
            }
            if !cwd.starts_with('/') {
                check_relative_path("cwd", cwd)?;
            }
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(format!(
                "timeout_ms {} is not in 1..={MAX_TIMEOUT_MS}",
                self.timeout_ms
            ));
        }
        for file in &self.files_in {
            check_relative_path("files_in path", &file.path)?;
            if file.mode > 0o7777 {
                return Err(format!(
                    "files_in {:?}: mode {:#o} has bits beyond 0o7777",
                    file.path, file.mode
                ));
            }
        }
        for path in &self.collect {
            check_relative_path("collect path", path)?;
        }
        Ok(())
    }
}

fn check_count(what: &str, n: usize) -> Result<(), String> {
    if n > MAX_LIST_LEN {
        return Err(format!("{what} has {n} entries, over {MAX_LIST_LEN}"));
    }
    Ok(())
}

fn check_no_nul(what: &dyn fmt::Display, s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err(format!("{what} contains a NUL byte"));
    }
    Ok(())
}

/// A path inside the work directory: not empty, not absolute, no `..`
/// component, no NUL, at most [`MAX_PATH_LEN`] bytes.
fn check_relative_path(what: &str, path: &str) -> Result<(), String> {
    check_no_nul(&what, path)?;
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(format!("{what} {path:?} is empty or too long"));
    }
    if path.starts_with('/') {
        return Err(format!("{what} {path:?} must be relative to the work dir"));
    }
    if path.split('/').any(|component| component == "..") {
        return Err(format!("{what} {path:?} must not contain '..'"));
    }
    if path
        .split('/')
        .all(|component| component.is_empty() || component == ".")
    {
        return Err(format!("{what} {path:?} names the work dir itself"));
    }
    Ok(())
}

/// A file for [`Invoke::files_in`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileIn {
    /// Where, relative to the work directory; parent directories are made.
    pub path: String,
    /// Contents.
    #[serde(with = "bytes")]
    pub data: Vec<u8>,
    /// Permission bits (at most `0o7777`), e.g. `0o755` for a script.
    pub mode: u32,
}

/// A message from the agent to the host (frame kind [`FrameKind::Agent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message on every connection.
    Hello(Hello),
    /// Answer to [`HostMessage::Ping`].
    Pong(u64),
    /// Answer to [`HostMessage::Refresh`]: entropy added, clock set.
    Refreshed,
    /// A chunk (at most [`MAX_CHUNK`] bytes) of the invocation's stdout.
    Stdout(#[serde(with = "bytes")] Vec<u8>),
    /// A chunk (at most [`MAX_CHUNK`] bytes) of the invocation's stderr.
    Stderr(#[serde(with = "bytes")] Vec<u8>),
    /// The invocation ended; its last message.
    Exit(Exit),
    /// A request failed. After a malformed frame the agent closes the
    /// connection.
    Error(ErrorReply),
    /// Answer to [`HostMessage::FunctionStart`]: the runtime is ready.
    FunctionReady(FunctionReady),
    /// Answer to [`HostMessage::FunctionInvoke`] and
    /// [`HostMessage::FunctionCollect`].
    FunctionResult(FunctionResult),
}

/// A started function runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionReady {
    /// Its hot-path buffers, when it asked for the hot path and the agent
    /// could translate and check every page.
    pub hot_path: Option<HotPathPages>,
    /// Why there is no hot path although `hot_path` was asked for.
    pub hot_path_error: Option<String>,
    /// From the start to `READY`.
    pub startup_ms: u64,
    /// What it printed while starting (bounded).
    #[serde(with = "bytes")]
    pub stdout: Vec<u8>,
    /// Likewise for stderr.
    #[serde(with = "bytes")]
    pub stderr: Vec<u8>,
}

/// The outcome of one function event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionResult {
    /// How the handler's call ended; `None` when it gave no answer
    /// (timed out or the runtime died).
    pub status: Option<crate::hotpath::ResponseStatus>,
    /// The result (or the error object), as the runtime wrote it.
    #[serde(with = "bytes")]
    pub result: Vec<u8>,
    /// The handler's stdout: what the runtime captured plus what the
    /// process wrote to fd 1 meanwhile.
    #[serde(with = "bytes")]
    pub stdout: Vec<u8>,
    /// Likewise for stderr.
    #[serde(with = "bytes")]
    pub stderr: Vec<u8>,
    /// Output beyond the limit was dropped.
    pub output_truncated: bool,
    /// The handler ran past its time limit and the runtime was killed.
    pub timed_out: bool,
    /// The runtime process ended (it no longer serves events).
    pub runtime_exit: Option<ExitStatus>,
    /// Wall time of the call in the guest.
    pub wall_ms: u64,
}

/// What the agent says first on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`PROTOCOL_VERSION`].
    pub protocol_version: u8,
    /// The agent's crate version.
    pub agent_version: String,
}

impl Hello {
    /// This agent's greeting.
    pub fn current() -> Self {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exit {
    /// How the main process ended.
    pub status: ExitStatus,
    /// It was stopped at [`Invoke::timeout_ms`].
    pub timed_out: bool,
    /// Output beyond [`Invoke::max_output_bytes`] was dropped.
    pub output_truncated: bool,
    /// Resources used.
    pub usage: Usage,
    /// One entry per [`Invoke::collect`] path, in order.
    #[serde(deserialize_with = "bounded_list::deserialize")]
    pub files_out: Vec<FileOut>,
}

/// How the main process of an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// Resources an invocation used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// From the start to the main process's exit.
    pub wall_ms: u64,
    /// User CPU time of the main process and the children it waited for.
    pub cpu_user_ms: u64,
    /// System CPU time, likewise.
    pub cpu_sys_ms: u64,
    /// Peak memory: the larger of the cgroup's `memory.peak` and the
    /// largest resident set of a waited-for process.
    pub max_rss_kib: u64,
}

/// A file read back for [`Invoke::collect`]: `data` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileOut {
    /// The path as asked for.
    pub path: String,
    /// Contents, when it could be read.
    #[serde(with = "opt_bytes")]
    pub data: Option<Vec<u8>>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// Details for a person.
    pub message: String,
}

/// Kinds of [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Bad magic, unknown kind, undecodable or truncated payload.
    MalformedFrame,
    /// Another protocol version.
    UnsupportedVersion,
    /// Length over [`MAX_FRAME_LEN`].
    FrameTooLarge,
    /// A well-formed message the agent refuses (e.g. [`Invoke::validate`]).
    BadRequest,
    /// An invocation is already running.
    Busy,
    /// The invocation could not be started (files, directory, exec).
    SpawnFailed,
    /// The agent failed.
    Internal,
}

/// Appends one frame carrying `msg` to `out`. On error `out` is left as it
/// was.
pub fn encode_frame_into<M: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    kind: FrameKind,
    msg: &M,
) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let encoded = postcard::serialize_with_flavor(msg, AppendVec(out));
    let payload_len = out.len() - start - HEADER_LEN;
    let len = match (encoded, u32::try_from(payload_len)) {
        (Err(err), _) => {
            out.truncate(start);
            return Err(ProtocolError::Decode(format!("encode: {err}")));
        }
        (Ok(()), Ok(len)) if len <= MAX_FRAME_LEN => len,
        (Ok(()), _) => {
            out.truncate(start);
            return Err(ProtocolError::FrameTooLarge(
                u32::try_from(payload_len).unwrap_or(u32::MAX),
            ));
        }
    };
    let header = FrameHeader { kind, len }.encode();
    if let Some(slot) = out.get_mut(start..start + HEADER_LEN) {
        slot.copy_from_slice(&header);
    }
    Ok(())
}

/// One frame carrying `msg`, header included.
pub fn encode_frame<M: Serialize + ?Sized>(
    kind: FrameKind,
    msg: &M,
) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    encode_frame_into(&mut out, kind, msg)?;
    Ok(out)
}

/// Writes one frame carrying `msg` with a single `write_all`, so that this
/// side never splits a frame across two writes.
pub fn write_frame<W: Write, M: Serialize>(
    w: &mut W,
    kind: FrameKind,
    msg: &M,
) -> Result<(), ProtocolError> {
    let frame = encode_frame(kind, msg)?;
    w.write_all(&frame)?;
    Ok(())
}

/// Checks the header at the start of `buf`, if it is all there.
///
/// `Ok(None)`: fewer than [`HEADER_LEN`] bytes. A reader with its own
/// buffering uses this to learn how much room the frame needs before
/// reading the payload.
pub fn peek_header(buf: &[u8], expect: FrameKind) -> Result<Option<FrameHeader>, ProtocolError> {
    match buf.first_chunk::<HEADER_LEN>() {
        Some(header) => FrameHeader::parse(header, expect).map(Some),
        None => Ok(None),
    }
}

/// Decodes the frame at the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the message and how many bytes of `buf` the frame took.
///
/// The header is checked as soon as its 8 bytes are there, so a bad or
/// oversized frame is refused before its payload arrives.
pub fn decode_frame<M: DeserializeOwned>(
    buf: &[u8],
    expect: FrameKind,
) -> Result<Option<(M, usize)>, ProtocolError> {
    let Some(header) = peek_header(buf, expect)? else {
        return Ok(None);
    };
    let end = header.frame_len();
    match buf.get(HEADER_LEN..end) {
        Some(payload) => decode_payload(payload).map(|msg| Some((msg, end))),
        None => Ok(None),
    }
}

/// Decodes a payload that must hold exactly one message.
pub fn decode_payload<M: DeserializeOwned>(payload: &[u8]) -> Result<M, ProtocolError> {
    let (msg, rest) = postcard::take_from_bytes::<M>(payload)
        .map_err(|err| ProtocolError::Decode(err.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Decode(format!(
            "{} bytes left over after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Reads frames from a blocking byte stream.
#[derive(Debug)]
pub struct FrameReader<R: Read> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    /// Reads frames from `inner`. No buffering: a frame costs two reads or
    /// more (header, payload), so wrap `inner` in a `BufReader` when frames
    /// are small and many.
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// The stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The stream, mutably.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The stream back.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads one frame of kind `expect` and decodes it: `Ok(None)` on a
    /// clean end of stream before a frame's first byte.
    ///
    /// The payload buffer is allocated only after the header passed its
    /// checks, length limit included.
    pub fn read_frame<M: DeserializeOwned>(
        &mut self,
        expect: FrameKind,
    ) -> Result<Option<M>, ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        let mut filled = 0;
        while let Some(rest) = header.get_mut(filled..).filter(|rest| !rest.is_empty()) {
            match self.inner.read(rest) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(ProtocolError::Truncated),
                Ok(n) => filled += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err.into()),
            }
        }
        let header = FrameHeader::parse(&header, expect)?;
        let mut payload = vec![0u8; header.len as usize];
        self.inner.read_exact(&mut payload).map_err(|err| {
            if err.kind() == io::ErrorKind::UnexpectedEof {
                ProtocolError::Truncated
            } else {
                ProtocolError::Io(err)
            }
        })?;
        decode_payload(&payload).map(Some)
    }
}

/// A postcard output that appends to a borrowed `Vec`, so a frame is
/// encoded in place behind its header (no second copy of a large payload,
/// which in the guest would cost a page fault per 4 KiB).
struct AppendVec<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendVec<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// `Vec<u8>` as serde bytes: on the postcard wire the same as a sequence of
/// `u8` (a varint length, then the bytes), but encoded and decoded with one
/// copy instead of one serde call per byte.
/// Decodes a list of at most [`MAX_LIST_LEN`] entries: longer ones are
/// refused at the first entry over (or at once, from a claimed length),
/// before they take memory.
mod bounded_list {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    use super::MAX_LIST_LEN;

    pub(super) fn deserialize<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        d.deserialize_seq(ListVisitor(PhantomData))
    }

    struct ListVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {MAX_LIST_LEN} entries")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let claimed = seq.size_hint().unwrap_or(0);
            if claimed > MAX_LIST_LEN {
                return Err(A::Error::invalid_length(claimed, &self));
            }
            let mut out = Vec::with_capacity(claimed);
            while let Some(entry) = seq.next_element()? {
                if out.len() == MAX_LIST_LEN {
                    return Err(A::Error::invalid_length(MAX_LIST_LEN + 1, &self));
                }
                out.push(entry);
            }
            Ok(out)
        }
    }
}

mod bytes {
    use std::fmt;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    pub(super) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Formats that encode bytes as a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Capped like serde's own size hints: a hostile length must not
            // reserve memory the input does not back.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

/// `Option<Vec<u8>>` as optional serde bytes (see [`bytes`]).
mod opt_bytes {
    use std::fmt;

    use serde::de::Visitor;
    use serde::{Deserializer, Serialize, Serializer};

    struct Bytes<'a>(&'a [u8]);

    impl Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub(super) fn serialize<S: Serializer>(
        data: &Option<Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match data {
            Some(data) => s.serialize_some(&Bytes(data)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(OptVisitor)
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("optional bytes")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::bytes::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_invoke() -> Invoke {
        Invoke {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("PATH".into(), "/bin".into()), ("EMPTY".into(), "".into())],
            cwd: Some("sub/dir".into()),
            stdin: (0..=255).collect(),
            timeout_ms: 1500,
            max_output_bytes: 1 << 20,
            files_in: vec![FileIn {
                path: "a/b.txt".into(),
                data: b"contents".to_vec(),
                mode: 0o644,
            }],
            collect: vec!["out.txt".into(), "missing".into()],
        }
    }

    fn host_messages() -> Vec<HostMessage> {
        vec![
            HostMessage::Invoke(sample_invoke()),
            HostMessage::Invoke(Invoke::new(["true"])),
            HostMessage::Ping(0),
            HostMessage::Ping(u64::MAX),
            HostMessage::Refresh(Refresh {
                entropy: vec![7; 32],
                unix_time_ns: 1_700_000_000_123_456_789,
            }),
        ]
    }

    fn agent_messages() -> Vec<AgentMessage> {
        vec![
            AgentMessage::Hello(Hello::current()),
            AgentMessage::Pong(42),
            AgentMessage::Refreshed,
            AgentMessage::Stdout(b"out".to_vec()),
            AgentMessage::Stdout(Vec::new()),
            AgentMessage::Stderr(vec![0xff; MAX_CHUNK]),
            AgentMessage::Exit(Exit {
                status: ExitStatus::Code(7),
                timed_out: false,
                output_truncated: true,
                usage: Usage {
                    wall_ms: 1,
                    cpu_user_ms: 2,
                    cpu_sys_ms: 3,
                    max_rss_kib: 4,
                },
                files_out: vec![
                    FileOut {
                        path: "out.txt".into(),
                        data: Some(b"x".to_vec()),
                        error: None,
                    },
                    FileOut {
                        path: "empty".into(),
                        data: Some(Vec::new()),
                        error: None,
                    },
                    FileOut {
                        path: "missing".into(),
                        data: None,
                        error: Some("No such file".into()),
                    },
                ],
            }),
            AgentMessage::Exit(Exit {
                status: ExitStatus::Signal(9),
                timed_out: true,
                output_truncated: false,
                usage: Usage::default(),
                files_out: Vec::new(),
            }),
            AgentMessage::Error(ErrorReply {
                kind: ErrorKind::Busy,
                message: "busy".into(),
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in host_messages() {
            let frame = encode_frame(FrameKind::Host, &msg).unwrap();
            let (back, used) = decode_frame::<HostMessage>(&frame, FrameKind::Host)
                .unwrap()
                .unwrap();
            assert_eq!(back, msg);
            assert_eq!(used, frame.len());
            let mut reader = FrameReader::new(&frame[..]);
            assert_eq!(
                reader.read_frame::<HostMessage>(FrameKind::Host).unwrap(),
                Some(msg)
            );
            assert!(reader
                .read_frame::<HostMessage>(FrameKind::Host)
                .unwrap()
                .is_none());
        }
        for msg in agent_messages() {
            let mut frame = Vec::new();
            write_frame(&mut frame, FrameKind::Agent, &msg).unwrap();
            let mut reader = FrameReader::new(&frame[..]);
            assert_eq!(
                reader.read_frame::<AgentMessage>(FrameKind::Agent).unwrap(),
                Some(msg)
            );
        }
        for kind in [
            ErrorKind::MalformedFrame,
            ErrorKind::UnsupportedVersion,
            ErrorKind::FrameTooLarge,
            ErrorKind::BadRequest,
            ErrorKind::Busy,
            ErrorKind::SpawnFailed,
            ErrorKind::Internal,
        ] {
            let msg = AgentMessage::Error(ErrorReply {
                kind,
                message: String::new(),
            });
            let frame = encode_frame(FrameKind::Agent, &msg).unwrap();
            assert_eq!(
                decode_frame::<AgentMessage>(&frame, FrameKind::Agent).unwrap(),
                Some((msg, frame.len()))
            );
        }
    }

    #[test]
    fn bytes_fields_match_plain_sequence_encoding() {
        // The `bytes` helpers must not change the wire format: postcard
        // encodes a Vec<u8> as a varint length and the raw bytes either way.
        #[derive(Serialize)]
        enum Plain {
            _A,
            _B,
            _C,
            Stdout(Vec<u8>),
        }
        let data: Vec<u8> = (0..300).map(|i| i as u8).collect();
        assert_eq!(
            postcard::to_allocvec(&AgentMessage::Stdout(data.clone())).unwrap(),
            postcard::to_allocvec(&Plain::Stdout(data)).unwrap()
        );
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let msgs = host_messages();
        let mut stream = Vec::new();
        for msg in &msgs {
            encode_frame_into(&mut stream, FrameKind::Host, msg).unwrap();
        }
        for split in 0..=stream.len() {
            // Feed the stream in two pieces, as a non-blocking reader would
            // see it, and decode whatever is complete after each.
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for piece in [&stream[..split], &stream[split..]] {
                buf.extend_from_slice(piece);
                while let Some((msg, used)) =
                    decode_frame::<HostMessage>(&buf, FrameKind::Host).unwrap()
                {
                    got.push(msg);
                    buf.drain(..used);
                }
            }
            assert_eq!(got, msgs, "split at {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn every_proper_prefix_needs_more() {
        let frame = encode_frame(FrameKind::Host, &HostMessage::Invoke(sample_invoke())).unwrap();
        for end in 0..frame.len() {
            assert!(decode_frame::<HostMessage>(&frame[..end], FrameKind::Host)
                .unwrap()
                .is_none());
        }
    }

    /// A reader that fails the test if asked for more than `limit` bytes at
    /// once: proves no buffer was sized from an unchecked length.
    struct Stingy<'a> {
        data: &'a [u8],
        limit: usize,
    }

    impl Read for Stingy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(buf.len() <= self.limit, "asked for {} bytes", buf.len());
            self.data.read(buf)
        }
    }

    #[test]
    fn oversized_length_rejected_before_allocation() {
        let mut header = FrameHeader {
            kind: FrameKind::Host,
            len: 0,
        }
        .encode();
        header[4..].copy_from_slice(&(MAX_FRAME_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode_frame::<HostMessage>(&header, FrameKind::Host),
            Err(ProtocolError::FrameTooLarge(n)) if n == MAX_FRAME_LEN + 1
        ));
        header[4..].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut reader = FrameReader::new(Stingy {
            data: &header,
            limit: HEADER_LEN,
        });
        assert!(matches!(
            reader.read_frame::<HostMessage>(FrameKind::Host),
            Err(ProtocolError::FrameTooLarge(u32::MAX))
        ));
        assert_eq!(
            ProtocolError::FrameTooLarge(1).error_kind(),
            ErrorKind::FrameTooLarge
        );
        // Exactly the limit is allowed through the header check.
        header[4..].copy_from_slice(&MAX_FRAME_LEN.to_le_bytes());
        assert!(matches!(
            decode_frame::<HostMessage>(&header, FrameKind::Host),
            Ok(None)
        ));
    }

    #[test]
    fn bad_magic_version_and_kind() {
        let good = encode_frame(FrameKind::Host, &HostMessage::Ping(1)).unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_frame::<HostMessage>(&bad, FrameKind::Host),
            Err(ProtocolError::BadMagic)
        ));
        // Refused as soon as the first bytes are there, before a full header.
        assert!(matches!(
            decode_frame::<HostMessage>(&bad[..8], FrameKind::Host),
            Err(ProtocolError::BadMagic)
        ));
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(matches!(
            decode_frame::<HostMessage>(&bad, FrameKind::Host),
            Err(ProtocolError::UnsupportedVersion(2))
        ));
        for kind in [0u8, 2, 3, 255] {
            let mut bad = good.clone();
            bad[3] = kind;
            assert!(matches!(
                decode_frame::<HostMessage>(&bad, FrameKind::Host),
                Err(ProtocolError::UnexpectedKind)
            ));
        }
        assert!(matches!(
            FrameReader::new(&good[..]).read_frame::<AgentMessage>(FrameKind::Agent),
            Err(ProtocolError::UnexpectedKind)
        ));
    }

    #[test]
    fn truncated_payload() {
        let frame = encode_frame(FrameKind::Agent, &AgentMessage::Stdout(vec![1; 100])).unwrap();
        for end in 1..frame.len() {
            let mut reader = FrameReader::new(&frame[..end]);
            assert!(
                matches!(
                    reader.read_frame::<AgentMessage>(FrameKind::Agent),
                    Err(ProtocolError::Truncated)
                ),
                "cut at {end}"
            );
        }
        assert!(FrameReader::new(&[][..])
            .read_frame::<AgentMessage>(FrameKind::Agent)
            .unwrap()
            .is_none());
    }

    fn frame_with_payload(payload: &[u8]) -> Vec<u8> {
        let mut frame = FrameHeader {
            kind: FrameKind::Host,
            len: payload.len() as u32,
        }
        .encode()
        .to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn garbage_payload() {
        // Unknown enum variant, empty payload, lengths past the end, and
        // bytes left over after a valid message.
        let mut trailing = postcard::to_allocvec(&HostMessage::Ping(3)).unwrap();
        trailing.push(0);
        for payload in [
            &[9u8][..],
            &[][..],
            &[0, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
            &[2, 0x20][..],
            &trailing[..],
        ] {
            let frame = frame_with_payload(payload);
            assert!(
                matches!(
                    decode_frame::<HostMessage>(&frame, FrameKind::Host),
                    Err(ProtocolError::Decode(_))
                ),
                "{payload:?}"
            );
            assert!(matches!(
                FrameReader::new(&frame[..]).read_frame::<HostMessage>(FrameKind::Host),
                Err(ProtocolError::Decode(_))
            ));
        }
        // Pseudo-random payloads must never panic, whatever they decode to.
        let mut state = 0x1234_5678_9abc_def0u64;
        for len in 0..2000 {
            let payload: Vec<u8> = (0..len % 97)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode_frame::<HostMessage>(&frame_with_payload(&payload), FrameKind::Host);
        }
        assert_eq!(
            ProtocolError::Decode(String::new()).error_kind(),
            ErrorKind::MalformedFrame
        );
    }

    #[test]
    fn huge_inner_length_does_not_allocate_it() {
        // A Vec<String> claiming 2^60 entries inside a tiny frame: must fail
        // cleanly (and quickly) rather than reserve memory for them.
        let mut payload = vec![0u8]; // HostMessage::Invoke
        payload.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        assert!(matches!(
            decode_frame::<HostMessage>(&frame_with_payload(&payload), FrameKind::Host),
            Err(ProtocolError::Decode(_))
        ));
    }

    #[test]
    fn long_lists_refused_while_decoding() {
        // An Exit of MAX_LIST_LEN + 1 empty FileOuts: 3 bytes each on the
        // wire, 72 in memory. Refused rather than decoded (a frame full of
        // them used to take ~49 times its size in memory).
        let exit = |n| {
            AgentMessage::Exit(Exit {
                status: ExitStatus::Code(0),
                timed_out: false,
                output_truncated: false,
                usage: Usage::default(),
                files_out: vec![
                    FileOut {
                        path: String::new(),
                        data: None,
                        error: None,
                    };
                    n
                ],
            })
        };
        let ok = encode_frame(FrameKind::Agent, &exit(MAX_LIST_LEN)).unwrap();
        assert_eq!(
            decode_frame::<AgentMessage>(&ok, FrameKind::Agent).unwrap(),
            Some((exit(MAX_LIST_LEN), ok.len()))
        );
        let long = encode_frame(FrameKind::Agent, &exit(MAX_LIST_LEN + 1)).unwrap();
        assert!(matches!(
            decode_frame::<AgentMessage>(&long, FrameKind::Agent),
            Err(ProtocolError::Decode(_))
        ));
        // The same for each list of an Invoke.
        type Grow = Box<dyn Fn(&mut Invoke)>;
        let grow: Vec<Grow> = vec![
            Box::new(|i| i.argv = vec!["x".into(); MAX_LIST_LEN + 1]),
            Box::new(|i| i.env = vec![("K".into(), String::new()); MAX_LIST_LEN + 1]),
            Box::new(|i| i.collect = vec!["x".into(); MAX_LIST_LEN + 1]),
            Box::new(|i| {
                i.files_in = vec![
                    FileIn {
                        path: "x".into(),
                        data: Vec::new(),
                        mode: 0,
                    };
                    MAX_LIST_LEN + 1
                ]
            }),
        ];
        for grow in grow {
            let mut invoke = sample_invoke();
            grow(&mut invoke);
            let frame = encode_frame(FrameKind::Host, &HostMessage::Invoke(invoke)).unwrap();
            assert!(matches!(
                decode_frame::<HostMessage>(&frame, FrameKind::Host),
                Err(ProtocolError::Decode(_))
            ));
        }
        // A claimed length over the limit is refused too.
        let mut payload = vec![0u8]; // HostMessage::Invoke
        payload.extend_from_slice(&[0x81, 0x20]); // argv: 4097 entries
        assert!(matches!(
            decode_frame::<HostMessage>(&frame_with_payload(&payload), FrameKind::Host),
            Err(ProtocolError::Decode(_))
        ));
    }

    #[test]
    fn too_large_to_encode() {
        let msg = AgentMessage::Stdout(vec![0; MAX_FRAME_LEN as usize]);
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode_frame_into(&mut out, FrameKind::Agent, &msg),
            Err(ProtocolError::FrameTooLarge(_))
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn invoke_validation() {
        assert_eq!(sample_invoke().validate(), Ok(()));
        assert_eq!(Invoke::new(["true"]).validate(), Ok(()));
        type Change = Box<dyn Fn(&mut Invoke)>;
        let bad: Vec<(&str, Change)> = vec![
            ("empty argv", Box::new(|i| i.argv.clear())),
            ("empty argv0", Box::new(|i| i.argv[0].clear())),
            ("nul argv", Box::new(|i| i.argv.push("a\0b".into()))),
            (
                "nul env",
                Box::new(|i| i.env.push(("K".into(), "\0".into()))),
            ),
            (
                "= in key",
                Box::new(|i| i.env.push(("K=V".into(), "".into()))),
            ),
            (
                "empty key",
                Box::new(|i| i.env.push(("".into(), "".into()))),
            ),
            ("timeout 0", Box::new(|i| i.timeout_ms = 0)),
            (
                "timeout big",
                Box::new(|i| i.timeout_ms = MAX_TIMEOUT_MS + 1),
            ),
            ("cwd ..", Box::new(|i| i.cwd = Some("a/../..".into()))),
            ("cwd empty", Box::new(|i| i.cwd = Some("".into()))),
            ("cwd nul", Box::new(|i| i.cwd = Some("/a\0".into()))),
            (
                "abs file",
                Box::new(|i| i.files_in[0].path = "/etc/x".into()),
            ),
            (
                "dotdot file",
                Box::new(|i| i.files_in[0].path = "../x".into()),
            ),
            ("dot file", Box::new(|i| i.files_in[0].path = "./".into())),
            ("mode", Box::new(|i| i.files_in[0].mode = 0o10000)),
            (
                "abs collect",
                Box::new(|i| i.collect.push("/etc/passwd".into())),
            ),
            (
                "collect ..",
                Box::new(|i| i.collect.push("a/../../x".into())),
            ),
            ("collect nul", Box::new(|i| i.collect.push("a\0".into()))),
            (
                "too many env",
                Box::new(|i| i.env = vec![("K".into(), "V".into()); MAX_LIST_LEN + 1]),
            ),
            (
                "too many collect",
                Box::new(|i| i.collect = vec!["x".into(); MAX_LIST_LEN + 1]),
            ),
            (
                "long path",
                Box::new(|i| i.collect.push("x".repeat(MAX_PATH_LEN + 1))),
            ),
        ];
        for (what, change) in bad {
            let mut invoke = sample_invoke();
            change(&mut invoke);
            assert!(invoke.validate().is_err(), "{what} passed validation");
        }
        let mut ok = sample_invoke();
        ok.cwd = Some("/var/x".into());
        ok.collect.push("a/./b..c/..d".into());
        ok.timeout_ms = MAX_TIMEOUT_MS;
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn refresh_validation() {
        let refresh = |n| Refresh {
            entropy: vec![0; n],
            unix_time_ns: 0,
        };
        assert!(refresh(31).validate().is_err());
        assert!(refresh(32).validate().is_ok());
        assert!(refresh(256).validate().is_ok());
        assert!(refresh(257).validate().is_err());
    }

    #[test]
    fn header_layout() {
        let header = FrameHeader {
            kind: FrameKind::Agent,
            len: 0x0102_0304,
        };
        assert_eq!(header.encode(), [b'E', b'M', 1, 2, 4, 3, 2, 1]);
        assert_eq!(
            FrameHeader::parse(&header.encode(), FrameKind::Agent).unwrap(),
            header
        );
    }
}
