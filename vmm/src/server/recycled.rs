//! The recycled clones a server keeps between a function's invocations.
//!
//! A function with a hot path is served from recycled clones
//! ([`RecycledFunction`]): each clone, in its own jailed worker unless the
//! server runs in-process, serves one invocation at a time and is reset
//! in place to its template after each, so an invocation pays neither a
//! restore nor a teardown. Between invocations a clone waits in its
//! function's idle list; an invocation takes the most recently used one
//! (its pages are the warmest) or makes one. A clone whose invocation
//! failed, timed out, took the vsock path or failed its reset is
//! destroyed, never reused; a clone never serves another function.
//!
//! Idle clones hold no invocation slot: `max_live` bounds the invocations
//! running at once (so one function's idle clones never keep another's
//! invocations waiting), `max_idle` the clones kept between invocations
//! over all functions (beyond it the least recently used goes), and a
//! clone idle for `idle_timeout` is destroyed, except a function's
//! `min_warm` most recent ones. Every clone, idle or running, holds its
//! [`Charge`] on the server's memory budget.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::devices::rate_limiter::IoLimits;
use crate::function::{
    Function, FunctionError, FunctionInvokeOptions, FunctionOutcome, RecycleOptions,
    RecycledFunction,
};
use crate::isolation::Isolation;
use crate::worker::recycled::JailedRecycledFunction;

use super::memory::Charge;

/// One recycled clone of one function: in a jailed worker, or in this
/// process.
#[derive(Debug)]
pub enum RecycledClone {
    /// The clone's VM runs in this process (trusted code only).
    InProcess(Box<RecycledFunction>),
    /// The clone's VM runs in a jailed worker of its own.
    Jailed(JailedRecycledFunction),
}

impl RecycledClone {
    /// Makes a clone of `function`: in a jailed worker unless `isolation`
    /// is `None`.
    pub fn make(
        function: &Arc<Function>,
        isolation: Option<&Isolation>,
        io_limits: IoLimits,
    ) -> Result<Self, FunctionError> {
        let options = RecycleOptions {
            io_limits,
            ..RecycleOptions::default()
        };
        Ok(match isolation {
            Some(isolation) => RecycledClone::Jailed(JailedRecycledFunction::new(
                function.clone(),
                &options,
                isolation,
            )?),
            None => RecycledClone::InProcess(Box::new(function.recycled(&options)?)),
        })
    }

