//! The basic residual block (two 3×3 convolutions) shared by the CIFAR ResNets and ResNet-18.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor, s};

/// How a block's shortcut matches the residual when the block changes resolution and width
/// (He et al. 2016). Blocks that keep the shape always use the identity.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Shortcut {
    /// Option A, parameter-free: the input is subsampled with stride 2 (`x[:, :, ::2, ::2]`) and
    /// the missing channels are zeros appended after the existing ones.
    ZeroPad,
    /// Option B: a 1×1 convolution with the block's stride followed by BatchNorm.
    Projection,
}

/// Kaiming normal initialization for ReLU networks (fan-out mode, gain √2), as in He et al.
pub fn kaiming_conv() -> Initializer {
    Initializer::KaimingNormal { gain: std::f64::consts::SQRT_2, fan_out_only: true }
}

/// A bias-free convolution with square kernel `k`, stride `stride` and symmetric padding `k / 2`,
/// Kaiming-initialized.
pub fn conv(in_ch: usize, out_ch: usize, k: usize, stride: usize, device: &Device) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([in_ch, out_ch], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_bias(false)
        .with_initializer(kaiming_conv())
        .init(device)
}

/// A 1×1 convolution + BatchNorm projection shortcut.
#[derive(Module, Debug)]
pub struct Projection {
    conv: Conv2d,
    bn: BatchNorm,
}

impl Projection {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.conv.forward(x))
    }
}

/// `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`; `conv1` carries the stride.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    projection: Option<Projection>,
    /// Stride of the block (1 or 2); used by the zero-padding shortcut.
    stride: usize,
    /// Zero channels appended by the zero-padding shortcut.
    pad_channels: usize,
    relu: Relu,
}

impl BasicBlock {
    /// A block from `in_ch` to `out_ch` channels with the given stride and shortcut kind.
    pub fn new(in_ch: usize, out_ch: usize, stride: usize, shortcut: Shortcut, device: &Device) -> Self {
        let reshapes = stride != 1 || in_ch != out_ch;
        let projection = (reshapes && shortcut == Shortcut::Projection).then(|| Projection {
            conv: conv(in_ch, out_ch, 1, stride, device),
            bn: BatchNormConfig::new(out_ch).init(device),
        });
        let zero_pad = reshapes && shortcut == Shortcut::ZeroPad;
        Self {
            conv1: conv(in_ch, out_ch, 3, stride, device),
            bn1: BatchNormConfig::new(out_ch).init(device),
            conv2: conv(out_ch, out_ch, 3, 1, device),
            bn2: BatchNormConfig::new(out_ch).init(device),
            projection,
            stride: if zero_pad { stride } else { 1 },
            pad_channels: if zero_pad { out_ch.saturating_sub(in_ch) } else { 0 },
            relu: Relu::new(),
        }
    }

    /// Applies the block to `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = self.shortcut(x.clone());
        let y = self.relu.forward(self.bn1.forward(self.conv1.forward(x)));
        let y = self.bn2.forward(self.conv2.forward(y));
        self.relu.forward(y + shortcut)
    }

    fn shortcut(&self, x: Tensor<4>) -> Tensor<4> {
        if let Some(p) = &self.projection {
            return p.forward(x);
        }
        let x = if self.stride > 1 {
            let st = self.stride as isize;
            x.slice(s![.., .., ..;st, ..;st])
        } else {
            x
        };
        if self.pad_channels == 0 {
            return x;
        }
        let [b, _, h, w] = x.dims();
        let zeros = Tensor::<4>::zeros([b, self.pad_channels, h, w], &x.device());
        Tensor::cat(vec![x, zeros], 1)
    }
}
