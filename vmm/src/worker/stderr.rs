//! A worker's stderr, shown by the parent: every line prefixed with the
//! worker's PID and escaped, so a compromised worker cannot pass for the
//! parent's own log lines, move the cursor or clear a terminal; bounded,
//! so it cannot flood the parent's log either.

use std::io::{PipeReader, Read, Write};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest line shown; the rest of a longer line is dropped.
const MAX_LINE: usize = 1024;
/// Bytes shown per worker; what comes after is read and dropped.
const MAX_TOTAL: usize = 256 << 10;

/// Starts a thread that copies `pipe` (the read end of worker `pid`'s
/// stderr) to this process's stderr until the worker closes it.
pub(super) fn forward(pipe: PipeReader, pid: u32) -> Option<JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("ember-worker-log".into())
        .spawn(move || copy(pipe, &mut std::io::stderr(), pid));
    match spawned {
        Ok(thread) => Some(thread),
        Err(e) => {
            // The pipe is dropped with the closure: the worker's writes
            // fail (EPIPE), which costs it nothing but its diagnostics.
            log::warn!("cannot read worker {pid}'s stderr: {e}");
            None
        }
    }
}

/// Waits up to `grace` for a forwarder to see the end of its worker's
/// output (every process of the worker gone), so its last lines are shown
/// and its pipe closed when the worker's handle is; a forwarder still
/// waiting after that is left to finish on its own.
pub(super) fn finish(thread: Option<JoinHandle<()>>, grace: Duration) {
    let Some(thread) = thread else { return };
    let deadline = Instant::now() + grace;
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if thread.is_finished() {
        let _ = thread.join();
    }
}

/// Copies lines from `input` to `out` as `ember worker <pid>: <line>`.
fn copy(mut input: impl Read, out: &mut impl Write, pid: u32) {
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut cut = false;
    let mut shown = 0usize;
    let mut buf = [0u8; 4096];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for &byte in &buf[..n] {
            if byte == b'\n' {
                emit(out, pid, &line, cut, &mut shown);
                line.clear();
                cut = false;
            } else if line.len() < MAX_LINE {
                line.push(byte);
            } else {
                cut = true;
            }
        }
    }
    if !line.is_empty() {
        emit(out, pid, &line, cut, &mut shown);
    }
}

fn emit(out: &mut impl Write, pid: u32, line: &[u8], cut: bool, shown: &mut usize) {
    if *shown >= MAX_TOTAL {
        return;
    }
    *shown += line.len();
    let mut text = format!("ember worker {pid}: {}", escape(line));
    if cut {
        text.push_str(" [line cut]");
    }
    if *shown >= MAX_TOTAL {
        text.push_str(" [further output dropped]");
    }
    text.push('\n');
    // One write per line: lines of concurrent workers do not interleave.
    let _ = out.write_all(text.as_bytes());
}

/// Printable ASCII as is (backslash doubled); every other byte, control
/// characters and escape sequences included, as `\xNN`.
fn escape(line: &[u8]) -> String {
    let mut text = String::with_capacity(line.len());
    for &byte in line {
        match byte {
            b'\\' => text.push_str("\\\\"),
            0x20..=0x7e => text.push(char::from(byte)),
            _ => text.push_str(&format!("\\x{byte:02x}")),
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(input: &[u8]) -> String {
        let mut out = Vec::new();
        copy(input, &mut out, 42);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_are_prefixed_and_escaped() {
        assert_eq!(
            shown(b"one\n\r\x1b[2Kember: error: forged\ntail"),
            "ember worker 42: one\n\
             ember worker 42: \\x0d\\x1b[2Kember: error: forged\n\
             ember worker 42: tail\n"
        );
        assert_eq!(
            shown("é\\\n".as_bytes()),
            "ember worker 42: \\xc3\\xa9\\\\\n"
        );
    }

    #[test]
    fn long_lines_and_floods_are_cut() {
        let long = [b'a'; MAX_LINE + 10];
        let out = shown(&long);
        assert!(out.ends_with(" [line cut]\n"), "{out}");
        assert_eq!(out.len(), "ember worker 42: ".len() + MAX_LINE + 12);

        let mut flood = Vec::new();
        for _ in 0..(2 * MAX_TOTAL / 100) {
            flood.extend_from_slice(&[b'x'; 99]);
            flood.push(b'\n');
        }
        let out = shown(&flood);
        assert!(out.len() < MAX_TOTAL + MAX_TOTAL / 4, "{}", out.len());
        assert!(out.contains("[further output dropped]"));
    }
}
