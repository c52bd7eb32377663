//! Sources that keep failing TLS handshakes on the tunnel port are turned away at accept for a
//! while. A failed handshake costs the proxy a task, a rustls session and a ClientHello parse;
//! a pod looping on garbage connections (tens of thousands a second) would otherwise take the
//! one proxy's CPU from every tunnel of the node. The cluster's nodes are never penalised: a peer
//! proxy with a bad certificate fails anyway, and a penalty there would let a hostNetwork pod
//! that shares the node's address cut that node's new tunnels off.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Failures counted per source over this window...
pub const WINDOW: Duration = Duration::from_secs(1);
/// ...past this many, the source is refused at accept...
pub const THRESHOLD: u32 = 16;
/// ...for this long.
pub const COOL_DOWN: Duration = Duration::from_secs(5);
/// Sources tracked at once; past it expired entries go, and if none have, tracking starts over
/// (a penalty forgotten, never a connection wrongly refused).
const MAX_TRACKED: usize = 4096;

#[derive(Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    until: Option<Instant>,
}

#[derive(Default)]
pub struct Penalty(Mutex<HashMap<IpAddr, Entry>>);

impl Penalty {
    /// Whether connections from `source` are refused now.
    pub fn refuses(&self, source: IpAddr, now: Instant) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&source.to_canonical()).and_then(|e| e.until).is_some_and(|until| now < until)
    }

    /// Counts a failed handshake from `source`; true if that starts a cool-down.
    pub fn failed(&self, source: IpAddr, now: Instant) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED {
            map.retain(|_, e| now.duration_since(e.window_start) < WINDOW || e.until.is_some_and(|u| now < u));
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let e = map.entry(source.to_canonical()).or_insert(Entry { window_start: now, failures: 0, until: None });
        if now.duration_since(e.window_start) >= WINDOW {
            *e = Entry { window_start: now, failures: 0, until: e.until.filter(|u| now < *u) };
        }
        e.failures += 1;
        if e.failures > THRESHOLD && e.until.is_none_or(|u| now >= u) {
            e.until = Some(now + COOL_DOWN);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_past_the_threshold_is_refused_for_the_cool_down_then_served_again() {
        let p = Penalty::default();
        let t0 = Instant::now();
        for i in 0..THRESHOLD {
            assert!(!p.failed(ip("10.244.0.9"), t0 + Duration::from_millis(u64::from(i))), "failure {i} is within the allowance");
        }
        assert!(!p.refuses(ip("10.244.0.9"), t0 + Duration::from_millis(20)));
        assert!(p.failed(ip("10.244.0.9"), t0 + Duration::from_millis(20)), "one past the threshold starts the cool-down");
        assert!(p.refuses(ip("10.244.0.9"), t0 + Duration::from_millis(21)));
        assert!(p.refuses(ip("::ffff:10.244.0.9"), t0 + Duration::from_millis(21)), "an IPv4-mapped address is the same source");
        assert!(!p.refuses(ip("10.244.0.10"), t0 + Duration::from_millis(21)), "other sources are not affected");
        assert!(!p.refuses(ip("10.244.0.9"), t0 + Duration::from_millis(20) + COOL_DOWN));
    }

    #[test]
    fn failures_spread_over_windows_never_add_up_to_a_penalty() {
        let p = Penalty::default();
        let t0 = Instant::now();
        for w in 0..10u32 {
            for i in 0..THRESHOLD {
                let at = t0 + WINDOW * w + Duration::from_millis(u64::from(i));
                assert!(!p.failed(ip("10.244.0.9"), at));
            }
        }
        assert!(!p.refuses(ip("10.244.0.9"), t0 + WINDOW * 10));
    }

    #[test]
    fn tracking_many_sources_stays_bounded() {
        let p = Penalty::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 * 2) {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            p.failed(a, t0 + WINDOW * 2 * (i / MAX_TRACKED as u32));
        }
        assert!(p.0.lock().unwrap().len() <= MAX_TRACKED);
    }
}
