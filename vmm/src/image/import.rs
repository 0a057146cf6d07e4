//! `ember image import`: one container image to one ext4 root image.
//!
//! Everything is staged in a private directory next to the output
//! (`.NAME.import-PID-N`, mode 0700): the layers' tree, then the image,
//! which is renamed over the output at the end. On any error the staging
//! directory is removed, so nothing is left anywhere but the output, and
//! the output is only ever a complete image.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use thiserror::Error;

use super::digest::HashingReader;
use super::ext4::{self, Ext4Error};
use super::layers::{LayerError, Limits, Staging, Stats};
use super::manifest::{Format, LayerBlob, ManifestError, SelectedImage};
use super::source::{Source, SourceError};
use super::{docker, oci};

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The image to pick (`NAME:TAG`); `None`: the only one.
    pub reference: Option<String>,
    /// Bounds on the layers' contents.
    pub limits: Limits,
    /// The file system label (at most 16 bytes).
    pub label: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            reference: None,
            limits: Limits::default(),
            label: "ember-image".into(),
        }
    }
}

/// What was imported.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub format: Format,
    /// The image's name (tag) or digest.
    pub image: String,
    pub layers: usize,
    pub stats: Stats,
    /// Size of the ext4 image.
    pub image_bytes: u64,
    /// Things worth telling the user (skipped devices, made mount points).
    pub notes: Vec<String>,
}

/// What failed.
#[derive(Debug, Error)]
pub enum ImportError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{0}: neither a docker save archive (no manifest.json) nor an OCI image layout (no oci-layout)")]
    UnknownFormat(PathBuf),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("layer {index} of {count} ({member}): {error}")]
    Layer {
        index: usize,
        count: usize,
        member: String,
        error: LayerError,
    },
    #[error("layer {index} of {count} ({member}): {what}")]
    Check {
        index: usize,
        count: usize,
        member: String,
        what: String,
    },
    #[error("layer {index} of {count} ({member}) is {compression}-compressed, which is not supported (gzip or none)")]
    Compression {
        index: usize,
        count: usize,
        member: String,
        compression: &'static str,
    },
    #[error("output {path}: {why}")]
    Output { path: PathBuf, why: String },
    #[error("staging directory {path}: {error}")]
    Staging { path: PathBuf, error: io::Error },
    #[error("the finished tree: {0}")]
    Finish(LayerError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
}

/// Imports the image at `input` (an archive or an OCI layout directory)
/// into the ext4 image `out`, replacing any regular file there.
pub fn import(
    input: &Path,
    out: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let out_parent = check_output(out)?;
    let source = Source::open(input)?;
    let selected = select(&source, options.reference.as_deref())?;
    let staging = StagingDir::create(&out_parent, out)?;
    let root = staging.path.join("root");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&root)
        .map_err(|source| ImportError::Staging {
            path: root.clone(),
            error: source,
        })?;
    let mut tree = Staging::new(&root, options.limits).map_err(|source| ImportError::Staging {
        path: root.clone(),
        error: source,
    })?;
    let count = selected.layers.len();
    for (i, layer) in selected.layers.iter().enumerate() {
        apply_layer(&source, layer, i + 1, count, &mut tree)?;
    }
    let made = tree.finish().map_err(ImportError::Finish)?;

    let tmp_image = staging.path.join("image.ext4");
    let image_bytes = ext4::make(&root, &tmp_image, &options.label)?;
    std::fs::set_permissions(&tmp_image, std::fs::Permissions::from_mode(0o644)).map_err(
        |source| ImportError::Staging {
            path: tmp_image.clone(),
            error: source,
        },
    )?;
    std::fs::rename(&tmp_image, out).map_err(|e| ImportError::Output {
        path: out.to_path_buf(),
        why: format!("cannot move the new image into place: {e}"),
    })?;

    let stats = tree.stats().clone();
    let mut notes = selected.notes.clone();
    if stats.devices_skipped_count > 0 {
        notes.push(format!(
            "{} device node(s) skipped (the guest has its own /dev): {}{}",
            stats.devices_skipped_count,
            stats.devices_skipped.join(", "),
            if stats.devices_skipped_count > stats.devices_skipped.len() as u64 {
                ", ..."
            } else {
                ""
            }
        ));
    }
    if !made.is_empty() {
        notes.push(format!(
            "made mount points the guest needs: {}",
            made.join(", ")
        ));
    }
    if stats.xattrs_failed > 0 {
        notes.push(format!(
            "{} extended attribute(s) could not be kept",
            stats.xattrs_failed
        ));
    }
    if let Some(note) = python_note(&tree) {
        notes.push(note);
    }
    if !tree.keeps_owners() {
        notes.push("not running as root: file owners are not kept".into());
    }
    Ok(ImportReport {
        format: selected.format,
        image: selected.name,
        layers: count,
        stats,
        image_bytes,
        notes,
    })
}

/// The python3 runtime starts `python3` from `/bin` or `/usr/bin` (the
/// agent's PATH): a note if the image has it elsewhere only.
fn python_note(tree: &Staging) -> Option<String> {
    if tree.guest_has("/usr/bin/python3") || tree.guest_has("/bin/python3") {
        return None;
    }
    let elsewhere = ["/usr/local/bin/python3", "/opt/python/bin/python3"]
        .into_iter()
        .find(|p| tree.guest_has(p))?;
    Some(format!(
        "the image has {elsewhere} but no /usr/bin/python3: the python3 runtime looks in \
         /bin and /usr/bin only (add `RUN ln -s {elsewhere} /usr/bin/python3` to the image)"
    ))
}

