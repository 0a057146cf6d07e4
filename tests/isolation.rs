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
    // Other tests of this binary run beside this one and hold descriptors
    // for a while, and a worker's stderr forwarder closes its pipe when it
    // has read the last line: wait (bounded) for the count to come back.
    let settled = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while open_fds() > fds && std::time::Instant::now() < settled {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        open_fds() <= fds,
        "descriptors leaked: {} before, {} after",
        fds,
        open_fds()
    );
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

/// `/proc/<pid>/task/<tid>/cgroup` lines of every task of `pid`.
fn task_cgroups(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks of the worker")
        .filter_map(|entry| {
            let tid = entry.ok()?.file_name().into_string().ok()?;
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).ok()?;
            Some((tid, text))
        })
        .collect()
}

/// The worker's group in `controller` (v1) or the unified hierarchy (v2),
/// as `/proc/<pid>/cgroup` names it.
fn cgroup_of(cgroup_file: &str, controller: &str) -> Option<String> {
    cgroup_file.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let v2 = controllers.is_empty() && !std::path::Path::new("/sys/fs/cgroup/memory").exists();
        (v2 || controllers.split(',').any(|c| c == controller)).then(|| path.to_string())
    })
}

/// Hostile (issue 13, item 1): every task of a jailed worker, the vCPU
/// threads of its jailed child included, is in the worker's memory and
/// pids cgroups. Before the fix only the outer waiter was moved; the
/// process running the VM (forked before the move) stayed in the caller's
/// groups, outside every limit.
#[test]
fn hostile_every_task_of_a_jailed_worker_is_in_its_cgroup() {
    let sandbox = Sandbox::restore(shared_snapshot(), &isolated()).expect("isolated restore");
    let outer = sandbox.worker_pid().expect("isolated sandbox has a worker");
    let jailed = jailed_pid(outer);
    let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut tasks = task_cgroups(outer);
    tasks.extend(task_cgroups(jailed));
    assert!(tasks.len() >= 3, "outer, jailed main and vCPU: {tasks:?}");
    // And every one of them is under a seccomp filter (issue 13, item 3),
    // the outer waiter included.
    for pid in [outer, jailed] {
        let filters = task_filters(pid);
        assert!(
            filters.iter().all(|(_, mode)| mode == "2"),
            "unfiltered tasks of worker process {pid}: {filters:?}"
        );
    }
    for controller in ["memory", "pids"] {
        let expected = cgroup_of(&task_cgroups(outer)[0].1, controller).unwrap();
        assert!(
            expected.contains("/worker-"),
            "the worker is in its own {controller} group: {expected}"
        );
        assert_ne!(Some(&expected), cgroup_of(&ours, controller).as_ref());
        for (tid, text) in &tasks {
            assert_eq!(
                cgroup_of(text, controller).as_ref(),
                Some(&expected),
                "task {tid} of the worker is outside its {controller} group"
            );
        }
    }
}

/// Memory charged to the cgroup `path` (as `/proc/<pid>/cgroup` names it).
fn memory_usage(path: &str) -> u64 {
    let v1 = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
    let file = if v1.exists() {
        v1.join("memory.usage_in_bytes")
    } else {
        Path::new("/sys/fs/cgroup")
            .join(path.trim_start_matches('/'))
            .join("memory.current")
    };
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Hostile (issue 13, item 1): a guest that touches more memory than its
/// worker may use takes down its own worker and nothing else. Before the
/// fix the guest's memory was charged outside the worker's group and the
/// hog simply succeeded.
#[test]
fn hostile_guest_over_its_memory_limit_takes_down_only_its_worker() {
    let mut neighbour =
        Sandbox::restore(shared_snapshot(), &isolated()).expect("neighbour restores");
    let neighbour_pid = neighbour.worker_pid().unwrap();
    let group = cgroup_of(
        &std::fs::read_to_string(format!("/proc/{neighbour_pid}/cgroup")).unwrap(),
        "memory",
    )
    .unwrap();
    // What a ready worker holds, plus room for a few MiB of guest pages
    // only (each page the guest touches costs ~3 ms on PVM hosts).
    let limit = memory_usage(&group) + (16 << 20);
    let mut options = isolated();
    if let Some(isolation) = options.isolation.as_mut() {
        isolation.memory_limit_bytes = Some(limit);
    }
    let mut hog = Sandbox::restore(shared_snapshot(), &options).expect("hog restores");
    let mut touch = sh("dd if=/dev/zero of=/dev/null bs=64M count=1 && echo survived");
    touch.timeout_ms = 600_000;
    match hog.invoke(&touch) {
        Err(e) => eprintln!("the hog's worker died as it should: {e}"),
        Ok(outcome) => panic!(
            "a guest touching 64 MiB ran within a {} MiB limit: {:?} {}",
            limit >> 20,
            outcome.status,
            String::from_utf8_lossy(&outcome.stdout)
        ),
    }
    let outcome = neighbour
        .invoke(&sh("echo alive"))
        .expect("neighbour invoke");
    assert_eq!(outcome.stdout, b"alive\n");
}

/// Hostile (issue 13, item 8): two live workers never share a uid or gid
/// (before the fix every worker ran as 60000), and both are in the range.
#[test]
fn hostile_live_workers_have_their_own_ids() {
    let a = Sandbox::restore(shared_snapshot(), &isolated()).expect("first restores");
    let b = Sandbox::restore(shared_snapshot(), &isolated()).expect("second restores");
    let range = ember::jail::IdRange::default();
    let ids = |sandbox: &Sandbox| {
        let pid = jailed_pid(sandbox.worker_pid().unwrap());
        let field = |name| {
            let values: Vec<u32> = status_field(pid, name)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            assert!(values.iter().all(|v| *v == values[0]), "{name} {values:?}");
            values[0]
        };
        (field("Uid:"), field("Gid:"))
    };
    let (ua, ga) = ids(&a);
    let (ub, gb) = ids(&b);
    assert_ne!(ua, ub, "two workers share a uid");
    assert_ne!(ga, gb, "two workers share a gid");
    for id in [ua, ga, ub, gb] {
        assert!(
            (range.first..range.first + range.count).contains(&id),
            "{id} outside {range:?}"
        );
    }
}

/// Set in a child process of the stderr test.
const CHILD_ENV: &str = "EMBER_ISOLATION_CHILD";

/// Fields 3.. of `/proc/<pid>/stat` (after the command name).
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().map(String::from).collect()
}

