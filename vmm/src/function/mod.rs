//! Functions: code deployed once and invoked many times, each invocation
//! in a fresh clone of a snapshot that holds the runtime already started,
//! the handler imported and warmed, waiting.
//!
//! A function directory is a snapshot (`state`, `memory`) plus
//! `function.json` ([`Manifest`]). [`crate::create_function`] makes one: it boots the
//! runtime's image, starts the runtime through the agent
//! (`FunctionStart`), runs the warm-up event, and saves the VM with the
//! runtime waiting. [`Function::invoke`] restores a clone per event:
//!
//! - **Hot path** (runtimes that report hot-path buffers, e.g. python3):
//!   the event is written into the clone's memory before its vCPU first
//!   runs, the runtime (stopped in user mode, spinning on the request's
//!   sequence number) picks it up, runs the handler, writes the response
//!   into memory and rings the doorbell page, which exits straight to the
//!   VMM. No guest-kernel instruction is needed on the way: no interrupt
//!   (the clone's timer is pushed out, the vsock reset deferred), no
//!   syscall, no page fault on pre-touched pages. See
//!   `ember_protocol::hotpath`.
//! - **vsock path** (events or results that do not fit the buffers,
//!   runtimes without a hot path): the agent delivers the event on the
//!   runtime's request pipe and returns its response.
//!
//! Every clone gets a fresh kernel CRNG key written into its memory
//! ([`guest_rng`]) and fresh entropy for the runtime's own generators.
//!
//! ```no_run
//! use ember::function::{Function, FunctionInvokeOptions, FunctionSpec, TemplateOptions};
//! use ember::{create_function, paths};
//!
//! // Once: boot the python image, import the handler, warm it, snapshot it.
//! let mut spec = FunctionSpec::python3("examples/functions/echo.py", "handler");
//! spec.warmup_event = Some(br#"{"warm": true}"#.to_vec());
//! let options = TemplateOptions::new(
//!     paths::default_kernel(),
//!     paths::default_initrd(),
//!     Some(paths::default_python_image()),
//! );
//! create_function(&spec, &options, "/tmp/echo".as_ref())?;
//!
//! // Every invocation: a fresh clone, destroyed after.
//! let echo = Function::open("/tmp/echo".as_ref())?;
//! let outcome = echo.invoke(br#"{"hello": "world"}"#, &FunctionInvokeOptions::default())?;
//! println!("{:?} in {:?}", outcome.result, outcome.timings.total);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod base;
mod buffers;
pub mod bundle;
mod cache;
mod cancel;
pub mod code_image;
pub mod guest_clock;
pub mod guest_rng;
mod invoke;
mod manifest;
mod output;
pub mod pip;
pub mod pip_jail;
mod recycled;
mod spec;
mod template;
mod vm_steps;
mod zip_directory;

use std::path::PathBuf;

pub(crate) use cache::ensure_cached_with;
pub use cache::{cached_function_dir, function_key};
pub use cancel::InvocationCancel;
pub(crate) use cancel::{interrupt_on, Registered};
pub(crate) use invoke::{cap_output, timeout_ms as check_timeout};
pub use invoke::{
    Function, FunctionInvokeOptions, FunctionOutcome, FunctionTimings, HandlerResult,
    InvocationPath, PreparedFunction,
};
pub use manifest::{Manifest, MANIFEST_FILE};
pub use output::{OutputQueue, OutputSink, OutputStream};
pub use recycled::{
    FunctionPool, PoolOptions, PoolStats, RecycleInfo, RecycleOptions, RecycledFunction,
    VERIFY_RESET_ENV,
};
pub(crate) use spec::check as check_spec;
pub use spec::{FunctionSpec, Runtime, TemplateOptions, ARENA_MIB_ENV, PYTHON_MEMORY_ENV};
pub(crate) use template::make_code_drive;
pub use template::{create_in_process, TemplateInfo};

use crate::agent::AgentError;
use crate::exit::VmExit;
use crate::snapshot::SnapshotError;

/// A function could not be created, opened or invoked.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// `function.json` is missing, corrupt or inconsistent.
    #[error("function manifest: {0}")]
    Manifest(String),
    /// The snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Talking to the guest agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The caller's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Guest memory could not be read or written.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// The runtime did not start (its output says why).
    #[error("the function runtime did not start: {0}")]
    Startup(String),
    #[error("the warm-up event failed: {0}")]
    Warmup(String),
    /// The template's runtime did not behave as the hot path requires.
    #[error("function template: {0}")]
    Template(String),
    /// The code drive (bundle, dependencies, image) could not be made.
    #[error(transparent)]
    Code(#[from] code_image::CodeImageError),
    /// The request is invalid; nothing ran.
    #[error("invalid function request: {0}")]
    BadRequest(String),
    /// The clone stopped before it answered.
    #[error("the function's microVM stopped: {0}")]
    Stopped(VmExit),
    /// A recycled clone could not be reset, or differs from its template.
    #[error(transparent)]
    Reset(#[from] crate::snapshot::ResetError),
    /// The runtime's response in guest memory does not decode.
    #[error("the function runtime answered garbage: {0}")]
    Garbage(#[from] ember_protocol::hotpath::LayoutError),
    /// The jailed worker process that runs the invocation failed: it did
    /// not start, broke its pipe, died, or reported an error of its own.
    #[error("the function's worker process failed: {0}")]
    Worker(String),
    /// The invocation was cancelled ([`InvocationCancel`]); its clone was
    /// stopped (or its worker killed) and is not reused.
    #[error("the invocation was cancelled")]
    Cancelled,
}
