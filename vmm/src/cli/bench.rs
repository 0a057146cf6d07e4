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
    /// Host memory per idle warm clone when one server holds many of a
    /// function (PSS and MemAvailable, before and after an invocation
    /// each).
    Density(BenchDensityArgs),
}

/// Runs a `bench` subcommand.
pub(super) fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Boot(args) => boot(args),
        BenchCommand::Restore(args) => restore(args),
        BenchCommand::Http(args) => http(args),
        BenchCommand::Function(args) => super::function::bench_function(args),
        BenchCommand::NoisyNeighbour(args) => super::limits::bench_noisy(args),
        BenchCommand::Density(args) => density(args),
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
    /// Invoke this function (POST /v1/functions/NAME/invocations) instead
    /// of running `true` in a sandbox
    #[arg(long, value_name = "NAME")]
    function: Option<String>,
    /// The event each function invocation sends
    #[arg(long, value_name = "JSON", default_value = "{}", requires = "function")]
    event: String,
    /// The function's template directory: after the HTTP run, run the
    /// same load through the library in this process (in-process recycled
    /// clones, same concurrency and duration) and print what HTTP and the
    /// jailed workers add
    #[arg(long, value_name = "DIR", requires = "function")]
    function_dir: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct BenchDensityArgs {
    /// The function's template directory [default: the cached python echo
    /// function, made on first use]
    #[arg(long, value_name = "DIR")]
    function: Option<PathBuf>,
    /// Warm clones to hold
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// The event each clone's one invocation sends
    #[arg(long, value_name = "JSON", default_value = "{}")]
    event: String,
    /// Hold the clones in this process instead of one jailed worker each
    #[arg(long)]
    in_process: bool,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

fn density(args: BenchDensityArgs) -> Result<ExitCode> {
    use ember::function::{Function, TemplateOptions};
    use ember::paths;

    if !(1..=1000).contains(&args.count) {
        anyhow::bail!("--count must be in 1..=1000 (the workers' uid range)");
    }
    serde_json::from_str::<serde_json::Value>(&args.event).context("--event is not JSON")?;
    let dir = match args.function {
        Some(dir) => dir,
        None => {
            let options = TemplateOptions::new(
                paths::default_kernel(),
                paths::default_initrd(),
                Some(paths::default_python_image()),
            );
            ember::ensure_cached_function(&ember::bench::function::echo_spec()?, &options, |dir| {
                eprintln!("ember: creating the echo function in {}...", dir.display())
            })?
        }
    };
    let function = Function::open(&dir)
        .with_context(|| format!("cannot open the function {}", dir.display()))?;
    let isolation = (!args.in_process).then(isolation).transpose()?;
    let report = ember::bench::density::run(
        "density",
        function,
        args.count,
        isolation,
        args.event.as_bytes(),
    )
    .context("density benchmark failed")?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(ExitCode::SUCCESS)
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
        function: args.function.map(|name| loadtest::FunctionLoad {
            name,
            event: args.event.into_bytes(),
        }),
        timeout_ms: 60_000,
        auth_token: args
            .auth_token_file
            .as_deref()
            .map(ember::server::guard::AuthToken::from_file)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    let report = loadtest::run(&config)?;
    let library = match (&args.function_dir, &config.function) {
        (Some(dir), Some(function)) => Some(loadtest::run_library(
            dir,
            &function.event,
            config.concurrency,
            config.duration,
            Duration::from_millis(config.timeout_ms),
        )?),
        _ => None,
    };
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        if let Some(library) = &library {
            json["library"] = serde_json::to_value(library)?;
        }
        println!("{json}");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", report.to_table());
    if let Some(library) = library {
        print!("{}", library.to_table());
        let (http, lib) = (report.latency_ms, library.latency_ms);
        println!(
            "HTTP + worker overhead, p50: {:.3} ms (HTTP client latency p50 {:.3} ms, n={}; \
             library p50 {:.3} ms, n={}; same concurrency {} and duration, this run)",
            http.p50 - lib.p50,
            http.p50,
            http.n,
            lib.p50,
            lib.n,
            report.concurrency
        );
    }
    Ok(ExitCode::SUCCESS)
}
