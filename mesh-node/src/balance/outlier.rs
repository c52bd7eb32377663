//! Envoy's consecutive-error outlier detection as configured by Istio's `outlierDetection`,
//! evaluated inline at each reported outcome rather than on a sweep timer.
use std::time::{Duration, Instant};

use super::Outcome;
use crate::config::OutlierDetection;

/// Istio's default for `consecutiveLocalOriginFailures` (only used when split).
const DEFAULT_CONSECUTIVE_LOCAL_ORIGIN: u32 = 5;
/// Envoy's default `max_ejection_time`; a larger base ejection time raises the cap to itself.
const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// `outlierDetection` with Istio's defaults applied. A `None` threshold is a disabled detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OutlierConfig {
    consecutive_5xx: Option<u32>,
    consecutive_gateway: Option<u32>,
    consecutive_local_origin: Option<u32>,
    split_local_origin: bool,
    interval: Duration,
    base_ejection_time: Duration,
    max_ejection_time: Duration,
    max_ejection_percent: u32,
    min_health_percent: u32,
}

impl OutlierConfig {
    pub fn new(od: &OutlierDetection) -> Self {
        // Istio turns a detector off with 0; a zero threshold would eject on every outcome.
        let enabled = |v: u32| (v > 0).then_some(v);
        let base = od
            .base_ejection_time
            .unwrap_or(OutlierDetection::DEFAULT_BASE_EJECTION_TIME);
        OutlierConfig {
            consecutive_5xx: enabled(
                od.consecutive_5xx_errors
                    .unwrap_or(OutlierDetection::DEFAULT_CONSECUTIVE_5XX),
            ),
            consecutive_gateway: od.consecutive_gateway_errors.and_then(enabled),
            consecutive_local_origin: if od.split_external_local_origin_errors {
                enabled(
                    od.consecutive_local_origin_failures
                        .unwrap_or(DEFAULT_CONSECUTIVE_LOCAL_ORIGIN),
                )
            } else {
                None
            },
            split_local_origin: od.split_external_local_origin_errors,
            // A zero interval would make the decay arithmetic divide by zero.
            interval: od
                .interval
                .unwrap_or(OutlierDetection::DEFAULT_INTERVAL)
                .max(Duration::from_millis(1)),
            base_ejection_time: base,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME.max(base),
            max_ejection_percent: od
                .max_ejection_percent
                .unwrap_or(OutlierDetection::DEFAULT_MAX_EJECTION_PERCENT)
                .min(100),
            min_health_percent: od.min_health_percent.unwrap_or(0).min(100),
        }
    }

    /// Envoy: ejecting is allowed while the ejected share stays within `maxEjectionPercent`,
    /// and one host may always be ejected when none is.
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        ejected == 0 || ejected < total * self.max_ejection_percent as usize / 100
    }

    /// Panic mode: below `minHealthPercent` healthy hosts, balance across all of them.
    pub fn panicking(&self, ejected: usize, total: usize) -> bool {
        let healthy = total.saturating_sub(ejected);
        self.min_health_percent > 0 && healthy * 100 < self.min_health_percent as usize * total
    }
}

/// Which detector reached its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Detector {
    Consecutive5xx,
    ConsecutiveGateway,
    ConsecutiveLocalOrigin,
}

#[derive(Debug, Default, Clone)]
pub(super) struct HostOutlier {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
    /// The ejection-time multiplier: +1 per ejection, -1 per healthy interval.
    pub times_ejected: u32,
    pub ejected_until: Option<Instant>,
    /// Start of the healthy interval not yet credited to the multiplier's decay.
    decay_from: Option<Instant>,
}

impl HostOutlier {
    pub fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Catches up with `now`: returns the host once its ejection is over and decays the
    /// multiplier by the full intervals it has stayed in since. True if the host returned.
    pub fn settle(&mut self, now: Instant, cfg: &OutlierConfig) -> bool {
        let mut returned = false;
        if let Some(until) = self.ejected_until {
            if now < until {
                return false;
            }
            self.ejected_until = None;
            // Count from the moment it was due back, not from when someone noticed.
            self.decay_from = Some(until);
            returned = true;
        }
        if let (Some(from), true) = (self.decay_from, self.times_ejected > 0) {
            let intervals =
                now.saturating_duration_since(from).as_nanos() / cfg.interval.as_nanos();
            let intervals = u32::try_from(intervals).unwrap_or(u32::MAX);
            if intervals > 0 {
                let credited = intervals.min(self.times_ejected);
                self.times_ejected -= credited;
                self.decay_from = from.checked_add(cfg.interval * credited);
            }
        }
        returned
    }

