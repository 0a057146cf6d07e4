//! Guest RAM: anonymous, lazily backed host memory laid out around the
//! 32-bit MMIO gap.

use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::layout;

/// Allocates `size` bytes of guest RAM. Pages are reserved, not touched:
/// the host commits them as the guest first writes them.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = layout::ram_regions(size);
    GuestMemoryMmap::from_ranges(&regions).map_err(|e| MemoryError::Create {
        size,
        message: e.to_string(),
    })
}

/// Guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot allocate {} MiB of guest memory: {message}", size >> 20)]
    Create {
        /// Requested size in bytes.
        size: u64,
        /// The mapping error.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn size_is_exact_around_the_gap() {
        for mib in [128u64, 3 * 1024 + 512, 5 * 1024] {
            let mem = create_guest_memory(mib << 20).unwrap();
            assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), mib << 20);
        }
    }
}
