//! The jail a sandbox worker process enters before any guest code runs.
//!
//! The parent spawns the worker with new mount, network, IPC, UTS and PID
//! namespaces (see [`crate::worker`]); the worker then, still holding the
//! file descriptors it was handed and nothing else:
//!
//! 1. becomes PID 1 of its PID namespace (one fork; the outer process only
//!    waits, under a seccomp filter that allows nothing else), dying with
//!    its parent;
//! 2. pivots into an empty, read-only tmpfs: no host file is reachable;
//! 3. closes every file descriptor it was not handed;
//! 4. drops to an unprivileged uid/gid with no supplementary groups and
//!    `no_new_privs`, and caps its rlimits.
//!
//! Every step is a raw system call checked for errors: a worker that cannot
//! jail itself refuses to run the guest.

use std::ffi::CStr;
use std::io;

/// Who the worker runs as, and how much it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailConfig {
    /// Unprivileged user ID (not 0).
    pub uid: u32,
    /// Unprivileged group ID (not 0).
    pub gid: u32,
    /// RLIMIT_NOFILE: the worker needs a few dozen descriptors.
    pub max_files: u64,
    /// RLIMIT_NPROC for the jail's uid: threads count against it.
    pub max_processes: u64,
    /// RLIMIT_FSIZE: a worker that restores a clone writes no file (0); a
    /// template worker writes the template's memory (`None`: no limit).
    pub max_file_bytes: Option<u64>,
    /// Stay dumpable after the uid change, so the worker may read its own
    /// `/proc/self` files (a template worker's calibration reads its
    /// page map); only its own uid could then ptrace it.
    pub dumpable: bool,
    /// RLIMIT_AS, per process (`None`: no limit). A worker's memory is
    /// bounded by its cgroup instead; a jailed pip run has none.
    pub max_address_space: Option<u64>,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            uid: DEFAULT_JAIL_ID,
            gid: DEFAULT_JAIL_ID,
            max_files: 128,
            max_processes: 4096,
            max_file_bytes: Some(0),
            dumpable: false,
            max_address_space: None,
        }
    }
}

/// The uid/gid [`JailConfig::default`] names (the first of
/// [`IdRange::default`]); workers spawned by [`crate::worker`] each get
/// their own from an [`IdRange`].
pub const DEFAULT_JAIL_ID: u32 = 60_000;

/// The user and group IDs jailed workers run as: each live worker gets one
/// of its own (uid = gid), as Firecracker's jailer runs each microVM under
/// its own uid, so one compromised worker cannot signal, ptrace or read
/// the `/proc` files of another.
///
/// IDs are leased host-wide: a lease holds a lock on a file of its own in
/// [`ID_LOCK_DIR`], so two ember processes sharing a range never run two
/// workers as one ID. No account on the host should own an ID of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// The first ID (not 0).
    pub first: u32,
    /// How many IDs: at most this many workers at once.
    pub count: u32,
}

impl Default for IdRange {
    /// 60000..=60999 (Debian reserves 60000-64999 for IDs created on
    /// demand; none of its packages takes these).
    fn default() -> Self {
        IdRange {
            first: DEFAULT_JAIL_ID,
            count: 1000,
        }
    }
}

impl std::str::FromStr for IdRange {
    type Err = String;

    /// `FIRST-LAST` (inclusive) or `FIRST+COUNT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|e| format!("bad ID {t:?}: {e}"))
        };
        let range = if let Some((a, b)) = s.split_once('-') {
            let (first, last) = (parse(a)?, parse(b)?);
            if last < first {
                return Err(format!("{s}: the last ID is below the first"));
            }
            IdRange {
                first,
                count: last - first + 1,
            }
        } else if let Some((a, n)) = s.split_once('+') {
            IdRange {
                first: parse(a)?,
                count: parse(n)?,
            }
        } else {
            return Err(format!("{s}: expected FIRST-LAST or FIRST+COUNT"));
        };
        range.check().map_err(|e| e.to_string())?;
        Ok(range)
    }
}

