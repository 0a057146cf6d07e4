//! The runtime pipe protocol: how the agent and a function runtime talk.
//!
//! A function runtime (see [`function`](crate::function)) is any program
//! that speaks this protocol on two pipes the agent gives it: it reads
//! requests on **fd 3** and writes answers on **fd 4**. Its stdin is
//! `/dev/null`; whatever it writes to fds 1 and 2 is drained by the agent
//! and added to the next answer's stdout and stderr. Every message is one
//! text header line and a binary body whose length the header gives, so
//! any language can be a runtime:
//!
//! ```text
//! runtime -> agent, fd 4:
//!   READY <n>\n    + n bytes of JSON, once, when the runtime is ready:
//!                    {} or
//!                    {"hot_path": {"request":  {"addr": A, "len": L},
//!                                  "response": {"addr": A, "len": L}}}
//!   RESULT <status> <result_len> <stdout_len> <stderr_len>\n
//!                  + result + stdout + stderr, once per event
//!                    (status: json | bytes | error)
//! agent -> runtime, fd 3:
//!   EVENT <n> <timeout_ms>\n + n bytes of event
//! ```
//!
//! A header line is at most [`MAX_HEADER_LEN`] bytes, newline included:
//! printable ASCII, one space between fields, numbers in decimal digits
//! only. `A` and `L` in `READY` are the virtual address and the length in
//! bytes of the runtime's hot-path buffers (see [`crate::hotpath`]), each
//! touched and `mlock`ed so that every page is present; `L` is at most
//! [`hotpath::MAX_BUFFER_BYTES`]. Other keys in the JSON are ignored. The
//! `stdout` and `stderr` sections of a `RESULT` are what the runtime
//! captured of the handler's output itself; `status` is as in
//! [`ResponseStatus::from_word`].
//!
//! The runtime runs user code and is not trusted: the agent checks every
//! header and length before it allocates or reads a body, and a runtime
//! that breaks the protocol (an unknown or malformed header, a line over
//! [`MAX_HEADER_LEN`], a length over the limits below, `READY` twice, a
//! `RESULT` for an event it did not finish reading, a second unasked-for
//! `RESULT`) is killed.
//!
//! A runtime started with the hot path may also write a `RESULT` without
//! having read an `EVENT`: it got the event from memory, and the response
//! did not fit its buffer. The agent keeps it until the host asks for it
//! ([`HostMessage::FunctionCollect`](crate::protocol::HostMessage::FunctionCollect)).

use std::io;
use std::os::fd::RawFd;

use thiserror::Error;

use crate::hotpath::{self, ResponseStatus};
use crate::sys;

/// Longest header line, newline included.
pub(crate) const MAX_HEADER_LEN: usize = 128;

/// Largest `READY` body.
pub(crate) const MAX_READY_BYTES: u64 = 4096;

/// Largest `RESULT` result section: with the kept output it must fit one
/// frame ([`crate::protocol::MAX_FRAME_LEN`], 32 MiB).
pub(crate) const MAX_RESULT_BYTES: u64 = 24 << 20;

/// Largest `RESULT` stdout or stderr section a runtime may announce; what
/// is kept of it is bounded separately (the rest is read and dropped).
pub(crate) const MAX_SECTION_BYTES: u64 = 64 << 20;

/// Bytes read from a pipe at once into the scratch buffer (headers, small
/// bodies, dropped bytes). Only the pages a read fills are ever touched.
pub(crate) const READ_SIZE: usize = 64 * 1024;

/// Largest direct read into a body section.
const DIRECT_READ: usize = 1 << 20;

/// Nesting limit of the `READY` JSON.
const MAX_JSON_DEPTH: usize = 16;

/// What the runtime did wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum PipeError {
    #[error("header line longer than {MAX_HEADER_LEN} bytes: {0}")]
    LongLine(String),
    #[error("malformed header line {0}")]
    Malformed(String),
    #[error("unknown message {0}")]
    Unknown(String),
    #[error("{what} of {len} bytes is over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("READY JSON: {0}")]
    Json(String),
}

/// A parsed header line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    Ready {
        len: u64,
    },
    Result {
        status: ResponseStatus,
        result_len: u64,
        stdout_len: u64,
        stderr_len: u64,
    },
}

