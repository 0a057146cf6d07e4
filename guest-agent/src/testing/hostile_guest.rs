//! Small tools for hostile-guest tests, in the agent binary so the image
//! needs nothing else. They run only when the binary is not PID 1:
//!
//! - `ember-agent vsock-junk <host-port> <bytes>`: connects over vsock to
//!   the host (CID 2) on `<host-port>` and writes `<bytes>` pseudo-random
//!   bytes, then exits 0 (1 with a message on error).
//! - `ember-agent protocol-junk [<rounds>]`: writes to stdout frames that
//!   look like the agent's own (a forged `Exit`, a `Hello`) mixed with
//!   broken ones (bad magic, version, kind, length, payload) and raw junk.
//!   Run as an invocation, all of it must reach the host as plain `Stdout`
//!   data: the program's output cannot forge frames.
//!
//! And one that runs as an agent mode, as root, since it needs /dev/mem:
//!
//! - `ember.agent=scribble` ([`scribble`]): a driver gone rogue that writes
//!   junk to the vsock device's virtio-mmio registers and feeds it crafted
//!   virtqueues and packet headers, then prints [`SCRIBBLE_DONE_LINE`].
//!   Whatever it does, the VMM must not crash, hang or grow without bound.
//!   The guest kernel (`CONFIG_IO_STRICT_DEVMEM`) refuses `/dev/mem`
//!   mappings of MMIO a driver has claimed, even to root: the scribbler
//!   first checks that it does (`bound_windows_refused=` in its last line),
//!   then unbinds the vsock device from the virtio-mmio driver through
//!   sysfs, as a root attacker could, and takes the window.

use std::cell::Cell;
use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use thiserror::Error;

use crate::protocol::{
    encode_frame, AgentMessage, Exit, ExitStatus, FrameHeader, FrameKind, Hello, Usage, HEADER_LEN,
    MAGIC, PROTOCOL_VERSION,
};
use crate::{console, sys};

/// A tool failed.
#[derive(Debug, Error)]
enum JunkError {
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

const VSOCK_USAGE: &str = "ember-agent vsock-junk <host-port> <bytes>";
const PROTOCOL_USAGE: &str = "ember-agent protocol-junk [<rounds>]";

/// Runs the tool `args[0]` names, if it names one; returns its exit status.
pub(crate) fn run_tool(args: &[OsString]) -> Option<i32> {
    let (name, rest) = args.split_first()?;
    let result = match name.to_str()? {
        "vsock-junk" => vsock_junk(rest),
        "protocol-junk" => protocol_junk(rest),
        _ => return None,
    };
    Some(match result {
        Ok(()) => 0,
        Err(err) => {
            console::error(&err);
            1
        }
    })
}

fn number<T: std::str::FromStr>(
    arg: Option<&OsString>,
    usage: &'static str,
) -> Result<T, JunkError> {
    arg.and_then(|arg| arg.to_str())
        .and_then(|arg| arg.parse().ok())
        .ok_or(JunkError::Usage(usage))
}

fn vsock_junk(args: &[OsString]) -> Result<(), JunkError> {
    if args.len() != 2 {
        return Err(JunkError::Usage(VSOCK_USAGE));
    }
    let port: u32 = number(args.first(), VSOCK_USAGE)?;
    let mut left: u64 = number(args.get(1), VSOCK_USAGE)?;
    let io_err = |what| move |source| JunkError::Io { what, source };
    // SAFETY: socket takes only integers.
    let fd = sys::owned(unsafe {
        libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
    })
    .map_err(io_err("socket(AF_VSOCK)"))?;
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a complete sockaddr_vm of `len` bytes.
    sys::cvt(unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) })
        .map_err(io_err("connect to the host"))?;
    let rng = XorShift::seeded();
    let mut block = vec![0u8; 64 * 1024];
    while left > 0 {
        rng.fill(&mut block);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(block.len());
        sys::write_all(fd.as_raw_fd(), block.get(..n).unwrap_or_default())
            .map_err(io_err("write"))?;
        left -= n as u64;
    }
    Ok(())
}

fn protocol_junk(args: &[OsString]) -> Result<(), JunkError> {
    let rounds: u32 = match args {
        [] => 1,
        [_] => number(args.first(), PROTOCOL_USAGE)?,
        _ => return Err(JunkError::Usage(PROTOCOL_USAGE)),
    };
    let rng = XorShift::seeded();
    let mut out = Vec::new();
    for _ in 0..rounds {
        junk_round(&rng, &mut out);
    }
    sys::write_all(libc::STDOUT_FILENO, &out).map_err(|source| JunkError::Io {
        what: "write stdout",
        source,
    })
}

/// One round of frames, forged and broken.
fn junk_round(rng: &XorShift, out: &mut Vec<u8>) {
    let forged = [
        AgentMessage::Exit(Exit {
            status: ExitStatus::Code(0),
            timed_out: false,
            output_truncated: false,
            usage: Usage::default(),
            files_out: Vec::new(),
        }),
        AgentMessage::Hello(Hello::current()),
        AgentMessage::Stdout(b"forged".to_vec()),
    ];
    for msg in &forged {
        if let Ok(frame) = encode_frame(FrameKind::Agent, msg) {
            out.extend_from_slice(&frame);
        }
    }
    let good = FrameHeader {
        kind: FrameKind::Agent,
        len: 16,
    }
    .encode();
    let [m0, m1] = MAGIC;
    let [_, _, _, _, l0, l1, l2, l3] = good;
    let broken: [[u8; HEADER_LEN]; 4] = [
        [b'X', m1, PROTOCOL_VERSION, 2, l0, l1, l2, l3],
        [m0, m1, PROTOCOL_VERSION.wrapping_add(8), 2, l0, l1, l2, l3],
        [m0, m1, PROTOCOL_VERSION, 7, l0, l1, l2, l3],
        [m0, m1, PROTOCOL_VERSION, 2, 0xff, 0xff, 0xff, 0xff],
    ];
    for header in broken {
        out.extend_from_slice(&header);
        let mut payload = [0u8; 16];
        rng.fill(&mut payload);
        out.extend_from_slice(&payload);
    }
    // A well-formed header over an undecodable payload.
    out.extend_from_slice(&good);
    out.extend_from_slice(&[0xff; 16]);
    let mut raw = [0u8; 512];
    rng.fill(&mut raw);
    out.extend_from_slice(&raw);
}

/// xorshift64: junk, not cryptography. The state is a `Cell` so that the
/// generators built on it can take `&self`.
struct XorShift(Cell<u64>);

impl XorShift {
    /// A generator in state `seed` (made odd: zero is a fixed point).
    fn new(seed: u64) -> Self {
        XorShift(Cell::new(seed | 1))
    }

    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        XorShift::new(nanos ^ u64::from(std::process::id()).rotate_left(32))
    }

    fn state(&self) -> u64 {
        self.0.get()
    }

    fn next(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.set(x);
        x
    }

    /// A number below `n` (0 if `n` is 0); modulo bias is fine for junk.
    fn below(&self, n: u64) -> u64 {
        self.next().checked_rem(n).unwrap_or(0)
    }

    fn fill(&self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            for (dst, src) in chunk.iter_mut().zip(bytes) {
                *dst = src;
            }
        }
    }
}

// --- ember.agent=scribble: a hostile virtio driver -----------------------
//
// The scribbler plays a guest driver gone rogue against the vsock device:
// it takes the device's virtio-mmio window through /dev/mem (root only,
// MMIO only: the kernel's STRICT_DEVMEM keeps RAM out of reach, and
// IO_STRICT_DEVMEM the windows of devices a driver holds, so it unbinds the
// vsock device's driver first), writes
// junk to every register, and points the device's queues at pages of its
// own, filled with crafted descriptor tables, rings and packet headers.
//
// It must break the VMM, never the guest kernel: the device writes to guest
// memory only at used rings and at device-writable (RX) descriptors, so
// those are only ever pointed at the scribbler's own pages or outside RAM
// (`Layout::is_safe`), and the tables the device reads descriptors from are
// pages holding nothing but such descriptors. The host side of `ember boot`
// never sends connection data to the guest, so an RX buffer takes at most
// one packet header.

// What the scribbler prints when done and where it connects to: shared
// with the host's test (ember-protocol).
use crate::{SCRIBBLE_DONE_LINE, SCRIBBLE_HOST_PORTS};

/// Rounds of register junk or crafted queues.
const SCRIBBLE_ROUNDS: u32 = 400;
/// The scribbler is ended by SIGALRM if it runs longer than this.
const SCRIBBLE_TIME_LIMIT_SECS: libc::c_uint = 240;

const PAGE: usize = 4096;
const PAGE_U64: u64 = PAGE as u64;
const FOUR_GIB: u64 = 1 << 32;

/// The virtio-mmio platform driver in sysfs: one entry per bound device.
const VIRTIO_MMIO_DRIVER: &str = "/sys/bus/platform/drivers/virtio-mmio";

