//! Measures the input pipeline against a ResNet-20 training step on the Flex CPU backend.
//!
//! ```text
//! cargo run --release -p burn-coop-vision --example throughput --features flex -- [--data PATH] [--steps N]
//! ```
//!
//! Data: `--data PATH`, else `BURN_COOP_CIFAR10`, else `datasets/cifar10/`, else the shared copy
//! beside the repository, else synthetic images (never downloads).

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::Device;
use burn_coop_vision::models::CifarResNetConfig;
use burn_coop_vision::{
    Augmentation, Cifar10, CifarBatcher, CifarSource, CifarSplit, IMAGE_BYTES, LocateOptions, Verify, locate,
};

const BATCH: usize = 128;

fn load_data(path: Option<PathBuf>) -> (Cifar10, String) {
    let mut opts = LocateOptions::new().with_download(false);
    if let Some(p) = path {
        opts = opts.with_path(p);
    }
    let shared = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/datasets/cifar10"));
    let source = locate(&opts).or_else(|_| CifarSource::from_path(&shared));
    match source.and_then(|s| Cifar10::load(&s, CifarSplit::Train, Verify::Official).map(|d| (d, s))) {
        Ok((data, source)) => (data, format!("CIFAR-10 train from {}", source.path().display())),
        Err(e) => {
            eprintln!("real data unavailable ({e}); using synthetic images");
            let n = 50_000;
            let mut state = 1u64;
            let images = (0..n * IMAGE_BYTES)
                .map(|_| {
                    state = burn_coop_vision::rng::mix64(state);
                    state as u8
                })
                .collect();
            let labels = (0..n).map(|i| (i % 10) as u8).collect();
            (Cifar10::from_raw(images, labels).unwrap(), "synthetic 50,000 images".into())
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut steps = 10usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--data" => path = args.next().map(PathBuf::from),
            "--steps" => steps = args.next().and_then(|s| s.parse().ok()).unwrap_or(steps),
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let (data, what) = load_data(path);
    println!("data: {what} ({} images)", data.len());
    let batcher = CifarBatcher::new().with_augmentation(Augmentation::new(0));

    // Input pipeline alone: host-side fill (augment + normalize), then including tensor creation.
    let n_batches = data.len() / BATCH;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let start = Instant::now();
    for b in 0..n_batches {
        let indices: Vec<usize> = (b * BATCH..(b + 1) * BATCH).collect();
        batcher.fill(&data, &indices, 1, &mut x, &mut y);
    }
    let fill_rate = (n_batches * BATCH) as f64 / start.elapsed().as_secs_f64();
    println!("batcher (augment + normalize, 1 thread): {fill_rate:>10.0} images/s");

    let device = Device::flex().autodiff();
    let start = Instant::now();
    let tensor_batches = n_batches.min(100);
    for b in 0..tensor_batches {
        let indices: Vec<usize> = (b * BATCH..(b + 1) * BATCH).collect();
        let batch = batcher.batch_indices(&data, &indices, 1, &device);
        std::hint::black_box(batch);
    }
    let tensor_rate = (tensor_batches * BATCH) as f64 / start.elapsed().as_secs_f64();
    println!("batcher incl. tensor creation:           {tensor_rate:>10.0} images/s");

    // ResNet-20 training steps (SGD, momentum 0.9, weight decay 5e-4).
    device.seed(0);
    let mut model = CifarResNetConfig::resnet20().init(&device).unwrap();
    let mut optim = SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0))).init();
    let mut step = |i: usize, model: burn_coop_vision::models::CifarResNet| {
        let indices: Vec<usize> = (i * BATCH..(i + 1) * BATCH).map(|k| k % data.len()).collect();
        let batch = batcher.batch_indices(&data, &indices, 0, &device);
        let (loss, _) = model.forward_classification(batch.images, batch.targets);
        let loss_value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        (optim.step(0.1, model, grads), loss_value)
    };
    for i in 0..2 {
        model = step(i, model).0;
    }
    let start = Instant::now();
    let mut last_loss = 0.0;
    for i in 0..steps {
        let (m, l) = step(2 + i, model);
        model = m;
        last_loss = l;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let train_rate = (steps * BATCH) as f64 / elapsed;
    println!(
        "ResNet-20 training step (Flex, batch {BATCH}): {train_rate:>8.0} images/s ({:.3} s/step, last loss {last_loss:.3})",
        elapsed / steps as f64
    );
    println!("input pipeline headroom: {:.0}x the training throughput", tensor_rate / train_rate);
}
