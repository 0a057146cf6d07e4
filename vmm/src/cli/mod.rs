//! The `ember` command line: the commands as clap parses them, and which
//! module runs each (every one parses its arguments, calls the library
//! and prints).

mod bench;
mod boot;
mod function;
mod image;
mod isolation;
mod limits;
mod run;
mod serve;
mod snapshot;
mod vm;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

// No doc comment: clap would print it as the long help.
#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "A minimal KVM VMM for snapshot-restored sandboxes"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM, stream its console, exit when the guest powers off.
    Boot(boot::BootArgs),
    /// Run one command in a fresh microVM and exit with its status.
    Run(run::RunArgs),
    /// Create snapshots.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Measure ember.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve invocations over HTTP from a pool of warm sandboxes.
    ///
    /// Without --auth-token-file the server listens only on loopback or a
    /// Unix socket; with it, every route but /v1/health requires
    /// `Authorization: Bearer <token>`. On a loopback address only requests
    /// whose Host is localhost, 127.0.0.1 or [::1] are answered (DNS
    /// rebinding), and JSON bodies need `Content-Type: application/json`.
    Serve(serve::ServeArgs),
    /// Function templates: a runtime with a handler loaded, snapshotted
    /// waiting.
    #[command(subcommand)]
    Function(function::FunctionCommand),
    /// Invoke a function: restore a clone, deliver the event, print the
    /// result, destroy the clone.
    Invoke(function::InvokeArgs),
    /// Root images for `--image` from container images.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

impl Cli {
    /// How much of the VMM's log the command shows: its warnings, or with
    /// `--verbose` everything down to debug (`invoke --verbose` is about
    /// the invocation, not the VMM's insides: info).
    pub fn log_level(&self) -> log::LevelFilter {
        let verbose = match &self.command {
            Command::Boot(args) => args.verbose,
            Command::Function(function::FunctionCommand::Create(args)) => args.verbose,
            Command::Invoke(args) => args.verbose,
            _ => false,
        };
        match (&self.command, verbose) {
            (Command::Invoke(_), true) => log::LevelFilter::Info,
            (_, true) => log::LevelFilter::Debug,
            (_, false) => log::LevelFilter::Warn,
        }
    }

    /// Runs the command; its exit code, or why it failed.
    pub fn run(self) -> Result<ExitCode> {
        match self.command {
            Command::Boot(args) => boot::boot(args),
            Command::Run(args) => run::run(args),
            Command::Snapshot(command) => snapshot::run(command),
            Command::Bench(command) => bench::run(command),
            Command::Serve(args) => serve::serve(args),
            Command::Function(function::FunctionCommand::Create(args)) => {
                function::function_create(args)
            }
            Command::Invoke(args) => function::invoke(args),
            Command::Image(command) => image::run(command),
        }
    }
}
