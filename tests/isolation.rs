//! Isolation: jailed worker processes, what a guest can reach, absurd
//! requests, and resource leaks over many sandboxes.

mod common;

use std::path::Path;
use std::time::Duration;

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

/// What a jailed worker of an `ember` command looked like while it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeenWorker {
    /// The worker's PID (its outer, waiting process).
    pid: u32,
    /// The uid of its jailed child, the process that runs the VM.
    uid: u32,
    /// The jailed child's `/proc/<pid>/cgroup`.
    cgroup: String,
}

/// The jailed workers `ember` process `cli` has now whose command lines
/// hold every one of `args`.
fn workers_of(cli: u32, args: &[&str]) -> Vec<SeenWorker> {
    let mut seen = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{cli}/task")) else {
        return seen;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if !args.iter().all(|a| words.contains(&a.as_bytes())) {
                continue;
            }
            let Some(jailed) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{jailed}/status")) else {
                continue;
            };
            let Some(uid) = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
            else {
                continue;
            };
            let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{jailed}/cgroup")) else {
                continue;
            };
            // An exiting task shows "/" in every cgroup-v1 hierarchy
            // (kernel/cgroup/cgroup.c, proc_cgroup_show), so a sighting
            // counts only if the task was not yet exiting after its
            // cgroups were read: PF_EXITING is set once and never cleared.
            if !alive_and_not_exiting(jailed) {
                continue;
            }
            seen.push(SeenWorker { pid, uid, cgroup });
        }
    }
    seen
}

/// Whether task `pid` exists and has not begun to exit (`PF_EXITING`,
/// flags field of `/proc/PID/stat`).
fn alive_and_not_exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the command name, which may itself hold spaces or ')':
    // state, ppid, pgrp, session, tty_nr, tpgid, flags.
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = fields.split_whitespace();
    let state = fields.next().unwrap_or("X");
    let flags: u64 = fields
        .nth(5)
        .and_then(|f| f.parse().ok())
        .unwrap_or(PF_EXITING);
    !matches!(state, "Z" | "X" | "x") && flags & PF_EXITING == 0
}

