//! A test kit for rule authors (and this crate's own tests).
//!
//! - [`RecordingComm`]: a communicator decorator that logs every call (kind, values, peers)
//!   and meters its bytes, so a test can assert "one all-reduce of the model per merge".
//! - [`run_one_merge`]: runs one merge of a rule for `m` workers on deterministic buffers and
//!   returns each worker's merged buffer, outcome, calls and bytes.
//! - [`check_rule_against_matrix`]: compares one merge with `X · W` for rules that have a mixing
//!   matrix ([`MatrixForm`], anchors included), so a new rule ships with a two-line exactness
//!   test; [`check_rounds_against_matrices`] does the same merge after merge, and
//!   [`measured_bytes_per_merge`] checks [`MatrixForm::expected_bytes_per_merge`].
//! - [`Tiny`], [`tiny_for`], [`fixed_grads`] and [`test_value`]: a small model with a BatchNorm
//!   and deterministic parameters and gradients, shared by the workspace's tests.
//! - [`inputs`]: arbitrary inputs for property tests of parsers and file readers.

pub mod inputs;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::CoopError;
use crate::comm::{CommError, Communicator, InProcessGroup, Metered, PendingSum, Receive, Route, TrafficByKind};
use crate::launch::run_group;
use crate::params::{BufferPolicy, ParamLayout, TensorRole};
use crate::rules::{MatrixForm, MergeOutcome, MergeRule, RuleError, SyncContext};
use crate::schedule::fixed::PeriodicSchedule;
use crate::sync::Synchronizer;

/// A deterministic value for position `k` of vector number `which` of worker `rank`.
pub fn test_value(rank: usize, k: usize, which: u64) -> f32 {
    let x = (k as f64 + 1.0) * 0.37 + rank as f64 * 1.91 + which as f64 * 0.53;
    (x.sin() * 0.8 + 0.1 * (x * 3.1).cos()) as f32
}

/// Calls of each kind a [`RecordingComm`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallLog {
    /// Sum all-reduces of `f32` (blocking and started).
    pub all_reduce: u64,
    /// Values in those all-reduces.
    pub all_reduce_values: u64,
    /// Sums of `f64` values.
    pub scalars: u64,
    /// Broadcasts.
    pub broadcast: u64,
    /// All-gathers of bytes.
    pub all_gather: u64,
    /// Neighbour exchanges.
    pub exchange: u64,
    /// Peers sent to in those exchanges.
    pub exchange_peers: u64,
    /// Splits.
    pub split: u64,
    /// Barriers.
    pub barrier: u64,
}

impl CallLog {
    /// Every call, all kinds together.
    pub fn total(&self) -> u64 {
        self.all_reduce + self.scalars + self.broadcast + self.all_gather + self.exchange + self.split + self.barrier
    }
}

/// A communicator that logs its calls and meters its bytes (see the [module documentation](self)).
#[derive(Debug)]
pub struct RecordingComm<C> {
    inner: Metered<C>,
    log: Arc<Mutex<CallLog>>,
}

impl<C: Communicator> RecordingComm<C> {
    /// Records the calls made through `inner`.
    pub fn new(inner: C) -> Self {
        Self { inner: Metered::new(inner), log: Arc::default() }
    }

