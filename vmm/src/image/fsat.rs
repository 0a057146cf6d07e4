//! Directory-relative file system calls for building a staging tree from
//! untrusted archives: every name is one component (or a path resolved
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), and no call
//! follows a symbolic link, so nothing an archive puts in the tree can
//! send a later write outside it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// What [`stat`] found at a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    Other,
}

/// A path or name as a C string; a NUL byte inside is an error.
pub(crate) fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a name"))
}

/// Opens `path` (relative, `/`-separated) beneath `dir` with `flags`
/// (openat2 refuses `O_PATH` with most other flags: keep them minimal).
/// Fails with `ELOOP` if any component is a symbolic link, `EXDEV` if the
/// path would leave `dir`.
pub(crate) fn open_beneath(dir: BorrowedFd<'_>, path: &[u8], flags: i32) -> io::Result<OwnedFd> {
    openat2(
        dir,
        path,
        flags,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// Opens `path` as the guest would see it with `dir` as its root:
/// symbolic links are followed, but absolute ones and `..` stay inside
/// `dir` (`RESOLVE_IN_ROOT`). Only for looking, never for writing.
pub(crate) fn open_in_root(dir: BorrowedFd<'_>, path: &[u8], flags: i32) -> io::Result<OwnedFd> {
    openat2(
        dir,
        path,
        flags,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

fn openat2(dir: BorrowedFd<'_>, path: &[u8], flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let path = cstring(if path.is_empty() { b"." } else { path })?;
    // SAFETY: open_how is plain integers; all zero is valid (and the
    // kernel wants every field it does not know to be zero).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: `path` is NUL-terminated, `how` is a valid open_how whose
    // size is passed; both outlive the call. The result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("openat2 returned no descriptor"))?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates the regular file `name` in `dir` (which must not exist; a
/// symbolic link there is not followed) for writing.
pub(crate) fn create_file(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    let name = cstring(name)?;
    // SAFETY: NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What is at `name` in `dir`, without following a symbolic link;
/// `None` if nothing is.
pub(crate) fn stat(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Kind>> {
    let name = cstring(name)?;
    // SAFETY: all-zero is a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated name, `st` is writable and outlives the call.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        Kind::Dir
    } else {
        Kind::Other
    }))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mkdirat`; the mode is set exactly later (the umask applies here).
pub(crate) fn mkdir(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })
}

/// Removes the non-directory `name` from `dir` (a symbolic link itself,
/// never its target).
pub(crate) fn unlink(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
}

/// Makes `name` in `dir` a symbolic link to `target` (stored, never
/// resolved here).
pub(crate) fn symlink(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let (target, name) = (cstring(target)?, cstring(name)?);
    // SAFETY: NUL-terminated strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

/// A hard link `new_dir/new_name` to `old_dir/old_name` (a symbolic link
/// there is linked itself, not followed).
pub(crate) fn link(
    old_dir: BorrowedFd<'_>,
    old_name: &[u8],
    new_dir: BorrowedFd<'_>,
    new_name: &[u8],
) -> io::Result<()> {
    let (old_name, new_name) = (cstring(old_name)?, cstring(new_name)?);
    // SAFETY: NUL-terminated names; flags 0 does not follow symlinks.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })
}

/// A FIFO at `name` in `dir`.
pub(crate) fn mkfifo(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: NUL-terminated name; a FIFO needs no device number.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), libc::S_IFIFO | 0o600, 0) })
}

/// Owner, permission bits and modification time of `name` in `dir`,
/// without following a symbolic link (whose permission bits do not
/// exist: `mode` is ignored for one).
pub(crate) struct Attrs {
    pub owner: Option<(u32, u32)>,
    pub mode: Option<u32>,
    pub mtime: i64,
}

/// Sets `attrs` on the open file `fd`: owner first (a change of owner
/// clears set-user-ID bits), then the mode, then the time.
pub(crate) fn set_attrs_fd(fd: BorrowedFd<'_>, attrs: &Attrs) -> io::Result<()> {
    if let Some((uid, gid)) = attrs.owner {
        // SAFETY: plain descriptor call.
        check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
    }
    if let Some(mode) = attrs.mode {
        // SAFETY: plain descriptor call.
        check(unsafe { libc::fchmod(fd.as_raw_fd(), (mode & 0o7777) as libc::mode_t) })?;
    }
    let times = times(attrs.mtime);
    // SAFETY: `times` is two valid timespecs that outlive the call.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
}

/// Sets `attrs` on `name` in `dir` without following a symbolic link
/// (for links and FIFOs, which are not opened).
pub(crate) fn set_attrs_at(dir: BorrowedFd<'_>, name: &[u8], attrs: &Attrs) -> io::Result<()> {
    let name = cstring(name)?;
    if let Some((uid, gid)) = attrs.owner {
        // SAFETY: NUL-terminated name.
        check(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
    }
    if let Some(mode) = attrs.mode {
        // SAFETY: NUL-terminated name; flags 0 follows a link, so this is
        // only called for names that are not links (see Attrs).
        check(unsafe {
            libc::fchmodat(
                dir.as_raw_fd(),
                name.as_ptr(),
                (mode & 0o7777) as libc::mode_t,
                0,
            )
        })?;
    }
    let times = times(attrs.mtime);
    // SAFETY: NUL-terminated name, `times` valid for the call.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn times(mtime: i64) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    [ts, ts]
}

/// Sets the extended attribute `name` to `value` on the open file `fd`.
pub(crate) fn set_xattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: NUL-terminated name; `value` is valid for its length.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// Whether this process may give files away (set any owner).
pub(crate) fn can_chown() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn symlinked_parents_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("ember-fsat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/real")).unwrap();
        std::os::unix::fs::symlink("/", dir.join("root/up")).unwrap();
        std::os::unix::fs::symlink("real", dir.join("root/side")).unwrap();
        let root = std::fs::File::open(dir.join("root")).unwrap();
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        assert!(open_beneath(root.as_fd(), b"real", flags).is_ok());
        assert!(open_beneath(root.as_fd(), b"", flags).is_ok());
        for (path, errno) in [
            (&b"up"[..], libc::ELOOP),
            (b"up/etc", libc::ELOOP),
            (b"side", libc::ELOOP),
            (b"../root", libc::EXDEV),
            (b"/etc", libc::EXDEV),
        ] {
            let err = open_beneath(root.as_fd(), path, flags).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(errno), "{path:?}: {err}");
        }
        assert_eq!(stat(root.as_fd(), b"up").unwrap(), Some(Kind::Other));
        assert_eq!(stat(root.as_fd(), b"real").unwrap(), Some(Kind::Dir));
        assert_eq!(stat(root.as_fd(), b"none").unwrap(), None);
        // As the guest sees it, `up` is its own root.
        assert!(open_in_root(root.as_fd(), b"up/real", flags).is_ok());
        assert!(open_in_root(root.as_fd(), b"side", flags).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
