//! The hot path of a function invocation: how the host and a function's
//! waiting runtime exchange one request and one response through guest
//! memory, with no guest-kernel work at all.
//!
//! At template time the runtime allocates two buffers (request and
//! response), touches and locks every page, and tells the agent their
//! addresses; the agent translates them to guest-physical pages
//! ([`crate::protocol::HotPathPages`]) for the host. The runtime then rings
//! [`DOORBELL_WAITING`] and spins in user mode until the request's `seq`
//! changes. The host snapshots the VM stopped at that ring.
//!
//! The doorbell is the page of guest-physical address space at
//! [`DOORBELL_ADDR`], which has no RAM and no device behind it: a 32-bit
//! store to it from user mode exits straight to the VMM, no guest kernel
//! involved. The agent hands the runtime `/dev/mem` (which only root may
//! open) as fd [`DOORBELL_FD`]; the runtime maps that one page from it.
//! (User-mode port I/O through `ioperm` would do the same on hardware KVM,
//! but the emulated-kernel PVM hosts ember is tested on fault it.)
//!
//! On invoke, the host writes the event and then the request header (`seq`
//! last) into the clone's memory before its vCPU first runs. The runtime
//! sees the new `seq`, runs the handler, writes the response (header, then
//! result, stdout and stderr), and rings [`DOORBELL_DONE`], which exits
//! straight to the VMM. The host reads the response from guest memory and
//! destroys the clone.
//!
//! Events larger than the request buffer are announced with
//! [`REQUEST_FLAG_VIA_PIPE`] and delivered by the agent over vsock and the
//! runtime's request pipe; results larger than the response buffer come
//! back with [`ResponseStatus::ViaPipe`] and are fetched from the agent
//! ([`crate::protocol::HostMessage::FunctionCollect`]).
//!
//! All integers are little-endian. Everything the runtime writes is
//! untrusted by the host: [`ResponseHeader::decode`] and
//! [`decode_response`] check every length against the buffer.

use thiserror::Error;

/// Guest-physical address of the doorbell page (the start of the 32-bit
/// MMIO gap, where nothing else lives); a runtime writes 32-bit values to
/// its first word.
pub const DOORBELL_ADDR: u64 = 0xc000_0000;
/// The descriptor a hot-path runtime gets `/dev/mem` on, to map the
/// doorbell page.
pub const DOORBELL_FD: i32 = 5;
/// Doorbell value: the runtime is about to wait for a request.
pub const DOORBELL_WAITING: u32 = 1;
/// Doorbell value: the response for the current request is written.
pub const DOORBELL_DONE: u32 = 2;

/// First word of a request header: `EMRQ`.
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"EMRQ");
/// First word of a response header: `EMRS`.
pub const RESPONSE_MAGIC: u32 = u32::from_le_bytes(*b"EMRS");
/// The version of this layout.
pub const LAYOUT_VERSION: u32 = 1;

/// Bytes of the request header; the event follows it.
pub const REQUEST_HEADER_LEN: usize = 64;
/// Bytes of the response header; result, stdout and stderr follow it.
pub const RESPONSE_HEADER_LEN: usize = 64;
/// Host entropy bytes carried by every request (the runtime reseeds its
/// user-space generators with them).
pub const REQUEST_ENTROPY_LEN: usize = 24;

/// Default size of each hot-path buffer a runtime allocates: 256 KiB.
pub const DEFAULT_BUFFER_BYTES: usize = 256 << 10;
/// Largest buffer the host accepts from a template (per direction).
pub const MAX_BUFFER_BYTES: usize = 16 << 20;

/// Request flag: the event is not in the buffer; read it from the request
/// pipe (the agent delivers it) and answer on the response pipe.
pub const REQUEST_FLAG_VIA_PIPE: u32 = 1;
/// Request flag: do not call the handler; answer at once with status
/// [`ResponseStatus::Json`] and the result `null` (the template's warm-up
/// round when no warm-up event is given).
pub const REQUEST_FLAG_PING: u32 = 2;

/// Response flag: the handler's stdout was cut to fit.
pub const RESPONSE_FLAG_STDOUT_TRUNCATED: u32 = 1;
/// Response flag: the handler's stderr was cut to fit.
pub const RESPONSE_FLAG_STDERR_TRUNCATED: u32 = 2;

