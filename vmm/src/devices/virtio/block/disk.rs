//! The root drive's backing file: opened read-only, never written, read
//! with `pread` straight into guest memory (no bounce buffer).
//!
//! Every clone of a snapshot reads the same host file. A snapshot records
//! what the file was ([`DriveSpec`]: path, size, inode, mtime) because the
//! guest's page cache in the snapshot holds blocks of it: a clone given a
//! file of another size is refused, and so is a changed file at the
//! recorded path.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, ReadVolatile, VolatileMemoryError, VolatileSlice,
};

/// The size of a virtio-blk sector, whatever the drive's block size.
pub const SECTOR_SIZE: u64 = 512;

/// A drive cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened or examined.
    #[error("cannot open root drive {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A directory, device or other non-regular file.
    #[error("root drive {} is not a regular file", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// Empty, or not a whole number of 512-byte sectors.
    #[error("root drive {} is {size} bytes: it must be a non-zero multiple of {SECTOR_SIZE}", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A drive given in place of a snapshot's is larger than the one the
    /// guest found when it booted.
    #[error(
        "drive {} is {size} bytes, over the {capacity}-byte drive the guest found at boot",
        path.display()
    )]
    OverCapacity {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The size of the drive in the snapshot.
        capacity: u64,
    },
    /// The drive differs in size from the one the snapshot was taken with.
    #[error(
        "root drive {} is {size} bytes, the snapshot was taken with a {expected}-byte drive",
        path.display()
    )]
    SizeChanged {
        /// The file.
        path: PathBuf,
        /// Its size now.
        size: u64,
        /// Its size in the snapshot.
        expected: u64,
    },
    /// The file at the recorded path was replaced or modified since the
    /// snapshot: the guest's cached blocks of it would not match.
    #[error(
        "root drive {} changed since the snapshot was taken (inode or modification time differ); \
         take a new snapshot, or pass the drive explicitly if its content is the same",
        path.display()
    )]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// A snapshot's state names a drive outside the snapshot directory
    /// (absolute, `..`, or a symbolic link out of it): refused, whatever
    /// the file.
    #[error(
        "root drive {} is not inside the snapshot directory: a snapshot's drive must be a file \
         beneath it (snapshots taken before ember recorded it there must be taken again)",
        path.display()
    )]
    OutsideSnapshot {
        /// The recorded name.
        path: PathBuf,
    },
    /// The snapshot's drive could not be opened when the snapshot was.
    #[error("the snapshot's root drive is unavailable: {0}")]
    Unavailable(String),
    /// A drive was given for a snapshot taken without one.
    #[error("the snapshot was taken without a root drive")]
    NoDriveInSnapshot,
}

/// Identifies one version of a file: replaced files get a new inode,
/// modified ones a new modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Inode number.
    pub ino: u64,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: i64,
}

impl FileIdentity {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            ino: meta.ino(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// What a snapshot records about its root drive. Read from a file, so
/// untrusted: only compared with, never trusted for bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSpec {
    /// The canonical path the template opened (raw bytes: any Unix path).
    pub path: Vec<u8>,
    /// Size in bytes.
    pub size: u64,
    /// The file's identity when the template opened it.
    pub identity: FileIdentity,
}

impl DriveSpec {
    /// The recorded path.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(std::ffi::OsStr::from_bytes(&self.path))
    }

    /// Checks that `disk` is the drive recorded here: the same size, and
    /// with `same_file`, the same unchanged file.
    pub fn check(&self, disk: &DiskImage, same_file: bool) -> Result<(), DiskError> {
        if disk.size != self.size {
            return Err(DiskError::SizeChanged {
                path: disk.path.clone(),
                size: disk.size,
                expected: self.size,
            });
        }
        if same_file && disk.identity != self.identity {
            return Err(DiskError::Changed {
                path: disk.path.clone(),
            });
        }
        Ok(())
    }
}

/// A read-only drive's backing file.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    identity: FileIdentity,
}

