//! AdaComm: a period that follows the square root of the training loss.
//!
//! Wang & Joshi, "Adaptive Communication Strategies to Achieve the Best Error-Runtime Trade-off
//! in Local-Update SGD", SysML 2019 (arXiv 1810.08313), Section 4 ("AdaComm"). Training is cut
//! into intervals of length `T_0`. At the start of interval `l` the period becomes the paper's
//! basic update rule
//!
//! `τ_l = ⌈ sqrt( F(x_{t=lT_0}) / F(x_{t=0}) ) · τ_0 ⌉`,
//!
//! or, with `--adacomm-lr-aware`, the paper's form for a learning rate that changes,
//!
//! `τ_l = ⌈ sqrt( (η_0 / η_l) · F(x_{t=lT_0}) / F(x_{t=0}) ) · τ_0 ⌉`,
//!
//! with `F(x_{t=0})` the initial training loss, `η_0` the initial learning rate and `η_l` the
//! rate at the start of interval `l`. The paper bounds `τ` by nothing else: it only ever falls
//! below `τ_0` as the loss falls, and with the learning-rate form it rises above `τ_0` when the
//! rate decays faster than the loss (a smaller rate lets the workers drift less per step). The
//! basic rule is the one printed in the paper's Section 4; the learning-rate form is written as
//! PaddlePaddle's `AdaptiveLocalSGDOptimizer` implements it from the paper (`η_0 / η_l` to the
//! first power, there with bounds of its own, 1 and 16, which are not the paper's and are not
//! applied here). The paper's equation numbers were not checked. The error-runtime bound behind
//! the rule gives `τ* ∝ √(F / η³)` (see [`crate::advisor`]); the rule keeps the first power.
//!
//! What is measured: losses reach the schedule through the synchronizer's statistics collective
//! at merges, as the mean over workers and over the steps since the previous merge, so every
//! worker computes the same `τ`. `F(x_{t=0})` is the mean of the first merge period (the first
//! `τ_0` steps: one batch per worker would be too noisy) and `F(x_{t=lT_0})` that of the merge
//! period that closes interval `l − 1`, so `τ` first changes after one interval. `η_0` is the
//! learning rate of the first step; `η_l` that of the step before the closing merge. Intervals
//! end at merges: an interval is over at the first merge at least `T_0` after its start,
//! counted in local steps (`--interval`), or, with `--interval-seconds` and a simulated network
//! (`--network`), in simulated seconds as in the paper (the clock at each merge, averaged over
//! the workers by the statistics collective); without a simulated clock the step count is used.
//! On a constant loss and rate the period stays `τ_0` (the fixed schedule). A rate that reaches
//! zero makes the period unbounded: no merge until the end of training.

use serde::{Deserialize, Serialize};

use super::{ScheduleError, ScheduleSignal, SyncFeedback, SyncSchedule};
use crate::registry::{ScheduleConfig, SpecError};
use crate::state::StateRecord;

/// `--schedule adacomm`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdaCommConfig {
    /// AdaComm's initial period τ_0 ≥ 1 (default 16).
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
    /// The paper's learning-rate-aware form: multiply the loss ratio by η_0/η_l (true/false;
    /// default false, the basic rule).
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
        let every = match self.interval_seconds {
            Some(seconds) => format!("{seconds} simulated s"),
            None => format!("{} steps", self.interval()),
        };
        let form = if self.adacomm_lr_aware.unwrap_or(false) { ", learning-rate form" } else { "" };
        format!("AdaComm from tau = {} every {every}{form}", self.tau0())
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
    /// `F(x_{t=0})`, once the first merge measured it.
    loss0: Option<f64>,
    /// `η_0`, the learning rate of the first step.
    lr0: Option<f64>,
    /// The interval in simulated seconds, and when the current one started on that clock.
    interval_seconds: Option<f64>,
    interval_start_seconds: f64,
}

impl AdaComm {
    /// AdaComm starting at period `tau0` (≥ 1), updating it every `interval` (≥ 1) steps, with
    /// the learning-rate-aware form when `lr_aware`.
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
            loss0: None,
            lr0: None,
            interval_seconds: None,
            interval_start_seconds: 0.0,
        })
    }

    /// Counts the intervals in simulated seconds (when the synchronizer simulates a network;
    /// in steps otherwise).
    pub fn with_interval_seconds(self, seconds: Option<f64>) -> Self {
        Self { interval_seconds: seconds, ..self }
    }

    /// `⌈ sqrt(ratio) · τ_0 ⌉`, at least 1 (a zero loss); unbounded (`u64::MAX`) for an
    /// infinite ratio (a zero rate); the current period for a ratio that is not a number.
    fn period_for(&self, ratio: f64) -> u64 {
        let tau = (ratio.sqrt() * self.tau0 as f64).ceil();
        if tau.is_nan() || ratio < 0.0 {
            self.tau
        } else if tau >= u64::MAX as f64 {
            u64::MAX
        } else {
            (tau as u64).max(1)
        }
    }
}

