//! Isolation: jailed worker processes, what a guest can reach, absurd
//! requests, and resource leaks over many sandboxes.

mod common;

use std::path::Path;

use common::{sh, shared_snapshot};
use ember::sandbox::ExitStatus;
use ember::snapshot::RestoreOptions;
use ember::worker::Isolation;
use ember::{Invocation, Sandbox};

fn isolated() -> RestoreOptions {
    RestoreOptions {
        isolation: Some(Isolation::new(env!("CARGO_BIN_EXE_ember"))),
        ..RestoreOptions::default()
    }
}

/// The jailed process: the worker's only child (PID 1 of its namespace).
fn jailed_pid(worker: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{worker}/task/{worker}/children"))
        .expect("children of the worker");
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the worker has its jailed child")
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn ns(pid: &str, kind: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn isolated_worker_is_jailed_and_serves() {
    let mut sandbox = Sandbox::restore(shared_snapshot(), &isolated()).expect("isolated restore");
    let pid = jailed_pid(sandbox.worker_pid().expect("isolated sandbox has a worker"));

    let uids: Vec<String> = status_field(pid, "Uid:")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(uids.len(), 4);
    assert!(uids.iter().all(|u| u != "0"), "worker uids {uids:?}");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .expect("the jail root is readable from the host")
        .collect();
    assert!(root.is_empty(), "the jail root must be empty: {root:?}");
    for kind in ["mnt", "net", "ipc", "uts", "pid"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 64, "worker holds {fds} descriptors");

    let outcome = sandbox.invoke(&sh("echo isolated")).expect("invoke");
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(outcome.stdout, b"isolated\n");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "worker gone after the invocation"
    );
}

#[test]
fn guest_has_no_network_and_no_host_files() {
    let outcome = common::sandbox()
        .invoke(&sh(
            "ls /sys/class/net 2>/dev/null | grep -v '^lo$'; cut -d' ' -f3 /proc/mounts | sort -u",
        ))
        .unwrap();
    let stdout = String::from_utf8(outcome.stdout).unwrap();
    let filesystems: Vec<&str> = stdout.lines().collect();
    let allowed = [
        "cgroup2", "devpts", "devtmpfs", "proc", "rootfs", "sysfs", "tmpfs",
    ];
    for fs in &filesystems {
        assert!(
            allowed.contains(fs),
            "unexpected interface or filesystem {fs:?} in {stdout}"
        );
    }
}

#[test]
fn absurd_requests_get_clear_errors() {
    let mut empty = Invocation::new(Vec::<String>::new());
    empty.timeout_ms = 1000;
    let err = common::sandbox().invoke(&empty).unwrap_err().to_string();
    assert!(err.contains("argv"), "{err}");

    let mut no_time = Invocation::new(["true"]);
    no_time.timeout_ms = 0;
    let err = common::sandbox().invoke(&no_time).unwrap_err().to_string();
    assert!(err.contains("timeout"), "{err}");

    let huge = Invocation::new(["echo".to_string(), "x".repeat(100 << 20)]);
    let err = common::sandbox().invoke(&huge).unwrap_err().to_string();
    assert!(err.contains("over the limit"), "{err}");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    status_field(std::process::id(), "VmRSS:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// 200 restore+invoke cycles (in-process and a few isolated) must not
/// leak descriptors, threads or memory in the parent.
#[test]
fn many_cycles_leave_fds_and_rss_flat() {
    let cycle = |options: &RestoreOptions| {
        let outcome = Sandbox::restore(shared_snapshot(), options)
            .expect("restore")
            .invoke(&Invocation::new(["true"]))
            .expect("invoke");
        assert_eq!(outcome.status, ExitStatus::Code(0));
    };
    let in_process = RestoreOptions::default();
    for _ in 0..10 {
        cycle(&in_process);
    }
    let (fds, rss) = (open_fds(), rss_kib());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..90 {
                    cycle(&in_process);
                }
            });
        }
    });
    let isolated = isolated();
    for _ in 0..10 {
        cycle(&isolated);
    }
    assert_eq!(open_fds(), fds, "descriptors leaked");
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB over 200 cycles");
}

/// A worker that breaks its seccomp filter dies alone; the parent reports
/// it as a sandbox failure and carries on.
#[test]
fn seccomp_violation_kills_only_the_worker() {
    let mut options = isolated();
    if let Some(isolation) = options.isolation.as_mut() {
        isolation.violate_seccomp = true;
    }
    let err = Sandbox::restore(shared_snapshot(), &options).expect_err("the worker must die");
    let message = err.to_string();
    assert!(message.contains("seccomp"), "{message}");
    let outcome = Sandbox::restore(shared_snapshot(), &isolated())
        .expect("the next worker is fine")
        .invoke(&Invocation::new(["true"]))
        .expect("invoke");
    assert_eq!(outcome.status, ExitStatus::Code(0));
}
