//! Drives the real agent binary through its protocol, with the agent as
//! PID 1 of throwaway namespaces on the host (see `common/mod.rs`).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ember_agent::protocol::{
    decode_frame, encode_frame, FrameHeader, HEADER_LEN, MAX_FRAME_LEN, MAX_REFRESH_ENTROPY,
};
use ember_agent::{
    AgentMessage, ErrorKind, ExitStatus, FileIn, FrameKind, HostMessage, Invoke, Refresh,
    ENV_TEST_CGROUP, ENV_TEST_LISTEN, ENV_TEST_ROOT, MAX_CHUNK, PROTOCOL_VERSION,
};

#[test]
fn streams_exit_codes_and_signals() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    let out = c.run(sh("echo out; echo err >&2; exit 7"));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let exit = exit_of(&out);
    assert_eq!(exit.status, ExitStatus::Code(7));
    assert!(!exit.timed_out && !exit.output_truncated);
    assert!(exit.usage.max_rss_kib > 0, "{:?}", exit.usage);

    let out = c.run(sh("kill -9 $$"));
    assert_eq!(exit_of(&out).status, ExitStatus::Signal(9));

    // Runs as the sandbox user, with no supplementary groups, in a session
    // of its own.
    let out = c.run(sh(
        "id -u; id -g; id -G; cut -d' ' -f6 /proc/$$/stat; echo $$",
    ));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..3], ["1000", "1000", "1000"], "{text}");
    assert_eq!(lines[3], lines[4], "not a session leader: {text}");

    // With exactly the given environment, nothing inherited.
    let mut invoke = Invoke::new(["env"]);
    invoke.env = vec![("ONLY".into(), "this".into())];
    assert_eq!(c.run(invoke).stdout, b"ONLY=this\n");
    assert_eq!(c.run(Invoke::new(["env"])).stdout, b"");
}

#[test]
fn stdin_passthrough_1mib() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    let data = pseudo_random(1 << 20, 7);
    let mut invoke = Invoke::new(["cat"]);
    invoke.stdin = data.clone();
    let out = c.run(invoke);
    assert_eq!(exit_of(&out).status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "stdin came back changed");

    // Small stdin (written before the start) and a program that never
    // reads it.
    let mut invoke = Invoke::new(["cat"]);
    invoke.stdin = b"tiny".to_vec();
    assert_eq!(c.run(invoke).stdout, b"tiny");
    let mut invoke = sh("exit 3");
    invoke.stdin = vec![1; 4 << 20];
    assert_eq!(exit_of(&c.run(invoke)).status, ExitStatus::Code(3));
}

#[test]
fn output_cap() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    let mut invoke = Invoke::new(["head", "-c", "4194304", "/dev/zero"]);
    invoke.max_output_bytes = 1 << 20;
    let out = c.run(invoke);
    let exit = exit_of(&out);
    assert_eq!(
        exit.status,
        ExitStatus::Code(0),
        "kept draining after the cap"
    );
    assert!(exit.output_truncated);
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(out.stdout_chunks.iter().all(|&n| n <= MAX_CHUNK));
    // Under the cap: nothing truncated.
    let mut invoke = sh("head -c 100000 /dev/zero; head -c 5 /dev/zero >&2");
    invoke.max_output_bytes = 100_005;
    let out = c.run(invoke);
    assert!(!exit_of(&out).output_truncated);
    assert_eq!((out.stdout.len(), out.stderr.len()), (100_000, 5));
}

fn check_timeout_kills_everything(cgroup: bool) {
    let agent = start_agent(cgroup);
    assert_eq!(agent.cgroup, cgroup);
    let mut c = Client::connect(&agent);
    let mut invoke = sh("sleep 30 & sleep 30");
    invoke.timeout_ms = 2000;
    let started = Instant::now();
    let out = c.run(invoke);
    let exit = exit_of(&out);
    assert!(exit.timed_out);
    assert_eq!(exit.status, ExitStatus::Signal(libc::SIGTERM));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(exit.usage.wall_ms >= 2000, "{:?}", exit.usage);
    assert_eq!(live_sleeps(&mut c), "");

    // A program that ignores SIGTERM gets SIGKILL after the grace.
    let mut invoke = sh("trap '' TERM; sleep 30");
    invoke.timeout_ms = 300;
    let out = c.run(invoke);
    assert!(exit_of(&out).timed_out);
    assert_eq!(live_sleeps(&mut c), "");
}

