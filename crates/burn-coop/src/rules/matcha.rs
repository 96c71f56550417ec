//! MATCHA: gossip on a random subset of disjoint matchings of a base graph.
//!
//! Wang, Sahu, Yang, Joshi & Kar, "MATCHA: Speeding Up Decentralized SGD via Matching
//! Decomposition Sampling" (arXiv 1905.09435; authors' code JYWa/MATCHA):
//!
//! 1. The base graph (`--graph`, default the ring) is split into `M` disjoint matchings
//!    `G_1 … G_M` (sets of edges no two of which share a worker), with Laplacians `L_j`. Here
//!    by a greedy edge colouring, which is ours: edges in increasing `(i, j)` order, each given
//!    the first matching free at both ends (at most `2Δ − 1` matchings, where a `Δ + 1` edge
//!    colouring such as Misra–Gries' is optimal to one; for rings, tori and complete graphs of
//!    even order the greedy count is already optimal). The authors' code decomposes otherwise
//!    (`graph_manager.py`, `getSubGraphs`: perfect matchings found by maximum-weight matching,
//!    the remaining edges split greedily by degree), and its experiments use matchings written
//!    out by hand (`util.select_graph`), as [`Matcha::from_matchings`] takes them.
//! 2. Matching `j` is active at a merge with probability `p_j`, chosen to maximize the
//!    algebraic connectivity of the expected graph under the communication budget `C_b`
//!    (`--budget`, the fraction of matchings active on average):
//!    `max_p λ₂(Σ_j p_j L_j)` subject to `Σ_j p_j ≤ C_b M`, `0 ≤ p_j ≤ 1`.
//!    `λ₂` is concave in `p`; it is maximized by accelerated projected gradient ascent on its
//!    smoothed form `−μ log Σ_i exp(−λ_i/μ)` (eigenvalues on `1⊥`) with `μ` decreasing to
//!    `1e-7`, stopped by a duality certificate (the bound `max_{p∈P} Σ_j p_j ⟨L_j, Z⟩` for the
//!    smoothing's weighted eigenprojection `Z`) at a gap of `1e-9` or after a fixed budget of
//!    iterations. The authors' code solves the same problem as an SDP (cvxpy).
//! 3. `W_k = I − α Σ_j B_j^k L_j` with `B_j^k ~ Bernoulli(p_j)` independent, and `α` minimizing
//!    `ρ(α) = ‖E[W_kᵀ W_k] − J‖₂`, where (each `L_j² = 2 L_j`)
//!    `E[W_kᵀ W_k] = I − 2α L̄ + α² (L̄² + 2 Σ_j p_j (1−p_j) L_j)`, `L̄ = Σ_j p_j L_j`.
//!    `ρ` is convex in `α` with `ρ(0) = 1`; a golden-section search finds the minimum (the
//!    authors' code solves the equivalent SDP). With every `p_j = 1` this is the best constant
//!    weight `2/(λ₂(L) + λ_m(L))`.
//!
//! At merge `k` every worker draws the same `B^k` from the shared seed (a counter-based
//! generator of `(seed, k, j)`, so a resumed run draws the same matchings with no state) and
//! exchanges its model only with its partners in the active matchings:
//! `x_i ← (1 − α d_i^k) x_i + α Σ_{partners j} x_j` (the self weight may be negative, as in
//! the paper). A worker in no active matching keeps its model; a merge where no matching is
//! active moves nothing. Bytes are counted for active edges only.

use serde::{Deserialize, Serialize};

use super::gossip::mix_with_neighbors;
use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext, check_world_size};
use crate::comm::{Communicator, Route};
use crate::mixing::MixingMatrix;
use crate::registry::{RuleConfig, SpecError, serde_name};
use crate::spectrum::{symmetric_eigen, symmetric_eigenvalues};
use crate::topology::{Topology, TopologyError, TopologySpec};

/// `--rule matcha`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MatchaConfig {
    /// The base graph MATCHA splits into matchings: ring, torus, exponential, complete
    /// (default ring).
    #[arg(long, value_parser = serde_name::<TopologySpec>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph: Option<TopologySpec>,
    /// Communication budget C_b in (0, 1]: the fraction of matchings active on average
    /// (default 0.5).
    #[arg(long, value_parser = crate::registry::positive_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<f64>,
}

