//! Decentralized gossip: each worker averages with its neighbours in a graph.
//!
//! `x_i ← Σ_j W_ij x_j` with `W` a topology's mixing matrix (symmetric, doubly stochastic). With
//! τ = 1 this is D-PSGD (Lian et al., "Can Decentralized Algorithms Outperform Centralized
//! Algorithms?", NeurIPS 2017); with τ > 1, decentralized periodic averaging (Wang & Joshi,
//! "Cooperative SGD", JMLR 2021). Each worker sends its model only to its neighbours, so a
//! merge moves `degree × model size` per worker; gossip keeps the workers' mean model
//! unchanged. The weighted sum is built term by term in the order of the matrix's neighbour
//! list, as each neighbour's model arrives, so every communicator gives the same bits.
//!
//! With `--topology one-peer-exponential` the graph changes at every merge `k` (Ying et al.,
//! "Exponential Graph is Provably Efficient for Decentralized Deep Training", NeurIPS 2021):
//! worker `i` sends its model to `i − 2^(k mod ⌈log₂ m⌉)` and becomes the mean of its own and
//! that of `i + 2^(k mod ⌈log₂ m⌉)` (mod `m`), one model each way per merge whatever `m`; for
//! `m` a power of two, `log₂ m` consecutive merges average exactly.
//!
//! Gossip does not measure the consensus distance by itself (that would need an all-reduce of
//! the whole model, the traffic gossip exists to avoid); the synchronizer measures it when asked
//! and counts those bytes apart.

use serde::{Deserialize, Serialize};

use super::kernels::{add_scaled, scaled};
use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext, check_world_size};
use crate::comm::{Communicator, Route};
use crate::mixing::MixingMatrix;
use crate::registry::{RuleConfig, SpecError};
use crate::topology::{
    Topology, TopologyError, TopologySpec, WeightRule, one_peer_exponential_distance, one_peer_exponential_matrix,
};

/// `--rule gossip`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct GossipConfig {
    /// Gossip topology: ring, torus, exponential, complete, one-peer-exponential (default ring;
    /// the shared `--topology` flag).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologySpec>,
    /// Gossip weights: metropolis-hastings, best-constant (default metropolis-hastings; the
    /// shared `--weights` flag).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightRule>,
}

impl RuleConfig for GossipConfig {
    const NAME: &'static str = "gossip";

    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let topology = self.topology.unwrap_or_default();
        if topology.is_time_varying() {
            if let Some(weights) = self.weights {
                let reason = "the one-peer exponential graph has its own weights (one half each)";
                return Err(SpecError::new("weights", crate::registry::serde_name_of(&weights), reason));
            }
            if world_size == 0 {
                return Err(SpecError::new("topology", "one-peer-exponential", TopologyError::NoWorkers));
            }
            return Ok(Box::new(Gossip::one_peer_exponential(world_size)));
        }
        let invalid =
            |error: TopologyError| SpecError::new("topology", crate::registry::serde_name_of(&topology), error);
        let matrix = topology
            .build(world_size)
            .map_err(invalid)?
            .mixing_matrix(self.weights.unwrap_or_default())
            .map_err(invalid)?;
        Ok(Box::new(Gossip::new(matrix)))
    }

    fn describe(&self) -> String {
        format!("gossip on a {}", crate::registry::serde_name_of(&self.topology.unwrap_or_default()))
    }

    fn run_tag(&self) -> String {
        format!("gossip-{}", crate::registry::serde_name_of(&self.topology.unwrap_or_default()))
    }

    fn resolved(&self) -> Self {
        let topology = self.topology.unwrap_or_default();
        let weights = if topology.is_time_varying() { None } else { Some(self.weights.unwrap_or_default()) };
        Self { topology: Some(topology), weights }
    }
}

/// Gossip averaging with a mixing matrix; see the [module documentation](crate::rules::gossip).
#[derive(Debug, Clone)]
pub struct Gossip {
    graph: GossipGraph,
    peers: Vec<usize>,
    weights: Vec<f64>,
    send_to: Vec<usize>,
    mixed: Vec<f32>,
}

/// The graph of a gossip merge.
#[derive(Debug, Clone)]
enum GossipGraph {
    /// The same matrix at every merge.
    Fixed(MixingMatrix),
    /// The one-peer exponential graph on this many workers.
    OnePeerExponential(usize),
}

impl Gossip {
    /// Gossip with a validated mixing matrix.
    pub fn new(matrix: MixingMatrix) -> Self {
        Self::with_graph(GossipGraph::Fixed(matrix))
    }

    /// Gossip on the one-peer exponential graph of `workers` workers (a new peer every merge).
    pub fn one_peer_exponential(workers: usize) -> Self {
        Self::with_graph(GossipGraph::OnePeerExponential(workers))
    }

