//! Sandboxes: one microVM, one function invocation.
//!
//! A [`Sandbox`] owns a running microVM whose agent is connected and
//! waiting. It serves exactly one [`Invocation`] and is destroyed after it:
//! nothing one invocation leaves behind can be seen by another.

use std::time::{Duration, Instant};

use crate::agent::{invoke_grace, AgentClient, AgentError, OutputStream};
use crate::builder::BuildError;
use crate::config::VmConfig;
use crate::exit::VmExit;
use crate::host::HostKind;
use crate::machine::Machine;
use crate::refresh::fresh_refresh;
use crate::snapshot::{RestoreOptions, Snapshot, SnapshotError};
use crate::worker::{WorkerError, WorkerProcess};

/// Deadlines and timings of getting ready, shared with the lower layers.
pub use crate::ready::{ReadyTimings, BOOT_TIMEOUT, RESTORE_CONNECT_TIMEOUT};
/// What to run, with what limits: the agent protocol's request.
pub use ember_protocol::protocol::Invoke as Invocation;
pub use ember_protocol::protocol::{ExitStatus, FileIn, FileOut, Usage};

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Exit code or signal of the function's main process.
    pub status: ExitStatus,
    /// The timeout killed it.
    pub timed_out: bool,
    /// Output beyond the cap was dropped.
    pub output_truncated: bool,
    /// Resources used, as measured in the guest.
    pub usage: Usage,
    /// The files asked for with `collect`.
    pub files_out: Vec<FileOut>,
    /// Standard output (empty with [`Sandbox::invoke_streaming`]).
    pub stdout: Vec<u8>,
    /// Standard error (empty with [`Sandbox::invoke_streaming`]).
    pub stderr: Vec<u8>,
    /// Host-side timings.
    pub timings: InvokeTimings,
}

/// Where the host's time went for one invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvokeTimings {
    /// From sending the request to the agent's exit report.
    pub invoke: Duration,
    /// Stopping the microVM afterwards.
    pub teardown: Duration,
}

impl Outcome {
    /// The exit code a shell would report: the code, 128 + signal when
    /// killed, 124 on timeout (like `timeout(1)`).
    pub fn shell_exit_code(&self) -> i32 {
        if self.timed_out {
            return 124;
        }
        match self.status {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }
}

/// A microVM with its agent connected, ready for one invocation.
#[derive(Debug)]
pub struct Sandbox {
    backend: Backend,
    agent: AgentClient,
    used: bool,
    ready: ReadyTimings,
}

/// Where the microVM runs.
#[derive(Debug)]
enum Backend {
    /// In this process (boxed: a machine is much larger than a worker
    /// handle).
    InProcess(Box<Machine>),
    /// In a jailed worker process.
    Worker(WorkerProcess),
}

impl Sandbox {
    /// Cold-boots a microVM from `config` and connects to its agent.
    pub fn boot(config: &VmConfig) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let deadline = started + BOOT_TIMEOUT;
        let mut machine = Machine::boot(config)?;
        let Some((ready_at, _)) = machine.agent_ready().wait(BOOT_TIMEOUT) else {
            let exit = machine.stop();
            return Err(SandboxError::NotReady(exit));
        };
        let agent = match AgentClient::connect(&machine, deadline) {
            Ok(agent) => agent,
            Err(e) => {
                machine.stop();
                return Err(e.into());
            }
        };
        let ready = ReadyTimings {
            start: ready_at.saturating_duration_since(started),
            agent: agent.hello_at().saturating_duration_since(started),
            ready: started.elapsed(),
        };
        Ok(Sandbox {
            backend: Backend::InProcess(Box::new(machine)),
            agent,
            used: false,
            ready,
        })
    }

    /// Restores a clone of `snapshot` and connects to its agent, which gets
    /// fresh entropy and the host's clock before anything else: no two
    /// clones share random state, and each one's clock is right.
    ///
    /// With `options.isolation`, the clone runs in its own jailed worker
    /// process (see [`crate::worker`]).
    pub fn restore(snapshot: &Snapshot, options: &RestoreOptions) -> Result<Sandbox, SandboxError> {
        if let Some(isolation) = &options.isolation {
            let (worker, agent, ready) = crate::worker::spawn(snapshot, options, isolation)?;
            return Ok(Sandbox {
                backend: Backend::Worker(worker),
                agent,
                used: false,
                ready,
            });
        }
        let started = Instant::now();
        let mut machine = snapshot.restore(options)?;
        let deadline = started + RESTORE_CONNECT_TIMEOUT;
        let agent = match AgentClient::connect_refreshed(&machine, fresh_refresh(), deadline) {
            Ok(agent) => agent,
            Err(e) => {
                machine.stop();
                return Err(e.into());
            }
        };
        let ready = ReadyTimings {
            start: machine.times().vmm_setup().unwrap_or_default(),
            agent: agent.hello_at().saturating_duration_since(started),
            ready: started.elapsed(),
        };
        Ok(Sandbox {
            backend: Backend::InProcess(Box::new(machine)),
            agent,
            used: false,
            ready,
        })
    }

