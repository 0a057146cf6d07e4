//! Virtio devices over the virtio-mmio transport (virtio 1.x, modern
//! registers only).
//!
//! The transport lives on the MMIO bus and is driven by vCPU threads; a
//! device's data path runs on the event loop, woken by ioeventfds when the
//! guest notifies a queue, and raises interrupts through an irqfd. Neither
//! side ever blocks the other on I/O.

pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
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
