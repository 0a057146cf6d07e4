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
    let building = parent.join(format!(
        ".{}.building.{}",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
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
