//! The code drive: a bundle and its installed dependencies as a read-only
//! ext4 image, mounted in the guest at [`GUEST_CODE_DIR`] (the bundle at
//! its root, the dependencies in [`SITE_DIR`]).
//!
//! Every python file is byte-compiled on the host for the paths the guest
//! sees (`compileall -p /var/task`), with unchecked-hash `.pyc` files: the
//! drive is read-only, so without them every import would compile in the
//! guest, and with timestamp-checked ones every import would `stat` its
//! source (both are emulated guest-kernel work on PVM hosts). This needs a
//! host CPython 3.11, the guest's (the `.pyc` format is per minor version).
//!
//! ext4 rather than erofs: `mkfs.erofs` is not on the host and the guest
//! kernel has no EROFS; a mount plus first import are measured in the
//! README's "Functions: bundles and dependencies".
//!
//! Images are cached by content, `code-<key>/code.ext4` in the cache,
//! keyed by the bundle's digest (see [`bundle::digest`], which covers its
//! `requirements.txt`) and this module's [`FORMAT`].

use std::path::{Path, PathBuf};
use std::process::Command;

use super::bundle::{self, BundleError, REQUIREMENTS, SITE_DIR};
use super::pip::{self, PipError};
use super::pip_jail::PipJail;
use crate::cache_key::KeyBuilder;
use crate::paths;

/// Where the agent mounts the code drive in the guest.
pub const GUEST_CODE_DIR: &str = "/var/task";
/// The image's file name in its cache entry.
pub const IMAGE_FILE: &str = "code.ext4";
/// Bumped when the image's layout or making changes.
const FORMAT: u32 = 1;

/// The code drive could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CodeImageError {
    /// The bundle is unreadable or refused.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Its dependencies could not be installed.
    #[error(transparent)]
    Pip(#[from] PipError),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A tool (`python3 -m compileall`, `mkfs.ext4`) failed.
    #[error("{tool} failed: {message}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// Its output's end, or why it could not run.
        message: String,
    },
}

/// A code drive image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeDrive {
    /// The image file.
    pub image: PathBuf,
    /// Its content key (a SHA-256 over what it is made from).
    pub key: String,
}

/// The cache key of `code`'s drive.
pub fn code_key(code: &Path) -> Result<String, CodeImageError> {
    let mut key = KeyBuilder::new("code-drive");
    key.field("format", FORMAT.to_le_bytes())
        .field("bundle", bundle::digest(code)?);
    Ok(key.finish())
}

/// The code drive of the bundle `code` (a directory or a `.zip`) whose
/// handler module is `module`, made first if it is not cached (`on_build`
/// is told: installing dependencies can take minutes); pip runs in `jail`.
pub fn ensure_code_drive(
    code: &Path,
    module: &str,
    jail: &PipJail,
    on_build: impl FnOnce(),
) -> Result<CodeDrive, CodeImageError> {
    bundle::check_module_name(module)?;
    bundle::check_source_module(code, module)?;
    let key = code_key(code)?;
    let dir = paths::cache_dir().join(format!("code-{key}"));
    if !dir.join(IMAGE_FILE).exists() {
        on_build();
        paths::build_cache_entry(
            &dir,
            IMAGE_FILE,
            |building| build(code, module, building, jail),
            CodeImageError::Io,
        )?;
    }
    Ok(CodeDrive {
        image: dir.join(IMAGE_FILE),
        key,
    })
}

fn build(code: &Path, module: &str, building: &Path, jail: &PipJail) -> Result<(), CodeImageError> {
    std::fs::create_dir_all(building).map_err(|e| CodeImageError::Io(building.into(), e))?;
    let tree = building.join("tree");
    bundle::stage(code, &tree)?;
    bundle::check_module(code, &tree, module)?;
    let requirements = tree.join(REQUIREMENTS);
    if requirements.is_file() {
        let site = pip::ensure_site(&requirements, jail, || {
            log::info!("installing {} with pip", requirements.display());
        })?;
        copy_tree(&site, &tree.join(SITE_DIR))?;
    }
    compile(&tree)?;
    let image = building.join(IMAGE_FILE);
    let tmp = building.join(format!(".{IMAGE_FILE}.tmp"));
    make_ext4(&tree, &tmp)?;
    std::fs::remove_dir_all(&tree).map_err(|e| CodeImageError::Io(tree.clone(), e))?;
    std::fs::rename(&tmp, &image).map_err(|e| CodeImageError::Io(image, e))
}

