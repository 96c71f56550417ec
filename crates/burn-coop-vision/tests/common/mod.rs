//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use burn_coop_vision::IMAGE_BYTES;

/// The shared copy of the real archive, if present (`<repo>/../shared/datasets/cifar10/`).
pub fn real_archive() -> Option<PathBuf> {
    let path =
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/datasets/cifar10/cifar-10-binary.tar.gz"));
    if path.is_file() {
        Some(path)
    } else {
        println!("skipping: real CIFAR-10 archive not found at {}", path.display());
        None
    }
}

/// A fresh, empty temporary folder, removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("burn-coop-vision-test-").tempdir().expect("temp dir")
}

/// `n` images with a known pattern (depends on image index, channel, row and column) and labels
/// `i % 10`.
pub fn pattern_data(n: usize, salt: u8) -> (Vec<u8>, Vec<u8>) {
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    for i in 0..n {
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let v = (i * 7 + c * 50 + y * 3 + x * 5) as u8 ^ salt;
                    images.push(v);
                }
            }
        }
    }
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    (images, labels)
}

/// Builds a `.tar.gz` from `(path, bytes)` regular-file entries.
pub fn write_tar_gz(path: &Path, entries: &[(&str, &[u8])]) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, *bytes).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

/// Builds a `.tar.gz` with one raw entry whose name (and link name) bytes are written verbatim,
/// bypassing the tar writer's own path checks.
pub fn write_raw_tar_gz(path: &Path, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    let mut header = tar::Header::new_old();
    {
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(kind);
    header.set_cksum();
    builder.append(&header, data).unwrap();
    builder.into_inner().unwrap().finish().unwrap().flush().unwrap();
}
