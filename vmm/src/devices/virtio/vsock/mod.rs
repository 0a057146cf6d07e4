//! virtio-vsock: stream sockets between the guest and the host.
//!
//! Three queues: receive (host to guest), transmit (guest to host) and
//! events. The device runs on the event loop: ioeventfds wake it when the
//! guest posts buffers or packets, host sockets wake it (edge-triggered)
//! when they have data or room, and the hub wakes it for new host-initiated
//! connections.
//!
//! Optional rate limits cap the payload bytes each way, on a bucket per
//! direction: guest packets wait on the transmit queue, and host data
//! waits in its sockets, until the limiter's timer says the tokens are
//! there. The buckets are not part of a snapshot: a restored clone gets
//! the limits it is given, with full buckets.

pub mod backend;
pub mod device;
pub mod event_handler;
pub mod muxer;
pub mod packet;
pub mod persist;

pub use device::{IdleSignal, Vsock, DEFAULT_GUEST_CID, MAX_PKT_DATA, VIRTIO_ID_VSOCK};
pub use event_handler::VsockEvents;
pub use persist::{MmioVsock, VsockArgs, VsockError, VsockState};
