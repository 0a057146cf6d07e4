//! The debug shell of `ember.agent=shell`.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use thiserror::Error;

/// The shell the agent runs on the console.
pub(crate) const SHELL: &str = "/bin/sh";

/// Starting the shell failed.
#[derive(Debug, Error)]
pub(crate) enum ShellError {
    #[error("start {SHELL}: {source}")]
    Spawn { source: io::Error },
}

/// Starts an interactive `/bin/sh` on the console (the agent's own stdio)
/// and returns its pid. The caller reaps it like any other child.
pub(crate) fn spawn() -> Result<libc::pid_t, ShellError> {
    let mut command = Command::new(SHELL);
    // The kernel gives init only HOME=/ and TERM=linux.
    command
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", "/root")
        .current_dir("/");
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two async-signal-safe system calls; it touches no locks or
    // allocations of the parent.
    unsafe {
        command.pre_exec(|| {
            // A session of its own with the console as controlling tty gives
            // the shell job control and lets ^C reach its foreground job
            // instead of nothing (or PID 1).
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Best effort: without it the shell still works, minus job
            // control, so the error is ignored.
            libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 1);
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|source| ShellError::Spawn { source })?;
    // Dropping `child` neither waits nor kills: the agent's reaper collects it.
    libc::pid_t::try_from(child.id()).map_err(|_| ShellError::Spawn {
        source: io::Error::other("pid out of range"),
    })
}
