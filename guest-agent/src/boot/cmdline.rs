//! Reading the agent's settings from `/proc/cmdline` (the keys and their
//! parsing are the host's too: [`ember_protocol::cmdline`]).

use std::io;

use thiserror::Error;

use crate::cmdline::{parse, Cmdline};
use crate::sys;

/// Where `/proc/cmdline` is read from.
const PROC_CMDLINE: &std::ffi::CStr = c"/proc/cmdline";

/// x86's COMMAND_LINE_SIZE is 2048; leave room for other architectures.
const CMDLINE_MAX: usize = 4096;

/// Reading the command line failed.
#[derive(Debug, Error)]
pub enum CmdlineError {
    /// `/proc/cmdline` could not be read.
    #[error("read /proc/cmdline: {source}")]
    Read {
        /// Why.
        source: io::Error,
    },
}

/// Reads and parses `/proc/cmdline` (procfs must be mounted).
pub fn read() -> Result<Cmdline, CmdlineError> {
    let mut buf = [0u8; CMDLINE_MAX];
    let bytes = sys::read_proc_file(PROC_CMDLINE, &mut buf)
        .map_err(|source| CmdlineError::Read { source })?;
    Ok(parse(&String::from_utf8_lossy(bytes)))
}
