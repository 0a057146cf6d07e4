//! The thread that runs device backends: one epoll loop (event-manager)
//! for every fd a device waits on, so vCPU threads never block on I/O.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{Filter, FilterVerdict, SeccompError};

/// A backend that can run on the event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the loop so it notices it must stop.
#[derive(Debug)]
struct StopListener {
    event: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            log::error!("event loop cannot watch its stop event: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A running event loop thread.
#[derive(Debug)]
pub struct EventLoop {
    stop_event: EventFd,
    thread: Option<JoinHandle<()>>,
    /// seccomp: the thread's verdict on its filter, until collected (in a
    /// mutex only so that the handle is `Sync`).
    installed: Option<FilterVerdict>,
}

impl EventLoop {
    /// Starts the loop with `subscribers` registered. With a `seccomp`
    /// filter (one of the event-loop filters), the thread installs it
    /// before it handles any event
    /// (it never serves a device unfiltered); [`EventLoop::started`] says
    /// whether it could.
    pub fn start(
        subscribers: Vec<Subscriber>,
        seccomp: Option<Filter>,
    ) -> Result<Self, EventLoopError> {
        // seccomp: compiled (once per process) before the thread starts,
        // installed by the thread before its first event.
        let (filter, installed) = seccomp
            .map(Filter::for_thread)
            .transpose()
            .map_err(EventLoopError::Seccomp)?
            .unzip();
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Create)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_event = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?;
        manager.add_subscriber(Arc::new(Mutex::new(StopListener {
            event: stop_event.try_clone().map_err(EventLoopError::EventFd)?,
            stop: stop.clone(),
        })));
        for subscriber in subscribers {
            manager.add_subscriber(subscriber);
        }
        let thread = std::thread::Builder::new()
            .name("ember-events".into())
            .spawn(move || {
                if filter.is_some_and(|f| !f.install()) {
                    return;
                }
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        log::error!("event loop: {e}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoop {
            stop_event,
            thread: Some(thread),
            installed,
        })
    }

    /// Waits until the thread installed its seccomp filter (if it was to):
    /// an error means it did not and ended without handling any event.
    pub fn started(&mut self) -> Result<(), EventLoopError> {
        match self.installed.take().map(FilterVerdict::wait) {
            None => Ok(()),
            Some(Some(result)) => result.map_err(EventLoopError::Seccomp),
            Some(None) => Err(EventLoopError::Spawn(std::io::Error::other(
                "the event loop thread ended before it ran",
            ))),
        }
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop_event.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The event loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll could not be created.
    #[error("cannot create the event loop: {0}")]
    Create(event_manager::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the event loop thread: {0}")]
    Spawn(std::io::Error),
    /// The event-loop seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(SeccompError),
}
