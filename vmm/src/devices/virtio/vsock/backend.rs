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
        // Never wait for the listener: this runs on the event loop with the
        // device locked, and a guest can flood a slow listener's backlog.
        match connect_nonblocking(Path::new(&target)) {
            Ok(stream) => Some(stream),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    log::debug!("vsock: host port {port} is not accepting, refusing");
                }
                None
            }
        }
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

/// Connects a stream socket to the Unix socket at `path` without waiting:
/// when the listener's backlog is full (it accepts slowly, or not at all)
/// this fails with `WouldBlock` instead of blocking until it accepts. The
/// socket is made as `socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)` and then
/// switched to non-blocking, as the event loop's seccomp filter expects.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Leave room for the terminating NUL the zeroed struct provides.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: socket takes only integers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    stream.set_nonblocking(true)?;
    // SAFETY: `addr` is a valid sockaddr_un whose first `len` bytes hold
    // the family and the NUL-terminated path.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
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

    /// A host listener that does not accept (its backlog full) refuses the
    /// guest's connection at once: a blocking connect would stall the event
    /// loop, and with it every vCPU that touches the device.
    #[test]
    fn full_backlog_refuses_without_blocking() {
        let path = std::env::temp_dir().join(format!("ember-uds-full-{}", std::process::id()));
        let port_path = PathBuf::from(format!("{}_5000", path.display()));
        let _ = std::fs::remove_file(&port_path);
        let _listener = UnixListener::bind(&port_path).unwrap();
        // Fill the backlog without accepting.
        let mut clients = Vec::new();
        loop {
            match connect_nonblocking(&port_path) {
                Ok(client) => clients.push(client),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(clients.len() < 100_000, "the backlog never filled");
        }
        let hub = VsockHub::new().unwrap();
        let mut backend = UdsBackend {
            path,
            in_process: InProcessBackend::new(hub),
        };
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(backend.connect_to_host(5000).is_none());
        });
        let refused = rx.recv_timeout(Duration::from_secs(10));
        std::fs::remove_file(&port_path).unwrap();
        assert_eq!(refused, Ok(true), "connect_to_host blocked or connected");
    }
}
