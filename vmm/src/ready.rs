//! How long a sandbox may take to become ready, and how long it took: the
//! deadlines and timings that booting, restoring, the jailed workers and
//! the function paths share (below all of them, so none imports another
//! for them).

use std::time::Duration;

/// How long a cold boot may take before the agent must be ready.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a restored clone's agent may take to answer (seconds of
/// emulated guest-kernel work on PVM hosts, microseconds on hardware).
pub const RESTORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the host's time went before a sandbox was ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadyTimings {
    /// From the request until the guest ran: for a boot, until the agent
    /// announced itself on the console; for a restore, until the restored
    /// vCPUs entered KVM_RUN.
    pub start: Duration,
    /// From the request until the agent's greeting (its first frame).
    pub agent: Duration,
    /// From the request until the sandbox was ready for an invocation.
    pub ready: Duration,
}
