//! The harness of the namespace tests (`serve.rs`, `function.rs`): runs the
//! real agent binary as PID 1 of throwaway namespaces on the host (the
//! test-only `EMBER_AGENT_TEST_LISTEN=unix:<path>` makes it listen on a
//! Unix socket instead of vsock) and talks to it.
//!
//! Needs root and util-linux `unshare`; a test that finds either missing
//! fails and says so (see [`require_namespaces`]). The agent gets a PID,
//! mount and UTS namespace of its own (its mounts, hostname and final
//! `kill(-1)` stay inside), and a private tmpfs on `/run`, where it makes
//! the function directory and binds its socket; the test reaches the
//! socket through `/proc/<agent>/root`. Nothing is made on the host's file
//! systems, so the tests do not depend on where the repository is checked
//! out (`/tmp`, `/run` and the agent's other mount points included), and a
//! run that was killed leaves nothing a later one could trip over.
//!
//! The cgroup variants mount the cgroup2 hierarchy only inside a private
//! mount namespace, on a tmpfs of their own, make one group for the test
//! and give the agent a cgroup namespace rooted there, so the groups the
//! agent makes stay inside it; the group is removed at the end, and groups
//! left by wrappers that died are removed at the next start. With a root
//! device (`EMBER_AGENT_TEST_ROOT`) the agent switches its root to it and
//! binds its socket on the drive's `/run`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_agent::{
    write_frame, AgentMessage, ErrorReply, Exit, FrameKind, FrameReader, HostMessage, Invoke,
    MAX_CHUNK, PROTOCOL_VERSION,
};

/// Where the agent binds its socket, in its own mount namespace.
const AGENT_SOCKET: &str = "/run/agent.sock";

/// Runs in a private mount namespace (the test starts it under
/// `unshare --mount`). $1 agent binary, $2 socket path (in the agent's
/// view), $3 "1" for a cgroup, $4 a root device or "".
const WRAPPER: &str = r#"
set -eu
agent=$1 sock=$2 cg=$3 root=$4
listen="EMBER_AGENT_TEST_LISTEN=unix:$sock"
rootenv=${root:+EMBER_AGENT_TEST_ROOT=$root}
# The function directory (/run/ember/function) and the socket must not be
# the host's. (With a root drive both are on the drive's /run, or, if
# switching fails, on this one.)
mount -t tmpfs -o mode=0755 ember-run /run
if [ "$cg" = 1 ]; then
    # The host's hierarchy, on a mount point no host path can hide or lack:
    # a tmpfs over /sys/fs/cgroup in this namespace. The agent's own cgroup2
    # mount there then stacks on this tmpfs (and hides it) instead of
    # finding a cgroup2 mount already in place.
    mount -t tmpfs -o mode=0755 ember-cgroup /sys/fs/cgroup
    mnt=/sys/fs/cgroup/host
    mkdir "$mnt"
    mount -t cgroup2 none "$mnt"
    # Groups of wrappers that died without cleaning up (a populated group
    # refuses rmdir, so a live test's is safe whatever its pid means here).
    for g in "$mnt"/ember-agent-test.*; do
        [ -d "$g" ] || continue
        kill -0 "${g##*.}" 2>/dev/null && continue
        find "$g" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    group="$mnt/ember-agent-test.$$"
    mkdir "$group"
    # Join the group, then a cgroup namespace rooted at it; the agent is
    # PID 1 of new PID, mount and UTS namespaces.
    sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' join "$group" \
        unshare --cgroup --pid --fork --mount-proc --uts --kill-child \
        env "$listen" EMBER_AGENT_TEST_CGROUP=1 $rootenv "$agent" </dev/null &
else
    unshare --pid --fork --mount-proc --uts --kill-child \
        env "$listen" $rootenv "$agent" </dev/null &
fi
inner=$!
# The test closes our stdin when it is done (or dies).
read -r _ || true
for pid in $(cat /proc/$inner/task/$inner/children 2>/dev/null); do
    kill -TERM "$pid" 2>/dev/null || true
done
# (The agent's reboot ends it with SIGHUP: not worth a message.)
wait "$inner" 2>/dev/null || true
if [ "$cg" = 1 ]; then
    find "$group" -depth -type d -exec rmdir {} + 2>/dev/null || true
fi
"#;

pub struct Agent {
    wrapper: Child,
    stdin: Option<ChildStdin>,
    /// Where the test connects (through the agent's `/proc/<pid>/root`).
    pub sock: PathBuf,
    pub cgroup: bool,
    /// The agent's pid on the host.
    pub pid: u32,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Closing the wrapper's stdin stops the agent (SIGTERM: power off).
        drop(self.stdin.take());
        let _ = self.wrapper.wait();
    }
}

/// Why this host cannot run the agent tests, if it cannot.
pub fn missing_prerequisite() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("root (they mount file systems and make namespaces): run the tests as root");
    }
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--uts", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !unshare.is_ok_and(|s| s.success()) {
        return Some(
            "util-linux `unshare` with PID, mount and UTS namespaces \
             (apt-get install util-linux; in a container, allow unshare(2))",
        );
    }
    None
}

/// Fails the test, saying what is missing, when this host cannot run the
/// agent tests: a test that cannot run must not pass.
pub fn require_namespaces() {
    if let Some(missing) = missing_prerequisite() {
        panic!("the agent namespace tests need {missing}");
    }
}

