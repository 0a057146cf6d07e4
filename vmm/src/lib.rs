//! ember: a minimal KVM virtual machine monitor for snapshot-restored
//! sandboxes.
//!
//! Boot a microVM from a kernel and an initramfs whose `/init` is
//! `ember-agent`:
//!
//! ```no_run
//! use ember::{paths, Machine, VmConfig};
//!
//! let mut config = VmConfig::new(paths::default_kernel(), Some(paths::default_initrd()));
//! config.vcpus = 2;
//! let mut vm = Machine::boot(&config)?;
//! let exit = vm.wait();
//! assert!(exit.is_clean());
//! # Ok::<(), ember::BuildError>(())
//! ```

pub mod agent;
pub mod arch;
pub mod bench;
pub mod builder;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod kernel_cmdline;
pub mod loader;
pub mod machine;
pub mod paths;
pub mod sandbox;
pub mod snapshot;
pub mod vstate;

pub use builder::BuildError;
pub use config::{ConsoleOutput, VmConfig};
pub use exit::VmExit;
pub use host::HostKind;
pub use machine::Machine;
pub use sandbox::{Invocation, Outcome, Sandbox, SandboxError};
