//! Elastic averaging (EASGD): workers are pulled towards an anchor that moves towards them.
//!
//! Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015
//! (arXiv 1412.6651), synchronous form; as a Cooperative SGD matrix in Wang & Joshi,
//! "Cooperative SGD", JMLR 22(213), 2021. At a merge, with `x_i` the pre-merge models and `z`
//! the anchor:
//!
//! `x_i ← x_i − α (x_i − z)`, `z ← z + α Σ_i (x_i − z)`.
//!
//! On the `m` workers plus the anchor this is `W_α = [[(1−α) I, α 1], [α 1ᵀ, 1 − mα]]`, whose
//! eigenvalues are 1, `1 − α` and `1 − (m+1)α`: the rule is stable for `0 < α < 2/(m+1)` and
//! `ζ` is smallest at `α = 2/(m+2)`.
//!
//! There is no parameter server: every worker keeps its own copy of the anchor and updates it
//! from one sum all-reduce of `x_i − z`, so all copies stay identical. The anchor starts as the
//! initial model (identical on every worker after the initial broadcast); `x̄ − z = S/m` gives
//! the consensus distance with no extra exchange.
//!
//! ## Several anchors (`--anchors v`)
//!
//! Cooperative SGD's `A(τ, W, v)` allows `v ≥ 1` auxiliary models (Wang & Joshi, JMLR 2021,
//! "generalized elastic averaging"). Here the `m` workers form `v` groups of `n = m/v`
//! consecutive ranks (`v` divides `m`); anchor `z_g` is attached to the workers of group `g`
//! and the anchors are fully connected with equal weights. With `z̄` the mean of the anchors:
//!
//! `x_i ← (1−α) x_i + α z_{g(i)}`, `z_g ← α Σ_{i∈g} x_i + (1 − nα) z̄`,
//!
//! that is `W[i][i] = 1−α`, `W[i][z_g] = W[z_g][i] = α` for `i ∈ g`, and `W[z_g][z_h] =
//! (1−nα)/v` for every pair of anchors (symmetric, doubly stochastic). For `v = 1` this is
//! `W_α` above, and the code runs EASGD's own path (tested bit for bit). The spectrum is `1`,
//! `1 − α` (`m − v` times), `1 − (n+1)α`, and, `v − 1` times each, the roots of
//! `λ² − (1−α) λ − nα² = 0` (the anchors' differences); so the rule is stable for
//! `0 < α < 1/n` when `v > 1` ([`elastic_zeta`]). The default α minimizes `ζ`
//! (`2/(m+2)` for one anchor). The averaged model moves with the effective rate
//! `η_eff = mη/(m+v)`. The construction (groups of consecutive ranks, anchors averaged with
//! equal weights) is this crate's instance of the paper's block-structured family.
//!
//! Each worker keeps its group's anchor only. A merge with `v > 1` runs two sum all-reduces
//! started together: `x_i − z_g` inside the group (a sub-communicator split at the first merge)
//! and the anchors over everyone (each group's first worker contributes its anchor, the others
//! zeros, so the sum is exact). The consensus distance is not measured for free then.

use serde::{Deserialize, Serialize};

use super::kernels::{add_scaled, difference, distance_to_mean};
use super::{
    Bucket, CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext, check_world_size,
};
use crate::comm::Communicator;
use crate::mixing::MixingMatrix;
use crate::registry::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// `--rule elastic`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ElasticConfig {
    /// Elastic moving rate α, in (0, 2/(m+1)) (shared `--alpha`; default 2/(m+2), which
    /// minimizes ζ).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Number of anchors v, dividing the number of workers (default 1: EASGD).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchors: Option<u64>,
}

