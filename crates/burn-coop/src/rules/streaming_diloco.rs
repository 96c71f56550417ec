//! Streaming DiLoCo: DiLoCo one fragment of the model at a time, each fragment's all-reduce
//! travelling during the next local steps.
//!
//! Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a Distributed
//! Free Lunch", 2025 (arXiv 2501.18512); the order of operations follows torchft's
//! implementation (`torchft/local_sgd.py`: `DiLoCo` with `model_fragments`,
//! `fragment_sync_delay`, `fragment_update_alpha`). The model is split into `P` fragments
//! (`--fragments`): runs of whole tensors in buffer order, each ending at the tensor boundary
//! nearest its share `(p + 1) n / P` of the values (the paper's sequential pattern; its strided pattern needs layers, which a flat buffer
//! does not know). Every worker keeps the synchronized model `x_sync` and one outer optimizer
//! ([`crate::rules::outer`], DiLoCo's Nesterov momentum by default) whose state is per value,
//! so every fragment has its own. Merges come every τ local steps and handle one fragment each,
//! `f = k mod P` at merge `k`: a fragment is synchronized every `P·τ` steps, and a merge moves
//! `1/P` of the model.
//!
//! At the merge that synchronizes fragment `f`, with `x_f` this worker's values of it:
//!
//! ```text
//! x̄_f = mean_i x_{i,f}                                  (sum all-reduce of the fragment)
//! g_f = x_sync,f − x̄_f ;  x_sync,f ← OuterStep(x_sync,f, g_f)   (the fragment's own step count)
//! x_f ← α · x_f' + (1 − α) · x_sync,f                    (`--fragment-alpha`)
//! ```
//!
//! Without overlap (`--fragment-overlap false`) all of it happens at the merge and `x_f' = x_f`.
//! With overlap (the default) the all-reduce of `x_f` starts at the merge, travels during the
//! next τ local steps, and is collected at the next merge, where the outer step is taken and
//! `x_f'` is the fragment's values then, after those τ steps: with `α = 0` those steps of the
//! fragment are replaced by the new synchronized values, with `α = 1/2` (the default with
//! overlap, the value of the paper's overlap experiments) half of them are kept. torchft lets
//! the all-reduce travel for `fragment_sync_delay < τ` steps; here it travels for exactly τ (one
//! merge period), since merges are where a rule runs. Buffers (BatchNorm statistics, the exact
//! segments given by [`MergeRule::set_segments`]) take the plain mean instead of an outer step
//! (then the same mixing). With one fragment, no overlap and `α = 0` this is [`DiLoCo`] bit for
//! bit. A checkpoint taken while a fragment travels saves the fragment and its payload; the
//! resumed run starts the same all-reduce again at its first merge. With `--compressor` an
//! elementwise quantizer (`bf16`, `fp16`, `int8`, `fp8`), a fragment's pseudo-gradients
//! `x_sync − x_i` are summed by the quantized all-reduce (see [`StreamingDiLoCo::with_compressor`]).
//!
//! [`DiLoCo`]: crate::rules::diloco::DiLoCo

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::diloco::{DiLoCoConfig, OuterOptimizerName, describe_outer, quantizer};
use super::kernels::replace_by_mean;
use super::outer::OuterOptimizer;
use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext};
use crate::comm::{Communicator, PendingSum, Traffic};
use crate::compress::{CompressContext, Compressor, Segments};
use crate::registry::{RuleConfig, SpecError};
use crate::state::StateRecord;

