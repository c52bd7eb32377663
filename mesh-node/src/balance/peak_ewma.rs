//! Latency-aware balancing as Linkerd's PeakEWMA: per endpoint a decaying peak of the observed
//! round-trip times, a cost of `estimate * (active + 1)`, and power of two choices on the cost.
//!
//! The estimate jumps to any sample above it (a slow endpoint is noticed at once) and otherwise
//! moves toward the samples with time constant [`DECAY`]. While an endpoint gets no samples its
//! estimate decays toward zero, so an endpoint that was slow is tried again after a while and
//! wins back its share once its answers are fast.
use std::time::{Duration, Instant};



/// Time constant of the decay (Linkerd's default).
pub(super) const DECAY: Duration = Duration::from_secs(10);

/// The estimate of an endpoint nothing has been measured on yet, when no other endpoint of
/// the cluster has a measurement either: low, so new endpoints are tried at once (the
/// `active + 1` factor still keeps them from being flooded).
pub(super) const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// One endpoint's estimate, in nanoseconds, as of `stamp`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Estimate {
    rtt_ns: f64,
    stamp: Instant,
}

impl Estimate {
    pub fn new(rtt: Duration, now: Instant) -> Self {
        Estimate { rtt_ns: rtt.as_nanos() as f64, stamp: now }
    }

    fn decay(elapsed: Duration) -> f64 {
        (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
    }

    /// The estimate at `now`, decayed toward zero since the last sample.
    pub fn current_ns(&self, now: Instant) -> f64 {
        self.rtt_ns * Self::decay(now.saturating_duration_since(self.stamp))
    }

    /// A new round-trip time: above the (decayed) estimate it becomes the estimate; below, the
    /// estimate moves toward it by the weight the time since the last sample gives it.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        let d = Self::decay(now.saturating_duration_since(self.stamp));
        let current = self.rtt_ns * d;
        self.rtt_ns = if rtt_ns >= current { rtt_ns } else { current + rtt_ns * (1.0 - d) };
        self.stamp = now;
    }
}

/// `estimate * (active + 1)`: an endpoint with requests in flight is expected to answer later.
pub(super) fn cost(estimate_ns: f64, active: u32) -> f64 {
    estimate_ns * (f64::from(active) + 1.0)
}

/// The median of the measured estimates: what an unmeasured endpoint starts from, so it gets
/// traffic as an average peer rather than as the best (flooded) or worst (starved) one.
pub(super) fn default_estimate_ns(measured: impl Iterator<Item = f64>) -> f64 {
    let mut all: Vec<f64> = measured.collect();
    if all.is_empty() {
        return DEFAULT_RTT.as_nanos() as f64;
    }
    all.sort_by(f64::total_cmp);
    all[all.len() / 2]
}

/// Two distinct random eligible hosts; the cheaper wins, ties at random.
pub(super) fn pick(hosts: usize, count: usize, eligible: impl Fn(usize) -> bool, cost: impl Fn(usize) -> f64) -> Option<usize> {
    super::least_request::power_of_two_choices(hosts, count, eligible, cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    #[test]
    fn jumps_to_peaks_and_decays_toward_faster_samples() {
        let t0 = Instant::now();
        let mut e = Estimate::new(Duration::from_millis(1), t0);
        e.observe(Duration::from_millis(30), t0 + Duration::from_millis(1));
        assert_eq!(e.current_ns(t0 + Duration::from_millis(1)), 30.0 * MS);
        // One time constant of fast samples later it is about 1/e of the way back... and more.
        let mut t = t0 + Duration::from_millis(1);
        for _ in 0..1000 {
            t += Duration::from_millis(10);
            e.observe(Duration::from_millis(1), t);
        }
        let now = e.current_ns(t);
        assert!(now < 12.0 * MS && now > 1.0 * MS, "{now}");
        // Idle, it decays toward zero: after 5 tau almost nothing is left.
        assert!(e.current_ns(t + DECAY * 5) < 0.1 * MS);
    }

    #[test]
    fn cost_counts_requests_in_flight() {
        assert_eq!(cost(2.0, 0), 2.0);
        assert_eq!(cost(2.0, 3), 8.0);
    }

    #[test]
    fn default_is_the_median_or_one_millisecond() {
        assert_eq!(default_estimate_ns([].into_iter()), 1.0 * MS);
        assert_eq!(default_estimate_ns([5.0, 1.0, 9.0].into_iter()), 5.0);
    }

    #[test]
    fn the_cheaper_of_two_always_wins() {
        for _ in 0..100 {
            assert_eq!(pick(2, 2, |_| true, |i| if i == 0 { 30.0 } else { 1.0 }), Some(1));
        }
        assert_eq!(pick(3, 1, |i| i == 2, |_| 0.0), Some(2));
        assert_eq!(pick(3, 0, |_| false, |_| 0.0), None);
    }
}
