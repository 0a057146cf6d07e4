//! Virtio devices over the virtio-mmio transport (virtio 1.x, modern
//! registers only).
//!
//! The transport lives on the MMIO bus and is driven by vCPU threads; a
//! device's data path runs on the event loop, woken by ioeventfds when the
//! guest notifies a queue, and raises interrupts through an irqfd. Neither
//! side ever blocks the other on I/O.

pub mod block;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration changed (e.g. NEEDS_RESET).
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device's interrupt line: the virtio-mmio interrupt status register,
/// plus the irqfd that raises the line in KVM's interrupt controller.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in the status register and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// The status register, as the guest reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The irqfd, for registration with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Restores the status register (snapshot restore).
    pub fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }
}

/// A virtqueue's state in a snapshot. Read from a file, so untrusted:
/// [`QueueState::to_queue`] validates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
}

impl QueueState {
    /// Captures `queue`.
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }

    /// A queue in this state, if the state is self-consistent and (when
    /// ready) lies inside `memory`.
    pub fn to_queue(&self, memory: &GuestMemoryMmap) -> Result<Queue, virtio_queue::Error> {
        let queue = Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })?;
        if queue.ready() && !queue.is_valid(memory) {
            return Err(virtio_queue::Error::InvalidSize);
        }
        Ok(queue)
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory, for the queues' descriptors and buffers.
    pub memory: GuestMemoryMmap,
    /// The queues as the driver configured them, in index order.
    pub queues: Vec<Queue>,
}

/// A virtio device model behind the mmio transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    /// Reads device config space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the data path.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the data path and forgets queue state (driver reset).
    fn reset(&mut self);
    /// The live queues, while the device runs (for snapshots).
    fn active_queues(&self) -> Option<&[Queue]>;
}

/// Copies `config[offset..]` into `data`, reading 0 past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// A device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs.
    #[error("the driver configured {got} queues, the device needs {need}")]
    QueueCount {
        /// Queues configured.
        got: usize,
        /// Queues needed.
        need: usize,
    },
    /// A queue's rings lie outside guest memory or are misaligned.
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_status_and_ack() {
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        irq.trigger(INT_VRING);
        irq.trigger(INT_CONFIG);
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
    }

    #[test]
    fn config_reads_are_bounded() {
        let config = 3u64.to_le_bytes();
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 0, &mut data);
        assert_eq!(data, [3, 0, 0, 0]);
        read_config_bytes(&config, 6, &mut data);
        assert_eq!(data, [0, 0, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0, 0, 0, 0]);
    }
}
