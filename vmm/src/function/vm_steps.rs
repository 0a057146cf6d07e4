//! Steps on a template's agent connection that a function template and a
//! runtime's base snapshot share.

use std::time::{Duration, Instant};

use super::FunctionError;
use crate::agent::AgentClient;
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::machine::Machine;
use crate::ready::BOOT_TIMEOUT;
use crate::snapshot::SnapshotError;

/// How long the guest may take to close the template's agent connection.
pub(super) const QUIESCE_TIMEOUT: Duration = Duration::from_secs(120);

/// A start or load failure as the caller sees it: the agent's message
/// (with the runtime's stderr) as [`FunctionError::Startup`].
pub(super) fn startup_error(e: crate::agent::AgentError) -> FunctionError {
    match e {
        crate::agent::AgentError::Agent(reply) => FunctionError::Startup(reply.message),
        other => other.into(),
    }
}

/// Boots `config` and connects to its agent, within [`BOOT_TIMEOUT`] of
/// `booting`; returns the machine, the connection and the time from
/// `booting` to the connection.
pub(super) fn boot_and_connect(
    config: &VmConfig,
    booting: Instant,
) -> Result<(Machine, AgentClient, Duration), FunctionError> {
    let mut machine = Machine::boot(config).map_err(SnapshotError::Build)?;
    if machine.agent_ready().wait(BOOT_TIMEOUT).is_none() {
        return Err(SnapshotError::NotReady(machine.stop()).into());
    }
    let agent = AgentClient::connect(&machine, booting + BOOT_TIMEOUT)?;
    Ok((machine, agent, booting.elapsed()))
}

/// Closes the agent connection and waits until the guest has: a snapshot
/// must hold no connection.
pub(super) fn quiesce(machine: &Machine, agent: AgentClient) -> Result<(), FunctionError> {
    let idle = lock(&machine.devices.vsock).idle_signal();
    drop(agent);
    if !idle.wait(QUIESCE_TIMEOUT) {
        return Err(SnapshotError::Quiesce.into());
    }
    Ok(())
}
