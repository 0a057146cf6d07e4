//! The virtio-blk device on the event loop: woken by its queue's ioeventfd
//! when the guest posts requests, and by its rate limiter's timer when a
//! throttled request may go on.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;
use crate::devices::bus::lock;

/// Event tags on the event loop.
const QUEUE_EVENT: u32 = 0;
const LIMITER_EVENT: u32 = 1;

/// Runs a [`Block`] device on the event loop.
#[derive(Debug)]
pub struct BlockEvents {
    device: Arc<Mutex<Block>>,
    queue_fd: RawFd,
    limiter_fd: Option<RawFd>,
}

impl BlockEvents {
    /// The event-loop side of `device` (its rate limiter already set).
    pub fn new(device: Arc<Mutex<Block>>) -> Self {
        let (queue_fd, limiter_fd) = {
            let dev = lock(&device);
            (dev.queue_event.as_raw_fd(), dev.limiter.timer_fd())
        };
        BlockEvents {
            device,
            queue_fd,
            limiter_fd,
        }
    }
}

impl MutEventSubscriber for BlockEvents {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(
            self.queue_fd,
            QUEUE_EVENT,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: cannot watch the request queue: {e}");
        }
        if let Some(fd) = self.limiter_fd {
            if let Err(e) = ops.add(Events::with_data_raw(fd, LIMITER_EVENT, EventSet::IN)) {
                log::error!("virtio-blk: cannot watch the rate limiter: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut dev = lock(&self.device);
        match events.data() {
            LIMITER_EVENT => dev.limiter.timer_fired(),
            _ => {
                let _ = dev.queue_event.read();
            }
        }
        dev.process_queue();
    }
}
