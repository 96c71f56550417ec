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

use burn_coop::{
    LocalSgd, launch,
    rules::{MergeRule, averaging::Averaging, diloco::DiLoCo, elastic::Elastic},
    schedule::fixed::PeriodicSchedule,
};

use crate::alloc;
use crate::setup::{WideMlp, flat_len, fmt_mib, gradients, random_batch, reference_device, resnet, sgd, train_step};
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

    let mut rows = vec![
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
    ];
    rows.extend(wide_rows(options)?);
    Ok(rows)
}

/// A rule for the wide model's rows, with the share of a model its own state holds.
type RuleMaker = fn() -> Result<Box<dyn MergeRule>, BenchError>;

/// The large-model rows: four workers each training [`WideMlp`] (64 MiB of weights at full
/// scale) with SGD and momentum, merged by averaging, elastic averaging and DiLoCo. The
/// reference is what the replicas cannot do without: 4 × (weights + momentum) of one replica
/// trained alone. "Held" is the heap after training (every worker done, nothing in flight);
/// "peak" is the highest heap during one merge started from that state.
fn wide_rows(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let (width, batch) = (scale.pick(2048, 256), scale.pick(16, 4));
    let steps = 2 * TAU as usize;

    let base = alloc::reset_peak();
    let single = {
        let device = reference_device().autodiff();
        let mut model = WideMlp::new(width, &device);
        let mut optim = sgd();
        for _ in 0..steps {
            let grads = model.gradients(batch, &device);
            model = optim.step(0.01, model, grads);
        }
        let held = alloc::current().saturating_sub(base);
        drop((model, optim));
        held
    };
    let model_bytes = flat_len(&WideMlp::new(width, &reference_device())) * 4;

    let rules: [(&str, RuleMaker, f64); 3] = [
        ("averaging", || Ok(Box::new(Averaging::new())), 0.0),
        ("elastic", || Ok(Box::new(Elastic::optimal(WORKERS)?)), 1.0),
        ("DiLoCo", || Ok(Box::new(DiLoCo::new(0.7, 0.9, true)?)), 2.0),
    ];
    let mut rows = Vec::new();
    for (name, rule, own_state) in rules {
        let base = alloc::reset_peak();
        let measured = launch(WORKERS, |worker| -> Result<(usize, usize), BenchError> {
            let device = reference_device().autodiff();
            let mut model = WideMlp::new(width, &device);
            let mut optim = LocalSgd::new(sgd(), rule()?, PeriodicSchedule::every(TAU)?, worker.comm()?)?;
            for _ in 0..steps {
                let grads = model.gradients(batch, &device);
                model = optim.step(0.01, model, grads)?;
            }
            optim.comm().barrier()?;
            let held = alloc::current();
            optim.comm().barrier()?;
            if worker.rank() == 0 {
                alloc::reset_peak();
            }
            optim.comm().barrier()?;
            let model = optim.merge(model)?;
            optim.comm().barrier()?;
            let peak = alloc::peak();
            drop(model);
            Ok((held, peak))
        })?;
        let (held, peak) = (measured[0].0.saturating_sub(base), measured[0].1.saturating_sub(base));
        let reference = WORKERS * single;
        // The rule's own state per worker, in units of one replica's weights + momentum.
        let state = own_state * model_bytes as f64 / single as f64;
        rows.push(Row {
            id: "P8",
            what: format!(
                "heap held after training, {WORKERS} × {width}² MLP ({}) with {name} (its own state {own_state} model per worker)",
                fmt_mib(model_bytes as f64)
            ),
            ours: fmt_mib(held as f64),
            reference: format!("{WORKERS} × {}", fmt_mib(single as f64)),
            ratio: held as f64 / reference as f64,
            goal: Goal::AtMost(((1.0 + state + 0.05) * 100.0).round() / 100.0),
        });
        rows.push(Row {
            id: "P8",
            what: format!("… peak heap during one {name} merge"),
            ours: fmt_mib(peak as f64),
            reference: format!("{WORKERS} × {}", fmt_mib(single as f64)),
            ratio: peak as f64 / reference as f64,
            goal: Goal::Report,
        });
    }
    Ok(rows)
}
