//! Where an image's files (manifests, blobs, layer tars) come from: a tar
//! archive, read in place with its members found by name, or a directory
//! (an unpacked OCI image layout), whose members are opened without
//! leaving it.
//!
//! Member names come from the image's own manifests: in an archive they
//! are only looked up in the archive's table (links between members are
//! followed there, by name, a few hops at most); in a directory they are
//! opened with `openat2(RESOLVE_BENEATH)`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::snapshot::beneath;

/// Most members an image archive may have (its table is kept in memory).
pub const MAX_MEMBERS: usize = 1 << 20;

/// Links between archive members followed at most, one after another.
const MAX_LINK_HOPS: usize = 8;

/// What failed.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot open {path}: {error}")]
    Open { path: PathBuf, error: io::Error },
    #[error("{path} is {what}-compressed: decompress it first")]
    Compressed { path: PathBuf, what: &'static str },
    #[error("{path} is not a readable tar archive: {error}")]
    NotTar { path: PathBuf, error: io::Error },
    #[error("{path} has more than {MAX_MEMBERS} members")]
    TooManyMembers { path: PathBuf },
    #[error("{path} has no file {name}")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: cannot read {name}: {error}")]
    Read {
        path: PathBuf,
        name: String,
        error: io::Error,
    },
    #[error("{path}: {name} is larger than {limit} bytes")]
    TooLarge {
        path: PathBuf,
        name: String,
        limit: u64,
    },
}

/// An image's outer container.
pub enum Source {
    /// A tar archive (`docker save`, or an OCI layout packed as a tar).
    Tar {
        path: PathBuf,
        file: File,
        members: HashMap<String, Member>,
    },
    /// A directory (an OCI image layout).
    Dir { path: PathBuf, dir: File },
}

/// One archive member: its data's place, or a link to another member.
#[derive(Debug, Clone)]
pub enum Member {
    Data { offset: u64, size: u64 },
    Link(String),
}

/// A member name as looked up: no leading `./` or `/`, no trailing `/`.
pub(crate) fn normalize_name(name: &str) -> String {
    let mut name = name.trim_end_matches('/');
    loop {
        if let Some(rest) = name.strip_prefix("./") {
            name = rest;
        } else if let Some(rest) = name.strip_prefix('/') {
            name = rest;
        } else {
            return name.to_owned();
        }
    }
}

/// The name a symbolic link member at `from` pointing to `target` names,
/// resolved as a path inside the archive's name space (`..` beyond the
/// top stays at the top: it is only a name to look up).
fn resolve_link(from: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        from.split('/').collect()
    };
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

impl Source {
    /// Opens `path`: a directory as an OCI layout, a file as a tar archive
    /// (indexed by one pass over its headers).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_path_buf(),
            error: source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if meta.is_dir() {
            let dir = beneath::open_dir(path).map_err(open_err)?;
            return Ok(Source::Dir {
                path: path.to_path_buf(),
                dir,
            });
        }
        let file = File::open(path).map_err(open_err)?;
        let mut magic = [0u8; 6];
        let n = file.read_at(&mut magic, 0).map_err(open_err)?;
        let compressed = match &magic[..n] {
            [0x1f, 0x8b, ..] => Some("gzip"),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
            [0xfd, b'7', b'z', b'X', b'Z', 0] => Some("xz"),
            [b'B', b'Z', b'h', ..] => Some("bzip2"),
            _ => None,
        };
        if let Some(what) = compressed {
            return Err(SourceError::Compressed {
                path: path.to_path_buf(),
                what,
            });
        }
        let members = index(path, &file)?;
        Ok(Source::Tar {
            path: path.to_path_buf(),
            file,
            members,
        })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Source::Tar { path, .. } | Source::Dir { path, .. } => path,
        }
    }

    /// Whether the image has a (readable) file `name`.
    pub fn has(&self, name: &str) -> bool {
        self.open_member(name).is_ok()
    }

    /// Opens the file `name` for reading.
    pub fn open_member(&self, name: &str) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        let wanted = normalize_name(name);
        let missing = || SourceError::Missing {
            path: self.path().to_path_buf(),
            name: wanted.clone(),
        };
        match self {
            Source::Tar { file, members, .. } => {
                let mut current = wanted.clone();
                for _ in 0..=MAX_LINK_HOPS {
                    match members.get(&current).ok_or_else(missing)? {
                        Member::Data { offset, size } => {
                            return Ok(Box::new(BufReader::with_capacity(
                                256 << 10,
                                Slice {
                                    file,
                                    pos: *offset,
                                    end: offset.saturating_add(*size),
                                },
                            )));
                        }
                        Member::Link(target) => current = target.clone(),
                    }
                }
                Err(missing())
            }
            Source::Dir { dir, path } => match beneath::open_beneath(dir, Path::new(&wanted)) {
                Ok(file) => Ok(Box::new(BufReader::with_capacity(256 << 10, file))),
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Err(missing()),
                Err(source) => Err(SourceError::Read {
                    path: path.clone(),
                    name: wanted,
                    error: source,
                }),
            },
        }
    }

    /// Reads all of the (small) file `name`, at most `limit` bytes.
    pub fn read_member(&self, name: &str, limit: u64) -> Result<Vec<u8>, SourceError> {
        let mut data = Vec::new();
        self.open_member(name)?
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|source| SourceError::Read {
                path: self.path().to_path_buf(),
                name: name.to_owned(),
                error: source,
            })?;
        if data.len() as u64 > limit {
            return Err(SourceError::TooLarge {
                path: self.path().to_path_buf(),
                name: name.to_owned(),
                limit,
            });
        }
        Ok(data)
    }
}

/// The archive's member table: regular files where their data starts,
/// links by the name they point to.
fn index(path: &Path, file: &File) -> Result<HashMap<String, Member>, SourceError> {
    let not_tar = |source| SourceError::NotTar {
        path: path.to_path_buf(),
        error: source,
    };
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for entry in archive.entries_with_seek().map_err(not_tar)? {
        let entry = entry.map_err(not_tar)?;
        if members.len() >= MAX_MEMBERS {
            return Err(SourceError::TooManyMembers {
                path: path.to_path_buf(),
            });
        }
        let name = normalize_name(&String::from_utf8_lossy(&entry.path_bytes()));
        let link = || {
            entry
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
        };
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Member::Data {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
            tar::EntryType::Symlink => match link() {
                Some(target) => Member::Link(resolve_link(&name, &target)),
                None => continue,
            },
            tar::EntryType::Link => match link() {
                Some(target) => Member::Link(normalize_name(&target)),
                None => continue,
            },
            _ => continue,
        };
        members.insert(name, member);
    }
    if members.is_empty() {
        return Err(not_tar(io::Error::new(
            io::ErrorKind::InvalidData,
            "no files in it",
        )));
    }
    Ok(members)
}

/// A byte range of a file, read with positioned reads.
struct Slice<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside this file",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_links() {
        assert_eq!(normalize_name("./a/b/"), "a/b");
        assert_eq!(normalize_name("/a"), "a");
        assert_eq!(resolve_link("x/layer.tar", "../y/layer.tar"), "y/layer.tar");
        assert_eq!(resolve_link("layer.tar", "../../etc/passwd"), "etc/passwd");
        assert_eq!(resolve_link("a/b", "/c"), "c");
    }
}
