//! `ember serve`: the HTTP API over a pool of warm sandboxes and, with
//! `--functions`, a directory of functions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use ember::snapshot::RestoreOptions;

use super::isolation::isolation;
use super::limits::IoLimitArgs;
use super::vm::{open_snapshot, VmArgs};

#[derive(Args)]
pub(super) struct ServeArgs {
    /// Snapshot to restore [default: the cached default snapshot; with
    /// --functions, no snapshot is served unless given]
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Serve the functions in DIR (each subdirectory with a function.json,
    /// named after it) at POST /v1/functions/NAME/invocations; --max-live
    /// and --max-queue bound their clones too
    #[arg(long, value_name = "DIR")]
    functions: Option<PathBuf>,
    /// Where functions deployed over the API (PUT /v1/functions/NAME)
    /// are kept: their records and templates (created, mode 0700)
    /// [default: /var/lib/ember as root, else ~/.local/share/ember]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Most function builds (deployments) running at once; more wait, up
    /// to --max-waiting-builds, then get 429
    #[arg(long, default_value_t = 1)]
    max_builds: usize,
    /// Most deployments waiting for a build
    #[arg(long, default_value_t = 4)]
    max_waiting_builds: usize,
    /// Largest bundle a deployment may upload, in bytes
    #[arg(long, default_value_t = ember::server::deploy::DEFAULT_MAX_BUNDLE_BYTES)]
    max_bundle_bytes: usize,
    /// Most functions deployed over the API at once (each keeps its
    /// templates on disk); deploying a new name beyond gets 409
    #[arg(long, default_value_t = ember::server::deploy::DEFAULT_MAX_FUNCTIONS)]
    max_deployed_functions: usize,
    /// ADDR:PORT or unix:PATH
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: ember::server::ListenAddr,
    /// Sandboxes kept restored and ready
    #[arg(long, default_value_t = 2)]
    warm: usize,
    /// Most sandboxes alive at once (warm + restoring + running)
    #[arg(long, default_value_t = 8)]
    max_live: usize,
    /// Most requests waiting for a sandbox; more get 429
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest timeout_ms a request may ask for
    #[arg(long, default_value_t = 300_000)]
    max_timeout_ms: u64,
    /// Largest max_output_bytes a request may ask for
    #[arg(long, default_value_t = ember_protocol::protocol::DEFAULT_MAX_OUTPUT_BYTES)]
    max_output_bytes: u64,
    /// Most invocations of any one function running at once (default:
    /// --max-live); below --max-live, a busy function leaves slots for the
    /// others
    #[arg(long, value_name = "N")]
    function_max_live: Option<usize>,
    /// Most requests for any one function waiting (default: --max-queue)
    #[arg(long, value_name = "N")]
    function_max_queue: Option<usize>,
    /// Serve each function invocation in a fresh clone destroyed after it,
    /// instead of a recycled clone reset in place between invocations
    #[arg(long)]
    no_recycle: bool,
    /// Most recycled function clones kept between invocations, over all
    /// functions (the least recently used goes first)
    #[arg(long, default_value_t = 8)]
    max_idle: usize,
    /// How long a recycled function clone may wait unused before it is
    /// destroyed
    #[arg(long, default_value_t = 60)]
    idle_timeout_s: u64,
    /// Idle recycled clones kept ready for each function: made at start
    /// and after invocations take them, never expired (within --max-idle
    /// in all and --max-memory-mib)
    #[arg(long, value_name = "N", default_value_t = 0)]
    function_min_warm: usize,
    /// Most host memory the function clones (running and idle) may be
    /// charged, each its worker's memory limit (guest memory + 64 MiB);
    /// over it idle clones go first, then requests get 429 [default: no
    /// cap]
    #[arg(long, value_name = "MIB")]
    max_memory_mib: Option<u64>,
    /// On SIGTERM/SIGINT, how long running invocations may go on
    #[arg(long, default_value_t = 30)]
    shutdown_grace_s: u64,
    /// Run sandboxes in this process instead of one jailed worker process
    /// each (only for trusted code)
    #[arg(long)]
    in_process: bool,
    /// Require `Authorization: Bearer <token>` on every route but
    /// /v1/health; the token is FILE's content, trimmed (FILE must not be
    /// world-readable). Required to listen on a non-loopback address
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// Most connections open at once; more are closed as they come
    #[arg(long, default_value_t = ember::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// I/O limits of each sandbox of the pool
    #[command(flatten)]
    limits: IoLimitArgs,
}

pub(super) fn serve(args: ServeArgs) -> Result<ExitCode> {
    use ember::server::{self, api::Limits, ServerConfig};
    server::init_logging();
    let vm = VmArgs::defaults();
    let config = server::functions::FunctionSetConfig {
        max_live: args.max_live,
        max_queue: args.max_queue,
        queue_timeout: ember::PoolConfig::default().queue_timeout,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        max_live_per_function: args.function_max_live,
        max_queue_per_function: args.function_max_queue,
        recycle: !args.no_recycle,
        max_idle: args.max_idle,
        idle_timeout: Duration::from_secs(args.idle_timeout_s),
        min_warm_per_function: args.function_min_warm,
        max_memory_bytes: args.max_memory_mib.map(|mib| mib.saturating_mul(1 << 20)),
        isolation: (!args.in_process).then(isolation).transpose()?,
    };
    // Without --functions the set starts empty: deployments fill it.
    let functions = std::sync::Arc::new(match &args.functions {
        Some(dir) => server::functions::FunctionSet::open(dir, config)?,
        None => server::functions::FunctionSet::new(Vec::new(), config)?,
    });
    let deploy = {
        let data_dir = args
            .data_dir
            .clone()
            .unwrap_or_else(server::deploy::default_data_dir);
        let mut deploy = server::deploy::DeployConfig::new(
            data_dir,
            (!args.in_process).then(isolation).transpose()?,
        );
        deploy.max_builds = args.max_builds;
        deploy.max_waiting_builds = args.max_waiting_builds;
        deploy.max_bundle_bytes = args.max_bundle_bytes;
        deploy.max_functions = args.max_deployed_functions;
        deploy
    };
    let services = server::Services {
        pool: serve_pool(&args, &vm)?,
        functions: Some(functions),
        deploy: Some(deploy),
    };
    let limits = Limits {
        max_timeout_ms: args.max_timeout_ms,
        max_output_bytes: args.max_output_bytes,
        ..Limits::default()
    };
    let auth_token = args
        .auth_token_file
        .as_deref()
        .map(server::guard::AuthToken::from_file)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let config = ServerConfig {
        limits,
        auth_token,
        max_connections: args.max_connections,
    };
    server::run(&args.listen, services, config)?;
    Ok(ExitCode::SUCCESS)
}

/// The pool `ember serve` serves `/v1/invocations` from, if any.
fn serve_pool(args: &ServeArgs, vm: &VmArgs) -> Result<Option<std::sync::Arc<ember::Pool>>> {
    if args.functions.is_some() && args.snapshot.is_none() {
        return Ok(None);
    }
    let snapshot = std::sync::Arc::new(open_snapshot(args.snapshot.as_deref(), vm)?);
    let config = ember::PoolConfig {
        warm: args.warm,
        max_live: args.max_live,
        max_queue: args.max_queue,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        restore_options: RestoreOptions {
            isolation: (!args.in_process).then(isolation).transpose()?,
            io_limits: args.limits.to_limits(),
            ..RestoreOptions::default()
        },
        ..ember::PoolConfig::default()
    };
    Ok(Some(std::sync::Arc::new(ember::Pool::new(
        snapshot, config,
    )?)))
}