    fn with_graph(graph: GossipGraph) -> Self {
        Self { graph, peers: Vec::new(), weights: Vec::new(), send_to: Vec::new(), mixed: Vec::new() }
    }

    /// Gossip on a topology with its Metropolis–Hastings weights.
    pub fn on(topology: &Topology) -> Result<Self, TopologyError> {
        Ok(Self::new(topology.mixing_matrix(WeightRule::default())?))
    }

    /// The mixing matrix, for gossip on a fixed graph.
    pub fn matrix(&self) -> Option<&MixingMatrix> {
        match &self.graph {
            GossipGraph::Fixed(matrix) => Some(matrix),
            GossipGraph::OnePeerExponential(_) => None,
        }
    }

    fn order(&self) -> usize {
        match &self.graph {
            GossipGraph::Fixed(matrix) => matrix.order(),
            GossipGraph::OnePeerExponential(workers) => *workers,
        }
    }

    /// This worker's neighbours and weights at merge `round` (in `peers`, `weights`, `send_to`);
    /// returns the weight it keeps on its own model.
    fn neighbors_at(&mut self, rank: usize, round: u64) -> f64 {
        self.peers.clear();
        self.weights.clear();
        self.send_to.clear();
        match &self.graph {
            GossipGraph::Fixed(matrix) => {
                for (j, w) in matrix.neighbors(rank) {
                    self.peers.push(j);
                    self.weights.push(w);
                }
                self.send_to.extend_from_slice(&self.peers);
                matrix.self_weight(rank)
            }
            GossipGraph::OnePeerExponential(workers) => {
                let Some(d) = one_peer_exponential_distance(*workers, round) else { return 1.0 };
                self.peers.push((rank + d) % workers);
                self.weights.push(0.5);
                self.send_to.push((rank + workers - d) % workers);
                0.5
            }
        }
    }
}

/// `mixed ← self_weight · params + Σ_k weights[k] · (the model of receive_from[k])`, the sum
/// built term by term in the order of `receive_from`, as each neighbour's model arrives, while
/// `params` goes to every rank in `send_to` (the neighbour mixing step of gossip-type rules).
pub(crate) fn mix_with_neighbors(
    params: &[f32],
    self_weight: f64,
    route: Route<'_>,
    weights: &[f64],
    comm: &mut dyn Communicator,
    mixed: &mut Vec<f32>,
) -> Result<(), RuleError> {
    scaled(mixed, self_weight as f32, params);
    comm.exchange_directed(params, route, &mut |k, values| add_scaled(mixed, weights[k] as f32, values))?;
    Ok(())
}

impl MergeRule for Gossip {
    fn start(&mut self, _initial: &[f32], ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        check_world_size(GossipConfig::NAME, self.order(), ctx)
    }

    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        check_world_size(GossipConfig::NAME, self.order(), ctx)?;
        let self_weight = self.neighbors_at(ctx.rank, ctx.round);
        // `W_ii x_i`, then `+ W_ij x_j` for each neighbour as its model arrives, in the order
        // of the matrix's neighbour list.
        let route = Route { send_to: &self.send_to, receive_from: &self.peers };
        mix_with_neighbors(params, self_weight, route, &self.weights, comm, &mut self.mixed)?;
        params.copy_from_slice(&self.mixed);
        Ok(MergeOutcome { local_squared_distance: None, trigger: None })
    }
}

impl MatrixForm for Gossip {
    fn mixing_matrix(&self, _world_size: usize) -> Option<MixingMatrix> {
        self.matrix().cloned()
    }

