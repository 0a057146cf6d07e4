//! Steps on a template's agent connection that a function template and a
//! runtime's base snapshot share.

use std::time::Duration;

use super::FunctionError;
use crate::agent::AgentClient;
use crate::devices::bus::lock;
use crate::machine::Machine;
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
