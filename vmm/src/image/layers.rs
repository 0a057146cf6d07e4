//! Applying layer tars, bottom first, to a staging directory, as an
//! overlay file system would stack them:
//!
//! - `.wh.NAME` deletes `NAME` of the layers below; `.wh..wh..opq` in a
//!   directory hides everything the layers below had in it;
//! - a later entry replaces what was at its name (a file over a directory
//!   replaces the whole directory);
//! - regular files, directories, symbolic links, hard links and FIFOs are
//!   made with their numeric owner, permission bits, modification time and
//!   `SCHILY.xattr.*` extended attributes; character and block devices are
//!   skipped (a guest has its own `/dev`).
//!
//! Archives are untrusted: a name that is absolute or has a `..` is
//! refused, every parent directory is resolved inside the staging root
//! without following a symbolic link (so a layer that makes `etc -> /` and
//! then writes `etc/passwd` is refused instead of writing the host's), and
//! the entries and bytes of all layers together are bounded.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::fsat::{self, Attrs, Kind};

/// The whiteout prefix of overlay-style layers.
const WHITEOUT: &[u8] = b".wh.";

/// The opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Device names quoted in the report (the rest are counted).
const DEVICES_LISTED: usize = 8;

/// Bounds on what all the layers together may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of file contents.
    pub max_bytes: u64,
    /// Entries (of any kind, whiteouts included).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 8 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What the layers held.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub whiteouts: u64,
    /// Character and block devices skipped: the first few names, and how
    /// many in all.
    pub devices_skipped: Vec<String>,
    pub devices_skipped_count: u64,
    /// Extended attributes the staging file system would not take.
    pub xattrs_failed: u64,
}

/// What failed.
#[derive(Debug, Error)]
pub enum LayerError {
    #[error("corrupt or truncated layer: {0}")]
    Corrupt(io::Error),
    #[error("entry {path:?} refused: {why}")]
    Refused { path: String, why: String },
    #[error("entry {path:?}: {op}: {error}")]
    Io {
        path: String,
        op: &'static str,
        error: io::Error,
    },
    #[error("more than {0} entries in all layers together (raise --max-entries)")]
    TooManyEntries(u64),
    #[error("more than {0} bytes of file contents in all layers together (raise --max-bytes)")]
    TooLarge(u64),
}

/// A directory's metadata, applied once all layers are in (writing into
/// a directory would change its time, and its mode may forbid writing).
#[derive(Debug, Clone)]
struct DirMeta {
    mode: u32,
    owner: (u32, u32),
    mtime: i64,
    xattrs: Vec<Xattr>,
}

/// An extended attribute: name, value.
type Xattr = (Vec<u8>, Vec<u8>);

/// A staging directory that layers are applied to.
pub struct Staging {
    root_path: PathBuf,
    root: OwnedFd,
    limits: Limits,
    stats: Stats,
    keep_owners: bool,
    /// Directories' metadata by relative path ("" is the root).
    dirs: BTreeMap<Vec<u8>, DirMeta>,
}

/// A relative path from an archive, split into components: empty and `.`
/// components dropped, absolute paths and `..` refused.
pub(crate) fn components(path: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if path.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("a `..` component"),
            part => out.push(part),
        }
    }
    Ok(out)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

fn is_under(path: &[u8], dir: &[u8]) -> bool {
    path == dir || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
}

impl Staging {
    /// Stages into the existing, empty directory `root`.
    pub fn new(root: &Path, limits: Limits) -> io::Result<Self> {
        let fd: OwnedFd = File::open(root)?.into();
        let mut dirs = BTreeMap::new();
        dirs.insert(
            Vec::new(),
            DirMeta {
                mode: 0o755,
                owner: (0, 0),
                mtime: 0,
                xattrs: Vec::new(),
            },
        );
        Ok(Staging {
            root_path: root.to_path_buf(),
            root: fd,
            limits,
            stats: Stats::default(),
            keep_owners: fsat::can_chown(),
            dirs,
        })
    }

    /// What was applied so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether files get the owners the layers give (only root can).
    pub fn keeps_owners(&self) -> bool {
        self.keep_owners
    }

