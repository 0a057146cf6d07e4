//! Being PID 1: the guest's early setup (file systems, console, hostname),
//! the switch to the root drive, the agent's kernel command line, signals
//! and orphan reaping, the debug shell, and powering off.

pub mod cmdline;
pub mod init;
pub mod power;
pub mod reaper;
pub mod rootfs;
pub mod shell;
pub mod uptime;
