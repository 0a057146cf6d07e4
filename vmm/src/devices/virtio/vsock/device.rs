//! The virtio-vsock device model: its queues, and how packets move
//! between them and the muxer.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{VsockBackend, VsockHub};
use super::muxer::Muxer;
use super::packet::{Header, EVENT_TRANSPORT_RESET};
use crate::devices::bus::lock;
use crate::devices::rate_limiter::{RateLimiter, TokenKind};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, INT_VRING,
    VIRTIO_F_VERSION_1,
};

/// The virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The guest's context ID unless configured otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Largest packet payload accepted or produced (Linux uses 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
pub(super) const EVENT_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];

/// Tells waiters when the device has no connection left.
#[derive(Debug, Default)]
pub struct IdleSignal {
    idle: Mutex<bool>,
    cond: std::sync::Condvar,
}

impl IdleSignal {
    pub(super) fn set(&self, idle: bool) {
        let mut state = lock(&self.idle);
        if *state != idle {
            *state = idle;
            self.cond.notify_all();
        }
    }

    /// Waits until no connection is open, at most `timeout`; returns whether
    /// that happened.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let idle = lock(&self.idle);
        let (idle, _) = self
            .cond
            .wait_timeout_while(idle, timeout, |idle| !*idle)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *idle
    }
}

/// The vsock device model.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    acked_features: u64,
    interrupt: Arc<Interrupt>,
    pub(super) queue_events: Vec<EventFd>,
    pub(super) hub: Arc<VsockHub>,
    pub(super) muxer: Muxer,
    active: Option<(GuestMemoryMmap, Vec<Queue>)>,
    /// Reused buffers, so the data path does not allocate per packet.
    scratch: Vec<u8>,
    pub(super) idle: Arc<IdleSignal>,
    /// A transport reset was sent and the guest has not yet handed the
    /// event buffer back: until it does, it may still reset any connection,
    /// so nothing new is offered to it.
    pub(super) reset_pending: bool,
    /// A restored clone's transport reset waits for the host's first
    /// connection: a clone that never talks over vsock (a hot-path function
    /// invocation) then takes no interrupt for it.
    pub(super) reset_deferred: bool,
    /// Guest-to-host payload bytes.
    pub(super) tx_limiter: RateLimiter,
    /// Host-to-guest payload bytes.
    pub(super) rx_limiter: RateLimiter,
}

