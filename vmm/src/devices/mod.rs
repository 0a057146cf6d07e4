//! Device models and the buses that route guest accesses to them.

pub mod bus;
pub mod doorbell;
pub mod legacy;
pub mod persist;
pub mod rate_limiter;
pub mod stdin;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use persist::Persist;