    /// Calls so far.
    pub fn calls(&self) -> CallLog {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A handle on the call log that outlives the communicator (for callers that hand the
    /// communicator over, such as a worker loop).
    pub fn log(&self) -> Arc<Mutex<CallLog>> {
        Arc::clone(&self.log)
    }

    /// Bytes so far, by kind.
    pub fn traffic(&self) -> TrafficByKind {
        self.inner.traffic()
    }

    fn note(&self, update: impl FnOnce(&mut CallLog)) {
        update(&mut self.log.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Notes a sum all-reduce of `values` values.
    fn note_sum(&self, values: usize) {
        self.note(|l| {
            l.all_reduce += 1;
            l.all_reduce_values += values as u64;
        });
    }

    /// Notes a neighbour exchange that sends to `peers` ranks.
    fn note_exchange(&self, peers: usize) {
        self.note(|l| {
            l.exchange += 1;
            l.exchange_peers += peers as u64;
        });
    }
}

impl<C: Communicator> Communicator for RecordingComm<C> {
    crate::forward_communicator!(self.inner => rank, world_size);

    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        self.note_sum(values.len());
        self.inner.all_reduce_sum(values)
    }
    fn all_reduce_sum_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.note_sum(send.len());
        self.inner.all_reduce_sum_into(send, recv)
    }
    fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError> {
        self.note_sum(values.len());
        self.inner.start_all_reduce_sum(values)
    }
    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        self.note(|l| l.scalars += 1);
        self.inner.all_reduce_f64(values)
    }
    fn broadcast(&mut self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        self.note(|l| l.broadcast += 1);
        self.inner.broadcast(values, root)
    }
    fn all_gather_bytes(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.note(|l| l.all_gather += 1);
        self.inner.all_gather_bytes(payload)
    }
    fn exchange(&mut self, send: &[f32], peers: &[usize], recv: Receive<'_, f32>) -> Result<(), CommError> {
        self.note_exchange(peers.len());
        self.inner.exchange(send, peers, recv)
    }
    fn exchange_directed(&mut self, send: &[f32], route: Route<'_>, recv: Receive<'_, f32>) -> Result<(), CommError> {
        self.note_exchange(route.send_to.len());
        self.inner.exchange_directed(send, route, recv)
    }
    fn exchange_bytes(&mut self, send: &[u8], route: Route<'_>, recv: Receive<'_, u8>) -> Result<(), CommError> {
        self.note_exchange(route.send_to.len());
        self.inner.exchange_bytes(send, route, recv)
    }
    fn split(&mut self, color: usize) -> Result<Box<dyn Communicator>, CommError> {
        self.note(|l| l.split += 1);
        let inner = self.inner.split(color)?;
        Ok(Box::new(RecordingComm { inner: Metered::new(inner), log: Arc::clone(&self.log) }))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.note(|l| l.barrier += 1);
        self.inner.barrier()
    }
}

/// `rule` told of `segments` ([`MergeRule::set_segments`]) when there are some, as the
/// synchronizer tells it of a model's tensors.
pub fn with_segments<R: MergeRule>(mut rule: R, segments: Option<&crate::compress::Segments>) -> R {
    if let Some(segments) = segments {
        rule.set_segments(segments);
    }
    rule
}

/// The errors of `rule` asked to start and then to merge as one of `workers` workers: a rule
/// built for another number refuses both ([`RuleError::WorldSizeMismatch`]) before any
/// collective, so a one-worker communicator stands in for the group.
pub fn refusals<R: MergeRule>(mut rule: R, workers: usize) -> [Option<RuleError>; 2] {
    let mut comm = InProcessGroup::new(1).with_timeout(Duration::from_secs(60)).into_communicators().remove(0);
    let ctx = SyncContext { lr: Some(0.1), world_size: workers, ..SyncContext::default() };
    let start = rule.start(&[0.0; 4], &ctx, &mut comm).err();
    let merge = rule.merge(&mut [1.0; 4], &ctx, &mut comm).err();
    [start, merge]
}

/// One worker's view of [`run_one_merge`].
#[derive(Debug, Clone)]
pub struct MergeRun {
    /// The worker's rank.
    pub rank: usize,
    /// Its buffer before the merge.
    pub before: Vec<f32>,
    /// Its buffer after the merge (unchanged when the merge failed).
    pub params: Vec<f32>,
    /// What the merge returned (default when it failed).
    pub outcome: MergeOutcome,
    /// The error, when the merge failed.
    pub error: Option<RuleError>,
    /// The calls the merge made (those of `start` excluded).
    pub calls: CallLog,
    /// The bytes the merge moved (those of `start` excluded).
    pub traffic: TrafficByKind,
}

/// The common initial model of [`run_one_merge`] (what `start` sees, e.g. the anchor).
pub fn initial_buffer(m: usize, n: usize) -> Vec<f32> {
    (0..n).map(|k| test_value(m + 11, k, 3)).collect()
}

/// Worker `rank`'s buffer before the merge in [`run_one_merge`].
pub fn worker_buffer(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|k| test_value(rank, k, 1)).collect()
}

