//! The learner's configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fault::InjectedFault;
use super::optimizer::{LrSchedule, OptimizerSpec};
use crate::comm::{NetworkModel, StepTime};
use crate::local_sgd::InnerStatePolicy;
use crate::params::BufferPolicy;
use crate::{rules::RuleSpec, schedule::ScheduleSpec};

/// Everything the cooperative learner needs to know about a run (the task supplies the model
/// and data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnerConfig {
    /// Number of workers (model replicas).
    pub workers: usize,
    /// Merge rule and its settings.
    pub rule: RuleSpec,
    /// When to merge (a rule may impose its own period: synchronous SGD merges every step).
    pub schedule: ScheduleSpec,
    /// Measure the consensus distance every this many merges for rules that do not measure it
    /// by themselves (gossip); 0: never. Its bytes are reported apart.
    pub consensus_every: u64,
    /// The bucket size in bytes of merges taken a bucket of tensors at a time (see
    /// [`Synchronizer::with_bucket_size`](crate::Synchronizer::with_bucket_size)).
    pub bucket_bytes: usize,
    /// Training epochs.
    pub epochs: usize,
    /// Inner optimizer.
    pub optimizer: OptimizerSpec,
    /// Learning-rate schedule.
    pub lr: LrSchedule,
    /// Whether BatchNorm statistics are merged with the weights.
    pub buffers: BufferPolicy,
    /// What happens to the inner optimizer's state at a merge.
    pub inner_state: InnerStatePolicy,
    /// Also evaluate each worker's own model at the end of each epoch.
    pub eval_workers: bool,
    /// Write a checkpoint every this many merges (0: only at the end of each epoch).
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// Output folder for metrics, the resolved configuration and checkpoints.
    pub output: PathBuf,
    /// Stop after this many global steps (for tests and smoke runs; `None`: run all epochs).
    pub max_steps: Option<u64>,
    /// Seed of the model's initialization (the task seeds its own data order).
    pub seed: u64,
    /// Show progress bars when the output is a terminal.
    pub progress: bool,
    /// Simulate this network: every worker keeps a simulated clock, and the metrics get
    /// `sim_seconds` and `sim_comm_seconds` columns (see [`NetworkModel`]). `None`: no
    /// simulated clock, no such columns.
    pub network: Option<NetworkModel>,
    /// The simulated time of a local step (with a network).
    pub step_time: StepTime,
    /// Faults to inject (see [`InjectedFault`]); honoured on threads.
    pub faults: Vec<InjectedFault>,
    /// Seconds a worker waits at a collective for the others before it declares the missing
    /// ones lost (`None`: as long as they are alive). A lost peer is reported at once either way.
    pub peer_timeout: Option<f64>,
}

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            rule: RuleSpec::default(),
            schedule: ScheduleSpec::default(),
            consensus_every: 0,
            bucket_bytes: crate::DEFAULT_BUCKET_BYTES,
            epochs: 5,
            optimizer: OptimizerSpec::default(),
            lr: LrSchedule::default(),
            buffers: BufferPolicy::Merge,
            inner_state: InnerStatePolicy::KeepLocal,
            eval_workers: false,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            output: PathBuf::from("runs/latest"),
            max_steps: None,
            seed: 42,
            progress: true,
            network: None,
            step_time: StepTime::default(),
            faults: Vec::new(),
            peer_timeout: None,
        }
    }
}
