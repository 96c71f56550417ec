//! An outer optimizer on the averaged update: DiLoCo / SlowMo.
//!
//! Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023
//! (arXiv 2311.08105); Wang, Tantia, Ballas & Rabbat, "SlowMo: Improving Communication-Efficient
//! Distributed SGD with Slow Momentum", ICLR 2020. Every worker keeps the last synchronized
//! model `x_sync` and an outer momentum `u`. At a merge, with `x̄ = mean_i(x_i)`:
//!
//! `Δ = x_sync − x̄` (the outer "gradient": old minus new),
//! `u ← β u + Δ`,
//! `x_sync ← x_sync − lr_outer · (β u + Δ)` (Nesterov, DiLoCo's choice) or
//! `x_sync ← x_sync − lr_outer · u` (plain heavy ball),
//!
//! and every worker adopts `x_sync`. Defaults: `lr_outer = 0.7`, `β = 0.9`, Nesterov (DiLoCo's
//! published setting, Section 3 and Table 1 of the paper).
//!
//! The outer step moves the trained parameters only. Buffers (BatchNorm running means and
//! variances, marked exact in the split the [`Synchronizer`](crate::Synchronizer) gives with
//! [`MergeRule::set_segments`]) take the plain mean `x̄`, bit for bit what averaging gives, and
//! keep no momentum: extrapolating a running variance could push it below zero. torchft's
//! `DiLoCo` does the same (its outer optimizer holds `model.parameters()` only). With `lr_outer = 1` and `β = 0` this is periodic averaging; to make that
//! hold bit for bit the update is written `x_sync ← x̄ + (1 − lr_outer) Δ − lr_outer · β · u`
//! (Nesterov) or `x̄ + (1 − lr_outer) Δ − lr_outer · β · u_old` (plain), algebraically the same.
//! `x_sync` starts as the initial model and, with `u`, is saved in checkpoints. One sum
//! all-reduce of the model per merge, as averaging.

use serde::{Deserialize, Serialize};

use super::kernels::replace_by_mean;
use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext};
use crate::comm::Communicator;
use crate::compress::Segments;
use crate::registry::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// `--rule diloco`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiLoCoConfig {
    /// DiLoCo's outer learning rate, in (0, 2) (default 0.7).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// DiLoCo's outer momentum β, in [0, 1) (default 0.9).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<f64>,
    /// Nesterov outer momentum (true/false; default true).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_nesterov: Option<bool>,
}

impl RuleConfig for DiLoCoConfig {
    const NAME: &'static str = "diloco";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let lr = self.outer_lr.unwrap_or(0.7);
        let beta = self.outer_momentum.unwrap_or(0.9);
        Ok(Box::new(DiLoCo::new(lr, beta, self.outer_nesterov.unwrap_or(true))?))
    }

    fn describe(&self) -> String {
        format!(
            "DiLoCo, outer lr = {}, momentum = {}{}",
            self.outer_lr.unwrap_or(0.7),
            self.outer_momentum.unwrap_or(0.9),
            if self.outer_nesterov.unwrap_or(true) { " (Nesterov)" } else { "" }
        )
    }

    fn resolved(&self) -> Self {
        Self {
            outer_lr: Some(self.outer_lr.unwrap_or(0.7)),
            outer_momentum: Some(self.outer_momentum.unwrap_or(0.9)),
            outer_nesterov: Some(self.outer_nesterov.unwrap_or(true)),
        }
    }
}

/// DiLoCo's outer step; see the [module documentation](crate::rules::diloco).
#[derive(Debug)]
pub struct DiLoCo {
    lr: f64,
    beta: f64,
    nesterov: bool,
    synced: Option<Vec<f32>>,
    momentum: Vec<f32>,
    sum: Vec<f32>,
    segments: Option<Segments>,
}

impl DiLoCo {
    /// The outer optimizer with learning rate `lr` in (0, 2) and momentum `beta` in [0, 1).
    pub fn new(lr: f64, beta: f64, nesterov: bool) -> Result<Self, SpecError> {
        if !(lr.is_finite() && lr > 0.0 && lr < 2.0) {
            return Err(SpecError::new("outer-lr", lr.to_string(), "the outer learning rate must lie in (0, 2)"));
        }
        if !(beta.is_finite() && (0.0..1.0).contains(&beta)) {
            return Err(SpecError::new("outer-momentum", beta.to_string(), "the outer momentum must lie in [0, 1)"));
        }
        Ok(Self { lr, beta, nesterov, synced: None, momentum: Vec::new(), sum: Vec::new(), segments: None })
    }
}

impl MergeRule for DiLoCo {
    fn set_segments(&mut self, segments: &Segments) {
        self.segments = Some(segments.clone());
    }

