//! The vsock device model against a hostile guest and a busy host.
//!
//! The real `Vsock` device with an `InProcessBackend` runs on a real
//! event-manager loop, as in a microVM, over 1 MiB of fake guest memory.
//! The fuzz input is a script: a plausible guest driver posts packets and
//! receive buffers into the virtqueues (headers, payloads and descriptor
//! layouts chosen by the input), may also poke any guest bytes (rings,
//! descriptors, buffers), and notifies queues; host code connects to guest
//! ports, listens, writes, reads, shuts down and closes its sockets; the
//! device is reset, transport-reset and saved/restored in between.
//!
//! Checks: no panic; the event loop goes quiet on its own (no busy loop);
//! and while the guest played by the rules (no raw pokes), every used-ring
//! entry names a chain the guest posted, and every packet the device wrote
//! fits its buffer and has a sane header. Host memory stays bounded by the
//! device's own limits (libFuzzer's -rss_limit_mb watches it).

#![no_main]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use ember::devices::virtio::vsock::backend::{InProcessBackend, VsockHub};
use ember::devices::virtio::vsock::{Vsock, VsockEvents};
use ember::devices::virtio::{Activation, Interrupt, QueueState, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: u64 = 1 << 20;
const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const HDR_LEN: u64 = 44;
/// Queue sizes the device offers (rx, tx, event).
const MAX_SIZES: [u16; 3] = [256, 256, 16];
/// Queue `q`'s descriptor table, available ring and used ring: 4 KiB each.
const RINGS: u64 = 0x1000;
const fn desc_table(q: usize) -> u64 {
    RINGS + q as u64 * 0x3000
}
const fn avail_ring(q: usize) -> u64 {
    desc_table(q) + 0x1000
}
const fn used_ring(q: usize) -> u64 {
    desc_table(q) + 0x2000
}
/// Receive buffers, then everything else (packets, indirect tables).
const RX_AREA: (u64, u64) = (0x10000, 0x80000);
const TX_AREA: (u64, u64) = (0x80000, MEM_SIZE);
/// The lowest port the host's connections get (see the muxer).
const EPHEMERAL_PORT_BASE: u32 = 1 << 30;
/// Most host ports remembered from the device's REQUEST packets.
const MAX_LEARNED_PORTS: usize = 16;
/// Bounds on what one input may set up.
const MAX_ACTIONS: usize = 256;
const MAX_HOST_STREAMS: usize = 32;
const MAX_LISTENERS: usize = 8;
/// Event-loop rounds after which a loop that still has events is spinning.
const MAX_ROUNDS: usize = 256;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Set EMBER_FUZZ_TRACE to print what each input achieved.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("EMBER_FUZZ_TRACE").is_some())
}

#[derive(Debug)]
struct Input {
    setup: Setup,
    actions: Vec<Action>,
}

#[derive(Debug)]
struct Setup {
    /// log2 of each queue's size (clamped to what the device offers).
    size_log2: [u8; 3],
    event_idx: bool,
    /// Ring positions as a restored snapshot may have them.
    positions: Option<[(u16, u16); 3]>,
}

#[derive(Debug, Clone, Copy)]
enum Port {
    Agent,
    Small(u8),
    /// A host port of a host-initiated connection (learned from the
    /// device's REQUEST packets, as a guest does).
    Ephemeral(u8),
    Any(u32),
}