    /// Applies one uncompressed layer tar read from `reader` (to its
    /// end-of-archive marker).
    pub fn apply(&mut self, reader: impl Read) -> Result<(), LayerError> {
        let mut archive = tar::Archive::new(reader);
        // Paths this layer made: whiteouts and opaque markers hide only
        // what the layers below made.
        let mut this_layer: HashSet<Vec<u8>> = HashSet::new();
        for entry in archive.entries().map_err(LayerError::Corrupt)? {
            let mut entry = entry.map_err(LayerError::Corrupt)?;
            self.stats.entries += 1;
            if self.stats.entries > self.limits.max_entries {
                return Err(LayerError::TooManyEntries(self.limits.max_entries));
            }
            let raw = entry.path_bytes().into_owned();
            let display = String::from_utf8_lossy(&raw).into_owned();
            let parts = components(&raw).map_err(|why| LayerError::Refused {
                path: display.clone(),
                why: why.into(),
            })?;
            self.entry(&mut entry, &parts, &display, &mut this_layer)?;
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parts: &[&[u8]],
        display: &str,
        this_layer: &mut HashSet<Vec<u8>>,
    ) -> Result<(), LayerError> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        let Some((&name, parent)) = parts.split_last() else {
            // The root itself: only its metadata.
            if kind == T::Directory {
                let meta = self.dir_meta(entry, display)?;
                self.dirs.insert(Vec::new(), meta);
            }
            return Ok(());
        };
        if name == OPAQUE {
            self.stats.whiteouts += 1;
            return self.opaque(parent, display, this_layer);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            self.stats.whiteouts += 1;
            if hidden.starts_with(WHITEOUT) {
                // Other `.wh..wh.` names are aufs bookkeeping.
                return Ok(());
            }
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(refused(display, "a whiteout of no name"));
            }
            return self.whiteout(parent, hidden, display, this_layer);
        }
        let rel = join(parts);
        match kind {
            T::Directory => self.make_dir(entry, parent, name, &rel, display)?,
            T::Regular | T::Continuous => self.make_file(entry, parent, name, &rel, display)?,
            T::Symlink => self.make_symlink(entry, parent, name, &rel, display)?,
            T::Link => self.make_hard_link(entry, parent, name, &rel, display)?,
            T::Fifo => self.make_fifo(entry, parent, name, &rel, display)?,
            T::Char | T::Block => {
                self.stats.devices_skipped_count += 1;
                if self.stats.devices_skipped.len() < DEVICES_LISTED {
                    self.stats.devices_skipped.push(display.to_owned());
                }
                return Ok(());
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(()),
            T::GNUSparse => return Err(refused(display, "GNU sparse files are not supported")),
            other => {
                return Err(refused(
                    display,
                    &format!("unsupported entry type {:?}", other.as_byte() as char),
                ))
            }
        }
        this_layer.insert(rel);
        Ok(())
    }

