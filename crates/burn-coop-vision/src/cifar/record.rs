//! The CIFAR-10 binary record format: one label byte followed by 3,072 pixel bytes (the red,
//! green and blue planes of a 32×32 image, rows top to bottom).

use std::path::Path;

use crate::error::{CifarError, Result};

/// Image height in pixels.
pub const HEIGHT: usize = 32;
/// Image width in pixels.
pub const WIDTH: usize = 32;
/// Colour channels (R, G, B planes).
pub const CHANNELS: usize = 3;
/// Pixels in one colour plane.
pub const PLANE_BYTES: usize = HEIGHT * WIDTH;
/// Pixel bytes of one image.
pub const IMAGE_BYTES: usize = CHANNELS * PLANE_BYTES;
/// Bytes of one record: the label byte plus the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Class names, indexed by label.
pub const CLASS_NAMES: [&str; NUM_CLASSES] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Parses the bytes of one batch file, appending pixels to `images` and labels to `labels`.
///
/// `path` only names the source in errors. Returns the number of records read.
///
/// # Errors
/// [`CifarError::BadFileSize`] when `bytes.len()` is not a multiple of [`RECORD_BYTES`],
/// [`CifarError::BadLabel`] when a label byte is above 9.
pub fn parse_records(bytes: &[u8], path: &Path, images: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<usize> {
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(CifarError::BadFileSize { path: path.to_path_buf(), size: bytes.len() as u64 });
    }
    let n = bytes.len() / RECORD_BYTES;
    for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = chunk[0];
        if usize::from(label) >= NUM_CLASSES {
            return Err(CifarError::BadLabel { path: path.to_path_buf(), record, label });
        }
    }
    images.reserve(n * IMAGE_BYTES);
    labels.reserve(n);
    for chunk in bytes.chunks_exact(RECORD_BYTES) {
        labels.push(chunk[0]);
        images.extend_from_slice(&chunk[1..]);
    }
    Ok(n)
}

/// Encodes images (`labels.len() * 3,072` bytes, R, G, B planes each) and labels into the
/// binary record format. Panics if the lengths disagree; meant for generating files.
pub fn encode_records(images: &[u8], labels: &[u8]) -> Vec<u8> {
    assert_eq!(images.len(), labels.len() * IMAGE_BYTES, "images must hold labels.len() * 3072 bytes");
    let mut out = Vec::with_capacity(labels.len() * RECORD_BYTES);
    for (label, image) in labels.iter().zip(images.chunks_exact(IMAGE_BYTES)) {
        out.push(*label);
        out.extend_from_slice(image);
    }
    out
}

/// Writes images and labels as a CIFAR-10 binary batch file (see [`encode_records`]).
///
/// # Errors
/// [`CifarError::Io`] when the file cannot be written.
pub fn write_batch_file(path: &Path, images: &[u8], labels: &[u8]) -> Result<()> {
    std::fs::write(path, encode_records(images, labels)).map_err(|e| CifarError::io(path, e))
}
