//! P4: what a merge costs the local step loop when the network is slow, overlapped or not.
//!
//! Four workers on threads run rounds of τ = 2 local steps and a merge of a ResNet-20-sized
//! buffer, through a communicator that delays every all-reduce by `D` (the sum is ready `D`
//! after it started, as on a network with that latency): `D` is set to 60% of the τ local steps,
//! so a blocking merge must wait for it and an overlapped one can hide it. A local step here is
//! fixed arithmetic over the buffer (3000 passes of `x ← 0.999 x + 10⁻⁶`, about 0.1 s: a small CNN step on a core),
//! the same for every row. Each row is the slowest worker's time for the rounds, against the same rounds with no
//! merge at all: Overlap Local-SGD (its sum travels during the next τ steps), elastic averaging
//! overlapped the same way, and blocking averaging (which waits for `D` at every merge). Each
//! figure is the best of three runs, the rows interleaved.

use std::time::{Duration, Instant};

use burn_coop::comm::{CommError, Communicator, PendingOp, PendingSum};
use burn_coop::{
    Synchronizer, launch,
    rules::{MergeRule, averaging::Averaging},
    schedule::fixed::PeriodicSchedule,
};

use crate::setup::{flat_len, fmt_seconds, reference_device, resnet};
use crate::{BenchError, Goal, Options, Row};

const WORKERS: usize = 4;
const TAU: usize = 2;
/// Passes over the buffer per local step.
const PASSES: usize = 3000;

/// A communicator whose sum all-reduces are ready `delay` after they start.
struct Delayed<C> {
    inner: C,
    delay: Duration,
}

struct DelayedSum {
    inner: PendingSum,
    ready_at: Instant,
}

impl PendingOp for DelayedSum {
    fn is_ready(&mut self) -> Result<bool, CommError> {
        Ok(Instant::now() >= self.ready_at && self.inner.is_ready()?)
    }
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CommError> {
        std::thread::sleep(self.ready_at.saturating_duration_since(Instant::now()));
        self.inner.wait()
    }
}

impl<C: Communicator> Communicator for Delayed<C> {
    // The blocking sums are left to the trait's defaults, which start a sum here and wait on it:
    // they are delayed too.
    burn_coop::forward_communicator!(self.inner =>
        rank, world_size, all_reduce_f64, broadcast, all_gather_bytes, exchange, exchange_directed, exchange_bytes, split,
        barrier
    );

    fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError> {
        let len = values.len();
        let ready_at = Instant::now() + self.delay;
        let inner = self.inner.start_all_reduce_sum(values)?;
        Ok(PendingSum::new(Box::new(DelayedSum { inner, ready_at }), len))
    }
}

/// One local step's worth of arithmetic on the buffer (about as long as a small CNN's step on a
/// CPU core, so that a merge's own arithmetic is small beside the steps, as in training).
fn local_step(params: &mut [f32]) {
    for _ in 0..PASSES {
        params.iter_mut().for_each(|x| *x = *x * 0.999 + 1e-6);
    }
    std::hint::black_box(params);
}

/// The slowest worker's seconds for `rounds` rounds of τ local steps and, with a rule, a merge.
fn rounds_time(
    n: usize,
    rounds: usize,
    delay: Duration,
    rule: Option<fn() -> Result<Box<dyn MergeRule>, BenchError>>,
) -> Result<f64, BenchError> {
    let per_worker = launch(WORKERS, |worker| -> Result<f64, BenchError> {
        let comm = Delayed { inner: worker.comm()?, delay };
        let mut sync = match rule {
            Some(rule) => {
                let mut sync = Synchronizer::new(rule()?, PeriodicSchedule::every(TAU as u64)?, comm)?;
                sync.set_lr(0.1);
                Some(sync)
            }
            None => None,
        };
        let mut params: Vec<f32> = (0..n).map(|k| (k % 97) as f32 * 1e-3).collect();
        if let Some(sync) = sync.as_mut() {
            sync.start_flat(&params)?;
        }
        let start = Instant::now();
        for _ in 0..rounds {
            for _ in 0..TAU {
                local_step(&mut params);
            }
            if let Some(sync) = sync.as_mut() {
                sync.merge_flat(&mut params)?;
            }
        }
        Ok(start.elapsed().as_secs_f64())
    })?;
    Ok(per_worker.into_iter().fold(0.0, f64::max))
}

/// Runs P4.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let n = flat_len(&resnet(scale.depth(), &reference_device())?);
    let rounds = scale.pick(20, 3);
    // Calibrate: the local steps of one round, with the four workers running together.
    let steps = rounds_time(n, 3, Duration::ZERO, None)? / 3.0;
    let delay = Duration::from_secs_f64(0.6 * steps);
    // Best of three for every row, the rows interleaved, so a slow moment of the machine does
    // not land on one side only.
    let repeats = scale.pick(3, 1);
    let mut none = f64::INFINITY;
    let rules: [(&str, fn() -> Result<Box<dyn MergeRule>, BenchError>, Goal); 3] = [
        ("Overlap Local-SGD", || Ok(Box::new(burn_coop::rules::overlap::Overlap::new(0.6, 0.7)?)), Goal::AtMost(1.05)),
        (
            "elastic averaging overlapped",
            || Ok(Box::new(burn_coop::rules::elastic_overlap::ElasticOverlap::new(0.3, WORKERS)?)),
            Goal::AtMost(1.05),
        ),
        ("blocking averaging", || Ok(Box::new(Averaging::new())), Goal::Report),
    ];
    let mut best = [f64::INFINITY; 3];
    for _ in 0..repeats {
        none = none.min(rounds_time(n, rounds, delay, None)?);
        for (k, (_, rule, _)) in rules.iter().enumerate() {
            best[k] = best[k].min(rounds_time(n, rounds, delay, Some(*rule))?);
        }
    }
    let mut rows = Vec::new();
    for ((name, _, goal), time) in rules.into_iter().zip(best) {
        rows.push(Row {
            id: "P4",
            what: format!(
                "{name}: {rounds} rounds of τ = {TAU} local steps of {} + a merge ({n} floats, {WORKERS} workers, all-reduce delayed {}) / the same rounds without merges",
                fmt_seconds(steps / TAU as f64),
                fmt_seconds(delay.as_secs_f64())
            ),
            ours: fmt_seconds(time),
            reference: fmt_seconds(none),
            ratio: time / none,
            goal,
        });
    }
    Ok(rows)
}
