//! The cooperative learner: replicas of a model trained together on threads of one process.
//!
//! [`Learner`] replicates a [`CoopTask`]'s model across a list of Burn devices (several replicas
//! may share a device), runs [`run_worker`] on one thread per replica with an in-process
//! communicator, and returns a [`TrainingSummary`]. The same [`run_worker`] runs one-per-process
//! under MPI. Metrics go to the output folder as `metrics.jsonl`, `syncs.csv` and `epochs.csv`
//! beside the resolved `learner.json`; checkpoints go to `checkpoints/` (see [`latest_checkpoint`]).

mod async_worker;
mod checkpoint;
mod config;
mod fault;
mod metrics;
mod optimizer;
mod shared;
mod task;
mod worker;

use std::path::PathBuf;

use burn::tensor::Device;

pub use checkpoint::{CheckpointError, latest_checkpoint};
pub use config::LearnerConfig;
pub use fault::{FaultKind, FaultParseError, InjectedFault, check_faults};
pub use metrics::{Columns, EpochMetrics, RunPoint, SyncMetrics};
pub use optimizer::{LrSchedule, LrShape, OptimizerSpec};
pub use shared::WorkerReport;
pub use task::{CoopTask, Evaluation};
pub use worker::run_worker;

use crate::comm::InProcessGroup;
use crate::error::CoopError;
use crate::launch::{Failure, FailureCause, run_group};
use crate::registry::SpecError;

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// The cooperative layer failed (a lost worker, a bad rule, non-finite parameters…).
    #[error(transparent)]
    Coop(#[from] CoopError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A file in the output folder could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A worker's training loss became NaN or infinite.
    #[error("worker {worker} has a non-finite training loss ({loss}) at step {step}; the last good checkpoint is kept")]
    NonFiniteLoss {
        /// The worker.
        worker: usize,
        /// The step (1-based) whose loss was not finite.
        step: u64,
        /// The loss value.
        loss: f64,
    },
    /// The average model's test loss became NaN or infinite at an epoch's end.
    #[error(
        "the average model's test loss is {loss} at step {step}: {non_finite} of its {values} values are NaN or infinite{hint}; the last good checkpoint is kept"
    )]
    NonFiniteTestLoss {
        /// The step (1-based) the epoch ended at.
        step: u64,
        /// The test loss.
        loss: f64,
        /// Values of the average model (weights and buffers) that are not finite.
        non_finite: usize,
        /// Values of the average model.
        values: usize,
        /// What to look at when every value is finite.
        hint: &'static str,
    },
    /// A worker thread panicked.
    #[error("worker {worker} panicked: {message}")]
    WorkerPanicked {
        /// The worker.
        worker: usize,
        /// The panic message.
        message: String,
    },
    /// A rule's or schedule's settings cannot run with this number of workers.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The number of workers, devices or batches cannot run.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A model or optimizer record could not be (de)serialized.
    #[error("cannot serialize or restore a record: {0}")]
    Record(String),
    /// A fault injected on purpose (`--inject-fault`) made this worker fail.
    #[error("worker {worker} failed on purpose after step {step}: injected fault '{kind}'")]
    InjectedFault {
        /// The worker.
        worker: usize,
        /// The step after which it failed.
        step: u64,
        /// The fault's kind.
        kind: &'static str,
    },
    /// Another worker failed and said so at a collective (asynchronous local SGD); its own
    /// error is the cause.
    #[error("worker {worker} failed (its own error says why), so this worker stopped")]
    PeerFailed {
        /// The worker that failed.
        worker: usize,
    },
}

impl From<crate::params::LayoutError> for LearnerError {
    fn from(error: crate::params::LayoutError) -> Self {
        Self::Coop(error.into())
    }
}

impl FailureCause for LearnerError {
    /// When several workers fail, the learner reports the cause rather than its consequences:
    /// a worker's own failure first, then another worker's non-finite parameters as seen by the
    /// rest, then lost peers.
    fn consequence_level(&self) -> u8 {
        match self {
            Self::Coop(error) => error.consequence_level(),
            Self::PeerFailed { .. } => 2,
            _ => 0,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSummary {
    /// One report per worker, in rank order.
    pub workers: Vec<WorkerReport>,
    /// Where metrics, checkpoints and the average model were written.
    pub output: PathBuf,
}

impl TrainingSummary {
    /// The last epoch's metrics.
    pub fn last_epoch(&self) -> Option<&EpochMetrics> {
        self.workers.first().and_then(|w| w.last_epoch.as_ref())
    }
}

/// Trains `config.workers` replicas of a task's model on threads of this process.
pub struct Learner<T: CoopTask> {
    task: T,
    config: LearnerConfig,
    devices: Vec<Device>,
    resume: bool,
}

impl<T: CoopTask> Learner<T> {
    /// A learner for `task`; replica `r` runs on `devices[r % devices.len()]`.
    pub fn new(task: T, config: LearnerConfig, devices: Vec<Device>) -> Self {
        Self { task, config, devices, resume: false }
    }

    /// Continue from the newest checkpoint in the configured output folder.
    pub fn resume(self) -> Self {
        Self { resume: true, ..self }
    }

    /// Runs the training to the end (or to the first error, after every worker has stopped).
    pub fn run(self) -> Result<TrainingSummary, LearnerError> {
        let config = self.config;
        if config.workers == 0 {
            return Err(LearnerError::Config("at least one worker is needed".into()));
        }
        if self.devices.is_empty() {
            return Err(LearnerError::Config("at least one device is needed".into()));
        }
        std::fs::create_dir_all(&config.output)
            .map_err(|source| LearnerError::Io { path: config.output.clone(), source })?;
        let resolved = config.output.join("learner.json");
        std::fs::write(&resolved, serde_json::to_vec_pretty(&config).expect("config serializes"))
            .map_err(|source| LearnerError::Io { path: resolved, source })?;

        let mut group = InProcessGroup::new(config.workers);
        if let Some(seconds) = config.peer_timeout.filter(|s| s.is_finite() && *s > 0.0) {
            group = group.with_timeout(std::time::Duration::from_secs_f64(seconds));
        }
        let comms = group.into_communicators();
        let (task, devices, resume) = (&self.task, &self.devices, self.resume);
        let reports =
            run_group(comms, |rank, comm| run_worker(task, &config, &devices[rank % devices.len()], comm, resume))
                .map_err(|failure| {
                    let primary = failure.into_primary();
                    match primary.failure {
                        Failure::Error(error) => error,
                        Failure::Panicked(message) => LearnerError::WorkerPanicked { worker: primary.rank, message },
                    }
                })?;
        Ok(TrainingSummary { workers: reports, output: config.output })
    }
}
