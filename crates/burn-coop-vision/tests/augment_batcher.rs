//! Augmentation determinism and bounds, and the batcher's tensors.

mod common;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::Device;
use burn_coop_vision::{
    AugmentParams, Augmentation, Cifar10, CifarBatcher, CifarSource, IMAGE_BYTES, Normalization, Verify, augment_image,
};
use common::{pattern_data, real_archive};

fn reference_pixel(src: &[u8], p: AugmentParams, c: usize, y: usize, x: usize) -> u8 {
    // Explicitly pad to 40×40, crop at (dy, dx), then mirror.
    let mut padded = vec![0u8; 3 * 40 * 40];
    for cc in 0..3 {
        for yy in 0..32 {
            for xx in 0..32 {
                padded[cc * 1600 + (yy + 4) * 40 + xx + 4] = src[cc * 1024 + yy * 32 + xx];
            }
        }
    }
    let xc = if p.flip { 31 - x } else { x };
    padded[c * 1600 + (y + p.dy) * 40 + xc + p.dx]
}

#[test]
fn crop_and_flip_match_an_explicit_padded_image() {
    let (images, _) = pattern_data(1, 0);
    let src = &images[..IMAGE_BYTES];
    let mut dst = vec![0u8; IMAGE_BYTES];
    for dy in 0..=8 {
        for dx in 0..=8 {
            for flip in [false, true] {
                let p = AugmentParams { dy, dx, flip };
                augment_image(src, p, 4, &mut dst);
                for c in 0..3 {
                    for y in 0..32 {
                        for x in 0..32 {
                            assert_eq!(
                                dst[c * 1024 + y * 32 + x],
                                reference_pixel(src, p, c, y, x),
                                "{p:?} c{c} y{y} x{x}"
                            );
                        }
                    }
                }
            }
        }
    }
    augment_image(src, AugmentParams::identity(4), 4, &mut dst);
    assert_eq!(dst, src);
}

#[test]
fn crop_never_reads_outside_the_padded_image() {
    let aug = Augmentation::new(5);
    let white = vec![255u8; IMAGE_BYTES];
    let mut dst = vec![0u8; IMAGE_BYTES];
    let mut seen_dy = [false; 9];
    let mut seen_dx = [false; 9];
    let mut flips = 0;
    for index in 0..2_000 {
        let p = aug.params(3, index);
        assert!(p.dy <= 8 && p.dx <= 8, "{p:?}");
        seen_dy[p.dy] = true;
        seen_dx[p.dx] = true;
        flips += usize::from(p.flip);
        // Exactly the overlap of the crop window with the original image is non-zero.
        augment_image(&white, p, 4, &mut dst);
        let inside = (32 - p.dy.abs_diff(4)) * (32 - p.dx.abs_diff(4)) * 3;
        assert_eq!(dst.iter().filter(|v| **v == 255).count(), inside);
        assert_eq!(dst.iter().filter(|v| **v == 0).count(), IMAGE_BYTES - inside);
    }
    assert!(seen_dy.iter().all(|s| *s) && seen_dx.iter().all(|s| *s));
    assert!((800..1200).contains(&flips), "{flips} flips out of 2000");
}

#[test]
fn augmentation_is_deterministic_and_seed_dependent() {
    let (images, labels) = pattern_data(64, 3);
    let data = Cifar10::from_raw(images, labels).unwrap();
    let indices: Vec<usize> = (0..64).collect();
    let run = |seed: u64, epoch: u64| {
        let batcher = CifarBatcher::new().with_augmentation(Augmentation::new(seed));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        batcher.fill(&data, &indices, epoch, &mut x, &mut y);
        (x, y)
    };
    let a = run(42, 0);
    assert_eq!(a, run(42, 0), "same seed, same images");
    assert_ne!(a.0, run(43, 0).0, "another seed changes images");
    assert_ne!(a.0, run(42, 1).0, "another epoch changes images");
    assert_eq!(a.1, run(43, 0).1, "labels are never changed");

    // Batch boundaries do not matter: two halves equal the whole.
    let batcher = CifarBatcher::new().with_augmentation(Augmentation::new(42));
    let (mut x1, mut y1, mut x2, mut y2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    batcher.fill(&data, &indices[..20], 0, &mut x1, &mut y1);
    batcher.fill(&data, &indices[20..], 0, &mut x2, &mut y2);
    x1.extend(x2);
    assert_eq!(x1, a.0);
}

#[test]
fn batch_tensors_are_normalized_images_and_labels() {
    let device = Device::flex();
    let (images, labels) = pattern_data(6, 9);
    let data = Cifar10::from_raw(images.clone(), labels.clone()).unwrap();
    let batcher = CifarBatcher::new();
    let batch = batcher.batch_indices(&data, &[4, 0, 5], 0, &device);
    assert_eq!(batch.images.dims(), [3, 3, 32, 32]);
    assert_eq!(batch.targets.dims(), [3]);
    let targets: Vec<i64> = batch.targets.clone().try_into_vec_as::<i64>().unwrap();
    assert_eq!(targets, vec![4, 0, 5]);
    let values: Vec<f32> = batch.images.clone().into_data().try_to_vec::<f32>().unwrap();
    let norm = Normalization::CIFAR10;
    for (b, &item) in [4usize, 0, 5].iter().enumerate() {
        for i in (0..IMAGE_BYTES).step_by(97) {
            let c = i / 1024;
            let pixel = images[item * IMAGE_BYTES + i];
            let expected = (f32::from(pixel) / 255.0 - norm.mean[c]) / norm.std[c];
            assert!((values[b * IMAGE_BYTES + i] - expected).abs() < 1e-6);
        }
    }

    // Burn's Batcher over Dataset items gives the same tensors.
    let items = vec![Dataset::get(&data, 4).unwrap(), Dataset::get(&data, 0).unwrap(), Dataset::get(&data, 5).unwrap()];
    let via_burn = Batcher::batch(&batcher, items, &device);
    let burn_values: Vec<f32> = via_burn.images.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(burn_values, values);
}

#[test]
fn real_training_set_normalizes_to_zero_mean_unit_std() {
    let Some(archive) = real_archive() else {
        return;
    };
    let source = CifarSource::from_path(&archive).unwrap();
    let train = Cifar10::load(&source, burn_coop_vision::CifarSplit::Train, Verify::Official).unwrap();
    let norm = Normalization::CIFAR10;
    let mut sum = [0f64; 3];
    let mut sq = [0f64; 3];
    for image in train.images().chunks_exact(IMAGE_BYTES) {
        for c in 0..3 {
            for &v in &image[c * 1024..(c + 1) * 1024] {
                let z = f64::from(norm.apply(c, v));
                sum[c] += z;
                sq[c] += z * z;
            }
        }
    }
    let n = (train.len() * 1024) as f64;
    for c in 0..3 {
        let mean = sum[c] / n;
        let std = (sq[c] / n - mean * mean).sqrt();
        assert!(mean.abs() < 1e-3, "channel {c} mean {mean}");
        assert!((std - 1.0).abs() < 1e-3, "channel {c} std {std}");
    }
}
