//! Periodic model averaging: local SGD, FedAvg with full participation, and synchronous SGD.
//!
//! At a merge every worker replaces its model by the average of all models,
//! `x_i ← (1/m) Σ_j x_j` (`W = J = 11ᵀ/m`), from one sum all-reduce. With a period τ > 1 this
//! is local SGD (Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019) and
//! FedAvg with full participation (McMahan et al., AISTATS 2017); with τ = 1 it is synchronous
//! SGD: for SGD with momentum and weight decay, averaging the models after every step gives the
//! same iterates as averaging the gradients, because every quantity involved is linear in the
//! gradients. With `--compressor C` each worker's change since the last merge travels
//! compressed and `x ← x_s + (1/m) Σ_j C(x_j − x_s)` (see `ec_local_sgd.rs`, which adds the
//! error memories). Each worker's distance to the average is measured in the same pass that writes
//! the average, so the consensus distance costs one scalar.

use serde::{Deserialize, Serialize};

use super::EcLocalSgd;
use super::kernels::replace_by_mean;
use super::{Bucket, CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, SyncContext};
use crate::comm::{Communicator, Traffic};
use crate::compress::Compressor;
use crate::mixing::MixingMatrix;
use crate::registry::{RuleConfig, SpecError};

/// `--rule average` (the period is the schedule's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AveragingConfig {
    /// Send each worker's change since the last merge compressed, without error memories (the
    /// shared `--compressor` flag; default: the dense models). See
    /// [`EcLocalSgd`] for the same with error feedback.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressor: Option<Compressor>,
}

impl RuleConfig for AveragingConfig {
    const NAME: &'static str = "average";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        Ok(match self.compressor.filter(|c| !c.is_lossless()) {
            None => Box::new(Averaging::new()),
            Some(compressor) => Box::new(EcLocalSgd::without_error_feedback(compressor)),
        })
    }

    fn describe(&self) -> String {
        match self.compressor.filter(|c| !c.is_lossless()) {
            None => "periodic averaging".into(),
            Some(compressor) => format!("periodic averaging of {compressor}-compressed changes"),
        }
    }

    fn run_tag(&self) -> String {
        match self.compressor.filter(|c| !c.is_lossless()) {
            None => Self::NAME.into(),
            Some(compressor) => format!("average-{compressor}").replace(':', ""),
        }
    }
}

/// `--rule sync`: synchronous SGD, i.e. averaging after every step (the period is forced to 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SynchronousConfig {}

impl RuleConfig for SynchronousConfig {
    const NAME: &'static str = "sync";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        Ok(Box::new(Averaging::new()))
    }

    fn describe(&self) -> String {
        "synchronous SGD".into()
    }

    fn forced_period(&self) -> Option<u64> {
        Some(1)
    }
}

/// Every worker replaces its model by the average of all models (`W = J`); see the
/// [module documentation](crate::rules::averaging).
#[derive(Debug, Default)]
pub struct Averaging {
    sum: Vec<f32>,
}

impl Averaging {
    /// The averaging rule.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MergeRule for Averaging {
    /// A blocking all-reduce (MPI's blocking collectives are faster than its non-blocking ones
    /// when nothing overlaps them), then the mean and this worker's distance to it in one pass.
    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        self.merge_bucket(Bucket { values: params, at: 0, first: true, last: true, keep: usize::MAX }, ctx, comm)
    }

    fn merges_in_buckets(&self) -> bool {
        true
    }

    /// The same on the bucket's values, the sum in a buffer of the bucket's size.
    fn merge_bucket(&mut self, bucket: Bucket<'_>, ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        self.sum.resize(bucket.values.len(), 0.0);
        comm.all_reduce_sum_into(bucket.values, &mut self.sum)?;
        let local = replace_by_mean(bucket.values, &self.sum, ctx.world_size);
        bucket.release(&mut self.sum);
        Ok(MergeOutcome { local_squared_distance: Some(local), trigger: None })
    }

    fn measures_consensus(&self) -> bool {
        true
    }

    fn reaches_consensus(&self) -> bool {
        true
    }
}

impl MatrixForm for Averaging {
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        Some(Traffic::ring_all_reduce(4 * values as u64, world_size) as f64)
    }

    fn mixing_matrix(&self, world_size: usize) -> Option<MixingMatrix> {
        Some(MixingMatrix::averaging(world_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_rule_against_matrix, run_one_merge};

    #[test]
    fn expected_bytes_are_the_metered_ones() {
        let measured = crate::testing::measured_bytes_per_merge(4, 40, 2, || Box::new(Averaging::new()));
        assert_eq!(Averaging::new().expected_bytes_per_merge(40, 4), Some(measured));
    }

    #[test]
    fn one_merge_is_x_times_j() {
        check_rule_against_matrix(4, 37, || Box::new(Averaging::new()));
        check_rule_against_matrix(3, 5, || Box::new(Averaging::new()));
    }

    #[test]
    fn a_merge_is_one_all_reduce_of_the_model() {
        let runs = run_one_merge(4, 10, |_| Box::new(Averaging::new()));
        for run in &runs {
            assert_eq!(run.calls.all_reduce, 1);
            assert_eq!(run.calls.all_reduce_values, 10);
            assert_eq!(run.calls.total(), 1);
            assert!(run.outcome.local_squared_distance.unwrap() > 0.0);
        }
        assert!(runs.windows(2).all(|w| w[0].params == w[1].params), "every worker holds the mean");
    }

    #[test]
    fn a_stateless_rule_refuses_a_record_with_entries() {
        let mut rule = Averaging::new();
        assert_eq!(rule.load_record(crate::state::StateRecord::new()), Ok(()));
        let foreign = crate::state::StateRecord::new().with_buffer("anchor", vec![1.0]);
        let error = rule.load_record(foreign).unwrap_err();
        assert_eq!(error, crate::rules::RuleError::UnexpectedState { keys: vec!["anchor".into()] });
        assert_eq!(
            error.to_string(),
            "cannot restore the rule's state: unexpected entries [\"anchor\"] (the rule keeps no state)"
        );
    }
}
