//! The Quadratic Synchronization Rule: a period that grows as the learning rate decays.
//!
//! Gu, Lyu, Arora, Zhang & Huang, "A Quadratic Synchronization Rule for Distributed Deep
//! Learning", ICLR 2024 (arXiv 2310.14423). At the start of every round (the first local step
//! after a merge, and the first step of training) the period of that round becomes
//!
//! `H = max(H_base, ⌊(α / η_t)²⌋)`
//!
//! with `η_t` the learning rate of that step. Early in training, while `η` is large, the workers
//! merge every `H_base` steps; as `η` decays they merge less and less often (`H ∝ 1/η²`), which
//! the paper shows both saves communication and improves generalization. The rule is meant for
//! a decaying rate: while the rate is still rising (a warm-up, and the first round), `H = H_base`,
//! since a small warm-up rate would otherwise give the longest periods at the very start. The
//! authors' code does the same (`localopt.py`, `adjust_h`: `H = init_h` until the warm-up steps
//! are over); the paper's formula alone does not say it. `α` is a per-task
//! constant: the paper tunes it so that `(α/η_peak)² ≤ H_base`; the default `α = 0.2` fits this
//! project's CIFAR-10 recipe (peak `η = 0.2`, so `H = H_base` at the peak, 100 steps at
//! `η = 0.02`). A learning rate of 0 gives the largest period there is (no more merges until the
//! caller merges by hand). The learning rate is the same on every worker, so every worker
//! computes the same `H`.

use serde::{Deserialize, Serialize};

use super::{ScheduleSignal, SyncSchedule};
use crate::registry::{ScheduleConfig, SpecError};
use crate::state::StateRecord;

/// `--schedule qsr`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct QsrConfig {
    /// QSR's smallest period H_base ≥ 1 (default 4).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h_base: Option<u64>,
    /// QSR's α > 0: H = max(H_base, ⌊(α/η)²⌋) (default 0.2).
    #[arg(long = "qsr-alpha", value_parser = crate::registry::positive_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qsr_alpha: Option<f64>,
}

impl QsrConfig {
    fn h_base(&self) -> u64 {
        self.h_base.unwrap_or(4)
    }

    fn alpha(&self) -> f64 {
        self.qsr_alpha.unwrap_or(0.2)
    }
}

impl ScheduleConfig for QsrConfig {
    const NAME: &'static str = "qsr";

    fn build(&self) -> Result<Box<dyn SyncSchedule>, SpecError> {
        Ok(Box::new(Qsr::new(self.h_base(), self.alpha())?))
    }

    fn describe(&self) -> String {
        format!("QSR, H = max({}, (alpha / lr)^2) with alpha = {}", self.h_base(), self.alpha())
    }

    fn run_tag(&self) -> String {
        format!("qsr{}", self.h_base())
    }

    fn resolved(&self) -> Self {
        Self { h_base: Some(self.h_base()), qsr_alpha: Some(self.alpha()) }
    }
}

/// The Quadratic Synchronization Rule; see the [module documentation](crate::schedule::qsr).
#[derive(Debug, Clone, PartialEq)]
pub struct Qsr {
    h_base: u64,
    alpha: f64,
    /// The period of the round in progress (0 before the first step).
    period: u64,
    /// The learning rate at the start of the previous round (0 before the first).
    last_lr: f64,
}

impl Qsr {
    /// QSR with the smallest period `h_base` (≥ 1) and constant `alpha` (> 0).
    pub fn new(h_base: u64, alpha: f64) -> Result<Self, SpecError> {
        if h_base == 0 {
            return Err(SpecError::new("h-base", "0", "QSR's smallest period must be at least 1"));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(SpecError::new("qsr-alpha", alpha.to_string(), "QSR's α must be a positive number"));
        }
        Ok(Self { h_base, alpha, period: 0, last_lr: 0.0 })
    }

    /// `max(H_base, ⌊(α/η)²⌋)`; `η = 0` gives `u64::MAX`.
    pub fn period_for(&self, lr: f64) -> u64 {
        let quadratic = (self.alpha / lr).powi(2).floor();
        // `as` saturates: an infinite or huge ratio is the largest period.
        self.h_base.max(quadratic as u64)
    }
}

