//! Shared helpers for the integration tests: the kit's tiny model on the Flex device, and a way
//! to run one closure per worker thread.
#![allow(dead_code)]

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use burn_coop::comm::{InProcessComm, InProcessGroup};

pub use burn_coop::testing::{Tiny, flat, test_value as value};

pub fn device() -> Device {
    Device::flex().autodiff()
}

/// A fresh model (independent BatchNorm state) whose every float tensor, buffers included,
/// holds deterministic values for `rank`. Running variances stay positive.
pub fn tiny_for(rank: usize) -> Tiny {
    burn_coop::testing::tiny_for(rank, &device())
}

/// Fixed gradients for every trainable tensor of `module`, depending on rank and step.
pub fn fixed_grads<M: Module>(module: &M, rank: usize, step: u64) -> GradientsParams {
    burn_coop::testing::fixed_grads(module, rank, step, &Device::flex())
}

/// Runs `work(rank, comm)` on `m` workers (the crate's one launcher) and returns the results in
/// rank order; a panicking worker fails the test with its message.
pub fn run_workers<R: Send>(m: usize, work: impl Fn(usize, InProcessComm) -> R + Sync) -> Vec<R> {
    let comms = InProcessGroup::new(m).into_communicators();
    burn_coop::run_group(comms, |rank, comm| Ok::<R, std::convert::Infallible>(work(rank, comm)))
        .unwrap_or_else(|failure| panic!("worker failed: {:?}", failure.primary().failure))
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