/// Runs `start` with [`initial_buffer`] and then one merge of [`worker_buffer`] for `m` workers
/// on threads, each with the rule `make(rank)` and a [`RecordingComm`].
pub fn run_one_merge<R: MergeRule>(m: usize, n: usize, make: impl Fn(usize) -> R + Sync) -> Vec<MergeRun> {
    let comms = InProcessGroup::new(m).with_timeout(Duration::from_secs(60)).into_communicators();
    let runs = run_group(comms, |rank, comm| -> Result<MergeRun, RuleError> {
        let mut rule = make(rank);
        let ctx = SyncContext { step: 1, round: 0, steps_since_sync: 1, lr: Some(0.1), rank, world_size: m, seed: 7 };
        let mut comm = RecordingComm::new(comm);
        rule.start(&initial_buffer(m, n), &ctx, &mut comm)?;
        let mut comm = RecordingComm::new(comm.inner.into_inner());
        let before = worker_buffer(rank, n);
        let mut params = before.clone();
        let (outcome, error) = match rule.merge(&mut params, &ctx, &mut comm) {
            Ok(outcome) => (outcome, None),
            Err(error) => (MergeOutcome::default(), Some(error)),
        };
        Ok(MergeRun { rank, before, params, outcome, error, calls: comm.calls(), traffic: comm.traffic() })
    });
    match runs {
        Ok(runs) => runs,
        Err(failure) => panic!("a worker failed outside the merge: {:?}", failure.primary()),
    }
}

