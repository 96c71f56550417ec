//! Generated CIFAR-format data for the CLI tests.

use std::path::{Path, PathBuf};

use burn_coop_vision::cifar::record::write_batch_file;

/// A CIFAR-format folder with `per_file` images in each of the five training files and the test
/// file; pixels and labels follow a fixed pattern.
pub fn generated_cifar(dir: &Path, per_file: usize) -> PathBuf {
    let folder = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&folder).unwrap();
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (f, name) in names.iter().enumerate() {
        let labels: Vec<u8> = (0..per_file).map(|i| ((i + f) % 10) as u8).collect();
        let images: Vec<u8> = (0..per_file * 3072).map(|k| ((k * 7 + f * 13 + (k / 3072) * 29) % 256) as u8).collect();
        write_batch_file(&folder.join(name), &images, &labels).unwrap();
    }
    folder
}