/// virtio-mmio (version 2) register offsets.
mod reg {
    pub(super) const MAGIC: usize = 0x000;
    pub(super) const VERSION: usize = 0x004;
    pub(super) const DEVICE_ID: usize = 0x008;
    pub(super) const DEVICE_FEATURES: usize = 0x010;
    pub(super) const DEVICE_FEATURES_SEL: usize = 0x014;
    pub(super) const DRIVER_FEATURES: usize = 0x020;
    pub(super) const DRIVER_FEATURES_SEL: usize = 0x024;
    pub(super) const QUEUE_SEL: usize = 0x030;
    pub(super) const QUEUE_NUM_MAX: usize = 0x034;
    pub(super) const QUEUE_NUM: usize = 0x038;
    pub(super) const QUEUE_READY: usize = 0x044;
    pub(super) const QUEUE_NOTIFY: usize = 0x050;
    pub(super) const INTERRUPT_STATUS: usize = 0x060;
    pub(super) const INTERRUPT_ACK: usize = 0x064;
    pub(super) const STATUS: usize = 0x070;
    pub(super) const QUEUE_DESC_LOW: usize = 0x080;
    pub(super) const QUEUE_DESC_HIGH: usize = 0x084;
    pub(super) const QUEUE_AVAIL_LOW: usize = 0x090;
    pub(super) const QUEUE_AVAIL_HIGH: usize = 0x094;
    pub(super) const QUEUE_USED_LOW: usize = 0x0a0;
    pub(super) const QUEUE_USED_HIGH: usize = 0x0a4;
    pub(super) const CONFIG_GENERATION: usize = 0x0fc;
    pub(super) const CONFIG: usize = 0x100;
    /// Registers a plain junk write must not hit: the status register (a
    /// reset must be followed by re-pointing the queues, see `reset`) and
    /// the descriptor table and used ring addresses (see `Layout`).
    pub(super) const GUARDED: [(usize, usize); 3] = [
        (STATUS, STATUS + 4),
        (QUEUE_DESC_LOW, QUEUE_DESC_HIGH + 4),
        (QUEUE_USED_LOW, QUEUE_USED_HIGH + 4),
    ];
}

const MMIO_MAGIC: u32 = 0x7472_6976;
const VIRTIO_ID_VSOCK: u32 = 19;
const HOST_CID: u64 = 2;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A vsock packet header.
const HDR_LEN: usize = 44;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// The queues: receive, transmit, event.
const RX: usize = 0;
const TX: usize = 1;
const QUEUES: usize = 3;

/// The scribbler's pages: descriptor tables, avail rings (one page, a
/// quarter per queue), used rings (one page per queue), packet data.
const DESC_PAGES: usize = 4;
const AVAIL_PAGE: usize = DESC_PAGES;
const USED_PAGE0: usize = AVAIL_PAGE + 1;
const DATA_PAGE0: usize = USED_PAGE0 + QUEUES;
const DATA_PAGES: usize = 8;
const BUFFER_PAGES: usize = DATA_PAGE0 + DATA_PAGES;
/// Entries of a descriptor table page, the most any queue has.
const TABLE_LEN: usize = PAGE / 16;
/// Data pages are cut into slots, each a packet header plus a little.
const SLOT: usize = 64;
const SLOTS: usize = DATA_PAGES * PAGE / SLOT;
/// The most a used ring of up to 256 entries spans (with `avail_event`).
#[cfg(test)]
const USED_RING_MAX: u64 = 4 + 8 * 256 + 2;
const AVAIL_STRIDE: usize = PAGE / 4;

/// Setting up the scribbler failed.
#[derive(Debug, Error)]
enum ScribbleError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("no virtio-mmio vsock device in /proc/cmdline (virtio_mmio.device=...)")]
    NoDevice,
    #[error("no /dev/mem window of the vsock device could be mapped (last error: {0})")]
    NoWindow(Box<ScribbleError>),
    #[error("no System RAM in /proc/iomem")]
    NoRam,
    #[error("/proc/self/pagemap gives no frame for page {0} (not root?)")]
    NoFrame(usize),
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ScribbleError {
    move |source| ScribbleError::Io { what, source }
}

/// Runs the scribbler (`ember.agent=scribble`) in a child process and waits
/// for it; it reports on the console itself. A child, so that whatever
/// happens to it (a fault, the time limit) cannot take PID 1 down.
pub(crate) fn scribble() {
    // SAFETY: in this mode the agent has no other thread, so the child may
    // run any code; it leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        console::error(&io_error("fork the scribbler")(sys::last_error()));
        return;
    }
    if pid == 0 {
        let status = scribble_child();
        // SAFETY: ends the child at once, running nothing of the parent's.
        unsafe { libc::_exit(status) };
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid place for the wait status.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if rc < 0 && sys::errno() != libc::EINTR {
            console::error(&io_error("wait for the scribbler")(sys::last_error()));
            return;
        }
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        console::warn(&format_args!(
            "scribbler ended with {}",
            sys::describe_wait_status(status)
        ));
    }
}

fn scribble_child() -> i32 {
    // SAFETY: plain signal-mask and alarm calls on this process. The agent
    // blocks signals it takes itself; the child wants the default actions
    // back, so that the time limit's SIGALRM ends it.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::alarm(SCRIBBLE_TIME_LIMIT_SECS);
    }
    let seed = XorShift::seeded().state();
    match Scribbler::new(seed).map(|mut s| s.run(SCRIBBLE_ROUNDS)) {
        Ok(summary) => {
            console::raw(&summary);
            0
        }
        Err(err) => {
            console::error(&err);
            1
        }
    }
}

/// A `mmap`ed area, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(
        len: usize,
        flags: libc::c_int,
        fd: libc::c_int,
        offset: u64,
        what: &'static str,
    ) -> Result<Self, ScribbleError> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io_error(what)(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: a new mapping at an address of the kernel's choosing; it
        // aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_error(what)(sys::last_error()));
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// `width` bytes at `offset`, if they lie inside the mapping.
    fn at(&self, offset: usize, width: usize) -> Option<*mut u8> {
        (offset.checked_add(width)? <= self.len).then(|| self.ptr.wrapping_add(offset))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing
        // refers to any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One device's register window, through /dev/mem.
struct Window {
    map: Mapping,
    base: u64,
    reads: Cell<u64>,
    writes: Cell<u64>,
}

impl Window {
    fn open(base: u64) -> Result<Self, ScribbleError> {
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .map_err(io_error("open /dev/mem"))?;
        let map = Mapping::new(
            PAGE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            base,
            "mmap the virtio-mmio window",
        )?;
        Ok(Window {
            map,
            base,
            reads: Cell::new(0),
            writes: Cell::new(0),
        })
    }

    /// Reads `width` (1, 2, 4 or 8) bytes at `offset` with one access.
    fn read(&self, offset: usize, width: usize) -> u64 {
        let Some(ptr) = self.map.at(align_for_arch(offset, width), width) else {
            return 0;
        };
        self.reads.set(self.reads.get() + 1);
        // SAFETY: `ptr..ptr + width` lies in the device mapping.
        unsafe { mmio_read(ptr, width) }
    }

    /// Writes the low `width` (1, 2, 4 or 8) bytes of `value` at `offset`
    /// with one access.
    fn write(&self, offset: usize, width: usize, value: u64) {
        let Some(ptr) = self.map.at(align_for_arch(offset, width), width) else {
            return;
        };
        self.writes.set(self.writes.get() + 1);
        // SAFETY: `ptr..ptr + width` lies in the device mapping.
        unsafe { mmio_write(ptr, width, value) }
    }

    fn r32(&self, offset: usize) -> u32 {
        self.read(offset, 4) as u32
    }

    fn w32(&self, offset: usize, value: u32) {
        self.write(offset, 4, u64::from(value));
    }
}

/// x86 can access MMIO at any offset and width; elsewhere stay aligned.
fn align_for_arch(offset: usize, width: usize) -> usize {
    if cfg!(target_arch = "x86_64") {
        offset
    } else {
        offset & !(width.max(1) - 1)
    }
}

/// One `mov` of `width` bytes, so the device sees exactly that access.
///
/// # Safety
/// `ptr..ptr + width` must be mapped.
#[cfg(target_arch = "x86_64")]
unsafe fn mmio_read(ptr: *const u8, width: usize) -> u64 {
    use std::arch::asm;
    match width {
        1 => {
            let v: u8;
            asm!("mov {v}, byte ptr [{p}]", p = in(reg) ptr, v = out(reg_byte) v,
                 options(nostack, preserves_flags));
            u64::from(v)
        }
        2 => {
            let v: u16;
            asm!("mov {v:x}, word ptr [{p}]", p = in(reg) ptr, v = out(reg) v,
                 options(nostack, preserves_flags));
            u64::from(v)
        }
        4 => {
            let v: u32;
            asm!("mov {v:e}, dword ptr [{p}]", p = in(reg) ptr, v = out(reg) v,
                 options(nostack, preserves_flags));
            u64::from(v)
        }
        _ => {
            let v: u64;
            asm!("mov {v}, qword ptr [{p}]", p = in(reg) ptr, v = out(reg) v,
                 options(nostack, preserves_flags));
            v
        }
    }
}

/// # Safety
/// `ptr..ptr + width` must be mapped.
#[cfg(target_arch = "x86_64")]
unsafe fn mmio_write(ptr: *mut u8, width: usize, value: u64) {
    use std::arch::asm;
    match width {
        1 => asm!("mov byte ptr [{p}], {v}", p = in(reg) ptr, v = in(reg_byte) value as u8,
                  options(nostack, preserves_flags)),
        2 => asm!("mov word ptr [{p}], {v:x}", p = in(reg) ptr, v = in(reg) value as u16,
                  options(nostack, preserves_flags)),
        4 => asm!("mov dword ptr [{p}], {v:e}", p = in(reg) ptr, v = in(reg) value as u32,
                  options(nostack, preserves_flags)),
        _ => asm!("mov qword ptr [{p}], {v}", p = in(reg) ptr, v = in(reg) value,
                  options(nostack, preserves_flags)),
    }
}

/// # Safety
/// `ptr..ptr + width` must be mapped and `ptr` aligned to `width`.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn mmio_read(ptr: *const u8, width: usize) -> u64 {
    match width {
        1 => u64::from(ptr.read_volatile()),
        2 => u64::from(ptr.cast::<u16>().read_volatile()),
        4 => u64::from(ptr.cast::<u32>().read_volatile()),
        _ => ptr.cast::<u64>().read_volatile(),
    }
}

/// # Safety
/// `ptr..ptr + width` must be mapped and `ptr` aligned to `width`.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn mmio_write(ptr: *mut u8, width: usize, value: u64) {
    match width {
        1 => ptr.write_volatile(value as u8),
        2 => ptr.cast::<u16>().write_volatile(value as u16),
        4 => ptr.cast::<u32>().write_volatile(value as u32),
        _ => ptr.cast::<u64>().write_volatile(value),
    }
}

