//! What the benchmarks share: devices, models, batches, synthetic CIFAR data and timing.

use std::time::Instant;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use burn_coop::learner::OptimizerSpec;
use burn_coop_vision::Cifar10;
use burn_coop_vision::models::{CifarResNet, CifarResNetConfig};

use crate::BenchError;

/// The backend every ratio is measured on: Flex, Burn's CPU backend.
pub fn reference_device() -> Device {
    Device::flex()
}

/// Threads the CPU backends use: `RAYON_NUM_THREADS` when set, else the available cores.
pub fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A CIFAR ResNet of `depth` (option A shortcuts, as the learner trains) on `device`, with its
/// parameters initialized.
pub fn resnet(depth: usize, device: &Device) -> Result<CifarResNet, BenchError> {
    let model = CifarResNetConfig::new(depth).init(device)?;
    burn_coop::params::flush_buffers(&model);
    Ok(model)
}

/// The learner's default optimizer: SGD, Nesterov momentum 0.9, weight decay 5e-4.
pub fn sgd() -> ModuleOptimizer {
    OptimizerSpec::default().build()
}

/// A batch of random images (standard normal) and labels.
pub fn random_batch(batch: usize, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let images = Tensor::<4>::random([batch, 3, 32, 32], Distribution::Normal(0.0, 1.0), device);
    let labels: Vec<i64> = (0..batch as i64).map(|k| (k * 7) % 10).collect();
    (images, Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), device))
}

/// Forward and backward on `(images, targets)`: the loss value and the gradients.
pub fn gradients(model: &CifarResNet, images: Tensor<4>, targets: Tensor<1, Int>) -> (f32, GradientsParams) {
    let (loss, _) = model.forward_classification(images, targets);
    let value = loss.clone().into_scalar::<f32>();
    (value, GradientsParams::from_grads(loss.backward(), model))
}

/// One full training step of a plain Burn loop: forward, backward, optimizer step.
pub fn train_step(
    model: CifarResNet,
    optim: &mut ModuleOptimizer,
    batch: usize,
    device: &Device,
) -> Result<CifarResNet, BenchError> {
    let (images, targets) = random_batch(batch, device);
    let (loss, grads) = gradients(&model, images, targets);
    if !loss.is_finite() {
        return Err(format!("the benchmark model's loss is {loss}").into());
    }
    Ok(optim.step(0.05, model, grads))
}

/// A model of four `width × width` linear layers with ReLUs between them: the large-model
/// benchmarks' model, where the cost of moving values dominates Burn's per-tensor costs (width
/// 2048 is 64 MiB of `f32` weights, plus 32 KiB of biases).
#[derive(Module, Debug)]
pub struct WideMlp {
    layers: Vec<Linear>,
}

impl WideMlp {
    /// Four `width × width` layers on `device`, initialized.
    pub fn new(width: usize, device: &Device) -> Self {
        Self { layers: (0..4).map(|_| LinearConfig::new(width, width).init(device)).collect() }
    }

    /// The mean squared output on `input`: a loss with a gradient for every weight.
    pub fn loss(&self, input: Tensor<2>) -> Tensor<1> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for (k, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if k < last {
                x = burn::tensor::activation::relu(x);
            }
        }
        x.powf_scalar(2.0).mean()
    }

    /// The loss's gradients on a random batch of `batch` rows.
    pub fn gradients(&self, batch: usize, device: &Device) -> GradientsParams {
        let width = self.layers[0].weight.dims()[0];
        let input = Tensor::<2>::random([batch, width], Distribution::Normal(0.0, 1.0), device);
        GradientsParams::from_grads(self.loss(input).backward(), self)
    }
}

/// `n` random CIFAR-like images with labels (a deterministic function of `seed`).
pub fn synthetic_cifar(n: usize, seed: u64) -> Result<Cifar10, BenchError> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let images: Vec<u8> = (0..n * 3072).map(|_| next() as u8).collect();
    let labels: Vec<u8> = (0..n).map(|_| (next() % 10) as u8).collect();
    Ok(Cifar10::from_raw(images, labels)?)
}

/// Seconds `f` takes, after syncing `device` so queued work is counted.
pub fn seconds<R>(device: &Device, f: impl FnOnce() -> R) -> Result<(f64, R), BenchError> {
    let start = Instant::now();
    let result = f();
    device.sync().map_err(|e| format!("device sync failed: {e:?}"))?;
    Ok((start.elapsed().as_secs_f64(), result))
}

/// The median of `samples` (NaN when empty).
pub fn median(samples: &[f64]) -> f64 {
    quantile(samples, 0.5)
}

/// The `q`-quantile of `samples` by nearest rank (NaN when empty).
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A duration for the table, in a readable unit.
pub fn fmt_seconds(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.2} s")
    } else if seconds >= 1e-3 {
        format!("{:.3} ms", seconds * 1e3)
    } else {
        format!("{:.1} µs", seconds * 1e6)
    }
}

/// Bytes for the table, in MiB.
pub fn fmt_mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// Parameters and buffers of a module, as the merge moves them.
pub fn flat_len<M: Module>(model: &M) -> usize {
    burn_coop::params::ParamLayout::of(model, burn_coop::params::BufferPolicy::Merge).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_nearest_ranks() {
        let samples = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&samples), 3.0);
        assert_eq!(quantile(&samples, 0.0), 1.0);
        assert_eq!(quantile(&samples, 1.0), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn synthetic_data_is_deterministic_and_labelled() {
        let a = synthetic_cifar(20, 3).unwrap();
        let b = synthetic_cifar(20, 3).unwrap();
        assert_eq!(a.len(), 20);
        assert_eq!(a.images(), b.images());
        assert!(a.labels().iter().all(|&l| l < 10));
        assert_ne!(a.images(), synthetic_cifar(20, 4).unwrap().images());
    }

    #[test]
    fn units_read_naturally() {
        assert_eq!(fmt_seconds(2.5), "2.50 s");
        assert_eq!(fmt_seconds(0.0125), "12.500 ms");
        assert_eq!(fmt_seconds(42e-6), "42.0 µs");
        assert_eq!(fmt_mib(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
