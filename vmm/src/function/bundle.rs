//! Code bundles: a python function given as a directory or a `.zip`,
//! copied into a staging tree the code drive is made from.
//!
//! Whatever the source, the tree gets regular files (mode 0644, or 0755
//! when the source had an execute bit), directories (0755) and relative
//! symbolic links that point at or below their own directory (no `..`, no
//! absolute target: so a link can never lead out of the bundle, whatever
//! the other links are). Anything else is refused with the entry named:
//! an absolute path or a `..` component in a zip, a link that could lead
//! out, a device or socket, more than [`MAX_BUNDLE_BYTES`] or
//! [`MAX_BUNDLE_ENTRIES`] in all (counted as written, not as a zip
//! declares). Nothing is ever written outside the staging tree.

use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::zip_directory;

/// Most bytes of file data a bundle may hold (its dependencies aside).
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;
/// Most files, directories and links a bundle may hold.
pub const MAX_BUNDLE_ENTRIES: u64 = 100_000;
/// Most bytes a zip bundle's central directory may declare: room for
/// [`MAX_BUNDLE_ENTRIES`] entries with names and extra fields of a few
/// hundred bytes each.
pub const MAX_CENTRAL_DIRECTORY_BYTES: u64 = 64 << 20;
/// The bundle's dependencies, in the code drive: a name of ours, refused
/// in a bundle.
pub const SITE_DIR: &str = ".ember-site";
/// The bundle's dependency list, installed with pip when present.
pub const REQUIREMENTS: &str = "requirements.txt";
/// Byte-compiled files: never taken from a bundle (they are made again
/// for the guest's paths).
const PYCACHE: &str = "__pycache__";

/// A bundle could not be read or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    /// The zip archive is corrupt or uses something unsupported.
    #[error("{0}: not a readable zip archive: {1}")]
    Zip(PathBuf, String),
    /// An entry would land outside the bundle or is of a refused kind.
    #[error("{bundle}: entry {entry:?} refused: {why}")]
    Entry {
        /// The bundle.
        bundle: PathBuf,
        /// The entry's name in it.
        entry: String,
        /// Why.
        why: String,
    },
    /// Over [`MAX_BUNDLE_BYTES`] or [`MAX_BUNDLE_ENTRIES`].
    #[error(
        "{0}: over the bundle limit of {MAX_BUNDLE_BYTES} bytes and {MAX_BUNDLE_ENTRIES} entries"
    )]
    TooLarge(PathBuf),
    /// A zip's end record claims more entries than [`MAX_BUNDLE_ENTRIES`]
    /// or a central directory over [`MAX_CENTRAL_DIRECTORY_BYTES`]
    /// (refused before the directory is read).
    #[error(
        "{bundle}: the zip declares {what}: over the bundle limit of {MAX_BUNDLE_ENTRIES} entries \
         ({MAX_CENTRAL_DIRECTORY_BYTES} bytes of central directory)"
    )]
    DeclaredTooLarge {
        /// The bundle.
        bundle: PathBuf,
        /// What it declares.
        what: String,
    },
    /// The handler's module is not in the bundle.
    #[error("the bundle {code} has no module {module:?} (looked for {looked_for})")]
    NoModule {
        /// The bundle.
        code: PathBuf,
        /// The dotted module name.
        module: String,
        /// The files that would have been it.
        looked_for: String,
    },
    /// The handler is not `MODULE:FUNCTION` with a dotted python module.
    #[error("{0}")]
    BadHandler(String),
}

/// What a staged bundle holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Staged {
    /// Bytes of file data.
    pub bytes: u64,
    /// Files, directories and links.
    pub entries: u64,
}

impl Staged {
    fn add(&mut self, bundle: &Path, bytes: u64) -> Result<(), BundleError> {
        self.bytes = self.bytes.saturating_add(bytes);
        self.entries += 1;
        if self.bytes > MAX_BUNDLE_BYTES || self.entries > MAX_BUNDLE_ENTRIES {
            return Err(BundleError::TooLarge(bundle.to_path_buf()));
        }
        Ok(())
    }
}

/// Whether `code` is a zip archive (by its name).
pub fn is_zip(code: &Path) -> bool {
    code.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
}

