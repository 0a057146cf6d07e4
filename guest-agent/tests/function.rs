//! Function runtimes and the root drive, with the agent as PID 1 of
//! throwaway namespaces on the host (see `common/mod.rs`). The runtimes
//! are shell scripts speaking the runtime pipe protocol (fd 3 requests,
//! fd 4 answers).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ember_agent::hotpath::ResponseStatus;
use ember_agent::{
    AgentMessage, ErrorKind, ErrorReply, ExitStatus, FileIn, FunctionInvoke, FunctionLoad,
    FunctionReady, FunctionResult, FunctionStart, HostMessage, FUNCTION_DIR, PYTHON_RUNTIME_PATH,
};

/// Echoes every event back as JSON, with a section of captured stdout
/// ("sec") and a line on fd 1 and fd 2 of its own; a few events do other
/// things (see the case). Prints on both streams while starting.
const ECHO: &str = r#"
echo starting
echo warming >&2
printf 'READY 2\n{}' >&4
while read -r word n t <&3; do
    [ "$word" = EVENT ] || { echo "bad header $word" >&2; exit 9; }
    # Answers before reading the event: a protocol violation.
    [ "$t" = 4242 ] && { printf 'RESULT json 2 0 0\n{}' >&4; sleep 30; }
    # Exits without reading the event.
    [ "$t" = 4343 ] && exit 6
    head -c "$n" <&3 >/tmp/ev.$$
    case "$(head -c 16 /tmp/ev.$$)" in
    info)
        { id -u; id -g; pwd; env | sort; readlink /proc/self/fd/3 /proc/self/fd/4;
          ls /proc/self/fd | wc -l; cat /proc/self/cgroup; cat config.json; stat -c '%a %u' . config.json lib/helper.sh;
          touch x 2>/dev/null && echo writable || echo read-only; } >/tmp/out.$$
        len=$(wc -c </tmp/out.$$)
        printf 'RESULT bytes %d 0 0\n' $len >&4
        cat /tmp/out.$$ >&4
        continue ;;
    loop) sleep 30 ;;
    garbage) printf 'RESULT json lots of it\n' >&4; sleep 30 ;;
    long) head -c 300 /dev/zero | tr '\0' A >&4; sleep 30 ;;
    noisy) head -c 3000000 /dev/zero ;;
    exit) printf 'RESULT json 2 0 0\n{}' >&4; exit 4 ;;
    die) echo dying >&2; exit 5 ;;
    esac
    echo "handled $n $t"
    echo "err $n" >&2
    printf 'RESULT json %d 3 0\n' "$n" >&4
    cat /tmp/ev.$$ >&4
    printf sec >&4
done
"#;

fn runtime(script: &str) -> FunctionStart {
    FunctionStart {
        argv: vec!["sh".into(), "./runtime.sh".into()],
        env: vec![("GREETING".into(), "hi there".into())],
        files_in: vec![
            FileIn {
                path: "runtime.sh".into(),
                data: script.as_bytes().to_vec(),
                mode: 0o600,
            },
            FileIn {
                path: "config.json".into(),
                data: b"{\"k\": 1}\n".to_vec(),
                mode: 0,
            },
            FileIn {
                path: "lib/helper.sh".into(),
                data: b"true\n".to_vec(),
                mode: 0o4755,
            },
        ],
        hot_path: false,
        ready_timeout_ms: 10_000,
        code_drive: None,
        wait_for_code: false,
    }
}

fn event(data: &[u8], timeout_ms: u64) -> HostMessage {
    HostMessage::FunctionInvoke(FunctionInvoke {
        event: data.to_vec(),
        timeout_ms,
        max_output_bytes: 1 << 20,
    })
}

fn ready(c: &mut Client, start: FunctionStart) -> FunctionReady {
    c.send(&HostMessage::FunctionStart(start));
    match c.recv() {
        Some(AgentMessage::FunctionReady(ready)) => ready,
        other => panic!("expected FunctionReady, got {other:?}"),
    }
}

fn result(c: &mut Client, msg: HostMessage) -> FunctionResult {
    c.send(&msg);
    match c.recv() {
        Some(AgentMessage::FunctionResult(result)) => result,
        other => panic!("expected FunctionResult, got {other:?}"),
    }
}

