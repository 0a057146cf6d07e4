//! `ember image import` end to end: a container image built here from the
//! python3 root image's files (no registry), as a `docker save` archive
//! with two layers, imported and used as a function's `--image`; and a
//! hostile archive refused by the command line.

mod common;

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The file layer 2 adds, and what it holds.
const ADDED: (&str, &str) = ("opt/ember-image-test.txt", "added by layer 2\n");

/// The file layer 2 whites out (the python image has it).
const WHITED_OUT: &str = "etc/hostname";

fn sha256_file(path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file entry for `tar::Builder::append_data`.
fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// Writes `dir/image.tar`: a `docker save` archive whose layer 1 is every
/// file of the python3 root image and whose layer 2 adds [`ADDED`] and
/// whites out [`WHITED_OUT`].
fn build_archive(dir: &Path, python_image: &Path) -> std::path::PathBuf {
    // The root image's files, read out of the ext4 image without mounting.
    let tree = dir.join("tree");
    std::fs::create_dir(&tree).unwrap();
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", tree.display()))
        .arg(python_image)
        .output()
        .expect("debugfs runs (install e2fsprogs)");
    assert_ok(&out, "debugfs rdump");
    assert!(
        tree.join("usr/bin/python3").exists(),
        "no python3 in the dumped tree"
    );
    assert!(
        tree.join(WHITED_OUT).exists(),
        "no /{WHITED_OUT} to white out"
    );
    let _ = std::fs::remove_dir(tree.join("lost+found"));

    let layer1 = dir.join("layer1.tar");
    let mut b = tar::Builder::new(File::create(&layer1).unwrap());
    b.follow_symlinks(false);
    b.append_dir_all(".", &tree).unwrap();
    b.into_inner().unwrap();
    std::fs::remove_dir_all(&tree).unwrap();

    let layer2 = dir.join("layer2.tar");
    let mut b = tar::Builder::new(File::create(&layer2).unwrap());
    let (added, text) = ADDED;
    b.append_data(&mut file_header(text.len() as u64), added, text.as_bytes())
        .unwrap();
    let (parent, name) = WHITED_OUT.rsplit_once('/').unwrap();
    b.append_data(&mut file_header(0), format!("{parent}/.wh.{name}"), &[][..])
        .unwrap();
    b.into_inner().unwrap();

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [
            format!("sha256:{}", sha256_file(&layer1)),
            format!("sha256:{}", sha256_file(&layer2)),
        ]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["ember-test/python:2layers"],
        "Layers": ["layer1/layer.tar", "layer2/layer.tar"],
    }]))
    .unwrap();
    let archive = dir.join("image.tar");
    let mut b = tar::Builder::new(File::create(&archive).unwrap());
    b.append_data(
        &mut file_header(manifest.len() as u64),
        "manifest.json",
        &manifest[..],
    )
    .unwrap();
    b.append_data(
        &mut file_header(config.len() as u64),
        "config.json",
        &config[..],
    )
    .unwrap();
    b.append_path_with_name(&layer1, "layer1/layer.tar")
        .unwrap();
    b.append_path_with_name(&layer2, "layer2/layer.tar")
        .unwrap();
    b.into_inner().unwrap();
    std::fs::remove_file(&layer1).unwrap();
    std::fs::remove_file(&layer2).unwrap();
    archive
}

#[test]
fn imported_two_layer_image_runs_a_python_function() {
    common::guest_artifacts();
    let python = ember::paths::default_python_image();
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup first",
        python.display()
    );
    let dir = common::temp_path("image");
    std::fs::create_dir(&dir).unwrap();
    let archive = build_archive(&dir, &python);

    let root = dir.join("root.ext4");
    let out = common::run_ember(
        &[
            "image",
            "import",
            archive.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
        ],
        Duration::from_secs(600),
    );
    assert_ok(&out, "ember image import");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&archive).unwrap();

    let handler = dir.join("check.py");
    std::fs::write(
        &handler,
        format!(
            "import os\n\
             def handler(event):\n    \
                 with open('/{}') as f:\n        \
                     added = f.read()\n    \
                 return {{'added': added, 'whited_out_exists': os.path.exists('/{WHITED_OUT}'),\n            \
                         'python_exists': os.path.exists('/usr/bin/python3')}}\n",
            ADDED.0
        ),
    )
    .unwrap();
    let function = dir.join("function");
    let out = common::run_ember(
        &[
            "function",
            "create",
            "--runtime",
            "python3",
            "--handler",
            &format!("{}:handler", handler.display()),
            "--image",
            root.to_str().unwrap(),
            "--out",
            function.to_str().unwrap(),
        ],
        Duration::from_secs(1800),
    );
    assert_ok(&out, "ember function create --image");

    let out = common::run_ember(
        &[
            "invoke",
            "--function",
            function.to_str().unwrap(),
            "--event",
            "{}",
        ],
        Duration::from_secs(300),
    );
    assert_ok(&out, "ember invoke");
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "invoke printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(
        result,
        serde_json::json!({
            "added": ADDED.1,
            "whited_out_exists": false,
            "python_exists": true,
        })
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_archive_is_refused_and_nothing_is_written() {
    let dir = common::temp_path("image-hostile");
    std::fs::create_dir(&dir).unwrap();
    // A layer whose second entry writes through the first, a symlink out
    // of the root; the tar crate's path setters refuse such names, so the
    // header is filled by hand.
    let victim = dir.join("victim");
    std::fs::create_dir(&victim).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut link = file_header(0);
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_mode(0o777);
    link.set_path("etc").unwrap();
    link.set_link_name(&victim).unwrap();
    link.set_cksum();
    layer.append(&link, &[][..]).unwrap();
    layer
        .append_data(&mut file_header(4), "etc/passwd", &b"evil"[..])
        .unwrap();
    let layer = layer.into_inner().unwrap();
    let manifest = br#"[{"Config":"c.json","RepoTags":["evil:1"],"Layers":["l/layer.tar"]}]"#;
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        ("c.json", b"{}"),
        ("l/layer.tar", &layer[..]),
    ] {
        b.append_data(&mut file_header(data.len() as u64), name, data)
            .unwrap();
    }
    let archive = dir.join("evil.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();

    let root = dir.join("root.ext4");
    let out = common::run_ember(
        &[
            "image",
            "import",
            archive.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "the import succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("etc/passwd") && stderr.contains("symbolic link"),
        "unclear error: {stderr}"
    );
    assert!(!victim.join("passwd").exists(), "wrote through the link");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["evil.tar", "victim"], "the import left files behind");
    std::fs::remove_dir_all(&dir).unwrap();
}
