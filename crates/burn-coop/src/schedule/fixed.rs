//! A fixed period τ, optionally after synchronous warm-up steps (post-local SGD).
//!
//! Step `s` merges when `s ≤ K` or `(s − K) mod τ = 0`: `K` warm-up steps of synchronous SGD,
//! then local SGD with period τ (Lin, Stich, Patel & Jaggi, "Don't Use Large Mini-Batches, Use
//! Local SGD", ICLR 2020). With `K = 0` it is plain local SGD (Stich, ICLR 2019).

use serde::{Deserialize, Serialize};

use super::{ScheduleError, ScheduleSignal, SyncSchedule};
use crate::registry::{ScheduleConfig, SpecError};

/// `--schedule fixed` (the default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FixedConfig {
    /// Local steps between merges (τ ≥ 1; default 8).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<u64>,
    /// Synchronous steps before local steps begin (post-local SGD; default 0).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
}

impl FixedConfig {
    /// τ = 8 unless set.
    pub const DEFAULT_TAU: u64 = 8;

    /// The period.
    pub fn tau(&self) -> u64 {
        self.tau.unwrap_or(Self::DEFAULT_TAU)
    }

    /// The warm-up steps.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup_steps.unwrap_or(0)
    }
}

impl ScheduleConfig for FixedConfig {
    const NAME: &'static str = "fixed";

    fn build(&self) -> Result<Box<dyn SyncSchedule>, SpecError> {
        let schedule =
            PeriodicSchedule::every(self.tau()).map_err(|e| SpecError::new("tau", self.tau().to_string(), e))?;
        Ok(Box::new(schedule.with_warmup(self.warmup_steps())))
    }

    fn describe(&self) -> String {
        match self.warmup_steps() {
            0 => format!("tau = {}", self.tau()),
            k => format!("tau = {} after {k} synchronous steps", self.tau()),
        }
    }

    fn run_tag(&self) -> String {
        format!("tau{}", self.tau())
    }

    fn resolved(&self) -> Self {
        Self { tau: Some(self.tau()), warmup_steps: Some(self.warmup_steps()) }
    }
}

/// Merge every `τ` steps, optionally after a warm-up of `K` steps that merge every step; see
/// the [module documentation](crate::schedule::fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodicSchedule {
    period: u64,
    warmup: u64,
}

impl PeriodicSchedule {
    /// Merge every `period` steps. `period = 0` is an error.
    pub fn every(period: u64) -> Result<Self, ScheduleError> {
        if period == 0 {
            return Err(ScheduleError::ZeroPeriod);
        }
        Ok(Self { period, warmup: 0 })
    }

    /// Merge after every step for the first `steps` steps.
    pub fn with_warmup(self, steps: u64) -> Self {
        Self { warmup: steps, ..self }
    }

    /// The period τ after the warm-up.
    pub fn tau(&self) -> u64 {
        self.period
    }

    /// The number of warm-up steps.
    pub fn warmup(&self) -> u64 {
        self.warmup
    }

    /// Whether step `step` (1-based) ends with a merge.
    pub fn syncs_at(&self, step: u64) -> bool {
        step <= self.warmup || (step - self.warmup).is_multiple_of(self.period)
    }
}

impl SyncSchedule for PeriodicSchedule {
    fn name(&self) -> &'static str {
        "fixed"
    }

    fn is_sync_step(&mut self, signal: &ScheduleSignal) -> bool {
        self.syncs_at(signal.step)
    }

    fn period(&self, step: u64) -> u64 {
        if step < self.warmup { 1 } else { self.period }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateRecord;

    #[test]
    fn zero_period_is_an_error() {
        assert_eq!(PeriodicSchedule::every(0), Err(ScheduleError::ZeroPeriod));
    }

    #[test]
    fn eight_steps_at_tau_four_sync_twice() {
        let schedule = PeriodicSchedule::every(4).unwrap();
        let syncs: Vec<u64> = (1..=8).filter(|&s| schedule.syncs_at(s)).collect();
        assert_eq!(syncs, vec![4, 8]);
    }

    #[test]
    fn warmup_syncs_every_step_then_every_tau() {
        let mut schedule = PeriodicSchedule::every(3).unwrap().with_warmup(2);
        let syncs: Vec<u64> = (1..=11)
            .filter(|&step| schedule.is_sync_step(&ScheduleSignal { step, ..ScheduleSignal::default() }))
            .collect();
        assert_eq!(syncs, vec![1, 2, 5, 8, 11]);
        assert_eq!(schedule.period(1), 1);
        assert_eq!(schedule.period(2), 3);
    }

    #[test]
    fn stateless_schedule_rejects_foreign_state() {
        let mut schedule = PeriodicSchedule::every(2).unwrap();
        assert!(schedule.load_record(StateRecord::new()).is_ok());
        let foreign = StateRecord::new().with_scalar("tau", 4.0);
        assert!(matches!(schedule.load_record(foreign), Err(ScheduleError::BadState { schedule: "fixed", .. })));
    }
}
