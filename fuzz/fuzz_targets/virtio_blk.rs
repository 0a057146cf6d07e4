//! The virtio-blk device model against a hostile guest.
//!
//! The real `Block` device, over a 64 KiB read-only disk image, runs on a
//! real event-manager loop over 512 KiB of fake guest memory. The fuzz
//! input is a script: a driver posts requests whose type, sector, data
//! segments, header and status descriptors and layout (direct or
//! indirect) the input picks, may also poke any guest bytes (rings,
//! descriptors, buffers), notifies the queue, and resets or saves and
//! restores the device in between.
//!
//! Checks: no panic; the event loop goes quiet on its own; the disk image
//! is never modified. While the guest played by the rules (no raw pokes),
//! every used-ring entry names a chain the guest posted, with the used
//! length and status byte a model of the device predicts, reads deliver
//! the disk's bytes, and the device wrote guest memory only in the used
//! ring and in device-writable descriptors of the requests it completed.

#![no_main]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use ember::devices::virtio::block::disk::DiskImage;
use ember::devices::virtio::block::request::{
    header_bytes, ID_LEN, MAX_DESCRIPTORS, MAX_REQUEST_BYTES, STATUS_IOERR, STATUS_OK,
    STATUS_UNSUPP,
};
use ember::devices::virtio::block::{Block, BlockEvents, QUEUE_SIZE, ROOT_DRIVE_ID};
use ember::devices::virtio::{Activation, Interrupt, QueueState, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: u64 = 1 << 20;
const DISK_LEN: usize = 64 << 10;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
/// Indirect descriptor tables.
const INDIRECT_AREA: (u64, u64) = (0x4000, 0x1_0000);
/// Headers and status bytes: room for a full ring of requests.
const SMALL_AREA: (u64, u64) = (0x1_0000, 0x3_0000);
/// Data buffers.
const DATA_AREA: (u64, u64) = (0x3_0000, MEM_SIZE);
const MAX_ACTIONS: usize = 128;
/// Event-loop rounds after which a loop that still has events is spinning.
const MAX_ROUNDS: usize = 64;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const WRITE_TYPES: [u32; 4] = [T_OUT, 11, 13, 14];
const KNOWN_TYPES: [u32; 7] = [T_IN, T_OUT, T_FLUSH, T_GET_ID, 11, 13, 14];

/// The disk's byte at `offset`.
fn disk_byte(offset: usize) -> u8 {
    (offset as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8 ^ (offset / 512) as u8
}

/// The disk image, made once per process, and a handle of our own on it
/// to check that it never changes.
fn disk() -> &'static (File, Arc<DiskImage>) {
    static DISK: OnceLock<(File, Arc<DiskImage>)> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ember-fuzz-blk-{}.img", std::process::id()));
        let bytes: Vec<u8> = (0..DISK_LEN).map(disk_byte).collect();
        std::fs::write(&path, bytes).expect("disk image");
        let disk = DiskImage::open(&path).expect("disk image opens");
        let ours = File::open(&path).expect("disk image");
        // The file can go: the open descriptors keep it.
        let _ = std::fs::remove_file(&path);
        (ours, Arc::new(disk))
    })
}

/// Reads input bytes; zeros once they run out.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }
}

#[derive(Debug, Clone, Copy)]
enum Place {
    /// Allocated in guest memory.
    Inside,
    /// Starting past the end of guest memory.
    Beyond(u16),
    /// Near the top of the address space (address arithmetic overflows).
    Top(u16),
    /// Straddling the end of guest memory.
    Straddle(u16),
}

#[derive(Debug, Clone, Copy)]
struct Seg {
    len: u32,
    writable: bool,
    place: Place,
}

#[derive(Debug, Clone, Copy)]
enum Status {
    Normal,
    ReadOnly,
    Empty,
    Long(u8),
    Outside,
}

#[derive(Debug)]
struct Request {
    request_type: u32,
    sector: u64,
    segs: Vec<Seg>,
    header_len: u32,
    header_writable: bool,
    status: Status,
    indirect: bool,
}

#[derive(Debug)]
enum Action {
    Request(Request),
    Poke { addr: u32, bytes: Vec<u8> },
    Kick,
    DeviceReset,
    SaveRestore,
}

