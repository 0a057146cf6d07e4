//! Cache keys: SHA-256 content hashes of everything a cached artifact (the
//! default snapshot, a function template) was made from, so that a changed
//! input, such as a rebuilt kernel, initramfs (which holds the agent) or
//! root image, or an edited handler, never finds a stale entry.
//!
//! Input files are hashed whole, once per process: a digest is remembered
//! by the file's canonical path and identity (device, inode, size,
//! modification and change times), so asking again costs a `stat` (files
//! changed in the last two seconds are hashed every time). The 156 MiB
//! python image takes 0.3-0.4 s to hash here, once per process (the
//! workspace builds `sha2` optimised even in dev builds: unoptimised, 8 s).
//! This holds for any file a caller names, not only for the build scripts'
//! content-addressed cache entries.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// What identifies one version of a file well enough to reuse its digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileVersion {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(path: PathBuf, meta: &std::fs::Metadata) -> Self {
        FileVersion {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

fn digests() -> &'static Mutex<HashMap<FileVersion, Sha256Digest>> {
    static DIGESTS: OnceLock<Mutex<HashMap<FileVersion, Sha256Digest>>> = OnceLock::new();
    DIGESTS.get_or_init(Default::default)
}

/// The SHA-256 of `path`'s contents, hashed at most once per version of
/// the file in this process.
pub fn file_digest(path: &Path) -> io::Result<Sha256Digest> {
    let canonical = std::fs::canonicalize(path)?;
    let mut file = File::open(&canonical)?;
    let before = FileVersion::of(canonical.clone(), &file.metadata()?);
    if let Some(digest) = lock(digests()).get(&before) {
        return Ok(*digest);
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest: Sha256Digest = hasher.finalize().into();
    // Remembered only if the file did not change while it was read, and
    // was last changed a while ago: file times tick with the kernel's
    // coarse clock, so a write in the same tick as an earlier one may
    // leave every field of the identity as it was (git's "racily clean"
    // entries). Such a file is hashed again next time.
    if FileVersion::of(canonical, &file.metadata()?) == before && settled(&before) {
        lock(digests()).insert(before, digest);
    }
    Ok(digest)
}

/// Whether `version` was last changed long enough ago (by the system
/// clock) that a change now would show in its times.
fn settled(version: &FileVersion) -> bool {
    const SETTLE_SECS: i64 = 2;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    version.ctime.0.max(version.mtime.0) < now.saturating_sub(SETTLE_SECS)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding it leaves a map that is still valid.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Builds a key from named fields. Each name and value goes in with its
/// length, so no two different field lists hash alike.
#[derive(Clone)]
pub struct KeyBuilder {
    hasher: Sha256,
}

impl KeyBuilder {
    /// A key for artifacts of kind `kind` (e.g. `"snapshot"`).
    pub fn new(kind: &str) -> Self {
        let mut key = KeyBuilder {
            hasher: Sha256::new(),
        };
        key.field("kind", kind);
        key
    }

    /// Adds the field `name` with the bytes `value`.
    pub fn field(&mut self, name: &str, value: impl AsRef<[u8]>) -> &mut Self {
        for part in [name.as_bytes(), value.as_ref()] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// Adds the field `name` with the contents of the file at `path`.
    pub fn file(&mut self, name: &str, path: &Path) -> io::Result<&mut Self> {
        let digest = file_digest(path)?;
        Ok(self.field(name, digest))
    }

    /// The key: 64 lowercase hex digits.
    pub fn finish(self) -> String {
        hex(&self.hasher.finalize())
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A fresh scratch directory holding `files` (name, content): stand-in
/// inputs for key tests (keys only hash them).
#[cfg(test)]
pub(crate) fn scratch_inputs(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-key-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, data) in files {
        std::fs::write(dir.join(file), data).unwrap();
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("ember-cache-key-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn known_digest() {
        let path = temp_file("abc", b"abc");
        assert_eq!(
            hex(&file_digest(&path).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn an_edited_file_is_hashed_again() {
        let path = temp_file("edited", b"one");
        let first = file_digest(&path).unwrap();
        assert_eq!(file_digest(&path).unwrap(), first);
        // Same size, same inode, and within the same clock tick quite
        // possibly the same times: not taken from memory all the same.
        std::fs::write(&path, b"two").unwrap();
        assert_ne!(file_digest(&path).unwrap(), first);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_settled_file_is_remembered() {
        let path = temp_file("settled", b"settled");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // The change time is now: not settled yet.
        let canonical = std::fs::canonicalize(&path).unwrap();
        let version = FileVersion::of(canonical, &std::fs::metadata(&path).unwrap());
        assert!(!settled(&version));
        let long_ago = FileVersion {
            mtime: (0, 0),
            ctime: (0, 0),
            ..version
        };
        assert!(settled(&long_ago));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_error() {
        assert!(file_digest(Path::new("/nonexistent/ember-cache-key")).is_err());
    }

    #[test]
    fn fields_are_not_ambiguous() {
        let key = |fields: &[(&str, &str)]| {
            let mut k = KeyBuilder::new("test");
            for (name, value) in fields {
                k.field(name, value);
            }
            k.finish()
        };
        assert_ne!(key(&[("a", "bc")]), key(&[("ab", "c")]));
        assert_ne!(key(&[("a", "b"), ("c", "")]), key(&[("a", "bc")]));
        assert_eq!(key(&[("a", "b")]), key(&[("a", "b")]));
        assert_eq!(key(&[]).len(), 64);
        let mut other_kind = KeyBuilder::new("other");
        other_kind.field("a", "b");
        assert_ne!(other_kind.finish(), key(&[("a", "b")]));
    }
}
