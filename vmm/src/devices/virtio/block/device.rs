//! The virtio-blk device model: its features and config space, and how it
//! serves its request queue.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{DiskImage, SECTOR_SIZE};
use super::request::{self, ChainBuffer, ID_LEN, MAX_REQUEST_BYTES, SEG_MAX, SIZE_MAX};
use crate::devices::rate_limiter::{RateLimiter, TokenKind};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, INT_VRING,
    VIRTIO_F_VERSION_1,
};

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The ID `GET_ID` returns for the root drive (NUL-padded to 20 bytes).
pub const ROOT_DRIVE_ID: &str = "ember-root";
/// Most requests served per wake-up before yielding the event loop.
pub const REQUESTS_PER_WAKE: usize = QUEUE_SIZE as usize;

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// `struct virtio_blk_config` up to `blk_size`: capacity (le64), size_max,
/// seg_max (le32 each), geometry (4 bytes, unused), blk_size (le32).
const CONFIG_LEN: usize = 24;

/// The block device model.
#[derive(Debug)]
pub struct Block {
    disk: Arc<DiskImage>,
    id: [u8; ID_LEN],
    config: [u8; CONFIG_LEN],
    acked_features: u64,
    interrupt: Arc<Interrupt>,
    pub(super) queue_event: EventFd,
    active: Option<(GuestMemoryMmap, Queue)>,
    chain: ChainBuffer,
    pub(super) limiter: RateLimiter,
}

impl Block {
    /// A device for `disk`, answering `GET_ID` with `id` (truncated to 20
    /// bytes), interrupting through `interrupt`.
    pub fn new(disk: Arc<DiskImage>, id: &str, interrupt: Arc<Interrupt>) -> std::io::Result<Self> {
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Block {
            disk,
            id: id_bytes,
            config,
            acked_features: 0,
            interrupt,
            queue_event: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            chain: ChainBuffer::new(),
            limiter: RateLimiter::unlimited(),
        })
    }

    /// Limits the device's reads with `limiter` (unlimited by default).
    /// Set before the device's [`super::BlockEvents`] is made, which watches the
    /// limiter's timer.
    pub fn set_rate_limiter(&mut self, limiter: RateLimiter) {
        self.limiter = limiter;
    }

    /// The drive.
    pub fn disk(&self) -> &Arc<DiskImage> {
        &self.disk
    }

    /// The ioeventfd the guest's queue notifications should trigger
    /// (register it with KVM at the notify register, datamatch 0).
    pub fn queue_event(&self) -> &EventFd {
        &self.queue_event
    }

    /// Serves the requests the guest posted, up to [`REQUESTS_PER_WAKE`];
    /// if more are left, wakes itself again so they are served after the
    /// other devices had a turn.
    pub fn process_queue(&mut self) {
        let Some((mem, queue)) = self.active.as_mut() else {
            return;
        };
        let mut served = 0;
        while served < REQUESTS_PER_WAKE && !self.limiter.is_blocked() {
            // None when the ring is empty, or its index is beyond what a
            // driver may post (the queue refuses such a ring).
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            if !admit(&mut self.limiter, request_bytes(chain.clone())) {
                // Left on the queue: the limiter's timer resumes it.
                queue.go_to_previous_position();
                break;
            }
            let head = chain.head_index();
            let done = request::process(&*mem, &self.disk, &self.id, &mut self.chain, chain);
            if let Some(e) = &done.error {
                log::debug!("virtio-blk: request failed: {e}");
            }
            if let Err(e) = queue.add_used(&*mem, head, done.used_len) {
                // Only a used ring outside guest memory does this, which
                // activation rules out.
                log::warn!("virtio-blk: used ring: {e}");
                break;
            }
            served += 1;
        }
        if served == REQUESTS_PER_WAKE && !self.limiter.is_blocked() {
            let _ = self.queue_event.write(1);
        }
        if served > 0 {
            match queue.needs_notification(&*mem) {
                Ok(false) => {}
                // When in doubt, interrupt: a spurious interrupt is harmless.
                Ok(true) | Err(_) => self.interrupt.trigger(INT_VRING),
            }
        }
    }
}

/// Takes a request's tokens, one op and its bytes, or none.
fn admit(limiter: &mut RateLimiter, bytes: u64) -> bool {
    if !limiter.consume(bytes, TokenKind::Bytes) {
        return false;
    }
    if !limiter.consume(1, TokenKind::Ops) {
        limiter.replenish(bytes, TokenKind::Bytes);
        return false;
    }
    true
}

/// The data bytes a request asks for, as its descriptors declare them
/// (all but the header and the status byte), capped at what a request
/// may carry: a malformed chain is charged too, but never more than the
/// largest valid request.
fn request_bytes(chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>) -> u64 {
    let total = chain.fold(0u64, |sum, d| sum.saturating_add(u64::from(d.len())));
    total
        .saturating_sub(u64::from(request::HEADER_LEN) + 1)
        .min(MAX_REQUEST_BYTES)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_RO)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, with VIRTIO_BLK_F_CONFIG_WCE, which
        // a read-only drive does not offer.
        log::debug!("virtio-blk: guest wrote read-only config at {offset:#x}");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let Some(queue) = activation.queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { got, need: 1 });
        };
        self.active = Some((activation.memory, queue));
        // A restored device may have requests the guest posted just before
        // the snapshot, whose notification the snapshot did not keep.
        let _ = self.queue_event.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active
            .as_ref()
            .map(|(_, queue)| std::slice::from_ref(queue))
    }
}

