//! Small tools for hostile-guest tests, in the agent binary so the image
//! needs nothing else. They run only when the binary is not PID 1:
//!
//! - `ember-agent vsock-junk <host-port> <bytes>`: connects over vsock to
//!   the host (CID 2) on `<host-port>` and writes `<bytes>` pseudo-random
//!   bytes, then exits 0 (1 with a message on error).
//! - `ember-agent protocol-junk [<rounds>]`: writes to stdout frames that
//!   look like the agent's own (a forged `Exit`, a `Hello`) mixed with
//!   broken ones (bad magic, version, kind, length, payload) and raw junk.
//!   Run as an invocation, all of it must reach the host as plain `Stdout`
//!   data: the program's output cannot forge frames.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;

use thiserror::Error;

use crate::protocol::{
    encode_frame, AgentMessage, Exit, ExitStatus, FrameHeader, FrameKind, Hello, Usage, HEADER_LEN,
    MAGIC, PROTOCOL_VERSION,
};
use crate::{console, sys};

/// A tool failed.
#[derive(Debug, Error)]
enum JunkError {
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

const VSOCK_USAGE: &str = "ember-agent vsock-junk <host-port> <bytes>";
const PROTOCOL_USAGE: &str = "ember-agent protocol-junk [<rounds>]";

/// Runs the tool `args[0]` names, if it names one; returns its exit status.
pub(crate) fn run_tool(args: &[OsString]) -> Option<i32> {
    let (name, rest) = args.split_first()?;
    let result = match name.to_str()? {
        "vsock-junk" => vsock_junk(rest),
        "protocol-junk" => protocol_junk(rest),
        _ => return None,
    };
    Some(match result {
        Ok(()) => 0,
        Err(err) => {
            console::error(&err);
            1
        }
    })
}

fn number<T: std::str::FromStr>(
    arg: Option<&OsString>,
    usage: &'static str,
) -> Result<T, JunkError> {
    arg.and_then(|arg| arg.to_str())
        .and_then(|arg| arg.parse().ok())
        .ok_or(JunkError::Usage(usage))
}

fn vsock_junk(args: &[OsString]) -> Result<(), JunkError> {
    if args.len() != 2 {
        return Err(JunkError::Usage(VSOCK_USAGE));
    }
    let port: u32 = number(args.first(), VSOCK_USAGE)?;
    let mut left: u64 = number(args.get(1), VSOCK_USAGE)?;
    let io_err = |what| move |source| JunkError::Io { what, source };
    // SAFETY: socket takes only integers.
    let fd = sys::owned(unsafe {
        libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
    })
    .map_err(io_err("socket(AF_VSOCK)"))?;
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a complete sockaddr_vm of `len` bytes.
    sys::cvt(unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) })
        .map_err(io_err("connect to the host"))?;
    let mut rng = XorShift::seeded();
    let mut block = vec![0u8; 64 * 1024];
    while left > 0 {
        rng.fill(&mut block);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(block.len());
        sys::write_all(fd.as_raw_fd(), block.get(..n).unwrap_or_default())
            .map_err(io_err("write"))?;
        left -= n as u64;
    }
    Ok(())
}

fn protocol_junk(args: &[OsString]) -> Result<(), JunkError> {
    let rounds: u32 = match args {
        [] => 1,
        [_] => number(args.first(), PROTOCOL_USAGE)?,
        _ => return Err(JunkError::Usage(PROTOCOL_USAGE)),
    };
    let mut rng = XorShift::seeded();
    let mut out = Vec::new();
    for _ in 0..rounds {
        junk_round(&mut rng, &mut out);
    }
    sys::write_all(libc::STDOUT_FILENO, &out).map_err(|source| JunkError::Io {
        what: "write stdout",
        source,
    })
}

/// One round of frames, forged and broken.
fn junk_round(rng: &mut XorShift, out: &mut Vec<u8>) {
    let forged = [
        AgentMessage::Exit(Exit {
            status: ExitStatus::Code(0),
            timed_out: false,
            output_truncated: false,
            usage: Usage::default(),
            files_out: Vec::new(),
        }),
        AgentMessage::Hello(Hello::current()),
        AgentMessage::Stdout(b"forged".to_vec()),
    ];
    for msg in &forged {
        if let Ok(frame) = encode_frame(FrameKind::Agent, msg) {
            out.extend_from_slice(&frame);
        }
    }
    let good = FrameHeader {
        kind: FrameKind::Agent,
        len: 16,
    }
    .encode();
    let [m0, m1] = MAGIC;
    let [_, _, _, _, l0, l1, l2, l3] = good;
    let broken: [[u8; HEADER_LEN]; 4] = [
        [b'X', m1, PROTOCOL_VERSION, 2, l0, l1, l2, l3],
        [m0, m1, PROTOCOL_VERSION.wrapping_add(8), 2, l0, l1, l2, l3],
        [m0, m1, PROTOCOL_VERSION, 7, l0, l1, l2, l3],
        [m0, m1, PROTOCOL_VERSION, 2, 0xff, 0xff, 0xff, 0xff],
    ];
    for header in broken {
        out.extend_from_slice(&header);
        let mut payload = [0u8; 16];
        rng.fill(&mut payload);
        out.extend_from_slice(&payload);
    }
    // A well-formed header over an undecodable payload.
    out.extend_from_slice(&good);
    out.extend_from_slice(&[0xff; 16]);
    let mut raw = [0u8; 512];
    rng.fill(&mut raw);
    out.extend_from_slice(&raw);
}

/// xorshift64: junk, not cryptography.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        XorShift(nanos ^ u64::from(std::process::id()).rotate_left(32) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            for (dst, src) in chunk.iter_mut().zip(bytes) {
                *dst = src;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_frame, ProtocolError};

    #[test]
    fn junk_round_starts_with_forged_frames_then_breaks() {
        let mut out = Vec::new();
        junk_round(&mut XorShift(1), &mut out);
        let (first, used) = decode_frame::<AgentMessage>(&out, FrameKind::Agent)
            .unwrap()
            .unwrap();
        assert!(matches!(first, AgentMessage::Exit(_)));
        let mut rest = &out[used..];
        for _ in 0..2 {
            let (_, used) = decode_frame::<AgentMessage>(rest, FrameKind::Agent)
                .unwrap()
                .unwrap();
            rest = &rest[used..];
        }
        assert!(matches!(
            decode_frame::<AgentMessage>(rest, FrameKind::Agent),
            Err(ProtocolError::BadMagic)
        ));
    }

    #[test]
    fn unknown_tools_are_not_run() {
        assert_eq!(run_tool(&[]), None);
        assert_eq!(run_tool(&["dance".into()]), None);
        assert_eq!(run_tool(&["vsock-junk".into()]), Some(1));
        assert_eq!(run_tool(&["protocol-junk".into(), "x".into()]), Some(1));
    }
}
