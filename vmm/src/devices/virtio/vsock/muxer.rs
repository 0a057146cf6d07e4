//! Stream connections between guest ports and host Unix sockets.
//!
//! The muxer is the vsock device minus the virtqueues: it takes packets
//! the guest sent (already copied out of guest memory) and produces the
//! packets to put in the guest's receive queue. Everything the guest says
//! is checked: unknown operations, connections and types get a reset,
//! nothing the guest sends can make the host buffer more than the credit
//! the host advertised, and the number of connections is capped.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::backend::{HostConnect, VsockBackend};
use super::packet::*;

/// Receive buffer the host advertises per connection: the most guest data
/// it will hold for a host socket that does not read.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most connections per device.
pub const MAX_CONNECTIONS: usize = 256;
/// Control packets queued for the guest beyond which the device stops
/// taking packets from the guest, so a guest that sends but never posts
/// receive buffers only stalls itself.
pub const MAX_PENDING_CONTROL: usize = 1024;
/// First port for host-initiated connections.
const EPHEMERAL_PORT_BASE: u32 = 1 << 30;

/// (host port, guest port).
type ConnKey = (u32, u32);

/// A random first ephemeral port. Clones of one snapshot must not start
/// where the template did: the guest may still send packets for the
/// template's last connection (they were in flight when it was paused), and
/// they must not hit a clone's new connection that reuses the port.
fn random_ephemeral_port() -> u32 {
    let mut bytes = [0u8; 4];
    // A failure only makes the port less random, not invalid.
    let _ = getrandom::fill(&mut bytes);
    EPHEMERAL_PORT_BASE | (u32::from_ne_bytes(bytes) & (EPHEMERAL_PORT_BASE - 1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The guest shut down both directions; RST once `to_host` drains.
    Closing,
}

#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    state: State,
    reply_ok: bool,
    /// Guest data not yet accepted by the host socket.
    to_host: VecDeque<u8>,
    /// Guest bytes written to the host socket (our credit counter).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host socket may have data (edge-triggered: until WouldBlock).
    host_readable: bool,
    /// The host socket sent EOF.
    host_eof: bool,
    /// The guest will not receive anymore.
    guest_shut_rcv: bool,
    /// The guest will send nothing more (the host socket is half-closed
    /// once what it sent has been written).
    guest_shut_send: bool,
    credit_update_queued: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State, reply_ok: bool) -> Self {
        Connection {
            stream,
            state,
            reply_ok,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: true,
            host_eof: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
            credit_update_queued: false,
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_to_send(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// Writes buffered guest data to the host socket; false on a broken
    /// socket.
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            let (head, _) = self.to_host.as_slices();
            match self.stream.write(head) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 4
    }
}

/// A packet the device owes the guest that carries no data.
#[derive(Debug, Clone, Copy)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

/// The vsock connection table.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    backend: Box<dyn VsockBackend>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    control: VecDeque<Control>,
    /// Connections that may have data for the guest, in service order.
    rx_order: VecDeque<ConnKey>,
    next_port: u32,
    added_fds: Vec<RawFd>,
    closed: Vec<UnixStream>,
}

impl Muxer {
    /// A muxer for a guest with context ID `guest_cid`.
    pub fn new(guest_cid: u64, backend: Box<dyn VsockBackend>) -> Self {
        Muxer {
            guest_cid,
            backend,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            rx_order: VecDeque::new(),
            next_port: random_ephemeral_port(),
            added_fds: Vec::new(),
            closed: Vec::new(),
        }
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the device should stop taking guest packets for now.
    pub fn tx_blocked(&self) -> bool {
        self.control.len() >= MAX_PENDING_CONTROL
    }

    /// Whether there is something to put in the receive queue.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self
                .rx_order
                .iter()
                .any(|k| self.conns.get(k).is_some_and(Connection::wants_to_send))
    }

    /// Host sockets to start watching (edge-triggered, in and out).
    pub fn take_added_fds(&mut self) -> Vec<RawFd> {
        std::mem::take(&mut self.added_fds)
    }

    /// Host sockets of closed connections: stop watching, then drop them.
    pub fn take_closed(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.closed)
    }

    /// Drops every connection (device or transport reset).
    pub fn reset(&mut self) {
        log::debug!("vsock: dropping {} connections", self.conns.len());
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.control.clear();
        self.rx_order.clear();
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        self.control.push_back(Control { key, op, flags });
    }

    fn add(&mut self, key: ConnKey, conn: Connection) {
        if let Err(e) = conn.stream.set_nonblocking(true) {
            log::warn!("vsock: cannot make a host socket non-blocking: {e}");
            return;
        }
        let fd = conn.stream.as_raw_fd();
        self.by_fd.insert(fd, key);
        self.added_fds.push(fd);
        self.conns.insert(key, conn);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            // Not watched yet: it must not be, its fd closes before that.
            self.added_fds.retain(|&added| added != fd);
            self.closed.push(conn.stream);
        }
    }

    fn reset_conn(&mut self, key: ConnKey) {
        log::debug!("vsock: resetting connection {key:?}");
        self.remove(key);
        self.queue_control(key, OP_RST, 0);
    }

    /// Offers host-initiated connections to the guest.
    pub fn connect_from_host(&mut self, connects: Vec<HostConnect>) {
        for connect in connects {
            if self.conns.len() >= MAX_CONNECTIONS {
                log::warn!("vsock: connection limit reached, refusing a host connection");
                continue;
            }
            let key = (self.allocate_port(), connect.guest_port);
            self.add(
                key,
                Connection::new(connect.stream, State::Connecting, connect.reply_ok),
            );
            self.queue_control(key, OP_REQUEST, 0);
        }
    }

    fn allocate_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = match self.next_port.checked_add(1) {
                Some(port) if port < EPHEMERAL_PORT_BASE << 1 => port,
                _ => EPHEMERAL_PORT_BASE,
            };
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    /// Handles one packet from the guest's transmit queue.
    pub fn recv_from_guest(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            log::debug!("vsock: dropping packet {} -> {}", hdr.src_cid, hdr.dst_cid);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.reset_conn(key);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
            if conn.wants_to_send() && !self.rx_order.contains(&key) {
                self.rx_order.push_back(key);
            }
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(key),
            OP_RESPONSE => self.guest_accepted(key),
            OP_RW => self.guest_data(key, data),
            OP_SHUTDOWN => self.guest_shutdown(key, hdr.flags),
            OP_RST => {
                log::debug!("vsock: guest reset connection {key:?}");
                self.remove(key)
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.queue_credit_update(key);
                } else {
                    self.queue_control(key, OP_RST, 0);
                }
            }
            _ => self.reset_conn(key),
        }
    }

    fn guest_connect(&mut self, key: ConnKey) {
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection is a protocol error.
            self.reset_conn(key);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.queue_control(key, OP_RST, 0);
            return;
        }
        match self.backend.connect_to_host(key.0) {
            Some(stream) => {
                self.add(key, Connection::new(stream, State::Established, false));
                self.queue_control(key, OP_RESPONSE, 0);
            }
            None => self.queue_control(key, OP_RST, 0),
        }
    }

    fn guest_accepted(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue_control(key, OP_RST, 0);
            return;
        };
        if conn.state != State::Connecting {
            self.reset_conn(key);
            return;
        }
        conn.state = State::Established;
        if conn.reply_ok {
            let reply = format!("OK {}\n", key.0);
            // The socket is fresh and empty: a short line fits at once.
            if conn.stream.write_all(reply.as_bytes()).is_err() {
                self.reset_conn(key);
                return;
            }
        }
        self.rx_order.push_back(key);
    }

    fn guest_data(&mut self, key: ConnKey, data: &[u8]) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue_control(key, OP_RST, 0);
            return;
        };
        if conn.state != State::Established
            || conn.to_host.len() + data.len() > CONN_BUF_ALLOC as usize
        {
            // Data before the handshake, or beyond the credit we gave.
            self.reset_conn(key);
            return;
        }
        conn.to_host.extend(data);
        if !conn.flush_to_host() {
            self.reset_conn(key);
            return;
        }
        if conn.needs_credit_update() {
            self.queue_credit_update(key);
        }
    }

    fn guest_shutdown(&mut self, key: ConnKey, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue_control(key, OP_RST, 0);
            return;
        };
        if flags & SHUTDOWN_RCV != 0 {
            conn.guest_shut_rcv = true;
        }
        if flags & SHUTDOWN_SEND != 0 {
            conn.guest_shut_send = true;
            if flags & SHUTDOWN_RCV != 0 {
                conn.state = State::Closing;
            }
            self.finish_guest_send(key);
        }
    }

    /// Once the guest sent its last byte and it reached the host, tell the
    /// host socket (half-close) or, when the guest closed both ways, end
    /// the connection.
    fn finish_guest_send(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        // Called after every flush: only a guest that said it is done
        // sending gets its host socket half-closed (a drained buffer alone
        // means nothing).
        if !conn.guest_shut_send || !conn.to_host.is_empty() {
            return;
        }
        if conn.state == State::Closing {
            self.reset_conn(key);
        } else {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    fn queue_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.credit_update_queued {
                conn.credit_update_queued = true;
                self.queue_control(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    /// The host socket with file descriptor `fd` became readable and/or
    /// writable.
    pub fn host_event(&mut self, fd: RawFd, readable: bool, writable: bool) {
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if writable && !conn.to_host.is_empty() {
            if !conn.flush_to_host() {
                self.reset_conn(key);
                return;
            }
            if conn.needs_credit_update() {
                self.queue_credit_update(key);
            }
            self.finish_guest_send(key);
        }
        if readable {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.host_readable = true;
                if !self.rx_order.contains(&key) {
                    self.rx_order.push_back(key);
                }
            }
        }
    }

    fn header(&self, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = self
            .conns
            .get(&key)
            .map_or((0, 0), |c| (CONN_BUF_ALLOC, c.fwd_cnt.0));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn sent(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.fwd_cnt_sent = conn.fwd_cnt;
            conn.credit_update_queued = false;
        }
    }

    /// The next packet for the guest's receive queue; data goes into `buf`
    /// (at most its length). `None` when there is nothing to send.
    pub fn next_for_guest(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(ctl) = self.control.pop_front() {
            let hdr = self.header(ctl.key, ctl.op, ctl.flags, 0);
            if ctl.op == OP_CREDIT_UPDATE || ctl.op == OP_RESPONSE || ctl.op == OP_REQUEST {
                self.sent(ctl.key);
            }
            return Some((hdr, 0));
        }
        while let Some(key) = self.rx_order.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if !conn.wants_to_send() {
                continue;
            }
            let max = buf.len().min(conn.peer_credit() as usize);
            match conn.stream.read(&mut buf[..max]) {
                Ok(0) => {
                    conn.host_eof = true;
                    let hdr = self.header(key, OP_SHUTDOWN, SHUTDOWN_SEND, 0);
                    self.sent(key);
                    return Some((hdr, 0));
                }
                Ok(n) => {
                    conn.tx_cnt += Wrapping(n as u32);
                    // Keep reading this connection after the others had a turn.
                    self.rx_order.push_back(key);
                    let hdr = self.header(key, OP_RW, 0, n as u32);
                    self.sent(key);
                    return Some((hdr, n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.host_readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => self.rx_order.push_back(key),
                Err(e) => {
                    log::debug!("vsock: host socket of {key:?} failed: {e}");
                    self.remove(key);
                    return Some((self.header(key, OP_RST, 0, 0), 0));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Refuse;

    impl VsockBackend for Refuse {
        fn connect_to_host(&mut self, _port: u32) -> Option<UnixStream> {
            None
        }
    }

    /// Accepts every guest connection; the host ends are kept for the test.
    #[derive(Debug, Default, Clone)]
    struct Accept(std::sync::Arc<std::sync::Mutex<Vec<UnixStream>>>);

    impl VsockBackend for Accept {
        fn connect_to_host(&mut self, _port: u32) -> Option<UnixStream> {
            let (a, b) = UnixStream::pair().ok()?;
            self.0.lock().unwrap().push(b);
            Some(a)
        }
    }

    const GUEST: u64 = 3;

    fn pkt(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some((h, n)) = m.next_for_guest(&mut buf) {
            out.push((h, buf[..n].to_vec()));
        }
        out
    }

    #[test]
    fn refused_guest_connect_gets_rst() {
        let mut m = Muxer::new(GUEST, Box::new(Refuse));
        m.recv_from_guest(&pkt(OP_REQUEST, 5000, 80, 0), &[]);
        let out = drain(&mut m);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.op, OP_RST);
        assert_eq!((out[0].0.src_port, out[0].0.dst_port), (80, 5000));
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn a_drained_host_buffer_does_not_half_close_the_host_socket() {
        let accept = Accept::default();
        let mut m = Muxer::new(GUEST, Box::new(accept.clone()));
        m.recv_from_guest(&pkt(OP_REQUEST, 5000, 80, 0), &[]);
        drain(&mut m);
        let mut host = accept.0.lock().unwrap()[0].try_clone().unwrap();
        // More than the host socket takes at once: the rest waits in the
        // muxer until the host reads.
        let chunk = vec![7u8; 60 * 1024];
        let mut sent = 0;
        for _ in 0..4 {
            m.recv_from_guest(&pkt(OP_RW, 5000, 80, chunk.len() as u32), &chunk);
            sent += chunk.len();
        }
        let fd = m.conns.values().next().unwrap().stream.as_raw_fd();
        let mut got = vec![0u8; sent];
        let mut read = 0;
        host.set_nonblocking(true).unwrap();
        while read < sent {
            match host.read(&mut got[read..]) {
                Ok(0) => panic!("the host socket was closed after {read} of {sent} bytes"),
                Ok(n) => read += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => m.host_event(fd, false, true),
                Err(e) => panic!("{e}"),
            }
        }
        // Drained, and still open: more data goes through.
        m.host_event(fd, false, true);
        m.recv_from_guest(&pkt(OP_RW, 5000, 80, 2), b"ok");
        host.set_nonblocking(false).unwrap();
        let mut more = [0u8; 2];
        host.read_exact(&mut more).unwrap();
        assert_eq!(&more, b"ok");
    }

    #[test]
    fn guest_connect_and_data_both_ways() {
        let accept = Accept::default();
        let mut m = Muxer::new(GUEST, Box::new(accept.clone()));
        m.recv_from_guest(&pkt(OP_REQUEST, 5000, 80, 0), &[]);
        assert_eq!(drain(&mut m)[0].0.op, OP_RESPONSE);
        m.recv_from_guest(&pkt(OP_RW, 5000, 80, 5), b"hello");
        let mut host = accept.0.lock().unwrap()[0].try_clone().unwrap();
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        host.write_all(b"world").unwrap();
        m.host_event(
            m.conns.values().next().unwrap().stream.as_raw_fd(),
            true,
            false,
        );
        let out = drain(&mut m);
        assert_eq!(out[0].0.op, OP_RW);
        assert_eq!(out[0].1, b"world");
    }

    #[test]
    fn unknown_op_type_and_connection_get_rst() {
        let mut m = Muxer::new(GUEST, Box::new(Refuse));
        m.recv_from_guest(&pkt(OP_RW, 1, 2, 3), b"abc");
        let mut bad_type = pkt(OP_REQUEST, 1, 2, 0);
        bad_type.type_ = 2;
        m.recv_from_guest(&bad_type, &[]);
        m.recv_from_guest(&pkt(99, 1, 2, 0), &[]);
        let ops: Vec<u16> = drain(&mut m).iter().map(|(h, _)| h.op).collect();
        assert_eq!(ops, vec![OP_RST, OP_RST, OP_RST]);
        // A reset is never answered with a reset.
        m.recv_from_guest(&pkt(OP_RST, 1, 2, 0), &[]);
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn spoofed_source_is_dropped() {
        let mut m = Muxer::new(GUEST, Box::new(Refuse));
        let mut spoofed = pkt(OP_REQUEST, 1, 2, 0);
        spoofed.src_cid = 7;
        m.recv_from_guest(&spoofed, &[]);
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn data_beyond_credit_resets_the_connection() {
        let mut m = Muxer::new(GUEST, Box::new(Accept::default()));
        m.recv_from_guest(&pkt(OP_REQUEST, 5000, 80, 0), &[]);
        drain(&mut m);
        // The host side never reads: fill the socket buffer, then exceed the credit.
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        while m.connection_count() == 1 && sent < 64 * 1024 * 1024 {
            m.recv_from_guest(&pkt(OP_RW, 5000, 80, chunk.len() as u32), &chunk);
            sent += chunk.len();
        }
        assert_eq!(m.connection_count(), 0, "flooding guest must be reset");
        assert!(drain(&mut m).iter().any(|(h, _)| h.op == OP_RST));
    }

    #[test]
    fn host_connect_waits_for_response() {
        let mut m = Muxer::new(GUEST, Box::new(Refuse));
        let (ours, theirs) = UnixStream::pair().unwrap();
        m.connect_from_host(vec![HostConnect {
            stream: theirs,
            guest_port: 1024,
            reply_ok: true,
        }]);
        let out = drain(&mut m);
        assert_eq!(out[0].0.op, OP_REQUEST);
        assert_eq!(out[0].0.dst_port, 1024);
        let host_port = out[0].0.src_port;
        m.recv_from_guest(&pkt(OP_RESPONSE, 1024, host_port, 0), &[]);
        let mut line = [0u8; 64];
        let n = (&ours).read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {host_port}\n")
        );
        // Guest closes both ways: the connection ends with our RST.
        let mut shut = pkt(OP_SHUTDOWN, 1024, host_port, 0);
        shut.flags = SHUTDOWN_BOTH;
        m.recv_from_guest(&shut, &[]);
        assert_eq!(m.connection_count(), 0);
        assert_eq!(drain(&mut m).last().unwrap().0.op, OP_RST);
        assert_eq!(m.take_closed().len(), 1);
    }

    /// A connection that ends before the event loop watched its socket is
    /// not handed out to be watched: by then its fd is closed, or reused.
    #[test]
    fn connection_closed_before_it_is_watched_is_not_watched() {
        let mut m = Muxer::new(GUEST, Box::new(Accept::default()));
        m.recv_from_guest(&pkt(OP_REQUEST, 5000, 80, 0), &[]);
        m.recv_from_guest(&pkt(OP_RST, 5000, 80, 0), &[]);
        m.recv_from_guest(&pkt(OP_REQUEST, 5001, 80, 0), &[]);
        let closed = m.take_closed();
        assert_eq!(closed.len(), 1);
        let added = m.take_added_fds();
        assert_eq!(added.len(), 1);
        assert!(!added.contains(&closed[0].as_raw_fd()));
    }

    #[test]
    fn connection_limit() {
        let mut m = Muxer::new(GUEST, Box::new(Accept::default()));
        for port in 0..(MAX_CONNECTIONS as u32 + 5) {
            m.recv_from_guest(&pkt(OP_REQUEST, port, 80, 0), &[]);
        }
        assert_eq!(m.connection_count(), MAX_CONNECTIONS);
        let rsts = drain(&mut m).iter().filter(|(h, _)| h.op == OP_RST).count();
        assert_eq!(rsts, 5);
    }
}
