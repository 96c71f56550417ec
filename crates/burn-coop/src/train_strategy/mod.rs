//! Cooperative SGD inside burn-train: a learning strategy for `SupervisedTraining`.
//!
//! [`LocalSgdStrategy`] runs `m` replicas of a burn-train [`Learner`](TrainLearner) on threads of
//! this process, each on its own slice of the training data, and merges them with a
//! [`RuleSpec`] (periodic averaging, synchronous SGD, elastic averaging, gossip or any rule of
//! the registry) on the steps a [`ScheduleSpec`] selects (every τ optimizer steps by default). A program written for burn-train switches to it with one line:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use burn::tensor::Device;
//! # use burn::train::{LearnerModel, SupervisedTraining, TrainingStrategy};
//! # use burn_coop::rules::RuleSpec;
//! # use burn_coop::train_strategy::LocalSgdStrategy;
//! # fn configure<M: LearnerModel>(training: SupervisedTraining<M>) -> SupervisedTraining<M> {
//! training.with_training_strategy(TrainingStrategy::Custom(Arc::new(
//!     LocalSgdStrategy::new(4, vec![Device::flex()]).rule(RuleSpec::default()).tau(8),
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
//! - at the end of the epoch the workers compute their average model `x̄`. With a rule that
//!   reaches consensus (averaging, synchronous SGD) this is a merge: every worker adopts `x̄`. With
//!   other rules the workers keep their own models (the rule's dynamics are
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

mod leader;
mod worker;

use std::sync::Mutex;

use burn::data::dataloader::split::split_dataloader;
use burn::module::Module;
use burn::tensor::Device;
use burn::train::train::WorkerFailure;
use burn::train::{
    Learner as TrainLearner, LearnerModel, SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader,
    TrainingComponents, TrainingError, ValidLoader,
};

use self::leader::Leader;
use self::worker::{Worker, run_follower};
use crate::comm::InProcessGroup;
use crate::error::CoopError;
use crate::launch::{Failure, run_group_led};
use crate::params::BufferPolicy;
use crate::schedule::fixed::FixedConfig;
use crate::sync::{CoopStats, Synchronizer};
use crate::{registry::build_pair, rules::RuleSpec, schedule::ScheduleSpec};

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
    schedule: ScheduleSpec,
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
    /// Steps, merges, traffic and consensus distance of this worker's [`Synchronizer`].
    pub coop: CoopStats,
    /// [`parameter_fingerprint`](crate::params::parameter_fingerprint) of the worker's final model. Equal fingerprints mean that the
    /// workers ended with bit-identical models.
    pub parameter_fingerprint: u64,
}

impl LocalSgdStrategy {
    /// `workers` replicas; worker `r` runs on `devices[r % devices.len()]` (autodiff is enabled
    /// on the device by the strategy). Defaults: periodic averaging, τ = 8, no warm-up,
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
            rule: RuleSpec::default(),
            schedule: ScheduleSpec::default(),
            buffer_policy: BufferPolicy::KeepLocal,
            last_run: Mutex::new(None),
        }
    }

    /// The merge rule ([`RuleSpec::Sync`] merges after every step whatever the schedule).
    pub fn rule(self, rule: RuleSpec) -> Self {
        Self { rule, ..self }
    }

    /// When to merge.
    pub fn schedule(self, schedule: ScheduleSpec) -> Self {
        Self { schedule, ..self }
    }

    /// Optimizer steps between merges with the fixed schedule (τ ≥ 1; 0 makes the training fail
    /// with an error). Replaces any other schedule by the fixed one.
    pub fn tau(self, tau: u64) -> Self {
        let warmup_steps = self.fixed().warmup_steps;
        Self { schedule: ScheduleSpec::Fixed(FixedConfig { tau: Some(tau), warmup_steps }), ..self }
    }

    /// Number of initial optimizer steps that each end with a merge (post-local SGD), with the
    /// fixed schedule.
    pub fn warmup_steps(self, steps: u64) -> Self {
        let tau = self.fixed().tau;
        Self { schedule: ScheduleSpec::Fixed(FixedConfig { tau, warmup_steps: Some(steps) }), ..self }
    }

    fn fixed(&self) -> FixedConfig {
        match &self.schedule {
            ScheduleSpec::Fixed(config) => config.clone(),
            _ => FixedConfig::default(),
        }
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

    /// One synchronizer per worker, started on the initial model (identical on every worker,
    /// so there is no broadcast), so that an elastic anchor starts there on every worker.
    fn synchronizers<M: Module>(&self, model: &M) -> Result<Vec<Synchronizer>, CoopError> {
        if let RuleSpec::Async(_) = self.rule {
            // Its local threads are the learner's: here each worker runs one training loop.
            let reason = "asynchronous local SGD runs local threads inside each worker, which only the cooperative learner (`coop train`, `Learner`) provides; use `average` with burn-train";
            return Err(crate::registry::SpecError::new("rule", "async", reason).into());
        }
        InProcessGroup::new(self.workers)
            .into_communicators()
            .into_iter()
            .map(|comm| {
                let (rule, schedule) = build_pair(&self.rule, &self.schedule, self.workers)?;
                let mut sync = Synchronizer::new(rule, schedule, comm)?
                    .with_buffer_policy(self.buffer_policy)
                    .with_initial_broadcast(false);
                sync.start(model.clone())?;
                Ok(sync)
            })
            .collect()
    }
}

