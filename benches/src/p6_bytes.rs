//! P6: the bytes a merge moves per worker, at the busiest merge, for the rules that exist to
//! move fewer: Streaming DiLoCo (one fragment per merge) and quantized pseudo-gradients or
//! averages, against DiLoCo's and averaging's dense all-reduce of the same model.
//!
//! Four workers on threads merge a ResNet's flat buffer (weights compressed, BatchNorm buffers
//! exact, as in training) through a [`Metered`] communicator; each merge's bytes are the
//! communicator's count before and after, per worker. The peak is the largest over a round of
//! `P` merges (every fragment once); a network's link is sized by it.

use burn_coop::comm::{InProcessGroup, Metered};
use burn_coop::compress::{Compressor, Segments};
use burn_coop::params::{BufferPolicy, ParamLayout};
use burn_coop::rules::diloco::DiLoCo;
use burn_coop::rules::ec_local_sgd::EcLocalSgd;
use burn_coop::rules::outer::{OuterKind, OuterOptimizer};
use burn_coop::rules::streaming_diloco::StreamingDiLoCo;
use burn_coop::rules::{MergeRule, RuleError, SyncContext};

use crate::setup::{reference_device, resnet};
use crate::{BenchError, Goal, Options, Row};

const WORKERS: usize = 4;

/// Bytes sent per worker at each of `merges` merges of the rule `make` builds, averaged over the
/// workers (the models differ per worker, so every merge moves real changes).
fn bytes_per_merge<R: MergeRule>(
    segments: &Segments,
    merges: usize,
    make: impl Fn() -> R + Sync,
) -> Result<Vec<f64>, BenchError> {
    let n = segments.len();
    let comms = InProcessGroup::new(WORKERS).into_communicators();
    let per_worker = burn_coop::run_group(comms, |rank, comm| -> Result<Vec<u64>, RuleError> {
        let mut comm = Metered::new(comm);
        let mut rule = make();
        rule.set_segments(segments);
        let initial: Vec<f32> = (0..n).map(|k| ((k % 97) as f32 - 48.0) * 1e-3).collect();
        let mut ctx = SyncContext { lr: Some(0.1), rank, world_size: WORKERS, seed: 1, ..SyncContext::default() };
        rule.start(&initial, &ctx, &mut comm)?;
        let mut params = initial;
        let mut sent = Vec::with_capacity(merges);
        for round in 0..merges {
            params.iter_mut().enumerate().for_each(|(k, v)| *v += ((k + rank + round) % 13) as f32 * 1e-4);
            ctx.round = round as u64;
            ctx.step = round as u64 + 1;
            let before = comm.traffic().total().bytes_sent;
            rule.merge(&mut params, &ctx, &mut comm)?;
            sent.push(comm.traffic().total().bytes_sent - before);
        }
        Ok(sent)
    })
    .map_err(|failure| format!("a worker failed: {:?}", failure.primary()))?;
    Ok((0..merges).map(|k| per_worker.iter().map(|w| w[k] as f64).sum::<f64>() / WORKERS as f64).collect())
}

fn peak(bytes: &[f64]) -> f64 {
    bytes.iter().copied().fold(0.0, f64::max)
}

fn megabytes(bytes: f64) -> String {
    format!("{:.3} MB", bytes / 1e6)
}

/// Runs P6.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let depth = options.scale.depth();
    let model = resnet(depth, &reference_device().autodiff())?;
    let segments = ParamLayout::of(&model, BufferPolicy::Merge).segments();
    let nesterov = || OuterOptimizer::new(0.7, OuterKind::Momentum { beta: 0.9, nesterov: true });
    let fragments = 4;
    // A round of merges: every fragment once, plus the one landing from the round before.
    let merges = fragments + 1;
    let diloco = bytes_per_merge(&segments, merges, || DiLoCo::with_outer(nesterov()))?;
    let mut rows = Vec::new();
    let streaming =
        bytes_per_merge(&segments, merges, || StreamingDiLoCo::new(fragments, true, 0.5, nesterov()).unwrap())?;
    rows.push(Row {
        id: "P6",
        what: format!(
            "Streaming DiLoCo, {fragments} fragments (runs of whole tensors), peak bytes per merge per worker / DiLoCo's, ResNet-{depth}"
        ),
        ours: megabytes(peak(&streaming)),
        reference: megabytes(peak(&diloco)),
        ratio: peak(&streaming) / peak(&diloco),
        goal: Goal::Report,
    });
    for compressor in [Compressor::Int8, Compressor::Fp8] {
        let quantized =
            bytes_per_merge(&segments, merges, || DiLoCo::with_outer(nesterov()).with_compressor(Some(compressor)))?;
        rows.push(Row {
            id: "P6",
            what: format!("DiLoCo, {compressor} pseudo-gradients by the quantized all-reduce / dense, ResNet-{depth}"),
            ours: megabytes(peak(&quantized)),
            reference: megabytes(peak(&diloco)),
            ratio: peak(&quantized) / peak(&diloco),
            goal: Goal::AtMost(0.3),
        });
    }
    let reduced = bytes_per_merge(&segments, 2, || EcLocalSgd::without_error_feedback(Compressor::Int8))?;
    let gathered = bytes_per_merge(&segments, 2, || EcLocalSgd::new(Compressor::Int8, Compressor::Identity))?;
    rows.push(Row {
        id: "P6",
        what: format!(
            "averaging int8 changes: quantized all-reduce / all-gather of the same payloads (error-compensated), ResNet-{depth}, {WORKERS} workers"
        ),
        ours: megabytes(peak(&reduced)),
        reference: megabytes(peak(&gathered)),
        ratio: peak(&reduced) / peak(&gathered),
        goal: Goal::AtMost(2.0 / WORKERS as f64 * 1.1),
    });
    Ok(rows)
}