/// Checks that `module` is a dotted python module name (`app.main`).
pub fn check_module_name(module: &str) -> Result<(), BundleError> {
    let ok = !module.is_empty()
        && module.split('.').all(|part| {
            part.chars().next().is_some_and(|c| !c.is_ascii_digit())
                && part.chars().all(|c| c.is_alphanumeric() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(BundleError::BadHandler(format!(
            "{module:?} is not a dotted python module name (e.g. app.main)"
        )))
    }
}

/// Checks that the staged bundle at `tree` has `module` (a `.py` file or a
/// package).
pub fn check_module(code: &Path, tree: &Path, module: &str) -> Result<(), BundleError> {
    let candidates = module_files(module);
    if candidates.iter().any(|c| tree.join(c).is_file()) {
        return Ok(());
    }
    Err(no_module(code, module, &candidates))
}

/// Checks that the bundle `code` itself (a directory or a zip, not yet
/// staged) has the handler's module, as [`check_module`] does on a staged
/// tree: so a missing module is refused whatever the cache holds for the
/// same bundle, and before anything waits for a build of it.
pub fn check_source_module(code: &Path, module: &str) -> Result<(), BundleError> {
    if !is_zip(code) {
        return check_module(code, code, module);
    }
    let zip_error = |e: zip::result::ZipError| BundleError::Zip(code.to_path_buf(), e.to_string());
    let mut archive = open_zip(code)?;
    let candidates = module_files(module);
    for index in 0..archive.len() {
        let entry = archive.by_index(index).map_err(zip_error)?;
        if entry.is_dir() {
            continue;
        }
        // Entries that would be refused are reported when staging.
        let Ok(name) = entry.name().map(|n| n.into_owned()) else {
            continue;
        };
        if zip_entry_path(&name).is_ok_and(|path| candidates.contains(&path)) {
            return Ok(());
        }
    }
    Err(no_module(code, module, &candidates))
}

/// The files the dotted `module` may be: a `.py` file or a package.
fn module_files(module: &str) -> [PathBuf; 2] {
    let rel: PathBuf = module.split('.').collect();
    [rel.with_extension("py"), rel.join("__init__.py")]
}

fn no_module(code: &Path, module: &str, candidates: &[PathBuf]) -> BundleError {
    BundleError::NoModule {
        code: code.to_path_buf(),
        module: module.to_owned(),
        looked_for: candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

/// A SHA-256 (hex) of what [`stage`] would make of `code`: a zip's bytes,
/// or a directory's names, kinds, execute bits, contents and link targets.
pub fn digest(code: &Path) -> Result<String, BundleError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| BundleError::Io(path, e)
    };
    let mut hasher = Sha256::new();
    if is_zip(code) {
        hasher.update(b"zip\0");
        hasher.update(crate::cache_key::file_digest(code).map_err(io(code))?);
    } else {
        hasher.update(b"dir\0");
        let mut staged = Staged::default();
        walk(code, code, &mut staged, &mut |rel, kind| {
            hasher.update((rel.len() as u64).to_le_bytes());
            hasher.update(rel.as_bytes());
            match kind {
                Kind::Dir => hasher.update(b"d"),
                Kind::File { path, executable } => {
                    hasher.update(if executable { b"x" } else { b"f" });
                    hasher.update(crate::cache_key::file_digest(&path).map_err(io(&path))?);
                }
                Kind::Link(target) => {
                    hasher.update(b"l");
                    hasher.update((target.len() as u64).to_le_bytes());
                    hasher.update(target.as_bytes());
                }
            }
            Ok(())
        })?;
    }
    Ok(crate::cache_key::hex(&hasher.finalize()))
}

/// Copies the bundle `code` (a directory or a `.zip`) into `into` (made
/// here; must not exist).
pub fn stage(code: &Path, into: &Path) -> Result<Staged, BundleError> {
    std::fs::create_dir(into).map_err(|e| BundleError::Io(into.to_path_buf(), e))?;
    set_mode(into, 0o755)?;
    if is_zip(code) {
        stage_zip(code, into)
    } else {
        let mut staged = Staged::default();
        walk(code, code, &mut staged, &mut |rel, kind| {
            let target = into.join(&rel);
            match kind {
                Kind::Dir => {
                    std::fs::create_dir(&target).map_err(|e| BundleError::Io(target.clone(), e))?;
                    set_mode(&target, 0o755)
                }
                Kind::File { path, executable } => {
                    std::fs::copy(&path, &target).map_err(|e| BundleError::Io(path.clone(), e))?;
                    set_mode(&target, if executable { 0o755 } else { 0o644 })
                }
                Kind::Link(to) => std::os::unix::fs::symlink(&to, &target)
                    .map_err(|e| BundleError::Io(target.clone(), e)),
            }
        })?;
        Ok(staged)
    }
}

enum Kind {
    Dir,
    File { path: PathBuf, executable: bool },
    Link(String),
}

/// Visits the entries under `dir` (of the bundle `root`) in name order,
/// parents first, with their path relative to `root`.
fn walk(
    root: &Path,
    dir: &Path,
    staged: &mut Staged,
    visit: &mut dyn FnMut(String, Kind) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    let io = |e| BundleError::Io(dir.to_path_buf(), e);
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel_path = path.strip_prefix(root).unwrap_or(&path);
        let rel = rel_path.to_str().ok_or_else(|| BundleError::Entry {
            bundle: root.to_path_buf(),
            entry: rel_path.to_string_lossy().into_owned(),
            why: "the name is not UTF-8".into(),
        })?;
        let refuse = |why: &str| BundleError::Entry {
            bundle: root.to_path_buf(),
            entry: rel.to_owned(),
            why: why.to_owned(),
        };
        if name == PYCACHE {
            continue;
        }
        if dir == root && name == SITE_DIR {
            return Err(refuse("the name is ember's, for the bundle's dependencies"));
        }
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| BundleError::Io(path.clone(), e))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            staged.add(root, 0)?;
            visit(rel.to_owned(), Kind::Dir)?;
            walk(root, &path, staged, visit)?;
        } else if kind.is_file() {
            staged.add(root, meta.len())?;
            let executable = meta.mode() & 0o111 != 0;
            visit(rel.to_owned(), Kind::File { path, executable })?;
        } else if kind.is_symlink() {
            staged.add(root, 0)?;
            let target = std::fs::read_link(&path).map_err(|e| BundleError::Io(path.clone(), e))?;
            let target = check_link(&target.to_string_lossy()).map_err(|why| refuse(&why))?;
            visit(rel.to_owned(), Kind::Link(target))?;
        } else {
            return Err(refuse("not a file, directory or symbolic link"));
        }
    }
    Ok(())
}