    /// Runs one invocation; the clone is reset after it (see
    /// [`FunctionOutcome::recycle`]).
    pub fn invoke(
        &mut self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, FunctionError> {
        match self {
            RecycledClone::InProcess(clone) => clone.invoke(event, options),
            RecycledClone::Jailed(clone) => clone.invoke(event, options),
        }
    }

    /// Whether the clone can serve another invocation.
    pub fn is_usable(&self) -> bool {
        match self {
            RecycledClone::InProcess(clone) => clone.is_usable(),
            RecycledClone::Jailed(clone) => clone.is_usable(),
        }
    }
}

/// What an idle list holds: something that may or may not serve again.
pub trait Reusable {
    /// Whether it can serve another invocation.
    fn is_usable(&self) -> bool;
}

impl Reusable for RecycledClone {
    fn is_usable(&self) -> bool {
        RecycledClone::is_usable(self)
    }
}

/// A clone with the memory charged for it: the charge goes back when the
/// clone is destroyed.
#[derive(Debug)]
pub struct ChargedClone {
    /// The clone.
    pub clone: RecycledClone,
    /// Its share of the server's memory budget.
    pub charge: Charge,
}

impl Reusable for ChargedClone {
    fn is_usable(&self) -> bool {
        self.clone.is_usable()
    }
}

/// One idle clone and whose it is.
#[derive(Debug)]
struct Idle<C> {
    function: usize,
    clone: C,
    since: Instant,
}

/// The idle clones of every function of a set, oldest first.
#[derive(Debug)]
pub struct IdleClones<C = ChargedClone> {
    max_idle: usize,
    idle: Mutex<Vec<Idle<C>>>,
}

impl<C: Reusable> IdleClones<C> {
    /// Keeps at most `max_idle` clones.
    pub fn new(max_idle: usize) -> Self {
        IdleClones {
            max_idle,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle<C>>> {
        // A panic elsewhere while holding it leaves a list that is still
        // consistent (every change is one push or remove).
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle clone of function `function`, if any.
    pub fn take(&self, function: usize) -> Option<C> {
        let mut idle = self.lock();
        let at = idle.iter().rposition(|i| i.function == function)?;
        Some(idle.remove(at).clone)
    }

    /// Keeps `clone` of function `function` for a later invocation, if it
    /// can serve one; returns what must be destroyed (the clone itself,
    /// or the least recently used one it pushed out). The caller drops it
    /// outside any async context: ending a worker waits for it.
    #[must_use = "the returned clones are destroyed by dropping them"]
    pub fn put(&self, function: usize, clone: C) -> Vec<C> {
        if !clone.is_usable() || self.max_idle == 0 {
            return vec![clone];
        }
        let mut idle = self.lock();
        idle.push(Idle {
            function,
            clone,
            since: Instant::now(),
        });
        let over = idle.len().saturating_sub(self.max_idle);
        idle.drain(..over).map(|i| i.clone).collect()
    }

    /// Removes the clones idle for longer than `idle_timeout`, but not a
    /// function's `keep(function)` most recently used ones.
    #[must_use = "the returned clones are destroyed by dropping them"]
    pub fn expire(&self, idle_timeout: Duration, keep: impl Fn(usize) -> usize) -> Vec<C> {
        let mut idle = self.lock();
        let now = Instant::now();
        // Newest first, so each function's first `keep` are the ones kept.
        let mut kept: Vec<(usize, usize)> = Vec::new();
        let mut expired = Vec::new();
        for at in (0..idle.len()).rev() {
            let function = idle[at].function;
            let seen = match kept.iter_mut().find(|(f, _)| *f == function) {
                Some((_, n)) => n,
                None => {
                    kept.push((function, 0));
                    &mut kept.last_mut().expect("just pushed").1
                }
            };
            *seen += 1;
            if *seen > keep(function) && now.duration_since(idle[at].since) >= idle_timeout {
                expired.push(idle.remove(at).clone);
            }
        }
        expired
    }

    /// The least recently used idle clone of function `function`, if any.
    pub fn take_oldest_of(&self, function: usize) -> Option<C> {
        let mut idle = self.lock();
        let at = idle.iter().position(|i| i.function == function)?;
        Some(idle.remove(at).clone)
    }

    /// Removes the least recently used idle clone, of any function.
    pub fn take_oldest(&self) -> Option<C> {
        let mut idle = self.lock();
        (!idle.is_empty()).then(|| idle.remove(0).clone)
    }

    /// Removes every idle clone.
    #[must_use = "the returned clones are destroyed by dropping them"]
    pub fn take_all(&self) -> Vec<C> {
        self.lock().drain(..).map(|i| i.clone).collect()
    }

    /// Idle clones per function index (`functions` entries).
    pub fn counts(&self, functions: usize) -> Vec<usize> {
        let mut counts = vec![0; functions];
        for idle in self.lock().iter() {
            if let Some(count) = counts.get_mut(idle.function) {
                *count += 1;
            }
        }
        counts
    }

    /// Idle clones of function `function`.
    pub fn count(&self, function: usize) -> usize {
        self.lock()
            .iter()
            .filter(|i| i.function == function)
            .count()
    }

    /// Idle clones in all.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is idle.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Fake(&'static str, bool);

    impl Reusable for Fake {
        fn is_usable(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn the_most_recent_clone_of_the_function_is_taken() {
        let idle = IdleClones::new(8);
        assert!(idle.put(0, Fake("a0", true)).is_empty());
        assert!(idle.put(1, Fake("b0", true)).is_empty());
        assert!(idle.put(0, Fake("a1", true)).is_empty());
        assert_eq!(idle.counts(3), vec![2, 1, 0]);
        assert_eq!(idle.take(0), Some(Fake("a1", true)));
        assert_eq!(idle.take(0), Some(Fake("a0", true)));
        assert_eq!(idle.take(0), None);
        assert_eq!(idle.take(2), None);
        assert_eq!(idle.len(), 1);
    }

    #[test]
    fn unusable_clones_and_those_over_the_cap_are_handed_back() {
        let idle = IdleClones::new(2);
        assert_eq!(idle.put(0, Fake("dead", false)), vec![Fake("dead", false)]);
        assert!(idle.put(0, Fake("a", true)).is_empty());
        assert!(idle.put(1, Fake("b", true)).is_empty());
        // The least recently used goes, whoever's it is.
        assert_eq!(idle.put(1, Fake("c", true)), vec![Fake("a", true)]);
        assert_eq!(idle.counts(2), vec![0, 2]);
        let none = IdleClones::new(0);
        assert_eq!(none.put(0, Fake("x", true)), vec![Fake("x", true)]);
    }

    #[test]
    fn clones_idle_too_long_expire_oldest_first() {
        let idle = IdleClones::new(8);
        assert!(idle.put(0, Fake("old", true)).is_empty());
        std::thread::sleep(Duration::from_millis(60));
        assert!(idle.put(0, Fake("new", true)).is_empty());
        assert_eq!(
            idle.expire(Duration::from_millis(30), |_| 0),
            vec![Fake("old", true)]
        );
        assert_eq!(idle.expire(Duration::from_secs(60), |_| 0), vec![]);
        assert_eq!(idle.take_all(), vec![Fake("new", true)]);
        assert!(idle.is_empty());
    }

    #[test]
    fn a_functions_minimum_outlives_the_idle_timeout() {
        let idle = IdleClones::new(8);
        for clone in [Fake("a0", true), Fake("a1", true), Fake("a2", true)] {
            assert!(idle.put(0, clone).is_empty());
        }
        assert!(idle.put(1, Fake("b0", true)).is_empty());
        std::thread::sleep(Duration::from_millis(40));
        // Function 0 keeps its two most recent, function 1 its only one.
        assert_eq!(
            idle.expire(Duration::from_millis(30), |f| if f == 0 { 2 } else { 1 }),
            vec![Fake("a0", true)]
        );
        assert_eq!(idle.count(0), 2);
        assert_eq!(idle.count(1), 1);
        assert_eq!(idle.take_oldest_of(1), Some(Fake("b0", true)));
        assert_eq!(idle.take_oldest(), Some(Fake("a1", true)));
        assert_eq!(idle.expire(Duration::ZERO, |_| 0).len(), 1);
        assert_eq!(idle.take_oldest(), None);
    }
}