/// Hostile (issue 13, item 7): a worker is detached (a session of its own,
/// no controlling terminal) and what it writes to stderr reaches the
/// parent's stderr only prefixed and escaped, so it cannot pass for the
/// parent's log lines or drive a terminal. Before the fix the worker
/// shared the caller's session and stderr, and its lines came out raw.
#[test]
fn hostile_worker_is_detached_and_cannot_forge_log_lines() {
    const TEST: &str = "hostile_worker_is_detached_and_cannot_forge_log_lines";
    if std::env::var_os(CHILD_ENV).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child: {:?}\n{stderr}", out.status);
        assert!(
            !out.stderr.contains(&0x1b) && !out.stderr.contains(&b'\r'),
            "raw escape or carriage return from the worker: {stderr:?}"
        );
        let forged: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("forged by the worker"))
            .collect();
        assert_eq!(forged.len(), 3, "{stderr}");
        for line in forged {
            assert!(line.starts_with("ember worker "), "unprefixed: {line:?}");
        }
        return;
    }
    let mut options = isolated();
    if let Some(isolation) = options.isolation.as_mut() {
        isolation.forge_stderr = true;
    }
    let mut sandbox = Sandbox::restore(shared_snapshot(), &options).expect("isolated restore");
    let outer = sandbox.worker_pid().unwrap();
    let ours = stat_fields(std::process::id());
    for pid in [outer, jailed_pid(outer)] {
        let fields = stat_fields(pid);
        // fields: state ppid pgrp session tty_nr ...
        assert_eq!(fields[3], outer.to_string(), "session of {pid}");
        assert_ne!(fields[3], ours[3], "{pid} shares our session");
        assert_eq!(fields[4], "0", "{pid} has a controlling terminal");
    }
    let outcome = sandbox.invoke(&sh("echo fine")).expect("invoke");
    assert_eq!(outcome.stdout, b"fine\n");
}

/// PIDs of this process's children whose command line has all of `args`.
fn children_with(args: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.iter().all(|a| words.contains(&a.as_bytes())) {
                found.push(pid);
            }
        }
    }
    found
}

/// (name, seccomp mode) of every task of `pid`.
fn task_filters(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|task| {
                    let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
                    let status = std::fs::read_to_string(task.path().join("status")).ok()?;
                    let mode = status
                        .lines()
                        .find_map(|l| l.strip_prefix("Seccomp:"))?
                        .trim()
                        .to_string();
                    Some((name.trim().to_string(), mode))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Hostile (issue 13, item 3): in function mode, on the hot path and the
/// vsock path, every task of the jailed worker runs under a seccomp
/// filter while the guest runs, the main thread (which decodes hot-path
/// responses and agent frames) and the outer waiter included. Before the
/// fix the main thread of a function-mode worker was never filtered
/// (`Seccomp: 0`), nor was the waiter.
#[test]
fn hostile_function_worker_threads_are_all_filtered() {
    use ember::function::{Function, FunctionInvokeOptions, HandlerResult};
    let function = Function::open(common::probe_template()).expect("probe function");
    for force_vsock in [false, true] {
        let options = FunctionInvokeOptions {
            isolation: Some(Isolation::new(env!("CARGO_BIN_EXE_ember"))),
            timeout: std::time::Duration::from_secs(if force_vsock { 60 } else { 20 }),
            force_vsock,
            ..FunctionInvokeOptions::default()
        };
        let seen = std::thread::scope(|scope| {
            let invocation = scope.spawn(|| function.invoke(br#"{"op": "loop"}"#, &options));
            let mut seen = Vec::new();
            while !invocation.is_finished() {
                for outer in children_with(&["__worker", "function"]) {
                    let Some(jailed) =
                        std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
                            .ok()
                            .and_then(|c| c.split_whitespace().next()?.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let mut tasks = task_filters(jailed);
                    tasks.extend(task_filters(outer));
                    if tasks.iter().any(|(name, _)| name.starts_with("ember-vcpu")) {
                        seen = tasks;
                    }
                    if !seen.is_empty() && seen.iter().all(|(_, mode)| mode == "2") {
                        break;
                    }
                }
                if !seen.is_empty() && seen.iter().all(|(_, mode)| mode == "2") {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let outcome = invocation.join().unwrap().expect("invoke");
            assert_eq!(
                outcome.result,
                HandlerResult::TimedOut,
                "vsock: {force_vsock}"
            );
            seen
        });
        assert!(
            !seen.is_empty(),
            "never saw the running worker (vsock: {force_vsock})"
        );
        assert!(
            seen.iter().all(|(_, mode)| mode == "2"),
            "unfiltered tasks of a function worker (vsock: {force_vsock}): {seen:?}"
        );
    }
}
