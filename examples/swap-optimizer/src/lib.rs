//! What the two versions of the training loop share: the model, the data set and its batches.
//! `src/bin/plain.rs` is an ordinary Burn training loop; `src/main.rs` is the same loop run by
//! four cooperating workers.

use std::sync::Arc;

use burn::data::dataset::{Dataset, InMemDataset};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::tensor::{Device, Tensor, TensorData};

/// Inputs per sample.
pub const INPUTS: usize = 4;

/// A two-layer perceptron.
#[derive(Module, Debug)]
pub struct Mlp {
    hidden: Linear,
    out: Linear,
    relu: Relu,
}

impl Mlp {
    /// A new model on `device` (its weights drawn from the device's generator).
    pub fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(INPUTS, 32).init(device),
            out: LinearConfig::new(32, 1).init(device),
            relu: Relu,
        }
    }

    /// The predictions for a batch `[n, INPUTS]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.relu.forward(self.hidden.forward(x)))
    }
}

/// One sample of the regression `y = sin(x₀) + x₁·x₂ − x₃/2` on `[−1, 1]⁴`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The inputs.
    pub x: [f32; INPUTS],
    /// The target.
    pub y: f32,
}

/// A seeded generator (SplitMix64), so that every run draws the same data.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// A data set of samples, shared (cheaply cloned) between workers.
pub type Data = Arc<InMemDataset<Sample>>;

/// The data set: `samples` samples drawn from `seed`, split into a training set (seven eighths)
/// and a validation set.
pub fn dataset(samples: usize, seed: u64) -> (Data, Data) {
    let mut draws = Draws(seed);
    let all: Vec<Sample> = (0..samples)
        .map(|_| {
            let x = [draws.uniform(), draws.uniform(), draws.uniform(), draws.uniform()];
            Sample { x, y: x[0].sin() + x[1] * x[2] - x[3] / 2.0 }
        })
        .collect();
    let (train, valid) = all.split_at(samples * 7 / 8);
    (Arc::new(InMemDataset::new(train.to_vec())), Arc::new(InMemDataset::new(valid.to_vec())))
}

/// The batches of `size` samples of `data` in an order drawn from `seed` (the last one may be
/// smaller), as tensors on `device`.
pub fn batches(data: &impl Dataset<Sample>, size: usize, seed: u64, device: &Device) -> Vec<(Tensor<2>, Tensor<2>)> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut draws = Draws(seed);
    for k in (1..order.len()).rev() {
        order.swap(k, (draws.next() % (k as u64 + 1)) as usize);
    }
    order
        .chunks(size)
        .map(|indices| tensors(indices.iter().map(|&i| data.get(i).expect("in memory")), device))
        .collect()
}

fn tensors(samples: impl Iterator<Item = Sample>, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let samples: Vec<Sample> = samples.collect();
    let x: Vec<f32> = samples.iter().flat_map(|s| s.x).collect();
    let y: Vec<f32> = samples.iter().map(|s| s.y).collect();
    let n = samples.len();
    (Tensor::from_data(TensorData::new(x, [n, INPUTS]), device), Tensor::from_data(TensorData::new(y, [n, 1]), device))
}

/// The mean squared error of `model` on all of `data`.
pub fn validation_loss(model: &Mlp, data: &impl Dataset<Sample>, device: &Device) -> f32 {
    let (x, y) = tensors((0..data.len()).map(|i| data.get(i).expect("in memory")), device);
    (model.forward(x) - y).powi_scalar(2).mean().into_scalar::<f32>()
}

/// The number of epochs from the first argument (default `default`).
pub fn epochs_from_args(default: usize) -> Result<usize, std::num::ParseIntError> {
    std::env::args().nth(1).map_or(Ok(default), |s| s.parse())
}