/// `--rule streaming-diloco`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StreamingDiLoCoConfig {
    /// Number of fragments P ≥ 1 the model is split into, one synchronized per merge (default 4).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragments: Option<u64>,
    /// Whether a fragment's all-reduce travels during the next τ local steps (true/false;
    /// default true).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragment_overlap: Option<bool>,
    /// The share α in [0, 1] of a fragment's own values kept when the synchronized ones arrive
    /// (default 0.5 with overlap, 0 without).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragment_alpha: Option<f64>,
    /// The outer optimizer (shared `--outer-optimizer`, as for diloco).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_optimizer: Option<OuterOptimizerName>,
    /// The outer learning rate (shared `--outer-lr`).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// The outer momentum (shared `--outer-momentum`).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<f64>,
    /// Nesterov outer momentum (shared `--outer-nesterov`).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_nesterov: Option<bool>,
    /// Adam's β₂ (shared `--outer-beta2`).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_beta2: Option<f64>,
    /// Adam's ε (shared `--outer-eps`).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_eps: Option<f64>,
    /// How a fragment's pseudo-gradients travel (shared `--compressor`): dense by default; an
    /// elementwise quantizer (bf16, fp16, int8, fp8) sums them by a quantized all-reduce.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressor: Option<Compressor>,
}

impl StreamingDiLoCoConfig {
    fn fragments(&self) -> u64 {
        self.fragments.unwrap_or(4)
    }

    fn overlap(&self) -> bool {
        self.fragment_overlap.unwrap_or(true)
    }

    fn alpha(&self) -> f64 {
        self.fragment_alpha.unwrap_or(if self.overlap() { 0.5 } else { 0.0 })
    }

    /// The outer settings, as DiLoCo's (the same flags, the same checks).
    fn outer_settings(&self) -> DiLoCoConfig {
        DiLoCoConfig {
            outer_optimizer: self.outer_optimizer,
            outer_lr: self.outer_lr,
            outer_momentum: self.outer_momentum,
            outer_nesterov: self.outer_nesterov,
            outer_beta2: self.outer_beta2,
            outer_eps: self.outer_eps,
            compressor: self.compressor,
        }
    }
}

impl RuleConfig for StreamingDiLoCoConfig {
    const NAME: &'static str = "streaming-diloco";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let outer = self.outer_settings().outer()?;
        let rule = StreamingDiLoCo::new(self.fragments() as usize, self.overlap(), self.alpha(), outer)?;
        Ok(Box::new(rule.with_compressor(quantizer(self.compressor)?)))
    }

    fn describe(&self) -> String {
        let outer = self.outer_settings().outer().map_or_else(|e| e.to_string(), |o| describe_outer(&o));
        format!(
            "Streaming DiLoCo, {} fragments{}, alpha = {}, {outer}",
            self.fragments(),
            if self.overlap() { " overlapped" } else { "" },
            self.alpha()
        )
    }

    fn run_tag(&self) -> String {
        format!("streaming-diloco-p{}", self.fragments())
    }

    fn resolved(&self) -> Self {
        let outer = self.outer_settings().resolved();
        Self {
            fragments: Some(self.fragments()),
            fragment_overlap: Some(self.overlap()),
            fragment_alpha: Some(self.alpha()),
            outer_optimizer: outer.outer_optimizer,
            outer_lr: outer.outer_lr,
            outer_momentum: outer.outer_momentum,
            outer_nesterov: outer.outer_nesterov,
            outer_beta2: outer.outer_beta2,
            outer_eps: outer.outer_eps,
            compressor: self.compressor,
        }
    }
}

/// A fragment's all-reduce in flight: which fragment, this worker's payload (kept so that a
/// resumed run can start it again) and the pending sum.
#[derive(Debug)]
struct InFlight {
    fragment: usize,
    /// This worker's values of the fragment (dense: the sum travels), or, when `reduced`, the
    /// fragment's mean already reduced by the quantized all-reduce.
    payload: Vec<f32>,
    pending: Option<PendingSum>,
    reduced: bool,
}

/// Streaming DiLoCo; see the [module documentation](crate::rules::streaming_diloco).
#[derive(Debug)]
pub struct StreamingDiLoCo {
    fragments: usize,
    overlap: bool,
    alpha: f64,
    outer: OuterOptimizer,
    /// Outer steps taken on each fragment (Adam's bias correction).
    steps: Vec<u64>,
    /// Merges so far (merge `k` sends fragment `k mod P`).
    merges: u64,
    synced: Option<Vec<f32>>,
    in_flight: Option<InFlight>,
    segments: Option<Segments>,
    /// The fragments' ranges, from the split (computed at the first merge).
    ranges: Vec<Range<usize>>,
    sum: Vec<f32>,
    /// The quantizer of the pseudo-gradients' all-reduce (`None`: the values, dense).
    compressor: Option<Compressor>,
}