fn error(c: &mut Client, msg: HostMessage) -> ErrorReply {
    c.send(&msg);
    match c.recv() {
        Some(AgentMessage::Error(err)) => err,
        other => panic!("expected Error, got {other:?}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn check_echo_runtime(cgroup: bool) {
    let agent = start_agent(cgroup);
    let mut c = Client::connect(&agent);
    // Nothing to invoke yet.
    let err = error(&mut c, event(b"x", 1000));
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(err.message.contains("no function runtime"), "{err:?}");

    let ready = ready(&mut c, runtime(ECHO));
    assert_eq!(ready.hot_path, None);
    assert_eq!(ready.hot_path_error, None);
    assert_eq!(ready.stdout, b"starting\n");
    assert_eq!(ready.stderr, b"warming\n");
    assert!(ready.startup_ms < 10_000);

    let got = result(&mut c, event(br#"{"a": 1}"#, 5000));
    assert_eq!(got.status, Some(ResponseStatus::Json));
    assert_eq!(got.result, br#"{"a": 1}"#);
    assert_eq!(text(&got.stdout), "sechandled 8 5000\n");
    assert_eq!(got.stderr, b"err 8\n");
    assert!(!got.timed_out && !got.output_truncated);
    assert_eq!(got.runtime_exit, None);

    // The runtime outlives the connection; the next one uses it.
    drop(c);
    let mut c = Client::connect(&agent);
    let got = result(&mut c, event(b"info", 5000));
    assert_eq!(got.status, Some(ResponseStatus::Bytes));
    let info = text(&got.result);
    let lines: Vec<&str> = info.lines().collect();
    assert_eq!(&lines[..3], ["1000", "1000", FUNCTION_DIR], "{info}");
    // Exactly the environment asked for (the shell adds PWD; OLDPWD may
    // come with it).
    assert!(lines.contains(&"GREETING=hi there"), "{info}");
    assert!(!info.contains("EMBER_HOT_PATH"), "{info}");
    assert!(!info.contains("EMBER_AGENT_TEST"), "{info}");
    let pipes: Vec<&&str> = lines.iter().filter(|l| l.starts_with("pipe:")).collect();
    assert_eq!(pipes.len(), 2, "{info}");
    // 0-4, and the directory ls reads.
    assert!(lines.contains(&"6"), "{info}");
    if cgroup {
        assert!(lines.iter().any(|l| l.starts_with("0::/fn-")), "{info}");
    }
    assert!(lines.contains(&"{\"k\": 1}"), "{info}");
    // Root-owned, readable, no set-id bits; the directory is not the
    // runtime's to write.
    assert!(lines.contains(&"755 0"), "{info}");
    assert!(lines.contains(&"644 0"), "{info}");
    assert!(lines.contains(&"755 0") && !info.contains("4755"), "{info}");
    assert!(lines.contains(&"read-only"), "{info}");

    // An invocation meanwhile is its own business.
    assert_eq!(c.run(sh("echo plain")).stdout, b"plain\n");

    // A large event goes through the pipe in pieces, and comes back.
    let big = pseudo_random(3 << 20, 11);
    let got = result(&mut c, event(&big, 20_000));
    assert_eq!(got.status, Some(ResponseStatus::Json));
    assert!(got.result == big, "big event came back changed");

    // Output beyond max_output_bytes is dropped and flagged; what fits of
    // the runtime's own section comes first.
    let mut small = FunctionInvoke {
        event: b"noisy".to_vec(),
        timeout_ms: 10_000,
        max_output_bytes: 10,
    };
    c.send(&HostMessage::FunctionInvoke(small.clone()));
    let got = match c.recv() {
        Some(AgentMessage::FunctionResult(result)) => result,
        other => panic!("{other:?}"),
    };
    assert!(got.output_truncated);
    assert_eq!(got.stdout.len() + got.stderr.len(), 10);
    assert!(got.stdout.starts_with(b"sec"));
    // What was dropped is gone, not left for the next answer.
    small.event = b"quiet".to_vec();
    small.max_output_bytes = 1 << 20;
    let got = result(&mut c, HostMessage::FunctionInvoke(small));
    assert_eq!(text(&got.stdout), "sechandled 5 10000\n");

    // A second start is refused while this one lives.
    let err = error(&mut c, HostMessage::FunctionStart(runtime(ECHO)));
    assert_eq!(err.kind, ErrorKind::Busy);
    c.ping(1);
}

#[test]
fn echo_runtime() {
    check_echo_runtime(false);
}

#[test]
fn echo_runtime_in_its_cgroup() {
    check_echo_runtime(true);
}

#[test]
fn runtime_that_never_gets_ready() {
    let agent = start_agent(true);
    let mut c = Client::connect(&agent);
    let mut start = runtime("echo booting slowly >&2; sleep 30");
    start.ready_timeout_ms = 500;
    let started = Instant::now();
    let err = error(&mut c, HostMessage::FunctionStart(start));
    assert_eq!(err.kind, ErrorKind::SpawnFailed);
    assert!(err.message.contains("no READY within 500 ms"), "{err:?}");
    assert!(err.message.contains("booting slowly"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(live_sleeps(&mut c), "");

    // One that exits first, one that is not there, one that writes
    // garbage instead of READY, one that sends READY with bad JSON.
    let err = error(
        &mut c,
        HostMessage::FunctionStart(runtime("echo oops >&2; exit 3")),
    );
    assert_eq!(err.kind, ErrorKind::SpawnFailed);
    assert!(err.message.contains("exit code 3"), "{err:?}");
    assert!(err.message.contains("stderr: oops"), "{err:?}");
    let mut missing = runtime("");
    missing.argv = vec!["./no-such-runtime".into()];
    let err = error(&mut c, HostMessage::FunctionStart(missing));
    assert_eq!(err.kind, ErrorKind::SpawnFailed);
    assert!(err.message.contains("no-such-runtime"), "{err:?}");
    for script in [
        "printf 'HELLO\\n' >&4; sleep 30",
        "printf 'READY 5\\n{oops' >&4; sleep 30",
        "printf 'READY 99999\\n' >&4; sleep 30",
        "head -c 1000 /dev/zero >&4; sleep 30",
        "exec 4>&-; sleep 30",
    ] {
        let err = error(&mut c, HostMessage::FunctionStart(runtime(script)));
        assert_eq!(err.kind, ErrorKind::SpawnFailed, "{script}: {err:?}");
        assert!(err.message.contains("killed"), "{script}: {err:?}");
    }
    assert_eq!(live_sleeps(&mut c), "");

    // Validation: as for an invocation.
    let mut bad = runtime(ECHO);
    bad.ready_timeout_ms = 0;
    let err = error(&mut c, HostMessage::FunctionStart(bad));
    assert_eq!(err.kind, ErrorKind::BadRequest);
    c.expect_closed();

    // And after all that a good one starts.
    let mut c = Client::connect(&agent);
    ready(&mut c, runtime(ECHO));
    let got = result(&mut c, event(b"{}", 5000));
    assert_eq!(got.result, b"{}");
}

#[test]
fn runtime_that_loops_is_killed_at_the_timeout() {
    let agent = start_agent(true);
    let mut c = Client::connect(&agent);
    ready(&mut c, runtime(ECHO));
    let started = Instant::now();
    let got = result(&mut c, event(b"loop", 500));
    assert!(got.timed_out);
    assert_eq!(got.status, None);
    assert!(got.result.is_empty());
    assert_eq!(got.runtime_exit, Some(ExitStatus::Signal(libc::SIGKILL)));
    assert!(got.wall_ms >= 500, "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(live_sleeps(&mut c), "");
    // It is gone, and says why.
    let err = error(&mut c, event(b"{}", 1000));
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(err.message.contains("ran out of time"), "{err:?}");
}

#[test]
fn runtime_that_breaks_the_protocol() {
    let agent = start_agent(true);
    let mut c = Client::connect(&agent);
    for (what, expect) in [
        (&b"garbage"[..], "malformed header"),
        (b"long", "longer than 128 bytes"),
        (b"early", "RESULT before it read the whole event"),
    ] {
        ready(&mut c, runtime(ECHO));
        let msg = if what == b"early" {
            // Only the start of this one fits in the pipe, and the runtime
            // answers it (timeout 4242) without reading it.
            event(&vec![b' '; 4 << 20], 4242)
        } else {
            event(what, 10_000)
        };
        let err = error(&mut c, msg);
        assert_eq!(err.kind, ErrorKind::Internal, "{err:?}");
        assert!(
            err.message.contains("broke the pipe protocol") && err.message.contains(expect),
            "{err:?}"
        );
        assert_eq!(live_sleeps(&mut c), "");
        c.ping(1);
    }
    // The agent is fine.
    assert_eq!(c.run(sh("echo fine")).stdout, b"fine\n");
}

#[test]
fn runtime_that_exits() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    ready(&mut c, runtime(ECHO));
    // It answers, then exits: the answer counts, and says so.
    let got = result(&mut c, event(b"exit", 5000));
    assert_eq!(got.status, Some(ResponseStatus::Json));
    assert_eq!(got.result, b"{}");
    // (Its exit may or may not have been seen when the answer went out.)
    assert!(
        matches!(got.runtime_exit, None | Some(ExitStatus::Code(4))),
        "{got:?}"
    );
    // The next event finds it gone (or, if its exit was not seen yet,
    // going: its response pipe closed before it was reaped).
    c.send(&event(b"{}", 1000));
    match c.recv() {
        Some(AgentMessage::Error(err)) => assert!(
            err.message.contains("exit code 4") || err.message.contains("closed its response pipe"),
            "{err:?}"
        ),
        Some(AgentMessage::FunctionResult(got)) => {
            assert_eq!(got.status, None);
            assert_eq!(got.runtime_exit, Some(ExitStatus::Code(4)));
        }
        other => panic!("{other:?}"),
    }

    // It dies without an answer.
    ready(&mut c, runtime(ECHO));
    let got = result(&mut c, event(b"die", 5000));
    assert_eq!(got.status, None);
    assert!(!got.timed_out);
    assert_eq!(got.runtime_exit, Some(ExitStatus::Code(5)));
    assert_eq!(got.stderr, b"dying\n");

    // It exits while the event is still being written.
    ready(&mut c, runtime(ECHO));
    let got = result(&mut c, event(&vec![b'x'; 4 << 20], 4343));
    assert_eq!(got.status, None);
    assert!(!got.timed_out);
    assert_eq!(got.runtime_exit, Some(ExitStatus::Code(6)));
}

#[test]
fn result_without_event_is_collected() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    // As a hot-path runtime does when a response does not fit its buffer:
    // a RESULT on fd 4 with no EVENT before it.
    let script = "printf 'READY 2\\n{}' >&4; read -r go <&3; echo printed; \
                  printf 'RESULT bytes 3 0 2\\nabcE!' >&4; sleep 30";
    ready(&mut c, runtime(script));
    // Nothing came: the wait runs out and the runtime is killed.
    // (The runtime waits on fd 3 until the host "resumes" it below.)
    c.send(&HostMessage::FunctionCollect(300));
    match c.recv() {
        Some(AgentMessage::FunctionResult(got)) => {
            assert!(got.timed_out && got.status.is_none(), "{got:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(live_sleeps(&mut c), "");

    // Now one that answers: the answer waits in the agent for the host.
    let script = "printf 'READY 2\\n{}' >&4; sleep 0.2; echo printed; \
                  printf 'RESULT bytes 3 0 2\\nabcE!' >&4; sleep 30";
    ready(&mut c, runtime(script));
    let got = result(&mut c, HostMessage::FunctionCollect(5000));
    assert_eq!(got.status, Some(ResponseStatus::Bytes));
    assert_eq!(got.result, b"abc");
    assert_eq!(got.stdout, b"printed\n");
    assert_eq!(got.stderr, b"E!");
    assert!(!got.timed_out);
}

#[test]
fn hot_path_is_reported() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    // A shell cannot lock buffers: it says READY {} and tells what it got.
    let script = r#"echo "env=${EMBER_HOT_PATH:-}"; grep 'locked memory' /proc/self/limits; printf 'READY 2\n{}' >&4; sleep 30"#;
    let mut start = runtime(script);
    start.hot_path = true;
    let ready = ready(&mut c, start);
    assert_eq!(ready.hot_path, None);
    let why = ready
        .hot_path_error
        .expect("an error for the missing hot path");
    // Where /dev/mem exists (guests; not every host) the runtime got
    // EMBER_HOT_PATH=1 and the doorbell and announced nothing; elsewhere
    // it was not told.
    if why.contains("could not be granted") {
        assert!(why.contains("/dev/mem"), "{why}");
    } else {
        assert!(why.contains("no hot-path buffers"), "{why}");
    }
    let granted = !why.contains("could not be granted");
    let stdout = text(&ready.stdout);
    assert_eq!(stdout.contains("env=1"), granted, "{stdout}");
    if granted {
        // Both buffers at their largest can be locked.
        let limit = stdout.split_whitespace().nth(4).unwrap_or("");
        assert!(
            limit == "unlimited" || limit.parse::<u64>().unwrap() >= 32 << 20,
            "{stdout}"
        );
    }
}

/// A runtime whose environment makes the dynamic loader or python run other
/// code first never gets `/dev/mem`, and is told why.
#[test]
fn hot_path_is_refused_to_an_environment_that_runs_code_first() {
    let script = r#"echo "env=${EMBER_HOT_PATH:-}"; [ -e /proc/self/fd/5 ] && echo fd5=open || echo fd5=closed; printf 'READY 2\n{}' >&4; sleep 30"#;
    for (var, value) in [
        ("LD_PRELOAD", "/nonexistent/preload.so"),
        ("LD_LIBRARY_PATH", "/run/ember/function"),
        ("PYTHONPATH", "/run/ember/function"),
    ] {
        // One agent each: a runtime lives until it exits.
        let agent = start_agent(false);
        let mut c = Client::connect(&agent);
        let mut start = runtime(script);
        start.hot_path = true;
        start.env.push((var.into(), value.into()));
        let ready = ready(&mut c, start);
        assert_eq!(ready.hot_path, None);
        let why = ready.hot_path_error.unwrap_or_default();
        assert!(
            why.contains(var) && why.contains("LD_* and PYTHON*"),
            "{var}: {why}"
        );
        let stdout = text(&ready.stdout);
        assert!(stdout.contains("env=\n"), "{var}: {stdout}");
        assert!(stdout.contains("fd5=closed"), "{var}: {stdout}");
    }
}

/// A loop device over a small ext4 image: static busybox, the mount
/// points, and a marker file.
struct RootImage {
    device: PathBuf,
    dir: PathBuf,
}

impl Drop for RootImage {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What `root_image` needs from the host that this one lacks, if anything.
fn missing_root_image_tools() -> Vec<&'static str> {
    let found = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut missing = Vec::new();
    if !found("readelf") {
        missing.push("readelf (apt-get install binutils)");
    }
    // An ELF without a program interpreter is static.
    let static_busybox = Command::new("sh")
        .args([
            "-c",
            "headers=$(readelf -lW /bin/busybox) && ! printf '%s' \"$headers\" | grep -q INTERP",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !static_busybox {
        missing.push("a static /bin/busybox (scripts/setup installs busybox-static)");
    }
    if !found("mkfs.ext4") {
        missing.push("mkfs.ext4 (scripts/setup installs e2fsprogs)");
    }
    if !found("losetup") || !Path::new("/dev/loop-control").exists() {
        missing.push("losetup and loop devices (apt-get install util-linux; modprobe loop)");
    }
    missing
}

/// Whether the process `pid` (a decimal string) is alive.
fn alive(pid: &str) -> bool {
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && Path::new("/proc").join(pid).exists()
}

/// Detaches loop devices and removes image directories left by test
/// processes that died before their `RootImage` was dropped (the
/// directories name their pid).
fn remove_stale_root_images() {
    if let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(pid) = name.strip_prefix("ember-root-image-") {
                if !alive(pid) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    let Ok(out) = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((device, file)) = line.trim().split_once(' ') else {
            continue;
        };
        let Some(rest) = file.split("/ember-root-image-").nth(1) else {
            continue;
        };
        if !alive(rest.split('/').next().unwrap_or_default()) {
            let _ = Command::new("losetup").arg("-d").arg(device).status();
        }
    }
}

fn root_image() -> RootImage {
    let missing = missing_root_image_tools();
    assert!(
        missing.is_empty(),
        "the root drive test needs {}",
        missing.join(", ")
    );
    remove_stale_root_images();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ember-root-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tree = dir.join("tree");
    for sub in ["bin", "dev", "proc", "sys", "tmp", "run", "var/tmp", "etc"] {
        std::fs::create_dir_all(tree.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "id", "touch", "grep", "head", "sleep", "cut", "ls", "stat", "env",
        "readlink", "wc", "sort", "tr", "pwd", "mkdir", "true", "printf",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/ember-test-root"), "the root drive\n").unwrap();
    let image = dir.join("root.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("16M")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mkfs.ext4 failed");
    let out = Command::new("losetup")
        .args(["-f", "--show", "-r"])
        .arg(&image)
        .output()
        .unwrap();
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        panic!(
            "the root drive test needs a free loop device: losetup: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    RootImage { device, dir }
}

#[test]
fn root_drive() {
    require_namespaces();
    let image = root_image();
    let agent = start_agent_with(Options {
        cgroup: cgroup2_available(),
        root: Some(image.device.clone()),
    });
    let mut c = Client::connect(&agent);
    let out = c.run(sh("cat /etc/ember-test-root; id -u; pwd; \
         touch /x 2>/dev/null && echo root-writable || echo root-read-only; \
         for d in /tmp /run /var/tmp /dev/shm; do touch $d/f 2>/dev/null && echo $d-ok; done; \
         stat -c '%a' /tmp /run /var/tmp; ls /dev/null /proc/self/stat /sys/kernel >/dev/null && echo mounts-ok; \
         grep -c . /proc/self/mountinfo >/dev/null; cat /proc/self/cgroup"));
    let shown = text(&out.stdout);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(exit_of(&out).status, ExitStatus::Code(0), "{out:?}");
    assert_eq!(lines[0], "the root drive", "{shown}");
    assert_eq!(lines[1], "1000");
    assert!(lines[2].starts_with("/tmp/inv-"), "{shown}");
    assert_eq!(lines[3], "root-read-only");
    // /run is root's (the function directory is there).
    assert_eq!(&lines[4..7], ["/tmp-ok", "/var/tmp-ok", "/dev/shm-ok"]);
    assert_eq!(&lines[7..10], ["1777", "755", "1777"]);
    assert_eq!(lines[10], "mounts-ok");
    if agent.cgroup {
        assert!(
            lines[11..].iter().any(|l| l.starts_with("0::/inv-")),
            "{shown}"
        );
    }
    let out = c.run(sh("cat /proc/self/mountinfo"));
    let mountinfo = text(&out.stdout);
    let root = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no / in {mountinfo}"));
    assert!(root.contains(" - ext4 ") && root.contains(" ro"), "{root}");

    // Timeouts still kill (in the moved cgroup hierarchy, if any).
    let mut invoke = sh("sleep 30 & sleep 30");
    invoke.timeout_ms = 300;
    assert!(exit_of(&c.run(invoke)).timed_out);
    assert_eq!(live_sleeps(&mut c), "");

    // A function runtime lives on the drive's /run.
    let ready = ready(&mut c, runtime(ECHO));
    assert_eq!(ready.stdout, b"starting\n");
    let got = result(&mut c, event(b"[1,2]", 5000));
    assert_eq!(got.result, b"[1,2]");
    let got = result(&mut c, event(b"info", 5000));
    let info = text(&got.result);
    assert!(info.contains(FUNCTION_DIR), "{info}");
    drop(c);
    drop(agent);
    drop(image);
}

#[test]
fn bad_root_drive_keeps_the_initramfs() {
    let agent = start_agent_with(Options {
        cgroup: false,
        root: Some("/dev/ember-no-such-drive".into()),
    });
    // It still serves (from where it was), after saying why.
    let mut c = Client::connect(&agent);
    assert_eq!(c.run(sh("echo still here")).stdout, b"still here\n");
}

/// The python runtime (`runtimes/python3`) over the pipes, with the host's
/// python3.
#[test]
fn python_runtime_over_the_pipes() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtimes/python3/ember_runtime.py");
    let runtime_py = std::fs::read(&source)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", source.display()));
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "this test needs /usr/bin/python3 (apt-get install python3)"
    );
    let agent = start_agent(true);
    let mut c = Client::connect(&agent);
    // The host's argv. The handler file is named like the runtime: it is
    // only ever the handler, the runtime is the agent's own copy.
    let handler = br#"import os, sys
def handler(event, context):
    print('to stdout')
    print('to stderr', file=sys.stderr)
    path = sys.argv[0]
    st, dir_st = os.stat(path), os.stat(os.path.dirname(path))
    same = open(path, 'rb').read() == RUNTIME
    runtime = [path, st.st_uid, oct(st.st_mode & 0o7777), dir_st.st_uid, oct(dir_st.st_mode & 0o7777), same]
    return {'echo': event, 'runtime': runtime, 'isolated': sys.flags.isolated}
"#;
    let start = FunctionStart {
        argv: [
            "python3",
            "-I",
            "-u",
            "-B",
            PYTHON_RUNTIME_PATH,
            "ember_runtime.py",
            "handler",
        ]
        .map(String::from)
        .to_vec(),
        env: vec![("LANG".into(), "C.UTF-8".into())],
        files_in: vec![FileIn {
            path: "ember_runtime.py".into(),
            data: [
                format!("RUNTIME = {}\n", python_bytes(&runtime_py)).as_bytes(),
                handler.as_slice(),
            ]
            .concat(),
            mode: 0o644,
        }],
        hot_path: false,
        ready_timeout_ms: 30_000,
        code_drive: None,
        wait_for_code: false,
    };
    let ready = ready(&mut c, start);
    assert_eq!(ready.hot_path, None);
    let got = result(&mut c, event(br#"{"n": 41}"#, 10_000));
    assert_eq!(got.status, Some(ResponseStatus::Json), "{got:?}");
    let value = text(&got.result).replace(' ', "");
    assert_eq!(
        value,
        format!(
            r#"{{"echo":{{"n":41}},"runtime":["{PYTHON_RUNTIME_PATH}",0,"0o644",0,"0o755",true],"isolated":1}}"#
        )
    );
    assert!(text(&got.stdout).contains("to stdout"), "{got:?}");
    assert!(text(&got.stderr).contains("to stderr"), "{got:?}");
    // Twice: it stays up.
    let got = result(&mut c, event(b"[]", 10_000));
    assert!(
        text(&got.result)
            .replace(' ', "")
            .starts_with(r#"{"echo":[],"#),
        "{got:?}"
    );
}

/// A base snapshot's runtime: the python runtime started without its
/// function (`--wait-for-code`), given it later by `FunctionLoad` (files,
/// environment, handler), which is answered with the second `READY`; a
/// second load is refused, and so is a load into a runtime started with
/// its function.
#[test]
fn python_runtime_waits_for_its_code() {
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "this test needs /usr/bin/python3 (apt-get install python3)"
    );
    let agent = start_agent(true);
    let mut c = Client::connect(&agent);
    let start = FunctionStart {
        argv: [
            "python3",
            "-I",
            "-u",
            "-B",
            PYTHON_RUNTIME_PATH,
            "--wait-for-code",
        ]
        .map(String::from)
        .to_vec(),
        env: vec![("EMBER_ARENA_MIB".into(), "1".into())],
        files_in: Vec::new(),
        hot_path: false,
        ready_timeout_ms: 30_000,
        code_drive: None,
        wait_for_code: true,
    };
    let base = ready(&mut c, start);
    assert_eq!(base.hot_path, None);
    let load = FunctionLoad {
        args: vec!["main.py".into(), "handler".into()],
        env: vec![("GREETING".into(), "hi".into())],
        files_in: vec![FileIn {
            path: "main.py".into(),
            data: b"import os\ndef handler(event):\n    return [event, os.environ['GREETING']]\n"
                .to_vec(),
            mode: 0o644,
        }],
        code_drive: None,
        ready_timeout_ms: 30_000,
    };
    c.send(&HostMessage::FunctionLoad(load.clone()));
    match c.recv() {
        Some(AgentMessage::FunctionReady(_)) => {}
        other => panic!("expected FunctionReady, got {other:?}"),
    }
    let got = result(&mut c, event(br#"{"n": 1}"#, 10_000));
    assert_eq!(got.status, Some(ResponseStatus::Json), "{got:?}");
    assert_eq!(text(&got.result).replace(' ', ""), r#"[{"n":1},"hi"]"#);
    let again = error(&mut c, HostMessage::FunctionLoad(load));
    assert_eq!(again.kind, ErrorKind::BadRequest, "{again:?}");
    assert!(
        again.message.contains("already has its function"),
        "{again:?}"
    );
}

/// `bytes` as a python bytes literal.
fn python_bytes(data: &[u8]) -> String {
    let mut literal = String::from("b'");
    for &byte in data {
        literal.push_str(&format!("\\x{byte:02x}"));
    }
    literal.push('\'');
    literal
}
