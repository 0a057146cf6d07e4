//! What a snapshot keeps of the vsock device: its transport's registers
//! and queues. Connections are not saved (a restored clone's guest is told
//! to reset its own), nor are the rate limiters' buckets.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::backend::{VsockBackend, VsockHub};
use super::device::Vsock;
use crate::devices::bus::lock;
use crate::devices::persist::Persist;
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::mmio::{
    MmioTransport, MmioTransportArgs, MmioTransportState, RestoreError,
};
use crate::devices::virtio::Interrupt;

/// The vsock device in a snapshot. Transparent: a snapshot holds just the
/// transport's state, as it did before this type existed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VsockState {
    /// Its transport and queues.
    pub transport: MmioTransportState,
}

/// A [`Vsock`] device behind its virtio-mmio transport.
#[derive(Debug)]
pub struct MmioVsock {
    /// The device model (its event-loop side holds it too).
    pub device: Arc<Mutex<Vsock>>,
    /// Its register window (the MMIO bus holds it too).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// What making a vsock device needs besides its state.
pub struct VsockArgs {
    /// The guest's context ID.
    pub cid: u64,
    /// Its interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// Where guest-initiated connections go.
    pub backend: Box<dyn VsockBackend>,
    /// Delivers host-initiated connections.
    pub hub: Arc<VsockHub>,
    /// Guest memory, where its queues live.
    pub memory: GuestMemoryMmap,
    /// Limits on guest-to-host payload bytes.
    pub tx_limiter: RateLimiter,
    /// Limits on host-to-guest payload bytes.
    pub rx_limiter: RateLimiter,
}

impl MmioVsock {
    /// A device at power-on.
    pub fn new(args: VsockArgs) -> Result<Self, VsockError> {
        Self::make(args, None)
    }

    fn make(args: VsockArgs, saved: Option<&MmioTransportState>) -> Result<Self, VsockError> {
        let mut device = Vsock::new(args.cid, args.interrupt.clone(), args.backend, args.hub)
            .map_err(VsockError::EventFd)?;
        device.set_rate_limiters(args.tx_limiter, args.rx_limiter);
        let device = Arc::new(Mutex::new(device));
        let transport_args = MmioTransportArgs {
            device: device.clone(),
            memory: args.memory,
            interrupt: args.interrupt,
        };
        let transport = MmioTransport::new_or_restore(transport_args, saved)?;
        Ok(MmioVsock {
            device,
            transport: Arc::new(Mutex::new(transport)),
        })
    }
}

impl Persist for MmioVsock {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            transport: lock(&self.transport).save(),
        }
    }

    /// The transport's queues are validated against guest memory.
    fn restore(args: VsockArgs, state: &VsockState) -> Result<Self, VsockError> {
        Self::make(args, Some(&state.transport))
    }
}

/// A vsock device cannot be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Its eventfds cannot be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The saved transport is inconsistent.
    #[error(transparent)]
    Transport(#[from] RestoreError),
}
