//! The description of a microVM to boot, and its validation.
//!
//! Everything here can come from a user (command line, request), so it is
//! validated once, up front, with errors that say what is wrong and what
//! would be accepted.

use std::path::{Path, PathBuf};

use crate::arch::x86_64::layout;
pub use crate::devices::rate_limiter::{BucketConfig, IoLimits, RateLimitConfig, RateLimitError};

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded (still scanned for the agent's readiness line).
    Sink,
}

/// A library user rarely wants a guest writing to its stdout.
impl Default for ConsoleOutput {
    fn default() -> Self {
        ConsoleOutput::Sink
    }
}

/// Everything needed to boot one microVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs, at least 1.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Guest kernel: an ELF `vmlinux` (PVH entry preferred) or a bzImage.
    pub kernel: PathBuf,
    /// Initramfs (newc cpio), optional.
    pub initrd: Option<PathBuf>,
    /// Appended to the kernel command line ember builds.
    pub cmdline_extra: String,
    /// Destination of the guest's serial console.
    pub console: ConsoleOutput,
    /// Forward the host's stdin to the guest console.
    pub interactive: bool,
    /// The guest's vsock context ID (3 or more).
    pub vsock_cid: u64,
    /// Also expose vsock on this Unix socket path, Firecracker style
    /// (`CONNECT <port>` in; guest connections to port P go to `<path>_P`).
    pub vsock_uds: Option<PathBuf>,
    /// Filter the vCPU and event-loop threads with seccomp
    /// ([`crate::seccomp`]); on by default.
    pub seccomp: bool,
    /// A read-only root drive: a raw file system image (a non-zero
    /// multiple of 512 bytes), the guest's `/dev/vda`, named to the agent
    /// as `ember.root=/dev/vda`. Opened read-only, never written; every
    /// clone of a snapshot reads the same file.
    pub root_drive: Option<PathBuf>,
    /// Rate limits on the guest's disk and vsock I/O (default: unlimited).
    pub io_limits: IoLimits,
    /// A read-only code drive (a function's bundle and dependencies, see
    /// [`crate::function`]): a second virtio-blk device, after the root
    /// drive (`/dev/vdb` with one, else `/dev/vda`). Mounted by the agent
    /// only when a function start asks for it.
    pub code_drive: Option<PathBuf>,
}

impl VmConfig {
    /// Default vCPU count.
    pub const DEFAULT_VCPUS: u8 = 1;
    /// Default guest RAM.
    pub const DEFAULT_MEM_MIB: u32 = 128;

