//! CIFAR-10 data pipeline and CIFAR ResNets for burn-coop.
//!
//! * [`Cifar10`] reads the official binary release (`cifar-10-binary.tar.gz` or its extracted
//!   `cifar-10-batches-bin/` folder), verifies every file against the md5 [`Manifest`], and keeps
//!   the images decoded in memory; it implements Burn's `Dataset`. [`locate`] finds the data
//!   (explicit path, `BURN_COOP_CIFAR10`, `datasets/cifar10/`, then a download).
//! * [`CifarBatcher`] turns image indices into normalized `[B, 3, 32, 32]` tensors with optional
//!   [`Augmentation`] (4-pixel zero padding + random 32×32 crop + random horizontal flip) that
//!   depends only on `(seed, epoch, index)`.
//! * [`Partition`] splits the training set across workers (IID or Dirichlet label skew) and
//!   [`WorkerLoader`] streams one worker's batches with a resumable [`LoaderState`].
//! * [`models`] holds the CIFAR ResNets of He et al. (2016, §4.2) and a CIFAR ResNet-18.
//!
//! Every data problem is reported as a typed [`CifarError`]; nothing panics on bad input files.

pub mod augment;
pub mod batcher;
pub mod cifar;
pub mod error;
pub mod loader;
pub mod manifest;
pub mod models;
pub mod partition;
pub mod rng;
#[cfg(feature = "coop")]
pub mod task;

pub use augment::{AugmentParams, Augmentation, augment_image};
pub use batcher::{CifarBatch, CifarBatcher, Normalization};
pub use cifar::checksum::{md5_file, md5_hex, verify_bytes, verify_file};
pub use cifar::record::{CLASS_NAMES, IMAGE_BYTES, NUM_CLASSES, RECORD_BYTES};
pub use cifar::source::{
    CIFAR10_ENV, CIFAR10_URL, CifarSource, LocateOptions, default_root_from, find_default_root, locate,
};
pub use cifar::{Cifar10, CifarItem, CifarSplit, Verify};
pub use error::{CifarError, ModelError, PartitionError};
pub use loader::{LoaderConfig, LoaderState, WorkerLoader};
pub use manifest::{Manifest, OFFICIAL_TARBALL_MD5};
pub use partition::Partition;
