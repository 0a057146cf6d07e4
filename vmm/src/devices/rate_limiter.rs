//! Token-bucket rate limits on a device's guest I/O, after Firecracker's
//! rate limiters: a bandwidth bucket (bytes) and an operations bucket
//! (requests), each optional, each refilled continuously at `size` tokens
//! per `refill_time`, holding at most `size`, plus a `one_time_burst` that
//! is spent first and never refills.
//!
//! A device asks [`RateLimiter::consume`] before it serves a request. When
//! a bucket is short, the device leaves the request in its queue and the
//! limiter arms a timer for the moment the tokens will be there; the
//! timer's fd is on the device's event-loop subscriber, which resumes the
//! queue when it fires. Nothing spins and nothing sleeps on the event loop.
//!
//! A request larger than a bucket's `size` could never be served by a
//! plain bucket; it is let through once the bucket is full and leaves the
//! bucket in debt for the excess, so the long-run rate still holds.
//!
//! Limits are per device instance and not part of a snapshot: a restored
//! clone gets the limits its caller asks for, with full buckets.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// Longest refill time accepted: a day. Longer would be a rate of
/// practically nothing, most likely a unit mistake.
pub const MAX_REFILL_TIME_MS: u64 = 24 * 3600 * 1000;

/// One bucket's configuration. A bucket with `size` 0 does not limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full; also what it refills per
    /// `refill_time_ms`.
    pub size: u64,
    /// Extra tokens available once, at the start, spent before the bucket.
    pub one_time_burst: u64,
    /// Time to refill an empty bucket, in milliseconds.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// A bucket allowing `per_second` tokens each second (bursts up to one
    /// second's worth); 0 means unlimited.
    pub fn per_second(per_second: u64) -> Self {
        BucketConfig {
            size: per_second,
            one_time_burst: 0,
            refill_time_ms: 1000,
        }
    }

    /// Whether this bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.size > 0
    }

    /// Checks that a limiting bucket can refill.
    pub fn validate(&self, what: &'static str) -> Result<(), RateLimitError> {
        if self.is_limited() && !(1..=MAX_REFILL_TIME_MS).contains(&self.refill_time_ms) {
            return Err(RateLimitError::RefillTime {
                what,
                ms: self.refill_time_ms,
            });
        }
        Ok(())
    }
}

/// A device's limits: bandwidth and operations, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitConfig {
    /// Bytes.
    pub bandwidth: Option<BucketConfig>,
    /// Requests.
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// A bandwidth limit of `bytes_per_second` (0: unlimited).
    pub fn bandwidth(bytes_per_second: u64) -> Self {
        RateLimitConfig {
            bandwidth: Some(BucketConfig::per_second(bytes_per_second)).filter(|b| b.is_limited()),
            ops: None,
        }
    }

    /// Whether any bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.is_limited()) || self.ops.is_some_and(|b| b.is_limited())
    }

    /// Checks both buckets; `what` names the device in errors.
    pub fn validate(&self, what: &'static str) -> Result<(), RateLimitError> {
        if let Some(b) = &self.bandwidth {
            b.validate(what)?;
        }
        if let Some(b) = &self.ops {
            b.validate(what)?;
        }
        Ok(())
    }
}

/// The I/O limits of one sandbox. Default: unlimited.
///
/// Not saved in snapshots: each clone is given its own when it is restored
/// (its buckets start full).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    /// The root drive (virtio-blk): bytes read and requests.
    pub disk: RateLimitConfig,
    /// vsock payload bytes, each direction on its own bucket of this
    /// configuration (guest to host, host to guest); `ops` is not used.
    pub vsock: RateLimitConfig,
}

impl IoLimits {
    /// Checks every bucket.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        self.disk.validate("disk")?;
        if self.vsock.ops.is_some_and(|b| b.is_limited()) {
            return Err(RateLimitError::VsockOps);
        }
        self.vsock.validate("vsock")
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.disk.is_limited() || self.vsock.is_limited()
    }
}

/// A limit that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// A limiting bucket with a refill time out of range.
    #[error("{what} rate limit: the refill time must be between 1 and {MAX_REFILL_TIME_MS} ms, got {ms}")]
    RefillTime {
        /// Which device.
        what: &'static str,
        /// What was given.
        ms: u64,
    },
    /// vsock has no operations bucket.
    #[error("vsock rate limits are in bytes only: an operations limit is not supported")]
    VsockOps,
    /// The timer could not be created.
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(std::io::Error),
}

/// What a token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Bytes.
    Bytes,
    /// Requests.
    Ops,
}

