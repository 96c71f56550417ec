//! Overlap Local-SGD: the anchor's all-reduce travels during the next τ local steps.
//!
//! Wang, Liang & Joshi, "Overlap Local-SGD: An Algorithmic Approach to Hide Communication
//! Delays in Distributed SGD", ICASSP 2020 (arXiv 2002.09539); the order of operations follows
//! the authors' code (JYWa/Overlap_Local_SGD, `distoptim/OverlapLocalSGD.py`). Every worker
//! keeps an anchor `z` (initially the common starting model) and an anchor momentum `m_i`. At
//! every merge, with `η` the current learning rate:
//!
//! 1. wait for the all-reduce started at the previous merge (it travelled during the τ local
//!    steps since): `z ← Σ_j p_j`, the new anchor;
//! 2. pull towards it: `x_i ← (1−α) x_i + α z`;
//! 3. anchor momentum: `m_i ← γ m_i + (z − x_i)/η` (the first time `m_i = (z − x_i)/η`);
//! 4. start the all-reduce of `p_i = (z − η m_i)/m`, so the next anchor is
//!    `mean_i (z − η m_i)`, and go back to the local steps.
//!
//! With `γ = 0`, `z − η m_i = x_i`: the next anchor is the mean of the pulled models (with `γ`
//! the anchor moves by heavy-ball momentum, `z_{k+1} = mean_i(x_i) + γ (z_k − z_{k−1})`, the
//! authors' `gmf`; their momentum is kept divided by the learning rate, as here, so a changing
//! rate rescales it). Defaults: `α = 0.6` (`--pull`), `γ = 0.7` (`--anchor-momentum`), τ = 2,
//! the settings of the authors' run script (`launch_baseline.sh`: `--cp 2 --alpha 0.6 --gmf
//! 0.7`, 16 workers); their training script's own defaults are `α = 0.2`, no momentum and
//! τ = 98, and the paper's CIFAR-10 table was not compared here.
//!
//! The pull and the anchor momentum move the trained parameters only. Buffers (BatchNorm running
//! statistics, the exact parts of the split given by [`MergeRule::set_segments`]) take the plain
//! mean of their values at the merge, bit for bit what averaging gives, by one small blocking
//! all-reduce of the buffers alone (ResNet-20: 1,376 values); the anchor momentum would
//! otherwise extrapolate a running variance. The authors' code touches `model.parameters()`
//! only, leaving each worker its own statistics: `--buffers keep-local` does that.
//!
//! A checkpoint taken while the sum travels saves this worker's `p_i`; the resumed run starts
//! the same all-reduce again at its first merge, so it continues bit for bit. The consensus
//! distance is not measured for free; `--consensus-every` measures it.

use serde::{Deserialize, Serialize};

use super::kernels::replace_by_mean;
use super::{CooperativeRule, InFlightAnchor, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext};
use crate::comm::Communicator;
use crate::compress::Segments;
use crate::registry::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// `--rule overlap`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct OverlapConfig {
    /// Pull α towards the anchor at a merge, in (0, 1] (default 0.6).
    #[arg(long, value_parser = crate::registry::positive_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull: Option<f64>,
    /// Anchor momentum γ, in [0, 1) (default 0.7).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor_momentum: Option<f64>,
}

impl RuleConfig for OverlapConfig {
    const NAME: &'static str = "overlap";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let (pull, momentum) = (self.pull.unwrap_or(0.6), self.anchor_momentum.unwrap_or(0.7));
        if !(pull > 0.0 && pull <= 1.0) {
            return Err(SpecError::new("pull", pull.to_string(), "the pull towards the anchor lies in (0, 1]"));
        }
        if !(0.0..1.0).contains(&momentum) {
            return Err(SpecError::new("anchor-momentum", momentum.to_string(), "the anchor momentum lies in [0, 1)"));
        }
        let rule = Overlap::new(pull, momentum).map_err(|error| SpecError::new("pull", pull.to_string(), error))?;
        Ok(Box::new(rule))
    }

    fn describe(&self) -> String {
        format!(
            "Overlap Local-SGD, pull {}, anchor momentum {}",
            self.pull.unwrap_or(0.6),
            self.anchor_momentum.unwrap_or(0.7)
        )
    }

    fn default_period(&self) -> Option<u64> {
        Some(2)
    }

    fn resolved(&self) -> Self {
        Self { pull: Some(self.pull.unwrap_or(0.6)), anchor_momentum: Some(self.anchor_momentum.unwrap_or(0.7)) }
    }
}

