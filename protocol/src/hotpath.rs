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

use std::mem::offset_of;

use thiserror::Error;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

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
/// Doorbell value: the response buffer holds a chunk of the handler's
/// output ([`ResponseStatus::Output`]) for the current request. The
/// ringing vCPU does not run again until the host has read it, so the
/// runtime may reuse the buffer as soon as the ring returns.
pub const DOORBELL_OUTPUT: u32 = 3;

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
/// Request flag: stream the handler's output while it runs: at each line
/// (or every few KiB), a [`ResponseStatus::Output`] chunk and a
/// [`DOORBELL_OUTPUT`] ring; the final response holds only the rest.
pub const REQUEST_FLAG_STREAM: u32 = 4;

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

/// The request header as it lies in guest memory: little-endian, no
/// padding the compiler chose (the runtimes read it with fixed offsets,
/// e.g. Python's `struct` format `<IIQIII4xQ24s`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RequestLayout {
    magic: U32,
    version: U32,
    seq: U64,
    flags: U32,
    event_len: U32,
    timeout_ms: U32,
    _pad: [u8; 4],
    unix_time_ns: U64,
    entropy: [u8; REQUEST_ENTROPY_LEN],
}

const _: () = assert!(size_of::<RequestLayout>() == REQUEST_HEADER_LEN);

