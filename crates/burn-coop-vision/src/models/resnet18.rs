//! ResNet-18 with a CIFAR stem (3×3 convolution, no max-pooling).

use burn::config::Config;
use burn::tensor::Device;

use super::block::Shortcut;
use super::residual::ResidualNetwork;

/// ResNet-18 for 32×32 inputs: 3×3 convolution to 64 channels + BatchNorm + ReLU, four stages of
/// two basic blocks with 64/128/256/512 channels (stride 2 at stages 2–4, 1×1 convolution +
/// BatchNorm projection shortcuts where the shape changes), global average pooling, linear.
/// 11,173,962 trainable parameters with 10 classes.
#[derive(Config, Debug)]
pub struct ResNet18Config {
    /// Number of output classes.
    #[config(default = 10)]
    pub num_classes: usize,
}

impl ResNet18Config {
    /// Builds the model on `device` (Kaiming-normal convolutions, BatchNorm γ = 1, β = 0).
    pub fn init(&self, device: &Device) -> ResNet18 {
        ResidualNetwork::new(&[64, 128, 256, 512], 2, Shortcut::Projection, self.num_classes, device)
    }
}

/// ResNet-18 with a CIFAR stem (see [`ResNet18Config`]).
pub type ResNet18 = ResidualNetwork;