/// Errors decoding what a runtime wrote.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// The buffer is shorter than a header.
    #[error("hot-path buffer of {0} bytes is shorter than its header")]
    Short(usize),
    /// The header does not start with the expected magic.
    #[error("hot-path header has bad magic {0:#010x}")]
    BadMagic(u32),
    /// Another layout version.
    #[error("hot-path layout version {0}, expected {LAYOUT_VERSION}")]
    Version(u32),
    /// An unknown response status.
    #[error("unknown hot-path response status {0}")]
    Status(u32),
    /// The header's lengths do not fit in the buffer.
    #[error("hot-path lengths ({0} bytes) exceed the {1}-byte buffer")]
    Lengths(u64, usize),
    /// The response answers another request.
    #[error("hot-path response is for request {got}, expected {expected}")]
    Sequence {
        /// The request the host sent.
        expected: u64,
        /// The request the response names.
        got: u64,
    },
}

/// The header at the start of the request buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Request number; the runtime waits until it differs from the last
    /// one it served. Never 0 for a real request. Written last.
    pub seq: u64,
    /// [`REQUEST_FLAG_VIA_PIPE`] or 0.
    pub flags: u32,
    /// Bytes of event after the header (0 when via the pipe).
    pub event_len: u32,
    /// The invocation's time limit, for the handler's context.
    pub timeout_ms: u32,
    /// The host's wall-clock time at the request, ns since the Unix epoch.
    pub unix_time_ns: u64,
    /// Fresh host entropy.
    pub entropy: [u8; REQUEST_ENTROPY_LEN],
}

// Request header offsets.
const RQ_MAGIC: usize = 0;
const RQ_VERSION: usize = 4;
const RQ_SEQ: usize = 8;
const RQ_FLAGS: usize = 16;
const RQ_EVENT_LEN: usize = 20;
const RQ_TIMEOUT: usize = 24;
const RQ_TIME: usize = 32;
const RQ_ENTROPY: usize = 40;

impl RequestHeader {
    /// The header's bytes, `seq` included; hosts write `seq` last with
    /// [`RequestHeader::SEQ_OFFSET`].
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        put_u32(&mut out, RQ_MAGIC, REQUEST_MAGIC);
        put_u32(&mut out, RQ_VERSION, LAYOUT_VERSION);
        put_u64(&mut out, RQ_SEQ, self.seq);
        put_u32(&mut out, RQ_FLAGS, self.flags);
        put_u32(&mut out, RQ_EVENT_LEN, self.event_len);
        put_u32(&mut out, RQ_TIMEOUT, self.timeout_ms);
        put_u64(&mut out, RQ_TIME, self.unix_time_ns);
        if let Some(slot) = out.get_mut(RQ_ENTROPY..RQ_ENTROPY + REQUEST_ENTROPY_LEN) {
            slot.copy_from_slice(&self.entropy);
        }
        out
    }

    /// Where `seq` lives in the header (the host's last write).
    pub const SEQ_OFFSET: usize = RQ_SEQ;

    /// Reads a header (as a runtime written in Rust would).
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        let header = buf
            .get(..REQUEST_HEADER_LEN)
            .ok_or(LayoutError::Short(buf.len()))?;
        check_magic(header, REQUEST_MAGIC)?;
        let mut entropy = [0u8; REQUEST_ENTROPY_LEN];
        if let Some(bytes) = header.get(RQ_ENTROPY..RQ_ENTROPY + REQUEST_ENTROPY_LEN) {
            entropy.copy_from_slice(bytes);
        }
        let request = RequestHeader {
            seq: get_u64(header, RQ_SEQ),
            flags: get_u32(header, RQ_FLAGS),
            event_len: get_u32(header, RQ_EVENT_LEN),
            timeout_ms: get_u32(header, RQ_TIMEOUT),
            unix_time_ns: get_u64(header, RQ_TIME),
            entropy,
        };
        let total = REQUEST_HEADER_LEN as u64 + u64::from(request.event_len);
        if total > buf.len() as u64 {
            return Err(LayoutError::Lengths(total, buf.len()));
        }
        Ok(request)
    }
}

/// How a handler's call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResponseStatus {
    /// The result is JSON text.
    Json,
    /// The result is raw bytes.
    Bytes,
    /// The handler failed; the result is a JSON object with `type`,
    /// `message` and `traceback`.
    Error,
    /// The response did not fit: the runtime sent it on its response pipe;
    /// the host fetches it from the agent.
    ViaPipe,
}

impl ResponseStatus {
    /// The status's number in the response header.
    pub fn code(self) -> u32 {
        match self {
            ResponseStatus::Json => 0,
            ResponseStatus::Bytes => 1,
            ResponseStatus::Error => 2,
            ResponseStatus::ViaPipe => 3,
        }
    }