impl StreamingDiLoCo {
    /// Streaming DiLoCo with `fragments` ≥ 1 fragments, overlapped or not, mixing share `alpha`
    /// in [0, 1] and a checked outer optimizer ([`DiLoCoConfig::outer`]).
    pub fn new(fragments: usize, overlap: bool, alpha: f64, outer: OuterOptimizer) -> Result<Self, SpecError> {
        if fragments == 0 {
            return Err(SpecError::new("fragments", "0", "the model needs at least one fragment"));
        }
        if !(alpha.is_finite() && (0.0..=1.0).contains(&alpha)) {
            return Err(SpecError::new("fragment-alpha", alpha.to_string(), "the share kept lies in [0, 1]"));
        }
        Ok(Self {
            fragments,
            overlap,
            alpha,
            outer,
            steps: vec![0; fragments],
            merges: 0,
            synced: None,
            in_flight: None,
            segments: None,
            ranges: Vec::new(),
            sum: Vec::new(),
            compressor: None,
        })
    }

    /// Each fragment's pseudo-gradients `x_sync − x_i` summed by a quantized all-reduce in
    /// `compressor` (an elementwise quantizer) instead of its values by a dense one. The
    /// quantized all-reduce is built of neighbour exchanges and does not travel in the
    /// background: with overlap it runs when the fragment is sent, and its result is applied a
    /// merge later as the dense one's would be (the same algorithm; the time is not hidden).
    pub fn with_compressor(self, compressor: Option<Compressor>) -> Self {
        Self { compressor, ..self }
    }

    /// The mean of fragment `f`'s values over the workers by the quantized all-reduce of the
    /// pseudo-gradients: `x_sync − mean_i(x_sync − x_i)`.
    fn quantized_mean(
        &mut self,
        compressor: Compressor,
        f: usize,
        params: &[f32],
        ctx: &SyncContext,
        comm: &mut dyn Communicator,
    ) -> Result<Vec<f32>, RuleError> {
        let range = self.ranges[f].clone();
        let synced = &self.synced.as_ref().expect("started before any merge")[range.clone()];
        let mut g: Vec<f32> = synced.iter().zip(&params[range.clone()]).map(|(z, x)| z - x).collect();
        let whole = Segments::whole(params.len());
        let split = self.segments.as_ref().filter(|s| s.len() == params.len()).unwrap_or(&whole).slice(&range);
        let at = CompressContext { seed: ctx.seed, round: ctx.round, rank: ctx.rank };
        crate::comm::quantized_all_reduce_sum(comm, &mut g, compressor, Some(&split), at)?;
        let m = ctx.world_size as f32;
        Ok(synced.iter().zip(&g).map(|(z, g)| z - g / m).collect())
    }

    /// The fragments as ranges of a buffer of `n` values: runs of whole tensors of the split,
    /// fragment `p` ending at the tensor boundary nearest `(p + 1) n / P` values (equal runs of
    /// values without a split).
    fn split(&self, n: usize) -> Result<Vec<Range<usize>>, RuleError> {
        let split = super::split_for(StreamingDiLoCoConfig::NAME, self.segments.as_ref(), n)?;
        let p = self.fragments;
        if split.count() <= 1 {
            // No tensors to respect: equal runs of values.
            if n < p {
                let reason = format!("{p} fragments, but the model has only {n} values");
                return Err(RuleError::BadState { rule: StreamingDiLoCoConfig::NAME, reason });
            }
            return Ok((0..p).map(|f| (f * n).div_ceil(p)..((f + 1) * n).div_ceil(p)).collect());
        }
        let bounds: Vec<usize> = split.iter().map(|(range, _)| range.end).collect();
        if bounds.len() < p {
            let reason = format!("{p} fragments, but the model has only {} tensors", bounds.len());
            return Err(RuleError::BadState { rule: StreamingDiLoCoConfig::NAME, reason });
        }
        let mut ranges = Vec::with_capacity(p);
        let mut start = 0;
        for f in 0..p {
            let end = if f + 1 == p {
                n
            } else {
                let target = ((f + 1) * n).div_ceil(p);
                // The tensor boundary nearest the target (the earlier on a tie), leaving a tensor
                // to each later fragment.
                let last_allowed = bounds[bounds.len() - (p - f)];
                let candidates = bounds.iter().copied().filter(|&b| b > start && b <= last_allowed);
                candidates.min_by_key(|&b| b.abs_diff(target)).unwrap_or(last_allowed)
            };
            ranges.push(start..end);
            start = end;
        }
        Ok(ranges)
    }

