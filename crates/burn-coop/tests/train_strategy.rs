//! `LocalSgdStrategy` inside burn-train's `SupervisedTraining`: a linear classifier on two
//! separable clusters, trained by several workers.
#![cfg(feature = "burn-train")]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::lr_scheduler::constant::ConstantLr;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::SgdConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::logger::InMemoryMetricLogger;
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, LearningResult, SupervisedTraining, TrainOutput, TrainStep,
    TrainingStrategy,
};
use burn_coop::params::parameter_fingerprint;
use burn_coop::rules::{averaging::AveragingConfig, elastic::ElasticConfig, gossip::GossipConfig};
use burn_coop::train_strategy::LocalSgdStrategy;
use burn_coop::{
    rules::RuleSpec,
    topology::{TopologySpec, WeightRule},
};

#[derive(Debug, Clone, Copy)]
struct Point {
    x: [f32; 2],
    label: i64,
}

#[derive(Debug, Clone)]
struct Batch {
    inputs: Tensor<2>,
    targets: Tensor<1, Int>,
}

struct PointBatcher;

impl Batcher<Point, Batch> for PointBatcher {
    fn batch(&self, items: Vec<Point>, device: &Device) -> Batch {
        let n = items.len();
        let xs: Vec<f32> = items.iter().flat_map(|p| p.x).collect();
        let ys: Vec<i64> = items.iter().map(|p| p.label).collect();
        Batch {
            inputs: Tensor::from_data(TensorData::new(xs, [n, 2]), device),
            targets: Tensor::from_data(TensorData::new(ys, [n]), device),
        }
    }
}

/// Two Gaussian-like clusters around (±1, ±1), labels 0 and 1, from a fixed LCG.
fn points(count: usize, seed: u64) -> Vec<Point> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    let mut uniform = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as f32) / (1u64 << 31) as f32
    };
    (0..count)
        .map(|i| {
            let label = (i % 2) as i64;
            let centre = if label == 0 { -1.0 } else { 1.0 };
            let noise = |u: f32, v: f32| (u + v - 1.0) * 0.8;
            let x = [centre + noise(uniform(), uniform()), centre + noise(uniform(), uniform())];
            Point { x, label }
        })
        .collect()
}

#[derive(Module, Debug)]
struct Classifier {
    linear: Linear,
}

impl Classifier {
    fn new(device: &Device) -> Self {
        Self { linear: LinearConfig::new(2, 2).init(device) }
    }

    fn forward(&self, batch: Batch) -> ClassificationOutput {
        let output = self.linear.forward(batch.inputs);
        let loss = CrossEntropyLossConfig::new().init(&output.device()).forward(output.clone(), batch.targets.clone());
        ClassificationOutput::new(loss, output, batch.targets)
    }
}

