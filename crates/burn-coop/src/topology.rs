//! Communication graphs between workers and the mixing matrices built on them.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::mixing::{MixingError, MixingMatrix, connected_components};

/// A communication graph by name, sized later to the number of workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TopologySpec {
    /// Ring.
    #[default]
    Ring,
    /// The most square 2-D torus for the number of workers.
    Torus,
    /// Exponential graph (neighbours at distance `2^k`).
    Exponential,
    /// Complete graph.
    Complete,
    /// One-peer exponential graph (Ying et al., NeurIPS 2021): a different directed graph at
    /// every merge, each worker averaging with one peer at distance `2^(k mod ⌈log₂ m⌉)`. It has
    /// no single graph; gossip builds its matrices round by round
    /// ([`one_peer_exponential_matrix`]).
    OnePeerExponential,
}

impl TopologySpec {
    /// The topology on `workers` nodes.
    pub fn build(self, workers: usize) -> Result<Topology, TopologyError> {
        match self {
            Self::Ring => Topology::ring(workers),
            Self::Torus => Topology::torus_for(workers),
            Self::Exponential => Topology::exponential(workers),
            Self::Complete => Topology::complete(workers),
            Self::OnePeerExponential => Err(TopologyError::TimeVarying { name: "one-peer-exponential" }),
        }
    }

    /// Whether the graph changes from merge to merge.
    pub fn is_time_varying(self) -> bool {
        matches!(self, Self::OnePeerExponential)
    }
}

/// The one-peer exponential graph's peer distance at merge `round` for `workers` workers:
/// `2^(round mod ⌈log₂ m⌉)` (Ying, Yuan, Chen, Hu, Pan & Yin, "Exponential Graph is Provably
/// Efficient for Decentralized Deep Training", NeurIPS 2021, eq. (8)); `None` for one worker.
pub fn one_peer_exponential_distance(workers: usize, round: u64) -> Option<usize> {
    if workers < 2 {
        return None;
    }
    let period = workers.next_power_of_two().trailing_zeros() as u64;
    Some((1usize << (round % period)) % workers)
}

/// The one-peer exponential mixing matrix at merge `round`: worker `i` becomes
/// `½ x_i + ½ x_{(i + d) mod m}` with `d` from [`one_peer_exponential_distance`], so in the
/// column convention of `X W` the entries are `W[i][i] = W[(i + d) mod m][i] = ½`. Doubly
/// stochastic, not symmetric (unless `d = m/2`); for `m` a power of two the product of
/// `log₂ m` consecutive matrices is exact averaging.
pub fn one_peer_exponential_matrix(workers: usize, round: u64) -> MixingMatrix {
    let Some(d) = one_peer_exponential_distance(workers, round) else {
        return MixingMatrix::identity(workers);
    };
    // Row r: ½ on itself and ½ on the worker whose model r receives, (r − d) mod m.
    let rows = (0..workers)
        .map(|r| {
            let from = (r + workers - d) % workers;
            let mut row = if from == r { vec![(r, 1.0)] } else { vec![(r, 0.5), (from, 0.5)] };
            row.sort_by_key(|entry| entry.0);
            row
        })
        .collect();
    MixingMatrix::from_sparse_unchecked(workers, rows)
}

