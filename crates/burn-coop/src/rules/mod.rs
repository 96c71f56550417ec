//! Merge rules: what happens to the workers' models at a synchronization step.
//!
//! Every rule is one mixing matrix `W` of Cooperative SGD applied through a [`Transport`]:
//!
//! | rule | `W` | anchors | file |
//! |---|---|---|---|
//! | [`PeriodicAveraging`] (local SGD, FedAvg; synchronous SGD at τ = 1) | `J = 11ᵀ/m` | 0 | `averaging.rs` |
//! | [`ElasticAveraging`] (EASGD) | `[[(1−α)I, α1], [α1ᵀ, 1−mα]]` | 1 | `elastic.rs` |
//! | [`Gossip`] (decentralized periodic averaging; D-PSGD at τ = 1) | a topology's `W` | 0 | `gossip.rs` |

mod averaging;
mod elastic;
mod gossip;

pub use averaging::PeriodicAveraging;
pub use elastic::ElasticAveraging;
pub use gossip::Gossip;

use serde::{Deserialize, Serialize};

use crate::mixing::MixingMatrix;
use crate::transport::{Transport, TransportError};

/// Why a rule cannot run with the given configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// EASGD's moving rate outside the stable range.
    #[error(
        "elastic averaging needs 0 < α < 2/(m+1) = {upper:.6} for m = {workers} workers (stability of the (m+1)x(m+1) mixing matrix), got α = {alpha}"
    )]
    ElasticAlphaOutOfRange {
        /// The α given.
        alpha: f64,
        /// Number of workers.
        workers: usize,
        /// The exclusive upper bound `2/(m+1)`.
        upper: f64,
    },
    /// The rule was built for a different number of workers than the transport has.
    #[error("the {rule} rule was built for {expected} workers but the transport has {found}")]
    WorldSizeMismatch {
        /// Rule name.
        rule: &'static str,
        /// Workers the rule expects.
        expected: usize,
        /// Workers the transport has.
        found: usize,
    },
    /// Saved state that does not fit the rule.
    #[error("cannot restore the {rule} rule's state: {reason}")]
    BadState {
        /// Rule name.
        rule: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What a merge measured on this worker.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MergeOutcome {
    /// This worker's squared distance to the average model before the merge, `‖x_i − x̄‖²`,
    /// when the rule measured it. Its mean over workers is the consensus distance:
    /// [`LocalSgd`](crate::LocalSgd) reduces it together with its other per-merge statistics in
    /// one small collective; standalone callers use [`MergeOutcome::consensus_distance`].
    pub local_squared_distance: Option<f64>,
}

impl MergeOutcome {
    /// The mean over workers of [`MergeOutcome::local_squared_distance`] (`None` when the rule
    /// did not measure it). One scalar all-reduce: every worker must call it.
    pub fn consensus_distance(&self, transport: &mut dyn Transport) -> Result<Option<f64>, TransportError> {
        self.local_squared_distance.map(|local| consensus_from_local(local, transport)).transpose()
    }
}

/// A rule's own state, saved with checkpoints.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RuleState {
    /// The anchor (center) model of rules that keep one.
    pub anchor: Option<Vec<f32>>,
}

/// One synchronization rule of Cooperative SGD, applied to a worker's flat parameter buffer.
///
/// All workers call [`MergeRule::merge`] at the same steps; the rule talks to the others only
/// through the transport, so it runs unchanged over threads or MPI.
pub trait MergeRule: Send {
    /// A short name for logs and metrics (`"averaging"`, `"elastic"`, `"gossip"`).
    fn name(&self) -> &'static str;

    /// Checks that the rule can run with `world_size` workers.
    fn validate(&self, world_size: usize) -> Result<(), RuleError>;

    /// Called once with the initial parameters before the first local step.
    fn start(&mut self, _initial: &[f32]) {}

    /// Replaces `params` (this worker's model) by its merged value.
    fn merge(&mut self, params: &mut [f32], transport: &mut dyn Transport) -> Result<MergeOutcome, TransportError>;

    /// The rule's mixing matrix for `world_size` workers (`(m+v) × (m+v)` with `v` anchors).
    fn mixing_matrix(&self, world_size: usize) -> MixingMatrix;

    /// The rule's state to checkpoint.
    fn export_state(&self) -> RuleState {
        RuleState::default()
    }

    /// Restores state produced by [`MergeRule::export_state`].
    fn import_state(&mut self, state: RuleState) -> Result<(), RuleError> {
        match state.anchor {
            None => Ok(()),
            Some(_) => Err(RuleError::BadState { rule: self.name(), reason: "this rule keeps no anchor".into() }),
        }
    }
}

/// Sums a worker's squared distance across workers and divides by `m`: the consensus distance.
fn consensus_from_local(local: f64, transport: &mut dyn Transport) -> Result<f64, TransportError> {
    let mut total = [local];
    transport.all_reduce_f64(&mut total)?;
    Ok(total[0] / transport.world_size() as f64)
}

/// Lanes of the independent partial sums below: enough for the compiler to keep a vector
/// register busy instead of waiting on one serial f64 accumulator.
const LANES: usize = 16;
/// Elements summed in f32 before the partial sums are folded into f64.
const BLOCK: usize = 2048;

