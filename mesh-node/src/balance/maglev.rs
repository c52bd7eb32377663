//! Maglev consistent hashing (Envoy's MAGLEV): a lookup table of prime size filled from each
//! host's permutation, so lookups are O(1) and an added host takes about its share of keys.
use std::net::SocketAddr;

use super::hash::xxh64;

/// Istio's/Envoy's default `tableSize`.
pub const DEFAULT_TABLE_SIZE: u64 = 65_537;
/// Bounds memory (4 bytes per slot) whatever `tableSize` says.
const MAX_TABLE_SIZE: u64 = 1 << 24;
const EMPTY: u32 = u32::MAX;

#[derive(Debug)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// `hosts[i]` becomes host index `i` in lookups. A non-prime or too-small `table_size` is
    /// raised to the next prime that fits every host (Envoy rejects those at config time).
    pub fn build(hosts: &[SocketAddr], table_size: u64) -> Self {
        if hosts.is_empty() {
            return Maglev { table: Vec::new() };
        }
        let size = next_prime(table_size.clamp(hosts.len() as u64, MAX_TABLE_SIZE).max(2));
        // Fill in address order so the table does not depend on the order endpoints came in.
        let mut order: Vec<usize> = (0..hosts.len()).collect();
        order.sort_unstable_by_key(|&i| hosts[i]);
        let perms: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| {
                let key = hosts[i].to_string();
                let offset = xxh64(key.as_bytes(), 0) % size;
                let skip = xxh64(key.as_bytes(), 1) % (size - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; order.len()];
        let mut table = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (j, &host) in order.iter().enumerate() {
                let (offset, skip) = perms[j];
                let mut slot = (offset + next[j] * skip) % size;
                while table[slot as usize] != EMPTY {
                    next[j] += 1;
                    slot = (offset + next[j] * skip) % size;
                }
                // Host counts above u32::MAX are impossible in practice; EMPTY stays reserved.
                table[slot as usize] = u32::try_from(host).unwrap_or(EMPTY - 1);
                next[j] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev { table }
    }

    /// The owner of `hash`, walking forward past slots whose host is not `eligible`.
    pub fn pick(&self, hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.table.len();
        if len == 0 {
            return None;
        }
        let start = (hash % len as u64) as usize;
        (0..len)
            .map(|k| self.table[(start + k) % len] as usize)
            .find(|&i| eligible(i))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }
}

fn next_prime(mut n: u64) -> u64 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
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

    fn owners(m: &Maglev, keys: u32) -> Vec<usize> {
        (0..keys)
            .map(|k| m.pick(hash_key(format!("key-{k}").as_bytes()), |_| true))
            .map(|o| o.unwrap_or(usize::MAX))
            .collect()
    }

    #[test]
    fn adding_a_host_moves_about_its_share_of_keys() {
        let before = owners(&Maglev::build(&addrs(3), DEFAULT_TABLE_SIZE), 10_000);
        let after = owners(&Maglev::build(&addrs(4), DEFAULT_TABLE_SIZE), 10_000);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let fraction = moved as f64 / 10_000.0;
        assert!((fraction - 0.25).abs() <= 0.07, "moved {fraction}");
    }

    #[test]
    fn a_key_always_maps_to_the_same_host_whatever_the_endpoint_order() {
        let m = Maglev::build(&addrs(5), DEFAULT_TABLE_SIZE);
        let mut reversed = addrs(5);
        reversed.reverse();
        let r = Maglev::build(&reversed, DEFAULT_TABLE_SIZE);
        let a = owners(&m, 2_000);
        let b: Vec<usize> = owners(&r, 2_000).into_iter().map(|i| 4 - i).collect();
        assert_eq!(a, b);
        assert_eq!(a, owners(&m, 2_000));
    }

    #[test]
    fn table_is_prime_sized_and_evenly_filled() {
        let m = Maglev::build(&addrs(4), 1000);
        assert_eq!(m.len(), 1009);
        let mut counts = [0u32; 4];
        for &slot in &m.table {
            counts[slot as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (240..=265).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(Maglev::build(&addrs(3), 0).len(), 3);
        assert_eq!(Maglev::build(&[], 7).pick(1, |_| true), None);
    }

    #[test]
    fn walks_forward_past_ineligible_hosts() {
        let m = Maglev::build(&addrs(3), 101);
        for k in 0..300u64 {
            let h = hash_key(&k.to_le_bytes());
            let Some(first) = m.pick(h, |_| true) else {
                panic!("empty table")
            };
            assert!(m.pick(h, |i| i != first).is_some_and(|n| n != first));
        }
    }
}
