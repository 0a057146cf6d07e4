//! pip, run jailed. A bundle's `requirements.txt` is the tenant's: pip
//! run on it may execute the tenant's code on the host, not only when it
//! builds an sdist into a wheel (`pip wheel`) but also when it installs
//! "wheels only": a direct reference (`pkg @ https://.../pkg.tar.gz`, a
//! local path) is built whatever `--only-binary` says, and `pip download`
//! runs an sdist's build backend too, for its metadata. So every pip run
//! of [`super::pip`] happens here, as the tenant's code would run:
//!
//! - as `ember __worker <id> <id> pip <request>`, an unprivileged uid/gid
//!   leased from the workers' [`IdRange`] (so it never shares a uid with a
//!   live worker, nor with another pip run), no supplementary groups, no
//!   capabilities, `no_new_privs`, rlimits on processes, file size,
//!   address space and descriptors;
//! - in new mount, PID, IPC and UTS namespaces, with the PID namespace's
//!   init being pip itself: when it ends, the kernel kills whatever it
//!   left behind (`sleep 1000 &` included); the whole jail dies with the
//!   thread that waits for it, and is killed at [`PipJail::timeout`] or
//!   past [`PipJail::max_output`] bytes of output;
//! - in an empty read-only root holding, read-only, only what pip needs:
//!   `/usr` and `/etc` (what any unprivileged user of the host sees),
//!   the host python's installation (found by asking it), `/dev/null`,
//!   `/dev/zero`, `/dev/urandom`, the directory of the requirements
//!   (`/req`) and the host's own pip settings' local paths; writable only
//!   `/build`, a fresh directory owned by the leased uid (pip's home,
//!   temporary files and its output).
//!
//! Network: the jail keeps the host's network namespace. pip must fetch
//! the sdists and their build dependencies, and fetching cannot be split
//! from building (`pip download` of an sdist runs its build backend for
//! the metadata), so the build keeps network access and nothing else of
//! root's.
//!
//! What pip leaves in `/build` is untrusted output: [`Session::take_dir`]
//! copies only directories and regular files out of it, root's, with
//! normalised modes and bounded in count and size.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::isolation::{Isolation, WORKER_SUBCOMMAND};
use crate::jail::{self, Bind, IdLease, IdRange, JailConfig, JailError, Link, RootLayout};

/// The worker's third argument for a jailed pip run.
pub const PIP_MODE: &str = "pip";
/// Where the writable directory is mounted in the jail.
pub const BUILD_DIR: &str = "/build";
/// Where the requirements' directory is mounted in the jail.
pub const REQ_DIR: &str = "/req";
/// The exit code of a jail that could not be set up (pip never ran).
const SETUP_FAILED: i32 = 125;
/// What such a jail prints before its reason.
const SETUP_PREFIX: &str = "ember: pip jail: ";
/// Bytes of output kept (the end) for errors.
const KEPT_OUTPUT: usize = 64 << 10;
/// Most entries and bytes taken out of the jail's output.
const MAX_TAKEN_ENTRIES: u64 = 500_000;
const MAX_TAKEN_BYTES: u64 = 8 << 30;
/// The host's pip settings passed on to the jail (what pip reads from the
/// environment to reach its index); nothing else of the caller's
/// environment gets in.
const PASSED_ENV: [&str; 20] = [
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_FIND_LINKS",
    "PIP_NO_INDEX",
    "PIP_CERT",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_RETRIES",
    "PIP_PROXY",
    "PIP_PRE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
];
/// Of those, the ones naming local paths pip reads (bound read-only).
const PATH_ENV: [&str; 4] = [
    "PIP_FIND_LINKS",
    "PIP_CERT",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
];

