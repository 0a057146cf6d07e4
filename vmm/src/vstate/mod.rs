//! The KVM side of a microVM: the VM, its vCPUs, and guest memory.

pub mod memory;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use vcpu::{Vcpu, VcpuHandle};
pub use vm::Vm;

use std::sync::OnceLock;

use kvm_ioctls::Kvm;

static KVM: OnceLock<Kvm> = OnceLock::new();

/// This process's handle on `/dev/kvm`, opened once: every VM is created
/// from it, so a restore does not pay for opening the device again.
pub fn kvm() -> Result<&'static Kvm, kvm_ioctls::Error> {
    if let Some(kvm) = KVM.get() {
        return Ok(kvm);
    }
    let kvm = Kvm::new()?;
    Ok(KVM.get_or_init(|| kvm))
}

/// Uses an already open `/dev/kvm` (a jailed worker has no `/dev`).
/// Returns false if a handle was already in use.
pub fn use_kvm(kvm: Kvm) -> bool {
    KVM.set(kvm).is_ok()
}
