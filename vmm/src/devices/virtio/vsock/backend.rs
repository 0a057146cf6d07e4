//! The host side of vsock: where guest connections come from and go to.
//!
//! Every host-side endpoint is a Unix stream socket, so the device's
//! connection logic is one and the same for both backends:
//!
//! - in-process ([`InProcessBackend`]): the library asks for a connection to
//!   a guest port and gets one end of a socket pair;
//! - Unix socket ([`UdsBackend`]), compatible with Firecracker: a host
//!   program connects to `<uds>`, writes `CONNECT <port>\n` and, once the
//!   guest accepts, reads `OK <host port>\n`; a guest connection to host
//!   port P is forwarded to a socket listening on `<uds>_P`.
//!
//! Host-initiated connections reach the device through a [`VsockHub`]
//! (a queue plus an eventfd that wakes the event loop).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::lock;

/// Most host-initiated connections waiting for the device at once.
const MAX_QUEUED_CONNECTS: usize = 256;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE_LINE: usize = 32;
/// How long a Unix socket client has to send its `CONNECT` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in progress at once.
const MAX_HANDSHAKES: usize = 16;

/// A host-initiated connection waiting to be offered to the guest.
#[derive(Debug)]
pub struct HostConnect {
    /// The host end.
    pub stream: UnixStream,
    /// The guest port to connect to.
    pub guest_port: u32,
    /// Whether to write `OK <port>\n` on the stream once the guest accepts.
    pub reply_ok: bool,
}

/// The queue of host-initiated connections, shared between whoever
/// connects (any thread) and the device (the event loop).
#[derive(Debug)]
pub struct VsockHub {
    pending: Mutex<VecDeque<HostConnect>>,
    wake: EventFd,
}

impl VsockHub {
    /// An empty hub.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(VsockHub {
            pending: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// Queues a connection for the device.
    pub fn submit(&self, connect: HostConnect) -> std::io::Result<()> {
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_QUEUED_CONNECTS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "too many vsock connections pending",
            ));
        }
        pending.push_back(connect);
        drop(pending);
        self.wake.write(1)
    }

    /// Takes every queued connection (called by the device).
    pub fn drain(&self) -> Vec<HostConnect> {
        let _ = self.wake.read();
        lock(&self.pending).drain(..).collect()
    }

    /// The eventfd that wakes the device.
    pub fn wake_event(&self) -> &EventFd {
        &self.wake
    }
}

/// Where guest-initiated connections go, and how the host learns that a
/// host-initiated one was accepted.
pub trait VsockBackend: Send + std::fmt::Debug {
    /// The guest connects to host port `port`: a stream to forward it to,
    /// or `None` to refuse (the guest gets a reset).
    fn connect_to_host(&mut self, port: u32) -> Option<UnixStream>;
}

/// The library's backend: connections are socket pairs inside this
/// process.
#[derive(Debug, Clone)]
pub struct InProcessBackend {
    hub: Arc<VsockHub>,
    listeners: Arc<Mutex<HashMap<u32, Sender<UnixStream>>>>,
}

impl InProcessBackend {
    /// A backend feeding `hub`.
    pub fn new(hub: Arc<VsockHub>) -> Self {
        InProcessBackend {
            hub,
            listeners: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Connects to `guest_port` in the guest. The stream is usable at once;
    /// if the guest refuses, it reads end-of-file.
    pub fn connect(&self, guest_port: u32) -> std::io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        self.hub.submit(HostConnect {
            stream: theirs,
            guest_port,
            reply_ok: false,
        })?;
        Ok(ours)
    }

    /// Accepts guest connections to host port `port` from now on.
    pub fn listen(&self, port: u32) -> Receiver<UnixStream> {
        let (tx, rx) = channel();
        lock(&self.listeners).insert(port, tx);
        rx
    }
}

impl VsockBackend for InProcessBackend {
    fn connect_to_host(&mut self, port: u32) -> Option<UnixStream> {
        let listeners = lock(&self.listeners);
        let listener = listeners.get(&port)?;
        let (ours, theirs) = UnixStream::pair().ok()?;
        listener.send(theirs).ok()?;
        Some(ours)
    }
}

/// Firecracker-compatible Unix socket backend.
#[derive(Debug)]
pub struct UdsBackend {
    path: PathBuf,
    in_process: InProcessBackend,
}

impl UdsBackend {
    /// Listens on `path` for host-initiated connections (the accept loop
    /// runs on its own thread and hands finished handshakes to `hub`).
    /// Guest-initiated connections to port P go to `<path>_P`, unless the
    /// in-process backend listens on P.
    pub fn start(path: &Path, hub: Arc<VsockHub>) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        let accept_hub = hub.clone();
        std::thread::Builder::new()
            .name("ember-vsock-uds".into())
            .spawn(move || accept_loop(listener, accept_hub))?;
        Ok(UdsBackend {
            path: path.to_path_buf(),
            in_process: InProcessBackend::new(hub),
        })
    }

