//! Local rate limits (`mesh.io/rate-limit` on a DestinationRule): one token bucket per
//! destination Service on this node, shared by every connection, port and subset.
use std::{
    sync::Mutex,
    time::Instant,
};

use serde::Serialize;

use crate::config::RateLimit;

/// A token bucket: holds up to `burst` tokens, gains `per_second` each second, and every
/// admitted request takes one. Over `t` seconds it admits at most `burst + per_second * t`.
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    stamp: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        self.stamp = self.stamp.max(now);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketSnapshot {
    pub rate_per_second: f64,
    pub burst: u32,
    pub tokens: f64,
}

impl TokenBucket {
    /// Starts full.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket { state: Mutex::new(Bucket { limit, tokens: f64::from(limit.burst), stamp: now }) }
    }

    /// A new rate or burst; the tokens left carry over (capped at the new burst).
    pub fn set_limit(&self, limit: RateLimit, now: Instant) {
        let mut b = self.lock();
        if b.limit == limit {
            return;
        }
        b.refill(now);
        b.limit = limit;
        b.tokens = b.tokens.min(f64::from(limit.burst));
    }

    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    /// Takes a token if one is there.
    pub fn try_acquire_at(&self, now: Instant) -> bool {
        let mut b = self.lock();
        b.refill(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn snapshot(&self) -> BucketSnapshot {
        self.snapshot_at(Instant::now())
    }

    pub fn snapshot_at(&self, now: Instant) -> BucketSnapshot {
        let mut b = self.lock();
        b.refill(now);
        BucketSnapshot { rate_per_second: b.limit.per_second, burst: b.limit.burst, tokens: (b.tokens * 100.0).floor() / 100.0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admitted(bucket: &TokenBucket, start: Instant, offered_per_second: u32, seconds: u32) -> u32 {
        let step = Duration::from_secs(1) / offered_per_second;
        (0..offered_per_second * seconds).filter(|k| bucket.try_acquire_at(start + step * *k)).count() as u32
    }

    #[test]
    fn admits_rate_times_time_plus_burst() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(RateLimit { per_second: 50.0, burst: 10 }, t0);
        // 200/s offered for 3 s: 10 at once, then 50 a second.
        let n = admitted(&bucket, t0, 200, 3);
        assert!((158..=161).contains(&n), "{n}");
    }

    #[test]
    fn burst_is_spent_at_once_and_refills() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(RateLimit { per_second: 10.0, burst: 3 }, t0);
        assert_eq!((0..5).filter(|_| bucket.try_acquire_at(t0)).count(), 3);
        assert!(!bucket.try_acquire_at(t0 + Duration::from_millis(50)));
        assert!(bucket.try_acquire_at(t0 + Duration::from_millis(100)));
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.try_acquire_at(later)).count(), 3);
        assert_eq!(bucket.snapshot_at(later).tokens, 0.0);
    }

    #[test]
    fn a_new_limit_keeps_tokens_up_to_the_new_burst() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(RateLimit { per_second: 100.0, burst: 100 }, t0);
        bucket.set_limit(RateLimit { per_second: 1.0, burst: 2 }, t0);
        let s = bucket.snapshot_at(t0);
        assert_eq!((s.rate_per_second, s.burst, s.tokens), (1.0, 2, 2.0));
    }
}
