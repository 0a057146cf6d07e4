//! Opening files of a snapshot directory without leaving it: the names a
//! `state` file records are resolved with `openat2(RESOLVE_BENEATH)`, so an
//! absolute path, a `..` or a symbolic link out of the directory fails
//! instead of reaching any file the caller (root) could read.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens the directory `dir` itself (`O_PATH`): the anchor for
/// [`open_beneath`], and the snapshot's identity from then on (renaming or
/// replacing the path does not change what the descriptor names).
pub fn open_dir(dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
}

/// Opens `name` read-only beneath the directory `dir` (from [`open_dir`]).
/// Fails with `EXDEV` for a name that leaves it (absolute, `..`, a symlink
/// pointing out), and never follows `/proc` magic links.
pub fn open_beneath(dir: &File, name: &Path) -> io::Result<File> {
    let name = CString::new(name.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a file name"))?;
    // SAFETY: open_how is plain integers; all zero is valid (and the
    // kernel wants every field it does not know to be zero).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `name` is NUL-terminated, `how` is a valid open_how whose
    // size is passed; both outlive the call. The result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("openat2 returned no descriptor"))?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_directory_are_refused() {
        let root = std::env::temp_dir().join(format!("ember-beneath-{}", std::process::id()));
        let dir = root.join("snap");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/inside"), b"in").unwrap();
        std::fs::write(root.join("outside"), b"out").unwrap();
        std::os::unix::fs::symlink("../outside", dir.join("escape")).unwrap();
        std::os::unix::fs::symlink("sub/inside", dir.join("link")).unwrap();
        let anchor = open_dir(&dir).unwrap();

        assert!(open_beneath(&anchor, Path::new("sub/inside")).is_ok());
        assert!(open_beneath(&anchor, Path::new("link")).is_ok());
        let outside = root.join("outside");
        for name in [
            outside.as_path(),
            Path::new("../outside"),
            Path::new("escape"),
            Path::new("sub/../../outside"),
            Path::new("/etc/hostname"),
        ] {
            let err = open_beneath(&anchor, name).expect_err(&name.display().to_string());
            assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{}", name.display());
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