    /// The in-process side, for the library's own connections.
    pub fn in_process(&self) -> &InProcessBackend {
        &self.in_process
    }
}

impl VsockBackend for UdsBackend {
    fn connect_to_host(&mut self, port: u32) -> Option<UnixStream> {
        if let Some(stream) = self.in_process.connect_to_host(port) {
            return Some(stream);
        }
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{port}"));
        UnixStream::connect(target).ok()
    }
}

fn accept_loop(listener: UnixListener, hub: Arc<VsockHub>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            continue; // Dropping the stream closes it.
        }
        let (hub, in_flight) = (hub.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new()
            .name("ember-vsock-handshake".into())
            .spawn(move || {
                handshake(stream, &hub);
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            log::warn!("vsock: cannot spawn a handshake thread");
        }
    }
}

/// Reads `CONNECT <port>\n` and queues the connection; anything else
/// closes it.
fn handshake(mut stream: UnixStream, hub: &VsockHub) {
    let port = stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .ok()
        .and_then(|()| read_line(&mut stream))
        .and_then(|line| parse_connect(&line));
    match port {
        Some(guest_port) => {
            let _ = stream.set_read_timeout(None);
            if let Err(e) = hub.submit(HostConnect {
                stream,
                guest_port,
                reply_ok: true,
            }) {
                log::warn!("vsock: dropping a host connection: {e}");
            }
        }
        None => {
            let _ = stream.write_all(b"ERR bad CONNECT line\n");
        }
    }
}

/// Reads one line byte by byte, so no byte after it is consumed.
fn read_line(stream: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_HANDSHAKE_LINE {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    None
}

/// Parses `CONNECT <port>` (case-sensitive, like Firecracker).
pub fn parse_connect(line: &str) -> Option<u32> {
    line.trim_end_matches('\r')
        .strip_prefix("CONNECT ")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect("CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect("CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect("connect 52"), None);
        assert_eq!(parse_connect("CONNECT -1"), None);
        assert_eq!(parse_connect("CONNECT 99999999999"), None);
    }

    #[test]
    fn hub_is_bounded() {
        let hub = VsockHub::new().unwrap();
        let backend = InProcessBackend::new(hub.clone());
        for _ in 0..MAX_QUEUED_CONNECTS {
            backend.connect(1).unwrap();
        }
        assert!(backend.connect(1).is_err());
        assert_eq!(hub.drain().len(), MAX_QUEUED_CONNECTS);
        backend.connect(1).unwrap();
    }

    #[test]
    fn in_process_listener_gets_guest_connections() {
        let hub = VsockHub::new().unwrap();
        let mut backend = InProcessBackend::new(hub);
        assert!(backend.connect_to_host(7).is_none());
        let rx = backend.listen(7);
        let mut ours = backend.connect_to_host(7).unwrap();
        let mut theirs = rx.try_recv().unwrap();
        ours.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn uds_handshake() {
        let dir = std::env::temp_dir().join(format!("ember-uds-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let hub = VsockHub::new().unwrap();
        let _backend = UdsBackend::start(&dir, hub.clone()).unwrap();
        let mut client = UnixStream::connect(&dir).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        let mut got = Vec::new();
        for _ in 0..500 {
            got = hub.drain();
            if !got.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].guest_port, 1024);
        assert!(got[0].reply_ok);
        let mut bad = UnixStream::connect(&dir).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        let mut reply = String::new();
        bad.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("ERR"));
        std::fs::remove_file(&dir).unwrap();
    }
}
