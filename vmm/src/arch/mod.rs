//! Architecture-specific guest setup. ember runs x86_64 guests only.

pub mod x86_64;

pub use self::x86_64::{
    configure_system, configure_vcpu, layout, setup_vm, ArchError, BootEntry, InitrdRegion,
};
