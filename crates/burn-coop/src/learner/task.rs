//! What the learner trains: a model, its data and its loss, supplied by the user.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

/// Totals of an evaluation pass over (part of) a test set.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Evaluation {
    /// Sum of per-example losses.
    pub loss_sum: f64,
    /// Correctly classified examples.
    pub correct: u64,
    /// Examples seen.
    pub count: u64,
}

impl Evaluation {
    /// Mean loss per example.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }

    /// Fraction classified correctly.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count.max(1) as f64
    }
}

/// A training problem for the cooperative learner.
///
/// Data access is by `(worker, epoch, index)` rather than through an iterator, so that every
/// worker's data order is a pure function of the seed and a run can stop and resume at any step
/// with exactly the same batches.
pub trait CoopTask: Send + Sync + 'static {
    /// The model.
    type Model: Module + 'static;
    /// One training batch, already on the worker's device.
    type Batch;

    /// A freshly initialized model on `device`. Called once per replica; the learner copies the
    /// first replica's weights into the others so all start equal.
    fn init_model(&self, device: &Device) -> Self::Model;

    /// Training batches per epoch of `worker` among `workers`.
    fn batches_per_epoch(&self, worker: usize, workers: usize) -> usize;

    /// Batch `index` of `epoch` for `worker`.
    fn train_batch(&self, worker: usize, workers: usize, epoch: usize, index: usize, device: &Device) -> Self::Batch;

    /// The training loss of `model` on `batch` (a scalar tensor to call `backward` on).
    fn loss(&self, model: &Self::Model, batch: Self::Batch) -> Tensor<1>;

    /// Evaluates `model` (without autodiff) on part `part` of `parts` of the test set; the
    /// learner splits evaluation across workers and sums the parts.
    fn evaluate(&self, model: &Self::Model, part: usize, parts: usize, device: &Device) -> Evaluation;
}
