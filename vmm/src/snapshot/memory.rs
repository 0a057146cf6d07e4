//! Guest RAM to and from the snapshot's `memory` file.
//!
//! The file holds the guest's regions back to back, each at the file
//! offset its [`MemoryRegionLayout`] names. It is sparse: only pages that
//! hold data are written, so pages the guest never touched (most of a
//! freshly booted microVM) stay holes and cost no disk.
//!
//! Restoring maps the file `MAP_PRIVATE`: the kernel reads a page from the
//! page cache when the guest first touches it and copies it only when the
//! guest writes it. Mapping is the same few syscalls whatever the size.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use ember_protocol::pagemap;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionCollectionError, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

use super::{write_atomically, FileError};

/// Largest total guest memory [`map_memory`] accepts: far above any
/// microVM, low enough that a corrupt layout cannot ask for absurd
/// mappings.
pub const MAX_MEMORY_SIZE: u64 = 1 << 40;

/// Bytes of guest memory [`dump_memory`] examines at a time.
const CHUNK: u64 = 1 << 20;

/// Where one guest memory region lives in the memory file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryRegionLayout {
    /// Guest physical address of the region's first byte.
    pub guest_addr: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the memory file.
    pub file_offset: u64,
}

/// What [`dump_memory_with_stats`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// The memory file's length: the sum of the region sizes.
    pub file_size: u64,
    /// Bytes of guest memory read to look for data (pages the host had
    /// mapped or swapped out, or every page of a file-backed region).
    pub examined: u64,
    /// Bytes written: the non-zero pages. The rest of the file is holes.
    pub written: u64,
}