/// A link target a bundle may have: relative, without `..` (so it stays
/// at or below the link's directory, whatever other links there are).
fn check_link(target: &str) -> Result<String, String> {
    let path = Path::new(target);
    if target.is_empty() || path.is_absolute() {
        return Err(format!(
            "a symbolic link to {target:?} (absolute) could lead out of the bundle"
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "a symbolic link to {target:?} (with ..) could lead out of the bundle"
        ));
    }
    Ok(target.to_owned())
}

/// The path a zip entry's name stands for, relative to the bundle: plain
/// components only.
fn zip_entry_path(name: &str) -> Result<PathBuf, String> {
    if name.starts_with('/') || name.starts_with('\\') {
        return Err("an absolute path".into());
    }
    if name.contains('\0') || name.contains('\\') {
        return Err("a NUL byte or backslash in the name".into());
    }
    let mut rel = PathBuf::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("a `..` component leads out of the bundle".into()),
            part => rel.push(part),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err("an empty name".into());
    }
    Ok(rel)
}

/// Opens the zip `code` once its end records declare no more than the
/// limits allow: the `zip` crate reads the whole central directory as it
/// opens an archive, so a small file claiming millions of entries is
/// refused before that.
fn open_zip(code: &Path) -> Result<zip::ZipArchive<io::BufReader<std::fs::File>>, BundleError> {
    let io_error = |e| BundleError::Io(code.to_path_buf(), e);
    let mut file = io::BufReader::new(std::fs::File::open(code).map_err(io_error)?);
    let declared = zip_directory::declared(&mut file).map_err(io_error)?;
    if declared.entries > MAX_BUNDLE_ENTRIES {
        return Err(BundleError::DeclaredTooLarge {
            bundle: code.to_path_buf(),
            what: format!("{} entries", declared.entries),
        });
    }
    if declared.directory_bytes > MAX_CENTRAL_DIRECTORY_BYTES {
        return Err(BundleError::DeclaredTooLarge {
            bundle: code.to_path_buf(),
            what: format!("a central directory of {} bytes", declared.directory_bytes),
        });
    }
    file.seek(io::SeekFrom::Start(0)).map_err(io_error)?;
    zip::ZipArchive::new(file).map_err(|e| BundleError::Zip(code.to_path_buf(), e.to_string()))
}

