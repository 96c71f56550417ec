//! A plain Burn training loop (a small MLP fitting a synthetic regression task) made
//! distributed by swapping its optimizer for [`LocalSgd`] over MPI: every rank trains on its
//! own data shard and the models are averaged every 8 steps.
//!
//! ```text
//! cargo build --release -p mpi-swap-optimizer
//! mpirun -np 4 target/release/mpi-swap-optimizer
//! ```

use std::error::Error;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use burn_coop::params::{BufferPolicy, ParamLayout};
use burn_coop::{LocalSgd, comm::Communicator};
use burn_coop::{rules::averaging::Averaging, schedule::fixed::PeriodicSchedule};
use burn_coop_mpi::MpiComm;

const INPUTS: usize = 4;
const SAMPLES: usize = 1024;
const BATCH: usize = 32;
const STEPS: usize = 400;
const LR: f64 = 0.05;

/// Two-layer perceptron.
#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    output: Linear,
    relu: Relu,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(INPUTS, 32).init(device),
            output: LinearConfig::new(32, 1).init(device),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.output.forward(self.relu.forward(self.hidden.forward(x)))
    }
}

/// A data shard of `y = sin(x₀) + x₁ x₂ − 0.5 x₃ + noise`, drawn from `seed`.
struct Shard {
    x: Vec<f32>,
    y: Vec<f32>,
}

impl Shard {
    fn generate(seed: u64) -> Self {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut x = Vec::with_capacity(SAMPLES * INPUTS);
        let mut y = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let v: Vec<f32> = (0..INPUTS).map(|_| 2.0 * uniform()).collect();
            y.push(v[0].sin() + v[1] * v[2] - 0.5 * v[3] + 0.05 * uniform());
            x.extend(v);
        }
        Self { x, y }
    }

    fn batch(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let x = self.x[start * INPUTS..(start + len) * INPUTS].to_vec();
        let y = self.y[start..start + len].to_vec();
        (
            Tensor::from_data(TensorData::new(x, [len, INPUTS]), device),
            Tensor::from_data(TensorData::new(y, [len, 1]), device),
        )
    }

    fn loss(&self, model: &Mlp, device: &Device) -> f32 {
        let (x, y) = self.batch(0, SAMPLES, device);
        (model.forward(x) - y).powi_scalar(2).mean().into_scalar::<f32>()
    }
}

/// A 32-bit FNV-1a hash of the values' bit patterns (exact as an `f64`).
fn fingerprint(values: &[f32]) -> f64 {
    let hash = values
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .fold(0x811c_9dc5_u32, |h, byte| (h ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    f64::from(hash)
}

fn main() -> Result<(), Box<dyn Error>> {
    #[cfg(feature = "flex")]
    let device = Device::flex().autodiff();
    #[cfg(not(feature = "flex"))]
    let device = Device::default().autodiff();
    // Same seed on every rank: every worker starts from the same model.
    device.seed(42);

    let comm = MpiComm::world()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let data = Shard::generate(1 + rank as u64);

    let mut model = Mlp::new(&device);
    let mut optim = LocalSgd::new(SgdConfig::new().init(), Averaging::new(), PeriodicSchedule::every(8)?, comm)?;

    let initial_loss = data.loss(&model, &device);
    for step in 0..STEPS {
        let (x, y) = data.batch(step * BATCH % SAMPLES, BATCH, &device);
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LR, model, grads)?;
    }

    let final_loss = data.loss(&model, &device);
    let stats = optim.stats();
    println!(
        "rank {rank}/{world}: loss on own shard {initial_loss:.4} -> {final_loss:.4} \
         ({} steps, {} merges, {:.1} MB sent)",
        stats.steps,
        stats.syncs,
        stats.traffic.bytes_sent as f64 / 1e6
    );

    // STEPS is a multiple of 8, so the last step merged: every rank holds the same model.
    // Each rank publishes a fingerprint of its parameters' bits; all fingerprints must match.
    let params = ParamLayout::of(&model, BufferPolicy::Merge).flatten(&model)?;
    let mut fingerprints = vec![0.0; world];
    fingerprints[rank] = fingerprint(&params);
    optim.comm().all_reduce_f64(&mut fingerprints)?;
    let agree = fingerprints.iter().all(|&f| f == fingerprints[0]);
    let mut losses = [f64::from(final_loss)];
    optim.comm().all_reduce_f64(&mut losses)?;
    if rank == 0 {
        let verdict = if agree { "agree bit for bit" } else { "DISAGREE" };
        println!(
            "rank 0: parameters of all {world} ranks {verdict} ({} values); mean final loss {:.4}",
            params.len(),
            losses[0] / world as f64
        );
    }
    optim.comm().barrier()?;
    if !agree {
        return Err("ranks ended with different parameters".into());
    }
    Ok(())
}
