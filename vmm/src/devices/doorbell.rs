//! The hot-path doorbell: the guest-physical page a function runtime writes
//! to from guest user mode to tell the VMM "waiting for a request" or
//! "response written" (see `ember_protocol::hotpath`).
//!
//! It is not a bus device: the vCPU loop hands the write to [`Doorbell::ring`]
//! directly, because a ring can ask the ringing vCPU to stop right there,
//! with the runtime's registers exactly at its wait (a template snapshot is
//! taken in that state), and because an output ring must be served before
//! the vCPU runs on. The guest is untrusted: any code in it may ring, with
//! any value; a ring only records what happened, runs the output hook (for
//! `DOORBELL_OUTPUT`) and wakes waiters.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use ember_protocol::hotpath::{
    DOORBELL_ADDR, DOORBELL_DONE, DOORBELL_OUTPUT, DOORBELL_WAITING,
};

/// What a [`DOORBELL_OUTPUT`] ring runs, on the ringing vCPU's thread,
/// before that vCPU runs again: it reads the chunk the guest wrote. It
/// must be quick and must not block (the vCPU waits for it).
pub type OutputHook = Arc<dyn Fn() + Send + Sync>;

/// What rang so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rings {
    /// [`DOORBELL_WAITING`] rings.
    pub waiting: u64,
    /// [`DOORBELL_DONE`] rings.
    pub done: u64,
    /// When the last `DONE` rang.
    pub last_done: Option<Instant>,
    /// [`DOORBELL_OUTPUT`] rings.
    pub output: u64,
    /// Rings with any other value (or width).
    pub other: u64,
}

/// The doorbell of one microVM, shared by its vCPU threads and its owner.
#[derive(Default)]
pub struct Doorbell {
    rings: Mutex<Rings>,
    cond: Condvar,
    /// A ring with this value stops the ringing vCPU (0: none does).
    park_on: AtomicU32,
    output_hook: Mutex<Option<OutputHook>>,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell")
            .field("rings", &self.rings())
            .field("park_on", &self.park_on.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl crate::exit::WakeOnExit for Doorbell {
    fn vm_stopped(&self) {
        self.wake();
    }
}

impl Doorbell {
    /// A doorbell nobody rang.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a guest write of `data` to the doorbell page. Returns true
    /// if the ringing vCPU should stop now (see [`Doorbell::park_on`]).
    pub fn ring(&self, data: &[u8]) -> bool {
        let value = match <[u8; 4]>::try_from(data) {
            Ok(bytes) => u32::from_le_bytes(bytes),
            Err(_) => 0,
        };
        if value == DOORBELL_OUTPUT {
            // Cloned out first: the hook may take its time, and the owner
            // may replace it meanwhile.
            let hook = self
                .output_hook
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        {
            let mut rings = self.lock();
            match value {
                DOORBELL_WAITING => rings.waiting += 1,
                DOORBELL_DONE => {
                    rings.done += 1;
                    rings.last_done = Some(Instant::now());
                }
                DOORBELL_OUTPUT => rings.output += 1,
                _ => rings.other += 1,
            }
        }
        self.cond.notify_all();
        value != 0 && self.park_on.load(Ordering::SeqCst) == value
    }

    /// From now on, a ring with `value` stops the vCPU that rings it (the
    /// machine must then be paused and not resumed); 0 turns this off.
    pub fn park_on(&self, value: u32) {
        self.park_on.store(value, Ordering::SeqCst);
    }

    /// From now on, [`DOORBELL_OUTPUT`] rings run `hook` (`None`: they are
    /// only counted).
    pub fn set_output_hook(&self, hook: Option<OutputHook>) {
        *self
            .output_hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = hook;
    }

    /// Forgets every ring (a clone reset in place starts counting again).
    pub fn reset(&self) {
        *self.lock() = Rings::default();
    }

    /// What rang so far.
    pub fn rings(&self) -> Rings {
        *self.lock()
    }

    /// Waits until `ready(rings)` holds or `timeout` passes; returns the
    /// rings at that point and whether `ready` held.
    pub fn wait_until(&self, timeout: Duration, ready: impl Fn(&Rings) -> bool) -> (Rings, bool) {
        let deadline = Instant::now() + timeout;
        let mut rings = self.lock();
        loop {
            if ready(&rings) {
                return (*rings, true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (*rings, false);
            }
            rings = self
                .cond
                .wait_timeout(rings, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Wakes every waiter without a ring (e.g. the VM stopped).
    pub fn wake(&self) {
        let _guard = self.lock();
        self.cond.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Rings> {
        self.rings.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_rings_and_parks_only_on_request() {
        let bell = Doorbell::new();
        assert!(!bell.ring(&DOORBELL_WAITING.to_le_bytes()));
        bell.park_on(DOORBELL_WAITING);
        assert!(!bell.ring(&DOORBELL_DONE.to_le_bytes()));
        assert!(bell.ring(&DOORBELL_WAITING.to_le_bytes()));
        // Odd widths and values are counted, never park.
        assert!(!bell.ring(&[1]));
        assert!(!bell.ring(&7u32.to_le_bytes()));
        let rings = bell.rings();
        assert_eq!((rings.waiting, rings.done, rings.other), (2, 1, 2));
        assert!(rings.last_done.is_some());
    }

    #[test]
    fn output_rings_run_the_hook_before_they_return() {
        use std::sync::atomic::AtomicU64;
        let bell = Doorbell::new();
        // Counted without a hook.
        assert!(!bell.ring(&DOORBELL_OUTPUT.to_le_bytes()));
        let calls = Arc::new(AtomicU64::new(0));
        let seen = calls.clone();
        bell.set_output_hook(Some(Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        })));
        assert!(!bell.ring(&DOORBELL_OUTPUT.to_le_bytes()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Other values do not run it; a narrower write is not an output ring.
        bell.ring(&DOORBELL_DONE.to_le_bytes());
        bell.ring(&[3]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        bell.set_output_hook(None);
        bell.ring(&DOORBELL_OUTPUT.to_le_bytes());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(bell.rings().output, 3);
    }

    #[test]
    fn wait_until_wakes_on_ring_and_times_out() {
        let bell = Arc::new(Doorbell::new());
        let ringer = bell.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            ringer.ring(&DOORBELL_DONE.to_le_bytes());
        });
        let (rings, ok) = bell.wait_until(Duration::from_secs(10), |r| r.done > 0);
        assert!(ok);
        assert_eq!(rings.done, 1);
        thread.join().unwrap();
        let (_, ok) = bell.wait_until(Duration::from_millis(10), |r| r.done > 1);
        assert!(!ok);
    }
}
