//! The virtio-mmio transport, version 2 (virtio 1.x, no legacy registers).
//!
//! Every register access comes from the guest and is validated here: bad
//! offsets read as 0 and writes to them are dropped, queue setup is only
//! accepted before the queue is enabled, and a driver that enables queues
//! outside guest memory gets its device marked NEEDS_RESET rather than a
//! device that would later touch memory it should not.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use serde::{Deserialize, Serialize};

use super::{
    ActivateError, Activation, Interrupt, QueueState, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::{lock, BusDevice};
use crate::devices::persist::Persist;

/// "virt", little endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) mmio layout.
const MMIO_VERSION: u32 = 2;
/// "EMBR": who made this device, as the guest sees it.
const VENDOR_ID: u32 = 0x5242_4d45;
/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the queue-notify register, where ioeventfds are attached.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// A transport's registers and queues in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Selector registers.
    pub queue_select: u32,
    /// Selector registers.
    pub device_features_select: u32,
    /// Selector registers.
    pub driver_features_select: u32,
    /// Config generation counter.
    pub config_generation: u32,
    /// Interrupt status register.
    pub interrupt_status: u32,
    /// The queues: the running device's when it runs (with its ring
    /// positions), else as configured.
    pub queues: Vec<QueueState>,
}

/// What restoring a transport needs besides its state.
pub struct MmioTransportArgs {
    /// The device it drives.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Guest memory, where its queues live.
    pub memory: GuestMemoryMmap,
    /// Its interrupt line.
    pub interrupt: Arc<Interrupt>,
}

/// One virtio device's register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `memory` and whose
    /// interrupts go through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn state_with(&self, device: &dyn VirtioDevice) -> MmioTransportState {
        let queues = match device.active_queues() {
            Some(live) => live.iter().map(QueueState::of).collect(),
            None => self.queues.iter().map(QueueState::of).collect(),
        };
        MmioTransportState {
            status: self.status,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Puts a live transport back into `state` (a clone reset in place),
    /// re-activating its device with the saved queues. Refused, with
    /// nothing changed, unless the transport is still in `observed` (the
    /// state its owner saw before resetting guest memory): a request the
    /// device served since then wrote memory that reset did not see.
    pub fn reset_to(
        &mut self,
        observed: &MmioTransportState,
        state: &MmioTransportState,
    ) -> Result<(), RestoreError> {
        self.apply(state, Some(observed))
    }

    /// Sets registers and queues from `state`; with `observed`, only if the
    /// transport is in that state (checked under the device's lock, which
    /// the device's event handler also takes).
    fn apply(
        &mut self,
        state: &MmioTransportState,
        observed: Option<&MmioTransportState>,
    ) -> Result<(), RestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .zip(&self.queues)
            .map(|(saved, fresh)| {
                if saved.max_size != fresh.max_size() {
                    return Err(RestoreError::Queue(virtio_queue::Error::InvalidSize));
                }
                saved.to_queue(&self.memory).map_err(RestoreError::Queue)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let running = state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && state.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0;
        let device = Arc::clone(&self.device);
        let mut device = lock(&device);
        if let Some(observed) = observed {
            if self.state_with(&*device) != *observed {
                return Err(RestoreError::Changed);
            }
        }
        if state.acked_features & !device.features() != 0 {
            return Err(RestoreError::Features(state.acked_features));
        }
        self.status = state.status;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        device.ack_features(state.acked_features);
        if running {
            let live = queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(RestoreError::Queue)?;
            device
                .activate(Activation {
                    memory: self.memory.clone(),
                    queues: live,
                })
                .map_err(RestoreError::Activate)?;
        } else if observed.is_some() {
            // A live device the guest had not (or no longer) driven.
            device.reset();
        }
        self.queues = queues;
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the device runs.
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = lock(&self.device).features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // Sizes that are zero, too large or not powers of two
                    // leave the queue invalid; activation then refuses it.
                    q.set_size(u16::try_from(value).unwrap_or(0));
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => self.set_queue_addr(|q| {
                q.set_desc_table_address(Some(value), None);
            }),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => self.set_queue_addr(|q| {
                q.set_desc_table_address(None, Some(value));
            }),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.set_queue_addr(|q| {
                q.set_avail_ring_address(Some(value), None);
            }),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.set_queue_addr(|q| {
                q.set_avail_ring_address(None, Some(value));
            }),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => self.set_queue_addr(|q| {
                q.set_used_ring_address(Some(value), None);
            }),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.set_queue_addr(|q| {
                q.set_used_ring_address(None, Some(value));
            }),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            // Notifications arrive through ioeventfds; one landing here has
            // a queue index no ioeventfd matched, so there is nothing to do.
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {}
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }

    fn set_queue_addr(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            if !q.ready() {
                set(q);
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated before FEATURES_OK; later writes are a
        // driver bug and are ignored.
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.acked_features = (self.acked_features & !mask) | (u64::from(value) << shift);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        // The driver may only add bits (the spec's status sequence).
        if value & self.status != self.status {
            log::debug!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}",
                self.status
            );
            return;
        }
        if new_bits & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.accept_features() {
            // Leaving FEATURES_OK unset tells the driver we refused.
            self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = value;
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn accept_features(&mut self) -> bool {
        let mut device = lock(&self.device);
        let offered = device.features();
        if self.acked_features & !offered != 0
            || self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            log::warn!(
                "virtio-mmio: driver features {:#x} not acceptable (offered {offered:#x})",
                self.acked_features
            );
            return false;
        }
        device.ack_features(self.acked_features);
        true
    }

    fn activate(&mut self) {
        let required = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        let result = if self.status & required != required {
            Err("DRIVER_OK without feature negotiation".to_string())
        } else if let Some(i) = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.memory))
        {
            Err(format!("queue {i} is not ready or not valid"))
        } else {
            // The device gets its own copy of each queue: the transport
            // keeps answering register reads from the configured values.
            self.queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
                .and_then(|queues| {
                    lock(&self.device)
                        .activate(Activation {
                            memory: self.memory.clone(),
                            queues,
                        })
                        .map_err(|e| e.to_string())
                })
        };
        if let Err(e) = result {
            log::warn!("virtio-mmio: device not started: {e}");
            self.fail();
        }
    }

    /// Marks the device broken; the guest driver resets it or gives up.
    fn fail(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.trigger(INT_CONFIG);
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.reset();
    }
}