fn stage_zip(code: &Path, into: &Path) -> Result<Staged, BundleError> {
    let zip_error = |e: zip::result::ZipError| BundleError::Zip(code.to_path_buf(), e.to_string());
    let mut archive = open_zip(code)?;
    let mut staged = Staged::default();
    // Links last: no entry is ever written through one.
    let mut links = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(zip_error)?;
        let name = entry.name().map_err(zip_error)?.into_owned();
        let refuse = |why: String| BundleError::Entry {
            bundle: code.to_path_buf(),
            entry: name.clone(),
            why,
        };
        let rel = zip_entry_path(&name).map_err(refuse)?;
        let mut parts = rel.components();
        let first = parts.next().map(|c| c.as_os_str().to_owned());
        if first.as_deref() == Some(SITE_DIR.as_ref()) {
            return Err(refuse(
                "the name is ember's, for the bundle's dependencies".into(),
            ));
        }
        if rel.components().any(|c| c.as_os_str() == PYCACHE) {
            continue;
        }
        let target = into.join(&rel);
        if entry.is_dir() {
            make_dirs(code, into, &rel, &mut staged)?;
        } else if entry.is_symlink() {
            staged.add(code, 0)?;
            let mut text = String::new();
            (&mut entry)
                .take(4096)
                .read_to_string(&mut text)
                .map_err(|e| refuse(format!("unreadable link target: {e}")))?;
            let to = check_link(&text).map_err(refuse)?;
            links.push((rel, to));
        } else {
            if let Some(parent) = rel.parent() {
                make_dirs(code, into, parent, &mut staged)?;
            }
            let executable = entry.unix_mode().is_some_and(|m| m & 0o111 != 0);
            let left = MAX_BUNDLE_BYTES.saturating_sub(staged.bytes);
            let mut out = std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(|e| refuse(format!("cannot create it (twice in the archive?): {e}")))?;
            // Counted as written: a zip's declared sizes are not trusted.
            let written = copy_limited(&mut entry, &mut out, left)
                .map_err(|e| refuse(format!("cannot extract it: {e}")))?;
            staged.add(code, written)?;
            drop(out);
            set_mode(&target, if executable { 0o755 } else { 0o644 })?;
        }
    }
    for (rel, to) in links {
        if let Some(parent) = rel.parent() {
            make_dirs(code, into, parent, &mut staged)?;
        }
        let target = into.join(&rel);
        std::os::unix::fs::symlink(&to, &target).map_err(|e| BundleError::Io(target, e))?;
    }
    Ok(staged)
}

/// Copies at most `limit + 1` bytes; the count tells the caller whether
/// the limit was passed.
fn copy_limited(from: &mut impl Read, to: &mut impl Write, limit: u64) -> io::Result<u64> {
    io::copy(&mut from.take(limit.saturating_add(1)), to)
}