impl SyncSchedule for AdaComm {
    fn name(&self) -> &'static str {
        "adacomm"
    }

    fn is_sync_step(&mut self, signal: &ScheduleSignal) -> bool {
        if self.lr0.is_none() {
            self.lr0 = signal.lr;
        }
        signal.steps_since_sync >= self.tau
    }

    fn after_sync(&mut self, feedback: &SyncFeedback) {
        let Some(loss) = feedback.mean_loss else { return };
        let Some(loss0) = self.loss0 else {
            self.loss0 = Some(loss);
            return;
        };
        let ended = match (self.interval_seconds, feedback.sim_seconds) {
            (Some(interval), Some(now)) => now - self.interval_start_seconds >= interval,
            _ => feedback.step - self.interval_start >= self.interval,
        };
        if !ended {
            return;
        }
        let lr_factor = match (self.lr_aware, self.lr0, feedback.lr) {
            (true, Some(lr0), Some(lr)) => lr0 / lr,
            _ => 1.0,
        };
        self.tau = self.period_for(loss / loss0 * lr_factor);
        self.interval_start = feedback.step;
        self.interval_start_seconds = feedback.sim_seconds.unwrap_or(self.interval_start_seconds);
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
            .with_scalar("interval_start_seconds", self.interval_start_seconds);
        if let Some(loss0) = self.loss0 {
            record = record.with_scalar("loss0", loss0);
        }
        if let Some(lr0) = self.lr0 {
            record = record.with_scalar("lr0", lr0);
        }
        record
    }

    fn load_record(&mut self, record: StateRecord) -> Result<(), ScheduleError> {
        let bad = |reason: String| ScheduleError::BadState { schedule: "adacomm", reason };
        let get = |key: &str| {
            record.scalar(key).ok_or_else(|| bad(format!("the record lacks `{key}` (it holds {:?})", record.keys())))
        };
        let tau = get("tau")?;
        if tau.is_nan() || tau < 1.0 {
            return Err(bad(format!("a period of {tau}, below 1")));
        }
        let known = ["tau", "interval_start", "interval_start_seconds", "loss0", "lr0"];
        if let Some(key) = record.keys().into_iter().find(|key| !known.contains(&key.as_str())) {
            return Err(bad(format!("an unknown entry `{key}` (from another version of the schedule?)")));
        }
        self.tau = tau as u64;
        self.interval_start = get("interval_start")? as u64;
        self.interval_start_seconds = get("interval_start_seconds")?;
        self.loss0 = record.scalar("loss0");
        self.lr0 = record.scalar("lr0");
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

    /// The loss and learning rate of a logged run: loss 2 for the first 4 steps, 1 until step
    /// 16, then 0.5; rate 0.4 until step 12, then 0.1.
    fn logged_loss(step: u64) -> f64 {
        match step {
            0..=4 => 2.0,
            5..=16 => 1.0,
            _ => 0.5,
        }
    }

    fn logged_lr(step: u64) -> f64 {
        if step <= 12 { 0.4 } else { 0.1 }
    }

    #[test]
    fn the_basic_rule_follows_a_hand_computed_sequence() {
        // τ_0 = 4, intervals of 8 steps. F_0 = 2 (the first merge, steps 1–4). Merge 8 ends the
        // first interval: F = 1, ⌈√(1/2)·4⌉ = ⌈2.83⌉ = 3. Merge 17 (9 steps on): F = (1+1+0.5)/3
        // over steps 15–17, ⌈√(0.4167)·4⌉ = ⌈2.58⌉ = 3. Merge 26: F = 0.5, ⌈√(0.25)·4⌉ = 2.
        let mut ada = AdaComm::new(4, 8, false).unwrap();
        let got = merges(&mut ada, logged_loss, logged_lr, 40);
        assert_eq!(got, vec![4, 8, 11, 14, 17, 20, 23, 26, 28, 30, 32, 34, 36, 38, 40]);
    }

    #[test]
    fn the_lr_aware_rule_rises_above_tau0_when_the_rate_decays() {
        // The same log with η_0 = 0.4 (the first step's rate). Merge 8: rate 0.4, τ = 3 as
        // above. Merge 17: rate 0.1, ⌈√(0.4167 · 4)·4⌉ = ⌈5.16⌉ = 6 > τ_0: the decay raises τ.
        // Merge 29 (12 steps on): F = 0.5, ⌈√(0.25 · 4)·4⌉ = 4.
        let mut ada = AdaComm::new(4, 8, true).unwrap();
        let got = merges(&mut ada, logged_loss, logged_lr, 40);
        assert_eq!(got, vec![4, 8, 11, 14, 17, 23, 29, 33, 37]);
        assert_eq!(ada.period(40), 4);
        // A rate that reaches zero leaves no merge until the end.
        let mut ada = AdaComm::new(4, 4, true).unwrap();
        let got = merges(&mut ada, |_| 1.0, |s| if s <= 4 { 0.1 } else { 0.0 }, 40);
        assert_eq!(got, vec![4, 8]);
    }

    #[test]
    fn state_round_trips_and_bad_settings_are_named() {
        let mut ada = AdaComm::new(8, 8, false).unwrap();
        merges(&mut ada, |s| 4.0 / s as f64, |_| 0.1, 21);
        let mut back = AdaComm::new(8, 8, false).unwrap();
        back.load_record(ada.record()).unwrap();
        assert_eq!(back, ada);
        assert!(back.load_record(StateRecord::new()).is_err());
        let old = ada.record().with_scalar("loss_sum", 3.0);
        assert!(back.load_record(old).unwrap_err().to_string().contains("loss_sum"));
        assert_eq!(AdaComm::new(0, 8, false).unwrap_err().option, "tau0");
        assert_eq!(AdaComm::new(4, 0, false).unwrap_err().option, "interval");
        // From a file, where no flag parser stands guard.
        for seconds in [-5.0, 0.0, f64::INFINITY] {
            let config = AdaCommConfig { interval_seconds: Some(seconds), ..AdaCommConfig::default() };
            assert_eq!(config.build().err().unwrap().option, "interval-seconds", "{seconds}");
        }
    }
}