/// Parses one header line, without its newline, checking the limits.
pub(crate) fn parse_header(line: &[u8]) -> Result<Header, PipeError> {
    let malformed = || PipeError::Malformed(quote(line));
    if line.len() >= MAX_HEADER_LEN {
        return Err(PipeError::LongLine(quote(line)));
    }
    if !line.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        return Err(malformed());
    }
    // Printable ASCII: valid UTF-8.
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let fields: Vec<&str> = text.split(' ').collect();
    if fields.iter().any(|field| field.is_empty()) {
        return Err(malformed());
    }
    let number = |field: &str| parse_decimal(field).ok_or_else(malformed);
    match fields.as_slice() {
        ["READY", len] => {
            let len = limit("READY body", number(len)?, MAX_READY_BYTES)?;
            Ok(Header::Ready { len })
        }
        ["RESULT", status, result, stdout, stderr] => {
            let status = ResponseStatus::from_word(status).ok_or_else(malformed)?;
            Ok(Header::Result {
                status,
                result_len: limit("result", number(result)?, MAX_RESULT_BYTES)?,
                stdout_len: limit("stdout section", number(stdout)?, MAX_SECTION_BYTES)?,
                stderr_len: limit("stderr section", number(stderr)?, MAX_SECTION_BYTES)?,
            })
        }
        ["READY" | "RESULT", ..] => Err(malformed()),
        [word, ..] => Err(PipeError::Unknown(quote(word.as_bytes()))),
        [] => Err(malformed()),
    }
}

fn limit(what: &'static str, len: u64, limit: u64) -> Result<u64, PipeError> {
    if len > limit {
        return Err(PipeError::TooLarge { what, len, limit });
    }
    Ok(len)
}

/// A decimal number: 1 to 20 ASCII digits, no sign, no overflow.
fn parse_decimal(field: &str) -> Option<u64> {
    if field.is_empty() || field.len() > 20 || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

/// Up to 64 bytes of what the runtime wrote, quoted and escaped, for a
/// message.
fn quote(bytes: &[u8]) -> String {
    let shown = bytes.get(..64).unwrap_or(bytes);
    let mut text = format!("\"{}\"", shown.escape_ascii());
    if shown.len() < bytes.len() {
        text.push_str("...");
    }
    text
}

/// The `EVENT` header for an event of `len` bytes.
pub(crate) fn event_header(len: usize, timeout_ms: u64) -> Vec<u8> {
    format!("EVENT {len} {timeout_ms}\n").into_bytes()
}

/// The `LOAD` message for a waiting runtime: its header and its JSON body
/// `{"args": [...], "env": [[name, value], ...]}` (see
/// [`FunctionLoad`](crate::protocol::FunctionLoad)).
pub(crate) fn load_message(args: &[String], env: &[(String, String)]) -> (Vec<u8>, Vec<u8>) {
    let mut body = String::from("{\"args\":[");
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        json_string(&mut body, arg);
    }
    body.push_str("],\"env\":[");
    for (i, (name, value)) in env.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push('[');
        json_string(&mut body, name);
        body.push(',');
        json_string(&mut body, value);
        body.push(']');
    }
    body.push_str("]}");
    (
        format!("LOAD {}\n", body.len()).into_bytes(),
        body.into_bytes(),
    )
}

