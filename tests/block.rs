//! The read-only root drive (virtio-blk): a guest sees the file system
//! image made here as `/dev/vda`, reads it back, cannot write it, and every
//! clone of a snapshot shares the one host file, which must not change.
//!
//! One cold boot (the template of a snapshot with the drive); the clones
//! are restores. Invocations run as an unprivileged user, who cannot open
//! `/dev/vda` itself: the file contents are checked through the agent's
//! mount of the drive (`ember.root`), which the image made here is a
//! usable root for.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::root_image::{self, pattern, run, TempDir};
use common::{default_config, sh_ok};
use ember::snapshot::{self, RestoreOptions, Snapshot};
use ember::Sandbox;

const HELLO: &str = "hello from the root drive";
/// Size of the image: busybox, a 1 MiB file and ext4's own blocks fit.
const IMAGE_MIB: u64 = 8;
const BIG_LEN: usize = 1 << 20;

fn md5(path: &Path) -> String {
    run(Command::new("md5sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// An ext4 image with `/hello.txt`, `/big.bin` and a static busybox, so
/// that it also works as the guest's root. Returns the image and the md5
/// of `big.bin`.
fn make_image(dir: &Path) -> (PathBuf, String) {
    let hello = format!("{HELLO}\n");
    let big = pattern(BIG_LEN);
    let image = root_image::make(
        dir,
        &[("hello.txt", hello.as_bytes()), ("big.bin", &big)],
        IMAGE_MIB,
    );
    let big_md5 = md5(&dir.join("root/big.bin"));
    (image, big_md5)
}

/// What an unprivileged invocation finds out about the drive, as
/// `key=value` lines.
const CHECKS: &str = r#"
echo "size=$(cat /sys/block/vda/size)"
echo "ro=$(cat /sys/block/vda/ro)"
echo "serial=$(cat /sys/block/vda/serial)"
echo "lbs=$(cat /sys/block/vda/queue/logical_block_size)"
if echo x 2>/dev/null >>/dev/vda; then echo raw=written; else echo raw=refused; fi
mnt=$(awk '$1 == "/dev/vda" { print $2; exit }' /proc/mounts)
echo "mnt=$mnt"
if [ -n "$mnt" ]; then
    d=${mnt%/}
    echo "opts=$(awk '$1 == "/dev/vda" { print $4; exit }' /proc/mounts)"
    echo "file=$(cat "$d/hello.txt")"
    echo "big=$(md5sum "$d/big.bin" | cut -d' ' -f1)"
    if echo x 2>/dev/null >"$d/hello.txt" || touch "$d/new" 2>/dev/null; then
        echo write=written
    else
        echo write=refused
    fi
fi
"#;

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix(key)?
            .strip_prefix('=')
    })
}

fn checks(sandbox: &mut Sandbox) -> String {
    // Every block request is guest-kernel work, emulated here (PVM): on a
    // loaded host the checks can outlast the default 60 s.
    sh_ok(sandbox, CHECKS, Duration::from_secs(300))
}

/// The checks every clone must pass.
fn assert_clone_sees_drive(out: &str, big_md5: &str) {
    let sectors = (IMAGE_MIB << 20) / 512;
    assert_eq!(
        field(out, "size"),
        Some(sectors.to_string().as_str()),
        "{out}"
    );
    assert_eq!(field(out, "ro"), Some("1"), "{out}");
    assert_eq!(field(out, "serial"), Some("ember-root"), "{out}");
    assert_eq!(field(out, "lbs"), Some("512"), "{out}");
    assert_eq!(field(out, "raw"), Some("refused"), "{out}");
    assert!(
        !field(out, "mnt").unwrap_or("").is_empty(),
        "the agent did not mount the drive (an initramfs from before ember.root? \
         rootfs/build-initramfs.sh rebuilds it):\n{out}"
    );
    assert!(field(out, "opts").unwrap_or("").starts_with("ro"), "{out}");
    assert_eq!(field(out, "file"), Some(HELLO), "{out}");
    assert_eq!(field(out, "big"), Some(big_md5), "{out}");
    assert_eq!(field(out, "write"), Some("refused"), "{out}");
}

