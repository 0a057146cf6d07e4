//! `ember function create`, `ember invoke` and `ember bench function`.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use ember::bench::function::{self as bench, BenchPath};
use ember::function::{
    self, Function, FunctionInvokeOptions, FunctionOutcome, FunctionSpec, HandlerResult,
    RecycleOptions, RecycledFunction, Runtime, TemplateOptions,
};
use ember::paths;
use ember::worker::recycled::JailedRecycledFunction;

use super::isolation::isolation;
use super::limits::IoLimitArgs;
use super::run::parse_env;

#[derive(Subcommand)]
pub enum FunctionCommand {
    /// Boot the runtime's image, start the runtime with the handler, run
    /// the warm-up event and snapshot it waiting into --out.
    Create(FunctionCreateArgs),
}

#[derive(Args, Clone)]
pub struct TemplateVmArgs {
    /// Guest kernel [default: the one built by setup]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The agent's initramfs [default: the one built by setup]
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Root filesystem image for the runtime [default for python3: the
    /// image built by rootfs/build-python-image.sh; exec: none]
    #[arg(long)]
    image: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 256)]
    mem_mib: u32,
}

#[derive(Args)]
pub struct FunctionCreateArgs {
    /// Print the guest console and the runtime's start-up output
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    vm: TemplateVmArgs,
    /// python3 or exec
    #[arg(long, default_value = "python3")]
    runtime: String,
    /// python3: FILE.py:NAME, or with --code MODULE:NAME (a dotted module
    /// in the bundle, e.g. app.main:handler); exec: the executable (it
    /// speaks the runtime pipe protocol of guest-agent/runtimes/README.md)
    #[arg(long)]
    handler: String,
    /// python3: the function's code bundle, a directory or a .zip; its
    /// requirements.txt is installed with pip (for the guest's CPython
    /// 3.11), and all of it is on a read-only drive at /var/task
    #[arg(long, value_name = "DIR|BUNDLE.zip")]
    code: Option<PathBuf>,
    /// An event run once before the snapshot, so lazily initialised state
    /// is in it (must succeed)
    #[arg(long, value_name = "JSON")]
    warmup_event: Option<String>,
    /// Environment variable for the runtime (repeatable)
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// python3: MiB of heap the runtime allocates, touches and frees at
    /// template time, so a handler's allocations up to about that size
    /// fault no fresh pages in a clone (each MiB is 256 guest page faults
    /// at create time: ≈ 0.7-2.6 s per MiB on PVM hosts) [default: 16]
    #[arg(long, value_name = "MIB")]
    arena_mib: Option<u32>,
    /// Deliver every event over vsock, never through guest memory
    #[arg(long)]
    no_hot_path: bool,
    /// Boot the template and run the handler's import and warm-up in this
    /// process, as root, instead of a jailed worker process: only for
    /// trusted code
    #[arg(long)]
    in_process: bool,
    /// Boot the image for this function instead of loading the handler
    /// into a clone of the cached python3 base snapshot (the image booted
    /// and the runtime started once, waiting for its code)
    #[arg(long)]
    no_base: bool,
    /// The function directory to write
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct InvokeArgs {
    /// The function directory (from `ember function create`)
    #[arg(long)]
    function: PathBuf,
    /// The event, JSON text
    #[arg(long, conflicts_with = "event_file", value_name = "JSON")]
    event: Option<String>,
    /// Read the event from this file (- for stdin)
    #[arg(long, value_name = "FILE", conflicts_with = "events")]
    event_file: Option<PathBuf>,
    /// Run the event this many times through one recycled microVM (reset
    /// in place between invocations); one result per line
    #[arg(long, value_name = "N", conflicts_with = "events")]
    repeat: Option<u64>,
    /// One invocation per line of this JSON Lines file (- for stdin),
    /// through one recycled microVM; one result per line, in order
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "event")]
    events: Option<PathBuf>,
    /// Destroy the clone after this many milliseconds (exit status 124)
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
    /// Cap on the handler's stdout plus stderr, in bytes
    #[arg(long, default_value_t = 1 << 20)]
    max_output_bytes: u64,
    /// Use the vsock path even when the event fits guest memory
    #[arg(long)]
    vsock: bool,
    /// Write the clone's console to this file (needs --in-process)
    #[arg(long, requires = "in_process")]
    console: Option<PathBuf>,
    /// Run the clone in this process, as root, instead of its own jailed
    /// worker process (namespaces, cgroups, an unprivileged uid, seccomp):
    /// only for trusted code
    #[arg(long)]
    in_process: bool,
    /// Deprecated: jailed is the default now (kept as a no-op)
    #[arg(long, hide = true, conflicts_with = "in_process")]
    isolate: bool,
    /// Print one JSON object with the outcome
    #[arg(long)]
    json: bool,
    /// Write the handler's output to stderr as it prints it (line by line
    /// on the hot path), not when it returns
    #[arg(long, conflicts_with = "json")]
    stream: bool,
    /// Say which path the event took and where the time went
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    limits: IoLimitArgs,
}