/// Byte-compiles every python file under `tree` for its path in the guest.
fn compile(tree: &Path) -> Result<(), CodeImageError> {
    let version = Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .map_err(|e| tool_error("python3", e.to_string()))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    if version != "3.11" {
        return Err(tool_error(
            "python3 -m compileall",
            format!(
                "the host's python3 is {version:?}: byte-compiling for the guest needs \
                 CPython 3.11 (the guest's) as `python3` on the host"
            ),
        ));
    }
    let tree_arg = tree.to_string_lossy();
    let output = Command::new("python3")
        .args([
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            &tree_arg,
            "-p",
            GUEST_CODE_DIR,
            &tree_arg,
        ])
        .output()
        .map_err(|e| tool_error("python3 -m compileall", e.to_string()))?;
    if !output.status.success() {
        // A file that does not compile (a template named .py, python 2
        // code in a package's tests) only fails if it is ever imported.
        log::warn!(
            "some files of the bundle do not compile: {}",
            last_lines(&output.stdout)
        );
    }
    Ok(())
}

/// A read-only ext4 image of `tree` at `image`, sized to fit.
fn make_ext4(tree: &Path, image: &Path) -> Result<(), CodeImageError> {
    let (bytes, inodes) = usage(tree)?;
    // Data in 4 KiB blocks, inode tables, and room for ext4's own.
    let mut size_kib = (bytes / 1024) * 5 / 4 + inodes * 2 + 8192;
    for _ in 0..3 {
        let _ = std::fs::remove_file(image);
        let output = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", "ember-code"])
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-E", "root_owner=0:0,lazy_itable_init=0"])
            .arg("-N")
            .arg((inodes + 64).to_string())
            .arg("-d")
            .arg(tree)
            .arg(image)
            .arg(format!("{size_kib}k"))
            .output()
            .map_err(|e| tool_error("mkfs.ext4", e.to_string()))?;
        if output.status.success() {
            return Ok(());
        }
        let mut text = output.stdout;
        text.extend_from_slice(&output.stderr);
        let message = last_lines(&text);
        if !message.contains("allocate") && !message.contains("space") {
            return Err(tool_error("mkfs.ext4", message));
        }
        size_kib = size_kib * 3 / 2;
    }
    Err(tool_error(
        "mkfs.ext4",
        format!("the bundle does not fit {size_kib} KiB"),
    ))
}

/// Bytes (in 4 KiB blocks) and entries under `dir`.
fn usage(dir: &Path) -> Result<(u64, u64), CodeImageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| CodeImageError::Io(p, e)
    };
    let (mut bytes, mut inodes) = (4096u64, 1u64);
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let meta = entry.metadata().map_err(io(&entry.path()))?;
        inodes += 1;
        if meta.is_dir() {
            let (b, i) = usage(&entry.path())?;
            bytes += b;
            inodes += i;
        } else {
            bytes += meta.len().div_ceil(4096) * 4096;
        }
    }
    Ok((bytes, inodes))
}

/// Copies `from` into `to` (made here): hard links where it can (the
/// cached site directory is never written), copies otherwise.
fn copy_tree(from: &Path, to: &Path) -> Result<(), CodeImageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| CodeImageError::Io(p, e)
    };
    std::fs::create_dir(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(io(&source))?;
        if kind.is_dir() {
            copy_tree(&source, &target)?;
        } else if kind.is_symlink() {
            let link = std::fs::read_link(&source).map_err(io(&source))?;
            std::os::unix::fs::symlink(link, &target).map_err(io(&target))?;
        } else if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).map_err(io(&source))?;
        }
    }
    Ok(())
}

fn tool_error(tool: &'static str, message: String) -> CodeImageError {
    CodeImageError::Tool { tool, message }
}

fn last_lines(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_holds_the_bundle_compiled_for_the_guest() {
        let dir = std::env::temp_dir().join(format!("ember-code-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let code = dir.join("code");
        std::fs::create_dir_all(code.join("app")).unwrap();
        std::fs::write(code.join("app/main.py"), "def handler(e):\n    return e\n").unwrap();
        let building = dir.join("entry");
        let jail = PipJail::new(None);
        build(&code, "app.main", &building, &jail).unwrap();
        let image = building.join(IMAGE_FILE);
        let len = std::fs::metadata(&image).unwrap().len();
        assert!(len > 0 && len.is_multiple_of(512), "{len}");
        // debugfs lists the image's files without mounting it.
        let listing = Command::new("debugfs")
            .args(["-R", "ls -p /app/__pycache__"])
            .arg(&image)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(listing.contains("main.cpython-311.pyc"), "{listing}");
        assert!(matches!(
            build(&code, "app.nothere", &dir.join("entry2"), &jail),
            Err(CodeImageError::Bundle(BundleError::NoModule { .. }))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
