//! A hostile guest: a root program inside the guest that scribbles on the
//! vsock device (junk in every virtio-mmio register, virtqueues pointed at
//! crafted descriptor tables and packet headers, floods of connection
//! requests, resets and shutdowns) must not crash, hang or bloat the VMM.
//!
//! The program is the agent's `ember.agent=scribble` mode; it prints
//! [`ember_protocol::SCRIBBLE_DONE_LINE`] and the guest powers off.
//!
//! Also a hostile snapshot: a `state` file (checksum and all) naming a
//! file outside its directory as the root drive.

mod common;

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{guest_artifacts, run_ember, temp_path, BOOT_TIMEOUT};
use ember_protocol::{AgentMode, SCRIBBLE_DONE_LINE, SCRIBBLE_HOST_PORTS};

/// One cold boot, the scribbler (seconds; it gives up after 240 s) and the
/// power-off.
const SCRIBBLE_TIMEOUT: Duration = Duration::from_secs(BOOT_TIMEOUT.as_secs() + 120);

/// Far above what one 128 MiB microVM needs, even with every vsock
/// connection's buffer full (256 x 256 KiB), far below a leak that scales
/// with what the guest sends.
const MAX_VMM_RSS_MIB: u64 = 512;

#[test]
fn scribbling_guest_does_not_break_the_vmm() {
    let (kernel, initrd) = guest_artifacts();
    let console = temp_path("scribble-console");
    let uds = temp_path("scribble-vsock");
    // Host sockets behind the ports the scribbler connects to, so that its
    // junk also hits live connections: one host end reads everything, one
    // never reads, and one listener never accepts (its backlog fills).
    let listeners = HostListeners::start(&uds);
    let mode = AgentMode::Scribble.cmdline_param();
    let started = Instant::now();
    let out = run_ember(
        &[
            "boot",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--console",
            console.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
            "--cmdline-extra",
            &mode,
        ],
        SCRIBBLE_TIMEOUT,
    );
    let elapsed = started.elapsed();
    let connections = listeners.stop();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!(
        "{}, after {elapsed:.1?}\nstderr:\n{stderr}\nconsole:\n{log}",
        describe(&out, elapsed)
    );

    // The VMM ended by itself: no timeout, no crash signal, no panic.
    assert!(elapsed < SCRIBBLE_TIMEOUT, "VMM hung: {context}");
    assert_eq!(out.status.signal(), None, "VMM crashed: {context}");
    assert!(!stderr.contains("panicked"), "VMM panicked: {context}");
    match out.status.code() {
        // The guest powered off.
        Some(0) => {}
        // The guest failed (e.g. its kernel gave up): said in one line.
        Some(1) => {
            let errors: Vec<_> = stderr
                .lines()
                .filter(|l| l.starts_with("ember: error:"))
                .collect();
            assert_eq!(errors.len(), 1, "{context}");
            assert!(errors[0].contains("guest"), "{context}");
        }
        _ => panic!("unexpected exit: {context}"),
    }
    let done = log
        .lines()
        .find(|l| l.contains(SCRIBBLE_DONE_LINE))
        .unwrap_or_else(|| panic!("the scribbler did not finish: {context}"));
    // The guest kernel refused /dev/mem mappings of every virtio-mmio
    // window its drivers held (CONFIG_IO_STRICT_DEVMEM): the scribbler, root
    // in the guest, got the vsock window only by unbinding its driver.
    let refused = done
        .split_whitespace()
        .find_map(|field| field.strip_prefix("bound_windows_refused="))
        .and_then(|v| v.split_once('/'))
        .unwrap_or_else(|| panic!("no bound_windows_refused= in {done:?}"));
    assert!(
        refused.0 == refused.1 && refused.1 != "0",
        "/dev/mem mapped a window a driver held: {done}"
    );
    let rss_mib = max_child_rss_mib();
    assert!(
        rss_mib < MAX_VMM_RSS_MIB,
        "VMM peaked at {rss_mib} MiB: {context}"
    );
    eprintln!("{done}");
    eprintln!(
        "VMM: {}, peak RSS {rss_mib} MiB, {connections} host connections, {elapsed:.1?}",
        describe(&out, elapsed)
    );
    let _ = std::fs::remove_file(&console);
}

fn describe(out: &Output, elapsed: Duration) -> String {
    match (out.status.code(), out.status.signal()) {
        _ if elapsed >= SCRIBBLE_TIMEOUT => {
            format!("killed after the {SCRIBBLE_TIMEOUT:?} timeout")
        }
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{:?}", out.status),
    }
}

/// Peak resident set of this process's largest finished child (the VMM, or
/// the `timeout` around it), in MiB.
fn max_child_rss_mib() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    u64::try_from(usage.ru_maxrss).unwrap_or(0) / 1024
}

/// Listeners on `<uds>_<port>` for [`SCRIBBLE_HOST_PORTS`], where the
/// VMM's Unix socket backend forwards the guest's connections.
struct HostListeners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<usize>>,
    paths: Vec<PathBuf>,
}

