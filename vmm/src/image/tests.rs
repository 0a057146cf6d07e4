//! Layers and archives built here with the tar crate: layer semantics on
//! a staging tree, hostile entries, and whole imports of docker save
//! archives and OCI layouts (to ext4, read back with debugfs).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::digest::sha256_hex;
use super::layers::{LayerError, Limits, Staging};
use super::{import, ImportError, ImportOptions};

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("ember-image-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A layer tar under construction. Names are written into the header as
/// given (the tar crate's own setters refuse `..` and absolute paths,
/// which the hostile tests need).
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h
    }

    fn add(mut self, mut h: tar::Header, data: &[u8]) -> Self {
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(self, name: &str) -> Self {
        let h = Self::header(tar::EntryType::Directory, name, 0o755, 0);
        self.add(h, &[])
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        let h = Self::header(tar::EntryType::Regular, name, 0o644, data.len() as u64);
        self.add(h, data)
    }

    fn owned_file(self, name: &str, data: &[u8], mode: u32, uid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, name, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(uid);
        self.add(h, data)
    }

    fn link(self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, name, 0o777, 0);
        let bytes = target.as_bytes();
        h.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
        self.add(h, &[])
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, name, target)
    }

    fn hard_link(self, name: &str, target: &str) -> Self {
        self.link(tar::EntryType::Link, name, target)
    }

    fn device(self, name: &str) -> Self {
        let h = Self::header(tar::EntryType::Char, name, 0o666, 0);
        self.add(h, &[])
    }

    fn build(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A tar archive of `files` (name, data), in order.
fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A layer as stored in an archive, and uncompressed.
type StoredLayer = (Vec<u8>, Vec<u8>);

/// A `docker save` archive of the images (tag, stored layers); each
/// layer's diff ID is the digest of `uncompressed`.
fn docker_archive(images: &[(&str, Vec<StoredLayer>)]) -> Vec<u8> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut manifest = Vec::new();
    for (i, (tag, layers)) in images.iter().enumerate() {
        let mut names = Vec::new();
        let mut diff_ids = Vec::new();
        for (stored, uncompressed) in layers {
            let name = format!("blobs/sha256/{}", sha256_hex(stored));
            diff_ids.push(format!("sha256:{}", sha256_hex(uncompressed)));
            names.push(name.clone());
            files.push((name, stored.clone()));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "n": i,
        }))
        .unwrap();
        let config_name = format!("blobs/sha256/{}", sha256_hex(&config));
        files.push((config_name.clone(), config));
        manifest.push(serde_json::json!({
            "Config": config_name, "RepoTags": [tag], "Layers": names,
        }));
    }
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    archive(&refs)
}

/// An OCI image layout in `dir` with one image (gzip layers) tagged
/// `name` through a platform index.
fn oci_layout(dir: &Path, name: &str, layers: &[Vec<u8>]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        (format!("sha256:{hex}"), data.len())
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let stored = gzip(layer);
        let (digest, size) = put(&stored);
        diff_ids.push(format!("sha256:{}", sha256_hex(layer)));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size,
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let (config_digest, config_size) = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": descs,
    }))
    .unwrap();
    let (manifest_digest, manifest_size) = put(&manifest);
    // An arm64 manifest next to it, which must not be picked; its blob
    // does not even exist.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": manifest_digest, "size": manifest_size,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": format!("sha256:{}", "0".repeat(64)), "size": 1,
             "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    }))
    .unwrap();
    let (index_digest, index_size) = put(&index);
    std::fs::write(
        dir.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": index_digest, "size": index_size,
                "annotations": {"org.opencontainers.image.ref.name": name},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
}

