//! Invocations in real microVMs: output, exit status, stdin, caps,
//! timeouts, environment, files, and hostile input on the agent channel.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{sandbox, sh};
use ember::sandbox::{ExitStatus, FileIn};
use ember_protocol::protocol::{
    self, AgentMessage, ErrorKind, FrameKind, FrameReader, HostMessage, HEADER_LEN,
};

#[test]
fn killed_by_a_signal() {
    let outcome = sandbox().invoke(&sh("kill -KILL $$")).unwrap();
    assert_eq!(outcome.status, ExitStatus::Signal(9));
    assert_eq!(outcome.shell_exit_code(), 137);
}

#[test]
fn env_cwd_and_exit_zero() {
    let mut inv = sh("echo \"$GREETING\"; pwd; id -u; echo ${HOME:-unset}");
    inv.env = vec![("GREETING".into(), "hello there".into())];
    inv.cwd = Some("sub/dir".into());
    let outcome = sandbox().invoke(&inv).unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    let stdout = String::from_utf8(outcome.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hello there");
    assert!(
        lines[1].starts_with("/tmp/inv-") && lines[1].ends_with("/sub/dir"),
        "{stdout}"
    );
    assert_eq!(
        lines[2],
        ember_protocol::SANDBOX_UID.to_string(),
        "runs unprivileged"
    );
    assert_eq!(lines[3], "unset", "only the given environment");
}

#[test]
fn one_mebibyte_of_stdin_passes_through() {
    let input: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let mut inv = ember::Invocation::new(["cat"]);
    inv.stdin = input.clone();
    let outcome = sandbox().invoke(&inv).unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert!(outcome.stdout == input, "stdout differs from stdin");
    assert!(!outcome.output_truncated);
    assert!(outcome.usage.wall_ms > 0);
}

#[test]
fn output_over_the_cap_is_truncated_and_flagged() {
    let mut inv = sh("head -c 4194304 /dev/zero; echo done >&2");
    inv.max_output_bytes = 1 << 20;
    // Moving 4 MiB through the guest kernel is slow on emulated-KVM hosts
    // under load: past the default 60 s the invocation ends by SIGTERM,
    // which is not what this test is about.
    inv.timeout_ms = 300_000;
    let mut received = 0usize;
    let outcome = sandbox()
        .invoke_streaming(&inv, |_, chunk| received += chunk.len())
        .unwrap();
    assert!(!outcome.timed_out, "timed out: {outcome:?}");
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert!(outcome.output_truncated);
    assert_eq!(received, 1 << 20);
}

#[test]
fn timeout_kills_the_whole_group() {
    // The background sleep keeps stdout open: unless it is killed too, the
    // invocation cannot end before 30 s.
    let mut inv = sh("sleep 30 & sleep 30");
    inv.timeout_ms = 2000;
    let started = Instant::now();
    let outcome = sandbox().invoke(&inv).unwrap();
    assert!(outcome.timed_out);
    assert_eq!(outcome.shell_exit_code(), 124);
    assert!(
        outcome.timings.invoke < Duration::from_secs(25),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn files_in_and_out() {
    let mut inv = sh("cat in.txt > out.txt; echo more >> out.txt; chmod 600 out.txt");
    inv.files_in = vec![FileIn {
        path: "in.txt".into(),
        data: b"hello\n".to_vec(),
        mode: 0o644,
    }];
    inv.collect = vec!["out.txt".into(), "missing.txt".into()];
    let outcome = sandbox().invoke(&inv).unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0), "{:?}", outcome);
    assert_eq!(outcome.files_out.len(), 2);
    assert_eq!(outcome.files_out[0].path, "out.txt");
    assert_eq!(
        outcome.files_out[0].data.as_deref(),
        Some(&b"hello\nmore\n"[..])
    );
    assert!(outcome.files_out[1].data.is_none());
    assert!(outcome.files_out[1].error.is_some());
}

#[test]
fn a_sandbox_serves_one_invocation() {
    let mut sb = sandbox();
    sb.invoke(&ember::Invocation::new(["true"])).unwrap();
    let err = sb.invoke(&ember::Invocation::new(["true"])).unwrap_err();
    assert!(matches!(err, ember::SandboxError::AlreadyUsed));
}

/// Reads one agent frame from a raw connection.
fn next(reader: &mut FrameReader<std::os::unix::net::UnixStream>) -> Option<AgentMessage> {
    reader.read_frame(FrameKind::Agent).unwrap()
}

#[test]
fn malformed_and_oversized_frames_are_rejected_and_the_agent_survives() {
    let mut vm = common::shared_snapshot()
        .restore(&Default::default())
        .expect("restore");
    let connect = |vm: &ember::Machine| {
        let stream = vm.connect_vsock(protocol::AGENT_VSOCK_PORT).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut reader = FrameReader::new(stream.try_clone().unwrap());
        assert!(matches!(next(&mut reader), Some(AgentMessage::Hello(_))));
        (stream, reader)
    };

    // Garbage instead of a frame.
    let (mut stream, mut reader) = connect(&vm);
    stream.write_all(b"this is not a frame at all").unwrap();
    match next(&mut reader) {
        Some(AgentMessage::Error(e)) => assert_eq!(e.kind, ErrorKind::MalformedFrame),
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert!(
        next(&mut reader).is_none(),
        "the agent closes the connection"
    );

    // A header announcing more than the agent accepts.
    let (mut stream, mut reader) = connect(&vm);
    let mut header = [0u8; HEADER_LEN];
    header[..2].copy_from_slice(&protocol::MAGIC);
    header[2] = protocol::PROTOCOL_VERSION;
    header[3] = FrameKind::Host as u8;
    header[4..].copy_from_slice(&(protocol::MAX_FRAME_LEN + 1).to_le_bytes());
    stream.write_all(&header).unwrap();
    match next(&mut reader) {
        Some(AgentMessage::Error(e)) => assert_eq!(e.kind, ErrorKind::FrameTooLarge),
        other => panic!("expected an error frame, got {other:?}"),
    }

    // The agent still answers.
    let (mut stream, mut reader) = connect(&vm);
    protocol::write_frame(&mut stream, FrameKind::Host, &HostMessage::Ping(42)).unwrap();
    assert_eq!(next(&mut reader), Some(AgentMessage::Pong(42)));
    assert_eq!(vm.stop(), ember::VmExit::Stopped);
}

#[test]
fn guest_junk_on_vsock_does_not_hurt_the_host() {
    let mut sb = sandbox();
    let listener = sb.machine().expect("in-process sandbox").listen_vsock(5000);
    let reader = std::thread::spawn(move || {
        let mut stream = listener.recv_timeout(Duration::from_secs(300)).unwrap();
        let mut sink = Vec::new();
        stream.read_to_end(&mut sink).unwrap();
        sink.len()
    });
    // The junk tool is part of the agent binary, /init in the guest; port
    // 5001 has no listener, so that connection is refused (reset).
    let outcome = sb
        .invoke(&sh(
            "/init vsock-junk 5000 300000 && ! /init vsock-junk 5001 10",
        ))
        .unwrap();
    assert_eq!(
        outcome.status,
        ExitStatus::Code(0),
        "{:?}",
        String::from_utf8_lossy(&outcome.stderr)
    );
    assert_eq!(reader.join().unwrap(), 300000);
}

#[test]
fn function_output_cannot_forge_frames() {
    let outcome = sandbox()
        .invoke(&ember::Invocation::new(["/init", "protocol-junk"]))
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert!(
        !outcome.stdout.is_empty(),
        "forged frames arrive as plain stdout"
    );
}

/// The Firecracker-compatible Unix socket: `CONNECT <port>` reaches the
/// agent; a guest connection to host port P reaches `<uds>_P`.
#[test]
fn vsock_unix_socket_backend() {
    let uds = common::temp_path("vsock.sock");
    let _ = std::fs::remove_file(&uds);
    let guest_side =
        std::os::unix::net::UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let options = ember::snapshot::RestoreOptions {
        vsock_uds: Some(uds.clone()),
        ..Default::default()
    };
    let mut vm = common::shared_snapshot().restore(&options).unwrap();

    let mut stream = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    stream.write_all(b"CONNECT 1024\n").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(
        line.starts_with("OK ") && line.trim_end()[3..].parse::<u32>().is_ok(),
        "{line:?}"
    );
    let mut reader = FrameReader::new(stream.try_clone().unwrap());
    assert!(matches!(next(&mut reader), Some(AgentMessage::Hello(_))));

    // Use this connection to make the guest connect back to port 6000.
    let mut inv = sh("/init vsock-junk 6000 4096");
    inv.timeout_ms = 60_000;
    protocol::write_frame(&mut stream, FrameKind::Host, &HostMessage::Invoke(inv)).unwrap();
    let (mut back, _) = guest_side.accept().unwrap();
    let mut got = Vec::new();
    back.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 4096);
    loop {
        match next(&mut reader) {
            Some(AgentMessage::Exit(exit)) => {
                assert_eq!(exit.status, ExitStatus::Code(0));
                break;
            }
            Some(_) => {}
            None => panic!("connection closed before Exit"),
        }
    }
    vm.stop();
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(format!("{}_6000", uds.display()));
}
