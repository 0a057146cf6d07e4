//! The host side of the agent protocol: one connection to the guest agent
//! over vsock, frames in and out, every wait bounded by a deadline.
//!
//! The agent is guest code, so its answers are untrusted like everything
//! else from the guest: frames are bounded by the protocol reader, output
//! beyond the caller's cap is dropped here too, and an agent that stops
//! answering costs a timeout, never a hang.

use std::ops::ControlFlow;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ember_protocol::protocol::{
    self, AgentMessage, ErrorReply, Exit, FrameKind, FrameReader, FunctionInvoke, FunctionLoad,
    FunctionReady, FunctionResult, FunctionStart, Hello, HostMessage, Invoke, ProtocolError,
    Refresh,
};

use crate::deadline::{self, DeadlineStream};
use crate::machine::Machine;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The function's standard output.
    Stdout,
    /// The function's standard error.
    Stderr,
}

/// A connection to the guest agent.
#[derive(Debug)]
pub struct AgentClient {
    writer: UnixStream,
    reader: FrameReader<DeadlineStream>,
    hello: Hello,
    hello_at: Instant,
}

impl AgentClient {
    /// Another handle on the connection: shutting it down ends any wait
    /// for the agent at once (cancelling an invocation).
    pub fn interrupter(&self) -> std::io::Result<UnixStream> {
        self.writer.try_clone()
    }

    /// Connects to the agent in `machine` and waits for its greeting.
    pub fn connect(machine: &Machine, deadline: Instant) -> Result<Self, AgentError> {
        let stream = machine
            .connect_vsock(protocol::AGENT_VSOCK_PORT)
            .map_err(AgentError::Connect)?;
        Self::handshake(stream, None, deadline)
    }

    /// Connects to the agent of a freshly restored clone: `refresh` (new
    /// entropy and the wall clock) goes out with the connection, before the
    /// greeting arrives, so the clone's first work is reseeding itself and
    /// the two exchanges cost one round trip.
    pub fn connect_refreshed(
        machine: &Machine,
        refresh: Refresh,
        deadline: Instant,
    ) -> Result<Self, AgentError> {
        let stream = machine
            .connect_vsock(protocol::AGENT_VSOCK_PORT)
            .map_err(AgentError::Connect)?;
        let mut client = Self::handshake(stream, Some(&HostMessage::Refresh(refresh)), deadline)?;
        match client.recv(deadline)? {
            AgentMessage::Refreshed => Ok(client),
            other => Err(AgentError::Unexpected(describe(&other))),
        }
    }

    /// Sends `first` (if any) on a connected stream, then waits for the
    /// agent's greeting.
    pub fn handshake(
        stream: UnixStream,
        first: Option<&HostMessage>,
        deadline: Instant,
    ) -> Result<Self, AgentError> {
        let writer = stream.try_clone().map_err(AgentError::Connect)?;
        let mut client = AgentClient {
            writer,
            reader: FrameReader::new(DeadlineStream::new(stream)),
            hello: Hello {
                protocol_version: 0,
                agent_version: String::new(),
            },
            hello_at: Instant::now(),
        };
        if let Some(first) = first {
            client.send(first)?;
        }
        match client.recv(deadline)? {
            AgentMessage::Hello(hello) if hello.protocol_version == protocol::PROTOCOL_VERSION => {
                client.hello = hello;
                client.hello_at = Instant::now();
                Ok(client)
            }
            AgentMessage::Hello(hello) => Err(AgentError::Version(hello.protocol_version)),
            other => Err(AgentError::Unexpected(describe(&other))),
        }
    }

    /// A client on a stream whose greeting `hello` was already received
    /// (by a worker process that relays the connection).
    pub fn attach(stream: UnixStream, hello: Hello) -> Result<Self, AgentError> {
        Ok(AgentClient {
            writer: stream.try_clone().map_err(AgentError::Connect)?,
            reader: FrameReader::new(DeadlineStream::new(stream)),
            hello,
            hello_at: Instant::now(),
        })
    }

    /// The underlying stream (to relay it elsewhere). No byte beyond the
    /// frames read so far has been consumed.
    pub fn into_stream(self) -> UnixStream {
        self.reader.into_inner().into_inner()
    }

    /// Closes the connection both ways.
    pub fn shutdown(&self) -> std::io::Result<()> {
        self.writer.shutdown(std::net::Shutdown::Both)
    }

