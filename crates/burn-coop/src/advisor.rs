//! What Cooperative SGD's theory says about a setting, before any training: the numbers behind
//! `coop advise`.
//!
//! Wang & Joshi, "Cooperative SGD: A Unified Framework for the Design and Analysis of
//! Local-Update SGD Algorithms", JMLR 22(213), 2021: with `m` workers, `v` anchors, period `τ`
//! and a doubly stochastic `(m+v) × (m+v)` matrix `W` with second-largest eigenvalue magnitude
//! `ζ`, the averaged model follows SGD with the effective rate `η_eff = mη/(m+v)`, and the bound
//! on the expected gradient norm adds to synchronous SGD's an error floor proportional to
//! `η_eff² L² σ² ((1+ζ²)/(1−ζ²) · τ − 1)` (the theorem's rate is the effective one; without
//! anchors `η_eff = η`). [`error_floor_factor`] is that factor: `τ − 1` for
//! periodic averaging (`ζ = 0`), `0` for synchronous SGD. From it, decentralized SGD (`W`, every
//! step) has a lower floor than periodic averaging with period `τ` exactly when
//! `(1+ζ²)/(1−ζ²) < τ` ([`decentralized_beats_averaging`]). For graphs that change from merge
//! to merge (time-varying or random), `ζ² = λ₂(E[W_kᵀ W_k])` (MATCHA's `ρ`; for a fixed
//! symmetric `W` the two agree).
//!
//! AdaComm (Wang & Joshi, "Adaptive Communication Strategies to Achieve the Best Error-Runtime
//! Trade-off in Local-Update SGD", SysML 2019) times a local step at `Y` seconds and a merge at
//! `D`, so a step costs `Y + D/τ` on average, and bounds the error after `T` seconds of periodic
//! averaging by `2 (F(x₀) − F_inf)(Y + D/τ)/(ηT) + ηLσ²/m + η²L²σ²(τ − 1)`; the period
//! minimizing it is `τ* = √(2 (F(x₀) − F_inf) D / (η³ L² σ² T))` ([`adacomm_tau_star`]).

use serde::Serialize;

use crate::mixing::{MixingError, MixingMatrix};
use crate::rules::MatrixForm;

/// `(1+ζ²)/(1−ζ²) · τ − 1`: the error floor a setting adds to synchronous SGD's, in units of
/// `η_eff² L² σ²` (infinite for `ζ ≥ 1`, which never reaches consensus).
pub fn error_floor_factor(zeta: f64, tau: u64) -> f64 {
    if zeta >= 1.0 {
        return f64::INFINITY;
    }
    let z2 = zeta * zeta;
    (1.0 + z2) / (1.0 - z2) * tau as f64 - 1.0
}

/// Whether decentralized SGD with a matrix of this `ζ` (a merge every step) has a lower error
/// floor than periodic averaging every `τ` steps: `(1+ζ²)/(1−ζ²) < τ`.
pub fn decentralized_beats_averaging(zeta: f64, tau: u64) -> bool {
    error_floor_factor(zeta, 1) + 1.0 < tau as f64
}

/// `η_eff = mη/(m+v)`: the rate at which the average of workers and anchors moves.
pub fn effective_lr(lr: f64, workers: usize, anchors: usize) -> f64 {
    workers as f64 * lr / (workers + anchors) as f64
}

/// EASGD's moving rate minimizing `ζ` for `m` workers: `2/(m+2)` (then `ζ = m/(m+2)`).
pub fn optimal_easgd_alpha(workers: usize) -> f64 {
    2.0 / (workers as f64 + 2.0)
}

/// `ζ` from a second moment `E[WᵀW]` (doubly stochastic, symmetric): the square root of its
/// second-largest eigenvalue (the largest is 1, for the all-ones vector).
pub fn zeta_of_second_moment(second_moment: &MixingMatrix) -> Result<f64, MixingError> {
    let values = second_moment.eigenvalues()?;
    Ok(values.get(1).map_or(0.0, |&v| if v > 1e-14 { v.sqrt() } else { 0.0 }))
}

/// AdaComm's optimal period `τ* = √(2 F D / (η³ L² σ² T))`, with `F = F(x₀) − F_inf`, `D` the
/// seconds of one merge, `η` the learning rate, `L` the smoothness, `σ²` the gradient variance
/// and `T` the training seconds; at least 1.
pub fn adacomm_tau_star(loss_gap: f64, comm_delay: f64, lr: f64, smoothness: f64, variance: f64, seconds: f64) -> f64 {
    let tau = (2.0 * loss_gap * comm_delay / (lr.powi(3) * smoothness * smoothness * variance * seconds)).sqrt();
    tau.max(1.0)
}

