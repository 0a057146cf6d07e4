//! The KVM side of a microVM: the VM, its vCPUs, and guest memory.

pub mod memory;
pub mod vcpu;
pub mod vm;

pub use vcpu::{Vcpu, VcpuHandle};
pub use vm::Vm;
