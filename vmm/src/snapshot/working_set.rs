//! A clone's working set: the guest pages a typical run touches, recorded
//! once and populated up front in later clones.
//!
//! A restored clone maps the snapshot's memory file copy-on-write, so each
//! page it touches first costs a host page fault taken from inside
//! `KVM_RUN` (on the nested hosts ember is tested on, ~25 µs each; a python
//! function's hot path touches ~600 pages). Populating the same pages with
//! one `madvise(MADV_POPULATE_READ/WRITE)` per run of pages before the vCPU
//! starts does the same work in the host kernel in one go.

use ember_protocol::pagemap;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: u64 = 4096;

/// Consecutive guest pages, read only or also written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub addr: u64,
    /// Number of 4 KiB pages.
    pub pages: u32,
    /// The pages were written (populate them private, copied).
    pub write: bool,
}

/// The pages of `memory` this process has touched so far (a clone's, right
/// after its run), as runs.
pub fn touched_pages(memory: &GuestMemoryMmap) -> std::io::Result<Vec<PageRun>> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut runs: Vec<PageRun> = Vec::new();
    for region in memory.iter() {
        let host = region.as_ptr() as u64;
        let pages = region.len() / PAGE;
        let mut entries = vec![0u8; usize::try_from(pages * 8).unwrap_or(0)];
        pagemap.read_exact_at(&mut entries, host / PAGE * 8)?;
        for (i, entry) in pagemap::entries(&entries).enumerate() {
            if !entry.present() {
                continue;
            }
            let addr = region.start_addr().0 + i as u64 * PAGE;
            // A file (or shared) page in a private mapping was never
            // written: copying it would be a write.
            let write = !entry.file_or_shared();
            match runs.last_mut() {
                Some(run)
                    if run.write == write
                        && run.addr + u64::from(run.pages) * PAGE == addr
                        && run.pages < u32::MAX =>
                {
                    run.pages += 1
                }
                _ => runs.push(PageRun {
                    addr,
                    pages: 1,
                    write,
                }),
            }
        }
    }
    Ok(runs)
}

/// Populates `runs` in `memory` (best effort: a run outside memory or a
/// kernel without `MADV_POPULATE_*` only means the faults come later).
pub fn prefault(memory: &GuestMemoryMmap, runs: &[PageRun]) {
    for run in runs {
        let len = u64::from(run.pages) * PAGE;
        let Ok(len) = usize::try_from(len) else {
            continue;
        };
        let Ok(slice) = memory.get_slice(GuestAddress(run.addr), len) else {
            log::debug!("working set run {run:?} is outside guest memory");
            continue;
        };
        let advice = if run.write {
            libc::MADV_POPULATE_WRITE
        } else {
            libc::MADV_POPULATE_READ
        };
        // SAFETY: the range is one region's mapping, checked above by
        // get_slice; populating it changes no contents.
        let rc = unsafe { libc::madvise(slice.ptr_guard_mut().as_ptr().cast(), len, advice) };
        if rc != 0 {
            log::debug!(
                "madvise(populate) of {run:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn records_touched_pages_as_runs_and_prefaults_them() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        assert!(touched_pages(&memory).unwrap().is_empty());
        // Anonymous memory: written pages show as not file-backed.
        for page in [3u64, 4, 5, 9] {
            memory.write_obj(1u8, GuestAddress(page * PAGE)).unwrap();
        }
        let runs = touched_pages(&memory).unwrap();
        assert_eq!(
            runs,
            vec![
                PageRun {
                    addr: 3 * PAGE,
                    pages: 3,
                    write: true
                },
                PageRun {
                    addr: 9 * PAGE,
                    pages: 1,
                    write: true
                }
            ]
        );
        prefault(
            &memory,
            &[
                PageRun {
                    addr: 20 * PAGE,
                    pages: 2,
                    write: true,
                },
                // Outside memory: ignored.
                PageRun {
                    addr: 1 << 40,
                    pages: 1,
                    write: false,
                },
            ],
        );
        let runs = touched_pages(&memory).unwrap();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[2].addr, 20 * PAGE);
    }
}