    /// How long the sandbox took to get ready.
    pub fn ready_timings(&self) -> ReadyTimings {
        self.ready
    }

    /// The microVM, when it runs in this process (not isolated).
    pub fn machine(&self) -> Option<&Machine> {
        match &self.backend {
            Backend::InProcess(machine) => Some(machine),
            Backend::Worker(_) => None,
        }
    }

    /// The worker process's PID, when the sandbox is isolated.
    pub fn worker_pid(&self) -> Option<u32> {
        match &self.backend {
            Backend::InProcess(_) => None,
            Backend::Worker(worker) => Some(worker.pid()),
        }
    }

    /// The host kind, for timeouts.
    fn host(&self) -> HostKind {
        match &self.backend {
            Backend::InProcess(machine) => machine.host(),
            Backend::Worker(_) => HostKind::detect(),
        }
    }

    /// Stops the microVM; for a worker, returns how it ended when that
    /// explains a failure.
    fn destroy(&mut self) -> Option<String> {
        match &mut self.backend {
            Backend::InProcess(machine) => {
                machine.stop();
                None
            }
            Backend::Worker(worker) => {
                // Closing our end tells the worker to stop its VM and exit.
                let _ = self.agent.shutdown();
                let status = worker.finish(Duration::from_secs(5));
                match status {
                    Some(s) if s.success() => None,
                    other => Some(crate::worker::describe_exit(other)),
                }
            }
        }
    }

    /// Runs `invocation`, collecting its output in the [`Outcome`].
    pub fn invoke(&mut self, invocation: &Invocation) -> Result<Outcome, SandboxError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut outcome = self.invoke_streaming(invocation, |stream, chunk| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(chunk),
            OutputStream::Stderr => stderr.extend_from_slice(chunk),
        })?;
        outcome.stdout = stdout;
        outcome.stderr = stderr;
        Ok(outcome)
    }

    /// Runs `invocation`, handing output to `on_output` as it arrives. The
    /// microVM is stopped when the invocation ends, whatever the result; a
    /// second invocation is an error.
    pub fn invoke_streaming(
        &mut self,
        invocation: &Invocation,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<Outcome, SandboxError> {
        self.invoke_streaming_until(invocation, |stream, chunk| {
            on_output(stream, chunk);
            std::ops::ControlFlow::Continue(())
        })
    }

    /// Like [`Sandbox::invoke_streaming`], but `on_output` may stop the
    /// invocation ([`std::ops::ControlFlow::Break`]): the microVM is
    /// destroyed at once and the result is [`AgentError::Cancelled`].
    pub fn invoke_streaming_until(
        &mut self,
        invocation: &Invocation,
        on_output: impl FnMut(OutputStream, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<Outcome, SandboxError> {
        if std::mem::replace(&mut self.used, true) {
            return Err(SandboxError::AlreadyUsed);
        }
        let started = Instant::now();
        let deadline =
            started + Duration::from_millis(invocation.timeout_ms) + invoke_grace(self.host());
        let result = self.agent.invoke_until(invocation, deadline, on_output);
        let invoked = Instant::now();
        let worker_end = self.destroy();
        let timings = InvokeTimings {
            invoke: invoked.saturating_duration_since(started),
            teardown: invoked.elapsed(),
        };
        let exit = match (result, worker_end) {
            (Ok(exit), _) => exit,
            // A dead worker explains a broken connection better.
            (Err(_), Some(worker)) => return Err(SandboxError::Worker(WorkerError::Died(worker))),
            (Err(e), None) => return Err(e.into()),
        };
        Ok(Outcome {
            status: exit.status,
            timed_out: exit.timed_out,
            output_truncated: exit.output_truncated,
            usage: exit.usage,
            files_out: exit.files_out,
            stdout: Vec::new(),
            stderr: Vec::new(),
            timings,
        })
    }
}

/// A sandbox could not be created or could not run the invocation.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The microVM could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The guest stopped, or never said it was ready.
    #[error("the guest agent never became ready ({0})")]
    NotReady(VmExit),
    /// Talking to the agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The isolated worker failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The sandbox already served its invocation.
    #[error("a sandbox serves one invocation; create a new one")]
    AlreadyUsed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: ExitStatus, timed_out: bool) -> Outcome {
        Outcome {
            status,
            timed_out,
            output_truncated: false,
            usage: Usage {
                wall_ms: 0,
                cpu_user_ms: 0,
                cpu_sys_ms: 0,
                max_rss_kib: 0,
            },
            files_out: vec![],
            stdout: vec![],
            stderr: vec![],
            timings: InvokeTimings::default(),
        }
    }

    #[test]
    fn shell_exit_codes() {
        assert_eq!(outcome(ExitStatus::Code(7), false).shell_exit_code(), 7);
        assert_eq!(outcome(ExitStatus::Signal(9), false).shell_exit_code(), 137);
        assert_eq!(outcome(ExitStatus::Signal(9), true).shell_exit_code(), 124);
    }
}