/// The scribbler's pages: locked, with their guest-physical addresses.
struct Buffer {
    map: Mapping,
}

impl Buffer {
    fn new() -> Result<(Self, Vec<u64>), ScribbleError> {
        let len = BUFFER_PAGES * PAGE;
        let map = Mapping::new(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
            "mmap the scribble buffer",
        )?;
        // SAFETY: locks exactly the mapping made above.
        if unsafe { libc::mlock(map.ptr.cast(), len) } != 0 {
            return Err(io_error("mlock the scribble buffer")(sys::last_error()));
        }
        let buffer = Buffer { map };
        // A write gives every page a frame of its own (not the zero page).
        for page in 0..BUFFER_PAGES {
            buffer.put(page, 0, &[0]);
        }
        let phys = page_frames(buffer.map.ptr as usize, BUFFER_PAGES)?;
        Ok((buffer, phys))
    }

    fn put(&self, page: usize, offset: usize, bytes: &[u8]) {
        let Some(ptr) = page
            .checked_mul(PAGE)
            .and_then(|start| start.checked_add(offset))
            .filter(|_| offset.saturating_add(bytes.len()) <= PAGE)
            .and_then(|at| self.map.at(at, bytes.len()))
        else {
            return;
        };
        for (i, byte) in bytes.iter().enumerate() {
            // SAFETY: `ptr..ptr + bytes.len()` lies in the mapping; volatile
            // because the device reads it behind the compiler's back.
            unsafe { ptr.wrapping_add(i).write_volatile(*byte) };
        }
    }

    fn get_u16(&self, page: usize, offset: usize) -> u16 {
        let Some(ptr) = self
            .map
            .at(page * PAGE + offset, 2)
            .filter(|_| offset + 2 <= PAGE)
        else {
            return 0;
        };
        // SAFETY: both bytes lie in the mapping; the device writes them.
        let bytes = unsafe { [ptr.read_volatile(), ptr.wrapping_add(1).read_volatile()] };
        u16::from_le_bytes(bytes)
    }

    fn zero(&self, page: usize) {
        self.put(page, 0, &[0; PAGE]);
    }
}

/// Guest-physical addresses of `pages` pages from virtual address `start`,
/// from /proc/self/pagemap (which shows frame numbers to root only).
fn page_frames(start: usize, pages: usize) -> Result<Vec<u64>, ScribbleError> {
    let file = std::fs::File::open("/proc/self/pagemap").map_err(io_error("open pagemap"))?;
    let mut raw = vec![0u8; pages * 8];
    file.read_exact_at(&mut raw, (start / PAGE * 8) as u64)
        .map_err(io_error("read pagemap"))?;
    crate::pagemap::entries(&raw)
        .enumerate()
        .map(|(i, entry)| {
            let pfn = entry.pfn();
            if !entry.present() || pfn == 0 {
                return Err(ScribbleError::NoFrame(i));
            }
            Ok(pfn * PAGE_U64)
        })
        .collect()
}

/// `memparse`-style number: decimal or 0x hex, optional K/M/G suffix.
fn memparse(text: &str) -> Option<u64> {
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (text.get(..i)?, 10),
        (i, 'M' | 'm') => (text.get(..i)?, 20),
        (i, 'G' | 'g') => (text.get(..i)?, 30),
        _ => (text, 0),
    };
    let value = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    value.checked_mul(1 << shift)
}

/// The virtio-mmio devices bound to their driver (`virtio-mmio.<n>`).
fn bound_device_names() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(VIRTIO_MMIO_DRIVER) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("virtio-mmio."))
        .collect()
}

fn bound_devices() -> usize {
    bound_device_names().len()
}

/// Whether the bound virtio-mmio device `name` is a vsock device: its
/// virtio child (`virtio<n>/device`) says `0x0013`.
fn is_vsock_device(name: &str) -> bool {
    let dir = format!("{VIRTIO_MMIO_DRIVER}/{name}");
    let Ok(children) = std::fs::read_dir(dir) else {
        return false;
    };
    children.flatten().any(|child| {
        child.file_name().to_string_lossy().starts_with("virtio")
            && std::fs::read_to_string(child.path().join("device")).is_ok_and(|id| {
                u32::from_str_radix(id.trim().trim_start_matches("0x"), 16) == Ok(VIRTIO_ID_VSOCK)
            })
    })
}

/// Unbinds the vsock device from the virtio-mmio driver, which releases
/// its window for `/dev/mem`; returns its name, or None if none is bound.
fn release_vsock_device() -> Result<Option<String>, ScribbleError> {
    let Some(name) = bound_device_names()
        .into_iter()
        .find(|name| is_vsock_device(name))
    else {
        return Ok(None);
    };
    std::fs::write(format!("{VIRTIO_MMIO_DRIVER}/unbind"), &name)
        .map_err(io_error("unbind the vsock device's driver"))?;
    Ok(Some(name))
}

/// Base addresses of the `virtio_mmio.device=<size>@<base>:<irq>` devices
/// on a kernel command line.
fn mmio_devices(cmdline: &str) -> Vec<u64> {
    cmdline
        .split_whitespace()
        .filter_map(|param| param.strip_prefix("virtio_mmio.device="))
        .filter_map(|spec| {
            let (_size, rest) = spec.split_once('@')?;
            let base = rest.split(':').next()?;
            memparse(base)
        })
        .collect()
}

/// Guest RAM as the VMM has it: everything below the top of the RAM under
/// 4 GiB (holes included), and from 4 GiB up to the top of the RAM above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ram {
    low_top: u64,
    high_top: u64,
}

impl Ram {
    /// From the `System RAM` ranges of /proc/iomem.
    fn from_iomem(iomem: &str) -> Option<Self> {
        let mut ram = Ram {
            low_top: 0,
            high_top: 0,
        };
        for line in iomem.lines() {
            let Some((range, name)) = line.trim_start().split_once(" : ") else {
                continue;
            };
            if name.trim() != "System RAM" {
                continue;
            }
            let Some((_, end)) = range.split_once('-') else {
                continue;
            };
            let Some(end) = u64::from_str_radix(end, 16)
                .ok()
                .and_then(|e| e.checked_add(1))
            else {
                continue;
            };
            if end <= FOUR_GIB {
                ram.low_top = ram.low_top.max(end);
            } else {
                ram.high_top = ram.high_top.max(end);
            }
        }
        (ram.low_top > 0).then_some(ram)
    }

    /// Whether `[addr, addr + len)` overlaps guest RAM.
    fn touches(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len.max(1));
        addr < self.low_top || (addr < self.high_top && end > FOUR_GIB)
    }

    /// The lowest value of a high address half that puts any low half
    /// outside RAM.
    fn first_free_high(&self) -> u32 {
        if self.high_top <= FOUR_GIB {
            1
        } else {
            u32::try_from(self.high_top.div_ceil(FOUR_GIB)).unwrap_or(u32::MAX)
        }
    }
}

