//! What a snapshot keeps of a drive: its transport's registers and queue,
//! and which drive it had. The [`Block`] device has no state of its own
//! beyond its queue, which the transport saves; its rate limiter's buckets
//! are not saved.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::device::Block;
use super::disk::{DiskError, DiskImage, DriveSpec};
use crate::devices::bus::lock;
use crate::devices::persist::Persist;
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::mmio::{
    MmioTransport, MmioTransportArgs, MmioTransportState, RestoreError,
};
use crate::devices::virtio::Interrupt;

/// A drive's device in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Its transport and queue.
    pub transport: MmioTransportState,
    /// The drive the template had: a clone gets the same one.
    pub drive: DriveSpec,
}

/// A [`Block`] device behind its virtio-mmio transport, and what a
/// snapshot records of its drive.
#[derive(Debug)]
pub struct MmioBlock {
    /// The device model (its event-loop side holds it too).
    pub device: Arc<Mutex<Block>>,
    /// Its register window (the MMIO bus holds it too).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The drive it serves.
    pub drive: DriveSpec,
}

/// What making a block device needs besides its state.
pub struct BlockArgs {
    /// The drive.
    pub disk: Arc<DiskImage>,
    /// What `GET_ID` answers (truncated to 20 bytes).
    pub id: &'static str,
    /// Its interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// Guest memory, where its queue lives.
    pub memory: GuestMemoryMmap,
    /// Its limits (a restored clone gets the ones given, with full
    /// buckets).
    pub limiter: RateLimiter,
}

impl MmioBlock {
    /// A device at power-on.
    pub fn new(args: BlockArgs) -> Result<Self, BlockError> {
        Self::make(args, None)
    }

    fn make(args: BlockArgs, saved: Option<&MmioTransportState>) -> Result<Self, BlockError> {
        let drive = args.disk.spec();
        let mut device =
            Block::new(args.disk, args.id, args.interrupt.clone()).map_err(BlockError::EventFd)?;
        device.set_rate_limiter(args.limiter);
        let device = Arc::new(Mutex::new(device));
        let transport_args = MmioTransportArgs {
            device: device.clone(),
            memory: args.memory,
            interrupt: args.interrupt,
        };
        let transport = MmioTransport::new_or_restore(transport_args, saved)?;
        Ok(MmioBlock {
            device,
            transport: Arc::new(Mutex::new(transport)),
            drive,
        })
    }
}

impl Persist for MmioBlock {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            transport: lock(&self.transport).save(),
            drive: self.drive.clone(),
        }
    }

    /// The drive given must fit the guest's idea of the saved one; the
    /// transport's queue is validated against guest memory.
    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, BlockError> {
        state.drive.check(&args.disk, false)?;
        Self::make(args, Some(&state.transport))
    }
}

/// A block device cannot be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Its eventfd cannot be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The drive does not fit the saved one.
    #[error(transparent)]
    Drive(#[from] DiskError),
    /// The saved transport is inconsistent.
    #[error(transparent)]
    Transport(#[from] RestoreError),
}
