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