/// A token bucket. Tokens are kept multiplied by the refill time in
/// nanoseconds, so refilling is exact integer arithmetic (no drift from
/// rounding however often it runs). Negative: debt from an over-size
/// request.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    one_time_burst: u64,
    refill_ns: u64,
    /// Tokens × `refill_ns`.
    scaled: i128,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` if `config` does not limit.
    pub fn new(config: &BucketConfig) -> Option<Self> {
        Self::new_at(config, Instant::now())
    }

    fn new_at(config: &BucketConfig, now: Instant) -> Option<Self> {
        if !config.is_limited() {
            return None;
        }
        let refill_ns = config.refill_time_ms.clamp(1, MAX_REFILL_TIME_MS) * 1_000_000;
        Some(TokenBucket {
            size: config.size,
            one_time_burst: config.one_time_burst,
            refill_ns,
            scaled: i128::from(config.size) * i128::from(refill_ns),
            last_update: now,
        })
    }

    fn full(&self) -> i128 {
        i128::from(self.size) * i128::from(self.refill_ns)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        self.last_update = now;
        // Capped at 30 years, so that times a u64 size fits an i128.
        let elapsed = elapsed.min(1 << 60) as i128;
        self.scaled = (self.scaled + elapsed * i128::from(self.size)).min(self.full());
    }

    /// Whole tokens available now (0 when in debt), burst included.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        let whole = (self.scaled / i128::from(self.refill_ns)).max(0);
        u64::try_from(whole)
            .unwrap_or(u64::MAX)
            .saturating_add(self.one_time_burst)
    }

    /// Takes `tokens` if there are enough (a request above `size` needs a
    /// full bucket and leaves debt); else takes nothing and returns how
    /// long until there will be.
    pub fn consume(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        let from_burst = tokens.min(self.one_time_burst);
        let rest = tokens - from_burst;
        if rest == 0 {
            self.one_time_burst -= from_burst;
            return Ok(());
        }
        self.refill(now);
        let needed = i128::from(rest.min(self.size)) * i128::from(self.refill_ns);
        if self.scaled >= needed {
            self.one_time_burst -= from_burst;
            self.scaled -= i128::from(rest) * i128::from(self.refill_ns);
            return Ok(());
        }
        Err(self.time_to(needed))
    }

    /// Takes `tokens` unconditionally, going into debt if need be (for
    /// I/O whose size is known only once it is done).
    pub fn charge(&mut self, tokens: u64, now: Instant) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.refill(now);
        self.scaled -= i128::from(tokens - from_burst) * i128::from(self.refill_ns);
    }

    /// Gives back `tokens` taken by a [`TokenBucket::consume`] whose
    /// request could not go ahead after all (never above a full bucket).
    pub fn replenish(&mut self, tokens: u64) {
        self.scaled =
            (self.scaled + i128::from(tokens) * i128::from(self.refill_ns)).min(self.full());
    }

    /// Whether the bucket has at least one token (or burst) left.
    pub fn has_tokens(&mut self, now: Instant) -> Result<(), Duration> {
        if self.one_time_burst > 0 {
            return Ok(());
        }
        self.refill(now);
        let one = i128::from(self.refill_ns);
        if self.scaled >= one {
            Ok(())
        } else {
            Err(self.time_to(one))
        }
    }

    /// Time until the bucket holds `scaled` (in scaled units).
    fn time_to(&self, scaled: i128) -> Duration {
        let missing = (scaled - self.scaled).max(0);
        let size = i128::from(self.size.max(1));
        // Rounded up, so the timer never fires a hair too early.
        let ns = (missing + size - 1) / size;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// A device's rate limiter: optional bandwidth and operations buckets and
/// the timer that wakes the device when a throttled request may go.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Present only when a bucket limits.
    timer: Option<TimerFd>,
    /// Whether the timer is armed (and the device is waiting for it).
    blocked: bool,
}

impl RateLimiter {
    /// A limiter for `config`. Without a limiting bucket it creates no
    /// timer and lets everything through.
    pub fn new(config: &RateLimitConfig) -> Result<Self, RateLimitError> {
        let now = Instant::now();
        let bandwidth = config
            .bandwidth
            .as_ref()
            .and_then(|c| TokenBucket::new_at(c, now));
        let ops = config
            .ops
            .as_ref()
            .and_then(|c| TokenBucket::new_at(c, now));
        let timer = if bandwidth.is_some() || ops.is_some() {
            Some(nonblocking_timer()?)
        } else {
            None
        };
        Ok(RateLimiter {
            bandwidth,
            ops,
            timer,
            blocked: false,
        })
    }

    /// A limiter that never limits.
    pub fn unlimited() -> Self {
        RateLimiter {
            bandwidth: None,
            ops: None,
            timer: None,
            blocked: false,
        }
    }

    /// The timer's fd, for the device's event-loop subscriber (none when
    /// nothing is limited).
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whether the device is waiting for the timer: it should not serve
    /// requests until [`RateLimiter::timer_fired`].
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes `tokens` of `kind`. On `false` the request must wait: the
    /// timer is armed for when the tokens will be there.
    pub fn consume(&mut self, tokens: u64, kind: TokenKind) -> bool {
        let now = Instant::now();
        let bucket = match kind {
            TokenKind::Bytes => self.bandwidth.as_mut(),
            TokenKind::Ops => self.ops.as_mut(),
        };
        let Some(bucket) = bucket else {
            return true;
        };
        match bucket.consume(tokens, now) {
            Ok(()) => true,
            Err(wait) => {
                self.arm(wait);
                false
            }
        }
    }

    /// Gives back `tokens` of `kind` from a [`RateLimiter::consume`] whose
    /// request could not go ahead (its other bucket was short).
    pub fn replenish(&mut self, tokens: u64, kind: TokenKind) {
        let bucket = match kind {
            TokenKind::Bytes => self.bandwidth.as_mut(),
            TokenKind::Ops => self.ops.as_mut(),
        };
        if let Some(bucket) = bucket {
            bucket.replenish(tokens);
        }
    }

    /// Whether I/O of a size known only afterwards may start: the byte
    /// bucket has a token. On `false` the timer is armed.
    pub fn may_transfer(&mut self) -> bool {
        if self.blocked {
            return false;
        }
        let Some(bucket) = self.bandwidth.as_mut() else {
            return true;
        };
        match bucket.has_tokens(Instant::now()) {
            Ok(()) => true,
            Err(wait) => {
                self.arm(wait);
                false
            }
        }
    }

    /// Charges `bytes` already transferred (see [`RateLimiter::may_transfer`]);
    /// may leave the bucket in debt.
    pub fn charge_bytes(&mut self, bytes: u64) {
        if let Some(bucket) = self.bandwidth.as_mut() {
            bucket.charge(bytes, Instant::now());
        }
    }

    /// Call when the timer's fd is readable: clears it and unblocks.
    pub fn timer_fired(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            // Non-blocking: a timer re-armed since it became readable has
            // nothing to read, which is fine.
            let _ = timer.wait();
        }
        self.blocked = false;
    }

    fn arm(&mut self, wait: Duration) {
        if self.blocked {
            return;
        }
        let Some(timer) = self.timer.as_mut() else {
            return;
        };
        // A zero duration would disarm the timer.
        let wait = wait.max(Duration::from_micros(100));
        match timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would wake the device: let the
            // request wait for the next guest notification instead.
            Err(e) => log::warn!("rate limiter: cannot arm its timer: {e}"),
        }
    }
}

fn nonblocking_timer() -> Result<TimerFd, RateLimitError> {
    let timer = TimerFd::new().map_err(|e| RateLimitError::Timer(e.into()))?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(RateLimitError::Timer(std::io::Error::last_os_error()));
    }
    Ok(timer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new_at(
            &BucketConfig {
                size,
                one_time_burst: burst,
                refill_time_ms: refill_ms,
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn zero_size_is_unlimited() {
        assert!(TokenBucket::new(&BucketConfig::per_second(0)).is_none());
        let config = RateLimitConfig::bandwidth(0);
        assert!(!config.is_limited());
        let mut limiter = RateLimiter::new(&config).unwrap();
        assert!(limiter.timer_fd().is_none());
        for _ in 0..1000 {
            assert!(limiter.consume(u64::MAX, TokenKind::Bytes));
            assert!(limiter.consume(1, TokenKind::Ops));
        }
        assert!(limiter.may_transfer());
        assert!(!limiter.is_blocked());
    }

    #[test]
    fn starts_full_and_refills_linearly() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.available(t0), 1000);
        assert_eq!(b.consume(1000, t0), Ok(()));
        assert_eq!(b.available(t0), 0);
        // 1000 tokens per second: one per millisecond.
        assert_eq!(b.consume(1, t0), Err(MS));
        assert_eq!(b.consume(250, t0), Err(250 * MS));
        assert_eq!(b.available(t0 + 100 * MS), 100);
        assert_eq!(b.consume(100, t0 + 100 * MS), Ok(()));
        // Never above the size, however long it rests.
        assert_eq!(b.available(t0 + 3600 * 1000 * MS), 1000);
    }

    #[test]
    fn refill_has_no_rounding_drift() {
        // 3 tokens per 1000 ms: a token every 333.33 ms; refilling every
        // millisecond must add up to exactly 3 per second.
        let t0 = Instant::now();
        let mut b = bucket(3, 0, 1000, t0);
        b.consume(3, t0).unwrap();
        let mut now = t0;
        for _ in 0..1000 {
            now += MS;
            let _ = b.available(now);
        }
        assert_eq!(b.available(now), 3);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refills() {
        let t0 = Instant::now();
        let mut b = bucket(100, 500, 1000, t0);
        assert_eq!(b.available(t0), 600);
        assert_eq!(b.consume(550, t0), Ok(()));
        // 500 from the burst, 50 from the bucket.
        assert_eq!(b.available(t0), 50);
        assert_eq!(b.available(t0 + 10_000 * MS), 100);
        assert_eq!(b.consume(100, t0 + 10_000 * MS), Ok(()));
        assert!(b.consume(1, t0 + 10_000 * MS).is_err());
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let t0 = Instant::now();
        let mut b = bucket(100, 10, 1000, t0);
        b.consume(100, t0).unwrap();
        // 10 from the burst would fit, 5 more from the empty bucket not.
        assert!(b.consume(15, t0).is_err());
        assert_eq!(b.available(t0), 10);
    }

    #[test]
    fn over_size_requests_wait_for_a_full_bucket_and_leave_debt() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        b.consume(1, t0).unwrap();
        // 3000 > size: needs a full bucket.
        assert_eq!(b.consume(3000, t0), Err(MS));
        assert_eq!(b.consume(3000, t0 + MS), Ok(()));
        // 2000 tokens of debt: a token is there again after 2001 ms.
        assert_eq!(b.has_tokens(t0 + MS), Err(2001 * MS));
        assert_eq!(b.available(t0 + 1000 * MS), 0);
        assert_eq!(b.has_tokens(t0 + 2002 * MS), Ok(()));
    }

    #[test]
    fn charge_may_go_into_debt() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        b.charge(1500, t0);
        assert_eq!(b.available(t0), 0);
        assert!(b.has_tokens(t0 + 500 * MS).is_err());
        assert_eq!(b.available(t0 + 600 * MS), 100);
    }

    #[test]
    fn replenish_undoes_a_consume() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        b.consume(600, t0).unwrap();
        b.replenish(600);
        assert_eq!(b.available(t0), 1000);
        b.replenish(600);
        assert_eq!(b.available(t0), 1000);
    }

    #[test]
    fn long_run_rate_is_the_configured_one() {
        // A greedy consumer of 64 KiB requests against 1 MiB/s for 10 s
        // (simulated) gets 10 MiB plus the initial bucket.
        let t0 = Instant::now();
        let mut b = bucket(1 << 20, 0, 1000, t0);
        let mut now = t0;
        let mut got = 0u64;
        while now <= t0 + 10_000 * MS {
            match b.consume(64 << 10, now) {
                Ok(()) => got += 64 << 10,
                Err(wait) => now += wait,
            }
        }
        assert_eq!(got, 11 << 20);
    }

    #[test]
    fn limiter_blocks_until_its_timer_fires() {
        let mut limiter = RateLimiter::new(&RateLimitConfig {
            bandwidth: Some(BucketConfig::per_second(1000)),
            ops: Some(BucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 20,
            }),
        })
        .unwrap();
        let fd = limiter.timer_fd().unwrap();
        assert!(limiter.consume(10, TokenKind::Bytes));
        assert!(limiter.consume(1, TokenKind::Ops));
        assert!(limiter.consume(1, TokenKind::Ops));
        assert!(!limiter.consume(1, TokenKind::Ops));
        assert!(limiter.is_blocked());
        // The timer fires about 10 ms later (one op per 10 ms).
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "the timer never fired");
        limiter.timer_fired();
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(1, TokenKind::Ops));
        // A second read of the drained timer does not block.
        limiter.timer_fired();
    }

    #[test]
    fn validation() {
        let mut limits = IoLimits::default();
        limits.validate().unwrap();
        assert!(!limits.is_limited());
        limits.disk = RateLimitConfig {
            bandwidth: Some(BucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 0,
            }),
            ops: None,
        };
        let err = limits.validate().unwrap_err();
        assert!(err.to_string().contains("disk rate limit"), "{err}");
        limits.disk = RateLimitConfig::bandwidth(1 << 20);
        limits.vsock.ops = Some(BucketConfig::per_second(5));
        assert!(matches!(limits.validate(), Err(RateLimitError::VsockOps)));
        limits.vsock = RateLimitConfig::bandwidth(1 << 20);
        limits.validate().unwrap();
        assert!(limits.is_limited());
    }
}