#[test]
fn root_drive_is_read_only_and_shared_by_clones() {
    let dir = TempDir::new("block");
    let (image, big_md5) = make_image(&dir.0);
    let image_md5 = md5(&image);

    // The one cold boot: a template with the drive, snapshotted.
    let mut config = default_config();
    config.root_drive = Some(image.clone());
    let snap_dir = dir.0.join("snapshot");
    snapshot::create(&config, None, &snap_dir).expect("snapshot with a root drive");
    let snap = Snapshot::open(&snap_dir).expect("snapshot opens");
    assert!(
        snap.kernel_cmdline().contains("ember.root=/dev/vda"),
        "{}",
        snap.kernel_cmdline()
    );

    // Two clones at once, both reading the same file.
    let mut a = Sandbox::restore(&snap, &RestoreOptions::default()).expect("clone a");
    let mut b = Sandbox::restore(&snap, &RestoreOptions::default()).expect("clone b");
    let out_a = checks(&mut a);
    let out_b = checks(&mut b);
    assert_clone_sees_drive(&out_a, &big_md5);
    assert_clone_sees_drive(&out_b, &big_md5);
    drop((a, b));

    // A clone in a jailed worker (no file system: the snapshot's drive was
    // opened before the jail closed).
    let jailed = RestoreOptions {
        isolation: Some(ember::worker::Isolation::new(env!("CARGO_BIN_EXE_ember"))),
        ..RestoreOptions::default()
    };
    let mut j = Sandbox::restore(&snap, &jailed).expect("jailed clone");
    assert_clone_sees_drive(&checks(&mut j), &big_md5);
    drop(j);

    // A copy of the drive, named explicitly, serves as well.
    let copy = dir.0.join("copy.ext4");
    std::fs::copy(&image, &copy).unwrap();
    let options = RestoreOptions {
        root_drive: Some(copy.clone()),
        ..RestoreOptions::default()
    };
    let mut c = Sandbox::restore(&snap, &options).expect("clone on a copy");
    assert_clone_sees_drive(&checks(&mut c), &big_md5);
    drop(c);

    // So does the command line's --root-drive with --snapshot: a drive the
    // caller names is opened by the VMM itself, so only in-process (a
    // jailed worker takes the snapshot's own drive), and it says so.
    let run = |in_process: bool| {
        let mut args = vec!["run"];
        args.extend(in_process.then_some("--in-process"));
        args.extend([
            "--snapshot",
            snap_dir.to_str().unwrap(),
            "--root-drive",
            copy.to_str().unwrap(),
            "--",
            "cat",
            "/sys/block/vda/ro",
        ]);
        common::run_ember(&args, Duration::from_secs(120))
    };
    let refused = run(false);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("add --in-process"),
        "{refused:?}"
    );
    let out = run(true);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");

    // Nothing wrote the drive or its copy.
    assert_eq!(md5(&image), image_md5);
    assert_eq!(md5(&copy), image_md5);

    // A drive of another size is refused, explicitly named or not.
    let small = dir.0.join("small.ext4");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    let options = RestoreOptions {
        root_drive: Some(small),
        ..RestoreOptions::default()
    };
    let err = Sandbox::restore(&snap, &options).expect_err("a smaller drive must be refused");
    let want = format!(
        "the snapshot was taken with a {}-byte drive",
        IMAGE_MIB << 20
    );
    assert!(err.to_string().contains(&want), "{err}");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&image)
        .unwrap()
        .write_all(&[0u8; 512])
        .unwrap();
    let reopened = Snapshot::open(&snap_dir).expect("the snapshot itself is fine");
    let err = Sandbox::restore(&reopened, &RestoreOptions::default())
        .expect_err("a grown drive must be refused");
    assert!(err.to_string().contains(&want), "{err}");
}
