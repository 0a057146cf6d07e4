//! The staged tree as an ext4 image, made by `mkfs.ext4 -d` with the
//! options of the python image (rootfs/build-python-image.sh): no journal
//! (the guest mounts it read-only), no reserved blocks, 256-byte inodes,
//! 4 KiB blocks, sized to the content plus slack.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Block size of the image.
const BLOCK: u64 = 4096;

/// Bytes per inode (`-I`).
const INODE_SIZE: u64 = 256;

/// Smallest image made.
const MIN_BYTES: u64 = 8 << 20;

/// What failed.
#[derive(Debug, Error)]
pub enum Ext4Error {
    #[error("cannot measure the staged tree at {path}: {error}")]
    Walk { path: PathBuf, error: io::Error },
    #[error("cannot run {tool}: {error} (install e2fsprogs)")]
    Spawn {
        tool: &'static str,
        error: io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What the tree needs, counted as ext4 would store it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub inodes: u64,
    pub blocks: u64,
}

impl Usage {
    /// Image size in bytes: blocks and inode tables plus 20 % and 4 MiB
    /// for the file system's own metadata, in whole MiB.
    pub fn image_bytes(&self) -> u64 {
        let need = self.blocks * BLOCK + self.inode_count() * INODE_SIZE;
        let bytes = (need + need / 5 + (4 << 20)).max(MIN_BYTES);
        bytes.div_ceil(1 << 20) << 20
    }

    /// Inodes to make room for: the tree's and 10 % more, plus ext4's
    /// reserved ones.
    pub fn inode_count(&self) -> u64 {
        self.inodes + self.inodes / 10 + 1024
    }
}

/// Counts the tree at `root` without following symbolic links: a block
/// per started 4 KiB of a file or directory, one for a symbolic link too
/// long for its inode, hard-linked files once.
pub fn measure(root: &Path) -> Result<Usage, Ext4Error> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let walk = |source| Ext4Error::Walk {
            path: path.clone(),
            error: source,
        };
        let meta = std::fs::symlink_metadata(&path).map_err(walk)?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        let ft = meta.file_type();
        if ft.is_file() || ft.is_dir() {
            usage.blocks += meta.len().div_ceil(BLOCK);
        } else if ft.is_symlink() && meta.len() > 59 {
            usage.blocks += 1;
        }
        if ft.is_dir() {
            for child in std::fs::read_dir(&path).map_err(walk)? {
                stack.push(child.map_err(walk)?.path());
            }
        }
    }
    Ok(usage)
}

/// Makes `image` (a new file) from the tree at `root`, then checks it
/// with `e2fsck -fn`. Returns the image's size.
pub fn make(root: &Path, image: &Path, label: &str) -> Result<u64, Ext4Error> {
    let usage = measure(root)?;
    let bytes = usage.image_bytes();
    run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(root)
            .args(["-L", label, "-O", "^has_journal", "-m", "0", "-I"])
            .arg(INODE_SIZE.to_string())
            .args([
                "-b",
                &BLOCK.to_string(),
                "-N",
                &usage.inode_count().to_string(),
            ])
            .args(["-E", "root_owner=0:0"])
            .arg(image)
            .arg(format!("{}M", bytes >> 20)),
    )?;
    run("e2fsck", Command::new("e2fsck").arg("-fn").arg(image))?;
    Ok(bytes)
}

fn run(tool: &'static str, command: &mut Command) -> Result<(), Ext4Error> {
    let out = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| Ext4Error::Spawn {
            tool,
            error: source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let tail: String = text
        .lines()
        .rev()
        .take(10)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(Ext4Error::Failed {
        tool,
        status: out.status,
        stderr: tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_cover_content_and_metadata() {
        let small = Usage {
            inodes: 10,
            blocks: 10,
        };
        assert_eq!(small.image_bytes(), MIN_BYTES);
        let python = Usage {
            inodes: 6000,
            blocks: 31_000,
        };
        let bytes = python.image_bytes();
        assert!(bytes > 31_000 * BLOCK + 6000 * INODE_SIZE);
        assert_eq!(bytes % (1 << 20), 0);
    }
}