/// Makes the directories of `rel` under `root`, refusing to go through
/// anything that is not a directory of ours. Each one made counts as an
/// entry of `bundle`: a zip need not list the directories its names
/// imply, and one long name can imply thousands.
fn make_dirs(
    bundle: &Path,
    root: &Path,
    rel: &Path,
    staged: &mut Staged,
) -> Result<(), BundleError> {
    let mut at = root.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => {
                return Err(BundleError::Io(
                    at,
                    io::Error::other("a file of the bundle is in the way of a directory"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                staged.add(bundle, 0)?;
                std::fs::create_dir(&at).map_err(|e| BundleError::Io(at.clone(), e))?;
                set_mode(&at, 0o755)?;
            }
            Err(e) => return Err(BundleError::Io(at, e)),
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BundleError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| BundleError::Io(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ember-bundle-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write_zip(path: &Path, entries: &[(&str, &[u8])], links: &[(&str, &str)]) {
        let file = std::fs::File::create(path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default();
        for (name, data) in entries {
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        for (name, target) in links {
            zip.add_symlink(*name, *target, options).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn directories_are_staged_with_normalised_modes() {
        let s = Scratch::new("dir");
        let code = s.0.join("code");
        std::fs::create_dir_all(code.join("app/__pycache__")).unwrap();
        std::fs::write(code.join("app/__init__.py"), "").unwrap();
        std::fs::write(code.join("app/main.py"), "def handler(e): return e\n").unwrap();
        std::fs::write(code.join("app/__pycache__/main.cpython-311.pyc"), "stale").unwrap();
        std::fs::write(code.join("data.txt"), "hello").unwrap();
        std::os::unix::fs::symlink("data.txt", code.join("alias")).unwrap();
        let before = digest(&code).unwrap();
        let tree = s.0.join("tree");
        let staged = stage(&code, &tree).unwrap();
        assert_eq!(staged.bytes, 5 + 25);
        assert_eq!(std::fs::read(tree.join("alias")).unwrap(), b"hello");
        assert!(!tree.join("app/__pycache__").exists());
        let mode = std::fs::metadata(tree.join("data.txt")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o644);
        check_module(&code, &tree, "app.main").unwrap();
        check_module(&code, &tree, "app").unwrap();
        assert!(matches!(
            check_module(&code, &tree, "app.other"),
            Err(BundleError::NoModule { .. })
        ));
        std::fs::write(code.join("data.txt"), "hellO").unwrap();
        assert_ne!(digest(&code).unwrap(), before);
    }

    #[test]
    fn the_module_is_checked_in_the_source_bundle() {
        let s = Scratch::new("source-module");
        let code = s.0.join("code");
        std::fs::create_dir_all(code.join("pkg")).unwrap();
        std::fs::write(code.join("pkg/__init__.py"), "").unwrap();
        std::fs::write(code.join("main.py"), "").unwrap();
        let zip = s.0.join("code.zip");
        write_zip(
            &zip,
            &[("./app/main.py", b""), ("pkg/__init__.py", b"")],
            &[],
        );
        for (bundle, present) in [(&code, ["main", "pkg"]), (&zip, ["app.main", "pkg"])] {
            for module in present {
                check_source_module(bundle, module).unwrap();
            }
            assert!(matches!(
                check_source_module(bundle, "app.nothere"),
                Err(BundleError::NoModule { .. })
            ));
        }
    }

    #[test]
    fn links_out_of_a_directory_are_refused() {
        for target in ["/etc/passwd", "../outside", "a/../../b"] {
            let s = Scratch::new("dirlink");
            let code = s.0.join("code");
            std::fs::create_dir_all(&code).unwrap();
            std::os::unix::fs::symlink(target, code.join("l")).unwrap();
            let err = stage(&code, &s.0.join("tree")).unwrap_err();
            assert!(
                err.to_string().contains("could lead out"),
                "{target}: {err}"
            );
        }
    }

    #[test]
    fn zips_are_extracted_and_hostile_entries_refused() {
        let s = Scratch::new("zip");
        let good = s.0.join("good.zip");
        write_zip(
            &good,
            &[
                ("app/main.py", b"def handler(e): return e\n"),
                ("app/data/x.txt", b"x"),
            ],
            &[("app/y", "data/x.txt")],
        );
        let tree = s.0.join("tree");
        stage(&good, &tree).unwrap();
        check_module(&good, &tree, "app.main").unwrap();
        assert_eq!(std::fs::read(tree.join("app/y")).unwrap(), b"x");

        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a [u8])],
            &'a [(&'a str, &'a str)],
            &'a str,
        );
        let cases: [Case; 5] = [
            ("dotdot", &[("../evil.py", b"x")], &[], "`..`"),
            ("inner-dotdot", &[("a/../../evil.py", b"x")], &[], "`..`"),
            ("absolute", &[("/tmp/evil.py", b"x")], &[], "absolute"),
            ("link-out", &[], &[("l", "/etc")], "could lead out"),
            ("site", &[(".ember-site/x.py", b"x")], &[], "ember's"),
        ];
        for (name, entries, links, expect) in cases {
            let zip = s.0.join(format!("{name}.zip"));
            write_zip(&zip, entries, links);
            let tree = s.0.join(format!("tree-{name}"));
            let err = stage(&zip, &tree).unwrap_err();
            assert!(err.to_string().contains(expect), "{name}: {err}");
        }
        assert!(!s.0.parent().unwrap().join("evil.py").exists());

        let corrupt = s.0.join("corrupt.zip");
        std::fs::write(&corrupt, b"PK\x03\x04 not really").unwrap();
        assert!(matches!(
            stage(&corrupt, &s.0.join("tree-corrupt")),
            Err(BundleError::Zip(..))
        ));
    }

    /// A small zip whose end records claim millions of entries (zip64) or
    /// a huge central directory is refused from those records, before the
    /// `zip` crate reads (and allocates for) the directory they describe.
    #[test]
    fn a_zip_declaring_too_much_is_refused_before_it_is_read() {
        let s = Scratch::new("declared");
        let real = s.0.join("real.zip");
        write_zip(
            &real,
            &[("app/main.py", b"def handler(e): return e\n")],
            &[],
        );
        let bytes = std::fs::read(&real).unwrap();
        // The real archive without its 22-byte end record (no comment).
        let body = &bytes[..bytes.len() - 22];
        let dir_offset =
            u32::from_le_bytes(bytes[bytes.len() - 6..bytes.len() - 2].try_into().unwrap());

        let mut zip64 = body.to_vec();
        let record_at = zip64.len() as u64;
        zip64.extend_from_slice(b"PK\x06\x06");
        zip64.extend_from_slice(&44u64.to_le_bytes());
        zip64.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        zip64.extend_from_slice(&5_000_000u64.to_le_bytes());
        zip64.extend_from_slice(&5_000_000u64.to_le_bytes());
        zip64.extend_from_slice(&(5_000_000u64 * 46).to_le_bytes());
        zip64.extend_from_slice(&u64::from(dir_offset).to_le_bytes());
        zip64.extend_from_slice(b"PK\x06\x07\0\0\0\0");
        zip64.extend_from_slice(&record_at.to_le_bytes());
        zip64.extend_from_slice(&1u32.to_le_bytes());
        zip64.extend_from_slice(b"PK\x05\x06\0\0\0\0");
        zip64.extend_from_slice(&[0xFF; 12]);
        zip64.extend_from_slice(&[0, 0]);
        let path = s.0.join("zip64.zip");
        std::fs::write(&path, &zip64).unwrap();
        let err = stage(&path, &s.0.join("tree")).unwrap_err();
        assert!(matches!(err, BundleError::DeclaredTooLarge { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("5000000 entries"), "{message}");
        assert!(
            message.contains(&MAX_BUNDLE_ENTRIES.to_string()),
            "{message}"
        );
        let err = check_source_module(&path, "app.main").unwrap_err();
        assert!(err.to_string().contains("5000000 entries"), "{err}");

        // A 32-bit record claiming a 4 GiB central directory.
        let mut big_dir = body.to_vec();
        big_dir.extend_from_slice(b"PK\x05\x06\0\0\0\0\x01\0\x01\0");
        big_dir.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        big_dir.extend_from_slice(&dir_offset.to_le_bytes());
        big_dir.extend_from_slice(&[0, 0]);
        let path = s.0.join("big-dir.zip");
        std::fs::write(&path, &big_dir).unwrap();
        let err = stage(&path, &s.0.join("tree2")).unwrap_err();
        assert!(
            err.to_string()
                .contains("central directory of 4294967280 bytes"),
            "{err}"
        );

        // The archive itself, with its own end record, still opens.
        stage(&real, &s.0.join("tree3")).unwrap();
    }

    /// The directories a zip's names imply count against the entry
    /// limit as if listed: one long name cannot make thousands uncounted.
    #[test]
    fn implied_zip_directories_are_counted() {
        let s = Scratch::new("implied-dirs");
        let zip = s.0.join("deep.zip");
        let deep = format!("{}f.py", "d/".repeat(50));
        write_zip(&zip, &[(&deep, b"x"), ("d/g.py", b"y")], &[]);
        let staged = stage(&zip, &s.0.join("tree")).unwrap();
        assert_eq!(staged.entries, 50 + 2, "50 directories made, 2 files");
        assert_eq!(staged.bytes, 2);

        // Listed and implied, a directory is counted once.
        let listed = s.0.join("listed.zip");
        let file = std::fs::File::create(&listed).unwrap();
        let mut writer = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default();
        writer.add_directory("a/", options).unwrap();
        writer.start_file("a/b/c.py", options).unwrap();
        writer.add_directory("a/b/", options).unwrap();
        writer.finish().unwrap();
        let staged = stage(&listed, &s.0.join("tree-listed")).unwrap();
        assert_eq!(staged.entries, 3);
    }

    #[test]
    fn module_names_are_checked() {
        for good in ["app", "app.main", "a_b.c2"] {
            check_module_name(good).unwrap();
        }
        for bad in [
            "",
            "app.",
            ".app",
            "app/main",
            "1app",
            "app..main",
            "app.main.py/x",
        ] {
            assert!(check_module_name(bad).is_err(), "{bad}");
        }
    }
}
