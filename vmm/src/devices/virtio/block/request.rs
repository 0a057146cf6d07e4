//! virtio-blk requests (virtio 1.2, 5.2.6): a descriptor chain the guest
//! posted, checked and carried out against the read-only drive.
//!
//! The layout is the one every Linux driver uses: a device-readable
//! 16-byte header (type, reserved, sector), then the data descriptors,
//! then a device-writable status descriptor last. Everything about the
//! chain is the guest's to choose, so everything is checked before the
//! file is touched: a bad request gets `VIRTIO_BLK_S_IOERR` (or `UNSUPP`
//! for an unknown type) in its status byte, or, when even the status
//! descriptor is unusable, is handed back with a used length of 0. The
//! device never writes outside the guest's writable descriptors, never
//! reads past the drive, and never writes the drive.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SECURE_ERASE, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemory};

use super::disk::{DiskImage, SECTOR_SIZE};

/// Length of the request header: type, reserved, sector.
pub const HEADER_LEN: u32 = 16;
/// Most data segments in one request (the `seg_max` the device offers).
pub const SEG_MAX: u32 = 128;
/// Largest data segment a driver should make (the `size_max` offered).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Most data bytes in one request: what `seg_max` segments of `size_max`
/// bytes hold. Requests are served synchronously on the event loop, so
/// this also bounds how long one request can hold it.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Most descriptors in one request: header, data segments, status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Length of the drive ID that `GET_ID` returns.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Status byte: success.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed (or was malformed).
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: the request type is not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a request failed. Each maps to a status byte ([`RequestError::status`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has a single descriptor: no room for header and status.
    #[error("the chain has no separate header and status descriptors")]
    TooShort,
    /// The chain is longer than any valid request.
    #[error("the chain has {0} descriptors, at most {MAX_DESCRIPTORS} are accepted")]
    TooManyDescriptors(usize),
    /// The header descriptor is device-writable.
    #[error("the header descriptor is device-writable")]
    HeaderWritable,
    /// The header descriptor is too short.
    #[error("the header descriptor has {0} bytes, the header needs {HEADER_LEN}")]
    HeaderTooShort(u32),
    /// The header is not in guest RAM.
    #[error("the request header is not in guest memory")]
    HeaderUnreadable,
    /// A write-class request on a read-only drive.
    #[error("request type {0} would write the read-only drive")]
    ReadOnly(u32),
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A read without data descriptors.
    #[error("the request has no data descriptors")]
    NoData,
    /// A data descriptor the device may not write (reads, GET_ID).
    #[error("a data descriptor of the request is not device-writable")]
    DataNotWritable,
    /// The data is not a whole number of sectors.
    #[error("{0} data bytes are not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    /// The data exceeds what one request may carry.
    #[error("{0} data bytes exceed the {MAX_REQUEST_BYTES}-byte request limit")]
    TooLarge(u64),
    /// The sector range does not lie within the drive.
    #[error("sector {sector} + {len} bytes lies beyond the drive's {capacity} sectors")]
    OutOfRange {
        /// First sector asked for.
        sector: u64,
        /// Bytes asked for.
        len: u64,
        /// The drive's capacity, in sectors.
        capacity: u64,
    },
    /// The data could not be read into the guest's buffers (not guest RAM,
    /// or the host file failed or shrank).
    #[error("reading the drive into guest memory failed: {0}")]
    Read(String),
}

impl RequestError {
    /// The status byte the guest gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// What became of one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    /// The used length to report: data bytes written plus the status byte,
    /// or 0 when the status byte could not be written.
    pub used_len: u32,
    /// The status byte written, if one was.
    pub status: Option<u8>,
    /// Why the request failed, if it did.
    pub error: Option<RequestError>,
}

/// Reusable storage for a chain's descriptors, so the data path does not
/// allocate per request.
#[derive(Debug, Default)]
pub struct ChainBuffer {
    descs: Vec<Descriptor>,
}

impl ChainBuffer {
    /// An empty buffer with room for the longest valid chain.
    pub fn new() -> Self {
        ChainBuffer {
            descs: Vec::with_capacity(MAX_DESCRIPTORS),
        }
    }
}

/// Carries out the request whose descriptors `chain` yields, for a drive
/// with `id`, and writes its status byte.
///
/// `chain` is the queue's descriptor iterator, which ends by itself: it
/// stops after as many descriptors as the (direct or indirect) table has
/// entries, so walking to the last one is bounded even for a looping
/// chain. Only the first [`MAX_DESCRIPTORS`] are kept.
pub fn process<M: GuestMemory + ?Sized>(
    mem: &M,
    disk: &DiskImage,
    id: &[u8; ID_LEN],
    buffer: &mut ChainBuffer,
    chain: impl Iterator<Item = Descriptor>,
) -> Completion {
    let descs = &mut buffer.descs;
    descs.clear();
    let mut count = 0usize;
    let mut last = None;
    for desc in chain {
        count += 1;
        if descs.len() < MAX_DESCRIPTORS {
            descs.push(desc);
        }
        last = Some(desc);
    }
    let Some(status) = last else {
        return Completion {
            used_len: 0,
            status: None,
            error: Some(RequestError::TooShort),
        };
    };
    let result = if count > MAX_DESCRIPTORS {
        Err(RequestError::TooManyDescriptors(count))
    } else if count < 2 {
        Err(RequestError::TooShort)
    } else {
        // `descs` holds the whole chain: header first, status last.
        let (header, rest) = descs.split_first().unwrap_or((&status, &[]));
        let data = rest.split_last().map_or(&[][..], |(_, data)| data);
        execute(mem, disk, id, header, data)
    };
    let (status_byte, data_len, error) = match result {
        Ok(data_len) => (STATUS_OK, data_len, None),
        Err(e) => (e.status(), 0, Some(e)),
    };
    if !write_status(mem, &status, status_byte) {
        log::debug!("virtio-blk: request without a usable status byte");
        return Completion {
            used_len: 0,
            status: None,
            error,
        };
    }
    Completion {
        // Below MAX_REQUEST_BYTES, so far below u32::MAX.
        used_len: data_len.saturating_add(1),
        status: Some(status_byte),
        error,
    }
}

/// Writes the status into the last byte of the status descriptor, if it
/// is device-writable, non-empty and in guest RAM.
fn write_status<M: GuestMemory + ?Sized>(mem: &M, desc: &Descriptor, status: u8) -> bool {
    if !desc.is_write_only() || desc.len() == 0 {
        return false;
    }
    desc.addr()
        .checked_add(u64::from(desc.len() - 1))
        .is_some_and(|addr| mem.write_obj(status, addr).is_ok())
}

/// Runs a well-formed chain's request; returns the data bytes written to
/// the guest.
fn execute<M: GuestMemory + ?Sized>(
    mem: &M,
    disk: &DiskImage,
    id: &[u8; ID_LEN],
    header: &Descriptor,
    data: &[Descriptor],
) -> Result<u32, RequestError> {
    if header.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if header.len() < HEADER_LEN {
        return Err(RequestError::HeaderTooShort(header.len()));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::HeaderUnreadable)?;
    let (request_type, sector) = parse_header(&raw);
    match request_type {
        VIRTIO_BLK_T_IN => read(mem, disk, sector, data),
        VIRTIO_BLK_T_GET_ID => get_id(mem, id, data),
        // Nothing is ever written, so there is nothing to flush.
        VIRTIO_BLK_T_FLUSH => Ok(0),
        VIRTIO_BLK_T_OUT
        | VIRTIO_BLK_T_DISCARD
        | VIRTIO_BLK_T_WRITE_ZEROES
        | VIRTIO_BLK_T_SECURE_ERASE => Err(RequestError::ReadOnly(request_type)),
        other => Err(RequestError::Unsupported(other)),
    }
}

/// `VIRTIO_BLK_T_IN`: fills the data descriptors from `sector` on.
fn read<M: GuestMemory + ?Sized>(
    mem: &M,
    disk: &DiskImage,
    sector: u64,
    data: &[Descriptor],
) -> Result<u32, RequestError> {
    if data.is_empty() {
        return Err(RequestError::NoData);
    }
    if data.iter().any(|d| !d.is_write_only()) {
        return Err(RequestError::DataNotWritable);
    }
    // At most MAX_DESCRIPTORS u32 lengths: no overflow in u64.
    let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    let capacity = disk.sectors();
    let out_of_range = || RequestError::OutOfRange {
        sector,
        len,
        capacity,
    };
    let start = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = start.checked_add(len).ok_or_else(out_of_range)?;
    if end > disk.size() {
        return Err(out_of_range());
    }
    let mut offset = start;
    for desc in data {
        // u32 -> usize is lossless on the 64-bit hosts ember supports.
        disk.read_into(mem, desc.addr(), desc.len() as usize, offset)
            .map_err(|e| RequestError::Read(e.to_string()))?;
        offset += u64::from(desc.len());
    }
    // len <= MAX_REQUEST_BYTES < u32::MAX.
    Ok(u32::try_from(len).unwrap_or(u32::MAX))
}

/// `VIRTIO_BLK_T_GET_ID`: the drive's ID into the first data descriptor
/// (at most 20 bytes; NUL-padded, and not terminated when 20 long).
fn get_id<M: GuestMemory + ?Sized>(
    mem: &M,
    id: &[u8; ID_LEN],
    data: &[Descriptor],
) -> Result<u32, RequestError> {
    let Some(desc) = data.first() else {
        return Err(RequestError::NoData);
    };
    if !desc.is_write_only() {
        return Err(RequestError::DataNotWritable);
    }
    let n = (desc.len() as usize).min(ID_LEN);
    mem.write_slice(&id[..n], desc.addr())
        .map_err(|e| RequestError::Read(e.to_string()))?;
    Ok(n as u32)
}

/// Decodes a request header: type and sector.
pub fn parse_header(bytes: &[u8; HEADER_LEN as usize]) -> (u32, u64) {
    let mut t = [0u8; 4];
    let mut s = [0u8; 8];
    t.copy_from_slice(&bytes[..4]);
    s.copy_from_slice(&bytes[8..]);
    (u32::from_le_bytes(t), u64::from_le_bytes(s))
}

/// A request header as a driver writes it.
pub fn header_bytes(request_type: u32, sector: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::super::disk::tests::{pattern, TempImage};
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const ID: [u8; ID_LEN] = *b"ember-root\0\0\0\0\0\0\0\0\0\0";
    /// 16 sectors.
    const DISK_LEN: usize = 8192;

    fn at(addr: u64, off: u64) -> GuestAddress {
        GuestAddress(addr).unchecked_add(off)
    }

    struct Fixture {
        mem: GuestMemoryMmap,
        disk: DiskImage,
        _image: TempImage,
    }

    fn fixture(tag: &str) -> Fixture {
        let image = TempImage::new(tag, &pattern(DISK_LEN));
        Fixture {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
            disk: DiskImage::open(&image.0).unwrap(),
            _image: image,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    impl Fixture {
        /// Posts `descs` as one chain (with `header` at HDR, status byte
        /// preset to 0xff) and processes it.
        fn run(&self, header: [u8; 16], descs: &[RawDescriptor]) -> Completion {
            self.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let vq = MockSplitQueue::new(&self.mem, 256);
            let chain = vq.build_desc_chain(descs).unwrap();
            let mut buffer = ChainBuffer::new();
            process(&self.mem, &self.disk, &ID, &mut buffer, chain)
        }

        fn status_byte(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn read(&self, sector: u64, segments: &[u32]) -> Completion {
            let mut descs = vec![desc(HDR, 16, 0)];
            let mut addr = DATA;
            for &len in segments {
                descs.push(desc(addr, len, W));
                addr += u64::from(len) + 0x1000;
            }
            descs.push(desc(STATUS, 1, W));
            self.run(header_bytes(VIRTIO_BLK_T_IN, sector), &descs)
        }
    }

    fn failed(c: &Completion) -> &RequestError {
        c.error.as_ref().expect("the request should fail")
    }

    #[test]
    fn reads_several_segments() {
        let f = fixture("segments");
        let c = f.read(2, &[512, 1024, 512]);
        assert_eq!(c.error, None);
        assert_eq!(c.status, Some(STATUS_OK));
        assert_eq!(c.used_len, 2049);
        assert_eq!(f.status_byte(), STATUS_OK);
        let expected = pattern(DISK_LEN);
        let mut got = vec![0u8; 512];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, expected[1024..1536]);
        let mut got = vec![0u8; 1024];
        f.mem.read_slice(&mut got, at(DATA, 512 + 0x1000)).unwrap();
        assert_eq!(got, expected[1536..2560]);
        let mut got = vec![0u8; 512];
        f.mem
            .read_slice(&mut got, at(DATA, 512 + 1024 + 0x2000))
            .unwrap();
        assert_eq!(got, expected[2560..3072]);
        // The whole drive, to its last byte.
        let c = f.read(0, &[DISK_LEN as u32]);
        assert_eq!(c.status, Some(STATUS_OK));
    }

    #[test]
    fn short_header() {
        let f = fixture("short-header");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_IN, 0),
            &[desc(HDR, 15, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert_eq!(failed(&c), &RequestError::HeaderTooShort(15));
        assert_eq!(c.status, Some(STATUS_IOERR));
        assert_eq!(f.status_byte(), STATUS_IOERR);
        assert_eq!(c.used_len, 1);
    }

    #[test]
    fn writable_header() {
        let f = fixture("writable-header");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_IN, 0),
            &[desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert_eq!(failed(&c), &RequestError::HeaderWritable);
        assert_eq!(f.status_byte(), STATUS_IOERR);
    }

    #[test]
    fn header_outside_memory() {
        let f = fixture("header-oob");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_IN, 0),
            &[
                desc(0x40_0000 - 8, 16, 0),
                desc(DATA, 512, W),
                desc(STATUS, 1, W),
            ],
        );
        assert_eq!(failed(&c), &RequestError::HeaderUnreadable);
        assert_eq!(f.status_byte(), STATUS_IOERR);
    }

    #[test]
    fn read_only_status_is_not_written() {
        let f = fixture("ro-status");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_IN, 0),
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)],
        );
        assert_eq!(c.used_len, 0);
        assert_eq!(c.status, None);
        assert_eq!(f.status_byte(), 0xff);
        // Nor is an empty one, or one outside guest memory.
        for status in [desc(STATUS, 0, W), desc(0x40_0000, 1, W)] {
            let c = f.run(
                header_bytes(VIRTIO_BLK_T_IN, 0),
                &[desc(HDR, 16, 0), desc(DATA, 512, W), status],
            );
            assert_eq!((c.used_len, c.status), (0, None));
        }
    }

    #[test]
    fn status_in_the_last_byte_of_a_longer_descriptor() {
        let f = fixture("long-status");
        f.mem.write_obj(0xffu8, at(STATUS, 3)).unwrap();
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_FLUSH, 0),
            &[desc(HDR, 16, 0), desc(STATUS, 4, W)],
        );
        assert_eq!(c.status, Some(STATUS_OK));
        assert_eq!(f.mem.read_obj::<u8>(at(STATUS, 3)).unwrap(), STATUS_OK);
    }

    #[test]
    fn read_into_read_only_data() {
        let f = fixture("ro-data");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_IN, 0),
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        );
        assert_eq!(failed(&c), &RequestError::DataNotWritable);
        assert_eq!(f.status_byte(), STATUS_IOERR);
    }

    #[test]
    fn data_not_a_multiple_of_512() {
        let f = fixture("unaligned");
        let c = f.read(0, &[512, 100]);
        assert_eq!(failed(&c), &RequestError::Unaligned(612));
        assert_eq!(f.status_byte(), STATUS_IOERR);
        // Nothing was read.
        let mut got = [0u8; 4];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0; 4]);
    }

    #[test]
    fn sectors_past_the_end() {
        let f = fixture("past-end");
        let c = f.read(15, &[1024]);
        assert!(matches!(
            failed(&c),
            RequestError::OutOfRange {
                sector: 15,
                len: 1024,
                capacity: 16
            }
        ));
        assert_eq!(f.status_byte(), STATUS_IOERR);
        let c = f.read(16, &[512]);
        assert!(matches!(failed(&c), RequestError::OutOfRange { .. }));
        // The last sector alone is fine.
        assert_eq!(f.read(15, &[512]).status, Some(STATUS_OK));
    }

    #[test]
    fn overflowing_sector() {
        let f = fixture("overflow");
        for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 1, 1 << 55] {
            let c = f.read(sector, &[512]);
            assert!(
                matches!(failed(&c), RequestError::OutOfRange { .. }),
                "{sector}: {c:?}"
            );
            assert_eq!(f.status_byte(), STATUS_IOERR);
        }
    }

    #[test]
    fn too_many_descriptors() {
        let f = fixture("too-many");
        let segments = vec![512u32; SEG_MAX as usize + 1];
        let c = f.read(0, &segments[..16]);
        assert_eq!(c.status, Some(STATUS_OK), "16 segments are fine");
        // SEG_MAX + 1 data segments: one descriptor too many.
        let mut descs = vec![desc(HDR, 16, 0)];
        descs.extend((0..=SEG_MAX).map(|i| desc(DATA + u64::from(i) * 512, 512, W)));
        descs.push(desc(STATUS, 1, W));
        let c = f.run(header_bytes(VIRTIO_BLK_T_IN, 0), &descs);
        assert_eq!(
            failed(&c),
            &RequestError::TooManyDescriptors(MAX_DESCRIPTORS + 1)
        );
        assert_eq!(f.status_byte(), STATUS_IOERR);
    }

    #[test]
    fn too_much_data() {
        // A drive big enough that only the request limit refuses.
        let image = TempImage::new("too-much", &vec![0u8; 16 << 20]);
        let f = Fixture {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
            disk: DiskImage::open(&image.0).unwrap(),
            _image: image,
        };
        // (A chain of 4 GiB or more ends early: the queue's iterator stops.)
        let c = f.read(0, &[0x7fff_0000, 0x7fff_0000]);
        assert_eq!(failed(&c), &RequestError::TooLarge(0xfffe_0000));
        let c = f.read(0, &[(MAX_REQUEST_BYTES + 512) as u32]);
        assert!(matches!(failed(&c), RequestError::TooLarge(_)));
        assert_eq!(f.status_byte(), STATUS_IOERR);
    }

    #[test]
    fn data_outside_guest_memory() {
        let f = fixture("data-oob");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_IN, 0),
            &[
                desc(HDR, 16, 0),
                desc(0x40_0000 - 256, 512, W),
                desc(STATUS, 1, W),
            ],
        );
        assert!(matches!(failed(&c), RequestError::Read(_)));
        assert_eq!(f.status_byte(), STATUS_IOERR);
    }

    #[test]
    fn out_and_other_writes_are_refused() {
        let f = fixture("out");
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_T_SECURE_ERASE,
        ] {
            f.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
            let c = f.run(
                header_bytes(t, 0),
                &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
            );
            assert_eq!(failed(&c), &RequestError::ReadOnly(t));
            assert_eq!(f.status_byte(), STATUS_IOERR);
        }
        // The drive is unchanged.
        let mut got = vec![0u8; DISK_LEN];
        f.disk
            .read_into(&f.mem, GuestAddress(DATA), DISK_LEN, 0)
            .unwrap();
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, pattern(DISK_LEN));
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let f = fixture("unknown");
        for t in [2, 0x8000_0000, 99] {
            let c = f.run(header_bytes(t, 0), &[desc(HDR, 16, 0), desc(STATUS, 1, W)]);
            assert_eq!(failed(&c), &RequestError::Unsupported(t));
            assert_eq!(f.status_byte(), STATUS_UNSUPP);
        }
    }

    #[test]
    fn get_id() {
        let f = fixture("get-id");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_GET_ID, 0),
            &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
        );
        assert_eq!(c.status, Some(STATUS_OK));
        assert_eq!(c.used_len, 21);
        let mut got = [0u8; 20];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, ID);
        // A shorter buffer gets a prefix; a read-only one an error.
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_GET_ID, 0),
            &[desc(HDR, 16, 0), desc(DATA, 5, W), desc(STATUS, 1, W)],
        );
        assert_eq!(c.used_len, 6);
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_GET_ID, 0),
            &[desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)],
        );
        assert_eq!(failed(&c), &RequestError::DataNotWritable);
    }

    #[test]
    fn flush_is_ok() {
        let f = fixture("flush");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_FLUSH, 0),
            &[desc(HDR, 16, 0), desc(STATUS, 1, W)],
        );
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(STATUS_OK),
                error: None
            }
        );
    }

    #[test]
    fn single_descriptor_chain() {
        let f = fixture("single");
        let c = f.run(header_bytes(VIRTIO_BLK_T_IN, 0), &[desc(STATUS, 1, W)]);
        assert_eq!(failed(&c), &RequestError::TooShort);
        assert_eq!(f.status_byte(), STATUS_IOERR);
        let c = f.run(header_bytes(VIRTIO_BLK_T_IN, 0), &[desc(HDR, 16, 0)]);
        assert_eq!((c.used_len, c.status), (0, None));
    }

    #[test]
    fn empty_read() {
        let f = fixture("empty-read");
        let c = f.run(
            header_bytes(VIRTIO_BLK_T_IN, 0),
            &[desc(HDR, 16, 0), desc(STATUS, 1, W)],
        );
        assert_eq!(failed(&c), &RequestError::NoData);
    }

    #[test]
    fn looping_chain_ends() {
        // Descriptor 1 points back at itself: the queue's iterator stops
        // after a table's worth, which is too many for a request.
        let f = fixture("loop");
        f.mem
            .write_slice(&header_bytes(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .unwrap();
        let vq = MockSplitQueue::new(&f.mem, 16);
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        vq.desc_table()
            .store(0, RawDescriptor::from(Descriptor::new(HDR, 16, next, 1)))
            .unwrap();
        vq.desc_table()
            .store(
                1,
                RawDescriptor::from(Descriptor::new(DATA, 512, W | next, 1)),
            )
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&f.mem).unwrap();
        let mut buffer = ChainBuffer::new();
        let c = process(&f.mem, &f.disk, &ID, &mut buffer, chain);
        // A table's worth: the header, 14 data descriptors and the 15th
        // copy as the status. A valid read of 14 sectors, as it happens.
        assert_eq!(c.error, None);
        assert_eq!(c.used_len, 14 * 512 + 1);
    }

    #[test]
    fn header_round_trip() {
        assert_eq!(parse_header(&header_bytes(8, 77)), (8, 77));
    }
}
