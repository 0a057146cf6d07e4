//! Where the guest's serial output goes, and who is waiting for a line.
//!
//! The console is the guest's first voice: before vsock exists, the agent
//! announces itself there. The sink forwards every byte unbuffered (a prompt
//! without a newline must show) and scans completed lines for a prefix the
//! host waits on.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::lock;

/// Longest line kept for matching; longer lines are forwarded but only
/// their head is matched, so a guest cannot grow host memory.
const MAX_LINE: usize = 4096;

/// A console line some thread is waiting for.
#[derive(Debug)]
pub struct LineWatch {
    pattern: String,
    anywhere: bool,
    seen: Mutex<Watched>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct Watched {
    line: Option<(Instant, String)>,
    /// No line will come anymore (the VM stopped).
    closed: bool,
}

impl crate::exit::WakeOnExit for LineWatch {
    fn vm_stopped(&self) {
        self.close();
    }
}

impl LineWatch {
    /// Watches for the first line that starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Arc<Self> {
        Self::with(prefix.into(), false)
    }

    /// Watches for the first line that contains `pattern` anywhere (kernel
    /// messages may carry a timestamp before it).
    pub fn containing(pattern: impl Into<String>) -> Arc<Self> {
        Self::with(pattern.into(), true)
    }

    fn with(pattern: String, anywhere: bool) -> Arc<Self> {
        Arc::new(LineWatch {
            pattern,
            anywhere,
            seen: Mutex::new(Watched::default()),
            cond: Condvar::new(),
        })
    }

    fn matches(&self, line: &[u8]) -> bool {
        let pattern = self.pattern.as_bytes();
        if self.anywhere {
            pattern.is_empty() || line.windows(pattern.len()).any(|w| w == pattern)
        } else {
            line.starts_with(pattern)
        }
    }

    fn offer(&self, line: &[u8]) {
        if !self.matches(line) {
            return;
        }
        let mut seen = lock(&self.seen);
        if seen.line.is_none() {
            seen.line = Some((Instant::now(), String::from_utf8_lossy(line).into_owned()));
            self.cond.notify_all();
        }
    }

    /// Wakes every waiter: the line will not come (the VM stopped).
    pub fn close(&self) {
        lock(&self.seen).closed = true;
        self.cond.notify_all();
    }

    /// Blocks until the line arrives, the watch is closed, or `timeout`
    /// passes; returns when the line was seen and the whole line.
    pub fn wait(&self, timeout: Duration) -> Option<(Instant, String)> {
        let seen = lock(&self.seen);
        let (seen, _) = self
            .cond
            .wait_timeout_while(seen, timeout, |s| s.line.is_none() && !s.closed)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.line.clone()
    }

    /// When the line was seen, without waiting.
    pub fn seen(&self) -> Option<(Instant, String)> {
        lock(&self.seen).line.clone()
    }
}

/// The serial port's output: forwarded to a writer, scanned for lines.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    watches: Vec<Arc<LineWatch>>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("watches", &self.watches)
            .finish_non_exhaustive()
    }
}

impl ConsoleSink {
    /// A sink writing to `out` and feeding `watches`.
    pub fn new(out: Box<dyn Write + Send>, watches: Vec<Arc<LineWatch>>) -> Self {
        ConsoleSink {
            out,
            line: Vec::new(),
            watches,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &byte in buf {
            match byte {
                b'\n' => {
                    let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
                    for watch in &self.watches {
                        watch.offer(line);
                    }
                    self.line.clear();
                }
                _ if self.line.len() < MAX_LINE => self.line.push(byte),
                _ => {}
            }
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scan(buf);
        // The console must never stall or kill the guest: a closed pipe or a
        // full disk loses console bytes, not the VM.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn forwards_everything_and_matches_whole_lines() {
        let out = Shared::default();
        let watch = LineWatch::prefix("ember-agent: ready");
        let mut sink = ConsoleSink::new(Box::new(out.clone()), vec![watch.clone()]);
        sink.write_all(b"booting\r\nember-agent: rea").unwrap();
        assert!(watch.seen().is_none());
        sink.write_all(b"dy uptime_ms=5\r\nmore").unwrap();
        let (_, line) = watch.wait(Duration::from_secs(1)).unwrap();
        assert_eq!(line, "ember-agent: ready uptime_ms=5");
        assert_eq!(
            out.0.lock().unwrap().as_slice(),
            b"booting\r\nember-agent: ready uptime_ms=5\r\nmore"
        );
    }

    #[test]
    fn long_lines_do_not_grow_memory() {
        let watch = LineWatch::prefix("x");
        let mut sink = ConsoleSink::new(Box::new(std::io::sink()), vec![watch.clone()]);
        for _ in 0..100 {
            sink.write_all(&[b'x'; 1000]).unwrap();
        }
        assert!(sink.line.len() <= MAX_LINE);
        sink.write_all(b"\n").unwrap();
        assert_eq!(watch.seen().unwrap().1.len(), MAX_LINE);
    }

    #[test]
    fn containing_matches_mid_line() {
        let watch = LineWatch::containing("Kernel panic");
        let mut sink = ConsoleSink::new(Box::new(std::io::sink()), vec![watch.clone()]);
        sink.write_all(b"[ 1.0] Kernel panic - not syncing: x\n")
            .unwrap();
        assert!(watch.seen().is_some());
    }

    #[test]
    fn close_wakes_waiters() {
        let watch = LineWatch::prefix("never");
        let w = watch.clone();
        let t = std::thread::spawn(move || w.wait(Duration::from_secs(600)));
        watch.close();
        assert!(t.join().unwrap().is_none());
    }

    #[test]
    fn wait_times_out() {
        let watch = LineWatch::prefix("never");
        assert!(watch.wait(Duration::from_millis(10)).is_none());
    }
}