#[test]
fn timeout_kills_the_process_group() {
    check_timeout_kills_everything(false);
}

#[test]
fn timeout_kills_the_cgroup() {
    check_timeout_kills_everything(true);
}

#[test]
fn nothing_escapes_the_cgroup() {
    let agent = start_agent(true);
    let mut c = Client::connect(&agent);
    // Each invocation in a group of its own (paths are relative to the
    // agent's cgroup namespace).
    let out = c.run(Invoke::new(["cat", "/proc/self/cgroup"]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l.starts_with("0::/inv-")), "{text}");
    // A double fork into a new session leaves the process group; only the
    // cgroup still holds it. At the timeout...
    let mut invoke = sh("setsid sh -c 'sleep 30' & sleep 30");
    invoke.timeout_ms = 500;
    let out = c.run(invoke);
    assert!(exit_of(&out).timed_out);
    assert_eq!(live_sleeps(&mut c), "");
    // ...and when the main process exits on its own: the invocation ends
    // there, and what it left behind is killed.
    let started = Instant::now();
    let out = c.run(sh(
        "setsid sh -c 'sleep 30 </dev/null >/dev/null 2>&1 &' ; echo done",
    ));
    assert_eq!(out.stdout, b"done\n");
    assert!(!exit_of(&out).timed_out);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(live_sleeps(&mut c), "");
}

#[test]
fn env_cwd_and_workdir() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    let mut invoke = sh("echo $FOO; echo \"$EMPTY\"; pwd; stat -c '%u %g %a' .");
    invoke.env = vec![
        ("FOO".into(), "bar baz".into()),
        ("EMPTY".into(), "".into()),
    ];
    let out = c.run(invoke);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "bar baz");
    assert_eq!(lines[1], "");
    assert!(lines[2].starts_with("/tmp/inv-"), "{text}");
    assert_eq!(lines[3], "1000 1000 755");

    // Every invocation gets a fresh directory.
    let out = c.run(sh("pwd; ls -A | wc -l"));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_ne!(text.lines().next(), Some(lines[2]));
    assert_eq!(text.lines().nth(1), Some("0"));

    let mut invoke = sh("pwd");
    invoke.cwd = Some("sub/dir".into());
    let out = c.run(invoke);
    let pwd = String::from_utf8(out.stdout).unwrap();
    assert!(
        pwd.starts_with("/tmp/inv-") && pwd.ends_with("/sub/dir\n"),
        "{pwd}"
    );

    let mut invoke = sh("pwd");
    invoke.cwd = Some("/".into());
    assert_eq!(c.run(invoke).stdout, b"/\n");

    // An absolute cwd that does not exist fails to start. procfs has no
    // such entry on any host, unlike a name such as `/nonexistent` that
    // some package or earlier run may have created.
    let mut invoke = sh("pwd");
    invoke.cwd = Some("/proc/ember-no-such-dir".into());
    let out = c.run(invoke);
    let err = out.error.expect("error");
    assert_eq!(err.kind, ErrorKind::SpawnFailed);
    assert!(
        err.message.contains("chdir /proc/ember-no-such-dir"),
        "{}",
        err.message
    );
}