/// A split-virtqueue descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (dst, src) in out.iter_mut().zip(
            self.addr
                .to_le_bytes()
                .into_iter()
                .chain(self.len.to_le_bytes())
                .chain(self.flags.to_le_bytes())
                .chain(self.next.to_le_bytes()),
        ) {
            *dst = src;
        }
        out
    }
}

/// A vsock packet header.
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        let fields = self
            .src_cid
            .to_le_bytes()
            .into_iter()
            .chain(self.dst_cid.to_le_bytes())
            .chain(self.src_port.to_le_bytes())
            .chain(self.dst_port.to_le_bytes())
            .chain(self.len.to_le_bytes())
            .chain(self.type_.to_le_bytes())
            .chain(self.op.to_le_bytes())
            .chain(self.flags.to_le_bytes())
            .chain(self.buf_alloc.to_le_bytes())
            .chain(self.fwd_cnt.to_le_bytes());
        for (dst, src) in out.iter_mut().zip(fields) {
            *dst = src;
        }
        out
    }
}

/// Where things are, in guest-physical terms, and what may point where.
#[derive(Debug, Clone)]
struct Layout {
    /// Guest-physical address of each buffer page.
    phys: Vec<u64>,
    ram: Ram,
    cid: u64,
    /// The device window (an address outside RAM that is not empty).
    mmio_base: u64,
}

impl Layout {
    fn page(&self, page: usize) -> u64 {
        self.phys.get(page).copied().unwrap_or(!0xfff)
    }

    fn desc_page(&self, table: usize) -> u64 {
        self.page(table % DESC_PAGES)
    }

    fn avail(&self, queue: usize) -> u64 {
        self.page(AVAIL_PAGE) + (queue * AVAIL_STRIDE) as u64
    }

    fn used_page(&self, queue: usize) -> u64 {
        self.page(USED_PAGE0 + queue % QUEUES)
    }

    /// Guest-physical address of data slot `slot`.
    fn slot(&self, slot: usize) -> u64 {
        let slot = slot % SLOTS;
        self.page(DATA_PAGE0 + slot * SLOT / PAGE) + (slot * SLOT % PAGE) as u64
    }

    /// Whether `[addr, addr + len)` lies inside buffer page `page` of the
    /// kind given by `pages`.
    fn within(&self, pages: std::ops::Range<usize>, addr: u64, len: u64) -> bool {
        pages.into_iter().any(|p| {
            let start = self.page(p);
            addr >= start && addr.saturating_add(len) <= start + PAGE_U64
        })
    }

    /// Whether the device may be handed `desc` in any queue without it
    /// writing outside the scribbler's pages or reading descriptors from
    /// anywhere else.
    fn is_safe(&self, desc: &Desc) -> bool {
        if desc.flags & F_INDIRECT != 0 {
            // An indirect table is only followed if its length is a whole
            // number of descriptors; it must then be (part of) a table page.
            let len = u64::from(desc.len);
            return !len.is_multiple_of(16)
                || len == 0
                || !self.ram.touches(desc.addr, len)
                || (desc.addr.is_multiple_of(16) && self.within(0..DESC_PAGES, desc.addr, len));
        }
        if desc.flags & F_WRITE != 0 {
            let hdr = HDR_LEN as u64;
            return self.within(DATA_PAGE0..BUFFER_PAGES, desc.addr, hdr)
                || !self.ram.touches(desc.addr, hdr)
                // Straddles the end of RAM: no header fits, nothing is written.
                || (desc.addr < self.ram.low_top && desc.addr + hdr > self.ram.low_top);
        }
        true
    }

    /// Whether the device may use `addr` as a descriptor table.
    #[cfg(test)]
    fn desc_table_ok(&self, addr: u64) -> bool {
        !addr.is_multiple_of(16)
            || !self.ram.touches(addr, PAGE_U64)
            || (0..DESC_PAGES).any(|p| self.page(p) == addr)
    }

    /// Whether the device may use `addr` as a used ring.
    #[cfg(test)]
    fn used_ring_ok(&self, addr: u64) -> bool {
        !addr.is_multiple_of(4)
            || !self.ram.touches(addr, USED_RING_MAX)
            || self.within(USED_PAGE0..DATA_PAGE0, addr, USED_RING_MAX)
    }
}

/// What most packets of a round are about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Theme {
    /// Anything goes.
    Mixed,
    /// Connections to the host ports, then data, credit, shutdown.
    Connect,
    /// The same operation for many ports.
    Flood(u16),
}

/// Generates the junk: register values, descriptors, headers.
struct Junk {
    rng: XorShift,
    layout: Layout,
    /// First port of this round's source ports.
    port_base: Cell<u32>,
    /// Next sequential source port (floods).
    port_seq: Cell<u32>,
}

impl Junk {
    fn pick<T: Copy + Default>(&self, items: &[T]) -> T {
        let i = self.rng.below(items.len() as u64) as usize;
        items.get(i).copied().unwrap_or_default()
    }

    fn chance(&self, one_in: u64) -> bool {
        self.rng.below(one_in) == 0
    }

    fn u32(&self) -> u32 {
        self.rng.next() as u32
    }

    /// An address outside guest RAM (for anything but the length given).
    fn outside(&self) -> u64 {
        let ram = self.layout.ram;
        let candidates = [
            ram.low_top,
            ram.low_top + 16 * self.rng.below(0x1000),
            0xc000_0000,
            self.layout.mmio_base,
            0xfee0_0000,
            0xffff_f000,
            ram.high_top.max(FOUR_GIB) + PAGE_U64 * self.rng.below(0x10_0000),
            1 << 40,
            1 << 63,
            u64::MAX - 0x2f,
            !0xf,
        ];
        let addr = self.pick(&candidates);
        if ram.touches(addr, 1 << 20) {
            !0xfff
        } else {
            addr
        }
    }

    /// An address that starts in RAM and runs over its end.
    fn straddle(&self) -> u64 {
        self.layout.ram.low_top - self.pick(&[1, 4, 20, 43])
    }

    fn ram_anywhere(&self) -> u64 {
        self.rng.below(self.layout.ram.low_top)
    }

    /// A low address half for a descriptor table register.
    fn desc_low(&self) -> u32 {
        match self.rng.below(8) {
            0..=3 => self
                .layout
                .desc_page(self.rng.below(DESC_PAGES as u64) as usize) as u32,
            4 => self.layout.desc_page(0) as u32 | self.pick(&[1, 2, 8]),
            5 => self.u32() | 1,
            _ => self.outside_low(),
        }
    }

    /// A low address half for a used ring register.
    fn used_low(&self) -> u32 {
        match self.rng.below(8) {
            0..=3 => {
                let queue = self.rng.below(QUEUES as u64) as usize;
                (self.layout.used_page(queue) + 4 * self.rng.below(32)) as u32
            }
            4 => self.layout.used_page(0) as u32 | self.pick(&[1, 2, 3]),
            5 => self.u32() | 1,
            _ => self.outside_low(),
        }
    }

    /// A low half that is outside RAM with any high half.
    fn outside_low(&self) -> u32 {
        let low_top = self.layout.ram.low_top;
        // Room for a whole table or ring below 4 GiB.
        let span = (FOUR_GIB - 0x1_0000).saturating_sub(low_top);
        let addr = low_top + self.rng.below(span) / 16 * 16;
        let addr = self.pick(&[addr, low_top, self.layout.mmio_base, 0xffff_0000]);
        u32::try_from(addr).unwrap_or(!0xf)
    }

    /// A high address half: 0 (the low half decides), or one that puts the
    /// address above RAM.
    fn safe_high(&self) -> u32 {
        let free = self.layout.ram.first_free_high();
        match self.rng.below(4) {
            0 | 1 => 0,
            2 => free,
            _ => free.saturating_add(self.u32() % (u32::MAX - free).max(1)),
        }
    }

    /// A device-writable descriptor address.
    fn write_addr(&self) -> u64 {
        match self.rng.below(8) {
            0..=4 => self.slot_addr(),
            5 | 6 => self.outside(),
            _ => self.straddle(),
        }
    }

    /// A data slot, now and then at an odd offset into it.
    fn slot_addr(&self) -> u64 {
        let slot = self.rng.below(SLOTS as u64) as usize;
        let skew = if self.chance(8) {
            self.rng.below((SLOT - HDR_LEN) as u64 + 1)
        } else {
            0
        };
        self.layout.slot(slot) + skew
    }

    fn next_index(&self, i: u16) -> u16 {
        match self.rng.below(10) {
            0..=4 => i.wrapping_add(1),
            5 => i,
            6 => i.wrapping_sub(1),
            7 => self.pick(&[0, 15, 16, 255, 256, 0x7fff, 0xffff]),
            _ => self.rng.next() as u16,
        }
    }

