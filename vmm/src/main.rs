//! The `ember` binary: a sandbox worker when the library starts it as one,
//! else the command line ([`cli`]).

mod cli;

use std::process::ExitCode;

use clap::Parser;

use ember::worker::WORKER_SUBCOMMAND;

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
    let cli = cli::Cli::parse();
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(cli.log_level());
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
