//! ember's in-guest agent: PID 1 of every ember microVM.
//!
//! The host VMM depends on this crate for the contract between the two sides:
//! the wire protocol ([`protocol`], its main items re-exported here), the
//! console lines the agent prints ([`READY_LINE`], [`POWER_OFF_LINE`]), the
//! kernel command line keys it reads ([`cmdline`]) and the guest's user
//! accounts. The agent itself is [`run`], called from the `ember-agent`
//! binary, which the initramfs installs as `/init`: once set up it serves
//! the host over vsock, running one invocation at a time as the sandbox
//! user in a cgroup of its own.
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

pub mod cmdline;
pub mod hotpath;
pub mod protocol;
pub mod uptime;

mod agent;
mod cgroup;
mod console;
mod function;
mod init;
mod invoke;
mod junk;
mod pagemap;
mod power;
mod reaper;
mod rootfs;
mod runtime_pipe;
mod server;
mod shell;
mod spawn;
mod sys;

pub use agent::run;
pub use cmdline::{
    AgentMode, AGENT_MODE_POWEROFF, AGENT_MODE_SCRIBBLE, AGENT_MODE_SHELL, AGENT_MODE_WAIT,
    CMDLINE_AGENT, CMDLINE_PREFIX, CMDLINE_ROOT,
};
pub use junk::{SCRIBBLE_DONE_LINE, SCRIBBLE_HOST_PORTS};
pub use protocol::{
    decode_frame, encode_frame, encode_frame_into, write_frame, AgentMessage, ErrorKind,
    ErrorReply, Exit, ExitStatus, FileIn, FileOut, FrameKind, FrameReader, FunctionInvoke,
    FunctionReady, FunctionResult, FunctionStart, GuestBuffer, Hello, HostMessage, HotPathPages,
    Invoke, ProtocolError, Refresh, Usage, AGENT_VSOCK_PORT, FUNCTION_DIR, MAX_CHUNK,
    MAX_FRAME_LEN, PROTOCOL_VERSION, PYTHON_RUNTIME_PATH,
};
pub use rootfs::ENV_TEST_ROOT;
pub use server::{ENV_TEST_CGROUP, ENV_TEST_LISTEN};

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