    fn junk_len(&self) -> u32 {
        self.pick(&[
            0,
            1,
            43,
            44,
            45,
            4096,
            64 * 1024,
            64 * 1024 + 1,
            64 * 1024 + 44,
            64 * 1024 + 45,
            0x7fff_ffff,
            u32::MAX,
            self.rng.below(8192) as u32,
            self.u32(),
        ])
    }

    /// One malformed (or merely odd) descriptor at index `i`.
    fn raw_desc(&self, i: u16) -> Desc {
        let next = self.next_index(i);
        let link = if self.chance(2) { F_NEXT } else { 0 };
        match self.rng.below(10) {
            // Header-sized reads from a slot, wrong lengths.
            0 | 1 => Desc {
                addr: self.slot_addr(),
                len: self.pick(&[HDR_LEN as u32, 43, 0, 45, 64, u32::MAX]),
                flags: link,
                next,
            },
            // Reads from anywhere, of any length.
            2 | 3 => Desc {
                addr: match self.rng.below(4) {
                    0 => self.ram_anywhere(),
                    1 => self.outside(),
                    2 => self.straddle(),
                    _ => self.slot_addr(),
                },
                len: self.junk_len(),
                flags: link,
                next,
            },
            // Device-writable buffers (also handed to the TX queue).
            4..=6 => Desc {
                addr: self.write_addr(),
                len: self.junk_len(),
                flags: F_WRITE | link,
                next,
            },
            // Indirect tables: nested, misaligned, empty, huge, outside.
            7 => self.indirect_desc(next),
            // Any bits but WRITE and INDIRECT.
            _ => Desc {
                addr: self.rng.next(),
                len: self.u32(),
                flags: (self.rng.next() as u16) & !(F_WRITE | F_INDIRECT),
                next,
            },
        }
    }

    fn indirect_desc(&self, next: u16) -> Desc {
        let extra = self.pick(&[0, F_NEXT, F_WRITE, F_WRITE | F_NEXT]);
        let table = self.rng.below(DESC_PAGES as u64) as usize;
        let first = self.rng.below(TABLE_LEN as u64);
        let count = self.rng.below(TABLE_LEN as u64 - first + 1);
        let (addr, len) = match self.rng.below(6) {
            0..=2 => (
                self.layout.desc_page(table) + 16 * first,
                (16 * count) as u32,
            ),
            3 => (
                self.layout.desc_page(table),
                16 * self.rng.below(0x1000) as u32 + 8,
            ),
            4 => (self.outside(), 16 * self.rng.below(0x1_0000) as u32),
            _ => (self.ram_anywhere(), 0),
        };
        Desc {
            addr,
            len,
            flags: F_INDIRECT | extra,
            next,
        }
    }

    /// A descriptor the device may safely be given (see `Layout::is_safe`).
    fn desc(&self, i: u16) -> Desc {
        let desc = self.raw_desc(i);
        if self.layout.is_safe(&desc) {
            desc
        } else {
            Desc {
                addr: self.outside(),
                ..desc
            }
        }
    }

    fn src_port(&self) -> u32 {
        match self.rng.below(8) {
            0..=5 => self.port_base.get() + self.rng.below(32) as u32,
            6 => self.pick(&[0, 1, 1023, 1024, u32::MAX]),
            _ => self.u32(),
        }
    }

    fn dst_port(&self) -> u32 {
        match self.rng.below(8) {
            0..=5 => self.pick(&SCRIBBLE_HOST_PORTS),
            6 => self.rng.below(16) as u32,
            _ => self.u32(),
        }
    }

    fn header(&self, theme: Theme) -> Header {
        let mut hdr = Header {
            src_cid: self.layout.cid,
            dst_cid: HOST_CID,
            src_port: self.src_port(),
            dst_port: self.dst_port(),
            len: 0,
            type_: 1,
            op: OP_RW,
            flags: 0,
            buf_alloc: self.pick(&[0, 4096, 256 * 1024, u32::MAX, self.u32()]),
            fwd_cnt: self.pick(&[0, self.u32()]),
        };
        match theme {
            Theme::Mixed => {
                hdr.op = self.pick(&[
                    OP_REQUEST,
                    OP_RESPONSE,
                    OP_RST,
                    OP_SHUTDOWN,
                    OP_RW,
                    OP_CREDIT_UPDATE,
                    OP_CREDIT_REQUEST,
                    0,
                    8,
                    u16::MAX,
                    self.rng.next() as u16,
                ]);
                hdr.len = self.junk_len();
                hdr.flags = self.pick(&[0, 1, 2, 3, self.u32()]);
            }
            Theme::Connect => {
                hdr.op = self.pick(&[
                    OP_REQUEST,
                    OP_REQUEST,
                    OP_RW,
                    OP_RW,
                    OP_RW,
                    OP_CREDIT_UPDATE,
                    OP_CREDIT_REQUEST,
                    OP_SHUTDOWN,
                    OP_RST,
                    OP_RESPONSE,
                ]);
                if hdr.op == OP_RW {
                    hdr.len = self.pick(&[1, 20, 64, 4096, 64 * 1024, 64 * 1024 + 1, u32::MAX]);
                }
                if hdr.op == OP_SHUTDOWN {
                    hdr.flags = self.pick(&[1, 2, 3, 3, self.u32()]);
                }
            }
            Theme::Flood(op) => {
                hdr.op = op;
                hdr.src_port = self.port_seq.get();
                self.port_seq.set(hdr.src_port.wrapping_add(1));
                hdr.flags = self.pick(&[0, 3]);
            }
        }
        // Now and then, identity and type junk.
        if self.chance(12) {
            hdr.src_cid = self.pick(&[0, HOST_CID, self.layout.cid + 1, u64::MAX, self.rng.next()]);
        }
        if self.chance(12) {
            hdr.dst_cid = self.pick(&[0, self.layout.cid, u64::MAX, self.rng.next()]);
        }
        if self.chance(12) {
            hdr.type_ = self.pick(&[0, 2, 3, u16::MAX]);
        }
        hdr
    }
}

/// A descriptor table the scribbler built, and the heads of the chains in
/// it that are well-formed enough to reach the muxer.
struct Table {
    descs: Vec<Desc>,
    tx_heads: Vec<u16>,
    rx_heads: Vec<u16>,
}

impl Junk {
    /// A table of well-formed TX and RX chains (a share of `good` in 4)
    /// and junk.
    fn table(&self, good: u64) -> Table {
        let mut table = Table {
            descs: Vec::with_capacity(TABLE_LEN),
            tx_heads: Vec::new(),
            rx_heads: Vec::new(),
        };
        while table.descs.len() < TABLE_LEN {
            let i = table.descs.len() as u16;
            let room = TABLE_LEN - table.descs.len();
            if self.rng.below(4) >= good || room < 2 {
                let desc = self.desc(i);
                table.descs.push(desc);
                continue;
            }
            if self.chance(2) {
                // TX: header, then (maybe) its data.
                let slot = self.rng.below(SLOTS as u64) as usize;
                table.tx_heads.push(i);
                let addr = self.layout.slot(slot);
                if self.chance(3) {
                    // One descriptor: header and data together.
                    table.descs.push(Desc {
                        addr,
                        len: self.pick(&[HDR_LEN as u32, SLOT as u32, 4096, u32::MAX]),
                        flags: 0,
                        next: 0,
                    });
                } else {
                    let data = match self.rng.below(3) {
                        0 => self.ram_anywhere(),
                        _ => self.slot_addr(),
                    };
                    table.descs.push(Desc {
                        addr,
                        len: HDR_LEN as u32,
                        flags: F_NEXT,
                        next: i + 1,
                    });
                    let len = self.pick(&[1, 20, 64, 4096, 64 * 1024, self.u32()]);
                    table.descs.push(Desc {
                        addr: data,
                        len,
                        flags: 0,
                        next: self.next_index(i + 1),
                    });
                }
            } else {
                // RX: a header buffer, then (maybe) a data buffer.
                table.rx_heads.push(i);
                let head = self.layout.slot(self.rng.below(SLOTS as u64) as usize);
                if self.chance(3) {
                    table.descs.push(Desc {
                        addr: head,
                        len: self.pick(&[HDR_LEN as u32, SLOT as u32]),
                        flags: F_WRITE,
                        next: 0,
                    });
                } else {
                    table.descs.push(Desc {
                        addr: head,
                        len: HDR_LEN as u32,
                        flags: F_WRITE | F_NEXT,
                        next: i + 1,
                    });
                    let data = self.layout.slot(self.rng.below(SLOTS as u64) as usize);
                    table.descs.push(Desc {
                        addr: data,
                        len: SLOT as u32,
                        flags: F_WRITE,
                        next: 0,
                    });
                }
            }
        }
        table
    }
}