impl RuleConfig for ElasticConfig {
    const NAME: &'static str = "elastic";

    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let anchors = self.anchors.unwrap_or(1) as usize;
        if anchors == 0 || anchors > world_size || !world_size.is_multiple_of(anchors) {
            let reason = format!(
                "{anchors} anchors for {world_size} workers: the anchors need groups of equal size (v ≥ 1 dividing m)"
            );
            return Err(SpecError::new("anchors", anchors.to_string(), reason));
        }
        let alpha = self.alpha.unwrap_or_else(|| optimal_elastic_alpha(world_size, anchors));
        let rule = Elastic::generalized(alpha, anchors, world_size).map_err(|error| {
            SpecError::new("alpha", self.alpha.map_or_else(|| "default".into(), |a| a.to_string()), error)
        })?;
        Ok(Box::new(rule))
    }

    fn describe(&self) -> String {
        let anchors = match self.anchors {
            Some(v) if v > 1 => format!(", {v} anchors"),
            _ => String::new(),
        };
        match self.alpha {
            Some(alpha) => format!("elastic averaging, alpha = {alpha}{anchors}"),
            None => format!("elastic averaging{anchors}"),
        }
    }

    fn run_tag(&self) -> String {
        match self.anchors {
            Some(v) if v > 1 => format!("elastic-v{v}"),
            _ => "elastic".into(),
        }
    }
}

/// `ζ` of elastic averaging's `(m+v) × (m+v)` matrix with moving rate `alpha` (closed form,
/// see the [module documentation](crate::rules::elastic)): `max(|1−α|, |1−(m+1)α|)` for one
/// anchor; `max(|1−α|, |1−(n+1)α|, |λ±|)` with `λ± = ((1−α) ± √((1−α)² + 4nα²))/2`,
/// `n = m/v`, for several.
pub fn elastic_zeta(alpha: f64, workers: usize, anchors: usize) -> f64 {
    let n = (workers / anchors.max(1)) as f64;
    let mut zeta = (1.0 - alpha).abs().max((1.0 - (n + 1.0) * alpha).abs());
    if anchors > 1 {
        let root = ((1.0 - alpha).powi(2) + 4.0 * n * alpha * alpha).sqrt();
        zeta = zeta.max(((1.0 - alpha) + root) / 2.0).max((((1.0 - alpha) - root) / 2.0).abs());
    }
    if anchors == 1 && workers == 1 { (1.0 - 2.0 * alpha).abs() } else { zeta }
}

/// The largest stable moving rate (exclusive): `2/(m+1)` for one anchor, `1/n` for several.
pub fn elastic_alpha_limit(workers: usize, anchors: usize) -> f64 {
    if anchors <= 1 { 2.0 / (workers as f64 + 1.0) } else { anchors as f64 / workers as f64 }
}

/// The moving rate minimizing [`elastic_zeta`]: `2/(m+2)` for one anchor (Wang & Joshi); for
/// several, found by a golden-section search on the closed form (ζ is unimodal in α there).
pub fn optimal_elastic_alpha(workers: usize, anchors: usize) -> f64 {
    if anchors <= 1 {
        return 2.0 / (workers as f64 + 2.0);
    }
    let (mut low, mut high) = (0.0, elastic_alpha_limit(workers, anchors));
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..200 {
        let a = high - ratio * (high - low);
        let b = low + ratio * (high - low);
        if elastic_zeta(a, workers, anchors) <= elastic_zeta(b, workers, anchors) {
            high = b;
        } else {
            low = a;
        }
    }
    (low + high) / 2.0
}

/// Elastic averaging with moving rate α; see the [module documentation](crate::rules::elastic).
pub struct Elastic {
    alpha: f64,
    anchors: usize,
    workers: usize,
    anchor: Option<Vec<f32>>,
    diff: Vec<f32>,
    sum: Vec<f32>,
    /// With several anchors: this worker's group.
    group: Option<Box<dyn Communicator>>,
}

