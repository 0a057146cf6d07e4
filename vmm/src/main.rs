//! The `ember` command line: parse, call the library, print.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

mod cli_function;
mod cli_image;
mod cli_limits;
use clap::{Args, Parser, Subcommand};

use ember::agent::OutputStream;
use ember::bench::{self, ms};
use ember::config::{ConsoleOutput, VmConfig};
use ember::sandbox::{ExitStatus, ReadyTimings};
use ember::snapshot::{self, RestoreOptions, Snapshot};
use ember::worker::{Isolation, WORKER_SUBCOMMAND};
use ember::{paths, Invocation, Machine, Outcome, Sandbox};

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "A minimal KVM VMM for snapshot-restored sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM, stream its console, exit when the guest powers off.
    Boot(BootArgs),
    /// Run one command in a fresh microVM and exit with its status.
    Run(RunArgs),
    /// Create snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Measure ember.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve invocations over HTTP from a pool of warm sandboxes.
    ///
    /// Without --auth-token-file the server listens only on loopback or a
    /// Unix socket; with it, every route but /v1/health requires
    /// `Authorization: Bearer <token>`. On a loopback address only requests
    /// whose Host is localhost, 127.0.0.1 or [::1] are answered (DNS
    /// rebinding), and JSON bodies need `Content-Type: application/json`.
    Serve(ServeArgs),
    /// Function templates: a runtime with a handler loaded, snapshotted
    /// waiting.
    #[command(subcommand)]
    Function(FunctionCommand),
    /// Invoke a function: restore a clone, deliver the event, print the
    /// result, destroy the clone.
    Invoke(cli_function::InvokeArgs),
    /// Root images for `--image` from container images.
    #[command(subcommand)]
    Image(cli_image::ImageCommand),
}