/// Appends `text` as a JSON string (UTF-8 passes through; quotes,
/// backslashes and control characters are escaped).
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One buffer a runtime announced in `READY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufferInfo {
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

/// What `READY` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ReadyInfo {
    /// (request, response), if the runtime announced hot-path buffers.
    pub(crate) hot_path: Option<(BufferInfo, BufferInfo)>,
}

/// A `RESULT`, with the output sections cut to what was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuntimeResult {
    pub(crate) status: ResponseStatus,
    pub(crate) result: Vec<u8>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    /// Some of the stdout or stderr section was dropped.
    pub(crate) truncated: bool,
}

/// A complete message from the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Ready(ReadyInfo),
    Result(RuntimeResult),
}

/// The body being read.
enum Body {
    Ready {
        data: Vec<u8>,
        left: usize,
    },
    Result {
        status: ResponseStatus,
        /// Result, stdout, stderr.
        sections: [Vec<u8>; 3],
        /// Bytes still to come of each section.
        left: [u64; 3],
        /// Bytes still to keep of each section (the result is kept whole).
        keep: [u64; 3],
        truncated: bool,
    },
}

/// What one [`ResponseReader::read_from`] found.
#[derive(Debug, Default)]
pub(crate) struct ReadOutcome {
    /// Complete messages, in order.
    pub(crate) messages: Vec<Message>,
    /// The runtime's end is closed.
    pub(crate) eof: bool,
}

/// Reads and checks what a runtime writes on its response pipe, in pieces
/// as they come (the pipe is non-blocking and read from the event loop).
pub(crate) struct ResponseReader {
    /// The header line so far (without its newline).
    line: Vec<u8>,
    body: Option<Body>,
}

impl ResponseReader {
    pub(crate) fn new() -> Self {
        ResponseReader {
            line: Vec::new(),
            body: None,
        }
    }

    /// Whether the reader is between messages.
    pub(crate) fn is_idle(&self) -> bool {
        self.line.is_empty() && self.body.is_none()
    }

    /// Takes bytes from the pipe up to the end of one message. `keep` is
    /// how many bytes of a `RESULT`'s stdout and stderr sections together
    /// to keep, should this start one. Returns how many bytes were used
    /// and the message, if one is complete; the caller feeds the rest
    /// again.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        keep: u64,
    ) -> Result<(usize, Option<Message>), PipeError> {
        let mut used = 0;
        if self.body.is_none() {
            let room = MAX_HEADER_LEN - 1 - self.line.len().min(MAX_HEADER_LEN - 1);
            // Look one byte past the room: the newline may be there.
            let window = data.get(..(room + 1).min(data.len())).unwrap_or(data);
            match window.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.line
                        .extend_from_slice(window.get(..end).unwrap_or_default());
                    used = end + 1;
                    let header = parse_header(&self.line);
                    self.line.clear();
                    self.body = Some(Body::new(header?, keep));
                }
                None if self.line.len() + data.len() > MAX_HEADER_LEN - 1 => {
                    self.line.extend_from_slice(window);
                    return Err(PipeError::LongLine(quote(&self.line)));
                }
                None => {
                    self.line.extend_from_slice(data);
                    return Ok((data.len(), None));
                }
            }
        }
        let rest = data.get(used..).unwrap_or_default();
        let Some(body) = &mut self.body else {
            return Ok((used, None));
        };
        used += body.take(rest);
        if body.is_complete() {
            if let Some(body) = self.body.take() {
                return Ok((used, Some(body.finish()?)));
            }
        }
        Ok((used, None))
    }

    /// Reads what the pipe has (non-blocking `fd`), as long as reads come
    /// back full and no message is complete: a short read means the pipe
    /// was emptied, and a complete message is for the caller to act on
    /// before more is read. Large kept sections are read straight into
    /// their buffers; the rest goes through `scratch`.
    pub(crate) fn read_from(
        &mut self,
        fd: RawFd,
        scratch: &mut Vec<u8>,
        keep: u64,
    ) -> Result<ReadOutcome, ReadError> {
        let mut outcome = ReadOutcome::default();
        loop {
            let direct = self.body.as_ref().and_then(Body::direct);
            let (n, asked) = match (direct, self.body.as_mut()) {
                (Some((index, want)), Some(body)) => {
                    let want = want.min(DIRECT_READ);
                    (body.read_direct(fd, index, want)?, want)
                }
                _ => {
                    scratch.clear();
                    let n = read_append(fd, scratch, READ_SIZE)?;
                    let mut data = scratch.get(..n.unwrap_or(0)).unwrap_or_default();
                    while !data.is_empty() {
                        let (used, message) = self.feed(data, keep)?;
                        data = data.get(used..).unwrap_or_default();
                        outcome.messages.extend(message);
                    }
                    (n, READ_SIZE)
                }
            };
            match n {
                None => break,
                Some(0) => {
                    outcome.eof = true;
                    break;
                }
                Some(n) => {
                    if self.body.as_ref().is_some_and(Body::is_complete) {
                        if let Some(body) = self.body.take() {
                            outcome.messages.push(body.finish()?);
                        }
                    }
                    if n < asked || !outcome.messages.is_empty() {
                        break;
                    }
                }
            }
        }
        Ok(outcome)
    }
}

/// Reading the response pipe failed.
#[derive(Debug, Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Protocol(#[from] PipeError),
    #[error("read: {0}")]
    Io(#[from] io::Error),
}

/// One `read` of up to `want` bytes appended to `buf`: `None` when the
/// pipe is empty.
pub(crate) fn read_append(fd: RawFd, buf: &mut Vec<u8>, want: usize) -> io::Result<Option<usize>> {
    buf.reserve(want);
    let spare = buf.spare_capacity_mut();
    let want = want.min(spare.len());
    loop {
        // SAFETY: `spare` is writable for at least `want` bytes; the kernel
        // initialises the first `n`, which set_len then covers.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), want) };
        if n < 0 {
            match sys::errno() {
                libc::EINTR => continue,
                libc::EAGAIN => return Ok(None),
                _ => return Err(sys::last_error()),
            }
        }
        let n = n.unsigned_abs();
        let len = buf.len() + n;
        // SAFETY: see above.
        unsafe { buf.set_len(len) };
        return Ok(Some(n));
    }
}

impl Body {
    fn new(header: Header, keep: u64) -> Body {
        match header {
            Header::Ready { len } => {
                // Checked against MAX_READY_BYTES: small.
                let len = usize::try_from(len).unwrap_or(0);
                Body::Ready {
                    data: Vec::with_capacity(len),
                    left: len,
                }
            }
            Header::Result {
                status,
                result_len,
                stdout_len,
                stderr_len,
            } => {
                let keep_out = stdout_len.min(keep);
                let keep_err = stderr_len.min(keep - keep_out);
                let cap = |n: u64| Vec::with_capacity(usize::try_from(n).unwrap_or(0));
                Body::Result {
                    status,
                    // Checked against the limits: capacity is reserved, not
                    // touched, until the bytes come.
                    sections: [cap(result_len), cap(keep_out), cap(keep_err)],
                    left: [result_len, stdout_len, stderr_len],
                    keep: [result_len, keep_out, keep_err],
                    truncated: keep_out < stdout_len || keep_err < stderr_len,
                }
            }
        }
    }

    /// Takes what belongs to this body from `data`; returns how much.
    fn take(&mut self, data: &[u8]) -> usize {
        match self {
            Body::Ready { data: body, left } => {
                let n = (*left).min(data.len());
                body.extend_from_slice(data.get(..n).unwrap_or_default());
                *left -= n;
                n
            }
            Body::Result {
                sections,
                left,
                keep,
                ..
            } => {
                let mut used = 0;
                for ((section, left), keep) in sections.iter_mut().zip(left).zip(keep) {
                    let rest = data.get(used..).unwrap_or_default();
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(rest.len());
                    let kept = usize::try_from(*keep).unwrap_or(usize::MAX).min(n);
                    section.extend_from_slice(rest.get(..kept).unwrap_or_default());
                    *left -= n as u64;
                    *keep -= kept as u64;
                    used += n;
                }
                used
            }
        }
    }

    fn is_complete(&self) -> bool {
        match self {
            Body::Ready { left, .. } => *left == 0,
            Body::Result { left, .. } => left.iter().all(|&n| n == 0),
        }
    }

    /// Whether to read straight into a section: the current one, when all
    /// that is left of it is to be kept and it is large enough to be worth
    /// reads of its own. Returns the section and the bytes left of it.
    fn direct(&self) -> Option<(usize, usize)> {
        let Body::Result { left, keep, .. } = self else {
            return None;
        };
        let index = left.iter().position(|&n| n > 0)?;
        let (left, keep) = (*left.get(index)?, *keep.get(index)?);
        if left != keep || left < READ_SIZE as u64 {
            return None;
        }
        Some((index, usize::try_from(left).ok()?))
    }

    /// One read of up to `want` bytes of section `index` (see
    /// [`direct`](Self::direct)) straight into it.
    fn read_direct(&mut self, fd: RawFd, index: usize, want: usize) -> io::Result<Option<usize>> {
        let Body::Result {
            sections,
            left,
            keep,
            ..
        } = self
        else {
            return Ok(None);
        };
        let (Some(section), Some(left), Some(keep)) = (
            sections.get_mut(index),
            left.get_mut(index),
            keep.get_mut(index),
        ) else {
            return Ok(None);
        };
        let want = want.min(usize::try_from(*left).unwrap_or(usize::MAX));
        let n = read_append(fd, section, want)?;
        let got = n.unwrap_or(0) as u64;
        *left -= got;
        *keep -= got;
        Ok(n)
    }

    fn finish(self) -> Result<Message, PipeError> {
        match self {
            Body::Ready { data, .. } => parse_ready(&data).map(Message::Ready),
            Body::Result {
                status,
                sections: [result, stdout, stderr],
                truncated,
                ..
            } => Ok(Message::Result(RuntimeResult {
                status,
                result,
                stdout,
                stderr,
                truncated,
            })),
        }
    }
}

/// Parses `READY`'s JSON: an object, with `hot_path` absent, `null`, or
/// two buffers. Other keys are ignored.
pub(crate) fn parse_ready(body: &[u8]) -> Result<ReadyInfo, PipeError> {
    let value = json::parse(body).map_err(PipeError::Json)?;
    let json::Value::Object(fields) = value else {
        return Err(PipeError::Json("not an object".into()));
    };
    let hot_path = match json::get(&fields, "hot_path") {
        None | Some(json::Value::Null) => None,
        Some(json::Value::Object(hot)) => {
            let buffer = |name: &str| -> Result<BufferInfo, PipeError> {
                let bad = || PipeError::Json(format!("hot_path.{name} needs addr and len"));
                let json::Value::Object(buf) = json::get(hot, name).ok_or_else(bad)? else {
                    return Err(bad());
                };
                let number = |key: &str| match json::get(buf, key) {
                    Some(json::Value::Unsigned(n)) => Ok(*n),
                    _ => Err(bad()),
                };
                Ok(BufferInfo {
                    addr: number("addr")?,
                    len: number("len")?,
                })
            };
            Some((buffer("request")?, buffer("response")?))
        }
        Some(_) => return Err(PipeError::Json("hot_path is not an object".into())),
    };
    Ok(ReadyInfo { hot_path })
}

/// Just enough JSON for `READY`: the whole grammar, numbers kept only when
/// they are unsigned integers.
mod json {
    use super::MAX_JSON_DEPTH;

    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Value {
        Null,
        Bool(bool),
        /// A non-negative integer that fits a u64.
        Unsigned(u64),
        /// Any other number.
        OtherNumber,
        String(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    /// The last value of `key` (as most parsers do with duplicates).
    pub(super) fn get<'a>(fields: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
        fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub(super) fn parse(text: &[u8]) -> Result<Value, String> {
        let mut parser = Parser { text, at: 0 };
        let value = parser.value(0)?;
        parser.skip_ws();
        if parser.at != text.len() {
            return Err(format!("trailing bytes at offset {}", parser.at));
        }
        Ok(value)
    }

    struct Parser<'a> {
        text: &'a [u8],
        at: usize,
    }

    impl Parser<'_> {
        fn peek(&self) -> Option<u8> {
            self.text.get(self.at).copied()
        }

        fn bump(&mut self) -> Option<u8> {
            let b = self.peek()?;
            self.at += 1;
            Some(b)
        }

        fn skip_ws(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.at += 1;
            }
        }

        fn error(&self, what: &str) -> String {
            format!("{what} at offset {}", self.at)
        }

        fn expect(&mut self, word: &[u8]) -> Result<(), String> {
            let end = self.at + word.len();
            if self.text.get(self.at..end) != Some(word) {
                return Err(self.error("unexpected token"));
            }
            self.at = end;
            Ok(())
        }

        fn value(&mut self, depth: usize) -> Result<Value, String> {
            if depth > MAX_JSON_DEPTH {
                return Err(self.error("nested too deeply"));
            }
            self.skip_ws();
            match self.peek() {
                Some(b'{') => self.object(depth),
                Some(b'[') => self.array(depth),
                Some(b'"') => self.string().map(Value::String),
                Some(b't') => self.expect(b"true").map(|()| Value::Bool(true)),
                Some(b'f') => self.expect(b"false").map(|()| Value::Bool(false)),
                Some(b'n') => self.expect(b"null").map(|()| Value::Null),
                Some(b'-' | b'0'..=b'9') => self.number(),
                _ => Err(self.error("expected a value")),
            }
        }

        fn object(&mut self, depth: usize) -> Result<Value, String> {
            self.at += 1;
            let mut fields = Vec::new();
            self.skip_ws();
            if self.peek() == Some(b'}') {
                self.at += 1;
                return Ok(Value::Object(fields));
            }
            loop {
                self.skip_ws();
                if self.peek() != Some(b'"') {
                    return Err(self.error("expected a key"));
                }
                let key = self.string()?;
                self.skip_ws();
                if self.bump() != Some(b':') {
                    return Err(self.error("expected ':'"));
                }
                let value = self.value(depth + 1)?;
                fields.push((key, value));
                self.skip_ws();
                match self.bump() {
                    Some(b',') => continue,
                    Some(b'}') => return Ok(Value::Object(fields)),
                    _ => return Err(self.error("expected ',' or '}'")),
                }
            }
        }

        fn array(&mut self, depth: usize) -> Result<Value, String> {
            self.at += 1;
            let mut items = Vec::new();
            self.skip_ws();
            if self.peek() == Some(b']') {
                self.at += 1;
                return Ok(Value::Array(items));
            }
            loop {
                items.push(self.value(depth + 1)?);
                self.skip_ws();
                match self.bump() {
                    Some(b',') => continue,
                    Some(b']') => return Ok(Value::Array(items)),
                    _ => return Err(self.error("expected ',' or ']'")),
                }
            }
        }

        fn string(&mut self) -> Result<String, String> {
            self.at += 1;
            let mut out = String::new();
            loop {
                let start = self.at;
                while matches!(self.peek(), Some(b) if b != b'"' && b != b'\\' && b >= 0x20) {
                    self.at += 1;
                }
                let run = self.text.get(start..self.at).unwrap_or_default();
                out.push_str(std::str::from_utf8(run).map_err(|_| self.error("invalid UTF-8"))?);
                match self.bump() {
                    Some(b'"') => return Ok(out),
                    Some(b'\\') => {
                        let c = match self.bump() {
                            Some(b'"') => '"',
                            Some(b'\\') => '\\',
                            Some(b'/') => '/',
                            Some(b'b') => '\u{8}',
                            Some(b'f') => '\u{c}',
                            Some(b'n') => '\n',
                            Some(b'r') => '\r',
                            Some(b't') => '\t',
                            Some(b'u') => self.unicode_escape()?,
                            _ => return Err(self.error("bad escape")),
                        };
                        out.push(c);
                    }
                    _ => return Err(self.error("unterminated string")),
                }
            }
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let digits = self
                .text
                .get(self.at..self.at + 4)
                .ok_or_else(|| self.error("short \\u escape"))?;
            let text = std::str::from_utf8(digits).map_err(|_| self.error("bad \\u escape"))?;
            if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.error("bad \\u escape"));
            }
            self.at += 4;
            u32::from_str_radix(text, 16).map_err(|_| self.error("bad \\u escape"))
        }

        fn unicode_escape(&mut self) -> Result<char, String> {
            let first = self.hex4()?;
            let code = if (0xd800..0xdc00).contains(&first) {
                self.expect(b"\\u")?;
                let second = self.hex4()?;
                if !(0xdc00..0xe000).contains(&second) {
                    return Err(self.error("unpaired surrogate"));
                }
                0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
            } else {
                first
            };
            char::from_u32(code).ok_or_else(|| self.error("unpaired surrogate"))
        }

        fn number(&mut self) -> Result<Value, String> {
            let negative = self.peek() == Some(b'-');
            if negative {
                self.at += 1;
            }
            let int_start = self.at;
            match self.peek() {
                Some(b'0') => self.at += 1,
                Some(b'1'..=b'9') => {
                    while matches!(self.peek(), Some(b'0'..=b'9')) {
                        self.at += 1;
                    }
                }
                _ => return Err(self.error("bad number")),
            }
            let int_end = self.at;
            let mut integer = true;
            if self.peek() == Some(b'.') {
                integer = false;
                self.at += 1;
                self.digits()?;
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                integer = false;
                self.at += 1;
                if matches!(self.peek(), Some(b'+' | b'-')) {
                    self.at += 1;
                }
                self.digits()?;
            }
            if negative || !integer {
                return Ok(Value::OtherNumber);
            }
            let digits = self.text.get(int_start..int_end).unwrap_or_default();
            Ok(std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
                .map_or(Value::OtherNumber, Value::Unsigned))
        }

        fn digits(&mut self) -> Result<(), String> {
            let start = self.at;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.at += 1;
            }
            if self.at == start {
                return Err(self.error("bad number"));
            }
            Ok(())
        }
    }
}

/// Checks a hot-path buffer the runtime announced, before its pages are
/// looked up.
pub(crate) fn check_buffer(name: &str, buffer: BufferInfo) -> Result<(), String> {
    let min = match name {
        "request" => hotpath::REQUEST_HEADER_LEN,
        _ => hotpath::RESPONSE_HEADER_LEN,
    } as u64;
    if buffer.len < min || buffer.len > hotpath::MAX_BUFFER_BYTES as u64 {
        return Err(format!(
            "the {name} buffer is {} bytes, not {min} to {}",
            buffer.len,
            hotpath::MAX_BUFFER_BYTES
        ));
    }
    if buffer.addr.checked_add(buffer.len).is_none() {
        return Err(format!("the {name} buffer wraps around the address space"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn load_message_is_json_with_its_length() {
        let args = ["a \"b\"\\c\n".to_owned(), "h\u{e9}".to_owned()];
        let env = [("K".to_owned(), "v\u{1}".to_owned())];
        let (header, body) = super::load_message(&args, &env);
        let body = String::from_utf8(body).unwrap();
        assert_eq!(
            body,
            r#"{"args":["a \"b\"\\c\u000a","hé"],"env":[["K","v\u0001"]]}"#
        );
        assert_eq!(header, format!("LOAD {}\n", body.len()).into_bytes());
    }

    use super::*;
    use std::os::fd::AsRawFd;

    fn result_header(status: ResponseStatus, r: u64, o: u64, e: u64) -> Header {
        Header::Result {
            status,
            result_len: r,
            stdout_len: o,
            stderr_len: e,
        }
    }

    #[test]
    fn good_headers() {
        assert_eq!(parse_header(b"READY 2"), Ok(Header::Ready { len: 2 }));
        assert_eq!(
            parse_header(b"RESULT json 5 0 12"),
            Ok(result_header(ResponseStatus::Json, 5, 0, 12))
        );
        assert_eq!(
            parse_header(b"RESULT bytes 0 0 0"),
            Ok(result_header(ResponseStatus::Bytes, 0, 0, 0))
        );
        assert_eq!(
            parse_header(b"RESULT error 007 1 1"),
            Ok(result_header(ResponseStatus::Error, 7, 1, 1))
        );
        assert_eq!(event_header(12, 3000), b"EVENT 12 3000\n");
    }

    #[test]
    fn garbage_headers() {
        for line in [
            &b""[..],
            b"READY",
            b"READY  2",
            b" READY 2",
            b"READY 2 ",
            b"READY -2",
            b"READY +2",
            b"READY 0x10",
            b"READY 2 3",
            b"READY 2\r",
            b"READY\t2",
            b"RESULT pipe 1 2 3",
            b"RESULT json 1 2",
            b"RESULT json 1 2 3 4",
            b"RESULT json a 2 3",
            b"RESULT json 1 2 99999999999999999999999",
            b"RESULT json 1 2 \xff",
        ] {
            assert!(
                matches!(parse_header(line), Err(PipeError::Malformed(_))),
                "{:?}: {:?}",
                line.escape_ascii().to_string(),
                parse_header(line)
            );
        }
        assert!(matches!(
            parse_header(b"HELLO 1"),
            Err(PipeError::Unknown(_))
        ));
        assert!(matches!(
            parse_header(b"ready 2"),
            Err(PipeError::Unknown(_))
        ));
        assert!(matches!(
            parse_header(b"READY 4097"),
            Err(PipeError::TooLarge { len: 4097, .. })
        ));
        assert!(matches!(
            parse_header(format!("RESULT json {} 0 0", MAX_RESULT_BYTES + 1).as_bytes()),
            Err(PipeError::TooLarge { what: "result", .. })
        ));
        assert!(matches!(
            parse_header(format!("RESULT json 0 {} 0", MAX_SECTION_BYTES + 1).as_bytes()),
            Err(PipeError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_header(format!("RESULT json 0 0 {}", u64::MAX).as_bytes()),
            Err(PipeError::TooLarge { .. })
        ));
    }

    /// Feeds `stream` in pieces of `piece` bytes; returns the messages.
    fn feed_all(stream: &[u8], piece: usize, keep: u64) -> Result<Vec<Message>, PipeError> {
        let mut reader = ResponseReader::new();
        let mut messages = Vec::new();
        for chunk in stream.chunks(piece.max(1)) {
            let mut data = chunk;
            while !data.is_empty() {
                let (used, message) = reader.feed(data, keep)?;
                assert!(used > 0 || message.is_some());
                data = &data[used..];
                messages.extend(message);
            }
        }
        assert!(reader.is_idle());
        Ok(messages)
    }

    fn result(status: ResponseStatus, r: &[u8], o: &[u8], e: &[u8]) -> Message {
        Message::Result(RuntimeResult {
            status,
            result: r.to_vec(),
            stdout: o.to_vec(),
            stderr: e.to_vec(),
            truncated: false,
        })
    }

    #[test]
    fn messages_split_at_every_boundary() {
        let mut stream = b"READY 2\n{}RESULT json 4 3 2\n\"ok\"outerRESULT bytes 0 0 0\n".to_vec();
        stream.extend_from_slice(b"RESULT error 2 0 1\n{}\n");
        let expected = vec![
            Message::Ready(ReadyInfo::default()),
            result(ResponseStatus::Json, b"\"ok\"", b"out", b"er"),
            result(ResponseStatus::Bytes, b"", b"", b""),
            result(ResponseStatus::Error, b"{}", b"", b"\n"),
        ];
        for piece in 1..=stream.len() {
            assert_eq!(feed_all(&stream, piece, 100).unwrap(), expected, "{piece}");
        }
    }

    #[test]
    fn output_sections_are_cut_to_the_budget() {
        let stream = b"RESULT json 1 5 5\nxOOOOOEEEEE";
        for piece in 1..stream.len() {
            let messages = feed_all(stream, piece, 7).unwrap();
            assert_eq!(
                messages,
                vec![Message::Result(RuntimeResult {
                    status: ResponseStatus::Json,
                    result: b"x".to_vec(),
                    stdout: b"OOOOO".to_vec(),
                    stderr: b"EE".to_vec(),
                    truncated: true,
                })]
            );
        }
        let messages = feed_all(stream, 4, 0).unwrap();
        assert!(matches!(&messages[0], Message::Result(r) if r.stdout.is_empty() && r.truncated));
    }

    #[test]
    fn long_and_bad_lines_are_refused_early() {
        // 127 bytes and a newline: the longest line allowed, parsed (and
        // refused for its 111-digit number, not for its length).
        let mut ok = b"RESULT json 0 0 ".to_vec();
        ok.resize(127, b'0');
        ok.push(b'\n');
        for piece in [1, 5, 128] {
            assert!(matches!(
                feed_all(&ok, piece, 0),
                Err(PipeError::Malformed(_))
            ));
        }
        // One more byte, whatever the pieces: refused without waiting for
        // the newline (which may never come).
        let mut long = b"RESULT json 0 0 ".to_vec();
        long.resize(128, b'0');
        for piece in [1, 7, 128, 200] {
            assert!(
                matches!(feed_all(&long, piece, 0), Err(PipeError::LongLine(_))),
                "{piece}"
            );
        }
        let mut endless = vec![b'A'; 100_000];
        endless.push(b'\n');
        assert!(matches!(
            feed_all(&endless, 4096, 0),
            Err(PipeError::LongLine(_))
        ));
        assert!(matches!(
            feed_all(b"BOGUS\n", 1, 0),
            Err(PipeError::Unknown(_))
        ));
        assert!(matches!(
            feed_all(b"READY 5\n{oops", 3, 0),
            Err(PipeError::Json(_))
        ));
    }

    #[test]
    fn ready_json() {
        assert_eq!(parse_ready(b"{}"), Ok(ReadyInfo::default()));
        assert_eq!(
            parse_ready(
                b" {\"hot_path\": null, \"x\": [1, -2.5e3, \"\\u00e9\\ud83d\\ude00\", true, {}]}\n"
            ),
            Ok(ReadyInfo::default())
        );
        let text =
            br#"{"version": 1, "hot_path": {"request": {"addr": 140000000000, "len": 262144},
            "response": {"len": 4096, "addr": 8192}}}"#;
        assert_eq!(
            parse_ready(text),
            Ok(ReadyInfo {
                hot_path: Some((
                    BufferInfo {
                        addr: 140_000_000_000,
                        len: 262_144
                    },
                    BufferInfo {
                        addr: 8192,
                        len: 4096
                    }
                ))
            })
        );
        for bad in [
            &b""[..],
            b"[]",
            b"{",
            b"{}{}",
            b"{\"a\" 1}",
            b"{\"a\": 01}",
            b"{\"a\": \"\\x\"}",
            b"{\"a\": \"\\ud800\"}",
            b"{\"a\": tru}",
            b"{\"a\": \"\x01\"}",
            b"{\"hot_path\": 1}",
            b"{\"hot_path\": {\"request\": {\"addr\": 1, \"len\": 2}}}",
            br#"{"hot_path": {"request": {"addr": -1, "len": 2}, "response": {"addr": 1, "len": 2}}}"#,
            br#"{"hot_path": {"request": {"addr": 1.5, "len": 2}, "response": {"addr": 1, "len": 2}}}"#,
            br#"{"hot_path": {"request": {"addr": 18446744073709551616, "len": 2}, "response": {"addr": 1, "len": 2}}}"#,
        ] {
            assert!(
                parse_ready(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_ready(deep.as_bytes()).is_err());
    }

    #[test]
    fn buffer_checks() {
        let buf = |addr, len| BufferInfo { addr, len };
        assert!(check_buffer("request", buf(4096, 64)).is_ok());
        assert!(check_buffer("request", buf(4096, 63)).is_err());
        assert!(check_buffer("response", buf(0, hotpath::MAX_BUFFER_BYTES as u64)).is_ok());
        assert!(check_buffer("response", buf(0, hotpath::MAX_BUFFER_BYTES as u64 + 1)).is_err());
        assert!(check_buffer("response", buf(u64::MAX - 10, 64)).is_err());
    }

    #[test]
    fn reads_from_a_pipe_in_pieces() {
        let (r, w) = sys::pipe().unwrap();
        sys::set_nonblocking(r.as_raw_fd()).unwrap();
        let mut reader = ResponseReader::new();
        let mut scratch = Vec::new();
        // Nothing there yet.
        let outcome = reader
            .read_from(r.as_raw_fd(), &mut scratch, 1 << 20)
            .unwrap();
        assert!(outcome.messages.is_empty() && !outcome.eof);

        // A result large enough to be read straight into its section,
        // written from another thread while the pipe is read.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut stream = format!("RESULT bytes {} 3 0\n", big.len()).into_bytes();
        stream.extend_from_slice(&big);
        stream.extend_from_slice(b"outREADY 2\n{}");
        let writer = std::thread::spawn(move || {
            sys::write_all(w.as_raw_fd(), &stream).unwrap();
        });
        let mut messages = Vec::new();
        let mut eof = false;
        while !eof {
            let mut fds = [libc::pollfd {
                fd: r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll(2) on one pollfd in `fds`, which lives for the
            // call.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
            let outcome = reader
                .read_from(r.as_raw_fd(), &mut scratch, 1 << 20)
                .unwrap();
            messages.extend(outcome.messages);
            eof = outcome.eof;
        }
        writer.join().unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(
            messages[0],
            result(ResponseStatus::Bytes, &big, b"out", b"")
        );
        assert_eq!(messages[1], Message::Ready(ReadyInfo::default()));
    }
}