    /// A config with default sizes for the given kernel and initramfs.
    pub fn new(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> Self {
        VmConfig {
            vcpus: Self::DEFAULT_VCPUS,
            mem_mib: Self::DEFAULT_MEM_MIB,
            kernel: kernel.into(),
            initrd,
            cmdline_extra: String::new(),
            console: ConsoleOutput::Stdout,
            interactive: false,
            vsock_cid: crate::devices::virtio::vsock::DEFAULT_GUEST_CID,
            vsock_uds: None,
            seccomp: true,
            root_drive: None,
            io_limits: IoLimits::default(),
            code_drive: None,
        }
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        u64::from(self.mem_mib) << 20
    }

    /// Checks the config against ember's limits and this host's.
    ///
    /// `max_vcpus` is what KVM reports for this host; `host_mem_bytes` is
    /// the host's physical memory.
    pub fn validate(&self, max_vcpus: usize, host_mem_bytes: u64) -> Result<(), ConfigError> {
        let vcpu_limit = max_vcpus.min(usize::from(crate::arch::x86_64::mptable::MAX_CPUS));
        if self.vcpus == 0 || usize::from(self.vcpus) > vcpu_limit {
            return Err(ConfigError::Vcpus {
                requested: usize::from(self.vcpus),
                max: vcpu_limit,
            });
        }
        let min_mib = layout::MIN_MEM_SIZE >> 20;
        let max_bytes = host_mem_bytes.min(layout::MAX_MEM_SIZE);
        if u64::from(self.mem_mib) < min_mib || self.mem_bytes() > max_bytes {
            return Err(ConfigError::Memory {
                requested_mib: self.mem_mib,
                min_mib,
                max_mib: max_bytes >> 20,
            });
        }
        check_readable(&self.kernel, "kernel")?;
        if let Some(initrd) = &self.initrd {
            check_readable(initrd, "initrd")?;
        }
        if self.cmdline_extra.len() > MAX_CMDLINE_EXTRA {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline_extra.len(),
                max: MAX_CMDLINE_EXTRA,
            });
        }
        if !self.cmdline_extra.is_ascii() || self.cmdline_extra.contains('\0') {
            return Err(ConfigError::CmdlineNotAscii);
        }
        // 0-2 are reserved (hypervisor, local, host); u32::MAX means "any".
        if !(3..u64::from(u32::MAX)).contains(&self.vsock_cid) {
            return Err(ConfigError::VsockCid(self.vsock_cid));
        }
        self.io_limits.validate()?;
        for (drive, what) in [
            (&self.root_drive, "root drive"),
            (&self.code_drive, "code drive"),
        ] {
            let Some(drive) = drive else { continue };
            let meta = check_readable(drive, what)?;
            let sector = crate::devices::virtio::block::disk::SECTOR_SIZE;
            if meta.len() == 0 || !meta.len().is_multiple_of(sector) {
                return Err(ConfigError::DriveSize {
                    path: drive.clone(),
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
}

/// Longest `cmdline_extra` accepted; ember's own parameters need the rest
/// of the kernel's 2 KiB command line.
pub const MAX_CMDLINE_EXTRA: usize = 1024;

fn check_readable(path: &Path, what: &'static str) -> Result<std::fs::Metadata, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(meta)
}

/// A `VmConfig` that cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("vcpus must be between 1 and {max} on this host, got {requested}")]
    Vcpus {
        /// What was asked for.
        requested: usize,
        /// The largest count accepted here.
        max: usize,
    },
    /// Memory size out of range.
    #[error(
        "memory must be between {min_mib} and {max_mib} MiB on this host, got {requested_mib} MiB"
    )]
    Memory {
        /// What was asked for.
        requested_mib: u32,
        /// Smallest accepted.
        min_mib: u64,
        /// Largest accepted.
        max_mib: u64,
    },
    /// A file that cannot be opened.
    #[error("cannot read {what} {path}: {source}")]
    Unreadable {
        /// Which file (kernel, initrd).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A path that names a directory or a device.
    #[error("{what} {path} is not a regular file")]
    NotAFile {
        /// Which file (kernel, initrd).
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// Extra command line too long.
    #[error("extra kernel command line is {len} bytes, at most {max} are accepted")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Extra command line with bytes the kernel cannot take.
    #[error("extra kernel command line must be printable ASCII")]
    CmdlineNotAscii,
    /// A reserved or out-of-range vsock context ID.
    #[error("vsock CID must be between 3 and 4294967294, got {0}")]
    VsockCid(u64),
    /// An invalid rate limit.
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
    /// A drive that is empty or not a whole number of sectors.
    #[error("drive {} is {size} bytes: it must be a non-zero multiple of 512", path.display())]
    DriveSize {
        /// The drive.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_files() -> (VmConfig, tempfile_like::TempFile) {
        let kernel = tempfile_like::TempFile::new("kernel");
        (VmConfig::new(kernel.path(), None), kernel)
    }

    /// A tiny self-deleting temp file, to keep test deps at zero.
    mod tempfile_like {
        use std::path::{Path, PathBuf};

        pub struct TempFile(PathBuf);

        impl TempFile {
            pub fn new(tag: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "ember-config-test-{tag}-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::write(&path, b"x").unwrap();
                TempFile(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn defaults_are_valid() {
        let (config, _k) = config_with_files();
        config.validate(8, 24 * GIB).unwrap();
    }

    #[test]
    fn vcpus_out_of_range() {
        let (mut config, _k) = config_with_files();
        config.vcpus = 0;
        let err = config.validate(8, 24 * GIB).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Vcpus {
                requested: 0,
                max: 8
            }
        ));
        config.vcpus = 9;
        assert!(matches!(
            config.validate(8, 24 * GIB),
            Err(ConfigError::Vcpus { requested: 9, .. })
        ));
    }

    #[test]
    fn memory_out_of_range() {
        let (mut config, _k) = config_with_files();
        config.mem_mib = 1;
        assert!(matches!(
            config.validate(8, 24 * GIB),
            Err(ConfigError::Memory { .. })
        ));
        config.mem_mib = 25 * 1024;
        let err = config.validate(8, 24 * GIB).unwrap_err();
        assert!(err.to_string().contains("24576 MiB"), "{err}");
    }

    #[test]
    fn missing_kernel() {
        let config = VmConfig::new("/nonexistent/vmlinux", None);
        let err = config.validate(8, 24 * GIB).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot read kernel /nonexistent/vmlinux"));
    }

    #[test]
    fn directory_as_initrd() {
        let (mut config, _k) = config_with_files();
        config.initrd = Some(std::env::temp_dir());
        assert!(matches!(
            config.validate(8, 24 * GIB),
            Err(ConfigError::NotAFile { what: "initrd", .. })
        ));
    }

    #[test]
    fn vsock_cid_checked() {
        let (mut config, _k) = config_with_files();
        for cid in [0, 2, u64::from(u32::MAX)] {
            config.vsock_cid = cid;
            assert!(matches!(
                config.validate(8, 24 * GIB),
                Err(ConfigError::VsockCid(_))
            ));
        }
    }

    #[test]
    fn root_drive_checked() {
        let (mut config, _k) = config_with_files();
        // The one-byte temp file is not a whole sector.
        let odd = tempfile_like::TempFile::new("drive-odd");
        config.root_drive = Some(odd.path().to_path_buf());
        assert!(matches!(
            config.validate(8, 24 * GIB),
            Err(ConfigError::DriveSize { size: 1, .. })
        ));
        std::fs::write(odd.path(), [0u8; 1024]).unwrap();
        config.validate(8, 24 * GIB).unwrap();
        config.root_drive = Some(std::env::temp_dir());
        assert!(matches!(
            config.validate(8, 24 * GIB),
            Err(ConfigError::NotAFile {
                what: "root drive",
                ..
            })
        ));
        config.root_drive = Some("/nonexistent/root.img".into());
        assert!(config
            .validate(8, 24 * GIB)
            .unwrap_err()
            .to_string()
            .starts_with("cannot read root drive /nonexistent/root.img"));
    }

    #[test]
    fn io_limits_checked() {
        let (mut config, _k) = config_with_files();
        config.io_limits.disk = RateLimitConfig::bandwidth(1 << 20);
        config.validate(8, 24 * GIB).unwrap();
        config.io_limits.disk.ops = Some(BucketConfig {
            size: 100,
            one_time_burst: 0,
            refill_time_ms: 0,
        });
        let err = config.validate(8, 24 * GIB).unwrap_err();
        assert!(matches!(err, ConfigError::RateLimit(_)), "{err}");
        assert!(err.to_string().contains("refill time"), "{err}");
    }

    #[test]
    fn cmdline_extra_checked() {
        let (mut config, _k) = config_with_files();
        config.cmdline_extra = "a".repeat(MAX_CMDLINE_EXTRA + 1);
        assert!(matches!(
            config.validate(8, 24 * GIB),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        config.cmdline_extra = "quiet\u{e9}".into();
        assert!(matches!(
            config.validate(8, 24 * GIB),
            Err(ConfigError::CmdlineNotAscii)
        ));
    }
}
