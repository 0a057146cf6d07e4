//! Helpers shared by the integration tests.
//!
//! Every test here boots or starts a real `ember`, so they need `/dev/kvm`
//! and the guest kernel and initramfs that `scripts/setup` builds into the
//! cache. A boot takes tens of seconds on PVM hosts: tests wait on events
//! (a console line, the guest's exit) with generous timeouts, never sleeps.

#![allow(dead_code)]

pub mod root_image;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

/// Upper bound for one cold boot to finish; the PVM hosts this project
/// tests on take ~30 s, hardware KVM well under a second.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest kernel and initramfs built by `scripts/setup`. Fails the
/// test, saying what is missing, when this host cannot boot microVMs.
pub fn guest_artifacts() -> (PathBuf, PathBuf) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests boot microVMs and need KVM \
         (load kvm_intel or kvm_amd, or run them on a machine with KVM)"
    );
    let kernel = ember::paths::default_kernel();
    let initrd = ember::paths::default_initrd();
    for path in [&kernel, &initrd] {
        assert!(
            path.exists(),
            "{} is missing: run scripts/setup first",
            path.display()
        );
    }
    (kernel, initrd)
}

/// The `ember` binary under test.
pub fn ember() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ember"))
}

/// Runs `ember` with `args`, killing it after `timeout`.
pub fn run_ember(args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("--signal=KILL")
        .arg(timeout.as_secs().to_string())
        .arg(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(std::process::Stdio::null());
    cmd.output().expect("cannot run ember")
}

/// A fresh temporary file path for this test process: whatever an earlier
/// process with the same pid left there is removed first.
pub fn temp_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ember-test-{}-{name}", std::process::id()));
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot remove the leftover {}: {e}", path.display())),
        Ok(_) => std::fs::remove_file(&path)
            .unwrap_or_else(|e| panic!("cannot remove the leftover {}: {e}", path.display())),
        Err(_) => {}
    }
    path
}

/// The default config: default artifacts, 1 vCPU, console discarded.
pub fn default_config() -> ember::VmConfig {
    let (kernel, initrd) = guest_artifacts();
    let mut config = ember::VmConfig::new(kernel, Some(initrd));
    config.console = ember::ConsoleOutput::Sink;
    config
}

/// The suite's shared snapshot of the default config: created once (the
/// cached default snapshot, so later test binaries and runs reuse it) and
/// opened once per test binary.
pub fn shared_snapshot() -> &'static ember::snapshot::Snapshot {
    static SNAPSHOT: std::sync::OnceLock<ember::snapshot::Snapshot> = std::sync::OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let dir = ember::snapshot::ensure_cached_snapshot(&default_config(), |dir| {
            eprintln!("creating the suite's snapshot in {}", dir.display())
        })
        .expect("shared snapshot");
        ember::snapshot::Snapshot::open(&dir).expect("shared snapshot opens")
    })
}

/// A sandbox restored from the shared snapshot.
pub fn sandbox() -> ember::Sandbox {
    ember::Sandbox::restore(shared_snapshot(), &Default::default()).expect("sandbox restores")
}

/// A cold-booted sandbox from the default artifacts.
pub fn cold_sandbox() -> ember::Sandbox {
    ember::Sandbox::boot(&default_config()).expect("sandbox boots")
}

/// An invocation of `sh -c script`.
pub fn sh(script: &str) -> ember::Invocation {
    ember::Invocation::new(["sh", "-c", script])
}

/// Runs `sh -c script` in `sandbox`, killed after `hang_guard` (a bound on
/// a hang, not a speed target: guest-kernel work is emulated on PVM
/// hosts), asserts that it exits 0, and returns its stdout.
pub fn sh_ok(sandbox: &mut ember::Sandbox, script: &str, hang_guard: Duration) -> String {
    let mut invocation = sh(script);
    invocation.timeout_ms = u64::try_from(hang_guard.as_millis()).unwrap_or(u64::MAX);
    let outcome = sandbox.invoke(&invocation).expect("invoke");
    let out = String::from_utf8_lossy(&outcome.stdout).into_owned();
    assert_eq!(
        outcome.status,
        ember::sandbox::ExitStatus::Code(0),
        "{out}{}",
        String::from_utf8_lossy(&outcome.stderr)
    );
    out
}

/// Template options for the python3 image (jailed, the defaults), failing
/// with what to run when the image or the guest artifacts are missing.
pub fn python_template_options() -> ember::function::TemplateOptions {
    let (kernel, initrd) = guest_artifacts();
    let image = ember::paths::default_python_image();
    assert!(
        image.exists(),
        "{} is missing: run scripts/setup first",
        image.display()
    );
    ember::function::TemplateOptions::new(kernel, initrd, Some(image))
}

/// The probe function's template directory (tests/functions/probe.py,
/// warmed with `{"op": "warm"}`), shared by the test binaries that need it
/// and cached across runs by its inputs: made on first use with a cold
/// boot of the python3 image and the interpreter's start (a minute or two
/// on PVM hosts).
pub fn probe_template() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let probe =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/functions/probe.py");
        let mut spec = ember::function::FunctionSpec::python3(probe, "handler");
        spec.warmup_event = Some(br#"{"op": "warm"}"#.to_vec());
        let options = python_template_options();
        ember::ensure_cached_function(&spec, &options, |dir| {
            eprintln!("making the probe function in {}", dir.display())
        })
        .expect("probe function template")
    })
}