#[derive(Debug)]
struct Input {
    size_log2: u8,
    start: u16,
    actions: Vec<Action>,
}

fn parse(data: &[u8]) -> Input {
    let mut c = Cursor(data);
    let size_log2 = c.u8();
    let start = if c.u8() % 4 == 0 { c.u16() } else { 0 };
    let mut actions = Vec::new();
    while !c.0.is_empty() && actions.len() < MAX_ACTIONS {
        let action = match c.u8() % 16 {
            0..=8 => Action::Request(request(&mut c)),
            9..=11 => Action::Kick,
            12 => {
                let addr = c.u32();
                let n = usize::from(c.u8() % 64);
                Action::Poke {
                    addr,
                    bytes: c.bytes(n),
                }
            }
            13 => Action::DeviceReset,
            14 => Action::SaveRestore,
            _ => Action::Kick,
        };
        actions.push(action);
    }
    Input {
        size_log2,
        start,
        actions,
    }
}

fn request(c: &mut Cursor) -> Request {
    let request_type = match c.u8() % 12 {
        0..=4 => T_IN,
        5 => T_OUT,
        6 => T_FLUSH,
        7 => T_GET_ID,
        8 => WRITE_TYPES[usize::from(c.u8()) % WRITE_TYPES.len()],
        9 => u32::from(c.u8()),
        _ => c.u32(),
    };
    let sectors = (DISK_LEN / 512) as u64;
    let sector = match c.u8() % 6 {
        0..=2 => u64::from(c.u8()) % sectors,
        3 => sectors.saturating_sub(u64::from(c.u8() % 8)),
        4 => u64::MAX / 512 - u64::from(c.u8() % 4),
        _ => c.u64(),
    };
    let flags = c.u8();
    let nsegs = if flags & 0xf0 == 0xf0 {
        // Around the descriptor limit.
        MAX_DESCRIPTORS - 4 + usize::from(c.u8() % 8)
    } else {
        usize::from(flags % 6)
    };
    let mut segs = Vec::with_capacity(nsegs);
    for _ in 0..nsegs {
        let b = c.u8();
        let len = match b % 8 {
            0..=4 => (u32::from(c.u8() % 16) + 1) * 512,
            5 => u32::from(c.u16()),
            6 => (u32::from(c.u8() % 4) + 1) * 64 * 1024,
            _ => c.u32(),
        };
        let place = match (b >> 3) % 16 {
            0..=11 => Place::Inside,
            12 => Place::Beyond(c.u16()),
            13 => Place::Top(c.u16()),
            _ => Place::Straddle(c.u16()),
        };
        segs.push(Seg {
            len,
            writable: (b >> 7 == 0) == (request_type != T_OUT),
            place,
        });
    }
    // Zero bytes (a short input) make the ordinary layout.
    let layout = c.u8();
    let header_len = match layout % 16 {
        14 => u32::from(c.u8() % 16),
        15 => 16 + u32::from(c.u8()),
        _ => 16,
    };
    let status = match (layout >> 4) % 16 {
        12 => Status::ReadOnly,
        13 => Status::Empty,
        14 => Status::Long(c.u8()),
        15 => Status::Outside,
        _ => Status::Normal,
    };
    Request {
        request_type,
        sector,
        segs,
        header_len,
        header_writable: layout % 16 == 13,
        status,
        indirect: c.u8() % 4 == 3,
    }
}

/// What the driver expects back for a chain it posted.
#[derive(Debug, Clone)]
struct Expect {
    /// The used length, and the status byte at `status_addr` (None: the
    /// request is handed back with length 0 and no status).
    result: Option<(u32, u8)>,
    status_addr: u64,
    /// For a successful read: each data buffer and its disk offset.
    reads: Vec<(u64, u32, u64)>,
    /// Ranges the device may write (data and status descriptors).
    writable: Vec<(u64, u64)>,
}

struct Guest {
    mem: GuestMemoryMmap,
    /// What guest memory should hold, but for the device's writes.
    shadow: Vec<u8>,
    scratch: Vec<u8>,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    in_flight: HashMap<u16, Expect>,
    small_next: u64,
    data_next: u64,
    indirect_next: u64,
    well_behaved: bool,
    /// Completions checked, by status (OK, IOERR, UNSUPP, none), for
    /// EMBER_FUZZ_TRACE.
    seen: [u32; 4],
}

