//! Starting an invocation's process the cheap way: `clone(CLONE_VM |
//! CLONE_VFORK)`, as `posix_spawn` does, instead of `fork`.
//!
//! A fork copies the agent's page tables and then takes a copy-on-write
//! fault on every page either side touches; in ember's test guests that is
//! a quarter of a second more per invocation. With `CLONE_VM` the child
//! runs in the agent's memory, on a stack of its own, while the agent is
//! suspended (`CLONE_VFORK`) until the child has called `execve` or exited.
//! So the child does nothing but raw system calls on data prepared
//! beforehand: no allocation, no locks, no libc wrapper that keeps state
//! (glibc's set*id wrappers would try to broadcast to the parent's threads).
//!
//! Before `execve` the child, still root, moves itself into the
//! invocation's cgroup (writing `0` to a `cgroup.procs` the agent opened),
//! starts a session (and so a process group) of its own, drops to the
//! sandbox user, sets `no_new_privs`, changes directory, puts the pipes on
//! 0/1/2 and clears the signal mask the agent runs with. A failure is
//! written into memory the agent reads once it resumes.
//!
//! A function runtime (see [`function`](crate::function)) also gets its
//! request and response pipes on fds 3 and 4, every other descriptor
//! closed, and, for the hot path, the doorbell (`/dev/mem`, opened by the
//! agent, on fd [`DOORBELL_FD`](crate::hotpath::DOORBELL_FD)) and a higher
//! `RLIMIT_MEMLOCK`, both granted while the child is still root. The open
//! descriptor survives the `setresuid` and the `execve`.

use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::ptr;

use thiserror::Error;

use crate::sys;

/// Size of the child's stack. It makes a dozen system calls and nothing
/// else; the memory is allocated once and reused, so its pages are faulted
/// in by the first invocation only.
const STACK_SIZE: usize = 64 * 1024;

/// Starting the process failed.
#[derive(Debug, Error)]
pub(crate) enum SpawnError {
    #[error("clone: {source}")]
    Clone { source: io::Error },
    #[error("{step}: {source}")]
    Child {
        /// The child, which exited with status 127; the reaper collects it.
        pid: libc::pid_t,
        step: Step,
        source: io::Error,
    },
    #[error("standard streams: descriptor {fd} is below 3 (the agent's console is missing)")]
    LowFd { fd: RawFd },
}

/// What the child could not grant for the hot path (it then ran the
/// program without [`HOT_PATH_ENV`]).
#[derive(Debug)]
pub(crate) struct HotPathDenied {
    pub(crate) step: &'static str,
    pub(crate) source: io::Error,
}

impl fmt::Display for HotPathDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

/// The variable a hot-path runtime finds in its environment when the
/// doorbell and the memory lock limit were granted.
pub(crate) const HOT_PATH_ENV: &str = "EMBER_HOT_PATH=1";

/// The hot-path grants of a [`Plan`].
pub(crate) struct HotPath {
    /// `/dev/mem`, opened by the agent, for the child's fd
    /// [`crate::hotpath::DOORBELL_FD`] (the runtime maps the doorbell page
    /// from it). Must be above that fd number.
    pub(crate) doorbell: RawFd,
    /// `RLIMIT_MEMLOCK` to set, soft and hard (a `struct rlimit64`).
    pub(crate) memlock: [u64; 2],
}

/// What the child was doing when it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Cgroup,
    Setsid,
    Setgroups,
    Setgid,
    Setuid,
    NoNewPrivs,
    Chdir(String),
    Stdio,
    Pipes,
    SignalMask,
    Exec(String),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Cgroup => f.write_str("join the invocation's cgroup"),
            Step::Setsid => f.write_str("setsid"),
            Step::Setgroups => f.write_str("setgroups"),
            Step::Setgid => f.write_str("setgid"),
            Step::Setuid => f.write_str("setuid"),
            Step::NoNewPrivs => f.write_str("prctl(PR_SET_NO_NEW_PRIVS)"),
            Step::Chdir(dir) => write!(f, "chdir {dir}"),
            Step::Stdio => f.write_str("set up stdin/stdout/stderr"),
            Step::Pipes => f.write_str("set up the pipes on fds 3 and 4"),
            Step::SignalMask => f.write_str("clear the signal mask"),
            Step::Exec(program) => write!(f, "execute {program}"),
        }
    }
}

/// The child's stack, kept for the agent's whole life.
pub(crate) struct Stack {
    memory: Box<[u128]>,
}

impl Stack {
    pub(crate) fn new() -> Self {
        // u128 elements make the memory 16-byte aligned, as the x86-64 and
        // aarch64 ABIs want a stack to be.
        Stack {
            memory: vec![0u128; STACK_SIZE / 16].into_boxed_slice(),
        }
    }

