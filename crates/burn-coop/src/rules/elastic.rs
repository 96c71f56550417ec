//! Elastic averaging (EASGD): workers are pulled towards an anchor that moves towards them.
//!
//! Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015
//! (arXiv 1412.6651), synchronous form; as a Cooperative SGD matrix in Wang & Joshi,
//! "Cooperative SGD", JMLR 22(213), 2021. At a merge, with `x_i` the pre-merge models and `z`
//! the anchor:
//!
//! `x_i ← x_i − α (x_i − z)`, `z ← z + α Σ_i (x_i − z)`.
//!
//! On the `m` workers plus the anchor this is `W_α = [[(1−α) I, α 1], [α 1ᵀ, 1 − mα]]`, whose
//! eigenvalues are 1, `1 − α` and `1 − (m+1)α`: the rule is stable for `0 < α < 2/(m+1)` and
//! `ζ` is smallest at `α = 2/(m+2)`.
//!
//! There is no parameter server: every worker keeps its own copy of the anchor and updates it
//! from one sum all-reduce of `x_i − z`, so all copies stay identical. The anchor starts as the
//! initial model (identical on every worker after the initial broadcast); `x̄ − z = S/m` gives
//! the consensus distance with no extra exchange.

use serde::{Deserialize, Serialize};

use super::kernels::{distance_of_difference_to_mean, distance_to_mean};
use super::{MergeOutcome, MergeRule, RuleError, SyncContext};
use crate::comm::{Communicator, PendingSum};
use crate::mixing::MixingMatrix;
use crate::spec::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// `--rule elastic`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ElasticConfig {
    /// Elastic moving rate α, in (0, 2/(m+1)) (default 2/(m+2), which minimizes ζ).
    #[arg(long, value_parser = crate::spec::positive_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
}

impl RuleConfig for ElasticConfig {
    const NAME: &'static str = "elastic";

    fn build(&self, world_size: usize) -> Result<Box<dyn MergeRule>, SpecError> {
        let rule = match self.alpha {
            Some(alpha) => Elastic::new(alpha),
            None => Elastic::optimal(world_size),
        };
        rule.validate(world_size).map_err(|error| {
            SpecError::new("alpha", self.alpha.map_or_else(|| "default".into(), |a| a.to_string()), error)
        })?;
        Ok(Box::new(rule))
    }

    fn describe(&self) -> String {
        match self.alpha {
            Some(alpha) => format!("elastic averaging, alpha = {alpha}"),
            None => "elastic averaging".into(),
        }
    }
}

/// Elastic averaging with moving rate α; see the [module documentation](crate::rules::elastic).
#[derive(Debug)]
pub struct Elastic {
    alpha: f64,
    anchor: Option<Vec<f32>>,
    diff: Vec<f32>,
    sum: Vec<f32>,
    pending: Option<PendingSum>,
}

