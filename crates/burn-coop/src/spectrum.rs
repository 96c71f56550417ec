//! Eigenvalues of small dense symmetric matrices (cyclic Jacobi rotations).
//!
//! Mixing matrices are `m × m` with `m` the number of workers (tens to a few thousands), so a
//! plain, exact and dependency-free solver is the right tool.

/// Eigenvalues of the symmetric `n × n` matrix stored row-major in `a`, sorted in decreasing order.
///
/// Uses cyclic Jacobi sweeps until the off-diagonal mass is below `1e-14` of the matrix's norm.
/// The caller guarantees symmetry; only the upper triangle's rotations are tracked.
pub(crate) fn symmetric_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n, "matrix storage does not match its order");
    let mut m = a.to_vec();
    let norm: f64 = m.iter().map(|v| v * v).sum::<f64>().sqrt();
    let tolerance = (norm * 1e-14).max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum::<f64>()
            .sqrt();
        if off <= tolerance {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq.abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                rotate(&mut m, n, p, q, c, s);
            }
        }
    }
    let mut values: Vec<f64> = (0..n).map(|i| m[i * n + i]).collect();
    values.sort_by(|x, y| y.total_cmp(x));
    values
}

/// Applies the Jacobi rotation `Jᵀ M J` in the (p, q) plane.
fn rotate(m: &mut [f64], n: usize, p: usize, q: usize, c: f64, s: f64) {
    for k in 0..n {
        let mkp = m[k * n + p];
        let mkq = m[k * n + q];
        m[k * n + p] = c * mkp - s * mkq;
        m[k * n + q] = s * mkp + c * mkq;
    }
    for k in 0..n {
        let mpk = m[p * n + k];
        let mqk = m[q * n + k];
        m[p * n + k] = c * mpk - s * mqk;
        m[q * n + k] = s * mpk + c * mqk;
    }
}

#[cfg(test)]
mod tests {
    use super::symmetric_eigenvalues;

    #[test]
    fn diagonal_matrix_eigenvalues_are_its_diagonal() {
        let a = [3.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0];
        assert_eq!(symmetric_eigenvalues(&a, 3), vec![3.0, 2.0, -1.0]);
    }

    #[test]
    fn two_by_two_closed_form() {
        // [[2, 1], [1, 2]] has eigenvalues 3 and 1.
        let values = symmetric_eigenvalues(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!((values[0] - 3.0).abs() < 1e-12 && (values[1] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn path_laplacian_matches_closed_form() {
        // Laplacian of the path on 5 nodes: eigenvalues 2 - 2 cos(k π / 5), k = 0..4.
        let n = 5;
        let mut a = vec![0.0; n * n];
        for i in 0..n - 1 {
            a[i * n + i + 1] = -1.0;
            a[(i + 1) * n + i] = -1.0;
            a[i * n + i] += 1.0;
            a[(i + 1) * n + i + 1] += 1.0;
        }
        let values = symmetric_eigenvalues(&a, n);
        let mut expected: Vec<f64> =
            (0..n).map(|k| 2.0 - 2.0 * (k as f64 * std::f64::consts::PI / n as f64).cos()).collect();
        expected.sort_by(|x, y| y.total_cmp(x));
        for (v, e) in values.iter().zip(&expected) {
            assert!((v - e).abs() < 1e-10, "{values:?} vs {expected:?}");
        }
    }
}