pub fn cgroup2_available() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|fs| fs.contains("\tcgroup2\n"))
}

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// In a cgroup namespace of its own, with cgroups on.
    pub cgroup: bool,
    /// A block device with an ext4 file system to switch the root to.
    pub root: Option<PathBuf>,
}

/// Starts an agent; fails the test when this host cannot run one.
pub fn start_agent(cgroup: bool) -> Agent {
    start_agent_with(Options {
        cgroup,
        ..Options::default()
    })
}

pub fn start_agent_with(opts: Options) -> Agent {
    require_namespaces();
    assert!(
        !opts.cgroup || cgroup2_available(),
        "this test needs cgroup2, which this kernel lacks (no cgroup2 in /proc/filesystems)"
    );
    let mut wrapper = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            WRAPPER,
            "wrapper",
        ])
        .arg(env!("CARGO_BIN_EXE_ember-agent"))
        .arg(AGENT_SOCKET)
        .arg(if opts.cgroup { "1" } else { "0" })
        .arg(opts.root.as_deref().unwrap_or(Path::new("")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start unshare");
    let stdin = wrapper.stdin.take();
    let stdout = wrapper.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            eprintln!("[agent] {line}");
            let _ = tx.send(line);
        }
    });
    let wrapper_pid = wrapper.id();
    let mut agent = Agent {
        wrapper,
        stdin,
        sock: PathBuf::new(),
        cgroup: opts.cgroup,
        pid: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("agent did not report listening");
        if line.contains("ember-agent: listening on unix:") {
            break;
        }
    }
    // The wrapper's one child is unshare, whose one child is the agent.
    let inner = children(wrapper_pid).first().copied().expect("no unshare");
    agent.pid = children(inner).first().copied().expect("no agent");
    agent.sock = PathBuf::from(format!("/proc/{}/root{AGENT_SOCKET}", agent.pid));
    agent
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub struct Client {
    pub reader: FrameReader<UnixStream>,
    pub writer: UnixStream,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_chunks: Vec<usize>,
    pub exit: Option<Exit>,
    pub error: Option<ErrorReply>,
}

impl Client {
    pub fn connect(agent: &Agent) -> Client {
        let stream = UnixStream::connect(&agent.sock).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut client = Client {
            writer: stream.try_clone().unwrap(),
            reader: FrameReader::new(stream),
        };
        match client.recv() {
            Some(AgentMessage::Hello(hello)) => {
                assert_eq!(hello.protocol_version, PROTOCOL_VERSION)
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        client
    }

    pub fn send(&mut self, msg: &HostMessage) {
        write_frame(&mut self.writer, FrameKind::Host, msg).unwrap();
    }

    pub fn recv(&mut self) -> Option<AgentMessage> {
        self.reader.read_frame(FrameKind::Agent).unwrap()
    }

    /// Reads until Exit or Error.
    pub fn outcome(&mut self) -> Outcome {
        let mut out = Outcome::default();
        loop {
            match self.recv() {
                Some(AgentMessage::Stdout(data)) => {
                    assert!(data.len() <= MAX_CHUNK);
                    out.stdout_chunks.push(data.len());
                    out.stdout.extend_from_slice(&data);
                }
                Some(AgentMessage::Stderr(data)) => {
                    assert!(data.len() <= MAX_CHUNK);
                    out.stderr.extend_from_slice(&data);
                }
                Some(AgentMessage::Exit(exit)) => {
                    out.exit = Some(exit);
                    return out;
                }
                Some(AgentMessage::Error(err)) => {
                    out.error = Some(err);
                    return out;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    pub fn run(&mut self, invoke: Invoke) -> Outcome {
        self.send(&HostMessage::Invoke(invoke));
        self.outcome()
    }

    pub fn ping(&mut self, n: u64) {
        self.send(&HostMessage::Ping(n));
        assert_eq!(self.recv(), Some(AgentMessage::Pong(n)));
    }

    /// The connection ends without another frame.
    pub fn expect_closed(&mut self) {
        assert_eq!(self.recv(), None);
    }
}

pub fn sh(script: &str) -> Invoke {
    Invoke::new(["sh", "-c", script])
}

pub fn exit_of(outcome: &Outcome) -> &Exit {
    match &outcome.exit {
        Some(exit) => exit,
        None => panic!("no Exit: {outcome:?}"),
    }
}

/// Lists live (non-zombie) processes named `name` in the agent's PID
/// namespace, waiting a little for ones that were SIGKILLed to finish
/// exiting.
pub fn live_processes(client: &mut Client, name: &str) -> String {
    let script = format!(
        r#"for d in /proc/[0-9]*; do
        c=$(cat $d/comm 2>/dev/null) || continue
        s=$(cut -d' ' -f3 $d/stat 2>/dev/null) || continue
        [ "$c" = {name} ] && [ "$s" != Z ] && echo "$d"
    done; true"#
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = client.run(sh(&script));
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        if listed.is_empty() || Instant::now() > deadline {
            return listed;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`live_processes`] for `sleep`.
pub fn live_sleeps(client: &mut Client) -> String {
    live_processes(client, "sleep")
}

pub fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}
