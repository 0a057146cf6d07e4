//! ember: a minimal KVM virtual machine monitor for snapshot-restored
//! sandboxes.
//!
//! Boot a guest once, snapshot it with its agent waiting, then restore a
//! fresh clone for every invocation:
//!
//! ```no_run
//! use ember::snapshot::{ensure_cached_snapshot, Snapshot};
//! use ember::{paths, Invocation, Sandbox, VmConfig};
//!
//! let config = VmConfig::new(paths::default_kernel(), Some(paths::default_initrd()));
//! let snapshot = Snapshot::open(&ensure_cached_snapshot(&config, |_| {})?)?;
//! let mut sandbox = Sandbox::restore(&snapshot, &Default::default())?;
//! let outcome = sandbox.invoke(&Invocation::new(["echo", "hello"]))?;
//! assert_eq!(outcome.stdout, b"hello\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Machine`] is the lower layer: a running microVM without an agent
//! connection ([`Machine::boot`], [`snapshot::Snapshot::restore`]).

pub mod agent;
pub mod arch;
pub mod bench;
pub mod builder;
pub mod cache_key;
pub mod config;
pub mod deadline;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod function;
pub mod host;
pub mod jail;
pub mod kernel_cmdline;
pub mod loader;
pub mod machine;
pub mod paths;
pub mod pool;
pub mod sandbox;
pub mod seccomp;
pub mod server;
pub mod snapshot;
pub mod vstate;
pub mod worker;

pub use builder::BuildError;
pub use config::{ConsoleOutput, VmConfig};
pub use exit::VmExit;
pub use function::{Function, FunctionOutcome, FunctionSpec};
pub use host::HostKind;
pub use machine::Machine;
pub use pool::{Pool, PoolConfig};
pub use sandbox::{Invocation, Outcome, Sandbox, SandboxError};
