//! Partitions across workers and the resumable per-worker loader.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use burn::tensor::Device;
use burn_coop_vision::{
    Augmentation, Cifar10, CifarBatcher, LoaderConfig, LoaderState, Partition, PartitionError, WorkerLoader,
};
use common::pattern_data;

/// 50,000 labels, 5,000 per class, in a scrambled order.
fn balanced_labels() -> Vec<u8> {
    (0..50_000u32).map(|i| ((i * 7919) % 10) as u8).collect()
}

fn assert_disjoint(p: &Partition) -> HashSet<usize> {
    let mut seen = HashSet::new();
    for shard in p.shards() {
        for &i in shard {
            assert!(seen.insert(i), "index {i} in two shards");
        }
    }
    seen
}

#[test]
fn iid_shards_are_equal_disjoint_covering_and_deterministic() {
    let p = Partition::iid(1_000, 8, 1).unwrap();
    assert_eq!(p.num_workers(), 8);
    assert!(p.shards().iter().all(|s| s.len() == 125));
    assert_eq!(assert_disjoint(&p), (0..1_000).collect());
    assert_eq!(p, Partition::iid(1_000, 8, 1).unwrap());
    assert_ne!(p, Partition::iid(1_000, 8, 2).unwrap());

    // The remainder is dropped: 1,003 / 8 = 125 each.
    let p = Partition::iid(1_003, 8, 1).unwrap();
    assert!(p.shards().iter().all(|s| s.len() == 125));
    assert_eq!(assert_disjoint(&p).len(), 1_000);
}

#[test]
fn iid_label_histograms_are_near_uniform() {
    let labels = balanced_labels();
    let p = Partition::iid(labels.len(), 10, 7).unwrap();
    for w in 0..10 {
        let h = p.label_histogram(&labels, w);
        assert_eq!(h.iter().sum::<usize>(), 5_000);
        for count in h {
            assert!((400..=600).contains(&count), "worker {w}: {h:?}");
        }
    }
}

#[test]
fn dirichlet_covers_everything_and_is_deterministic() {
    let labels = balanced_labels();
    let p = Partition::dirichlet(&labels, 16, 0.5, 3).unwrap();
    assert_eq!(p.num_workers(), 16);
    assert_eq!(assert_disjoint(&p), (0..labels.len()).collect());
    assert!(p.shards().iter().all(|s| !s.is_empty()));
    assert_eq!(p, Partition::dirichlet(&labels, 16, 0.5, 3).unwrap());
    assert_ne!(p, Partition::dirichlet(&labels, 16, 0.5, 4).unwrap());
}

fn mean_dominant_fraction(p: &Partition, labels: &[u8]) -> f64 {
    let m = p.num_workers();
    (0..m)
        .map(|w| {
            let h = p.label_histogram(labels, w);
            *h.iter().max().unwrap() as f64 / h.iter().sum::<usize>() as f64
        })
        .sum::<f64>()
        / m as f64
}

#[test]
fn small_beta_gives_strong_label_skew() {
    let labels = balanced_labels();
    let skewed = Partition::dirichlet(&labels, 10, 0.1, 11).unwrap();
    let mild = Partition::dirichlet(&labels, 10, 1_000.0, 11).unwrap();
    let skew = mean_dominant_fraction(&skewed, &labels);
    let near_iid = mean_dominant_fraction(&mild, &labels);
    assert!(skew > 0.5, "beta 0.1: dominant class fraction {skew}");
    assert!(near_iid < 0.13, "beta 1000: dominant class fraction {near_iid}");
}

#[test]
fn partition_errors_are_typed() {
    let labels = balanced_labels();
    assert_eq!(Partition::iid(10, 0, 0), Err(PartitionError::NoWorkers));
    assert_eq!(Partition::iid(3, 4, 0), Err(PartitionError::TooFewItems { items: 3, workers: 4 }));
    assert_eq!(Partition::dirichlet(&labels, 0, 0.5, 0), Err(PartitionError::NoWorkers));
    for beta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(Partition::dirichlet(&labels, 4, beta, 0), Err(PartitionError::InvalidBeta { .. })));
    }
    // Two items, two workers, an extremely concentrated Dirichlet: both items always land on
    // the same worker.
    assert!(matches!(
        Partition::dirichlet(&[0, 0], 2, 1e-6, 0),
        Err(PartitionError::EmptyWorker { attempts: 1_000, .. })
    ));
}

fn loader(data: &Arc<Cifar10>, shard: Vec<usize>, worker: usize) -> WorkerLoader {
    WorkerLoader::new(
        data.clone(),
        shard,
        CifarBatcher::new().with_augmentation(Augmentation::new(9)),
        LoaderConfig::new(8, 5, worker),
        Device::flex(),
    )
}

#[test]
fn loader_epochs_visit_each_item_once_and_reshuffle() {
    let (images, labels) = pattern_data(100, 0);
    let data = Arc::new(Cifar10::from_raw(images, labels).unwrap());
    let p = Partition::iid(100, 2, 0).unwrap();
    let mut l = loader(&data, p.shard(0).to_vec(), 0);
    assert_eq!(l.batches_per_epoch(), 6); // 50 items, 8 per batch, last 2 dropped
    let epoch0: Vec<usize> = (0..6).flat_map(|_| l.next_indices()).collect();
    assert_eq!(l.state(), LoaderState { epoch: 0, cursor: 6 });
    let epoch1: Vec<usize> = (0..6).flat_map(|_| l.next_indices()).collect();
    assert_eq!(l.state(), LoaderState { epoch: 1, cursor: 6 });
    assert_eq!(epoch0.len(), 48);
    assert_eq!(epoch0.iter().collect::<HashSet<_>>().len(), 48);
    assert!(epoch0.iter().all(|i| p.shard(0).contains(i)));
    assert_ne!(epoch0, epoch1);
    // Another worker with the same seed gets a different order of its own shard.
    let mut other = loader(&data, p.shard(1).to_vec(), 1);
    assert!(other.next_indices().iter().all(|i| p.shard(1).contains(i)));
}

#[test]
fn loader_state_resumes_the_exact_stream() {
    let (images, labels) = pattern_data(40, 1);
    let data = Arc::new(Cifar10::from_raw(images, labels).unwrap());
    let shard: Vec<usize> = (0..40).collect();
    let mut a = loader(&data, shard.clone(), 0);
    for _ in 0..3 {
        a.next_batch();
    }
    let saved = serde_json::to_string(&a.state()).unwrap();
    let rest: Vec<(Vec<f32>, Vec<i64>)> = (0..7)
        .map(|_| {
            let b = a.next_batch();
            (b.images.into_data().try_to_vec::<f32>().unwrap(), b.targets.try_into_vec_as::<i64>().unwrap())
        })
        .collect();

    let mut b = loader(&data, shard, 0);
    b.set_state(serde_json::from_str(&saved).unwrap());
    assert_eq!(b.state(), LoaderState { epoch: 0, cursor: 3 });
    for (expected_x, expected_y) in rest {
        let batch = b.next_batch();
        assert_eq!(batch.images.into_data().try_to_vec::<f32>().unwrap(), expected_x);
        assert_eq!(batch.targets.try_into_vec_as::<i64>().unwrap(), expected_y);
    }
    assert_eq!(b.state(), LoaderState { epoch: 1, cursor: 5 });
}
