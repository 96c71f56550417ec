//! A small but complete burn-train program — a model with `TrainStep`/`InferenceStep`,
//! classification output, accuracy and loss metrics, synthetic data — trained by four workers
//! with local SGD. The only line that differs from a single-device burn-train program is the
//! `with_training_strategy` call in [`train`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::AdamConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep, TrainingStrategy,
};
use burn_coop::rules::averaging::AveragingConfig;
use burn_coop::train_strategy::LocalSgdRun;
use burn_coop::{rules::RuleSpec, train_strategy::LocalSgdStrategy};

/// Number of classes of the synthetic problem.
pub const CLASSES: usize = 4;

/// One labelled point in the plane.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Coordinates.
    pub x: [f32; 2],
    /// Class in `0..CLASSES`.
    pub label: i64,
}

/// A batch of samples as tensors.
#[derive(Debug, Clone)]
pub struct SampleBatch {
    /// `[batch, 2]` coordinates.
    pub inputs: Tensor<2>,
    /// `[batch]` classes.
    pub targets: Tensor<1, Int>,
}

/// Turns samples into a [`SampleBatch`].
#[derive(Debug, Clone, Copy)]
pub struct SampleBatcher;

impl Batcher<Sample, SampleBatch> for SampleBatcher {
    fn batch(&self, items: Vec<Sample>, device: &Device) -> SampleBatch {
        let n = items.len();
        let xs: Vec<f32> = items.iter().flat_map(|s| s.x).collect();
        let ys: Vec<i64> = items.iter().map(|s| s.label).collect();
        SampleBatch {
            inputs: Tensor::from_data(TensorData::new(xs, [n, 2]), device),
            targets: Tensor::from_data(TensorData::new(ys, [n]), device),
        }
    }
}

/// `count` points from four overlapping clusters on a circle of radius 2, one per class,
/// generated from `seed` (a fixed linear congruential generator, so runs are reproducible).
pub fn synthetic(count: usize, seed: u64) -> Vec<Sample> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    };
    (0..count)
        .map(|i| {
            let label = (i % CLASSES) as i64;
            let angle = std::f32::consts::TAU * label as f32 / CLASSES as f32;
            // Box–Muller: a normal sample with standard deviation 0.8.
            let (u, v) = (uniform(), uniform());
            let radius = (-2.0 * u.ln()).sqrt() * 0.8;
            let (s, c) = (std::f32::consts::TAU * v).sin_cos();
            Sample { x: [2.0 * angle.cos() + radius * c, 2.0 * angle.sin() + radius * s], label }
        })
        .collect()
}

/// A two-layer perceptron classifier.
#[derive(Module, Debug)]
pub struct Mlp {
    hidden: Linear,
    output: Linear,
    relu: Relu,
}

impl Mlp {
    /// A fresh model on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(2, 32).init(device),
            output: LinearConfig::new(32, CLASSES).init(device),
            relu: Relu::new(),
        }
    }

    /// Logits and cross-entropy loss of a batch.
    pub fn forward_classification(&self, batch: SampleBatch) -> ClassificationOutput {
        let logits = self.output.forward(self.relu.forward(self.hidden.forward(batch.inputs)));
        let loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), batch.targets.clone());
        ClassificationOutput::new(loss, logits, batch.targets)
    }
}

impl TrainStep for Mlp {
    type Input = SampleBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: SampleBatch) -> TrainOutput<ClassificationOutput> {
        let item = self.forward_classification(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl InferenceStep for Mlp {
    type Input = SampleBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: SampleBatch) -> ClassificationOutput {
        self.forward_classification(batch)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Train with local SGD (`false`: burn-train's default single-device strategy).
    pub local_sgd: bool,
    /// Local SGD workers.
    pub workers: usize,
    /// Optimizer steps between merges.
    pub tau: u64,
    /// Epochs.
    pub epochs: usize,
    /// Training points (split between the workers).
    pub train_points: usize,
    /// Batch size of every worker.
    pub batch_size: usize,
    /// Where burn-train writes its logs and metrics.
    pub artifacts: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            local_sgd: true,
            workers: 4,
            tau: 8,
            epochs: 4,
            train_points: 8192,
            batch_size: 32,
            artifacts: std::env::temp_dir().join("burn-train-local-sgd"),
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Accuracy of the returned model on 2048 held-out points.
    pub accuracy: f32,
    /// The workers' counters (local SGD only).
    pub run: Option<LocalSgdRun>,
    /// Wall-clock time of the training.
    pub elapsed: Duration,
}

/// Trains the model with burn-train and evaluates the model it returns.
pub fn train(options: &Options) -> Result<Outcome, String> {
    let device = Device::flex();
    let train_loader = DataLoaderBuilder::new(SampleBatcher)
        .batch_size(options.batch_size)
        .shuffle(7)
        .build(InMemDataset::new(synthetic(options.train_points, 1)));
    let valid_loader =
        DataLoaderBuilder::new(SampleBatcher).batch_size(256).build(InMemDataset::new(synthetic(1024, 2)));
    let strategy = Arc::new(
        LocalSgdStrategy::new(options.workers, vec![device.clone()])
            .rule(RuleSpec::Average(AveragingConfig::default()))
            .tau(options.tau),
    );

    let training = SupervisedTraining::new(&options.artifacts, train_loader, valid_loader)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .num_epochs(options.epochs);
    let training = if options.local_sgd {
        training.with_training_strategy(TrainingStrategy::Custom(strategy.clone()))
    } else {
        training
    };

    let started = Instant::now();
    let result = training.launch(Learner::new(Mlp::new(&device.clone().autodiff()), AdamConfig::new().init(), 1e-2));
    let elapsed = started.elapsed();
    if let Some(error) = result.error {
        return Err(error.to_string());
    }
    Ok(Outcome {
        accuracy: accuracy(&result.model, &synthetic(2048, 3), &device),
        run: options.local_sgd.then(|| strategy.last_run()).flatten(),
        elapsed,
    })
}

/// Fraction of `samples` that `model` classifies correctly.
pub fn accuracy(model: &Mlp, samples: &[Sample], device: &Device) -> f32 {
    let output = model.valid().forward_classification(SampleBatcher.batch(samples.to_vec(), device));
    let predicted = output.output.argmax(1).reshape([samples.len()]);
    let correct: i64 = predicted.equal(output.targets).int().sum().into_scalar();
    correct as f32 / samples.len() as f32
}

/// A loader over `samples`, for tests.
pub fn loader(samples: Vec<Sample>, batch_size: usize) -> Arc<dyn DataLoader<SampleBatch>> {
    DataLoaderBuilder::new(SampleBatcher).batch_size(batch_size).build(InMemDataset::new(samples))
}