impl Port {
    /// The port number; `learned` are the host ports the device used.
    fn get(self, learned: &[u32]) -> u32 {
        match self {
            Port::Agent => 1024,
            Port::Small(p) => u32::from(p),
            Port::Ephemeral(n) if learned.is_empty() => EPHEMERAL_PORT_BASE + u32::from(n % 16),
            Port::Ephemeral(n) => learned[usize::from(n) % learned.len()],
            Port::Any(p) => p,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Cid {
    Guest,
    Host,
    Any(u64),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Request,
    Response,
    Rst,
    Shutdown(u8),
    Rw,
    CreditUpdate,
    CreditRequest,
    Any(u16),
}

#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Header, then payload, one descriptor each.
    Separate,
    /// Header and payload in one descriptor (Linux 6.2+).
    Together,
    /// The header cut in two descriptors.
    SplitHeader(u8),
    /// The payload in several descriptors.
    Chunks(u8),
    /// Device-writable descriptors where readable ones belong.
    WriteOnly,
    /// The separate layout behind an indirect descriptor.
    Indirect,
}

#[derive(Debug)]
struct Packet {
    src_cid: Cid,
    dst_cid: Cid,
    src_port: Port,
    dst_port: Port,
    op: Op,
    /// `None` is a stream socket.
    type_: Option<u16>,
    buf_alloc: u32,
    fwd_cnt: u32,
    /// The header's `len` minus the payload's real length.
    len_delta: Option<i32>,
    payload: Vec<u8>,
    /// Zero bytes after `payload` (big packets from small inputs).
    zeros: u16,
    layout: Layout,
}

#[derive(Debug)]
enum Action {
    /// Raw bytes anywhere in guest memory.
    Poke {
        addr: u32,
        bytes: Vec<u8>,
    },
    /// A packet on the transmit queue.
    Send(Packet),
    /// Receive buffers: `data` bytes each after the header.
    PostRx {
        count: u8,
        data: u16,
        split: bool,
    },
    /// An event-queue buffer.
    PostEvent {
        len: u8,
    },
    /// The guest notifies a queue; the event loop runs.
    Kick {
        queue: u8,
    },
    /// The event loop runs.
    Run,
    HostConnect(Port),
    HostListen(Port),
    HostWrite {
        conn: u8,
        len: u16,
        byte: u8,
    },
    HostRead {
        conn: u8,
    },
    HostShutdown {
        conn: u8,
        how: u8,
    },
    HostClose {
        conn: u8,
    },
    TransportReset,
    /// Driver reset, then the driver sets the queues up again.
    DeviceReset,
    /// The queues go through their snapshot form into a re-activated device.
    SaveRestore,
}

/// Reads the input front to back; past its end every field reads 0.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(&got);
        out
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn port(&mut self) -> Port {
        match self.u8() % 4 {
            0 => Port::Agent,
            1 => Port::Small(self.u8()),
            2 => Port::Ephemeral(self.u8()),
            _ => Port::Any(self.u32()),
        }
    }

    fn cid(&mut self) -> Cid {
        match self.u8() % 3 {
            0 => Cid::Guest,
            1 => Cid::Host,
            _ => Cid::Any(self.u64()),
        }
    }

    fn packet(&mut self) -> Packet {
        let (src_cid, dst_cid) = (self.cid(), self.cid());
        let (src_port, dst_port) = (self.port(), self.port());
        let op = match self.u8() % 8 {
            0 => Op::Request,
            1 => Op::Response,
            2 => Op::Rst,
            3 => Op::Shutdown(self.u8()),
            4 => Op::Rw,
            5 => Op::CreditUpdate,
            6 => Op::CreditRequest,
            _ => Op::Any(self.u16()),
        };
        let type_ = (self.u8() % 2 == 1).then(|| self.u16());
        let (buf_alloc, fwd_cnt) = (self.u32(), self.u32());
        let len_delta = (self.u8() % 2 == 1).then(|| self.u32() as i32);
        let len = usize::from(self.u8());
        let payload = self.bytes(len);
        let zeros = self.u16();
        let layout = match self.u8() % 6 {
            0 => Layout::Separate,
            1 => Layout::Together,
            2 => Layout::SplitHeader(self.u8()),
            3 => Layout::Chunks(self.u8()),
            4 => Layout::WriteOnly,
            _ => Layout::Indirect,
        };
        Packet {
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            op,
            type_,
            buf_alloc,
            fwd_cnt,
            len_delta,
            payload,
            zeros,
            layout,
        }
    }

    fn action(&mut self) -> Action {
        // Zero, the most common byte, is the harmless Run; raw pokes, which
        // turn the device checks off, come last.
        match self.u8() % 15 {
            0 => Action::Run,
            1 => Action::Send(self.packet()),
            2 => Action::PostRx {
                count: self.u8(),
                data: self.u16(),
                split: self.u8() % 2 == 1,
            },
            3 => Action::PostEvent { len: self.u8() },
            4 => Action::Kick { queue: self.u8() },
            5 => Action::HostConnect(self.port()),
            6 => Action::HostListen(self.port()),
            7 => Action::HostWrite {
                conn: self.u8(),
                len: self.u16(),
                byte: self.u8(),
            },
            8 => Action::HostRead { conn: self.u8() },
            9 => Action::HostShutdown {
                conn: self.u8(),
                how: self.u8(),
            },
            10 => Action::HostClose { conn: self.u8() },
            11 => Action::TransportReset,
            12 => Action::DeviceReset,
            13 => Action::SaveRestore,
            _ => {
                let addr = self.u32();
                let len = usize::from(self.u8());
                Action::Poke {
                    addr,
                    bytes: self.bytes(len),
                }
            }
        }
    }
}

/// The input format (little-endian; see `Cursor` for each action's fields,
/// and fuzz/make-vsock-seeds for examples):
///
/// ```text
/// setup:  size_log2[3] flags(bit 0 event_idx, bit 1 positions)
///         [(next_avail u16, next_used u16) x 3 if bit 1]
/// then actions until the input ends: opcode % 15, then its fields
/// ```
fn parse(data: &[u8]) -> Input {
    let mut c = Cursor(data);
    let size_log2 = c.array::<3>();
    let flags = c.u8();
    let positions =
        (flags & 2 != 0).then(|| [(c.u16(), c.u16()), (c.u16(), c.u16()), (c.u16(), c.u16())]);
    let setup = Setup {
        size_log2,
        event_idx: flags & 1 != 0,
        positions,
    };
    let mut actions = Vec::new();
    while !c.is_empty() && actions.len() < MAX_ACTIONS {
        actions.push(c.action());
    }
    Input { setup, actions }
}

/// What the guest driver knows about one of its queues.
#[derive(Debug, Default)]
struct DriverQueue {
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    /// Posted chains by head: descriptors, header address, writable bytes.
    in_flight: HashMap<u16, (u16, u64, u64)>,
    descs_in_flight: u32,
}

/// The guest: memory, a driver for the three queues, and whether it
/// kept to the protocol so far (checks on the device apply only then).
struct Guest {
    mem: GuestMemoryMmap,
    queues: [DriverQueue; 3],
    rx_next: u64,
    tx_next: u64,
    well_behaved: bool,
    /// Packet ops the device delivered (for EMBER_FUZZ_TRACE).
    rx_ops: Vec<u16>,
    /// Host ports of the connection requests the device delivered.
    host_ports: Vec<u32>,
}

impl Guest {
    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write inside guest memory");
    }

