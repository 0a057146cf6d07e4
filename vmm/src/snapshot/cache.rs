//! The default snapshot: one per (kernel, initramfs, root drive, VM shape,
//! host), created on first use and cached next to the guest artifacts.

use std::path::{Path, PathBuf};

use super::{create, SnapshotError, FORMAT_VERSION, STATE_FILE};
use crate::cache_key::KeyBuilder;
use crate::config::{ConsoleOutput, VmConfig};
use crate::host::HostKind;
use crate::paths;

/// Where the default snapshot for `config` lives: `snapshot-<key>` in the
/// cache, the key a SHA-256 over what the snapshot is made from (see
/// [`snapshot_key`]).
pub fn cached_snapshot_dir(config: &VmConfig) -> Result<PathBuf, SnapshotError> {
    Ok(paths::cache_dir().join(format!("snapshot-{}", snapshot_key(config)?)))
}

/// The cache key of `config`'s default snapshot: the contents of the
/// kernel, the initramfs (which holds the agent) and the root drive, the
/// VM's shape, the parameters ember adds to the kernel command line on
/// this host, and the state file's format version. A root drive is also
/// keyed by its path and file identity, because a snapshot names that
/// file and a restore refuses a replaced one.
pub fn snapshot_key(config: &VmConfig) -> Result<String, SnapshotError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| SnapshotError::Io(path, e)
    };
    let mut key = KeyBuilder::new("snapshot");
    key.field("format", FORMAT_VERSION.to_le_bytes())
        .field(
            "host",
            crate::kernel_cmdline::fingerprint(HostKind::detect()),
        )
        .file("kernel", &config.kernel)
        .map_err(io(&config.kernel))?;
    match &config.initrd {
        Some(initrd) => key.file("initrd", initrd).map_err(io(initrd))?,
        None => key.field("initrd", "none"),
    };
    match &config.root_drive {
        Some(drive) => {
            key.file("root drive", drive).map_err(io(drive))?;
            key.field("root drive file", drive_identity(drive).map_err(io(drive))?);
        }
        None => {
            key.field("root drive", "none");
        }
    }
    key.field("vcpus", [config.vcpus])
        .field("mem_mib", config.mem_mib.to_le_bytes())
        .field("cmdline_extra", &config.cmdline_extra)
        .field("vsock_cid", config.vsock_cid.to_le_bytes());
    Ok(key.finish())
}

/// What a snapshot records of its root drive's file: the canonical path,
/// inode and modification time (see `DriveSpec`).
pub(crate) fn drive_identity(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(format!(
        "{}:{}:{}:{}.{}",
        std::fs::canonicalize(path)?.display(),
        meta.len(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// The default snapshot for `config`, created first if it does not exist
/// (`on_create` is told, since that takes a cold boot). Concurrent callers
/// may each build one; the first to finish wins and the others use it.
pub fn ensure_cached_snapshot(
    config: &VmConfig,
    on_create: impl FnOnce(&std::path::Path),
) -> Result<PathBuf, SnapshotError> {
    let dir = cached_snapshot_dir(config)?;
    if dir.join(STATE_FILE).exists() {
        return Ok(dir);
    }
    on_create(&dir);
    let mut template = config.clone();
    template.console = ConsoleOutput::Sink;
    template.interactive = false;
    // The template's own socket would outlive nothing: clones get theirs.
    template.vsock_uds = None;
    // Limits are the clones' business; the template boots at full speed.
    template.io_limits = Default::default();
    paths::build_cache_entry(
        &dir,
        STATE_FILE,
        |building| create(&template, None, building).map(drop),
        SnapshotError::Io,
    )?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of stand-in guest artifacts (keys only hash them).
    struct Inputs {
        dir: PathBuf,
    }

    impl Inputs {
        fn new(name: &str) -> Self {
            let dir = crate::cache_key::scratch_inputs(
                &format!("snapshot-{name}"),
                &[
                    ("vmlinux", "kernel"),
                    ("initrd", "agent v1"),
                    ("root", "rootfs"),
                ],
            );
            Inputs { dir }
        }

        fn config(&self) -> VmConfig {
            let mut config = VmConfig::new(self.dir.join("vmlinux"), Some(self.dir.join("initrd")));
            config.root_drive = Some(self.dir.join("root"));
            config
        }

        /// Rewrites `file` in place (same path, inode and size).
        fn edit(&self, file: &str, data: &str) {
            std::fs::write(self.dir.join(file), data).unwrap();
        }
    }

    impl Drop for Inputs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn key_is_a_sha256_and_stable() {
        let inputs = Inputs::new("stable");
        let key = snapshot_key(&inputs.config()).unwrap();
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(snapshot_key(&inputs.config()).unwrap(), key);
    }

    #[test]
    fn editing_an_input_file_changes_the_key() {
        let inputs = Inputs::new("edit");
        let mut seen = vec![snapshot_key(&inputs.config()).unwrap()];
        for (file, data) in [
            ("vmlinux", "kernel v2"),
            ("initrd", "agent v2"),
            ("initrd", "agent v3"),
            ("root", "rootfs v2"),
        ] {
            inputs.edit(file, data);
            let key = snapshot_key(&inputs.config()).unwrap();
            assert!(!seen.contains(&key), "editing {file} kept the key");
            seen.push(key);
        }
    }

    #[test]
    fn the_vm_shape_changes_the_key() {
        let inputs = Inputs::new("shape");
        let base = snapshot_key(&inputs.config()).unwrap();
        let mut config = inputs.config();
        config.mem_mib += 1;
        assert_ne!(snapshot_key(&config).unwrap(), base);
        let mut config = inputs.config();
        config.vcpus += 1;
        assert_ne!(snapshot_key(&config).unwrap(), base);
        let mut config = inputs.config();
        config.cmdline_extra = "loglevel=7".into();
        assert_ne!(snapshot_key(&config).unwrap(), base);
        let mut config = inputs.config();
        config.root_drive = None;
        assert_ne!(snapshot_key(&config).unwrap(), base);
        // Where the console goes does not matter.
        let mut config = inputs.config();
        config.console = ConsoleOutput::Sink;
        assert_eq!(snapshot_key(&config).unwrap(), base);
    }

    #[test]
    fn a_missing_input_is_an_error_naming_it() {
        let inputs = Inputs::new("missing");
        std::fs::remove_file(inputs.dir.join("initrd")).unwrap();
        let err = snapshot_key(&inputs.config()).unwrap_err().to_string();
        assert!(err.contains("initrd"), "{err}");
    }
}
