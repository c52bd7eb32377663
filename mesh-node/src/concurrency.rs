//! Adaptive concurrency (`mesh.io/adaptive-concurrency: "on"` on a DestinationRule): one
//! gradient limiter per destination Service on this node, in the style of Envoy's
//! adaptive_concurrency filter and Netflix concurrency-limits' Gradient2.
//!
//! Requests are admitted while fewer than `limit` are in flight; the rest are answered at once
//! (503, response flag `CL`). Every ~100 ms window of latency samples (send -> response headers,
//! the same samples peak-EWMA gets) yields a sample RTT (the window's p90); the min RTT is the
//! lowest sample RTT seen over the last 10-20 s. Then
//!
//! ```text
//! gradient  = clamp(min_rtt * (1 + buffer) / sample_rtt, 0.5, 1.0)
//! new_limit = clamp(limit * gradient + sqrt(limit), 1, max)
//! ```
//!
//! so the limit grows by its square root while latency stays near the minimum and shrinks (by
//! at most half a window) when queueing shows up. A window whose peak in-flight stayed below
//! half the limit does not grow it (the limit was not what bounded the traffic).
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// Limit before any window has closed: low (Envoy's min_concurrency), so the first windows
/// measure the min RTT without queueing and the limit then grows by its square root.
pub const INITIAL_LIMIT: f64 = 3.0;
/// A window closes after this long and at least `MIN_SAMPLES` samples.
pub const SAMPLE_WINDOW: Duration = Duration::from_millis(100);
pub const MIN_SAMPLES: usize = 10;
/// Samples kept per window (the p90 of a larger window is taken over the first ones).
const MAX_SAMPLES: usize = 4096;
/// The min RTT is the lowest sample RTT of the current and the previous such period.
pub const MIN_RTT_PERIOD: Duration = Duration::from_secs(10);
/// Latency tolerated above the min RTT before the limit shrinks.
pub const BUFFER: f64 = 0.1;
const MIN_GRADIENT: f64 = 0.5;

#[derive(Debug)]
pub struct GradientLimiter {
    in_flight: AtomicUsize,
    /// `limit` as a whole number, read on every admission without the lock.
    limit_now: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    max_limit: u32,
    limit: f64,
    window_start: Instant,
    samples: Vec<Duration>,
    /// Highest in-flight count seen in the current window.
    window_peak: usize,
    sample_rtt: Option<Duration>,
    min_current: Option<Duration>,
    min_previous: Option<Duration>,
    min_period_start: Instant,
}