impl RequestHeader {
    /// The header's bytes, `seq` included; hosts write `seq` last with
    /// [`RequestHeader::SEQ_OFFSET`].
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let layout = RequestLayout {
            magic: REQUEST_MAGIC.into(),
            version: LAYOUT_VERSION.into(),
            seq: self.seq.into(),
            flags: self.flags.into(),
            event_len: self.event_len.into(),
            timeout_ms: self.timeout_ms.into(),
            _pad: [0; 4],
            unix_time_ns: self.unix_time_ns.into(),
            entropy: self.entropy,
        };
        zerocopy::transmute!(layout)
    }

    /// Where `seq` lives in the header (the host's last write).
    pub const SEQ_OFFSET: usize = offset_of!(RequestLayout, seq);

    /// Reads a header (as a runtime written in Rust would).
    pub fn decode(buf: &[u8]) -> Result<Self, LayoutError> {
        let (header, _) =
            RequestLayout::read_from_prefix(buf).map_err(|_| LayoutError::Short(buf.len()))?;
        check_magic(header.magic, header.version, REQUEST_MAGIC)?;
        let request = RequestHeader {
            seq: header.seq.get(),
            flags: header.flags.get(),
            event_len: header.event_len.get(),
            timeout_ms: header.timeout_ms.get(),
            unix_time_ns: header.unix_time_ns.get(),
            entropy: header.entropy,
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
    /// Not a response: a chunk of output (stdout and stderr sections, no
    /// result) pushed while the handler runs ([`REQUEST_FLAG_STREAM`]).
    Output,
}

impl ResponseStatus {
    /// The status's number in the response header.
    pub fn code(self) -> u32 {
        match self {
            ResponseStatus::Json => 0,
            ResponseStatus::Bytes => 1,
            ResponseStatus::Error => 2,
            ResponseStatus::ViaPipe => 3,
            ResponseStatus::Output => 4,
        }
    }

    /// The status for a header number.
    pub fn from_code(code: u32) -> Result<Self, LayoutError> {
        Ok(match code {
            0 => ResponseStatus::Json,
            1 => ResponseStatus::Bytes,
            2 => ResponseStatus::Error,
            3 => ResponseStatus::ViaPipe,
            4 => ResponseStatus::Output,
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
            ResponseStatus::Output => "output",
        }
    }

    /// The status named by a pipe word (`pipe` and `output` are not valid
    /// on a pipe).
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

/// The response header as it lies in guest memory: little-endian, no
/// padding the compiler chose (Python's `<IIQIIIII4xQ16x`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct ResponseLayout {
    magic: U32,
    version: U32,
    seq: U64,
    status: U32,
    result_len: U32,
    stdout_len: U32,
    stderr_len: U32,
    flags: U32,
    _pad: [u8; 4],
    handler_ns: U64,
    _reserved: [u8; 16],
}

const _: () = assert!(size_of::<ResponseLayout>() == RESPONSE_HEADER_LEN);

impl ResponseHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let layout = ResponseLayout {
            magic: RESPONSE_MAGIC.into(),
            version: LAYOUT_VERSION.into(),
            seq: self.seq.into(),
            status: self.status.code().into(),
            result_len: self.result_len.into(),
            stdout_len: self.stdout_len.into(),
            stderr_len: self.stderr_len.into(),
            flags: self.flags.into(),
            _pad: [0; 4],
            handler_ns: self.handler_ns.into(),
            _reserved: [0; 16],
        };
        zerocopy::transmute!(layout)
    }

    /// Reads and checks a header against a buffer of `buf_len` bytes.
    pub fn decode(header: &[u8], buf_len: usize) -> Result<Self, LayoutError> {
        let (layout, _) = ResponseLayout::read_from_prefix(header)
            .map_err(|_| LayoutError::Short(header.len()))?;
        check_magic(layout.magic, layout.version, RESPONSE_MAGIC)?;
        let response = ResponseHeader {
            seq: layout.seq.get(),
            status: ResponseStatus::from_code(layout.status.get())?,
            result_len: layout.result_len.get(),
            stdout_len: layout.stdout_len.get(),
            stderr_len: layout.stderr_len.get(),
            flags: layout.flags.get(),
            handler_ns: layout.handler_ns.get(),
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

fn check_magic(got: U32, version: U32, magic: u32) -> Result<(), LayoutError> {
    if got.get() != magic {
        return Err(LayoutError::BadMagic(got.get()));
    }
    if version.get() != LAYOUT_VERSION {
        return Err(LayoutError::Version(version.get()));
    }
    Ok(())
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
        let stderr_len = offset_of!(ResponseLayout, stderr_len);
        buf[stderr_len..stderr_len + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_response(&buf, 5),
            Err(LayoutError::Lengths(..))
        ));
        buf[offset_of!(ResponseLayout, status)] = 9;
        assert_eq!(decode_response(&buf, 5), Err(LayoutError::Status(9)));
        buf[0] = 0;
        assert!(matches!(
            decode_response(&buf, 5),
            Err(LayoutError::BadMagic(_))
        ));
        assert_eq!(decode_response(&buf[..10], 5), Err(LayoutError::Short(10)));
    }

    /// The offsets the runtimes read (guest-agent/runtimes/python3/
    /// ember_runtime.py's `RQ_*` and `RS_*`) are the structs' offsets.
    #[test]
    fn layouts_keep_the_runtimes_offsets() {
        let request = [
            offset_of!(RequestLayout, magic),
            offset_of!(RequestLayout, version),
            offset_of!(RequestLayout, seq),
            offset_of!(RequestLayout, flags),
            offset_of!(RequestLayout, event_len),
            offset_of!(RequestLayout, timeout_ms),
            offset_of!(RequestLayout, unix_time_ns),
            offset_of!(RequestLayout, entropy),
        ];
        assert_eq!(request, [0, 4, 8, 16, 20, 24, 32, 40]);
        let response = [
            offset_of!(ResponseLayout, magic),
            offset_of!(ResponseLayout, version),
            offset_of!(ResponseLayout, seq),
            offset_of!(ResponseLayout, status),
            offset_of!(ResponseLayout, result_len),
            offset_of!(ResponseLayout, stdout_len),
            offset_of!(ResponseLayout, stderr_len),
            offset_of!(ResponseLayout, flags),
            offset_of!(ResponseLayout, handler_ns),
        ];
        assert_eq!(response, [0, 4, 8, 16, 20, 24, 28, 32, 40]);
    }

    #[test]
    fn status_codes_and_words() {
        for status in [
            ResponseStatus::Json,
            ResponseStatus::Bytes,
            ResponseStatus::Error,
            ResponseStatus::ViaPipe,
            ResponseStatus::Output,
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
