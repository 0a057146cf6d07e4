//! Small ext4 root images made on the host for drive tests: a static
//! busybox with its applets and the files a test asks for.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory at [`super::temp_path`]`(name)`.
    pub fn new(name: &str) -> Self {
        let dir = super::temp_path(name);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a host tool; fails the test with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic bytes that do not compress or repeat in short runs.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// `dir/root.ext4` of `size_mib` MiB holding `files` (name, contents) and a
/// static busybox, so that it also works as the guest's root. The staged
/// tree is `dir/root`.
pub fn make(dir: &Path, files: &[(&str, &[u8])], size_mib: u64) -> PathBuf {
    let root = dir.join("root");
    for sub in [
        "bin", "dev", "proc", "sys", "tmp", "run", "mnt", "etc", "root",
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for (name, data) in files {
        std::fs::write(root.join(name), data).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (busybox-static, installed by scripts/setup)");
    // Relative links: `busybox --install` would point them at the host's
    // path of busybox.
    for applet in run(Command::new("/bin/busybox").arg("--list")).lines() {
        let link = root.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    let image = dir.join("root.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "ember-test", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{size_mib}M")));
    image
}
