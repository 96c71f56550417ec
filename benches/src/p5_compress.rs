//! P5: what compressing a merge's message costs in computation.
//!
//! For each compressor, one worker's message for ResNet-20 (every weight tensor compressed on its
//! own, the BatchNorm buffers exact, as a training run sends them; values drawn from a
//! normal-like spread) is encoded and decoded back into a dense buffer, as a
//! compressed merge does for its own message; the time of both is compared with the least a
//! dense merge costs this worker in memory traffic: its model read once and written once at the
//! `memcpy` bandwidth measured in the same run (P2's bound, per worker). A ratio above 1 means
//! compression costs more computation than a dense merge's memory traffic; it pays when the
//! network is slower than that by more than the payload shrinks.

use std::time::Instant;

use burn_coop::compress::{CompressContext, Compressor};

use crate::p2_merge::memcpy_bandwidth;
use crate::setup::{fmt_seconds, median, reference_device, resnet};
use crate::{BenchError, Goal, Options, Row};

/// Runs P5.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let reps = scale.pick(30, 3);
    // On an autodiff device, as in training, so that weights and BatchNorm buffers are told apart.
    let model = resnet(scale.depth(), &reference_device().autodiff())?;
    let segments = burn_coop::params::ParamLayout::of(&model, burn_coop::params::BufferPolicy::Merge).segments();
    let n = segments.len();
    let values: Vec<f32> = (0..n).map(|k| (((k * 7919) % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    let bandwidth = memcpy_bandwidth(n, scale.pick(50, 3));
    let bound = (2 * n * 4) as f64 / bandwidth;
    let compressors = [
        Compressor::TopK(0.01),
        Compressor::TopKSign(0.01),
        Compressor::RandK(0.01),
        Compressor::Sign,
        Compressor::Qsgd(16),
        Compressor::Bf16,
        Compressor::Fp16,
        Compressor::Int8,
        Compressor::Fp8,
    ];
    let mut rows = Vec::new();
    let (mut payload, mut decoded) = (Vec::new(), Vec::new());
    for compressor in compressors {
        let mut times = Vec::with_capacity(reps);
        for round in 0..reps as u64 + 2 {
            let ctx = CompressContext { seed: 1, round, rank: 0 };
            let start = Instant::now();
            compressor.compress(&values, &segments, ctx, &mut payload);
            compressor.decompress(&payload, &segments, ctx, &mut decoded)?;
            std::hint::black_box(&decoded);
            times.push(start.elapsed().as_secs_f64());
        }
        let seconds = median(&times[2..]);
        rows.push(Row {
            id: "P5",
            what: format!(
                "{compressor}: encode + decode of one ResNet-{} message ({n} floats → {} bytes, median of {reps}) / the model read and written once at memcpy {:.1} GB/s",
                scale.depth(),
                payload.len(),
                bandwidth / 1e9
            ),
            ours: fmt_seconds(seconds),
            reference: fmt_seconds(bound),
            ratio: seconds / bound,
            goal: Goal::Report,
        });
    }
    Ok(rows)
}
