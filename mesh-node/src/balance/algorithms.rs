//! The load-balancing policies and the simple ones (ROUND_ROBIN, RANDOM). Each works on host
//! indexes with an eligibility test so a pick never allocates.
use std::net::SocketAddr;

use super::{
    maglev::{self, Maglev},
    ring_hash::{self, Ring},
    rng,
};
use crate::config::{HashAlgorithm, LbPolicy, SimpleLb};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Policy {
    RoundRobin,
    Random,
    LeastRequest,
    /// `mesh.io/load-balancer: peak-ewma` (see `peak_ewma`).
    PeakEwma,
    RingHash { min_ring_size: u64 },
    Maglev { table_size: u64 },
}

impl Policy {
    pub fn new(lb: Option<&LbPolicy>) -> Self {
        match lb {
            // Istio's default is LEAST_REQUEST, not Envoy's ROUND_ROBIN.
            None | Some(LbPolicy::Simple(SimpleLb::Unspecified | SimpleLb::LeastRequest)) => {
                Policy::LeastRequest
            }
            Some(LbPolicy::Simple(SimpleLb::RoundRobin)) => Policy::RoundRobin,
            // PASSTHROUGH (use the original destination) only makes sense for clusters without
            // endpoints; config validation is where it belongs, so here it balances like
            // ROUND_ROBIN over whatever endpoints the cluster has.
            Some(LbPolicy::Simple(SimpleLb::Passthrough)) => Policy::RoundRobin,
            Some(LbPolicy::Simple(SimpleLb::Random)) => Policy::Random,
            Some(LbPolicy::ConsistentHash(ch)) => match ch.algorithm {
                None => Policy::RingHash {
                    min_ring_size: ring_hash::DEFAULT_MIN_RING_SIZE,
                },
                Some(HashAlgorithm::RingHash { minimum_ring_size }) => Policy::RingHash {
                    min_ring_size: minimum_ring_size.unwrap_or(ring_hash::DEFAULT_MIN_RING_SIZE),
                },
                Some(HashAlgorithm::Maglev { table_size }) => Policy::Maglev {
                    table_size: table_size.unwrap_or(maglev::DEFAULT_TABLE_SIZE),
                },
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "ROUND_ROBIN",
            Policy::Random => "RANDOM",
            Policy::LeastRequest => "LEAST_REQUEST",
            Policy::PeakEwma => "PEAK_EWMA",
            Policy::RingHash { .. } => "RING_HASH",
            Policy::Maglev { .. } => "MAGLEV",
        }
    }
}

/// The consistent-hash lookup structure for a policy and host list, built once per change.
#[derive(Debug)]
pub(super) enum HashTable {
    Ring(Ring),
    Maglev(Maglev),
}

impl HashTable {
    pub fn build(policy: Policy, hosts: &[SocketAddr]) -> Option<Self> {
        match policy {
            Policy::RingHash { min_ring_size } => {
                Some(HashTable::Ring(Ring::build(hosts, min_ring_size)))
            }
            Policy::Maglev { table_size } => {
                Some(HashTable::Maglev(Maglev::build(hosts, table_size)))
            }
            Policy::RoundRobin | Policy::Random | Policy::LeastRequest | Policy::PeakEwma => None,
        }
    }

    /// `hash: None` (no key on the request) picks a random point, as Envoy does.
    pub fn pick(&self, hash: Option<u64>, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let hash = hash.unwrap_or_else(rng::next_u64);
        match self {
            HashTable::Ring(r) => r.pick(hash, eligible),
            HashTable::Maglev(m) => m.pick(hash, eligible),
        }
    }
}

/// The next eligible host at or after `cursor`, which moves past it.
pub(super) fn round_robin(
    hosts: usize,
    cursor: &mut usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let start = *cursor % hosts.max(1);
    let chosen = (0..hosts)
        .map(|k| (start + k) % hosts)
        .find(|&i| eligible(i))?;
    *cursor = chosen + 1;
    Some(chosen)
}

/// Uniform among the `count` eligible hosts.
pub(super) fn random(
    hosts: usize,
    count: usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    if count == 0 {
        return None;
    }
    nth_eligible(hosts, rng::below(count), eligible)
}

pub(super) fn nth_eligible(
    hosts: usize,
    n: usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..hosts).filter(|&i| eligible(i)).nth(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConsistentHash;
    use crate::config::HashKey;

    #[test]
    fn unset_policy_is_least_request() {
        assert_eq!(Policy::new(None), Policy::LeastRequest);
        assert_eq!(
            Policy::new(Some(&LbPolicy::Simple(SimpleLb::Unspecified))),
            Policy::LeastRequest
        );
        assert_eq!(
            Policy::new(Some(&LbPolicy::Simple(SimpleLb::Passthrough))),
            Policy::RoundRobin
        );
        let ch = |algorithm| {
            LbPolicy::ConsistentHash(ConsistentHash {
                key: HashKey::UseSourceIp,
                algorithm,
            })
        };
        assert_eq!(
            Policy::new(Some(&ch(None))),
            Policy::RingHash {
                min_ring_size: 1024
            }
        );
        assert_eq!(
            Policy::new(Some(&ch(Some(HashAlgorithm::Maglev { table_size: None })))),
            Policy::Maglev { table_size: 65_537 }
        );
    }

    #[test]
    fn round_robin_skips_ineligible_and_advances() {
        let mut cursor = 0;
        let picks: Vec<_> = (0..5)
            .filter_map(|_| round_robin(4, &mut cursor, |i| i != 2))
            .collect();
        assert_eq!(picks, [0, 1, 3, 0, 1]);
        assert_eq!(round_robin(4, &mut cursor, |_| false), None);
        assert_eq!(round_robin(0, &mut cursor, |_| true), None);
    }

    #[test]
    fn random_only_returns_eligible_hosts() {
        for _ in 0..200 {
            let pick = random(5, 2, |i| i == 1 || i == 4);
            assert!(matches!(pick, Some(1 | 4)));
        }
        assert_eq!(random(5, 0, |_| false), None);
    }
}
