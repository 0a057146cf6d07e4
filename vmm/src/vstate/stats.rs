//! KVM's binary statistics (`KVM_GET_STATS_FD`): counters KVM keeps per VM
//! and per vCPU, read with one `pread` each. An in-place reset reads them
//! to learn whether the guest kernel ran during an invocation (see
//! [`crate::snapshot::reset`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// Most descriptors a stats file may announce; KVM has about a hundred.
const MAX_DESCRIPTORS: u32 = 4096;
/// Longest name a descriptor may announce.
const MAX_NAME: u32 = 4096;

/// The counters KVM keeps per vCPU that say how much guest-kernel work it
/// did, as read by [`GuestKernelWork::read`].
pub const GUEST_KERNEL_COUNTERS: [&str; 4] =
    ["insn_emulation", "pf_guest", "irq_injections", "exits"];

/// How much the guest kernel ran, from KVM's per-vCPU counters (summed over
/// vCPUs). On PVM hosts every guest-kernel instruction is emulated, so
/// `emulated_instructions` counts them (plus MMIO stores such as the
/// doorbell's); on hardware KVM the kernel runs natively and only the
/// faults and interrupts it handled show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuestKernelWork {
    /// Instructions KVM emulated.
    pub emulated_instructions: u64,
    /// Page faults KVM reflected to the guest kernel.
    pub guest_page_faults: u64,
    /// Interrupts injected into the guest.
    pub injected_interrupts: u64,
    /// Exits from guest mode to KVM.
    pub exits: u64,
}

impl GuestKernelWork {
    /// The counters of every vCPU in `stats`, summed.
    pub fn read(stats: &[KvmStats]) -> Result<Self, StatsError> {
        let mut work = GuestKernelWork::default();
        for stats in stats {
            let v = stats.read(&GUEST_KERNEL_COUNTERS)?;
            work.emulated_instructions += v[0];
            work.guest_page_faults += v[1];
            work.injected_interrupts += v[2];
            work.exits += v[3];
        }
        Ok(work)
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &GuestKernelWork) -> GuestKernelWork {
        GuestKernelWork {
            emulated_instructions: self
                .emulated_instructions
                .wrapping_sub(earlier.emulated_instructions),
            guest_page_faults: self
                .guest_page_faults
                .wrapping_sub(earlier.guest_page_faults),
            injected_interrupts: self
                .injected_interrupts
                .wrapping_sub(earlier.injected_interrupts),
            exits: self.exits.wrapping_sub(earlier.exits),
        }
    }
}

/// Named counters of one VM or vCPU.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    data_offset: u64,
    /// `(name, offset of its first u64 within the data block)`, for the
    /// names asked for that KVM has.
    wanted: Vec<(&'static str, u64)>,
}

/// Where the [`GUEST_KERNEL_COUNTERS`] are in a vCPU's statistics: the
/// same for every vCPU of this host's KVM, so parsed once per process.
static VCPU_LAYOUT: OnceLock<(u64, Vec<(&'static str, u64)>)> = OnceLock::new();

impl KvmStats {
    /// The guest-kernel counters of the vCPU `fd` (see
    /// [`GuestKernelWork`]); the descriptors are parsed for the first vCPU
    /// of the process only.
    pub fn open_vcpu(fd: &impl AsRawFd) -> Result<Self, StatsError> {
        if let Some((data_offset, wanted)) = VCPU_LAYOUT.get() {
            return Ok(KvmStats {
                file: stats_file(fd)?,
                data_offset: *data_offset,
                wanted: wanted.clone(),
            });
        }
        let stats = Self::open(fd, &GUEST_KERNEL_COUNTERS)?;
        let _ = VCPU_LAYOUT.set((stats.data_offset, stats.wanted.clone()));
        Ok(stats)
    }

    /// Opens the statistics of `fd` (a VM or vCPU fd) and finds `names`.
    /// A name this KVM does not have reads as 0.
    pub fn open(fd: &impl AsRawFd, names: &[&'static str]) -> Result<Self, StatsError> {
        let file = stats_file(fd)?;
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

/// A new statistics descriptor for the VM or vCPU `fd`.
fn stats_file(fd: &impl AsRawFd) -> Result<File, StatsError> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or
    // -1); `fd` is a live KVM VM or vCPU descriptor.
    let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
    if raw < 0 {
        return Err(StatsError::Open(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(raw) })
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