impl HostListeners {
    fn start(uds: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut paths = Vec::new();
        for (i, port) in SCRIBBLE_HOST_PORTS.into_iter().enumerate() {
            let mut path = uds.as_os_str().to_owned();
            path.push(format!("_{port}"));
            let path = PathBuf::from(path);
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).unwrap();
            listener.set_nonblocking(true).unwrap();
            let stop = stop.clone();
            let behaviour = match i {
                0 => Behaviour::Read,
                1 => Behaviour::Hold,
                _ => {
                    // The smallest backlog: one pending connection fills it.
                    // SAFETY: listen on a socket this function owns.
                    let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
                    assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
                    Behaviour::NeverAccept
                }
            };
            threads.push(std::thread::spawn(move || {
                serve(listener, behaviour, &stop)
            }));
            paths.push(path);
        }
        HostListeners {
            stop,
            threads,
            paths,
        }
    }

    /// Stops the listeners; returns how many connections they accepted.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let accepted = self.threads.into_iter().map(|t| t.join().unwrap()).sum();
        for path in self.paths {
            let _ = std::fs::remove_file(path);
        }
        accepted
    }
}

/// What a host listener does with the guest's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Accept and read everything.
    Read,
    /// Accept, never read.
    Hold,
    /// Never accept.
    NeverAccept,
}

