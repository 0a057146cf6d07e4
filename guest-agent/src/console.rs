//! Lines on the console, which is all the agent has to report with.
//!
//! Each line is formatted in memory and handed to the kernel in a single
//! `write`, so it costs one system call and is not split by other writers.
//! Status lines go to stdout, warnings and errors to stderr; both are the
//! console in the guest.

use std::error::Error;
use std::fmt::{self, Write as _};

use crate::LOG_PREFIX;

/// Prints `ember-agent: <message>` on stdout.
pub(crate) fn info(message: fmt::Arguments<'_>) {
    emit(libc::STDOUT_FILENO, "", message);
}

/// Prints a line on stdout exactly as given (for the lines the host parses).
pub(crate) fn raw(line: &str) {
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    write_all(libc::STDOUT_FILENO, text.as_bytes());
}

/// Prints `ember-agent: warning: <message>` on stderr.
pub(crate) fn warn(message: &dyn fmt::Display) {
    emit(libc::STDERR_FILENO, "warning: ", format_args!("{message}"));
}

/// Prints `ember-agent: error: <error>: <cause>: ...` on stderr.
pub(crate) fn error(err: &dyn Error) {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Errors here usually spell their cause out already; don't repeat it.
        if !text.ends_with(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    emit(libc::STDERR_FILENO, "error: ", format_args!("{text}"));
}

fn emit(fd: i32, level: &str, message: fmt::Arguments<'_>) {
    let mut text = String::with_capacity(128);
    // Writing into a String cannot fail.
    let _ = writeln!(text, "{LOG_PREFIX}{level}{message}");
    write_all(fd, text.as_bytes());
}

/// Writes all of `bytes`, retrying short writes. Failures are dropped: the
/// console is the only place an error could be reported.
fn write_all(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reads of `bytes.len()` bytes; writing
        // to a descriptor that may be closed only returns EBADF.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if crate::sys::errno() == libc::EINTR {
                continue;
            }
            return;
        }
        match bytes.get(n.unsigned_abs()..) {
            Some(rest) if n > 0 => bytes = rest,
            _ => return,
        }
    }
}
