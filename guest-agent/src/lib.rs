//! ember's in-guest agent: PID 1 of every ember microVM.
//!
//! The contract with the host (wire protocol, hot-path layout, command line
//! keys, console lines) is the `ember-protocol` crate, re-exported here so
//! the agent's modules name it as their own. The agent itself is [`run`],
//! called from the `ember-agent` binary, which the initramfs installs as
//! `/init`: once set up it serves the host over vsock, running one
//! invocation at a time as the sandbox user in a cgroup of its own.
//!
//! In ember's test guests every system call costs about half a millisecond
//! and every fork+exec about half a second (guest kernel mode is emulated),
//! so the agent's boot and invocation paths are written to make as few
//! system calls as they can, and to start no process but the invoked one
//! (without a fork).

// PID 1 exiting, for a panic too, panics the guest kernel: outside tests,
// forbid the usual panicking shortcuts.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod agent;
mod boot;
mod console;
mod function;
mod serve;
mod sys;
mod testing;

pub use agent::run;
pub use boot::rootfs::ENV_TEST_ROOT;
pub use boot::uptime;
pub use ember_protocol::*;
pub use serve::server::{ENV_TEST_CGROUP, ENV_TEST_LISTEN};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_matches_what_the_agent_prints() {
        let line = agent::ready_line(Some(12), Some(3));
        assert_eq!(
            parse_ready_line(&line),
            Some(Ready {
                uptime_ms: Some(12),
                cpus: Some(3),
            })
        );
        assert_eq!(line, "ember-agent: ready uptime_ms=12 cpus=3");
        assert_eq!(
            parse_ready_line(&agent::ready_line(None, None)),
            Some(Ready {
                uptime_ms: None,
                cpus: None
            })
        );
    }
}
