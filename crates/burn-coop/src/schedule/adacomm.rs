//! AdaComm: a period that shrinks as the training loss falls.
//!
//! Wang & Joshi, "Adaptive Communication Strategies to Achieve the Best Error-Runtime Trade-off
//! in Local-Update SGD", SysML 2019 (arXiv 1810.08313). Training is cut into intervals of
//! `interval` local steps (counted from the merge that closes the previous interval). At the
//! start of interval `l` the period becomes
//!
//! `τ_l = ⌈ sqrt(F_l / F_0) · τ_0 ⌉`, clamped to `[1, τ_0]`,
//!
//! with `F_l` the training loss averaged over all workers and over the steps of the interval that
//! just ended, and `F_0` the same average over the first interval (run with `τ_0`). The
//! learning-rate-aware form (`--adacomm-lr-aware`, the paper's variant for decaying rates)
//! multiplies the ratio by `η_0 / η_l` inside the square root, `η_0` and `η_l` the learning
//! rates at the ends of the first and of the last interval. The loss reaches the schedule through
//! the synchronizer's statistics collective (a mean over workers), so every worker computes the
//! same `τ`. Intervals end at merges: an interval is over at the first merge at least `interval`
//! steps after its start. On a constant loss the period stays `τ_0` (the fixed schedule). The
//! interval is counted in local steps, or, with `--interval-seconds` and a simulated network
//! (`--network`), in simulated seconds as in the paper (the clock at each merge, averaged over
//! the workers by the statistics collective, so every worker decides alike); without a
//! simulated clock the step count is used.

use serde::{Deserialize, Serialize};

use super::{ScheduleError, ScheduleSignal, SyncFeedback, SyncSchedule};
use crate::registry::{ScheduleConfig, SpecError};
use crate::state::StateRecord;

/// `--schedule adacomm`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdaCommConfig {
    /// AdaComm's initial (and largest) period τ_0 ≥ 1 (default 16).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau0: Option<u64>,
    /// AdaComm's interval between period updates, in local steps (default 400).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
    /// AdaComm's interval in simulated seconds, with a simulated network (instead of steps).
    #[arg(long, value_parser = crate::registry::positive_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<f64>,
    /// Multiply the loss ratio by η_0/η_l (true/false; default false).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adacomm_lr_aware: Option<bool>,
}

impl AdaCommConfig {
    fn tau0(&self) -> u64 {
        self.tau0.unwrap_or(16)
    }

    fn interval(&self) -> u64 {
        self.interval.unwrap_or(400)
    }
}

impl ScheduleConfig for AdaCommConfig {
    const NAME: &'static str = "adacomm";

    fn build(&self) -> Result<Box<dyn SyncSchedule>, SpecError> {
        let schedule = AdaComm::new(self.tau0(), self.interval(), self.adacomm_lr_aware.unwrap_or(false))?;
        if let Some(seconds) = self.interval_seconds.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(SpecError::new(
                "interval-seconds",
                seconds.to_string(),
                "the interval is a positive number of seconds",
            ));
        }
        Ok(Box::new(schedule.with_interval_seconds(self.interval_seconds)))
    }

    fn describe(&self) -> String {
        format!("AdaComm from tau = {} every {} steps", self.tau0(), self.interval())
    }

    fn run_tag(&self) -> String {
        format!("adacomm{}", self.tau0())
    }

    fn resolved(&self) -> Self {
        Self {
            tau0: Some(self.tau0()),
            interval: Some(self.interval()),
            interval_seconds: self.interval_seconds,
            adacomm_lr_aware: Some(self.adacomm_lr_aware.unwrap_or(false)),
        }
    }
}

/// AdaComm; see the [module documentation](crate::schedule::adacomm).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaComm {
    tau0: u64,
    interval: u64,
    lr_aware: bool,
    tau: u64,
    interval_start: u64,
    last_merge: u64,
    loss_sum: f64,
    loss_steps: u64,
    first: Option<(f64, f64)>,
    lr: f64,
    /// The interval in simulated seconds, and when the current one started on that clock.
    interval_seconds: Option<f64>,
    interval_start_seconds: f64,
}

impl AdaComm {
    /// AdaComm starting at period `tau0` (≥ 1), updating it every `interval` (≥ 1) steps.
    pub fn new(tau0: u64, interval: u64, lr_aware: bool) -> Result<Self, SpecError> {
        if tau0 == 0 {
            return Err(SpecError::new("tau0", "0", "AdaComm's initial period must be at least 1"));
        }
        if interval == 0 {
            return Err(SpecError::new("interval", "0", "AdaComm's interval must be at least one step"));
        }
        Ok(Self {
            tau0,
            interval,
            lr_aware,
            tau: tau0,
            interval_start: 0,
            last_merge: 0,
            loss_sum: 0.0,
            loss_steps: 0,
            first: None,
            lr: 0.0,
            interval_seconds: None,
            interval_start_seconds: 0.0,
        })
    }

