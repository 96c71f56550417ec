//! A per-worker data loader with a resumable position.

use std::sync::Arc;

use burn::tensor::Device;

use crate::batcher::{CifarBatch, CifarBatcher, to_batch};
use crate::cifar::Cifar10;
use crate::rng::SplitMix64;

/// Position of a [`WorkerLoader`]: the epoch and the number of batches already taken in it.
/// Saving it with a checkpoint and restoring it with [`WorkerLoader::set_state`] reproduces the
/// exact data order (and augmentation) of an uninterrupted run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Batches already taken in the current epoch.
    pub cursor: usize,
}

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Seed of the per-epoch shuffle (combined with the epoch and the worker id).
    pub seed: u64,
    /// Worker id (selects an independent shuffle stream).
    pub worker: usize,
    /// Reshuffle every epoch; when false the shard order is kept.
    pub shuffle: bool,
    /// Drop the last incomplete batch of an epoch.
    pub drop_last: bool,
}

impl LoaderConfig {
    /// Shuffled batches of `batch_size`, incomplete last batch dropped.
    pub fn new(batch_size: usize, seed: u64, worker: usize) -> Self {
        Self { batch_size, seed, worker, shuffle: true, drop_last: true }
    }
}

/// Streams batches of one worker's shard, epoch after epoch, without end: at the end of an epoch
/// it moves to the next one (with a new shuffle and new augmentation draws).
#[derive(Debug, Clone)]
pub struct WorkerLoader {
    data: Arc<Cifar10>,
    indices: Vec<usize>,
    batcher: CifarBatcher,
    config: LoaderConfig,
    device: Device,
    state: LoaderState,
    order: Vec<usize>,
    order_epoch: Option<u64>,
    images: Vec<f32>,
    labels: Vec<i64>,
}

impl WorkerLoader {
    /// A loader over `indices` of `data` (e.g. a [`Partition`](crate::Partition) shard).
    /// Panics if `batch_size` is 0 or `indices` is empty.
    pub fn new(
        data: Arc<Cifar10>,
        indices: Vec<usize>,
        batcher: CifarBatcher,
        config: LoaderConfig,
        device: Device,
    ) -> Self {
        assert!(config.batch_size > 0, "batch size must be positive");
        assert!(!indices.is_empty(), "a worker loader needs at least one item");
        Self {
            data,
            indices,
            batcher,
            config,
            device,
            state: LoaderState::default(),
            order: Vec::new(),
            order_epoch: None,
            images: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// The current position.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Moves to a saved position.
    pub fn set_state(&mut self, state: LoaderState) {
        self.state = state;
    }

    /// Number of items of the shard.
    pub fn num_items(&self) -> usize {
        self.indices.len()
    }

    /// Batches per epoch (at least 1, even when `drop_last` and the shard is smaller than a
    /// batch: then the single batch is the whole shard).
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.indices.len();
        let b = self.config.batch_size;
        if self.config.drop_last && n >= b { n / b } else { n.div_ceil(b) }
    }

    /// The order of dataset indices in `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order = self.indices.clone();
        if self.config.shuffle {
            SplitMix64::stream(self.config.seed, epoch, self.config.worker as u64).shuffle(&mut order);
        }
        order
    }

    /// Dataset indices of the next batch; advances the position.
    pub fn next_indices(&mut self) -> Vec<usize> {
        if self.state.cursor >= self.batches_per_epoch() {
            self.state = LoaderState { epoch: self.state.epoch + 1, cursor: 0 };
        }
        if self.order_epoch != Some(self.state.epoch) {
            self.order = self.epoch_order(self.state.epoch);
            self.order_epoch = Some(self.state.epoch);
        }
        let b = self.config.batch_size;
        let start = self.state.cursor * b;
        let end = (start + b).min(self.order.len());
        self.state.cursor += 1;
        self.order[start..end].to_vec()
    }

    /// The next batch on the loader's device; advances the position. Also returns the epoch the
    /// batch belongs to.
    pub fn next_batch_with_epoch(&mut self) -> (u64, CifarBatch) {
        let indices = self.next_indices();
        let epoch = self.state.epoch;
        self.batcher.fill(&self.data, &indices, epoch, &mut self.images, &mut self.labels);
        let batch = to_batch(std::mem::take(&mut self.images), std::mem::take(&mut self.labels), &self.device);
        (epoch, batch)
    }

    /// The next batch on the loader's device; advances the position.
    pub fn next_batch(&mut self) -> CifarBatch {
        self.next_batch_with_epoch().1
    }
}

impl Iterator for WorkerLoader {
    type Item = CifarBatch;

    fn next(&mut self) -> Option<CifarBatch> {
        Some(self.next_batch())
    }
}