/// Counters for the summary line.
#[derive(Debug, Default)]
struct Stats {
    register_rounds: u64,
    crafted_rounds: u64,
    /// DRIVER_OK the device took (no NEEDS_RESET after it).
    started: u64,
    /// DRIVER_OK answered with NEEDS_RESET, or FEATURES_OK refused.
    refused: u64,
    notifies: u64,
    /// Used-ring entries the device returned, per queue.
    used: [u64; QUEUES],
}

struct Scribbler {
    window: Window,
    buffer: Buffer,
    junk: Junk,
    seed: u64,
    /// QueueNumMax of each queue.
    max_sizes: [u16; QUEUES],
    stats: Stats,
    /// Windows `/dev/mem` refused while their drivers held them, and how
    /// many devices were bound.
    bound_windows: (usize, usize),
}

impl Scribbler {
    fn new(seed: u64) -> Result<Self, ScribbleError> {
        let cmdline =
            std::fs::read_to_string("/proc/cmdline").map_err(io_error("read /proc/cmdline"))?;
        let iomem = std::fs::read_to_string("/proc/iomem").map_err(io_error("read /proc/iomem"))?;
        let ram = Ram::from_iomem(&iomem).ok_or(ScribbleError::NoRam)?;
        let bases = mmio_devices(&cmdline);
        // While their drivers hold them, the kernel must refuse every window.
        let bound = bound_devices();
        let refused = bases
            .iter()
            .filter(|&&base| matches!(Window::open(base), Err(ScribbleError::Io { ref source, .. }) if source.raw_os_error() == Some(libc::EPERM)))
            .count();
        match release_vsock_device() {
            Ok(Some(name)) => {
                console::info(format_args!("scribble: unbound {name} from its driver"))
            }
            Ok(None) => console::info(format_args!("scribble: no bound vsock device to unbind")),
            Err(err) => console::warn(&err),
        }
        let mut window = None;
        let mut last_error = None;
        for &base in &bases {
            let w = match Window::open(base) {
                Ok(w) => w,
                Err(err) => {
                    // Another device, still bound.
                    last_error = Some(err);
                    continue;
                }
            };
            if w.r32(reg::MAGIC) == MMIO_MAGIC
                && w.r32(reg::VERSION) == 2
                && w.r32(reg::DEVICE_ID) == VIRTIO_ID_VSOCK
            {
                window = Some(w);
                break;
            }
        }
        let window = match (window, last_error) {
            (Some(window), _) => window,
            (None, Some(err)) => return Err(ScribbleError::NoWindow(Box::new(err))),
            (None, None) => return Err(ScribbleError::NoDevice),
        };
        let cid = window.read(reg::CONFIG, 8);
        let (buffer, phys) = Buffer::new()?;
        let mut max_sizes = [0u16; QUEUES];
        for (queue, max) in max_sizes.iter_mut().enumerate() {
            window.w32(reg::QUEUE_SEL, queue as u32);
            *max = window.r32(reg::QUEUE_NUM_MAX) as u16;
        }
        console::info(format_args!(
            "scribble: vsock at {:#x} cid={cid} queues={max_sizes:?} ram_top={:#x} \
             buffer={:#x}.. seed={seed:#x}",
            window.base,
            ram.low_top,
            phys.first().copied().unwrap_or(0)
        ));
        let junk = Junk {
            rng: XorShift::new(seed),
            layout: Layout {
                phys,
                ram,
                cid,
                mmio_base: window.base,
            },
            port_base: Cell::new(1024),
            port_seq: Cell::new(1024),
        };
        Ok(Scribbler {
            window,
            buffer,
            junk,
            seed,
            bound_windows: (refused, bound),
            max_sizes,
            stats: Stats::default(),
        })
    }

    /// Runs `rounds` rounds and returns the summary line.
    fn run(&mut self, rounds: u32) -> String {
        self.reset();
        for _ in 0..rounds {
            if self.junk.chance(3) {
                self.register_round();
            } else {
                self.crafted_round();
            }
        }
        // Leave the device reset: once this process is gone, its pages
        // belong to the kernel again, and the device must not write there.
        self.reset();
        let s = &self.stats;
        format!(
            "{SCRIBBLE_DONE_LINE} rounds={rounds} seed={:#x} register_rounds={} \
             crafted_rounds={} started={} refused={} notifies={} rx_used={} tx_used={} \
             mmio_reads={} mmio_writes={} bound_windows_refused={}/{}",
            self.seed,
            s.register_rounds,
            s.crafted_rounds,
            s.started,
            s.refused,
            s.notifies,
            s.used.first().copied().unwrap_or(0),
            s.used.get(TX).copied().unwrap_or(0),
            self.window.reads.get(),
            self.window.writes.get(),
            self.bound_windows.0,
            self.bound_windows.1,
        )
    }

    /// Resets the device and points every queue's descriptor table at a
    /// table page: after a reset they point at address 0, where the device
    /// may have written a used ring.
    fn reset(&self) {
        self.window.w32(reg::STATUS, 0);
        for queue in 0..QUEUES {
            let table = self.junk.layout.desc_page(queue);
            self.window.w32(reg::QUEUE_SEL, queue as u32);
            self.window.w32(reg::QUEUE_DESC_LOW, table as u32);
            self.window.w32(reg::QUEUE_DESC_HIGH, (table >> 32) as u32);
        }
    }

    fn register_round(&mut self) {
        self.stats.register_rounds += 1;
        let ops = 16 + self.junk.rng.below(48);
        for _ in 0..ops {
            self.register_op();
        }
    }

    fn register_op(&mut self) {
        let j = &self.junk;
        let w = &self.window;
        match j.rng.below(16) {
            0 => {
                let v = j.pick(&[0, 1, 2, 3, 8, 0xffff, u32::MAX, j.u32()]);
                w.w32(reg::QUEUE_SEL, v);
            }
            1 => {
                let v = j.pick(&[
                    0,
                    1,
                    3,
                    15,
                    16,
                    17,
                    128,
                    255,
                    256,
                    257,
                    512,
                    0x1_0000,
                    u32::MAX,
                    j.u32(),
                ]);
                w.w32(reg::QUEUE_NUM, v);
            }
            2 => {
                let v = j.pick(&[0, 1, 1, 2, j.u32()]);
                w.w32(reg::QUEUE_READY, v);
            }
            3 => w.w32(reg::QUEUE_DESC_LOW, j.desc_low()),
            4 => w.w32(reg::QUEUE_DESC_HIGH, j.safe_high()),
            // The device only reads the avail ring: anything goes.
            5 => w.w32(reg::QUEUE_AVAIL_LOW, j.u32()),
            6 => {
                let v = j.pick(&[0, 0, j.u32()]);
                w.w32(reg::QUEUE_AVAIL_HIGH, v);
            }
            7 => w.w32(reg::QUEUE_USED_LOW, j.used_low()),
            8 => w.w32(reg::QUEUE_USED_HIGH, j.safe_high()),
            9 => {
                let all = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
                let current = w.r32(reg::STATUS);
                let v = j.pick(&[
                    0,
                    S_ACKNOWLEDGE,
                    S_ACKNOWLEDGE | S_DRIVER,
                    S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
                    all,
                    all,
                    S_DRIVER_OK,
                    S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK,
                    S_NEEDS_RESET,
                    all | S_NEEDS_RESET,
                    S_FAILED,
                    0xff,
                    current | 1 << j.rng.below(8),
                    j.u32(),
                ]);
                if v == 0 {
                    self.reset();
                } else {
                    w.w32(reg::STATUS, v);
                }
            }
            10 => {
                let sel = j.pick(&[0, 1, 1, 2, j.u32()]);
                let v = j.pick(&[0, 1, 1, u32::MAX, j.u32()]);
                w.w32(reg::DRIVER_FEATURES_SEL, sel);
                w.w32(reg::DRIVER_FEATURES, v);
            }
            11 => {
                let sel = j.pick(&[0, 1, 2, u32::MAX]);
                w.w32(reg::DEVICE_FEATURES_SEL, sel);
                w.r32(reg::DEVICE_FEATURES);
            }
            12 => {
                let v = j.pick(&[1, 2, 3, u32::MAX, j.u32()]);
                w.w32(reg::INTERRUPT_ACK, v);
                w.r32(reg::INTERRUPT_STATUS);
            }
            13 => {
                let width = j.pick(&[1, 2, 4, 8]);
                let offset =
                    reg::CONFIG + j.rng.below((PAGE - reg::CONFIG - width + 1) as u64) as usize;
                if j.chance(2) {
                    w.write(offset, width, j.rng.next());
                } else {
                    w.read(offset, width);
                }
                w.r32(reg::CONFIG_GENERATION);
            }
            14 => {
                let width = j.pick(&[4, 4, 4, 1, 2, 8]);
                let v = j.pick(&[0, 1, 2, 1, 3, 0xffff, j.rng.next()]);
                w.write(reg::QUEUE_NOTIFY, width, v);
                self.stats.notifies += 1;
            }
            _ => {
                let width = j.pick(&[1, 2, 4, 8]);
                let offset = j.rng.below((PAGE - width + 1) as u64) as usize;
                let guarded = reg::GUARDED
                    .iter()
                    .any(|&(start, end)| offset < end && offset + width > start);
                if guarded || j.chance(2) {
                    w.read(offset, width);
                } else {
                    w.write(offset, width, j.rng.next());
                }
            }
        }
    }

