//! The server's clone slots, shared fairly between functions.
//!
//! At most `max_live` invocations run at once. Functions that ran or
//! asked for a slot within the last [`ACTIVE_WINDOW`] are *active*; each
//! active function's fair share is `max_live` divided among them (rounded
//! up). A function below its share gets a free slot at once. A function
//! at or over its share gets one only if enough stay free to bring every
//! other active function up to its share: a busy function cannot take the
//! slots another active function is about to need between two of its
//! requests. Among waiters, a slot goes to the function running the
//! fewest (the oldest such waiter first): max-min fairness. Alone, a
//! function may use every slot. Nothing is preempted: a slot is freed only
//! by the invocation holding it, so a function that becomes active while
//! another holds every slot waits for the next to free (and gets it).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How long after its last request or invocation a function still counts
/// as active (is owed its share).
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(1);

/// How often a waiter looks again whether it may take a free slot (a
/// function's activity may have lapsed meanwhile).
const RECHECK: Duration = Duration::from_millis(50);

/// The slots were closed (the server shuts down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no more slots: shutting down")]
pub struct Closed;

#[derive(Debug)]
struct Waiter {
    function: usize,
    grant: oneshot::Sender<FairSlot>,
}

#[derive(Debug, Default)]
struct State {
    free: usize,
    closed: bool,
    /// Slots held, by function (entries at zero are removed).
    running: HashMap<usize, usize>,
    /// When each function last asked for, held or gave back a slot.
    seen: HashMap<usize, Instant>,
    /// In arrival order.
    waiters: VecDeque<Waiter>,
}

impl State {
    fn running(&self, function: usize) -> usize {
        self.running.get(&function).copied().unwrap_or(0)
    }

    /// Functions active at `now`: running, waiting or seen lately.
    fn active(&self, now: Instant) -> Vec<usize> {
        let mut active: Vec<usize> = self
            .seen
            .iter()
            .filter(|(f, at)| {
                self.running.contains_key(f) || now.saturating_duration_since(**at) < ACTIVE_WINDOW
            })
            .map(|(f, _)| *f)
            .collect();
        for waiter in &self.waiters {
            if !active.contains(&waiter.function) {
                active.push(waiter.function);
            }
        }
        active
    }

    /// Whether `function` may take a free slot now (see the module docs).
    fn may_take(&self, function: usize, max_live: usize, now: Instant) -> bool {
        if self.free == 0 {
            return false;
        }
        let active = self.active(now);
        let share = max_live.div_ceil(active.len().max(1));
        if self.running(function) < share {
            return true;
        }
        let owed: usize = active
            .iter()
            .filter(|f| **f != function)
            .map(|f| share.saturating_sub(self.running(*f)))
            .sum();
        self.free > owed
    }

    /// Drops the waiters whose caller left the queue (a timeout, a client
    /// that went away): while no slot frees, nothing else would, and each
    /// would count its function active and keep the fast path shut.
    fn forget_gone_waiters(&mut self) {
        self.waiters.retain(|w| !w.grant.is_closed());
    }

    fn forget_idle(&mut self, now: Instant) {
        let running = &self.running;
        self.seen.retain(|f, at| {
            running.contains_key(f) || now.saturating_duration_since(*at) < ACTIVE_WINDOW
        });
    }
}

/// `max_live` slots shared by functions (see the module docs).
#[derive(Debug)]
pub struct FairSlots {
    max_live: usize,
    state: Mutex<State>,
}

/// One slot, held by one invocation of one function; dropping it frees the
/// slot for the fairest waiter.
#[derive(Debug)]
pub struct FairSlot {
    slots: Arc<FairSlots>,
    function: usize,
    /// False for a slot that was handed to a waiter that had gone: its
    /// count was taken back already.
    held: bool,
}

