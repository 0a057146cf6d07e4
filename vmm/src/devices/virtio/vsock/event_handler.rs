//! The vsock device on the event loop: woken by its queues' ioeventfds
//! when the guest posts buffers or packets, by host sockets
//! (edge-triggered) when they have data or room, by the hub for new
//! host-initiated connections, and by its rate limiters' timers.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Vsock, EVENT_QUEUE};
use crate::devices::bus::lock;

/// Event tags for the event loop (queue indices, then the hub).
const HUB_EVENT: u32 = 3;
const STREAM_EVENT: u32 = 4;
const TX_LIMITER_EVENT: u32 = 5;
const RX_LIMITER_EVENT: u32 = 6;

/// Runs a [`Vsock`] device on the event loop.
#[derive(Debug)]
pub struct VsockEvents {
    device: Arc<Mutex<Vsock>>,
    /// Raw fds of the queue events and the hub, captured at creation.
    queue_fds: Vec<RawFd>,
    hub_fd: RawFd,
    /// The rate limiters' timers, when limited.
    tx_limiter_fd: Option<RawFd>,
    rx_limiter_fd: Option<RawFd>,
}

impl VsockEvents {
    /// The event-loop side of `device` (its rate limiters already set).
    pub fn new(device: Arc<Mutex<Vsock>>) -> Self {
        let (queue_fds, hub_fd, tx_limiter_fd, rx_limiter_fd) = {
            let dev = lock(&device);
            (
                dev.queue_events.iter().map(AsRawFd::as_raw_fd).collect(),
                dev.hub.wake_event().as_raw_fd(),
                dev.tx_limiter.timer_fd(),
                dev.rx_limiter.timer_fd(),
            )
        };
        VsockEvents {
            device,
            queue_fds,
            hub_fd,
            tx_limiter_fd,
            rx_limiter_fd,
        }
    }
}

impl MutEventSubscriber for VsockEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, fd) in self.queue_fds.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data_raw(*fd, i as u32, EventSet::IN)) {
                log::error!("vsock: cannot watch queue {i}: {e}");
            }
        }
        if let Err(e) = ops.add(Events::with_data_raw(self.hub_fd, HUB_EVENT, EventSet::IN)) {
            log::error!("vsock: cannot watch the connection hub: {e}");
        }
        let limiters = [
            (self.tx_limiter_fd, TX_LIMITER_EVENT),
            (self.rx_limiter_fd, RX_LIMITER_EVENT),
        ];
        for (fd, tag) in limiters {
            let Some(fd) = fd else { continue };
            if let Err(e) = ops.add(Events::with_data_raw(fd, tag, EventSet::IN)) {
                log::error!("vsock: cannot watch a rate limiter: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut dev = lock(&self.device);
        match events.data() {
            tag @ 0..=2 => {
                if let Some(evt) = dev.queue_events.get(tag as usize) {
                    let _ = evt.read();
                }
                if tag as usize == EVENT_QUEUE {
                    dev.reset_pending = false;
                }
            }
            HUB_EVENT => {
                // Before the driver is up, the requests wait in the muxer.
                let connects = dev.hub.drain();
                if dev.reset_deferred && !connects.is_empty() {
                    dev.reset_deferred = false;
                    dev.send_transport_reset();
                }
                dev.muxer.connect_from_host(connects);
            }
            TX_LIMITER_EVENT => dev.tx_limiter.timer_fired(),
            RX_LIMITER_EVENT => dev.rx_limiter.timer_fired(),
            _ => {
                let set = events.event_set();
                let readable = set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
                let writable = set.intersects(EventSet::OUT | EventSet::ERROR);
                dev.muxer.host_event(events.fd(), readable, writable);
            }
        }
        dev.run_queues();
        dev.sync_registrations(ops);
        dev.idle.set(dev.muxer.connection_count() == 0);
    }
}

impl Vsock {
    /// Moves data both ways until neither side can progress.
    fn run_queues(&mut self) {
        loop {
            self.process_tx();
            let blocked = self.muxer.tx_blocked();
            self.process_rx();
            // Backpressure stopped the transmit side and the receive side
            // has since drained it: take more guest packets.
            if !blocked || self.muxer.tx_blocked() {
                break;
            }
        }
    }

    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for stream in self.muxer.take_closed() {
            // Deregister before the fd closes, so a new socket that reuses
            // the number is not mistaken for it.
            let _ = ops.remove(Events::empty(&stream));
        }
        for fd in self.muxer.take_added_fds() {
            let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, STREAM_EVENT, set)) {
                log::warn!("vsock: cannot watch a host socket: {e}");
            }
        }
    }
}
