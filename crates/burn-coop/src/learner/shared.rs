//! What both modes of the worker loop share (local steps with merges, and asynchronous local
//! SGD's local threads): the step plan, the seeded model, the evaluation of the average model,
//! its file, the wall clock and the report.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;

use super::LearnerError;
use super::config::LearnerConfig;
use super::metrics::EpochMetrics;
use super::task::{CoopTask, Evaluation};
use crate::comm::Communicator;
use crate::error::CoopError;
use crate::params::{BufferPolicy, ParamLayout};
use crate::rules::kernels::divide;

/// What a worker's run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerReport {
    /// This worker's rank.
    pub rank: usize,
    /// Global steps done (including those before a resume).
    pub steps: u64,
    /// Merges done.
    pub syncs: u64,
    /// Bytes this worker sent.
    pub bytes_sent: u64,
    /// The last epoch's metrics (identical on every worker), if an epoch ended.
    pub last_epoch: Option<EpochMetrics>,
    /// This worker's final flat parameters (weights and buffers, in visiting order).
    pub final_parameters: Vec<f32>,
}

/// Seconds since the run began, counting those before a resume.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WallClock {
    pub started: Instant,
    pub before: f64,
}

impl WallClock {
    pub fn now(&self) -> f64 {
        self.before + self.started.elapsed().as_secs_f64()
    }
}

/// Evaluates the workers' average model x̄ (weights and buffers averaged), each worker on its
/// share of the test set, after `step` steps; `agreed`: every worker holds x̄ already (after an
/// averaging merge), so it is not all-reduced again. Returns x̄ (without autodiff) and the summed
/// evaluation, or an error (on every worker alike) when the test loss is not finite.
pub(super) fn evaluate_average<T: CoopTask>(
    task: &T,
    model: &T::Model,
    step: u64,
    comm: &mut dyn Communicator,
    device: &Device,
    agreed: bool,
) -> Result<(T::Model, Evaluation), LearnerError> {
    let layout = ParamLayout::of(model, BufferPolicy::Merge);
    let mut mean = layout.flatten(model)?;
    if !agreed {
        comm.all_reduce_sum(&mut mean).map_err(CoopError::from)?;
        divide(&mut mean, comm.world_size());
    }
    // `valid` gives a copy with its own BatchNorm state, so the worker's model is untouched.
    let average = layout.unflatten(model.valid(), &mean)?;
    let (rank, workers) = (comm.rank(), comm.world_size());
    let part = task.evaluate(&average, rank, workers, &device.clone().without_autodiff());
    let mut totals = [part.loss_sum, part.correct as f64, part.count as f64];
    comm.all_reduce_f64(&mut totals).map_err(CoopError::from)?;
    let evaluation = Evaluation { loss_sum: totals[0], correct: totals[1] as u64, count: totals[2] as u64 };
    if !evaluation.loss().is_finite() {
        let non_finite = mean.iter().filter(|v| !v.is_finite()).count();
        let hint = if non_finite == 0 {
            " (all finite: look at the buffers, e.g. a BatchNorm running variance below zero)"
        } else {
            ""
        };
        return Err(LearnerError::NonFiniteTestLoss {
            step,
            loss: evaluation.loss(),
            non_finite,
            values: mean.len(),
            hint,
        });
    }
    Ok((average, evaluation))
}

/// Writes the average model to `<output>/model-average.bpk` through a temporary file.
pub(super) fn save_average<M: Module>(model: &M, output: &Path) -> Result<(), LearnerError> {
    let bytes = model.clone().into_record().into_bytes().map_err(|e| LearnerError::Record(format!("{e:?}")))?;
    let path = output.join("model-average.bpk");
    let temporary = output.join("model-average.bpk.tmp");
    std::fs::write(&temporary, &*bytes).map_err(|source| LearnerError::Io { path: temporary.clone(), source })?;
    std::fs::rename(&temporary, &path).map_err(|source| LearnerError::Io { path, source })
}

/// A run's step counts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Steps {
    /// Steps per epoch (the smallest shard's batches, so every worker takes as many).
    pub per_epoch: u64,
    /// Steps of all the epochs.
    pub planned: u64,
    /// Steps this run takes (`max_steps` may stop it earlier).
    pub total: u64,
}

/// Who a worker is and what it trains: what every step of either loop mode reads.
pub(super) struct WorkerPlan<'a, T: CoopTask> {
    pub task: &'a T,
    pub config: &'a LearnerConfig,
    /// The training device (with autodiff).
    pub device: &'a Device,
    pub rank: usize,
    pub workers: usize,
    pub steps: Steps,
}

impl<T: CoopTask> Clone for WorkerPlan<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: CoopTask> Copy for WorkerPlan<'_, T> {}

impl<T: CoopTask> WorkerPlan<'_, T> {
    /// The learning rate of global step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.config.lr.at(step, self.steps.per_epoch, self.steps.planned)
    }
}

/// Checks the number of workers against the configuration and plans the steps.
pub(super) fn plan_steps<T: CoopTask>(task: &T, config: &LearnerConfig, workers: usize) -> Result<Steps, LearnerError> {
    if workers != config.workers {
        return Err(LearnerError::Config(format!(
            "the configuration asks for {} workers but the communicator has {workers}",
            config.workers
        )));
    }
    let per_epoch = (0..workers).map(|w| task.batches_per_epoch(w, workers)).min().unwrap_or(0) as u64;
    if per_epoch == 0 {
        return Err(LearnerError::Config(
            "a worker has no training batch: its data shard is smaller than a batch".into(),
        ));
    }
    let planned = per_epoch * config.epochs as u64;
    Ok(Steps { per_epoch, planned, total: config.max_steps.map_or(planned, |max| max.min(planned)) })
}

/// A model initialized from `seed`: the same seed gives the same weights in every run (seeding
/// and initializing happen under one process-wide lock, see [`crate::Worker::init`]).
pub(super) fn init_seeded<T: CoopTask>(task: &T, device: &Device, seed: u64) -> T::Model {
    crate::launch::init_seeded(seed, device, |device| task.init_model(device))
}
