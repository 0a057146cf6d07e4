//! The 16550A UART at COM1, the guest's console.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleSink;
use crate::devices::bus::BusDevice;
use crate::devices::persist::Persist;

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's register span.
pub const COM1_PORT_LEN: u16 = 8;
/// COM1's legacy IRQ line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd registered with KVM.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input forwarder that the guest drained the receive FIFO, so
/// it can resume reading host input it paused on a full FIFO.
#[derive(Debug)]
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Failing to wake the forwarder only delays input; it is not lost.
        let _ = self.0.write(1);
    }
}

/// The UART's registers in a snapshot (vm-superio's `SerialState`, made
/// serializable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The UART on the PIO bus.
#[derive(Debug)]
pub struct Serial {
    inner: vm_superio::Serial<IrqTrigger, InputDrained, ConsoleSink>,
}

impl Serial {
    /// A UART interrupting through `irq`, writing to `sink`, and signalling
    /// `drained` when the guest empties its input FIFO.
    pub fn new(irq: EventFd, drained: EventFd, sink: ConsoleSink) -> Self {
        Serial {
            inner: vm_superio::Serial::with_events(IrqTrigger(irq), InputDrained(drained), sink),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit (0 when
    /// the FIFO is full: retry after the drained event).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.inner.fifo_capacity() == 0 {
            return 0;
        }
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free room in the input FIFO.
    pub fn input_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Flushes the console writer (at VM exit).
    pub fn flush(&mut self) {
        use std::io::Write;
        let _ = self.inner.writer_mut().flush();
    }
}

/// What restoring a UART needs besides its state.
pub struct SerialArgs {
    /// Raises its interrupt.
    pub irq: EventFd,
    /// Signalled when the guest empties its input FIFO.
    pub drained: EventFd,
    /// Where its output goes.
    pub sink: ConsoleSink,
}

impl Persist for Serial {
    type State = SerialState;
    type ConstructorArgs = SerialArgs;
    type Error = String;

    fn save(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Errors if the state is inconsistent (its input FIFO holds more than
    /// a UART can).
    fn restore(args: SerialArgs, state: &SerialState) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let inner = vm_superio::Serial::from_state(
            &state,
            IrqTrigger(args.irq),
            InputDrained(args.drained),
            args.sink,
        )
        .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Serial { inner })
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(offset)) => data[0] = self.inner.read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], Ok(offset)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.inner.write(offset, *value) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn output_reaches_the_sink_and_input_is_bounded() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::new(Box::new(std::io::sink()), vec![]);
        let mut serial = Serial::new(irq.try_clone().unwrap(), drained, sink);
        serial.write(0, b"A");
        let accepted = serial.enqueue_input(&[b'x'; 1000]);
        assert!(accepted > 0 && accepted < 1000);
        assert_eq!(serial.enqueue_input(b"y"), 0);
        let mut byte = [0];
        serial.read(0, &mut byte);
        assert_eq!(byte, [b'x']);
        let mut wide = [0u8; 2];
        serial.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn state_round_trip() {
        let ev = || EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = || ConsoleSink::new(Box::new(std::io::sink()), vec![]);
        let mut serial = Serial::new(ev(), ev(), sink());
        serial.write(3, &[0x80]); // DLAB on
        serial.write(0, &[0x0c]);
        serial.enqueue_input(b"ab");
        let args = || SerialArgs {
            irq: ev(),
            drained: ev(),
            sink: sink(),
        };
        let state = serial.save();
        let restored = Serial::restore(args(), &state).unwrap();
        assert_eq!(restored.save(), state);
        let mut bad = state;
        bad.in_buffer = vec![0; 1000];
        assert!(Serial::restore(args(), &bad).is_err());
    }
}
