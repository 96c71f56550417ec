//! The training loop before: one model trained on the whole training set with an ordinary Burn
//! loop. Compare with `src/main.rs`, the same loop run by four cooperating workers.

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use swap_optimizer::{Data, Mlp, batches, dataset, epochs_from_args, validation_loss};

const SEED: u64 = 7;
const BATCH: usize = 32;
const LR: f64 = 5e-3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let epochs = epochs_from_args(10)?;
    let device = Device::flex().autodiff();
    let (train, valid) = dataset(4096, SEED);
    fit(&train, &valid, epochs, &device);
    Ok(())
}

/// Trains a model for `epochs` epochs of `train`, printing its loss on `valid` after each.
fn fit(train: &Data, valid: &Data, epochs: usize, device: &Device) -> Mlp {
    device.seed(SEED);
    let mut model = Mlp::new(device);
    let mut optim = AdamConfig::new().init();
    for epoch in 0..epochs {
        for (x, y) in batches(train, BATCH, SEED + epoch as u64, device) {
            let loss = (model.forward(x) - y).powi_scalar(2).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(LR, model, grads);
        }
        println!("epoch {epoch}: validation loss {:.5}", validation_loss(&model, valid, device));
    }
    model
}