/// Runs `ember args` to its end (killed after `timeout`), watching for
/// jailed workers whose command lines hold `worker_args`; returns the
/// output and every distinct worker seen (the last sighting of each: a
/// jailed child is root for a moment before it drops privileges).
fn run_watching(
    args: &[&str],
    worker_args: &[&str],
    timeout: Duration,
) -> (std::process::Output, Vec<SeenWorker>) {
    use std::io::Read;
    let mut child = common::ember()
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run ember");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = std::time::Instant::now();
    let mut seen: Vec<SeenWorker> = Vec::new();
    let status = loop {
        for worker in workers_of(child.id(), worker_args) {
            seen.retain(|w| w.pid != worker.pid);
            seen.push(worker);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, seen)
}

/// Asserts each of `workers` ran its VM as an unprivileged uid inside its
/// own worker cgroups.
fn assert_jailed(workers: &[SeenWorker], what: &str) {
    assert!(!workers.is_empty(), "{what}: no jailed worker was seen");
    for worker in workers {
        assert_ne!(worker.uid, 0, "{what}: the VM ran as root: {worker:?}");
        assert!(
            worker.cgroup.contains("ember-workers/worker-"),
            "{what}: the VM ran outside its worker cgroup: {worker:?}"
        );
    }
}

/// Issue 13, item 6: the library's default options are the jailed ones;
/// in-process is an explicit choice.
#[test]
fn library_defaults_are_jailed() {
    use ember::function::{FunctionInvokeOptions, TemplateOptions};
    let defaults = FunctionInvokeOptions::default();
    let isolation = defaults
        .isolation
        .expect("invocations are jailed by default");
    // A test binary finds the `ember` beside it (target/debug).
    assert_eq!(
        std::fs::canonicalize(&isolation.worker_exe).unwrap(),
        std::fs::canonicalize(env!("CARGO_BIN_EXE_ember")).unwrap()
    );
    assert!(FunctionInvokeOptions::in_process().isolation.is_none());
    let template = TemplateOptions::new("vmlinux".into(), "initrd".into(), None);
    assert!(
        template.isolation.is_some(),
        "templates are built jailed by default"
    );
}

/// Issue 13, item 6: `ember function create` without flags boots the
/// template and runs the tenant's import and warm-up in a jailed worker:
/// the process that runs the VM has a uid other than 0 and is in its
/// worker's cgroup. A failing import reaches the user with its traceback;
/// the function directory ends up root's, and is invoked jailed (one
/// worker for every `--repeat` event) and in-process (`--in-process`).
/// Before: the whole build ran in the `ember` process, as root.
#[test]
fn function_create_builds_in_a_jailed_worker_by_default() {
    let dir = common::temp_path("jailed-create");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.py");
    std::fs::write(
        &bad,
        "raise RuntimeError('import-time failure ' + str(6 * 7))\n\ndef handler(event):\n    return event\n",
    )
    .unwrap();
    let bad_out = dir.join("bad");
    let handler = format!("{}:handler", bad.display());
    let (out, seen) = run_watching(
        &[
            "function",
            "create",
            "--handler",
            &handler,
            "--out",
            bad_out.to_str().unwrap(),
        ],
        &["__worker", "template"],
        common::BOOT_TIMEOUT * 4,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("the function runtime did not start")
            && stderr.contains("Traceback")
            && stderr.contains("RuntimeError: import-time failure 42"),
        "the import's failure is not shown clearly: {stderr}"
    );
    assert_jailed(&seen, "function create (failing import)");
    assert!(
        !bad_out.join("state").exists(),
        "a failed build left a template"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("building"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");

    let good = dir.join("good.py");
    std::fs::write(
        &good,
        "calls = 0\n\ndef handler(event):\n    global calls\n    calls += 1\n    return {\"event\": event, \"calls\": calls}\n",
    )
    .unwrap();
    let good_out = dir.join("good");
    let handler = format!("{}:handler", good.display());
    let (out, seen) = run_watching(
        &[
            "function",
            "create",
            "--handler",
            &handler,
            "--warmup-event",
            "{}",
            "--out",
            good_out.to_str().unwrap(),
        ],
        &["__worker", "template"],
        common::BOOT_TIMEOUT * 4,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert_jailed(&seen, "function create");
    for name in ["state", "memory", "function.json", "drive"] {
        let meta = std::fs::symlink_metadata(good_out.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        use std::os::unix::fs::MetadataExt;
        assert!(meta.file_type().is_file(), "{name}");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{name} is not root's");
    }
    let function = good_out.to_str().unwrap();

    // Jailed by default; `isolation_ms` is what the worker added.
    let (out, seen) = run_watching(
        &[
            "invoke",
            "--function",
            function,
            "--event",
            r#"{"n": 1}"#,
            "--json",
        ],
        &["__worker", "function"],
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        outcome["result"]["value"],
        serde_json::json!({"event": {"n": 1}, "calls": 2})
    );
    assert!(
        outcome["timings"]["isolation_ms"].is_number(),
        "not jailed: {outcome}"
    );
    // A worker may come and go between two looks; when seen, it is jailed.
    if !seen.is_empty() {
        assert_jailed(&seen, "invoke");
    }

    // --in-process: no worker.
    let (out, seen) = run_watching(
        &[
            "invoke",
            "--in-process",
            "--function",
            function,
            "--event",
            "{}",
            "--json",
        ],
        &["__worker"],
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(outcome["timings"]["isolation_ms"].is_null(), "{outcome}");
    assert!(
        seen.is_empty(),
        "an in-process invocation had a worker: {seen:?}"
    );

    // --repeat: one jailed worker holds the recycled clone for every event
    // (the clone's own count of invocations goes 1, 2, 3).
    let (out, seen) = run_watching(
        &[
            "invoke",
            "--function",
            function,
            "--event",
            "{}",
            "--repeat",
            "3",
            "--json",
        ],
        &["__worker", "recycled"],
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    let outcomes: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    for (i, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome["recycle"]["invocation"], i + 1, "{outcome}");
        assert_eq!(outcome["recycle"]["reused"], true, "{outcome}");
        // Reset to the template after each event.
        assert_eq!(outcome["result"]["value"]["calls"], 2, "{outcome}");
        assert!(outcome["timings"]["isolation_ms"].is_number(), "{outcome}");
    }
    assert!(seen.len() <= 1, "more than one recycled worker: {seen:?}");
    if !seen.is_empty() {
        assert_jailed(&seen, "invoke --repeat");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 13, item 6: `ember invoke` and `ember run` run the VM in a jailed
/// worker by default (seen while the handler or command runs: an
/// unprivileged uid, the worker's cgroup); `--in-process` runs it in the
/// `ember` process.
#[test]
fn invoke_and_run_are_jailed_by_default() {
    let function = common::probe_template().to_str().unwrap().to_string();
    let (out, seen) = run_watching(
        &[
            "invoke",
            "--function",
            &function,
            "--event",
            r#"{"op": "loop"}"#,
            "--timeout-ms",
            "4000",
        ],
        &["__worker", "function"],
        Duration::from_secs(300),
    );
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_jailed(&seen, "invoke");

    let (out, seen) = run_watching(
        &["run", "--", "sh", "-c", "sleep 3; echo done"],
        &["__worker"],
        common::BOOT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"done\n");
    assert_jailed(&seen, "run");

    let (out, seen) = run_watching(
        &[
            "run",
            "--in-process",
            "--",
            "sh",
            "-c",
            "sleep 1; echo here",
        ],
        &["__worker"],
        common::BOOT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"here\n");
    assert!(seen.is_empty(), "an in-process run had a worker: {seen:?}");
}
