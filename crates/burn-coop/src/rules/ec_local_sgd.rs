//! Local SGD with error-compensated double compression (`ec-local-sgd`), and compressed
//! periodic averaging (`average --compressor`).
//!
//! Every worker keeps the last synchronized model `x_s` (the same on every worker). At a merge,
//! with `Δ_i = x_i − x_s` the worker's change since then (its learning rates included):
//!
//! ```text
//! p_i = Δ_i + e_i            c_i = C(p_i)          e_i ← p_i − c_i        (worker i)
//! c̄   = (1/m) Σ_j c_j        p = c̄ + e            c = C_s(p)   e ← p − c  (the "server")
//! x_s ← x_s + c ;  x_i ← x_s                                              (every worker)
//! ```
//!
//! (Gao, Xu & Huang, "On the Convergence of Communication-Efficient Local SGD for Federated
//! Learning", AAAI 2021: local SGD with error-compensated double compression; the two-pass
//! error-compensated scheme is DoubleSqueeze's, Tang et al., ICML 2019.) The workers' payloads
//! travel by an all-gather; the server's side is computed identically on every worker from the
//! same payloads in rank order (random compressors draw from the shared seed, the round and a
//! server rank `m`), so no server process exists and every worker ends with the same `x_s`. An
//! all-gather hands every worker every `c_j`, so the second compression saves no bytes here; it
//! keeps the paper's algorithm (`--server-compressor identity` turns it off: `e` stays zero).
//! The momentum variant is the local optimizer's momentum (`--momentum β`, kept by each worker
//! across merges, `--inner-state keep-local`): the learning rate and the momentum are inside
//! `Δ_i`, so the compressed change is the one the worker's momentum steps made. (The paper's
//! own text was not available to check this placement; this is the placement of
//! error-feedback momentum SGD, Zheng, Huang & Kwok, NeurIPS 2019.)
//!
//! Compression acts on each tensor of the model on its own (its own scale, norm or top-k share)
//! and leaves buffers (BatchNorm running statistics) exact, as the
//! [`Synchronizer`](crate::Synchronizer) tells the rule with [`MergeRule::set_segments`]: their
//! changes travel as `f32`, so they end as plain averaging leaves them (to rounding) and their
//! error memories stay zero (see [`Segments`]).
//!
//! Without error feedback (`average --compressor C`) the memories stay zero:
//! `x_s ← x_s + (1/m) Σ_j C(x_j − x_s)`, plain averaging of compressed changes. With an
//! elementwise quantizer (`bf16`, `fp16`, `int8`, `fp8`) the sum travels by a quantized
//! all-reduce ([`crate::comm::quantized_all_reduce_sum`]: each worker sends `2(m − 1)/m` of the
//! quantized changes instead of `m − 1` of them, every hop rounding its partial sum again).
//!
//! The identity compressor is lossless: then `c_i = Δ_i`, the memories stay zero and the merge
//! is the mean of the models, which the rule computes directly with averaging's sum all-reduce
//! of the models (the bits of `--rule average`, and a ring all-reduce's bytes instead of an
//! all-gather's). The invariant of error feedback, `Σ_rounds c_i + e_i = Σ_rounds Δ_i` (what
//! was sent plus what is left equals what was meant to be sent), is tested to rounding.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::kernels::{divide, replace_by_mean};
use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext};
use crate::comm::{Communicator, Traffic};
use crate::compress::{CompressContext, Compressor, Segments};
use crate::registry::{RuleConfig, SpecError, serde_name};
use crate::state::StateRecord;

/// The workers' compressor when none is given: the largest 1% of the values.
pub const DEFAULT_COMPRESSOR: Compressor = Compressor::TopK(0.01);

/// `--rule ec-local-sgd`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct EcLocalSgdConfig {
    /// The workers' compressor (the shared `--compressor` flag; default topk:0.01).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressor: Option<Compressor>,
    /// The second ("server") compressor of the averaged message (default: the workers').
    #[arg(long, value_parser = serde_name::<Compressor>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_compressor: Option<Compressor>,
}

