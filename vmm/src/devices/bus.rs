//! Dispatch of guest port I/O and MMIO accesses to device models.
//!
//! A bus is filled while the VM is built and frozen before the first vCPU
//! runs, so lookups on the vCPU exit path take no lock on the map itself;
//! only the device being accessed is locked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device model reachable through a bus.
///
/// `offset` is relative to the base the device was inserted at, and
/// `offset + data.len()` never exceeds the length it was inserted with.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes what the guest writes at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// An address space (PIO or MMIO) mapping ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(base, r)| (*base, r.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        if len == 0 {
            return Err(BusError::Overflow { base, len });
        }
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, r)| b + r.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// The device covering the whole access, and the offset into it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((range, offset))
    }

    /// Reads from the device at `addr`; returns false when nothing is mapped
    /// there (the caller decides what the guest sees).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((range, offset)) = self.resolve(addr, data.len()) else {
            return false;
        };
        lock(&range.device).read(offset, data);
        true
    }

    /// Writes to the device at `addr`; returns false when nothing is mapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((range, offset)) = self.resolve(addr, data.len()) else {
            return false;
        };
        lock(&range.device).write(offset, data);
        true
    }
}

/// Locks a device even if a previous holder panicked: device state is plain
/// data, and a vCPU thread must keep serving the guest.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A device range that cannot be mapped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already mapped.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    Overflow {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        last: Vec<u8>,
    }

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.last = data.to_vec();
        }
    }

    fn echo() -> Arc<Mutex<Echo>> {
        Arc::new(Mutex::new(Echo { last: vec![] }))
    }

    #[test]
    fn dispatches_by_range() {
        let mut bus = Bus::new();
        let dev = echo();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[9]));
        assert_eq!(dev.lock().unwrap().last, vec![9]);
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x400, &mut data));
    }

    #[test]
    fn access_past_the_end_is_unmapped() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 4, echo()).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x1000, &mut data));
        assert!(!bus.read(0x1002, &mut data));
        assert!(!bus.write(u64::MAX - 1, &data));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x10, 0x10, echo()).unwrap();
        assert!(matches!(
            bus.insert(0x18, 0x10, echo()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x8, 0x9, echo()),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x20, 0x10, echo()).unwrap();
        bus.insert(0x0, 0x10, echo()).unwrap();
        assert!(matches!(
            bus.insert(0x40, 0, echo()),
            Err(BusError::Overflow { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, echo()),
            Err(BusError::Overflow { .. })
        ));
    }
}