    /// Counts the intervals in simulated seconds (when the synchronizer simulates a network;
    /// in steps otherwise).
    pub fn with_interval_seconds(self, seconds: Option<f64>) -> Self {
        Self { interval_seconds: seconds, ..self }
    }

    /// `⌈ sqrt(ratio) · τ_0 ⌉` clamped to `[1, τ_0]`.
    fn period_for(&self, ratio: f64) -> u64 {
        let tau = (ratio.max(0.0).sqrt() * self.tau0 as f64).ceil();
        if tau.is_nan() { self.tau0 } else { (tau as u64).clamp(1, self.tau0) }
    }
}

impl SyncSchedule for AdaComm {
    fn name(&self) -> &'static str {
        "adacomm"
    }

    fn is_sync_step(&mut self, signal: &ScheduleSignal) -> bool {
        signal.steps_since_sync >= self.tau
    }

    fn after_sync(&mut self, feedback: &SyncFeedback) {
        let steps = feedback.step - self.last_merge;
        self.last_merge = feedback.step;
        if let Some(loss) = feedback.mean_loss {
            self.loss_sum += loss * steps as f64;
            self.loss_steps += steps;
        }
        self.lr = feedback.lr.unwrap_or(self.lr);
        let ended = match (self.interval_seconds, feedback.sim_seconds) {
            (Some(interval), Some(now)) => now - self.interval_start_seconds >= interval,
            _ => feedback.step - self.interval_start >= self.interval,
        };
        if !ended || self.loss_steps == 0 {
            return;
        }
        let loss = self.loss_sum / self.loss_steps as f64;
        match self.first {
            None => self.first = Some((loss, self.lr)),
            Some((loss0, lr0)) => {
                let lr_factor = if self.lr_aware && self.lr > 0.0 { lr0 / self.lr } else { 1.0 };
                self.tau = self.period_for(loss / loss0 * lr_factor);
            }
        }
        self.interval_start = feedback.step;
        self.interval_start_seconds = feedback.sim_seconds.unwrap_or(self.interval_start_seconds);
        self.loss_sum = 0.0;
        self.loss_steps = 0;
    }

    fn wants_loss(&self) -> bool {
        true
    }

    fn period(&self, _step: u64) -> u64 {
        self.tau
    }

    fn record(&self) -> StateRecord {
        let mut record = StateRecord::new()
            .with_scalar("tau", self.tau as f64)
            .with_scalar("interval_start", self.interval_start as f64)
            .with_scalar("last_merge", self.last_merge as f64)
            .with_scalar("loss_sum", self.loss_sum)
            .with_scalar("loss_steps", self.loss_steps as f64)
            .with_scalar("lr", self.lr)
            .with_scalar("interval_start_seconds", self.interval_start_seconds);
        if let Some((loss0, lr0)) = self.first {
            record = record.with_scalar("loss0", loss0).with_scalar("lr0", lr0);
        }
        record
    }

    fn load_record(&mut self, record: StateRecord) -> Result<(), ScheduleError> {
        let get = |key: &str| {
            record.scalar(key).ok_or_else(|| ScheduleError::BadState {
                schedule: "adacomm",
                reason: format!("the record lacks `{key}` (it holds {:?})", record.keys()),
            })
        };
        let tau = get("tau")? as u64;
        if tau == 0 || tau > self.tau0 {
            let reason = format!("a period of {tau} outside [1, {}]", self.tau0);
            return Err(ScheduleError::BadState { schedule: "adacomm", reason });
        }
        self.tau = tau;
        self.interval_start = get("interval_start")? as u64;
        self.last_merge = get("last_merge")? as u64;
        self.loss_sum = get("loss_sum")?;
        self.loss_steps = get("loss_steps")? as u64;
        self.lr = get("lr")?;
        self.interval_start_seconds = record.scalar("interval_start_seconds").unwrap_or(0.0);
        self.first = match (record.scalar("loss0"), record.scalar("lr0")) {
            (Some(loss0), Some(lr0)) => Some((loss0, lr0)),
            _ => None,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the schedule for `steps` steps with the mean loss `loss(step)` reported at merges
    /// (averaged over the steps since the previous merge, as the synchronizer does).
    fn merges(schedule: &mut AdaComm, loss: impl Fn(u64) -> f64, lr: impl Fn(u64) -> f64, steps: u64) -> Vec<u64> {
        let (mut since, mut sum) = (0, 0.0);
        let mut merges = Vec::new();
        for step in 1..=steps {
            since += 1;
            sum += loss(step);
            if schedule.is_sync_step(&ScheduleSignal { step, lr: Some(lr(step)), steps_since_sync: since }) {
                let feedback = SyncFeedback {
                    step,
                    syncs: merges.len() as u64 + 1,
                    lr: Some(lr(step)),
                    mean_loss: Some(sum / since as f64),
                    consensus_distance: None,
                    // A simulated clock where a step takes 0.5 s.
                    sim_seconds: Some(0.5 * step as f64),
                };
                schedule.after_sync(&feedback);
                merges.push(step);
                since = 0;
                sum = 0.0;
            }
        }
        merges
    }

    #[test]
    fn intervals_can_be_counted_in_simulated_seconds() {
        // τ_0 = 8 and a 4 s interval at 0.5 s a step: the first interval ends at the merge at
        // step 8 (4 s), the next at step 16 (loss 1 against 4: τ = 4), as with an 8-step
        // interval; the 1000-step interval given alongside is not used.
        let loss = |step: u64| if step <= 8 { 4.0 } else { 1.0 };
        let mut by_time = AdaComm::new(8, 1000, false).unwrap().with_interval_seconds(Some(4.0));
        let mut by_steps = AdaComm::new(8, 8, false).unwrap();
        let timed = merges(&mut by_time, loss, |_| 0.1, 40);
        assert_eq!(timed, merges(&mut by_steps, loss, |_| 0.1, 40));
        assert_eq!(timed[..4], [8, 16, 20, 24]);
        assert_eq!(by_time.record().scalar("interval_start_seconds"), Some(0.5 * 40.0));
    }

    #[test]
    fn a_constant_loss_keeps_the_initial_period() {
        let mut ada = AdaComm::new(4, 10, false).unwrap();
        let fixed = crate::schedule::fixed::PeriodicSchedule::every(4).unwrap();
        let expected: Vec<u64> = (1..=100).filter(|&s| fixed.syncs_at(s)).collect();
        assert_eq!(merges(&mut ada, |_| 2.3, |_| 0.1, 100), expected);
        assert_eq!(ada.period(100), 4);
    }

    #[test]
    fn the_period_follows_the_square_root_of_the_loss_ratio() {
        // Loss 4 in the first interval (steps 1–8), then 1: τ = ⌈sqrt(1/4)·8⌉ = 4, then 0.25:
        // ⌈sqrt(0.25/4)·8⌉ = 2.
        let mut ada = AdaComm::new(8, 8, false).unwrap();
        let loss = |step: u64| match step {
            0..=8 => 4.0,
            9..=16 => 1.0,
            _ => 0.25,
        };
        assert_eq!(merges(&mut ada, loss, |_| 0.1, 32), vec![8, 16, 20, 24, 26, 28, 30, 32]);
        assert_eq!(ada.period(32), 2);
    }

    #[test]
    fn the_lr_aware_form_divides_by_the_rate() {
        // Same loss, learning rate halved: τ = ⌈sqrt(1 · 2)·4⌉ = 6, clamped to τ_0 = 4; a loss
        // ratio of 1/16 with the rate divided by 4: ⌈sqrt(4/16)·4⌉ = 2.
        let mut ada = AdaComm::new(4, 4, true).unwrap();
        assert_eq!(merges(&mut ada, |_| 1.0, |s| if s <= 4 { 0.2 } else { 0.1 }, 12), vec![4, 8, 12]);
        let mut ada = AdaComm::new(4, 4, true).unwrap();
        let loss = |s: u64| if s <= 4 { 1.0 } else { 1.0 / 16.0 };
        assert_eq!(merges(&mut ada, loss, |s| if s <= 4 { 0.2 } else { 0.05 }, 12), vec![4, 8, 10, 12]);
    }

    #[test]
    fn state_round_trips_and_bad_settings_are_named() {
        let mut ada = AdaComm::new(8, 8, false).unwrap();
        merges(&mut ada, |s| 4.0 / s as f64, |_| 0.1, 21);
        let mut back = AdaComm::new(8, 8, false).unwrap();
        back.load_record(ada.record()).unwrap();
        assert_eq!(back, ada);
        assert!(back.load_record(StateRecord::new()).is_err());
        assert_eq!(AdaComm::new(0, 8, false).unwrap_err().option, "tau0");
        assert_eq!(AdaComm::new(4, 0, false).unwrap_err().option, "interval");
        // From a file, where no flag parser stands guard.
        for seconds in [-5.0, 0.0, f64::INFINITY] {
            let config = AdaCommConfig { interval_seconds: Some(seconds), ..AdaCommConfig::default() };
            assert_eq!(config.build().err().unwrap().option, "interval-seconds", "{seconds}");
        }
    }
}
