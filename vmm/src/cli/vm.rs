//! The VM arguments the commands that boot or restore share, and the
//! snapshot those that restore use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use ember::config::VmConfig;
use ember::paths;
use ember::snapshot::{self, Snapshot};

use super::limits::IoLimitArgs;

#[derive(Args, Clone)]
pub(super) struct VmArgs {
    /// Guest kernel (ELF vmlinux or bzImage) [default: the one built by setup]
    #[arg(long)]
    pub(super) kernel: Option<PathBuf>,
    /// Initramfs (newc cpio) [default: the one built by setup]
    #[arg(long)]
    pub(super) initrd: Option<PathBuf>,
    /// Number of vCPUs [default: 1, or the snapshot's]
    #[arg(long)]
    pub(super) vcpus: Option<u8>,
    /// Guest memory in MiB [default: 128, or the snapshot's]
    #[arg(long)]
    pub(super) mem_mib: Option<u32>,
    /// Appended to the guest kernel command line
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub(super) cmdline_extra: String,
    /// The guest's vsock context ID (a snapshot keeps the one it was taken with)
    #[arg(long, default_value_t = ember::devices::virtio::vsock::DEFAULT_GUEST_CID)]
    pub(super) vsock_cid: u64,
    /// Also expose vsock on this Unix socket, Firecracker style: host
    /// programs connect and send `CONNECT <port>`; guest connections to
    /// host port P go to `<PATH>_P`
    #[arg(long, value_name = "PATH")]
    pub(super) vsock_uds: Option<PathBuf>,
    /// A read-only root drive (raw file system image, a multiple of 512
    /// bytes): the guest's /dev/vda, which the agent mounts as its root.
    /// With --snapshot, a copy to use instead of the snapshot's own drive
    #[arg(long, value_name = "PATH")]
    pub(super) root_drive: Option<PathBuf>,
    #[command(flatten)]
    pub(super) limits: IoLimitArgs,
}

impl VmArgs {
    /// The arguments of a command that has none of its own: the default
    /// kernel, initramfs and shape.
    pub(super) fn defaults() -> Self {
        VmArgs {
            kernel: None,
            initrd: None,
            vcpus: None,
            mem_mib: None,
            cmdline_extra: String::new(),
            vsock_cid: ember::devices::virtio::vsock::DEFAULT_GUEST_CID,
            vsock_uds: None,
            root_drive: None,
            limits: IoLimitArgs::default(),
        }
    }

    pub(super) fn to_config(&self) -> Result<VmConfig> {
        let kernel = self.kernel.clone().unwrap_or_else(paths::default_kernel);
        let initrd = self.initrd.clone().unwrap_or_else(paths::default_initrd);
        if self.kernel.is_none() && !kernel.exists() {
            bail!(
                "no default kernel at {}: run kernel-config/build.sh (or pass --kernel)",
                kernel.display()
            );
        }
        if self.initrd.is_none() && !initrd.exists() {
            bail!(
                "no default initramfs at {}: run rootfs/build-initramfs.sh (or pass --initrd)",
                initrd.display()
            );
        }
        let mut config = VmConfig::new(kernel, Some(initrd));
        config.vcpus = self.vcpus.unwrap_or(VmConfig::DEFAULT_VCPUS);
        config.mem_mib = self.mem_mib.unwrap_or(VmConfig::DEFAULT_MEM_MIB);
        config.cmdline_extra = self.cmdline_extra.clone();
        config.vsock_cid = self.vsock_cid;
        config.vsock_uds = self.vsock_uds.clone();
        config.root_drive = self.root_drive.clone();
        config.io_limits = self.limits.to_limits();
        Ok(config)
    }

    pub(super) fn cold_boot_requested(&self) -> bool {
        self.kernel.is_some() || self.initrd.is_some()
    }
}

/// Opens the snapshot `run` should restore: the one given, or the cached
/// default one (created on first use).
pub(super) fn open_snapshot(explicit: Option<&Path>, vm: &VmArgs) -> Result<Snapshot> {
    let dir = match explicit {
        Some(dir) => dir.to_path_buf(),
        None => {
            let config = vm.to_config()?;
            snapshot::ensure_cached_snapshot(&config, |dir| {
                eprintln!(
                    "ember: creating the default snapshot in {} (one cold boot, about 30 s on emulated-KVM hosts)...",
                    dir.display()
                );
            })?
        }
    };
    let snapshot =
        Snapshot::open(&dir).with_context(|| format!("cannot use snapshot {}", dir.display()))?;
    snapshot.check_shape(vm.vcpus, vm.mem_mib)?;
    Ok(snapshot)
}