    fn mixing_second_moment(&self, world_size: usize) -> Option<MixingMatrix> {
        match &self.graph {
            GossipGraph::Fixed(matrix) => Some(matrix.gram()),
            GossipGraph::OnePeerExponential(workers) => {
                let period = workers.next_power_of_two().trailing_zeros().max(1) as u64;
                let cycle: Vec<MixingMatrix> =
                    (0..period).map(|k| one_peer_exponential_matrix(world_size, k).gram()).collect();
                MixingMatrix::mean_of(&cycle)
            }
        }
    }

    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        let model = 4.0 * values as f64;
        match &self.graph {
            GossipGraph::Fixed(matrix) => Some(model * matrix.mean_degree()),
            GossipGraph::OnePeerExponential(_) => Some(if world_size > 1 { model } else { 0.0 }),
        }
    }

    fn mixing_matrix_at(&self, ctx: &SyncContext) -> Option<MixingMatrix> {
        match &self.graph {
            GossipGraph::Fixed(matrix) => Some(matrix.clone()),
            GossipGraph::OnePeerExponential(_) => Some(one_peer_exponential_matrix(ctx.world_size, ctx.round)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CollectiveKind;
    use crate::testing::{check_rounds_against_matrices, check_rule_against_matrix, run_one_merge};

    fn ring(m: usize) -> Gossip {
        Gossip::on(&Topology::ring(m).unwrap()).unwrap()
    }

    #[test]
    fn one_merge_is_x_times_w() {
        check_rule_against_matrix(4, 19, || Box::new(ring(4)));
        let torus = Topology::torus_for(6).unwrap().mixing_matrix(WeightRule::BestConstant).unwrap();
        check_rule_against_matrix(6, 7, move || Box::new(Gossip::new(torus.clone())));
    }

    #[test]
    fn a_ring_merge_sends_the_model_to_two_neighbours_only() {
        for run in run_one_merge(4, 10, |_| Box::new(ring(4))) {
            assert_eq!(run.calls.total(), 1);
            assert_eq!(run.traffic.calls(CollectiveKind::Exchange), 1);
            assert_eq!(run.traffic.total().bytes_sent, 2 * 4 * 10);
            assert_eq!(run.outcome.local_squared_distance, None);
        }
    }

    #[test]
    fn one_peer_exponential_merges_are_x_times_w_k() {
        for m in [2, 4, 6, 8] {
            check_rounds_against_matrices(m, 5, 7, || Box::new(Gossip::one_peer_exponential(m)));
        }
    }

    #[test]
    fn one_peer_exponential_talks_to_one_peer_at_distance_two_to_the_k() {
        let peers: Vec<Option<usize>> = (0..7).map(|k| one_peer_exponential_distance(8, k)).collect();
        assert_eq!(peers, [1, 2, 4, 1, 2, 4, 1].map(Some));
        let peers: Vec<Option<usize>> = (0..4).map(|k| one_peer_exponential_distance(5, k)).collect();
        assert_eq!(peers, [1, 2, 4, 1].map(Some), "⌈log₂ 5⌉ = 3 distances");
        assert_eq!(one_peer_exponential_distance(1, 3), None);
        for run in run_one_merge(8, 10, |_| Box::new(Gossip::one_peer_exponential(8))) {
            assert_eq!(run.traffic.total().bytes_sent, 4 * 10, "one model sent");
            assert_eq!(run.traffic.total().bytes_received, 4 * 10, "one model received");
        }
    }

    #[test]
    fn one_peer_exponential_averages_exactly_after_log2_m_merges() {
        let m = 8;
        let product = (0..3).fold(MixingMatrix::identity(m).to_rows(), |acc, k| {
            let w = one_peer_exponential_matrix(m, k);
            (0..m).map(|i| (0..m).map(|j| (0..m).map(|l| acc[i][l] * w.get(l, j)).sum()).collect()).collect()
        });
        assert!(product.iter().flatten().all(|&v: &f64| v == 0.125), "{product:?}");
    }

    #[test]
    fn expected_bytes_are_the_metered_ones() {
        let torus = Topology::torus(2, 3).unwrap().mixing_matrix(WeightRule::BestConstant).unwrap();
        let rules: [Box<dyn Fn() -> Box<dyn CooperativeRule> + Sync>; 2] = [
            Box::new(move || Box::new(Gossip::new(torus.clone()))),
            Box::new(|| Box::new(Gossip::one_peer_exponential(6))),
        ];
        for make in rules {
            let measured = crate::testing::measured_bytes_per_merge(6, 40, 3, &make);
            assert_eq!(make().expected_bytes_per_merge(40, 6), Some(measured));
        }
    }

    #[test]
    fn a_matrix_for_other_workers_is_rejected() {
        let mismatch = RuleError::WorldSizeMismatch { rule: "gossip", expected: 4, found: 5 };
        assert_eq!(crate::testing::refusals(ring(4), 5), [Some(mismatch.clone()), Some(mismatch)]);
        let mismatch = RuleError::WorldSizeMismatch { rule: "gossip", expected: 8, found: 5 };
        assert_eq!(
            crate::testing::refusals(Gossip::one_peer_exponential(8), 5),
            [Some(mismatch.clone()), Some(mismatch)]
        );
        let error = GossipConfig { topology: Some(TopologySpec::Torus), weights: None }.build(7).err().unwrap();
        assert_eq!(error.option, "topology");
        assert!(error.reason.contains("7 workers cannot form a 2-D torus"), "{}", error.reason);
        let one_peer =
            GossipConfig { topology: Some(TopologySpec::OnePeerExponential), weights: Some(WeightRule::BestConstant) };
        assert_eq!(one_peer.build(4).err().unwrap().option, "weights");
    }
}