/// Asserts that one merge of the rule equals `X · W` for its mixing matrix: worker `i` ends
/// with `Σ_j X[:, j] W[j, i]`, the columns of `X` being the workers' buffers followed by the
/// rule's `v` anchors, which start at [`initial_buffer`]. Also checks that every worker's
/// squared distance to the mean, when reported, is right.
pub fn check_rule_against_matrix<R: MergeRule + MatrixForm>(m: usize, n: usize, make: impl Fn() -> R + Sync) {
    let w = make().mixing_matrix(m).expect("the rule has a mixing matrix");
    let order = w.order();
    assert!(order >= m, "a mixing matrix for {m} workers has at least {m} rows, got {order}");
    let runs = run_one_merge(m, n, |_| make());
    let anchor = initial_buffer(m, n);
    let column = |j: usize| if j < m { &runs[j].before } else { &anchor };
    let mean: Vec<f64> = (0..n).map(|k| runs.iter().map(|r| f64::from(r.before[k])).sum::<f64>() / m as f64).collect();
    for run in &runs {
        assert!(run.error.is_none(), "worker {}: {:?}", run.rank, run.error);
        for k in 0..n {
            let expected: f64 = (0..order).map(|j| f64::from(column(j)[k]) * w.get(j, run.rank)).sum();
            let got = f64::from(run.params[k]);
            assert!(
                (got - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                "worker {} value {k}: merged {got}, X·W gives {expected}",
                run.rank
            );
        }
        if let Some(distance) = run.outcome.local_squared_distance {
            let exact: f64 = run.before.iter().zip(&mean).map(|(&x, &u)| (f64::from(x) - u).powi(2)).sum();
            assert!(
                (distance - exact).abs() <= 1e-5 * (1.0 + exact),
                "worker {}: distance {distance}, exact {exact}",
                run.rank
            );
        }
    }
}

/// Asserts that `rounds` consecutive merges of a rule follow `X_{k+1} = X_k' W_k` computed
/// independently in `f64`, with `W_k` the rule's matrix at merge `k`
/// ([`MatrixForm::mixing_matrix_at`]) and its `v` anchor columns (starting at
/// [`initial_buffer`], as the workers do) carried along: the rules whose graph changes from merge
/// to merge, and those whose anchors mix among themselves. Before merge `k` every worker's buffer
/// moves by [`worker_buffer`]`(rank + k)`, as local steps would; anchors take no steps.
pub fn check_rounds_against_matrices<R: MergeRule + MatrixForm>(
    m: usize,
    n: usize,
    rounds: u64,
    make: impl Fn() -> R + Sync,
) {
    let comms = InProcessGroup::new(m).with_timeout(Duration::from_secs(60)).into_communicators();
    let runs = run_group(comms, |rank, mut comm| -> Result<Vec<Vec<f32>>, RuleError> {
        let mut rule = make();
        let mut params = initial_buffer(m, n);
        let mut ctx =
            SyncContext { step: 0, round: 0, steps_since_sync: 1, lr: Some(0.1), rank, world_size: m, seed: 7 };
        rule.start(&params, &ctx, &mut comm)?;
        let mut history = Vec::new();
        for round in 0..rounds {
            ctx.round = round;
            ctx.step = round + 1;
            let shift = worker_buffer(rank + round as usize, n);
            params.iter_mut().zip(&shift).for_each(|(p, s)| *p += s);
            rule.merge(&mut params, &ctx, &mut comm)?;
            history.push(params.clone());
        }
        Ok(history)
    })
    .unwrap_or_else(|failure| panic!("a worker failed: {:?}", failure.primary()));
    let rule = make();
    let at = |round: usize| {
        let ctx = SyncContext {
            step: round as u64 + 1,
            round: round as u64,
            steps_since_sync: 1,
            lr: Some(0.1),
            rank: 0,
            world_size: m,
            seed: 7,
        };
        rule.mixing_matrix_at(&ctx).expect("the rule has a matrix at every merge")
    };
    let order = at(0).order();
    let start: Vec<f64> = initial_buffer(m, n).iter().map(|&v| f64::from(v)).collect();
    let mut columns = vec![start; order];
    for round in 0..rounds as usize {
        let w = at(round);
        for (rank, column) in columns.iter_mut().enumerate().take(m) {
            let shift = worker_buffer(rank + round, n);
            column.iter_mut().zip(&shift).for_each(|(c, &s)| *c = f64::from(*c as f32 + s));
        }
        columns = w.apply(&columns);
        for (i, run) in runs.iter().enumerate() {
            for k in 0..n {
                let (got, expected) = (f64::from(run[round][k]), columns[i][k]);
                assert!(
                    (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                    "merge {round}, worker {i}, value {k}: merged {got}, X·W_k gives {expected}"
                );
            }
        }
        // The simulation goes on from the workers' own values, as the workers do.
        for (i, run) in runs.iter().enumerate() {
            columns[i] = run[round].iter().map(|&v| f64::from(v)).collect();
        }
    }
}

/// The bytes a worker sent per merge, averaged over the `m` workers and `rounds` merges of a
/// buffer of `n` values, as [`Metered`] counts them for the rule's own collectives (to check
/// [`MatrixForm::expected_bytes_per_merge`]).
pub fn measured_bytes_per_merge<R: MergeRule + MatrixForm>(
    m: usize,
    n: usize,
    rounds: u64,
    make: impl Fn() -> R + Sync,
) -> f64 {
    let comms = InProcessGroup::new(m).with_timeout(Duration::from_secs(60)).into_communicators();
    let sent = run_group(comms, |rank, comm| -> Result<u64, RuleError> {
        let mut rule = make();
        let mut params = initial_buffer(m, n);
        let mut ctx =
            SyncContext { step: 0, round: 0, steps_since_sync: 1, lr: Some(0.1), rank, world_size: m, seed: 7 };
        let mut comm = RecordingComm::new(comm);
        rule.start(&params, &ctx, &mut comm)?;
        let before = comm.traffic().total().bytes_sent;
        for round in 0..rounds {
            ctx.round = round;
            ctx.step = round + 1;
            rule.merge(&mut params, &ctx, &mut comm)?;
        }
        Ok(comm.traffic().total().bytes_sent - before)
    })
    .unwrap_or_else(|failure| panic!("a worker failed: {:?}", failure.primary()));
    sent.iter().sum::<u64>() as f64 / (m as f64 * rounds as f64)
}

/// Every worker's buffer (as bits) after each of `merges` merges through a [`Synchronizer`]
/// (learning rate 0.1) started from [`worker_buffer`]`(m)` on every worker, the buffer moved by [`worker_buffer`]`(rank + k) · 0.1` before merge
/// `k`, as local steps would; with `resume_after`, the synchronizer and rule are rebuilt from
/// their records after that many merges, as a resumed run does. Comparing the two shows that a
/// rule's state survives a checkpoint bit for bit.
pub fn merge_trajectories<R: MergeRule + 'static>(
    m: usize,
    merges: usize,
    resume_after: Option<usize>,
    make: impl Fn() -> R + Sync,
) -> Vec<Vec<Vec<u32>>> {
    let n = 37;
    let comms = InProcessGroup::new(m).with_timeout(Duration::from_secs(60)).into_communicators();
    let build = |comm: Box<dyn Communicator>| -> Result<Synchronizer, CoopError> {
        let mut sync = Synchronizer::new(make(), PeriodicSchedule::every(1).expect("τ = 1"), comm)?;
        sync.set_lr(0.1);
        Ok(sync)
    };
    run_group(comms, |rank, comm| -> Result<_, CoopError> {
        let mut sync = build(Box::new(comm))?;
        let mut params = worker_buffer(m, n);
        sync.start_flat(&params)?;
        let mut states = Vec::new();
        for round in 0..merges {
            if resume_after == Some(round) {
                let (records, state) = (sync.records(), sync.state());
                sync = build(sync.into_comm())?;
                sync.load(state, records)?;
            }
            let shift = worker_buffer(rank + round, n);
            params.iter_mut().zip(&shift).for_each(|(v, s)| *v += s * 0.1);
            sync.merge_flat(&mut params)?;
            states.push(params.iter().map(|v| v.to_bits()).collect());
        }
        Ok(states)
    })
    .unwrap_or_else(|failure| panic!("a worker failed: {:?}", failure.primary()))
}

/// Linear(3→4) → BatchNorm(4) → Linear(4→2): weights, biases, BatchNorm affine and buffers.
#[derive(Module, Debug)]
pub struct Tiny {
    /// First layer.
    pub fc1: Linear,
    /// Normalization with running statistics (buffers).
    pub bn: BatchNorm,
    /// Output layer.
    pub fc2: Linear,
}

impl Tiny {
    /// A freshly initialized model on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(3, 4).init(device),
            bn: BatchNormConfig::new(4).init(device),
            fc2: LinearConfig::new(4, 2).init(device),
        }
    }

    /// The forward pass.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.fc1.forward(x);
        let h: Tensor<3> = self.bn.forward(h.unsqueeze_dim(2));
        self.fc2.forward(h.squeeze_dim(2))
    }
}