/// `Σ_k f(x_k, y_k)`, accumulated in f32 lanes per block and in f64 across blocks.
#[inline(always)]
fn lane_sum(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    debug_assert_eq!(x.len(), y.len());
    let mut total = 0.0;
    for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
        let mut acc = [0.0f32; LANES];
        let (xs, ys) = (xb.chunks_exact(LANES), yb.chunks_exact(LANES));
        let tail: f32 = xs.remainder().iter().zip(ys.remainder()).map(|(&x, &y)| f(x, y)).sum();
        for (xl, yl) in xs.zip(ys) {
            for l in 0..LANES {
                acc[l] += f(xl[l], yl[l]);
            }
        }
        total += f64::from(tail) + acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    total
}

/// The mean `s / m` of an element-wise sum over `m` workers, rounded as
/// [`ReduceOp::Mean`](crate::transport::ReduceOp::Mean) rounds it (for a power of two, the
/// multiplication by `1/m` is exact and equal to the division).
#[derive(Debug, Clone, Copy)]
enum MeanOf {
    /// Multiply by `1/m`.
    Scale(f32),
    /// Divide by `m`.
    Divide(f32),
}

impl MeanOf {
    fn workers(m: usize) -> Self {
        if m.is_power_of_two() { Self::Scale(1.0 / m as f32) } else { Self::Divide(m as f32) }
    }

    /// `‖x − s/m‖²`.
    fn distance(self, x: &[f32], s: &[f32]) -> f64 {
        match self {
            Self::Scale(inv) => lane_sum(x, s, |x, s| (x - s * inv) * (x - s * inv)),
            Self::Divide(m) => lane_sum(x, s, |x, s| (x - s / m) * (x - s / m)),
        }
    }

    /// `out ← s/m`.
    fn write(self, out: &mut [f32], s: &[f32]) {
        match self {
            Self::Scale(inv) => out.iter_mut().zip(s).for_each(|(o, s)| *o = s * inv),
            Self::Divide(m) => out.iter_mut().zip(s).for_each(|(o, s)| *o = s / m),
        }
    }
}

/// `‖x_i − x̄‖²` for this worker's `params` and the workers' element-wise `sum` (`x̄ = sum/m`),
/// then `params ← replacement(x̄ block)`, block by block so each block is read from cache the
/// second time: one pass over memory.
fn distance_to_mean_then(
    params: &mut [f32],
    sum: &[f32],
    m: usize,
    mut replace: impl FnMut(MeanOf, &mut [f32], &[f32], usize),
) -> f64 {
    let mean = MeanOf::workers(m);
    let mut total = 0.0;
    for (block, (xb, sb)) in params.chunks_mut(BLOCK).zip(sum.chunks(BLOCK)).enumerate() {
        total += mean.distance(xb, sb);
        replace(mean, xb, sb, block * BLOCK);
    }
    total
}

/// Replaces `params` by the mean `sum/m` and returns `‖params − mean‖²` from before.
pub(crate) fn replace_by_mean(params: &mut [f32], sum: &[f32], m: usize) -> f64 {
    distance_to_mean_then(params, sum, m, |mean, xb, sb, _| mean.write(xb, sb))
}

/// `‖params − sum/m‖²`, then `params ← replacement`.
pub(crate) fn distance_to_mean_then_replace(params: &mut [f32], sum: &[f32], m: usize, replacement: &[f32]) -> f64 {
    distance_to_mean_then(params, sum, m, |_, xb, _, start| xb.copy_from_slice(&replacement[start..start + xb.len()]))
}

/// `‖x − s/m‖²` without changing `x` (`s` the workers' element-wise sum of something whose
/// mean `x` is compared with).
pub(crate) fn distance_to_mean(x: &[f32], s: &[f32], m: usize) -> f64 {
    MeanOf::workers(m).distance(x, s)
}

/// The consensus distance `(1/m) Σ_i ‖x_i − x̄‖²` of the workers' current `params`
/// (one all-reduce of the buffer and one of a scalar). All workers must call it.
pub fn consensus_distance(params: &[f32], transport: &mut dyn Transport) -> Result<f64, TransportError> {
    let mut sum = vec![0.0; params.len()];
    transport.all_reduce(params, &mut sum, crate::transport::ReduceOp::Sum)?;
    consensus_from_local(distance_to_mean(params, &sum, transport.world_size()), transport)
}

impl<R: MergeRule + ?Sized> MergeRule for Box<R> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn validate(&self, world_size: usize) -> Result<(), RuleError> {
        (**self).validate(world_size)
    }
    fn start(&mut self, initial: &[f32]) {
        (**self).start(initial)
    }
    fn merge(&mut self, params: &mut [f32], transport: &mut dyn Transport) -> Result<MergeOutcome, TransportError> {
        (**self).merge(params, transport)
    }
    fn mixing_matrix(&self, world_size: usize) -> MixingMatrix {
        (**self).mixing_matrix(world_size)
    }
    fn export_state(&self) -> RuleState {
        (**self).export_state()
    }
    fn import_state(&mut self, state: RuleState) -> Result<(), RuleError> {
        (**self).import_state(state)
    }
}
