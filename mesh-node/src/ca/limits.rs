//! Per-caller request budgets of the CA: one token bucket per key (a peer IP before the caller
//! is authenticated, the node name after), so one node, or one source of junk, cannot take the
//! CA's time (TokenReviews, signatures) from the others.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Budgets and deadlines of certificate requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Sustained requests per second per node (and per peer address); 0 disables the limit.
    pub per_second: f64,
    /// Requests a node may make at once (a node starting asks once per identity).
    pub burst: u32,
    /// Longest time one request may take at the CA, TokenReview included.
    pub deadline: Duration,
}

impl Default for RequestLimits {
    fn default() -> RequestLimits {
        // A node renews each identity once per half lifetime (12 h by default): 5 per second
        // is far above any steady need, the burst covers a node starting with 100 identities,
        // and the deadline stays under the node's own 10 s request timeout.
        RequestLimits { per_second: 5.0, burst: 100, deadline: Duration::from_secs(8) }
    }
}

/// Buckets by key; idle full buckets are dropped when the map grows, so its size follows the
/// number of recently active callers.
pub(crate) struct KeyedLimiter {
    limits: RequestLimits,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    stamp: Instant,
}

/// Most buckets kept before idle ones are pruned.
const PRUNE_ABOVE: usize = 4096;

impl KeyedLimiter {
    pub(crate) fn new(limits: RequestLimits) -> KeyedLimiter {
        KeyedLimiter { limits, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `key`; `Err(wait)` says how long until one is available.
    pub(crate) fn acquire(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let l = self.limits;
        if l.per_second <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(l.burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= PRUNE_ABOVE && !buckets.contains_key(key) {
            buckets.retain(|_, b| refilled(b, l.per_second, burst, now) < burst);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket { tokens: burst, stamp: now });
        bucket.tokens = refilled(bucket, l.per_second, burst, now);
        bucket.stamp = bucket.stamp.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / l.per_second))
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn refilled(b: &Bucket, per_second: f64, burst: f64, now: Instant) -> f64 {
    (b.tokens + now.saturating_duration_since(b.stamp).as_secs_f64() * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_its_burst_then_its_rate() {
        let limiter = KeyedLimiter::new(RequestLimits { per_second: 2.0, burst: 3, deadline: Duration::from_secs(1) });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.acquire("node-a", t0).expect("within the burst");
        }
        let wait = limiter.acquire("node-a", t0).expect_err("burst spent");
        assert_eq!(wait, Duration::from_millis(500));
        limiter.acquire("node-b", t0).expect("another node has its own bucket");
        limiter.acquire("node-a", t0 + Duration::from_millis(500)).expect("refilled at 2 per second");
        limiter.acquire("node-a", t0 + Duration::from_millis(600)).expect_err("not yet");
    }

    #[test]
    fn zero_rate_disables_and_idle_buckets_are_pruned() {
        let off = KeyedLimiter::new(RequestLimits { per_second: 0.0, burst: 1, deadline: Duration::from_secs(1) });
        let t0 = Instant::now();
        for _ in 0..100 {
            off.acquire("x", t0).expect("no limit");
        }
        let limiter = KeyedLimiter::new(RequestLimits { per_second: 1000.0, burst: 1, deadline: Duration::from_secs(1) });
        for i in 0..PRUNE_ABOVE {
            limiter.acquire(&format!("10.0.{}.{}", i / 256, i % 256), t0).expect("first");
        }
        assert_eq!(limiter.len(), PRUNE_ABOVE);
        // A second later every bucket is full again: a new key prunes them.
        limiter.acquire("new", t0 + Duration::from_secs(1)).expect("new key");
        assert_eq!(limiter.len(), 1);
    }
}
