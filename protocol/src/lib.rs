//! The contract between ember's host VMM and its in-guest agent, the two
//! sides of every microVM: the wire protocol ([`protocol`], its main items
//! re-exported here), the hot-path memory layout ([`hotpath`]), the kernel
//! command line keys the VMM writes and the agent reads ([`cmdline`]), the
//! console lines the agent prints ([`READY_LINE`], [`POWER_OFF_LINE`]),
//! the guest's user accounts, and the decoding of Linux's page map
//! ([`pagemap`]), which both sides read.
//!
//! Both crates depend on this one, so the host does not link the agent.

// The agent (PID 1) links this crate, and PID 1 exiting, for a panic too,
// panics the guest kernel: outside tests, forbid the usual panicking
// shortcuts.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod cmdline;
pub mod hotpath;
pub mod pagemap;
pub mod protocol;

pub use cmdline::{
    AgentMode, AGENT_MODE_POWEROFF, AGENT_MODE_SCRIBBLE, AGENT_MODE_SHELL, AGENT_MODE_WAIT,
    CMDLINE_AGENT, CMDLINE_PREFIX, CMDLINE_ROOT,
};
pub use protocol::{
    decode_frame, encode_frame, encode_frame_into, write_frame, AgentMessage, ErrorKind,
    ErrorReply, Exit, ExitStatus, FileIn, FileOut, FrameKind, FrameReader, FunctionInvoke,
    FunctionLoad, FunctionReady, FunctionResult, FunctionStart, GuestBuffer, Hello, HostMessage,
    HotPathPages, Invoke, ProtocolError, Refresh, Usage, AGENT_VSOCK_PORT, FUNCTION_DIR, MAX_CHUNK,
    MAX_FRAME_LEN, PROTOCOL_VERSION, PYTHON_RUNTIME_PATH,
};

/// Start of the line the agent prints on the console once the guest is set
/// up (file systems mounted, hostname set). The full line is
/// `ember-agent: ready uptime_ms=<ms since guest boot>`; use
/// [`parse_ready_line`] to recognise it.
pub const READY_LINE: &str = "ember-agent: ready";

/// Key of the field after [`READY_LINE`] that carries the guest's uptime in
/// milliseconds, as read from `/proc/uptime` (centisecond resolution).
pub const READY_UPTIME_KEY: &str = "uptime_ms";

/// Key of the field after [`READY_LINE`] that carries how many CPUs the
/// agent may run on (the guest's online CPUs).
pub const READY_CPUS_KEY: &str = "cpus";

/// The line the agent prints on the console right before it kills every
/// process and resets the guest (which ends the VM).
pub const POWER_OFF_LINE: &str = "ember-agent: power off";

/// Prefix of every line the agent prints on the console.
pub const LOG_PREFIX: &str = "ember-agent: ";

/// The guest's hostname.
pub const HOSTNAME: &str = "ember";

/// Name of the unprivileged account that runs user code in the guest.
pub const SANDBOX_USER: &str = "sandbox";

/// User id of [`SANDBOX_USER`] (as in the image's `/etc/passwd`).
pub const SANDBOX_UID: u32 = 1000;

/// Group id of [`SANDBOX_USER`] (as in the image's `/etc/group`).
pub const SANDBOX_GID: u32 = 1000;

/// What a console line that announces readiness says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Milliseconds since guest boot when the agent became ready; `None` when
    /// the agent could not read its uptime.
    pub uptime_ms: Option<u64>,
    /// CPUs online in the guest; `None` when the agent could not tell.
    pub cpus: Option<u32>,
}

/// Recognises the agent's readiness line in one line of console output.
///
/// Lenient about what surrounds it (carriage returns from the tty's `onlcr`,
/// kernel messages printed on the same line), strict about the marker itself.
pub fn parse_ready_line(line: &str) -> Option<Ready> {
    let start = line.find(READY_LINE)?;
    let rest = line.get(start + READY_LINE.len()..)?;
    // "ember-agent: readyness" is not the marker: it must end a word.
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    fn field<T: std::str::FromStr>(rest: &str, key: &str) -> Option<T> {
        rest.split_whitespace().find_map(|field| {
            let value = field.strip_prefix(key)?.strip_prefix('=')?;
            value.parse().ok()
        })
    }
    Some(Ready {
        uptime_ms: field(rest, READY_UPTIME_KEY),
        cpus: field(rest, READY_CPUS_KEY),
    })
}

/// Start of the line the agent's hostile-guest scribbler
/// ([`AGENT_MODE_SCRIBBLE`]) prints when it is done:
/// `ember-agent: scribble done rounds=<n> seed=<hex> ...`.
pub const SCRIBBLE_DONE_LINE: &str = "ember-agent: scribble done";

/// Host ports most of the scribbler's connection requests go to. A host
/// that runs the VM with `--vsock-uds <path>` and listens on
/// `<path>_<port>` turns them into real connections for the junk that
/// follows to hit (`tests/hostile.rs`: one host end read, one never read,
/// and one listener that never accepts).
pub const SCRIBBLE_HOST_PORTS: [u32; 3] = [7001, 7002, 7003];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_with_uptime_and_cpus() {
        assert_eq!(
            parse_ready_line("ember-agent: ready uptime_ms=27431 cpus=2\r"),
            Some(Ready {
                uptime_ms: Some(27431),
                cpus: Some(2),
            })
        );
    }

    #[test]
    fn ready_line_without_fields() {
        assert_eq!(
            parse_ready_line("ember-agent: ready"),
            Some(Ready {
                uptime_ms: None,
                cpus: None
            })
        );
    }

    #[test]
    fn ready_line_after_kernel_noise() {
        assert_eq!(
            parse_ready_line("[   28.1] random: crng initember-agent: ready uptime_ms=5"),
            Some(Ready {
                uptime_ms: Some(5),
                cpus: None
            })
        );
    }

    #[test]
    fn not_a_ready_line() {
        assert_eq!(parse_ready_line("ember-agent: power off"), None);
        assert_eq!(parse_ready_line("ember-agent: readyness"), None);
        assert_eq!(parse_ready_line(""), None);
    }
}