impl FairSlots {
    /// `max_live` free slots.
    pub fn new(max_live: usize) -> Arc<Self> {
        Arc::new(FairSlots {
            max_live,
            state: Mutex::new(State {
                free: max_live,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for an invocation of `function` (any stable number naming
    /// it), now or when it is this caller's turn. Dropping the future
    /// leaves the queue.
    pub async fn acquire(self: &Arc<Self>, function: usize) -> Result<FairSlot, Closed> {
        let mut waiting = {
            let mut state = self.lock();
            if state.closed {
                return Err(Closed);
            }
            let now = Instant::now();
            state.seen.insert(function, now);
            state.forget_gone_waiters();
            if state.waiters.is_empty() && state.may_take(function, self.max_live, now) {
                return Ok(self.take(&mut state, function));
            }
            let (grant, waiting) = oneshot::channel();
            state.waiters.push_back(Waiter { function, grant });
            self.dispatch(&mut state);
            waiting
        };
        // A grant dropped unreceived (this future dropped first) frees its
        // slot again through FairSlot's Drop.
        loop {
            tokio::select! {
                granted = &mut waiting => return granted.map_err(|_| Closed),
                () = tokio::time::sleep(RECHECK) => {
                    let mut state = self.lock();
                    state.seen.insert(function, Instant::now());
                    self.dispatch(&mut state);
                }
            }
        }
    }

    /// A slot now, if this function may take one (never waits).
    pub fn try_acquire(self: &Arc<Self>, function: usize) -> Result<Option<FairSlot>, Closed> {
        let mut state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        let now = Instant::now();
        state.seen.insert(function, now);
        state.forget_gone_waiters();
        if state.waiters.is_empty() && state.may_take(function, self.max_live, now) {
            return Ok(Some(self.take(&mut state, function)));
        }
        Ok(None)
    }

    fn take(self: &Arc<Self>, state: &mut State, function: usize) -> FairSlot {
        state.free -= 1;
        *state.running.entry(function).or_default() += 1;
        FairSlot {
            slots: Arc::clone(self),
            function,
            held: true,
        }
    }

    /// Hands free slots to the waiters that may take them, those of the
    /// functions running the fewest first.
    fn dispatch(self: &Arc<Self>, state: &mut State) {
        let now = Instant::now();
        state.forget_idle(now);
        state.forget_gone_waiters();
        while state.free > 0 {
            let next = state
                .waiters
                .iter()
                .enumerate()
                .filter(|(_, w)| state.may_take(w.function, self.max_live, now))
                .min_by_key(|(at, w)| (state.running(w.function), *at))
                .map(|(at, _)| at);
            let Some(waiter) = next.and_then(|at| state.waiters.remove(at)) else {
                return;
            };
            let slot = self.take(state, waiter.function);
            if let Err(mut unwanted) = waiter.grant.send(slot) {
                // Its caller left the queue: take the slot back here,
                // under the lock, and try the next waiter.
                unwanted.held = false;
                Self::give_back(state, unwanted.function);
            }
        }
    }

    fn give_back(state: &mut State, function: usize) {
        state.free += 1;
        if let Some(n) = state.running.get_mut(&function) {
            *n -= 1;
            if *n == 0 {
                state.running.remove(&function);
            }
        }
    }

    /// Slots held now.
    pub fn live(&self) -> usize {
        self.max_live - self.lock().free
    }

    /// Refuses every waiter and every later request.
    pub fn close(&self) {
        let waiters = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.waiters)
        };
        // Dropped outside the lock: their receivers see the close.
        drop(waiters);
    }

    /// Whether [`FairSlots::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// `function` gave a slot back.
    fn release(self: &Arc<Self>, function: usize) {
        let mut state = self.lock();
        Self::give_back(&mut state, function);
        state.seen.insert(function, Instant::now());
        self.dispatch(&mut state);
    }
}

impl Drop for FairSlot {
    fn drop(&mut self) {
        if self.held {
            self.slots.release(self.function);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_freed_slot_goes_to_the_function_running_fewest() {
        block_on(async {
            let slots = FairSlots::new(3);
            let (busy, other) = (1, 2);
            let held: Vec<FairSlot> = vec![
                slots.acquire(busy).await.unwrap(),
                slots.acquire(busy).await.unwrap(),
                slots.acquire(busy).await.unwrap(),
            ];
            assert_eq!(slots.live(), 3);
            assert!(slots.try_acquire(other).unwrap().is_none());
            // The busy function queues first, the other after it...
            let busy_waiter = tokio::spawn({
                let slots = slots.clone();
                async move { slots.acquire(busy).await.map(|s| s.function) }
            });
            tokio::task::yield_now().await;
            let other_waiter = tokio::spawn({
                let slots = slots.clone();
                async move { slots.acquire(other).await.map(|s| s.function) }
            });
            tokio::task::yield_now().await;
            assert_eq!(slots.lock().waiters.len(), 2);
            // ...but the first slot freed goes to the other (running none).
            let mut held = held;
            drop(held.pop());
            assert_eq!(other_waiter.await.unwrap(), Ok(other));
            drop(held.pop());
            assert_eq!(busy_waiter.await.unwrap(), Ok(busy));
            drop(held);
            assert_eq!(slots.live(), 0);
        });
    }

    #[test]
    fn an_active_functions_share_is_kept_for_it_between_its_requests() {
        let slots = FairSlots::new(4);
        let (busy, hot) = (1, 2);
        // The hot function ran a moment ago and runs nothing now.
        drop(slots.try_acquire(hot).unwrap().expect("a free slot"));
        let mut held: Vec<FairSlot> = (0..2)
            .map(|_| slots.try_acquire(busy).unwrap().expect("within its share"))
            .collect();
        assert!(
            slots.try_acquire(busy).unwrap().is_none(),
            "over its share: the hot function's two stay free"
        );
        let hot_slots: Vec<FairSlot> = (0..2)
            .map(|_| slots.try_acquire(hot).unwrap().expect("its share"))
            .collect();
        assert_eq!(slots.live(), 4);
        drop(hot_slots);
        // Once the hot function's activity lapses, the busy one may use
        // every slot.
        std::thread::sleep(ACTIVE_WINDOW + Duration::from_millis(100));
        held.push(slots.try_acquire(busy).unwrap().expect("alone now"));
        held.push(slots.try_acquire(busy).unwrap().expect("alone now"));
        assert_eq!(slots.live(), 4);
        drop(held);
        assert_eq!(slots.live(), 0);
    }

    #[test]
    fn waiters_that_leave_lose_nothing_and_close_refuses_all() {
        block_on(async {
            let slots = FairSlots::new(1);
            let held = slots.acquire(7).await.unwrap();
            // A waiter that gives up (a queue timeout) leaves no slot taken.
            let gave_up = tokio::time::timeout(Duration::from_millis(20), slots.acquire(8)).await;
            assert!(gave_up.is_err());
            drop(held);
            assert_eq!(
                slots.live(),
                0,
                "the slot is free, not granted to the gone waiter"
            );
            let held = slots.acquire(8).await.unwrap();
            let waiter = tokio::spawn({
                let slots = slots.clone();
                async move { slots.acquire(9).await.map(|_| ()) }
            });
            tokio::task::yield_now().await;
            slots.close();
            assert_eq!(waiter.await.unwrap(), Err(Closed));
            assert!(matches!(slots.try_acquire(9), Err(Closed)));
            drop(held);
            assert_eq!(slots.live(), 0);
        });
    }

    #[test]
    fn waiters_that_leave_while_no_slot_frees_are_forgotten() {
        block_on(async {
            let slots = FairSlots::new(1);
            let held = slots.acquire(0).await.unwrap();
            // Clients that queue and go away at once, while the only slot
            // stays held: none of them may stay in the queue.
            for i in 0..500 {
                let gone = tokio::time::timeout(Duration::ZERO, slots.acquire(1 + i % 3)).await;
                assert!(gone.is_err());
            }
            assert!(
                slots.lock().waiters.len() <= 1,
                "{} waiters kept for callers that left",
                slots.lock().waiters.len()
            );
            // Nor does one left behind keep the fast path from a free slot.
            drop(held);
            assert!(slots.try_acquire(9).unwrap().is_some());
        });
    }

    #[test]
    fn grants_racing_callers_that_leave_lose_no_slot() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let slots = FairSlots::new(3);
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..400u64 {
                let slots = slots.clone();
                tasks.push(tokio::spawn(async move {
                    // Callers give up after 0 to 2 ms: some while a grant
                    // is on its way to them.
                    let patience = Duration::from_micros(i * 37 % 2000);
                    if let Ok(Ok(slot)) =
                        tokio::time::timeout(patience, slots.acquire((i % 5) as usize)).await
                    {
                        tokio::time::sleep(Duration::from_micros(i * 13 % 500)).await;
                        drop(slot);
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        });
        assert_eq!(slots.live(), 0);
        let state = slots.lock();
        assert!(state.running.is_empty(), "{:?}", state.running);
        assert!(state.waiters.is_empty(), "{}", state.waiters.len());
    }

    #[test]
    fn equal_functions_are_served_in_arrival_order() {
        block_on(async {
            let slots = FairSlots::new(1);
            let held = slots.acquire(0).await.unwrap();
            let mut waiters = Vec::new();
            for function in [5, 6, 7] {
                let slots = slots.clone();
                waiters.push(tokio::spawn(async move {
                    slots.acquire(function).await.map(|s| {
                        let f = s.function;
                        drop(s);
                        f
                    })
                }));
                tokio::task::yield_now().await;
            }
            drop(held);
            let mut order = Vec::new();
            for waiter in waiters {
                order.push(waiter.await.unwrap().unwrap());
            }
            assert_eq!(order, [5, 6, 7]);
        });
    }
}
