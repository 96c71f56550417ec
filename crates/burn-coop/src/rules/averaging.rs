//! Periodic model averaging: local SGD, FedAvg with full participation, and synchronous SGD.

use super::{MergeOutcome, MergeRule, RuleError, replace_by_mean};
use crate::mixing::MixingMatrix;
use crate::transport::{ReduceOp, Transport, TransportError};

/// Every worker replaces its model by the average of all models: `x_i ← (1/m) Σ_j x_j`
/// (`W = J`).
///
/// With a period τ > 1 this is local SGD / FedAvg; with τ = 1 it is synchronous SGD: for SGD with
/// momentum and weight decay, averaging the models after every step gives the same iterates as
/// averaging the gradients, because every quantity involved is linear in the gradients.
/// Measures each worker's distance to the average in the same pass that writes the average.
#[derive(Debug, Clone, Default)]
pub struct PeriodicAveraging {
    sum: Vec<f32>,
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
        self.sum.resize(params.len(), 0.0);
        transport.all_reduce(params, &mut self.sum, ReduceOp::Sum)?;
        let local = replace_by_mean(params, &self.sum, transport.world_size());
        Ok(MergeOutcome { local_squared_distance: Some(local) })
    }

    fn mixing_matrix(&self, world_size: usize) -> MixingMatrix {
        MixingMatrix::averaging(world_size)
    }
}
