//! Training augmentation: random 32×32 crop of the image zero-padded by 4 pixels, and random
//! horizontal flip. The draw for an image depends only on `(seed, epoch, index)`, so results do
//! not depend on batch boundaries, order or thread count.

use crate::cifar::record::{CHANNELS, HEIGHT, IMAGE_BYTES, PLANE_BYTES, WIDTH};
use crate::rng::SplitMix64;

/// Random crop + flip configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    /// Seed of the augmentation streams.
    pub seed: u64,
    /// Zero padding on each side before cropping (4 for the standard CIFAR recipe).
    pub padding: usize,
    /// Flip horizontally with probability 1/2.
    pub flip: bool,
}

/// The draw for one image: crop offsets into the padded image (`0..=2·padding` each) and flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AugmentParams {
    /// Row offset of the crop in the padded image.
    pub dy: usize,
    /// Column offset of the crop in the padded image.
    pub dx: usize,
    /// Whether the crop is mirrored left–right.
    pub flip: bool,
}

impl AugmentParams {
    /// The parameters that leave an image unchanged for a given padding.
    pub fn identity(padding: usize) -> Self {
        Self { dy: padding, dx: padding, flip: false }
    }
}

impl Augmentation {
    /// The standard CIFAR augmentation (padding 4, flips) with the given seed.
    pub fn new(seed: u64) -> Self {
        Self { seed, padding: 4, flip: true }
    }

    /// The draw for image `index` at `epoch`.
    pub fn params(&self, epoch: u64, index: usize) -> AugmentParams {
        let mut rng = SplitMix64::stream(self.seed, epoch, index as u64);
        let span = 2 * self.padding as u64 + 1;
        let dy = rng.below(span) as usize;
        let dx = rng.below(span) as usize;
        let flip = self.flip && rng.next_u64() >> 63 == 1;
        AugmentParams { dy, dx, flip }
    }

    /// Augments one image (3,072 bytes, R, G, B planes) into `dst`.
    pub fn apply(&self, src: &[u8], epoch: u64, index: usize, dst: &mut [u8]) {
        augment_image(src, self.params(epoch, index), self.padding, dst);
    }
}

/// Writes the crop of `src` padded by `padding` zero pixels at offset `(p.dy, p.dx)`, mirrored
/// when `p.flip`: output pixel `(y, x)` reads source pixel `(y + dy − padding, x' + dx − padding)`
/// with `x' = 31 − x` when flipped, else `x`; reads outside the source give 0. No read ever
/// leaves `src`. Panics if `src` or `dst` is not 3,072 bytes.
pub fn augment_image(src: &[u8], p: AugmentParams, padding: usize, dst: &mut [u8]) {
    assert_eq!(src.len(), IMAGE_BYTES, "source image must be 3072 bytes");
    assert_eq!(dst.len(), IMAGE_BYTES, "destination image must be 3072 bytes");
    let oy = p.dy as isize - padding as isize;
    let ox = p.dx as isize - padding as isize;
    for c in 0..CHANNELS {
        let src_plane = &src[c * PLANE_BYTES..(c + 1) * PLANE_BYTES];
        let dst_plane = &mut dst[c * PLANE_BYTES..(c + 1) * PLANE_BYTES];
        for y in 0..HEIGHT {
            let row = &mut dst_plane[y * WIDTH..(y + 1) * WIDTH];
            let sy = y as isize + oy;
            if !(0..HEIGHT as isize).contains(&sy) {
                row.fill(0);
                continue;
            }
            let src_row = &src_plane[sy as usize * WIDTH..(sy as usize + 1) * WIDTH];
            for (x, out) in row.iter_mut().enumerate() {
                let xc = if p.flip { WIDTH - 1 - x } else { x };
                let sx = xc as isize + ox;
                *out = if (0..WIDTH as isize).contains(&sx) { src_row[sx as usize] } else { 0 };
            }
        }
    }
}
