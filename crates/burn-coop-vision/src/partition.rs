//! Splitting a training set across workers, deterministically by seed.

use crate::cifar::record::NUM_CLASSES;
use crate::error::PartitionError;
use crate::rng::SplitMix64;

/// Draws tried by [`Partition::dirichlet`] before giving up on leaving no worker empty.
pub const DIRICHLET_ATTEMPTS: usize = 1_000;

/// Disjoint shards of dataset indices, one per worker. Each shard is sorted ascending; the
/// per-epoch order is decided by the loader.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    shards: Vec<Vec<usize>>,
}

impl Partition {
    /// IID split of `0..n_items` into `workers` equal shards of `n_items / workers` items drawn
    /// uniformly at random. The `n_items % workers` left-over items are dropped, so every worker
    /// runs the same number of steps per epoch.
    ///
    /// # Errors
    /// [`PartitionError::NoWorkers`], [`PartitionError::TooFewItems`] when `n_items < workers`.
    pub fn iid(n_items: usize, workers: usize, seed: u64) -> Result<Self, PartitionError> {
        if workers == 0 {
            return Err(PartitionError::NoWorkers);
        }
        if n_items < workers {
            return Err(PartitionError::TooFewItems { items: n_items, workers });
        }
        let mut order: Vec<usize> = (0..n_items).collect();
        SplitMix64::stream(seed, 0x11D, 0).shuffle(&mut order);
        let per = n_items / workers;
        let shards = order
            .chunks_exact(per)
            .take(workers)
            .map(|c| {
                let mut s = c.to_vec();
                s.sort_unstable();
                s
            })
            .collect();
        Ok(Self { shards })
    }

    /// Non-IID label skew (the usual federated benchmark): for each class, proportions
    /// `p ~ Dirichlet(beta, …, beta)` over the workers are drawn and the class's items (in a
    /// seeded random order) are cut at the rounded cumulative proportions. Every item is
    /// assigned. Small `beta` gives strong skew, large `beta` approaches IID. When a draw leaves
    /// a worker empty, the whole draw is repeated (deterministically) up to
    /// [`DIRICHLET_ATTEMPTS`] times.
    ///
    /// # Errors
    /// [`PartitionError::NoWorkers`], [`PartitionError::InvalidBeta`] for `beta <= 0` or not
    /// finite, [`PartitionError::TooFewItems`], [`PartitionError::EmptyWorker`].
    pub fn dirichlet(labels: &[u8], workers: usize, beta: f64, seed: u64) -> Result<Self, PartitionError> {
        if workers == 0 {
            return Err(PartitionError::NoWorkers);
        }
        if !(beta > 0.0 && beta.is_finite()) {
            return Err(PartitionError::InvalidBeta { beta });
        }
        if labels.len() < workers {
            return Err(PartitionError::TooFewItems { items: labels.len(), workers });
        }
        let classes = labels.iter().map(|&l| usize::from(l) + 1).max().unwrap_or(0);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes.max(NUM_CLASSES)];
        for (i, &l) in labels.iter().enumerate() {
            by_class[usize::from(l)].push(i);
        }
        let mut empty = 0;
        for attempt in 0..DIRICHLET_ATTEMPTS {
            let mut rng = SplitMix64::stream(seed, 0xD1E1, attempt as u64);
            let mut shards: Vec<Vec<usize>> = vec![Vec::new(); workers];
            for class in &by_class {
                if class.is_empty() {
                    continue;
                }
                let mut items = class.clone();
                rng.shuffle(&mut items);
                let p = rng.dirichlet(beta, workers);
                let n = items.len();
                let mut start = 0;
                let mut acc = 0.0;
                for (w, pw) in p.iter().enumerate() {
                    acc += pw;
                    let end = if w + 1 == workers { n } else { ((acc * n as f64).round() as usize).clamp(start, n) };
                    shards[w].extend_from_slice(&items[start..end]);
                    start = end;
                }
            }
            match shards.iter().position(Vec::is_empty) {
                None => {
                    for s in &mut shards {
                        s.sort_unstable();
                    }
                    return Ok(Self { shards });
                }
                Some(w) => empty = w,
            }
        }
        Err(PartitionError::EmptyWorker { beta, worker: empty, attempts: DIRICHLET_ATTEMPTS })
    }

    /// Builds a partition from explicit shards.
    pub fn from_shards(shards: Vec<Vec<usize>>) -> Self {
        Self { shards }
    }

    /// Number of workers.
    pub fn num_workers(&self) -> usize {
        self.shards.len()
    }

    /// The indices of worker `w`. Panics if `w` is out of range.
    pub fn shard(&self, w: usize) -> &[usize] {
        &self.shards[w]
    }

    /// All shards.
    pub fn shards(&self) -> &[Vec<usize>] {
        &self.shards
    }

    /// Total number of assigned items.
    pub fn num_items(&self) -> usize {
        self.shards.iter().map(Vec::len).sum()
    }

    /// Per-class item counts of worker `w` (labels 0..=9).
    pub fn label_histogram(&self, labels: &[u8], w: usize) -> [usize; NUM_CLASSES] {
        let mut h = [0; NUM_CLASSES];
        for &i in &self.shards[w] {
            h[usize::from(labels[i]) % NUM_CLASSES] += 1;
        }
        h
    }
}
