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
pub mod cgroup;
pub mod config;
pub mod deadline;
pub mod device_manager;
pub mod devices;
pub mod dispatch;
pub mod event_loop;
pub mod exit;
pub mod function;
pub mod host;
pub mod image;
pub mod isolation;
pub mod jail;
pub mod kernel_cmdline;
pub mod loader;
pub mod machine;
pub mod paths;
pub mod pool;
pub mod ready;
pub mod refresh;
pub mod sandbox;
pub mod seccomp;
pub mod server;
pub mod snapshot;
pub mod vstate;
pub mod worker;

pub use builder::BuildError;
pub use config::{ConsoleOutput, VmConfig};
pub use dispatch::{create_function, ensure_cached_function};
pub use exit::VmExit;
pub use function::{Function, FunctionOutcome, FunctionSpec};
pub use host::HostKind;
pub use machine::Machine;
pub use pool::{Pool, PoolConfig};
pub use sandbox::{Invocation, Outcome, Sandbox, SandboxError};

#[cfg(test)]
mod tests {
    /// Cargo does not discover tests outside the package, and ours live in
    /// the repository's top-level tests/: a file there without a
    /// `[[test]]` entry in vmm/Cargo.toml would silently never run.
    #[test]
    fn every_top_level_test_is_wired() {
        let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = std::fs::read_to_string(manifest_dir.join("Cargo.toml")).unwrap();
        let dir = manifest_dir.join("../tests");
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let Some(stem) = name.strip_suffix(".rs") else {
                continue;
            };
            let wiring = format!("[[test]]\nname = \"{stem}\"\npath = \"../tests/{name}\"\n");
            if !manifest.contains(&wiring) {
                missing.push(name);
            }
        }
        assert!(
            missing.is_empty(),
            "tests/{missing:?} have no [[test]] entry in vmm/Cargo.toml"
        );
    }
}