    /// The directory `parts` inside the root, opened (`O_PATH`) without
    /// following a symbolic link; with `create`, missing directories are
    /// made (layers may leave parents out). `None` if it does not exist
    /// and `create` is not set.
    fn dir(
        &mut self,
        parts: &[&[u8]],
        create: bool,
        display: &str,
    ) -> Result<Option<OwnedFd>, LayerError> {
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        match fsat::open_beneath(self.root.as_fd(), &join(parts), flags) {
            Ok(fd) => return Ok(Some(fd)),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                if !create {
                    return Ok(None);
                }
            }
            Err(err) => return Err(resolve_error(display, err)),
        }
        let mut current = fsat::open_beneath(self.root.as_fd(), b"", flags)
            .map_err(|e| io_error(display, "open the staging root", e))?;
        for (i, part) in parts.iter().enumerate() {
            match fsat::open_beneath(current.as_fd(), part, flags) {
                Ok(fd) => current = fd,
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                    fsat::mkdir(current.as_fd(), part, 0o700)
                        .map_err(|e| io_error(display, "create a parent directory", e))?;
                    self.stats.dirs += 1;
                    self.dirs.insert(
                        join(&parts[..=i]),
                        DirMeta {
                            mode: 0o755,
                            owner: (0, 0),
                            mtime: 0,
                            xattrs: Vec::new(),
                        },
                    );
                    current = fsat::open_beneath(current.as_fd(), part, flags)
                        .map_err(|e| resolve_error(display, e))?;
                }
                Err(err) => return Err(resolve_error(display, err)),
            }
        }
        Ok(Some(current))
    }

    /// The parent directory of an entry, made if missing.
    fn parent(&mut self, parts: &[&[u8]], display: &str) -> Result<OwnedFd, LayerError> {
        self.dir(parts, true, display)?.ok_or_else(|| {
            io_error(
                display,
                "create the parent directory",
                io::Error::from_raw_os_error(libc::ENOENT),
            )
        })
    }

    /// Removes whatever is at `name` in `dir` (`rel` from the root): a
    /// directory with all it holds.
    fn remove(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        display: &str,
    ) -> Result<(), LayerError> {
        match fsat::stat(dir, name).map_err(|e| io_error(display, "stat", e))? {
            None => Ok(()),
            Some(Kind::Other) => {
                fsat::unlink(dir, name).map_err(|e| io_error(display, "remove the old file", e))
            }
            Some(Kind::Dir) => {
                // Every parent of `rel` was just resolved without symbolic
                // links, and remove_dir_all never follows one.
                let path = self
                    .root_path
                    .join(Path::new(std::ffi::OsStr::from_bytes(rel)));
                std::fs::remove_dir_all(&path)
                    .map_err(|e| io_error(display, "remove the old directory", e))?;
                self.dirs.retain(|d, _| !is_under(d, rel));
                Ok(())
            }
        }
    }

    fn whiteout(
        &mut self,
        parent: &[&[u8]],
        hidden: &[u8],
        display: &str,
        this_layer: &HashSet<Vec<u8>>,
    ) -> Result<(), LayerError> {
        let mut parts = parent.to_vec();
        parts.push(hidden);
        let rel = join(&parts);
        if this_layer.contains(&rel) {
            return Ok(());
        }
        let Some(dir) = self.dir(parent, false, display)? else {
            return Ok(());
        };
        self.remove(dir.as_fd(), hidden, &rel, display)
    }

    /// Hides what the layers below have in the directory `parts` (made if
    /// missing), keeping what this layer put there.
    fn opaque(
        &mut self,
        parts: &[&[u8]],
        display: &str,
        this_layer: &HashSet<Vec<u8>>,
    ) -> Result<(), LayerError> {
        let rel = join(parts);
        if let (false, Some((&name, parent))) = (this_layer.contains(&rel), parts.split_last()) {
            let parent_fd = self.parent(parent, display)?;
            if fsat::stat(parent_fd.as_fd(), name).map_err(|e| io_error(display, "stat", e))?
                != Some(Kind::Dir)
            {
                self.remove(parent_fd.as_fd(), name, &rel, display)?;
                fsat::mkdir(parent_fd.as_fd(), name, 0o700)
                    .map_err(|e| io_error(display, "create the opaque directory", e))?;
                self.dirs.entry(rel.clone()).or_insert(DirMeta {
                    mode: 0o755,
                    owner: (0, 0),
                    mtime: 0,
                    xattrs: Vec::new(),
                });
            }
        }
        self.clear_lower(&rel, display, this_layer)
    }

    fn clear_lower(
        &mut self,
        rel: &[u8],
        display: &str,
        this_layer: &HashSet<Vec<u8>>,
    ) -> Result<(), LayerError> {
        let parts = components(rel).map_err(|why| refused(display, why))?;
        let Some(dir) = self.dir(&parts, false, display)? else {
            return Ok(());
        };
        // `rel` was just resolved without symbolic links.
        let path = self
            .root_path
            .join(Path::new(std::ffi::OsStr::from_bytes(rel)));
        let mut names = Vec::new();
        for child in
            std::fs::read_dir(&path).map_err(|e| io_error(display, "list the directory", e))?
        {
            let child = child.map_err(|e| io_error(display, "list the directory", e))?;
            names.push(child.file_name().as_bytes().to_vec());
        }
        for name in names {
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                [rel, b"/", &name].concat()
            };
            if this_layer.contains(&child_rel) {
                if fsat::stat(dir.as_fd(), &name).map_err(|e| io_error(display, "stat", e))?
                    == Some(Kind::Dir)
                {
                    self.clear_lower(&child_rel, display, this_layer)?;
                }
            } else {
                self.remove(dir.as_fd(), &name, &child_rel, display)?;
            }
        }
        Ok(())
    }

    fn attrs<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        display: &str,
    ) -> Result<Attrs, LayerError> {
        let h = entry.header();
        // The header's own errors name the entry.
        let bad = LayerError::Corrupt;
        let (uid, gid) = (h.uid().map_err(bad)?, h.gid().map_err(bad)?);
        let owner = match (u32::try_from(uid), u32::try_from(gid)) {
            (Ok(uid), Ok(gid)) => (uid, gid),
            _ => return Err(refused(display, "owner ID out of range")),
        };
        Ok(Attrs {
            owner: self.keep_owners.then_some(owner),
            mode: Some(h.mode().map_err(bad)? & 0o7777),
            mtime: i64::try_from(h.mtime().map_err(bad)?).unwrap_or(i64::MAX),
        })
    }

    fn dir_meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        display: &str,
    ) -> Result<DirMeta, LayerError> {
        let attrs = self.attrs(entry, display)?;
        Ok(DirMeta {
            mode: attrs.mode.unwrap_or(0o755),
            owner: attrs.owner.unwrap_or((0, 0)),
            mtime: attrs.mtime,
            xattrs: xattrs(entry)?,
        })
    }

    fn make_dir<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &[&[u8]],
        name: &[u8],
        rel: &[u8],
        display: &str,
    ) -> Result<(), LayerError> {
        let meta = self.dir_meta(entry, display)?;
        let dir = self.parent(parent, display)?;
        match fsat::stat(dir.as_fd(), name).map_err(|e| io_error(display, "stat", e))? {
            Some(Kind::Dir) => {}
            existing => {
                if existing.is_some() {
                    self.remove(dir.as_fd(), name, rel, display)?;
                }
                fsat::mkdir(dir.as_fd(), name, 0o700)
                    .map_err(|e| io_error(display, "create the directory", e))?;
            }
        }
        self.stats.dirs += 1;
        self.dirs.insert(rel.to_vec(), meta);
        Ok(())
    }

    fn make_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &[&[u8]],
        name: &[u8],
        rel: &[u8],
        display: &str,
    ) -> Result<(), LayerError> {
        let attrs = self.attrs(entry, display)?;
        let xattrs = xattrs(entry)?;
        let size = entry.size();
        let left = self.limits.max_bytes.saturating_sub(self.stats.bytes);
        if size > left {
            return Err(LayerError::TooLarge(self.limits.max_bytes));
        }
        let dir = self.parent(parent, display)?;
        self.remove(dir.as_fd(), name, rel, display)?;
        let fd = fsat::create_file(dir.as_fd(), name)
            .map_err(|e| io_error(display, "create the file", e))?;
        let mut file = File::from(fd);
        let copied = copy(&mut entry.take(size), &mut file, display)?;
        if copied != size {
            return Err(LayerError::Corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{display}: the layer ends after {copied} of its {size} bytes"),
            )));
        }
        self.stats.bytes += size;
        self.stats.files += 1;
        for (key, value) in &xattrs {
            if fsat::set_xattr(file.as_fd(), key, value).is_err() {
                self.stats.xattrs_failed += 1;
            }
        }
        fsat::set_attrs_fd(file.as_fd(), &attrs)
            .map_err(|e| io_error(display, "set owner, mode and time", e))
    }

    fn make_symlink<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &[&[u8]],
        name: &[u8],
        rel: &[u8],
        display: &str,
    ) -> Result<(), LayerError> {
        let mut attrs = self.attrs(entry, display)?;
        attrs.mode = None;
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| refused(display, "a symbolic link without a target"))?
            .into_owned();
        let dir = self.parent(parent, display)?;
        self.remove(dir.as_fd(), name, rel, display)?;
        fsat::symlink(&target, dir.as_fd(), name)
            .map_err(|e| io_error(display, "create the symbolic link", e))?;
        self.stats.symlinks += 1;
        fsat::set_attrs_at(dir.as_fd(), name, &attrs)
            .map_err(|e| io_error(display, "set owner and time", e))
    }

    fn make_hard_link<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &[&[u8]],
        name: &[u8],
        rel: &[u8],
        display: &str,
    ) -> Result<(), LayerError> {
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| refused(display, "a hard link without a target"))?
            .into_owned();
        let target_parts = components(&target)
            .map_err(|why| refused(display, &format!("hard link target: {why}")))?;
        let Some((&target_name, target_parent)) = target_parts.split_last() else {
            return Err(refused(display, "a hard link to the root"));
        };
        if join(&target_parts) == rel {
            return Ok(());
        }
        let target_dir = self
            .dir(target_parent, false, display)?
            .ok_or_else(|| refused(display, "hard link to a file that does not exist"))?;
        match fsat::stat(target_dir.as_fd(), target_name)
            .map_err(|e| io_error(display, "stat the hard link's target", e))?
        {
            None => return Err(refused(display, "hard link to a file that does not exist")),
            Some(Kind::Dir) => return Err(refused(display, "hard link to a directory")),
            Some(Kind::Other) => {}
        }
        let dir = self.parent(parent, display)?;
        self.remove(dir.as_fd(), name, rel, display)?;
        fsat::link(target_dir.as_fd(), target_name, dir.as_fd(), name)
            .map_err(|e| io_error(display, "create the hard link", e))?;
        self.stats.hard_links += 1;
        Ok(())
    }

    fn make_fifo<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &[&[u8]],
        name: &[u8],
        rel: &[u8],
        display: &str,
    ) -> Result<(), LayerError> {
        let attrs = self.attrs(entry, display)?;
        let dir = self.parent(parent, display)?;
        self.remove(dir.as_fd(), name, rel, display)?;
        fsat::mkfifo(dir.as_fd(), name).map_err(|e| io_error(display, "create the FIFO", e))?;
        fsat::set_attrs_at(dir.as_fd(), name, &attrs)
            .map_err(|e| io_error(display, "set owner, mode and time", e))
    }

    /// Whether the guest would find `path` (absolute) in the tree,
    /// symbolic links followed as inside the guest.
    pub fn guest_has(&self, path: &str) -> bool {
        fsat::open_in_root(self.root.as_fd(), path.as_bytes(), libc::O_PATH).is_ok()
    }

    /// Gives every directory its metadata from the layers (made ones get
    /// 0755 root:root) and makes the directories the guest agent mounts
    /// on (`/dev`, `/proc`, `/sys`, `/tmp`, `/run`) if the image lacks
    /// them. Returns what it made.
    pub fn finish(&mut self) -> Result<Vec<String>, LayerError> {
        let mut made = Vec::new();
        for (name, mode) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("run", 0o755),
        ] {
            let display = format!("/{name}");
            match fsat::stat(self.root.as_fd(), name.as_bytes())
                .map_err(|e| io_error(&display, "stat", e))?
            {
                Some(Kind::Dir) => {}
                Some(Kind::Other) => {
                    return Err(refused(
                        &display,
                        "the guest mounts a file system here, but the image has something \
                         other than a directory",
                    ))
                }
                None => {
                    fsat::mkdir(self.root.as_fd(), name.as_bytes(), 0o700)
                        .map_err(|e| io_error(&display, "create the mount point", e))?;
                    self.dirs.insert(
                        name.as_bytes().to_vec(),
                        DirMeta {
                            mode,
                            owner: (0, 0),
                            mtime: 0,
                            xattrs: Vec::new(),
                        },
                    );
                    made.push(display);
                }
            }
        }
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, meta) in &dirs {
            let display = format!("/{}", String::from_utf8_lossy(rel));
            let fd = match fsat::open_beneath(
                self.root.as_fd(),
                rel,
                libc::O_RDONLY | libc::O_DIRECTORY,
            ) {
                Ok(fd) => fd,
                // Replaced by a later layer's file, or whited out.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    continue
                }
                Err(e) => return Err(resolve_error(&display, e)),
            };
            for (key, value) in &meta.xattrs {
                if fsat::set_xattr(fd.as_fd(), key, value).is_err() {
                    self.stats.xattrs_failed += 1;
                }
            }
            let attrs = Attrs {
                owner: self.keep_owners.then_some(meta.owner),
                mode: Some(meta.mode),
                mtime: meta.mtime,
            };
            fsat::set_attrs_fd(fd.as_fd(), &attrs)
                .map_err(|e| io_error(&display, "set owner, mode and time", e))?;
        }
        Ok(made)
    }
}