    /// Whether the values `range` of the buffer are buffers (travel exact).
    fn exact_parts(&self, range: &Range<usize>) -> Vec<(Range<usize>, bool)> {
        match &self.segments {
            Some(split) if split.len() >= range.end => split
                .iter()
                .filter_map(|(r, part)| {
                    let (start, end) = (r.start.max(range.start), r.end.min(range.end));
                    (start < end).then_some((start..end, part.exact))
                })
                .collect(),
            _ => vec![(range.clone(), false)],
        }
    }

    /// The outer step of fragment `f` from the mean of its values (`mean`, replaced by the new
    /// synchronized values), then the mixing of `params`' values of it.
    fn finish(&mut self, f: usize, mean: &mut [f32], params: &mut [f32]) {
        let range = self.ranges[f].clone();
        let parts = self.exact_parts(&range);
        let synced = self.synced.as_mut().expect("started before any merge");
        self.steps[f] += 1;
        for (part, exact) in parts {
            let local = part.start - range.start..part.end - range.start;
            if exact {
                synced[part].copy_from_slice(&mean[local]);
            } else {
                self.outer.step(&mut mean[local], &mut synced[part.clone()], part, self.steps[f]);
            }
        }
        let values = &mut params[range];
        if self.alpha == 0.0 {
            values.copy_from_slice(mean);
        } else {
            let (keep, take) = (self.alpha as f32, (1.0 - self.alpha) as f32);
            values.iter_mut().zip(mean.iter()).for_each(|(x, g)| *x = keep * *x + take * g);
        }
    }
}

impl MergeRule for StreamingDiLoCo {
    fn set_segments(&mut self, segments: &Segments) {
        self.segments = Some(segments.clone());
        self.ranges.clear();
    }