#[derive(Subcommand)]
enum FunctionCommand {
    /// Boot the runtime's image, start the runtime with the handler, run
    /// the warm-up event and snapshot it waiting into --out.
    Create(cli_function::FunctionCreateArgs),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Boot, wait for the agent (and an optional warm-up), save to DIR.
    Create(SnapshotCreateArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Cold boots: process start to agent ready.
    Boot(BenchBootArgs),
    /// Snapshot restores: restore, run `true`, tear down.
    Restore(BenchRestoreArgs),
    /// Load-test a local `ember serve`: invocations of `true` from C
    /// connections for S seconds.
    Http(BenchHttpArgs),
    /// Function invocations: restore to result on the hot path and the
    /// vsock path, next to a cold `python3 -c pass`.
    Function(cli_function::BenchFunctionArgs),
    /// An echo function's latency beside a neighbour clone that idles,
    /// hammers its disk, and hammers it under a rate limit.
    NoisyNeighbour(cli_limits::BenchNoisyArgs),
}

#[derive(Args, Clone)]
struct VmArgs {
    /// Guest kernel (ELF vmlinux or bzImage) [default: the one built by setup]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio) [default: the one built by setup]
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Number of vCPUs [default: 1, or the snapshot's]
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB [default: 128, or the snapshot's]
    #[arg(long)]
    mem_mib: Option<u32>,
    /// Appended to the guest kernel command line
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    cmdline_extra: String,
    /// The guest's vsock context ID (a snapshot keeps the one it was taken with)
    #[arg(long, default_value_t = ember::devices::virtio::vsock::DEFAULT_GUEST_CID)]
    vsock_cid: u64,
    /// Also expose vsock on this Unix socket, Firecracker style: host
    /// programs connect and send `CONNECT <port>`; guest connections to
    /// host port P go to `<PATH>_P`
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// A read-only root drive (raw file system image, a multiple of 512
    /// bytes): the guest's /dev/vda, which the agent mounts as its root.
    /// With --snapshot, a copy to use instead of the snapshot's own drive
    #[arg(long, value_name = "PATH")]
    root_drive: Option<PathBuf>,
    #[command(flatten)]
    limits: cli_limits::IoLimitArgs,
}

#[derive(Args)]
struct BootArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Write the guest console to this file instead of stdout
    #[arg(long)]
    console: Option<PathBuf>,
    /// Say what ember does: host kind, guest command line, timings
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Restore this snapshot instead of booting [default: a cached snapshot
    /// of the default kernel and initramfs, created on first use; a cold
    /// boot when --kernel or --initrd is given]
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline_extra"])]
    snapshot: Option<PathBuf>,
    /// Kill the command after this many milliseconds (exit status 124)
    #[arg(long, default_value_t = ember_protocol::protocol::DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Environment variable for the command (repeatable); the command
    /// gets no other environment
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Feed this file (or - for our stdin) to the command's stdin
    #[arg(long)]
    stdin_file: Option<PathBuf>,
    /// Cap on the command's stdout plus stderr, in bytes
    #[arg(long, default_value_t = ember_protocol::protocol::DEFAULT_MAX_OUTPUT_BYTES)]
    max_output_bytes: u64,
    /// Print one JSON object with the outcome instead of streaming output
    #[arg(long)]
    json: bool,
    /// Say where the time went
    #[arg(long, short)]
    verbose: bool,
    /// Run the VM in this process, as root, instead of a jailed worker
    /// process (namespaces, cgroups, an unprivileged uid, seccomp): only
    /// for trusted code. Needed for --kernel/--initrd, --vsock-uds and
    /// --root-drive
    #[arg(long)]
    in_process: bool,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
struct SnapshotCreateArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Shell command run once in the guest before the snapshot (must exit 0)
    #[arg(long, value_name = "CMD")]
    warmup: Option<String>,
    /// Directory to write `state` and `memory` into
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchBootArgs {
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
struct BenchRestoreArgs {
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
struct ServeArgs {
    /// Snapshot to restore [default: the cached default snapshot; with
    /// --functions, no snapshot is served unless given]
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Serve the functions in DIR (each subdirectory with a function.json,
    /// named after it) at POST /v1/functions/NAME/invocations; --max-live
    /// and --max-queue bound their clones too
    #[arg(long, value_name = "DIR")]
    functions: Option<PathBuf>,
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
    limits: cli_limits::IoLimitArgs,
}

#[derive(Args)]
struct BenchHttpArgs {
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

impl VmArgs {
    /// The arguments of a command that has none of its own: the default
    /// kernel, initramfs and shape.
    fn defaults() -> Self {
        VmArgs {
            kernel: None,
            initrd: None,
            vcpus: None,
            mem_mib: None,
            cmdline_extra: String::new(),
            vsock_cid: ember::devices::virtio::vsock::DEFAULT_GUEST_CID,
            vsock_uds: None,
            root_drive: None,
            limits: cli_limits::IoLimitArgs::default(),
        }
    }

    fn to_config(&self) -> Result<VmConfig> {
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

    fn cold_boot_requested(&self) -> bool {
        self.kernel.is_some() || self.initrd.is_some()
    }
}

fn boot(args: BootArgs) -> Result<ExitCode> {
    let mut config = args.vm.to_config()?;
    config.console = match args.console {
        Some(path) => ConsoleOutput::File(path),
        None => ConsoleOutput::Stdout,
    };
    // Only a terminal makes sense as the guest's keyboard.
    // SAFETY: isatty has no memory-safety preconditions.
    let stdin_is_tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    config.interactive = config.console == ConsoleOutput::Stdout && stdin_is_tty;
    let mut machine = Machine::boot(&config)?;
    log::info!("host: {}", machine.host());
    log::info!("guest command line: {}", machine.cmdline());
    if args.verbose {
        report_readiness(&machine);
    }
    let exit = machine.wait();
    if std::env::var_os(bench::TIMINGS_ENV).is_some() {
        let ready = machine.agent_ready().seen().map(|(at, _)| at);
        eprintln!(
            "{}",
            bench::timings_line(machine.times().first_run.get().copied(), ready)
        );
    }
    if let Some(setup) = machine.times().vmm_setup() {
        log::info!("VMM setup (request to first KVM_RUN): {:.2} ms", ms(setup));
    }
    if exit.is_clean() {
        log::info!("{exit}");
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("{exit}")
    }
}

/// Prints when the agent reports ready, from a watcher thread, so the line
/// shows while the guest keeps running.
fn report_readiness(machine: &Machine) {
    let watch = machine.agent_ready_watch();
    let start = machine.times().requested;
    std::thread::spawn(move || {
        if let Some((at, line)) = watch.wait(Duration::from_secs(24 * 3600)) {
            let after = at.saturating_duration_since(start);
            log::info!(
                "agent ready {:.0} ms after boot request ({line})",
                ms(after)
            );
        }
    });
}

/// Opens the snapshot `run` should restore: the one given, or the cached
/// default one (created on first use).
fn open_snapshot(explicit: Option<&Path>, vm: &VmArgs) -> Result<Snapshot> {
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

/// `--env K=V` flags as an environment; a later key replaces an earlier one.
fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--env takes KEY=VALUE, got {pair:?}");
        };
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }
    Ok(env)
}

fn invocation(args: &RunArgs) -> Result<Invocation> {
    let mut inv = Invocation::new(args.command.iter().cloned());
    inv.env = parse_env(&args.env)?;
    inv.timeout_ms = args.timeout_ms;
    inv.max_output_bytes = args.max_output_bytes;
    inv.stdin = match &args.stdin_file {
        None => Vec::new(),
        Some(path) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read stdin")?;
            buf
        }
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
    };
    inv.validate().map_err(anyhow::Error::msg)?;
    Ok(inv)
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let inv = invocation(&args)?;
    if !args.in_process {
        let in_process_only = if args.vm.cold_boot_requested() {
            Some("--kernel/--initrd (a cold boot)")
        } else if args.vm.vsock_uds.is_some() {
            Some("--vsock-uds")
        } else if args.snapshot.is_some() && args.vm.root_drive.is_some() {
            Some("--root-drive")
        } else {
            None
        };
        if let Some(what) = in_process_only {
            bail!("{what} runs the VM in this process: add --in-process (only for trusted code)");
        }
    }
    let mut sandbox = if args.vm.cold_boot_requested() {
        let mut config = args.vm.to_config()?;
        config.console = ConsoleOutput::Sink;
        Sandbox::boot(&config)?
    } else {
        let snapshot = open_snapshot(args.snapshot.as_deref(), &args.vm)?;
        let options = RestoreOptions {
            vsock_uds: args.vm.vsock_uds.clone(),
            // A cached snapshot was made with this drive already.
            root_drive: args.snapshot.as_ref().and(args.vm.root_drive.clone()),
            io_limits: args.vm.limits.to_limits(),
            isolation: (!args.in_process).then(isolation).transpose()?,
            ..RestoreOptions::default()
        };
        Sandbox::restore(&snapshot, &options)?
    };
    let ready = sandbox.ready_timings();
    let outcome = if args.json {
        sandbox.invoke(&inv)?
    } else {
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        sandbox.invoke_streaming(&inv, |stream, chunk| {
            // A closed stdout must not abort the sandbox; the outcome
            // still reports the exit.
            let _ = match stream {
                OutputStream::Stdout => out.write_all(chunk).and_then(|()| out.flush()),
                OutputStream::Stderr => err.write_all(chunk),
            };
        })?
    };
    if args.json {
        println!("{}", outcome_json(&outcome, &ready));
    }
    if args.verbose {
        eprintln!(
            "ember: start {:.1} ms, agent greeting {:.1} ms, ready {:.1} ms, invoke {:.1} ms (guest wall {} ms), teardown {:.1} ms",
            ms(ready.start),
            ms(ready.agent),
            ms(ready.ready),
            ms(outcome.timings.invoke),
            outcome.usage.wall_ms,
            ms(outcome.timings.teardown)
        );
    }
    Ok(ExitCode::from(outcome.shell_exit_code().clamp(0, 255) as u8))
}

/// The outcome as one JSON object (file contents in base64).
fn outcome_json(o: &Outcome, ready: &ReadyTimings) -> serde_json::Value {
    use base64::Engine;
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let (code, signal) = match o.status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    };
    serde_json::json!({
        "exit_code": code,
        "signal": signal,
        "timed_out": o.timed_out,
        "output_truncated": o.output_truncated,
        "stdout": String::from_utf8_lossy(&o.stdout),
        "stderr": String::from_utf8_lossy(&o.stderr),
        "usage": {
            "wall_ms": o.usage.wall_ms,
            "cpu_user_ms": o.usage.cpu_user_ms,
            "cpu_sys_ms": o.usage.cpu_sys_ms,
            "max_rss_kib": o.usage.max_rss_kib,
        },
        "files_out": o.files_out.iter().map(|f| serde_json::json!({
            "path": f.path,
            "data_b64": f.data.as_deref().map(b64),
            "error": f.error,
        })).collect::<Vec<_>>(),
        "host": {
            "start_ms": ms(ready.start),
            "agent_ms": ms(ready.agent),
            "invoke_ms": ms(o.timings.invoke),
            "teardown_ms": ms(o.timings.teardown),
        },
    })
}

fn snapshot_create(args: SnapshotCreateArgs) -> Result<ExitCode> {
    let mut config = args.vm.to_config()?;
    config.console = ConsoleOutput::Sink;
    let warmup = args
        .warmup
        .as_deref()
        .map(|cmd| Invocation::new(["sh", "-c", cmd]));
    eprintln!("ember: booting the template (about 30 s on emulated-KVM hosts)...");
    let info = snapshot::create(&config, warmup.as_ref(), &args.out)?;
    eprintln!(
        "ember: snapshot in {} (boot {:.1} s, save {:.0} ms, {} KiB of memory written)",
        info.dir.display(),
        info.boot.as_secs_f64(),
        ms(info.save),
        info.memory_written >> 10
    );
    Ok(ExitCode::SUCCESS)
}

fn bench_boot(args: BenchBootArgs) -> Result<ExitCode> {
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

fn bench_restore(args: BenchRestoreArgs) -> Result<ExitCode> {
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

fn serve(args: ServeArgs) -> Result<ExitCode> {
    use ember::server::{self, api::Limits, ServerConfig};
    server::init_logging();
    let vm = VmArgs::defaults();
    let functions = match &args.functions {
        Some(dir) => Some(std::sync::Arc::new(server::functions::FunctionSet::open(
            dir,
            server::functions::FunctionSetConfig {
                max_live: args.max_live,
                max_queue: args.max_queue,
                queue_timeout: ember::PoolConfig::default().queue_timeout,
                shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
                isolation: (!args.in_process).then(isolation).transpose()?,
            },
        )?)),
        None => None,
    };
    let services = server::Services {
        pool: serve_pool(&args, &vm)?,
        functions,
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

fn bench_http(args: BenchHttpArgs) -> Result<ExitCode> {
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

/// Isolation through this very binary's worker subcommand; the workers'
/// uid/gid range from `EMBER_WORKER_IDS` (`FIRST-LAST` or `FIRST+COUNT`),
/// if set.
fn isolation() -> Result<Isolation> {
    let exe = std::env::current_exe().context("cannot find the ember binary")?;
    let mut isolation = Isolation::new(exe);
    if let Some(ids) = std::env::var_os(WORKER_IDS_ENV) {
        let ids = ids.to_string_lossy();
        isolation.ids = ids
            .parse()
            .map_err(|e| anyhow::anyhow!("{WORKER_IDS_ENV}: {e}"))?;
    }
    Ok(isolation)
}

/// The environment variable that sets the jailed workers' uid/gid range.
const WORKER_IDS_ENV: &str = "EMBER_WORKER_IDS";

/// Logs to stderr as `ember: message`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            match record.level() {
                log::Level::Info => eprintln!("ember: {}", record.args()),
                level => eprintln!(
                    "ember: {}: {}",
                    level.as_str().to_lowercase(),
                    record.args()
                ),
            }
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    // A sandbox worker is this binary too, started by the library with a
    // fixed, hidden argument vector and nothing else.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(WORKER_SUBCOMMAND) {
        let _ = log::set_logger(&StderrLogger);
        log::set_max_level(log::LevelFilter::Warn);
        let code = ember::worker::worker_main(&args[2..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Command::Boot(args) => args.verbose,
        Command::Function(FunctionCommand::Create(args)) => args.verbose,
        Command::Invoke(args) => args.verbose,
        _ => false,
    };
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(match (&cli.command, verbose) {
        // `invoke --verbose` is about the invocation, not the VMM's insides.
        (Command::Invoke(_), true) => log::LevelFilter::Info,
        (_, true) => log::LevelFilter::Debug,
        (_, false) => log::LevelFilter::Warn,
    });
    let result = match cli.command {
        Command::Boot(args) => boot(args),
        Command::Run(args) => run(args),
        Command::Snapshot(SnapshotCommand::Create(args)) => snapshot_create(args),
        Command::Bench(BenchCommand::Boot(args)) => bench_boot(args),
        Command::Bench(BenchCommand::Restore(args)) => bench_restore(args),
        Command::Bench(BenchCommand::Http(args)) => bench_http(args),
        Command::Serve(args) => serve(args),
        Command::Function(FunctionCommand::Create(args)) => cli_function::function_create(args),
        Command::Invoke(args) => cli_function::invoke(args),
        Command::Bench(BenchCommand::Function(args)) => cli_function::bench_function(args),
        Command::Image(command) => cli_image::run(command),
        Command::Bench(BenchCommand::NoisyNeighbour(args)) => cli_limits::bench_noisy(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
