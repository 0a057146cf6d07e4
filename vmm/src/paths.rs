//! Where ember finds its default guest kernel and images.
//!
//! The build scripts (`kernel-config/build.sh`, `rootfs/build-initramfs.sh`)
//! cache artifacts under one directory keyed by their inputs, and point a
//! stable symlink at the newest build; these functions resolve those links.

use std::path::PathBuf;

/// Environment variable overriding the cache directory.
pub const CACHE_ENV: &str = "EMBER_CACHE";

/// The artifact cache: `$EMBER_CACHE`, else `$HOME/.cache/ember`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("ember")
}

/// The default guest kernel (`vmlinux`, built by `kernel-config/build.sh`).
pub fn default_kernel() -> PathBuf {
    cache_dir().join("vmlinux")
}

/// The default initramfs (built by `rootfs/build-initramfs.sh`).
pub fn default_initrd() -> PathBuf {
    cache_dir().join("initramfs.cpio")
}

/// The default python3 root image (built by `rootfs/build-python-image.sh`).
pub fn default_python_image() -> PathBuf {
    cache_dir().join("python3.ext4")
}

/// Makes the cache entry `dir` (a directory that is complete once it holds
/// `complete`): `build` fills a private temporary directory next to it,
/// which is then renamed into place. Concurrent builders may each build
/// one; the first rename wins and the others use it. `io` wraps a file
/// system error into the caller's error type.
pub(crate) fn build_cache_entry<E>(
    dir: &std::path::Path,
    complete: &str,
    build: impl FnOnce(&std::path::Path) -> Result<(), E>,
    io: impl Fn(PathBuf, std::io::Error) -> E,
) -> Result<(), E> {
    let parent = dir
        .parent()
        .map_or_else(cache_dir, std::path::Path::to_path_buf);
    std::fs::create_dir_all(&parent).map_err(|e| io(parent.clone(), e))?;
    let prefix = format!(
        ".{}.building.",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    remove_abandoned_builds(&parent, &prefix);
    let building = parent.join(format!("{prefix}{}", std::process::id()));
    // A leftover of an earlier process with our pid.
    let _ = std::fs::remove_dir_all(&building);
    if let Err(e) = build(&building) {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e);
    }
    if std::fs::rename(&building, dir).is_err() {
        // Somebody else finished first: theirs is as good as ours.
        let _ = std::fs::remove_dir_all(&building);
        if !dir.join(complete).exists() {
            return Err(io(
                dir.to_path_buf(),
                std::io::Error::other("cannot move the new entry into place"),
            ));
        }
    }
    Ok(())
}

/// Removes the `<prefix><pid>` build directories in `parent` whose builder
/// is gone (killed mid-build): a snapshot's memory file is as large as the
/// guest's RAM, and nothing else would ever remove them.
fn remove_abandoned_builds(parent: &std::path::Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let gone = pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id()
                && !std::path::Path::new("/proc").join(pid.to_string()).exists()
        });
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_builds_are_removed_and_live_ones_kept() {
        let parent = std::env::temp_dir().join(format!("ember-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        // pid 1 is alive; no pid is above the kernel's limit of 2^22.
        let (live, dead, other) = (
            ".x.building.1",
            ".x.building.99999999",
            ".y.building.99999999",
        );
        for name in [live, dead, other] {
            std::fs::create_dir_all(parent.join(name).join("inside")).unwrap();
        }
        remove_abandoned_builds(&parent, ".x.building.");
        assert!(parent.join(live).exists());
        assert!(!parent.join(dead).exists());
        assert!(parent.join(other).exists(), "another entry's");
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_build_leftover_with_our_pid_is_replaced() {
        let parent = std::env::temp_dir().join(format!("ember-paths-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let dir = parent.join("entry");
        let leftover = parent.join(format!(".entry.building.{}", std::process::id()));
        std::fs::create_dir_all(&leftover).unwrap();
        std::fs::write(leftover.join("stale"), "from a killed run").unwrap();
        build_cache_entry(
            &dir,
            "done",
            |building| {
                assert!(!building.join("stale").exists());
                std::fs::create_dir_all(building)?;
                std::fs::write(building.join("done"), "")
            },
            |_, e| e,
        )
        .unwrap();
        assert!(dir.join("done").exists());
        assert!(!dir.join("stale").exists());
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