/// Overlap Local-SGD; see the [module documentation](crate::rules::overlap).
#[derive(Debug)]
pub struct Overlap {
    pull: f64,
    anchor_momentum: f64,
    /// The anchor and the next anchor's sum, travelling until the next merge.
    anchor: InFlightAnchor,
    momentum: Option<Vec<f32>>,
    segments: Option<Segments>,
    /// The buffers' values, gathered for their plain mean.
    buffers: Vec<f32>,
    buffer_sum: Vec<f32>,
}

impl Overlap {
    /// Overlap Local-SGD with pull `α` in (0, 1] and anchor momentum `γ` in [0, 1).
    pub fn new(pull: f64, anchor_momentum: f64) -> Result<Self, RuleError> {
        if !(pull > 0.0 && pull <= 1.0 && (0.0..1.0).contains(&anchor_momentum)) {
            let reason = format!("pull {pull} must lie in (0, 1], anchor momentum {anchor_momentum} in [0, 1)");
            return Err(RuleError::BadState { rule: OverlapConfig::NAME, reason });
        }
        Ok(Self {
            pull,
            anchor_momentum,
            anchor: InFlightAnchor::default(),
            momentum: None,
            segments: None,
            buffers: Vec::new(),
            buffer_sum: Vec::new(),
        })
    }

    /// The anchor as of the last merge.
    pub fn anchor(&self) -> Option<&[f32]> {
        self.anchor.anchor()
    }
}

impl Overlap {
    /// The plain mean over the workers of the buffers (the exact parts of `split`) of `params`,
    /// as averaging writes it, into `self.buffers` in buffer order: one blocking all-reduce of
    /// the buffers alone (none when the model has none).
    fn mean_of_buffers(
        &mut self,
        params: &[f32],
        split: &Segments,
        comm: &mut dyn Communicator,
    ) -> Result<(), RuleError> {
        self.buffers.clear();
        for (range, _) in split.iter().filter(|(_, part)| part.exact) {
            self.buffers.extend_from_slice(&params[range]);
        }
        if !self.buffers.is_empty() {
            self.buffer_sum.resize(self.buffers.len(), 0.0);
            comm.all_reduce_sum_into(&self.buffers, &mut self.buffer_sum)?;
            replace_by_mean(&mut self.buffers, &self.buffer_sum, comm.world_size());
        }
        Ok(())
    }
}

impl MergeRule for Overlap {
    fn set_segments(&mut self, segments: &Segments) {
        self.segments = Some(segments.clone());
    }

