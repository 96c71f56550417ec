//! ResNet-20/32/44/56/110 for CIFAR (He et al. 2016, section 4.2).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, Relu};
use burn::tensor::{Device, Int, Tensor};

use super::block::{BasicBlock, Shortcut, conv};
use crate::error::ModelError;

/// Configuration of a CIFAR ResNet of depth 6n+2: a 3×3 convolution to 16 channels, three
/// stages of n basic blocks with 16, 32 and 64 channels (stride 2 at the first block of stages 2
/// and 3), BatchNorm + ReLU, global average pooling and a linear classifier.
///
/// The default shortcut is [`Shortcut::ZeroPad`] (option A of the paper, parameter-free, as used
/// for the paper's CIFAR-10 results); [`Shortcut::Projection`] selects option B. Trainable
/// parameter counts (option A / option B): ResNet-20 269,722 / 272,474; ResNet-32 464,154 /
/// 466,906; ResNet-44 658,586 / 661,338; ResNet-56 853,018 / 855,770; ResNet-110 1,727,962 /
/// 1,730,714.
#[derive(Config, Debug)]
pub struct CifarResNetConfig {
    /// Total depth, 6n+2 (20, 32, 44, 56, 110, ...).
    pub depth: usize,
    /// Shortcut used where a block changes shape.
    #[config(default = "Shortcut::ZeroPad")]
    pub shortcut: Shortcut,
    /// Number of output classes.
    #[config(default = 10)]
    pub num_classes: usize,
}

impl CifarResNetConfig {
    /// ResNet-20 (n = 3).
    pub fn resnet20() -> Self {
        Self::new(20)
    }
    /// ResNet-32 (n = 5).
    pub fn resnet32() -> Self {
        Self::new(32)
    }
    /// ResNet-44 (n = 7).
    pub fn resnet44() -> Self {
        Self::new(44)
    }
    /// ResNet-56 (n = 9).
    pub fn resnet56() -> Self {
        Self::new(56)
    }
    /// ResNet-110 (n = 18).
    pub fn resnet110() -> Self {
        Self::new(110)
    }

    /// Blocks per stage, n = (depth − 2) / 6.
    ///
    /// # Errors
    /// [`ModelError::InvalidDepth`] unless depth = 6n+2 with n ≥ 1.
    pub fn blocks_per_stage(&self) -> Result<usize, ModelError> {
        if self.depth < 8 || !(self.depth - 2).is_multiple_of(6) {
            return Err(ModelError::InvalidDepth { depth: self.depth });
        }
        Ok((self.depth - 2) / 6)
    }

    /// Builds the model on `device` (Kaiming-normal convolutions, BatchNorm γ = 1, β = 0).
    ///
    /// # Errors
    /// [`ModelError::InvalidDepth`].
    pub fn init(&self, device: &Device) -> Result<CifarResNet, ModelError> {
        let n = self.blocks_per_stage()?;
        let mut blocks = Vec::with_capacity(3 * n);
        let mut in_ch = 16;
        for (stage, out_ch) in [16, 32, 64].into_iter().enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(in_ch, out_ch, stride, self.shortcut, device));
                in_ch = out_ch;
            }
        }
        Ok(CifarResNet {
            conv: conv(3, 16, 3, 1, device),
            bn: BatchNormConfig::new(16).init(device),
            relu: Relu::new(),
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(64, self.num_classes).init(device),
        })
    }
}

/// A CIFAR ResNet (see [`CifarResNetConfig`]).
#[derive(Module, Debug)]
pub struct CifarResNet {
    conv: Conv2d,
    bn: BatchNorm,
    relu: Relu,
    blocks: Vec<BasicBlock>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl CifarResNet {
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