    /// The status for a header number.
    pub fn from_code(code: u32) -> Result<Self, LayoutError> {
        Ok(match code {
            0 => ResponseStatus::Json,
            1 => ResponseStatus::Bytes,
            2 => ResponseStatus::Error,
            3 => ResponseStatus::ViaPipe,
            other => return Err(LayoutError::Status(other)),
        })
    }

    /// The word used for this status on the runtime pipes.
    pub fn word(self) -> &'static str {
        match self {
            ResponseStatus::Json => "json",
            ResponseStatus::Bytes => "bytes",
            ResponseStatus::Error => "error",
            ResponseStatus::ViaPipe => "pipe",
        }
    }

    /// The status named by a pipe word (`pipe` is not valid on a pipe).
    pub fn from_word(word: &str) -> Option<Self> {
        match word {
            "json" => Some(ResponseStatus::Json),
            "bytes" => Some(ResponseStatus::Bytes),
            "error" => Some(ResponseStatus::Error),
            _ => None,
        }
    }
}

/// The header at the start of the response buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// The request this answers.
    pub seq: u64,
    /// How the call ended.
    pub status: ResponseStatus,
    /// Bytes of result after the header.
    pub result_len: u32,
    /// Bytes of captured stdout after the result.
    pub stdout_len: u32,
    /// Bytes of captured stderr after the stdout.
    pub stderr_len: u32,
    /// `RESPONSE_FLAG_*` bits.
    pub flags: u32,
    /// How long the handler ran, in nanoseconds, as the runtime measured
    /// it (0: not measured).
    pub handler_ns: u64,
}

// Response header offsets.
const RS_MAGIC: usize = 0;
const RS_VERSION: usize = 4;
const RS_SEQ: usize = 8;
const RS_STATUS: usize = 16;
const RS_RESULT_LEN: usize = 20;
const RS_STDOUT_LEN: usize = 24;
const RS_STDERR_LEN: usize = 28;
const RS_FLAGS: usize = 32;
const RS_HANDLER_NS: usize = 40;

impl ResponseHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut out = [0u8; RESPONSE_HEADER_LEN];
        put_u32(&mut out, RS_MAGIC, RESPONSE_MAGIC);
        put_u32(&mut out, RS_VERSION, LAYOUT_VERSION);
        put_u64(&mut out, RS_SEQ, self.seq);
        put_u32(&mut out, RS_STATUS, self.status.code());
        put_u32(&mut out, RS_RESULT_LEN, self.result_len);
        put_u32(&mut out, RS_STDOUT_LEN, self.stdout_len);
        put_u32(&mut out, RS_STDERR_LEN, self.stderr_len);
        put_u32(&mut out, RS_FLAGS, self.flags);
        put_u64(&mut out, RS_HANDLER_NS, self.handler_ns);
        out
    }

    /// Reads and checks a header against a buffer of `buf_len` bytes.
    pub fn decode(header: &[u8], buf_len: usize) -> Result<Self, LayoutError> {
        let header = header
            .get(..RESPONSE_HEADER_LEN)
            .ok_or(LayoutError::Short(header.len()))?;
        check_magic(header, RESPONSE_MAGIC)?;
        let response = ResponseHeader {
            seq: get_u64(header, RS_SEQ),
            status: ResponseStatus::from_code(get_u32(header, RS_STATUS))?,
            result_len: get_u32(header, RS_RESULT_LEN),
            stdout_len: get_u32(header, RS_STDOUT_LEN),
            stderr_len: get_u32(header, RS_STDERR_LEN),
            flags: get_u32(header, RS_FLAGS),
            handler_ns: get_u64(header, RS_HANDLER_NS),
        };
        let total = response.total_len();
        if total > buf_len as u64 {
            return Err(LayoutError::Lengths(total, buf_len));
        }
        Ok(response)
    }

    /// Header plus sections, in bytes.
    pub fn total_len(&self) -> u64 {
        RESPONSE_HEADER_LEN as u64
            + u64::from(self.result_len)
            + u64::from(self.stdout_len)
            + u64::from(self.stderr_len)
    }
}

/// A decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The header.
    pub header: ResponseHeader,
    /// The handler's result (or error object).
    pub result: Vec<u8>,
    /// What the handler printed to stdout.
    pub stdout: Vec<u8>,
    /// What the handler printed to stderr.
    pub stderr: Vec<u8>,
}

