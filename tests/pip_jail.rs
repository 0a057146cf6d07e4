//! A bundle's dependencies are installed by pip in a jail: a hostile
//! sdist's build backend (the tenant's code, run by `pip wheel`) runs as
//! an unprivileged uid with no capabilities, sees none of the host's
//! secrets, writes nowhere but its build directory and leaves no process
//! behind, and the build still succeeds. No KVM and no network: the sdist
//! is made here and found through the requirements file's own
//! `--no-index --find-links`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ember::function::pip::{self, PipError};
use ember::function::pip_jail::{PipJail, PipJailError};
use serde_json::Value;

/// A PEP 517 backend in the sdist itself (no setuptools needed offline):
/// whatever hook pip calls imports it, and at import it tries what a
/// hostile package would, recording what happened; `build_wheel` puts
/// the record into the wheel, so the installed site shows it.
const BACKEND: &str = r#"
import base64, hashlib, json, os, subprocess, sys, time, zipfile

TAG = "@TAG@"
OUTSIDE = "@OUTSIDE@"
NAME, VERSION = "@NAME@", "1.0"
DIST = f"{NAME}-{VERSION}.dist-info"
META = f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"

def attempt(fn):
    try:
        return "done: " + repr(fn())
    except BaseException as e:
        return "refused: " + type(e).__name__

def write(path):
    with open(path, "w") as f:
        f.write("written by a hostile build backend")
    return path

def hostile():
    r = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
         "groups": os.getgroups(), "pid": os.getpid()}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapPrm", "CapInh", "CapAmb", "NoNewPrivs"):
            r[key] = value.strip()
    r["cgroup"] = open("/proc/self/cgroup").read()
    r["read_shadow"] = attempt(lambda: len(open("/etc/shadow").read()))
    r["list_root_ssh"] = attempt(lambda: os.listdir("/root/.ssh"))
    r["write_root"] = attempt(lambda: write("/root/ember-hostile-" + TAG))
    r["write_tmp"] = attempt(lambda: write("/tmp/ember-hostile-" + TAG))
    r["write_outside"] = attempt(lambda: write(OUTSIDE + "/written-" + TAG))
    r["write_usr"] = attempt(lambda: write("/usr/ember-hostile-" + TAG))
    r["write_etc"] = attempt(lambda: write("/etc/ember-hostile-" + TAG))
    r["list_outside"] = attempt(lambda: os.listdir(OUTSIDE))
    r["setuid_root"] = attempt(lambda: os.setuid(0))
    # Processes meant to outlive the build (their output elsewhere: pip
    # waits for the end of the backend's output).
    r["background_sleep"] = attempt(
        lambda: os.system("sleep 1000." + TAG + " </dev/null >/dev/null 2>&1 &"))
    r["daemon"] = attempt(lambda: subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1000)", "ember-hostile-" + TAG],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True).pid)
    return r

REPORT = hostile()
if "@SLEEP@" == "yes":
    time.sleep(1000)

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(directory, config_settings=None):
    os.makedirs(os.path.join(directory, DIST))
    with open(os.path.join(directory, DIST, "METADATA"), "w") as f:
        f.write(META)
    return DIST

def build_wheel(directory, config_settings=None, metadata_directory=None):
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    files = {
        f"{NAME}_report.json": json.dumps(REPORT).encode(),
        f"{NAME}.py": b"BUILT = True\n",
        f"{DIST}/METADATA": META.encode(),
        f"{DIST}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hostile\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(os.path.join(directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{DIST}/RECORD,,")
        z.writestr(f"{DIST}/RECORD", "\n".join(record) + "\n")
    return name
"#;

