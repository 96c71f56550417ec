//! The crate's top-level error type.

use crate::mixing::MixingError;
use crate::params::LayoutError;
use crate::rules::RuleError;
use crate::schedule::ScheduleError;
use crate::topology::TopologyError;
use crate::transport::TransportError;

/// Everything that can go wrong in cooperative training.
///
/// Each variant wraps the error of the concept it comes from, so a caller can match on the
/// family (`CoopError::Transport(_)`) or on the exact case.
#[derive(Debug, thiserror::Error)]
pub enum CoopError {
    /// A topology could not be built.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A mixing matrix failed validation.
    #[error(transparent)]
    Mixing(#[from] MixingError),
    /// A merge rule was configured with values it cannot run with.
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// A synchronization schedule was configured with values it cannot run with.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Communication with the other workers failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The module's parameters do not match the layout recorded at the first step.
    #[error(transparent)]
    Layout(#[from] LayoutError),
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
    /// Saved state could not be restored.
    #[error("cannot restore optimizer state: {0}")]
    State(String),
}