/// Decodes a whole response buffer (header and sections) and checks that
/// it answers request `seq`.
pub fn decode_response(buf: &[u8], seq: u64) -> Result<Response, LayoutError> {
    let header = ResponseHeader::decode(buf, buf.len())?;
    if header.seq != seq {
        return Err(LayoutError::Sequence {
            expected: seq,
            got: header.seq,
        });
    }
    // Lengths were checked against the buffer, so these ranges are in it.
    let mut at = RESPONSE_HEADER_LEN;
    let mut take = |len: u32| {
        let len = len as usize;
        let part = buf
            .get(at..at + len)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        at += len;
        part
    };
    let result = take(header.result_len);
    let stdout = take(header.stdout_len);
    let stderr = take(header.stderr_len);
    Ok(Response {
        header,
        result,
        stdout,
        stderr,
    })
}

/// Encodes a whole response (as a runtime written in Rust would).
pub fn encode_response(
    seq: u64,
    status: ResponseStatus,
    result: &[u8],
    stdout: &[u8],
    stderr: &[u8],
) -> Vec<u8> {
    let header = ResponseHeader {
        seq,
        status,
        result_len: len_u32(result),
        stdout_len: len_u32(stdout),
        stderr_len: len_u32(stderr),
        flags: 0,
        handler_ns: 0,
    };
    let mut out = Vec::with_capacity(header.total_len() as usize);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(result);
    out.extend_from_slice(stdout);
    out.extend_from_slice(stderr);
    out
}

fn len_u32(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

fn check_magic(header: &[u8], magic: u32) -> Result<(), LayoutError> {
    let got = get_u32(header, 0);
    if got != magic {
        return Err(LayoutError::BadMagic(got));
    }
    let version = get_u32(header, 4);
    if version != LAYOUT_VERSION {
        return Err(LayoutError::Version(version));
    }
    Ok(())
}

// Callers pass offsets inside a fixed-size header.
fn put_u32(out: &mut [u8], at: usize, value: u32) {
    if let Some(slot) = out.get_mut(at..at + 4) {
        slot.copy_from_slice(&value.to_le_bytes());
    }
}

fn put_u64(out: &mut [u8], at: usize, value: u64) {
    if let Some(slot) = out.get_mut(at..at + 8) {
        slot.copy_from_slice(&value.to_le_bytes());
    }
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(slot) = buf.get(at..at + 4) {
        word.copy_from_slice(slot);
    }
    u32::from_le_bytes(word)
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    if let Some(slot) = buf.get(at..at + 8) {
        word.copy_from_slice(slot);
    }
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let header = RequestHeader {
            seq: 7,
            flags: REQUEST_FLAG_VIA_PIPE,
            event_len: 3,
            timeout_ms: 1000,
            unix_time_ns: 1_700_000_000_000_000_000,
            entropy: [9; REQUEST_ENTROPY_LEN],
        };
        let mut buf = header.encode().to_vec();
        buf.extend_from_slice(b"abc");
        assert_eq!(RequestHeader::decode(&buf).unwrap(), header);
        assert_eq!(
            u64::from_le_bytes(buf[RequestHeader::SEQ_OFFSET..][..8].try_into().unwrap()),
            7
        );
        buf.truncate(REQUEST_HEADER_LEN + 2);
        assert_eq!(
            RequestHeader::decode(&buf),
            Err(LayoutError::Lengths(67, 66))
        );
    }

    #[test]
    fn response_round_trip_and_checks() {
        let mut buf = encode_response(5, ResponseStatus::Json, b"{}", b"out", b"");
        let response = decode_response(&buf, 5).unwrap();
        assert_eq!(response.result, b"{}");
        assert_eq!(response.stdout, b"out");
        assert!(response.stderr.is_empty());
        assert_eq!(
            decode_response(&buf, 6),
            Err(LayoutError::Sequence {
                expected: 6,
                got: 5
            })
        );
        // Lengths past the buffer are refused, not read.
        buf[RS_STDERR_LEN..RS_STDERR_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_response(&buf, 5),
            Err(LayoutError::Lengths(..))
        ));
        buf[RS_STATUS] = 9;
        assert_eq!(decode_response(&buf, 5), Err(LayoutError::Status(9)));
        buf[0] = 0;
        assert!(matches!(
            decode_response(&buf, 5),
            Err(LayoutError::BadMagic(_))
        ));
        assert_eq!(decode_response(&buf[..10], 5), Err(LayoutError::Short(10)));
    }

    #[test]
    fn status_codes_and_words() {
        for status in [
            ResponseStatus::Json,
            ResponseStatus::Bytes,
            ResponseStatus::Error,
            ResponseStatus::ViaPipe,
        ] {
            assert_eq!(ResponseStatus::from_code(status.code()), Ok(status));
        }
        assert_eq!(
            ResponseStatus::from_word("json"),
            Some(ResponseStatus::Json)
        );
        assert_eq!(ResponseStatus::from_word("pipe"), None);
    }
}
