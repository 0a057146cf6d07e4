//! seccomp filters on a microVM's threads: a filtered sandbox works, the
//! filters are really installed (and only on the VM's threads), and a
//! forbidden system call kills the whole process with SIGSYS.
//!
//! The violation tests run this test binary again in a child process
//! (`EMBER_SECCOMP_CHILD` names what the child does): its death is the
//! expected outcome, and the parent checks how it died.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use ember::seccomp::Filter;

/// Set in a child process: which forbidden call to make, under which filter.
const CHILD_ENV: &str = "EMBER_SECCOMP_CHILD";

/// The seccomp mode of thread `tid` of this process (0: none, 2: filter).
fn seccomp_mode(tid: &str) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

/// (name, seccomp mode) of every thread of this process.
fn threads() -> Vec<(String, u32)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| {
            let tid = entry.ok()?.file_name().into_string().ok()?;
            let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            Some((name.trim().to_string(), seccomp_mode(&tid)?))
        })
        .collect()
}

#[test]
fn a_filtered_sandbox_runs_an_invocation() {
    let mut sandbox = common::sandbox();
    let outcome = sandbox
        .invoke(&common::sh(
            "echo out; echo err >&2; head -c 100000 /dev/zero | wc -c; exit 3",
        ))
        .unwrap();
    assert_eq!(outcome.shell_exit_code(), 3);
    assert_eq!(outcome.stdout, b"out\n100000\n");
    assert_eq!(outcome.stderr, b"err\n");
}

#[test]
fn filters_are_installed_on_the_vm_threads_only() {
    // This test runs in a child of its own, so no other test's microVM
    // (with or without filters) shares the process.
    if std::env::var_os(CHILD_ENV).is_none() {
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "filters_are_installed_on_the_vm_threads_only",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD_ENV, "threads")
            .status()
            .unwrap();
        assert!(status.success(), "child: {status:?}");
        return;
    }
    let vm_threads = |threads: &[(String, u32)]| {
        threads
            .iter()
            .filter(|(name, _)| name.starts_with("ember-vcpu") || name == "ember-events")
            .map(|(_, mode)| *mode)
            .collect::<Vec<_>>()
    };
    let snapshot = common::shared_snapshot();
    let filtered = snapshot.restore(&Default::default()).unwrap();
    let seen = threads();
    assert_eq!(vm_threads(&seen), vec![2; 1 + snapshot.vcpus() as usize]);
    // The caller's threads (this one included) are untouched. (KVM's own
    // kernel workers, e.g. `kvm-nx-lpage-recovery`, started by the first
    // KVM_RUN, are listed as tasks of this process and inherit the vCPU
    // thread's filter; they never make system calls.)
    assert!(
        seen.iter()
            .filter(|(name, _)| !name.starts_with("ember-") && !name.starts_with("kvm-"))
            .all(|(_, mode)| *mode == 0),
        "{seen:?}"
    );
    drop(filtered);

    let options = ember::snapshot::RestoreOptions {
        seccomp: false,
        ..Default::default()
    };
    let unfiltered = snapshot.restore(&options).unwrap();
    // Unfiltered threads are not waited for: they name themselves soon.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut modes = vm_threads(&threads());
    while modes.len() < 1 + snapshot.vcpus() as usize && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
        modes = vm_threads(&threads());
    }
    assert_eq!(modes, vec![0; 1 + snapshot.vcpus() as usize]);
    drop(unfiltered);
}

/// The control filter covers what a worker's control thread does with a
/// running sandbox: invoke (agent frames, read timeouts), stop (kick and
/// join the vCPU threads), tear down (close, unmap).
#[test]
fn control_filter_covers_an_invocation_and_teardown() {
    const TEST: &str = "control_filter_covers_an_invocation_and_teardown";
    if std::env::var_os(CHILD_ENV).is_none() {
        let status = run_child(TEST, "control");
        assert!(status.success(), "child: {status:?}");
        return;
    }
    let mut sandbox = common::sandbox();
    Filter::Control.install().unwrap();
    let outcome = sandbox
        .invoke(&common::sh("echo out; echo err >&2; exit 4"))
        .unwrap();
    assert_eq!(outcome.shell_exit_code(), 4);
    assert_eq!(
        (&outcome.stdout[..], &outcome.stderr[..]),
        (&b"out\n"[..], &b"err\n"[..])
    );
    let second = sandbox.invoke(&common::sh("true"));
    assert!(second.is_err(), "a sandbox serves one invocation");
    drop(sandbox);
}

