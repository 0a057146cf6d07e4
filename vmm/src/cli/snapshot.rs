//! `ember snapshot create`: boot, wait for the agent, save.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use ember::bench::ms;
use ember::config::ConsoleOutput;
use ember::snapshot;
use ember::Invocation;

use super::vm::VmArgs;

#[derive(Subcommand)]
pub(super) enum SnapshotCommand {
    /// Boot, wait for the agent (and an optional warm-up), save to DIR.
    Create(SnapshotCreateArgs),
}

/// Runs a `snapshot` subcommand.
pub(super) fn run(command: SnapshotCommand) -> Result<ExitCode> {
    match command {
        SnapshotCommand::Create(args) => create(args),
    }
}

#[derive(Args)]
pub(super) struct SnapshotCreateArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Shell command run once in the guest before the snapshot (must exit 0)
    #[arg(long, value_name = "CMD")]
    warmup: Option<String>,
    /// Directory to write `state` and `memory` into
    #[arg(long)]
    out: PathBuf,
}

fn create(args: SnapshotCreateArgs) -> Result<ExitCode> {
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
