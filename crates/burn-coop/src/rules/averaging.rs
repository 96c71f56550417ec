//! Periodic model averaging: local SGD, FedAvg with full participation, and synchronous SGD.

use super::{MergeOutcome, MergeRule, RuleError, consensus_from_local, squared_distance};
use crate::mixing::MixingMatrix;
use crate::transport::{ReduceOp, Transport, TransportError};

/// Every worker replaces its model by the average of all models: `x_i ← (1/m) Σ_j x_j`
/// (`W = J`).
///
/// With a period τ > 1 this is local SGD / FedAvg; with τ = 1 it is synchronous SGD: for SGD with
/// momentum and weight decay, averaging the models after every step gives the same iterates as
/// averaging the gradients, because every quantity involved is linear in the gradients.
/// Measures the consensus distance at every merge for the cost of one scalar all-reduce.
#[derive(Debug, Clone, Default)]
pub struct PeriodicAveraging {
    mean: Vec<f32>,
}

impl PeriodicAveraging {
    /// The averaging rule.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MergeRule for PeriodicAveraging {
    fn name(&self) -> &'static str {
        "averaging"
    }

    fn validate(&self, _world_size: usize) -> Result<(), RuleError> {
        Ok(())
    }

    fn merge(&mut self, params: &mut [f32], transport: &mut dyn Transport) -> Result<MergeOutcome, TransportError> {
        self.mean.resize(params.len(), 0.0);
        transport.all_reduce(params, &mut self.mean, ReduceOp::Mean)?;
        let local = squared_distance(params, &self.mean);
        params.copy_from_slice(&self.mean);
        let consensus = consensus_from_local(local, transport)?;
        Ok(MergeOutcome { consensus_distance: Some(consensus) })
    }

    fn mixing_matrix(&self, world_size: usize) -> MixingMatrix {
        MixingMatrix::averaging(world_size)
    }
}