impl EcLocalSgdConfig {
    fn workers(&self) -> Compressor {
        self.compressor.unwrap_or(DEFAULT_COMPRESSOR)
    }

    fn server(&self) -> Compressor {
        self.server_compressor.unwrap_or(self.workers())
    }
}

impl RuleConfig for EcLocalSgdConfig {
    const NAME: &'static str = "ec-local-sgd";

    fn build(&self, _world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        Ok(Box::new(EcLocalSgd::new(self.workers(), self.server())))
    }

    fn describe(&self) -> String {
        format!("error-compensated local SGD, {} then {}", self.workers(), self.server())
    }

    fn run_tag(&self) -> String {
        format!("ec-{}", self.workers()).replace(':', "")
    }

    fn resolved(&self) -> Self {
        Self { compressor: Some(self.workers()), server_compressor: Some(self.server()) }
    }
}

/// Local SGD whose merges send compressed model changes; see the
/// [module documentation](crate::rules::ec_local_sgd).
#[derive(Debug, Clone)]
pub struct EcLocalSgd {
    worker: Compressor,
    server: Compressor,
    error_feedback: bool,
    segments: Option<Segments>,
    synced: Option<Vec<f32>>,
    worker_error: Vec<f32>,
    server_error: Vec<f32>,
    meant: Vec<f32>,
    payload: Vec<u8>,
    decoded: Vec<f32>,
    mean: Vec<f32>,
}

impl EcLocalSgd {
    /// Error-compensated double compression: `worker` on each worker's change, `server` on
    /// their average, each with its error memory.
    pub fn new(worker: Compressor, server: Compressor) -> Self {
        Self::build(worker, server, true)
    }

    /// Averaging of changes compressed by `compressor`, without error memories.
    pub fn without_error_feedback(compressor: Compressor) -> Self {
        Self::build(compressor, Compressor::Identity, false)
    }

    fn build(worker: Compressor, server: Compressor, error_feedback: bool) -> Self {
        Self {
            worker,
            server,
            error_feedback,
            segments: None,
            synced: None,
            worker_error: Vec::new(),
            server_error: Vec::new(),
            meant: Vec::new(),
            payload: Vec::new(),
            decoded: Vec::new(),
            mean: Vec::new(),
        }
    }

    /// Whether the merge is the lossless one (the models' mean by a sum all-reduce).
    fn lossless(&self) -> bool {
        self.worker.is_lossless() && self.server.is_lossless()
    }

    /// Whether the merge is a quantized all-reduce of the changes: averaging without memories
    /// by an elementwise quantizer (`bf16`, `fp16`, `int8`, `fp8`), whose decoded values can be
    /// summed hop by hop.
    fn reduces(&self) -> bool {
        !self.error_feedback && !self.worker.is_lossless() && self.worker.is_elementwise()
    }

    /// This worker's error memory (zeros before the first merge).
    pub fn worker_error(&self) -> &[f32] {
        &self.worker_error
    }

    /// The server side's error memory (zeros before the first merge).
    pub fn server_error(&self) -> &[f32] {
        &self.server_error
    }