impl std::fmt::Debug for Elastic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elastic")
            .field("alpha", &self.alpha)
            .field("anchors", &self.anchors)
            .field("workers", &self.workers)
            .field("anchor_len", &self.anchor.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl Elastic {
    /// EASGD (one anchor) with moving rate `alpha` for `workers` workers: an error unless
    /// `0 < α < 2/(m+1)`.
    pub fn new(alpha: f64, workers: usize) -> Result<Self, RuleError> {
        Self::generalized(alpha, 1, workers)
    }

    /// Generalized elastic averaging: `anchors` anchors `v`, each attached to `m/v` consecutive
    /// workers of `workers`, with moving rate `alpha`. An error unless `v ≥ 1` divides `m` and
    /// `0 < α <` [`elastic_alpha_limit`]`(m, v)`.
    pub fn generalized(alpha: f64, anchors: usize, workers: usize) -> Result<Self, RuleError> {
        let v = anchors;
        if v == 0 || v > workers || !workers.is_multiple_of(v) {
            let reason = format!("{v} anchors for {workers} workers (v ≥ 1 must divide m)");
            return Err(RuleError::BadState { rule: ElasticConfig::NAME, reason });
        }
        let upper = elastic_alpha_limit(workers, v);
        if !(alpha.is_finite() && alpha > 0.0 && alpha < upper) {
            return Err(RuleError::ElasticAlphaOutOfRange { alpha, workers, anchors: v, upper });
        }
        Ok(Self { alpha, anchors, workers, anchor: None, diff: Vec::new(), sum: Vec::new(), group: None })
    }

    /// The number of anchors `v`.
    pub fn anchors(&self) -> usize {
        self.anchors
    }

    /// EASGD with `α = 2/(m+2)`, the value minimizing `ζ(W_α)` for `m ≥ 1` workers.
    pub fn optimal(workers: usize) -> Result<Self, RuleError> {
        Self::new(2.0 / (workers as f64 + 2.0), workers)
    }

    /// Elastic averaging starting from a given anchor instead of the initial model.
    pub fn with_anchor(self, anchor: Vec<f32>) -> Self {
        Self { anchor: Some(anchor), ..self }
    }

    /// The moving rate α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The current anchor (this worker's group's), once known.
    pub fn anchor(&self) -> Option<&[f32]> {
        self.anchor.as_deref()
    }
}

impl Elastic {
    /// Checks the anchor against the model; without one (the rule used without `start`, by
    /// workers that began from different models) the anchor starts at the workers' mean.
    fn ensure_anchor(
        &mut self,
        params: &[f32],
        ctx: &SyncContext,
        comm: &mut dyn Communicator,
    ) -> Result<(), RuleError> {
        let n = params.len();
        match &self.anchor {
            Some(anchor) if anchor.len() == n => Ok(()),
            Some(anchor) => {
                let reason = format!("the anchor has {} values but the model has {n}", anchor.len());
                Err(RuleError::BadState { rule: ElasticConfig::NAME, reason })
            }
            None => {
                let mut mean = params.to_vec();
                comm.all_reduce_sum(&mut mean)?;
                let m = ctx.world_size as f32;
                mean.iter_mut().for_each(|v| *v /= m);
                self.anchor = Some(mean);
                Ok(())
            }
        }
    }
}

/// With `d_i = x_i − z` in `diff` and `S = Σ_j d_j` in `sum`: `x_i ← x_i − α d_i`,
/// `z ← z + α S`, and this worker's squared distance to the mean (`x_i − x̄ = d_i − S/m`, no
/// extra exchange).
fn pull_and_move_anchor(
    params: &mut [f32],
    anchor: &mut [f32],
    diff: &[f32],
    sum: &[f32],
    alpha: f64,
    world_size: usize,
) -> MergeOutcome {
    let local = distance_to_mean(diff, sum, world_size);
    let alpha = alpha as f32;
    add_scaled(params, -alpha, diff);
    add_scaled(anchor, alpha, sum);
    MergeOutcome { local_squared_distance: Some(local), trigger: None }
}

impl Elastic {
    /// A merge with several anchors: two sum all-reduces started together, `x_i − z_g` in the
    /// group and the anchors over everyone, then `x_i ← x_i − α (x_i − z_g)`,
    /// `z_g ← z_g + α Σ_{j∈g} (x_j − z_g) + (1 − nα)(z̄ − z_g)`.
    fn merge_anchors(
        &mut self,
        params: &mut [f32],
        ctx: &SyncContext,
        comm: &mut dyn Communicator,
    ) -> Result<MergeOutcome, RuleError> {
        let size = ctx.world_size / self.anchors;
        if self.group.is_none() {
            self.group = Some(comm.split(ctx.rank / size)?);
        }
        let anchor = self.anchor.as_ref().expect("ensured by merge");
        let mut send = std::mem::take(&mut self.sum);
        send.clear();
        send.extend(params.iter().zip(anchor.iter()).map(|(x, z)| x - z));
        let group = self.group.as_mut().expect("split above");
        let pending = group.start_all_reduce_sum(send)?;
        let mut anchors = std::mem::take(&mut self.diff);
        anchors.clear();
        if ctx.rank.is_multiple_of(size) {
            anchors.extend_from_slice(anchor);
        } else {
            anchors.resize(anchor.len(), 0.0);
        }
        let pending_anchors = comm.start_all_reduce_sum(anchors)?;
        self.sum = pending.wait()?;
        self.diff = pending_anchors.wait()?;
        let group_size = self.group.as_ref().map_or(1, |g| g.world_size());
        let anchor = self.anchor.as_mut().expect("ensured by merge");
        let alpha = self.alpha as f32;
        let pull = (1.0 - group_size as f64 * self.alpha) as f32;
        let v = self.anchors as f32;
        for (((x, z), s), total) in params.iter_mut().zip(anchor.iter_mut()).zip(&self.sum).zip(&self.diff) {
            let d = *x - *z;
            let mean = total / v;
            *x -= alpha * d;
            *z += alpha * s + pull * (mean - *z);
        }
        Ok(MergeOutcome { local_squared_distance: None, trigger: None })
    }
}

impl MergeRule for Elastic {
    fn start(&mut self, initial: &[f32], ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        check_world_size(ElasticConfig::NAME, self.workers, ctx)?;
        if self.anchor.is_none() {
            self.anchor = Some(initial.to_vec());
        }
        Ok(())
    }

    /// One anchor: a blocking all-reduce of `d_i = x_i − z` kept in a buffer of the rule's
    /// (MPI's blocking collectives are faster than its non-blocking ones when nothing overlaps
    /// them). Several: see the [module documentation](crate::rules::elastic).
    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        check_world_size(ElasticConfig::NAME, self.workers, ctx)?;
        self.ensure_anchor(params, ctx, comm)?;
        if self.anchors > 1 {
            return self.merge_anchors(params, ctx, comm);
        }
        self.merge_bucket(Bucket { values: params, at: 0, first: true, last: true, keep: usize::MAX }, ctx, comm)
    }

    /// With one anchor (started on the initial model, so a bucket can be merged on its own).
    fn merges_in_buckets(&self) -> bool {
        self.anchors == 1
    }

    /// The one-anchor merge on the bucket's values and the same range of the anchor.
    fn merge_bucket(&mut self, bucket: Bucket<'_>, ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        check_world_size(ElasticConfig::NAME, self.workers, ctx)?;
        let range = bucket.range();
        let anchor = self.anchor.as_mut().and_then(|a| a.get_mut(range.clone())).ok_or_else(|| {
            let reason = format!("the anchor does not cover values {range:?} of the model");
            RuleError::BadState { rule: ElasticConfig::NAME, reason }
        })?;
        difference(&mut self.diff, bucket.values, anchor);
        self.sum.resize(bucket.values.len(), 0.0);
        comm.all_reduce_sum_into(&self.diff, &mut self.sum)?;
        let outcome = pull_and_move_anchor(bucket.values, anchor, &self.diff, &self.sum, self.alpha, ctx.world_size);
        bucket.release(&mut self.diff);
        bucket.release(&mut self.sum);
        Ok(outcome)
    }

    fn measures_consensus(&self) -> bool {
        self.anchors == 1
    }

    fn record(&self) -> StateRecord {
        StateRecord::new().with_held("anchor", self.anchor.as_ref())
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.anchor = record.take_buffer("anchor");
        super::no_leftovers(ElasticConfig::NAME, &record, "only `anchor`")
    }
}

