//! The crate's top-level error type.

use crate::comm::CommError;
use crate::mixing::MixingError;
use crate::params::LayoutError;
use crate::registry::SpecError;
use crate::rules::RuleError;
use crate::schedule::ScheduleError;
use crate::topology::TopologyError;

/// Everything that can go wrong in cooperative training.
///
/// Each variant wraps the error of the concept it comes from, so a caller can match on the
/// family (`CoopError::Comm(_)`) or on the exact case.
#[derive(Debug, thiserror::Error)]
pub enum CoopError {
    /// A topology could not be built.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A mixing matrix failed validation.
    #[error(transparent)]
    Mixing(#[from] MixingError),
    /// A merge rule cannot run (its settings, its saved state).
    #[error(transparent)]
    Rule(RuleError),
    /// A rule's or schedule's settings cannot run with this number of workers.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A synchronization schedule was configured with values it cannot run with.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Communication with the other workers failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The module's parameters do not match the layout recorded at the first step.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// [`Worker::comm`](crate::Worker::comm) was called twice.
    #[error("worker {rank}'s communicator was already taken: one per worker")]
    CommunicatorTaken {
        /// The worker's rank.
        rank: usize,
    },
    /// A worker's parameters became NaN or infinite.
    #[error("worker {rank} has non-finite parameters at step {step} ({count} of {total} values are NaN or infinite)")]
    NonFiniteParameters {
        /// Rank of the worker whose parameters are not finite.
        rank: usize,
        /// Local step at which the problem was found.
        step: u64,
        /// Number of non-finite values.
        count: usize,
        /// Number of values checked.
        total: usize,
    },
}

impl From<RuleError> for CoopError {
    /// A communication failure inside a rule is reported as one (so that a lost peer is
    /// recognized as the consequence it is); every other rule error as a rule error.
    fn from(error: RuleError) -> Self {
        match error {
            RuleError::Comm(error) => Self::Comm(error),
            other => Self::Rule(other),
        }
    }
}
