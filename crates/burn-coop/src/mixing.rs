//! Mixing matrices `W`: validation, neighbour lists and spectral quantities.
//!
//! In Cooperative SGD a merge multiplies the matrix of models by `W`: worker `i` becomes
//! `x_i ← Σ_j W_ij x_j`. A valid gossip matrix is square, non-negative, symmetric and doubly
//! stochastic, and its graph is connected; then the workers reach consensus at a rate set by
//! `ζ`, the second-largest eigenvalue magnitude.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spectrum::symmetric_eigenvalues;

/// The largest order of a dense mixing matrix this crate builds: 8·n² bytes and, for its
/// spectrum (Jacobi's method), time cubic in n: 256 workers take about a second, 512 about
/// twenty. Larger groups are refused with what they would cost.
pub const MAX_DENSE_ORDER: usize = 256;

/// Tolerance used when checking sums and symmetry of a user-supplied matrix.
pub const MIXING_TOLERANCE: f64 = 1e-6;

/// Why a matrix is not a valid mixing matrix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MixingError {
    /// The matrix has no rows.
    #[error("mixing matrix is empty: it needs one row per worker")]
    Empty,
    /// A row's length differs from the number of rows.
    #[error("mixing matrix is not square: row {row} has {len} entries but there are {rows} rows")]
    NotSquare {
        /// Offending row.
        row: usize,
        /// Its length.
        len: usize,
        /// Number of rows.
        rows: usize,
    },
    /// An entry is NaN or infinite.
    #[error("mixing matrix entry W[{row}][{col}] = {value} is not finite")]
    NotFinite {
        /// Row index.
        row: usize,
        /// Column index.
        col: usize,
        /// The value.
        value: f64,
    },
    /// An entry is negative.
    #[error("mixing matrix entry W[{row}][{col}] = {value} is negative")]
    Negative {
        /// Row index.
        row: usize,
        /// Column index.
        col: usize,
        /// The value.
        value: f64,
    },
    /// `W[i][j] != W[j][i]`.
    #[error("mixing matrix is not symmetric: W[{row}][{col}] = {upper} but W[{col}][{row}] = {lower}")]
    NotSymmetric {
        /// Row index.
        row: usize,
        /// Column index.
        col: usize,
        /// `W[row][col]`.
        upper: f64,
        /// `W[col][row]`.
        lower: f64,
    },
    /// A row does not sum to one.
    #[error("mixing matrix row {row} sums to {sum}, not 1")]
    RowSum {
        /// Row index.
        row: usize,
        /// Its sum.
        sum: f64,
    },
    /// A column does not sum to one.
    #[error("mixing matrix column {col} sums to {sum}, not 1")]
    ColumnSum {
        /// Column index.
        col: usize,
        /// Its sum.
        sum: f64,
    },
    /// The graph of non-zero entries has more than one connected component.
    #[error(
        "mixing matrix graph is disconnected: worker {unreachable} cannot be reached from worker 0 ({components} components); the workers would never agree"
    )]
    Disconnected {
        /// A worker not reachable from worker 0.
        unreachable: usize,
        /// Number of connected components.
        components: usize,
    },
}

/// A validated `m × m` mixing matrix, stored row-major in `f64`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixingMatrix {
    order: usize,
    entries: Vec<f64>,
}

impl MixingMatrix {
    /// Validates and wraps a user-supplied matrix given as rows.
    ///
    /// Checks, in this order: non-empty, square, finite, non-negative, rows and columns summing
    /// to one (within [`MIXING_TOLERANCE`]), symmetric, connected. Each failure is a
    /// [`MixingError`] naming the offending entry, row or worker.
    pub fn new(rows: Vec<Vec<f64>>) -> Result<Self, MixingError> {
        let order = rows.len();
        if order == 0 {
            return Err(MixingError::Empty);
        }
        let mut entries = Vec::with_capacity(order * order);
        for (row, values) in rows.iter().enumerate() {
            if values.len() != order {
                return Err(MixingError::NotSquare { row, len: values.len(), rows: order });
            }
            entries.extend_from_slice(values);
        }
        let matrix = Self { order, entries };
        matrix.validate()?;
        Ok(matrix)
    }

    /// The identity: every worker keeps its own model (the `W` of a local step).
    pub fn identity(order: usize) -> Self {
        let mut entries = vec![0.0; order * order];
        for i in 0..order {
            entries[i * order + i] = 1.0;
        }
        Self { order, entries }
    }

    /// `J = 11ᵀ/m`: exact averaging.
    pub fn averaging(order: usize) -> Self {
        Self { order, entries: vec![1.0 / order as f64; order * order] }
    }

    /// Builds a matrix from row-major entries without validation (for derived matrices such
    /// as elastic averaging's, whose anchor entry may be negative).
    pub(crate) fn from_entries_unchecked(order: usize, entries: Vec<f64>) -> Self {
        debug_assert_eq!(entries.len(), order * order);
        Self { order, entries }
    }

