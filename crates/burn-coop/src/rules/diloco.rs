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
//!
//! With `--compressor` an elementwise quantizer (`bf16`, `fp16`, `int8`, `fp8`), the workers
//! send their pseudo-gradients `x_sync − x_i` instead of their models, summed by a quantized
//! all-reduce ([`crate::comm::quantized_all_reduce_sum`]; buffers exact), and `x̄ = x_sync − ḡ`
//! (torchft's `should_quantize` sends FP8 pseudo-gradients the same way).
//!
//! `--outer-optimizer adam` replaces the momentum step by Adam on the same pseudo-gradient
//! (FedAdam/FedOpt; `--outer-momentum` is then `β₁`, with `--outer-beta2` and `--outer-eps`;
//! it has no default learning rate, since DiLoCo's 0.7 is a momentum-SGD rate): see
//! [`crate::rules::outer`].

use serde::{Deserialize, Serialize};

use super::kernels::replace_by_mean;
use super::outer::{OuterKind, OuterOptimizer};
use super::{Bucket, CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext};
use crate::comm::Communicator;
use crate::compress::{CompressContext, Compressor, Segments};
use crate::registry::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// The outer optimizer's name (`--outer-optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OuterOptimizerName {
    /// Momentum SGD, Nesterov's by default (DiLoCo's).
    #[default]
    Sgd,
    /// Adam (FedAdam).
    Adam,
}

/// `--rule diloco`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiLoCoConfig {
    /// DiLoCo's outer optimizer: sgd (momentum SGD, the default) or adam (shared `--outer-optimizer`).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_optimizer: Option<OuterOptimizerName>,
    /// DiLoCo's outer learning rate: in (0, 2) for sgd (default 0.7), positive for adam (no
    /// default).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// DiLoCo's outer momentum β (Adam's β₁), in [0, 1) (default 0.9).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<f64>,
    /// Nesterov outer momentum, for sgd (true/false; default true).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_nesterov: Option<bool>,
    /// Adam's β₂, in [0, 1) (default 0.999).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_beta2: Option<f64>,
    /// How the pseudo-gradients travel (shared `--compressor`): dense by default; an
    /// elementwise quantizer (bf16, fp16, int8, fp8) sums them by a quantized all-reduce.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressor: Option<Compressor>,
    /// Adam's ε, positive (default 1e-8).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_eps: Option<f64>,
}

impl DiLoCoConfig {
    /// The outer optimizer these settings describe, checked: a setting the chosen optimizer does
    /// not use is an error naming it.
    pub fn outer(&self) -> Result<OuterOptimizer, SpecError> {
        let beta = self.outer_momentum.unwrap_or(0.9);
        if !(beta.is_finite() && (0.0..1.0).contains(&beta)) {
            return Err(SpecError::new("outer-momentum", beta.to_string(), "the outer momentum must lie in [0, 1)"));
        }
        match self.outer_optimizer.unwrap_or_default() {
            OuterOptimizerName::Sgd => {
                for (option, given) in [("outer-beta2", self.outer_beta2), ("outer-eps", self.outer_eps)] {
                    if let Some(value) = given {
                        return Err(SpecError::new(option, value.to_string(), "only the adam outer optimizer uses it"));
                    }
                }
                let lr = self.outer_lr.unwrap_or(0.7);
                if !(lr.is_finite() && lr > 0.0 && lr < 2.0) {
                    return Err(SpecError::new(
                        "outer-lr",
                        lr.to_string(),
                        "the outer learning rate must lie in (0, 2)",
                    ));
                }
                let nesterov = self.outer_nesterov.unwrap_or(true);
                Ok(OuterOptimizer::new(lr, OuterKind::Momentum { beta, nesterov }))
            }
            OuterOptimizerName::Adam => {
                if let Some(nesterov) = self.outer_nesterov {
                    let reason = "only the sgd outer optimizer has Nesterov momentum";
                    return Err(SpecError::new("outer-nesterov", nesterov.to_string(), reason));
                }
                let lr = self.outer_lr.ok_or_else(|| {
                    let reason = "the adam outer optimizer needs its learning rate (DiLoCo's 0.7 is momentum SGD's)";
                    SpecError::new("outer-lr", "none", reason)
                })?;
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(SpecError::new("outer-lr", lr.to_string(), "the outer learning rate must be positive"));
                }
                let beta2 = self.outer_beta2.unwrap_or(0.999);
                if !(beta2.is_finite() && (0.0..1.0).contains(&beta2)) {
                    return Err(SpecError::new("outer-beta2", beta2.to_string(), "Adam's β₂ must lie in [0, 1)"));
                }
                let eps = self.outer_eps.unwrap_or(1e-8);
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(SpecError::new("outer-eps", eps.to_string(), "Adam's ε must be positive"));
                }
                Ok(OuterOptimizer::new(lr, OuterKind::Adam { beta1: beta, beta2, eps }))
            }
        }
    }
}