impl Vsock {
    /// A device for a guest with context ID `cid`, interrupting through
    /// `interrupt`, with `backend` for guest-initiated connections and
    /// `hub` delivering host-initiated ones.
    pub fn new(
        cid: u64,
        interrupt: Arc<Interrupt>,
        backend: Box<dyn VsockBackend>,
        hub: Arc<VsockHub>,
    ) -> std::io::Result<Self> {
        let queue_events = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Vsock {
            cid,
            acked_features: 0,
            interrupt,
            queue_events,
            hub,
            muxer: Muxer::new(cid, backend),
            active: None,
            scratch: vec![0u8; MAX_PKT_DATA as usize],
            idle: Arc::new(IdleSignal {
                idle: Mutex::new(true),
                cond: std::sync::Condvar::new(),
            }),
            reset_pending: false,
            reset_deferred: false,
            tx_limiter: RateLimiter::unlimited(),
            rx_limiter: RateLimiter::unlimited(),
        })
    }

    /// Limits the payload bytes the guest sends (`tx`) and receives
    /// (`rx`); unlimited by default. Set before the device's
    /// [`super::VsockEvents`] is made, which watches the limiters' timers.
    pub fn set_rate_limiters(&mut self, tx: RateLimiter, rx: RateLimiter) {
        self.tx_limiter = tx;
        self.rx_limiter = rx;
    }

    /// Signals when the last connection closes (to quiesce before a
    /// snapshot).
    pub fn idle_signal(&self) -> Arc<IdleSignal> {
        self.idle.clone()
    }

    /// The guest's context ID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The ioeventfds the guest's queue notifications should trigger, in
    /// queue order (register each with KVM at the notify register, with
    /// the queue index as datamatch).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Drops every connection and tells the guest to do the same (after a
    /// snapshot restore, connections the guest remembers no longer exist).
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset();
        let Some((mem, queues)) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = queues.get_mut(EVENT_QUEUE) else {
            return;
        };
        let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
            log::warn!("vsock: no event buffer for the transport reset");
            return;
        };
        let head = chain.head_index();
        let written = chain
            .writable()
            .next()
            .filter(|d| d.len() >= 4)
            .and_then(|d| mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr()).ok())
            .map_or(0, |()| 4);
        if queue.add_used(&*mem, head, written).is_ok() {
            // Linux re-posts the buffer and notifies the event queue only
            // after it has reset its sockets.
            self.reset_pending = true;
            self.interrupt.trigger(INT_VRING);
        }
    }

    /// Like [`Vsock::send_transport_reset`], but the guest is told only when
    /// the host first connects to it (nothing the guest sends before that is
    /// answered but with resets: its connections are gone).
    pub fn defer_transport_reset(&mut self) {
        self.muxer.reset();
        self.reset_deferred = true;
    }

    /// Takes packets from the transmit queue while the muxer accepts them.
    pub(super) fn process_tx(&mut self) {
        let Some((mem, queues)) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = queues.get_mut(TX_QUEUE) else {
            return;
        };
        let mut used = false;
        while !self.muxer.tx_blocked() && !self.tx_limiter.is_blocked() {
            let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = header_of(&pkt);
                    if !self
                        .tx_limiter
                        .consume(u64::from(hdr.len), TokenKind::Bytes)
                    {
                        // Left on the queue: the limiter's timer resumes it.
                        queue.go_to_previous_position();
                        break;
                    }
                    let data = match pkt.data_slice() {
                        Some(slice) if hdr.len > 0 => {
                            let len = (hdr.len as usize).min(slice.len()).min(self.scratch.len());
                            match slice.copy_to(&mut self.scratch[..len]) {
                                n if n == len => &self.scratch[..len],
                                _ => &[][..],
                            }
                        }
                        _ => &[][..],
                    };
                    if data.len() as u32 == hdr.len {
                        self.muxer.recv_from_guest(&hdr, data);
                    } else {
                        // A length that does not match its buffer: refuse
                        // the packet as a whole.
                        let mut bad = hdr;
                        bad.op = u16::MAX;
                        self.muxer.recv_from_guest(&bad, &[]);
                    }
                }
                Err(e) => log::debug!("vsock: malformed tx packet: {e}"),
            }
            if let Err(e) = queue.add_used(&*mem, head, 0) {
                log::warn!("vsock: tx used ring: {e}");
            }
            used = true;
        }
        if used {
            notify_if_needed(queue, mem, &self.interrupt);
        }
    }

    /// Fills receive buffers with whatever the muxer has for the guest.
    pub(super) fn process_rx(&mut self) {
        if self.reset_pending {
            return;
        }
        let Some((mem, queues)) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = queues.get_mut(RX_QUEUE) else {
            return;
        };
        let mut used = false;
        // The size of what comes from a host socket is known only once it
        // is read: charged afterwards, possibly into debt.
        while self.muxer.has_rx() && self.rx_limiter.may_transfer() {
            let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                // No buffers: resume when the guest posts some.
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => pkt,
                Err(e) => {
                    log::debug!("vsock: malformed rx buffer: {e}");
                    let _ = queue.add_used(&*mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let room = pkt
                .data_slice()
                .map_or(0, |s| s.len())
                .min(self.scratch.len());
            let Some((hdr, n)) = self.muxer.next_for_guest(&mut self.scratch[..room]) else {
                // Nothing after all (a socket had no data): give the
                // buffer back.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                break;
            };
            set_header(&mut pkt, &hdr);
            self.rx_limiter.charge_bytes(n as u64);
            if n > 0 {
                if let Some(slice) = pkt.data_slice() {
                    slice.copy_from(&self.scratch[..n]);
                }
            }
            let len = pkt.header_slice().len() as u32 + n as u32;
            if let Err(e) = queue.add_used(&*mem, head, len) {
                log::warn!("vsock: rx used ring: {e}");
            }
            used = true;
        }
        if used {
            notify_if_needed(queue, mem, &self.interrupt);
        }
    }
}

fn header_of<B: vm_memory::bitmap::BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
    Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    }
}

fn set_header<B: vm_memory::bitmap::BitmapSlice>(pkt: &mut VsockPacket<'_, B>, h: &Header) {
    pkt.set_src_cid(h.src_cid)
        .set_dst_cid(h.dst_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_len(h.len)
        .set_type(h.type_)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt);
}

fn notify_if_needed(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        // When in doubt, interrupt: a spurious interrupt is harmless.
        Ok(true) | Err(_) => interrupt.trigger(INT_VRING),
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("vsock: guest wrote read-only config at {offset:#x}");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if activation.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                got: activation.queues.len(),
                need: QUEUE_SIZES.len(),
            });
        }
        self.active = Some((activation.memory, activation.queues));
        // Host connections may have queued up before the driver was ready.
        let _ = self.hub.wake_event().write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.reset_pending = false;
        self.muxer.reset();
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|(_, queues)| queues.as_slice())
    }
}