    fn start(&mut self, initial: &[f32], _ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        self.anchor.start(initial);
        Ok(())
    }

    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        let rule = OverlapConfig::NAME;
        let lr = ctx.lr.filter(|lr| lr.is_finite() && *lr > 0.0).ok_or_else(|| RuleError::BadState {
            rule,
            reason: "the anchor momentum needs the learning rate of the step (none was given)".into(),
        })?;
        let n = params.len();
        if self.anchor.anchor().is_some_and(|z| z.len() != n) || self.momentum.as_ref().is_some_and(|m| m.len() != n) {
            let reason = format!("the anchor or its momentum does not have the model's {n} values");
            return Err(RuleError::BadState { rule, reason });
        }
        let split = super::split_for(rule, self.segments.as_ref(), n)?.into_owned();
        self.mean_of_buffers(params, &split, comm)?;
        if let Some(sum) = self.anchor.collect(comm)? {
            self.anchor.set_anchor(sum);
        }
        let z = self.anchor.started(rule)?;
        let (alpha, keep) = (self.pull as f32, 1.0 - self.pull as f32);
        params.iter_mut().zip(z).for_each(|(x, z)| *x = *x * keep + alpha * z);
        let (eta, inv_eta) = (lr as f32, (1.0 / lr) as f32);
        let momentum = match &mut self.momentum {
            Some(m) => {
                let gamma = self.anchor_momentum as f32;
                m.iter_mut()
                    .zip(params.iter())
                    .zip(z)
                    .for_each(|((m, x), z)| *m = *m * gamma - inv_eta * x + inv_eta * z);
                m
            }
            None => self.momentum.insert(params.iter().zip(z).map(|(x, z)| (x - z) / -eta).collect()),
        };
        let share = ctx.world_size as f32;
        let mut payload: Vec<f32> = z.iter().zip(momentum.iter()).map(|(z, m)| (z + -eta * m) / share).collect();
        // Buffers take the plain mean of their values before the merge: no pull, no momentum
        // (their share of the anchor's sum is unused).
        let mut means = &self.buffers[..];
        for (range, _) in split.iter().filter(|(_, part)| part.exact) {
            let (mean, rest) = means.split_at(range.len());
            means = rest;
            params[range.clone()].copy_from_slice(mean);
            momentum[range.clone()].fill(0.0);
            payload[range].iter_mut().zip(mean).for_each(|(p, x)| *p = x / share);
        }
        self.anchor.start_sum(payload, comm)?;
        Ok(MergeOutcome { local_squared_distance: None, trigger: None })
    }

    fn record(&self) -> StateRecord {
        self.anchor.record_into(StateRecord::new().with_held("momentum", self.momentum.as_ref()))
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.anchor.load(&mut record);
        self.momentum = record.take_buffer("momentum");
        super::no_leftovers(OverlapConfig::NAME, &record, "only `anchor`, `momentum` and `in-flight`")
    }
}