impl RuleConfig for MatchaConfig {
    const NAME: &'static str = "matcha";

    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let graph = self.graph.unwrap_or_default();
        let budget = self.budget.unwrap_or(0.5);
        if !(budget > 0.0 && budget <= 1.0) {
            return Err(SpecError::new("budget", budget.to_string(), "the budget is a fraction in (0, 1]"));
        }
        let invalid = |error: TopologyError| SpecError::new("graph", crate::registry::serde_name_of(&graph), error);
        let topology = graph.build(world_size).map_err(invalid)?;
        Ok(Box::new(Matcha::on(&topology, budget)))
    }

    fn describe(&self) -> String {
        let graph = crate::registry::serde_name_of(&self.graph.unwrap_or_default());
        format!("MATCHA on a {graph}, budget {}", self.budget.unwrap_or(0.5))
    }

    fn run_tag(&self) -> String {
        let graph = crate::registry::serde_name_of(&self.graph.unwrap_or_default());
        format!("matcha-{graph}-b{}", self.budget.unwrap_or(0.5))
    }

    fn resolved(&self) -> Self {
        Self { graph: Some(self.graph.unwrap_or_default()), budget: Some(self.budget.unwrap_or(0.5)) }
    }
}

/// A set of edges no two of which share a worker.
pub type Matching = Vec<(usize, usize)>;

/// MATCHA; see the [module documentation](crate::rules::matcha).
#[derive(Debug, Clone)]
pub struct Matcha {
    workers: usize,
    matchings: Vec<Matching>,
    laplacians: Vec<Vec<f64>>,
    probabilities: Vec<f64>,
    alpha: f64,
    peers: Vec<usize>,
    weights: Vec<f64>,
    mixed: Vec<f32>,
}

impl Matcha {
    /// MATCHA on the matchings of `topology` with budget `budget` in (0, 1].
    pub fn on(topology: &Topology, budget: f64) -> Self {
        Self::from_matchings(topology.workers(), decompose_into_matchings(topology), budget)
    }

    /// MATCHA on given disjoint matchings of `workers` workers (as the paper's experiments,
    /// which fix them by hand). Edges may be given either way round.
    pub fn from_matchings(workers: usize, matchings: Vec<Matching>, budget: f64) -> Self {
        let laplacians: Vec<Vec<f64>> = matchings.iter().map(|m| laplacian(workers, m)).collect();
        let total = budget.clamp(0.0, 1.0) * matchings.len() as f64;
        let probabilities = best_probabilities(workers, &matchings, &laplacians, total);
        let alpha = best_alpha(workers, &laplacians, &probabilities);
        Self {
            workers,
            matchings,
            laplacians,
            probabilities,
            alpha,
            peers: Vec::new(),
            weights: Vec::new(),
            mixed: Vec::new(),
        }
    }

    /// The matchings `G_1 … G_M`.
    pub fn matchings(&self) -> &[Matching] {
        &self.matchings
    }

    /// The activation probabilities `p_j`.
    pub fn probabilities(&self) -> &[f64] {
        &self.probabilities
    }

    /// The mixing weight α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `λ₂(Σ_j p_j L_j)`, the algebraic connectivity of the expected graph.
    pub fn connectivity(&self) -> f64 {
        smallest_on_complement(&weighted_sum(self.workers, &self.laplacians, &self.probabilities), self.workers)
    }

    /// `E[W_kᵀ W_k]` (symmetric), whose second-largest eigenvalue is `ρ`.
    pub fn expected_gram(&self) -> MixingMatrix {
        MixingMatrix::from_dense_unchecked(
            self.workers,
            second_moment(self.workers, &self.laplacians, &self.probabilities, self.alpha),
        )
    }

    /// `ρ = ‖E[W_kᵀ W_k] − J‖₂`, the expected contraction of a merge.
    pub fn rho(&self) -> f64 {
        rho(self.workers, &self.laplacians, &self.probabilities, self.alpha)
    }

