//! P2: one merge of 4 replicas against the memory traffic it cannot avoid.
//!
//! Four threads each hold a ResNet and a [`LocalSgd`] on an in-process group; after one training
//! step (which starts the rule), every worker merges its model through the optimizer's
//! [`Synchronizer`] with [`Synchronizer::sync_now`], many times. A merge's time is the slowest
//! worker's, from leaving a barrier to having its merged model back: flattening the module
//! (weights and BatchNorm buffers), the non-finite check, the rule's exchange and arithmetic,
//! the statistics collective (consensus distance and non-finite flags, for the rules that measure
//! the distance as they merge: averaging and elastic; gossip has none without
//! `with_consensus_every`) and writing the result back into the module.
//!
//! The parts are then timed one by one on the same synchronizer: module → flat buffer with the
//! layout the synchronizer uses, [`Synchronizer::merge_flat`] on that buffer (everything the
//! merge does without a module), and flat buffer → module.
//!
//! The reference is the traffic the rule's arithmetic needs at the least — every model (and
//! anchor) read once and written once — divided by the bandwidth of `memcpy` over a buffer the
//! size of the four models, measured in the same run on one thread and on all cores (the faster
//! is used, so the bound is the strictest).

use std::time::Instant;

use burn_coop::{
    DEFAULT_BUCKET_BYTES, LocalSgd, Synchronizer, launch,
    params::{BufferPolicy, ParamLayout},
    rules::{MergeRule, averaging::Averaging, elastic::Elastic, gossip::Gossip},
    schedule::fixed::PeriodicSchedule,
    topology::Topology,
};

use crate::setup::{
    WideMlp, cpu_threads, flat_len, fmt_seconds, gradients, median, random_batch, reference_device, resnet, sgd,
};
use crate::{BenchError, Goal, Options, Row};

const WORKERS: usize = 4;

/// Runs P2.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let reps = scale.pick(200, 5);
    let n = flat_len(&resnet(scale.depth(), &reference_device())?);
    let rules: [(&str, fn() -> Result<Box<dyn MergeRule>, BenchError>, usize); 3] = [
        ("averaging", || Ok(Box::new(Averaging::new())), WORKERS),
        ("elastic", || Ok(Box::new(Elastic::optimal(WORKERS)?)), WORKERS + 1),
        ("gossip (ring)", || Ok(Box::new(Gossip::on(&Topology::ring(WORKERS)?)?)), WORKERS),
    ];
    let mut rows = Vec::new();
    for (name, rule, models) in rules {
        let bandwidth = memcpy_bandwidth(WORKERS * n, scale.pick(50, 3));
        let times = merge_times(options, rule, reps)?;
        // Each model (and anchor) read once and written once, in f32.
        let bytes = (2 * models * n * 4) as f64;
        let bound = bytes / bandwidth;
        rows.push(Row {
            id: "P2",
            what: format!(
                "{name} merge of {WORKERS} ResNet-{} replicas ({n} floats each, median of {reps}) / {:.1} MB at memcpy {:.1} GB/s",
                scale.depth(),
                bytes / 1e6,
                bandwidth / 1e9
            ),
            ours: fmt_seconds(times.whole),
            reference: fmt_seconds(bound),
            ratio: times.whole / bound,
            goal: Goal::AtMost(2.0),
        });
        for (part, seconds) in [
            ("module → flat buffer", times.flatten),
            ("exchange + arithmetic + statistics on the flat buffers", times.exchange),
            ("flat buffer → module", times.unflatten),
        ] {
            rows.push(Row {
                id: "P2",
                what: format!("… {name}, of which {part}"),
                ours: fmt_seconds(seconds),
                reference: fmt_seconds(bound),
                ratio: seconds / bound,
                goal: Goal::Report,
            });
        }
    }
    rows.extend(wide_rows(options)?);
    Ok(rows)
}

