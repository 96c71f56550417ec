//! Decentralized gossip: each worker averages with its neighbours in a graph.

use super::{MergeOutcome, MergeRule, RuleError, distance_to_mean_then_replace};
use crate::mixing::MixingMatrix;
use crate::topology::{Topology, TopologyError, WeightRule};
use crate::transport::{ReduceOp, Transport, TransportError};

/// Gossip averaging with a mixing matrix: `x_i ← Σ_j W_ij x_j`.
///
/// With τ = 1 this is D-PSGD; with τ > 1, decentralized periodic averaging. Each worker sends
/// its model only to its neighbours, so traffic per merge is `degree × model size`. Gossip keeps
/// the workers' mean model unchanged.
///
/// Measuring the consensus distance needs one extra all-reduce of the whole model, so it is
/// optional ([`Gossip::measure_consensus`], on by default).
#[derive(Debug, Clone)]
pub struct Gossip {
    matrix: MixingMatrix,
    measure_consensus: bool,
    mixed: Vec<f32>,
    sum: Vec<f32>,
}

impl Gossip {
    /// Gossip with a validated mixing matrix.
    pub fn new(matrix: MixingMatrix) -> Self {
        Self { matrix, measure_consensus: true, mixed: Vec::new(), sum: Vec::new() }
    }

    /// Gossip on a topology with its Metropolis–Hastings weights.
    pub fn on(topology: &Topology) -> Result<Self, TopologyError> {
        Ok(Self::new(topology.mixing_matrix(WeightRule::default())?))
    }

    /// Whether to measure the consensus distance at each merge (costs one all-reduce of the model).
    pub fn measure_consensus(self, measure: bool) -> Self {
        Self { measure_consensus: measure, ..self }
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

    fn merge(&mut self, params: &mut [f32], transport: &mut dyn Transport) -> Result<MergeOutcome, TransportError> {
        let rank = transport.rank();
        let neighbors: Vec<(usize, f32)> =
            self.matrix.neighbors(rank).into_iter().map(|(j, w)| (j, w as f32)).collect();
        self.mixed.resize(params.len(), 0.0);
        transport.mix(params, &mut self.mixed, self.matrix.self_weight(rank) as f32, &neighbors)?;
        if !self.measure_consensus {
            params.copy_from_slice(&self.mixed);
            return Ok(MergeOutcome { local_squared_distance: None });
        }
        self.sum.resize(params.len(), 0.0);
        transport.all_reduce(params, &mut self.sum, ReduceOp::Sum)?;
        let local = distance_to_mean_then_replace(params, &self.sum, transport.world_size(), &self.mixed);
        Ok(MergeOutcome { local_squared_distance: Some(local) })
    }

    fn mixing_matrix(&self, _world_size: usize) -> MixingMatrix {
        self.matrix.clone()
    }
}
