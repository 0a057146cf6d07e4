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
/// which is then renamed into place. One builder at a time: concurrent
/// callers (test binaries, `ember run`s started together) wait on a lock
/// file next to the entry and then use the entry the first one made,
/// rather than each paying a cold boot on a cold cache. `io` wraps a file
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
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock_path = parent.join(format!(".{name}.lock"));
    // Held until this function returns (closing the file releases it, and
    // so does the death of a builder that is killed).
    let _lock = lock_exclusive(&lock_path).map_err(|e| io(lock_path.clone(), e))?;
    // Swept on every call, not only before a build: an entry whose key
    // changed is never built again under its old name, so its killed
    // builder's leftovers would otherwise stay for good.
    remove_abandoned_builds(&parent);
    if dir.join(complete).exists() {
        return Ok(());
    }
    let building = parent.join(format!(".{name}{BUILDING}{}", std::process::id()));
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

/// Opens (creating it) and locks the file at `path` exclusively, waiting
/// for the holder if there is one.
fn lock_exclusive(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    loop {
        // SAFETY: flock on a descriptor this function owns; no memory is
        // passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// What names an entry's build directory: `.<entry>.building.<pid>`.
const BUILDING: &str = ".building.";

/// Removes the `.<entry>.building.<pid>` directories in `parent` whose
/// builder is gone (killed mid-build): a snapshot's memory file is as
/// large as the guest's RAM, and nothing else would ever remove them.
fn remove_abandoned_builds(parent: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.starts_with('.'))
            .and_then(|n| n.rsplit_once(BUILDING))
            .map(|(_, pid)| pid)
        else {
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
        remove_abandoned_builds(&parent);
        assert!(parent.join(live).exists());
        assert!(!parent.join(dead).exists());
        assert!(!parent.join(other).exists(), "another entry's");
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_complete_entry_still_sweeps_abandoned_builds() {
        let parent = std::env::temp_dir().join(format!("ember-paths-fast-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let dir = parent.join("entry");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("done"), "").unwrap();
        // A killed builder of an entry whose key has since changed.
        let stale = parent.join(".old-entry.building.99999999");
        std::fs::create_dir_all(&stale).unwrap();
        build_cache_entry(&dir, "done", |_| unreachable!("built"), |_, e| e).unwrap();
        assert!(!stale.exists());
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn concurrent_builders_build_once() {
        let parent = std::env::temp_dir().join(format!("ember-paths-once-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let dir = parent.join("entry");
        let builds = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    build_cache_entry(
                        &dir,
                        "done",
                        |building| {
                            builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            std::fs::create_dir_all(building)?;
                            std::fs::write(building.join("done"), "")
                        },
                        |_, e| e,
                    )
                    .unwrap();
                });
            }
        });
        assert_eq!(builds.into_inner(), 1);
        assert!(dir.join("done").exists());
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