impl MatrixForm for Elastic {
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        let bytes = 4 * values as u64;
        let global = crate::comm::Traffic::ring_all_reduce(bytes, world_size) as f64;
        if self.anchors <= 1 {
            return Some(global);
        }
        Some(crate::comm::Traffic::ring_all_reduce(bytes, world_size / self.anchors) as f64 + global)
    }

    fn mixing_matrix(&self, world_size: usize) -> Option<MixingMatrix> {
        let (m, v) = (world_size, self.anchors.max(1));
        let n = m / v;
        let order = m + v;
        let mut w = vec![0.0; order * order];
        for i in 0..m {
            let z = m + (i / n).min(v - 1);
            w[i * order + i] = 1.0 - self.alpha;
            w[i * order + z] = self.alpha;
            w[z * order + i] = self.alpha;
        }
        let anchor_weight = (1.0 - n as f64 * self.alpha) / v as f64;
        for g in m..order {
            for h in m..order {
                w[g * order + h] = anchor_weight;
            }
        }
        Some(MixingMatrix::from_dense_unchecked(order, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        check_rounds_against_matrices, check_rule_against_matrix, merge_trajectories as trajectories, run_one_merge,
    };

    #[test]
    fn one_anchor_is_easgd_bit_for_bit() {
        let config = ElasticConfig { alpha: Some(0.25), anchors: Some(1) };
        let general = trajectories(4, 5, None, || config.build(4).unwrap());
        let easgd = trajectories(4, 5, None, || Elastic::new(0.25, 4).unwrap());
        assert_eq!(general, easgd);
    }

    #[test]
    fn several_anchors_follow_the_augmented_matrix_merge_after_merge() {
        check_rule_against_matrix(4, 23, || Box::new(Elastic::generalized(0.2, 2, 4).unwrap()));
        check_rounds_against_matrices(4, 11, 6, || Box::new(Elastic::generalized(0.2, 2, 4).unwrap()));
        check_rounds_against_matrices(6, 7, 5, || Box::new(Elastic::generalized(0.3, 3, 6).unwrap()));
        check_rounds_against_matrices(4, 9, 4, || Box::new(Elastic::optimal(4).unwrap()));
        let w = Elastic::generalized(0.2, 2, 4).unwrap().mixing_matrix(4).unwrap();
        assert!((w.get(4, 5) - 0.3).abs() < 1e-15 && (w.get(4, 0) - 0.2).abs() < 1e-15 && w.get(4, 2) == 0.0);
    }

    #[test]
    fn several_anchors_survive_a_checkpoint_bit_for_bit() {
        let make = || ElasticConfig { alpha: None, anchors: Some(2) }.build(4).unwrap();
        assert_eq!(trajectories(4, 5, Some(2), make), trajectories(4, 5, None, make));
    }

    #[test]
    fn zeta_in_closed_form_matches_the_eigenvalues() {
        for (m, v, alpha) in [(4, 1, 0.25), (4, 1, 0.1), (4, 2, 0.2), (6, 3, 0.35), (8, 2, 0.05), (8, 4, 0.4)] {
            let rule = Elastic::generalized(alpha, v, m).unwrap();
            let w = rule.mixing_matrix(m).unwrap();
            let exact = w.zeta().unwrap();
            let closed = elastic_zeta(alpha, m, v);
            assert!((exact - closed).abs() < 1e-9, "m {m} v {v} α {alpha}: eigenvalues {exact}, closed form {closed}");
        }
        assert_eq!(optimal_elastic_alpha(4, 1), 2.0 / 6.0);
        for (m, v) in [(4, 2), (8, 2), (8, 4), (12, 3)] {
            let best = optimal_elastic_alpha(m, v);
            let limit = elastic_alpha_limit(m, v);
            let zeta = elastic_zeta(best, m, v);
            assert!(zeta < 1.0);
            for k in 1..200 {
                let alpha = limit * k as f64 / 200.0;
                assert!(zeta <= elastic_zeta(alpha, m, v) + 1e-12, "m {m} v {v}: α {alpha} beats the optimum {best}");
            }
        }
    }

    #[test]
    fn expected_bytes_are_the_metered_ones() {
        for anchors in [1, 2] {
            let make = || Elastic::generalized(0.2, anchors, 4).unwrap();
            let measured = crate::testing::measured_bytes_per_merge(4, 40, 2, make);
            assert_eq!(make().expected_bytes_per_merge(40, 4), Some(measured), "{anchors} anchors");
        }
    }

    #[test]
    fn bad_anchor_settings_are_named() {
        for anchors in [3, 5] {
            let error = ElasticConfig { alpha: None, anchors: Some(anchors) }.build(4).err().unwrap();
            assert_eq!(error.option, "anchors", "{anchors} anchors for 4 workers");
        }
        let error = ElasticConfig { alpha: Some(0.5), anchors: Some(2) }.build(4).err().unwrap();
        assert_eq!(error.option, "alpha");
        assert!(error.reason.contains("v = 2"), "{}", error.reason);
        assert!(ElasticConfig { alpha: Some(0.45), anchors: Some(2) }.build(4).is_ok(), "α < 1/n = 1/2");
    }

    #[test]
    fn one_merge_is_the_augmented_matrix_with_the_anchor() {
        check_rule_against_matrix(4, 23, || Elastic::new(0.25, 4).unwrap());
        check_rule_against_matrix(3, 9, || Box::new(Elastic::optimal(3).unwrap()));
    }

    #[test]
    fn alpha_is_checked_against_the_number_of_workers() {
        assert!(Elastic::new(0.39, 4).is_ok());
        assert!(matches!(Elastic::new(0.4, 4), Err(RuleError::ElasticAlphaOutOfRange { workers: 4, .. })));
        assert!(Elastic::new(0.5, 2).is_ok(), "2/(m+1) = 2/3 for two workers");
        assert!(Elastic::new(f64::NAN, 2).is_err());
        let [start, merge] = crate::testing::refusals(Elastic::new(0.2, 4).unwrap(), 3);
        let mismatch = RuleError::WorldSizeMismatch { rule: "elastic", expected: 4, found: 3 };
        assert_eq!((start, merge), (Some(mismatch.clone()), Some(mismatch)));
        let error = Elastic::generalized(0.2, 3, 4).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot restore the elastic rule's state: 3 anchors for 4 workers (v ≥ 1 must divide m)"
        );
        let error = ElasticConfig { alpha: Some(0.5), anchors: None }.build(4).err().unwrap();
        assert_eq!((error.option, error.value.as_str()), ("alpha", "0.5"));
    }

    #[test]
    fn a_restored_anchor_of_the_wrong_length_is_an_error() {
        let runs = run_one_merge(2, 6, |_| {
            let mut rule = Elastic::new(0.3, 2).unwrap();
            rule.load_record(StateRecord::new().with_buffer("anchor", vec![0.0; 5])).unwrap();
            Box::new(rule)
        });
        for run in runs {
            assert!(matches!(run.error, Some(RuleError::BadState { rule: "elastic", .. })), "{:?}", run.error);
        }
        let mut rule = Elastic::new(0.3, 2).unwrap();
        let foreign = StateRecord::new().with_buffer("anchor", vec![1.0]).with_scalar("momentum", 1.0);
        assert!(matches!(rule.load_record(foreign), Err(RuleError::BadState { .. })));
    }
}
