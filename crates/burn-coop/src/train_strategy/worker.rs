//! One replica of the burn-train strategy: its learner, data slice and synchronizer.

use std::ops::RangeInclusive;

use burn::data::dataloader::Progress;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::train::{Interrupter, Learner as TrainLearner, LearnerModel, TrainLoader, TrainStep};

use super::WorkerRun;
use crate::error::CoopError;
use crate::params::{BufferPolicy, ParamLayout, parameter_fingerprint};
use crate::rules::kernels::divide;
use crate::sync::{StepSignal, Synchronizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EpochEnd {
    Completed,
    Interrupted,
}

/// One replica: its learner, data slice, synchronizer and counters.
pub(super) struct Worker<M: LearnerModel> {
    pub(super) rank: usize,
    pub(super) learner: TrainLearner<M>,
    pub(super) loader: TrainLoader<M>,
    pub(super) sync: Synchronizer,
    pub(super) adopts_average: bool,
    pub(super) buffer_policy: BufferPolicy,
    pub(super) grad_accumulation: Option<usize>,
    pub(super) interrupter: Interrupter,
    pub(super) batches: u64,
    pub(super) merged_at: u64,
}

impl<M: LearnerModel> Worker<M> {
    /// Sum of `flags` over the workers.
    pub(super) fn agree(&mut self, flags: [bool; 2]) -> Result<[bool; 2], CoopError> {
        let mut values = flags.map(f64::from);
        self.sync.comm().all_reduce_f64(&mut values)?;
        Ok(values.map(|v| v > 0.0))
    }

    /// One epoch of local steps in lockstep with the other workers. `on_item` sees each
    /// training output with its progress, iteration and learning rate.
    pub(super) fn train_epoch(
        &mut self,
        mut on_item: impl FnMut(<M as TrainStep>::Output, Progress, usize, ModuleLearningRate),
    ) -> Result<EpochEnd, CoopError> {
        let loader = self.loader.clone();
        let mut iterator = loader.iter();
        let mut accumulator = GradientsAccumulator::new();
        let mut pending = 0;
        let mut iteration = 0;
        loop {
            let item = match iterator.next() {
                Some(Ok(item)) => Some(item),
                Some(Err(err)) => {
                    self.interrupter.fail(err);
                    None
                }
                None => None,
            };
            let [out_of_data, stop] = self.agree([item.is_none(), self.interrupter.should_stop()])?;
            if stop {
                return Ok(EpochEnd::Interrupted);
            }
            let Some(item) = item.filter(|_| !out_of_data) else { break };
            iteration += 1;
            self.batches += 1;
            let progress = iterator.progress();
            let output = self.learner.train_step(item);
            match self.grad_accumulation {
                Some(accumulation) => {
                    accumulator.accumulate(&self.learner.model(), output.grads);
                    pending += 1;
                    if pending >= accumulation {
                        self.step(accumulator.grads())?;
                        pending = 0;
                    }
                }
                None => self.step(output.grads)?,
            }
            on_item(output.item, progress, iteration, self.learner.lr_current());
        }
        // Every worker processed the same number of batches, so every worker has the same
        // partial window here and takes the same number of steps.
        if pending > 0 {
            self.step(accumulator.grads())?;
        }
        Ok(EpochEnd::Completed)
    }

    fn step(&mut self, grads: GradientsParams) -> Result<(), CoopError> {
        self.learner.lr_step();
        let lr = self.learner.lr_current().base();
        self.learner.optimizer_step(grads);
        let learner = &self.learner;
        let signal = StepSignal { lr: Some(lr), ..StepSignal::default() };
        if let Some((model, report)) = self.sync.after_step_with(signal, || learner.model())? {
            self.learner.load_model(model.into_record());
            if report.is_some() {
                self.merged_at = self.sync.stats().steps;
            }
        }
        Ok(())
    }

    fn merge(&mut self) -> Result<(), CoopError> {
        let (merged, _) = self.sync.sync_now(self.learner.model())?;
        self.learner.load_model(merged.into_record());
        self.merged_at = self.sync.stats().steps;
        Ok(())
    }

    /// The end-of-epoch average. With an averaging rule every worker adopts it (skipped when
    /// the last step already merged). Otherwise the workers keep their models; worker 0 loads
    /// the average into its learner for evaluation and gets its own model back to resume from.
    pub(super) fn end_epoch(&mut self) -> Result<Option<M>, CoopError> {
        if self.adopts_average {
            if self.merged_at != self.sync.stats().steps {
                self.merge()?;
            }
            return Ok(None);
        }
        let own = self.learner.model();
        let layout = ParamLayout::of(&own, self.buffer_policy);
        let mut mean = layout.flatten(&own)?;
        self.sync.comm().all_reduce_sum(&mut mean)?;
        divide(&mut mean, self.sync.world_size());
        if self.rank != 0 {
            return Ok(None);
        }
        let average = layout.unflatten(own.clone(), &mean)?;
        self.learner.load_model(average.into_record());
        Ok(Some(own))
    }

    /// The counters and the learner; drops the communicator, so that workers still waiting in
    /// a collective learn that this one is gone.
    pub(super) fn finish(self) -> (TrainLearner<M>, WorkerRun) {
        let fingerprint = parameter_fingerprint(&self.learner.model()).unwrap_or_default();
        let run = WorkerRun {
            rank: self.rank,
            optimizer_steps: self.sync.stats().steps,
            batches: self.batches,
            coop: self.sync.stats(),
            parameter_fingerprint: fingerprint,
        };
        (self.learner, run)
    }
}

/// Workers 1..m: training only.
pub(super) fn run_follower<M: LearnerModel>(
    mut worker: Worker<M>,
    epochs: RangeInclusive<usize>,
) -> Result<WorkerRun, CoopError> {
    for _ in epochs {
        let stop = worker.interrupter.should_stop();
        if worker.agree([stop, false])?[0] {
            break;
        }
        match worker.train_epoch(|_, _, _, _| {})? {
            EpochEnd::Interrupted => break,
            EpochEnd::Completed => {
                worker.end_epoch()?;
            }
        }
    }
    Ok(worker.finish().1)
}