/// Why a topology cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    /// A topology needs at least one worker.
    #[error("a topology needs at least one worker, got 0")]
    NoWorkers,
    /// A torus side is zero.
    #[error("torus sides must be at least 1, got {rows} x {cols}")]
    EmptyTorus {
        /// Rows of the torus.
        rows: usize,
        /// Columns of the torus.
        cols: usize,
    },
    /// A torus whose sides do not multiply to the number of workers.
    #[error("a {rows} x {cols} torus has {product} nodes, but there are {workers} workers")]
    TorusSize {
        /// Rows of the torus.
        rows: usize,
        /// Columns of the torus.
        cols: usize,
        /// `rows * cols`.
        product: usize,
        /// Workers requested.
        workers: usize,
    },
    /// `m` has no factorization into a torus with both sides ≥ 2.
    #[error("{workers} workers cannot form a 2-D torus with both sides at least 2; give the sides explicitly")]
    NoSquareishTorus {
        /// Workers requested.
        workers: usize,
    },
    /// A graph with more edges than a mixing matrix holds.
    #[error(
        "{workers} workers: this graph's mixing matrix would hold {nonzeros} non-zeros ({} MiB); at most {}",
        nonzeros.saturating_mul(16) >> 20,
        crate::mixing::MAX_NONZEROS
    )]
    TooLarge {
        /// Workers requested.
        workers: usize,
        /// Non-zeros of its mixing matrix: the workers and twice the edges.
        nonzeros: u64,
    },
    /// Adjacency rows of uneven length.
    #[error("adjacency matrix is not square: row {row} has {len} entries but there are {rows} rows")]
    AdjacencyNotSquare {
        /// Offending row.
        row: usize,
        /// Its length.
        len: usize,
        /// Number of rows.
        rows: usize,
    },
    /// `A[i][j] != A[j][i]`.
    #[error("adjacency matrix is not symmetric: A[{row}][{col}] = {forward} but A[{col}][{row}] = {backward}")]
    AdjacencyNotSymmetric {
        /// Row index.
        row: usize,
        /// Column index.
        col: usize,
        /// `A[row][col]`.
        forward: bool,
        /// `A[col][row]`.
        backward: bool,
    },
    /// The graph has more than one component.
    #[error(
        "topology graph is disconnected: worker {unreachable} cannot be reached from worker 0 ({components} components)"
    )]
    Disconnected {
        /// A worker not reachable from worker 0.
        unreachable: usize,
        /// Number of components.
        components: usize,
    },
    /// The topology changes every merge, so it has no single graph or matrix.
    #[error("{name} changes from merge to merge: it has no single graph (it is available to gossip)")]
    TimeVarying {
        /// The topology's name.
        name: &'static str,
    },
    /// The weights produced for this graph are not a valid mixing matrix.
    #[error(transparent)]
    Mixing(#[from] MixingError),
}

/// How edge weights are chosen when turning a graph into a mixing matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightRule {
    /// Metropolis–Hastings: `W_ij = 1 / (1 + max(d_i, d_j))` on each edge and the rest of the
    /// row on the diagonal. Symmetric and doubly stochastic on any graph; on a `d`-regular graph
    /// (ring, torus, complete, exponential) every neighbour and the worker itself get `1/(d+1)`.
    #[default]
    MetropolisHastings,
    /// Best constant edge weight: `W = I − α L` with `L` the graph Laplacian and
    /// `α = 2 / (λ₂(L) + λ_max(L))`, which minimizes `ζ` over constant edge weights. On
    /// irregular graphs that α can make a diagonal entry negative; it is then capped at
    /// `1 / d_max` so that `W` stays non-negative.
    BestConstant,
}

/// The shape of the communication graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum TopologyKind {
    /// Everybody talks to everybody.
    Complete,
    /// Worker `i` talks to `i − 1` and `i + 1` (mod m).
    Ring,
    /// A `rows × cols` 2-D torus: up, down, left and right with wrap-around.
    Torus {
        /// Rows of the grid.
        rows: usize,
        /// Columns of the grid.
        cols: usize,
    },
    /// Worker `i` talks to `i ± 2^k` (mod m) for every `2^k < m`.
    Exponential,
    /// A user-supplied symmetric adjacency matrix (the diagonal is ignored).
    Custom {
        /// `adjacency[i][j]` is true when `i` and `j` exchange models.
        adjacency: Vec<Vec<bool>>,
    },
}

/// A connected, undirected communication graph on `m` workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    workers: usize,
    kind: TopologyKind,
    neighbors: Vec<BTreeSet<usize>>,
}