    /// Which matchings are active at merge `round` with the shared `seed` (the same on every
    /// worker).
    pub fn active(&self, seed: u64, round: u64) -> Vec<bool> {
        self.probabilities.iter().enumerate().map(|(j, &p)| crate::random::uniform(seed, round, j as u64) < p).collect()
    }

    /// This worker's partners among the `active` matchings, in matching order, into `self.peers`.
    fn partners(&mut self, rank: usize, active: &[bool]) {
        self.peers.clear();
        for (matching, &active) in self.matchings.iter().zip(active) {
            if !active {
                continue;
            }
            let partner = matching.iter().find_map(|&(a, b)| {
                if a == rank {
                    Some(b)
                } else if b == rank {
                    Some(a)
                } else {
                    None
                }
            });
            self.peers.extend(partner);
        }
        self.weights.clear();
        self.weights.resize(self.peers.len(), self.alpha);
    }
}

impl MergeRule for Matcha {
    fn start(&mut self, _initial: &[f32], ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        check_world_size(MatchaConfig::NAME, self.workers, ctx)
    }

    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        check_world_size(MatchaConfig::NAME, self.workers, ctx)?;
        let active = self.active(ctx.seed, ctx.round);
        self.partners(ctx.rank, &active);
        if active.contains(&true) {
            let self_weight = 1.0 - self.alpha * self.peers.len() as f64;
            let peers = std::mem::take(&mut self.peers);
            let result =
                mix_with_neighbors(params, self_weight, Route::both_ways(&peers), &self.weights, comm, &mut self.mixed);
            self.peers = peers;
            result?;
            params.copy_from_slice(&self.mixed);
        }
        // Otherwise every worker drew the same empty set: nothing moves.
        Ok(MergeOutcome { local_squared_distance: None, trigger: None })
    }
}

impl MatrixForm for Matcha {
    fn mixing_second_moment(&self, _world_size: usize) -> Option<MixingMatrix> {
        Some(self.expected_gram())
    }

    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        let edges: f64 = self.matchings.iter().zip(&self.probabilities).map(|(m, p)| p * m.len() as f64).sum();
        Some(4.0 * values as f64 * 2.0 * edges / world_size as f64)
    }

    fn mixing_matrix_at(&self, ctx: &SyncContext) -> Option<MixingMatrix> {
        let n = self.workers;
        let mut w = vec![0.0; n * n];
        (0..n).for_each(|i| w[i * n + i] = 1.0);
        for (matching, active) in self.matchings.iter().zip(self.active(ctx.seed, ctx.round)) {
            for &(a, b) in matching.iter().filter(|_| active) {
                w[a * n + a] -= self.alpha;
                w[b * n + b] -= self.alpha;
                w[a * n + b] += self.alpha;
                w[b * n + a] += self.alpha;
            }
        }
        Some(MixingMatrix::from_dense_unchecked(n, w))
    }
}

/// Splits the graph's edges into disjoint matchings by a greedy edge colouring: edges in
/// increasing `(i, j)` order (`i < j`), each put in the first matching that has neither end.
pub fn decompose_into_matchings(topology: &Topology) -> Vec<Matching> {
    let n = topology.workers();
    let mut matchings: Vec<Matching> = Vec::new();
    let mut used: Vec<Vec<bool>> = Vec::new(); // used[j][worker]
    for i in 0..n {
        let mut neighbors: Vec<usize> = topology.neighbors(i).filter(|&j| j > i).collect();
        neighbors.sort_unstable();
        for j in neighbors {
            let colour = match used.iter().position(|u| !u[i] && !u[j]) {
                Some(colour) => colour,
                None => {
                    matchings.push(Vec::new());
                    used.push(vec![false; n]);
                    matchings.len() - 1
                }
            };
            matchings[colour].push((i, j));
            used[colour][i] = true;
            used[colour][j] = true;
        }
    }
    matchings
}