    /// Counts one outcome; returns the detector whose threshold it reached, if any.
    pub fn record(&mut self, outcome: Outcome, cfg: &OutlierConfig) -> Option<Detector> {
        let (is_5xx, is_gateway, local_failure) = match outcome {
            Outcome::Success => (false, false, false),
            Outcome::HttpStatus(s) => (s >= 500, matches!(s, 502..=504), false),
            // Unsplit, Envoy reports a connect failure or reset as a 503 from the host.
            Outcome::LocalOriginFailure if !cfg.split_local_origin => (true, true, false),
            Outcome::LocalOriginFailure => (false, false, true),
        };
        if local_failure {
            // The connection failed: say nothing about the host's HTTP behaviour.
            self.consecutive_local_origin += 1;
        } else {
            // Any answer proves the connection works.
            self.consecutive_local_origin = 0;
            self.consecutive_5xx = if is_5xx { self.consecutive_5xx + 1 } else { 0 };
            self.consecutive_gateway = if is_gateway {
                self.consecutive_gateway + 1
            } else {
                0
            };
        }
        let reached = |count: u32, threshold: Option<u32>| threshold.is_some_and(|t| count >= t);
        if reached(self.consecutive_5xx, cfg.consecutive_5xx) {
            Some(Detector::Consecutive5xx)
        } else if reached(self.consecutive_gateway, cfg.consecutive_gateway) {
            Some(Detector::ConsecutiveGateway)
        } else if reached(self.consecutive_local_origin, cfg.consecutive_local_origin) {
            Some(Detector::ConsecutiveLocalOrigin)
        } else {
            None
        }
    }

    /// Ejects for base × multiplier (capped) and starts counting afresh. Returns the duration.
    pub fn eject(&mut self, now: Instant, cfg: &OutlierConfig) -> Duration {
        // Like Envoy, stop growing the multiplier once the cap is reached so it can decay back
        // in a bounded number of intervals.
        if cfg.base_ejection_time.saturating_mul(self.times_ejected) < cfg.max_ejection_time {
            self.times_ejected += 1;
        }
        let duration = cfg
            .base_ejection_time
            .saturating_mul(self.times_ejected)
            .min(cfg.max_ejection_time);
        self.ejected_until = Some(now.checked_add(duration).unwrap_or(now));
        self.decay_from = None;
        self.reset_counters();
        duration
    }

    /// Envoy resets the counter that fired even when the ejection was refused (max percent),
    /// so a fresh run of errors is needed to try again.
    pub fn reset_detector(&mut self, detector: Detector) {
        match detector {
            Detector::Consecutive5xx => self.consecutive_5xx = 0,
            Detector::ConsecutiveGateway => self.consecutive_gateway = 0,
            Detector::ConsecutiveLocalOrigin => self.consecutive_local_origin = 0,
        }
    }

    fn reset_counters(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local_origin = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(od: OutlierDetection) -> OutlierConfig {
        OutlierConfig::new(&od)
    }

    #[test]
    fn defaults_follow_istio() {
        let c = cfg(OutlierDetection::default());
        assert_eq!(c.consecutive_5xx, Some(5));
        assert_eq!(c.consecutive_gateway, None);
        assert_eq!(c.consecutive_local_origin, None);
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.base_ejection_time, Duration::from_secs(30));
        assert_eq!(c.max_ejection_time, Duration::from_secs(300));
        assert_eq!(c.max_ejection_percent, 10);
        assert_eq!(c.min_health_percent, 0);
        let c = cfg(OutlierDetection {
            consecutive_5xx_errors: Some(0),
            split_external_local_origin_errors: true,
            base_ejection_time: Some(Duration::from_secs(400)),
            ..Default::default()
        });
        assert_eq!(c.consecutive_5xx, None);
        assert_eq!(c.consecutive_local_origin, Some(5));
        assert_eq!(c.max_ejection_time, Duration::from_secs(400));
    }

