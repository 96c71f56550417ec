//! P8: heap memory of 4 replicas training against 4 × one replica training.
//!
//! Needs [`CountingAllocator`](crate::alloc::CountingAllocator) as the global allocator (the
//! bench binary and the smoke test install it). One replica: a ResNet and its SGD optimizer
//! train for a few steps; its peak heap above the starting level is `single`. Four replicas:
//! four threads, each a ResNet in a [`LocalSgd`] (periodic averaging every τ = 4 steps) on an
//! in-process group, train the same number of steps; the peak is `ours`. The ratio is
//! `ours / (4 × single)`: what the cooperative layer adds (flat buffers, the exchange, the
//! rule's state). A second row compares the memory still held after training (weights,
//! optimizer state and our buffers, no activations).

use burn_coop::{LocalSgd, launch, rules::averaging::Averaging, schedule::fixed::PeriodicSchedule};

use crate::alloc;
use crate::setup::{fmt_mib, gradients, random_batch, reference_device, resnet, sgd, train_step};
use crate::{BenchError, Goal, Options, Row};

const WORKERS: usize = 4;
const TAU: u64 = 4;

/// Runs P8.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    if !alloc::installed() {
        return Err("P8 needs burn_coop_benches::alloc::CountingAllocator as the global allocator".into());
    }
    let scale = options.scale;
    let (batch, steps) = (scale.pick(32, 2), 2 * TAU as usize + 1);
    let depth = scale.depth();

    let base = alloc::reset_peak();
    let held_single = {
        let device = reference_device().autodiff();
        let mut model = resnet(depth, &device)?;
        let mut optim = sgd();
        for _ in 0..steps {
            model = train_step(model, &mut optim, batch, &device)?;
        }
        // `model` and `optim` are still alive here: this is what one replica holds.
        alloc::current().saturating_sub(base)
    };
    let peak_single = alloc::peak().saturating_sub(base);

    let base = alloc::reset_peak();
    let held = launch(WORKERS, |worker| -> Result<usize, BenchError> {
        let device = reference_device().autodiff();
        let mut model = resnet(depth, &device)?;
        let mut optim = LocalSgd::new(sgd(), Averaging::new(), PeriodicSchedule::every(TAU)?, worker.comm()?)?;
        for _ in 0..steps {
            let (images, targets) = random_batch(batch, &device);
            let (_, grads) = gradients(&model, images, targets);
            model = optim.step(0.05, model, grads)?;
        }
        // Every worker is done training before anyone measures, then all measure together.
        optim.comm().barrier()?;
        let held = alloc::current();
        optim.comm().barrier()?;
        Ok(held)
    })?;
    let peak_ours = alloc::peak().saturating_sub(base);
    let held_ours = held[0].saturating_sub(base);

    Ok(vec![
        Row {
            id: "P8",
            what: format!(
                "peak heap while training, {WORKERS} ResNet-{depth} replicas (τ = {TAU}, batch {batch}) / {WORKERS} × one replica with SGD"
            ),
            ours: fmt_mib(peak_ours as f64),
            reference: format!("{WORKERS} × {}", fmt_mib(peak_single as f64)),
            ratio: peak_ours as f64 / (WORKERS * peak_single) as f64,
            goal: Goal::AtMost(1.1),
        },
        Row {
            id: "P8",
            what: "heap held after training (weights, optimizer state, our buffers)".into(),
            ours: fmt_mib(held_ours as f64),
            reference: format!("{WORKERS} × {}", fmt_mib(held_single as f64)),
            ratio: held_ours as f64 / (WORKERS * held_single) as f64,
            goal: Goal::Report,
        },
    ])
}
