//! Asynchronous local SGD: Hogwild threads inside each worker, averaging applied in place.
//!
//! "Local SGD Meets Asynchrony" (ICLR 2021 submission, openreview kqDCPX7eWS). Each worker
//! keeps one shared parameter buffer ([`SharedParams`]) and runs `--local-threads` threads on
//! it:
//!
//! - **(a) asynchronous local steps**: each local thread keeps its own module and optimizer,
//!   reads the shared values before each step (no lock: Hogwild), takes an SGD step on its own
//!   minibatch and adds its change `x_after − x_read` to the shared buffer, element by element
//!   and atomically (no update is lost; see [`crate::shared_params`]);
//! - **(b) non-blocking averaging in place**: every τ steps of the worker (counted over its
//!   threads) its communication thread snapshots the shared buffer `s`, all-reduces it, and when
//!   the sum lands applies `x ← x + (mean − s)`, while the local threads keep updating `x`:
//!   the updates they made in the meantime are kept on top of the average.
//!
//! With one local thread and nothing moving during the all-reduce, `x + (mean − s)` with
//! `x = s` is the mean (up to one rounding): periodic averaging. The learner runs this rule
//! with its own loop (`learner::async_worker`); through a [`Synchronizer`](crate::Synchronizer)
//! (one thread, blocking merges) the rule is that delta form of averaging. Runs are not
//! reproducible bit for bit (the threads race by design), so async runs take no checkpoints.

use serde::{Deserialize, Serialize};

use super::kernels::{distance_to_mean, divide};
use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, SyncContext};
use crate::comm::{Communicator, Traffic};
use crate::registry::{RuleConfig, SpecError};
use crate::shared_params::SharedParams;

/// `--rule async`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AsyncConfig {
    /// Local threads per worker updating its shared parameters (default 2).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_threads: Option<u64>,
}

/// The most local threads a worker runs (each holds a model and an optimizer).
pub const MAX_LOCAL_THREADS: usize = 64;

impl AsyncConfig {
    /// The number of local threads.
    pub fn threads(&self) -> usize {
        self.local_threads.unwrap_or(2) as usize
    }
}

impl RuleConfig for AsyncConfig {
    const NAME: &'static str = "async";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        if self.threads() == 0 {
            return Err(SpecError::new("local-threads", "0", "a worker needs at least one local thread"));
        }
        if self.threads() > MAX_LOCAL_THREADS {
            let reason = format!(
                "each local thread holds its own model and optimizer state and takes its own steps; at most {MAX_LOCAL_THREADS}"
            );
            return Err(SpecError::new("local-threads", self.threads().to_string(), reason));
        }
        Ok(Box::new(AsyncAveraging::new()))
    }

    fn describe(&self) -> String {
        format!("asynchronous local SGD, {} local threads per worker", self.threads())
    }

    fn run_tag(&self) -> String {
        format!("async-t{}", self.threads())
    }

    fn resolved(&self) -> Self {
        Self { local_threads: Some(self.threads() as u64) }
    }

    /// The authors' code averages `net.parameters()` only: BatchNorm's running statistics stay
    /// with each worker (its first local thread's, for the evaluated average).
    fn default_buffers(&self) -> Option<crate::params::BufferPolicy> {
        Some(crate::params::BufferPolicy::KeepLocal)
    }
}

/// Averaging applied as a change, `x ← x + (mean − s)` with `s` the snapshot that was
/// all-reduced; see the [module documentation](crate::rules::async_local_sgd).
#[derive(Debug, Default)]
pub struct AsyncAveraging {
    snapshot: Vec<f32>,
}

impl AsyncAveraging {
    /// The rule.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The change that moves a snapshot `s` onto the mean of the summed snapshots: `sum/m − s`
/// (written into `sum`).
pub fn change_to_mean(sum: &mut [f32], snapshot: &[f32], workers: usize) {
    divide(sum, workers);
    sum.iter_mut().zip(snapshot).for_each(|(mean, s)| *mean -= s);
}

/// Applies an averaging that was all-reduced from `snapshot` to the shared buffer, keeping
/// every update made since the snapshot: `x ← x + (sum/m − s)`. Returns this worker's squared
/// distance to the mean at the snapshot.
pub fn apply_average_in_place(shared: &SharedParams, snapshot: &[f32], mut sum: Vec<f32>, workers: usize) -> f64 {
    let distance = distance_to_mean(snapshot, &sum, workers);
    change_to_mean(&mut sum, snapshot, workers);
    shared.add(&sum);
    distance
}

impl MergeRule for AsyncAveraging {
    /// Snapshots `params`, starts the all-reduce of the snapshot and waits for it (one thread:
    /// nothing moves in between), then applies `x ← x + (mean − s)`.
    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        self.snapshot.clear();
        self.snapshot.extend_from_slice(params);
        let pending = comm.start_all_reduce_sum(params.to_vec())?;
        let mut sum = pending.wait()?;
        let distance = distance_to_mean(&self.snapshot, &sum, ctx.world_size);
        change_to_mean(&mut sum, &self.snapshot, ctx.world_size);
        params.iter_mut().zip(&sum).for_each(|(x, change)| *x += change);
        Ok(MergeOutcome { local_squared_distance: Some(distance), trigger: None })
    }

    fn measures_consensus(&self) -> bool {
        true
    }
}

impl MatrixForm for AsyncAveraging {
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        Some(Traffic::ring_all_reduce(4 * values as u64, world_size) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::averaging::Averaging;
    use crate::testing::merge_trajectories;

    #[test]
    fn one_thread_is_averaging_up_to_one_rounding() {
        let delta = merge_trajectories(4, 4, None, || Box::new(AsyncAveraging::new()));
        let mean = merge_trajectories(4, 4, None, || Box::new(Averaging::new()));
        for (a, b) in delta.iter().flatten().flatten().zip(mean.iter().flatten().flatten()) {
            let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn updates_made_during_the_all_reduce_are_kept() {
        let shared = SharedParams::new(&[1.0, 2.0, 3.0]);
        let snapshot = shared.to_vec();
        // Two workers; the other one's snapshot is [3, 4, 5]: the mean is [2, 3, 4].
        let sum = vec![4.0, 6.0, 8.0];
        shared.add(&[0.5, 0.0, -1.0]); // a local step while the sum travelled
        let distance = apply_average_in_place(&shared, &snapshot, sum, 2);
        assert_eq!(shared.to_vec(), vec![2.5, 3.0, 3.0]);
        assert_eq!(distance, 3.0);
    }
}
