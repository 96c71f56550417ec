//! CIFAR-10 classification as a [`burn_coop::learner::CoopTask`]: the glue between this crate's data and
//! models and the cooperative learner.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use burn_coop::learner::{CoopTask, Evaluation};
use serde::{Deserialize, Serialize};

use crate::augment::Augmentation;
use crate::batcher::{CifarBatch, CifarBatcher};
use crate::cifar::Cifar10;
use crate::error::ModelError;
use crate::models::{CifarResNet, CifarResNetConfig, ResNet18, ResNet18Config};
use crate::partition::Partition;
use crate::rng::SplitMix64;

/// The CIFAR models this task can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// ResNet-20 (0.27 M parameters).
    Resnet20,
    /// ResNet-32.
    Resnet32,
    /// ResNet-44.
    Resnet44,
    /// ResNet-56.
    Resnet56,
    /// ResNet-110.
    Resnet110,
    /// ResNet-18 with a CIFAR stem (11.2 M parameters).
    Resnet18,
}

impl ModelKind {
    /// A freshly initialized model.
    pub fn init(self, device: &Device) -> Result<CifarModel, ModelError> {
        let depth = match self {
            Self::Resnet18 => return Ok(CifarModel::ResNet18(ResNet18Config::new().init(device))),
            Self::Resnet20 => 20,
            Self::Resnet32 => 32,
            Self::Resnet44 => 44,
            Self::Resnet56 => 56,
            Self::Resnet110 => 110,
        };
        Ok(CifarModel::Cifar(CifarResNetConfig::new(depth).init(device)?))
    }
}

/// One of the CIFAR models.
#[derive(Module, Debug)]
pub enum CifarModel {
    /// A CIFAR ResNet of depth 6n+2.
    Cifar(CifarResNet),
    /// ResNet-18 with a CIFAR stem.
    ResNet18(ResNet18),
}

impl CifarModel {
    /// Mean cross-entropy loss and logits.
    pub fn forward_classification(&self, batch: CifarBatch) -> (Tensor<1>, Tensor<2>) {
        match self {
            Self::Cifar(model) => model.forward_classification(batch.images, batch.targets),
            Self::ResNet18(model) => model.forward_classification(batch.images, batch.targets),
        }
    }
}

/// CIFAR-10 training split across workers, evaluated on the test set.
#[derive(Debug, Clone)]
pub struct CifarTask {
    train: Arc<Cifar10>,
    test: Arc<Cifar10>,
    partition: Partition,
    model: ModelKind,
    batch_size: usize,
    eval_batch_size: usize,
    seed: u64,
    train_batcher: CifarBatcher,
    eval_batcher: CifarBatcher,
}

impl CifarTask {
    /// A task over `train` split by `partition` (one shard per worker), with batches of
    /// `batch_size` per worker, standard augmentation when `augment` is set, and the shuffle and
    /// augmentation streams derived from `seed`.
    pub fn new(
        train: Arc<Cifar10>,
        test: Arc<Cifar10>,
        partition: Partition,
        model: ModelKind,
        batch_size: usize,
        augment: bool,
        seed: u64,
    ) -> Self {
        let mut train_batcher = CifarBatcher::new();
        if augment {
            train_batcher = train_batcher.with_augmentation(Augmentation { seed, padding: 4, flip: true });
        }
        Self {
            train,
            test,
            partition,
            model,
            batch_size,
            eval_batch_size: 500,
            seed,
            train_batcher,
            eval_batcher: CifarBatcher::new(),
        }
    }

    /// Test images per evaluation batch (default 500).
    pub fn with_eval_batch_size(self, eval_batch_size: usize) -> Self {
        Self { eval_batch_size: eval_batch_size.max(1), ..self }
    }

    /// The partition of the training set.
    pub fn partition(&self) -> &Partition {
        &self.partition
    }
}

impl CoopTask for CifarTask {
    type Model = CifarModel;
    type Batch = CifarBatch;

    fn init_model(&self, device: &Device) -> CifarModel {
        self.model.init(device).expect("model kinds name valid depths")
    }

    fn batches_per_epoch(&self, worker: usize, _workers: usize) -> usize {
        self.partition.shard(worker).len() / self.batch_size
    }

    fn train_batch(&self, worker: usize, _workers: usize, epoch: usize, index: usize, device: &Device) -> CifarBatch {
        let mut order = self.partition.shard(worker).to_vec();
        SplitMix64::stream(self.seed, epoch as u64, worker as u64).shuffle(&mut order);
        let indices = &order[index * self.batch_size..(index + 1) * self.batch_size];
        self.train_batcher.batch_indices(&self.train, indices, epoch as u64, device)
    }

    fn loss(&self, model: &CifarModel, batch: CifarBatch) -> Tensor<1> {
        model.forward_classification(batch).0
    }

    fn evaluate(&self, model: &CifarModel, part: usize, parts: usize, device: &Device) -> Evaluation {
        let mut total = Evaluation::default();
        let all: Vec<usize> = (0..self.test.len()).collect();
        for chunk in all.chunks(self.eval_batch_size).skip(part).step_by(parts.max(1)) {
            let batch = self.eval_batcher.batch_indices(&self.test, chunk, 0, device);
            let targets = batch.targets.clone();
            let (loss, logits) = model.forward_classification(batch);
            let correct = logits.argmax(1).squeeze_dim::<1>(1).equal(targets).int().sum().into_scalar::<i64>();
            total.loss_sum += f64::from(loss.into_scalar::<f32>()) * chunk.len() as f64;
            total.correct += correct as u64;
            total.count += chunk.len() as u64;
        }
        total
    }
}