/// A requirements directory whose `requirements.txt` names the sdist
/// `name` 1.0 (only an sdist: no wheel), in its own `sdists/`.
fn bundle_with_sdist(
    scratch: &Path,
    name: &str,
    tag: &str,
    outside: &Path,
    sleep: bool,
) -> PathBuf {
    let src = scratch.join("src").join(format!("{name}-1.0"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("pyproject.toml"),
        "[build-system]\nrequires = []\nbuild-backend = \"backend\"\nbackend-path = [\".\"]\n",
    )
    .unwrap();
    let backend = BACKEND
        .replace("@TAG@", tag)
        .replace("@OUTSIDE@", &outside.to_string_lossy())
        .replace("@NAME@", name)
        .replace("@SLEEP@", if sleep { "yes" } else { "no" });
    std::fs::write(src.join("backend.py"), backend).unwrap();
    std::fs::write(
        src.join("PKG-INFO"),
        format!("Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"),
    )
    .unwrap();
    let req = scratch.join("bundle");
    std::fs::create_dir_all(req.join("sdists")).unwrap();
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(req.join("sdists").join(format!("{name}-1.0.tar.gz")))
        .arg("-C")
        .arg(scratch.join("src"))
        .arg(format!("{name}-1.0"))
        .status()
        .unwrap();
    assert!(tar.success());
    std::fs::write(
        req.join("requirements.txt"),
        format!("--no-index\n--find-links sdists\n{name}==1.0\n"),
    )
    .unwrap();
    req.join("requirements.txt")
}

fn jail() -> PipJail {
    let mut jail = PipJail::new(None);
    jail.worker_exe = env!("CARGO_BIN_EXE_ember").into();
    jail
}

/// Processes whose command line holds `tag`.
fn processes_with(tag: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(tag) {
                found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn tag() -> String {
    // Digits only: it is also the fraction of `sleep 1000.<tag>`.
    format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

#[test]
fn a_hostile_sdist_builds_jailed_and_nothing_it_tries_works() {
    let scratch = common::temp_path("pip-jail-hostile");
    let outside = scratch.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "the host's").unwrap();
    let tag = tag();
    let requirements = bundle_with_sdist(&scratch, "hostile", &tag, &outside, false);

    let into = scratch.join("entry");
    pip::install_site(&requirements, &into, &jail())
        .unwrap_or_else(|e| panic!("the jailed build failed: {e}"));
    let site = into.join(pip::SITE);
    assert_eq!(
        std::fs::read_to_string(site.join("hostile.py")).unwrap(),
        "BUILT = True\n"
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(site.join("hostile_report.json")).unwrap()).unwrap();
    eprintln!("what the backend saw: {report:#}");

    let uid = report["uid"].as_u64().unwrap();
    assert!(uid >= u64::from(ember::jail::DEFAULT_JAIL_ID), "{report}");
    assert_eq!(report["euid"], report["uid"]);
    assert_eq!(report["gid"], report["uid"]);
    assert_eq!(report["groups"], serde_json::json!([]));
    for caps in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(report[caps], "0000000000000000", "{caps}: {report}");
    }
    assert_eq!(report["NoNewPrivs"], "1");
    // In cgroups of its own (all its processes within one memory, CPU and
    // task limit), as a worker is.
    let cgroup = report["cgroup"].as_str().unwrap_or_default();
    assert!(
        cgroup
            .lines()
            .any(|l| l.contains("memory") && l.contains("/worker-"))
            || cgroup
                .lines()
                .any(|l| l.starts_with("0::") && l.contains("/worker-")),
        "the build ran outside its own cgroups: {cgroup}"
    );
    // PID 1 is pip, in a PID namespace of its own: the backend is a
    // low-numbered process there.
    assert!(report["pid"].as_u64().unwrap() < 100, "{report}");
    for what in [
        "read_shadow",
        "list_root_ssh",
        "write_root",
        "write_tmp",
        "write_outside",
        "write_usr",
        "write_etc",
        "list_outside",
        "setuid_root",
    ] {
        let outcome = report[what].as_str().unwrap();
        assert!(outcome.starts_with("refused"), "{what}: {outcome}");
    }
    // Nothing it tried to write exists on the host.
    for path in [
        PathBuf::from(format!("/root/ember-hostile-{tag}")),
        PathBuf::from(format!("/tmp/ember-hostile-{tag}")),
        outside.join(format!("written-{tag}")),
        PathBuf::from(format!("/usr/ember-hostile-{tag}")),
        PathBuf::from(format!("/etc/ember-hostile-{tag}")),
    ] {
        assert!(!path.exists(), "{} was written", path.display());
    }
    // Its background processes started, and died with the build.
    assert!(
        report["daemon"].as_str().unwrap().starts_with("done"),
        "{report}"
    );
    let left = processes_with(&tag);
    assert!(left.is_empty(), "processes outlived the build: {left:?}");
    // Root's, with normal modes; the jail's directory is gone.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(site.join("hostile.py")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 0, 0o644)
    );
    assert!(!into.join("jail").exists());
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_build_over_its_time_is_killed_with_all_it_started() {
    let scratch = common::temp_path("pip-jail-timeout");
    let outside = scratch.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let tag = tag();
    let requirements = bundle_with_sdist(&scratch, "sleeper", &tag, &outside, true);
    let mut jail = jail();
    jail.timeout = Duration::from_secs(20);
    let err = pip::install_site(&requirements, &scratch.join("entry"), &jail).unwrap_err();
    assert!(
        matches!(err, PipError::Jail(PipJailError::Timeout { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("limit of 20 s"), "{err}");
    // The kill reaches the whole jail: give the kernel a moment.
    let mut left = processes_with(&tag);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = processes_with(&tag);
    }
    assert!(
        left.is_empty(),
        "processes outlived the killed build: {left:?}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The "wheels only" install builds a direct reference anyway (pip
/// ignores `--only-binary` for it): that install is jailed too. The
/// reference names the sdist by its path in the jail, where the bundle's
/// directory is `/req`.
#[test]
fn a_direct_reference_is_built_jailed_by_the_wheels_only_install() {
    let scratch = common::temp_path("pip-jail-direct");
    let outside = scratch.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let tag = tag();
    let requirements = bundle_with_sdist(&scratch, "direct", &tag, &outside, false);
    std::fs::write(
        &requirements,
        "--no-index\ndirect @ file:///req/sdists/direct-1.0.tar.gz\n",
    )
    .unwrap();
    let into = scratch.join("entry");
    pip::install_site(&requirements, &into, &jail())
        .unwrap_or_else(|e| panic!("the jailed install failed: {e}"));
    let report: Value = serde_json::from_slice(
        &std::fs::read(into.join(pip::SITE).join("direct_report.json")).unwrap(),
    )
    .unwrap();
    assert!(report["uid"].as_u64().unwrap() >= u64::from(ember::jail::DEFAULT_JAIL_ID));
    assert_eq!(report["CapEff"], "0000000000000000");
    assert!(report["read_shadow"]
        .as_str()
        .unwrap()
        .starts_with("refused"));
    assert!(processes_with(&tag).is_empty());
    let _ = std::fs::remove_dir_all(&scratch);
}