/// Runs `test` (a test of this binary) in a child process told to do
/// `what`, and returns how the child ended.
fn run_child(test: &str, what: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, what)
        .status()
        .unwrap()
}

/// In the child: installs `filter` on a new thread and makes the forbidden
/// call there. Returns only if the call was allowed.
fn violate(filter: Filter, call: fn() -> i64) -> i64 {
    std::thread::spawn(move || {
        filter.install().unwrap();
        call()
    })
    .join()
    .unwrap()
}

fn inet_socket() -> i64 {
    // SAFETY: socket(2) with integer arguments.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }.into()
}

fn unix_socket() -> i64 {
    // SAFETY: socket(2) with integer arguments; the descriptor is leaked
    // (the child exits right after).
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }.into()
}

fn unix_connect() -> i64 {
    // SAFETY: connect(2) on a bad descriptor with no address: it fails
    // (EBADF) or is killed; no memory is accessed.
    unsafe { libc::connect(-1, std::ptr::null(), 0) }.into()
}

fn fork() -> i64 {
    // SAFETY: the raw fork syscall; should it be allowed (a failure of this
    // test), the child exits at once without running any Rust code.
    let pid = unsafe { libc::syscall(libc::SYS_fork) };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    pid
}

fn open_file() -> i64 {
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) }.into()
}

fn kvm_set_regs() -> i64 {
    // KVM_SET_REGS on a bogus fd: the filter must stop it on the request
    // number before the kernel looks at the fd.
    const KVM_SET_REGS: libc::c_ulong = 0x4090_ae82;
    // SAFETY: the call fails (bad fd) or is killed; no memory is accessed.
    unsafe { libc::ioctl(-1, KVM_SET_REGS, std::ptr::null_mut::<u8>()) }.into()
}

fn executable_memory() -> i64 {
    // SAFETY: an anonymous mapping; never used.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    p as i64
}

/// A forbidden call: its name, the filter that forbids it, the call.
type Violation = (&'static str, Filter, fn() -> i64);

/// The forbidden calls the violation test makes.
const VIOLATIONS: &[Violation] = &[
    ("vcpu-socket", Filter::Vcpu, inet_socket),
    ("vcpu-fork", Filter::Vcpu, fork),
    ("vcpu-open", Filter::Vcpu, open_file),
    ("vcpu-ioctl", Filter::Vcpu, kvm_set_regs),
    ("vcpu-exec-mmap", Filter::Vcpu, executable_memory),
    ("events-inet-socket", Filter::EventLoop, inet_socket),
    ("events-open", Filter::EventLoop, open_file),
    // Hostile (issue 13, item 9): without a vsock Unix socket the event
    // loop creates and connects no socket; it could before.
    ("hostile-events-unix-socket", Filter::EventLoop, unix_socket),
    ("hostile-events-connect", Filter::EventLoop, unix_connect),
    ("hostile-control-unix-socket", Filter::Control, unix_socket),
    ("hostile-control-connect", Filter::Control, unix_connect),
    (
        "events-uds-inet-socket",
        Filter::EventLoopVsockUds,
        inet_socket,
    ),
    ("control-fork", Filter::Control, fork),
    ("control-ioctl", Filter::Control, kvm_set_regs),
];

/// A microVM with a vsock Unix socket still gets to make and connect one.
#[test]
fn vsock_uds_event_loop_may_make_unix_sockets() {
    const TEST: &str = "vsock_uds_event_loop_may_make_unix_sockets";
    if std::env::var_os(CHILD_ENV).is_none() {
        let status = run_child(TEST, "uds");
        assert!(status.success(), "child: {status:?}");
        return;
    }
    let fd = violate(Filter::EventLoopVsockUds, unix_socket);
    assert!(fd >= 0, "socket(AF_UNIX) failed");
    // Refused by the kernel (bad fd), not by the filter.
    assert_eq!(violate(Filter::EventLoopVsockUds, unix_connect), -1);
}

#[test]
fn a_violation_kills_the_process_with_sigsys() {
    const TEST: &str = "a_violation_kills_the_process_with_sigsys";
    if let Some(what) = std::env::var_os(CHILD_ENV) {
        let what = what.to_string_lossy();
        let (_, filter, call) = VIOLATIONS
            .iter()
            .find(|(name, _, _)| *name == what)
            .expect("known violation");
        let result = violate(*filter, *call);
        // Still alive: the filter let the call through.
        eprintln!("{what}: not killed, the call returned {result}");
        std::process::exit(0);
    }
    for (name, _, _) in VIOLATIONS {
        let status = run_child(TEST, name);
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{name}: the child should die by SIGSYS: {status:?}"
        );
    }
}