    /// When the greeting arrived: the agent's first sign of life.
    pub fn hello_at(&self) -> Instant {
        self.hello_at
    }

    /// What the agent said when the connection opened.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    fn send(&mut self, msg: &HostMessage) -> Result<(), AgentError> {
        protocol::write_frame(&mut self.writer, FrameKind::Host, msg).map_err(AgentError::Protocol)
    }

    /// Reads one whole frame by `deadline`: the deadline bounds the frame
    /// (header and payload), however the agent splits its bytes, so a
    /// guest trickling a large frame times out like a silent one.
    fn recv(&mut self, deadline: Instant) -> Result<AgentMessage, AgentError> {
        if deadline <= Instant::now() {
            return Err(AgentError::Timeout);
        }
        self.reader
            .get_mut()
            .set_deadline(Some(deadline))
            .map_err(AgentError::Connect)?;
        match self.reader.read_frame(FrameKind::Agent) {
            Ok(Some(AgentMessage::Error(reply))) => Err(AgentError::Agent(reply)),
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(AgentError::Closed),
            Err(ProtocolError::Io(e)) if deadline::is_timeout(&e) => Err(AgentError::Timeout),
            Err(e) => Err(AgentError::Protocol(e)),
        }
    }

    /// Round trip, to check the agent is alive.
    pub fn ping(&mut self, nonce: u64, deadline: Instant) -> Result<(), AgentError> {
        self.send(&HostMessage::Ping(nonce))?;
        match self.recv(deadline)? {
            AgentMessage::Pong(n) if n == nonce => Ok(()),
            other => Err(AgentError::Unexpected(describe(&other))),
        }
    }

    /// Gives the guest fresh entropy and the host's wall clock.
    pub fn refresh(&mut self, refresh: Refresh, deadline: Instant) -> Result<(), AgentError> {
        self.send(&HostMessage::Refresh(refresh))?;
        match self.recv(deadline)? {
            AgentMessage::Refreshed => Ok(()),
            other => Err(AgentError::Unexpected(describe(&other))),
        }
    }

    /// Runs `invoke`, handing output chunks to `on_output` as they come
    /// (at most `invoke.max_output_bytes` in all), until the agent reports
    /// the exit or `deadline` passes.
    pub fn invoke(
        &mut self,
        invoke: &Invoke,
        deadline: Instant,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<Exit, AgentError> {
        self.invoke_until(invoke, deadline, |stream, chunk| {
            on_output(stream, chunk);
            ControlFlow::Continue(())
        })
    }

    /// Like [`AgentClient::invoke`], but `on_output` may stop the
    /// invocation: on [`ControlFlow::Break`] this returns
    /// [`AgentError::Cancelled`] at once (the caller then destroys the VM).
    pub fn invoke_until(
        &mut self,
        invoke: &Invoke,
        deadline: Instant,
        mut on_output: impl FnMut(OutputStream, &[u8]) -> ControlFlow<()>,
    ) -> Result<Exit, AgentError> {
        invoke.validate().map_err(AgentError::BadRequest)?;
        self.send(&HostMessage::Invoke(invoke.clone()))?;
        let mut budget = invoke.max_output_bytes;
        let mut truncated = false;
        loop {
            let (stream, chunk) = match self.recv(deadline)? {
                AgentMessage::Stdout(chunk) => (OutputStream::Stdout, chunk),
                AgentMessage::Stderr(chunk) => (OutputStream::Stderr, chunk),
                AgentMessage::Exit(mut exit) => {
                    exit.output_truncated |= truncated;
                    return Ok(exit);
                }
                other => return Err(AgentError::Unexpected(describe(&other))),
            };
            // The agent caps output too; the host does not rely on it.
            let take = chunk
                .len()
                .min(usize::try_from(budget).unwrap_or(usize::MAX));
            if take < chunk.len() {
                truncated = true;
            }
            if take > 0 {
                if on_output(stream, &chunk[..take]).is_break() {
                    return Err(AgentError::Cancelled);
                }
                budget -= take as u64;
            }
        }
    }
}

