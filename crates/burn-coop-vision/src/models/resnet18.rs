//! ResNet-18 with a CIFAR stem (3×3 convolution, no max-pooling).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, Relu};
use burn::tensor::{Device, Int, Tensor};

use super::block::{BasicBlock, Shortcut, conv};

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
        let mut blocks = Vec::with_capacity(8);
        let mut in_ch = 64;
        for (stage, out_ch) in [64, 128, 256, 512].into_iter().enumerate() {
            for i in 0..2 {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(in_ch, out_ch, stride, Shortcut::Projection, device));
                in_ch = out_ch;
            }
        }
        ResNet18 {
            conv: conv(3, 64, 3, 1, device),
            bn: BatchNormConfig::new(64).init(device),
            relu: Relu::new(),
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(512, self.num_classes).init(device),
        }
    }
}

/// ResNet-18 with a CIFAR stem (see [`ResNet18Config`]).
#[derive(Module, Debug)]
pub struct ResNet18 {
    conv: Conv2d,
    bn: BatchNorm,
    relu: Relu,
    blocks: Vec<BasicBlock>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResNet18 {
    /// Logits `[B, classes]` of images `[B, 3, H, W]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = self.relu.forward(self.bn.forward(self.conv.forward(images)));
        for block in &self.blocks {
            x = block.forward(x);
        }
        let x = self.pool.forward(x).flatten::<2>(1, 3);
        self.fc.forward(x)
    }

    /// Mean cross-entropy loss `[1]` and logits `[B, classes]`.
    pub fn forward_classification(&self, images: Tensor<4>, targets: Tensor<1, Int>) -> (Tensor<1>, Tensor<2>) {
        let logits = self.forward(images);
        let loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), targets);
        (loss, logits)
    }
}