impl RuleConfig for DiLoCoConfig {
    const NAME: &'static str = "diloco";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        Ok(Box::new(DiLoCo::with_outer(self.outer()?).with_compressor(quantizer(self.compressor)?)))
    }

    fn describe(&self) -> String {
        let sent = match self.compressor.filter(|c| !c.is_lossless()) {
            Some(c) => format!(", pseudo-gradients in {c}"),
            None => String::new(),
        };
        match self.outer() {
            Ok(outer) => format!("DiLoCo, {}{sent}", describe_outer(&outer)),
            Err(error) => format!("DiLoCo ({error})"),
        }
    }

    fn resolved(&self) -> Self {
        let Ok(outer) = self.outer() else { return self.clone() };
        let lr = Some(outer.lr());
        match outer.kind() {
            OuterKind::Momentum { beta, nesterov } => Self {
                outer_optimizer: Some(OuterOptimizerName::Sgd),
                outer_lr: lr,
                outer_momentum: Some(beta),
                outer_nesterov: Some(nesterov),
                outer_beta2: None,
                outer_eps: None,
                compressor: self.compressor,
            },
            OuterKind::Adam { beta1, beta2, eps } => Self {
                outer_optimizer: Some(OuterOptimizerName::Adam),
                outer_lr: lr,
                outer_momentum: Some(beta1),
                outer_nesterov: None,
                outer_beta2: Some(beta2),
                outer_eps: Some(eps),
                compressor: self.compressor,
            },
        }
    }
}

/// The quantizer the pseudo-gradients travel in, checked: `None` for the dense all-reduce (also
/// for the identity), an elementwise quantizer for the quantized all-reduce, an error naming
/// `compressor` otherwise.
pub(crate) fn quantizer(compressor: Option<Compressor>) -> Result<Option<Compressor>, SpecError> {
    match compressor {
        Some(c) if c.is_lossless() => Ok(None),
        Some(c) if !c.is_elementwise() => Err(SpecError::new(
            "compressor",
            c.to_string(),
            "the pseudo-gradients are summed by a quantized all-reduce: bf16, fp16, int8 or fp8",
        )),
        other => Ok(other),
    }
}

/// `outer lr = 0.7, momentum = 0.9 (Nesterov)` or `outer Adam, lr = …, β = (…, …), ε = …`.
pub(crate) fn describe_outer(outer: &OuterOptimizer) -> String {
    match outer.kind() {
        OuterKind::Momentum { beta, nesterov } => {
            format!("outer lr = {}, momentum = {beta}{}", outer.lr(), if nesterov { " (Nesterov)" } else { "" })
        }
        OuterKind::Adam { beta1, beta2, eps } => {
            format!("outer Adam, lr = {}, betas = ({beta1}, {beta2}), eps = {eps}", outer.lr())
        }
    }
}

