//! Cooperative SGD inside burn-train: a learning strategy for `SupervisedTraining`.
//!
//! [`LocalSgdStrategy`] runs `m` replicas of a burn-train [`Learner`](TrainLearner) on threads of
//! this process, each on its own slice of the training data, and merges them with a
//! [`RuleSpec`] (periodic averaging, synchronous SGD, elastic averaging or gossip) every τ
//! optimizer steps. A program written for burn-train switches to it with one line:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use burn::tensor::Device;
//! # use burn::train::{LearnerModel, SupervisedTraining, TrainingStrategy};
//! # use burn_coop::learner::RuleSpec;
//! # use burn_coop::train_strategy::LocalSgdStrategy;
//! # fn configure<M: LearnerModel>(training: SupervisedTraining<M>) -> SupervisedTraining<M> {
//! training.with_training_strategy(TrainingStrategy::Custom(Arc::new(
//!     LocalSgdStrategy::new(4, vec![Device::flex()]).rule(RuleSpec::Average).tau(8),
//! )))
//! # }
//! ```
//!
//! What the strategy does, per epoch:
//! - every worker takes local steps on its slice (`lr_step`, `train_step`, `optimizer_step`, with
//!   gradient accumulation when configured), and the workers merge on the steps the rule's
//!   schedule selects;
//! - before each step the workers agree that all of them still have a batch and that nobody was
//!   interrupted, so slices of unequal length end the epoch for everyone at the same step;
//! - at the end of the epoch the workers compute their average model `x̄`. With
//!   [`RuleSpec::Average`] and [`RuleSpec::Sync`] this is a merge: every worker adopts `x̄`. With
//!   elastic averaging and gossip the workers keep their own models (the rule's dynamics are
//!   unchanged) and only worker 0 evaluates `x̄`;
//! - worker 0, on the calling thread, reports the training items of its own slice to the
//!   metrics, validates `x̄`, saves checkpoints of `x̄` and applies early stopping and the
//!   interrupter, like burn-train's single-device strategy.
//!
//! The model returned by the training is `x̄` after the last epoch.
//!
//! # Limitations
//!
//! - BatchNorm running statistics are *shared* between the replicas: burn's `RunningState` keeps
//!   one buffer for a module and all its clones, and when several threads update it during the
//!   same step burn averages their updates. The buffers are therefore effectively averaged at
//!   every step whatever the rule; by default ([`BufferPolicy::KeepLocal`]) the strategy does not
//!   send them in merges. Only trainable parameters follow the chosen rule.
//! - The training metrics are those of worker 0's batches.
//! - Each worker keeps its own optimizer state (momentum, Adam moments); checkpoints hold
//!   worker 0's optimizer state and the average model. Resuming from a checkpoint restarts every
//!   worker from that average model, and the rule and schedule from scratch (an elastic anchor
//!   restarts at the resumed model).
//! - `LearningResult::error` reports a failed merge or a panicking worker as
//!   `TrainingError::Workers`, where `WorkerFailure::device_id` is the worker's rank.

use std::ops::RangeInclusive;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;
use std::thread;

use burn::data::dataloader::Progress;
use burn::data::dataloader::split::split_dataloader;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams, SgdConfig};
use burn::tensor::Device;
use burn::train::metric::store::EventStoreClient;
use burn::train::train::WorkerFailure;
use burn::train::{
    EventProcessorTraining, InferenceStep, Interrupter, Learner as TrainLearner, LearnerEvent, LearnerModel,
    LearningCheckpointer, SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainStep,
    TrainingComponents, TrainingError, TrainingItem, ValidLoader,
};

use crate::error::CoopError;
use crate::learner::RuleSpec;
use crate::local_sgd::{CoopStats, LocalSgd};
use crate::params::{BufferPolicy, LayoutError, ParamLayout};
use crate::schedule::SyncSchedule;
use crate::transport::{InProcessGroup, ReduceOp, TransportError};