    fn crafted_round(&mut self) {
        self.stats.crafted_rounds += 1;
        self.reset();
        let j = &self.junk;
        let theme = match j.rng.below(6) {
            0 | 1 => Theme::Mixed,
            2 | 3 => Theme::Connect,
            _ => Theme::Flood(j.pick(&[
                OP_REQUEST,
                OP_REQUEST,
                OP_SHUTDOWN,
                OP_RST,
                OP_CREDIT_REQUEST,
                OP_RW,
                0xbad,
            ])),
        };
        j.port_base.set(1024 + j.rng.below(60_000) as u32);
        j.port_seq.set(j.port_base.get());

        // Memory first, while the device is reset and reads none of it.
        for slot in 0..SLOTS {
            let hdr = j.header(theme);
            let mut bytes = [0u8; SLOT];
            j.rng.fill(&mut bytes);
            for (dst, src) in bytes.iter_mut().zip(hdr.bytes()) {
                *dst = src;
            }
            let at = slot * SLOT;
            self.buffer.put(DATA_PAGE0 + at / PAGE, at % PAGE, &bytes);
        }
        let good = j.pick(&[0, 2, 3, 3, 4]);
        let mut tables = Vec::with_capacity(DESC_PAGES);
        for page in 0..DESC_PAGES {
            let table = j.table(good);
            let mut bytes = vec![0u8; PAGE];
            for (chunk, desc) in bytes.chunks_exact_mut(16).zip(&table.descs) {
                chunk.copy_from_slice(&desc.bytes());
            }
            self.buffer.put(page, 0, &bytes);
            tables.push(table);
        }
        self.buffer.zero(AVAIL_PAGE);
        for queue in 0..QUEUES {
            self.buffer.zero(USED_PAGE0 + queue);
        }

        // Feature negotiation, mostly by the book.
        let w = &self.window;
        w.w32(reg::STATUS, S_ACKNOWLEDGE);
        w.w32(reg::STATUS, S_ACKNOWLEDGE | S_DRIVER);
        w.w32(reg::DRIVER_FEATURES_SEL, 1);
        let v = if j.chance(10) {
            j.pick(&[0, u32::MAX, j.u32()])
        } else {
            1
        };
        w.w32(reg::DRIVER_FEATURES, v);
        w.w32(reg::DRIVER_FEATURES_SEL, 0);
        let v = j.pick(&[0, 0, 0, u32::MAX, j.u32()]);
        w.w32(reg::DRIVER_FEATURES, v);
        let mut status = S_ACKNOWLEDGE | S_DRIVER;
        if !j.chance(20) {
            status |= S_FEATURES_OK;
            w.w32(reg::STATUS, status);
            if w.r32(reg::STATUS) & S_FEATURES_OK == 0 {
                self.stats.refused += 1;
            }
        }

        // Queues: our tables, rings in our pages (now and then not).
        let mut sizes = self.max_sizes;
        let mut queue_table = [0usize; QUEUES];
        for queue in 0..QUEUES {
            w.w32(reg::QUEUE_SEL, queue as u32);
            let max = self.max_sizes.get(queue).copied().unwrap_or(16);
            let size = if j.chance(10) {
                j.pick(&[0, 3, u32::from(max) + 1, 0x1_0000, u32::MAX])
            } else {
                j.pick(&[max, max, max / 2, 16.min(max), 2, 1].map(u32::from))
            };
            w.w32(reg::QUEUE_NUM, size);
            if let (Some(slot), Ok(size)) = (sizes.get_mut(queue), u16::try_from(size)) {
                if size != 0 && size <= max && size.is_power_of_two() {
                    *slot = size;
                }
            }
            let table = j.rng.below(DESC_PAGES as u64) as usize;
            if let Some(slot) = queue_table.get_mut(queue) {
                *slot = table;
            }
            let desc = j.layout.desc_page(table);
            let avail = if j.chance(10) {
                j.ram_anywhere() & !1
            } else {
                j.layout.avail(queue)
            };
            let used = match j.rng.below(20) {
                0 => j.outside() & !0xf,
                1 => j.layout.used_page(j.rng.below(QUEUES as u64) as usize),
                _ => j.layout.used_page(queue),
            };
            for (low, high, addr) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
                (reg::QUEUE_AVAIL_LOW, reg::QUEUE_AVAIL_HIGH, avail),
                (reg::QUEUE_USED_LOW, reg::QUEUE_USED_HIGH, used),
            ] {
                w.w32(low, addr as u32);
                w.w32(high, (addr >> 32) as u32);
            }
            if !j.chance(30) {
                w.w32(reg::QUEUE_READY, 1);
            }
        }
        // Set-up of queues that do not exist.
        if j.chance(4) {
            w.w32(reg::QUEUE_SEL, j.pick(&[3, 4, 0xffff, u32::MAX]));
            w.w32(reg::QUEUE_NUM, 16);
            w.w32(reg::QUEUE_READY, 1);
        }
        status |= S_DRIVER_OK;
        w.w32(reg::STATUS, status);
        if w.r32(reg::STATUS) & S_NEEDS_RESET == 0 {
            self.stats.started += 1;
        } else {
            self.stats.refused += 1;
        }

        let mut avail_idx = [0u16; QUEUES];
        let iterations = 1 + j.rng.below(8);
        for _ in 0..iterations {
            // Hand the device more chains, and now and then a bad index.
            for queue in [RX, TX] {
                let size = sizes.get(queue).copied().unwrap_or(1).max(1);
                let table = queue_table.get(queue).and_then(|t| tables.get(*t));
                let idx = avail_idx.get(queue).copied().unwrap_or(0);
                let count = j.rng.below(u64::from(size) + 1) as u16;
                for k in 0..count {
                    let position = usize::from(idx.wrapping_add(k) % size);
                    let head = match (table, j.rng.below(10)) {
                        (Some(t), 0..=6) => {
                            let heads = if queue == TX {
                                &t.tx_heads
                            } else {
                                &t.rx_heads
                            };
                            heads
                                .get(j.rng.below(heads.len().max(1) as u64) as usize)
                                .copied()
                                .unwrap_or(0)
                        }
                        (Some(t), 7) => {
                            let heads = if queue == TX {
                                &t.rx_heads
                            } else {
                                &t.tx_heads
                            };
                            heads.first().copied().unwrap_or(0)
                        }
                        _ => j.pick(&[0, size - 1, size, 0xffff, j.rng.next() as u16]),
                    };
                    self.buffer.put(
                        AVAIL_PAGE,
                        queue * AVAIL_STRIDE + 4 + 2 * position,
                        &head.to_le_bytes(),
                    );
                }
                let mut new_idx = idx.wrapping_add(count);
                if j.chance(15) {
                    new_idx = new_idx.wrapping_add(size.wrapping_add(1 + j.rng.next() as u16 % 64));
                }
                if let Some(slot) = avail_idx.get_mut(queue) {
                    *slot = new_idx;
                }
                let flags = j.pick(&[0u16, 0, 1, j.rng.next() as u16]);
                self.buffer
                    .put(AVAIL_PAGE, queue * AVAIL_STRIDE, &flags.to_le_bytes());
                self.buffer
                    .put(AVAIL_PAGE, queue * AVAIL_STRIDE + 2, &new_idx.to_le_bytes());
            }
            let order: &[u32] = j.pick(&[&[1, 0][..], &[0, 1], &[1, 1, 0, 2], &[2, 1, 0]]);
            for &queue in order {
                w.w32(reg::QUEUE_NOTIFY, queue);
                self.stats.notifies += 1;
            }
            if j.chance(6) {
                let width = j.pick(&[1, 2, 8]);
                w.write(
                    reg::QUEUE_NOTIFY,
                    width,
                    j.pick(&[0, 1, 2, 7, j.rng.next()]),
                );
                self.stats.notifies += 1;
            }
            // Change things under the device's feet: headers and
            // descriptors it may be reading right now.
            if j.chance(3) {
                for _ in 0..16 {
                    let slot = j.rng.below(SLOTS as u64) as usize;
                    let hdr = j.header(theme);
                    let at = slot * SLOT;
                    self.buffer
                        .put(DATA_PAGE0 + at / PAGE, at % PAGE, &hdr.bytes());
                    let page = j.rng.below(DESC_PAGES as u64) as usize;
                    let i = j.rng.below(TABLE_LEN as u64) as u16;
                    let desc = j.desc(i);
                    self.buffer.put(page, usize::from(i) * 16, &desc.bytes());
                }
            }
            if j.chance(15) {
                // Pull the rug: reset mid-flight, then keep notifying.
                self.reset();
            }
            w.w32(reg::INTERRUPT_ACK, w.r32(reg::INTERRUPT_STATUS));
            wait_for_device(&self.buffer);
        }
        for (queue, used) in self.stats.used.iter_mut().enumerate() {
            *used += u64::from(self.buffer.get_u16(USED_PAGE0 + queue, 2));
        }
    }
}