    #[test]
    fn five_xx_counter_resets_on_success_and_non_5xx() {
        let c = cfg(OutlierDetection::default());
        let mut h = HostOutlier::default();
        for _ in 0..4 {
            assert_eq!(h.record(Outcome::HttpStatus(500), &c), None);
        }
        h.record(Outcome::HttpStatus(404), &c);
        assert_eq!(h.consecutive_5xx, 0);
        for _ in 0..4 {
            h.record(Outcome::HttpStatus(503), &c);
        }
        h.record(Outcome::Success, &c);
        assert_eq!(h.consecutive_5xx, 0);
        for _ in 0..4 {
            h.record(Outcome::LocalOriginFailure, &c);
        }
        assert_eq!(
            h.record(Outcome::HttpStatus(599), &c),
            Some(Detector::Consecutive5xx)
        );
    }

    #[test]
    fn gateway_counter_counts_only_502_to_504() {
        let c = cfg(OutlierDetection {
            consecutive_5xx_errors: Some(0),
            consecutive_gateway_errors: Some(3),
            ..Default::default()
        });
        let mut h = HostOutlier::default();
        h.record(Outcome::HttpStatus(502), &c);
        h.record(Outcome::HttpStatus(504), &c);
        h.record(Outcome::HttpStatus(500), &c);
        assert_eq!(h.consecutive_gateway, 0);
        h.record(Outcome::HttpStatus(503), &c);
        h.record(Outcome::LocalOriginFailure, &c);
        assert_eq!(
            h.record(Outcome::HttpStatus(502), &c),
            Some(Detector::ConsecutiveGateway)
        );
    }

    #[test]
    fn split_counts_local_origin_failures_apart() {
        let c = cfg(OutlierDetection {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failures: Some(2),
            ..Default::default()
        });
        let mut h = HostOutlier::default();
        for _ in 0..4 {
            h.record(Outcome::HttpStatus(500), &c);
        }
        assert_eq!(h.record(Outcome::LocalOriginFailure, &c), None);
        // The local failure neither counted as nor broke the 5xx run.
        assert_eq!(h.consecutive_5xx, 4);
        assert_eq!(
            h.record(Outcome::LocalOriginFailure, &c),
            Some(Detector::ConsecutiveLocalOrigin)
        );
        h.record(Outcome::HttpStatus(500), &c);
        assert_eq!(h.consecutive_local_origin, 0);
    }

    #[test]
    fn ejection_time_grows_caps_and_decays() {
        let c = cfg(OutlierDetection::default());
        let t0 = Instant::now();
        let mut h = HostOutlier::default();
        assert_eq!(h.eject(t0, &c), Duration::from_secs(30));
        assert!(!h.settle(t0 + Duration::from_secs(29), &c));
        assert!(h.settle(t0 + Duration::from_secs(30), &c));
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(h.eject(t1, &c), Duration::from_secs(60));
        let back = t1 + Duration::from_secs(60);
        assert!(h.settle(back + Duration::from_secs(15), &c));
        // One full interval since it came back: 2 -> 1.
        assert_eq!(h.times_ejected, 1);
        h.settle(back + Duration::from_secs(19), &c);
        assert_eq!(h.times_ejected, 1);
        h.settle(back + Duration::from_secs(20), &c);
        assert_eq!(h.times_ejected, 0);
        let mut t = back + Duration::from_secs(20);
        let mut last = Duration::ZERO;
        for _ in 0..15 {
            last = h.eject(t, &c);
            t += last;
            h.settle(t, &c);
        }
        assert_eq!(last, Duration::from_secs(300));
        assert_eq!(h.times_ejected, 10);
    }

    #[test]
    fn max_ejection_percent_and_panic() {
        let c = cfg(OutlierDetection::default());
        assert!(c.may_eject(0, 3));
        assert!(!c.may_eject(1, 3));
        assert!(c.may_eject(1, 20));
        assert!(!c.may_eject(2, 20));
        assert!(!c.panicking(3, 3));
        let c = cfg(OutlierDetection {
            min_health_percent: Some(50),
            ..Default::default()
        });
        assert!(!c.panicking(2, 4));
        assert!(c.panicking(3, 4));
    }
}
