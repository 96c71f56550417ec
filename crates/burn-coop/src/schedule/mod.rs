//! When workers merge: synchronization schedules.
//!
//! Steps are counted from 1 after each local optimizer step. On a sync step the merge rule runs
//! (`W_k = W`); on every other step the workers stay apart (`W_k = I`).
//!
//! A schedule decides from values every worker shares: the step, the learning rate and the
//! steps since the last merge ([`ScheduleSignal`]), and, after each merge, what the merge
//! measured, reduced over all workers ([`SyncFeedback`]: the mean training loss since the last
//! merge, the consensus distance). It never sees a worker's own loss, so every worker reaches
//! the same decision without a vote.
//!
//! | schedule | period | file | reference |
//! |---|---|---|---|
//! | [`PeriodicSchedule`](fixed::PeriodicSchedule) (`fixed`) | τ, after `K` synchronous warm-up steps | `fixed.rs` | post-local SGD: Lin et al., ICLR 2020 |
//! | [`AdaComm`](adacomm::AdaComm) (`adacomm`) | `⌈sqrt(F_l/F_0)·τ_0⌉` every interval, from the mean training loss | `adacomm.rs` | Wang & Joshi, SysML 2019 |
//! | [`Qsr`](qsr::Qsr) (`qsr`) | `max(H_base, ⌊(α/η_t)²⌋)` per round | `qsr.rs` | Gu et al., ICLR 2024 |

pub mod adacomm;
pub mod fixed;
pub mod qsr;

pub(crate) use adacomm::AdaCommConfig;
pub(crate) use fixed::FixedConfig;
pub(crate) use qsr::QsrConfig;

/// Flags shared by several schedules (none so far; see [`crate::rules::SharedRuleFlags`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct SharedScheduleFlags {}

// The registry: one line per schedule (its `--schedule` name comes from its config's `NAME`).

crate::registry::registry! {
    /// When a run merges, with the schedule's settings (`kind` names it in JSON).
    spec ScheduleSpec;
    /// A synchronization schedule by name.
    names ScheduleName;
    /// `--schedule NAME` and every schedule's own flags.
    flags ScheduleFlags, flag "schedule", key schedule, what "schedule";
    trait ScheduleConfig;
    default Fixed;
    dyn BuildSchedule;
    shared SharedScheduleFlags;
    /// A fixed period τ, optionally after synchronous warm-up steps.
    Fixed(fixed: FixedConfig),
    /// AdaComm: the period shrinks with the square root of the training loss.
    Adacomm(adacomm: AdaCommConfig),
    /// The Quadratic Synchronization Rule: the period grows as 1/η².
    Qsr(qsr: QsrConfig),
}

use serde::{Deserialize, Serialize};

use crate::state::StateRecord;

/// Why a schedule cannot be built or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// `τ = 0` would mean never taking a step between merges.
    #[error("the synchronization period τ must be at least 1, got 0 (τ = 1 is fully synchronous)")]
    ZeroPeriod,
    /// Saved schedule state does not fit this schedule.
    #[error("cannot restore the {schedule} schedule's state: {reason}")]
    BadState {
        /// Schedule name.
        schedule: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What a schedule sees after each local step (identical on every worker).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ScheduleSignal {
    /// Local steps taken, this one included (1-based).
    pub step: u64,
    /// Learning rate of this step, when the caller gave one.
    pub lr: Option<f64>,
    /// Local steps since the last merge, this one included.
    pub steps_since_sync: u64,
}

/// What a merge measured, reduced over all workers (identical on every worker).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SyncFeedback {
    /// The step the merge followed.
    pub step: u64,
    /// Merges so far, this one included.
    pub syncs: u64,
    /// Learning rate of the last local step.
    pub lr: Option<f64>,
    /// Mean training loss over workers and the steps since the previous merge (when the
    /// schedule asked for it with [`SyncSchedule::wants_loss`] and the caller gave losses).
    pub mean_loss: Option<f64>,
    /// Consensus distance before the merge, when measured.
    pub consensus_distance: Option<f64>,
    /// The simulated clock at the merge, the mean over workers (a network is simulated and the
    /// schedule asked for the loss, whose collective carries it).
    pub sim_seconds: Option<f64>,
}

/// Decides which steps end with a merge.
pub trait SyncSchedule: Send {
    /// A short name for logs (`"fixed"`).
    fn name(&self) -> &'static str;

    /// Whether the step described by `signal` ends with a merge.
    fn is_sync_step(&mut self, signal: &ScheduleSignal) -> bool;

    /// Called on every worker after each merge with the reduced measurements.
    fn after_sync(&mut self, _feedback: &SyncFeedback) {}

    /// Whether the schedule needs the mean training loss in [`SyncFeedback`] (it then travels
    /// in the merge's statistics collective).
    fn wants_loss(&self) -> bool {
        false
    }

    /// The period between merges in force at `step`, for metrics and logs.
    fn period(&self, step: u64) -> u64;

    /// The schedule's state to checkpoint.
    fn record(&self) -> StateRecord {
        StateRecord::new()
    }

    /// Restores state produced by [`SyncSchedule::record`].
    fn load_record(&mut self, record: StateRecord) -> Result<(), ScheduleError> {
        if record.is_empty() {
            Ok(())
        } else {
            let reason = format!("this schedule keeps no state but the record holds {:?}", record.keys());
            Err(ScheduleError::BadState { schedule: self.name(), reason })
        }
    }
}

impl<S: SyncSchedule + ?Sized> SyncSchedule for Box<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn is_sync_step(&mut self, signal: &ScheduleSignal) -> bool {
        (**self).is_sync_step(signal)
    }
    fn after_sync(&mut self, feedback: &SyncFeedback) {
        (**self).after_sync(feedback)
    }
    fn wants_loss(&self) -> bool {
        (**self).wants_loss()
    }
    fn period(&self, step: u64) -> u64 {
        (**self).period(step)
    }
    fn record(&self) -> StateRecord {
        (**self).record()
    }
    fn load_record(&mut self, record: StateRecord) -> Result<(), ScheduleError> {
        (**self).load_record(record)
    }
}
