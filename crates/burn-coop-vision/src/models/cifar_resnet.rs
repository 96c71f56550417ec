//! ResNet-20/32/44/56/110 for CIFAR (He et al. 2016, section 4.2).

use burn::config::Config;
use burn::tensor::Device;

use super::block::Shortcut;
use super::residual::ResidualNetwork;
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
        Ok(ResidualNetwork::new(&[16, 32, 64], n, self.shortcut, self.num_classes, device))
    }
}

/// A CIFAR ResNet of depth 6n+2 (see [`CifarResNetConfig`]).
pub type CifarResNet = ResidualNetwork;