/// Serves the listener as `behaviour` says until `stop`; returns how many
/// connections it accepted.
fn serve(listener: UnixListener, behaviour: Behaviour, stop: &AtomicBool) -> usize {
    let mut streams: Vec<UnixStream> = Vec::new();
    let mut accepted = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        if behaviour != Behaviour::NeverAccept {
            while let Ok((stream, _)) = listener.accept() {
                accepted += 1;
                if stream.set_nonblocking(true).is_ok() {
                    streams.push(stream);
                }
            }
        }
        if behaviour == Behaviour::Read {
            streams.retain_mut(|stream| loop {
                match stream.read(&mut buf) {
                    Ok(0) => break false,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break false,
                }
            });
        }
        // Bounded, whatever the guest does.
        if streams.len() > 1024 {
            streams.drain(..512);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    accepted
}

/// A snapshot directory at `dir` with the shared snapshot's memory (a hard
/// link) and `state` written as given (with a valid checksum).
fn snapshot_dir_with(dir: &Path, state: &ember::snapshot::contents::SnapshotState) {
    use ember::snapshot::{MEMORY_FILE, STATE_FILE};
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let memory = common::shared_snapshot().dir().join(MEMORY_FILE);
    if std::fs::hard_link(&memory, dir.join(MEMORY_FILE)).is_err() {
        std::fs::copy(&memory, dir.join(MEMORY_FILE)).unwrap();
    }
    ember::snapshot::write_state(&dir.join(STATE_FILE), state).unwrap();
}

/// Hostile (issue 13, item 2): a re-checksummed `state` naming a
/// root-owned 0600 file outside the snapshot directory as its root drive
/// (with the file's real size and identity, so every check of the old
/// code passed) gets no drive, in-process and in a jailed worker. Before
/// the fix, ember opened the named file as root when it opened the
/// snapshot, and a jailed worker re-read the `state` file from the
/// directory and opened whatever it named as root, before its jail.
#[test]
fn hostile_state_naming_a_file_outside_the_snapshot_gets_no_drive() {
    use std::os::unix::fs::PermissionsExt;

    use ember::devices::virtio::block::disk::{DriveSpec, FileIdentity};
    use ember::devices::virtio::block::BlockState;
    use ember::snapshot::contents::SnapshotState;
    use ember::snapshot::{read_state, RestoreOptions, Snapshot, STATE_FILE};
    use ember::Sandbox;

    let secret = temp_path("secret");
    std::fs::write(&secret, [b's'; 4096]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let shared = common::shared_snapshot();
    let honest: SnapshotState = read_state(&shared.dir().join(STATE_FILE)).unwrap();
    let mut forged = honest.clone();
    let meta = std::fs::metadata(&secret).unwrap();
    forged.devices.block = Some(BlockState {
        transport: forged.devices.vsock.transport.clone(),
        drive: DriveSpec {
            path: secret.as_os_str().as_encoded_bytes().to_vec(),
            size: meta.len(),
            identity: FileIdentity::of(&meta),
        },
    });

    // In-process: the snapshot opens (its drive is refused, not opened)
    // and no clone of it restores.
    let dir = temp_path("forged-snapshot");
    snapshot_dir_with(&dir, &forged);
    let err = match Snapshot::open(&dir) {
        Err(e) => e.to_string(),
        Ok(snapshot) => Sandbox::restore(&snapshot, &RestoreOptions::default())
            .expect_err("a clone of the forged snapshot must not restore")
            .to_string(),
    };
    assert!(
        err.contains("not inside the snapshot directory"),
        "in-process: {err}"
    );
    // A relative escape is refused the same way.
    if let Some(block) = forged.devices.block.as_mut() {
        block.drive.path = format!("../{}", secret.file_name().unwrap().to_string_lossy()).into();
    }
    snapshot_dir_with(&dir, &forged);
    let err = Sandbox::restore(&Snapshot::open(&dir).unwrap(), &RestoreOptions::default())
        .expect_err("a relative escape must not restore")
        .to_string();
    assert!(err.contains("not inside the snapshot directory"), "{err}");

    // Jailed: an honest snapshot is opened, then its state file swapped
    // for the forged one before the worker starts; the worker parses what
    // it is given, jailed, and can only use the drive the parent opened
    // (none here).
    if let Some(block) = forged.devices.block.as_mut() {
        block.drive.path = secret.as_os_str().as_encoded_bytes().to_vec();
    }
    snapshot_dir_with(&dir, &honest);
    let snapshot = Snapshot::open(&dir).unwrap();
    ember::snapshot::write_state(&dir.join(STATE_FILE), &forged).unwrap();
    let jailed = RestoreOptions {
        isolation: Some(ember::worker::Isolation::new(env!("CARGO_BIN_EXE_ember"))),
        ..RestoreOptions::default()
    };
    let err = Sandbox::restore(&snapshot, &jailed)
        .expect_err("a jailed clone of the swapped state must not restore")
        .to_string();
    assert!(err.contains("handed over no drive"), "jailed: {err}");

    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&secret).unwrap();
}

/// Hostile (issue 13, item 5): a guest agent that trickles a frame, one
/// byte at a time, well inside any per-read timeout, is cut off at the
/// operation's deadline with a typed timeout, whether it trickles its
/// greeting or an answer. The test plays the guest's end of the agent
/// connection (what a guest root could send; the host reads it with the
/// same [`ember::agent::AgentClient`] every sandbox uses). Before the fix
/// the host set one socket timeout per frame and each byte reset it: the
/// 32 MiB frame below would have taken about 19 days, and the sandbox
/// (and its slot in a server) with it.
#[test]
fn hostile_trickling_agent_frame_times_out_by_its_deadline() {
    use ember::agent::{AgentClient, AgentError};
    use ember_protocol::protocol::{
        encode_frame, AgentMessage, FrameHeader, FrameKind, Hello, Invoke, MAX_FRAME_LEN,
    };

    /// A byte every 50 ms; the guest gives up after a minute, so that a
    /// host without deadlines fails this test instead of hanging it.
    const BYTE_EVERY: Duration = Duration::from_millis(50);
    const GIVE_UP: Duration = Duration::from_secs(60);
    const DEADLINE: Duration = Duration::from_secs(2);
    /// Scheduling on a loaded 2-core host.
    const SLACK: Duration = Duration::from_secs(2);

    fn trickle(mut guest: UnixStream, greet_first: bool) -> JoinHandle<()> {
        use std::io::Write;
        // Drains what the host sends, so its writes never block.
        let mut drain = guest.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
        });
        std::thread::spawn(move || {
            if greet_first {
                let hello =
                    encode_frame(FrameKind::Agent, &AgentMessage::Hello(Hello::current())).unwrap();
                guest.write_all(&hello).unwrap();
            }
            let header = FrameHeader {
                kind: FrameKind::Agent,
                len: MAX_FRAME_LEN,
            }
            .encode();
            let started = Instant::now();
            for byte in header.iter().chain(std::iter::repeat(&0u8)) {
                if started.elapsed() > GIVE_UP || guest.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(BYTE_EVERY);
            }
        })
    }

    // The greeting trickled: the handshake's deadline holds.
    let (host, guest) = UnixStream::pair().unwrap();
    let guest = trickle(guest, false);
    let started = Instant::now();
    let err = AgentClient::handshake(host, None, started + DEADLINE)
        .expect_err("a trickled greeting must time out");
    let elapsed = started.elapsed();
    assert!(matches!(err, AgentError::Timeout), "{err}");
    assert!(elapsed < DEADLINE + SLACK, "handshake took {elapsed:?}");
    guest.join().unwrap();

    // An answer trickled after an honest greeting: the invocation's
    // deadline holds.
    let (host, guest) = UnixStream::pair().unwrap();
    let guest = trickle(guest, true);
    let mut client = AgentClient::handshake(host, None, Instant::now() + DEADLINE)
        .expect("the honest greeting is read");
    let started = Instant::now();
    let mut output = 0;
    let err = client
        .invoke(&Invoke::new(["yes"]), started + DEADLINE, |_, chunk| {
            output += chunk.len()
        })
        .expect_err("a trickled answer must time out");
    let elapsed = started.elapsed();
    assert!(matches!(err, AgentError::Timeout), "{err}");
    assert!(elapsed < DEADLINE + SLACK, "invocation took {elapsed:?}");
    assert_eq!(output, 0, "nothing of the unfinished frame is delivered");
    drop(client);
    guest.join().unwrap();
    eprintln!("trickled frames cut off at their deadline ({DEADLINE:?}): last after {elapsed:?}");
}