    /// The highest address: stacks grow down.
    fn top(&mut self) -> *mut c_void {
        self.memory.as_mut_ptr_range().end.cast()
    }
}

/// Everything the child needs, prepared by the agent.
pub(crate) struct Plan {
    /// Paths to try with `execve`, in order (the `PATH` lookup).
    pub(crate) programs: Vec<CString>,
    /// `argv[0]`, for messages.
    name: String,
    /// NULL-terminated `argv` pointing into `argv_storage`.
    argv: Vec<*const c_char>,
    _argv_storage: Vec<CString>,
    /// NULL-terminated `envp` pointing into `env_storage`.
    envp: Vec<*const c_char>,
    _env_storage: Vec<CString>,
    pub(crate) cwd: CString,
    pub(crate) stdin: RawFd,
    pub(crate) stdout: RawFd,
    pub(crate) stderr: RawFd,
    /// Descriptors to put on the child's fds 3 and 4 (a function runtime's
    /// request and response pipes). Both must be 5 or above.
    pub(crate) pipes: Option<(RawFd, RawFd)>,
    /// Close every descriptor from this one up before `execve` (besides
    /// close-on-exec, which every descriptor of the agent has).
    pub(crate) close_from: Option<RawFd>,
    /// Hot-path grants; see [`Plan::grant_hot_path`].
    hot_path: Option<HotPath>,
    /// `cgroup.procs` of the invocation's group, opened for writing.
    pub(crate) cgroup_procs: Option<RawFd>,
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
}

impl Plan {
    /// A plan with `argv` and `env` converted; the caller fills in the rest.
    pub(crate) fn new(
        programs: Vec<CString>,
        argv: Vec<CString>,
        env: Vec<CString>,
        cwd: CString,
    ) -> Self {
        let argv_ptrs = argv
            .iter()
            .map(|arg| arg.as_ptr())
            .chain([ptr::null()])
            .collect();
        let env_ptrs = env
            .iter()
            .map(|var| var.as_ptr())
            .chain([ptr::null()])
            .collect();
        let name = argv
            .first()
            .map(|arg| arg.to_string_lossy().into_owned())
            .unwrap_or_default();
        Plan {
            programs,
            name,
            argv: argv_ptrs,
            _argv_storage: argv,
            envp: env_ptrs,
            _env_storage: env,
            cwd,
            stdin: -1,
            stdout: -1,
            stderr: -1,
            pipes: None,
            close_from: None,
            hot_path: None,
            cgroup_procs: None,
            uid: 0,
            gid: 0,
        }
    }

    /// Asks the child to grant `hot_path` before it drops privileges. When
    /// both grants succeed the program also gets [`HOT_PATH_ENV`] (first in
    /// its environment); when one fails it runs without it, and
    /// [`spawn_reporting`] says what failed.
    pub(crate) fn grant_hot_path(&mut self, hot_path: HotPath) -> io::Result<()> {
        let var = sys::cstring(HOT_PATH_ENV)?;
        // The CString's bytes live on the heap: moving it into the storage
        // leaves the pointer valid.
        self.envp.insert(0, var.as_ptr());
        self._env_storage.push(var);
        self.hot_path = Some(hot_path);
        Ok(())
    }
}