/// DiLoCo's outer step; see the [module documentation](crate::rules::diloco).
#[derive(Debug)]
pub struct DiLoCo {
    outer: OuterOptimizer,
    /// Outer steps taken (Adam's bias correction).
    steps: u64,
    synced: Option<Vec<f32>>,
    sum: Vec<f32>,
    segments: Option<Segments>,
    /// The quantizer of the pseudo-gradients' all-reduce (`None`: the models, dense).
    compressor: Option<Compressor>,
}

impl DiLoCo {
    /// The outer optimizer with learning rate `lr` in (0, 2) and momentum `beta` in [0, 1).
    pub fn new(lr: f64, beta: f64, nesterov: bool) -> Result<Self, SpecError> {
        let config = DiLoCoConfig {
            outer_lr: Some(lr),
            outer_momentum: Some(beta),
            outer_nesterov: Some(nesterov),
            ..DiLoCoConfig::default()
        };
        Ok(Self::with_outer(config.outer()?))
    }

    /// DiLoCo with a checked outer optimizer ([`DiLoCoConfig::outer`]).
    pub fn with_outer(outer: OuterOptimizer) -> Self {
        Self { outer, steps: 0, synced: None, sum: Vec::new(), segments: None, compressor: None }
    }

    /// The pseudo-gradients `x_sync − x_i` summed by a quantized all-reduce in `compressor` (an
    /// elementwise quantizer: bf16, fp16, int8, fp8) instead of the models by a dense one.
    pub fn with_compressor(self, compressor: Option<Compressor>) -> Self {
        Self { compressor, ..self }
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
        self.merge_bucket(Bucket { values: params, at: 0, first: true, last: true, keep: usize::MAX }, ctx, comm)
    }

    /// With dense all-reduces (no `--compressor`, whose blocks and scales span the model): the
    /// outer step and its state are per value.
    fn merges_in_buckets(&self) -> bool {
        self.compressor.is_none()
    }

    /// The merge on the bucket's values and the same range of the synchronized model and the
    /// outer optimizer's state; the outer step count moves at the first bucket.
    fn merge_bucket(&mut self, bucket: Bucket<'_>, ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        let synced = self.synced.as_ref().ok_or(RuleError::BadState {
            rule: DiLoCoConfig::NAME,
            reason: "the rule was not started with the initial model".into(),
        })?;
        let n = synced.len();
        let range = bucket.range();
        if range.end > n || (bucket.first && bucket.last && range.len() != n) {
            let reason =
                format!("the synchronized model has {n} values, but the merge gives values {range:?} of the model");
            return Err(RuleError::BadState { rule: DiLoCoConfig::NAME, reason });
        }
        if !self.outer.fits(n) {
            let reason =
                format!("the synchronized model has {n} values and the outer optimizer's state {}", self.outer.len());
            return Err(RuleError::BadState { rule: DiLoCoConfig::NAME, reason });
        }
        let split = super::split_for(DiLoCoConfig::NAME, self.segments.as_ref(), n)?;
        let Bucket { values: params, first, last, keep, .. } = bucket;
        let local = match self.compressor {
            None => {
                self.sum.resize(params.len(), 0.0);
                comm.all_reduce_sum_into(params, &mut self.sum)?;
                // params ← x̄, measuring each worker's distance to it in the same pass.
                replace_by_mean(params, &self.sum, ctx.world_size)
            }
            Some(compressor) => {
                // The mean pseudo-gradient ḡ = mean_i(x_sync − x_i) quantized, then x̄ = x_sync − ḡ.
                let synced = &synced[range.clone()];
                self.sum.clear();
                self.sum.extend(synced.iter().zip(params.iter()).map(|(z, x)| z - x));
                let at = CompressContext { seed: ctx.seed, round: ctx.round, rank: ctx.rank };
                crate::comm::quantized_all_reduce_sum(comm, &mut self.sum, compressor, Some(&split), at)?;
                super::kernels::divide(&mut self.sum, ctx.world_size);
                let mut local = 0.0;
                for ((x, z), g) in params.iter_mut().zip(synced).zip(&self.sum) {
                    let mean = z - g;
                    local += f64::from(*x - mean) * f64::from(*x - mean);
                    *x = mean;
                }
                local
            }
        };
        let synced = self.synced.as_mut().expect("checked above");
        self.outer.fit(n);
        if first {
            self.steps += 1;
        }
        for (whole, part) in split.iter() {
            // The part of this tensor inside the bucket, in model and in bucket coordinates.
            let (start, end) = (whole.start.max(range.start), whole.end.min(range.end));
            if start >= end {
                continue;
            }
            let (global, local_range) = (start..end, start - range.start..end - range.start);
            if part.exact {
                // A buffer keeps the plain mean.
                synced[global].copy_from_slice(&params[local_range]);
            } else {
                self.outer.step(&mut params[local_range], &mut synced[global.clone()], global, self.steps);
            }
        }
        if last && self.sum.capacity() > keep {
            self.sum = Vec::new();
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
        let record = self.outer.record_into(StateRecord::new().with_held("synced", self.synced.as_ref()));
        match self.outer.kind() {
            OuterKind::Momentum { .. } => record,
            OuterKind::Adam { .. } => record.with_scalar("outer-steps", self.steps as f64),
        }
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.synced = record.take_buffer("synced");
        self.outer.load(&mut record);
        if let OuterKind::Adam { .. } = self.outer.kind() {
            self.steps = record.take_scalar("outer-steps").unwrap_or(0.0) as u64;
        }
        super::no_leftovers(DiLoCoConfig::NAME, &record, "`synced` and the outer optimizer's state")
    }
}

