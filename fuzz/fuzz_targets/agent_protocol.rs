//! The host/agent wire protocol on hostile bytes: both decoders
//! (`decode_frame` on a buffer, `FrameReader` on a stream, whole and in
//! small pieces) for both frame kinds, and the input as the payload of a
//! well-formed frame. Checks: no panic; both decoders agree; every decoded
//! message re-encodes to itself; `validate()` never panics; and the heap
//! never grows past a bound set by the input's length (plus, for the
//! stream reader, one `MAX_FRAME_LEN` payload buffer).

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use ember_protocol::protocol::{
    decode_frame, encode_frame, AgentMessage, FrameHeader, FrameKind, FrameReader, HostMessage,
    ProtocolError, HEADER_LEN, MAX_FRAME_LEN,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Counted as both blocks live at once, as a moving realloc has them.
            grew(new_size);
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; also returns the most heap bytes it had live at once beyond
/// what was live when it started.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let r = f();
    (r, PEAK.load(Relaxed).saturating_sub(base))
}

/// Most heap a decoder may use for `input_len` bytes: each list holds at
/// most MAX_LIST_LEN entries (a few hundred KiB in memory at most, even
/// when they are empty strings) and strings and byte buffers take what
/// they were sent.
fn heap_bound(input_len: usize) -> usize {
    (2 << 20) + 2 * input_len
}

trait Message: DeserializeOwned + Serialize + PartialEq + Debug {
    const KIND: FrameKind;
    /// Runs the checks the receiving side runs; they must not panic.
    fn check(&self);
}

impl Message for HostMessage {
    const KIND: FrameKind = FrameKind::Host;

    fn check(&self) {
        match self {
            HostMessage::Invoke(invoke) => {
                if invoke.validate().is_ok() {
                    assert!(!invoke.argv.is_empty() && !invoke.argv[0].is_empty());
                    assert!(
                        (1..=ember_protocol::protocol::MAX_TIMEOUT_MS).contains(&invoke.timeout_ms)
                    );
                    for path in invoke
                        .files_in
                        .iter()
                        .map(|f| &f.path)
                        .chain(&invoke.collect)
                    {
                        assert!(!path.starts_with('/') && !path.contains('\0'), "{path:?}");
                        assert!(!path.split('/').any(|c| c == ".."), "{path:?}");
                    }
                }
            }
            HostMessage::Refresh(refresh) => {
                let _ = refresh.validate();
            }
            HostMessage::FunctionStart(start) => {
                if start.validate().is_ok() {
                    assert!(!start.argv.is_empty() && !start.argv[0].is_empty());
                    for file in &start.files_in {
                        assert!(!file.path.starts_with('/'), "{:?}", file.path);
                        assert!(!file.path.split('/').any(|c| c == ".."), "{:?}", file.path);
                    }
                }
            }
            HostMessage::FunctionInvoke(invoke) => {
                let _ = invoke.validate();
            }
            HostMessage::Ping(_) | HostMessage::FunctionCollect(_) => {}
        }
    }
}

impl Message for AgentMessage {
    const KIND: FrameKind = FrameKind::Agent;

    fn check(&self) {}
}

/// A reader handing out at most `chunk` bytes per read, like a socket.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk);
        self.data.read(&mut buf[..n])
    }
}

fn check_error(e: &ProtocolError) {
    let _ = e.error_kind();
    let _ = e.to_string();
}

fn check_message<M: Message>(msg: &M) {
    msg.check();
    // What was decoded re-encodes (no larger than it came: the frame
    // limit holds) and decodes to the same value.
    let frame = encode_frame(M::KIND, msg).expect("a decoded message must re-encode");
    let (back, used) = decode_frame::<M>(&frame, M::KIND)
        .expect("re-encoded message must decode")
        .expect("re-encoded frame must be complete");
    assert_eq!(used, frame.len());
    assert_eq!(&back, msg);
}

/// Every frame `decode_frame` finds back to back in `data`.
fn frames_from_buffer<M: Message>(data: &[u8]) -> Vec<M> {
    let mut msgs = Vec::new();
    let mut rest = data;
    loop {
        match decode_frame::<M>(rest, M::KIND) {
            Ok(Some((msg, used))) => {
                assert!((HEADER_LEN..=rest.len()).contains(&used));
                msgs.push(msg);
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => {
                check_error(&e);
                break;
            }
        }
    }
    msgs
}

/// Every frame a `FrameReader` reads from `reader` until EOF or an error.
fn frames_from_reader<M: Message, R: Read>(reader: R) -> Vec<M> {
    let mut reader = FrameReader::new(reader);
    let mut msgs = Vec::new();
    loop {
        match reader.read_frame::<M>(M::KIND) {
            Ok(Some(msg)) => msgs.push(msg),
            Ok(None) => break,
            Err(e) => {
                check_error(&e);
                break;
            }
        }
    }
    msgs
}

fn check_stream<M: Message>(data: &[u8]) {
    let bound = heap_bound(data.len());
    let (from_buffer, peak) = peak_during(|| frames_from_buffer::<M>(data));
    assert!(
        peak <= bound,
        "decode_frame: {peak} bytes live for a {}-byte input",
        data.len()
    );
    // The stream reader sizes its payload buffer from the (checked) header
    // before reading the payload: up to one MAX_FRAME_LEN more.
    let stream_bound = bound + MAX_FRAME_LEN as usize;
    let (from_reader, peak) = peak_during(|| frames_from_reader::<M, _>(data));
    assert!(
        peak <= stream_bound,
        "FrameReader: {peak} bytes live for a {}-byte input",
        data.len()
    );
    // Both decoders see the same complete frames; the reader may only stop
    // earlier on a truncated last frame, which decode_frame also skips.
    assert_eq!(from_buffer, from_reader);
    let chunk = usize::from(data.first().copied().unwrap_or(1) % 13) + 1;
    let trickled = frames_from_reader::<M, _>(Trickle { data, chunk });
    assert_eq!(from_buffer, trickled, "reads of {chunk} bytes");
    for msg in &from_buffer {
        check_message(msg);
    }
}

/// The input as the payload of one well-formed frame.
fn check_payload<M: Message>(payload: &[u8]) {
    let Ok(len) = u32::try_from(payload.len()) else {
        return;
    };
    if len > MAX_FRAME_LEN {
        return;
    }
    let mut frame = FrameHeader { kind: M::KIND, len }.encode().to_vec();
    frame.extend_from_slice(payload);
    let (decoded, peak) = peak_during(|| decode_frame::<M>(&frame, M::KIND));
    assert!(
        peak <= heap_bound(payload.len()),
        "payload: {peak} bytes live for {len} bytes"
    );
    match decoded {
        Ok(Some((msg, used))) => {
            assert_eq!(used, frame.len());
            check_message(&msg);
        }
        Ok(None) => panic!("a whole frame must not need more bytes"),
        Err(e) => check_error(&e),
    }
}

fuzz_target!(|data: &[u8]| {
    check_stream::<HostMessage>(data);
    check_stream::<AgentMessage>(data);
    check_payload::<HostMessage>(data);
    check_payload::<AgentMessage>(data);
});