impl AgentClient {
    /// Starts the VM's function runtime and waits until it is ready.
    pub fn start_function(
        &mut self,
        start: &FunctionStart,
        deadline: Instant,
    ) -> Result<FunctionReady, AgentError> {
        start.validate().map_err(AgentError::BadRequest)?;
        self.send(&HostMessage::FunctionStart(start.clone()))?;
        match self.recv(deadline)? {
            AgentMessage::FunctionReady(ready) => Ok(ready),
            other => Err(AgentError::Unexpected(describe(&other))),
        }
    }

    /// Gives a runtime started with `wait_for_code` its function and waits
    /// until it loaded the handler.
    pub fn load_function(
        &mut self,
        load: &FunctionLoad,
        deadline: Instant,
    ) -> Result<FunctionReady, AgentError> {
        load.validate().map_err(AgentError::BadRequest)?;
        self.send(&HostMessage::FunctionLoad(load.clone()))?;
        match self.recv(deadline)? {
            AgentMessage::FunctionReady(ready) => Ok(ready),
            other => Err(AgentError::Unexpected(describe(&other))),
        }
    }

    /// Delivers one event to the function runtime (the vsock path).
    pub fn invoke_function(
        &mut self,
        invoke: &FunctionInvoke,
        deadline: Instant,
    ) -> Result<FunctionResult, AgentError> {
        invoke.validate().map_err(AgentError::BadRequest)?;
        self.send(&HostMessage::FunctionInvoke(invoke.clone()))?;
        self.function_result(deadline)
    }

    /// Fetches the result a hot-path runtime sent through the agent
    /// because it did not fit the response buffer.
    pub fn collect_function(&mut self, deadline: Instant) -> Result<FunctionResult, AgentError> {
        let wait_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .clamp(1, u128::from(protocol::MAX_TIMEOUT_MS));
        self.send(&HostMessage::FunctionCollect(wait_ms as u64))?;
        self.function_result(deadline)
    }

    fn function_result(&mut self, deadline: Instant) -> Result<FunctionResult, AgentError> {
        match self.recv(deadline)? {
            AgentMessage::FunctionResult(result) => Ok(result),
            other => Err(AgentError::Unexpected(describe(&other))),
        }
    }
}

fn describe(msg: &AgentMessage) -> String {
    match msg {
        AgentMessage::Hello(_) => "Hello".into(),
        AgentMessage::Pong(_) => "Pong".into(),
        AgentMessage::Refreshed => "Refreshed".into(),
        AgentMessage::Stdout(_) => "Stdout".into(),
        AgentMessage::Stderr(_) => "Stderr".into(),
        AgentMessage::Exit(_) => "Exit".into(),
        AgentMessage::Error(e) => format!("Error({:?}: {})", e.kind, e.message),
        AgentMessage::FunctionReady(_) => "FunctionReady".into(),
        AgentMessage::FunctionResult(_) => "FunctionResult".into(),
    }
}

/// How long to give the agent beyond an invocation's own timeout: the agent
/// needs time to kill the function, collect files and report.
pub fn invoke_grace(host: crate::host::HostKind) -> Duration {
    match host {
        crate::host::HostKind::Kvm => Duration::from_secs(5),
        // Every guest syscall is emulated there: killing and reaping a
        // process group alone can take seconds.
        crate::host::HostKind::Pvm => Duration::from_secs(30),
    }
}

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The vsock connection could not be made or configured.
    #[error("cannot connect to the guest agent: {0}")]
    Connect(std::io::Error),
    /// The agent closed the connection (or the guest refused it).
    #[error("the guest agent closed the connection")]
    Closed,
    /// No whole answer (every byte of the frame) before the deadline.
    #[error("the guest agent did not answer in time")]
    Timeout,
    /// A frame that does not decode.
    #[error("agent protocol: {0}")]
    Protocol(ProtocolError),
    /// The agent speaks another protocol version.
    #[error("the guest agent speaks protocol version {0}, ember speaks {ours}", ours = protocol::PROTOCOL_VERSION)]
    Version(u8),
    /// A well-formed message out of place.
    #[error("unexpected message from the guest agent: {0}")]
    Unexpected(String),
    /// The agent refused the request.
    #[error("the guest agent refused: {kind:?}: {message}", kind = .0.kind, message = .0.message)]
    Agent(ErrorReply),
    /// The caller stopped the invocation (e.g. its client stopped reading).
    #[error("the invocation was stopped: its output could not be delivered")]
    Cancelled,
    /// The request is invalid; nothing was sent.
    #[error("invalid invocation: {0}")]
    BadRequest(String),
}