/// The Laplacian of one matching on `n` workers, row-major.
fn laplacian(n: usize, matching: &[(usize, usize)]) -> Vec<f64> {
    let mut l = vec![0.0; n * n];
    for &(a, b) in matching {
        l[a * n + a] += 1.0;
        l[b * n + b] += 1.0;
        l[a * n + b] -= 1.0;
        l[b * n + a] -= 1.0;
    }
    l
}

fn weighted_sum(n: usize, laplacians: &[Vec<f64>], p: &[f64]) -> Vec<f64> {
    let mut sum = vec![0.0; n * n];
    for (l, &pj) in laplacians.iter().zip(p) {
        sum.iter_mut().zip(l).for_each(|(s, v)| *s += pj * v);
    }
    sum
}

/// The eigenvalues and eigenvectors of a Laplacian-like `a` (with `a·1 = 0`) on `1⊥`, in
/// increasing order: the all-ones direction is shifted above the rest and dropped.
fn eigen_on_complement(a: &[f64], n: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let shift = 1.0 + a.iter().map(|v| v.abs()).sum::<f64>();
    let shifted: Vec<f64> = a.iter().map(|v| v + shift / n as f64).collect();
    let (mut values, mut vectors) = symmetric_eigen(&shifted, n);
    values.remove(0);
    vectors.remove(0);
    values.reverse();
    vectors.reverse();
    (values, vectors)
}

fn smallest_on_complement(a: &[f64], n: usize) -> f64 {
    if n < 2 { 0.0 } else { eigen_on_complement(a, n).0[0] }
}

/// `Σ_i w_i u_iᵀ L_j u_i` for every matching: the gradient of the smoothed `λ₂`, and the
/// coefficients of the dual bound.
fn matching_energies(matchings: &[Matching], weights: &[f64], vectors: &[Vec<f64>]) -> Vec<f64> {
    matchings
        .iter()
        .map(|m| {
            weights
                .iter()
                .zip(vectors)
                .map(|(w, u)| w * m.iter().map(|&(a, b)| (u[a] - u[b]).powi(2)).sum::<f64>())
                .sum()
        })
        .collect()
}

/// Euclidean projection on `{0 ≤ p ≤ 1, Σ p ≤ total}`.
fn project(y: &[f64], total: f64) -> Vec<f64> {
    let clipped: Vec<f64> = y.iter().map(|v| v.clamp(0.0, 1.0)).collect();
    if clipped.iter().sum::<f64>() <= total {
        return clipped;
    }
    let sum_at = |t: f64| y.iter().map(|v| (v - t).clamp(0.0, 1.0)).sum::<f64>();
    let (mut low, mut high) =
        (y.iter().copied().fold(f64::INFINITY, f64::min) - 1.0, y.iter().copied().fold(0.0, f64::max));
    for _ in 0..200 {
        let mid = (low + high) / 2.0;
        if sum_at(mid) > total { low = mid } else { high = mid }
    }
    y.iter().map(|v| (v - high).clamp(0.0, 1.0)).collect()
}

/// `max_{p ∈ P} Σ_j p_j c_j`: a fractional knapsack (unit weights, capacity `total`).
fn knapsack_bound(c: &[f64], total: f64) -> f64 {
    let mut sorted: Vec<f64> = c.iter().copied().filter(|&v| v > 0.0).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut left = total;
    let mut bound = 0.0;
    for v in sorted {
        let take = left.min(1.0);
        bound += take * v;
        left -= take;
        if left <= 0.0 {
            break;
        }
    }
    bound
}

