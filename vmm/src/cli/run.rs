//! `ember run`: one command in a fresh microVM (restored, or booted cold),
//! its output streamed or printed as JSON, its exit status ours.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use ember::agent::OutputStream;
use ember::bench::ms;
use ember::config::ConsoleOutput;
use ember::sandbox::{ExitStatus, ReadyTimings};
use ember::snapshot::RestoreOptions;
use ember::{Invocation, Outcome, Sandbox};

use super::isolation::isolation;
use super::vm::{open_snapshot, VmArgs};

#[derive(Args)]
pub(super) struct RunArgs {
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

/// `--env K=V` flags as an environment; a later key replaces an earlier one.
pub(super) fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
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

pub(super) fn run(args: RunArgs) -> Result<ExitCode> {
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
