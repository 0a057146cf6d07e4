//! The template's memory as a reset reads it: the snapshot's `memory` file
//! mapped read-only and shared (the page-cache pages every clone maps
//! copy-on-write), to copy pages back from; and the identity that ties a
//! resettable clone to the opened snapshot it came from.

use std::sync::atomic::{AtomicU64, Ordering};

use super::memory::MemoryRegionLayout;

/// Bytes of a guest page.
pub(super) const PAGE: u64 = 4096;

/// Distinguishes snapshots within a process, so a clone is only ever reset
/// to the template it was made from.
static NEXT_TEMPLATE_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh identity for an opened snapshot.
pub(super) fn next_template_id() -> u64 {
    NEXT_TEMPLATE_ID.fetch_add(1, Ordering::Relaxed)
}

/// The template's memory, mapped read-only and shared (the page cache
/// pages every clone maps copy-on-write), to copy pages back from.
#[derive(Debug)]
pub(super) struct TemplateMemory {
    base: *const u8,
    len: usize,
    layout: Vec<MemoryRegionLayout>,
}

// SAFETY: the mapping is read-only and never unmapped while the value
// lives; reading it from several threads is fine.
unsafe impl Send for TemplateMemory {}
// SAFETY: as above: shared read-only access only.
unsafe impl Sync for TemplateMemory {}

impl TemplateMemory {
    /// Maps `file` (a snapshot's memory file, already checked against
    /// `layout`) read-only.
    pub(super) fn map(
        file: &std::fs::File,
        layout: &[MemoryRegionLayout],
    ) -> Result<Self, std::io::Error> {
        use std::os::fd::AsRawFd;
        let len = layout
            .iter()
            .map(|r| r.file_offset.saturating_add(r.size))
            .max()
            .and_then(|end| usize::try_from(end).ok())
            .filter(|&len| len > 0)
            .ok_or_else(|| std::io::Error::other("the snapshot has no memory"))?;
        // SAFETY: a new read-only shared mapping of an open file; nothing
        // else is at the address the kernel picks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TemplateMemory {
            base: base.cast(),
            len,
            layout: layout.to_vec(),
        })
    }

    /// The template's content of the 4 KiB guest page at `gpa`.
    pub(super) fn page(&self, gpa: u64) -> Option<&[u8]> {
        let region = self
            .layout
            .iter()
            .find(|r| gpa >= r.guest_addr && gpa - r.guest_addr < r.size)?;
        let offset = usize::try_from(region.file_offset + (gpa - region.guest_addr)).ok()?;
        if offset.checked_add(PAGE as usize)? > self.len {
            return None;
        }
        // SAFETY: `offset..offset + 4096` lies inside the mapping, which
        // lives as long as `self`; the snapshot's files are not modified
        // while it is open (see the snapshot module).
        Some(unsafe { std::slice::from_raw_parts(self.base.add(offset), PAGE as usize) })
    }
}

impl Drop for TemplateMemory {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is the mapping made in `map`, unmapped
        // once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