/// A staging tree with `layers` applied in order (and finished if all
/// applied).
fn stage(dir: &Path, layers: &[Vec<u8>], limits: Limits) -> Result<PathBuf, LayerError> {
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let mut staging = Staging::new(&root, limits).unwrap();
    for layer in layers {
        staging.apply(layer.as_slice())?;
    }
    staging.finish()?;
    Ok(root)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A file of an ext4 image, read with debugfs; `None` if it is not there.
fn ext4_cat(image: &Path, path: &str) -> Option<String> {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    (!err.contains("not found")).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names in `dir` other than `keep`: what an import left behind.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("etc/")
        .file("etc/a", b"a from layer 1")
        .file("etc/b", b"b from layer 1")
        .file("etc/keep", b"kept")
        .dir("d/")
        .file("d/x", b"x")
        .dir("d/sub/")
        .file("d/sub/y", b"y")
        .file("usr/bin/tool", b"#!/bin/sh\n")
        .build()
}

fn top_layer() -> Vec<u8> {
    Layer::new()
        .file("etc/a", b"a from layer 2")
        .file("etc/.wh.b", b"")
        .file("d/z", b"z, same layer as the opaque marker, before it")
        .file("d/.wh..wh..opq", b"")
        .hard_link("usr/bin/tool2", "usr/bin/tool")
        .symlink("etc/link", "/etc/keep")
        .device("dev/null")
        .build()
}

#[test]
fn whiteouts_opaque_directories_and_layer_order() {
    let scratch = Scratch::new("semantics");
    let root = stage(&scratch.0, &[base_layer(), top_layer()], Limits::default()).unwrap();
    assert_eq!(read(&root.join("etc/a")).as_deref(), Some("a from layer 2"));
    assert!(!root.join("etc/b").exists(), "etc/b was whited out");
    assert!(!root.join("etc/.wh.b").exists(), "whiteouts are not files");
    assert_eq!(read(&root.join("etc/keep")).as_deref(), Some("kept"));
    // The opaque directory hides the lower layer's d/x and d/sub, not
    // what its own layer put there.
    assert!(!root.join("d/x").exists());
    assert!(!root.join("d/sub").exists());
    assert!(read(&root.join("d/z")).is_some());
    assert!(!root.join("d/.wh..wh..opq").exists());
    // Hard link: one inode.
    let (a, b) = (
        std::fs::metadata(root.join("usr/bin/tool")).unwrap(),
        std::fs::metadata(root.join("usr/bin/tool2")).unwrap(),
    );
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    // A symlink is stored, never resolved (its target is the guest's).
    assert_eq!(
        std::fs::read_link(root.join("etc/link")).unwrap(),
        Path::new("/etc/keep")
    );
    // The device is skipped; the mount points the agent needs exist.
    assert!(!root.join("dev/null").exists());
    for dir in ["dev", "proc", "sys", "tmp", "run"] {
        assert!(root.join(dir).is_dir(), "/{dir}");
    }
    let tmp = std::fs::metadata(root.join("tmp")).unwrap();
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
}

#[test]
fn whiteout_hides_lower_layers_only() {
    let scratch = Scratch::new("own-whiteout");
    let layer = Layer::new()
        .file("f", b"this layer")
        .file(".wh.f", b"")
        .build();
    let root = stage(&scratch.0, &[layer], Limits::default()).unwrap();
    assert_eq!(read(&root.join("f")).as_deref(), Some("this layer"));
}

#[test]
fn a_file_replaces_a_directory_and_back() {
    let scratch = Scratch::new("replace");
    let one = Layer::new()
        .dir("x/")
        .file("x/inner", b"i")
        .file("y", b"y")
        .build();
    let two = Layer::new().file("x", b"now a file").dir("y/").build();
    let root = stage(&scratch.0, &[one, two], Limits::default()).unwrap();
    assert_eq!(read(&root.join("x")).as_deref(), Some("now a file"));
    assert!(root.join("y").is_dir());
}

#[test]
fn modes_and_owners_are_kept() {
    let scratch = Scratch::new("owners");
    let layer = Layer::new()
        .owned_file("bin/su", b"suid", 0o4755, 0)
        .owned_file("home/u/f", b"f", 0o600, 1234)
        .build();
    let root = stage(&scratch.0, &[layer], Limits::default()).unwrap();
    let su = std::fs::metadata(root.join("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    let f = std::fs::metadata(root.join("home/u/f")).unwrap();
    assert_eq!(f.mode() & 0o7777, 0o600);
    assert_eq!(f.mtime(), 1_700_000_000);
    if super::fsat::can_chown() {
        assert_eq!((f.uid(), f.gid()), (1234, 1234));
    }
    // Parents the layer left out are made 0755.
    let home = std::fs::metadata(root.join("home")).unwrap();
    assert_eq!(home.mode() & 0o7777, 0o755);
}

fn assert_refused(result: Result<PathBuf, LayerError>, what: &str) {
    match result {
        Err(LayerError::Refused { .. }) => {}
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn dot_dot_and_absolute_entries_are_refused() {
    let scratch = Scratch::new("escape");
    let outside = scratch.0.join("evil");
    for (i, name) in ["../evil", "a/../../evil", "/evil"].iter().enumerate() {
        let dir = scratch.0.join(i.to_string());
        std::fs::create_dir(&dir).unwrap();
        let layer = Layer::new().file(name, b"escaped").build();
        assert_refused(stage(&dir, &[layer], Limits::default()), name);
        assert!(!outside.exists(), "{name} wrote outside the root");
        assert!(!dir.join("evil").exists(), "{name} wrote outside the root");
    }
    // A hard link to a file outside the root.
    let dir = scratch.0.join("link");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(scratch.0.join("secret"), b"s").unwrap();
    let layer = Layer::new().hard_link("stolen", "../../secret").build();
    assert_refused(stage(&dir, &[layer], Limits::default()), "hard link out");
}

#[test]
fn writes_through_a_symlink_are_refused() {
    let scratch = Scratch::new("symlink");
    let victim = scratch.0.join("victim");
    std::fs::create_dir(&victim).unwrap();
    let victim_str = victim.to_str().unwrap();
    // In one layer, and across layers; to an absolute and a relative
    // target, as a file, a directory, a hard link and a whiteout.
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "same layer",
            vec![Layer::new()
                .symlink("etc", victim_str)
                .file("etc/passwd", b"root::0:0")
                .build()],
        ),
        (
            "next layer",
            vec![
                Layer::new().symlink("etc", "/").build(),
                Layer::new().file("etc/passwd", b"root::0:0").build(),
            ],
        ),
        (
            "relative",
            vec![Layer::new().symlink("up", "../../..").dir("up/x/").build()],
        ),
        (
            "whiteout through a link",
            vec![
                Layer::new().symlink("etc", victim_str).build(),
                Layer::new().file("etc/.wh.keep", b"").build(),
            ],
        ),
    ];
    std::fs::write(victim.join("keep"), b"k").unwrap();
    for (i, (what, layers)) in cases.into_iter().enumerate() {
        let dir = scratch.0.join(i.to_string());
        std::fs::create_dir(&dir).unwrap();
        assert_refused(stage(&dir, &layers, Limits::default()), what);
        assert!(!victim.join("passwd").exists(), "{what}: wrote through");
        assert!(victim.join("keep").exists(), "{what}: deleted through");
    }
    // Replacing the link itself is fine: `etc` becomes a directory.
    let dir = scratch.0.join("replace");
    std::fs::create_dir(&dir).unwrap();
    let layers = vec![
        Layer::new().symlink("etc", victim_str).build(),
        Layer::new().dir("etc/").file("etc/passwd", b"p").build(),
    ];
    let root = stage(&dir, &layers, Limits::default()).unwrap();
    assert!(root.join("etc").is_dir());
    assert!(!victim.join("passwd").exists());
}

#[test]
fn limits_are_enforced() {
    let scratch = Scratch::new("limits");
    let layer = Layer::new()
        .file("a", &[0; 1000])
        .file("b", &[0; 1000])
        .build();
    let dir = scratch.0.join("bytes");
    std::fs::create_dir(&dir).unwrap();
    let limits = Limits {
        max_bytes: 1500,
        ..Limits::default()
    };
    assert!(matches!(
        stage(&dir, std::slice::from_ref(&layer), limits),
        Err(LayerError::TooLarge(1500))
    ));
    let dir = scratch.0.join("entries");
    std::fs::create_dir(&dir).unwrap();
    let limits = Limits {
        max_entries: 1,
        ..Limits::default()
    };
    assert!(matches!(
        stage(&dir, &[layer], limits),
        Err(LayerError::TooManyEntries(1))
    ));
}

#[test]
fn truncated_layer_is_refused() {
    let scratch = Scratch::new("truncated");
    let layer = Layer::new().file("big", &[7; 10_000]).build();
    let cut = layer[..512 + 4096].to_vec();
    assert!(matches!(
        stage(&scratch.0, &[cut], Limits::default()),
        Err(LayerError::Corrupt(_))
    ));
}

#[test]
fn docker_archive_imports_to_ext4() {
    let scratch = Scratch::new("docker");
    let (one, two) = (base_layer(), top_layer());
    let input = scratch.0.join("image.tar");
    std::fs::write(
        &input,
        docker_archive(&[("example/app:1", vec![(one.clone(), one), (gzip(&two), two)])]),
    )
    .unwrap();
    let out = scratch.0.join("root.ext4");
    let report = import(&input, &out, &ImportOptions::default()).unwrap();
    assert_eq!(report.image, "example/app:1");
    assert_eq!(report.layers, 2);
    assert_eq!(report.stats.devices_skipped_count, 1);
    assert!(report.notes.iter().any(|n| n.contains("dev/null")));
    assert_eq!(ext4_cat(&out, "/etc/a").as_deref(), Some("a from layer 2"));
    assert_eq!(ext4_cat(&out, "/etc/b"), None);
    assert_eq!(ext4_cat(&out, "/d/x"), None);
    assert_eq!(
        ext4_cat(&out, "/usr/bin/tool2").as_deref(),
        Some("#!/bin/sh\n")
    );
    assert_eq!(
        leftovers(&scratch.0, &["image.tar", "root.ext4"]),
        Vec::<String>::new()
    );
}

#[test]
fn a_killed_imports_staging_directory_is_removed_by_the_next() {
    let scratch = Scratch::new("stale");
    // No process has a pid this large (pid_max is at most 2^22).
    let stale = scratch.0.join(".root.ext4.import-99999999-0");
    std::fs::create_dir_all(stale.join("root/etc")).unwrap();
    let other = scratch.0.join(".other.ext4.import-99999999-0");
    std::fs::create_dir(&other).unwrap();
    let layer = Layer::new().file("f", b"f").build();
    let input = scratch.0.join("image.tar");
    std::fs::write(
        &input,
        docker_archive(&[("x:1", vec![(layer.clone(), layer)])]),
    )
    .unwrap();
    import(
        &input,
        &scratch.0.join("root.ext4"),
        &ImportOptions::default(),
    )
    .unwrap();
    assert!(!stale.exists());
    assert!(
        other.exists(),
        "another output's staging directory was touched"
    );
}

#[test]
fn images_are_picked_by_reference() {
    let scratch = Scratch::new("refs");
    let layer = |text: &[u8]| {
        let l = Layer::new().file("which", text).build();
        (l.clone(), l)
    };
    let input = scratch.0.join("two.tar");
    std::fs::write(
        &input,
        docker_archive(&[
            ("first:1", vec![layer(b"first")]),
            ("docker.io/library/second:2", vec![layer(b"second")]),
        ]),
    )
    .unwrap();
    let out = scratch.0.join("root.ext4");
    let err = import(&input, &out, &ImportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("--ref"), "{err}");
    let options = ImportOptions {
        reference: Some("second:2".into()),
        ..ImportOptions::default()
    };
    import(&input, &out, &options).unwrap();
    assert_eq!(ext4_cat(&out, "/which").as_deref(), Some("second"));
    let options = ImportOptions {
        reference: Some("third:3".into()),
        ..ImportOptions::default()
    };
    let err = import(&input, &out, &options).unwrap_err();
    assert!(err.to_string().contains("no image third:3"), "{err}");
}

#[test]
fn oci_layout_imports_from_a_directory_and_a_tar() {
    let scratch = Scratch::new("oci");
    let layout = scratch.0.join("layout");
    oci_layout(&layout, "v1", &[base_layer(), top_layer()]);
    let out = scratch.0.join("root.ext4");
    let options = ImportOptions {
        reference: Some("example/app:v1".into()),
        ..ImportOptions::default()
    };
    let report = import(&layout, &out, &options).unwrap();
    assert_eq!(report.format, super::Format::Oci);
    assert_eq!(ext4_cat(&out, "/etc/a").as_deref(), Some("a from layer 2"));
    assert_eq!(ext4_cat(&out, "/etc/b"), None);

    // The same layout packed as a tar.
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &layout).unwrap();
    let packed = scratch.0.join("layout.tar");
    std::fs::write(&packed, b.into_inner().unwrap()).unwrap();
    std::fs::remove_file(&out).unwrap();
    import(&packed, &out, &ImportOptions::default()).unwrap();
    assert_eq!(ext4_cat(&out, "/etc/keep").as_deref(), Some("kept"));
}

#[test]
fn tampered_blob_fails_its_digest() {
    let scratch = Scratch::new("tampered");
    let layout = scratch.0.join("layout");
    let layer = Layer::new().file("f", b"original").build();
    oci_layout(&layout, "v1", std::slice::from_ref(&layer));
    // Swap the layer blob's content, keeping its name.
    let stored = gzip(&layer);
    let blob = layout.join("blobs/sha256").join(sha256_hex(&stored));
    std::fs::write(&blob, gzip(&Layer::new().file("f", b"tampered").build())).unwrap();
    let out = scratch.0.join("root.ext4");
    let err = import(&layout, &out, &ImportOptions::default()).unwrap_err();
    assert!(matches!(err, ImportError::Check { .. }), "{err}");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert!(!out.exists());
}

#[test]
fn corrupt_gzip_is_refused_and_leaves_nothing() {
    let scratch = Scratch::new("corrupt");
    let layer = Layer::new().file("f", &[b'x'; 100_000]).build();
    let mut stored = gzip(&layer);
    let mid = stored.len() / 2;
    for b in &mut stored[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let truncated = gzip(&layer)[..mid].to_vec();
    for (what, stored) in [("corrupt", stored), ("truncated", truncated)] {
        let input = scratch.0.join("image.tar");
        // No diff ID to check: the gzip stream itself must fail.
        std::fs::write(
            &input,
            archive(&[
                (
                    "manifest.json",
                    br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}]"#,
                ),
                ("c.json", b"{}"),
                ("l/layer.tar", &stored),
            ]),
        )
        .unwrap();
        let out = scratch.0.join("root.ext4");
        let err = import(&input, &out, &ImportOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ImportError::Layer {
                    error: LayerError::Corrupt(_),
                    ..
                }
            ),
            "{what}: {err}"
        );
        assert_eq!(
            leftovers(&scratch.0, &["image.tar"]),
            Vec::<String>::new(),
            "{what}"
        );
    }
}

