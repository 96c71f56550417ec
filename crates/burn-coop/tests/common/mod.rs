//! Shared helpers for the integration tests: a tiny model with a BatchNorm, deterministic
//! parameters and gradients, and a way to run one closure per worker thread.
#![allow(dead_code)]

use std::thread;

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use burn_coop::params::{BufferPolicy, ParamLayout, TensorRole};
use burn_coop::{InProcessGroup, InProcessTransport};

/// Linear(3→4) → BatchNorm(4) → Linear(4→2): weights, biases, BN affine and BN buffers.
#[derive(Module, Debug)]
pub struct Tiny {
    pub fc1: Linear,
    pub bn: BatchNorm,
    pub fc2: Linear,
}

impl Tiny {
    pub fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(3, 4).init(device),
            bn: BatchNormConfig::new(4).init(device),
            fc2: LinearConfig::new(4, 2).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.fc1.forward(x);
        let h: Tensor<3> = self.bn.forward(h.unsqueeze_dim(2));
        self.fc2.forward(h.squeeze_dim(2))
    }
}

pub fn device() -> Device {
    Device::flex().autodiff()
}

/// A deterministic value for position `k` of worker `rank`'s `which` vector.
pub fn value(rank: usize, k: usize, which: u64) -> f32 {
    let x = (k as f64 + 1.0) * 0.37 + rank as f64 * 1.91 + which as f64 * 0.53;
    (x.sin() * 0.8 + 0.1 * (x * 3.1).cos()) as f32
}

/// A fresh model (independent BatchNorm state) whose every float tensor, buffers included,
/// holds deterministic values for `rank`. Running variances stay positive.
pub fn tiny_for(rank: usize) -> Tiny {
    let model = Tiny::new(&device());
    let layout = ParamLayout::of(&model, BufferPolicy::Merge);
    let mut flat: Vec<f32> = (0..layout.len()).map(|k| value(rank, k, 0)).collect();
    for slot in layout.slots() {
        if slot.role == TensorRole::Buffer {
            let offset = slot.offset.unwrap();
            flat[offset..offset + slot.len()].iter_mut().for_each(|v| *v = v.abs() + 0.5);
        }
    }
    layout.unflatten(model, &flat).unwrap()
}

/// Fixed gradients for every trainable tensor of `module`, depending on rank and step.
pub fn fixed_grads<M: Module>(module: &M, rank: usize, step: u64) -> GradientsParams {
    let layout = ParamLayout::of(module, BufferPolicy::Merge);
    let mut grads = GradientsParams::new();
    let plain = Device::flex();
    for slot in layout.slots().iter().filter(|s| s.role == TensorRole::Parameter) {
        let offset = slot.offset.unwrap();
        let values: Vec<f32> = (0..slot.len()).map(|k| value(rank, offset + k, 100 + step)).collect();
        let data = TensorData::new(values, slot.shape.clone());
        match slot.shape.len() {
            1 => grads.register::<1>(slot.id, Tensor::from_data(data, &plain)),
            2 => grads.register::<2>(slot.id, Tensor::from_data(data, &plain)),
            rank => panic!("unexpected rank {rank}"),
        }
    }
    grads
}

/// The flat buffer of every float tensor (buffers included) of `module`.
pub fn flat<M: Module>(module: &M) -> Vec<f32> {
    ParamLayout::of(module, BufferPolicy::Merge).flatten(module).unwrap()
}

/// Runs `work(rank, transport)` on `m` threads and returns the results in rank order.
pub fn run_workers<R: Send + 'static>(
    m: usize,
    work: impl Fn(usize, InProcessTransport) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let handles: Vec<_> = InProcessGroup::new(m)
        .into_transports()
        .into_iter()
        .enumerate()
        .map(|(rank, transport)| {
            let work = work.clone();
            thread::spawn(move || work(rank, transport))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("worker thread panicked")).collect()
}

pub fn assert_close(actual: &[f32], expected: &[f64], tolerance: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (k, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (f64::from(a) - e).abs() <= tolerance,
            "{what}: value {k} is {a}, expected {e} (tolerance {tolerance})"
        );
    }
}
