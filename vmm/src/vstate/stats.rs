//! KVM's binary statistics (`KVM_GET_STATS_FD`): counters KVM keeps per VM
//! and per vCPU, read with one `pread` each. An in-place reset reads them
//! to learn whether the guest kernel ran during an invocation (see
//! [`crate::snapshot::reset`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// Most descriptors a stats file may announce; KVM has about a hundred.
const MAX_DESCRIPTORS: u32 = 4096;
/// Longest name a descriptor may announce.
const MAX_NAME: u32 = 4096;

/// Named counters of one VM or vCPU.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    data_offset: u64,
    /// `(name, offset of its first u64 within the data block)`, for the
    /// names asked for that KVM has.
    wanted: Vec<(&'static str, u64)>,
}

impl KvmStats {
    /// Opens the statistics of `fd` (a VM or vCPU fd) and finds `names`.
    /// A name this KVM does not have reads as 0.
    pub fn open(fd: &impl AsRawFd, names: &[&'static str]) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd
        // (or -1); `fd` is a live KVM VM or vCPU descriptor.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(StatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; std::mem::size_of::<kvm_stats_header>()];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let word =
            |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (name_size, num_desc, desc_offset, data_offset) =
            (word(4), word(8), word(16), word(20));
        if num_desc > MAX_DESCRIPTORS || name_size > MAX_NAME {
            return Err(StatsError::Format(format!(
                "{num_desc} descriptors with {name_size}-byte names"
            )));
        }
        let desc_len = std::mem::size_of::<kvm_stats_desc>() + name_size as usize;
        let mut descriptors = vec![0u8; desc_len * num_desc as usize];
        file.read_exact_at(&mut descriptors, u64::from(desc_offset))
            .map_err(StatsError::Read)?;
        let mut wanted = Vec::new();
        for desc in descriptors.chunks_exact(desc_len) {
            let offset = u32::from_ne_bytes([desc[8], desc[9], desc[10], desc[11]]);
            let name = &desc[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(&known) = names.iter().find(|n| n.as_bytes() == name) {
                wanted.push((known, u64::from(offset)));
            }
        }
        Ok(KvmStats {
            file,
            data_offset: u64::from(data_offset),
            wanted,
        })
    }

    /// The current value of each name given to [`KvmStats::open`], in that
    /// order (0 for a name KVM does not have): one `pread` of the span that
    /// holds them.
    pub fn read(&self, names: &[&'static str]) -> Result<Vec<u64>, StatsError> {
        let first = self.wanted.iter().map(|w| w.1).min().unwrap_or(0);
        let end = self.wanted.iter().map(|w| w.1 + 8).max().unwrap_or(0);
        let mut span = vec![0u8; usize::try_from(end - first).unwrap_or(0)];
        self.file
            .read_exact_at(&mut span, self.data_offset + first)
            .map_err(StatsError::Read)?;
        Ok(names
            .iter()
            .map(|name| {
                self.wanted
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, offset)| {
                        let at = usize::try_from(offset - first).ok()?;
                        let bytes: [u8; 8] = span.get(at..at + 8)?.try_into().ok()?;
                        Some(u64::from_ne_bytes(bytes))
                    })
                    .unwrap_or(0)
            })
            .collect())
    }

    /// Whether KVM has counter `name`.
    pub fn has(&self, name: &str) -> bool {
        self.wanted.iter().any(|(n, _)| *n == name)
    }
}

/// KVM's statistics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// KVM_GET_STATS_FD failed.
    #[error("cannot open KVM statistics: {0}")]
    Open(std::io::Error),
    /// The statistics file could not be read.
    #[error("cannot read KVM statistics: {0}")]
    Read(std::io::Error),
    /// The statistics file is not laid out as KVM documents.
    #[error("KVM statistics are malformed: {0}")]
    Format(String),
}
