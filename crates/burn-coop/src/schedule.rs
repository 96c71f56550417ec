//! When workers merge: the synchronization schedule.
//!
//! Steps are counted from 1 after each local optimizer step. On a sync step the merge rule runs
//! (`W_k = W`); on every other step the workers stay apart (`W_k = I`).

/// Why a schedule cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// `τ = 0` would mean never taking a step between merges.
    #[error("the synchronization period τ must be at least 1, got 0 (τ = 1 is fully synchronous)")]
    ZeroPeriod,
    /// Saved schedule state does not fit this schedule.
    #[error("cannot restore schedule state: {0}")]
    BadState(String),
}

/// Decides which steps end with a merge. Implement it for adaptive schedules (for example one
/// that shrinks τ as the loss falls); [`PeriodicSchedule`] is the fixed-period one.
pub trait SyncSchedule: Send {
    /// Whether the local step numbered `step` (1-based) ends with a merge.
    fn is_sync_step(&mut self, step: u64) -> bool;

    /// The current period between merges, for metrics and logs.
    fn period(&self, step: u64) -> u64;

    /// Serializes the schedule's mutable state (empty for stateless schedules).
    fn export_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores state produced by [`SyncSchedule::export_state`].
    fn import_state(&mut self, state: &[u8]) -> Result<(), ScheduleError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(ScheduleError::BadState(format!("this schedule keeps no state but {} bytes were given", state.len())))
        }
    }
}

impl<S: SyncSchedule + ?Sized> SyncSchedule for Box<S> {
    fn is_sync_step(&mut self, step: u64) -> bool {
        (**self).is_sync_step(step)
    }
    fn period(&self, step: u64) -> u64 {
        (**self).period(step)
    }
    fn export_state(&self) -> Vec<u8> {
        (**self).export_state()
    }
    fn import_state(&mut self, state: &[u8]) -> Result<(), ScheduleError> {
        (**self).import_state(state)
    }
}

/// Merge every `τ` steps, optionally after a warm-up of `K` steps that merge every step
/// (post-local SGD: synchronous SGD first, local SGD after).
///
/// Step `s` syncs when `s ≤ K` or `(s − K) mod τ = 0`.
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
}

impl SyncSchedule for PeriodicSchedule {
    fn is_sync_step(&mut self, step: u64) -> bool {
        step <= self.warmup || (step - self.warmup).is_multiple_of(self.period)
    }

    fn period(&self, step: u64) -> u64 {
        if step < self.warmup { 1 } else { self.period }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_period_is_an_error() {
        assert_eq!(PeriodicSchedule::every(0), Err(ScheduleError::ZeroPeriod));
    }

    #[test]
    fn eight_steps_at_tau_four_sync_twice() {
        let mut schedule = PeriodicSchedule::every(4).unwrap();
        let syncs: Vec<u64> = (1..=8).filter(|&s| schedule.is_sync_step(s)).collect();
        assert_eq!(syncs, vec![4, 8]);
    }

    #[test]
    fn warmup_syncs_every_step_then_every_tau() {
        let mut schedule = PeriodicSchedule::every(3).unwrap().with_warmup(2);
        let syncs: Vec<u64> = (1..=11).filter(|&s| schedule.is_sync_step(s)).collect();
        assert_eq!(syncs, vec![1, 2, 5, 8, 11]);
        assert_eq!(schedule.period(1), 1);
        assert_eq!(schedule.period(2), 3);
    }

    #[test]
    fn stateless_schedule_rejects_foreign_state() {
        let mut schedule = PeriodicSchedule::every(2).unwrap();
        assert!(schedule.import_state(&[]).is_ok());
        assert!(matches!(schedule.import_state(&[1, 2]), Err(ScheduleError::BadState(_))));
    }
}