    fn start(&mut self, initial: &[f32], _ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        if self.synced.is_none() {
            self.synced = Some(initial.to_vec());
        }
        Ok(())
    }

    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        let rule = StreamingDiLoCoConfig::NAME;
        let n = params.len();
        let synced_len = self
            .synced
            .as_ref()
            .map(Vec::len)
            .ok_or(RuleError::BadState { rule, reason: "the rule was not started with the initial model".into() })?;
        if synced_len != n || !self.outer.fits(n) {
            let reason = format!(
                "the synchronized model has {synced_len} values and the outer optimizer's state {}, but the model has {n}",
                self.outer.len()
            );
            return Err(RuleError::BadState { rule, reason });
        }
        if self.ranges.is_empty() {
            self.ranges = self.split(n)?;
        }
        self.outer.fit(n);
        // The fragment sent at the previous merge lands (started again first after a resume).
        if let Some(mut flight) = self.in_flight.take() {
            let mut mean = if flight.reduced {
                flight.payload
            } else {
                let pending = match flight.pending.take() {
                    Some(pending) => pending,
                    None => comm.start_all_reduce_sum(flight.payload.clone())?,
                };
                let mut sum = pending.wait()?;
                super::kernels::divide(&mut sum, ctx.world_size);
                sum
            };
            self.finish(flight.fragment, &mut mean, params);
        }
        let f = (self.merges % self.fragments as u64) as usize;
        self.merges += 1;
        let range = self.ranges[f].clone();
        if let Some(compressor) = self.compressor {
            let mut mean = self.quantized_mean(compressor, f, params, ctx, comm)?;
            if self.overlap {
                self.in_flight = Some(InFlight { fragment: f, payload: mean, pending: None, reduced: true });
            } else {
                self.finish(f, &mut mean, params);
            }
            return Ok(MergeOutcome { local_squared_distance: None, trigger: None });
        }
        if self.overlap {
            let payload = params[range].to_vec();
            let pending = comm.start_all_reduce_sum(payload.clone())?;
            self.in_flight = Some(InFlight { fragment: f, payload, pending: Some(pending), reduced: false });
            return Ok(MergeOutcome { local_squared_distance: None, trigger: None });
        }
        // Blocking: the fragment's mean now, as DiLoCo computes it (its distance measured in the
        // same pass), then the outer step.
        self.sum.resize(range.len(), 0.0);
        comm.all_reduce_sum_into(&params[range.clone()], &mut self.sum)?;
        let mut mean = params[range].to_vec();
        let local = replace_by_mean(&mut mean, &self.sum, ctx.world_size);
        self.finish(f, &mut mean, params);
        let whole = self.fragments == 1;
        Ok(MergeOutcome { local_squared_distance: whole.then_some(local), trigger: None })
    }

    fn measures_consensus(&self) -> bool {
        self.fragments == 1 && !self.overlap && self.compressor.is_none()
    }

    fn reaches_consensus(&self) -> bool {
        self.fragments == 1 && !self.overlap && self.alpha == 0.0
    }

    fn record(&self) -> StateRecord {
        let mut record = self.outer.record_into(StateRecord::new().with_held("synced", self.synced.as_ref()));
        record = record.with_scalar("merges", self.merges as f64);
        for (p, steps) in self.steps.iter().enumerate() {
            record = record.with_scalar(&format!("fragment-{p}-steps"), *steps as f64);
        }
        if let Some(flight) = &self.in_flight {
            let key = if flight.reduced { "in-flight-mean" } else { "in-flight" };
            record = record
                .with_scalar("in-flight-fragment", flight.fragment as f64)
                .with_buffer(key, flight.payload.clone());
        }
        record
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        let bad = |reason: String| RuleError::BadState { rule: StreamingDiLoCoConfig::NAME, reason };
        self.synced = record.take_buffer("synced");
        self.outer.load(&mut record);
        self.merges = record.take_scalar("merges").unwrap_or(0.0) as u64;
        for p in 0..self.fragments {
            self.steps[p] = record.take_scalar(&format!("fragment-{p}-steps")).unwrap_or(0.0) as u64;
        }
        let (sent, reduced) = (record.take_buffer("in-flight"), record.take_buffer("in-flight-mean"));
        let was_reduced = reduced.is_some();
        self.in_flight = match (record.take_scalar("in-flight-fragment"), sent.or(reduced)) {
            (Some(f), Some(payload)) if (f as usize) < self.fragments => {
                Some(InFlight { fragment: f as usize, payload, pending: None, reduced: was_reduced })
            }
            (None, None) => None,
            (f, payload) => {
                let reason = format!(
                    "an in-flight fragment {f:?} with {} values does not fit {} fragments",
                    payload.map_or(0, |p| p.len()),
                    self.fragments
                );
                return Err(bad(reason));
            }
        };
        super::no_leftovers(
            StreamingDiLoCoConfig::NAME,
            &record,
            "`synced`, the outer optimizer's state, the fragments' step counts and the fragment in flight",
        )
    }
}

