//! Stable key hashing: where a keyed record lives in the cluster.
//!
//! Every keyed exchange in Dima routes on [`route`] of the key, so the worker
//! that owns a key depends only on the key and the number of workers, never on
//! which worker produced the record. The hash is SplitMix64's finaliser: cheap,
//! bijective on `u64`, and it spreads sequential keys evenly, which a plain
//! `key % peers` would not when the producers were themselves split by key.

/// A stable 64-bit mix of `x` (SplitMix64 finaliser, Steele et al. 2014).
#[inline]
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a (64-bit) of `bytes`: a stable hash of text, the same in every
/// process, build and platform (std's hasher is not).
#[inline]
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The routing hash of a key: timely sends a record to worker `route % peers`.
#[inline]
pub fn route(key: u64) -> u64 {
    mix64(key ^ 0xD1B5_4A32_D192_ED03)
}

/// The worker (0-based, of `peers`) that owns `key`.
#[inline]
pub fn owner(key: u64, peers: usize) -> usize {
    (route(key) % peers as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_keys_spread_over_workers() {
        let peers = 4;
        let mut per_worker = [0usize; 4];
        for key in 0..40_000u64 {
            per_worker[owner(key, peers)] += 1;
        }
        for (worker, n) in per_worker.iter().enumerate() {
            assert!(
                (9_000..11_000).contains(n),
                "worker {worker} owns {n} of 40000 keys"
            );
        }
    }

    #[test]
    fn keys_split_by_residue_still_cross_workers() {
        // Producers often own keys by `key % peers`; routing must not send every
        // record back to its producer (the timely exchange gotcha).
        let peers = 2;
        let stay = (0..10_000u64)
            .filter(|k| owner(*k, peers) == (*k % 2) as usize)
            .count();
        assert!(
            (4_000..6_000).contains(&stay),
            "{stay} of 10000 stayed home"
        );
    }

    #[test]
    fn mix_is_deterministic_and_not_identity() {
        assert_eq!(mix64(1), mix64(1));
        assert_ne!(mix64(1), 1);
        assert_ne!(mix64(1), mix64(2));
    }
}
