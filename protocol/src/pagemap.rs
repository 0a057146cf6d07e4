//! Entries of Linux's `/proc/<pid>/pagemap`
//! (`Documentation/admin-guide/mm/pagemap.rst`): 8 native-endian bytes per
//! virtual page. Both sides decode them: the host for the guest memory it
//! snapshots and prefaults, the agent to hand the host the frames behind a
//! runtime's hot-path buffers.

/// Bytes of one entry; the entry of virtual page `n` is at offset
/// `n * ENTRY_BYTES`.
pub const ENTRY_BYTES: usize = 8;

/// The page is in RAM.
pub const PRESENT: u64 = 1 << 63;
/// The page is in swap.
pub const SWAPPED: u64 = 1 << 62;
/// The page is a file page or shared anonymous memory (in a private file
/// mapping: not yet copied, so never written).
pub const FILE_OR_SHARED: u64 = 1 << 61;
/// The page is mapped by this process alone.
pub const EXCLUSIVE: u64 = 1 << 56;
/// The page frame number (0 unless the reader has `CAP_SYS_ADMIN`).
pub const PFN_MASK: u64 = (1 << 55) - 1;

/// One decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    /// The page is in RAM.
    pub fn present(self) -> bool {
        self.0 & PRESENT != 0
    }

    /// The page is in swap.
    pub fn swapped(self) -> bool {
        self.0 & SWAPPED != 0
    }

    /// The page is a file page or shared anonymous memory.
    pub fn file_or_shared(self) -> bool {
        self.0 & FILE_OR_SHARED != 0
    }

    /// The page is mapped by this process alone.
    pub fn exclusive(self) -> bool {
        self.0 & EXCLUSIVE != 0
    }

    /// The page frame number; 0 when hidden from the reader.
    pub fn pfn(self) -> u64 {
        self.0 & PFN_MASK
    }
}

/// The entries in `raw`, bytes as read from a pagemap file (a tail shorter
/// than an entry is ignored).
pub fn entries(raw: &[u8]) -> impl Iterator<Item = PagemapEntry> + '_ {
    raw.chunks_exact(ENTRY_BYTES).map(|bytes| {
        let mut word = [0u8; ENTRY_BYTES];
        word.copy_from_slice(bytes);
        PagemapEntry(u64::from_ne_bytes(word))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_frame_number() {
        let raw: Vec<u8> = [PRESENT | EXCLUSIVE | 0x1234, SWAPPED | FILE_OR_SHARED]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .chain([0xff; 3])
            .collect();
        let e: Vec<_> = entries(&raw).collect();
        assert_eq!(e.len(), 2);
        assert!(e[0].present() && e[0].exclusive() && !e[0].swapped());
        assert_eq!(e[0].pfn(), 0x1234);
        assert!(!e[1].present() && e[1].swapped() && e[1].file_or_shared());
        assert_eq!(e[1].pfn(), 0);
    }
}
