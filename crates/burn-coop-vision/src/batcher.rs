//! Batching CIFAR-10 images into normalized `[B, 3, 32, 32]` tensors, with optional augmentation.
//!
//! The fast path ([`CifarBatcher::fill`] / [`CifarBatcher::batch_indices`]) works directly on the
//! in-memory byte buffer: no per-item allocation, one `TensorData` per batch, normalization by a
//! 256-entry lookup table per channel.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::augment::{AugmentParams, Augmentation, augment_image};
use crate::cifar::record::{CHANNELS, HEIGHT, IMAGE_BYTES, PLANE_BYTES, WIDTH};
use crate::cifar::{Cifar10, CifarItem};

/// Per-channel mean and standard deviation of pixel values scaled to `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Mean of R, G, B.
    pub mean: [f32; 3],
    /// Standard deviation of R, G, B.
    pub std: [f32; 3],
}

impl Normalization {
    /// CIFAR-10 training-set statistics (over all 50,000 × 1,024 pixels per channel).
    pub const CIFAR10: Self =
        Self { mean: [0.491_399_7, 0.482_158_4, 0.446_530_9], std: [0.247_032_2, 0.243_485_1, 0.261_587_8] };

    /// Scaling to `[0, 1]` only.
    pub const NONE: Self = Self { mean: [0.0; 3], std: [1.0; 3] };

    /// The normalized value of pixel byte `v` in channel `c`.
    pub fn apply(&self, c: usize, v: u8) -> f32 {
        (f32::from(v) / 255.0 - self.mean[c]) / self.std[c]
    }

    fn table(&self) -> [[f32; 256]; CHANNELS] {
        let mut lut = [[0.0; 256]; CHANNELS];
        for (c, row) in lut.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                *out = self.apply(c, v as u8);
            }
        }
        lut
    }
}

/// A batch: images `[B, 3, 32, 32]` and class targets `[B]`.
#[derive(Debug, Clone)]
pub struct CifarBatch {
    /// Normalized images.
    pub images: Tensor<4>,
    /// Class indices 0..=9.
    pub targets: Tensor<1, Int>,
}

/// Builds [`CifarBatch`]es, optionally augmenting with an [`Augmentation`].
#[derive(Debug, Clone)]
pub struct CifarBatcher {
    normalization: Normalization,
    lut: Box<[[f32; 256]; CHANNELS]>,
    augmentation: Option<Augmentation>,
    epoch: u64,
}

impl Default for CifarBatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl CifarBatcher {
    /// CIFAR-10 normalization, no augmentation, epoch 0.
    pub fn new() -> Self {
        Self::with_normalization(Normalization::CIFAR10)
    }

    /// A batcher with the given normalization and no augmentation.
    pub fn with_normalization(normalization: Normalization) -> Self {
        Self { normalization, lut: Box::new(normalization.table()), augmentation: None, epoch: 0 }
    }

    /// Enables training augmentation.
    pub fn with_augmentation(mut self, augmentation: Augmentation) -> Self {
        self.augmentation = Some(augmentation);
        self
    }

    /// Sets the epoch used by the Burn [`Batcher`] implementation (whose items carry their index
    /// but not the epoch).
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The normalization in use.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }

    /// The augmentation in use, if any.
    pub fn augmentation(&self) -> Option<Augmentation> {
        self.augmentation
    }

    /// Writes the normalized (and, if enabled, augmented) image of dataset item `index` at
    /// `epoch` into `out` (3,072 floats, channel-major).
    pub fn write_image(&self, src: &[u8], index: usize, epoch: u64, out: &mut [f32]) {
        let mut buf = [0u8; IMAGE_BYTES];
        let pixels: &[u8] = match &self.augmentation {
            Some(aug) => {
                augment_image(src, aug.params(epoch, index), aug.padding, &mut buf);
                &buf
            }
            None => src,
        };
        for c in 0..CHANNELS {
            let lut = &self.lut[c];
            let range = c * PLANE_BYTES..(c + 1) * PLANE_BYTES;
            for (o, &v) in out[range.clone()].iter_mut().zip(&pixels[range]) {
                *o = lut[usize::from(v)];
            }
        }
    }

    /// Fills `images` (`indices.len() · 3,072` floats) and `labels` for the given dataset indices.
    /// Panics on an index out of range.
    pub fn fill(&self, data: &Cifar10, indices: &[usize], epoch: u64, images: &mut Vec<f32>, labels: &mut Vec<i64>) {
        images.clear();
        images.resize(indices.len() * IMAGE_BYTES, 0.0);
        labels.clear();
        for (&index, out) in indices.iter().zip(images.chunks_exact_mut(IMAGE_BYTES)) {
            self.write_image(data.image(index), index, epoch, out);
            labels.push(i64::from(data.label(index)));
        }
    }

    /// The batch of the given dataset indices at `epoch`, on `device`.
    pub fn batch_indices(&self, data: &Cifar10, indices: &[usize], epoch: u64, device: &Device) -> CifarBatch {
        let mut images = Vec::new();
        let mut labels = Vec::new();
        self.fill(data, indices, epoch, &mut images, &mut labels);
        to_batch(images, labels, device)
    }

    /// The augmentation draw of `index` at `epoch` (identity when augmentation is off).
    pub fn params(&self, epoch: u64, index: usize) -> AugmentParams {
        match &self.augmentation {
            Some(aug) => aug.params(epoch, index),
            None => AugmentParams::identity(0),
        }
    }
}

/// Wraps host buffers into a [`CifarBatch`] (`images.len()` must be `labels.len() · 3,072`).
pub fn to_batch(images: Vec<f32>, labels: Vec<i64>, device: &Device) -> CifarBatch {
    let b = labels.len();
    let images = Tensor::<4>::from_data(TensorData::new(images, [b, CHANNELS, HEIGHT, WIDTH]), device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [b]), device);
    CifarBatch { images, targets }
}

impl Batcher<CifarItem, CifarBatch> for CifarBatcher {
    fn batch(&self, items: Vec<CifarItem>, device: &Device) -> CifarBatch {
        let mut images = vec![0.0; items.len() * IMAGE_BYTES];
        let mut labels = Vec::with_capacity(items.len());
        for (item, out) in items.iter().zip(images.chunks_exact_mut(IMAGE_BYTES)) {
            self.write_image(&item.image, item.index, self.epoch, out);
            labels.push(i64::from(item.label));
        }
        to_batch(images, labels, device)
    }
}
