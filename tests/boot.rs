//! Booting through the library API: one vCPU to agent-ready, then stopping
//! a running guest from the host.

mod common;

use std::time::Duration;

use common::{guest_artifacts, BOOT_TIMEOUT};
use ember::{ConsoleOutput, Machine, VmConfig, VmExit};

#[test]
fn one_vcpu_boots_to_agent_and_stops_on_request() {
    let (kernel, initrd) = guest_artifacts();
    let mut config = VmConfig::new(kernel, Some(initrd));
    config.console = ConsoleOutput::Sink;
    let mut vm = Machine::boot(&config).expect("boot");

    let (_, line) = vm.agent_ready().wait(BOOT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "agent not ready; exit: {:?}",
            vm.wait_timeout(Duration::ZERO)
        )
    });
    let ready = ember_protocol::parse_ready_line(&line).expect("ready line parses");
    assert_eq!(ready.cpus, Some(1), "{line}");
    assert!(vm.times().vmm_setup().is_some());

    // The agent waits for work: the guest runs until the host stops it, and
    // stopping must not wait for the guest's cooperation.
    assert_eq!(vm.wait_timeout(Duration::from_millis(100)), None);
    assert_eq!(vm.stop(), VmExit::Stopped);
}
