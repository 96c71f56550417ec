//! Random numbers every worker draws alike: counter-based, from the shared seed and a position.
//!
//! A rule or a simulated clock that needs randomness (MATCHA's activations, stragglers' delays)
//! draws `uniform(seed, a, b)`: a pure function of its arguments (the SplitMix64 finalizer of a
//! mix of them), so every worker gets the same number without exchanging it, and a resumed run
//! draws the same numbers with no generator state to save.

/// 64 random bits from `(seed, a, b)` (e.g. a worker's own seed from the run's and its rank).
pub fn bits(seed: u64, a: u64, b: u64) -> u64 {
    let mut x = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform number in `[0, 1)` from `(seed, a, b)`, with 53 random bits.
pub fn uniform(seed: u64, a: u64, b: u64) -> f64 {
    (bits(seed, a, b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::uniform;

    #[test]
    fn draws_are_uniform_and_depend_on_every_argument() {
        let draws: Vec<f64> = (0..100_000).map(|k| uniform(7, k, 3)).collect();
        assert!(draws.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        let below_tenth = draws.iter().filter(|&&u| u < 0.1).count() as f64 / draws.len() as f64;
        assert!((below_tenth - 0.1).abs() < 0.005, "{below_tenth}");
        assert_ne!(uniform(7, 1, 3), uniform(8, 1, 3));
        assert_ne!(uniform(7, 1, 3), uniform(7, 2, 3));
        assert_ne!(uniform(7, 1, 3), uniform(7, 1, 4));
        assert_eq!(uniform(7, 1, 3), uniform(7, 1, 3));
    }
}
