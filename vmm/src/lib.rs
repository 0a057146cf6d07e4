//! ember: a minimal KVM virtual machine monitor for snapshot-restored sandboxes.

pub mod arch;
pub mod host;