/// How jailed pip runs are started, and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipJail {
    /// The `ember` binary (its hidden worker subcommand is the jail).
    pub worker_exe: PathBuf,
    /// The uids/gids it may run as: the workers' range.
    pub ids: IdRange,
    /// Longest one pip run may take.
    pub timeout: Duration,
    /// Most bytes of output one pip run may print.
    pub max_output: u64,
    /// RLIMIT_FSIZE: the largest file it may write.
    pub max_file_bytes: u64,
    /// RLIMIT_AS of each of its processes.
    pub max_address_space: u64,
    /// RLIMIT_NPROC: its processes and threads.
    pub max_processes: u64,
    /// Run it in cgroups of its own (as workers are, where the host has
    /// the controllers): all its processes together within
    /// `max_memory_bytes`, one CPU and the cgroup's task limit.
    pub cgroups: bool,
    /// Memory of all its processes together (with `cgroups`).
    pub max_memory_bytes: u64,
}

impl PipJail {
    /// The jail for builds under `isolation` (its worker binary and IDs),
    /// or the default isolation's when there is none: pip is jailed even
    /// for an in-process template (its code is the tenant's either way).
    pub fn new(isolation: Option<&Isolation>) -> PipJail {
        let default;
        let isolation = match isolation {
            Some(isolation) => isolation,
            None => {
                default = Isolation::default();
                &default
            }
        };
        PipJail {
            worker_exe: isolation.worker_exe.clone(),
            ids: isolation.ids,
            timeout: Duration::from_secs(600),
            max_output: 16 << 20,
            max_file_bytes: 1 << 30,
            max_address_space: 8 << 30,
            max_processes: 512,
            cgroups: isolation.cgroups,
            max_memory_bytes: 2 << 30,
        }
    }
}

/// A jailed pip run could not be set up, or went over its bounds.
#[derive(Debug, thiserror::Error)]
pub enum PipJailError {
    /// A host file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// No uid could be leased.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// The host python could not be asked where it lives.
    #[error("cannot find the host's python3 installation: {0}")]
    Python(String),
    /// The jail could not be started or set up.
    #[error("cannot start jailed pip ({exe}): {why}")]
    Start {
        /// The worker binary.
        exe: PathBuf,
        /// What failed.
        why: String,
    },
    /// pip ran over its time.
    #[error("pip ran over its limit of {} s and was killed; its output ends with:\n{tail}", .limit.as_secs())]
    Timeout {
        /// The limit.
        limit: Duration,
        /// The end of its output.
        tail: String,
    },
    /// pip printed too much.
    #[error("pip printed more than {limit} bytes and was killed; its output ends with:\n{tail}")]
    TooMuchOutput {
        /// The limit.
        limit: u64,
        /// The end of its output.
        tail: String,
    },
    /// Its output directory is over the limits.
    #[error("{0}: pip's output is over {MAX_TAKEN_ENTRIES} entries or {MAX_TAKEN_BYTES} bytes")]
    OutputTooLarge(PathBuf),
}

/// One install's jailed pip runs: a leased uid and its `/build`
/// directory, removed when dropped.
pub struct Session {
    jail: PipJail,
    lease: IdLease,
    /// The host directory mounted at [`BUILD_DIR`].
    build: PathBuf,
    /// The host directory mounted at [`REQ_DIR`].
    req: PathBuf,
    python: HostPython,
}

/// Where the host's python lives.
#[derive(Debug, Clone, Deserialize)]
struct HostPython {
    /// The interpreter (its real path).
    exe: PathBuf,
    /// Its installation and module search path.
    dirs: Vec<PathBuf>,
}