impl MatrixForm for Overlap {
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        Some(crate::comm::Traffic::ring_all_reduce(4 * values as u64, world_size) as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::comm::{CommError, InProcessGroup, PendingOp, PendingSum};
    use crate::launch::run_group;
    use crate::testing::{merge_trajectories, worker_buffer};

    /// The recurrence of the module documentation in `f64`, from the inputs of
    /// [`merge_trajectories`]: every worker's model after each merge.
    fn independent(m: usize, merges: usize, pull: f64, gamma: f64) -> Vec<Vec<Vec<f64>>> {
        let (n, eta) = (37, 0.1);
        let initial: Vec<f64> = worker_buffer(m, n).iter().map(|&v| f64::from(v)).collect();
        let mut x = vec![initial.clone(); m];
        let mut z = initial;
        let mut momentum: Vec<Option<Vec<f64>>> = vec![None; m];
        let mut payloads: Option<Vec<Vec<f64>>> = None;
        let mut history = vec![Vec::new(); m];
        for round in 0..merges {
            if let Some(p) = payloads.take() {
                z = (0..n).map(|k| p.iter().map(|p| p[k]).sum()).collect();
            }
            let mut next = Vec::new();
            for i in 0..m {
                let shift = worker_buffer(i + round, n);
                for k in 0..n {
                    x[i][k] += f64::from(shift[k] * 0.1);
                    x[i][k] = (1.0 - pull) * x[i][k] + pull * z[k];
                }
                let fresh: Vec<f64> = (0..n).map(|k| (z[k] - x[i][k]) / eta).collect();
                let mi = match momentum[i].take() {
                    Some(old) => old.iter().zip(&fresh).map(|(o, f)| gamma * o + f).collect(),
                    None => fresh,
                };
                next.push((0..n).map(|k| (z[k] - eta * mi[k]) / m as f64).collect());
                momentum[i] = Some(mi);
                history[i].push(x[i].clone());
            }
            payloads = Some(next);
        }
        history
    }

    fn close(got: &[Vec<Vec<u32>>], want: &[Vec<Vec<f64>>]) {
        for (i, (got, want)) in got.iter().zip(want).enumerate() {
            for (round, (got, want)) in got.iter().zip(want).enumerate() {
                for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
                    let g = f64::from(f32::from_bits(g));
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "worker {i} merge {round} value {k}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn merges_follow_the_recurrence() {
        let got = merge_trajectories(4, 6, None, || Box::new(Overlap::new(0.6, 0.7).unwrap()));
        close(&got, &independent(4, 6, 0.6, 0.7));
    }

    #[test]
    fn without_anchor_momentum_the_anchor_is_the_mean_of_the_pulled_models() {
        let got = merge_trajectories(4, 4, None, || Box::new(Overlap::new(0.5, 0.0).unwrap()));
        close(&got, &independent(4, 4, 0.5, 0.0));
        // The anchor each merge pulls towards is the mean of the models the previous merge left.
        let (x1, x2): (Vec<f64>, Vec<f64>) = (0..4)
            .map(|i| {
                let after_first = f64::from(f32::from_bits(got[i][0][5]));
                let after_second = f64::from(f32::from_bits(got[i][1][5]));
                let shift = f64::from(worker_buffer(i + 1, 37)[5] * 0.1);
                (after_first, (after_second - 0.5 * (after_first + shift)) / 0.5)
            })
            .unzip();
        let mean = x1.iter().sum::<f64>() / 4.0;
        assert!(x2.iter().all(|z| (z - mean).abs() < 1e-5), "anchor {x2:?}, mean {mean}");
    }

    #[test]
    fn a_checkpoint_with_the_sum_in_flight_resumes_bit_for_bit() {
        let make = || OverlapConfig::default().build(4).unwrap();
        assert_eq!(merge_trajectories(4, 6, Some(3), make), merge_trajectories(4, 6, None, make));
    }

    /// A communicator whose started sums may be collected only after `hidden_by` more local
    /// steps: waiting earlier is an error, so a rule that blocks on its sum fails at once.
    struct Gated<C> {
        inner: C,
        steps: Arc<AtomicU64>,
        hidden_by: u64,
    }

    struct GatedSum {
        inner: PendingSum,
        steps: Arc<AtomicU64>,
        release: u64,
    }

    impl PendingOp for GatedSum {
        fn is_ready(&mut self) -> Result<bool, CommError> {
            Ok(self.steps.load(Ordering::SeqCst) >= self.release && self.inner.is_ready()?)
        }
        fn wait(self: Box<Self>) -> Result<Vec<f32>, CommError> {
            let now = self.steps.load(Ordering::SeqCst);
            if now < self.release {
                return Err(CommError::Backend(format!(
                    "waited at step {now} for a sum hidden until {}",
                    self.release
                )));
            }
            self.inner.wait()
        }
    }

    impl<C: Communicator> Communicator for Gated<C> {
        // The blocking sums are left to the trait's defaults, which start a sum here and wait on
        // it: the gate holds them too.
        crate::forward_communicator!(self.inner =>
            rank, world_size, all_reduce_f64, broadcast, all_gather_bytes, exchange, exchange_directed, exchange_bytes,
            split, barrier
        );

        fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError> {
            let len = values.len();
            let inner = self.inner.start_all_reduce_sum(values)?;
            let release = self.steps.load(Ordering::SeqCst) + self.hidden_by;
            Ok(PendingSum::new(Box::new(GatedSum { inner, steps: Arc::clone(&self.steps), release }), len))
        }
    }

    /// Runs `merges` merges, τ local steps apart, of `make()` on `m` workers whose sums are
    /// hidden by τ steps.
    fn run_gated(
        m: usize,
        tau: u64,
        merges: u64,
        make: impl Fn() -> Box<dyn MergeRule> + Sync,
    ) -> Vec<Result<(), RuleError>> {
        let comms = InProcessGroup::new(m).into_communicators();
        run_group(comms, |rank, comm| -> Result<Result<(), RuleError>, RuleError> {
            let steps = Arc::new(AtomicU64::new(0));
            let mut comm = Gated { inner: comm, steps: Arc::clone(&steps), hidden_by: tau };
            let mut rule = make();
            let mut params = worker_buffer(rank, 9);
            let mut ctx =
                SyncContext { step: 0, round: 0, steps_since_sync: tau, lr: Some(0.1), rank, world_size: m, seed: 1 };
            rule.start(&params, &ctx, &mut comm)?;
            for round in 0..merges {
                for _ in 0..tau {
                    steps.fetch_add(1, Ordering::SeqCst);
                    params.iter_mut().for_each(|v| *v *= 0.99);
                }
                ctx.round = round;
                ctx.step = (round + 1) * tau;
                if let Err(error) = rule.merge(&mut params, &ctx, &mut comm) {
                    return Ok(Err(error));
                }
            }
            Ok(Ok(()))
        })
        .unwrap()
    }

    #[test]
    fn the_sum_travels_during_the_local_steps() {
        for result in run_gated(4, 2, 5, || Box::new(Overlap::new(0.6, 0.7).unwrap())) {
            assert!(result.is_ok(), "{result:?}");
        }
        for result in
            run_gated(4, 2, 5, || Box::new(crate::rules::elastic_overlap::ElasticOverlap::new(0.2, 4).unwrap()))
        {
            assert!(result.is_ok(), "{result:?}");
        }
        // A blocking rule waits for its sum at once: the gate catches it.
        let blocking = run_gated(4, 2, 2, || Box::new(crate::rules::elastic::Elastic::new(0.2, 4).unwrap()));
        assert!(blocking.iter().all(Result::is_err));
    }

    #[test]
    fn a_worker_lost_while_the_sum_travels_fails_the_others() {
        let comms = InProcessGroup::new(3).into_communicators();
        let results = run_group(comms, |rank, mut comm| -> Result<Result<(), RuleError>, RuleError> {
            let mut rule = Overlap::new(0.6, 0.7).unwrap();
            let mut params = worker_buffer(rank, 9);
            let mut ctx =
                SyncContext { step: 2, round: 0, steps_since_sync: 2, lr: Some(0.1), rank, world_size: 3, seed: 1 };
            rule.start(&params, &ctx, &mut comm)?;
            rule.merge(&mut params, &ctx, &mut comm)?;
            if rank == 2 {
                return Ok(Ok(())); // leaves while the second sum would be started
            }
            for round in 1..3 {
                ctx.round = round;
                if let Err(error) = rule.merge(&mut params, &ctx, &mut comm) {
                    return Ok(Err(error));
                }
            }
            Ok(Ok(()))
        })
        .unwrap();
        for result in &results[..2] {
            assert!(matches!(result, Err(RuleError::Comm(CommError::PeerLost { rank: 2 }))), "{result:?}");
        }
    }

    #[test]
    fn bad_settings_are_named() {
        assert_eq!(OverlapConfig { pull: Some(1.5), anchor_momentum: None }.build(4).err().unwrap().option, "pull");
        let error = OverlapConfig { pull: None, anchor_momentum: Some(1.0) }.build(4).err().unwrap();
        assert_eq!(error.option, "anchor-momentum");
        let error = Overlap::new(0.6, 1.0).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot restore the overlap rule's state: pull 0.6 must lie in (0, 1], anchor momentum 1 in [0, 1)"
        );
        assert!(Overlap::new(0.0, 0.7).is_err() && Overlap::new(f64::NAN, 0.7).is_err());
        let comms = InProcessGroup::new(1).into_communicators();
        let missing_lr = run_group(comms, |_, mut comm| -> Result<MergeOutcome, RuleError> {
            let mut rule = Overlap::new(0.6, 0.7).unwrap();
            let ctx = SyncContext { step: 2, round: 0, steps_since_sync: 2, lr: None, rank: 0, world_size: 1, seed: 1 };
            rule.start(&[1.0], &ctx, &mut comm)?;
            rule.merge(&mut [1.0], &ctx, &mut comm)
        });
        assert!(missing_lr.is_err());
    }
}
