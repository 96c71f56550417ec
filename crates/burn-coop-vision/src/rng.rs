//! A small, seedable, platform-independent PRNG (SplitMix64) and the samplers the pipeline needs.
//!
//! Streams are derived from `(seed, a, b)` keys with [`stream_seed`], so that e.g. the
//! augmentation of an image depends only on `(seed, epoch, index)`.

/// SplitMix64 finalizer: a bijective 64-bit mixing function.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed for the stream identified by `(seed, a, b)`.
pub fn stream_seed(seed: u64, a: u64, b: u64) -> u64 {
    let h = mix64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let h = mix64(h ^ a.wrapping_mul(0xd1b5_4a32_d192_ed03));
    mix64(h ^ b.wrapping_mul(0xaef1_7502_108e_f2d9))
}

/// SplitMix64 generator (Steele, Lea & Flood 2014).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for the stream `(seed, a, b)`.
    pub fn stream(seed: u64, a: u64, b: u64) -> Self {
        Self::new(stream_seed(seed, a, b))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (unbiased; `n` must be > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// Standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Natural logarithm of a Gamma(`shape`, 1) sample (Marsaglia & Tsang 2000; for
    /// `shape < 1` the boost `G(shape) = G(shape + 1) · U^(1/shape)` is applied in log space, so
    /// tiny shapes do not underflow).
    pub fn ln_gamma_sample(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.next_f64();
            return self.ln_gamma_sample(shape + 1.0) + u.ln() / shape;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = 1.0 - self.next_f64();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return (d * v).ln();
            }
        }
    }

    /// A sample of the symmetric Dirichlet(`beta`, …, `beta`) over `k` outcomes.
    pub fn dirichlet(&mut self, beta: f64, k: usize) -> Vec<f64> {
        let logs: Vec<f64> = (0..k).map(|_| self.ln_gamma_sample(beta)).collect();
        let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / sum).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_mean_matches_shape() {
        let mut rng = SplitMix64::new(1);
        for shape in [0.1, 0.5, 1.0, 3.0] {
            let n = 40_000;
            let mean: f64 = (0..n).map(|_| rng.ln_gamma_sample(shape).exp()).sum::<f64>() / n as f64;
            assert!((mean - shape).abs() < 0.05 * shape.max(0.5), "shape {shape}: {mean}");
        }
    }

    #[test]
    fn below_is_in_range_and_covers() {
        let mut rng = SplitMix64::new(3);
        let mut seen = [false; 9];
        for _ in 0..1000 {
            seen[rng.below(9) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
