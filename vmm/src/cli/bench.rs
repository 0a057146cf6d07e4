//! `ember bench`: cold boots, restores and the HTTP load test here; the
//! function and noisy-neighbour benchmarks beside their commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use ember::bench;
use ember::snapshot::RestoreOptions;

use super::function::BenchFunctionArgs;
use super::isolation::isolation;
use super::limits::BenchNoisyArgs;
use super::vm::{open_snapshot, VmArgs};

#[derive(Subcommand)]
pub(super) enum BenchCommand {
    /// Cold boots: process start to agent ready.
    Boot(BenchBootArgs),
    /// Snapshot restores: restore, run `true`, tear down.
    Restore(BenchRestoreArgs),
    /// Load-test a local `ember serve`: invocations of `true` from C
    /// connections for S seconds.
    Http(BenchHttpArgs),
    /// Function invocations: restore to result on the hot path and the
    /// vsock path, next to a cold `python3 -c pass`.
    Function(BenchFunctionArgs),
    /// An echo function's latency beside a neighbour clone that idles,
    /// hammers its disk, and hammers it under a rate limit.
    NoisyNeighbour(BenchNoisyArgs),
}

/// Runs a `bench` subcommand.
pub(super) fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Boot(args) => boot(args),
        BenchCommand::Restore(args) => restore(args),
        BenchCommand::Http(args) => http(args),
        BenchCommand::Function(args) => super::function::bench_function(args),
        BenchCommand::NoisyNeighbour(args) => super::limits::bench_noisy(args),
    }
}

#[derive(Args)]
pub(super) struct BenchBootArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Number of boots
    #[arg(long, default_value_t = 3)]
    iterations: u32,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct BenchRestoreArgs {
    /// Snapshot to restore [default: the cached default snapshot]
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Number of clones to restore
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Clones alive at once
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Run each clone in its own jailed worker process
    #[arg(long)]
    isolate: bool,
}

#[derive(Args)]
pub(super) struct BenchHttpArgs {
    /// The server: http://127.0.0.1:PORT or unix:PATH (loopback only)
    #[arg(long)]
    url: String,
    /// Connections, each with one request in flight
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Seconds to send requests for
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Send the bearer token in FILE (the server's --auth-token-file)
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
}

fn boot(args: BenchBootArgs) -> Result<ExitCode> {
    let config = args.vm.to_config()?;
    let exe = std::env::current_exe().context("cannot find the ember binary")?;
    let report = bench::boot(&exe, &config, args.iterations).context("boot benchmark failed")?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(args: BenchRestoreArgs) -> Result<ExitCode> {
    let vm = VmArgs::defaults();
    let snapshot = open_snapshot(args.snapshot.as_deref(), &vm)?;
    let options = RestoreOptions {
        isolation: args.isolate.then(isolation).transpose()?,
        ..RestoreOptions::default()
    };
    let report = bench::restore(&snapshot, &options, args.iterations, args.concurrency)
        .context("restore benchmark failed")?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(ExitCode::SUCCESS)
}

fn http(args: BenchHttpArgs) -> Result<ExitCode> {
    use ember::bench::http::{self as loadtest, LoadConfig};
    let config = LoadConfig {
        target: args.url.parse()?,
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.duration_s),
        argv: vec!["true".into()],
        timeout_ms: 60_000,
        auth_token: args
            .auth_token_file
            .as_deref()
            .map(ember::server::guard::AuthToken::from_file)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    let report = loadtest::run(&config)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(ExitCode::SUCCESS)
}