fn failure_of(rank: usize, message: impl Into<String>) -> WorkerFailure {
    WorkerFailure { device_id: rank, message: message.into() }
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

        let synchronizers = match self.synchronizers(&learner.model()) {
            Ok(synchronizers) => synchronizers,
            Err(err) => {
                interrupter.fail(TrainingError::Workers(vec![failure_of(0, err.to_string())]));
                return (learner.model(), leader.processor);
            }
        };
        let loaders = match split_dataloader(dataloader_train, &devices) {
            loaders if self.workers == 1 => loaders.into_iter().map(|l| l.to_device(&devices[0])).collect(),
            loaders => loaders,
        };
        let adopts_average = synchronizers.first().is_some_and(|s| s.rule().reaches_consensus());
        let workers: Vec<Worker<M>> = synchronizers
            .into_iter()
            .zip(loaders)
            .enumerate()
            .map(|(rank, (sync, loader))| {
                let mut replica = learner.clone();
                replica.fork(&devices[rank]);
                Worker {
                    rank,
                    learner: replica,
                    loader,
                    sync,
                    adopts_average,
                    buffer_policy: self.buffer_policy,
                    grad_accumulation: components.grad_accumulation,
                    interrupter: interrupter.clone(),
                    batches: 0,
                    merged_at: 0,
                }
            })
            .collect();
        let epochs = starting_epoch..=components.num_epochs;
        let original = learner.clone();
        let outcome = run_group_led(
            workers,
            |mut first| {
                let result = leader.run(&mut first, epochs.clone());
                let (trained, run) = first.finish();
                result.map(|()| (run, Some(trained)))
            },
            |_, worker| run_follower(worker, epochs.clone()).map(|run| (run, None)),
        );
        let runs = match outcome {
            Ok(results) => {
                let mut runs = Vec::with_capacity(results.len());
                for (run, trained) in results {
                    if let Some(trained) = trained {
                        learner = trained;
                    }
                    runs.push(run);
                }
                runs
            }
            Err(failure) => {
                // Panics and a worker's own errors come first; a lost peer is only reported
                // when nothing else explains it.
                let mut failures: Vec<WorkerFailure> = Vec::new();
                for cause in failure.causes() {
                    let message = match &cause.failure {
                        Failure::Panicked(message) => format!("panicked: {message}"),
                        Failure::Error(error) => error.to_string(),
                    };
                    if !failures.iter().any(|f| f.message == message) {
                        failures.push(failure_of(cause.rank, message));
                    }
                }
                interrupter.fail(TrainingError::Workers(failures));
                learner = original;
                Vec::new()
            }
        };
        *self.last_run.lock().unwrap_or_else(|e| e.into_inner()) = Some(LocalSgdRun { workers: runs });
        (learner.model(), leader.processor)
    }
}