/// Set EMBER_FUZZ_TRACE to print what each input achieved.
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("EMBER_FUZZ_TRACE").is_some())
}

impl Guest {
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("guest write inside memory");
        let a = addr as usize;
        self.shadow[a..a + bytes.len()].copy_from_slice(bytes);
    }

    fn read<const N: usize>(&self, addr: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.mem
            .read_slice(&mut b, GuestAddress(addr))
            .expect("guest read");
        b
    }

    /// Room for `len` bytes in `area`, after what requests in flight use
    /// (None: the device must complete them first). A buffer larger than
    /// the area starts at its start, over others (the checks allow for
    /// overlapping data buffers).
    fn alloc(next: &mut u64, area: (u64, u64), len: u64) -> Option<u64> {
        let len = len.max(1);
        if len > area.1 - area.0 {
            return Some(area.0);
        }
        if *next + len > area.1 {
            return None;
        }
        let at = *next;
        *next += len.next_multiple_of(8);
        Some(at)
    }

    fn place(&mut self, seg: &Seg) -> Option<u64> {
        let len = u64::from(seg.len);
        Some(match seg.place {
            Place::Inside => Self::alloc(&mut self.data_next, DATA_AREA, len)?,
            Place::Beyond(k) => MEM_SIZE + u64::from(k) * 512,
            Place::Top(k) => u64::MAX - u64::from(k),
            Place::Straddle(k) => MEM_SIZE - (u64::from(k) % 4096 + 1),
        })
    }

    /// Whether `len` bytes at `addr` are all guest memory (nothing is
    /// always inside).
    fn inside(addr: u64, len: u64) -> bool {
        len == 0 || addr.checked_add(len).is_some_and(|end| end <= MEM_SIZE)
    }

    /// Posts `r` if the rings have room (else kicks first: the caller's
    /// `flush`); returns false if it did not fit even in empty rings.
    fn post(&mut self, r: &Request) -> bool {
        let direct = if r.indirect {
            1
        } else {
            r.segs.len() as u16 + 2
        };
        if direct > self.size {
            return false;
        }
        if self.next_desc + direct > self.size || self.in_flight.len() >= usize::from(self.size) {
            return false;
        }
        // Everything is allocated before anything is written: a request
        // that does not fit yet changes nothing.
        let Some(header) = Self::alloc(&mut self.small_next, SMALL_AREA, 16 + 255) else {
            return false;
        };
        let mut seg_addrs = Vec::new();
        for seg in &r.segs {
            let Some(addr) = self.place(seg) else {
                return false;
            };
            seg_addrs.push(addr);
        }
        let status_addr = match r.status {
            Status::Outside => MEM_SIZE + 64,
            _ => match Self::alloc(&mut self.small_next, SMALL_AREA, 256) {
                Some(addr) => addr,
                None => return false,
            },
        };
        let table = if r.indirect {
            let len = (r.segs.len() as u64 + 2) * 16;
            match Self::alloc(&mut self.indirect_next, INDIRECT_AREA, len) {
                Some(table) => table,
                None => return false,
            }
        } else {
            0
        };
        self.write(header, &header_bytes(r.request_type, r.sector));
        let mut descs: Vec<(u64, u32, u16)> = vec![(
            header,
            r.header_len,
            if r.header_writable { F_WRITE } else { 0 },
        )];
        for (seg, &addr) in r.segs.iter().zip(&seg_addrs) {
            descs.push((addr, seg.len, if seg.writable { F_WRITE } else { 0 }));
        }
        let status_len = match r.status {
            Status::Empty => 0,
            Status::Long(n) => u32::from(n) + 1,
            _ => 1,
        };
        let status_flags = if matches!(r.status, Status::ReadOnly) {
            0
        } else {
            F_WRITE
        };
        descs.push((status_addr, status_len, status_flags));
        let status_byte_addr = status_addr + u64::from(status_len.max(1) - 1);
        if Self::inside(status_byte_addr, 1) {
            // A sentinel the device must overwrite (or leave).
            self.write(status_byte_addr, &[0xee]);
        }
        let expect = self.model(r, &descs, &seg_addrs, status_byte_addr);
        let head = self.next_desc;
        let chain: Vec<(u64, u32, u16)> = if r.indirect {
            self.write_table(table, 0, &descs);
            vec![(table, descs.len() as u32 * 16, F_INDIRECT)]
        } else {
            descs
        };
        self.write_table(DESC_TABLE, head, &chain);
        self.next_desc += chain.len() as u16;
        let slot = AVAIL_RING + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(AVAIL_RING + 2, &self.avail_idx.to_le_bytes());
        self.in_flight.insert(head, expect);
        true
    }

    /// Writes `descs` as a chain into the table at `table`, from `first`.
    fn write_table(&mut self, table: u64, first: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == descs.len();
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let flags = if last { flags } else { flags | F_NEXT };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            let next = if last { 0 } else { index + 1 };
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.write(table + u64::from(index) * 16, &d);
        }
    }

    /// What the device should do with this chain (see the request module).
    fn model(
        &self,
        r: &Request,
        descs: &[(u64, u32, u16)],
        seg_addrs: &[u64],
        status_byte: u64,
    ) -> Expect {
        let (status_addr, status_len, status_flags) = descs[descs.len() - 1];
        let mut writable: Vec<(u64, u64)> = descs
            .iter()
            .filter(|d| d.2 & F_WRITE != 0)
            .map(|d| (d.0, d.0.saturating_add(u64::from(d.1))))
            .collect();
        writable.retain(|w| w.0 < MEM_SIZE);
        let mut expect = Expect {
            result: None,
            status_addr: status_byte,
            reads: Vec::new(),
            writable,
        };
        let _ = status_addr;
        // A chain of 4 GiB or more is cut short by the queue's iterator:
        // not modelled, only checked for safety.
        let total: u64 = descs.iter().map(|d| u64::from(d.1)).sum();
        if total > u64::from(u32::MAX) {
            expect.result = Some((u32::MAX, 0xff));
            return expect;
        }
        if status_flags & F_WRITE == 0 || status_len == 0 || !Self::inside(status_byte, 1) {
            return expect;
        }
        let err = |code: u8| Some((1, code));
        let data = &r.segs;
        expect.result = if descs.len() > MAX_DESCRIPTORS {
            err(STATUS_IOERR)
        } else if r.header_writable || r.header_len < 16 {
            err(STATUS_IOERR)
        } else {
            match r.request_type {
                T_IN => {
                    let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
                    let end = r.sector.checked_mul(512).and_then(|s| s.checked_add(len));
                    if data.is_empty()
                        || data.iter().any(|s| !s.writable)
                        || len % 512 != 0
                        || len > MAX_REQUEST_BYTES
                        || end.map_or(true, |e| e > DISK_LEN as u64)
                        || data
                            .iter()
                            .zip(seg_addrs)
                            .any(|(s, &a)| !Self::inside(a, u64::from(s.len)))
                    {
                        err(STATUS_IOERR)
                    } else {
                        let mut offset = r.sector * 512;
                        for (s, &a) in data.iter().zip(seg_addrs) {
                            expect.reads.push((a, s.len, offset));
                            offset += u64::from(s.len);
                        }
                        Some((len as u32 + 1, STATUS_OK))
                    }
                }
                T_GET_ID => match data.first().zip(seg_addrs.first()) {
                    Some((s, &a)) if s.writable => {
                        let n = (s.len as usize).min(ID_LEN) as u32;
                        if Self::inside(a, u64::from(n)) {
                            Some((n + 1, STATUS_OK))
                        } else {
                            err(STATUS_IOERR)
                        }
                    }
                    _ => err(STATUS_IOERR),
                },
                T_FLUSH => Some((1, STATUS_OK)),
                t if KNOWN_TYPES.contains(&t) => err(STATUS_IOERR),
                _ => err(STATUS_UNSUPP),
            }
        };
        expect
    }

    /// Checks what the device put in the used ring since the last look,
    /// and that it wrote nothing else.
    fn check(&mut self) {
        let idx = u16::from_le_bytes(self.read(USED_RING + 2));
        let new = idx.wrapping_sub(self.used_seen);
        let mut allowed = vec![(USED_RING, USED_RING + 6 + 8 * u64::from(self.size))];
        if self.well_behaved {
            assert!(
                new <= self.size,
                "{new} used entries at once, size {}",
                self.size
            );
        }
        let mut done = Vec::new();
        for i in 0..new.min(self.size) {
            let slot = self.used_seen.wrapping_add(i) % self.size;
            let entry: [u8; 8] = self.read(USED_RING + 4 + u64::from(slot) * 8);
            let id = u32::from_le_bytes(entry[..4].try_into().unwrap());
            let len = u32::from_le_bytes(entry[4..].try_into().unwrap());
            let posted = u16::try_from(id)
                .ok()
                .and_then(|id| self.in_flight.remove(&id));
            if !self.well_behaved {
                continue;
            }
            let Some(expect) = posted else {
                panic!("the device used chain {id}, which the guest did not post");
            };
            allowed.extend(expect.writable.iter().copied());
            done.push((len, expect));
        }
        // Reads are checked once the whole batch is done: a byte that a
        // later request (or a later buffer or the status of the same one)
        // may have written since is not the read's to vouch for.
        for (k, (len, expect)) in done.iter().enumerate() {
            match expect.result {
                // Not modelled (a chain cut short).
                Some((u32::MAX, _)) => {}
                None => {
                    self.seen[3] += 1;
                    assert_eq!(*len, 0, "used length of a chain without status");
                    if Self::inside(expect.status_addr, 1) {
                        let [b] = self.read::<1>(expect.status_addr);
                        assert_eq!(b, 0xee, "status written to an unusable descriptor");
                    }
                }
                Some((want_len, want_status)) => {
                    self.seen[usize::from(want_status.min(2))] += 1;
                    let [b] = self.read::<1>(expect.status_addr);
                    assert_eq!((*len, b), (want_len, want_status), "{expect:?}");
                    for (r, &(addr, n, offset)) in expect.reads.iter().enumerate() {
                        let mut got = vec![0u8; n as usize];
                        self.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                        let overwritten = |x: u64| {
                            let within = |&(s, e): &(u64, u64)| s <= x && x < e;
                            x == expect.status_addr
                                || expect.reads[r + 1..]
                                    .iter()
                                    .any(|&(a, n, _)| within(&(a, a + u64::from(n))))
                                || done[k + 1..]
                                    .iter()
                                    .any(|(_, e)| e.writable.iter().any(within))
                        };
                        for (i, byte) in got.iter().enumerate() {
                            if !overwritten(addr + i as u64) {
                                assert_eq!(*byte, disk_byte(offset as usize + i), "read data");
                            }
                        }
                    }
                }
            }
        }
        self.used_seen = idx;
        if self.in_flight.is_empty() {
            self.next_desc = 0;
            self.small_next = SMALL_AREA.0;
            self.data_next = DATA_AREA.0;
            self.indirect_next = INDIRECT_AREA.0;
        }
        // Everything the device wrote must be in an allowed range; then
        // the shadow catches up with it.
        let mut now = std::mem::take(&mut self.scratch);
        now.resize(MEM_SIZE as usize, 0);
        self.mem.read_slice(&mut now, GuestAddress(0)).unwrap();
        if self.well_behaved {
            for (chunk, (a, b)) in now.chunks(256).zip(self.shadow.chunks(256)).enumerate() {
                if a == b {
                    continue;
                }
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    let i = (chunk * 256 + j) as u64;
                    assert!(
                        x == y || allowed.iter().any(|&(s, e)| s <= i && i < e),
                        "the device wrote guest byte {i:#x} outside any writable buffer"
                    );
                }
            }
        }
        self.scratch = std::mem::replace(&mut self.shadow, now);
    }
}