#[cfg(test)]
mod tests {
    use super::super::disk::tests::{pattern, TempImage};
    use super::super::request::{header_bytes, STATUS_IOERR, STATUS_OK};
    use super::*;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn device(tag: &str) -> (Block, TempImage) {
        let image = TempImage::new(tag, &pattern(4096));
        let disk = Arc::new(DiskImage::open(&image.0).unwrap());
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (Block::new(disk, ROOT_DRIVE_ID, irq).unwrap(), image)
    }

    #[test]
    fn config_space() {
        let (dev, _image) = device("config");
        let mut word = [0u8; 8];
        dev.read_config(0, &mut word);
        assert_eq!(u64::from_le_bytes(word), 8);
        let mut word = [0u8; 4];
        dev.read_config(12, &mut word);
        assert_eq!(u32::from_le_bytes(word), SEG_MAX);
        dev.read_config(20, &mut word);
        assert_eq!(u32::from_le_bytes(word), 512);
        dev.read_config(4096, &mut word);
        assert_eq!(word, [0; 4]);
        assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(dev.device_type(), 2);
    }

    #[test]
    fn activation_needs_one_queue() {
        let (mut dev, _image) = device("activate");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let err = dev
            .activate(Activation {
                memory: mem,
                queues: vec![],
            })
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { got: 0, need: 1 }));
        assert!(dev.active_queues().is_none());
    }

    #[test]
    fn serves_the_queue_and_interrupts() {
        let (mut dev, _image) = device("queue");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let raw =
            |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        mem.write_slice(&header_bytes(VIRTIO_BLK_T_IN, 1), GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&header_bytes(VIRTIO_BLK_T_OUT, 0), GuestAddress(0x10_1000))
            .unwrap();
        // A read of sector 1, then a write.
        vq.add_desc_chains(
            &[
                raw(0x10_0000, 16, 1, 1),
                raw(0x20_0000, 512, W | 1, 2),
                raw(0x30_0000, 1, W, 0),
                raw(0x10_1000, 16, 1, 4),
                raw(0x20_1000, 512, 1, 5),
                raw(0x30_1000, 1, W, 0),
            ],
            0,
        )
        .unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        dev.activate(Activation {
            memory: mem.clone(),
            queues: vec![queue],
        })
        .unwrap();
        // Activation looks at the queue once.
        assert_eq!(dev.queue_event().read().unwrap(), 1);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 2);
        let first = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((first.id(), first.len()), (0, 513));
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, pattern(4096)[512..1024]);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
            STATUS_OK
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x30_1000)).unwrap(),
            STATUS_IOERR
        );
        assert_eq!(dev.interrupt.status() & INT_VRING, INT_VRING);
        // Reset stops it.
        dev.reset();
        assert!(dev.active_queues().is_none());
        dev.process_queue();
    }

    #[test]
    fn a_throttled_request_stays_on_the_queue_until_the_timer() {
        use crate::devices::rate_limiter::{BucketConfig, RateLimitConfig};
        let (mut dev, _image) = device("throttle");
        // One request per 50 ms, no byte limit.
        let limits = RateLimitConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 50,
            }),
        };
        dev.set_rate_limiter(RateLimiter::new(&limits).unwrap());
        let timer = dev.limiter.timer_fd().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let raw =
            |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        mem.write_slice(&header_bytes(VIRTIO_BLK_T_IN, 0), GuestAddress(0x10_0000))
            .unwrap();
        vq.add_desc_chains(
            &[
                raw(0x10_0000, 16, 1, 1),
                raw(0x20_0000, 512, W | 1, 2),
                raw(0x30_0000, 1, W, 0),
                raw(0x10_0000, 16, 1, 4),
                raw(0x20_1000, 512, W | 1, 5),
                raw(0x30_1000, 1, W, 0),
            ],
            0,
        )
        .unwrap();
        dev.activate(Activation {
            memory: mem.clone(),
            queues: vec![vq.create_queue().unwrap()],
        })
        .unwrap();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        assert!(dev.limiter.is_blocked());
        assert_eq!(dev.active_queues().unwrap()[0].next_avail(), 1);
        // A guest notification meanwhile serves nothing.
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        let mut pfd = libc::pollfd {
            fd: timer,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        dev.limiter.timer_fired();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 2);
        let second = vq.used().ring().ref_at(1).unwrap().load();
        assert_eq!((second.id(), second.len()), (3, 513));
    }

    #[test]
    fn request_bytes_are_the_declared_data() {
        let d = |len| Descriptor::new(0, len, 0, 0);
        assert_eq!(request_bytes([d(16), d(4096), d(1)].into_iter()), 4096);
        assert_eq!(request_bytes([d(16)].into_iter()), 0);
        assert_eq!(
            request_bytes([d(16), d(u32::MAX), d(u32::MAX), d(1)].into_iter()),
            MAX_REQUEST_BYTES
        );
    }
}
