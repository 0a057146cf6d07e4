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

/// `ember bench noisy-neighbour`.
#[derive(Args)]
pub struct BenchNoisyArgs {
    /// Seconds each phase lasts (idle, hammering, hammering limited)
    #[arg(long, default_value_t = 30)]
    pub window_s: u64,
    /// The neighbour's disk limit in the last phase, MiB per second
    #[arg(long, default_value_t = 2)]
    pub disk_limit_mib: u32,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Runs the noisy-neighbour benchmark with the cached echo function and a
/// cached snapshot whose root drive is the python3 image (each made on
/// first use).
pub fn bench_noisy(args: BenchNoisyArgs) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::{bail, Context};
    use ember::bench::function::{echo_spec, DEFAULT_EVENT};
    use ember::bench::noisy::{self, NoisyConfig};
    use ember::ensure_cached_function;
    use ember::function::{Function, TemplateOptions};
    use ember::paths;

    if args.window_s == 0 || args.disk_limit_mib == 0 {
        bail!("--window-s and --disk-limit-mib must be positive");
    }
    let (kernel, initrd, image) = (
        paths::default_kernel(),
        paths::default_initrd(),
        paths::default_python_image(),
    );
    for path in [&kernel, &initrd, &image] {
        if !path.exists() {
            bail!("{} is missing: run scripts/setup", path.display());
        }
    }
    let options = TemplateOptions::new(kernel.clone(), initrd.clone(), Some(image.clone()));
    let echo_dir = ensure_cached_function(&echo_spec()?, &options, |dir| {
        eprintln!("ember: creating the echo function in {}...", dir.display())
    })?;
    let echo = std::sync::Arc::new(
        Function::open(&echo_dir)
            .with_context(|| format!("cannot open the function {}", echo_dir.display()))?,
    );
    let mut config = ember::VmConfig::new(kernel, Some(initrd));
    config.console = ember::ConsoleOutput::Sink;
    config.root_drive = Some(image);
    let snap_dir = ember::snapshot::ensure_cached_snapshot(&config, |dir| {
        eprintln!(
            "ember: creating the neighbour's snapshot in {}...",
            dir.display()
        )
    })?;
    let neighbour = ember::snapshot::Snapshot::open(&snap_dir)
        .with_context(|| format!("cannot use snapshot {}", snap_dir.display()))?;
    let report = noisy::run(
        &echo,
        &neighbour,
        &NoisyConfig {
            window: std::time::Duration::from_secs(args.window_s),
            disk_limit: u64::from(args.disk_limit_mib) << 20,
            event: DEFAULT_EVENT.to_vec(),
        },
    )?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