/// A fresh [`Tiny`] on `device` (with its own BatchNorm state) whose every float tensor holds
/// deterministic values for `seed`. Running variances stay positive.
pub fn tiny_for(seed: usize, device: &Device) -> Tiny {
    let model = Tiny::new(device);
    let layout = ParamLayout::of(&model, BufferPolicy::Merge);
    let mut flat: Vec<f32> = (0..layout.len()).map(|k| test_value(seed, k, 0)).collect();
    for slot in layout.slots() {
        if let (TensorRole::Buffer, Some(offset)) = (slot.role, slot.offset) {
            flat[offset..offset + slot.len()].iter_mut().for_each(|v| *v = v.abs() + 0.5);
        }
    }
    layout.unflatten(model, &flat).expect("the layout was made from this model")
}

/// Fixed gradients for every trainable tensor of `module` (1-D or 2-D), depending on rank and
/// step, created on `device` (a plain device, without autodiff).
pub fn fixed_grads<M: Module>(module: &M, rank: usize, step: u64, device: &Device) -> GradientsParams {
    let layout = ParamLayout::of(module, BufferPolicy::Merge);
    let mut grads = GradientsParams::new();
    for slot in layout.slots().iter().filter(|s| s.role == TensorRole::Parameter) {
        let offset = slot.offset.expect("parameters are always in the layout");
        let values: Vec<f32> = (0..slot.len()).map(|k| test_value(rank, offset + k, 100 + step)).collect();
        let data = TensorData::new(values, slot.shape.clone());
        match slot.shape.len() {
            1 => grads.register::<1>(slot.id, Tensor::from_data(data, device)),
            2 => grads.register::<2>(slot.id, Tensor::from_data(data, device)),
            rank => panic!("unexpected tensor rank {rank}"),
        }
    }
    grads
}

/// The flat buffer of every float tensor (buffers included) of `module`.
pub fn flat<M: Module>(module: &M) -> Vec<f32> {
    ParamLayout::of(module, BufferPolicy::Merge).flatten(module).expect("the layout was made from this module")
}
