//! The i8042 keyboard controller, reduced to what a microVM needs: the
//! guest's CPU-reset command, which `reboot=k` uses to power off.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// First of the controller's ports (data at +0, command/status at +4).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Span of ports claimed.
pub const I8042_PORT_LEN: u16 = 5;

/// Ends the VM when the guest resets the CPU.
#[derive(Debug)]
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.report(VmExit::Reset);
        Ok(())
    }
}

/// The i8042 device on the PIO bus.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// A controller whose reset command reports [`VmExit::Reset`] on `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 {
            inner: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(offset)) => data[0] = self.inner.read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], Ok(offset)) = (data, u8::try_from(offset)) {
            let Ok(()) = self.inner.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0], "input buffer must look empty to the guest");
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