/// Where worker ID leases are held host-wide: one lock file per ID, locked
/// (`flock`) by the process whose worker runs as it. The kernel drops the
/// lock with that process, however it ends; `/run` starts empty at boot.
pub const ID_LOCK_DIR: &str = "/run/ember/worker-ids";

/// The IDs of every range leased in this process, and where the next
/// search starts (so a just-released ID is the last to be reused).
struct Leases {
    taken: std::collections::BTreeSet<u32>,
    next: u32,
}

static LEASES: std::sync::Mutex<Leases> = std::sync::Mutex::new(Leases {
    taken: std::collections::BTreeSet::new(),
    next: 0,
});

impl IdRange {
    fn check(&self) -> Result<(), JailError> {
        if self.first == 0 {
            return Err(JailError::Root);
        }
        // u32::MAX is (uid_t)-1, "no change" to setresuid.
        if self.count == 0 || self.first.checked_add(self.count).is_none() {
            return Err(JailError::IdRange(*self));
        }
        Ok(())
    }

    /// Takes an ID of the range that no live lease on this host holds (in
    /// this process or any other); it is free again when the lease is
    /// dropped (after the worker that ran as it is gone).
    pub fn lease(&self) -> Result<IdLease, JailError> {
        use std::os::unix::fs::DirBuilderExt;
        self.check()?;
        let lock_error = |source| JailError::IdLock {
            path: ID_LOCK_DIR.into(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(ID_LOCK_DIR)
            .map_err(lock_error)?;
        let mut leases = LEASES.lock().unwrap_or_else(|e| e.into_inner());
        let start = leases.next.wrapping_sub(self.first) % self.count;
        for id in (0..self.count).map(|i| self.first + (start + i) % self.count) {
            if leases.taken.contains(&id) {
                continue;
            }
            let Some(lock) = lock_id(id)? else { continue };
            leases.taken.insert(id);
            leases.next = id.wrapping_add(1);
            return Ok(IdLease { id, _lock: lock });
        }
        Err(JailError::IdsExhausted(*self))
    }
}

/// Locks `id`'s file in [`ID_LOCK_DIR`]; `None` if another process (or
/// another lease of this one) holds it.
fn lock_id(id: u32) -> Result<Option<std::fs::File>, JailError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::path::Path::new(ID_LOCK_DIR).join(id.to_string());
    let lock_error = |source| JailError::IdLock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(lock_error)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        e => Err(lock_error(e)),
    }
}

/// One worker's uid/gid, held while the worker lives.
#[derive(Debug)]
pub struct IdLease {
    id: u32,
    /// Its lock file in [`ID_LOCK_DIR`], locked while this is open.
    _lock: std::fs::File,
}