    /// The registry's name of the rule: `ec-local-sgd` with error feedback, `average` (with a
    /// compressor) without.
    fn registry_name(&self) -> &'static str {
        if self.error_feedback { EcLocalSgdConfig::NAME } else { super::AveragingConfig::NAME }
    }

    fn bad_state(&self, reason: String) -> RuleError {
        RuleError::BadState { rule: self.registry_name(), reason }
    }

    /// The compressed merge: every payload gathered, the server's side computed, `x_s` moved.
    fn compressed_merge(
        &mut self,
        params: &[f32],
        ctx: &SyncContext,
        comm: &mut dyn Communicator,
    ) -> Result<(), RuleError> {
        let n = params.len();
        let m = ctx.world_size;
        let segments = super::split_for(self.registry_name(), self.segments.as_ref(), n)?;
        let reduces = self.reduces();
        let synced = self.synced.as_mut().expect("checked by merge");
        // Memories only where they can hold something (a checkpoint keeps what exists).
        if self.error_feedback {
            self.worker_error.resize(n, 0.0);
        }
        if self.error_feedback && !self.server.is_lossless() {
            self.server_error.resize(n, 0.0);
        }
        self.meant.clear();
        if self.error_feedback {
            self.meant.extend(params.iter().zip(synced.iter()).zip(&self.worker_error).map(|((x, z), e)| (x - z) + e));
        } else {
            self.meant.extend(params.iter().zip(synced.iter()).map(|(x, z)| x - z));
        }
        let at = |rank: usize| CompressContext { seed: ctx.seed, round: ctx.round, rank };
        if reduces {
            // Compressed averaging by an elementwise quantizer: the changes' sum by a quantized
            // all-reduce, no memories.
            crate::comm::quantized_all_reduce_sum(comm, &mut self.meant, self.worker, Some(&segments), at(ctx.rank))?;
            divide(&mut self.meant, m);
            synced.iter_mut().zip(&self.meant).for_each(|(z, c)| *z += c);
            return Ok(());
        }
        self.worker.compress(&self.meant, &segments, at(ctx.rank), &mut self.payload);
        let all = comm.all_gather_bytes(&self.payload)?;
        self.mean.clear();
        self.mean.resize(n, 0.0);
        for (j, payload) in all.iter().enumerate() {
            self.worker
                .decompress(payload, &segments, at(j), &mut self.decoded)
                .map_err(|error| RuleError::Payload { from: j, error })?;
            self.mean.iter_mut().zip(&self.decoded).for_each(|(s, c)| *s += c);
            if j == ctx.rank && self.error_feedback {
                self.worker_error.iter_mut().zip(&self.meant).zip(&self.decoded).for_each(|((e, p), c)| *e = p - c);
            }
        }
        divide(&mut self.mean, m);
        // The server's side, the same on every worker.
        if self.server.is_lossless() {
            synced.iter_mut().zip(&self.mean).for_each(|(z, c)| *z += c);
            return Ok(());
        }
        self.meant.clear();
        if self.error_feedback {
            self.meant.extend(self.mean.iter().zip(&self.server_error).map(|(c, e)| c + e));
        } else {
            self.meant.extend_from_slice(&self.mean);
        }
        self.server.compress(&self.meant, &segments, at(m), &mut self.payload);
        self.server
            .decompress(&self.payload, &segments, at(m), &mut self.decoded)
            .map_err(|error| RuleError::Payload { from: m, error })?;
        if self.error_feedback {
            self.server_error.iter_mut().zip(&self.meant).zip(&self.decoded).for_each(|((e, p), c)| *e = p - c);
        }
        synced.iter_mut().zip(&self.decoded).for_each(|(z, c)| *z += c);
        Ok(())
    }
}

impl MergeRule for EcLocalSgd {
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
        let n = params.len();
        let Some(synced) = &self.synced else {
            return Err(self.bad_state("the rule was not started with the initial model".into()));
        };
        let sizes = [synced.len(), self.worker_error.len(), self.server_error.len()];
        if sizes[0] != n || sizes[1..].iter().any(|&len| len != 0 && len != n) {
            let reason = format!("its buffers have {sizes:?} values but the model has {n}");
            return Err(self.bad_state(reason));
        }
        if self.lossless() {
            // The sum of the models in `synced`, then the mean, written as averaging writes it.
            let synced = self.synced.as_mut().expect("checked above");
            comm.all_reduce_sum_into(params, synced)?;
            let local = replace_by_mean(params, synced, ctx.world_size);
            synced.copy_from_slice(params);
            return Ok(MergeOutcome { local_squared_distance: Some(local), trigger: None });
        }
        self.compressed_merge(params, ctx, comm)?;
        params.copy_from_slice(self.synced.as_ref().expect("checked above"));
        Ok(MergeOutcome::default())
    }

    fn measures_consensus(&self) -> bool {
        self.lossless()
    }

    fn reaches_consensus(&self) -> bool {
        true
    }

    fn record(&self) -> StateRecord {
        StateRecord::new()
            .with_held("synced", self.synced.as_ref())
            .with_held("worker-error", Some(&self.worker_error))
            .with_held("server-error", Some(&self.server_error))
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        self.synced = record.take_buffer("synced");
        self.worker_error = record.take_buffer("worker-error").unwrap_or_default();
        self.server_error = record.take_buffer("server-error").unwrap_or_default();
        super::no_leftovers(self.registry_name(), &record, "`synced`, `worker-error` and `server-error`")
    }
}

