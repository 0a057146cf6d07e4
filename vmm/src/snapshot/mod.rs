//! Snapshots: the files a paused microVM is saved to and restored from.
//!
//! A snapshot is a directory with two files:
//!
//! - `state`: everything but guest RAM (vCPU, VM and device state), one
//!   serde value in a versioned, checksummed container ([`format`](mod@format)).
//! - `memory`: guest RAM, the regions back to back, as a sparse file in
//!   which pages the guest never touched (or left zero) are holes
//!   ([`memory`](mod@memory)). The region layout is part of the state.
//!
//! Restoring maps `memory` privately (copy-on-write), so a restore reads
//! nothing up front and all clones of one snapshot share the page cache;
//! the vCPU and VM state come from [`crate::arch::x86_64::state`].
//!
//! Both files are written to a temporary name, fsynced and renamed, so a
//! crash never leaves a half-written file under the final name. A snapshot
//! must not be modified while clones map its `memory`: a clone would see
//! the change in pages it has not copied yet, and a shrunk file makes its
//! accesses fault.

pub mod beneath;
pub mod cache;
pub mod contents;
pub mod create;
pub mod format;
pub mod memory;
pub mod reset;
pub mod restore;
mod template_memory;
pub mod working_set;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

pub use cache::{cached_snapshot_dir, ensure_cached_snapshot, snapshot_key};
pub use create::{create, SnapshotInfo};
pub use format::{read_state, write_state, FormatError, FORMAT_VERSION, MAX_STATE_LEN};
pub use memory::{
    dump_memory, dump_memory_with_stats, map_memory, open_memory_file, DumpStats, MemoryFileError,
    MemoryRegionLayout,
};
pub use reset::{guest_memory_contains, ResetError, ResetReport, ResettableClone};
pub use restore::{GuestWrite, PreparedClone, RestoreOptions, Snapshot};

use crate::agent::AgentError;
use crate::arch::x86_64::state::StateError;
use crate::builder::BuildError;
use crate::device_manager::DeviceError;
use crate::exit::VmExit;
use crate::vstate::vm::VmError;

/// A snapshot could not be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The `state` file is unreadable, corrupt or of another version.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The `memory` file is missing, short, or does not match the layout.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The state contradicts itself.
    #[error("snapshot state is inconsistent: {0}")]
    Invalid(String),
    /// The snapshot does not fit the request or this host.
    #[error("snapshot mismatch: {0}")]
    Mismatch(String),
    /// Booting the template failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The template's agent never became ready.
    #[error("the guest agent never became ready ({0})")]
    NotReady(VmExit),
    /// Talking to the template's agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the warm-up invocation failed: {0}")]
    Warmup(String),
    /// The guest did not close the agent connection before the snapshot.
    #[error("the guest did not close its vsock connections in time")]
    Quiesce,
    /// A vCPU could not be paused.
    #[error("cannot pause every vCPU")]
    Pause,
    /// A KVM ioctl failed.
    #[error("KVM: {0}")]
    Kvm(kvm_ioctls::Error),
    /// Saving or restoring vCPU/VM state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Setting up the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The devices could not be restored.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// A resettable clone could not be set up.
    #[error(transparent)]
    Reset(#[from] reset::ResetError),
    /// A snapshot directory operation failed.
    #[error("{path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, io::Error),
}

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Name of the root drive in a snapshot directory (a hard link to the
/// template's drive, or a copy where a link cannot be made): the `state`
/// file records it by this name, never by a path outside the directory.
pub const DRIVE_FILE: &str = "drive";
/// Name of the code drive in a snapshot directory (as [`DRIVE_FILE`]).
pub const CODE_DRIVE_FILE: &str = "code-drive";

/// An I/O operation on a snapshot file failed.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {op}: {source}", path.display())]
pub struct FileError {
    /// The file or directory.
    pub path: PathBuf,
    /// What was being done, e.g. "read the header".
    pub op: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// An error doing `op` on `path`.
    pub fn new(path: &Path, op: &'static str, source: io::Error) -> Self {
        FileError {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// The temporary name `path` is written under before the rename: hidden,
/// in the same directory (a rename cannot cross filesystems), unique per
/// process so two writers do not write into one file.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Creates a temporary file next to `path`, lets `fill` write it (given the
/// file and its temporary path, for errors), fsyncs it, renames it to
/// `path` and fsyncs the directory, so that `path` holds the old or the
/// whole new content, never a part. The temporary file is removed if
/// anything fails.
pub(crate) fn write_atomically<R, E>(
    path: &Path,
    fill: impl FnOnce(&File, &Path) -> Result<R, E>,
) -> Result<R, E>
where
    E: From<FileError>,
{
    let tmp = temporary_path(path);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| FileError::new(&tmp, "create", e))?;
    let result = fill(&file, &tmp).and_then(|value| {
        file.sync_all()
            .map_err(|e| FileError::new(&tmp, "fsync", e))?;
        fs::rename(&tmp, path).map_err(|e| FileError::new(path, "rename a new file to", e))?;
        Ok(value)
    });
    if result.is_err() {
        // Best effort: the error being returned matters more.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // The rename is durable only once the directory is synced.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::new(dir, "fsync the directory", e))?;
    result
}

#[cfg(test)]
pub(crate) mod test_dir {
    use std::path::{Path, PathBuf};

    /// A fresh directory under the system temporary directory, removed on
    /// drop.
    pub struct TestDir(PathBuf);

    impl TestDir {
        /// Creates `ember-<name>-<pid>`, emptied first.
        pub fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("ember-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TestDir(path)
        }

        /// The directory.
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
