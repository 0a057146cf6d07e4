//! `ember boot`: a microVM with its console on the terminal, until the
//! guest powers off.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use ember::bench::{self, ms};
use ember::config::ConsoleOutput;
use ember::Machine;

use super::vm::VmArgs;

#[derive(Args)]
pub(super) struct BootArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Write the guest console to this file instead of stdout
    #[arg(long)]
    console: Option<PathBuf>,
    /// Say what ember does: host kind, guest command line, timings
    #[arg(long, short)]
    pub(super) verbose: bool,
}

pub(super) fn boot(args: BootArgs) -> Result<ExitCode> {
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