#[test]
fn files_in_and_out() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    let mut invoke = Invoke::new(["./bin/run.sh", "arg"]);
    invoke.files_in = vec![
        FileIn {
            path: "in/data.txt".into(),
            data: b"hello".to_vec(),
            mode: 0o640,
        },
        FileIn {
            path: "bin/run.sh".into(),
            data: b"#!/bin/sh\ncat in/data.txt > out.txt\nstat -c '%a %u' in/data.txt bin/run.sh >> out.txt\nhead -c 3000000 /dev/zero > big1\nhead -c 6000000 /dev/zero > big2\nln -s /proc/1/environ leak\nmkfifo fifo\necho \"$1\"\n".to_vec(),
            mode: 0o755,
        },
        FileIn {
            path: "empty".into(),
            data: Vec::new(),
            mode: 0o600,
        },
    ];
    invoke.collect = vec![
        "out.txt".into(),
        "missing".into(),
        "in".into(),
        "empty".into(),
        "big1".into(),
        "big2".into(),
        "leak".into(),
        "fifo".into(),
    ];
    let out = c.run(invoke);
    assert_eq!(out.stdout, b"arg\n", "{out:?}");
    let files = &exit_of(&out).files_out;
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["out.txt", "missing", "in", "empty", "big1", "big2", "leak", "fifo"]
    );
    assert_eq!(
        files[0].data.as_deref(),
        Some(&b"hello640 1000\n755 1000\n"[..])
    );
    for (i, what) in [
        (1, "No such file"),
        (2, "not a regular file"),
        (5, "collect limit"),
        // The last component is never followed; an agent running as root
        // must not read what a symlink points at.
        (6, "symbolic links"),
        (7, "not a regular file"),
    ] {
        let error = files[i].error.as_deref().unwrap_or("");
        assert!(
            files[i].data.is_none() && error.contains(what),
            "{:?}",
            files[i]
        );
    }
    assert_eq!(files[3].data.as_deref(), Some(&b""[..]));
    assert_eq!(files[4].data.as_ref().map(Vec::len), Some(3_000_000));

    // Paths outside the work directory are refused before anything runs.
    let mut invoke = sh("true");
    invoke.collect = vec!["../../etc/passwd".into()];
    let out = c.run(invoke);
    assert_eq!(out.error.map(|e| e.kind), Some(ErrorKind::BadRequest));
    c.expect_closed();
}

#[test]
fn malformed_frames_close_the_connection_but_not_the_agent() {
    let agent = start_agent(false);

    // Bad magic.
    let mut c = Client::connect(&agent);
    c.writer.write_all(b"XXXXXXXXXXXXXXXX").unwrap();
    let err = match c.recv() {
        Some(AgentMessage::Error(err)) => err,
        other => panic!("{other:?}"),
    };
    assert_eq!(err.kind, ErrorKind::MalformedFrame);
    c.expect_closed();

    // Oversized length: refused from the header alone, before any payload.
    let mut c = Client::connect(&agent);
    let mut header = FrameHeader {
        kind: FrameKind::Host,
        len: 0,
    }
    .encode();
    header[4..].copy_from_slice(&(MAX_FRAME_LEN + 1).to_le_bytes());
    c.writer.write_all(&header).unwrap();
    match c.recv() {
        Some(AgentMessage::Error(err)) => assert_eq!(err.kind, ErrorKind::FrameTooLarge),
        other => panic!("{other:?}"),
    }
    c.expect_closed();

    // Wrong version, agent-kind frame from the host, undecodable payload.
    for (byte, value, kind) in [
        (2, PROTOCOL_VERSION + 1, ErrorKind::UnsupportedVersion),
        (3, FrameKind::Agent as u8, ErrorKind::MalformedFrame),
    ] {
        let mut c = Client::connect(&agent);
        let mut frame = encode_frame(FrameKind::Host, &HostMessage::Ping(1)).unwrap();
        frame[byte] = value;
        c.writer.write_all(&frame).unwrap();
        match c.recv() {
            Some(AgentMessage::Error(err)) => assert_eq!(err.kind, kind),
            other => panic!("{other:?}"),
        }
        c.expect_closed();
    }
    let mut c = Client::connect(&agent);
    let mut frame = FrameHeader {
        kind: FrameKind::Host,
        len: 3,
    }
    .encode()
    .to_vec();
    frame.extend_from_slice(&[0xee, 0xee, 0xee]);
    c.writer.write_all(&frame).unwrap();
    match c.recv() {
        Some(AgentMessage::Error(err)) => assert_eq!(err.kind, ErrorKind::MalformedFrame),
        other => panic!("{other:?}"),
    }
    c.expect_closed();

    // Bad requests in well-formed frames.
    let mut c = Client::connect(&agent);
    c.send(&HostMessage::Invoke(Invoke::new(Vec::<String>::new())));
    match c.recv() {
        Some(AgentMessage::Error(err)) => assert_eq!(err.kind, ErrorKind::BadRequest),
        other => panic!("{other:?}"),
    }
    c.expect_closed();
    let mut c = Client::connect(&agent);
    c.send(&HostMessage::Refresh(Refresh {
        entropy: vec![0; MAX_REFRESH_ENTROPY + 1],
        unix_time_ns: 0,
    }));
    match c.recv() {
        Some(AgentMessage::Error(err)) => assert_eq!(err.kind, ErrorKind::BadRequest),
        other => panic!("{other:?}"),
    }
    c.expect_closed();

    // A frame split into single bytes, and a peer that goes away mid-frame.
    let mut c = Client::connect(&agent);
    for byte in encode_frame(FrameKind::Host, &HostMessage::Ping(9)).unwrap() {
        c.writer.write_all(&[byte]).unwrap();
    }
    assert_eq!(c.recv(), Some(AgentMessage::Pong(9)));
    c.writer.write_all(&header[..HEADER_LEN - 1]).unwrap();
    drop(c);

    // Still serving.
    let mut c = Client::connect(&agent);
    c.ping(5);
    c.send(&HostMessage::Refresh(Refresh {
        entropy: vec![1; 32],
        unix_time_ns: 1_700_000_000_000_000_000,
    }));
    assert_eq!(c.recv(), Some(AgentMessage::Refreshed));
    assert_eq!(c.run(sh("echo alive")).stdout, b"alive\n");
}

