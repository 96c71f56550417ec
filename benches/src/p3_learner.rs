//! P3: the learner's throughput against a plain Burn training loop.
//!
//! Both train the same CIFAR ResNet on the same synthetic CIFAR-10 images through the same data
//! pipeline (`CifarTask`: augmentation, normalization, batching) with the same optimizer. Ours:
//! the [`Learner`] with 4 replicas × batch 32, periodic averaging every τ = 8 steps, metrics
//! written as in a real run. The reference: one model, batch 128 (the same images per step), a
//! loop of forward, loss read-out, backward and optimizer step. Images per second include
//! everything from building the models to the last step.

use std::sync::Arc;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn_coop::learner::{CoopTask, LrSchedule, LrShape};
use burn_coop::rules::averaging::AveragingConfig;
use burn_coop::schedule::fixed::FixedConfig;
use burn_coop::{
    learner::{Learner, LearnerConfig},
    rules::RuleSpec,
    schedule::ScheduleSpec,
};
use burn_coop_vision::Partition;
use burn_coop_vision::task::{CifarTask, ModelKind};

use crate::setup::{reference_device, sgd, synthetic_cifar};
use crate::{BenchError, Goal, Options, Row};

const WORKERS: usize = 4;
const TAU: u64 = 8;

/// ResNet-20 at both scales (the task's smallest model); the smoke scale shrinks the batches.
fn task(images: usize, workers: usize, batch: usize) -> Result<CifarTask, BenchError> {
    let train = Arc::new(synthetic_cifar(images, 1)?);
    let test = Arc::new(synthetic_cifar(batch, 2)?);
    let partition = Partition::iid(images, workers, 7)?;
    Ok(CifarTask::new(train, test, partition, ModelKind::Resnet20, batch, true, 3))
}

/// Runs P3.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let (batch, steps) = (scale.pick(32, 2), scale.pick(40, 2 * TAU as usize));
    let total_batch = WORKERS * batch;
    // One more batch than the run uses, so no epoch ends (no evaluation, no checkpoint).
    let images = total_batch * (steps + 1);

    let plain = plain_images_per_second(task(images, 1, total_batch)?, total_batch, steps)?;
    let ours = learner_images_per_second(task(images, WORKERS, batch)?, batch, steps as u64)?;
    Ok(vec![Row {
        id: "P3",
        what: format!(
            "training throughput, ResNet-20, {WORKERS} replicas × batch {batch} (τ = {TAU}) / one model at batch {total_batch}, {steps} steps"
        ),
        ours: format!("{ours:.1} img/s"),
        reference: format!("{plain:.1} img/s"),
        ratio: ours / plain,
        goal: Goal::AtLeast(0.95),
    }])
}

fn learner_images_per_second(task: CifarTask, batch: usize, steps: u64) -> Result<f64, BenchError> {
    let output = tempfile::tempdir()?;
    let config = LearnerConfig {
        workers: WORKERS,
        rule: RuleSpec::Average(AveragingConfig::default()),
        schedule: ScheduleSpec::Fixed(FixedConfig { tau: Some(TAU), warmup_steps: None }),
        epochs: 1,
        lr: LrSchedule { lr: 0.05, shape: LrShape::Constant, warmup_epochs: 0.0, min_lr: 0.0 },
        output: output.path().to_path_buf(),
        max_steps: Some(steps),
        progress: false,
        ..LearnerConfig::default()
    };
    let images = (WORKERS as u64 * steps) as f64 * batch as f64;
    let start = Instant::now();
    let summary = Learner::new(task, config, vec![reference_device()]).run()?;
    let seconds = start.elapsed().as_secs_f64();
    let syncs = summary.workers[0].syncs;
    if syncs != steps / TAU {
        return Err(format!("the learner merged {syncs} times in {steps} steps, expected {}", steps / TAU).into());
    }
    Ok(images / seconds)
}

fn plain_images_per_second(task: CifarTask, batch: usize, steps: usize) -> Result<f64, BenchError> {
    let device = reference_device().autodiff();
    let start = Instant::now();
    device.seed(42);
    let mut model = task.init_model(&device);
    let mut optim = sgd();
    for index in 0..steps {
        let loss = task.loss(&model, task.train_batch(0, 1, 0, index, &device));
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(format!("the plain loop's loss is {value} at step {index}").into());
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.05, model, grads);
    }
    device.sync().map_err(|e| format!("device sync failed: {e:?}"))?;
    Ok((steps * batch) as f64 / start.elapsed().as_secs_f64())
}