    fn start(&mut self, initial: &[f32], _ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        if self.synced.is_none() {
            self.synced = Some(initial.to_vec());
        }
        Ok(())
    }

    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        let synced = self.synced.as_ref().ok_or(RuleError::BadState {
            rule: DiLoCoConfig::NAME,
            reason: "the rule was not started with the initial model".into(),
        })?;
        if synced.len() != params.len() || (!self.momentum.is_empty() && self.momentum.len() != params.len()) {
            let reason = format!(
                "the synchronized model has {} values and the momentum {}, but the model has {}",
                synced.len(),
                self.momentum.len(),
                params.len()
            );
            return Err(RuleError::BadState { rule: DiLoCoConfig::NAME, reason });
        }
        let split = super::split_for(DiLoCoConfig::NAME, self.segments.as_ref(), params.len())?;
        self.sum.resize(params.len(), 0.0);
        comm.all_reduce_sum_into(params, &mut self.sum)?;
        // params ← x̄, measuring each worker's distance to it in the same pass.
        let local = replace_by_mean(params, &self.sum, ctx.world_size);
        let synced = self.synced.as_mut().expect("checked above");
        self.momentum.resize(params.len(), 0.0);
        let (lr, beta) = (self.lr as f32, self.beta as f32);
        for (range, part) in split.iter() {
            let (x, z, u) = (&mut params[range.clone()], &mut synced[range.clone()], &mut self.momentum[range]);
            if part.exact {
                // A buffer keeps the plain mean.
                z.copy_from_slice(x);
                continue;
            }
            for ((x, z), u) in x.iter_mut().zip(z.iter_mut()).zip(u.iter_mut()) {
                let delta = *z - *x;
                let previous = *u;
                *u = beta * previous + delta;
                let carried = if self.nesterov { *u } else { previous };
                *x += (1.0 - lr) * delta - lr * beta * carried;
                *z = *x;
            }
        }
        Ok(MergeOutcome { local_squared_distance: Some(local), trigger: None })
    }

    fn measures_consensus(&self) -> bool {
        true
    }

    fn reaches_consensus(&self) -> bool {
        true
    }

    fn record(&self) -> StateRecord {
        StateRecord::new().with_held("synced", self.synced.as_ref()).with_held("momentum", Some(&self.momentum))
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.synced = record.take_buffer("synced");
        self.momentum = record.take_buffer("momentum").unwrap_or_default();
        super::no_leftovers(DiLoCoConfig::NAME, &record, "`synced` and `momentum`")
    }
}

impl MatrixForm for DiLoCo {
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        Some(crate::comm::Traffic::ring_all_reduce(4 * values as u64, world_size) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::averaging::Averaging;
    use crate::testing::{initial_buffer, run_one_merge, worker_buffer};

    #[test]
    fn expected_bytes_are_the_metered_ones() {
        let make = || DiLoCoConfig::default().build(4).unwrap();
        let measured = crate::testing::measured_bytes_per_merge(4, 40, 2, make);
        assert_eq!(make().expected_bytes_per_merge(40, 4), Some(measured));
    }

    #[test]
    fn lr_one_and_no_momentum_is_averaging_bit_for_bit() {
        for nesterov in [true, false] {
            let diloco = run_one_merge(4, 5003, |_| Box::new(DiLoCo::new(1.0, 0.0, nesterov).unwrap()));
            let averaging = run_one_merge(4, 5003, |_| Box::new(Averaging::new()));
            for (d, a) in diloco.iter().zip(&averaging) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&d.params), bits(&a.params), "worker {}", d.rank);
                assert_eq!(d.outcome, a.outcome);
                assert_eq!(d.calls.all_reduce, 1);
            }
        }
    }

    #[test]
    fn one_merge_matches_the_outer_step_computed_in_f64() {
        let (m, n) = (4, 257);
        for (lr, beta, nesterov) in [(0.7, 0.9, true), (0.5, 0.8, false)] {
            let runs = run_one_merge(m, n, |_| Box::new(DiLoCo::new(lr, beta, nesterov).unwrap()));
            let z = initial_buffer(m, n);
            for k in 0..n {
                let mean = (0..m).map(|r| f64::from(worker_buffer(r, n)[k])).sum::<f64>() / m as f64;
                let delta = f64::from(z[k]) - mean;
                let u = delta; // β · 0 + Δ
                let step = if nesterov { beta * u + delta } else { u };
                let expected = f64::from(z[k]) - lr * step;
                for run in &runs {
                    let got = f64::from(run.params[k]);
                    assert!((got - expected).abs() < 1e-5, "value {k}: {got} vs {expected}");
                }
            }
        }
    }

    #[test]
    fn the_outer_state_round_trips_and_bad_settings_are_named() {
        assert_eq!(DiLoCo::new(2.0, 0.9, true).unwrap_err().option, "outer-lr");
        assert_eq!(DiLoCo::new(0.7, 1.0, true).unwrap_err().option, "outer-momentum");
        let mut rule = DiLoCo::new(0.7, 0.9, true).unwrap();
        let record = StateRecord::new().with_buffer("synced", vec![1.0, 2.0]).with_buffer("momentum", vec![0.5, -0.5]);
        rule.load_record(record.clone()).unwrap();
        assert_eq!(rule.record(), record);
        assert!(rule.load_record(StateRecord::new().with_buffer("anchor", vec![1.0])).is_err());
        let runs = run_one_merge(2, 3, |_| {
            let mut rule = DiLoCo::new(0.7, 0.9, true).unwrap();
            rule.load_record(StateRecord::new().with_buffer("synced", vec![0.0; 5])).unwrap();
            Box::new(rule)
        });
        assert!(matches!(runs[0].error, Some(RuleError::BadState { rule: "diloco", .. })));
    }
}