#[test]
fn busy_ping_and_spawn_failures() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    c.send(&HostMessage::Invoke(sh("sleep 30")));
    // While it runs: pings are answered, a second Invoke is refused.
    c.ping(1);
    c.send(&HostMessage::Invoke(sh("true")));
    match c.recv() {
        Some(AgentMessage::Error(err)) => assert_eq!(err.kind, ErrorKind::Busy),
        other => panic!("{other:?}"),
    }
    c.ping(2);
    drop(c);
    // Disconnecting killed it.
    let mut c = Client::connect(&agent);
    assert_eq!(live_sleeps(&mut c), "");

    let out = c.run(Invoke::new(["no-such-program"]));
    let err = out.error.expect("spawn error");
    assert_eq!(err.kind, ErrorKind::SpawnFailed);
    assert!(
        err.message.contains("no-such-program: No such file"),
        "{}",
        err.message
    );
    // Not fatal for the connection.
    c.ping(3);
    let out = c.run(Invoke::new(["/etc/passwd"]));
    assert_eq!(out.error.map(|e| e.kind), Some(ErrorKind::SpawnFailed));
    assert_eq!(
        c.run(Invoke::new(["true"])).exit.map(|e| e.status),
        Some(ExitStatus::Code(0))
    );
}

#[test]
fn disconnect_kills_the_invocation() {
    let agent = start_agent(true);
    let mut c = Client::connect(&agent);
    c.send(&HostMessage::Invoke(sh("setsid sleep 30 & sleep 30")));
    c.ping(1);
    drop(c);
    let mut c = Client::connect(&agent);
    assert_eq!(live_sleeps(&mut c), "");
}

#[test]
fn output_cannot_forge_frames() {
    let agent = start_agent(false);
    let mut c = Client::connect(&agent);
    let binary = std::fs::read(env!("CARGO_BIN_EXE_ember-agent")).unwrap();
    let mut invoke = Invoke::new(["./ember-agent", "protocol-junk", "50"]);
    invoke.files_in = vec![FileIn {
        path: "ember-agent".into(),
        data: binary,
        mode: 0o755,
    }];
    let out = c.run(invoke);
    assert_eq!(exit_of(&out).status, ExitStatus::Code(0), "{out:?}");
    // What it printed starts with a well-formed Exit frame, and arrived as
    // data: the real Exit came after it.
    assert!(out.stdout.len() > 50 * 600, "{}", out.stdout.len());
    let (forged, _) = decode_frame::<AgentMessage>(&out.stdout, FrameKind::Agent)
        .unwrap()
        .unwrap();
    assert!(matches!(forged, AgentMessage::Exit(_)));
    c.ping(1);
}

#[test]
fn junk_tool_refuses_bad_usage() {
    let status = Command::new(env!("CARGO_BIN_EXE_ember-agent"))
        .args(["vsock-junk", "not-a-port", "10"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let status = Command::new(env!("CARGO_BIN_EXE_ember-agent"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2), "must refuse to run when not PID 1");
}

#[test]
fn test_switches_are_named_as_documented() {
    assert_eq!(ENV_TEST_LISTEN, "EMBER_AGENT_TEST_LISTEN");
    assert_eq!(ENV_TEST_CGROUP, "EMBER_AGENT_TEST_CGROUP");
    assert_eq!(ENV_TEST_ROOT, "EMBER_AGENT_TEST_ROOT");
}
