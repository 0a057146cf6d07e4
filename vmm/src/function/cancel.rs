//! Cancelling an invocation from another thread (its caller went away).
//!
//! The invoking thread waits on one thing at a time: the doorbell (hot
//! path), the agent's socket (vsock path) or a jailed worker's control
//! socket. While it waits there it registers how to interrupt that wait
//! ([`InvocationCancel::on_cancel`]); [`InvocationCancel::cancel`] runs it,
//! and the invocation ends with [`super::FunctionError::Cancelled`]: an
//! in-process clone is stopped, a worker is killed, and neither is reused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

type Interrupt = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct State {
    cancelled: AtomicBool,
    next_id: AtomicU64,
    interrupts: Mutex<Vec<(u64, Interrupt)>>,
}

/// A handle that cancels one invocation ([`super::FunctionInvokeOptions::cancel`]);
/// clones share it.
#[derive(Clone, Default)]
pub struct InvocationCancel(Arc<State>);

impl std::fmt::Debug for InvocationCancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvocationCancel")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl InvocationCancel {
    /// A handle nobody cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    fn interrupts(&self) -> MutexGuard<'_, Vec<(u64, Interrupt)>> {
        self.0
            .interrupts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Cancels the invocation: whatever it waits on is interrupted now;
    /// anything it would wait on later is not waited for.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let interrupts: Vec<Interrupt> = self.interrupts().iter().map(|(_, f)| f.clone()).collect();
        for interrupt in interrupts {
            interrupt();
        }
    }

    /// Whether [`InvocationCancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Runs `interrupt` when the invocation is cancelled while the returned
    /// guard lives (at once if it was cancelled already).
    pub(crate) fn on_cancel(&self, interrupt: impl Fn() + Send + Sync + 'static) -> Registered {
        let id = self.0.next_id.fetch_add(1, Ordering::SeqCst);
        let interrupt: Interrupt = Arc::new(interrupt);
        self.interrupts().push((id, interrupt.clone()));
        // Cancelled before it was registered: cancel() may not have seen it.
        if self.is_cancelled() {
            interrupt();
        }
        Registered {
            cancel: self.clone(),
            id,
        }
    }
}

/// Keeps an interrupt registered; dropping it unregisters it.
#[must_use = "the interrupt is unregistered when this is dropped"]
pub(crate) struct Registered {
    cancel: InvocationCancel,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.cancel.interrupts().retain(|(id, _)| *id != self.id);
    }
}

/// Registers `interrupt` with `cancel`, if there is one.
pub(crate) fn interrupt_on(
    cancel: Option<&InvocationCancel>,
    interrupt: impl Fn() + Send + Sync + 'static,
) -> Option<Registered> {
    cancel.map(|c| c.on_cancel(interrupt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn cancel_runs_what_is_registered_now_and_later() {
        let cancel = InvocationCancel::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        let guard = cancel.on_cancel(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let counter = runs.clone();
        drop(cancel.on_cancel(move || {
            counter.fetch_add(100, Ordering::SeqCst);
        }));
        assert!(!cancel.is_cancelled());
        cancel.clone().cancel();
        assert!(cancel.is_cancelled());
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "only what is still registered"
        );
        drop(guard);
        let counter = runs.clone();
        let _late = cancel.on_cancel(move || {
            counter.fetch_add(10, Ordering::SeqCst);
        });
        assert_eq!(
            runs.load(Ordering::SeqCst),
            11,
            "registered after the cancel: run at once"
        );
        assert!(interrupt_on(None, || {}).is_none());
    }
}