impl State {
    fn min_rtt(&self) -> Option<Duration> {
        match (self.min_current, self.min_previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LimiterSnapshot {
    pub limit: u64,
    pub max_limit: u32,
    pub in_flight: usize,
    pub min_rtt_ms: Option<f64>,
    pub sample_rtt_ms: Option<f64>,
}

/// One admitted request; dropping it ends the request for the limiter.
#[derive(Debug)]
pub struct ConcurrencyPermit {
    limiter: Arc<GradientLimiter>,
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl GradientLimiter {
    pub fn new(max_limit: u32, now: Instant) -> Self {
        let limit = INITIAL_LIMIT.min(f64::from(max_limit.max(1)));
        GradientLimiter {
            in_flight: AtomicUsize::new(0),
            limit_now: AtomicUsize::new(limit as usize),
            state: Mutex::new(State {
                max_limit: max_limit.max(1),
                limit,
                window_start: now,
                samples: Vec::new(),
                window_peak: 0,
                sample_rtt: None,
                min_current: None,
                min_previous: None,
                min_period_start: now,
            }),
        }
    }

    pub fn set_max(&self, max_limit: u32) {
        let mut s = self.lock();
        s.max_limit = max_limit.max(1);
        s.limit = s.limit.min(f64::from(s.max_limit));
        self.limit_now.store(s.limit as usize, Ordering::Release);
    }

    /// Admits a request if fewer than the limit are in flight.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConcurrencyPermit> {
        let limit = self.limit_now.load(Ordering::Acquire).max(1);
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if current >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        let mut s = self.lock();
        s.window_peak = s.window_peak.max(current + 1);
        Some(ConcurrencyPermit { limiter: self.clone() })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit_now.load(Ordering::Acquire)
    }

    pub fn sample(&self, rtt: Duration) {
        self.sample_at(rtt, Instant::now());
    }

    /// One latency measurement (send -> response headers), taken at `now`.
    pub fn sample_at(&self, rtt: Duration, now: Instant) {
        let mut s = self.lock();
        if s.samples.len() < MAX_SAMPLES {
            s.samples.push(rtt);
        }
        if now.saturating_duration_since(s.window_start) < SAMPLE_WINDOW || s.samples.len() < MIN_SAMPLES {
            return;
        }
        // Close the window.
        let mut samples = std::mem::take(&mut s.samples);
        samples.sort_unstable();
        let p90 = samples[((samples.len() - 1) as f64 * 0.9).round() as usize];
        let peak = std::mem::replace(&mut s.window_peak, self.in_flight.load(Ordering::Acquire));
        s.window_start = now;
        s.sample_rtt = Some(p90);
        if now.saturating_duration_since(s.min_period_start) >= MIN_RTT_PERIOD {
            s.min_previous = s.min_current.take();
            s.min_period_start = now;
        }
        s.min_current = Some(s.min_current.map_or(p90, |m| m.min(p90)));
        let min_rtt = s.min_rtt().unwrap_or(p90);
        let gradient = (min_rtt.as_secs_f64() * (1.0 + BUFFER) / p90.as_secs_f64().max(1e-9)).clamp(MIN_GRADIENT, 1.0);
        let limit = s.limit;
        let mut new_limit = limit * gradient + limit.sqrt();
        // App-limited: the limit did not bound this window, so there is nothing to learn upward.
        if (peak as f64) < limit / 2.0 {
            new_limit = new_limit.min(limit);
        }
        s.limit = new_limit.clamp(1.0, f64::from(s.max_limit));
        self.limit_now.store(s.limit as usize, Ordering::Release);
        samples.clear();
        s.samples = samples;
    }

    pub fn snapshot(&self) -> LimiterSnapshot {
        let s = self.lock();
        let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
        LimiterSnapshot {
            limit: s.limit as u64,
            max_limit: s.max_limit,
            in_flight: self.in_flight(),
            min_rtt_ms: ms(s.min_rtt()),
            sample_rtt_ms: ms(s.sample_rtt),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `windows` sample windows at `rtt`, with `busy` requests held in flight (so the
    /// limiter is not app-limited); returns the limit after each.
    fn drive(l: &Arc<GradientLimiter>, clock: &mut Instant, rtt: Duration, windows: usize, busy: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for _ in 0..windows {
            let held: Vec<_> = (0..busy).filter_map(|_| l.try_acquire()).collect();
            for _ in 0..MIN_SAMPLES {
                *clock += SAMPLE_WINDOW / MIN_SAMPLES as u32;
                l.sample_at(rtt, *clock);
            }
            drop(held);
            out.push(l.limit());
        }
        out
    }

    #[test]
    fn limit_shrinks_under_rising_latency_and_recovers() {
        let mut clock = Instant::now();
        let l = Arc::new(GradientLimiter::new(1000, clock));
        let ms = Duration::from_millis;
        // Steady at 5 ms, always busy: the limit grows.
        let steady = drive(&l, &mut clock, ms(5), 20, 1000);
        let grown = *steady.last().unwrap();
        assert!(grown > INITIAL_LIMIT as usize * 2, "{steady:?}");
        assert_eq!(l.snapshot().min_rtt_ms, Some(5.0));
        // Latency rises to 4x: every window halves the limit (the gradient floor).
        let slow = drive(&l, &mut clock, ms(20), 8, 1000);
        assert!(slow.windows(2).all(|w| w[1] <= w[0]), "{slow:?}");
        let shrunk = *slow.last().unwrap();
        assert!(shrunk < grown / 4, "{grown} -> {slow:?}");
        assert_eq!(l.snapshot().sample_rtt_ms, Some(20.0));
        // Back to normal: it grows again.
        let recovered = drive(&l, &mut clock, ms(5), 20, 1000);
        assert!(*recovered.last().unwrap() > shrunk * 3, "{shrunk} -> {recovered:?}");
    }

    #[test]
    fn admits_up_to_the_limit_and_sheds_the_rest() {
        let clock = Instant::now();
        let l = Arc::new(GradientLimiter::new(1000, clock));
        let held: Vec<_> = (0..10).filter_map(|_| l.try_acquire()).collect();
        assert_eq!(held.len(), INITIAL_LIMIT as usize);
        assert!(l.try_acquire().is_none());
        assert_eq!(l.snapshot().in_flight, INITIAL_LIMIT as usize);
        drop(held);
        assert_eq!(l.in_flight(), 0);
        assert!(l.try_acquire().is_some());
    }

    #[test]
    fn an_idle_destination_does_not_grow_the_limit() {
        let mut clock = Instant::now();
        let l = Arc::new(GradientLimiter::new(1000, clock));
        let limits = drive(&l, &mut clock, Duration::from_millis(5), 50, 1);
        assert!(limits.iter().all(|&n| n <= INITIAL_LIMIT as usize), "{limits:?}");
        assert_eq!(l.snapshot().min_rtt_ms, Some(5.0));
    }

    #[test]
    fn stays_within_one_and_max() {
        let mut clock = Instant::now();
        let l = Arc::new(GradientLimiter::new(30, clock));
        let up = drive(&l, &mut clock, Duration::from_millis(5), 30, 100);
        assert_eq!(*up.last().unwrap(), 30);
        let down = drive(&l, &mut clock, Duration::from_millis(500), 30, 100);
        // limit * 0.5 + sqrt(limit) settles at 4.
        assert!((1..=5).contains(down.last().unwrap()), "{down:?}");
    }
}