impl IdLease {
    /// The uid (and gid).
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for IdLease {
    fn drop(&mut self) {
        let mut leases = LEASES.lock().unwrap_or_else(|e| e.into_inner());
        leases.taken.remove(&self.id);
    }
}

fn check(what: &'static str, rc: libc::c_long) -> Result<libc::c_long, JailError> {
    if rc < 0 {
        Err(JailError::Syscall {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

fn check_int(what: &'static str, rc: libc::c_int) -> Result<libc::c_int, JailError> {
    check(what, libc::c_long::from(rc)).map(|r| r as libc::c_int)
}

/// Step 1: makes the calling (single-threaded) process PID 1 of the PID
/// namespace its parent created for its children. Returns in the child;
/// the original process waits for it and exits with its status, so the
/// caller never sees it return.
pub fn become_namespace_init() -> Result<(), JailError> {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        return Ok(());
    }
    // SAFETY: the worker is single-threaded here (it has not started any
    // thread yet), so fork() is safe and the child may run Rust code.
    let pid = check_int("fork", unsafe { libc::fork() })?;
    if pid == 0 {
        // The child dies with the outer process, which dies with the parent
        // holding the control socket (SIGKILL from it, or its exit).
        // SAFETY: prctl with integer arguments.
        check_int("prctl(PR_SET_PDEATHSIG)", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
        })?;
        return Ok(());
    }
    // The waiting process keeps nothing the jailed child was given, and
    // from here on can only wait and exit (compiled before the filter
    // goes on: nothing below allocates).
    let _ = close_fds_from(3);
    if crate::seccomp::Filter::Waiter.install().is_err() {
        // SAFETY: kill and _exit take integers.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::_exit(1);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // SAFETY: _exit takes an integer (no exit handlers: they might
            // make calls the filter forbids).
            unsafe { libc::_exit(1) };
        }
    }
    if libc::WIFSIGNALED(status) {
        // Die the same way, so the parent sees e.g. SIGSYS from seccomp.
        let signal = libc::WTERMSIG(status);
        // SAFETY: resetting a signal to its default action and raising it
        // have no memory-safety preconditions.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
    // SAFETY: as above.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

fn mount(
    source: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
    what: &'static str,
) -> Result<(), JailError> {
    // SAFETY: all pointers are NUL-terminated C strings (or null) that
    // outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    check_int(what, rc).map(|_| ())
}

/// A host file or directory the parent opened, bind-mounted into the jail.
#[derive(Debug)]
pub struct Bind {
    /// Its host path. (A bind mount cannot take its source from a
    /// descriptor opened in another mount namespace: the path is looked up
    /// in the worker's copy of the host's mounts, and what it names must
    /// be the file of `fd`.)
    pub source: std::ffi::CString,
    /// The descriptor (`O_PATH` will do) the parent opened and checked.
    pub fd: std::os::fd::RawFd,
    /// Where, inside the jail (absolute).
    pub target: std::ffi::CString,
    /// Mounted writable (else read-only); never setuid.
    pub writable: bool,
    /// Programs may run from it (else `noexec`).
    pub exec: bool,
    /// Device files in it may be opened (else `nodev`): for `/dev/null`.
    pub devices: bool,
}

/// A symbolic link made in the jail's root, e.g. `/lib64 -> usr/lib64` on
/// a merged-/usr host.
#[derive(Debug)]
pub struct Link {
    /// Where, inside the jail (absolute, below `/`).
    pub path: std::ffi::CString,
    /// What it points to.
    pub target: std::ffi::CString,
}

/// What a jail's otherwise empty, read-only root holds.
#[derive(Debug, Default)]
pub struct RootLayout<'a> {
    /// Host files and directories mounted into it.
    pub binds: &'a [Bind],
    /// Symbolic links made in it.
    pub links: &'a [Link],
    /// A procfs of the jail's own PID namespace at `/proc`.
    pub proc: bool,
}

/// Step 2: replaces the root with an empty, read-only tmpfs. Needs the
/// private mount namespace the parent created.
pub fn enter_empty_root() -> Result<(), JailError> {
    enter_root_with(&[], false)
}

/// Step 2 for a template worker: the empty, read-only root of
/// [`enter_empty_root`] with `binds` mounted into it and, with `proc`, a
/// procfs of the worker's own PID namespace at `/proc`.
pub fn enter_root_with(binds: &[Bind], proc: bool) -> Result<(), JailError> {
    enter_root(&RootLayout {
        binds,
        links: &[],
        proc,
    })
}

/// Step 2, general: the empty, read-only root of [`enter_empty_root`]
/// with `layout`'s mounts and links.
pub fn enter_root(layout: &RootLayout) -> Result<(), JailError> {
    let RootLayout { binds, links, proc } = *layout;
    // Nothing below propagates back to the host's mount table.
    mount(
        c"none",
        c"/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "make / private",
    )?;
    // Looked up before the jail's tmpfs hides anything under /tmp.
    let sources = binds
        .iter()
        .map(open_bind_source)
        .collect::<Result<Vec<_>, _>>()?;
    // /tmp is only a mount point here: the new root is a fresh tmpfs
    // mounted over it, visible to this namespace alone.
    let new_root = c"/tmp";
    mount(
        c"ember-jail",
        new_root,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"size=64k,mode=0555"),
        "mount the jail tmpfs",
    )?;
    for (bind, (source, is_dir)) in binds.iter().zip(&sources) {
        bind_into(new_root, bind, source, *is_dir)?;
    }
    drop(sources);
    for link in links {
        make_link(new_root, link)?;
    }
    if proc {
        let target = c"/tmp/proc";
        make_mount_point(target, true)?;
        mount(
            c"proc",
            target,
            Some(c"proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(c"hidepid=2"),
            "mount /proc",
        )?;
    }
    // SAFETY: chdir to a NUL-terminated path.
    check_int("chdir(jail)", unsafe { libc::chdir(new_root.as_ptr()) })?;
    // pivot_root(".", ".") stacks the old root under the new one; the
    // detach below then drops it without needing a directory for it.
    // SAFETY: two NUL-terminated paths.
    check("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr())
    })?;
    // SAFETY: NUL-terminated path, integer flags.
    check_int("detach the old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: chdir to a NUL-terminated path.
    check_int("chdir(/)", unsafe { libc::chdir(c"/".as_ptr()) })?;
    mount(
        c"none",
        c"/",
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
        "make the jail read-only",
    )
}

/// Makes `link` beneath `root` (the jail's root before the pivot).
fn make_link(root: &CStr, link: &Link) -> Result<(), JailError> {
    let path = link.path.to_bytes();
    if !path.starts_with(b"/") || path.len() < 2 || path.windows(2).any(|w| w == b"..") {
        return Err(JailError::Syscall {
            what: "link path",
            source: io::ErrorKind::InvalidInput.into(),
        });
    }
    let mut full = root.to_bytes().to_vec();
    full.extend_from_slice(path);
    let full = std::ffi::CString::new(full).map_err(|_| JailError::Syscall {
        what: "link path",
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    if let Some(at) = path.iter().rposition(|b| *b == b'/').filter(|at| *at > 0) {
        let parent = std::ffi::CString::new(&full.to_bytes()[..root.to_bytes().len() + at])
            .map_err(|_| JailError::Syscall {
                what: "link path",
                source: io::ErrorKind::InvalidInput.into(),
            })?;
        make_mount_point(&parent, true)?;
    }
    // SAFETY: two NUL-terminated paths.
    check_int("symlink", unsafe {
        libc::symlink(link.target.as_ptr(), full.as_ptr())
    })
    .map(|_| ())
}

/// Creates `path` (and its parents) as a directory, or as an empty file.
fn make_mount_point(path: &CStr, dir: bool) -> Result<(), JailError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()));
    let made = match (dir, path.parent()) {
        (true, _) => std::fs::create_dir_all(path),
        (false, Some(parent)) => {
            std::fs::create_dir_all(parent).and_then(|()| std::fs::File::create(path).map(drop))
        }
        (false, None) => Err(io::ErrorKind::InvalidInput.into()),
    };
    made.map_err(|source| JailError::Syscall {
        what: "make a mount point",
        source,
    })
}

fn stat_fd(fd: std::os::fd::RawFd) -> Result<libc::stat, JailError> {
    // SAFETY: an all-zero stat is a valid out-buffer for fstat.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid out-pointer; fstat only reads `fd`.
    check_int("fstat(bind source)", unsafe { libc::fstat(fd, &mut stat) })?;
    Ok(stat)
}

/// Opens `bind.source` in this mount namespace (a bind mount cannot take
/// its source from a descriptor of another one) and checks it is the file
/// the parent opened and checked; returns it and whether it is a
/// directory.
fn open_bind_source(bind: &Bind) -> Result<(std::os::fd::OwnedFd, bool), JailError> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated path and integer flags.
    let fd = check_int("open(bind source)", unsafe {
        libc::open(
            bind.source.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let (here, parent) = (stat_fd(fd.as_raw_fd())?, stat_fd(bind.fd)?);
    if (here.st_dev, here.st_ino) != (parent.st_dev, parent.st_ino) {
        return Err(JailError::Syscall {
            what: "bind-mount an input (it changed since the parent opened it)",
            source: io::ErrorKind::InvalidData.into(),
        });
    }
    Ok((fd, here.st_mode & libc::S_IFMT == libc::S_IFDIR))
}

/// Bind-mounts `source` (opened by [`open_bind_source`]) at `bind.target`
/// beneath `root` (the jail's root before the pivot).
fn bind_into(
    root: &CStr,
    bind: &Bind,
    source: &std::os::fd::OwnedFd,
    is_dir: bool,
) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    let invalid = |what| JailError::Syscall {
        what,
        source: io::ErrorKind::InvalidInput.into(),
    };
    let target = bind.target.to_bytes();
    if !target.starts_with(b"/") || target.windows(2).any(|w| w == b"..") {
        return Err(invalid("bind target"));
    }
    let mut full = root.to_bytes().to_vec();
    full.extend_from_slice(target);
    let full = std::ffi::CString::new(full).map_err(|_| invalid("bind target"))?;
    make_mount_point(&full, is_dir)?;
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", source.as_raw_fd()))
        .map_err(|_| invalid("bind source"))?;
    mount(
        &path,
        &full,
        None,
        libc::MS_BIND,
        None,
        "bind-mount an input",
    )?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
    if !bind.exec {
        flags |= libc::MS_NOEXEC;
    }
    if !bind.devices {
        flags |= libc::MS_NODEV;
    }
    if !bind.writable {
        flags |= libc::MS_RDONLY;
    }
    mount(c"none", &full, None, flags, None, "restrict a bind mount")
}

/// Most descriptors [`detach_into_namespaces`] moves.
pub const MAX_MOVED_FDS: usize = 16;

/// For a child between fork and exec (async-signal-safe: no allocation):
/// a session of its own (no controlling terminal, no signals from the
/// caller's terminal or process group), `fds` moved to 3, 4, ... (all
/// else stays close-on-exec), and new mount, IPC, UTS and PID namespaces
/// (the PID namespace is its children's: see [`become_namespace_init`]),
/// with `network` a new, empty network namespace too.
pub fn detach_into_namespaces(fds: &[std::os::fd::RawFd], network: bool) -> io::Result<()> {
    if fds.len() > MAX_MOVED_FDS {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: setsid, fcntl, dup2 and unshare take integers; `high` is a
    // local array indexed within its bounds.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        // Sources are dup'ed above the target range first, so no dup2
        // clobbers a later source.
        let mut high = [0; MAX_MOVED_FDS];
        for (i, fd) in fds.iter().enumerate() {
            let dup = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 32);
            if dup < 0 {
                return Err(io::Error::last_os_error());
            }
            high[i] = dup;
        }
        for (i, fd) in high.iter().take(fds.len()).enumerate() {
            if libc::dup2(*fd, 3 + i as std::os::fd::RawFd) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWPID;
        if network {
            flags |= libc::CLONE_NEWNET;
        }
        if libc::unshare(flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Step 3: closes every descriptor from `first` up.
pub fn close_fds_from(first: u32) -> Result<(), JailError> {
    // SAFETY: close_range only closes descriptors.
    check("close_range", unsafe {
        libc::syscall(libc::SYS_close_range, first, u32::MAX, 0)
    })
    .map(|_| ())
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &'static str,
) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    check_int(what, unsafe { libc::setrlimit(resource, &limit) }).map(|_| ())
}

/// Step 4: drops every privilege for good.
pub fn drop_privileges(config: &JailConfig) -> Result<(), JailError> {
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::Root);
    }
    set_rlimit(libc::RLIMIT_NOFILE, config.max_files, "setrlimit(NOFILE)")?;
    // A clone's worker writes no file: the console goes to a pipe or
    // nowhere.
    set_rlimit(
        libc::RLIMIT_FSIZE,
        config.max_file_bytes.unwrap_or(libc::RLIM_INFINITY),
        "setrlimit(FSIZE)",
    )?;
    set_rlimit(libc::RLIMIT_NPROC, config.max_processes, "setrlimit(NPROC)")?;
    set_rlimit(libc::RLIMIT_CORE, 0, "setrlimit(CORE)")?;
    if let Some(bytes) = config.max_address_space {
        set_rlimit(libc::RLIMIT_AS, bytes, "setrlimit(AS)")?;
    }
    // SAFETY: setgroups with an empty list.
    check_int("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments.
    check_int("setresgid", unsafe {
        libc::setresgid(config.gid, config.gid, config.gid)
    })?;
    // SAFETY: integer arguments.
    check_int("setresuid", unsafe {
        libc::setresuid(config.uid, config.uid, config.uid)
    })?;
    // SAFETY: prctl with integer arguments.
    check_int("prctl(PR_SET_NO_NEW_PRIVS)", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // A worker that kept any capability (e.g. through a misconfigured
    // uid 0 mapping) must not run guest code.
    // SAFETY: getuid/geteuid have no preconditions.
    if unsafe { libc::geteuid() } == 0 || unsafe { libc::getuid() } == 0 {
        return Err(JailError::Root);
    }
    if config.dumpable {
        // SAFETY: prctl with integer arguments.
        check_int("prctl(PR_SET_DUMPABLE)", unsafe {
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0)
        })?;
    }
    // Changing credentials clears the parent-death signal: set it again.
    // (As PID 1 of its namespace the worker cannot ask whether its parent
    // died in the instant between; the owner kills the whole tree anyway.)
    // SAFETY: prctl with integer arguments.
    check_int("prctl(PR_SET_PDEATHSIG)", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    Ok(())
}

/// A jail step failed; the worker must not run the guest.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call failed.
    #[error("jail: {what}: {source}")]
    Syscall {
        /// The step.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The configuration would leave the worker as root.
    #[error("jail: refusing to run a worker as root (uid/gid 0)")]
    Root,
    /// The ID range is empty or runs past the largest ID.
    #[error("jail: invalid worker ID range {}+{}", .0.first, .0.count)]
    IdRange(IdRange),
    /// Every ID of the range is held by a live worker.
    #[error("jail: all {} worker IDs from {} are in use", .0.count, .0.first)]
    IdsExhausted(IdRange),
    /// A worker ID's lock file could not be made or locked.
    #[error("jail: worker ID lock {}: {source}", path.display())]
    IdLock {
        /// The lock file (or its directory).
        path: std::path::PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_before_any_change() {
        let config = JailConfig {
            uid: 0,
            ..JailConfig::default()
        };
        assert!(matches!(drop_privileges(&config), Err(JailError::Root)));
    }

    #[test]
    fn leases_are_distinct_and_come_back() {
        // A range of its own: other tests lease from the default one.
        let range = IdRange {
            first: 70_000,
            count: 3,
        };
        let a = range.lease().unwrap();
        let b = range.lease().unwrap();
        let c = range.lease().unwrap();
        let mut ids = vec![a.id(), b.id(), c.id()];
        ids.sort_unstable();
        assert_eq!(ids, vec![70_000, 70_001, 70_002]);
        assert!(matches!(range.lease(), Err(JailError::IdsExhausted(_))));
        let freed = b.id();
        drop(b);
        assert_eq!(range.lease().unwrap().id(), freed);
    }

    #[test]
    fn an_id_locked_by_another_process_is_skipped() {
        let range = IdRange {
            first: 70_100,
            count: 2,
        };
        std::fs::create_dir_all(ID_LOCK_DIR).unwrap();
        // Another process's lease, as the kernel sees it: a lock on the
        // ID's file through an open file of its own.
        let other = lock_id(70_100).unwrap().unwrap();
        let a = range.lease().unwrap();
        assert_eq!(a.id(), 70_101);
        assert!(matches!(range.lease(), Err(JailError::IdsExhausted(_))));
        drop(other);
        assert_eq!(range.lease().unwrap().id(), 70_100);
    }

    #[test]
    fn id_ranges_parse_and_bad_ones_are_refused() {
        let r: IdRange = "100000-100009".parse().unwrap();
        assert_eq!((r.first, r.count), (100_000, 10));
        let r: IdRange = "5+2".parse().unwrap();
        assert_eq!((r.first, r.count), (5, 2));
        for bad in ["0-5", "9-3", "x", "7+0", "4294967295+1", "1"] {
            assert!(bad.parse::<IdRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn default_is_unprivileged() {
        let config = JailConfig::default();
        assert_ne!(config.uid, 0);
        assert_ne!(config.gid, 0);
    }
}