#[test]
fn not_an_image_is_a_clear_error() {
    let scratch = Scratch::new("notimage");
    let out = scratch.0.join("root.ext4");
    let input = scratch.0.join("plain.tar");
    std::fs::write(&input, archive(&[("hello.txt", b"hi")])).unwrap();
    let err = import(&input, &out, &ImportOptions::default()).unwrap_err();
    assert!(matches!(err, ImportError::UnknownFormat(_)), "{err}");
    std::fs::write(&input, b"this is not a tar archive at all").unwrap();
    let err = import(&input, &out, &ImportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not a readable tar"), "{err}");
    std::fs::write(&input, gzip(b"x")).unwrap();
    let err = import(&input, &out, &ImportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("gzip-compressed"), "{err}");
    // A manifest naming a member outside the archive's names.
    std::fs::write(
        &input,
        archive(&[(
            "manifest.json",
            br#"[{"Config":"../../etc/passwd","RepoTags":["x:1"],"Layers":[]}]"#,
        )]),
    )
    .unwrap();
    let err = import(&input, &out, &ImportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no file"), "{err}");
    assert_eq!(leftovers(&scratch.0, &["plain.tar"]), Vec::<String>::new());
}

#[test]
fn python_outside_the_agents_path_gets_a_note() {
    let scratch = Scratch::new("python-note");
    let input = scratch.0.join("image.tar");
    let out = scratch.0.join("root.ext4");
    let note = |layer: Vec<u8>| {
        std::fs::write(
            &input,
            docker_archive(&[("py:1", vec![(layer.clone(), layer)])]),
        )
        .unwrap();
        let report = import(&input, &out, &ImportOptions::default()).unwrap();
        report.notes.into_iter().find(|n| n.contains("python3"))
    };
    let local = Layer::new().file("usr/local/bin/python3", b"elf").build();
    let found = note(local).expect("a note about /usr/local/bin/python3");
    assert!(found.contains("ln -s /usr/local/bin/python3"), "{found}");
    // /bin/python3 through the usrmerge link and a relative link: found.
    let merged = Layer::new()
        .symlink("bin", "usr/bin")
        .file("usr/bin/python3.11", b"elf")
        .symlink("usr/bin/python3", "python3.11")
        .file("usr/local/bin/python3", b"elf")
        .build();
    assert_eq!(note(merged), None);
}