/// The large-model rows: an averaging merge of four [`WideMlp`] replicas (64 MiB each at full
/// scale) with buckets of several sizes and in one piece, against each worker's model read and
/// written once at the memcpy bandwidth measured over a buffer of the four models (the traffic
/// of the arithmetic, whatever the bucketing). The default bucket size is the one chosen here.
fn wide_rows(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let (width, reps) = (scale.pick(2048, 128), scale.pick(12, 3));
    let n = flat_len(&WideMlp::new(width, &reference_device()));
    let bandwidth = memcpy_bandwidth(WORKERS * n, scale.pick(10, 3));
    let bytes = (2 * WORKERS * n * 4) as f64;
    let bound = bytes / bandwidth;
    let mib = 1 << 20;
    let sizes = [(DEFAULT_BUCKET_BYTES, true), (mib, false), (16 * mib, false), (usize::MAX, false)];
    let mut rows = Vec::new();
    for (bucket, default) in sizes {
        let seconds = wide_merge_time(width, bucket, reps)?;
        let buckets = if bucket == usize::MAX {
            "in one piece".to_string()
        } else {
            format!("in buckets of {} MiB{}", bucket / mib, if default { " (the default)" } else { "" })
        };
        rows.push(Row {
            id: "P2",
            what: format!(
                "averaging merge of {WORKERS} × {width}² MLP ({}) {buckets}, median of {reps} / {:.0} MB at memcpy {:.1} GB/s",
                crate::setup::fmt_mib((n * 4) as f64),
                bytes / 1e6,
                bandwidth / 1e9
            ),
            ours: fmt_seconds(seconds),
            reference: fmt_seconds(bound),
            ratio: seconds / bound,
            goal: if default { Goal::AtMost(2.0) } else { Goal::Report },
        });
    }
    Ok(rows)
}