    fn validate(&self) -> Result<(), MixingError> {
        let n = self.order;
        for row in 0..n {
            for col in 0..n {
                let value = self.get(row, col);
                if !value.is_finite() {
                    return Err(MixingError::NotFinite { row, col, value });
                }
                if value < 0.0 {
                    return Err(MixingError::Negative { row, col, value });
                }
            }
        }
        for row in 0..n {
            let sum: f64 = self.row(row).iter().sum();
            if (sum - 1.0).abs() > MIXING_TOLERANCE {
                return Err(MixingError::RowSum { row, sum });
            }
        }
        for col in 0..n {
            let sum: f64 = (0..n).map(|row| self.get(row, col)).sum();
            if (sum - 1.0).abs() > MIXING_TOLERANCE {
                return Err(MixingError::ColumnSum { col, sum });
            }
        }
        for row in 0..n {
            for col in row + 1..n {
                let (upper, lower) = (self.get(row, col), self.get(col, row));
                if (upper - lower).abs() > MIXING_TOLERANCE {
                    return Err(MixingError::NotSymmetric { row, col, upper, lower });
                }
            }
        }
        let labels = connected_components(n, |i, j| self.get(i, j) != 0.0 || self.get(j, i) != 0.0);
        let components = labels.iter().max().map_or(0, |max| max + 1);
        if components > 1 {
            let unreachable = labels.iter().position(|&label| label != 0).unwrap_or(0);
            return Err(MixingError::Disconnected { unreachable, components });
        }
        Ok(())
    }

    /// Number of rows (= columns).
    pub fn order(&self) -> usize {
        self.order
    }

    /// Entry `W[row][col]`.
    pub fn get(&self, row: usize, col: usize) -> f64 {
        self.entries[row * self.order + col]
    }

    /// Row `row` of the matrix.
    pub fn row(&self, row: usize) -> &[f64] {
        &self.entries[row * self.order..(row + 1) * self.order]
    }

    /// All entries, row-major.
    pub fn entries(&self) -> &[f64] {
        &self.entries
    }

    /// The rows as vectors (for printing or serializing).
    pub fn to_rows(&self) -> Vec<Vec<f64>> {
        self.entries.chunks(self.order).map(<[f64]>::to_vec).collect()
    }

    /// The weight worker `rank` keeps on its own model, `W[rank][rank]`.
    pub fn self_weight(&self, rank: usize) -> f64 {
        self.get(rank, rank)
    }

    /// The mean number of neighbours per worker (off-diagonal non-zeros per row): the models a
    /// gossip merge sends per worker.
    pub fn mean_degree(&self) -> f64 {
        let links: usize = (0..self.order()).map(|i| self.neighbors(i).len()).sum();
        links as f64 / self.order().max(1) as f64
    }

    /// The other workers `rank` mixes with and their weights `W[rank][j]`, in increasing `j`.
    pub fn neighbors(&self, rank: usize) -> Vec<(usize, f64)> {
        self.row(rank).iter().enumerate().filter(|&(j, &w)| j != rank && w != 0.0).map(|(j, &w)| (j, w)).collect()
    }

    /// Eigenvalues in decreasing order (the matrix is symmetric).
    pub fn eigenvalues(&self) -> Vec<f64> {
        symmetric_eigenvalues(&self.entries, self.order)
    }

    /// `ζ = max(|λ₂|, |λ_m|)`: the second-largest eigenvalue magnitude. 0 for exact averaging;
    /// closer to 1 means slower consensus. A one-worker matrix has `ζ = 0`.
    pub fn zeta(&self) -> f64 {
        let values = self.eigenvalues();
        // The largest eigenvalue of a doubly stochastic matrix is 1; drop the one closest to 1.
        let top =
            values.iter().enumerate().min_by(|a, b| (a.1 - 1.0).abs().total_cmp(&(b.1 - 1.0).abs())).map(|(i, _)| i);
        values.iter().enumerate().filter(|&(i, _)| Some(i) != top).map(|(_, v)| v.abs()).fold(0.0, f64::max)
    }

    /// The spectral gap `1 − ζ`.
    pub fn spectral_gap(&self) -> f64 {
        1.0 - self.zeta()
    }

    /// `WᵀW` (symmetric, doubly stochastic when `W` is).
    pub fn gram(&self) -> MixingMatrix {
        let n = self.order;
        let mut entries = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                entries[i * n + j] = (0..n).map(|k| self.get(k, i) * self.get(k, j)).sum();
            }
        }
        Self { order: n, entries }
    }

    /// The mean of several matrices of one order (the second moment of a cycle of merges).
    pub fn mean_of(matrices: &[MixingMatrix]) -> Option<MixingMatrix> {
        let first = matrices.first()?;
        let mut entries = vec![0.0; first.entries.len()];
        for matrix in matrices {
            entries.iter_mut().zip(&matrix.entries).for_each(|(e, v)| *e += v / matrices.len() as f64);
        }
        Some(Self { order: first.order, entries })
    }

    /// Multiplies a `d × m` matrix of column vectors by this matrix: `X W`. Each element of
    /// `columns` is one worker's vector. Used by tests and by `coop topology` to show the
    /// effect of one merge.
    pub fn apply(&self, columns: &[Vec<f64>]) -> Vec<Vec<f64>> {
        assert_eq!(columns.len(), self.order, "one column per worker");
        let d = columns.first().map_or(0, Vec::len);
        (0..self.order)
            .map(|j| (0..d).map(|k| (0..self.order).map(|i| columns[i][k] * self.get(i, j)).sum()).collect())
            .collect()
    }
}

impl fmt::Display for MixingMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for row in 0..self.order {
            let cells: Vec<String> = self.row(row).iter().map(|v| format!("{v:>7.4}")).collect();
            writeln!(f, "{}", cells.join(" "))?;
        }
        Ok(())
    }
}

/// Labels each of `n` nodes with its connected component (0-based, in order of discovery).
pub(crate) fn connected_components(n: usize, edge: impl Fn(usize, usize) -> bool) -> Vec<usize> {
    let mut labels = vec![usize::MAX; n];
    let mut next = 0;
    for start in 0..n {
        if labels[start] != usize::MAX {
            continue;
        }
        labels[start] = next;
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            for j in 0..n {
                if labels[j] == usize::MAX && i != j && edge(i, j) {
                    labels[j] = next;
                    stack.push(j);
                }
            }
        }
        next += 1;
    }
    labels
}
