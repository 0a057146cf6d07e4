//! The `ember` command line: bad input gets one clear line and a non-zero
//! exit, never a panic; a guest power-off ends `ember boot` with 0.

mod common;

use std::time::Duration;

use common::{guest_artifacts, run_ember, temp_path, BOOT_TIMEOUT};

const QUICK: Duration = Duration::from_secs(60);

/// Asserts a failed run with exactly one `ember: error:` line on stderr
/// containing `needle`, and no panic.
fn assert_clear_error(args: &[&str], needle: &str) {
    let out = run_ember(args, QUICK);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("ember: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(needle),
        "expected {needle:?} in {stderr}"
    );
}

fn with_artifacts<'a>(kernel: &'a str, initrd: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["boot", "--kernel", kernel, "--initrd", initrd];
    args.extend_from_slice(rest);
    args
}

#[test]
fn zero_vcpus_is_rejected() {
    let (k, i) = guest_artifacts();
    let (k, i) = (k.to_str().unwrap(), i.to_str().unwrap());
    assert_clear_error(
        &with_artifacts(k, i, &["--vcpus", "0"]),
        "vcpus must be between 1 and",
    );
}

#[test]
fn too_many_vcpus_is_rejected() {
    let (k, i) = guest_artifacts();
    let (k, i) = (k.to_str().unwrap(), i.to_str().unwrap());
    assert_clear_error(&with_artifacts(k, i, &["--vcpus", "255"]), "got 255");
}

#[test]
fn out_of_range_vcpus_argument_is_a_usage_error() {
    let out = run_ember(&["boot", "--vcpus", "100000"], QUICK);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus"));
}

#[test]
fn too_little_memory_is_rejected() {
    let (k, i) = guest_artifacts();
    let (k, i) = (k.to_str().unwrap(), i.to_str().unwrap());
    assert_clear_error(
        &with_artifacts(k, i, &["--mem-mib", "1"]),
        "memory must be between",
    );
}

#[test]
fn too_much_memory_is_rejected() {
    let (k, i) = guest_artifacts();
    let (k, i) = (k.to_str().unwrap(), i.to_str().unwrap());
    assert_clear_error(
        &with_artifacts(k, i, &["--mem-mib", "1048576"]),
        "got 1048576 MiB",
    );
}

#[test]
fn missing_kernel_is_rejected() {
    let (_, i) = guest_artifacts();
    assert_clear_error(
        &with_artifacts("/nonexistent/vmlinux", i.to_str().unwrap(), &[]),
        "cannot read kernel /nonexistent/vmlinux",
    );
}

#[test]
fn non_elf_kernel_is_rejected() {
    let (_, i) = guest_artifacts();
    let bogus = temp_path("not-a-kernel");
    std::fs::write(&bogus, b"#!/bin/sh\necho I am not a kernel\n").unwrap();
    assert_clear_error(
        &with_artifacts(bogus.to_str().unwrap(), i.to_str().unwrap(), &[]),
        "is not a kernel ember can boot",
    );
    std::fs::remove_file(bogus).unwrap();
}

#[test]
fn truncated_elf_kernel_is_rejected() {
    let (k, i) = guest_artifacts();
    let truncated = temp_path("truncated-vmlinux");
    let head = std::fs::read(&k).unwrap();
    std::fs::write(&truncated, &head[..4096.min(head.len())]).unwrap();
    assert_clear_error(
        &with_artifacts(truncated.to_str().unwrap(), i.to_str().unwrap(), &[]),
        "cannot load kernel",
    );
    std::fs::remove_file(truncated).unwrap();
}

#[test]
fn missing_dev_kvm_is_rejected() {
    // Hide /dev/kvm behind an empty /dev in a private mount namespace.
    let (k, i) = guest_artifacts();
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs none /dev && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_ember"))
        .args(["boot", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&i)
        .output()
        .expect("cannot run unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ember: error: cannot open /dev/kvm"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The main path: two vCPUs boot to the agent, the guest sees both, the
/// agent powers off, and `ember boot` exits 0.
#[test]
fn boot_two_vcpus_to_agent_and_power_off() {
    let (k, i) = guest_artifacts();
    let console = temp_path("console-2vcpu");
    let out = run_ember(
        &[
            "boot",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--vcpus",
            "2",
            "--console",
            console.to_str().unwrap(),
            "--cmdline-extra",
            "ember.agent=poweroff",
        ],
        BOOT_TIMEOUT,
    );
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {:?}\nstderr: {stderr}\nconsole:\n{log}",
        out.status
    );
    let ready = log
        .lines()
        .find_map(ember_protocol::parse_ready_line)
        .unwrap_or_else(|| panic!("no ready line in console:\n{log}"));
    assert_eq!(ready.cpus, Some(2), "console:\n{log}");
    assert!(
        log.contains(ember_protocol::POWER_OFF_LINE),
        "console:\n{log}"
    );
    std::fs::remove_file(console).unwrap();
}

/// `ember run` streams the command's output to the right streams and exits
/// with its status.
#[test]
fn run_streams_output_and_exit_code() {
    let out = run_ember(
        &[
            "run",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; echo out2; exit 7",
        ],
        BOOT_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"out\nout2\n");
    // The first `run` of a test run may also say it creates the default
    // snapshot.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("ember: creating the default snapshot"))
        .collect();
    assert_eq!(stderr, ["err"]);
}

#[test]
fn run_json_reports_a_timeout() {
    let out = run_ember(
        &["run", "--json", "--timeout-ms", "2000", "--", "sleep", "30"],
        BOOT_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["timed_out"], true);
    assert!(json["usage"]["wall_ms"].as_u64().unwrap() >= 1900);
}

/// A cold boot runs the VM in the `ember` process: `run` refuses it unless
/// `--in-process` says so (jailed is the default).
#[test]
fn run_cold_boot_needs_in_process() {
    let (kernel, initrd) = guest_artifacts();
    assert_clear_error(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--",
            "true",
        ],
        "add --in-process",
    );
}

/// `--isolate` is kept as a no-op (jailed is the default now): it is no
/// usage error.
#[test]
fn invoke_isolate_is_still_accepted() {
    assert_clear_error(
        &["invoke", "--isolate", "--function", "/nonexistent/fn"],
        "cannot open the function",
    );
}

/// A handler the jailed template worker (its own uid) cannot read is
/// refused before anything boots, saying what to do.
#[test]
fn function_create_refuses_a_handler_the_jail_cannot_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_path("private-handler");
    std::fs::create_dir_all(&dir).unwrap();
    let handler = dir.join("secret.py");
    std::fs::write(&handler, "def handler(event):\n    return event\n").unwrap();
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o600)).unwrap();
    let spec = format!("{}:handler", handler.display());
    let out = dir.join("out");
    assert_clear_error(
        &[
            "function",
            "create",
            "--handler",
            &spec,
            "--out",
            out.to_str().unwrap(),
        ],
        "not readable by the jailed template worker",
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