impl Topology {
    /// Builds a topology of the given shape on `workers` nodes (for a torus, `rows * cols` must
    /// equal `workers`; for a custom graph, the adjacency's order).
    pub fn new(workers: usize, kind: TopologyKind) -> Result<Self, TopologyError> {
        match kind {
            TopologyKind::Custom { adjacency } => {
                if adjacency.len() != workers {
                    return Err(TopologyError::AdjacencyNotSquare { row: 0, len: workers, rows: adjacency.len() });
                }
                Self::from_adjacency(adjacency)
            }
            TopologyKind::Torus { rows, cols } if rows == 0 || cols == 0 => {
                Err(TopologyError::EmptyTorus { rows, cols })
            }
            kind => Self::build(workers, kind),
        }
    }

    /// The complete graph on `workers` nodes (its mixing matrix is exact averaging).
    pub fn complete(workers: usize) -> Result<Self, TopologyError> {
        Self::build(workers, TopologyKind::Complete)
    }

    /// The ring on `workers` nodes.
    pub fn ring(workers: usize) -> Result<Self, TopologyError> {
        Self::build(workers, TopologyKind::Ring)
    }

    /// A `rows × cols` torus (`rows * cols` workers).
    pub fn torus(rows: usize, cols: usize) -> Result<Self, TopologyError> {
        if rows == 0 || cols == 0 {
            return Err(TopologyError::EmptyTorus { rows, cols });
        }
        Self::build(rows * cols, TopologyKind::Torus { rows, cols })
    }

    /// The most square torus with `workers` nodes and both sides at least 2
    /// (e.g. 4 → 2×2, 6 → 2×3, 16 → 4×4).
    pub fn torus_for(workers: usize) -> Result<Self, TopologyError> {
        let rows = (2..=workers.isqrt())
            .rev()
            .find(|&r| workers.is_multiple_of(r))
            .ok_or(TopologyError::NoSquareishTorus { workers })?;
        Self::torus(rows, workers / rows)
    }

    /// The static exponential graph: neighbours at distance `2^k` in both directions.
    pub fn exponential(workers: usize) -> Result<Self, TopologyError> {
        Self::build(workers, TopologyKind::Exponential)
    }

    /// A user-supplied adjacency matrix. It must be square, symmetric and connected; the
    /// diagonal is ignored (every worker always keeps part of its own model).
    pub fn from_adjacency(adjacency: Vec<Vec<bool>>) -> Result<Self, TopologyError> {
        let rows = adjacency.len();
        for (row, values) in adjacency.iter().enumerate() {
            if values.len() != rows {
                return Err(TopologyError::AdjacencyNotSquare { row, len: values.len(), rows });
            }
        }
        for row in 0..rows {
            for col in row + 1..rows {
                let (forward, backward) = (adjacency[row][col], adjacency[col][row]);
                if forward != backward {
                    return Err(TopologyError::AdjacencyNotSymmetric { row, col, forward, backward });
                }
            }
        }
        Self::build(rows, TopologyKind::Custom { adjacency })
    }

