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
use super::{InFlightSum, MergeOutcome, MergeRule, RuleError, SyncContext};
use crate::comm::Communicator;
use crate::spec::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// `--rule elastic-overlap`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ElasticOverlapConfig {
    /// Elastic moving rate α of `elastic-overlap`, in (0, 2/(m+1)) (default 2/(m+2)).
    #[arg(long, value_parser = crate::spec::positive_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving_rate: Option<f64>,
}

impl RuleConfig for ElasticOverlapConfig {
    const NAME: &'static str = "elastic-overlap";

    fn build(&self, world_size: usize) -> Result<Box<dyn MergeRule>, SpecError> {
        let alpha = self.moving_rate.unwrap_or(2.0 / (world_size as f64 + 2.0));
        let rule = ElasticOverlap::new(alpha);
        rule.validate(world_size).map_err(|error| {
            SpecError::new("moving-rate", self.moving_rate.map_or_else(|| "default".into(), |a| a.to_string()), error)
        })?;
        Ok(Box::new(rule))
    }

    fn describe(&self) -> String {
        match self.moving_rate {
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
    anchor: Option<Vec<f32>>,
    /// `S_k`, travelling until the next merge.
    sum: InFlightSum,
    diff: Vec<f32>,
}

impl ElasticOverlap {
    /// Overlapped elastic averaging with moving rate `alpha`.
    pub fn new(alpha: f64) -> Self {
        Self { alpha, anchor: None, sum: InFlightSum::default(), diff: Vec::new() }
    }

    /// The anchor as of the last merge.
    pub fn anchor(&self) -> Option<&[f32]> {
        self.anchor.as_deref()
    }
}

impl MergeRule for ElasticOverlap {
    fn name(&self) -> &'static str {
        "elastic-overlap"
    }

    fn validate(&self, world_size: usize) -> Result<(), RuleError> {
        let upper = elastic_alpha_limit(world_size, 1);
        if self.alpha.is_finite() && self.alpha > 0.0 && self.alpha < upper {
            Ok(())
        } else {
            Err(RuleError::ElasticAlphaOutOfRange { alpha: self.alpha, workers: world_size, anchors: 1, upper })
        }
    }

    fn start(&mut self, initial: &[f32], _ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        if self.anchor.is_none() {
            self.anchor = Some(initial.to_vec());
        }
        Ok(())
    }

    fn begin(&mut self, _params: &[f32], _ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        Ok(())
    }

    fn finish(
        &mut self,
        params: &mut [f32],
        _ctx: &SyncContext,
        comm: &mut dyn Communicator,
    ) -> Result<MergeOutcome, RuleError> {
        let anchor = self.anchor.as_mut().ok_or(RuleError::NotBegun { rule: "elastic-overlap" })?;
        if anchor.len() != params.len() {
            let reason = format!("the anchor has {} values but the model has {}", anchor.len(), params.len());
            return Err(RuleError::BadState { rule: "elastic-overlap", reason });
        }
        let alpha = self.alpha as f32;
        if let Some(sum) = self.sum.collect(comm)? {
            add_scaled(anchor, alpha, &sum);
        }
        difference(&mut self.diff, params, anchor);
        add_scaled(params, -alpha, &self.diff);
        self.sum.start(std::mem::take(&mut self.diff), comm)?;
        Ok(MergeOutcome { local_squared_distance: None, trigger: None })
    }

    fn record(&self) -> StateRecord {
        let mut record = StateRecord::new();
        if let Some(anchor) = &self.anchor {
            record = record.with_buffer("anchor", anchor.clone());
        }
        if let Some(sent) = self.sum.payload() {
            record = record.with_buffer("in-flight", sent.clone());
        }
        record
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.anchor = record.take_buffer("anchor");
        self.sum.restore(record.take_buffer("in-flight"));
        super::no_leftovers("elastic-overlap", &record, "only `anchor` and `in-flight`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Elastic;
    use crate::testing::merge_trajectories;

    #[test]
    fn the_recurrence_is_easgd_bit_for_bit() {
        let overlapped = merge_trajectories(4, 6, None, || Box::new(ElasticOverlap::new(0.25)));
        let blocking = merge_trajectories(4, 6, None, || Box::new(Elastic::new(0.25)));
        assert_eq!(overlapped, blocking);
    }

    #[test]
    fn a_checkpoint_with_the_sum_in_flight_resumes_bit_for_bit() {
        let make = || ElasticOverlapConfig::default().build(4).unwrap();
        assert_eq!(merge_trajectories(4, 6, Some(3), make), merge_trajectories(4, 6, None, make));
    }

    #[test]
    fn bad_settings_are_named() {
        let error = ElasticOverlapConfig { moving_rate: Some(0.5) }.build(4).err().unwrap();
        assert_eq!(error.option, "moving-rate");
        let mut rule = ElasticOverlap::new(0.2);
        assert!(rule.load_record(StateRecord::new().with_scalar("momentum", 1.0)).is_err());
    }
}
