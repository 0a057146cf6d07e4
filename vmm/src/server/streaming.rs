//! `?stream=1` on a function invocation: the handler's output as it is
//! written, then the outcome, as NDJSON lines or (when the client accepts
//! `text/event-stream`) server-sent events.
//!
//! The invocation's sink ([`LiveOutput::sink`]) only queues: it runs on
//! the thread that enforces the invocation's deadline, so a client that
//! reads slowly (or not at all) must never hold it up. The queue is capped
//! by the invocation's output limit, so what waits for a slow client is
//! bounded; the client going away cancels the invocation.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use tokio::sync::{mpsc, Notify};

use super::cancel::CancelOnDrop;
use crate::function::{OutputQueue, OutputSink, OutputStream};

/// How the events are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// One JSON object per line (`application/x-ndjson`).
    Ndjson,
    /// `event: <type>` and `data: <the same JSON object>`
    /// (`text/event-stream`).
    ServerSentEvents,
}

impl Framing {
    /// Server-sent events if the client accepts them, else NDJSON.
    pub(super) fn for_request(headers: &HeaderMap) -> Self {
        let sse = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/event-stream"));
        if sse {
            Framing::ServerSentEvents
        } else {
            Framing::Ndjson
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Framing::Ndjson => "application/x-ndjson",
            Framing::ServerSentEvents => "text/event-stream",
        })
    }

    fn frame(self, event: &serde_json::Value) -> Bytes {
        let json = serde_json::to_string(event).unwrap_or_default();
        Bytes::from(match self {
            Framing::Ndjson => format!("{json}\n"),
            Framing::ServerSentEvents => {
                let kind = event["type"].as_str().unwrap_or("message");
                format!("event: {kind}\ndata: {json}\n\n")
            }
        })
    }
}

/// One streaming invocation's output on its way to the client.
#[derive(Debug, Clone)]
pub(super) struct LiveOutput {
    queue: Arc<OutputQueue>,
    ready: Arc<Notify>,
}

impl LiveOutput {
    /// Holds at most `max_bytes` of output in all.
    pub(super) fn new(max_bytes: u64) -> Self {
        LiveOutput {
            queue: Arc::new(OutputQueue::new(max_bytes)),
            ready: Arc::new(Notify::new()),
        }
    }

    /// The sink to give the invocation: queues and wakes the writer.
    pub(super) fn sink(&self) -> OutputSink {
        let (queue, ready) = (self.queue.clone(), self.ready.clone());
        OutputSink::new(move |stream, bytes| {
            queue.push(stream, bytes);
            ready.notify_one();
        })
    }
}

/// Text of a stream's chunks, whole characters only: a UTF-8 sequence cut
/// between two chunks waits for the rest.
#[derive(Debug, Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    fn text(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.pending);
        let whole = self.pending.len() - keep;
        let text = String::from_utf8_lossy(&self.pending[..whole]).into_owned();
        self.pending.drain(..whole);
        text
    }

    fn rest(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Bytes at the end of `bytes` that start a UTF-8 sequence it does not
/// finish (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let needs = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

/// The writer's state: text carried per stream, and the framing.
struct Writer {
    framing: Framing,
    events: mpsc::Sender<Result<Bytes, Infallible>>,
    stdout: Utf8Carry,
    stderr: Utf8Carry,
}

impl Writer {
    async fn send(&self, event: serde_json::Value) -> bool {
        self.events
            .send(Ok(self.framing.frame(&event)))
            .await
            .is_ok()
    }

    async fn output(&mut self, stream: OutputStream, bytes: &[u8]) -> bool {
        let (kind, text) = match stream {
            OutputStream::Stdout => ("stdout", self.stdout.text(bytes)),
            OutputStream::Stderr => ("stderr", self.stderr.text(bytes)),
        };
        text.is_empty()
            || self
                .send(serde_json::json!({"type": kind, "data": text}))
                .await
    }

    async fn drain(&mut self, live: &LiveOutput) -> bool {
        for (stream, bytes) in live.queue.take() {
            if !self.output(stream, &bytes).await {
                return false;
            }
        }
        true
    }

    async fn flush(&mut self) -> bool {
        for (kind, text) in [
            ("stdout", self.stdout.rest()),
            ("stderr", self.stderr.rest()),
        ] {
            if !text.is_empty()
                && !self
                    .send(serde_json::json!({"type": kind, "data": text}))
                    .await
            {
                return false;
            }
        }
        true
    }
}

/// The streaming answer: `stdout` and `stderr` events as the handler
/// writes, then one `result` event (the envelope without its output), or
/// one `error` event. The status line (200) goes out at once; a client
/// that goes away cancels the invocation (`on_drop`).
pub(super) fn answer(
    run: tokio::task::JoinHandle<Response>,
    on_drop: CancelOnDrop,
    live: LiveOutput,
    framing: Framing,
) -> Response {
    let (events, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let mut on_drop = on_drop;
        let mut run = run;
        let mut writer = Writer {
            framing,
            events,
            stdout: Utf8Carry::default(),
            stderr: Utf8Carry::default(),
        };
        let answer = loop {
            let closed = writer.events.clone();
            tokio::select! {
                answer = &mut run => break answer,
                () = live.ready.notified() => {
                    if !writer.drain(&live).await {
                        return; // the client went away: on_drop cancels
                    }
                }
                // The client went away: the body (and this channel) is gone.
                () = closed.closed() => return,
            }
        };
        on_drop.0 = None;
        if !writer.drain(&live).await || !writer.flush().await {
            return;
        }
        let last = match answer {
            Ok(response) => last_event(response).await,
            Err(_) => serde_json::json!({"type": "error", "error": "the invocation task failed"}),
        };
        writer.send(last).await;
    });
    let mut response = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
    ));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, framing.content_type());
    response
}

/// The last event of a finished invocation's answer (an envelope, or an
/// error): its output was streamed already.
async fn last_event(response: Response) -> serde_json::Value {
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        return serde_json::json!({
            "type": "error",
            "status": status.as_u16(),
            "error": value["error"],
        });
    }
    serde_json::json!({
        "type": "result",
        "result": value["result"],
        "id": value["id"],
        "path": value["path"],
        "timings_ms": value["timings_ms"],
        "recycle": value["recycle"],
        "output_truncated": value["output_truncated"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_cut_between_chunks_wait_for_their_rest() {
        let mut carry = Utf8Carry::default();
        let text = "aé€😀z".as_bytes();
        let mut out = String::new();
        for byte in text {
            out.push_str(&carry.text(&[*byte]));
        }
        out.push_str(&carry.rest());
        assert_eq!(out, "aé€😀z");
        // Invalid bytes are replaced, not held forever.
        let mut carry = Utf8Carry::default();
        assert_eq!(carry.text(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(carry.text(b"\xe2\x82"), "");
        assert_eq!(carry.rest(), "\u{fffd}");
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail(b"\x80\x80\x80\x80"), 0);
    }

    #[test]
    fn framing_follows_accept() {
        let mut headers = HeaderMap::new();
        assert_eq!(Framing::for_request(&headers), Framing::Ndjson);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let framing = Framing::for_request(&headers);
        assert_eq!(framing, Framing::ServerSentEvents);
        let frame = framing.frame(&serde_json::json!({"type": "stdout", "data": "hi\n"}));
        assert_eq!(
            &frame[..],
            b"event: stdout\ndata: {\"data\":\"hi\\n\",\"type\":\"stdout\"}\n\n"
        );
        let frame = Framing::Ndjson.frame(&serde_json::json!({"type": "result"}));
        assert_eq!(&frame[..], b"{\"type\":\"result\"}\n");
    }
}