/// A burn-train learning strategy that trains `m` replicas with local SGD, elastic averaging or
/// gossip (see the [module documentation](self) for the details and limitations).
///
/// Give it to `SupervisedTraining::with_training_strategy` as `TrainingStrategy::Custom(Arc::new(..))`.
/// Keep a clone of the `Arc` to read [`LocalSgdStrategy::last_run`] after training.
#[derive(Debug)]
pub struct LocalSgdStrategy {
    workers: usize,
    devices: Vec<Device>,
    rule: RuleSpec,
    tau: u64,
    warmup_steps: u64,
    buffer_policy: BufferPolicy,
    last_run: Mutex<Option<LocalSgdRun>>,
}

/// What the workers of the last training did, read with [`LocalSgdStrategy::last_run`].
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSgdRun {
    /// One entry per worker that ended without an error, in rank order.
    pub workers: Vec<WorkerRun>,
}

/// One worker's counters after training.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRun {
    /// The worker's rank.
    pub rank: usize,
    /// Optimizer steps taken (fewer than batches with gradient accumulation).
    pub optimizer_steps: u64,
    /// Training batches processed.
    pub batches: u64,
    /// Merges, traffic and consensus distance of this worker's [`LocalSgd`].
    pub coop: CoopStats,
    /// [`parameter_fingerprint`] of the worker's final model. Equal fingerprints mean that the
    /// workers ended with bit-identical models.
    pub parameter_fingerprint: u64,
}

impl LocalSgdStrategy {
    /// `workers` replicas; worker `r` runs on `devices[r % devices.len()]` (autodiff is enabled
    /// on the device by the strategy). Defaults: [`RuleSpec::Average`], τ = 8, no warm-up,
    /// buffers not merged.
    ///
    /// # Panics
    ///
    /// When `workers` is 0 or `devices` is empty.
    pub fn new(workers: usize, devices: Vec<Device>) -> Self {
        assert!(workers > 0, "LocalSgdStrategy needs at least one worker");
        assert!(!devices.is_empty(), "LocalSgdStrategy needs at least one device");
        Self {
            workers,
            devices,
            rule: RuleSpec::Average,
            tau: 8,
            warmup_steps: 0,
            buffer_policy: BufferPolicy::KeepLocal,
            last_run: Mutex::new(None),
        }
    }

    /// The merge rule ([`RuleSpec::Sync`] merges after every step whatever τ).
    pub fn rule(self, rule: RuleSpec) -> Self {
        Self { rule, ..self }
    }

    /// Optimizer steps between merges (τ ≥ 1; 0 makes the training fail with an error).
    pub fn tau(self, tau: u64) -> Self {
        Self { tau, ..self }
    }

    /// Number of initial optimizer steps that each end with a merge (post-local SGD).
    pub fn warmup_steps(self, steps: u64) -> Self {
        Self { warmup_steps: steps, ..self }
    }