impl MatrixForm for StreamingDiLoCo {
    /// One all-reduce of one fragment per merge: on average `1/P` of the model.
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        Some(match self.compressor {
            None => Traffic::ring_all_reduce(4 * values as u64, world_size) as f64 / self.fragments as f64,
            Some(compressor) => {
                let whole = Segments::whole(values);
                let split = self.segments.as_ref().filter(|s| s.len() == values).unwrap_or(&whole);
                let ranges = self.split(values).ok()?;
                let total: f64 = ranges
                    .iter()
                    .map(|range| crate::comm::quantized_all_reduce_bytes(compressor, &split.slice(range), world_size))
                    .sum();
                total / self.fragments as f64
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Segment;
    use crate::rules::diloco::DiLoCo;
    use crate::rules::outer::OuterKind;
    use crate::testing::{merge_trajectories, worker_buffer};

    fn nesterov() -> OuterOptimizer {
        OuterOptimizer::new(0.7, OuterKind::Momentum { beta: 0.9, nesterov: true })
    }

    #[test]
    fn one_fragment_without_overlap_is_diloco_bit_for_bit() {
        let streaming = merge_trajectories(4, 6, None, || StreamingDiLoCo::new(1, false, 0.0, nesterov()).unwrap());
        let diloco = merge_trajectories(4, 6, None, || DiLoCo::new(0.7, 0.9, true).unwrap());
        assert_eq!(streaming, diloco);
    }

    /// The recurrence of the module documentation in `f64` for the inputs of
    /// [`merge_trajectories`] (37 values, worker `r` moved by `worker_buffer(r + k) · 0.1`
    /// before merge `k`), momentum SGD as the outer step, the fragments given by `ranges`.
    fn reference(m: usize, merges: usize, ranges: &[Range<usize>], overlap: bool, alpha: f64) -> Vec<Vec<Vec<f64>>> {
        let (n, lr, beta) = (37, 0.7, 0.9);
        let start: Vec<f64> = worker_buffer(m, n).iter().map(|&v| f64::from(v)).collect();
        let mut x = vec![start.clone(); m];
        let (mut z, mut u) = (start, vec![0.0; n]);
        let mut flight: Option<(usize, Vec<Vec<f64>>)> = None;
        let mut history = vec![Vec::new(); m];
        let outer_and_mix = |f: usize, sent: &[Vec<f64>], x: &mut Vec<Vec<f64>>, z: &mut Vec<f64>, u: &mut Vec<f64>| {
            for k in ranges[f].clone() {
                let mean = sent.iter().map(|s| s[k]).sum::<f64>() / m as f64;
                let g = z[k] - mean;
                u[k] = beta * u[k] + g;
                z[k] -= lr * (beta * u[k] + g);
                for xi in x.iter_mut() {
                    xi[k] = alpha * xi[k] + (1.0 - alpha) * z[k];
                }
            }
        };
        for round in 0..merges {
            for (r, xi) in x.iter_mut().enumerate() {
                let shift = worker_buffer(r + round, n);
                xi.iter_mut().zip(&shift).for_each(|(v, s)| *v += f64::from(s * 0.1));
            }
            if let Some((f, sent)) = flight.take() {
                outer_and_mix(f, &sent, &mut x, &mut z, &mut u);
            }
            let f = round % ranges.len();
            if overlap {
                flight = Some((f, x.clone()));
            } else {
                let sent = x.clone();
                outer_and_mix(f, &sent, &mut x, &mut z, &mut u);
            }
            for (r, xi) in x.iter().enumerate() {
                history[r].push(xi.clone());
            }
        }
        history
    }

    fn close(got: &[Vec<Vec<u32>>], want: &[Vec<Vec<f64>>]) {
        for (r, (g, w)) in got.iter().zip(want).enumerate() {
            for (k, (g, w)) in g.iter().zip(w).enumerate() {
                for (i, (g, w)) in g.iter().zip(w).enumerate() {
                    let g = f64::from(f32::from_bits(*g));
                    assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "worker {r}, merge {k}, value {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn fragments_follow_the_independent_recurrence() {
        // Without a split the buffer of 37 values is cut at ⌈37 p / P⌉.
        for (fragments, overlap, alpha) in [(3, false, 0.0), (3, true, 0.5), (2, true, 0.0), (1, true, 0.25)] {
            let rule = StreamingDiLoCo::new(fragments, overlap, alpha, nesterov()).unwrap();
            let ranges = rule.split(37).unwrap();
            let got =
                merge_trajectories(3, 7, None, || StreamingDiLoCo::new(fragments, overlap, alpha, nesterov()).unwrap());
            close(&got, &reference(3, 7, &ranges, overlap, alpha));
            // A checkpoint in the middle, with a fragment in flight, continues bit for bit.
            let resumed = merge_trajectories(3, 7, Some(4), || {
                StreamingDiLoCo::new(fragments, overlap, alpha, nesterov()).unwrap()
            });
            assert_eq!(resumed, got, "P = {fragments}, overlap {overlap}");
        }
    }

    #[test]
    fn fragments_are_runs_of_whole_tensors_of_about_equal_size() {
        let mut rule = StreamingDiLoCo::new(3, true, 0.5, nesterov()).unwrap();
        assert_eq!(rule.split(37).unwrap(), vec![0..13, 13..25, 25..37]);
        let tensors = [10, 2, 30, 4, 4, 50];
        rule.set_segments(&Segments::new(tensors.iter().map(|&len| Segment { len, exact: len == 4 })));
        // 100 values: boundaries at 10, 12, 42, 46, 50, 100; targets 34 (nearest 42) and 67
        // (nearest 50, as the last fragment keeps at least its one tensor).
        let ranges = rule.split(100).unwrap();
        assert_eq!(ranges, vec![0..42, 42..50, 50..100]);
        assert_eq!(rule.exact_parts(&(42..50)), vec![(42..46, true), (46..50, true)]);
        let mut many = StreamingDiLoCo::new(7, true, 0.5, nesterov()).unwrap();
        many.set_segments(&Segments::new(tensors.iter().map(|&len| Segment { len, exact: false })));
        assert!(matches!(many.split(100), Err(RuleError::BadState { .. })), "7 fragments of 6 tensors");
    }

    #[test]
    fn quantized_fragments_stay_near_the_dense_ones_and_resume() {
        for overlap in [false, true] {
            let make = |c: Option<Compressor>| {
                move || StreamingDiLoCo::new(3, overlap, 0.5, nesterov()).unwrap().with_compressor(c)
            };
            let quantized = merge_trajectories(4, 7, None, make(Some(Compressor::Int8)));
            let dense = merge_trajectories(4, 7, None, make(None));
            for (q, d) in quantized[0].last().unwrap().iter().zip(dense[0].last().unwrap()) {
                let (q, d) = (f32::from_bits(*q), f32::from_bits(*d));
                assert!((q - d).abs() < 0.05, "overlap {overlap}: {q} vs {d}");
            }
            assert_ne!(quantized, dense);
            assert_eq!(merge_trajectories(4, 7, Some(4), make(Some(Compressor::Int8))), quantized, "resumed");
            let measured = crate::testing::measured_bytes_per_merge(4, 60, 3, make(Some(Compressor::Int8)));
            assert_eq!(make(Some(Compressor::Int8))().expected_bytes_per_merge(60, 4), Some(measured));
        }
    }

    #[test]
    fn a_merge_moves_one_fragment_and_bad_settings_are_named() {
        let bytes = |fragments| {
            let make = || {
                let rule: Box<dyn CooperativeRule> =
                    Box::new(StreamingDiLoCo::new(fragments, true, 0.5, nesterov()).unwrap());
                rule
            };
            crate::testing::measured_bytes_per_merge(4, 40, 4, make)
        };
        // 40 values in 4 fragments of 10: a quarter of DiLoCo's all-reduce per merge.
        assert_eq!(bytes(4), Traffic::ring_all_reduce(4 * 10, 4) as f64);
        assert_eq!(bytes(1), Traffic::ring_all_reduce(4 * 40, 4) as f64);
        assert_eq!(StreamingDiLoCo::new(0, true, 0.5, nesterov()).unwrap_err().option, "fragments");
        assert_eq!(StreamingDiLoCo::new(2, true, 1.5, nesterov()).unwrap_err().option, "fragment-alpha");
        let config = StreamingDiLoCoConfig { outer_eps: Some(1e-6), ..StreamingDiLoCoConfig::default() };
        assert_eq!(config.build(4).err().unwrap().option, "outer-eps");
        let resolved =
            StreamingDiLoCoConfig { fragment_overlap: Some(false), ..StreamingDiLoCoConfig::default() }.resolved();
        assert_eq!((resolved.fragments, resolved.fragment_alpha, resolved.outer_lr), (Some(4), Some(0.0), Some(0.7)));
    }
}
