//! The host memory a server's function clones may hold, over all
//! functions (`--max-memory-mib`).
//!
//! Each clone is charged what its worker's cgroup lets it use (guest
//! memory plus the VMM's overhead), not what it uses now: the cap then
//! holds however the guests behave, and the server never overcommits.
//! Most clones use far less (a recycled clone of a python echo shares all
//! but ~2 MiB with its template), so a server meant to pack many idle
//! clones onto a host leaves the cap off and relies on that sharing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A cap on the bytes charged by live and idle clones (`None`: no cap).
#[derive(Debug)]
pub struct MemoryBudget {
    cap: Option<u64>,
    charged: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `cap` bytes, or an unlimited one.
    pub fn new(cap: Option<u64>) -> Arc<Self> {
        Arc::new(MemoryBudget {
            cap,
            charged: AtomicU64::new(0),
        })
    }

    /// Charges `bytes` if they fit under the cap; the charge is returned
    /// when the [`Charge`] is dropped.
    pub fn try_charge(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        self.charged
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |charged| {
                let after = charged.checked_add(bytes)?;
                match self.cap {
                    Some(cap) if after > cap => None,
                    _ => Some(after),
                }
            })
            .ok()?;
        Some(Charge {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes charged now.
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::SeqCst)
    }

    /// The cap, if any.
    pub fn cap(&self) -> Option<u64> {
        self.cap
    }
}

/// Bytes charged to a [`MemoryBudget`] while this lives.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Charge {
    /// How many bytes it holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.charged.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_under_the_cap_and_come_back_when_dropped() {
        let budget = MemoryBudget::new(Some(100));
        let a = budget.try_charge(60).expect("fits");
        assert!(budget.try_charge(41).is_none(), "over the cap");
        let b = budget.try_charge(40).expect("fits exactly");
        assert_eq!(budget.charged(), 100);
        drop(a);
        assert_eq!(budget.charged(), 40);
        assert!(budget.try_charge(60).is_some());
        drop(b);
        assert_eq!(budget.charged(), 0);
    }

    #[test]
    fn without_a_cap_everything_fits_but_is_still_counted() {
        let budget = MemoryBudget::new(None);
        let a = budget.try_charge(u64::MAX - 1).expect("fits");
        assert!(budget.try_charge(2).is_none(), "the count cannot overflow");
        assert_eq!(budget.charged(), u64::MAX - 1);
        drop(a);
        assert_eq!(budget.charged(), 0);
    }
}
