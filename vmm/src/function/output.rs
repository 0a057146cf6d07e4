//! A handler's output while it runs (streaming invocations).
//!
//! With [`super::FunctionInvokeOptions::output`] set, the request asks the
//! runtime to push its output as it is written
//! (`ember_protocol::hotpath::REQUEST_FLAG_STREAM`): at each line, it
//! writes a chunk into the response buffer and rings `DOORBELL_OUTPUT`.
//! The ringing vCPU's thread reads the chunk ([`output_hook`]) into an
//! [`OutputQueue`] before that vCPU runs on; the invoking thread, woken by
//! the same ring, hands the queued chunks to the caller's [`OutputSink`]
//! ([`LiveOutput::drain`]). What the runtime did not push (the end of the
//! output, or all of it on the vsock path) comes with the response and
//! goes to the sink last ([`LiveOutput::finish`]).
//!
//! Everything a chunk says is untrusted: it is read with the response
//! buffer's checks, and the bytes kept are capped by the invocation's
//! `max_output_bytes` whatever the guest pushes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ember_protocol::hotpath::ResponseStatus;
use ember_protocol::protocol::GuestBuffer;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::buffers;
use crate::devices::doorbell::OutputHook;

/// Which of the handler's outputs a chunk is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// Where a streaming invocation's output goes, chunk by chunk, in the
/// order it was written (stdout and stderr interleaved by line). Called on
/// the invoking thread, whose deadline it holds up while it runs: it must
/// not block for long (queue the bytes and return).
#[derive(Clone)]
pub struct OutputSink(Arc<SinkFn>);

type SinkFn = dyn Fn(OutputStream, &[u8]) + Send + Sync;

impl OutputSink {
    /// A sink that calls `f` with each chunk.
    pub fn new(f: impl Fn(OutputStream, &[u8]) + Send + Sync + 'static) -> Self {
        OutputSink(Arc::new(f))
    }

    /// Hands `bytes` of `stream` to the sink.
    pub fn send(&self, stream: OutputStream, bytes: &[u8]) {
        if !bytes.is_empty() {
            (self.0)(stream, bytes);
        }
    }
}

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputSink")
    }
}

/// Most chunks an [`OutputQueue`] holds: past it, a chunk joins the last
/// one of its stream (the order between the streams is then kept only
/// roughly), so a consumer that lags costs bytes, not entries.
const MAX_CHUNKS: usize = 1024;

/// Output chunks waiting for their consumer, in order, adjacent chunks of
/// one stream merged, at most `max_bytes` in all over its life.
#[derive(Debug)]
pub struct OutputQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug)]
struct QueueState {
    chunks: VecDeque<(OutputStream, Vec<u8>)>,
    /// Bytes accepted so far (taken or waiting).
    accepted: u64,
    max_bytes: u64,
    truncated: bool,
}

