//! The agent's settings on the kernel command line.
//!
//! The kernel does not hand parameters with a dot in their name to init
//! (it takes them for module parameters), so the agent reads them from
//! `/proc/cmdline`. Its keys all start with [`CMDLINE_PREFIX`]. The VMM
//! writes them, the agent parses them ([`parse`]).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Prefix of every kernel command line key that belongs to the agent.
pub const CMDLINE_PREFIX: &str = "ember.";

/// Key that selects what the agent does once it is ready: one of
/// [`AGENT_MODE_WAIT`], [`AGENT_MODE_POWEROFF`], [`AGENT_MODE_SHELL`],
/// [`AGENT_MODE_SCRIBBLE`].
pub const CMDLINE_AGENT: &str = "ember.agent";

/// Key naming the block device the agent mounts read-only and switches
/// its root into (`ember.root=/dev/vda`); the VMM adds it when the VM has a
/// root drive.
pub const CMDLINE_ROOT: &str = "ember.root";

/// `ember.agent=wait`: stay up and wait (the default).
pub const AGENT_MODE_WAIT: &str = "wait";

/// `ember.agent=poweroff`: power off right after reporting ready.
pub const AGENT_MODE_POWEROFF: &str = "poweroff";

/// `ember.agent=shell`: run an interactive `/bin/sh` on the console after
/// reporting ready, and power off when it exits.
pub const AGENT_MODE_SHELL: &str = "shell";

/// `ember.agent=scribble`: a hostile-guest test. After reporting ready, run
/// a rogue virtio driver against the vsock device (junk registers, crafted
/// virtqueues and packet headers), then power off.
pub const AGENT_MODE_SCRIBBLE: &str = "scribble";

/// What the agent does after it reported ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentMode {
    /// Stay up, reap orphans and wait for a power-off signal.
    #[default]
    Wait,
    /// Power off right away.
    PowerOff,
    /// Run `/bin/sh` on the console; power off when it exits.
    Shell,
    /// Scribble on the vsock device, then power off.
    Scribble,
}

impl AgentMode {
    /// The value of [`CMDLINE_AGENT`] that selects this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentMode::Wait => AGENT_MODE_WAIT,
            AgentMode::PowerOff => AGENT_MODE_POWEROFF,
            AgentMode::Shell => AGENT_MODE_SHELL,
            AgentMode::Scribble => AGENT_MODE_SCRIBBLE,
        }
    }

    /// The kernel command line parameter that selects this mode, e.g.
    /// `ember.agent=shell`, for the VMM to append to the guest's cmdline.
    pub fn cmdline_param(self) -> String {
        format!("{CMDLINE_AGENT}={}", self.as_str())
    }
}

impl fmt::Display for AgentMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value given is not a known agent mode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown agent mode {0:?}")]
pub struct UnknownMode(pub String);

impl FromStr for AgentMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            AGENT_MODE_WAIT => Ok(AgentMode::Wait),
            AGENT_MODE_POWEROFF => Ok(AgentMode::PowerOff),
            AGENT_MODE_SHELL => Ok(AgentMode::Shell),
            AGENT_MODE_SCRIBBLE => Ok(AgentMode::Scribble),
            other => Err(UnknownMode(other.to_owned())),
        }
    }
}

/// Something on the command line the agent ignored; it keeps going.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CmdlineWarning {
    /// `ember.agent=<value>` with a value the agent does not know.
    #[error(
        "ignoring {CMDLINE_AGENT}={value}: unknown mode (expected \
         {AGENT_MODE_WAIT}, {AGENT_MODE_POWEROFF}, {AGENT_MODE_SHELL} or \
         {AGENT_MODE_SCRIBBLE})"
    )]
    UnknownMode {
        /// The value as written.
        value: String,
    },
    /// An agent key without `=value`.
    #[error("ignoring {key}: it needs a value ({key}=...)")]
    MissingValue {
        /// The key as written.
        key: String,
    },
    /// A key with the agent's prefix that this agent does not know.
    #[error("ignoring unknown parameter {param}")]
    UnknownKey {
        /// The whole parameter as written.
        param: String,
    },
}

/// The agent's settings, parsed from a kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// What to do after reporting ready.
    pub mode: AgentMode,
    /// The root drive's device ([`CMDLINE_ROOT`]), if any.
    pub root: Option<String>,
    /// What was ignored, in command line order.
    pub warnings: Vec<CmdlineWarning>,
}

