//! Forwards the host's standard input to the guest's serial console.
//!
//! Lossless and bounded: at most one small chunk is held; while the UART's
//! FIFO is full the forwarder stops watching stdin and waits for the guest
//! to drain it.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::bus::lock;
use super::legacy::Serial;

/// Bytes read from stdin at a time; the UART FIFO holds 64.
const CHUNK: usize = 64;

/// The stdin → serial backend, run on the event loop.
#[derive(Debug)]
pub struct StdinForwarder {
    stdin: File,
    drained: EventFd,
    serial: Arc<Mutex<Serial>>,
    pending: Vec<u8>,
    watching: bool,
    closed: bool,
}

impl StdinForwarder {
    /// Forwards `stdin` into `serial`; `drained` must be the event the
    /// serial signals when its input FIFO empties.
    pub fn new(stdin: File, drained: EventFd, serial: Arc<Mutex<Serial>>) -> Self {
        StdinForwarder {
            stdin,
            drained,
            serial,
            pending: Vec::with_capacity(CHUNK),
            watching: false,
            closed: false,
        }
    }

    fn push_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..taken);
    }

    fn set_watching(&mut self, ops: &mut EventOps, watch: bool) {
        if self.closed || watch == self.watching {
            return;
        }
        let events = Events::new(&self.stdin, EventSet::IN);
        let result = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.watching = watch,
            // Regular files and /dev/null cannot be polled; there is then
            // simply no interactive input.
            Err(e) => {
                log::debug!("console input disabled: {e}");
                self.closed = true;
            }
        }
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; CHUNK];
        match self.stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                self.set_watching(ops, false);
                self.closed = true;
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.push_pending();
                if !self.pending.is_empty() {
                    self.set_watching(ops, false);
                }
            }
        }
    }
}

impl MutEventSubscriber for StdinForwarder {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::warn!("console input disabled: {e}");
            self.closed = true;
            return;
        }
        self.set_watching(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.push_pending();
            if self.pending.is_empty() {
                self.set_watching(ops, true);
            }
        } else if events.fd() == self.stdin.as_raw_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_stdin(ops);
            } else {
                self.set_watching(ops, false);
                self.closed = true;
            }
        }
    }
}