/// What the child reports back through shared memory.
struct Failure {
    step: ChildStep,
    errno: c_int,
    /// Index into `programs` for an exec failure.
    program: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChildStep {
    None,
    Cgroup,
    Setsid,
    Setgroups,
    Setgid,
    Setuid,
    NoNewPrivs,
    Chdir,
    Stdio,
    Pipes,
    SignalMask,
    Exec,
}

struct ChildArgs<'a> {
    plan: &'a Plan,
    failure: Failure,
    /// A hot-path grant that failed: (step, errno).
    hot_path_denied: Option<(HotPathStep, c_int)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HotPathStep {
    Doorbell,
    Memlock,
}

/// Starts the planned process and returns its pid once it has called
/// `execve` successfully.
pub(crate) fn spawn(plan: &Plan, stack: &mut Stack) -> Result<libc::pid_t, SpawnError> {
    spawn_reporting(plan, stack).map(|(pid, _)| pid)
}

/// [`spawn`], also telling which hot-path grant failed, if one was asked
/// for and did.
pub(crate) fn spawn_reporting(
    plan: &Plan,
    stack: &mut Stack,
) -> Result<(libc::pid_t, Option<HotPathDenied>), SpawnError> {
    for fd in [plan.stdin, plan.stdout, plan.stderr] {
        // dup3 onto 0..=2 would clobber a source that is itself 0..=2; the
        // agent keeps its console there, so this means something is off.
        if fd < 3 {
            return Err(SpawnError::LowFd { fd });
        }
    }
    if let Some((request, response)) = plan.pipes {
        // Likewise for 3 and 4 (and a source that is the other target).
        for fd in [request, response] {
            if fd < 5 {
                return Err(SpawnError::LowFd { fd });
            }
        }
    }
    let mut args = ChildArgs {
        plan,
        failure: Failure {
            step: ChildStep::None,
            errno: 0,
            program: 0,
        },
        hot_path_denied: None,
    };
    let args_ptr: *mut ChildArgs<'_> = &mut args;
    // SAFETY: `child` only makes raw system calls on `args`, which lives
    // until clone returns; CLONE_VFORK keeps this thread suspended (and so
    // `args` and the stack untouched by it) until the child has exec'd or
    // exited. The stack is STACK_SIZE bytes of our own memory, 16-byte
    // aligned at the top, used by nobody else.
    let pid = unsafe {
        libc::clone(
            child,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            args_ptr.cast(),
        )
    };
    if pid < 0 {
        return Err(SpawnError::Clone {
            source: sys::last_error(),
        });
    }
    // SAFETY: the child has exec'd or exited: nobody writes `args` any
    // more. A volatile read, because the compiler cannot see the write the
    // child made through the pointer.
    let failure = unsafe { ptr::read_volatile(ptr::addr_of!((*args_ptr).failure)) };
    // SAFETY: as above.
    let denied = unsafe { ptr::read_volatile(ptr::addr_of!((*args_ptr).hot_path_denied)) };
    let step = match failure.step {
        ChildStep::None => {
            let denied = denied.map(|(step, errno)| HotPathDenied {
                step: match step {
                    HotPathStep::Doorbell => "hand over the doorbell (/dev/mem)",
                    HotPathStep::Memlock => "raise RLIMIT_MEMLOCK",
                },
                source: io::Error::from_raw_os_error(errno),
            });
            return Ok((pid, denied));
        }
        ChildStep::Cgroup => Step::Cgroup,
        ChildStep::Setsid => Step::Setsid,
        ChildStep::Setgroups => Step::Setgroups,
        ChildStep::Setgid => Step::Setgid,
        ChildStep::Setuid => Step::Setuid,
        ChildStep::NoNewPrivs => Step::NoNewPrivs,
        ChildStep::Chdir => Step::Chdir(plan.cwd.to_string_lossy().into_owned()),
        ChildStep::Stdio => Step::Stdio,
        ChildStep::Pipes => Step::Pipes,
        ChildStep::SignalMask => Step::SignalMask,
        // After a PATH search, the name asked for says more than the last
        // directory tried.
        ChildStep::Exec if plan.programs.len() > 1 => Step::Exec(plan.name.clone()),
        ChildStep::Exec => Step::Exec(
            plan.programs
                .get(failure.program)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    };
    Err(SpawnError::Child {
        pid,
        step,
        source: io::Error::from_raw_os_error(failure.errno),
    })
}

/// The child: runs on `Stack`, in the agent's memory.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildArgs` that `spawn` passed, alive and not
    // touched by the suspended parent.
    let args = unsafe { &mut *arg.cast::<ChildArgs<'_>>() };
    let (step, errno, program) = prepare_and_exec(args.plan, &mut args.hot_path_denied);
    args.failure = Failure {
        step,
        errno,
        program,
    };
    // SAFETY: ends only this child (its own thread group), without running
    // atexit handlers or flushing stdio buffers that belong to the agent.
    unsafe { libc::_exit(127) }
}

/// Returns only on failure: what failed, errno, program index.
fn prepare_and_exec(
    plan: &Plan,
    hot_path_denied: &mut Option<(HotPathStep, c_int)>,
) -> (ChildStep, c_int, usize) {
    macro_rules! try_sys {
        ($step:expr, $call:expr) => {
            if $call < 0 {
                return ($step, child_errno(), 0);
            }
        };
    }
    // Variadic arguments are passed as full `long`s: libc's syscall()
    // reads every argument as one, and the upper half of a narrower value
    // would be whatever the register held.
    let uid = c_long::from(plan.uid);
    let gid = c_long::from(plan.gid);
    // SAFETY: for every raw system call below, the arguments are plain
    // integers or pointers into `plan`, which outlives the child; none of
    // the calls touches memory the parent uses concurrently (it is
    // suspended) or any libc state.
    unsafe {
        if let Some(fd) = plan.cgroup_procs {
            // "0" moves the writing process. Done first, while still root,
            // so nothing the program starts can be outside the group.
            try_sys!(
                ChildStep::Cgroup,
                libc::syscall(
                    libc::SYS_write,
                    c_long::from(fd),
                    c"0".as_ptr(),
                    1 as c_long
                )
            );
        }
        try_sys!(ChildStep::Setsid, libc::syscall(libc::SYS_setsid));
        // The environment: with HOT_PATH_ENV first when the hot path was
        // granted, from the next entry on when not.
        let mut envp = plan.envp.as_ptr();
        if let Some(hot_path) = &plan.hot_path {
            // The memory lock limit needs root: before the setresuid below.
            let denied = if libc::syscall(
                libc::SYS_dup3,
                c_long::from(hot_path.doorbell),
                c_long::from(crate::hotpath::DOORBELL_FD),
                0 as c_long,
            ) < 0
            {
                Some((HotPathStep::Doorbell, child_errno()))
            } else if libc::syscall(
                libc::SYS_prlimit64,
                0 as c_long,
                c_long::from(libc::RLIMIT_MEMLOCK),
                hot_path.memlock.as_ptr(),
                ptr::null::<u64>(),
            ) < 0
            {
                Some((HotPathStep::Memlock, child_errno()))
            } else {
                None
            };
            if denied.is_some() {
                // No hot path: no /dev/mem either.
                libc::syscall(libc::SYS_close, c_long::from(crate::hotpath::DOORBELL_FD));
                // Volatile: the parent reads it once it resumes, through a
                // pointer the compiler cannot see.
                ptr::write_volatile(hot_path_denied, denied);
                envp = envp.add(1);
            }
        }
        try_sys!(
            ChildStep::Setgroups,
            libc::syscall(libc::SYS_setgroups, 0 as c_long, ptr::null::<libc::gid_t>())
        );
        try_sys!(
            ChildStep::Setgid,
            libc::syscall(libc::SYS_setresgid, gid, gid, gid)
        );
        try_sys!(
            ChildStep::Setuid,
            libc::syscall(libc::SYS_setresuid, uid, uid, uid)
        );
        try_sys!(
            ChildStep::NoNewPrivs,
            libc::syscall(
                libc::SYS_prctl,
                c_long::from(libc::PR_SET_NO_NEW_PRIVS),
                1 as c_long,
                0 as c_long,
                0 as c_long,
                0 as c_long
            )
        );
        // After dropping privileges: an absolute cwd from the host is
        // entered with the sandbox user's rights, not root's.
        try_sys!(
            ChildStep::Chdir,
            libc::syscall(libc::SYS_chdir, plan.cwd.as_ptr())
        );
        for (from, to) in [(plan.stdin, 0i32), (plan.stdout, 1), (plan.stderr, 2)] {
            // dup3 leaves close-on-exec off on the copy; the originals
            // have it and vanish at execve.
            try_sys!(
                ChildStep::Stdio,
                libc::syscall(
                    libc::SYS_dup3,
                    c_long::from(from),
                    c_long::from(to),
                    0 as c_long
                )
            );
        }
        if let Some((request, response)) = plan.pipes {
            // The sources are 5 or above (checked by spawn_reporting): the
            // first dup3 cannot clobber the second's source.
            for (from, to) in [(request, 3), (response, 4)] {
                try_sys!(
                    ChildStep::Pipes,
                    libc::syscall(
                        libc::SYS_dup3,
                        c_long::from(from),
                        c_long::from(to),
                        0 as c_long
                    )
                );
            }
        }
        if let Some(from) = plan.close_from {
            // Best effort: everything the agent opens is close-on-exec
            // anyway; this also covers what it inherited (tests on a host).
            libc::syscall(
                libc::SYS_close_range,
                c_long::from(from),
                c_long::from(u32::MAX),
                0 as c_long,
            );
        }
        // The agent blocks SIGCHLD and its power-off signals; a blocked mask
        // survives execve and would break the program's own signal use.
        let empty: u64 = 0;
        try_sys!(
            ChildStep::SignalMask,
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                c_long::from(libc::SIG_SETMASK),
                ptr::addr_of!(empty),
                ptr::null::<u64>(),
                std::mem::size_of::<u64>() as c_long
            )
        );
        // The PATH search of execvp: skip candidates that do not exist,
        // remember EACCES, stop at any other error.
        let mut saved: Option<(c_int, usize)> = None;
        for (index, program) in plan.programs.iter().enumerate() {
            libc::syscall(libc::SYS_execve, program.as_ptr(), plan.argv.as_ptr(), envp);
            let errno = child_errno();
            match errno {
                libc::ENOENT | libc::ENOTDIR => {
                    if saved.is_none() {
                        saved = Some((errno, index));
                    }
                }
                libc::EACCES => saved = Some((errno, index)),
                _ => return (ChildStep::Exec, errno, index),
            }
        }
        let (errno, index) = saved.unwrap_or((libc::ENOENT, 0));
        (ChildStep::Exec, errno, index)
    }
}

/// errno of the last failed call. `libc::syscall` stores it in the calling
/// thread's TLS, which the child shares with the suspended parent thread,
/// so it is read right away.
fn child_errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot,
    // always valid.
    unsafe { *libc::__errno_location() }
}