    /// Whether float tensors without gradients (BatchNorm statistics) take part in merges.
    /// The default, [`BufferPolicy::KeepLocal`], leaves them to burn, which shares them between
    /// the replicas anyway (see the [module documentation](self)).
    pub fn buffer_policy(self, policy: BufferPolicy) -> Self {
        Self { buffer_policy: policy, ..self }
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The counters of the last training run with this strategy, once one has finished.
    pub fn last_run(&self) -> Option<LocalSgdRun> {
        self.last_run.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn device(&self, rank: usize) -> Device {
        self.devices[rank % self.devices.len()].clone().autodiff()
    }

    /// One [`LocalSgd`] and one schedule per worker. The rule sees the initial model before
    /// training, so that an elastic anchor starts there on every worker.
    fn coordinators<M: Module>(&self, model: &M) -> Result<Vec<(LocalSgd, Box<dyn SyncSchedule>)>, CoopError> {
        let initial = ParamLayout::of(model, self.buffer_policy).flatten(model)?;
        InProcessGroup::new(self.workers)
            .into_transports()
            .into_iter()
            .map(|transport| {
                let mut rule = self.rule.build(self.workers)?;
                rule.start(&initial);
                let unused_schedule = self.rule.schedule(self.tau, self.warmup_steps)?;
                let sgd = LocalSgd::new(SgdConfig::new().init(), rule, unused_schedule, transport)?
                    .with_buffer_policy(self.buffer_policy)
                    .with_initial_broadcast(false);
                Ok((sgd, self.rule.schedule(self.tau, self.warmup_steps)?))
            })
            .collect()
    }
}

/// A hash (FNV-1a over the bit patterns) of all a module's float tensors, parameters and
/// buffers, in visiting order. It does not depend on autodiff, so a trained model and its
/// `valid()` copy have the same fingerprint.
pub fn parameter_fingerprint<M: Module>(module: &M) -> Result<u64, LayoutError> {
    let flat = ParamLayout::of(module, BufferPolicy::Merge).flatten(module)?;
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for value in flat {
        for byte in value.to_bits().to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(hash)
}

fn failure(rank: usize, message: impl Into<String>) -> WorkerFailure {
    WorkerFailure { device_id: rank, message: message.into() }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpochEnd {
    Completed,
    Interrupted,
}

/// One replica: its learner, data slice, coordinator and counters.
struct Worker<M: LearnerModel> {
    rank: usize,
    learner: TrainLearner<M>,
    loader: TrainLoader<M>,
    sgd: LocalSgd,
    schedule: Box<dyn SyncSchedule>,
    adopts_average: bool,
    buffer_policy: BufferPolicy,
    grad_accumulation: Option<usize>,
    interrupter: Interrupter,
    steps: u64,
    batches: u64,
    merged_at: u64,
}

impl<M: LearnerModel> Worker<M> {
    /// Sum of `flags` over the workers.
    fn agree(&mut self, flags: [bool; 2]) -> Result<[bool; 2], CoopError> {
        let mut values = flags.map(f64::from);
        self.sgd.transport_mut().all_reduce_f64(&mut values)?;
        Ok(values.map(|v| v > 0.0))
    }

    /// One epoch of local steps in lockstep with the other workers. `on_item` sees each
    /// training output with its progress, iteration and learning rate.
    fn train_epoch(
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
        self.learner.optimizer_step(grads);
        self.steps += 1;
        if self.schedule.is_sync_step(self.steps) {
            self.merge()?;
        }
        Ok(())
    }

    fn merge(&mut self) -> Result<(), CoopError> {
        let merged = self.sgd.merge(self.learner.model())?;
        self.learner.load_model(merged.into_record());
        self.merged_at = self.steps;
        Ok(())
    }

    /// The end-of-epoch average. With an averaging rule every worker adopts it (skipped when
    /// the last step already merged). Otherwise the workers keep their models; worker 0 loads
    /// the average into its learner for evaluation and gets its own model back to resume from.
    fn end_epoch(&mut self) -> Result<Option<M>, CoopError> {
        if self.adopts_average {
            if self.merged_at != self.steps {
                self.merge()?;
            }
            return Ok(None);
        }
        let own = self.learner.model();
        let layout = ParamLayout::of(&own, self.buffer_policy);
        let flat = layout.flatten(&own)?;
        let mut mean = vec![0.0; flat.len()];
        self.sgd.transport_mut().all_reduce(&flat, &mut mean, ReduceOp::Mean)?;
        if self.rank != 0 {
            return Ok(None);
        }
        let average = layout.unflatten(own.clone(), &mean)?;
        self.learner.load_model(average.into_record());
        Ok(Some(own))
    }

    /// The counters and the learner; drops the transport, so that workers still waiting in a
    /// collective learn that this one is gone.
    fn finish(self) -> (TrainLearner<M>, WorkerRun) {
        let fingerprint = parameter_fingerprint(&self.learner.model()).unwrap_or_default();
        let run = WorkerRun {
            rank: self.rank,
            optimizer_steps: self.steps,
            batches: self.batches,
            coop: self.sgd.stats(),
            parameter_fingerprint: fingerprint,
        };
        (self.learner, run)
    }
}

/// Workers 1..m: training only.
fn run_follower<M: LearnerModel>(mut worker: Worker<M>, epochs: RangeInclusive<usize>) -> Result<WorkerRun, CoopError> {
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

/// What only worker 0 does: events, validation, checkpoints, early stopping.
struct Leader<M: LearnerModel> {
    processor: SupervisedTrainingEventProcessor<M>,
    checkpointer: Option<LearningCheckpointer<M>>,
    early_stopping: Option<Box<dyn burn::train::CloneEarlyStoppingStrategy>>,
    event_store: std::sync::Arc<EventStoreClient>,
    valid: ValidLoader<M>,
    interrupter: Interrupter,
}

impl<M: LearnerModel> Leader<M> {
    fn run(&mut self, worker: &mut Worker<M>, epochs: RangeInclusive<usize>) -> Result<(), CoopError> {
        let train_items = worker.loader.num_items();
        let valid_items = self.valid.num_items();
        let interrupter = self.interrupter.clone();
        let mut stop = false;
        let mut own: Option<M> = None;
        for epoch in epochs {
            if worker.agree([stop || interrupter.should_stop(), false])?[0] {
                break;
            }
            if let Some(model) = own.take() {
                worker.learner.load_model(model.into_record());
            }
            interrupter.fail_on_error(
                self.processor
                    .process_train(LearnerEvent::StartSplit { epoch_number: epoch, total_items: train_items }),
            );
            let processor = &mut self.processor;
            let end = worker.train_epoch(|item, progress, iteration, lr| {
                let item = TrainingItem::new(item, progress, Some(iteration), Some(lr));
                interrupter.fail_on_error(processor.process_train(LearnerEvent::ProcessedItem(item)));
            })?;
            interrupter.fail_on_error(self.processor.process_train(LearnerEvent::EndSplit(epoch)));
            if end == EpochEnd::Interrupted {
                break;
            }
            own = worker.end_epoch()?;

            interrupter.fail_on_error(
                self.processor
                    .process_valid(LearnerEvent::StartSplit { epoch_number: epoch, total_items: valid_items }),
            );
            self.validate(&worker.learner);
            interrupter.fail_on_error(self.processor.process_valid(LearnerEvent::EndSplit(epoch)));
            interrupter.fail_on_error(self.processor.process_train(LearnerEvent::EndEpoch(epoch)));
            if self.checkpointer.is_some() || self.early_stopping.is_some() {
                interrupter.fail_on_error(self.processor.flush());
            }
            if interrupter.should_stop() {
                stop = true;
                continue;
            }
            if let Some(checkpointer) = &mut self.checkpointer {
                checkpointer.checkpoint(&worker.learner, epoch, &self.event_store);
            }
            if let Some(early_stopping) = &mut self.early_stopping
                && early_stopping.should_stop(epoch, &self.event_store)
            {
                stop = true;
            }
        }
        Ok(())
    }

    fn validate(&mut self, learner: &TrainLearner<M>) {
        let model = learner.model().valid();
        let mut iterator = self.valid.iter();
        let mut iteration = 0;
        while let Some(item) = iterator.next() {
            let item = match item {
                Ok(item) => item,
                Err(err) => {
                    self.interrupter.fail(err);
                    break;
                }
            };
            let progress = iterator.progress();
            iteration += 1;
            let output = InferenceStep::step(&model, item);
            let item = TrainingItem::new(output, progress, Some(iteration), None);
            self.interrupter.fail_on_error(self.processor.process_valid(LearnerEvent::ProcessedItem(item)));
            if self.interrupter.should_stop() {
                break;
            }
        }
    }
}

impl<M: LearnerModel> SupervisedLearningStrategy<M> for LocalSgdStrategy {
    fn fit(
        &self,
        components: TrainingComponents<M>,
        mut learner: TrainLearner<M>,
        dataloader_train: TrainLoader<M>,
        dataloader_valid: ValidLoader<M>,
        starting_epoch: usize,
    ) -> (M, SupervisedTrainingEventProcessor<M>) {
        let interrupter = components.interrupter.clone();
        let devices: Vec<Device> = (0..self.workers).map(|rank| self.device(rank)).collect();
        let mut leader = Leader {
            processor: components.event_processor,
            checkpointer: components.checkpointer,
            early_stopping: components.early_stopping,
            event_store: components.event_store,
            valid: dataloader_valid.to_device(&devices[0].clone().inner()),
            interrupter: interrupter.clone(),
        };
        *self.last_run.lock().unwrap_or_else(|e| e.into_inner()) = None;

        let coordinators = match self.coordinators(&learner.model()) {
            Ok(coordinators) => coordinators,
            Err(err) => {
                interrupter.fail(TrainingError::Workers(vec![failure(0, err.to_string())]));
                return (learner.model(), leader.processor);
            }
        };
        let loaders = match split_dataloader(dataloader_train, &devices) {
            loaders if self.workers == 1 => loaders.into_iter().map(|l| l.to_device(&devices[0])).collect(),
            loaders => loaders,
        };
        let adopts_average = matches!(self.rule, RuleSpec::Average | RuleSpec::Sync);
        let mut workers: Vec<Worker<M>> = coordinators
            .into_iter()
            .zip(loaders)
            .enumerate()
            .map(|(rank, ((sgd, schedule), loader))| {
                let mut replica = learner.clone();
                replica.fork(&devices[rank]);
                Worker {
                    rank,
                    learner: replica,
                    loader,
                    sgd,
                    schedule,
                    adopts_average,
                    buffer_policy: self.buffer_policy,
                    grad_accumulation: components.grad_accumulation,
                    interrupter: interrupter.clone(),
                    steps: 0,
                    batches: 0,
                    merged_at: 0,
                }
            })
            .collect();
        let followers = workers.split_off(1);
        let mut first = workers.pop().expect("at least one worker");
        let epochs = starting_epoch..=components.num_epochs;

        let (first_result, follower_results) = thread::scope(|scope| {
            let handles: Vec<_> = followers
                .into_iter()
                .map(|worker| {
                    let rank = worker.rank;
                    let epochs = epochs.clone();
                    let spawned = thread::Builder::new()
                        .name(format!("local-sgd-worker-{rank}"))
                        .spawn_scoped(scope, move || run_follower(worker, epochs));
                    (rank, spawned)
                })
                .collect();
            let first_result = panic::catch_unwind(AssertUnwindSafe(|| leader.run(&mut first, epochs.clone())));
            let (trained, first_run) = first.finish();
            learner = trained;
            let follower_results: Vec<_> = handles
                .into_iter()
                .map(|(rank, spawned)| match spawned {
                    Err(err) => (rank, Err(Err(format!("could not start the worker thread: {err}")))),
                    Ok(handle) => match handle.join() {
                        Ok(result) => (rank, result.map_err(Ok)),
                        Err(payload) => (rank, Err(Err(format!("panicked: {}", panic_message(payload.as_ref()))))),
                    },
                })
                .collect();
            let first_result = match first_result {
                Ok(Ok(())) => Ok(first_run),
                Ok(Err(err)) => Err(Ok(err)),
                Err(payload) => Err(Err(format!("panicked: {}", panic_message(payload.as_ref())))),
            };
            (first_result, follower_results)
        });

        // Panics and thread failures come first; among merge errors, a lost peer is only a
        // consequence of another worker's failure.
        let mut runs = Vec::new();
        let mut panics = Vec::new();
        let mut errors: Vec<(usize, CoopError)> = Vec::new();
        for (rank, result) in std::iter::once((0, first_result)).chain(follower_results) {
            match result {
                Ok(run) => runs.push(run),
                Err(Ok(err)) => errors.push((rank, err)),
                Err(Err(message)) => panics.push(failure(rank, message)),
            }
        }
        if !panics.is_empty() {
            interrupter.fail(TrainingError::Workers(panics));
        } else if !errors.is_empty() {
            let is_consequence = |err: &CoopError| matches!(err, CoopError::Transport(TransportError::PeerLost { .. }));
            let causes = if errors.iter().all(|(_, err)| is_consequence(err)) {
                errors
            } else {
                errors.into_iter().filter(|(_, err)| !is_consequence(err)).collect()
            };
            let mut failures: Vec<WorkerFailure> = Vec::new();
            for (rank, err) in causes {
                let message = err.to_string();
                if !failures.iter().any(|f| f.message == message) {
                    failures.push(failure(rank, message));
                }
            }
            interrupter.fail(TrainingError::Workers(failures));
        }
        *self.last_run.lock().unwrap_or_else(|e| e.into_inner()) = Some(LocalSgdRun { workers: runs });
        (learner.model(), leader.processor)
    }
}
