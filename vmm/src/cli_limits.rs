//! The I/O rate-limit flags shared by the commands that run VMs.

use clap::Args;
use ember::config::{BucketConfig, IoLimits, RateLimitConfig};

/// `--disk-bandwidth-mib`, `--disk-iops`, `--vsock-bandwidth-mib`.
#[derive(Args, Clone, Debug, Default)]
pub struct IoLimitArgs {
    /// Cap the guest's root-drive reads at this many MiB per second
    /// (bursts up to one second's worth; 0: unlimited)
    #[arg(long, value_name = "MIB_PER_S")]
    pub disk_bandwidth_mib: Option<u32>,
    /// Cap the guest's root-drive requests at this many per second (0:
    /// unlimited)
    #[arg(long, value_name = "OPS_PER_S")]
    pub disk_iops: Option<u32>,
    /// Cap vsock payload at this many MiB per second, each way (0:
    /// unlimited)
    #[arg(long, value_name = "MIB_PER_S")]
    pub vsock_bandwidth_mib: Option<u32>,
}

impl IoLimitArgs {
    /// The limits the flags ask for (unset or 0: unlimited).
    pub fn to_limits(&self) -> IoLimits {
        // u32 MiB in bytes fits a u64 with room to spare.
        let mib = |v: Option<u32>| u64::from(v.unwrap_or(0)) << 20;
        let per_second = |n: u64| Some(BucketConfig::per_second(n)).filter(|b| b.is_limited());
        IoLimits {
            disk: RateLimitConfig {
                bandwidth: per_second(mib(self.disk_bandwidth_mib)),
                ops: per_second(u64::from(self.disk_iops.unwrap_or(0))),
            },
            vsock: RateLimitConfig::bandwidth(mib(self.vsock_bandwidth_mib)),
        }
    }
}