    fn read<const N: usize>(&self, addr: u64) -> [u8; N] {
        let mut buf = [0u8; N];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("read inside guest memory");
        buf
    }

    fn alloc(next: &mut u64, area: (u64, u64), len: u64) -> (u64, bool) {
        let len = len.max(1).next_multiple_of(16);
        let wrapped = *next + len > area.1;
        if wrapped {
            *next = area.0;
        }
        let addr = *next;
        *next += len;
        (addr, wrapped)
    }

    fn alloc_rx(&mut self, len: u64) -> u64 {
        let (addr, wrapped) = Self::alloc(&mut self.rx_next, RX_AREA, len);
        if wrapped && !self.queues[0].in_flight.is_empty() {
            // Buffers still owned by the device would be reused.
            self.well_behaved = false;
        }
        addr
    }

    fn alloc_tx(&mut self, len: u64) -> u64 {
        Self::alloc(&mut self.tx_next, TX_AREA, len).0
    }

    /// Puts a chain of `(addr, len, flags)` descriptors on queue `q`'s
    /// available ring.
    fn post(&mut self, q: usize, descs: &[(u64, u32, u16)], hdr_addr: u64, writable: u64) {
        let queue = &mut self.queues[q];
        let size = queue.size;
        let n = descs.len().min(usize::from(size)) as u16;
        if queue.descs_in_flight + u32::from(n) > u32::from(size) {
            // A real driver would wait for used buffers; this one overwrites.
            self.well_behaved = false;
        }
        let head = queue.next_desc;
        let mut table = Vec::with_capacity(usize::from(n) * 16);
        for (i, &(addr, len, flags)) in descs.iter().take(usize::from(n)).enumerate() {
            let last = i + 1 == usize::from(n);
            let next = (head + i as u16 + 1) % size;
            let flags = if last {
                flags
            } else {
                flags | VIRTQ_DESC_F_NEXT
            };
            table.push((
                ((head + i as u16) % size),
                addr,
                len,
                flags,
                if last { 0 } else { next },
            ));
        }
        let (avail, idx) = (avail_ring(q), queue.avail_idx);
        queue.next_desc = (head + n) % size;
        queue.avail_idx = idx.wrapping_add(1);
        if let Some((old_n, ..)) = queue.in_flight.insert(head, (n, hdr_addr, writable)) {
            queue.descs_in_flight -= u32::from(old_n);
        }
        queue.descs_in_flight += u32::from(n);
        for (index, addr, len, flags, next) in table {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.write(desc_table(q) + u64::from(index) * 16, &d);
        }
        self.write(avail + 4 + u64::from(idx % size) * 2, &head.to_le_bytes());
        self.write(avail + 2, &idx.wrapping_add(1).to_le_bytes());
    }