    fn build(workers: usize, kind: TopologyKind) -> Result<Self, TopologyError> {
        if workers == 0 {
            return Err(TopologyError::NoWorkers);
        }
        let m = workers;
        // A complete graph's links grow with m²: refuse one whose mixing matrix would not fit.
        let complete = (m as u64).saturating_mul(m as u64);
        if matches!(kind, TopologyKind::Complete) && complete > crate::mixing::MAX_NONZEROS as u64 {
            return Err(TopologyError::TooLarge { workers: m, nonzeros: complete });
        }
        let mut neighbors = vec![BTreeSet::new(); m];
        let mut link = |i: usize, j: usize| {
            if i != j {
                neighbors[i].insert(j);
                neighbors[j].insert(i);
            }
        };
        match &kind {
            TopologyKind::Complete => {
                for i in 0..m {
                    for j in i + 1..m {
                        link(i, j);
                    }
                }
            }
            TopologyKind::Ring => {
                for i in 0..m {
                    link(i, (i + 1) % m);
                }
            }
            TopologyKind::Torus { rows, cols } => {
                let (rows, cols) = (*rows, *cols);
                if rows * cols != m {
                    return Err(TopologyError::TorusSize { rows, cols, product: rows * cols, workers: m });
                }
                for r in 0..rows {
                    for c in 0..cols {
                        let here = r * cols + c;
                        link(here, r * cols + (c + 1) % cols);
                        link(here, ((r + 1) % rows) * cols + c);
                    }
                }
            }
            TopologyKind::Exponential => {
                for i in 0..m {
                    let mut hop = 1;
                    while hop < m {
                        link(i, (i + hop) % m);
                        hop *= 2;
                    }
                }
            }
            TopologyKind::Custom { adjacency } => {
                for (i, row) in adjacency.iter().enumerate() {
                    for (j, &edge) in row.iter().enumerate() {
                        if edge {
                            link(i, j);
                        }
                    }
                }
            }
        }
        let labels = connected_components(m, |i| neighbors[i].iter().copied());
        let components = labels.iter().max().map_or(0, |max| max + 1);
        if components > 1 {
            let unreachable = labels.iter().position(|&label| label != 0).unwrap_or(0);
            return Err(TopologyError::Disconnected { unreachable, components });
        }
        Ok(Self { workers, kind, neighbors })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The graph's shape.
    pub fn kind(&self) -> &TopologyKind {
        &self.kind
    }

    /// The neighbours of `rank` (excluding itself), in increasing order.
    pub fn neighbors(&self, rank: usize) -> impl Iterator<Item = usize> + '_ {
        self.neighbors[rank].iter().copied()
    }

    /// Number of neighbours of `rank`.
    pub fn degree(&self, rank: usize) -> usize {
        self.neighbors[rank].len()
    }

    /// The mixing matrix of this graph under `rule` (validated before it is returned), stored
    /// sparse: `m` + twice the edges non-zeros.
    pub fn mixing_matrix(&self, rule: WeightRule) -> Result<MixingMatrix, TopologyError> {
        let m = self.workers;
        let weight: Box<dyn Fn(usize, usize) -> f64 + '_> = match rule {
            WeightRule::MetropolisHastings => Box::new(|i, j| 1.0 / (1.0 + self.degree(i).max(self.degree(j)) as f64)),
            WeightRule::BestConstant => {
                let alpha = if m == 1 {
                    0.0
                } else {
                    let laplacian = (0..m)
                        .map(|i| {
                            let mut row: Vec<(usize, f64)> = self.neighbors(i).map(|j| (j, -1.0)).collect();
                            row.push((i, self.degree(i) as f64));
                            row.sort_by_key(|entry| entry.0);
                            row
                        })
                        .collect();
                    // Decreasing order: λ_max first, λ₂ (the algebraic connectivity) second to last.
                    let values = MixingMatrix::from_sparse_unchecked(m, laplacian).eigenvalues()?;
                    let max_degree = (0..m).map(|i| self.degree(i)).max().unwrap_or(1) as f64;
                    (2.0 / (values[m - 2] + values[0])).min(1.0 / max_degree)
                };
                Box::new(move |_, _| alpha)
            }
        };
        let rows = (0..m)
            .map(|i| {
                let mut row: Vec<(usize, f64)> = self.neighbors(i).map(|j| (j, weight(i, j))).collect();
                let off: f64 = row.iter().map(|entry| entry.1).sum();
                let at = row.partition_point(|entry| entry.0 < i);
                row.insert(at, (i, 1.0 - off));
                row
            })
            .collect();
        Ok(MixingMatrix::from_sparse(m, rows)?)
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            TopologyKind::Complete => write!(f, "complete graph on {} workers", self.workers),
            TopologyKind::Ring => write!(f, "ring of {} workers", self.workers),
            TopologyKind::Torus { rows, cols } => write!(f, "{rows} x {cols} torus"),
            TopologyKind::Exponential => write!(f, "exponential graph on {} workers", self.workers),
            TopologyKind::Custom { .. } => write!(f, "custom graph on {} workers", self.workers),
        }
    }
}
