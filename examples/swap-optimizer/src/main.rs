//! The training loop after: the loop of `src/bin/plain.rs`, run by four cooperating workers on
//! threads, each on its share of the training set, averaging their models every 8 steps.

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use burn_coop::{CoopError, Worker, launch, rules::averaging::Averaging, schedule::fixed::PeriodicSchedule};
use swap_optimizer::{Data, Mlp, batches, dataset, epochs_from_args, validation_loss};

const SEED: u64 = 7;
const BATCH: usize = 32;
const LR: f64 = 5e-3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let epochs = epochs_from_args(10)?;
    let device = Device::flex().autodiff();
    let (train, valid) = dataset(4096, SEED);
    launch(4, |worker| fit(worker, &train, &valid, epochs, &device))?;
    Ok(())
}

/// Trains a model for `epochs` epochs of `train`, printing its loss on `valid` after each.
fn fit(worker: &mut Worker, train: &Data, valid: &Data, epochs: usize, device: &Device) -> Result<Mlp, CoopError> {
    let train = worker.shard(train.clone());
    let mut model = worker.init(SEED, device, Mlp::new);
    let mut optim = worker.local_sgd(AdamConfig::new().init(), Averaging::new(), PeriodicSchedule::every(8)?)?;
    for epoch in 0..epochs {
        for (x, y) in batches(&train, BATCH, worker.seed(SEED + epoch as u64), device) {
            let loss = (model.forward(x) - y).powi_scalar(2).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(worker.scaled_lr(LR), model, grads)?;
        }
        model = optim.agree(model)?;
        if worker.is_leader() {
            println!("epoch {epoch}: validation loss {:.5}", validation_loss(&model, valid, device));
        }
    }
    Ok(model)
}
