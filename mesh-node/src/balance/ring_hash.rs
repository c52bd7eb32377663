//! Ketama-style ring hash (Envoy's RING_HASH): each host owns points on a 64-bit ring hashed
//! from `"<addr>_<i>"`; a key belongs to the first point at or after its hash.
use std::{fmt::Write, net::SocketAddr};

use super::hash::xxh64;

/// Istio's default `minimumRingSize`.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// Envoy's default `maximum_ring_size`; bounds memory (16 bytes per entry) for huge
/// `minimumRingSize` values or host counts.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct Ring {
    /// (point, host index), sorted by point.
    entries: Vec<(u64, u32)>,
}

impl Ring {
    /// `hosts[i]` becomes host index `i` in lookups.
    pub fn build(hosts: &[SocketAddr], min_ring_size: u64) -> Self {
        let per_host = replicas_per_host(min_ring_size, hosts.len());
        let mut entries = Vec::with_capacity(hosts.len().saturating_mul(per_host as usize));
        let mut key = String::with_capacity(64);
        for (index, addr) in hosts.iter().enumerate() {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            for i in 0..per_host {
                key.clear();
                // Writing to a String cannot fail.
                let _ = write!(key, "{addr}_{i}");
                entries.push((xxh64(key.as_bytes(), 0), index));
            }
        }
        // Ties (practically never) are broken by host index so the ring is deterministic.
        entries.sort_unstable();
        Ring { entries }
    }

    /// The owner of `hash`, walking forward past points whose host is not `eligible`.
    pub fn pick(&self, hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.entries.len();
        let start = self.entries.partition_point(|&(point, _)| point < hash);
        (0..len)
            .map(|k| self.entries[(start + k) % len].1 as usize)
            .find(|&i| eligible(i))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Every host gets `minimumRingSize` points (the total is then at least that), rather than
/// Envoy's `ceil(minimumRingSize / hosts)`: with a per-host count that shrinks as hosts are
/// added, adding a 4th host to 3 would also drop a quarter of the old hosts' points and move
/// ~34% of keys (measured) instead of the minimal ~25%. The count only shrinks once the ring would exceed
/// `MAX_RING_SIZE`.
fn replicas_per_host(min_ring_size: u64, hosts: usize) -> u64 {
    let hosts = hosts.max(1) as u64;
    min_ring_size.min(MAX_RING_SIZE / hosts).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::hash::hash_key;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    fn owners(ring: &Ring, keys: u32) -> Vec<usize> {
        (0..keys)
            .map(|k| ring.pick(hash_key(format!("key-{k}").as_bytes()), |_| true))
            .map(|o| o.unwrap_or(usize::MAX))
            .collect()
    }

    #[test]
    fn adding_a_host_moves_about_its_share_of_keys() {
        let before = owners(&Ring::build(&addrs(3), DEFAULT_MIN_RING_SIZE), 10_000);
        let after = owners(&Ring::build(&addrs(4), DEFAULT_MIN_RING_SIZE), 10_000);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let fraction = moved as f64 / 10_000.0;
        assert!((fraction - 0.25).abs() <= 0.07, "moved {fraction}");
        // Ring hash only ever moves keys onto the new host.
        assert!(before.iter().zip(&after).all(|(a, b)| a == b || *b == 3));
    }

    #[test]
    fn a_key_always_maps_to_the_same_host() {
        let ring = Ring::build(&addrs(5), DEFAULT_MIN_RING_SIZE);
        let again = Ring::build(&addrs(5), DEFAULT_MIN_RING_SIZE);
        assert_eq!(owners(&ring, 2_000), owners(&again, 2_000));
        assert_eq!(owners(&ring, 2_000), owners(&ring, 2_000));
    }

    #[test]
    fn load_is_spread_evenly() {
        let ring = Ring::build(&addrs(4), DEFAULT_MIN_RING_SIZE);
        let mut counts = [0u32; 4];
        for o in owners(&ring, 20_000) {
            counts[o] += 1;
        }
        assert!(
            counts.iter().all(|&c| (4_000..6_000).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn walks_forward_past_ineligible_hosts() {
        let ring = Ring::build(&addrs(3), 16);
        for k in 0..500u64 {
            let h = hash_key(&k.to_le_bytes());
            let first = ring.pick(h, |_| true);
            let Some(first) = first else {
                panic!("empty ring")
            };
            let next = ring.pick(h, |i| i != first);
            assert!(next.is_some_and(|n| n != first));
        }
        assert_eq!(ring.pick(7, |_| false), None);
    }

    #[test]
    fn ring_has_at_least_the_minimum_size() {
        assert!(Ring::build(&addrs(3), 1000).len() >= 1000);
        assert_eq!(Ring::build(&addrs(2), 0).len(), 2);
        assert_eq!(Ring::build(&[], 1024).len(), 0);
    }
}
