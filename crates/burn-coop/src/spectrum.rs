//! Eigenvalues of small dense symmetric matrices (cyclic Jacobi rotations).
//!
//! Mixing matrices are `m × m` with `m` the number of workers (tens to a few thousands), so a
//! plain, exact and dependency-free solver is the right tool.

/// Eigenvalues of the symmetric `n × n` matrix stored row-major in `a`, sorted in decreasing order.
///
/// Uses cyclic Jacobi sweeps until the off-diagonal mass is below `1e-14` of the matrix's norm.
/// The caller guarantees symmetry; only the upper triangle's rotations are tracked.
pub(crate) fn symmetric_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    let mut values = jacobi(a, n, None);
    values.sort_by(|x, y| y.total_cmp(x));
    values
}

/// Eigenvalues in decreasing order and their unit eigenvectors (`vectors[k]` belongs to
/// `values[k]`) of the symmetric `n × n` matrix `a`, by the same Jacobi sweeps.
pub(crate) fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut v = vec![0.0; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    let values = jacobi(a, n, Some(&mut v));
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| values[y].total_cmp(&values[x]));
    let vectors = order.iter().map(|&k| (0..n).map(|i| v[i * n + k]).collect()).collect();
    (order.iter().map(|&k| values[k]).collect(), vectors)
}

/// Diagonalizes `a` by cyclic Jacobi rotations; returns the diagonal (unsorted) and, when
/// given `vectors` (the identity on entry), accumulates the rotations into it (columns).
fn jacobi(a: &[f64], n: usize, mut vectors: Option<&mut [f64]>) -> Vec<f64> {
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
                if let Some(v) = vectors.as_deref_mut() {
                    for k in 0..n {
                        let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                        v[k * n + p] = c * vkp - s * vkq;
                        v[k * n + q] = s * vkp + c * vkq;
                    }
                }
            }
        }
    }
    (0..n).map(|i| m[i * n + i]).collect()
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
    use super::{symmetric_eigen, symmetric_eigenvalues};

    #[test]
    fn eigenvectors_satisfy_a_v_equals_lambda_v() {
        let a = [4.0, 1.0, 0.5, 1.0, 3.0, -1.0, 0.5, -1.0, 2.0];
        let (values, vectors) = symmetric_eigen(&a, 3);
        assert_eq!(values, symmetric_eigenvalues(&a, 3));
        for (lambda, v) in values.iter().zip(&vectors) {
            let norm: f64 = v.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-12);
            for i in 0..3 {
                let av: f64 = (0..3).map(|j| a[i * 3 + j] * v[j]).sum();
                assert!((av - lambda * v[i]).abs() < 1e-12, "row {i}: {av} vs {}", lambda * v[i]);
            }
        }
    }

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