impl DiskImage {
    /// Opens `path` read-only. It must be a regular file of a non-zero
    /// whole number of 512-byte sectors.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new().read(true).open(path).map_err(open_err)?;
        // The canonical path, so a snapshot finds the file from any
        // working directory.
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Self::from_file(file, path)
    }

    /// A drive backed by the already open `file`; `path` names it in
    /// messages and in what a snapshot records.
    pub fn from_file(file: File, path: PathBuf) -> Result<Self, DiskError> {
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile { path });
        }
        let size = meta.len();
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size { path, size });
        }
        Ok(DiskImage {
            file,
            path,
            size,
            identity: FileIdentity::of(&meta),
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes (a multiple of [`SECTOR_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// What a snapshot records about this drive.
    pub fn spec(&self) -> DriveSpec {
        DriveSpec {
            path: self.path.as_os_str().as_bytes().to_vec(),
            size: self.size,
            identity: self.identity,
        }
    }

    /// Fills `len` bytes of guest memory at `addr` from the file at
    /// `offset`. Fails if any part of the range is not guest RAM, or the
    /// file ends before `offset + len` (it shrank under us), or the read
    /// fails; the guest range may then be partly written.
    pub fn read_into<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut reader = FileAt {
            file: &self.file,
            offset,
        };
        mem.read_exact_volatile_from(addr, &mut reader, len)
    }
}

/// A cursor over a file read with `pread`: no shared file offset, so any
/// number of threads and clones can read one open file at once.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl ReadVolatile for FileAt<'_> {
    /// Fills `buf` completely unless the file ends first. (vm-memory
    /// continues with the next memory region after a short read as if the
    /// whole slice was read, so a short count must only mean end of file.)
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let Ok(offset) = libc::off64_t::try_from(self.offset) else {
                break;
            };
            // SAFETY: `base` points to `len` bytes of writable memory (the
            // invariant of `VolatileSlice`, kept alive by `guard`), and
            // `done < len`, so `pread64` writes inside that range only. The
            // file descriptor is owned by `self.file`, open for the call.
            let n = unsafe {
                libc::pread64(
                    self.file.as_raw_fd(),
                    base.add(done).cast::<libc::c_void>(),
                    len - done,
                    offset,
                )
            };
            match n {
                0 => break,
                n if n > 0 => {
                    // 0 < n <= len - done, so neither addition overflows.
                    done += n as usize;
                    self.offset += n as u64;
                }
                _ => {
                    let err = std::io::Error::last_os_error();
                    if err.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    buf.bitmap().mark_dirty(0, len);
                    return Err(VolatileMemoryError::IOError(err));
                }
            }
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

/// A snapshot's root drive, opened (and checked against the snapshot) when
/// the snapshot is opened, so clones restored later, even in a jail with no
/// file system, share it.
#[derive(Debug)]
pub struct SnapshotDrive {
    spec: DriveSpec,
    recorded: Result<Arc<DiskImage>, String>,
}

impl SnapshotDrive {
    /// The drive `spec` records, as `opened` (by the snapshot's owner, who
    /// resolves the recorded name), checked to be the same unchanged file.
    /// A failure is kept and reported by [`SnapshotDrive::for_clone`]
    /// unless the clone is given another path.
    pub fn new(spec: &DriveSpec, opened: Result<DiskImage, DiskError>) -> Self {
        let recorded = opened
            .and_then(|disk| spec.check(&disk, true).map(|()| Arc::new(disk)))
            .map_err(|e| e.to_string());
        SnapshotDrive {
            spec: spec.clone(),
            recorded,
        }
    }

    /// The recorded drive's open file, if it could be opened.
    pub fn file(&self) -> Option<&File> {
        self.recorded.as_ref().ok().map(|disk| disk.file())
    }

    /// What the snapshot recorded.
    pub fn spec(&self) -> &DriveSpec {
        &self.spec
    }

    /// The drive for one clone: the recorded one, or the file at
    /// `override_path`, which must have the recorded size (its content is
    /// the caller's promise).
    pub fn for_clone(&self, override_path: Option<&Path>) -> Result<Arc<DiskImage>, DiskError> {
        match override_path {
            Some(path) => {
                let disk = DiskImage::open(path)?;
                self.spec.check(&disk, false)?;
                Ok(Arc::new(disk))
            }
            None => self.recorded.clone().map_err(DiskError::Unavailable),
        }
    }

    /// The file at `path` in place of the recorded drive, which it may be
    /// smaller than, not larger: the guest keeps the capacity it read when
    /// it found the recorded one, and the device refuses what lies beyond
    /// the new file (a file system in it reads only within its own size).
    pub fn replaced_by(&self, path: &Path) -> Result<Arc<DiskImage>, DiskError> {
        let disk = DiskImage::open(path)?;
        if disk.size > self.spec.size {
            return Err(DiskError::OverCapacity {
                path: disk.path.clone(),
                size: disk.size,
                capacity: self.spec.size,
            });
        }
        Ok(Arc::new(disk))
    }
}

/// The drive for a clone of a snapshot whose drive is `drive` (`None`:
/// taken without one): see [`SnapshotDrive::for_clone`]. A drive given for
/// a snapshot without one is an error.
pub fn drive_for_clone(
    drive: Option<&SnapshotDrive>,
    override_path: Option<&Path>,
) -> Result<Option<Arc<DiskImage>>, DiskError> {
    match (drive, override_path) {
        (Some(drive), path) => drive.for_clone(path).map(Some),
        (None, Some(_)) => Err(DiskError::NoDriveInSnapshot),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// A temporary disk image with `content`, removed on drop.
    pub(crate) struct TempImage(pub PathBuf);

    impl TempImage {
        pub(crate) fn new(tag: &str, content: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!(
                "ember-disk-test-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, content).unwrap();
            TempImage(path)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// 8 sectors, each byte its offset mod 251.
    pub(crate) fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn refuses_bad_sizes_and_non_files() {
        let empty = TempImage::new("empty", b"");
        assert!(matches!(
            DiskImage::open(&empty.0),
            Err(DiskError::Size { size: 0, .. })
        ));
        let odd = TempImage::new("odd", &[0u8; 513]);
        assert!(matches!(
            DiskImage::open(&odd.0),
            Err(DiskError::Size { size: 513, .. })
        ));
        assert!(matches!(
            DiskImage::open(&std::env::temp_dir()),
            Err(DiskError::NotAFile { .. })
        ));
        assert!(matches!(
            DiskImage::open(Path::new("/nonexistent/drive.img")),
            Err(DiskError::Open { .. })
        ));
    }

    #[test]
    fn reads_across_memory_regions() {
        let image = TempImage::new("regions", &pattern(4096));
        let disk = DiskImage::open(&image.0).unwrap();
        assert_eq!(disk.sectors(), 8);
        // Two regions that touch: a read spanning both must line up.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        disk.read_into(&mem, GuestAddress(0xf00), 1024, 512)
            .unwrap();
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0xf00)).unwrap();
        assert_eq!(got, pattern(4096)[512..1536]);
        // Past the end of the file: an error, not a short success.
        assert!(disk.read_into(&mem, GuestAddress(0), 1024, 3584).is_err());
        // Outside guest memory.
        assert!(disk.read_into(&mem, GuestAddress(0x1f00), 512, 0).is_err());
    }

    #[test]
    fn the_file_is_open_read_only() {
        use std::io::Write;
        let image = TempImage::new("ro", &pattern(1024));
        let disk = DiskImage::open(&image.0).unwrap();
        assert!((&disk.file).write_all(b"x").is_err());
        assert_eq!(std::fs::read(&image.0).unwrap(), pattern(1024));
    }

    #[test]
    fn a_drive_for_a_snapshot_without_one_is_refused() {
        let image = TempImage::new("no-drive", &pattern(512));
        assert!(drive_for_clone(None, None).unwrap().is_none());
        assert!(matches!(
            drive_for_clone(None, Some(&image.0)),
            Err(DiskError::NoDriveInSnapshot)
        ));
    }

    #[test]
    fn snapshot_drive_checks() {
        let image = TempImage::new("spec", &pattern(2048));
        let spec = DiskImage::open(&image.0).unwrap().spec();
        let drive = SnapshotDrive::new(&spec, DiskImage::open(&image.0));
        assert_eq!(drive.for_clone(None).unwrap().size(), 2048);
        // A copy of the same size is fine when named explicitly.
        let copy = TempImage::new("spec-copy", &pattern(2048));
        drive.for_clone(Some(&copy.0)).unwrap();
        // Another size never is.
        let small = TempImage::new("spec-small", &pattern(1024));
        let err = drive.for_clone(Some(&small.0)).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::SizeChanged {
                    size: 1024,
                    expected: 2048,
                    ..
                }
            ),
            "{err}"
        );
        // The recorded file grown: refused at open, reported per clone.
        std::fs::write(&image.0, pattern(4096)).unwrap();
        let err = SnapshotDrive::new(&spec, DiskImage::open(&image.0))
            .for_clone(None)
            .unwrap_err();
        assert!(err.to_string().contains("2048-byte drive"), "{err}");
        // Same size, modified (a new inode from the rewrite, or a new mtime).
        let mut changed = spec.clone();
        changed.identity.mtime_sec -= 10;
        std::fs::write(&image.0, pattern(2048)).unwrap();
        let err = SnapshotDrive::new(&changed, DiskImage::open(&image.0))
            .for_clone(None)
            .unwrap_err();
        assert!(
            err.to_string().contains("changed since the snapshot"),
            "{err}"
        );
    }
}
