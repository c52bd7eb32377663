//! LEAST_REQUEST as Envoy does it for equal weights: power of two choices on active requests,
//! and the per-host active-request accounting it reads.
use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use super::{algorithms::nth_eligible, rng};

/// One request in flight to a host; the host's active count drops when this is dropped. Move
/// it into the response body so it lives until the response ends.
#[derive(Debug)]
pub struct ActiveRequest(Arc<AtomicU32>);

impl ActiveRequest {
    pub(super) fn start(active: &Arc<AtomicU32>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(Arc::clone(active))
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Two distinct random eligible hosts; the one with fewer active requests wins, ties at random.
pub(super) fn pick(
    hosts: usize,
    count: usize,
    eligible: impl Fn(usize) -> bool,
    active: impl Fn(usize) -> u32,
) -> Option<usize> {
    power_of_two_choices(hosts, count, eligible, active)
}

/// Power of two choices: two distinct random eligible hosts, the lower `cost` wins, ties at
/// random. Shared by LEAST_REQUEST (cost: active requests) and peak-EWMA (cost: latency x load).
pub(super) fn power_of_two_choices<C: PartialOrd>(
    hosts: usize,
    count: usize,
    eligible: impl Fn(usize) -> bool,
    cost: impl Fn(usize) -> C,
) -> Option<usize> {
    match count {
        0 => None,
        1 => nth_eligible(hosts, 0, eligible),
        _ => {
            let a = rng::below(count);
            let mut b = rng::below(count - 1);
            if b >= a {
                b += 1;
            }
            let a = nth_eligible(hosts, a, &eligible)?;
            let b = nth_eligible(hosts, b, &eligible)?;
            let (ca, cb) = (cost(a), cost(b));
            Some(if ca < cb {
                a
            } else if cb < ca || rng::next_u64() & 1 == 0 {
                b
            } else {
                a
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_active_requests() {
        let active = Arc::new(AtomicU32::new(0));
        let a = ActiveRequest::start(&active);
        let b = ActiveRequest::start(&active);
        assert_eq!(active.load(Ordering::Relaxed), 2);
        drop(a);
        drop(b);
        assert_eq!(active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn never_picks_the_busiest_of_two_or_more() {
        // With two hosts both are always compared, so the idle one always wins.
        for _ in 0..100 {
            assert_eq!(
                pick(2, 2, |_| true, |i| if i == 0 { 5 } else { 1 }),
                Some(1)
            );
        }
        // With three, the busiest can never win its comparison.
        let loads = [9, 1, 2];
        for _ in 0..300 {
            assert_ne!(pick(3, 3, |_| true, |i| loads[i]), Some(0));
        }
    }

    #[test]
    fn ties_spread_and_single_host_works() {
        let mut seen = [0u32; 3];
        for _ in 0..900 {
            if let Some(i) = pick(3, 3, |_| true, |_| 0) {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c > 200), "{seen:?}");
        assert_eq!(pick(3, 1, |i| i == 2, |_| 0), Some(2));
        assert_eq!(pick(3, 0, |_| false, |_| 0), None);
    }
}