/// The median over `reps` merges of the slowest worker's time for an averaging merge of the
/// wide model with buckets of `bucket` bytes.
fn wide_merge_time(width: usize, bucket: usize, reps: usize) -> Result<f64, BenchError> {
    let per_worker = launch(WORKERS, |worker| -> Result<Vec<f64>, BenchError> {
        let device = reference_device().autodiff();
        let mut model = WideMlp::new(width, &device);
        let sync = Synchronizer::new(Averaging::new(), PeriodicSchedule::every(u64::MAX)?, worker.comm()?)?
            .with_bucket_size(bucket);
        let mut optim = LocalSgd::with_synchronizer(sgd(), sync);
        let grads = model.gradients(2, &device);
        model = optim.step(0.01, model, grads)?;
        let sync = optim.synchronizer();
        let mut times = Vec::with_capacity(reps);
        for rep in 0..reps + 2 {
            sync.comm().barrier()?;
            let start = Instant::now();
            model = sync.sync_now(model)?.0;
            if rep >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(times)
    })?;
    let slowest: Vec<f64> = (0..reps).map(|k| per_worker.iter().map(|t| t[k]).fold(0.0, f64::max)).collect();
    Ok(median(&slowest))
}

/// Medians over merges of the slowest worker's time, for the whole merge and its parts.
#[derive(Debug, Clone, Copy)]
struct MergeTimes {
    /// [`Synchronizer::sync_now`]: everything below.
    whole: f64,
    /// Copying the module's tensors into the flat buffer (BatchNorm statistics flushed first).
    flatten: f64,
    /// [`Synchronizer::merge_flat`]: the non-finite check, the rule's exchange and arithmetic on
    /// the flat buffer, the statistics collective and the bookkeeping.
    exchange: f64,
    /// Writing the flat buffer back into the module's tensors.
    unflatten: f64,
}

/// Times merges on 4 workers; each part is timed separately between barriers.
fn merge_times(
    options: &Options,
    rule: fn() -> Result<Box<dyn MergeRule>, BenchError>,
    reps: usize,
) -> Result<MergeTimes, BenchError> {
    let scale = options.scale;
    let per_worker = launch(WORKERS, |worker| -> Result<Vec<[f64; 4]>, BenchError> {
        let device = reference_device().autodiff();
        let mut model = resnet(scale.depth(), &device)?;
        let mut optim = LocalSgd::new(sgd(), rule()?, PeriodicSchedule::every(u64::MAX)?, worker.comm()?)?;
        // The first step broadcasts worker 0's model and starts the rule (the elastic anchor).
        let (images, targets) = random_batch(scale.pick(8, 2), &device);
        let (_, grads) = gradients(&model, images, targets);
        model = optim.step(0.05, model, grads)?;
        let sync: &mut Synchronizer = optim.synchronizer();
        // The synchronizer's own layout: the default buffer policy merges BatchNorm buffers.
        let layout = ParamLayout::of(&model, BufferPolicy::default());
        let mut flat = layout.flatten(&model)?;
        let mut times = vec![[0.0; 4]; reps];
        // Whole merges back to back, as training runs them.
        for rep in 0..reps + 3 {
            sync.comm().barrier()?;
            let start = Instant::now();
            model = sync.sync_now(model)?.0;
            if rep >= 3 {
                times[rep - 3][0] = start.elapsed().as_secs_f64();
            }
        }
        // Then the parts, each between barriers, on the same synchronizer.
        for rep in 0..reps + 3 {
            let mut sample = [0.0; 4];

            sync.comm().barrier()?;
            let start = Instant::now();
            layout.flatten_into(&model, &mut flat)?;
            sample[1] = start.elapsed().as_secs_f64();

            sync.comm().barrier()?;
            let start = Instant::now();
            sync.merge_flat(&mut flat)?;
            sample[2] = start.elapsed().as_secs_f64();

            sync.comm().barrier()?;
            let start = Instant::now();
            model = layout.unflatten(model, &flat)?;
            sample[3] = start.elapsed().as_secs_f64();
            if rep >= 3 {
                times[rep - 3][1..].copy_from_slice(&sample[1..]);
            }
        }
        let expected = 2 * (reps as u64 + 3);
        if sync.stats().syncs != expected {
            return Err(format!("P2 ran {} merges, expected {expected}", sync.stats().syncs).into());
        }
        Ok(times)
    })?;
    let part = |p: usize| {
        let slowest: Vec<f64> = (0..reps).map(|k| per_worker.iter().map(|t| t[k][p]).fold(0.0, f64::max)).collect();
        median(&slowest)
    };
    Ok(MergeTimes { whole: part(0), flatten: part(1), exchange: part(2), unflatten: part(3) })
}

/// Bytes per second that `memcpy` moves (read plus written) over a buffer of `floats`, cache
/// state as a merge would see it (the buffer is copied repeatedly): the faster of one thread and
/// all cores.
pub fn memcpy_bandwidth(floats: usize, reps: usize) -> f64 {
    let threads = cpu_threads().max(1);
    let source = vec![1.0f32; floats];
    let mut target = vec![0.0f32; floats];
    let mut one = Vec::new();
    let mut all = Vec::new();
    for _ in 0..reps + 2 {
        let start = Instant::now();
        target.copy_from_slice(&source);
        std::hint::black_box(&mut target);
        one.push(start.elapsed().as_secs_f64());

        let chunk = floats.div_ceil(threads);
        let start = Instant::now();
        std::thread::scope(|scope| {
            for (t, s) in target.chunks_mut(chunk).zip(source.chunks(chunk)) {
                scope.spawn(move || t.copy_from_slice(s));
            }
        });
        std::hint::black_box(&mut target);
        all.push(start.elapsed().as_secs_f64());
    }
    let best = median(&one[2..]).min(median(&all[2..]));
    (2 * floats * 4) as f64 / best
}

#[cfg(test)]
mod tests {
    #[test]
    fn memcpy_bandwidth_is_positive_and_finite() {
        let bandwidth = super::memcpy_bandwidth(1 << 16, 3);
        assert!(bandwidth.is_finite() && bandwidth > 1e6, "{bandwidth}");
    }
}