impl OutputQueue {
    /// An empty queue that accepts at most `max_bytes` in all.
    pub fn new(max_bytes: u64) -> Self {
        OutputQueue {
            state: Mutex::new(QueueState {
                chunks: VecDeque::new(),
                accepted: 0,
                max_bytes,
                truncated: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `bytes` of `stream`; what is over the cap is dropped (and
    /// [`OutputQueue::truncated`] says so).
    pub fn push(&self, stream: OutputStream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut state = self.lock();
        let room = state.max_bytes.saturating_sub(state.accepted);
        let keep = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        if keep < bytes.len() {
            state.truncated = true;
        }
        if keep == 0 {
            return;
        }
        let bytes = &bytes[..keep];
        state.accepted += keep as u64;
        let full = state.chunks.len() >= MAX_CHUNKS;
        let joins = match state.chunks.back() {
            Some((last, _)) if *last == stream => state.chunks.len() - 1,
            _ if full => match state.chunks.iter().rposition(|(s, _)| *s == stream) {
                Some(at) => at,
                None => {
                    state.chunks.push_back((stream, bytes.to_vec()));
                    return;
                }
            },
            _ => {
                state.chunks.push_back((stream, bytes.to_vec()));
                return;
            }
        };
        if let Some((_, chunk)) = state.chunks.get_mut(joins) {
            chunk.extend_from_slice(bytes);
        }
    }

    /// Whether nothing more will be accepted.
    pub fn is_full(&self) -> bool {
        let state = self.lock();
        state.accepted >= state.max_bytes
    }

    /// The waiting chunks, oldest first; the queue is left empty.
    pub fn take(&self) -> Vec<(OutputStream, Vec<u8>)> {
        self.lock().chunks.drain(..).collect()
    }

    /// Whether bytes were dropped over the cap.
    pub fn truncated(&self) -> bool {
        self.lock().truncated
    }
}

/// The hook a clone's doorbell runs on an output ring: reads the chunk the
/// runtime wrote for request `seq` into `queue`. Anything else in the
/// buffer (another status, another request, lengths that do not fit) is
/// ignored: a guest that rings at random only wastes its own vCPU's time.
pub(super) fn output_hook(
    memory: GuestMemoryMmap,
    buffer: GuestBuffer,
    seq: u64,
    queue: Arc<OutputQueue>,
) -> OutputHook {
    Arc::new(move || {
        if queue.is_full() {
            return;
        }
        match buffers::read_response(&memory, &buffer, seq) {
            Ok(chunk) if chunk.header.status == ResponseStatus::Output => {
                queue.push(OutputStream::Stdout, &chunk.stdout);
                queue.push(OutputStream::Stderr, &chunk.stderr);
            }
            Ok(other) => log::debug!(
                "output ring with a {:?} response in the buffer: ignored",
                other.header.status
            ),
            Err(e) => log::debug!("output ring: {e}"),
        }
    })
}

/// One streaming invocation's output: the chunks the vCPU read, handed to
/// the sink by the invoking thread, and kept for the outcome.
#[derive(Debug)]
pub(super) struct LiveOutput {
    queue: Arc<OutputQueue>,
    sink: OutputSink,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl LiveOutput {
    pub(super) fn new(sink: OutputSink, max_bytes: u64) -> Self {
        LiveOutput {
            queue: Arc::new(OutputQueue::new(max_bytes)),
            sink,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// The queue the doorbell's output hook fills.
    pub(super) fn queue(&self) -> &Arc<OutputQueue> {
        &self.queue
    }

    /// Hands what the vCPUs queued to the sink (and keeps it).
    pub(super) fn drain(&mut self) {
        for (stream, bytes) in self.queue.take() {
            self.sink.send(stream, &bytes);
            match stream {
                OutputStream::Stdout => self.stdout.extend_from_slice(&bytes),
                OutputStream::Stderr => self.stderr.extend_from_slice(&bytes),
            }
        }
    }

    /// The invocation ended with `stdout` and `stderr` not yet pushed:
    /// they go to the sink after everything queued. Returns the whole
    /// output (within the cap) and whether any was dropped.
    pub(super) fn finish(mut self, stdout: &[u8], stderr: &[u8]) -> (Vec<u8>, Vec<u8>, bool) {
        self.drain();
        self.queue.push(OutputStream::Stdout, stdout);
        self.queue.push(OutputStream::Stderr, stderr);
        self.drain();
        let truncated = self.queue.truncated();
        (self.stdout, self.stderr, truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutputStream::{Stderr, Stdout};

    #[test]
    fn queue_merges_caps_and_keeps_order() {
        let queue = OutputQueue::new(10);
        queue.push(Stdout, b"ab");
        queue.push(Stdout, b"c");
        queue.push(Stderr, b"x");
        queue.push(Stdout, b"");
        queue.push(Stdout, b"defghijk");
        assert!(queue.truncated());
        assert!(queue.is_full());
        assert_eq!(
            queue.take(),
            vec![
                (Stdout, b"abc".to_vec()),
                (Stderr, b"x".to_vec()),
                (Stdout, b"defghi".to_vec())
            ]
        );
        assert!(queue.take().is_empty());
        queue.push(Stderr, b"more");
        assert!(queue.take().is_empty(), "nothing past the cap");
    }

    #[test]
    fn a_lagging_consumer_costs_bytes_not_entries() {
        let queue = OutputQueue::new(1 << 20);
        for _ in 0..10 * MAX_CHUNKS {
            queue.push(Stdout, b"o");
            queue.push(Stderr, b"e");
        }
        let chunks = queue.take();
        assert!(chunks.len() <= MAX_CHUNKS + 1, "{}", chunks.len());
        let total: usize = chunks.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(total, 20 * MAX_CHUNKS);
        let outs: usize = chunks
            .iter()
            .filter(|(s, _)| *s == Stdout)
            .map(|(_, b)| b.len())
            .sum();
        assert_eq!(outs, 10 * MAX_CHUNKS);
    }

    #[test]
    fn live_output_sends_queued_then_final_and_keeps_all() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let sink = OutputSink::new(move |stream, bytes| {
            log.lock().unwrap().push((stream, bytes.to_vec()));
        });
        let mut live = LiveOutput::new(sink, 8);
        live.queue().push(Stdout, b"one\n");
        live.drain();
        live.queue().push(Stderr, b"e\n");
        let (stdout, stderr, truncated) = live.finish(b"two\n", b"");
        assert_eq!(stdout, b"one\ntw");
        assert_eq!(stderr, b"e\n");
        assert!(truncated);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (Stdout, b"one\n".to_vec()),
                (Stderr, b"e\n".to_vec()),
                (Stdout, b"tw".to_vec())
            ]
        );
    }
}
