//! Mixing matrices `W`: validation, neighbour lists and spectral quantities.
//!
//! In Cooperative SGD a merge multiplies the matrix of models by `W`: worker `i` becomes
//! `x_i ← Σ_j W_ij x_j`. A valid gossip matrix is square, non-negative, symmetric and doubly
//! stochastic, and its graph is connected; then the workers reach consensus at a rate set by
//! `ζ`, the second-largest eigenvalue magnitude.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spectrum::symmetric_eigenvalues;

/// The largest order whose spectrum is computed densely (Jacobi's method: 8·n² bytes, time cubic
/// in n; 256 workers take about a second, 512 about twenty). Larger circulant matrices (rings,
/// exponential graphs, tori, their second moments) have theirs in closed form; other large ones
/// are refused with what they would cost.
pub const MAX_DENSE_ORDER: usize = 256;

/// The most non-zero entries a mixing matrix holds (16 bytes each: 256 MiB); a ring of 100,000
/// workers has 300,000.
pub const MAX_NONZEROS: usize = 1 << 24;

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
    /// The spectrum of a large matrix that is not circulant.
    #[error(
        "the spectrum of a {order} x {order} mixing matrix is computed densely up to {most} workers (time cubic in the workers); beyond, only for circulant graphs (ring, exponential, torus)"
    )]
    SpectrumTooLarge {
        /// The matrix's order.
        order: usize,
        /// [`MAX_DENSE_ORDER`].
        most: usize,
    },
}

