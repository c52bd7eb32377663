//! A per-thread xorshift64* generator for RANDOM, LEAST_REQUEST and key-less hashing: no
//! locking, no allocation, and mesh-node carries no `rand` dependency. Not for secrets.
use std::{
    cell::Cell,
    hash::{BuildHasher, Hasher},
};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

// std's RandomState draws its keys from the OS once per thread, so hashing nothing with it is
// a cheap random seed. xorshift must never start at 0.
fn seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1
}

pub(super) fn next_u64() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Uniform in `0..n` (Lemire's multiply-shift; the bias is < n / 2^64). `n` must be > 0.
pub(super) fn below(n: usize) -> usize {
    ((u128::from(next_u64()) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut seen = [0u32; 5];
        for _ in 0..5_000 {
            let v = below(5);
            seen[v] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
