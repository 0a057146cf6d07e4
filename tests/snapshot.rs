//! Snapshots: what survives a snapshot, concurrent clones, and hostile or
//! mismatched snapshot files.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::{default_config, sh, shared_snapshot, temp_path};
use ember::sandbox::ExitStatus;
use ember::snapshot::{self, RestoreOptions, Snapshot, SnapshotError};
use ember::Sandbox;

/// A throwaway copy of the shared snapshot, to damage.
struct SnapshotCopy(PathBuf);

impl SnapshotCopy {
    fn new(name: &str) -> Self {
        let dir = temp_path(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = shared_snapshot().dir();
        std::fs::copy(src.join("state"), dir.join("state")).unwrap();
        // The memory file is large and sparse: a symlink keeps the test
        // cheap where only the state is damaged.
        std::os::unix::fs::symlink(src.join("memory"), dir.join("memory")).unwrap();
        SnapshotCopy(dir)
    }

    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for SnapshotCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_err(dir: &Path) -> String {
    let err = Snapshot::open(dir).expect_err("damaged snapshot must not open");
    err.to_string()
}

#[test]
fn flipped_byte_in_state_is_rejected() {
    let copy = SnapshotCopy::new("flipped");
    let mut bytes = std::fs::read(copy.state()).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(copy.state(), bytes).unwrap();
    assert!(
        open_err(&copy.0).contains("checksum"),
        "{}",
        open_err(&copy.0)
    );
}

#[test]
fn truncated_state_is_rejected() {
    let copy = SnapshotCopy::new("truncated");
    let bytes = std::fs::read(copy.state()).unwrap();
    for len in [0, 10, 30, bytes.len() - 1] {
        std::fs::write(copy.state(), &bytes[..len]).unwrap();
        let err = open_err(&copy.0);
        assert!(
            err.contains("truncated") || err.contains("short") || err.contains("empty"),
            "{len}: {err}"
        );
    }
}

#[test]
fn wrong_version_is_rejected() {
    let copy = SnapshotCopy::new("version");
    let mut bytes = std::fs::read(copy.state()).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(copy.state(), bytes).unwrap();
    assert!(
        open_err(&copy.0).contains("version 99"),
        "{}",
        open_err(&copy.0)
    );
}

#[test]
fn missing_or_short_memory_is_rejected() {
    let copy = SnapshotCopy::new("memory");
    std::fs::remove_file(copy.0.join("memory")).unwrap();
    assert!(
        open_err(&copy.0).contains("memory"),
        "{}",
        open_err(&copy.0)
    );
    std::fs::write(copy.0.join("memory"), vec![0u8; 4096]).unwrap();
    let err = open_err(&copy.0);
    assert!(err.contains("4096"), "{err}");
}

#[test]
fn shape_mismatch_is_refused() {
    let snapshot = shared_snapshot();
    assert!(snapshot.check_shape(Some(snapshot.vcpus()), None).is_ok());
    let err = snapshot.check_shape(Some(2), None).unwrap_err();
    assert!(matches!(err, SnapshotError::Mismatch(_)), "{err}");
    let err = snapshot.check_shape(None, Some(4096)).unwrap_err();
    assert!(err.to_string().contains("MiB"), "{err}");
}

#[test]
fn eight_concurrent_clones_run_and_see_distinct_entropy() {
    let snapshot = shared_snapshot();
    let outputs: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                scope.spawn(move || {
                    let mut sandbox =
                        Sandbox::restore(snapshot, &RestoreOptions::default()).expect("restore");
                    let outcome = sandbox
                        .invoke(&sh(&format!(
                            "echo clone {i}; head -c 16 /dev/urandom | od -An -tx1"
                        )))
                        .expect("invoke");
                    assert_eq!(outcome.status, ExitStatus::Code(0));
                    String::from_utf8(outcome.stdout).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.starts_with(&format!("clone {i}\n")), "{out}");
    }
    let random: HashSet<&str> = outputs
        .iter()
        .map(|o| o.lines().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        random.len(),
        8,
        "clones must not share entropy: {outputs:?}"
    );
}

#[test]
fn clone_clock_is_the_hosts() {
    let outcome = common::sandbox()
        .invoke(&ember::Invocation::new(["date", "+%s"]))
        .unwrap();
    let guest: i64 = String::from_utf8(outcome.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (host - guest).abs() < 60,
        "guest clock {guest}, host {host}"
    );
}

/// A snapshot taken after a warm-up keeps the guest's tmpfs and the
/// agent's memory (its invocation counter), and a 2-vCPU snapshot resumes
/// with both vCPUs running.
#[test]
fn two_vcpu_snapshot_keeps_files_memory_and_both_cpus() {
    let dir = temp_path("two-vcpu-snapshot");
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = default_config();
    config.vcpus = 2;
    let warmup = sh("echo persisted > /tmp/persist; pwd > /tmp/warmup-cwd");
    snapshot::create(&config, Some(&warmup), &dir).expect("snapshot create");
    let snapshot = Snapshot::open(&dir).unwrap();
    assert_eq!(snapshot.vcpus(), 2);
    let outcome = Sandbox::restore(&snapshot, &RestoreOptions::default())
        .unwrap()
        .invoke(&sh(
            "cat /tmp/persist /tmp/warmup-cwd; pwd; nproc; taskset -c 0 echo cpu0; taskset -c 1 echo cpu1",
        ))
        .unwrap();
    let stdout = String::from_utf8_lossy(&outcome.stdout).into_owned();
    assert_eq!(
        outcome.status,
        ExitStatus::Code(0),
        "{stdout} {}",
        String::from_utf8_lossy(&outcome.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "persisted");
    let warmup_cwd = lines[1];
    // The agent numbers invocations in its memory: the first one after the
    // restore is the one after the warm-up.
    let n: u32 = warmup_cwd.trim_start_matches("/tmp/inv-").parse().unwrap();
    assert_eq!(lines[2], format!("/tmp/inv-{}", n + 1));
    assert_eq!(&lines[3..], ["2", "cpu0", "cpu1"]);
    std::fs::remove_dir_all(dir).unwrap();
}