/// Errors writing or mapping the memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// An I/O operation on the file failed.
    #[error(transparent)]
    Io(#[from] FileError),
    /// Guest memory could not be read.
    #[error("cannot read guest memory at {addr:#x}: {reason}")]
    GuestMemory {
        /// Guest physical address.
        addr: u64,
        /// Why.
        reason: String,
    },
    /// The layout lists no region.
    #[error("the snapshot lists no memory regions")]
    EmptyLayout,
    /// A region has size 0.
    #[error("memory region {index} is empty")]
    EmptyRegion {
        /// Region index in the layout.
        index: usize,
    },
    /// An address, size or offset is not page-aligned.
    #[error("memory region {index}: {field} {value:#x} is not a multiple of the {page_size}-byte page size")]
    Misaligned {
        /// Region index in the layout.
        index: usize,
        /// `guest address`, `size` or `file offset`.
        field: &'static str,
        /// The value.
        value: u64,
        /// The host page size.
        page_size: u64,
    },
    /// A region's end overflows 64 bits.
    #[error("memory region {index}: {field} {start:#x} + size {size:#x} overflows")]
    Overflow {
        /// Region index in the layout.
        index: usize,
        /// `guest address` or `file offset`.
        field: &'static str,
        /// Where the region starts.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// Regions are not sorted by guest address, or overlap there.
    #[error("memory region {index} (guest {start:#x}, {size:#x} bytes) is out of order with or overlaps region {previous}")]
    GuestOverlap {
        /// Region index in the layout.
        index: usize,
        /// The region before it.
        previous: usize,
        /// Its guest address.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// Two regions share bytes of the file.
    #[error("memory regions {first} and {second} overlap in the memory file")]
    FileOverlap {
        /// One region.
        first: usize,
        /// The other.
        second: usize,
    },
    /// The regions add up to more than [`MAX_MEMORY_SIZE`].
    #[error("snapshot memory totals more than the {MAX_MEMORY_SIZE} bytes ember maps")]
    TooLarge,
    /// The file ends before the last region does.
    #[error("memory file is {file_len} bytes, the snapshot needs {needed}")]
    FileTooShort {
        /// The file's length.
        file_len: u64,
        /// The end of the furthest region in the file.
        needed: u64,
    },
    /// Mapping a region failed.
    #[error("cannot map memory region {index}: {source}")]
    Mmap {
        /// Region index in the layout.
        index: usize,
        /// The error.
        #[source]
        source: MmapRegionError,
    },
    /// The mapped regions do not form a guest memory.
    #[error("cannot assemble guest memory: {0}")]
    Regions(#[source] GuestRegionCollectionError),
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no side effects and takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // sysconf cannot fail for _SC_PAGESIZE; 4 KiB is the x86_64 page size
    // should it ever.
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Writes guest memory to a sparse memory file at `path` (see
/// [`dump_memory_with_stats`]) and returns its layout.
pub fn dump_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<Vec<MemoryRegionLayout>, MemoryFileError> {
    dump_memory_with_stats(mem, path).map(|(layout, _)| layout)
}

/// Writes guest memory to a sparse memory file at `path`: the regions back
/// to back in guest address order, the file's length set first so that
/// everything not written is a hole, then only the pages that hold data.
/// The guest must be paused.
///
/// Which pages to look at: for private anonymous memory (what ember
/// allocates for a booted guest), those the host has mapped or swapped out
/// (`/proc/self/pagemap`); the others were never touched and read as zero.
/// (`mincore` would not do: it reports a swapped-out page as absent, and
/// its data would be lost.) For file-backed or shared memory (e.g. a
/// restored clone), and when pagemap cannot be read, every page.
/// Of those, pages that are all zero are not written either.
///
/// Written to a temporary file, fsynced and renamed, like the state file.
pub fn dump_memory_with_stats(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(Vec<MemoryRegionLayout>, DumpStats), MemoryFileError> {
    let mut layout = Vec::with_capacity(mem.num_regions());
    let mut file_size = 0u64;
    for region in mem.iter() {
        let entry = MemoryRegionLayout {
            guest_addr: region.start_addr().raw_value(),
            size: region.len(),
            file_offset: file_size,
        };
        file_size = file_size
            .checked_add(entry.size)
            .ok_or(MemoryFileError::TooLarge)?;
        layout.push(entry);
    }
    let stats = write_atomically(path, |file, tmp| -> Result<_, MemoryFileError> {
        file.set_len(file_size)
            .map_err(|e| FileError::new(tmp, "set the length of", e))?;
        // Unavailable without procfs (e.g. in a jail): then every page is read.
        let pagemap = File::open("/proc/self/pagemap").ok();
        let mut stats = DumpStats {
            file_size,
            ..Default::default()
        };
        let mut dumper = RegionDumper {
            file,
            tmp,
            pagemap: pagemap.as_ref(),
            page_size: page_size(),
            stats: &mut stats,
        };
        for (region, entry) in mem.iter().zip(&layout) {
            dumper.dump(region, entry)?;
        }
        Ok(stats)
    })?;
    log::debug!(
        "{}: wrote {} of {} bytes of guest memory ({} examined)",
        path.display(),
        stats.written,
        stats.file_size,
        stats.examined
    );
    Ok((layout, stats))
}

/// Writes regions into the memory file, one chunk of pages at a time.
struct RegionDumper<'a> {
    file: &'a File,
    tmp: &'a Path,
    pagemap: Option<&'a File>,
    page_size: u64,
    stats: &'a mut DumpStats,
}

impl RegionDumper<'_> {
    fn dump(
        &mut self,
        region: &GuestRegionMmap,
        entry: &MemoryRegionLayout,
    ) -> Result<(), MemoryFileError> {
        // Only private anonymous mappings can be judged by this process's
        // page tables: an untouched page of a file mapping still reads the
        // file's data, and a shared mapping's pages may live (or be
        // swapped) without an entry here.
        let private_anonymous =
            region.file_offset().is_none() && region.flags() & libc::MAP_SHARED == 0;
        let pagemap = if private_anonymous {
            self.pagemap
        } else {
            None
        };
        let host = region.as_ptr() as u64;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut present = Vec::new();
        let mut start = 0u64;
        while start < entry.size {
            let len = CHUNK.min(entry.size - start);
            let pages = len.div_ceil(self.page_size);
            self.pages_with_data(pagemap, host + start, pages, &mut present)?;
            // Runs of consecutive non-zero pages, written with one pwrite.
            let mut run: Option<(u64, u64)> = None;
            for (i, &has_data) in (0u64..).zip(&present) {
                let offset = i * self.page_size;
                let page_len = self.page_size.min(len - offset);
                let nonzero = has_data
                    && self.read_page(region, entry, start + offset, page_len, &mut buf)?;
                match (nonzero, run) {
                    (true, Some((run_start, run_end))) => {
                        run = Some((run_start, run_end + page_len))
                    }
                    (true, None) => run = Some((offset, offset + page_len)),
                    (false, Some(r)) => {
                        self.write_run(&buf, entry.file_offset + start, r)?;
                        run = None;
                    }
                    (false, None) => {}
                }
            }
            if let Some(r) = run {
                self.write_run(&buf, entry.file_offset + start, r)?;
            }
            start += len;
        }
        Ok(())
    }

    /// Fills `present` with, for each of `pages` pages from host address
    /// `addr`, whether it may hold data.
    fn pages_with_data(
        &self,
        pagemap: Option<&File>,
        addr: u64,
        pages: u64,
        present: &mut Vec<bool>,
    ) -> Result<(), MemoryFileError> {
        present.clear();
        let Some(pagemap) = pagemap else {
            present.resize(pages as usize, true);
            return Ok(());
        };
        let mut raw = vec![0u8; pages as usize * 8];
        pagemap
            .read_exact_at(&mut raw, addr / self.page_size * 8)
            .map_err(|e| FileError::new(Path::new("/proc/self/pagemap"), "read", e))?;
        present.extend(pagemap::entries(&raw).map(|entry| entry.present() || entry.swapped()));
        Ok(())
    }

    /// Copies one page (region offset `offset`) into `buf` at the same
    /// offset within the chunk; returns whether it holds a non-zero byte.
    fn read_page(
        &mut self,
        region: &GuestRegionMmap,
        entry: &MemoryRegionLayout,
        offset: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<bool, MemoryFileError> {
        let in_chunk = (offset % CHUNK) as usize;
        let err = |reason: String| MemoryFileError::GuestMemory {
            addr: entry.guest_addr + offset,
            reason,
        };
        let dest = buf
            .get_mut(in_chunk..in_chunk + len as usize)
            .ok_or_else(|| err("page outside the chunk buffer".into()))?;
        // Through a volatile copy: guest memory is shared with KVM and
        // device threads, so it is never borrowed as a Rust slice.
        let slice = region
            .get_slice(MemoryRegionAddress(offset), len as usize)
            .map_err(|e| err(e.to_string()))?;
        let copied = slice.copy_to(dest);
        if copied != len as usize {
            return Err(err(format!("copied {copied} of {len} bytes")));
        }
        self.stats.examined += len;
        // OR-folding compiles to wide vector ops; a page is small enough
        // that an early exit would not pay.
        Ok(dest.iter().fold(0u8, |acc, &b| acc | b) != 0)
    }

    /// Writes `buf[run]` at `chunk_file_offset + run.0`.
    fn write_run(
        &mut self,
        buf: &[u8],
        chunk_file_offset: u64,
        (run_start, run_end): (u64, u64),
    ) -> Result<(), MemoryFileError> {
        let data = buf
            .get(run_start as usize..run_end as usize)
            .ok_or_else(|| MemoryFileError::GuestMemory {
                addr: run_start,
                reason: "run outside the chunk buffer".into(),
            })?;
        self.file
            .write_all_at(data, chunk_file_offset + run_start)
            .map_err(|e| FileError::new(self.tmp, "write", e))?;
        self.stats.written += run_end - run_start;
        Ok(())
    }
}

/// Checks a layout read from a snapshot against the memory file's length
/// and returns the total guest memory size.
pub fn validate_layout(
    layout: &[MemoryRegionLayout],
    file_len: u64,
) -> Result<u64, MemoryFileError> {
    if layout.is_empty() {
        return Err(MemoryFileError::EmptyLayout);
    }
    let page_size = page_size();
    let mut total = 0u64;
    let mut needed = 0u64;
    for (index, entry) in layout.iter().enumerate() {
        if entry.size == 0 {
            return Err(MemoryFileError::EmptyRegion { index });
        }
        for (field, value) in [
            ("guest address", entry.guest_addr),
            ("size", entry.size),
            ("file offset", entry.file_offset),
        ] {
            if value % page_size != 0 {
                return Err(MemoryFileError::Misaligned {
                    index,
                    field,
                    value,
                    page_size,
                });
            }
        }
        let overflow = |field, start| MemoryFileError::Overflow {
            index,
            field,
            start,
            size: entry.size,
        };
        entry
            .guest_addr
            .checked_add(entry.size)
            .ok_or_else(|| overflow("guest address", entry.guest_addr))?;
        let file_end = entry
            .file_offset
            .checked_add(entry.size)
            .ok_or_else(|| overflow("file offset", entry.file_offset))?;
        needed = needed.max(file_end);
        total = total
            .checked_add(entry.size)
            .filter(|&t| t <= MAX_MEMORY_SIZE)
            .ok_or(MemoryFileError::TooLarge)?;
        if index > 0 {
            let previous = &layout[index - 1];
            // No overflow: checked on the previous iteration.
            if previous.guest_addr + previous.size > entry.guest_addr {
                return Err(MemoryFileError::GuestOverlap {
                    index,
                    previous: index - 1,
                    start: entry.guest_addr,
                    size: entry.size,
                });
            }
        }
    }
    // Regions overlapping in the file would alias each other's initial
    // contents: not unsafe with private mappings, but never a real layout.
    let mut by_offset: Vec<usize> = (0..layout.len()).collect();
    by_offset.sort_by_key(|&i| layout[i].file_offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (&layout[pair[0]], &layout[pair[1]]);
        if a.file_offset + a.size > b.file_offset {
            return Err(MemoryFileError::FileOverlap {
                first: pair[0],
                second: pair[1],
            });
        }
    }
    if needed > file_len {
        return Err(MemoryFileError::FileTooShort { file_len, needed });
    }
    Ok(total)
}

/// Maps a memory file written by [`dump_memory`] as guest memory, after
/// checking `layout` (which comes from the untrusted state file) against
/// it: page-aligned, sorted, non-overlapping regions inside the file.
///
/// Each region is mapped `MAP_PRIVATE | MAP_NORESERVE`, readable and
/// writable: nothing is read now, pages come from the page cache as the
/// guest touches them (shared by every clone of the snapshot) and guest
/// writes go to private copies, never to the file. The cost does not depend
/// on the memory size. `file` may be opened read-only; it is duplicated,
/// and must not be truncated or modified while the memory is in use.
pub fn map_memory(
    file: &File,
    layout: &[MemoryRegionLayout],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let file_len = file
        .metadata()
        .map_err(|e| FileError::new(Path::new("memory file"), "stat", e))?
        .len();
    validate_layout(layout, file_len)?;
    let file =
        Arc::new(file.try_clone().map_err(|e| {
            FileError::new(Path::new("memory file"), "duplicate the descriptor of", e)
        })?);
    let mut regions = Vec::with_capacity(layout.len());
    for (index, entry) in layout.iter().enumerate() {
        let size = usize::try_from(entry.size).map_err(|_| MemoryFileError::TooLarge)?;
        let mapping = MmapRegion::<()>::build(
            Some(FileOffset::from_arc(Arc::clone(&file), entry.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryFileError::Mmap { index, source })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(entry.guest_addr)).ok_or(
            MemoryFileError::Overflow {
                index,
                field: "guest address",
                start: entry.guest_addr,
                size: entry.size,
            },
        )?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryFileError::Regions)
}

/// Opens `path` read-only, for [`map_memory`].
pub fn open_memory_file(path: &Path) -> Result<File, MemoryFileError> {
    File::open(path).map_err(|e| FileError::new(path, "open", e).into())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;

    use vm_memory::Bytes;

    use super::*;
    use crate::snapshot::test_dir::TestDir;

    const MIB: u64 = 1 << 20;

    /// Two regions around a gap, like guest RAM around the MMIO hole.
    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (32 * MIB) as usize),
            (GuestAddress(0x1_0000_0000), (16 * MIB) as usize),
        ])
        .unwrap()
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; 4096]
    }

    /// Pages written in `guest_memory()`: (guest address, fill byte).
    const WRITTEN: [(u64, u8); 4] = [
        (0, 0x11),
        (0x10_0000, 0x22),
        (0x1ff_f000, 0x33),
        (0x1_0000_5000, 0x44),
    ];

    fn dumped(dir: &TestDir) -> (std::path::PathBuf, Vec<MemoryRegionLayout>, DumpStats) {
        let mem = guest_memory();
        for (addr, fill) in WRITTEN {
            mem.write_slice(&page(fill), GuestAddress(addr)).unwrap();
        }
        // Touched, but zero: read and skipped.
        mem.write_slice(&page(0), GuestAddress(0x20_0000)).unwrap();
        let path = dir.path().join("memory");
        let (layout, stats) = dump_memory_with_stats(&mem, &path).unwrap();
        (path, layout, stats)
    }

    #[test]
    fn dump_is_sparse_and_maps_back() {
        let dir = TestDir::new("memory-dump");
        let (path, layout, stats) = dumped(&dir);
        assert_eq!(
            layout,
            vec![
                MemoryRegionLayout {
                    guest_addr: 0,
                    size: 32 * MIB,
                    file_offset: 0
                },
                MemoryRegionLayout {
                    guest_addr: 0x1_0000_0000,
                    size: 16 * MIB,
                    file_offset: 32 * MIB
                },
            ]
        );
        assert_eq!(stats.file_size, 48 * MIB);
        assert_eq!(stats.written, 4 * 4096);
        assert!(stats.examined < MIB, "examined {}", stats.examined);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 48 * MIB);
        let allocated = meta.blocks() * 512;
        println!("memory file: {} bytes, {} allocated", meta.len(), allocated);
        assert!(allocated < MIB, "allocated {allocated} bytes");
        // No temporary file left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let file = open_memory_file(&path).unwrap();
        let clone = map_memory(&file, &layout).unwrap();
        let mut buf = page(0xff);
        for (addr, fill) in WRITTEN {
            clone.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert_eq!(buf, page(fill), "page {addr:#x}");
        }
        for addr in [0x1000, 0x20_0000, 0x1_0000_4000, 0x1_00ff_f000] {
            clone.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert_eq!(buf, page(0), "page {addr:#x}");
        }
        // Outside both regions.
        assert!(clone
            .read_slice(&mut buf, GuestAddress(0x400_0000))
            .is_err());

        // A write to the clone stays private.
        clone.write_slice(&page(0x99), GuestAddress(0)).unwrap();
        clone
            .write_slice(&page(0x99), GuestAddress(0x1000))
            .unwrap();
        let mut on_disk = page(0);
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, page(0x11));
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(on_disk, page(0));
        // A second clone sees the snapshot, not the first clone's writes.
        let other = map_memory(&file, &layout).unwrap();
        other.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(buf, page(0x11));
    }

    /// A restored clone (file-backed memory) dumps to the same contents,
    /// including pages it never touched, which come from the file.
    #[test]
    fn dump_of_a_clone_keeps_untouched_pages() {
        let dir = TestDir::new("memory-redump");
        let (path, layout, _) = dumped(&dir);
        let file = open_memory_file(&path).unwrap();
        let clone = map_memory(&file, &layout).unwrap();
        clone
            .write_slice(&page(0x55), GuestAddress(0x30_0000))
            .unwrap();
        let second = dir.path().join("memory2");
        let (layout2, stats) = dump_memory_with_stats(&clone, &second).unwrap();
        assert_eq!(layout2, layout);
        assert_eq!(stats.written, 5 * 4096);
        let again = map_memory(&open_memory_file(&second).unwrap(), &layout2).unwrap();
        let mut buf = page(0);
        for (addr, fill) in WRITTEN.into_iter().chain([(0x30_0000, 0x55)]) {
            again.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert_eq!(buf, page(fill), "page {addr:#x}");
        }
    }

    #[test]
    fn short_file_is_refused() {
        let dir = TestDir::new("memory-short");
        let (path, layout, _) = dumped(&dir);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(MIB).unwrap();
        let err = map_memory(&file, &layout).unwrap_err().to_string();
        assert_eq!(
            err,
            "memory file is 1048576 bytes, the snapshot needs 50331648"
        );
    }

    #[test]
    fn bad_layouts_are_refused() {
        let dir = TestDir::new("memory-layout");
        let path = dir.path().join("memory");
        // Readable: the good layout at the end really maps it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(64 * MIB).unwrap();
        let region = |guest_addr, size, file_offset| MemoryRegionLayout {
            guest_addr,
            size,
            file_offset,
        };
        let cases: &[(&[MemoryRegionLayout], &str)] = &[
            (&[], "no memory regions"),
            (&[region(0, 0, 0)], "memory region 0 is empty"),
            (&[region(0x800, MIB, 0)], "guest address 0x800 is not a multiple"),
            (&[region(0, MIB + 1, 0)], "size 0x100001 is not a multiple"),
            (&[region(0, MIB, 512)], "file offset 0x200 is not a multiple"),
            (&[region(u64::MAX - 0xfff, MIB, 0)], "overflows"),
            (&[region(0, MIB, u64::MAX - 0xfff)], "overflows"),
            (
                &[region(0, 2 * MIB, 0), region(MIB, MIB, 2 * MIB)],
                "region 1 (guest 0x100000, 0x100000 bytes) is out of order with or overlaps region 0",
            ),
            (
                &[region(4 * MIB, MIB, 0), region(0, MIB, MIB)],
                "out of order",
            ),
            (
                &[region(0, 2 * MIB, 0), region(4 * MIB, MIB, MIB)],
                "memory regions 0 and 1 overlap in the memory file",
            ),
            (&[region(0, 1 << 41, 0)], "more than the"),
            (
                &[region(0, 32 * MIB, 0), region(0x1_0000_0000, 64 * MIB, 32 * MIB)],
                "memory file is 67108864 bytes, the snapshot needs 100663296",
            ),
        ];
        for (layout, want) in cases {
            let err = match map_memory(&file, layout) {
                Ok(_) => panic!("{layout:?} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(want), "{layout:?}: {err}");
        }
        // And a good one on the same file.
        map_memory(
            &file,
            &[
                region(0, 32 * MIB, 0),
                region(0x1_0000_0000, 32 * MIB, 32 * MIB),
            ],
        )
        .unwrap();
    }

    /// Mapping costs the same whatever the size. Run with `--nocapture`
    /// for the numbers.
    #[test]
    fn map_time_does_not_grow_with_size() {
        let dir = TestDir::new("memory-timing");
        let mut means = Vec::new();
        for size in [128 * MIB, 2048 * MIB] {
            let path = dir.path().join(format!("memory-{}", size / MIB));
            let file = File::create(&path).unwrap();
            // Sparse: no disk used.
            file.set_len(size).unwrap();
            let file = open_memory_file(&path).unwrap();
            let layout = [MemoryRegionLayout {
                guest_addr: 0,
                size,
                file_offset: 0,
            }];
            const ROUNDS: u32 = 50;
            let start = Instant::now();
            for _ in 0..ROUNDS {
                let mem = map_memory(&file, &layout).unwrap();
                drop(mem);
            }
            let mean = start.elapsed() / ROUNDS;
            println!(
                "map_memory of {} MiB: {mean:?} (mean of {ROUNDS}, map + unmap)",
                size / MIB
            );
            means.push(mean);
        }
        // 16x the memory must not cost anything like 16x the time; the
        // bound is loose so that a loaded test machine does not fail it.
        assert!(
            means[1] < means[0] * 4 + std::time::Duration::from_millis(1),
            "{means:?}"
        );
    }
}