#[derive(Args)]
pub struct BenchFunctionArgs {
    /// The function to invoke [default: a cached template of the built-in
    /// echo handler on the python3 image]
    #[arg(long)]
    function: Option<PathBuf>,
    /// Invocations on each hot path (fresh, prepared, recycled)
    #[arg(long, default_value_t = 30)]
    iterations: usize,
    /// Invocations in flight at once
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// vsock-path invocations (each costs seconds of emulated guest work
    /// on PVM hosts)
    #[arg(long, default_value_t = 3)]
    vsock_iterations: usize,
    /// Skip the cold `python3 -c pass` baseline
    #[arg(long)]
    no_cold: bool,
    /// Also run the handler this many times in a new `python3 -c` in a
    /// fresh clone (import and one call: what an invocation costs without
    /// a template)
    #[arg(long, value_name = "N", default_value_t = 0)]
    cold_handler: usize,
    /// The paths to measure, comma-separated: fresh, prepared, recycled,
    /// recycled_stream (recycled, the output streamed), vsock [default: all]
    #[arg(long, value_name = "LIST")]
    paths: Option<String>,
    /// The event every invocation gets, JSON text [default: a small object]
    #[arg(long, value_name = "JSON", conflicts_with = "event_file")]
    event: Option<String>,
    /// Read the event from this file
    #[arg(long, value_name = "FILE")]
    event_file: Option<PathBuf>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

impl TemplateVmArgs {
    fn options(&self, runtime: &str) -> Result<TemplateOptions> {
        let kernel = self.kernel.clone().unwrap_or_else(paths::default_kernel);
        let initrd = self.initrd.clone().unwrap_or_else(paths::default_initrd);
        for (path, what, script) in [
            (&kernel, "kernel", "kernel-config/build.sh"),
            (&initrd, "initramfs", "rootfs/build-initramfs.sh"),
        ] {
            if !path.exists() {
                bail!("no {what} at {}: run {script}", path.display());
            }
        }
        let image = match (&self.image, runtime) {
            (Some(image), _) => Some(image.clone()),
            (None, "python3") => {
                let image = paths::default_python_image();
                if !image.exists() {
                    bail!(
                        "no python3 image at {}: run rootfs/build-python-image.sh (or pass --image)",
                        image.display()
                    );
                }
                Some(image)
            }
            (None, _) => None,
        };
        let mut options = TemplateOptions::new(kernel, initrd, image);
        options.mem_mib = self.mem_mib;
        Ok(options)
    }
}

pub fn function_create(args: FunctionCreateArgs) -> Result<ExitCode> {
    let runtime = match args.runtime.as_str() {
        "python3" => {
            let Some((file, name)) = args.handler.rsplit_once(':') else {
                bail!("--handler for python3 is FILE.py:NAME, or MODULE:NAME with --code");
            };
            match &args.code {
                Some(code) => Runtime::Python3Bundle {
                    code: code.clone(),
                    module: file.into(),
                    name: name.into(),
                },
                None => Runtime::Python3 {
                    file: file.into(),
                    name: name.into(),
                },
            }
        }
        _ if args.code.is_some() => bail!("--code is for the python3 runtime"),
        "exec" => Runtime::Exec {
            program: args.handler.clone().into(),
            args: Vec::new(),
        },
        other => bail!("unknown runtime {other:?} (python3 or exec)"),
    };
    let mut options = args.vm.options(&args.runtime)?;
    if args.verbose {
        options.console = ember::ConsoleOutput::Stdout;
    }
    options.isolation = (!args.in_process).then(isolation).transpose()?;
    let mut env = parse_env(&args.env)?;
    if let Some(mib) = args.arena_mib {
        if args.runtime != "python3" {
            bail!("--arena-mib is for the python3 runtime");
        }
        env.push((function::ARENA_MIB_ENV.to_owned(), mib.to_string()));
    }
    let spec = FunctionSpec {
        runtime,
        warmup_event: args.warmup_event.map(String::into_bytes),
        env,
        hot_path: !args.no_hot_path,
    };
    options.no_base = args.no_base;
    let where_ = if args.in_process {
        "in this process"
    } else {
        "in a jailed worker"
    };
    if !options.no_base && function::base::applies(&spec, &options) {
        let base = function::base::cached_base_dir(&spec, &options)?;
        if !base.join(function::base::BASE_FILE).exists() {
            eprintln!(
                "ember: making the python3 base snapshot {} first (a boot and the runtime's start, \
                 about a minute on emulated-KVM hosts; once per kernel, initramfs, image and memory size)...",
                base.display()
            );
        }
        eprintln!("ember: loading the handler into a clone of the python3 base {where_}...");
    } else {
        eprintln!(
            "ember: booting {} and starting the runtime {where_} (about a minute on emulated-KVM hosts)...",
            args.vm
                .image
                .as_deref()
                .map_or_else(|| "the guest".to_string(), |p| p.display().to_string()),
        );
    }
    let info = ember::create_function(&spec, &options, &args.out)
        .with_context(|| format!("cannot create the function in {}", args.out.display()))?;
    eprintln!(
        "ember: function ready in {}: {} {:.1} s, runtime start {:.1} s, warm-up {:.1} s, save {:.0} ms, calibration {:.0} ms ({} pages of working set); {}{}",
        info.dir.display(),
        if info.base.is_some() {
            "base restore"
        } else {
            "boot"
        },
        info.boot.as_secs_f64(),
        info.startup.as_secs_f64(),
        info.warmup.as_secs_f64(),
        ms(info.save),
        ms(info.calibration),
        info.working_set_pages,
        if info.hot_path {
            "hot path"
        } else {
            "vsock path only"
        },
        info.hot_path_error
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn invoke(args: InvokeArgs) -> Result<ExitCode> {
    if args.repeat.is_some() || args.events.is_some() {
        return invoke_recycled(args);
    }
    let event = match (&args.event, &args.event_file) {
        (Some(event), _) => event.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut event = Vec::new();
            std::io::stdin()
                .read_to_end(&mut event)
                .context("cannot read the event from stdin")?;
            event
        }
        (None, Some(path)) => std::fs::read(path)
            .with_context(|| format!("cannot read the event from {}", path.display()))?,
        (None, None) => b"{}".to_vec(),
    };
    let function = Function::open(&args.function)
        .with_context(|| format!("cannot open the function {}", args.function.display()))?;
    let options = FunctionInvokeOptions {
        timeout: Duration::from_millis(args.timeout_ms),
        max_output_bytes: args.max_output_bytes,
        force_vsock: args.vsock,
        console: args
            .console
            .clone()
            .map_or(ember::ConsoleOutput::Sink, ember::ConsoleOutput::File),
        isolation: (!args.in_process).then(isolation).transpose()?,
        io_limits: args.limits.to_limits(),
        output: args.stream.then(|| {
            function::OutputSink::new(|_, bytes| {
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(bytes).and_then(|()| stderr.flush());
            })
        }),
        ..FunctionInvokeOptions::default()
    };
    let outcome = function.invoke(&event, &options)?;
    report(&outcome, &args)?;
    Ok(exit_code(&outcome.result))
}

/// `--repeat` / `--events`: invocations one after another through one
/// recycled clone (a new one only if a reset fails).
fn invoke_recycled(args: InvokeArgs) -> Result<ExitCode> {
    let events: Box<dyn Iterator<Item = Result<Vec<u8>>>> = match (&args.events, args.repeat) {
        (Some(path), _) => {
            let reader: Box<dyn std::io::BufRead> = if path.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?,
                ))
            };
            Box::new(
                reader
                    .lines()
                    .map(|line| line.map(String::into_bytes).map_err(anyhow::Error::from))
                    .filter(|line| {
                        !line
                            .as_ref()
                            .is_ok_and(|l| l.iter().all(u8::is_ascii_whitespace))
                    }),
            )
        }
        (None, Some(n)) => {
            let event = args
                .event
                .clone()
                .unwrap_or_else(|| "{}".into())
                .into_bytes();
            Box::new((0..n).map(move |_| Ok(event.clone())))
        }
        (None, None) => bail!("--repeat or --events is needed"),
    };
    let function = std::sync::Arc::new(
        Function::open(&args.function)
            .with_context(|| format!("cannot open the function {}", args.function.display()))?,
    );
    let recycle = RecycleOptions {
        console: args
            .console
            .clone()
            .map_or(ember::ConsoleOutput::Sink, ember::ConsoleOutput::File),
        io_limits: args.limits.to_limits(),
        ..RecycleOptions::default()
    };
    let options = FunctionInvokeOptions {
        timeout: Duration::from_millis(args.timeout_ms),
        max_output_bytes: args.max_output_bytes,
        force_vsock: args.vsock,
        ..FunctionInvokeOptions::in_process()
    };
    let isolation = (!args.in_process).then(isolation).transpose()?;
    let new_clone = || Recycled::new(&function, &recycle, isolation.as_ref());
    let mut clone = new_clone()?;
    let mut code = ExitCode::SUCCESS;
    for (line, event) in events.enumerate() {
        let event = event.with_context(|| format!("cannot read event {}", line + 1))?;
        if !clone.is_usable() {
            clone = new_clone()?;
        }
        let outcome = clone.invoke(&event, &options)?;
        report(&outcome, &args)?;
        if !matches!(
            outcome.result,
            HandlerResult::Json { .. } | HandlerResult::Bytes { .. }
        ) {
            code = exit_code(&outcome.result);
        }
    }
    Ok(code)
}