/// Parses the agent's keys out of a whole kernel command line.
///
/// Like the kernel, a later occurrence of a key overrides an earlier one, and
/// double quotes group words (`ember.agent="shell"` is `ember.agent=shell`).
pub fn parse(text: &str) -> Cmdline {
    let mut cmdline = Cmdline::default();
    for param in split_params(text) {
        if !param.starts_with(CMDLINE_PREFIX) {
            continue;
        }
        let (key, value) = match param.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (param.as_str(), None),
        };
        match (key, value) {
            (CMDLINE_AGENT, Some(value)) => match value.parse() {
                Ok(mode) => cmdline.mode = mode,
                Err(UnknownMode(value)) => {
                    cmdline.warnings.push(CmdlineWarning::UnknownMode { value })
                }
            },
            (CMDLINE_ROOT, Some(value)) if !value.is_empty() => {
                cmdline.root = Some(value.to_owned())
            }
            (CMDLINE_AGENT | CMDLINE_ROOT, _) => {
                cmdline.warnings.push(CmdlineWarning::MissingValue {
                    key: key.to_owned(),
                })
            }
            _ => cmdline.warnings.push(CmdlineWarning::UnknownKey {
                param: param.clone(),
            }),
        }
    }
    cmdline
}

/// Splits a command line into parameters the way the kernel's `next_arg`
/// does for the cases that matter: whitespace separates, double quotes keep
/// whitespace inside a parameter and are dropped.
fn split_params(text: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        params.push(current);
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_wait() {
        let c = parse("console=ttyS0 reboot=k panic=-1 quiet\n");
        assert_eq!(c.mode, AgentMode::Wait);
        assert!(c.warnings.is_empty());
        assert_eq!(parse("").mode, AgentMode::Wait);
    }

    #[test]
    fn modes() {
        assert_eq!(parse("ember.agent=poweroff").mode, AgentMode::PowerOff);
        assert_eq!(parse("a ember.agent=shell b\n").mode, AgentMode::Shell);
        assert_eq!(parse("ember.agent=wait").mode, AgentMode::Wait);
        assert_eq!(parse("ember.agent=scribble").mode, AgentMode::Scribble);
    }

    #[test]
    fn last_one_wins() {
        let c = parse("ember.agent=shell ember.agent=poweroff");
        assert_eq!(c.mode, AgentMode::PowerOff);
    }

    #[test]
    fn quotes_are_dropped() {
        assert_eq!(parse("ember.agent=\"shell\"").mode, AgentMode::Shell);
        assert_eq!(parse("\"ember.agent=shell\"").mode, AgentMode::Shell);
        let c = parse("x=\"a b ember.agent=shell\" y");
        assert_eq!(c.mode, AgentMode::Wait);
    }

    #[test]
    fn unknown_value_warns_and_keeps_previous() {
        let c = parse("ember.agent=shell ember.agent=dance");
        assert_eq!(c.mode, AgentMode::Shell);
        assert_eq!(
            c.warnings,
            vec![CmdlineWarning::UnknownMode {
                value: "dance".into()
            }]
        );
        assert!(c.warnings[0].to_string().contains("ember.agent=dance"));
    }

    #[test]
    fn missing_value_and_unknown_key_warn() {
        let c = parse("ember.agent ember.colour=blue ember.agent= other.agent=shell");
        assert_eq!(c.mode, AgentMode::Wait);
        assert_eq!(
            c.warnings,
            vec![
                CmdlineWarning::MissingValue {
                    key: "ember.agent".into()
                },
                CmdlineWarning::UnknownKey {
                    param: "ember.colour=blue".into()
                },
                CmdlineWarning::UnknownMode { value: "".into() },
            ]
        );
    }

    #[test]
    fn keys_are_exact() {
        let c = parse("ember.agentx=shell xember.agent=shell");
        assert_eq!(c.mode, AgentMode::Wait);
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn root_drive() {
        assert_eq!(parse("console=ttyS0").root, None);
        let c = parse("ember.root=/dev/vda ember.agent=wait");
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert!(c.warnings.is_empty());
        assert_eq!(
            parse("ember.root=/dev/vda ember.root=/dev/vdb")
                .root
                .as_deref(),
            Some("/dev/vdb")
        );
        let c = parse("ember.root ember.root=");
        assert_eq!(c.root, None);
        assert_eq!(
            c.warnings,
            vec![
                CmdlineWarning::MissingValue {
                    key: "ember.root".into()
                };
                2
            ]
        );
    }

    #[test]
    fn split_handles_whitespace_and_quotes() {
        assert_eq!(split_params("  a\tb\n c  "), vec!["a", "b", "c"]);
        assert_eq!(split_params("k=\"x y\" z"), vec!["k=x y", "z"]);
        assert_eq!(split_params("\"\""), vec![""]);
        assert!(split_params(" \n").is_empty());
    }

    #[test]
    fn mode_round_trips() {
        for mode in [
            AgentMode::Wait,
            AgentMode::PowerOff,
            AgentMode::Shell,
            AgentMode::Scribble,
        ] {
            assert_eq!(mode.as_str().parse::<AgentMode>(), Ok(mode));
            assert_eq!(parse(&mode.cmdline_param()).mode, mode);
        }
        assert_eq!(AgentMode::Shell.cmdline_param(), "ember.agent=shell");
    }
}
