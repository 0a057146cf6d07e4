//! The agent's life as PID 1: set up, report ready, then serve the host
//! (and signals, and orphans) until told to power off.

use crate::boot::reaper::{self, Event, Signals};
use crate::boot::{cmdline, init, power, rootfs, shell, uptime};
use crate::serve::server::{ServeOptions, Server};
use crate::testing::hostile_guest;
use crate::{console, sys, READY_CPUS_KEY, READY_LINE, READY_UPTIME_KEY};
use ember_protocol::AgentMode;

/// Runs the agent. As PID 1 it never returns.
///
/// Run as any other PID it refuses, prints why and returns a non-zero exit
/// status: the agent mounts over `/dev`, `/proc`, ..., sets the hostname and
/// finally `kill(-1, SIGKILL)`s and reboots, none of which may happen to the
/// host it was started on by mistake. (Inside a fresh PID, mount and UTS
/// namespace, as in `unshare -fpmu`, it is PID 1 and all of that stays in
/// the namespaces.) The exception are the test tools of `hostile_guest`
/// (`ember-agent vsock-junk ...`, `ember-agent protocol-junk`), which touch
/// nothing but a socket or stdout.
pub fn run() -> i32 {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        if let Some(status) = hostile_guest::run_tool(&args) {
            return status;
        }
        console::warn(&"not PID 1, refusing to run (the agent is the guest's /init)");
        return 2;
    }
    run_as_init()
}

fn run_as_init() -> ! {
    // First, so that a signal sent during setup waits for us.
    let signals = Signals::block();

    // Errors are reported only after setup, which makes sure the console
    // is open.
    for err in init::setup() {
        console::error(&err);
    }
    let signals = match signals {
        Ok(signals) => signals,
        Err(err) => {
            console::error(&err);
            fallback_reaper();
        }
    };

    let (mode, root) = match cmdline::read() {
        Ok(cmdline) => {
            for warning in &cmdline.warnings {
                console::warn(warning);
            }
            (cmdline.mode, cmdline.root)
        }
        Err(err) => {
            console::error(&err);
            (AgentMode::default(), None)
        }
    };

    // Before anything opens files or makes directories for invocations:
    // from here on they are the root drive's.
    if let Some(device) = rootfs::test_device().or(root) {
        match rootfs::switch_root(&device) {
            Ok(warnings) => {
                for warning in &warnings {
                    console::warn(warning);
                }
            }
            Err(err) => console::error(&err),
        }
    }

    // Listening before the ready line, so that a host that saw the line can
    // connect at once.
    let mut server = None;
    if mode == AgentMode::Wait {
        let (opts, warning) = ServeOptions::from_env();
        if let Some(warning) = warning {
            console::warn(&warning);
        }
        match Server::new(&signals, &opts) {
            Ok(s) => server = Some(s),
            // Still report ready and keep reaping: a guest that cannot serve
            // is worth debugging on its console.
            Err(err) => console::error(&err),
        }
    }

    let uptime_ms = uptime::read_uptime_ms()
        .map_err(|err| console::error(&err))
        .ok();
    console::raw(&ready_line(uptime_ms, sys::online_cpus()));

    let mut shell_pid = None;
    match mode {
        AgentMode::Wait => {
            if let Some(mut server) = server {
                match server.run() {
                    Ok(signo) => {
                        console::info(format_args!(
                            "{} received, powering off",
                            sys::signal_name(signo)
                        ));
                        power_off();
                    }
                    // Fall back to the signal loop below: reaping and
                    // power-off keep working.
                    Err(err) => console::error(&err),
                }
            }
        }
        AgentMode::PowerOff => power_off(),
        AgentMode::Scribble => {
            hostile_guest::scribble();
            power_off();
        }
        AgentMode::Shell => match shell::spawn() {
            Ok(pid) => shell_pid = Some(pid),
            Err(err) => {
                console::error(&err);
                power_off();
            }
        },
    }

    loop {
        match signals.wait() {
            Ok(Event::Child) => {
                let mut shell_done = false;
                let reaped = reaper::reap(|pid, status| {
                    if Some(pid) == shell_pid {
                        console::info(format_args!(
                            "{} exited ({})",
                            shell::SHELL,
                            sys::describe_wait_status(status)
                        ));
                        shell_done = true;
                    }
                });
                if let Err(err) = reaped {
                    console::error(&err);
                }
                if shell_done {
                    power_off();
                }
            }
            Ok(Event::PowerOff(signo)) => {
                console::info(format_args!(
                    "{} received, powering off",
                    sys::signal_name(signo)
                ));
                power_off();
            }
            // Not expected (sigwaitinfo only fails on bad arguments); keep
            // PID 1 alive and fall back to reaping without signals.
            Err(err) => {
                console::error(&err);
                fallback_reaper();
            }
        }
    }
}

/// The readiness line, as printed on the console.
pub(crate) fn ready_line(uptime_ms: Option<u64>, cpus: Option<u32>) -> String {
    let mut line = READY_LINE.to_owned();
    if let Some(ms) = uptime_ms {
        line.push_str(&format!(" {READY_UPTIME_KEY}={ms}"));
    }
    if let Some(cpus) = cpus {
        line.push_str(&format!(" {READY_CPUS_KEY}={cpus}"));
    }
    line
}

/// Powers off; if the reset fails, says so and falls back to reaping
/// forever, since PID 1 must not exit.
fn power_off() -> ! {
    let err = power::power_off();
    console::error(&err);
    fallback_reaper();
}

/// Last resort when signals cannot be used: reap children with a blocking
/// `waitpid`, and when there are none, sleep until a signal that is never
/// delivered (PID 1 ignores every signal it has no handler for).
fn fallback_reaper() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid place for the wait status.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 && sys::errno() == libc::ECHILD {
            // SAFETY: pause has no preconditions; it just blocks.
            unsafe { libc::pause() };
        }
    }
}