/// AdaComm's runtime model: seconds per local step with a merge every `τ` steps, `Y + D/τ`.
pub fn seconds_per_step(step_time: f64, comm_delay: f64, tau: u64) -> f64 {
    step_time + comm_delay / tau as f64
}

/// The inputs of AdaComm's `τ*` (see [`adacomm_tau_star`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdaCommInputs {
    /// `F(x₀) − F_inf`, the initial loss above its floor.
    pub loss_gap: f64,
    /// Seconds of one merge, `D`.
    pub comm_delay: f64,
    /// Smoothness `L`.
    pub smoothness: f64,
    /// Gradient variance `σ²`.
    pub variance: f64,
    /// Training seconds `T`.
    pub seconds: f64,
}

/// Everything `coop advise` prints for one setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    /// The rule's name, as the registry (`--rule`) has it.
    pub rule: String,
    /// Workers `m`.
    pub workers: usize,
    /// Anchors `v`.
    pub anchors: usize,
    /// Period `τ`.
    pub tau: u64,
    /// `ζ` (of `E[WᵀW]` for time-varying graphs); `None` for rules that are not a mixing matrix.
    pub zeta: Option<f64>,
    /// `1 − ζ`.
    pub spectral_gap: Option<f64>,
    /// The learning rate `η`.
    pub lr: f64,
    /// `η_eff = mη/(m+v)`.
    pub eta_eff: f64,
    /// `(1+ζ²)/(1−ζ²) · τ − 1`.
    pub error_floor_factor: Option<f64>,
    /// Periodic averaging's factor at the same `τ`, `τ − 1`, for comparison.
    pub averaging_error_floor_factor: f64,
    /// Whether this `W` every step (decentralized SGD) has a lower floor than averaging every `τ`.
    pub decentralized_beats_averaging: Option<bool>,
    /// EASGD's best moving rate `2/(m+2)` for these workers.
    pub optimal_easgd_alpha: f64,
    /// Values in the model.
    pub model_values: usize,
    /// Bytes a worker sends per merge.
    pub bytes_per_merge: Option<f64>,
    /// Bytes a worker sends per local step, `bytes_per_merge / τ`.
    pub bytes_per_step: Option<f64>,
    /// Seconds of one local step `Y`, when given.
    pub step_time: Option<f64>,
    /// Seconds per step with merges, `Y + D/τ`, when `Y` and `D` are given.
    pub seconds_per_step: Option<f64>,
    /// AdaComm's `τ*`, when all its inputs are given.
    pub adacomm_tau_star: Option<f64>,
}

impl Advice {
    /// The advice for `rule`, registered as `name` (e.g. [`RuleSpec::name`](crate::rules::RuleSpec::name)),
    /// on `workers` workers with period `tau`, learning rate `lr` and a model of `model_values`
    /// values; an error when the rule's matrix is too large for its spectrum
    /// ([`MixingError::SpectrumTooLarge`]).
    pub fn new(
        name: &str,
        rule: &dyn MatrixForm,
        workers: usize,
        tau: u64,
        lr: f64,
        model_values: usize,
    ) -> Result<Self, MixingError> {
        let anchors = rule.mixing_matrix(workers).map_or(0, |w| w.order().saturating_sub(workers));
        let zeta = rule.mixing_second_moment(workers).map(|gram| zeta_of_second_moment(&gram)).transpose()?;
        let bytes_per_merge = rule.expected_bytes_per_merge(model_values, workers);
        Ok(Self {
            rule: name.to_string(),
            workers,
            anchors,
            tau,
            zeta,
            spectral_gap: zeta.map(|z| 1.0 - z),
            lr,
            eta_eff: effective_lr(lr, workers, anchors),
            error_floor_factor: zeta.map(|z| error_floor_factor(z, tau)),
            averaging_error_floor_factor: tau as f64 - 1.0,
            decentralized_beats_averaging: zeta.map(|z| decentralized_beats_averaging(z, tau)),
            optimal_easgd_alpha: optimal_easgd_alpha(workers),
            model_values,
            bytes_per_merge,
            bytes_per_step: bytes_per_merge.map(|b| b / tau as f64),
            step_time: None,
            seconds_per_step: None,
            adacomm_tau_star: None,
        })
    }

    /// Adds AdaComm's runtime model: `Y` seconds per local step, `D` per merge (either may be
    /// unknown; the seconds per step need both).
    pub fn with_runtime(self, step_time: Option<f64>, comm_delay: Option<f64>) -> Self {
        let seconds_per_step = step_time.zip(comm_delay).map(|(y, d)| seconds_per_step(y, d, self.tau));
        Self { step_time, seconds_per_step, ..self }
    }

