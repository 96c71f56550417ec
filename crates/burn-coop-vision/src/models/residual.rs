//! The network both CIFAR ResNet families share: a 3×3 stem, stages of basic blocks, global
//! average pooling and a linear classifier.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, Relu};
use burn::tensor::{Device, Int, Tensor};

use super::block::{BasicBlock, Shortcut, conv};

/// A residual network for 32×32 images: a 3×3 convolution + BatchNorm + ReLU stem, stages of
/// basic blocks (stride 2 at the first block of every stage after the first), global average
/// pooling and a linear classifier. Built by [`CifarResNetConfig`](super::CifarResNetConfig)
/// and [`ResNet18Config`](super::ResNet18Config).
#[derive(Module, Debug)]
pub struct ResidualNetwork {
    conv: Conv2d,
    bn: BatchNorm,
    relu: Relu,
    blocks: Vec<BasicBlock>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResidualNetwork {
    /// Stages of `blocks_per_stage` blocks with `widths` channels; the stem outputs `widths[0]`.
    pub(crate) fn new(
        widths: &[usize],
        blocks_per_stage: usize,
        shortcut: Shortcut,
        num_classes: usize,
        device: &Device,
    ) -> Self {
        let mut blocks = Vec::with_capacity(widths.len() * blocks_per_stage);
        let mut in_ch = widths[0];
        for (stage, &out_ch) in widths.iter().enumerate() {
            for i in 0..blocks_per_stage {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(in_ch, out_ch, stride, shortcut, device));
                in_ch = out_ch;
            }
        }
        Self {
            conv: conv(3, widths[0], 3, 1, device),
            bn: BatchNormConfig::new(widths[0]).init(device),
            relu: Relu::new(),
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(in_ch, num_classes).init(device),
        }
    }

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