impl SyncSchedule for Qsr {
    fn name(&self) -> &'static str {
        "qsr"
    }

    fn is_sync_step(&mut self, signal: &ScheduleSignal) -> bool {
        if signal.steps_since_sync == 1 || self.period == 0 {
            self.period = match signal.lr.map(f64::abs) {
                // The first round, and every round while the rate is still rising (a warm-up).
                Some(lr) if lr > self.last_lr => {
                    self.last_lr = lr;
                    self.h_base
                }
                Some(lr) => {
                    self.last_lr = lr;
                    self.period_for(lr)
                }
                None => self.h_base,
            };
        }
        signal.steps_since_sync >= self.period
    }

    fn period(&self, _step: u64) -> u64 {
        self.period.max(self.h_base)
    }

    fn record(&self) -> StateRecord {
        StateRecord::new().with_scalar("period", self.period as f64).with_scalar("last_lr", self.last_lr)
    }

    fn load_record(&mut self, record: StateRecord) -> Result<(), super::ScheduleError> {
        match (record.scalar("period"), record.scalar("last_lr"), record.keys().len()) {
            (Some(period), Some(last_lr), 2) if period >= 0.0 && last_lr >= 0.0 => {
                self.period = period as u64;
                self.last_lr = last_lr;
                Ok(())
            }
            _ => Err(super::ScheduleError::BadState {
                schedule: "qsr",
                reason: format!("expected the scalars `period` and `last_lr`, got {:?}", record.keys()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merges(schedule: &mut Qsr, lrs: impl Fn(u64) -> f64, steps: u64) -> Vec<u64> {
        let mut since = 0;
        let mut merges = Vec::new();
        for step in 1..=steps {
            since += 1;
            let signal = ScheduleSignal { step, lr: Some(lrs(step)), steps_since_sync: since };
            if schedule.is_sync_step(&signal) {
                merges.push(step);
                since = 0;
            }
        }
        merges
    }

    #[test]
    fn the_period_is_the_quadratic_rule() {
        let qsr = Qsr::new(4, 0.2).unwrap();
        assert_eq!(qsr.period_for(0.2), 4, "(0.2/0.2)² = 1 < H_base");
        assert_eq!(qsr.period_for(0.1), 4);
        assert_eq!(qsr.period_for(0.05), 16);
        assert_eq!(qsr.period_for(0.03), 44, "⌊(0.2/0.03)²⌋ = ⌊44.4⌋");
        assert_eq!(qsr.period_for(0.0), u64::MAX);
    }

    #[test]
    fn each_round_takes_its_period_from_its_first_step() {
        // lr 0.2 for 10 steps, then 0.05: rounds of 4 until step 8; the round starting at step 9
        // sees lr 0.2 (period 4, merge at 12), then rounds of 16.
        let mut qsr = Qsr::new(4, 0.2).unwrap();
        let lr = |step: u64| if step <= 10 { 0.2 } else { 0.05 };
        assert_eq!(merges(&mut qsr, lr, 50), vec![4, 8, 12, 28, 44]);
        assert_eq!(qsr.period(50), 16);
    }

    #[test]
    fn a_rising_rate_keeps_the_base_period() {
        // A warm-up from 0.02 to 0.2 over 20 steps, then 0.05 from step 21: the small warm-up
        // rates would give periods of up to 100, but while the rate rises H = H_base (rounds
        // starting at 1, 5, …, 17); the round starting at step 21 sees 0.05: H = 16.
        let mut qsr = Qsr::new(4, 0.2).unwrap();
        let lr = |step: u64| if step <= 20 { 0.02 + 0.18 * step as f64 / 20.0 } else { 0.05 };
        assert_eq!(merges(&mut qsr, lr, 60), vec![4, 8, 12, 16, 20, 36, 52]);
    }

    #[test]
    fn a_constant_large_rate_is_the_fixed_schedule() {
        let mut qsr = Qsr::new(3, 0.1).unwrap();
        let fixed = crate::schedule::fixed::PeriodicSchedule::every(3).unwrap();
        let expected: Vec<u64> = (1..=20).filter(|&s| fixed.syncs_at(s)).collect();
        assert_eq!(merges(&mut qsr, |_| 0.5, 20), expected);
    }

    #[test]
    fn bad_settings_and_state_are_named() {
        assert_eq!(Qsr::new(0, 0.2).unwrap_err().option, "h-base");
        assert_eq!(Qsr::new(4, -1.0).unwrap_err().option, "qsr-alpha");
        let mut qsr = Qsr::new(4, 0.2).unwrap();
        qsr.period = 16;
        qsr.last_lr = 0.05;
        let mut back = Qsr::new(4, 0.2).unwrap();
        back.load_record(qsr.record()).unwrap();
        assert_eq!(back, qsr);
        assert!(back.load_record(StateRecord::new().with_scalar("tau", 1.0)).is_err());
    }
}