    fn send(&mut self, p: &Packet) {
        let data_len = (p.payload.len() + usize::from(p.zeros)).min(64 * 1024 + 64);
        let len_field = match p.len_delta {
            Some(d) => (data_len as i64 + i64::from(d)).clamp(0, i64::from(u32::MAX)) as u32,
            None => data_len as u32,
        };
        let cid = |c: Cid| match c {
            Cid::Guest => GUEST_CID,
            Cid::Host => HOST_CID,
            Cid::Any(c) => c,
        };
        let (op, flags) = match p.op {
            Op::Request => (1, 0),
            Op::Response => (2, 0),
            Op::Rst => (3, 0),
            Op::Shutdown(f) => (4, u32::from(f % 4)),
            Op::Rw => (5, 0),
            Op::CreditUpdate => (6, 0),
            Op::CreditRequest => (7, 0),
            Op::Any(op) => (op, u32::from(op >> 8)),
        };
        let mut hdr = [0u8; HDR_LEN as usize];
        hdr[0..8].copy_from_slice(&cid(p.src_cid).to_le_bytes());
        hdr[8..16].copy_from_slice(&cid(p.dst_cid).to_le_bytes());
        hdr[16..20].copy_from_slice(&p.src_port.get(&self.host_ports).to_le_bytes());
        hdr[20..24].copy_from_slice(&p.dst_port.get(&self.host_ports).to_le_bytes());
        hdr[24..28].copy_from_slice(&len_field.to_le_bytes());
        hdr[28..30].copy_from_slice(&p.type_.unwrap_or(1).to_le_bytes());
        hdr[30..32].copy_from_slice(&op.to_le_bytes());
        hdr[32..36].copy_from_slice(&flags.to_le_bytes());
        hdr[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
        hdr[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(&p.payload[..p.payload.len().min(data_len)]);
        bytes.resize(HDR_LEN as usize + data_len, 0);
        let base = self.alloc_tx(bytes.len() as u64);
        self.write(base, &bytes);
        let (h, d) = (base, base + HDR_LEN);
        let dl = data_len as u32;
        let mut descs = match p.layout {
            Layout::Separate | Layout::Indirect | Layout::WriteOnly => vec![(h, HDR_LEN as u32, 0)],
            Layout::Together => vec![(h, HDR_LEN as u32 + dl, 0)],
            Layout::SplitHeader(at) => {
                let at = u32::from(at) % HDR_LEN as u32;
                vec![(h, at, 0), (h + u64::from(at), HDR_LEN as u32 - at, 0)]
            }
            Layout::Chunks(_) => vec![(h, HDR_LEN as u32, 0)],
        };
        if dl > 0 && !matches!(p.layout, Layout::Together | Layout::SplitHeader(_)) {
            match p.layout {
                Layout::Chunks(k) => {
                    let k = u32::from(k % 4) + 1;
                    let step = dl.div_ceil(k);
                    let mut off = 0;
                    while off < dl {
                        let n = step.min(dl - off);
                        descs.push((d + u64::from(off), n, 0));
                        off += n;
                    }
                }
                _ => descs.push((d, dl, 0)),
            }
        }
        if let Layout::WriteOnly = p.layout {
            for desc in &mut descs {
                desc.2 |= VIRTQ_DESC_F_WRITE;
            }
        }
        if let Layout::Indirect = p.layout {
            let table = self.alloc_tx(descs.len() as u64 * 16);
            for (i, &(addr, len, _)) in descs.iter().enumerate() {
                let last = i + 1 == descs.len();
                let mut e = [0u8; 16];
                e[..8].copy_from_slice(&addr.to_le_bytes());
                e[8..12].copy_from_slice(&len.to_le_bytes());
                let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
                e[12..14].copy_from_slice(&flags.to_le_bytes());
                e[14..].copy_from_slice(&(if last { 0 } else { i as u16 + 1 }).to_le_bytes());
                self.write(table + i as u64 * 16, &e);
            }
            descs = vec![(table, descs.len() as u32 * 16, VIRTQ_DESC_F_INDIRECT)];
        }
        self.post(1, &descs, h, 0);
    }

    fn post_rx(&mut self, data: u16, split: bool) {
        let data = u64::from(data) % (64 * 1024 + 64);
        let base = self.alloc_rx(HDR_LEN + data);
        let w = VIRTQ_DESC_F_WRITE;
        let descs = if split && data > 0 {
            vec![(base, HDR_LEN as u32, w), (base + HDR_LEN, data as u32, w)]
        } else {
            vec![(base, (HDR_LEN + data) as u32, w)]
        };
        self.post(0, &descs, base, data);
    }

    fn post_event(&mut self, len: u8) {
        let addr = self.alloc_tx(u64::from(len));
        self.post(
            2,
            &[(addr, u32::from(len), VIRTQ_DESC_F_WRITE)],
            addr,
            u64::from(len),
        );
    }

    /// Checks what the device put in the used rings since the last look.
    fn check_used(&mut self) {
        for q in 0..3 {
            let size = self.queues[q].size;
            let used = used_ring(q);
            let idx = u16::from_le_bytes(self.read(used + 2));
            let new = idx.wrapping_sub(self.queues[q].used_seen);
            if self.well_behaved {
                assert!(
                    new <= size,
                    "queue {q}: {new} used entries at once, size {size}"
                );
            }
            for i in 0..new.min(size) {
                let slot = self.queues[q].used_seen.wrapping_add(i) % size;
                let entry: [u8; 8] = self.read(used + 4 + u64::from(slot) * 8);
                let id = u32::from_le_bytes(entry[..4].try_into().unwrap());
                let len = u32::from_le_bytes(entry[4..].try_into().unwrap());
                let posted = u16::try_from(id)
                    .ok()
                    .and_then(|id| self.queues[q].in_flight.remove(&id));
                if let Some((_, hdr_addr, _)) = posted.filter(|_| q == 0 && len as u64 >= HDR_LEN) {
                    self.learn_port(hdr_addr);
                }
                if !self.well_behaved {
                    continue;
                }
                let Some((n, hdr_addr, writable)) = posted else {
                    panic!("queue {q}: the device used chain {id}, which the guest did not post");
                };
                self.queues[q].descs_in_flight -= u32::from(n);
                match q {
                    0 if len > 0 => self.check_rx_packet(hdr_addr, writable, len),
                    1 => assert_eq!(len, 0, "tx used length"),
                    2 => assert!(len == 0 || len == 4, "event used length {len}"),
                    _ => {}
                }
            }
            self.queues[q].used_seen = idx;
        }
    }

    /// Remembers the host port of a connection request the device wrote
    /// at `hdr_addr`.
    fn learn_port(&mut self, hdr_addr: u64) {
        let hdr: [u8; HDR_LEN as usize] = self.read(hdr_addr);
        let op = u16::from_le_bytes([hdr[30], hdr[31]]);
        let src_port = u32::from_le_bytes(hdr[16..20].try_into().unwrap());
        if op == 1 && self.host_ports.len() < MAX_LEARNED_PORTS {
            self.host_ports.push(src_port);
        }
    }

    fn check_rx_packet(&mut self, hdr_addr: u64, writable: u64, used_len: u32) {
        let hdr: [u8; HDR_LEN as usize] = self.read(hdr_addr);
        let u64_at = |o: usize| u64::from_le_bytes(hdr[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(hdr[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(hdr[o..o + 2].try_into().unwrap());
        let (src, dst, len, type_, op) = (u64_at(0), u64_at(8), u32_at(24), u16_at(28), u16_at(30));
        if trace() {
            self.rx_ops.push(op);
        }
        let what =
            format!("rx packet {src}->{dst} op {op} len {len}, used {used_len}, room {writable}");
        assert_eq!((src, dst, type_), (HOST_CID, GUEST_CID, 1), "{what}");
        assert!((1..=7).contains(&op), "{what}");
        assert_eq!(u64::from(used_len), HDR_LEN + u64::from(len), "{what}");
        assert!(u64::from(len) <= writable, "{what}");
        if op != 5 {
            assert_eq!(len, 0, "{what}");
        }
    }
}

struct Host {
    /// Bytes host sockets read (for EMBER_FUZZ_TRACE).
    read: usize,
    backend: InProcessBackend,
    streams: Vec<UnixStream>,
    listeners: Vec<Receiver<UnixStream>>,
}

impl Host {
    fn adopt(&mut self, stream: UnixStream) {
        if self.streams.len() < MAX_HOST_STREAMS && stream.set_nonblocking(true).is_ok() {
            self.streams.push(stream);
        }
    }

    fn accept(&mut self) {
        let mut accepted = Vec::new();
        for rx in &self.listeners {
            while let Ok(stream) = rx.try_recv() {
                accepted.push(stream);
            }
        }
        for stream in accepted {
            self.adopt(stream);
        }
    }

    fn stream(&mut self, conn: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[usize::from(conn) % n])
    }
}

struct Vmm {
    guest: Guest,
    host: Host,
    device: Arc<Mutex<Vsock>>,
    events: EventManager<VsockEvents>,
    setup_queues: [QueueState; 3],
}

impl Vmm {
    fn new(setup: &Setup) -> Option<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let mut snaps = [QueueState {
            max_size: 0,
            size: 0,
            ready: true,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: setup.event_idx,
        }; 3];
        let mut queues: [DriverQueue; 3] = Default::default();
        for q in 0..3 {
            let size = (1u16 << (setup.size_log2[q] % 9)).min(MAX_SIZES[q]);
            let (next_avail, next_used) = setup.positions.map_or((0, 0), |p| p[q]);
            snaps[q].max_size = MAX_SIZES[q];
            snaps[q].size = size;
            snaps[q].desc_table = desc_table(q);
            snaps[q].avail_ring = avail_ring(q);
            snaps[q].used_ring = used_ring(q);
            snaps[q].next_avail = next_avail;
            snaps[q].next_used = next_used;
            queues[q] = DriverQueue {
                size,
                avail_idx: next_avail,
                used_seen: next_used,
                ..Default::default()
            };
            // The rings' indices as they would be in memory.
            mem.write_slice(&next_avail.to_le_bytes(), GuestAddress(avail_ring(q) + 2))
                .unwrap();
            mem.write_slice(&next_used.to_le_bytes(), GuestAddress(used_ring(q) + 2))
                .unwrap();
        }
        let hub = VsockHub::new().expect("hub");
        let backend = InProcessBackend::new(hub.clone());
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")));
        let device =
            Vsock::new(GUEST_CID, interrupt, Box::new(backend.clone()), hub).expect("vsock device");
        let device = Arc::new(Mutex::new(device));
        let mut events = EventManager::new().expect("event manager");
        events.add_subscriber(VsockEvents::new(device.clone()));
        let mut vmm = Vmm {
            guest: Guest {
                mem,
                queues,
                rx_next: RX_AREA.0,
                tx_next: TX_AREA.0,
                well_behaved: true,
                rx_ops: Vec::new(),
                host_ports: Vec::new(),
            },
            host: Host {
                read: 0,
                backend,
                streams: Vec::new(),
                listeners: Vec::new(),
            },
            device,
            events,
            setup_queues: snaps,
        };
        vmm.activate(&snaps).then_some(vmm)
    }

    fn activate(&mut self, snaps: &[QueueState; 3]) -> bool {
        let queues: Option<Vec<Queue>> = snaps
            .iter()
            .map(|s| s.to_queue(&self.guest.mem).ok())
            .collect();
        let Some(queues) = queues else {
            return false;
        };
        let activation = Activation {
            memory: self.guest.mem.clone(),
            queues,
        };
        self.device
            .lock()
            .unwrap()
            .activate(activation)
            .expect("activate");
        true
    }

    /// Runs the event loop until it has nothing to do.
    fn run(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let n = self.events.run_with_timeout(0).expect("event loop");
            self.host.accept();
            self.guest.check_used();
            if n == 0 {
                return;
            }
        }
        panic!("the event loop still has events after {MAX_ROUNDS} rounds");
    }

    /// Driver reset: the device stops, the guest rewrites its rings from
    /// scratch (at the set-up positions) and the device starts again.
    fn device_reset(&mut self) {
        self.device.lock().unwrap().reset();
        self.guest.write(RINGS, &vec![0u8; 0x9000]);
        let snaps = self.setup_queues;
        for (q, s) in snaps.iter().enumerate() {
            let queue = &mut self.guest.queues[q];
            *queue = DriverQueue {
                size: s.size,
                avail_idx: s.next_avail,
                used_seen: s.next_used,
                ..Default::default()
            };
            self.guest
                .write(avail_ring(q) + 2, &s.next_avail.to_le_bytes());
            self.guest
                .write(used_ring(q) + 2, &s.next_used.to_le_bytes());
        }
        assert!(self.activate(&snaps), "the set-up queues were valid before");
    }

    /// The device's queues go through their snapshot form, as in a
    /// snapshot and restore; the restored device starts with no connection.
    fn save_restore(&mut self) {
        let snaps: Vec<QueueState> = {
            let dev = self.device.lock().unwrap();
            match dev.active_queues() {
                Some(queues) => queues.iter().map(QueueState::of).collect(),
                None => return,
            }
        };
        let snaps: [QueueState; 3] = snaps.try_into().expect("three queues");
        self.device.lock().unwrap().reset();
        assert!(
            self.activate(&snaps),
            "a live queue's snapshot must restore"
        );
        self.device.lock().unwrap().send_transport_reset();
    }

    fn act(&mut self, action: &Action) {
        match action {
            Action::Poke { addr, bytes } => {
                let addr = u64::from(*addr) % MEM_SIZE;
                let n = bytes.len().min((MEM_SIZE - addr) as usize);
                self.guest.write(addr, &bytes[..n]);
                self.guest.well_behaved = false;
            }
            Action::Send(packet) => self.guest.send(packet),
            Action::PostRx { count, data, split } => {
                for _ in 0..(count % 16) + 1 {
                    self.guest.post_rx(*data, *split);
                }
            }
            Action::PostEvent { len } => self.guest.post_event(*len),
            Action::Kick { queue } => {
                let dev = self.device.lock().unwrap();
                let _ = dev.queue_events()[usize::from(*queue) % 3].write(1);
                drop(dev);
                self.run();
            }
            Action::Run => self.run(),
            Action::HostConnect(port) => {
                if self.host.streams.len() < MAX_HOST_STREAMS {
                    if let Ok(stream) = self.host.backend.connect(port.get(&self.guest.host_ports))
                    {
                        self.host.adopt(stream);
                    }
                }
            }
            Action::HostListen(port) => {
                if self.host.listeners.len() < MAX_LISTENERS {
                    let port = port.get(&self.guest.host_ports);
                    self.host.listeners.push(self.host.backend.listen(port));
                }
            }
            Action::HostWrite { conn, len, byte } => {
                if let Some(stream) = self.host.stream(*conn) {
                    let _ = stream.write(&vec![*byte; usize::from(*len)]);
                }
            }
            Action::HostRead { conn } => {
                let mut read = 0;
                if let Some(stream) = self.host.stream(*conn) {
                    let mut buf = [0u8; 16 * 1024];
                    for _ in 0..64 {
                        match stream.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => read += n,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                }
                self.host.read += read;
            }
            Action::HostShutdown { conn, how } => {
                if let Some(stream) = self.host.stream(*conn) {
                    let how =
                        [Shutdown::Read, Shutdown::Write, Shutdown::Both][usize::from(*how % 3)];
                    let _ = stream.shutdown(how);
                }
            }
            Action::HostClose { conn } => {
                if !self.host.streams.is_empty() {
                    let n = self.host.streams.len();
                    self.host.streams.swap_remove(usize::from(*conn) % n);
                }
            }
            Action::TransportReset => self.device.lock().unwrap().send_transport_reset(),
            Action::DeviceReset => self.device_reset(),
            Action::SaveRestore => self.save_restore(),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let input = parse(data);
    let Some(mut vmm) = Vmm::new(&input.setup) else {
        return;
    };
    for action in input.actions.iter().take(MAX_ACTIONS) {
        vmm.act(action);
    }
    // Whatever was left pending is processed, and must settle.
    vmm.run();
    if trace() {
        eprintln!(
            "trace: well_behaved {} rx_ops {:?} host_read {} host_streams {}",
            vmm.guest.well_behaved,
            vmm.guest.rx_ops,
            vmm.host.read,
            vmm.host.streams.len()
        );
    }
});
