//! What a snapshot's `state` file holds.

use serde::{Deserialize, Serialize};

use super::MemoryRegionLayout;
use crate::arch::x86_64::state::{VcpuState, VmState};
use crate::device_manager::DeviceStates;
use crate::host::HostKind;

/// Everything needed to resume a paused microVM, except guest RAM.
///
/// Read from a file, so untrusted: [`SnapshotState::validate`] checks its
/// internal consistency before anything is built from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The kind of KVM the guest was booted for (its kernel command line
    /// and CPUID depend on it).
    pub host: HostKind,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// The guest's vsock context ID.
    pub vsock_cid: u64,
    /// The command line the guest kernel was booted with (for humans).
    pub kernel_cmdline: String,
    /// Where each RAM region lives in the `memory` file.
    pub memory: Vec<MemoryRegionLayout>,
    /// Interrupt controllers, PIT and kvm-clock.
    pub vm: VmState,
    /// One entry per vCPU, in order (bounded while decoding: a decoded
    /// vCPU state is ~200x its encoding, so a hostile count must not get
    /// to allocate).
    #[serde(deserialize_with = "bounded_vcpus")]
    pub vcpu_states: Vec<VcpuState>,
    /// Device models.
    pub devices: DeviceStates,
    /// When the snapshot was taken, Unix milliseconds.
    pub created_unix_ms: u64,
}

impl SnapshotState {
    /// Checks that the parts agree with each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 || usize::from(self.vcpus) != self.vcpu_states.len() {
            return Err(format!(
                "state has {} vCPU states for {} vCPUs",
                self.vcpu_states.len(),
                self.vcpus
            ));
        }
        let ram: u64 = self.memory.iter().map(|r| r.size).sum();
        if ram != u64::from(self.mem_mib) << 20 {
            return Err(format!(
                "memory layout covers {ram} bytes, the VM has {} MiB",
                self.mem_mib
            ));
        }
        if !(3..u64::from(u32::MAX)).contains(&self.vsock_cid) {
            return Err(format!("invalid vsock CID {}", self.vsock_cid));
        }
        for (block, what) in [(&self.devices.block, "root"), (&self.devices.code, "code")] {
            let Some(block) = block else { continue };
            let size = block.drive.size;
            if size == 0 || !size.is_multiple_of(crate::devices::virtio::block::disk::SECTOR_SIZE) {
                return Err(format!("invalid {what} drive size {size}"));
            }
        }
        Ok(())
    }
}

/// Decodes at most `MAX_VCPUS` vCPU states, refusing longer lists before
/// building them.
fn bounded_vcpus<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<VcpuState>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<VcpuState>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "at most {} vCPU states",
                crate::arch::x86_64::mptable::MAX_CPUS
            )
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let max = usize::from(crate::arch::x86_64::mptable::MAX_CPUS);
            if seq.size_hint().is_some_and(|n| n > max) {
                return Err(serde::de::Error::custom("too many vCPU states"));
            }
            let mut out = Vec::new();
            while let Some(state) = seq.next_element()? {
                if out.len() == max {
                    return Err(serde::de::Error::custom("too many vCPU states"));
                }
                out.push(state);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}
