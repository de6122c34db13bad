//! Rate limiters as Firecracker has them: two token buckets per device (bytes and operations),
//! each with a size, an optional one-time burst and a refill time. A device whose next request
//! does not fit stops taking requests and is woken by a timerfd when enough tokens have come
//! back — never by spinning.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::config::{RateLimiterConfig, TokenBucketConfig};

/// One bucket. The budget may go below zero: a request is let through whenever the budget is
/// positive, and its full cost is then paid back by waiting, so requests larger than the bucket
/// still progress at the configured average rate.
#[derive(Debug)]
pub struct TokenBucket {
    size: u64,
    refill_time: Duration,
    budget: i128,
    one_time_burst: u64,
    last_refill: Instant,
    /// Sub-token remainder of the last refill, in token-nanoseconds, so slow rates are exact.
    carry: u128,
}

impl TokenBucket {
    /// A full bucket, or `None` for a disabled one (size or refill time 0).
    pub fn new(config: &TokenBucketConfig) -> Option<TokenBucket> {
        if config.size == 0 || config.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            size: config.size,
            refill_time: Duration::from_millis(config.refill_time),
            budget: i128::from(config.size),
            one_time_burst: config.one_time_burst.unwrap_or(0),
            last_refill: Instant::now(),
            carry: 0,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        self.last_refill = now;
        let refill_ns = self.refill_time.as_nanos().max(1);
        let scaled = elapsed
            .saturating_mul(u128::from(self.size))
            .saturating_add(self.carry);
        let tokens = scaled / refill_ns;
        self.carry = scaled % refill_ns;
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = self
            .budget
            .saturating_add(tokens)
            .min(i128::from(self.size));
        if self.budget == i128::from(self.size) {
            self.carry = 0;
        }
    }

    /// How long until `tokens` may be taken; zero if now.
    fn wait_for(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now);
        if tokens <= self.one_time_burst || self.budget > 0 {
            return Duration::ZERO;
        }
        // Time for the budget to climb back above zero.
        let missing = u128::try_from(1 - self.budget).unwrap_or(u128::MAX);
        let ns = missing
            .saturating_mul(self.refill_time.as_nanos())
            .div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget = self.budget.saturating_sub(i128::from(tokens - from_burst));
    }
}

/// A timerfd whose reads never block. The event loop can still hold a readiness event for a
/// timer that was re-armed or disarmed since (setting a timer resets its expiry count), and a
/// blocking read would then stall every device on the loop until the new expiry, or forever.
pub fn nonblocking_timer() -> Result<TimerFd, vmm_sys_util::errno::Error> {
    let timer = TimerFd::new()?;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL only reads the status flags of a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(vmm_sys_util::errno::Error::last());
    }
    // SAFETY: F_SETFL only changes the status flags of a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(vmm_sys_util::errno::Error::last());
    }
    Ok(timer)
}

