//! Elastic averaging whose anchor all-reduce travels during the next τ local steps.
//!
//! One of the algorithms Cooperative SGD's framework designs (Wang & Joshi, JMLR 22(213),
//! 2021), as the authors' code runs EASGD with a background all-reduce
//! (JYWa/Overlap_Local_SGD, `distoptim/EASGD.py`). At merge `k`, with `z_k` the anchor and
//! `S_{k−1} = Σ_j (x_j − z_{k−1})` the sum started at merge `k − 1`:
//!
//! 1. wait for `S_{k−1}` (it travelled during the τ local steps since) and move the anchor:
//!    `z_k = z_{k−1} + α S_{k−1}`;
//! 2. `d_i = x_i − z_k`, pull `x_i ← x_i − α d_i`;
//! 3. start the all-reduce of `d_i` (`S_k`) and go back to the local steps.
//!
//! The anchor is needed only at merges, so its update one period late changes nothing: the
//! recurrence is EASGD's (`x_i ← x_i − α (x_i − z)`, `z ← z + α Σ_i (x_i − z)`) with the same
//! operations in the same order — equal to the blocking rule bit for bit (tested) — while the
//! communication hides behind computation. What differs is when the anchor's move lands: at the
//! next merge, never blocking the steps in between. The consensus distance is not measured for
//! free (the sum lands a period late); `--consensus-every` measures it.
//!
//! A checkpoint taken while `S_k` travels saves this worker's `d_i`; the resumed run starts the
//! same all-reduce again at its first merge, so it continues bit for bit.

use serde::{Deserialize, Serialize};

use super::elastic::elastic_alpha_limit;
use super::kernels::{add_scaled, difference};
use super::{
    CooperativeRule, InFlightAnchor, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext,
    check_world_size,
};
use crate::comm::Communicator;
use crate::registry::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// `--rule elastic-overlap`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ElasticOverlapConfig {
    /// Elastic moving rate α, in (0, 2/(m+1)) (shared `--alpha`, also read from the key
    /// `moving-rate` of older files; default 2/(m+2)).
    #[arg(skip)]
    #[serde(alias = "moving-rate", skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
}

impl RuleConfig for ElasticOverlapConfig {
    const NAME: &'static str = "elastic-overlap";

    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let alpha = self.alpha.unwrap_or(2.0 / (world_size as f64 + 2.0));
        let rule = ElasticOverlap::new(alpha, world_size).map_err(|error| {
            SpecError::new("alpha", self.alpha.map_or_else(|| "default".into(), |a| a.to_string()), error)
        })?;
        Ok(Box::new(rule))
    }

    fn describe(&self) -> String {
        match self.alpha {
            Some(alpha) => format!("elastic averaging overlapped with the local steps, alpha = {alpha}"),
            None => "elastic averaging overlapped with the local steps".into(),
        }
    }
}

/// Elastic averaging with its all-reduce overlapped; see the
/// [module documentation](crate::rules::elastic_overlap).
#[derive(Debug)]
pub struct ElasticOverlap {
    alpha: f64,
    workers: usize,
    /// The anchor and `S_k`, travelling until the next merge.
    anchor: InFlightAnchor,
    diff: Vec<f32>,
}

impl ElasticOverlap {
    /// Overlapped elastic averaging with moving rate `alpha` for `workers` workers: an error
    /// unless `0 < α < 2/(m+1)`.
    pub fn new(alpha: f64, workers: usize) -> Result<Self, RuleError> {
        let upper = elastic_alpha_limit(workers, 1);
        if !(alpha.is_finite() && alpha > 0.0 && alpha < upper) {
            return Err(RuleError::ElasticAlphaOutOfRange { alpha, workers, anchors: 1, upper });
        }
        Ok(Self { alpha, workers, anchor: InFlightAnchor::default(), diff: Vec::new() })
    }

    /// The anchor as of the last merge.
    pub fn anchor(&self) -> Option<&[f32]> {
        self.anchor.anchor()
    }
}

impl MergeRule for ElasticOverlap {
    fn start(&mut self, initial: &[f32], ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        check_world_size(ElasticOverlapConfig::NAME, self.workers, ctx)?;
        self.anchor.start(initial);
        Ok(())
    }

    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        let rule = ElasticOverlapConfig::NAME;
        check_world_size(rule, self.workers, ctx)?;
        let anchor = self.anchor.started(rule)?;
        if anchor.len() != params.len() {
            let reason = format!("the anchor has {} values but the model has {}", anchor.len(), params.len());
            return Err(RuleError::BadState { rule, reason });
        }
        let alpha = self.alpha as f32;
        let sum = self.anchor.collect(comm)?;
        let anchor = self.anchor.anchor_mut().expect("checked above");
        if let Some(sum) = sum {
            add_scaled(anchor, alpha, &sum);
        }
        difference(&mut self.diff, params, anchor);
        add_scaled(params, -alpha, &self.diff);
        self.anchor.start_sum(std::mem::take(&mut self.diff), comm)?;
        Ok(MergeOutcome { local_squared_distance: None, trigger: None })
    }

    fn record(&self) -> StateRecord {
        self.anchor.record_into(StateRecord::new())
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.anchor.load(&mut record);
        super::no_leftovers(ElasticOverlapConfig::NAME, &record, "only `anchor` and `in-flight`")
    }
}

impl MatrixForm for ElasticOverlap {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::elastic::Elastic;
    use crate::testing::merge_trajectories;

    #[test]
    fn the_recurrence_is_easgd_bit_for_bit() {
        let overlapped = merge_trajectories(4, 6, None, || ElasticOverlap::new(0.25, 4).unwrap());
        let blocking = merge_trajectories(4, 6, None, || Elastic::new(0.25, 4).unwrap());
        assert_eq!(overlapped, blocking);
    }

    #[test]
    fn a_checkpoint_with_the_sum_in_flight_resumes_bit_for_bit() {
        let make = || ElasticOverlapConfig::default().build(4).unwrap();
        assert_eq!(merge_trajectories(4, 6, Some(3), make), merge_trajectories(4, 6, None, make));
    }

    #[test]
    fn bad_settings_are_named() {
        let error = ElasticOverlapConfig { alpha: Some(0.5) }.build(4).err().unwrap();
        assert_eq!(error.option, "alpha");
        assert!(matches!(ElasticOverlap::new(0.4, 4), Err(RuleError::ElasticAlphaOutOfRange { workers: 4, .. })));
        let [start, merge] = crate::testing::refusals(ElasticOverlap::new(0.2, 4).unwrap(), 3);
        let mismatch = RuleError::WorldSizeMismatch { rule: "elastic-overlap", expected: 4, found: 3 };
        assert_eq!((start, merge), (Some(mismatch.clone()), Some(mismatch)));
        let mut rule = ElasticOverlap::new(0.2, 4).unwrap();
        assert!(rule.load_record(StateRecord::new().with_scalar("momentum", 1.0)).is_err());
    }
}
