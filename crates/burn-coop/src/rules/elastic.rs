//! Elastic averaging (EASGD): workers are pulled towards an anchor that moves towards them.

use super::{MergeOutcome, MergeRule, RuleError, RuleState, distance_to_mean};
use crate::mixing::MixingMatrix;
use crate::transport::{ReduceOp, Transport, TransportError};

/// Elastic averaging SGD with moving rate α (Zhang, Choromanska & LeCun 2015), synchronous form.
///
/// At a merge, with `x_i` the pre-merge models and `z` the anchor:
/// `x_i ← x_i − α (x_i − z)` and `z ← z + α Σ_i (x_i − z)`. As a Cooperative SGD matrix on the
/// `m` workers plus the anchor this is `W_α = [[(1−α) I, α 1], [α 1ᵀ, 1 − mα]]`, whose
/// eigenvalues are 1, `1 − α` and `1 − (m+1)α`: the rule is stable for `0 < α < 2/(m+1)` and
/// `ζ` is smallest at `α = 2/(m+2)`.
///
/// There is no parameter server: every worker keeps its own copy of the anchor and updates it
/// from one sum all-reduce of `x_i − z`, so all copies stay identical. The anchor starts as the
/// initial model (all workers must start from the same model).
#[derive(Debug, Clone)]
pub struct ElasticAveraging {
    alpha: f64,
    anchor: Option<Vec<f32>>,
    diff: Vec<f32>,
    sum: Vec<f32>,
}

impl ElasticAveraging {
    /// Elastic averaging with moving rate `alpha`; checked against the number of workers when
    /// the optimizer wrapper is built (see [`MergeRule::validate`]).
    pub fn new(alpha: f64) -> Self {
        Self { alpha, anchor: None, diff: Vec::new(), sum: Vec::new() }
    }

    /// Elastic averaging with `α = 2/(m+2)`, the value minimizing `ζ(W_α)` for `m` workers.
    pub fn optimal(workers: usize) -> Self {
        Self::new(2.0 / (workers as f64 + 2.0))
    }

    /// Elastic averaging starting from a given anchor instead of the initial model.
    pub fn with_anchor(self, anchor: Vec<f32>) -> Self {
        Self { anchor: Some(anchor), ..self }
    }

    /// The moving rate α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The current anchor, once known.
    pub fn anchor(&self) -> Option<&[f32]> {
        self.anchor.as_deref()
    }
}

impl MergeRule for ElasticAveraging {
    fn name(&self) -> &'static str {
        "elastic"
    }

    fn validate(&self, world_size: usize) -> Result<(), RuleError> {
        let upper = 2.0 / (world_size as f64 + 1.0);
        if self.alpha.is_finite() && self.alpha > 0.0 && self.alpha < upper {
            Ok(())
        } else {
            Err(RuleError::ElasticAlphaOutOfRange { alpha: self.alpha, workers: world_size, upper })
        }
    }

    fn start(&mut self, initial: &[f32]) {
        if self.anchor.is_none() {
            self.anchor = Some(initial.to_vec());
        }
    }

    fn merge(&mut self, params: &mut [f32], transport: &mut dyn Transport) -> Result<MergeOutcome, TransportError> {
        let n = params.len();
        if self.anchor.as_ref().is_none_or(|a| a.len() != n) {
            // No usable anchor (the rule was used without `start`): begin from the mean model.
            let mut mean = vec![0.0; n];
            transport.all_reduce(params, &mut mean, ReduceOp::Mean)?;
            self.anchor = Some(mean);
        }
        let anchor = self.anchor.as_mut().expect("anchor set above");
        self.diff.clear();
        self.diff.extend(params.iter().zip(anchor.iter()).map(|(x, z)| x - z));
        self.sum.resize(n, 0.0);
        transport.all_reduce(&self.diff, &mut self.sum, ReduceOp::Sum)?;

        // x̄ − z = S/m, so x_i − x̄ = d_i − S/m: the consensus distance needs no extra exchange.
        let local = distance_to_mean(&self.diff, &self.sum, transport.world_size());
        let alpha = self.alpha as f32;
        for (((x, z), d), s) in params.iter_mut().zip(anchor.iter_mut()).zip(&self.diff).zip(&self.sum) {
            *x -= alpha * d;
            *z += alpha * s;
        }
        Ok(MergeOutcome { local_squared_distance: Some(local) })
    }

    fn mixing_matrix(&self, world_size: usize) -> MixingMatrix {
        let m = world_size;
        let order = m + 1;
        let mut w = vec![0.0; order * order];
        for i in 0..m {
            w[i * order + i] = 1.0 - self.alpha;
            w[i * order + m] = self.alpha;
            w[m * order + i] = self.alpha;
        }
        w[m * order + m] = 1.0 - m as f64 * self.alpha;
        MixingMatrix::from_entries_unchecked(order, w)
    }

    fn export_state(&self) -> RuleState {
        RuleState { anchor: self.anchor.clone() }
    }

    fn import_state(&mut self, state: RuleState) -> Result<(), RuleError> {
        self.anchor = state.anchor;
        Ok(())
    }
}