/// The output's directory; the output may only be missing or a regular
/// file (replaced).
fn check_output(out: &Path) -> Result<PathBuf, ImportError> {
    let bad = |why: &str| ImportError::Output {
        path: out.to_path_buf(),
        why: why.to_owned(),
    };
    if out.file_name().is_none() {
        return Err(bad("not a file name"));
    }
    match std::fs::symlink_metadata(out) {
        Ok(meta) if !meta.file_type().is_file() => {
            return Err(bad("exists and is not a regular file"))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(&e.to_string())),
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(bad("its directory does not exist"));
    }
    Ok(parent)
}

/// Reads the archive's manifests: `manifest.json` (docker save, also
/// written by Docker 25+ next to an OCI layout) first, else `oci-layout`.
fn select(source: &Source, reference: Option<&str>) -> Result<SelectedImage, ImportError> {
    if source.has(docker::MANIFEST) {
        Ok(docker::read(source, reference)?)
    } else if source.has(oci::LAYOUT) {
        Ok(oci::read(source, reference)?)
    } else {
        Err(ImportError::UnknownFormat(source.path().to_path_buf()))
    }
}

/// Streams one layer through its checks into the tree: the stored blob's
/// digest and size, the uncompressed tar's digest (diff ID).
fn apply_layer(
    source: &Source,
    layer: &LayerBlob,
    index: usize,
    count: usize,
    tree: &mut Staging,
) -> Result<(), ImportError> {
    let layer_err = |source| ImportError::Layer {
        index,
        count,
        member: layer.member.clone(),
        error: source,
    };
    let check = |what: String| ImportError::Check {
        index,
        count,
        member: layer.member.clone(),
        what,
    };
    let mut stored = HashingReader::new(source.open_member(&layer.member)?);
    let diff = {
        let mut buffered = BufReader::with_capacity(256 << 10, &mut stored);
        let magic = buffered
            .fill_buf()
            .map_err(|e| layer_err(LayerError::Corrupt(e)))?;
        let compression = match magic {
            [0x1f, 0x8b, ..] => "gzip",
            [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
            [0xfd, b'7', b'z', b'X', b'Z', ..] => "xz",
            [b'B', b'Z', b'h', ..] => "bzip2",
            _ => "none",
        };
        let mut tar: Box<dyn Read + '_> = match compression {
            "gzip" => Box::new(MultiGzDecoder::new(&mut buffered)),
            "none" => Box::new(&mut buffered),
            compression => {
                return Err(ImportError::Compression {
                    index,
                    count,
                    member: layer.member.clone(),
                    compression,
                })
            }
        };
        let mut hashed = HashingReader::new(&mut tar);
        tree.apply(&mut hashed).map_err(layer_err)?;
        // The tar's end padding and the compressed stream's trailer count
        // for the digests too.
        io::copy(&mut hashed, &mut io::sink()).map_err(|e| layer_err(LayerError::Corrupt(e)))?;
        let (diff, _) = hashed.finish();
        drop(tar);
        io::copy(&mut buffered, &mut io::sink()).map_err(|e| layer_err(LayerError::Corrupt(e)))?;
        diff
    };
    let (digest, size) = stored.finish();
    if let Some(expected) = &layer.digest {
        if expected.as_str() != digest {
            return Err(check(format!(
                "digest mismatch: the manifest says sha256:{}, the blob is sha256:{digest}",
                expected.as_str()
            )));
        }
    }
    if let Some(expected) = layer.size {
        if expected != size {
            return Err(check(format!(
                "size mismatch: the manifest says {expected} bytes, the blob has {size}"
            )));
        }
    }
    if let Some(expected) = &layer.diff_id {
        if expected.as_str() != diff {
            return Err(check(format!(
                "diff ID mismatch: the image config says sha256:{}, the uncompressed layer is sha256:{diff}",
                expected.as_str()
            )));
        }
    }
    Ok(())
}

/// The private staging directory, removed with all it holds when dropped.
struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    fn create(parent: &Path, out: &Path) -> Result<Self, ImportError> {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        remove_stale(parent, &name);
        for n in 0..100 {
            let path = parent.join(format!(".{name}.import-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(StagingDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(ImportError::Staging {
                        path,
                        error: source,
                    })
                }
            }
        }
        Err(ImportError::Staging {
            path: parent.to_path_buf(),
            error: io::Error::new(io::ErrorKind::AlreadyExists, "no free staging name"),
        })
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.path).is_err() {
            // Directories without write permission (as a non-root user)
            // stop the removal: open them up and try again.
            let _ = make_writable(&self.path);
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes staging directories for the same output left by imports that
/// were killed (their process is gone), so an interrupted import does not
/// leave its tree next to the output for good.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.import-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest
            .split_once('-')
            .and_then(|(pid, n)| n.parse::<u32>().ok().and(pid.parse::<libc::pid_t>().ok()))
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && entry.file_type().is_ok_and(|t| t.is_dir()) {
            drop(StagingDir { path: entry.path() });
        }
    }
}

fn make_writable(dir: &Path) -> io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for child in std::fs::read_dir(dir)? {
        let child = child?;
        if child.file_type()?.is_dir() {
            make_writable(&child.path())?;
        }
    }
    Ok(())
}
