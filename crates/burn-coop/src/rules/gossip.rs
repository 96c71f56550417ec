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
//! Gossip does not measure the consensus distance by itself (that would need an all-reduce of
//! the whole model, the traffic gossip exists to avoid); the synchronizer measures it when asked
//! and counts those bytes apart.

use serde::{Deserialize, Serialize};

use super::kernels::{add_scaled, scaled};
use super::{MergeOutcome, MergeRule, RuleError, SyncContext};
use crate::comm::Communicator;
use crate::mixing::MixingMatrix;
use crate::spec::{RuleConfig, SpecError, serde_name};
use crate::topology::{Topology, TopologyError, TopologySpec, WeightRule};

/// `--rule gossip`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct GossipConfig {
    /// Gossip topology: ring, torus, exponential, complete (default ring).
    #[arg(long, value_parser = serde_name::<TopologySpec>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologySpec>,
    /// Gossip weights: metropolis-hastings, best-constant (default metropolis-hastings).
    #[arg(long, value_parser = serde_name::<WeightRule>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightRule>,
}

impl RuleConfig for GossipConfig {
    const NAME: &'static str = "gossip";

    fn build(&self, world_size: usize) -> Result<Box<dyn MergeRule>, SpecError> {
        let topology = self.topology.unwrap_or_default();
        let invalid = |error: TopologyError| SpecError::new("topology", crate::spec::serde_name_of(&topology), error);
        let matrix = topology
            .build(world_size)
            .map_err(invalid)?
            .mixing_matrix(self.weights.unwrap_or_default())
            .map_err(invalid)?;
        Ok(Box::new(Gossip::new(matrix)))
    }

    fn describe(&self) -> String {
        format!("gossip on a {}", crate::spec::serde_name_of(&self.topology.unwrap_or_default()))
    }

    fn run_tag(&self) -> String {
        format!("gossip-{}", crate::spec::serde_name_of(&self.topology.unwrap_or_default()))
    }

    fn resolved(&self) -> Self {
        Self { topology: Some(self.topology.unwrap_or_default()), weights: Some(self.weights.unwrap_or_default()) }
    }
}

/// Gossip averaging with a mixing matrix; see the [module documentation](crate::rules::gossip).
#[derive(Debug, Clone)]
pub struct Gossip {
    matrix: MixingMatrix,
    peers: Vec<usize>,
    mixed: Vec<f32>,
    begun: bool,
}

impl Gossip {
    /// Gossip with a validated mixing matrix.
    pub fn new(matrix: MixingMatrix) -> Self {
        Self { matrix, peers: Vec::new(), mixed: Vec::new(), begun: false }
    }

    /// Gossip on a topology with its Metropolis–Hastings weights.
    pub fn on(topology: &Topology) -> Result<Self, TopologyError> {
        Ok(Self::new(topology.mixing_matrix(WeightRule::default())?))
    }

    /// The mixing matrix.
    pub fn matrix(&self) -> &MixingMatrix {
        &self.matrix
    }
}

impl MergeRule for Gossip {
    fn name(&self) -> &'static str {
        "gossip"
    }

    fn validate(&self, world_size: usize) -> Result<(), RuleError> {
        if self.matrix.order() == world_size {
            Ok(())
        } else {
            Err(RuleError::WorldSizeMismatch { rule: "gossip", expected: self.matrix.order(), found: world_size })
        }
    }

    fn begin(&mut self, params: &[f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Result<(), RuleError> {
        let neighbors = self.matrix.neighbors(ctx.rank);
        self.peers.clear();
        self.peers.extend(neighbors.iter().map(|&(j, _)| j));
        // `W_ii x_i`, then `+ W_ij x_j` for each neighbour as its model arrives, in the order
        // of the matrix's neighbour list.
        scaled(&mut self.mixed, self.matrix.self_weight(ctx.rank) as f32, params);
        let mixed = &mut self.mixed;
        comm.exchange(params, &self.peers, &mut |k, values| add_scaled(mixed, neighbors[k].1 as f32, values))?;
        self.begun = true;
        Ok(())
    }

    fn finish(
        &mut self,
        params: &mut [f32],
        _ctx: &SyncContext,
        _comm: &mut dyn Communicator,
    ) -> Result<MergeOutcome, RuleError> {
        if !std::mem::take(&mut self.begun) {
            return Err(RuleError::NotBegun { rule: "gossip" });
        }
        params.copy_from_slice(&self.mixed);
        Ok(MergeOutcome { local_squared_distance: None })
    }

    fn mixing_matrix(&self, _world_size: usize) -> Option<MixingMatrix> {
        Some(self.matrix.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CollectiveKind;
    use crate::testing::{check_rule_against_matrix, run_one_merge};

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
    fn a_matrix_for_other_workers_is_rejected() {
        assert_eq!(ring(4).validate(5), Err(RuleError::WorldSizeMismatch { rule: "gossip", expected: 4, found: 5 }));
        let error = GossipConfig { topology: Some(TopologySpec::Torus), weights: None }.build(7).err().unwrap();
        assert_eq!(error.option, "topology");
        assert!(error.reason.contains("7 workers cannot form a 2-D torus"), "{}", error.reason);
    }
}