impl MatrixForm for DiLoCo {
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        Some(match self.compressor {
            None => crate::comm::Traffic::ring_all_reduce(4 * values as u64, world_size) as f64,
            Some(compressor) => {
                let split = Segments::resolve(self.segments.as_ref(), values)
                    .map_or_else(|| Segments::whole(values), std::borrow::Cow::into_owned);
                crate::comm::quantized_all_reduce_bytes(compressor, &split, world_size)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::averaging::Averaging;
    use crate::testing::{initial_buffer, merge_trajectories, run_one_merge, worker_buffer};

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

    /// DiLoCo with outer Adam over several merges, in `f64`, from the inputs of
    /// [`merge_trajectories`]: the synchronized model after each merge.
    fn adam_reference(m: usize, merges: usize, lr: f64, beta1: f64, beta2: f64, eps: f64) -> Vec<Vec<f64>> {
        let n = 37;
        let start: Vec<f64> = worker_buffer(m, n).iter().map(|&v| f64::from(v)).collect();
        let (mut z, mut first, mut second) = (start.clone(), vec![0.0; n], vec![0.0; n]);
        let mut history = Vec::new();
        for round in 0..merges {
            let t = round as i32 + 1;
            for k in 0..n {
                // Every worker starts the round from z and moves by its own shift.
                let mean =
                    (0..m).map(|r| z[k] + f64::from(worker_buffer(r + round, n)[k] * 0.1)).sum::<f64>() / m as f64;
                let g = z[k] - mean;
                first[k] = beta1 * first[k] + (1.0 - beta1) * g;
                second[k] = beta2 * second[k] + (1.0 - beta2) * g * g;
                let (m_hat, v_hat) = (first[k] / (1.0 - beta1.powi(t)), second[k] / (1.0 - beta2.powi(t)));
                z[k] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
            history.push(z.clone());
        }
        history
    }

    fn adam_config(lr: f64) -> DiLoCoConfig {
        DiLoCoConfig {
            outer_optimizer: Some(OuterOptimizerName::Adam),
            outer_lr: Some(lr),
            outer_beta2: Some(0.99),
            ..DiLoCoConfig::default()
        }
    }

    #[test]
    fn outer_adam_follows_an_independent_recurrence_and_resumes_bit_for_bit() {
        let (m, merges) = (3, 5);
        let make = || DiLoCo::with_outer(adam_config(0.05).outer().unwrap());
        let runs = merge_trajectories(m, merges, None, make);
        let expected = adam_reference(m, merges, 0.05, 0.9, 0.99, 1e-8);
        for (round, want) in expected.iter().enumerate() {
            for worker in &runs {
                for (k, (bits, want)) in worker[round].iter().zip(want).enumerate() {
                    let got = f64::from(f32::from_bits(*bits));
                    assert!((got - want).abs() < 1e-5, "merge {round}, value {k}: {got} vs {want}");
                }
            }
        }
        assert_eq!(merge_trajectories(m, merges, Some(3), make), runs, "Adam's moments and step count are saved");
    }

    #[test]
    fn quantized_pseudo_gradients_cost_their_bytes_and_stay_near_the_dense_step() {
        let (m, n) = (4, 600);
        let make = |c: Option<Compressor>| move || DiLoCo::new(0.7, 0.9, true).unwrap().with_compressor(c);
        for c in [Compressor::Int8, Compressor::Fp8] {
            let measured = crate::testing::measured_bytes_per_merge(m, n, 2, make(Some(c)));
            assert_eq!(make(Some(c))().expected_bytes_per_merge(n, m), Some(measured), "{c}");
            let dense = crate::testing::measured_bytes_per_merge(m, n, 2, make(None));
            assert!(measured < 0.3 * dense, "{c}: {measured} against {dense} dense");
            // Five merges, against the dense rule: every worker the same model, within the
            // quantizer's error of the dense one.
            let quantized = merge_trajectories(m, 5, None, make(Some(c)));
            let exact = merge_trajectories(m, 5, None, make(None));
            let value = |bits: &u32| f32::from_bits(*bits);
            for (q, e) in quantized[0].last().unwrap().iter().zip(exact[0].last().unwrap()) {
                assert!((value(q) - value(e)).abs() < 0.05, "{c}: {} vs {}", value(q), value(e));
            }
            assert!(quantized.windows(2).all(|w| w[0] == w[1]), "{c}: every worker alike");
            assert_ne!(quantized, exact, "{c}: lossy");
        }
        assert_eq!(quantizer(Some(Compressor::TopK(0.01))).unwrap_err().option, "compressor");
        assert_eq!(quantizer(Some(Compressor::Identity)).unwrap(), None);
    }

    #[test]
    fn outer_optimizer_settings_are_checked_by_name() {
        assert_eq!(
            DiLoCoConfig { outer_optimizer: Some(OuterOptimizerName::Adam), ..DiLoCoConfig::default() }
                .outer()
                .unwrap_err()
                .option,
            "outer-lr"
        );
        let adam = adam_config(0.05);
        assert_eq!(
            DiLoCoConfig { outer_nesterov: Some(true), ..adam.clone() }.outer().unwrap_err().option,
            "outer-nesterov"
        );
        assert_eq!(DiLoCoConfig { outer_beta2: Some(1.0), ..adam.clone() }.outer().unwrap_err().option, "outer-beta2");
        assert_eq!(DiLoCoConfig { outer_eps: Some(0.0), ..adam.clone() }.outer().unwrap_err().option, "outer-eps");
        let sgd = DiLoCoConfig { outer_eps: Some(1e-6), ..DiLoCoConfig::default() };
        assert_eq!(sgd.outer().unwrap_err().option, "outer-eps");
        // Adam takes learning rates beyond momentum SGD's (0, 2).
        assert!(adam_config(3.0).outer().is_ok());
        assert_eq!(adam.resolved().outer_beta2, Some(0.99));
        assert_eq!(DiLoCoConfig::default().resolved().outer_nesterov, Some(true));
        assert_eq!(DiLoCoConfig::default().describe(), "DiLoCo, outer lr = 0.7, momentum = 0.9 (Nesterov)");
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