impl Elastic {
    /// Elastic averaging with moving rate `alpha`; checked against the number of workers when
    /// the synchronizer is built (see [`MergeRule::validate`]).
    pub fn new(alpha: f64) -> Self {
        Self { alpha, anchor: None, diff: Vec::new(), sum: Vec::new(), pending: None }
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

impl Elastic {
    /// Checks the anchor against the model; without one (the rule used without `start`, by
    /// workers that began from different models) the anchor starts at the workers' mean.
    fn ensure_anchor(
        &mut self,
        params: &[f32],
        ctx: &SyncContext,
        comm: &mut dyn Communicator,
    ) -> Result<(), RuleError> {
        let n = params.len();
        match &self.anchor {
            Some(anchor) if anchor.len() == n => Ok(()),
            Some(anchor) => {
                let reason = format!("the anchor has {} values but the model has {n}", anchor.len());
                Err(RuleError::BadState { rule: "elastic", reason })
            }
            None => {
                let mut mean = params.to_vec();
                comm.all_reduce_sum(&mut mean)?;
                let m = ctx.world_size as f32;
                mean.iter_mut().for_each(|v| *v /= m);
                self.anchor = Some(mean);
                Ok(())
            }
        }
    }
}

impl MergeRule for Elastic {
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

    fn start(&mut self, initial: &[f32], _ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        if self.anchor.is_none() {
            self.anchor = Some(initial.to_vec());
        }
        Ok(())
    }

    fn begin(&mut self, params: &[f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Result<(), RuleError> {
        self.ensure_anchor(params, ctx, comm)?;
        let anchor = self.anchor.as_ref().expect("ensured above");
        let mut send = std::mem::take(&mut self.sum);
        send.clear();
        send.extend(params.iter().zip(anchor).map(|(x, z)| x - z));
        self.pending = Some(comm.start_all_reduce_sum(send)?);
        Ok(())
    }

    fn finish(
        &mut self,
        params: &mut [f32],
        ctx: &SyncContext,
        _comm: &mut dyn Communicator,
    ) -> Result<MergeOutcome, RuleError> {
        let pending = self.pending.take().ok_or(RuleError::NotBegun { rule: "elastic" })?;
        self.sum = pending.wait()?;
        let anchor = self.anchor.as_mut().expect("set by begin");
        // x̄ − z = S/m, so x_i − x̄ = d_i − S/m: the consensus distance needs no extra exchange.
        // `d_i = x_i − z` is computed again here rather than kept from `begin`: the merge is
        // synchronous, so `params` are the ones `begin` saw.
        let local = distance_of_difference_to_mean(params, anchor, &self.sum, ctx.world_size);
        let alpha = self.alpha as f32;
        for ((x, z), s) in params.iter_mut().zip(anchor.iter_mut()).zip(&self.sum) {
            let d = *x - *z;
            *x -= alpha * d;
            *z += alpha * s;
        }
        Ok(MergeOutcome { local_squared_distance: Some(local) })
    }

    /// Both phases at once, with a blocking all-reduce of `d_i = x_i − z` kept in a buffer of
    /// the rule's (MPI's blocking collectives are faster than its non-blocking ones when nothing
    /// overlaps them). Same bits as `begin` + `finish`.
    fn merge(
        &mut self,
        params: &mut [f32],
        ctx: &SyncContext,
        comm: &mut dyn Communicator,
    ) -> Result<MergeOutcome, RuleError> {
        self.ensure_anchor(params, ctx, comm)?;
        let anchor = self.anchor.as_mut().expect("ensured above");
        self.diff.clear();
        self.diff.extend(params.iter().zip(anchor.iter()).map(|(x, z)| x - z));
        self.sum.resize(params.len(), 0.0);
        comm.all_reduce_sum_into(&self.diff, &mut self.sum)?;
        let local = distance_to_mean(&self.diff, &self.sum, ctx.world_size);
        let alpha = self.alpha as f32;
        for (((x, z), d), s) in params.iter_mut().zip(anchor.iter_mut()).zip(&self.diff).zip(&self.sum) {
            *x -= alpha * d;
            *z += alpha * s;
        }
        Ok(MergeOutcome { local_squared_distance: Some(local) })
    }

    fn measures_consensus(&self) -> bool {
        true
    }

    fn mixing_matrix(&self, world_size: usize) -> Option<MixingMatrix> {
        let m = world_size;
        let order = m + 1;
        let mut w = vec![0.0; order * order];
        for i in 0..m {
            w[i * order + i] = 1.0 - self.alpha;
            w[i * order + m] = self.alpha;
            w[m * order + i] = self.alpha;
        }
        w[m * order + m] = 1.0 - m as f64 * self.alpha;
        Some(MixingMatrix::from_entries_unchecked(order, w))
    }

    fn record(&self) -> StateRecord {
        match &self.anchor {
            Some(anchor) => StateRecord::new().with_buffer("anchor", anchor.clone()),
            None => StateRecord::new(),
        }
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.anchor = record.take_buffer("anchor");
        super::no_leftovers("elastic", &record, "only `anchor`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_rule_against_matrix, run_one_merge};

    #[test]
    fn one_merge_is_the_augmented_matrix_with_the_anchor() {
        check_rule_against_matrix(4, 23, || Box::new(Elastic::new(0.25)));
        check_rule_against_matrix(3, 9, || Box::new(Elastic::optimal(3)));
    }

    #[test]
    fn both_phases_give_the_blocking_merge_bit_for_bit() {
        crate::testing::check_phases_match_merge(4, 5003, || Elastic::new(0.25));
        crate::testing::check_phases_match_merge(3, 70, || Elastic::optimal(3));
    }

    #[test]
    fn alpha_is_checked_against_the_number_of_workers() {
        assert!(Elastic::new(0.39).validate(4).is_ok());
        assert!(matches!(Elastic::new(0.4).validate(4), Err(RuleError::ElasticAlphaOutOfRange { workers: 4, .. })));
        assert!(Elastic::new(0.5).validate(2).is_ok(), "2/(m+1) = 2/3 for two workers");
        assert!(Elastic::new(f64::NAN).validate(2).is_err());
        let error = ElasticConfig { alpha: Some(0.5) }.build(4).err().unwrap();
        assert_eq!((error.option, error.value.as_str()), ("alpha", "0.5"));
    }

    #[test]
    fn a_restored_anchor_of_the_wrong_length_is_an_error() {
        let runs = run_one_merge(2, 6, |_| {
            let mut rule = Elastic::new(0.3);
            rule.load_record(StateRecord::new().with_buffer("anchor", vec![0.0; 5])).unwrap();
            Box::new(rule)
        });
        for run in runs {
            assert!(matches!(run.error, Some(RuleError::BadState { rule: "elastic", .. })), "{:?}", run.error);
        }
        let mut rule = Elastic::new(0.3);
        let foreign = StateRecord::new().with_buffer("anchor", vec![1.0]).with_scalar("momentum", 1.0);
        assert!(matches!(rule.load_record(foreign), Err(RuleError::BadState { .. })));
    }
}