/// Why a rate limiter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the rate limiter's timer: {0}")]
pub struct RateLimiterError(#[from] vmm_sys_util::errno::Error);

/// A device's pair of buckets and the timer that wakes it when it was throttled.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter for `config` (`None` or empty buckets: unlimited).
    pub fn new(config: Option<&RateLimiterConfig>) -> Result<RateLimiter, RateLimiterError> {
        let mut limiter = RateLimiter {
            bandwidth: None,
            ops: None,
            timer: nonblocking_timer()?,
            blocked: false,
        };
        if let Some(config) = config {
            limiter.update(config);
        }
        Ok(limiter)
    }

    /// Applies new limits (PATCH after boot); buckets that are given start full.
    ///
    /// A device waiting for the timer is released: its wait was computed from the old
    /// buckets (a tiny old bucket's debt can mean days), and its next request is weighed
    /// against the new ones, which arm the timer again if they still say wait.
    pub fn update(&mut self, config: &RateLimiterConfig) {
        if let Some(bandwidth) = &config.bandwidth {
            self.bandwidth = TokenBucket::new(bandwidth);
        }
        if let Some(ops) = &config.ops {
            self.ops = TokenBucket::new(ops);
        }
        if self.blocked && (config.bandwidth.is_some() || config.ops.is_some()) {
            self.blocked = false;
            let _ = self.timer.clear();
        }
    }

    /// The timer to watch; when it fires call [`RateLimiter::on_timer`] and retry.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// Whether the device is waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes one operation of `bytes` if both buckets allow it; otherwise arms the timer and
    /// returns false (the caller must leave the request queued).
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let wait_bytes = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait = wait_bytes.max(wait_ops);
        if !wait.is_zero() {
            if let Err(e) = self.timer.reset(wait, None) {
                tracing::warn!("rate limiter timer failed, not throttling: {e}");
            } else {
                self.blocked = true;
                return false;
            }
        }
        if let Some(bucket) = self.bandwidth.as_mut() {
            bucket.take(bytes);
        }
        if let Some(bucket) = self.ops.as_mut() {
            bucket.take(1);
        }
        true
    }

    /// The timer fired: the device may try again. (A stale event, for a timer re-armed or
    /// disarmed since, finds nothing to read and returns at once.)
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: Option<u64>, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill_ms,
        }
    }

    #[test]
    fn a_stale_timer_event_after_the_limiter_is_removed_does_not_block() {
        let mut limiter = RateLimiter::new(Some(&RateLimiterConfig {
            bandwidth: Some(bucket(1000, None, 20)),
            ops: None,
        }))
        .expect("limiter");
        // A debt of 19 000 tokens at 50 per ms: the device waits 380 ms, far longer than a
        // preemption between the two calls could last.
        assert!(
            limiter.consume(20_000),
            "a full bucket lets one request through"
        );
        assert!(
            !limiter.consume(1000),
            "then the device waits for the timer"
        );
        // The timer expires, and before the event loop gets to it the limiter is removed
        // (PATCH), which disarms the timer: the loop then handles a stale event.
        std::thread::sleep(Duration::from_millis(600));
        limiter.update(&RateLimiterConfig {
            bandwidth: Some(bucket(0, None, 0)),
            ops: None,
        });
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            limiter.on_timer();
            let _ = done.send(limiter.consume(1 << 20));
        });
        assert_eq!(
            finished.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "on_timer returned at once and the device runs unlimited"
        );
    }

    #[test]
    fn raising_the_limit_releases_a_device_waiting_on_the_old_one() {
        // 1 byte per second: one large request leaves a debt of about 11 days.
        let mut limiter = RateLimiter::new(Some(&RateLimiterConfig {
            bandwidth: Some(bucket(1, None, 1000)),
            ops: None,
        }))
        .expect("limiter");
        assert!(limiter.consume(1_000_000));
        assert!(!limiter.consume(1), "the device waits for the old bucket");
        // PATCH: a generous limit. Its bucket starts full, so the device runs now, not
        // when the timer armed for the old debt fires.
        limiter.update(&RateLimiterConfig {
            bandwidth: Some(bucket(1 << 30, None, 100)),
            ops: None,
        });
        assert!(limiter.consume(4096), "the new limit is in force at once");
        // A limit that still says wait arms the timer again for its own wait (one operation
        // per hour, so the second one cannot be refilled in time however slow this thread).
        limiter.update(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1, None, 3_600_000)),
        });
        assert!(limiter.consume(1));
        assert!(!limiter.consume(1));
        assert!(limiter.is_blocked());
        assert!(limiter.timer().is_armed().expect("timer state"));
    }

    #[test]
    fn disabled_buckets_never_throttle() {
        let mut limiter = RateLimiter::new(Some(&RateLimiterConfig {
            bandwidth: Some(bucket(0, None, 100)),
            ops: Some(bucket(10, None, 0)),
        }))
        .expect("limiter");
        for _ in 0..1000 {
            assert!(limiter.consume(1 << 20));
        }
    }

    #[test]
    fn an_empty_bucket_blocks_until_refilled() {
        // 1000 tokens per hour: one token per 3.6 s, so no preemption of this thread between
        // the two calls can refill the token the second one needs.
        let mut limiter = RateLimiter::new(Some(&RateLimiterConfig {
            bandwidth: Some(bucket(1000, None, 3_600_000)),
            ops: None,
        }))
        .expect("limiter");
        assert!(limiter.consume(1000));
        assert!(!limiter.consume(1), "the bucket is empty");
        assert!(limiter.is_blocked());
        assert!(limiter.timer().is_armed().expect("timer state"));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_not_refilled() {
        let mut b = TokenBucket::new(&bucket(100, Some(500), 1000)).expect("bucket");
        let now = Instant::now();
        assert_eq!(b.wait_for(400, now), Duration::ZERO);
        b.take(400);
        assert_eq!(b.one_time_burst, 100);
        assert_eq!(b.budget, 100);
        b.take(300);
        assert_eq!(b.one_time_burst, 0);
        assert_eq!(b.budget, -100);
        // 101 tokens missing at 100 tokens/s: just over a second.
        let wait = b.wait_for(1, now);
        assert!(
            wait > Duration::from_millis(1000) && wait < Duration::from_millis(1020),
            "{wait:?}"
        );
    }

    #[test]
    fn refill_is_proportional_to_elapsed_time() {
        let mut b = TokenBucket::new(&bucket(1000, None, 1000)).expect("bucket");
        b.take(1000);
        let later = b.last_refill + Duration::from_millis(250);
        b.refill(later);
        assert_eq!(b.budget, 250);
    }
}
