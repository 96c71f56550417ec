//! P2: one merge of 4 replicas against the memory traffic it cannot avoid.
//!
//! Four threads each hold a ResNet and a [`LocalSgd`] on an in-process group; after one training
//! step (which starts the rule), every worker calls [`LocalSgd::merge`] on its model, many times.
//! A merge's time is the slowest worker's, from leaving a barrier to having its merged model
//! back: flattening the module (weights and BatchNorm buffers), the non-finite check, the rule's
//! exchange and arithmetic, the consensus distance and writing the result back into the module.
//!
//! The reference is the traffic the rule's arithmetic needs at the least — every model (and
//! anchor) read once and written once — divided by the bandwidth of `memcpy` over a buffer the
//! size of the four models, measured in the same run on one thread and on all cores (the faster
//! is used, so the bound is the strictest).

use std::time::Instant;

use burn_coop::{ElasticAveraging, Gossip, LocalSgd, MergeRule, PeriodicAveraging, PeriodicSchedule, Topology, launch};

use crate::setup::{
    cpu_threads, flat_len, fmt_seconds, gradients, median, random_batch, reference_device, resnet, sgd,
};
use crate::{BenchError, Goal, Options, Row};

const WORKERS: usize = 4;

/// Runs P2.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let reps = scale.pick(200, 5);
    let n = flat_len(&resnet(scale.depth(), &reference_device())?);
    let rules: [(&str, fn() -> Result<Box<dyn MergeRule>, BenchError>, usize); 3] = [
        ("averaging", || Ok(Box::new(PeriodicAveraging::new())), WORKERS),
        ("elastic", || Ok(Box::new(ElasticAveraging::optimal(WORKERS))), WORKERS + 1),
        ("gossip (ring)", || Ok(Box::new(Gossip::on(&Topology::ring(WORKERS)?)?)), WORKERS),
    ];
    let mut rows = Vec::new();
    for (name, rule, models) in rules {
        let bandwidth = memcpy_bandwidth(WORKERS * n, scale.pick(50, 3));
        let merge = merge_seconds(options, rule, reps)?;
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
            ours: fmt_seconds(merge),
            reference: fmt_seconds(bound),
            ratio: merge / bound,
            goal: Goal::AtMost(2.0),
        });
    }
    Ok(rows)
}

/// Median over `reps` merges of the slowest worker's merge time.
fn merge_seconds(
    options: &Options,
    rule: fn() -> Result<Box<dyn MergeRule>, BenchError>,
    reps: usize,
) -> Result<f64, BenchError> {
    let scale = options.scale;
    let per_worker = launch(WORKERS, |worker| -> Result<Vec<f64>, BenchError> {
        let device = reference_device().autodiff();
        let mut model = resnet(scale.depth(), &device)?;
        let mut optim = LocalSgd::new(sgd(), rule()?, PeriodicSchedule::every(u64::MAX)?, worker.transport())?;
        // The first step broadcasts worker 0's model and starts the rule (the elastic anchor).
        let (images, targets) = random_batch(scale.pick(8, 2), &device);
        let (_, grads) = gradients(&model, images, targets);
        model = optim.step(0.05, model, grads)?;
        let mut times = Vec::with_capacity(reps);
        for rep in 0..reps + 3 {
            optim.transport_mut().barrier()?;
            let start = Instant::now();
            model = optim.merge(model)?;
            if rep >= 3 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(times)
    })?;
    let per_worker: Vec<Vec<f64>> = per_worker.into_iter().collect::<Result<_, _>>()?;
    let slowest: Vec<f64> = (0..reps).map(|k| per_worker.iter().map(|t| t[k]).fold(0.0, f64::max)).collect();
    Ok(median(&slowest))
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