/// Copies `from` to `to`: a read error is the layer's (corrupt or
/// truncated), a write error the staging file system's.
fn copy(from: &mut impl Read, to: &mut File, display: &str) -> Result<u64, LayerError> {
    let mut buf = vec![0u8; 128 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LayerError::Corrupt(e)),
        };
        to.write_all(&buf[..n])
            .map_err(|e| io_error(display, "write the file", e))?;
        total += n as u64;
    }
}

/// The entry's `SCHILY.xattr.NAME` PAX records.
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<Xattr>, LayerError> {
    let mut out = Vec::new();
    let Some(extensions) = entry.pax_extensions().map_err(LayerError::Corrupt)? else {
        return Ok(out);
    };
    for ext in extensions {
        let ext = ext.map_err(LayerError::Corrupt)?;
        if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            out.push((name.to_vec(), ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

fn refused(path: &str, why: &str) -> LayerError {
    LayerError::Refused {
        path: path.to_owned(),
        why: why.to_owned(),
    }
}

fn io_error(path: &str, op: &'static str, source: io::Error) -> LayerError {
    LayerError::Io {
        path: path.to_owned(),
        op,
        error: source,
    }
}

/// An error resolving a parent directory: a symbolic link or a file in
/// the way is the archive's doing, anything else the host's.
fn resolve_error(path: &str, err: io::Error) -> LayerError {
    match err.raw_os_error() {
        Some(libc::ELOOP) => refused(
            path,
            "a parent directory is a symbolic link (links are never followed while extracting)",
        ),
        Some(libc::EXDEV) => refused(path, "it leaves the image root"),
        Some(libc::ENOTDIR) => refused(path, "a parent is not a directory"),
        _ => io_error(path, "open the parent directory", err),
    }
}
