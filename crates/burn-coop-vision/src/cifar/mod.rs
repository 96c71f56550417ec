//! The CIFAR-10 binary release, decoded once into memory.

pub mod checksum;
pub mod record;
pub mod source;

use std::path::{Path, PathBuf};

use burn::data::dataset::{Dataset, DatasetError};

use crate::error::{CifarError, Result};
use crate::manifest::Manifest;
use record::{IMAGE_BYTES, NUM_CLASSES};
use source::{BATCHES_DIR, CifarSource};

/// Training or test split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CifarSplit {
    /// The 50,000 training images (`data_batch_1.bin` … `data_batch_5.bin`).
    Train,
    /// The 10,000 test images (`test_batch.bin`).
    Test,
}

impl CifarSplit {
    /// The batch file names of this split, in reading order.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Self::Train => {
                &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"]
            }
            Self::Test => &["test_batch.bin"],
        }
    }
}

/// Whether loaded files are checked against the official manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Every file must match its md5 in [`Manifest::official`]; a file name not listed there is
    /// a mismatch too.
    #[default]
    Official,
    /// No checksum verification (generated or modified data).
    Skip,
}

/// One image with its label, as returned by [`Dataset::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CifarItem {
    /// 3,072 bytes: R, G, B planes of 32×32, rows top to bottom.
    pub image: Vec<u8>,
    /// Class index 0..=9 (see [`record::CLASS_NAMES`]).
    pub label: u8,
    /// Position of the item in its dataset (drives deterministic augmentation).
    pub index: usize,
}

/// A CIFAR-10 split held in memory: `len() * 3,072` pixel bytes plus one label byte per image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cifar10 {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl Cifar10 {
    /// Builds a dataset from raw pixels (`labels.len() * 3,072` bytes) and labels.
    ///
    /// # Errors
    /// [`CifarError::InvalidData`] when the lengths disagree or a label is above 9.
    pub fn from_raw(images: Vec<u8>, labels: Vec<u8>) -> Result<Self> {
        if images.len() != labels.len() * IMAGE_BYTES {
            return Err(CifarError::InvalidData(format!(
                "{} image bytes for {} labels (expected {})",
                images.len(),
                labels.len(),
                labels.len() * IMAGE_BYTES
            )));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| usize::from(**l) >= NUM_CLASSES) {
            return Err(CifarError::InvalidData(format!("label {l} of item {i} is above 9")));
        }
        Ok(Self { images, labels })
    }

    /// Loads one split from a folder or an archive (read in memory, not extracted).
    ///
    /// # Errors
    /// Any [`CifarError`] about missing files, sizes, labels, checksums or the archive.
    pub fn load(source: &CifarSource, split: CifarSplit, verify: Verify) -> Result<Self> {
        match source {
            CifarSource::Folder(dir) => {
                let paths: Vec<PathBuf> = split.files().iter().map(|f| dir.join(f)).collect();
                Self::from_files(&paths, verify)
            }
            CifarSource::Archive(archive) => {
                let mut files = source::read_archive_files(archive, split.files())?;
                let mut data = Self::default();
                for name in split.files() {
                    let bytes = files.remove(*name).unwrap_or_default();
                    data.append_file_bytes(&archive.join(BATCHES_DIR).join(name), &bytes, verify)?;
                }
                Ok(data)
            }
        }
    }

    /// Loads both splits, reading an archive only once. Returns `(train, test)`.
    ///
    /// # Errors
    /// As [`Cifar10::load`].
    pub fn load_splits(source: &CifarSource, verify: Verify) -> Result<(Self, Self)> {
        match source {
            CifarSource::Folder(_) => {
                Ok((Self::load(source, CifarSplit::Train, verify)?, Self::load(source, CifarSplit::Test, verify)?))
            }
            CifarSource::Archive(archive) => {
                let all: Vec<&str> =
                    CifarSplit::Train.files().iter().chain(CifarSplit::Test.files()).copied().collect();
                let mut files = source::read_archive_files(archive, &all)?;
                let mut load = |split: CifarSplit| -> Result<Self> {
                    let mut data = Self::default();
                    for name in split.files() {
                        let bytes = files.remove(*name).unwrap_or_default();
                        let path = archive.join(BATCHES_DIR).join(name);
                        data.append_file_bytes(&path, &bytes, verify)?;
                    }
                    Ok(data)
                };
                let train = load(CifarSplit::Train)?;
                let test = load(CifarSplit::Test)?;
                Ok((train, test))
            }
        }
    }

    /// Loads and concatenates batch files, in order.
    ///
    /// # Errors
    /// [`CifarError::MissingFile`], [`CifarError::BadFileSize`], [`CifarError::BadLabel`],
    /// [`CifarError::ChecksumMismatch`] (with [`Verify::Official`]), [`CifarError::Io`].
    pub fn from_files(paths: &[PathBuf], verify: Verify) -> Result<Self> {
        let mut data = Self::default();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|e| CifarError::io(path, e))?;
            data.append_file_bytes(path, &bytes, verify)?;
        }
        Ok(data)
    }

    fn append_file_bytes(&mut self, path: &Path, bytes: &[u8], verify: Verify) -> Result<()> {
        if verify == Verify::Official {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let manifest = Manifest::official();
            let expected = manifest.expected(&name).unwrap_or("(not in manifest)");
            checksum::verify_bytes(&path.display().to_string(), bytes, expected)?;
        }
        record::parse_records(bytes, path, &mut self.images, &mut self.labels)?;
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 3,072 pixel bytes of image `index` (R, G, B planes). Panics when out of range.
    pub fn image(&self, index: usize) -> &[u8] {
        &self.images[index * IMAGE_BYTES..(index + 1) * IMAGE_BYTES]
    }

    /// Label of image `index`. Panics when out of range.
    pub fn label(&self, index: usize) -> u8 {
        self.labels[index]
    }

    /// All pixel bytes, image after image.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Number of images of each class.
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }

    /// A new dataset with the given images, in the given order. Panics on an index out of range.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut images = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Self { images, labels }
    }
}

/// Error of [`Dataset::get`] for an index past the end.
#[derive(Debug, thiserror::Error)]
#[error("index {index} out of range for a CIFAR-10 dataset of {len} images")]
pub struct IndexOutOfRange {
    /// Requested index.
    pub index: usize,
    /// Dataset length.
    pub len: usize,
}

impl Dataset<CifarItem> for Cifar10 {
    fn get(&self, index: usize) -> std::result::Result<CifarItem, DatasetError> {
        if index >= self.len() {
            return Err(DatasetError::new(IndexOutOfRange { index, len: self.len() }));
        }
        Ok(CifarItem { image: self.image(index).to_vec(), label: self.labels[index], index })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}
