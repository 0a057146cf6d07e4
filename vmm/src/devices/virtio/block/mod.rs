//! virtio-blk: a read-only drive, shared by every clone of a snapshot.
//!
//! One request queue. The device offers `VIRTIO_BLK_F_RO`, so the guest
//! mounts the drive read-only; anything that would write it fails anyway
//! ([`request`]). Requests are served synchronously on the event loop:
//! each is a `pread` from the page cache straight into the guest's
//! buffers, bounded in size, and a notification serves at most
//! [`REQUESTS_PER_WAKE`] of them before it lets the other devices run.
//!
//! An optional [`RateLimiter`](crate::devices::rate_limiter::RateLimiter) caps bytes and requests per second: a
//! request that finds a bucket short stays on the queue (its pop is
//! undone) until the limiter's timer says the tokens are there.
//!
//! The device has no state of its own beyond its queue: a snapshot saves
//! the transport, and a restored device looks at its queue once, for
//! requests the guest posted just before the snapshot. The rate limiter's
//! buckets are not saved: a restored clone gets the limits it is given,
//! with full buckets.

pub mod device;
pub mod disk;
pub mod event_handler;
pub mod persist;
pub mod request;

pub use device::{Block, QUEUE_SIZE, REQUESTS_PER_WAKE, ROOT_DRIVE_ID, VIRTIO_ID_BLOCK};
pub use event_handler::BlockEvents;
pub use persist::{BlockArgs, BlockError, BlockState, MmioBlock};
