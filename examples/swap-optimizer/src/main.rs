//! Four replicas of a small regression model, each trained on its own data shard with an
//! ordinary Burn loop — and cooperating through local SGD: the only change from
//! `src/bin/plain.rs` is the line that builds the optimizer (and the `?` on `step`).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use burn_coop::{CoopError, LocalSgd, Worker, launch, rules::averaging::Averaging, schedule::fixed::PeriodicSchedule};

const STEPS: usize = 200;

/// A two-layer perceptron.
#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    out: Linear,
    relu: Relu,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self { hidden: LinearConfig::new(4, 32).init(device), out: LinearConfig::new(32, 1).init(device), relu: Relu }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.relu.forward(self.hidden.forward(x)))
    }
}

/// Batch `step` of worker `rank`'s shard: y = sin(x0) + x1·x2 − x3 / 2 on points in [−1, 1]⁴.
fn batch(rank: usize, step: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut state =
        (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut uniform = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..64 * 4).map(|_| uniform()).collect();
    let y: Vec<f32> = x.chunks(4).map(|p| p[0].sin() + p[1] * p[2] - p[3] / 2.0).collect();
    (Tensor::from_data(TensorData::new(x, [64, 4]), device), Tensor::from_data(TensorData::new(y, [64, 1]), device))
}

/// One worker's ordinary training loop; returns its loss on a held-out batch.
fn train(worker: Worker, steps: usize) -> Result<f32, CoopError> {
    let device = Device::flex().autodiff();
    let rank = worker.rank();
    let mut model = Mlp::new(&device);
    #[rustfmt::skip]
    let mut optim = LocalSgd::new(AdamConfig::new().init(), Averaging::new(), PeriodicSchedule::every(8)?, worker.comm())?;
    for step in 0..steps {
        let (x, y) = batch(rank, step, &device);
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads)?;
    }
    let (x, y) = batch(99, 0, &device);
    Ok((model.forward(x) - y).powi_scalar(2).mean().into_scalar::<f32>())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps = std::env::args().nth(1).map_or(Ok(STEPS), |s| s.parse())?;
    let losses = launch(4, |worker| train(worker, steps))?.into_iter().collect::<Result<Vec<_>, _>>()?;
    for (rank, loss) in losses.iter().enumerate() {
        println!("worker {rank}: held-out loss {loss:.5}");
    }
    Ok(())
}