/// A transport cannot be restored from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A saved queue is inconsistent or outside guest memory.
    #[error("virtio queue in snapshot is invalid: {0}")]
    Queue(virtio_queue::Error),
    /// The snapshot has another number of queues than the device.
    #[error("snapshot has {saved} virtio queues, the device has {device}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// Features the device does not offer.
    #[error("snapshot acked virtio features {0:#x} the device does not offer")]
    Features(u64),
    /// The device refused the saved queues.
    #[error("cannot restart the virtio device: {0}")]
    Activate(ActivateError),
    /// The device served a request after its owner last looked.
    #[error("the virtio device changed while it was being reset")]
    Changed,
}

impl MmioTransport {
    /// A new transport for `args`, or, with `saved`, one restored from it
    /// (see [`Persist::restore`]): what every device's own constructor
    /// and restore share.
    pub fn new_or_restore(
        args: MmioTransportArgs,
        saved: Option<&MmioTransportState>,
    ) -> Result<Self, RestoreError> {
        match saved {
            Some(state) => Self::restore(args, state),
            None => {
                Self::new(args.device, args.memory, args.interrupt).map_err(RestoreError::Queue)
            }
        }
    }
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = RestoreError;

    fn save(&self) -> MmioTransportState {
        self.state_with(&*lock(&self.device))
    }

    /// Recreates a transport from `state`, re-activating its device with
    /// the saved queues if it was running. The state comes from a file:
    /// queue counts, sizes and addresses are validated against the device
    /// and guest memory.
    fn restore(args: MmioTransportArgs, state: &MmioTransportState) -> Result<Self, RestoreError> {
        let mut transport =
            Self::new(args.device, args.memory, args.interrupt).map_err(RestoreError::Queue)?;
        transport.apply(state, None)?;
        Ok(transport)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            lock(&self.device).read_config(offset - config, data);
            return;
        }
        match (u32::try_from(offset), <&mut [u8; 4]>::try_from(&mut *data)) {
            (Ok(offset), Ok(word)) if offset % 4 == 0 => {
                *word = self.read_reg(offset).to_le_bytes();
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            lock(&self.device).write_config(offset - config, data);
            return;
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(offset), Ok(word)) if offset % 4 == 0 => {
                self.write_reg(offset, u32::from_le_bytes(word));
            }
            _ => log::debug!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        activated: Option<usize>,
        resets: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&3u64.to_le_bytes(), offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            self.activated = Some(activation.queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn active_queues(&self) -> Option<&[Queue]> {
            None
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (MmioTransport::new(dev.clone(), mem, irq).unwrap(), dev)
    }

    fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut d = [0u8; 4];
        t.read(u64::from(off), &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            t,
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(
            t,
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u32) {
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, index);
        w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, base);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
        w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    const RUNNING: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;

    #[test]
    fn identity_registers() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 19);
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 8];
        t.read(0x100, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 3);
        // Misaligned and odd-sized register accesses read 0.
        let mut odd = [0xffu8; 2];
        t.read(0x0, &mut odd);
        assert_eq!(odd, [0, 0]);
    }

    #[test]
    fn full_bring_up_activates_the_device() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, RUNNING);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
        assert_eq!(dev.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), RUNNING);
        // Reset returns everything to the initial state.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn legacy_driver_without_version_1_is_refused() {
        let (mut t, _) = setup();
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
    }

    #[test]
    fn queue_outside_memory_marks_needs_reset() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0xfff0_0000);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, RUNNING);
        assert_eq!(dev.lock().unwrap().activated, None);
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_ne!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG, 0);
    }

    #[test]
    fn queue_not_enabled_is_refused_at_activation() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        // A size that is not a power of two is ignored, not applied.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 3);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, RUNNING);
        assert_eq!(dev.lock().unwrap().activated, None);
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }
}