impl MatrixForm for EcLocalSgd {
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        Some(if self.lossless() {
            Traffic::ring_all_reduce(4 * values as u64, world_size) as f64
        } else if self.reduces() {
            // 2(m − 1) chunks of the quantized all-reduce, each a payload of its share.
            let split = Segments::resolve(self.segments.as_ref(), values)
                .unwrap_or_else(|| Cow::Owned(Segments::whole(values)));
            crate::comm::quantized_all_reduce_bytes(self.worker, &split, world_size)
        } else {
            let split = Segments::resolve(self.segments.as_ref(), values)
                .unwrap_or_else(|| Cow::Owned(Segments::whole(values)));
            (world_size.saturating_sub(1) * self.worker.payload_bytes(&split)) as f64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{CollectiveKind, InProcessGroup};
    use crate::compress::Segment;
    use crate::launch::run_group;
    use crate::rules::averaging::Averaging;
    use crate::testing::{initial_buffer, merge_trajectories, with_segments, worker_buffer};

    /// Every worker's buffer after `merges` merges of `make()`, started from
    /// [`initial_buffer`] and moved by `worker_buffer(rank + k) · 0.1` before merge `k`; also
    /// each worker's final rule.
    fn run(m: usize, n: usize, merges: u64, make: impl Fn() -> EcLocalSgd + Sync) -> Vec<(Vec<f32>, EcLocalSgd)> {
        let comms = InProcessGroup::new(m).into_communicators();
        run_group(comms, |rank, mut comm| -> Result<_, RuleError> {
            let mut rule = make();
            let mut params = initial_buffer(m, n);
            let mut ctx = SyncContext { lr: Some(0.1), rank, world_size: m, seed: 3, ..SyncContext::default() };
            rule.start(&params, &ctx, &mut comm)?;
            for round in 0..merges {
                ctx.round = round;
                let shift = worker_buffer(rank + round as usize, n);
                params.iter_mut().zip(&shift).for_each(|(v, s)| *v += s * 0.1);
                rule.merge(&mut params, &ctx, &mut comm)?;
            }
            Ok((params, rule))
        })
        .unwrap_or_else(|failure| panic!("a worker failed: {:?}", failure.primary()))
    }

    /// The same merges computed independently in f64 from the definitions in the module doc,
    /// with the compressor applied through its own encode/decode (so only the rule's
    /// bookkeeping is under test): the final synchronized model.
    fn reference(m: usize, merges: u64, segments: &Segments, worker: Compressor, server: Compressor) -> Vec<f64> {
        let n = segments.len();
        let apply = |c: Compressor, v: &[f64], rank: usize, round: u64| -> Vec<f64> {
            let ctx = CompressContext { seed: 3, round, rank };
            let values: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            let (mut payload, mut out) = (Vec::new(), Vec::new());
            c.compress(&values, segments, ctx, &mut payload);
            c.decompress(&payload, segments, ctx, &mut out).unwrap();
            out.iter().map(|&x| f64::from(x)).collect()
        };
        let mut synced: Vec<f64> = initial_buffer(m, n).iter().map(|&v| f64::from(v)).collect();
        let mut local = vec![synced.clone(); m];
        let mut errors = vec![vec![0.0; n]; m];
        let mut server_error = vec![0.0; n];
        for round in 0..merges {
            let mut mean = vec![0.0; n];
            for (i, x) in local.iter_mut().enumerate() {
                let shift = worker_buffer(i + round as usize, n);
                x.iter_mut().zip(&shift).for_each(|(v, s)| *v += f64::from(*s) * f64::from(0.1f32));
                let meant: Vec<f64> = (0..n).map(|k| x[k] - synced[k] + errors[i][k]).collect();
                let sent = apply(worker, &meant, i, round);
                (0..n).for_each(|k| errors[i][k] = meant[k] - sent[k]);
                (0..n).for_each(|k| mean[k] += sent[k] / m as f64);
            }
            let meant: Vec<f64> = (0..n).map(|k| mean[k] + server_error[k]).collect();
            let sent = apply(server, &meant, m, round);
            (0..n).for_each(|k| server_error[k] = meant[k] - sent[k]);
            (0..n).for_each(|k| synced[k] += sent[k]);
            local.iter_mut().for_each(|x| x.clone_from(&synced));
        }
        synced
    }

    #[test]
    fn follows_the_double_compression_recurrence() {
        let (m, n) = (4, 300);
        let split = Segments::new([
            Segment { len: 100, exact: false },
            Segment { len: 20, exact: true },
            Segment { len: 180, exact: false },
        ]);
        for (worker, server, segments) in [
            (Compressor::TopK(0.05), Compressor::TopK(0.1), None),
            (Compressor::Sign, Compressor::Sign, None),
            (Compressor::RandK(0.2), Compressor::Identity, None),
            (Compressor::Sign, Compressor::Sign, Some(&split)),
            (Compressor::TopK(0.05), Compressor::Qsgd(4), Some(&split)),
        ] {
            let runs = run(m, n, 6, || with_segments(EcLocalSgd::new(worker, server), segments));
            let expected = reference(m, 6, segments.unwrap_or(&Segments::whole(n)), worker, server);
            for (params, _) in &runs {
                assert_eq!(params, &runs[0].0, "every worker holds the synchronized model");
                for (got, want) in params.iter().zip(&expected) {
                    assert!((f64::from(*got) - want).abs() < 1e-4, "{worker} / {server}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn buffers_are_averaged_exactly_under_any_compressor() {
        // Values 40..60 are a buffer (BatchNorm statistics): whatever the compressor does to the
        // tensors around it, the buffer ends as plain averaging leaves it (to rounding: x_s plus
        // the mean change rather than the mean model), and no error memory holds any of it.
        let (m, n) = (4, 100);
        let split = Segments::new([
            Segment { len: 40, exact: false },
            Segment { len: 20, exact: true },
            Segment { len: 40, exact: false },
        ]);
        let plain = run(m, n, 5, || EcLocalSgd::new(Compressor::Identity, Compressor::Identity));
        for spec in ["sign", "topk:0.01", "topk:0.1+sign", "randk:0.1", "qsgd:2", "bf16"] {
            let c: Compressor = spec.parse().unwrap();
            for (params, rule) in run(m, n, 5, || with_segments(EcLocalSgd::new(c, c), Some(&split))) {
                for k in 40..60 {
                    let (got, want) = (params[k], plain[0].0[k]);
                    assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{spec}, value {k}: {got} vs {want}");
                    assert_eq!((rule.worker_error()[k], rule.server_error()[k]), (0.0, 0.0), "{spec}");
                }
                assert!(params[..40].iter().zip(&plain[0].0).any(|(a, b)| a != b), "{spec} compresses the rest");
            }
        }
    }

    #[test]
    fn what_was_sent_plus_the_memory_is_what_was_meant() {
        // One worker: c̄ = c_0, so after k merges x_s − x_0 = Σ c and x − x_s = Δ_total − Σ c.
        // The worker memory is exactly what is still owed: Σ c + e = Σ Δ (to rounding).
        let (m, n, merges) = (1, 200, 5);
        let runs = run(m, n, merges, || EcLocalSgd::new(Compressor::TopK(0.1), Compressor::Identity));
        let (params, rule) = &runs[0];
        let start = initial_buffer(m, n);
        let mut meant = vec![0.0f64; n];
        for round in 0..merges as usize {
            let shift = worker_buffer(round, n);
            meant.iter_mut().zip(&shift).for_each(|(t, s)| *t += f64::from(*s) * 0.1);
        }
        for k in 0..n {
            let sent = f64::from(params[k]) - f64::from(start[k]);
            let owed = f64::from(rule.worker_error()[k]);
            assert!((sent + owed - meant[k]).abs() < 1e-5, "value {k}: {sent} + {owed} vs {}", meant[k]);
        }
        assert!(rule.worker_error().iter().any(|e| *e != 0.0), "top-10% leaves a residual");
    }

    #[test]
    fn the_identity_is_averaging_bit_for_bit() {
        let ec =
            merge_trajectories(4, 5, None, || Box::new(EcLocalSgd::new(Compressor::Identity, Compressor::Identity)));
        let averaging = merge_trajectories(4, 5, None, || Box::new(Averaging::new()));
        assert_eq!(ec, averaging);
        let compressed_averaging =
            merge_trajectories(4, 5, None, || Box::new(EcLocalSgd::without_error_feedback(Compressor::Identity)));
        assert_eq!(compressed_averaging, averaging);
    }

    #[test]
    fn without_error_feedback_the_memories_stay_empty() {
        let runs = run(3, 50, 3, || EcLocalSgd::without_error_feedback(Compressor::TopK(0.1)));
        for (_, rule) in &runs {
            assert!(rule.worker_error().is_empty() && rule.server_error().is_empty());
            assert_eq!(rule.record().keys(), vec!["synced".to_string()], "nothing but x_s to checkpoint");
        }
        // x_s ← x_s + (1/m) Σ C(Δ_j) with C keeping 5 of 50 values of each change: the first
        // merge moves at most 15 values of the model.
        let first = run(3, 50, 1, || EcLocalSgd::without_error_feedback(Compressor::TopK(0.1)));
        let start = initial_buffer(3, 50);
        let moved = first[0].0.iter().zip(&start).filter(|(a, b)| a != b).count();
        assert!((5..=15).contains(&moved), "{moved} values moved");
    }

    #[test]
    fn the_error_memories_survive_a_checkpoint_bit_for_bit() {
        let make =
            || -> Box<dyn CooperativeRule> { Box::new(EcLocalSgd::new(Compressor::TopK(0.1), Compressor::Sign)) };
        assert_eq!(merge_trajectories(4, 6, Some(3), make), merge_trajectories(4, 6, None, make));
    }

    #[test]
    fn elementwise_quantizers_average_by_a_quantized_all_reduce() {
        let (m, n) = (4, 600);
        for c in [Compressor::Int8, Compressor::Fp8, Compressor::Bf16] {
            let make = || -> Box<dyn CooperativeRule> { Box::new(EcLocalSgd::without_error_feedback(c)) };
            let measured = crate::testing::measured_bytes_per_merge(m, n, 2, make);
            assert_eq!(make().expected_bytes_per_merge(n, m), Some(measured), "{c}");
            // Half or less of an all-gather of the same payloads.
            let all_gather = ((m - 1) * c.payload_bytes(&Segments::whole(n))) as f64;
            assert!(measured < 0.55 * all_gather, "{c}: {measured} against {all_gather}");
            // One merge: every worker holds the same model, the mean of the moved models to
            // within the quantizer's error.
            let runs = run(m, n, 1, || EcLocalSgd::without_error_feedback(c));
            assert!(runs.windows(2).all(|w| w[0].0 == w[1].0), "{c}");
            let start = initial_buffer(m, n);
            let exact = run(m, n, 1, || EcLocalSgd::without_error_feedback(Compressor::Identity));
            let largest = exact[0].0.iter().zip(&start).fold(0.0f32, |a, (x, s)| a.max((x - s).abs()));
            for (k, (got, want)) in runs[0].0.iter().zip(&exact[0].0).enumerate() {
                assert!((got - want).abs() <= 0.1 * largest * m as f32, "{c}, value {k}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn bytes_are_the_payloads_of_an_all_gather() {
        let (m, n) = (4, 1000);
        let measured = crate::testing::measured_bytes_per_merge(m, n, 2, || {
            Box::new(EcLocalSgd::new(Compressor::TopK(0.01), Compressor::TopK(0.01)))
        });
        assert_eq!(measured, (3 * (8 + 8 * 10)) as f64, "three other workers' top-10 payloads");
        let rule = EcLocalSgd::new(Compressor::TopK(0.01), Compressor::TopK(0.01));
        assert_eq!(rule.expected_bytes_per_merge(n, m), Some(measured));
        let sign = crate::testing::measured_bytes_per_merge(m, n, 1, || {
            Box::new(EcLocalSgd::new(Compressor::Sign, Compressor::Sign))
        });
        assert_eq!(sign, (3 * (8 + 4 + 125)) as f64);
        for run in
            crate::testing::run_one_merge(m, 10, |_| Box::new(EcLocalSgd::new(Compressor::Sign, Compressor::Sign)))
        {
            assert_eq!(run.traffic.calls(CollectiveKind::AllGather), 1);
            assert_eq!(run.traffic.calls(CollectiveKind::AllReduce), 0);
        }
    }

    #[test]
    fn a_malformed_payload_is_an_error_naming_its_sender() {
        let comms = InProcessGroup::new(2).into_communicators();
        let results = run_group(comms, |rank, mut comm| -> Result<(), RuleError> {
            let ctx = SyncContext { rank, world_size: 2, ..SyncContext::default() };
            let mut rule = EcLocalSgd::new(Compressor::TopK(0.5), Compressor::Identity);
            rule.start(&[0.0; 4], &ctx, &mut comm)?;
            if rank == 1 {
                // Worker 1 speaks another format: its payload is sign-compressed.
                rule.worker = Compressor::Sign;
            }
            rule.merge(&mut [1.0, 2.0, 3.0, 4.0], &ctx, &mut comm).map(|_| ())
        });
        let failure = results.unwrap_err();
        let message = match &failure.primary().failure {
            crate::launch::Failure::Error(error) => error.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(message.contains("worker 1's compressed message cannot be decoded"), "{message}");
    }

    #[test]
    fn a_merge_before_start_or_with_a_wrong_record_is_an_error() {
        let mut comm = InProcessGroup::new(1).into_communicators().remove(0);
        let ctx = SyncContext { world_size: 1, ..SyncContext::default() };
        let mut rule = EcLocalSgd::new(Compressor::Sign, Compressor::Sign);
        assert!(matches!(rule.merge(&mut [1.0], &ctx, &mut comm), Err(RuleError::BadState { .. })));
        let record = StateRecord::new().with_buffer("synced", vec![0.0; 3]).with_buffer("momentum", vec![0.0; 3]);
        assert!(matches!(rule.load_record(record), Err(RuleError::BadState { .. })));
        let record = StateRecord::new().with_buffer("synced", vec![0.0; 3]);
        rule.load_record(record).unwrap();
        assert!(matches!(rule.merge(&mut [1.0], &ctx, &mut comm), Err(RuleError::BadState { .. })));
        // A split of another model is an error naming both sizes, not a panic in the codec.
        let mut rule = EcLocalSgd::new(Compressor::Sign, Compressor::Sign);
        rule.set_segments(&Segments::whole(5));
        rule.start(&[0.0; 3], &ctx, &mut comm).unwrap();
        let error = rule.merge(&mut [1.0, 2.0, 3.0], &ctx, &mut comm).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the ec-local-sgd rule was told of tensors of 5 values in all, but the model has 3"
        );
    }
}
