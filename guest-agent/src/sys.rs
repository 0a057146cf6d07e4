//! Thin wrappers over the few raw system calls the agent shares between
//! modules. They go straight to libc instead of `std::fs` because std adds
//! calls (`statx` for a size hint, a second `read` to see EOF) that cost
//! half a millisecond each in the guest.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Reads a small procfs file such as `/proc/cmdline` into `buf` with one
/// `open`, as few `read`s as it takes and one `close`.
///
/// A read that does not fill the buffer is taken as the end: these files are
/// single-record seq files, which hand over their whole text in the first
/// read when it fits, so asking again would only cost a system call to learn
/// it is empty. A file that fills `buf` is returned truncated to it.
pub(crate) fn read_proc_file<'a>(path: &CStr, buf: &'a mut [u8]) -> io::Result<&'a [u8]> {
    // SAFETY: `path` is a valid NUL-terminated string; the flags ask for a
    // plain read-only descriptor that is not inherited across exec.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut len = 0;
    let result = loop {
        let Some(rest) = buf.get_mut(len..) else {
            break Ok(());
        };
        if rest.is_empty() {
            break Ok(());
        }
        // SAFETY: `rest` is writable memory of exactly `rest.len()` bytes and
        // `fd` is the descriptor opened above.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(err);
        }
        let n = n.unsigned_abs();
        let short = n < rest.len();
        len += n;
        if n == 0 || short {
            break Ok(());
        }
    };
    // SAFETY: `fd` was opened above and is closed exactly once; a failed
    // close of a read-only procfs file loses nothing.
    unsafe { libc::close(fd) };
    result.map(|()| buf.get(..len).unwrap_or_default())
}

/// Turns a libc return value into a `Result`: negative means `errno`.
pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(last_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of a descriptor a system call just returned (or its
/// error).
pub(crate) fn owned(rc: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(rc)?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `open(2)`; `O_CLOEXEC` is always added, so no descriptor of the agent
/// leaks into the programs it runs.
pub(crate) fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; the kernel keeps no reference to it.
    owned(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) })
}

/// Writes all of `data` to `fd`, retrying short writes and EINTR.
pub(crate) fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is valid for reads of `data.len()` bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let err = last_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        data = data
            .get(n.unsigned_abs()..)
            .filter(|_| n > 0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::WriteZero))?;
    }
    Ok(())
}

/// A pipe as (read end, write end), both close-on-exec.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 stores.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    let [read, write] = fds;
    // SAFETY: both were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(read), OwnedFd::from_raw_fd(write)) })
}

/// Sets `O_NONBLOCK` on a descriptor that has no other flags worth keeping
/// (a fresh pipe end): one `fcntl` instead of a get and a set.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFL only changes the file status flags of `fd`.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) }).map(drop)
}

/// A C string of `s`, or `InvalidInput` if it holds a NUL byte.
pub(crate) fn cstring(s: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}

/// The calling thread's `errno` as an [`io::Error`].
pub(crate) fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// The raw `errno` value of the last failed call.
pub(crate) fn errno() -> i32 {
    last_error().raw_os_error().unwrap_or(0)
}

/// A readable name for the signals the agent talks about.
pub(crate) fn signal_name(signo: i32) -> &'static str {
    match signo {
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGKILL => "SIGKILL",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Describes a `waitpid` status for a console message.
pub(crate) fn describe_wait_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let signo = libc::WTERMSIG(status);
        format!("killed by {} ({signo})", signal_name(signo))
    } else {
        format!("wait status {status:#x}")
    }
}

/// CPUs this process may run on: for PID 1, every CPU the guest brought
/// online. One system call, no /sys walk.
pub(crate) fn online_cpus() -> Option<u32> {
    // SAFETY: cpu_set_t is plain data for which all-zero is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return None;
    }
    // SAFETY: CPU_COUNT only reads the set it is given.
    u32::try_from(unsafe { libc::CPU_COUNT(&set) }).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status() {
        assert_eq!(describe_wait_status(0), "exit code 0");
        assert_eq!(describe_wait_status(3 << 8), "exit code 3");
        assert_eq!(describe_wait_status(libc::SIGKILL), "killed by SIGKILL (9)");
    }

    #[test]
    fn reads_small_files() {
        // Any host has these; this is what the agent does in the guest.
        let mut buf = [0u8; 4096];
        let text = read_proc_file(c"/proc/uptime", &mut buf).unwrap();
        assert!(crate::boot::uptime::parse_uptime_ms(std::str::from_utf8(text).unwrap()).is_ok());
        let mut tiny = [0u8; 2];
        assert_eq!(read_proc_file(c"/proc/uptime", &mut tiny).unwrap().len(), 2);
        assert!(read_proc_file(c"/nonexistent/file", &mut buf).is_err());
    }
}