/// A validated `m × m` mixing matrix, stored sparse: each row's non-zero entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixingMatrix {
    order: usize,
    /// Row `i`'s non-zero entries `(column, value)`, in increasing column.
    rows: Vec<Vec<(usize, f64)>>,
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
        if let Some((row, values)) = rows.iter().enumerate().find(|(_, values)| values.len() != order) {
            return Err(MixingError::NotSquare { row, len: values.len(), rows: order });
        }
        let matrix = Self::from_dense_unchecked(order, rows.concat());
        matrix.validate()?;
        Ok(matrix)
    }

    /// Validates and wraps a matrix given by each row's non-zero entries `(column, value)` in
    /// increasing column (the form graphs build, in memory proportional to their edges).
    pub fn from_sparse(order: usize, rows: Vec<Vec<(usize, f64)>>) -> Result<Self, MixingError> {
        if order == 0 {
            return Err(MixingError::Empty);
        }
        if let Some((row, values)) = rows.iter().enumerate().find(|(_, r)| r.iter().any(|&(col, _)| col >= order)) {
            return Err(MixingError::NotSquare { row, len: values.last().map_or(0, |e| e.0 + 1), rows: order });
        }
        if rows.len() != order {
            return Err(MixingError::NotSquare { row: rows.len().min(order), len: order, rows: rows.len() });
        }
        let matrix = Self::from_sparse_unchecked(order, rows);
        matrix.validate()?;
        Ok(matrix)
    }

    /// The identity: every worker keeps its own model (the `W` of a local step).
    pub fn identity(order: usize) -> Self {
        Self { order, rows: (0..order).map(|i| vec![(i, 1.0)]).collect() }
    }

    /// `J = 11ᵀ/m`: exact averaging (`m²` non-zeros).
    pub fn averaging(order: usize) -> Self {
        let row: Vec<(usize, f64)> = (0..order).map(|j| (j, 1.0 / order as f64)).collect();
        Self { order, rows: vec![row; order] }
    }

    /// Builds a matrix from row-major entries without validation (for derived matrices such
    /// as elastic averaging's, whose anchor entry may be negative); zeros are not stored.
    pub(crate) fn from_dense_unchecked(order: usize, entries: Vec<f64>) -> Self {
        debug_assert_eq!(entries.len(), order * order);
        let rows = entries
            .chunks(order.max(1))
            .take(order)
            .map(|row| row.iter().enumerate().filter(|&(_, &v)| v != 0.0).map(|(j, &v)| (j, v)).collect())
            .collect();
        Self { order, rows }
    }

    /// Builds a matrix from each row's non-zero entries (increasing column) without validation.
    pub(crate) fn from_sparse_unchecked(order: usize, mut rows: Vec<Vec<(usize, f64)>>) -> Self {
        for row in &mut rows {
            row.retain(|&(_, v)| v != 0.0);
            debug_assert!(row.windows(2).all(|pair| pair[0].0 < pair[1].0), "columns in increasing order");
        }
        Self { order, rows }
    }

    fn validate(&self) -> Result<(), MixingError> {
        for (row, entries) in self.rows.iter().enumerate() {
            for &(col, value) in entries {
                if !value.is_finite() {
                    return Err(MixingError::NotFinite { row, col, value });
                }
                if value < 0.0 {
                    return Err(MixingError::Negative { row, col, value });
                }
            }
        }
        for (row, entries) in self.rows.iter().enumerate() {
            let sum: f64 = entries.iter().map(|e| e.1).sum();
            if (sum - 1.0).abs() > MIXING_TOLERANCE {
                return Err(MixingError::RowSum { row, sum });
            }
        }
        let mut columns = vec![0.0; self.order];
        for &(col, value) in self.rows.iter().flatten() {
            columns[col] += value;
        }
        if let Some((col, &sum)) = columns.iter().enumerate().find(|(_, sum)| (**sum - 1.0).abs() > MIXING_TOLERANCE) {
            return Err(MixingError::ColumnSum { col, sum });
        }
        let mut asymmetric: Option<(usize, usize)> = None;
        for (row, entries) in self.rows.iter().enumerate() {
            for &(col, value) in entries {
                if (value - self.get(col, row)).abs() > MIXING_TOLERANCE {
                    let pair = (row.min(col), row.max(col));
                    asymmetric = Some(asymmetric.map_or(pair, |found| found.min(pair)));
                }
            }
        }
        if let Some((row, col)) = asymmetric {
            return Err(MixingError::NotSymmetric { row, col, upper: self.get(row, col), lower: self.get(col, row) });
        }
        // Edges either way (an entry within the tolerance of symmetric may have no mirror).
        let mut linked: Vec<Vec<usize>> = self.rows.iter().map(|row| row.iter().map(|e| e.0).collect()).collect();
        for (row, entries) in self.rows.iter().enumerate() {
            for &(col, _) in entries {
                linked[col].push(row);
            }
        }
        let labels = connected_components(self.order, |i| linked[i].iter().copied());
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

    /// The number of non-zero entries.
    pub fn nonzeros(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// Entry `W[row][col]`.
    pub fn get(&self, row: usize, col: usize) -> f64 {
        let entries = &self.rows[row];
        entries.binary_search_by_key(&col, |e| e.0).map_or(0.0, |k| entries[k].1)
    }

    /// Row `row`'s non-zero entries `(column, value)`, in increasing column.
    pub fn row(&self, row: usize) -> &[(usize, f64)] {
        &self.rows[row]
    }

    /// The rows as dense vectors (for printing or serializing small matrices: `m²` values).
    pub fn to_rows(&self) -> Vec<Vec<f64>> {
        (0..self.order).map(|i| self.dense_row(i)).collect()
    }

    fn dense_row(&self, row: usize) -> Vec<f64> {
        let mut dense = vec![0.0; self.order];
        for &(col, value) in &self.rows[row] {
            dense[col] = value;
        }
        dense
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
        self.rows[rank].iter().copied().filter(|&(j, _)| j != rank).collect()
    }

    /// Eigenvalues in decreasing order (the matrix is symmetric): computed densely up to
    /// [`MAX_DENSE_ORDER`] workers, in closed form for a larger symmetric matrix that is
    /// circulant (rings, exponential graphs: `λ_k = Σ_j c_j cos(2πjk/m)`) or block-circulant with
    /// circulant blocks (tori: `λ_ab = Σ c_(r,s) cos(2π(ar/R + bs/C))`), and refused for any other.
    pub fn eigenvalues(&self) -> Result<Vec<f64>, MixingError> {
        let n = self.order;
        if n <= MAX_DENSE_ORDER {
            let dense: Vec<f64> = (0..n).flat_map(|i| self.dense_row(i)).collect();
            return Ok(symmetric_eigenvalues(&dense, n));
        }
        let (rows, cols) =
            self.circulant_shape().ok_or(MixingError::SpectrumTooLarge { order: n, most: MAX_DENSE_ORDER })?;
        let offsets: Vec<(usize, usize, f64)> = self.rows[0].iter().map(|&(j, c)| (j / cols, j % cols, c)).collect();
        let turn = 2.0 * std::f64::consts::PI;
        let mut values: Vec<f64> = (0..n)
            .map(|k| {
                let (a, b) = (k / cols, k % cols);
                offsets
                    .iter()
                    .map(|&(r, s, c)| {
                        let phase = ((a * r) % rows) as f64 / rows as f64 + ((b * s) % cols) as f64 / cols as f64;
                        c * (turn * phase).cos()
                    })
                    .sum()
            })
            .collect();
        values.sort_by(|a, b| b.total_cmp(a));
        Ok(values)
    }

    /// The shape `(R, C)`, `R·C = m` with `R` the smallest that fits, for which the matrix is
    /// symmetric and block-circulant with circulant blocks: worker `i` sits at `(i / C, i mod C)`
    /// and `W_ij = c(r_j − r_i, s_j − s_i)`, offsets taken modulo the shape. A circulant matrix is
    /// the shape `(1, m)`; a `R × C` torus the shape `(R, C)`.
    fn circulant_shape(&self) -> Option<(usize, usize)> {
        let n = self.order;
        (1..=n)
            .filter(|rows| n.is_multiple_of(*rows))
            .map(|rows| (rows, n / rows))
            .find(|&shape| self.is_circulant(shape))
    }

    fn is_circulant(&self, (rows, cols): (usize, usize)) -> bool {
        let first = &self.rows[0];
        let at = |i: usize| (i / cols, i % cols);
        let index = |r: usize, s: usize| (r % rows) * cols + s % cols;
        let same = |i: usize, j: usize, c: f64| self.get(i, j).to_bits() == c.to_bits();
        let symmetric = first.iter().all(|&(j, c)| {
            let (r, s) = at(j);
            same(0, index(rows - r, cols - s), c)
        });
        symmetric
            && (1..self.order).all(|i| {
                let (ri, si) = at(i);
                self.rows[i].len() == first.len()
                    && first.iter().all(|&(j, c)| {
                        let (r, s) = at(j);
                        same(i, index(ri + r, si + s), c)
                    })
            })
    }

    /// `ζ = max(|λ₂|, |λ_m|)`: the second-largest eigenvalue magnitude. 0 for exact averaging;
    /// closer to 1 means slower consensus. A one-worker matrix has `ζ = 0`.
    pub fn zeta(&self) -> Result<f64, MixingError> {
        let values = self.eigenvalues()?;
        // The largest eigenvalue of a doubly stochastic matrix is 1; drop the one closest to 1.
        let top =
            values.iter().enumerate().min_by(|a, b| (a.1 - 1.0).abs().total_cmp(&(b.1 - 1.0).abs())).map(|(i, _)| i);
        Ok(values.iter().enumerate().filter(|&(i, _)| Some(i) != top).map(|(_, v)| v.abs()).fold(0.0, f64::max))
    }

    /// The spectral gap `1 − ζ`.
    pub fn spectral_gap(&self) -> Result<f64, MixingError> {
        self.zeta().map(|zeta| 1.0 - zeta)
    }

    /// `WᵀW` (symmetric, doubly stochastic when `W` is): `Σ_k W_ki W_kj`, summed over `k` in
    /// increasing order as a dense product would.
    pub fn gram(&self) -> MixingMatrix {
        let mut rows: Vec<std::collections::BTreeMap<usize, f64>> = vec![Default::default(); self.order];
        for entries in &self.rows {
            for &(i, a) in entries {
                for &(j, b) in entries {
                    *rows[i].entry(j).or_insert(0.0) += a * b;
                }
            }
        }
        Self::from_sparse_unchecked(self.order, rows.into_iter().map(|row| row.into_iter().collect()).collect())
    }

    /// The mean of several matrices of one order (the second moment of a cycle of merges).
    pub fn mean_of(matrices: &[MixingMatrix]) -> Option<MixingMatrix> {
        let first = matrices.first()?;
        let mut rows: Vec<std::collections::BTreeMap<usize, f64>> = vec![Default::default(); first.order];
        for matrix in matrices {
            for (i, entries) in matrix.rows.iter().enumerate() {
                for &(j, v) in entries {
                    *rows[i].entry(j).or_insert(0.0) += v / matrices.len() as f64;
                }
            }
        }
        Some(Self::from_sparse_unchecked(first.order, rows.into_iter().map(|row| row.into_iter().collect()).collect()))
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
            let cells: Vec<String> = self.dense_row(row).iter().map(|v| format!("{v:>7.4}")).collect();
            writeln!(f, "{}", cells.join(" "))?;
        }
        Ok(())
    }
}

/// Labels each of `n` nodes with its connected component (0-based, in order of discovery),
/// given each node's neighbours.
pub(crate) fn connected_components<I: IntoIterator<Item = usize>>(
    n: usize,
    neighbors: impl Fn(usize) -> I,
) -> Vec<usize> {
    let mut labels = vec![usize::MAX; n];
    let mut next = 0;
    for start in 0..n {
        if labels[start] != usize::MAX {
            continue;
        }
        labels[start] = next;
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            for j in neighbors(i) {
                if labels[j] == usize::MAX {
                    labels[j] = next;
                    stack.push(j);
                }
            }
        }
        next += 1;
    }
    labels
}