impl Session {
    /// Leases a uid and makes `build` (which must not exist) its
    /// directory; the jailed runs see `req` at [`REQ_DIR`].
    pub fn open(jail: &PipJail, build: &Path, req: &Path) -> Result<Session, PipJailError> {
        let python = host_python()?;
        let lease = jail.ids.lease()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e| PipJailError::Io(path, e)
        };
        let id = lease.id();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(build)
            .map_err(io(build))?;
        let session = Session {
            jail: jail.clone(),
            lease,
            build: build.to_path_buf(),
            req: std::fs::canonicalize(req).map_err(io(req))?,
            python,
        };
        for dir in [&session.build, &build.join("tmp"), &build.join("home")] {
            if dir != &session.build {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir)
                    .map_err(io(dir))?;
            }
            std::os::unix::fs::lchown(dir, Some(id), Some(id)).map_err(io(dir))?;
        }
        Ok(session)
    }

    /// The host path of `name` in [`BUILD_DIR`].
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.build.join(name)
    }

    /// Runs `python3 -m pip <args>` jailed; `Ok(Err(output))` when pip
    /// failed (its output's end).
    pub fn pip(&self, args: &[String]) -> Result<Result<(), String>, PipJailError> {
        let (binds, links) = self.layout()?;
        let mut files = Vec::new();
        let mut wire = Vec::new();
        for (host, target, writable, exec, devices) in binds {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&host)
                .map_err(|e| PipJailError::Io(host.clone(), e))?;
            files.push(file);
            wire.push(WireBind {
                source: host.into_os_string().into_encoded_bytes(),
                target,
                writable,
                exec,
                devices,
            });
        }
        let mut argv = vec!["-I".to_owned(), "-m".into(), "pip".into()];
        argv.extend_from_slice(args);
        let request = Request {
            binds: wire,
            links,
            program: self.python.exe.to_string_lossy().into_owned(),
            args: argv,
            env: self.env(),
            cwd: format!("{BUILD_DIR}/tmp"),
            max_file_bytes: self.jail.max_file_bytes,
            max_address_space: self.jail.max_address_space,
            max_processes: self.jail.max_processes,
        };
        let request = serde_json::to_string(&request).map_err(|e| self.start_error(e))?;
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        if fds.len() > jail::MAX_MOVED_FDS {
            return Err(self.start_error("too many paths to mount"));
        }
        let (mut output, output_theirs) = std::io::pipe().map_err(|e| self.start_error(e))?;
        let stderr = output_theirs.try_clone().map_err(|e| self.start_error(e))?;
        // Its own cgroups, joined before anything runs (rlimits bound each
        // process; these bound them all together).
        let group = if self.jail.cgroups {
            let limits = cgroup::Limits {
                memory_bytes: self.jail.max_memory_bytes,
                cpus: 1,
            };
            cgroup::WorkerCgroup::create(&cgroup::unique_name(), limits)
                .map_err(|e| self.start_error(e))?
        } else {
            None
        };
        let procs = match &group {
            Some(group) => group.procs_files().map_err(|e| self.start_error(e))?,
            None => Vec::new(),
        };
        let procs_fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        let id = self.lease.id().to_string();
        let mut command = Command::new(&self.jail.worker_exe);
        command
            .args([WORKER_SUBCOMMAND, &id, &id, PIP_MODE, &request])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(output_theirs)
            .stderr(stderr);
        let caller = std::process::id();
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls on integers (`fds` and `procs_fds`
        // are only read).
        unsafe {
            command.pre_exec(move || {
                for fd in &procs_fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // This thread waits for the jail until it is gone, so the
                // jail dies with the process, however that ends.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if u32::try_from(libc::getppid()).ok() != Some(caller) {
                    libc::_exit(1);
                }
                // The host's network namespace: see the module's
                // documentation.
                jail::detach_into_namespaces(&fds, false)
            });
        }
        let mut child = command.spawn().map_err(|e| self.start_error(e))?;
        drop((command, files, procs));
        let deadline = Instant::now() + self.jail.timeout;
        let read = read_bounded(&mut output, deadline, self.jail.max_output);
        if read.over.is_some() {
            let _ = child.kill();
            // The rest of the jail dies with it (parent-death signal of
            // its init): wait, briefly, for their ends of the pipe.
            let _ = read_bounded(&mut output, Instant::now() + Duration::from_secs(5), 0);
        }
        let status = child.wait().map_err(|e| self.start_error(e))?;
        // Whatever of it is left is killed, and the groups removed.
        drop(group);
        let tail = String::from_utf8_lossy(&read.tail).into_owned();
        match read.over {
            Some(Over::Time) => {
                return Err(PipJailError::Timeout {
                    limit: self.jail.timeout,
                    tail,
                })
            }
            Some(Over::Output) => {
                return Err(PipJailError::TooMuchOutput {
                    limit: self.jail.max_output,
                    tail,
                })
            }
            None => {}
        }
        if status.success() {
            return Ok(Ok(()));
        }
        if status.code() == Some(SETUP_FAILED) {
            if let Some(at) = tail.rfind(SETUP_PREFIX) {
                return Err(self.start_error(tail[at + SETUP_PREFIX.len()..].trim()));
            }
        }
        Ok(Err(tail))
    }

    fn start_error(&self, why: impl std::fmt::Display) -> PipJailError {
        PipJailError::Start {
            exe: self.jail.worker_exe.clone(),
            why: why.to_string(),
        }
    }

    /// The jail's mounts (host path, target, writable, exec, devices) and
    /// links.
    #[allow(clippy::type_complexity)]
    fn layout(
        &self,
    ) -> Result<
        (
            Vec<(PathBuf, String, bool, bool, bool)>,
            Vec<(String, String)>,
        ),
        PipJailError,
    > {
        let mut binds = vec![
            (self.build.clone(), BUILD_DIR.to_owned(), true, true, false),
            (self.req.clone(), REQ_DIR.to_owned(), false, false, false),
        ];
        for dev in ["/dev/null", "/dev/zero", "/dev/urandom"] {
            binds.push((dev.into(), dev.to_owned(), true, false, true));
        }
        let mut links = Vec::new();
        // The system, then python's installation, then the paths the
        // host's pip settings name; each once (nothing below a directory
        // already mounted).
        let mut system: Vec<(PathBuf, bool)> = vec![("/usr".into(), true), ("/etc".into(), false)];
        for top in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
            match std::fs::symlink_metadata(top) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target =
                        std::fs::read_link(top).map_err(|e| PipJailError::Io(top.into(), e))?;
                    links.push((top.to_owned(), target.to_string_lossy().into_owned()));
                }
                Ok(meta) if meta.is_dir() => system.push((top.into(), true)),
                _ => {}
            }
        }
        system.extend(self.python.dirs.iter().map(|d| (d.clone(), true)));
        for name in PATH_ENV {
            if let Some(value) = std::env::var_os(name) {
                for part in value.to_string_lossy().split_whitespace() {
                    let path = Path::new(part);
                    if path.is_absolute() {
                        system.push((path.to_path_buf(), false));
                    }
                }
            }
        }
        let mut system: Vec<(PathBuf, bool)> = system
            .into_iter()
            .filter_map(|(path, exec)| Some((std::fs::canonicalize(path).ok()?, exec)))
            .collect();
        // Outer directories first: one mounted later over a mount below
        // it would hide that mount.
        system.sort_by_key(|(path, _)| path.components().count());
        let mut mounted: BTreeSet<PathBuf> = BTreeSet::new();
        for (path, exec) in system {
            if path == Path::new("/") || path.ancestors().any(|a| mounted.contains(a)) {
                continue;
            }
            mounted.insert(path.clone());
            let target = path.to_string_lossy().into_owned();
            binds.push((path, target, false, exec, false));
        }
        Ok((binds, links))
    }

    fn env(&self) -> Vec<(String, String)> {
        let bin = self
            .python
            .exe
            .parent()
            .map_or_else(String::new, |d| format!("{}:", d.display()));
        let mut env = vec![
            (
                "PATH".to_owned(),
                format!("{bin}/usr/local/bin:/usr/bin:/bin"),
            ),
            ("HOME".into(), format!("{BUILD_DIR}/home")),
            ("TMPDIR".into(), format!("{BUILD_DIR}/tmp")),
            ("LANG".into(), "C.UTF-8".into()),
            ("PIP_NO_INPUT".into(), "1".into()),
            ("PIP_NO_CACHE_DIR".into(), "1".into()),
            ("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into()),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ];
        for name in PASSED_ENV {
            if let Ok(value) = std::env::var(name) {
                env.push((name.to_owned(), value));
            }
        }
        env
    }

    /// Copies the directory `name` of [`BUILD_DIR`] (left by pip, which
    /// must have ended) to `to`: directories and regular files only
    /// (anything else is skipped), root's, modes 0755/0644 (0755 for a
    /// file with an execute bit).
    pub fn take_dir(&self, name: &str, to: &Path) -> Result<(), PipJailError> {
        let mut budget = (MAX_TAKEN_ENTRIES, MAX_TAKEN_BYTES);
        copy_out(&self.build.join(name), to, &mut budget)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Nothing of the jail runs any more: its uid is still leased.
        let _ = std::fs::remove_dir_all(&self.build);
    }
}

fn copy_out(from: &Path, to: &Path, budget: &mut (u64, u64)) -> Result<(), PipJailError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| PipJailError::Io(path, e)
    };
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(to)
        .map_err(io(to))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&source).map_err(io(&source))?;
        budget.0 = budget
            .0
            .checked_sub(1)
            .ok_or_else(|| PipJailError::OutputTooLarge(from.into()))?;
        if meta.is_dir() {
            copy_out(&source, &target, budget)?;
        } else if meta.file_type().is_file() {
            budget.1 = budget
                .1
                .checked_sub(meta.len())
                .ok_or_else(|| PipJailError::OutputTooLarge(from.into()))?;
            // Opened without following a link, read as root: the file is
            // one the jail wrote (no hard link crosses its mounts).
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&source)
                .map_err(io(&source))?;
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&target)
                .map_err(io(&target))?;
            std::io::copy(&mut (&mut file).take(meta.len()), &mut out).map_err(io(&target))?;
            out.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io(&target))?;
        } else {
            log::warn!(
                "pip left {} (not a file or directory): skipped",
                source.display()
            );
        }
    }
    Ok(())
}

