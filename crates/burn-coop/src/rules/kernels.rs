//! Numeric kernels shared by the rules: means, distances and weighted sums over flat buffers,
//! written so that the compiler vectorizes them and every worker rounds identically.

/// Lanes of the independent partial sums below: enough for the compiler to keep a vector
/// register busy instead of waiting on one serial f64 accumulator.
const LANES: usize = 16;
/// Elements summed in f32 before the partial sums are folded into f64.
const BLOCK: usize = 2048;

/// `Σ_k f(x_k, y_k)`, accumulated in f32 lanes per block and in f64 across blocks.
#[inline(always)]
fn lane_sum(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    debug_assert_eq!(x.len(), y.len());
    let mut total = 0.0;
    for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
        let mut acc = [0.0f32; LANES];
        let (xs, ys) = (xb.chunks_exact(LANES), yb.chunks_exact(LANES));
        let tail: f32 = xs.remainder().iter().zip(ys.remainder()).map(|(&x, &y)| f(x, y)).sum();
        for (xl, yl) in xs.zip(ys) {
            for l in 0..LANES {
                acc[l] += f(xl[l], yl[l]);
            }
        }
        total += f64::from(tail) + acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    total
}

/// The mean `s / m` of an element-wise sum over `m` workers. For a power of two the
/// multiplication by `1/m` is exact and equal to the division, and faster.
#[derive(Debug, Clone, Copy)]
pub enum MeanOf {
    /// Multiply by `1/m`.
    Scale(f32),
    /// Divide by `m`.
    Divide(f32),
}

impl MeanOf {
    /// The mean over `m` workers.
    pub fn workers(m: usize) -> Self {
        if m.is_power_of_two() { Self::Scale(1.0 / m as f32) } else { Self::Divide(m as f32) }
    }

    /// `‖x − s/m‖²`.
    pub fn distance(self, x: &[f32], s: &[f32]) -> f64 {
        match self {
            Self::Scale(inv) => lane_sum(x, s, |x, s| (x - s * inv) * (x - s * inv)),
            Self::Divide(m) => lane_sum(x, s, |x, s| (x - s / m) * (x - s / m)),
        }
    }

    /// `out ← s/m`.
    pub fn write(self, out: &mut [f32], s: &[f32]) {
        match self {
            Self::Scale(inv) => out.iter_mut().zip(s).for_each(|(o, s)| *o = s * inv),
            Self::Divide(m) => out.iter_mut().zip(s).for_each(|(o, s)| *o = s / m),
        }
    }
}

/// Replaces `params` by the mean `sum/m` and returns `‖params − mean‖²` from before, block by
/// block so each block is read from cache the second time: one pass over memory.
pub fn replace_by_mean(params: &mut [f32], sum: &[f32], m: usize) -> f64 {
    let mean = MeanOf::workers(m);
    let mut total = 0.0;
    for (xb, sb) in params.chunks_mut(BLOCK).zip(sum.chunks(BLOCK)) {
        total += mean.distance(xb, sb);
        mean.write(xb, sb);
    }
    total
}

/// `‖x − s/m‖²` without changing `x` (`s` the workers' element-wise sum of something whose
/// mean `x` is compared with).
pub fn distance_to_mean(x: &[f32], s: &[f32], m: usize) -> f64 {
    MeanOf::workers(m).distance(x, s)
}

/// `x ← s/m` by division, as a mean of `m` workers is written where it is not fused with a
/// distance (the average model that is evaluated).
pub fn divide(x: &mut [f32], m: usize) {
    let m = m as f32;
    x.iter_mut().for_each(|v| *v /= m);
}

/// `out ← w · x`.
pub fn scaled(out: &mut Vec<f32>, w: f32, x: &[f32]) {
    out.clear();
    out.extend(x.iter().map(|v| w * v));
}

/// `out ← x − z`.
pub fn difference(out: &mut Vec<f32>, x: &[f32], z: &[f32]) {
    out.clear();
    out.extend(x.iter().zip(z).map(|(x, z)| x - z));
}

/// `out ← out + w · y`. A weighted sum built from [`scaled`] and one call per term rounds the
/// same whichever communicator delivered the terms, as long as they come in the same order.
pub fn add_scaled(out: &mut [f32], w: f32, y: &[f32]) {
    out.iter_mut().zip(y).for_each(|(o, v)| *o += w * v);
}

/// NaN and infinite values in `values` (counted in lanes so the loop vectorizes).
pub fn count_non_finite(values: &[f32]) -> usize {
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().filter(|v| !v.is_finite()).count();
    let mut acc = [0u32; LANES];
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += u32::from(!chunk[l].is_finite());
        }
    }
    tail + acc.iter().map(|&a| a as usize).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_counted_in_body_and_tail() {
        let mut values = vec![1.0f32; 37];
        values[3] = f32::NAN;
        values[20] = f32::INFINITY;
        values[36] = f32::NEG_INFINITY;
        assert_eq!(count_non_finite(&values), 3);
        assert_eq!(count_non_finite(&values[..16]), 1);
        assert_eq!(count_non_finite(&[]), 0);
    }

    #[test]
    fn mean_distance_matches_a_plain_loop() {
        let x: Vec<f32> = (0..5000).map(|k| (k as f32 * 0.37).sin()).collect();
        let s: Vec<f32> = (0..5000).map(|k| 3.0 * (k as f32 * 0.11).cos()).collect();
        for m in [3, 4] {
            let plain: f64 = x.iter().zip(&s).map(|(&x, &s)| f64::from(x - s / m as f32).powi(2)).sum();
            assert!((distance_to_mean(&x, &s, m) - plain).abs() < 1e-6 * plain, "m = {m}");
            let mut y = x.clone();
            assert_eq!(replace_by_mean(&mut y, &s, m), distance_to_mean(&x, &s, m));
            assert!(y.iter().zip(&s).all(|(y, s)| (y - s / m as f32).abs() <= 1e-7 * s.abs()));
        }
    }

    #[test]
    fn scaled_sums_round_term_by_term() {
        let x: Vec<f32> = (0..100).map(|k| (k as f32 * 0.7).sin()).collect();
        let a: Vec<f32> = (0..100).map(|k| (k as f32 * 0.3).cos()).collect();
        let mut out = Vec::new();
        scaled(&mut out, 1.0 / 3.0, &x);
        add_scaled(&mut out, 0.25, &a);
        for k in 0..100 {
            assert_eq!(out[k].to_bits(), ((1.0f32 / 3.0) * x[k] + 0.25 * a[k]).to_bits());
        }
    }
}
