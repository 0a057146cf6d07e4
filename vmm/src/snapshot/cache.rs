//! The default snapshot: one per (kernel, initramfs, vCPUs, memory, host),
//! created on first use and cached next to the guest artifacts.

use std::path::PathBuf;

use super::{create, SnapshotError, FORMAT_VERSION, STATE_FILE};
use crate::config::{ConsoleOutput, VmConfig};
use crate::host::HostKind;
use crate::paths;

/// Where the default snapshot for `config` lives. The key covers what the
/// snapshot depends on; the kernel and initramfs paths resolve to their
/// content-addressed cache entries, so a rebuilt image gets a new snapshot.
/// A root drive is keyed by its path and the identity of the file there
/// (size, inode, modification time): a changed drive gets a new snapshot,
/// as restoring the old one would refuse it.
pub fn cached_snapshot_dir(config: &VmConfig) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let resolve = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    let drive = config
        .root_drive
        .as_ref()
        .map(|p| {
            let id = std::fs::metadata(p).map_or((0, 0, 0, 0), |m| {
                (m.len(), m.ino(), m.mtime(), m.mtime_nsec())
            });
            format!("{}:{id:?}", resolve(p).display())
        })
        .unwrap_or_default();
    let key = format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
        resolve(&config.kernel).display(),
        config
            .initrd
            .as_ref()
            .map(|p| resolve(p).display().to_string())
            .unwrap_or_default(),
        config.vcpus,
        config.mem_mib,
        config.cmdline_extra,
        config.vsock_cid,
        crate::kernel_cmdline::fingerprint(HostKind::detect()),
        FORMAT_VERSION,
        env!("CARGO_PKG_VERSION"),
        drive,
    );
    paths::cache_dir().join(format!("snapshot-{:08x}", crc32fast::hash(key.as_bytes())))
}

/// The default snapshot for `config`, created first if it does not exist
/// (`on_create` is told, since that takes a cold boot). Concurrent callers
/// may each build one; the first to finish wins and the others use it.
pub fn ensure_cached_snapshot(
    config: &VmConfig,
    on_create: impl FnOnce(&std::path::Path),
) -> Result<PathBuf, SnapshotError> {
    let dir = cached_snapshot_dir(config);
    if dir.join(STATE_FILE).exists() {
        return Ok(dir);
    }
    on_create(&dir);
    let mut template = config.clone();
    template.console = ConsoleOutput::Sink;
    template.interactive = false;
    // The template's own socket would outlive nothing: clones get theirs.
    template.vsock_uds = None;
    paths::build_cache_entry(
        &dir,
        STATE_FILE,
        |building| create(&template, None, building).map(drop),
        SnapshotError::Io,
    )?;
    Ok(dir)
}