/// The activation probabilities maximizing `λ₂(Σ p_j L_j)` under `Σ p_j ≤ total`.
fn best_probabilities(n: usize, matchings: &[Matching], laplacians: &[Vec<f64>], total: f64) -> Vec<f64> {
    let m = matchings.len();
    if m == 0 || n < 2 {
        return vec![total.min(1.0); m];
    }
    if total >= m as f64 {
        return vec![1.0; m];
    }
    // Smoothed λ_min on 1⊥ and its gradient; also the dual bound of its eigenprojection.
    let smoothed = |p: &[f64], mu: f64| -> (f64, Vec<f64>, f64, f64) {
        let (values, vectors) = eigen_on_complement(&weighted_sum(n, laplacians, p), n);
        let low = values[0];
        let raw: Vec<f64> = values.iter().map(|v| (-(v - low) / mu).exp()).collect();
        let z: f64 = raw.iter().sum();
        let weights: Vec<f64> = raw.iter().map(|r| r / z).collect();
        let gradient = matching_energies(matchings, &weights, &vectors);
        let bound = knapsack_bound(&gradient, total);
        (low - mu * z.ln(), gradient, low, bound)
    };
    let mut p = vec![total / m as f64; m];
    let mut best = (smoothed(&p, 1.0).2, p.clone());
    let mut lipschitz = 1.0;
    let mut mu = 0.1;
    'stages: while mu >= 1e-7 {
        let (mut y, mut t) = (p.clone(), 1.0f64);
        for _ in 0..400 {
            let (fy, gy, _, _) = smoothed(&y, mu);
            let (next, fnext, lambda2, bound) = loop {
                let next = project(&y.iter().zip(&gy).map(|(v, g)| v + g / lipschitz).collect::<Vec<_>>(), total);
                let (fnext, _, lambda2, bound) = smoothed(&next, mu);
                let step: Vec<f64> = next.iter().zip(&y).map(|(a, b)| a - b).collect();
                let linear: f64 = gy.iter().zip(&step).map(|(g, s)| g * s).sum();
                let square: f64 = step.iter().map(|s| s * s).sum();
                if fnext >= fy + linear - lipschitz / 2.0 * square - 1e-15 || lipschitz > 1e12 {
                    break (next, fnext, lambda2, bound);
                }
                lipschitz *= 2.0;
            };
            let _ = fnext;
            if lambda2 > best.0 {
                best = (lambda2, next.clone());
            }
            if bound - best.0 < 1e-9 {
                break 'stages;
            }
            let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
            let moved: f64 = next.iter().zip(&p).map(|(a, b)| (a - b).abs()).sum();
            y = next.iter().zip(&p).map(|(a, b)| a + (t - 1.0) / t_next * (a - b)).collect();
            p = next;
            t = t_next;
            lipschitz = (lipschitz * 0.9).max(1e-3);
            if moved < 1e-13 {
                break;
            }
        }
        p = best.1.clone();
        mu /= 10.0;
    }
    best.1
}

/// `E[W_kᵀ W_k] = I − 2α L̄ + α² (L̄² + 2 Σ_j p_j (1−p_j) L_j)`, row-major.
fn second_moment(n: usize, laplacians: &[Vec<f64>], p: &[f64], alpha: f64) -> Vec<f64> {
    let mean = weighted_sum(n, laplacians, p);
    let variance: Vec<f64> = p.iter().map(|q| q * (1.0 - q)).collect();
    let spread = weighted_sum(n, laplacians, &variance);
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let square: f64 = (0..n).map(|k| mean[i * n + k] * mean[k * n + j]).sum();
            let identity = if i == j { 1.0 } else { 0.0 };
            out[i * n + j] =
                identity - 2.0 * alpha * mean[i * n + j] + alpha * alpha * (square + 2.0 * spread[i * n + j]);
        }
    }
    out
}

/// `ρ(α) = λ_max(E[W_kᵀ W_k] − J)`.
fn rho(n: usize, laplacians: &[Vec<f64>], p: &[f64], alpha: f64) -> f64 {
    let mut gram = second_moment(n, laplacians, p, alpha);
    gram.iter_mut().for_each(|v| *v -= 1.0 / n as f64);
    symmetric_eigenvalues(&gram, n)[0]
}