enum Over {
    Time,
    Output,
}

struct Drained {
    tail: Vec<u8>,
    over: Option<Over>,
}

/// Reads `pipe` until its end, `deadline` or more than `cap` bytes
/// (`cap` 0: no cap), keeping the last [`KEPT_OUTPUT`] bytes.
fn read_bounded(pipe: &mut std::io::PipeReader, deadline: Instant, cap: u64) -> Drained {
    let mut tail = Vec::new();
    let mut total = 0u64;
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Drained {
                tail,
                over: Some(Over::Time),
            };
        }
        let mut pollfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, ms) };
        if ready < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if ready <= 0 {
            continue;
        }
        match pipe.read(&mut buf) {
            Ok(0) => return Drained { tail, over: None },
            Ok(n) => {
                total += n as u64;
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > KEPT_OUTPUT * 2 {
                    tail.drain(..tail.len() - KEPT_OUTPUT);
                }
                if cap > 0 && total > cap {
                    return Drained {
                        tail,
                        over: Some(Over::Output),
                    };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Drained { tail, over: None },
        }
    }
}

/// Asks the host's `python3` (the one the code drive compiles with) where
/// it lives: its interpreter and installation, for the jail's mounts.
fn host_python() -> Result<HostPython, PipJailError> {
    const ASK: &str = "import json, os, sys\n\
        dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]\n\
        dirs += [p for p in sys.path if os.path.isabs(p) and os.path.exists(p)]\n\
        print(json.dumps({'exe': os.path.realpath(sys.executable), 'dirs': dirs}))";
    let output = Command::new("python3")
        .args(["-I", "-c", ASK])
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PipJailError::Python(e.to_string()))?;
    if !output.status.success() {
        return Err(PipJailError::Python(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| PipJailError::Python(e.to_string()))
}

#[derive(Serialize, Deserialize)]
struct WireBind {
    source: Vec<u8>,
    target: String,
    writable: bool,
    exec: bool,
    devices: bool,
}

/// What the jailed side is told (its last argument, JSON).
#[derive(Serialize, Deserialize)]
struct Request {
    /// In descriptor order from 3.
    binds: Vec<WireBind>,
    links: Vec<(String, String)>,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    max_file_bytes: u64,
    max_address_space: u64,
    max_processes: u64,
}

/// The jailed side: `ember __worker <uid> <gid> pip <request>`, started by
/// [`Session::pip`] in its namespaces. Sets up the jail and becomes pip
/// (PID 1 of its PID namespace); returns only if that failed.
pub fn serve(args: &[String]) -> i32 {
    let error = match enter(args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("{SETUP_PREFIX}{error}");
    SETUP_FAILED
}

fn enter(args: &[String]) -> Result<std::convert::Infallible, String> {
    let id = |i: usize| -> Result<u32, String> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| "usage: ember __worker <uid> <gid> pip <request>".to_owned())
    };
    let (uid, gid) = (id(0)?, id(1)?);
    let request: Request = serde_json::from_str(args.get(3).map_or("", String::as_str))
        .map_err(|e| format!("bad request: {e}"))?;
    jail::become_namespace_init().map_err(|e| e.to_string())?;
    let count = RawFd::try_from(request.binds.len()).map_err(|_| "too many mounts".to_owned())?;
    jail::close_fds_from((3 + count) as u32).map_err(|e| e.to_string())?;
    let cstring = |b: Vec<u8>| CString::new(b).map_err(|_| "a path with a NUL byte".to_owned());
    let mut binds = Vec::new();
    let mut fds = Vec::new();
    for (i, bind) in request.binds.into_iter().enumerate() {
        let fd = 3 + i as RawFd;
        // SAFETY: the parent handed descriptors 3.. over, one per mount,
        // for us alone.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        binds.push(Bind {
            source: cstring(bind.source)?,
            fd,
            target: cstring(bind.target.into_bytes())?,
            writable: bind.writable,
            exec: bind.exec,
            devices: bind.devices,
        });
    }
    let links = request
        .links
        .into_iter()
        .map(|(path, target)| {
            Ok(Link {
                path: cstring(path.into_bytes())?,
                target: cstring(target.into_bytes())?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    jail::enter_root(&RootLayout {
        binds: &binds,
        links: &links,
        proc: true,
    })
    .map_err(|e| e.to_string())?;
    drop(fds);
    jail::drop_privileges(&JailConfig {
        uid,
        gid,
        max_files: 4096,
        max_processes: request.max_processes,
        max_file_bytes: Some(request.max_file_bytes),
        dumpable: false,
        max_address_space: Some(request.max_address_space),
    })
    .map_err(|e| e.to_string())?;
    // pip is PID 1 from here: when it ends, so does all it started.
    let error = Command::new(&request.program)
        .args(&request.args)
        .env_clear()
        .envs(request.env)
        .current_dir(&request.cwd)
        .exec();
    Err(format!("cannot run {}: {error}", request.program))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn output_is_capped_and_its_end_kept() {
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let writing = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..64 {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
            }
            let _ = writer.write_all(b"the end");
        });
        let far = Instant::now() + Duration::from_secs(60);
        let read = read_bounded(&mut reader, far, 1 << 20);
        assert!(matches!(read.over, Some(Over::Output)));
        assert!(read.tail.len() <= 2 * KEPT_OUTPUT);
        drop(reader);
        writing.join().unwrap();

        // Under the cap: everything to the end, its last bytes kept.
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let writing = std::thread::spawn(move || writer.write_all(&vec![b'y'; 300 << 10]));
        let read = read_bounded(&mut reader, far, 1 << 20);
        writing.join().unwrap().unwrap();
        assert!(read.over.is_none());
        assert!(read.tail.len() >= KEPT_OUTPUT && read.tail.ends_with(b"y"));

        // Silent past the deadline.
        let (mut reader, _writer) = std::io::pipe().unwrap();
        let read = read_bounded(&mut reader, Instant::now() + Duration::from_millis(50), 0);
        assert!(matches!(read.over, Some(Over::Time)));
    }
}