impl TrainStep for Classifier {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        let item = self.forward(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl InferenceStep for Classifier {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.forward(batch)
    }
}

/// Panics in its training step on the thread of worker 1, after a few steps.
#[derive(Module, Debug)]
struct Faulty {
    inner: Classifier,
}

static FAULTY_STEPS_ON_WORKER_1: AtomicUsize = AtomicUsize::new(0);

impl TrainStep for Faulty {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        if std::thread::current().name() == Some("coop-worker-1") {
            let steps = FAULTY_STEPS_ON_WORKER_1.fetch_add(1, Ordering::SeqCst);
            assert!(steps < 4, "worker 1 broke down");
        }
        let item = self.inner.forward(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl InferenceStep for Faulty {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.inner.forward(batch)
    }
}

fn loader(items: Vec<Point>, batch_size: usize) -> Arc<dyn DataLoader<Batch>> {
    DataLoaderBuilder::new(PointBatcher).batch_size(batch_size).build(InMemDataset::new(items))
}

/// Mean cross-entropy and accuracy of `model` on `items`.
fn evaluate(model: &Classifier, items: &[Point]) -> (f32, f32) {
    let device = Device::flex();
    let model = model.valid();
    let output = model.forward(PointBatcher.batch(items.to_vec(), &device));
    let loss = output.loss.into_scalar::<f32>();
    let predicted = output.output.argmax(1).reshape([items.len()]);
    let correct = predicted.equal(output.targets).int().sum().into_scalar::<i64>();
    (loss, correct as f32 / items.len() as f32)
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-coop-train-strategy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train<M: burn::train::LearnerModel + TrainStep<Input = Batch> + InferenceStep<Input = Batch>>(
    name: &str,
    model: M,
    strategy: &Arc<LocalSgdStrategy>,
    train_items: Vec<Point>,
    epochs: usize,
) -> LearningResult<M> {
    let dir = scratch_dir(name);
    let result = SupervisedTraining::new(&dir, loader(train_items, 16), loader(points(64, 99), 32))
        .num_epochs(epochs)
        .with_metric_logger(InMemoryMetricLogger::new())
        .with_application_logger(None)
        .with_training_strategy(TrainingStrategy::Custom(strategy.clone()))
        .launch(Learner::new(model, SgdConfig::new().init(), ConstantLr::from(0.2)));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn two_workers_average_every_three_steps_and_end_with_one_model() {
    let device = Device::flex().autodiff();
    let model = Classifier::new(&device);
    let train_items = points(256, 1);
    let (loss_before, _) = evaluate(&model, &train_items);

    let strategy = Arc::new(
        LocalSgdStrategy::new(2, vec![Device::flex()]).rule(RuleSpec::Average(AveragingConfig::default())).tau(3),
    );
    let result = train("average", model, &strategy, train_items.clone(), 3);
    assert!(result.error.is_none(), "{:?}", result.error);

    let (loss_after, accuracy) = evaluate(&result.model, &train_items);
    assert!(loss_after < 0.5 * loss_before, "loss {loss_before} -> {loss_after}");
    assert!(accuracy > 0.9, "accuracy {accuracy}");

    // 128 points per worker in batches of 16: 8 steps per epoch, 24 in all. τ = 3 merges at
    // steps 3, 6, …, 24; the epoch ends at steps 8 and 16 add a merge each (24 just merged).
    let run = strategy.last_run().expect("the run is recorded");
    assert_eq!(run.workers.len(), 2);
    let returned = parameter_fingerprint(&result.model).unwrap();
    for worker in &run.workers {
        assert_eq!(worker.batches, 24);
        assert_eq!(worker.optimizer_steps, 24);
        assert_eq!(worker.coop.syncs, 10, "worker {}", worker.rank);
        assert_eq!(worker.parameter_fingerprint, returned, "worker {} differs from the result", worker.rank);
    }
}

#[test]
fn gradient_accumulation_and_unequal_slices_keep_the_workers_in_lockstep() {
    let device = Device::flex().autodiff();
    let model = Classifier::new(&device);
    // 3 workers over 200 points: slices of 66, 66 and 68 points, 5 batches of 16 each; with
    // an accumulation of 2 that is 3 optimizer steps per epoch (the last on a partial window).
    let train_items = points(200, 2);
    let strategy = Arc::new(
        LocalSgdStrategy::new(3, vec![Device::flex()]).rule(RuleSpec::Average(AveragingConfig::default())).tau(2),
    );
    let dir = scratch_dir("accumulation");
    let result = SupervisedTraining::new(&dir, loader(train_items.clone(), 16), loader(points(64, 98), 32))
        .num_epochs(2)
        .grads_accumulation(2)
        .with_metric_logger(InMemoryMetricLogger::new())
        .with_application_logger(None)
        .with_training_strategy(TrainingStrategy::Custom(strategy.clone()))
        .launch(Learner::new(model, SgdConfig::new().init(), ConstantLr::from(0.2)));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(result.error.is_none(), "{:?}", result.error);

    let run = strategy.last_run().unwrap();
    assert_eq!(run.workers.len(), 3);
    for worker in &run.workers {
        assert_eq!(worker.batches, 10);
        assert_eq!(worker.optimizer_steps, 6);
        // Merges at steps 2, 4, 6 plus the end of epoch 1 (step 3).
        assert_eq!(worker.coop.syncs, 4);
        assert_eq!(worker.parameter_fingerprint, run.workers[0].parameter_fingerprint);
    }
}

#[test]
fn elastic_and_gossip_train_and_return_the_average_model() {
    let train_items = points(240, 3);
    let rules = [
        RuleSpec::Elastic(ElasticConfig { alpha: None, anchors: None }),
        RuleSpec::Gossip(GossipConfig {
            topology: Some(TopologySpec::Ring),
            weights: Some(WeightRule::MetropolisHastings),
        }),
    ];
    for rule in rules {
        let device = Device::flex().autodiff();
        let model = Classifier::new(&device);
        let (loss_before, _) = evaluate(&model, &train_items);
        let strategy = Arc::new(LocalSgdStrategy::new(3, vec![Device::flex()]).rule(rule.clone()).tau(2));
        let result = train("rules", model, &strategy, train_items.clone(), 3);
        assert!(result.error.is_none(), "{rule:?}: {:?}", result.error);

        let (loss_after, accuracy) = evaluate(&result.model, &train_items);
        assert!(loss_after < 0.5 * loss_before, "{rule:?}: loss {loss_before} -> {loss_after}");
        assert!(accuracy > 0.9, "{rule:?}: accuracy {accuracy}");

        // 80 points per worker: 5 steps per epoch, 15 in all, merges at 2, 4, …, 14 only
        // (these rules do not merge at epoch ends; the average is evaluated instead).
        let run = strategy.last_run().unwrap();
        assert_eq!(run.workers.len(), 3);
        for worker in &run.workers {
            assert_eq!(worker.optimizer_steps, 15, "{rule:?}");
            assert_eq!(worker.coop.steps, 15, "{rule:?}: the synchronizer counts the steps it drives");
            assert_eq!(worker.coop.syncs, 7, "{rule:?}");
        }
    }
}

#[test]
fn a_panicking_worker_ends_training_with_an_error() {
    let device = Device::flex().autodiff();
    let model = Faulty { inner: Classifier::new(&device) };
    let strategy = Arc::new(LocalSgdStrategy::new(2, vec![Device::flex()]).tau(2));
    let result = train("panic", model, &strategy, points(256, 4), 5);

    let error = result.error.expect("the panic is reported").to_string();
    assert!(error.contains("device 1") && error.contains("worker 1 broke down"), "{error}");
    // Worker 0 learns of the loss at its next collective and stops too; the panic, not the
    // lost peer, is reported as the cause.
    assert!(!error.contains("was lost"), "{error}");
    let run = strategy.last_run().unwrap();
    assert!(run.workers.is_empty(), "no worker ends normally: {run:?}");
}

#[test]
fn non_finite_parameters_on_one_worker_stop_every_worker() {
    let device = Device::flex().autodiff();
    let model = Classifier::new(&device);
    // The second half of the data, worker 1's slice, holds NaN inputs.
    let mut train_items = points(128, 5);
    for point in &mut train_items[64..] {
        point.x = [f32::NAN, f32::NAN];
    }
    let strategy = Arc::new(LocalSgdStrategy::new(2, vec![Device::flex()]).tau(2));
    let result = train("nan", model, &strategy, train_items, 3);

    let error = result.error.expect("the merge failure is reported").to_string();
    assert!(error.contains("non-finite") && error.contains("worker 1"), "{error}");
    let run = strategy.last_run().unwrap();
    assert!(run.workers.is_empty(), "every worker stops at the failed merge: {run:?}");
}

#[test]
fn an_invalid_configuration_fails_before_training() {
    let device = Device::flex().autodiff();
    let model = Classifier::new(&device);
    let strategy = Arc::new(LocalSgdStrategy::new(2, vec![Device::flex()]).tau(0));
    let result = train("config", model, &strategy, points(64, 6), 1);
    let error = result.error.expect("τ = 0 is reported").to_string();
    assert!(error.contains("τ"), "{error}");
    assert!(strategy.last_run().is_none());
}

#[test]
fn asynchronous_local_sgd_is_refused_with_the_reason() {
    let device = Device::flex().autodiff();
    let model = Classifier::new(&device);
    let rule = RuleSpec::Async(burn_coop::rules::async_local_sgd::AsyncConfig::default());
    let strategy = Arc::new(LocalSgdStrategy::new(2, vec![Device::flex()]).rule(rule));
    let result = train("async", model, &strategy, points(64, 7), 1);
    let error = result.error.expect("async is refused").to_string();
    assert!(error.contains("local threads") && error.contains("rule"), "{error}");
    assert!(strategy.last_run().is_none());
}