/// The α minimizing [`rho`] (convex, `ρ(0) = 1`): bracket by doubling, then golden section.
fn best_alpha(n: usize, laplacians: &[Vec<f64>], p: &[f64]) -> f64 {
    if n < 2 || p.iter().all(|&q| q == 0.0) {
        return 0.0;
    }
    let f = |alpha: f64| rho(n, laplacians, p, alpha);
    let mut high = 0.05;
    while f(high) < 1.0 && high < 1e6 {
        high *= 2.0;
    }
    let (mut low, ratio) = (0.0, (5f64.sqrt() - 1.0) / 2.0);
    for _ in 0..200 {
        let a = high - ratio * (high - low);
        let b = low + ratio * (high - low);
        if f(a) <= f(b) { high = b } else { low = a }
    }
    (low + high) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CollectiveKind;
    use crate::testing::{check_rounds_against_matrices, run_one_merge};

    /// The 8-worker Erdős–Rényi graph of the paper's Fig. 1(a), as its experiments decompose it.
    fn paper_graph() -> Vec<Matching> {
        vec![
            vec![(1, 5), (6, 7), (0, 4), (2, 3)],
            vec![(1, 7), (3, 6)],
            vec![(1, 0), (3, 7), (5, 6)],
            vec![(1, 2), (7, 0)],
            vec![(3, 1)],
        ]
    }

    #[test]
    fn probabilities_and_alpha_match_the_papers_sdp() {
        // Reference values: the authors' cvxpy formulations solved with CVXOPT (their p is good to
        // about 1e-5, so ρ and α, which depend on p beyond λ₂, agree to that).
        for (budget, lambda2, alpha, rho) in [
            (0.5, 0.5612025, 0.3964285, 0.6439780),
            (0.3, 0.3367215, 0.5148048, 0.7765211),
            (1.0, 0.6700229, 2.0 / 7.0, 0.6537766),
        ] {
            let matcha = Matcha::from_matchings(8, paper_graph(), budget);
            let p = matcha.probabilities();
            assert!(p.iter().all(|&q| (0.0..=1.0).contains(&q)));
            assert!(p.iter().sum::<f64>() <= 5.0 * budget + 1e-9, "{p:?}");
            assert!(
                (matcha.connectivity() - lambda2).abs() < 2e-7,
                "C_b {budget}: λ₂ {} vs {lambda2}",
                matcha.connectivity()
            );
            assert!((matcha.rho() - rho).abs() < 1e-5, "C_b {budget}: ρ {} vs {rho}, p {p:?}", matcha.rho());
            assert!((matcha.alpha() - alpha).abs() < 1e-4, "C_b {budget}: α {} vs {alpha}, p {p:?}", matcha.alpha());
        }
        let ring = Matcha::on(&Topology::ring(8).unwrap(), 0.5);
        assert_eq!(ring.matchings().len(), 2);
        assert!(ring.probabilities().iter().all(|&q| (q - 0.5).abs() < 1e-6), "{:?}", ring.probabilities());
        assert!((ring.alpha() - 0.6073686).abs() < 1e-4 && (ring.rho() - 0.7839054).abs() < 2e-7);
    }

    #[test]
    fn the_expected_gram_is_the_mean_over_all_activation_patterns() {
        let matcha = Matcha::from_matchings(8, paper_graph(), 0.5);
        let (n, m) = (8, matcha.matchings().len());
        let mut exact = vec![0.0; n * n];
        for pattern in 0..1u32 << m {
            let weight: f64 = (0..m)
                .map(
                    |j| if pattern >> j & 1 == 1 { matcha.probabilities()[j] } else { 1.0 - matcha.probabilities()[j] },
                )
                .product();
            let mut w = vec![0.0; n * n];
            (0..n).for_each(|i| w[i * n + i] = 1.0);
            for (j, matching) in matcha.matchings().iter().enumerate().filter(|(j, _)| pattern >> j & 1 == 1) {
                let _ = j;
                for &(a, b) in matching {
                    w[a * n + a] -= matcha.alpha();
                    w[b * n + b] -= matcha.alpha();
                    w[a * n + b] += matcha.alpha();
                    w[b * n + a] += matcha.alpha();
                }
            }
            for i in 0..n {
                for k in 0..n {
                    exact[i * n + k] += weight * (0..n).map(|l| w[l * n + i] * w[l * n + k]).sum::<f64>();
                }
            }
        }
        let gram = matcha.expected_gram();
        for (a, b) in gram.to_rows().concat().iter().zip(&exact) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn merges_are_x_times_the_drawn_w_k_and_move_only_active_edges() {
        check_rounds_against_matrices(8, 6, 12, || Box::new(Matcha::from_matchings(8, paper_graph(), 0.5)));
        check_rounds_against_matrices(4, 5, 8, || MatchaConfig::default().build(4).unwrap());
        let matcha = Matcha::from_matchings(8, paper_graph(), 0.5);
        let active = matcha.active(7, 0);
        for run in run_one_merge(8, 10, |_| matcha.clone()) {
            let partners = matcha
                .matchings()
                .iter()
                .zip(&active)
                .filter(|(m, on)| **on && m.iter().any(|&(a, b)| a == run.rank || b == run.rank))
                .count() as u64;
            assert_eq!(run.traffic.of(CollectiveKind::Exchange).bytes_sent, 4 * 10 * partners, "worker {}", run.rank);
        }
    }

    #[test]
    fn expected_bytes_are_the_mean_of_the_metered_ones() {
        let make = || Matcha::from_matchings(8, paper_graph(), 0.5);
        let measured = crate::testing::measured_bytes_per_merge(8, 10, 400, make);
        let expected = make().expected_bytes_per_merge(10, 8).unwrap();
        assert!((measured / expected - 1.0).abs() < 0.05, "measured {measured}, expected {expected}");
    }

    #[test]
    fn activations_follow_the_probabilities_and_agree_everywhere() {
        let matcha = Matcha::from_matchings(8, paper_graph(), 0.5);
        let rounds = 20_000;
        let mut counts = [0u32; 5];
        for round in 0..rounds {
            for (j, on) in matcha.active(3, round).into_iter().enumerate() {
                counts[j] += u32::from(on);
            }
        }
        for (count, p) in counts.iter().zip(matcha.probabilities()) {
            let frequency = f64::from(*count) / rounds as f64;
            assert!((frequency - p).abs() < 0.015, "frequency {frequency}, p {p}");
        }
        assert_eq!(matcha.active(3, 17), matcha.clone().active(3, 17));
        assert_ne!(
            (0..64).map(|r| matcha.active(3, r)).collect::<Vec<_>>(),
            (0..64).map(|r| matcha.active(4, r)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn greedy_matchings_cover_every_edge_once() {
        for topology in [
            Topology::ring(8).unwrap(),
            Topology::ring(5).unwrap(),
            Topology::torus(3, 4).unwrap(),
            Topology::complete(6).unwrap(),
        ] {
            let matchings = decompose_into_matchings(&topology);
            let mut edges: Vec<(usize, usize)> = matchings.iter().flatten().copied().collect();
            for matching in &matchings {
                let mut ends: Vec<usize> = matching.iter().flat_map(|&(a, b)| [a, b]).collect();
                ends.sort_unstable();
                ends.dedup();
                assert_eq!(ends.len(), 2 * matching.len(), "a matching shares a worker: {matching:?}");
            }
            edges.sort_unstable();
            let mut expected: Vec<(usize, usize)> = (0..topology.workers())
                .flat_map(|i| topology.neighbors(i).filter(move |&j| j > i).map(move |j| (i, j)))
                .collect();
            expected.sort_unstable();
            assert_eq!(edges, expected);
        }
        assert_eq!(decompose_into_matchings(&Topology::ring(5).unwrap()).len(), 3, "an odd ring needs Δ + 1");
    }

    #[test]
    fn bad_settings_are_named() {
        for budget in [0.0, 1.5, f64::NAN] {
            let error = MatchaConfig { graph: None, budget: Some(budget) }.build(4).err().unwrap();
            assert_eq!(error.option, "budget");
        }
        let error = MatchaConfig { graph: Some(TopologySpec::Torus), budget: None }.build(7).err().unwrap();
        assert_eq!(error.option, "graph");
        let mismatch = RuleError::WorldSizeMismatch { rule: "matcha", expected: 4, found: 5 };
        let refused = crate::testing::refusals(Matcha::from_matchings(4, vec![vec![(0, 1)]], 0.5), 5);
        assert_eq!(refused, [Some(mismatch.clone()), Some(mismatch)]);
    }
}
