//! Reads from (and writes to) an untrusted peer (a guest agent, a jailed
//! worker) bounded by one absolute deadline for the whole operation.
//!
//! A socket read timeout bounds each `read` call, not a frame: a peer that
//! trickles one byte just before every timeout keeps a 32 MiB frame (and
//! the sandbox behind it) alive forever. [`DeadlineStream`] recomputes the
//! time left before every read, so however the peer splits its bytes, the
//! operation ends by the deadline with [`io::ErrorKind::TimedOut`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// A Unix stream whose reads and writes end at an absolute deadline.
#[derive(Debug)]
pub struct DeadlineStream {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl DeadlineStream {
    /// Reads from `stream`, without a deadline until one is set.
    pub fn new(stream: UnixStream) -> Self {
        DeadlineStream {
            stream,
            deadline: None,
        }
    }

    /// Every read from now on ends by `deadline` (`None`: reads block).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        self.deadline = deadline;
        if deadline.is_none() {
            self.stream.set_read_timeout(None)?;
            self.stream.set_write_timeout(None)?;
        }
        Ok(())
    }

    /// The stream.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }

    /// The stream back (its read timeout may be set: clear it if needed).
    pub fn into_inner(self) -> UnixStream {
        self.stream
    }
}

/// True for the errors a read past its deadline ends with.
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// A peer that reads slowly (or not at all) holds a write no longer.
impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_write_timeout(Some(left))?;
        }
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn a_trickling_peer_cannot_stretch_a_read_past_the_deadline() {
        let (mut peer, ours) = UnixStream::pair().unwrap();
        let trickler = std::thread::spawn(move || {
            // One byte every 20 ms: far below any per-read timeout.
            for _ in 0..100 {
                if peer.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut stream = DeadlineStream::new(ours);
        let started = Instant::now();
        stream
            .set_deadline(Some(started + Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        let err = stream.read_exact(&mut buf).unwrap_err();
        let elapsed = started.elapsed();
        assert!(is_timeout(&err), "{err}");
        assert!(elapsed < Duration::from_millis(600), "{elapsed:?}");
        drop(stream);
        trickler.join().unwrap();
    }

    #[test]
    fn no_deadline_reads_normally() {
        let (mut peer, ours) = UnixStream::pair().unwrap();
        peer.write_all(b"abc").unwrap();
        let mut stream = DeadlineStream::new(ours);
        let mut buf = [0u8; 3];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
    }
}