struct Vmm {
    guest: Guest,
    device: Arc<Mutex<Block>>,
    events: EventManager<BlockEvents>,
    start: u16,
}

impl Vmm {
    fn new(input: &Input) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let size = (1u16 << (input.size_log2 % 9)).min(QUEUE_SIZE);
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")));
        let device = Block::new(disk().1.clone(), ROOT_DRIVE_ID, irq).expect("device");
        let device = Arc::new(Mutex::new(device));
        let mut events = EventManager::new().expect("event manager");
        events.add_subscriber(BlockEvents::new(device.clone()));
        let mut vmm = Vmm {
            guest: Guest {
                mem,
                shadow: vec![0u8; MEM_SIZE as usize],
                scratch: Vec::new(),
                size,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                in_flight: HashMap::new(),
                small_next: SMALL_AREA.0,
                data_next: DATA_AREA.0,
                indirect_next: INDIRECT_AREA.0,
                well_behaved: true,
                seen: [0; 4],
            },
            device,
            events,
            start: input.start,
        };
        vmm.start_rings(input.start, input.start);
        vmm
    }

    /// Fresh rings at the given positions; the device starts on them.
    fn start_rings(&mut self, next_avail: u16, next_used: u16) {
        let g = &mut self.guest;
        g.write(DESC_TABLE, &vec![0u8; 0x3000]);
        g.write(AVAIL_RING + 2, &next_avail.to_le_bytes());
        g.write(USED_RING + 2, &next_used.to_le_bytes());
        g.avail_idx = next_avail;
        g.used_seen = next_used;
        g.next_desc = 0;
        g.in_flight.clear();
        g.small_next = SMALL_AREA.0;
        g.data_next = DATA_AREA.0;
        g.indirect_next = INDIRECT_AREA.0;
        let size = g.size;
        self.activate(QueueState {
            max_size: QUEUE_SIZE,
            size,
            ready: true,
            desc_table: DESC_TABLE,
            avail_ring: AVAIL_RING,
            used_ring: USED_RING,
            next_avail,
            next_used,
            event_idx_enabled: false,
        });
    }

    fn activate(&mut self, snap: QueueState) {
        let queue = snap.to_queue(&self.guest.mem).expect("valid queue");
        self.device
            .lock()
            .unwrap()
            .activate(Activation {
                memory: self.guest.mem.clone(),
                queues: vec![queue],
            })
            .expect("activate");
    }

    fn run(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let n = self.events.run_with_timeout(0).expect("event loop");
            if n == 0 {
                self.guest.check();
                return;
            }
        }
        panic!("the event loop still has events after {MAX_ROUNDS} rounds");
    }

    fn kick(&mut self) {
        let _ = self.device.lock().unwrap().queue_event().write(1);
        self.run();
    }

    fn act(&mut self, action: &Action) {
        match action {
            Action::Request(r) => {
                if !self.guest.post(r) {
                    // Full rings: let the device empty them, then retry.
                    self.kick();
                    self.guest.post(r);
                }
            }
            Action::Poke { addr, bytes } => {
                let addr = u64::from(*addr) % MEM_SIZE;
                let n = bytes.len().min((MEM_SIZE - addr) as usize);
                self.guest.write(addr, &bytes[..n]);
                self.guest.well_behaved = false;
            }
            Action::Kick => self.kick(),
            Action::DeviceReset => {
                self.device.lock().unwrap().reset();
                let start = self.start;
                self.start_rings(start, start);
                self.run();
            }
            Action::SaveRestore => {
                let snap = {
                    let dev = self.device.lock().unwrap();
                    dev.active_queues().map(|q| QueueState::of(&q[0]))
                };
                if let Some(snap) = snap {
                    self.device.lock().unwrap().reset();
                    self.activate(snap);
                    // A restored device looks at its queue by itself.
                    self.run();
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let input = parse(data);
    if trace() {
        eprintln!("trace: {input:#?}");
    }
    let mut vmm = Vmm::new(&input);
    // Activation looks at the queue once.
    vmm.run();
    for action in &input.actions {
        vmm.act(action);
    }
    vmm.kick();
    if vmm.guest.well_behaved {
        assert!(
            vmm.guest.in_flight.is_empty(),
            "{} requests never completed",
            vmm.guest.in_flight.len()
        );
    }
    if trace() {
        eprintln!(
            "trace: well_behaved {} ok/ioerr/unsupp/no-status {:?}",
            vmm.guest.well_behaved, vmm.guest.seen
        );
    }
    // The image is as it was.
    let mut on_disk = vec![0u8; DISK_LEN + 1];
    let n = disk()
        .0
        .read_at(&mut on_disk, 0)
        .expect("read the disk image back");
    assert_eq!(n, DISK_LEN, "the disk image changed size");
    assert!(
        on_disk[..n]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == disk_byte(i)),
        "the disk image changed"
    );
});
