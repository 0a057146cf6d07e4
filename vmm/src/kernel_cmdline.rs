//! The guest kernel command line ember builds.

use linux_loader::cmdline::Cmdline;

use crate::host::HostKind;

/// x86 Linux keeps only this many bytes of its command line
/// (COMMAND_LINE_SIZE); anything longer would be silently cut.
pub const KERNEL_CMDLINE_MAX: usize = 2048;

/// Parameters every ember guest gets.
const BASE_PARAMS: &[&str] = &[
    "console=ttyS0",
    // No reboots in a microVM: the i8042 reset ends the VM, panics included.
    "reboot=k",
    "panic=1",
    "pci=off",
    "nomodule",
    // One UART; probing the other three costs port I/O exits.
    "8250.nr_uarts=1",
    // Each console byte is a VM exit: keep the boot log to warnings.
    "quiet",
    // A restored clone's clock jumps by the snapshot's age; RCU would
    // report that as a stall and print stack dumps on every restore.
    "rcupdate.rcu_cpu_stall_suppress=1",
];

/// Identifies the parameters ember adds, so that snapshots taken with
/// other ones are not mistaken for current ones.
pub fn fingerprint(host: HostKind) -> String {
    BASE_PARAMS
        .iter()
        .chain(host.guest_params())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the command line for `host`, declaring `devices` (e.g.
/// `virtio_mmio.device=4K@0xd0000000:5`), with the user's `extra` appended
/// last so it can override ember's choices (e.g. `loglevel=7`).
pub fn build(host: HostKind, devices: &[String], extra: &str) -> Result<Cmdline, CmdlineError> {
    let mut cmdline = Cmdline::new(KERNEL_CMDLINE_MAX).map_err(CmdlineError::from)?;
    for param in BASE_PARAMS.iter().chain(host.guest_params()) {
        cmdline.insert_str(param)?;
    }
    for device in devices {
        cmdline.insert_str(device)?;
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline.insert_str(extra)?;
    }
    Ok(cmdline)
}

/// The command line cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// Too long, or with characters the kernel does not accept.
    #[error("invalid kernel command line: {0}")]
    Invalid(#[from] linux_loader::cmdline::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn hardware_kvm_gets_no_pvm_params() {
        let c = text(&build(HostKind::Kvm, &[], "").unwrap());
        assert!(c.starts_with("console=ttyS0 reboot=k"));
        assert!(!c.contains("noxsave"));
        assert!(!c.contains("ember_"));
    }

    #[test]
    fn pvm_params_then_extra_last() {
        let c = text(
            &build(
                HostKind::Pvm,
                &["virtio_mmio.device=4K@0xd0000000:5".into()],
                " loglevel=7 ",
            )
            .unwrap(),
        );
        assert!(c.contains(" noxsave "));
        assert!(c.contains("ember_syscall_fault"));
        assert!(
            c.ends_with(" virtio_mmio.device=4K@0xd0000000:5 loglevel=7"),
            "{c}"
        );
    }

    #[test]
    fn overlong_extra_is_an_error() {
        let extra = "x".repeat(KERNEL_CMDLINE_MAX);
        assert!(build(HostKind::Kvm, &[], &extra).is_err());
    }
}