/// Gives the device's event loop (another host thread) a moment: until the
/// TX used index moves, at most a millisecond.
fn wait_for_device(buffer: &Buffer) {
    let before = buffer.get_u16(USED_PAGE0 + TX, 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1);
    while std::time::Instant::now() < deadline {
        if buffer.get_u16(USED_PAGE0 + TX, 2) != before {
            break;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_frame, ProtocolError};

    #[test]
    fn junk_round_starts_with_forged_frames_then_breaks() {
        let mut out = Vec::new();
        junk_round(&XorShift::new(1), &mut out);
        let (first, used) = decode_frame::<AgentMessage>(&out, FrameKind::Agent)
            .unwrap()
            .unwrap();
        assert!(matches!(first, AgentMessage::Exit(_)));
        let mut rest = &out[used..];
        for _ in 0..2 {
            let (_, used) = decode_frame::<AgentMessage>(rest, FrameKind::Agent)
                .unwrap()
                .unwrap();
            rest = &rest[used..];
        }
        assert!(matches!(
            decode_frame::<AgentMessage>(rest, FrameKind::Agent),
            Err(ProtocolError::BadMagic)
        ));
    }

    /// A 128 MiB guest whose buffer pages are scattered below 16 MiB.
    fn layout_128m() -> Layout {
        Layout {
            phys: (0..BUFFER_PAGES as u64)
                .map(|i| 0x40_0000 + i * 3 * PAGE_U64)
                .collect(),
            ram: Ram::from_iomem(IOMEM_128M).unwrap(),
            cid: 3,
            mmio_base: 0xd000_0000,
        }
    }

    const IOMEM_128M: &str = "00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000f0000-000fffff : Reserved
00100000-07ffffff : System RAM
  01000000-01a02fff : Kernel code
d0000000-d0000fff : LNRO0005:00
  d0000000-d0000fff : LNRO0005:00
";

    fn junk(layout: Layout, seed: u64) -> Junk {
        Junk {
            rng: XorShift::new(seed),
            layout,
            port_base: Cell::new(1024),
            port_seq: Cell::new(1024),
        }
    }

    #[test]
    fn ram_from_iomem() {
        let ram = Ram::from_iomem(IOMEM_128M).unwrap();
        assert_eq!(
            ram,
            Ram {
                low_top: 0x800_0000,
                high_top: 0
            }
        );
        assert!(ram.touches(0, 1));
        assert!(ram.touches(0x7ff_ffff, 1));
        assert!(ram.touches(0x7ff_fff0, 44));
        assert!(!ram.touches(0x800_0000, 1 << 20));
        assert!(!ram.touches(u64::MAX - 3, 44));
        assert_eq!(ram.first_free_high(), 1);
        let big =
            Ram::from_iomem("00100000-bfffffff : System RAM\n100000000-13fffffff : System RAM\n")
                .unwrap();
        assert_eq!(big.low_top, 0xc000_0000);
        assert_eq!(big.high_top, 0x1_4000_0000);
        assert!(big.touches(0xffff_fff0, 0x20));
        assert!(!big.touches(0xd000_0000, 0x1000));
        assert_eq!(big.first_free_high(), 2);
        assert_eq!(Ram::from_iomem("d0000000-d0000fff : LNRO0005:00\n"), None);
    }

    #[test]
    fn devices_from_cmdline() {
        assert_eq!(
            mmio_devices(
                "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
                 virtio_mmio.device=0x1000@0xd0001000:6:2 virtio_mmio.device=junk"
            ),
            vec![0xd000_0000, 0xd000_1000]
        );
        assert!(mmio_devices("console=ttyS0").is_empty());
        assert_eq!(memparse("4K"), Some(4096));
        assert_eq!(memparse("0x10M"), Some(16 << 20));
        assert_eq!(memparse("12"), Some(12));
        assert_eq!(memparse("0xzz"), None);
        assert_eq!(memparse(""), None);
        assert_eq!(memparse("99999999999999G"), None);
    }

    #[test]
    fn encodings() {
        let desc = Desc {
            addr: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
            flags: F_WRITE | F_NEXT,
            next: 0x0102,
        };
        let bytes = desc.bytes();
        assert_eq!(&bytes[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[8..12], &0x99aa_bbccu32.to_le_bytes());
        assert_eq!(&bytes[12..], &[3, 0, 2, 1]);
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5,
            dst_port: 6,
            len: 7,
            type_: 1,
            op: OP_SHUTDOWN,
            flags: 3,
            buf_alloc: 8,
            fwd_cnt: 9,
        }
        .bytes();
        assert_eq!(&hdr[..8], &3u64.to_le_bytes());
        assert_eq!(&hdr[24..28], &7u32.to_le_bytes());
        assert_eq!(&hdr[28..32], &[1, 0, 4, 0]);
        assert_eq!(&hdr[40..], &9u32.to_le_bytes());
    }

    /// The scribbler must hurt the VMM only: every descriptor it crafts,
    /// every table and used ring address it programs, keeps the device's
    /// writes in the scribbler's pages or outside RAM.
    #[test]
    fn crafted_descriptors_are_safe_for_the_guest() {
        for seed in 1..40 {
            let j = junk(layout_128m(), seed);
            let mut writable = 0;
            let mut indirect = 0;
            for i in 0..5000u16 {
                let desc = j.raw_desc(i);
                assert!(j.layout.is_safe(&desc), "seed {seed}: {desc:x?}");
                writable += usize::from(desc.flags & F_WRITE != 0);
                indirect += usize::from(desc.flags & F_INDIRECT != 0);
            }
            assert!(writable > 500 && indirect > 100, "{writable} {indirect}");
            for good in 0..=4 {
                let table = j.table(good);
                assert_eq!(table.descs.len(), TABLE_LEN);
                for desc in &table.descs {
                    assert!(j.layout.is_safe(desc), "seed {seed}: {desc:x?}");
                }
                if good == 4 {
                    assert!(!table.tx_heads.is_empty() && !table.rx_heads.is_empty());
                }
            }
        }
    }

    #[test]
    fn register_values_are_safe_for_the_guest() {
        for layout in [
            layout_128m(),
            Layout {
                ram: Ram {
                    low_top: 0xc000_0000,
                    high_top: 0x1_4000_0000,
                },
                ..layout_128m()
            },
        ] {
            let j = junk(layout, 7);
            for _ in 0..20_000 {
                let (low, high) = (u64::from(j.desc_low()), u64::from(j.safe_high()));
                for addr in [low, high << 32 | low] {
                    assert!(j.layout.desc_table_ok(addr), "{addr:#x}");
                }
                let (low, high) = (u64::from(j.used_low()), u64::from(j.safe_high()));
                for addr in [low, high << 32 | low] {
                    assert!(j.layout.used_ring_ok(addr), "{addr:#x}");
                }
                assert!(!j.layout.ram.touches(j.outside(), 1 << 20));
            }
        }
    }

    #[test]
    fn safety_rules_catch_what_would_hurt() {
        let layout = layout_128m();
        let kernel = 0x100_0000;
        let unsafe_descs = [
            Desc {
                addr: kernel,
                len: 44,
                flags: F_WRITE,
                next: 0,
            },
            // The last bytes of a data page: a header would spill over.
            Desc {
                addr: layout.page(DATA_PAGE0) + PAGE_U64 - 20,
                len: 44,
                flags: F_WRITE,
                next: 0,
            },
            Desc {
                addr: kernel,
                len: 32,
                flags: F_INDIRECT,
                next: 0,
            },
            Desc {
                addr: layout.page(0) + 8,
                len: 32,
                flags: F_INDIRECT,
                next: 0,
            },
            Desc {
                addr: layout.page(0) + PAGE_U64 - 16,
                len: 32,
                flags: F_INDIRECT,
                next: 0,
            },
        ];
        for desc in unsafe_descs {
            assert!(!layout.is_safe(&desc), "{desc:x?}");
        }
        assert!(!layout.desc_table_ok(kernel));
        assert!(!layout.desc_table_ok(layout.page(0) + 16));
        assert!(!layout.used_ring_ok(layout.page(USED_PAGE0) + 2048));
        assert!(layout.used_ring_ok(layout.page(USED_PAGE0) + 2040));
    }

    #[test]
    fn unknown_tools_are_not_run() {
        assert_eq!(run_tool(&[]), None);
        assert_eq!(run_tool(&["dance".into()]), None);
        assert_eq!(run_tool(&["vsock-junk".into()]), Some(1));
        assert_eq!(run_tool(&["protocol-junk".into(), "x".into()]), Some(1));
    }
}