    /// Adds AdaComm's `τ*` for these inputs.
    pub fn with_adacomm(self, inputs: AdaCommInputs) -> Self {
        let tau_star = adacomm_tau_star(
            inputs.loss_gap,
            inputs.comm_delay,
            self.lr,
            inputs.smoothness,
            inputs.variance,
            inputs.seconds,
        );
        Self { adacomm_tau_star: Some(tau_star), ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{averaging::Averaging, elastic::Elastic, gossip::Gossip, matcha::Matcha};
    use crate::topology::Topology;

    #[test]
    fn closed_forms() {
        assert_eq!(error_floor_factor(0.0, 8), 7.0, "periodic averaging: τ − 1");
        assert_eq!(error_floor_factor(0.0, 1), 0.0, "synchronous SGD");
        assert!((error_floor_factor(0.5, 2) - (1.25 / 0.75 * 2.0 - 1.0)).abs() < 1e-15);
        assert_eq!(error_floor_factor(1.0, 2), f64::INFINITY);
        // (1+ζ²)/(1−ζ²) = 3 at ζ² = 1/2: decentralized wins against τ = 4, not against τ = 3.
        let zeta = 0.5f64.sqrt();
        assert!(decentralized_beats_averaging(zeta, 4) && !decentralized_beats_averaging(zeta, 2));
        assert_eq!(effective_lr(0.1, 4, 1), 0.08);
        assert_eq!(optimal_easgd_alpha(4), 1.0 / 3.0);
        // τ* = √(2·2·0.5 / (0.1³·1·4·100)) = √5.
        assert!((adacomm_tau_star(2.0, 0.5, 0.1, 1.0, 4.0, 100.0) - 5f64.sqrt()).abs() < 1e-12);
        assert_eq!(adacomm_tau_star(1e-9, 1e-9, 0.1, 1.0, 1.0, 1.0), 1.0, "at least one step");
        assert_eq!(seconds_per_step(0.1, 0.4, 4), 0.2);
    }

    #[test]
    fn zeta_of_rules_matches_their_spectra() {
        let ring = Topology::ring(8).unwrap();
        let gossip = Gossip::on(&ring).unwrap();
        let advice = Advice::new("gossip", &gossip, 8, 1, 0.1, 100).unwrap();
        let exact = (1.0 + 2.0 * (2.0 * std::f64::consts::PI / 8.0).cos()) / 3.0;
        assert!((advice.zeta.unwrap() - exact).abs() < 1e-9, "ring with 1/3 weights: {}", advice.zeta.unwrap());
        assert_eq!(advice.bytes_per_merge, Some(2.0 * 400.0));

        let elastic = Elastic::new(optimal_easgd_alpha(4), 4).unwrap();
        let advice = Advice::new("elastic", &elastic, 4, 4, 0.1, 100).unwrap();
        assert!((advice.zeta.unwrap() - 4.0 / 6.0).abs() < 1e-9, "ζ* = m/(m+2)");
        assert_eq!((advice.anchors, advice.eta_eff), (1, 0.08));

        let advice =
            Advice::new("average", &Averaging::new(), 4, 8, 0.1, 100).unwrap().with_runtime(Some(0.1), Some(0.4));
        assert_eq!(advice.rule, "average");
        assert_eq!((advice.zeta, advice.error_floor_factor), (Some(0.0), Some(7.0)));
        assert_eq!(advice.bytes_per_step, Some(600.0 / 8.0));
        assert!((advice.seconds_per_step.unwrap() - 0.15).abs() < 1e-15, "0.1 + 0.4/8");
        let inputs = AdaCommInputs { loss_gap: 2.0, comm_delay: 0.5, smoothness: 1.0, variance: 4.0, seconds: 100.0 };
        assert!((advice.with_adacomm(inputs).adacomm_tau_star.unwrap() - 5f64.sqrt()).abs() < 1e-12);

        let one_peer = Gossip::one_peer_exponential(8);
        let zeta = Advice::new("gossip", &one_peer, 8, 1, 0.1, 1).unwrap().zeta.unwrap();
        assert!(zeta > 0.0 && zeta < 1.0, "{zeta}");

        let matcha = Matcha::on(&ring, 0.5);
        let zeta = Advice::new("matcha", &matcha, 8, 1, 0.1, 1).unwrap().zeta.unwrap();
        assert!((zeta * zeta - matcha.rho()).abs() < 1e-9, "ζ² is MATCHA's ρ");
    }
}