/// A recycled clone: in one jailed worker that serves every event (the
/// default), or in this process.
enum Recycled {
    InProcess(Box<RecycledFunction>),
    Jailed(JailedRecycledFunction),
}

impl Recycled {
    fn new(
        function: &std::sync::Arc<Function>,
        options: &RecycleOptions,
        isolation: Option<&ember::worker::Isolation>,
    ) -> Result<Self, function::FunctionError> {
        Ok(match isolation {
            Some(isolation) => Recycled::Jailed(JailedRecycledFunction::new(
                std::sync::Arc::clone(function),
                options,
                isolation,
            )?),
            None => Recycled::InProcess(Box::new(function.recycled(options)?)),
        })
    }

    fn is_usable(&self) -> bool {
        match self {
            Recycled::InProcess(clone) => clone.is_usable(),
            Recycled::Jailed(clone) => clone.is_usable(),
        }
    }

    fn invoke(
        &mut self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, function::FunctionError> {
        match self {
            Recycled::InProcess(clone) => clone.invoke(event, options),
            Recycled::Jailed(clone) => clone.invoke(event, options),
        }
    }
}

/// Prints one outcome: a JSON object with `--json`, else the result on
/// stdout (the handler's output and errors on stderr).
fn report(outcome: &FunctionOutcome, args: &InvokeArgs) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(outcome)?);
    } else {
        if !args.stream {
            std::io::stderr().write_all(&outcome.stdout)?;
            std::io::stderr().write_all(&outcome.stderr)?;
        }
        let mut stdout = std::io::stdout();
        match &outcome.result {
            HandlerResult::Json { value } => writeln!(stdout, "{value}")?,
            HandlerResult::Bytes { bytes } => {
                stdout.write_all(bytes)?;
                if args.repeat.is_some() || args.events.is_some() {
                    writeln!(stdout)?;
                }
            }
            HandlerResult::Error {
                error_type,
                message,
                traceback,
            } => eprintln!("{traceback}{error_type}: {message}"),
            HandlerResult::TimedOut => eprintln!("ember: the handler timed out"),
            HandlerResult::RuntimeExited { status } => {
                eprintln!("ember: the runtime ended without an answer ({status})")
            }
        }
        stdout.flush()?;
    }
    if args.verbose {
        let t = &outcome.timings;
        let teardown = match &outcome.recycle {
            Some(r) => format!(
                "reset {:.2}: {} pages{}{}",
                ms(t.teardown),
                r.reset.pages,
                if r.reset.kernel_ran {
                    ", guest kernel ran"
                } else {
                    ""
                },
                if r.reused { "" } else { ", clone destroyed" }
            ),
            None => format!("teardown {:.2}", ms(t.teardown)),
        };
        let teardown = match t.isolation {
            Some(worker) => format!("{teardown}; worker spawn + jail + IPC {:.2}", ms(worker)),
            None => teardown,
        };
        eprintln!(
            "ember: {:?} path: {:.2} ms (restore {:.2}, run {:.2}{}, {teardown})",
            outcome.path,
            ms(t.total),
            ms(t.restore),
            ms(t.run),
            t.handler
                .map(|h| format!(" of which handler {:.3}", ms(h)))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

fn exit_code(result: &HandlerResult) -> ExitCode {
    match result {
        HandlerResult::Json { .. } | HandlerResult::Bytes { .. } => ExitCode::SUCCESS,
        HandlerResult::TimedOut => ExitCode::from(124),
        _ => ExitCode::FAILURE,
    }
}

pub fn bench_function(args: BenchFunctionArgs) -> Result<ExitCode> {
    let dir = match args.function {
        Some(dir) => dir,
        None => {
            let options = TemplateVmArgs {
                kernel: None,
                initrd: None,
                image: None,
                mem_mib: 256,
            }
            .options("python3")?;
            let spec = bench::echo_spec()?;
            ember::ensure_cached_function(&spec, &options, |dir| {
                eprintln!(
                    "ember: creating the echo function in {} (one cold boot and a python start, a minute or two on emulated-KVM hosts)...",
                    dir.display()
                )
            })?
        }
    };
    let function = std::sync::Arc::new(
        Function::open(&dir)
            .with_context(|| format!("cannot open the function {}", dir.display()))?,
    );
    let paths = match &args.paths {
        None => BenchPath::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|name| {
                BenchPath::parse(name.trim()).with_context(|| {
                    format!("unknown path {name:?} (fresh, prepared, recycled, vsock)")
                })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let event = match (&args.event, &args.event_file) {
        (Some(event), _) => event.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path)
            .with_context(|| format!("cannot read the event from {}", path.display()))?,
        (None, None) => bench::DEFAULT_EVENT.to_vec(),
    };
    let config = bench::FunctionBenchConfig {
        iterations: args.iterations,
        concurrency: args.concurrency.max(1),
        vsock_iterations: args.vsock_iterations,
        cold: !args.no_cold,
        cold_handler_iterations: args.cold_handler,
        paths,
        event,
    };
    let report = bench::run(&function, &config)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

use ember::bench::ms;
