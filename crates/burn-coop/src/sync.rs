//! The synchronizer: the merge engine every front end drives after each local step.

use burn::module::Module;
use serde::{Deserialize, Serialize};

use crate::comm::{CommTime, Communicator, Metered, NetworkModel, SimClock, StepTime, Traffic, TrafficByKind};
use crate::error::CoopError;
use crate::params::{BufferPolicy, InPlaceError, LayoutBucket, ParamLayout};
use crate::rules::kernels::{count_non_finite, distance_to_mean};
use crate::rules::{Bucket, MergeOutcome, MergeRule, SyncContext, Triggered};
use crate::schedule::{ScheduleSignal, SyncFeedback, SyncSchedule};
use crate::state::StateFile;

/// What the training loop knows about the local step it just took.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepSignal {
    /// The learning rate of the step.
    pub lr: Option<f64>,
    /// This worker's training loss on the step's batch.
    pub loss: Option<f64>,
    /// The seconds the step really took (for the simulated clock's measured step time).
    pub seconds: Option<f64>,
    /// When the step began, when `seconds` is not given: the step lasts until the synchronizer
    /// sees it (after the inner optimizer's update).
    pub started: Option<std::time::Instant>,
}

impl StepSignal {
    /// A step with a learning rate and a loss.
    pub fn new(lr: f64, loss: f64) -> Self {
        Self { lr: Some(lr), loss: Some(loss), seconds: None, started: None }
    }

    /// The same signal, timed from `started` to the moment the synchronizer counts the step.
    pub fn timed_from(self, started: std::time::Instant) -> Self {
        Self { started: Some(started), ..self }
    }

    /// The same signal with the seconds the step took.
    pub fn with_seconds(self, seconds: f64) -> Self {
        Self { seconds: Some(seconds), ..self }
    }
}

/// What one synchronization did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncReport {
    /// The local step (1-based) the merge followed.
    pub step: u64,
    /// How many merges have run, this one included.
    pub syncs: u64,
    /// Consensus distance before the merge, `(1/m) Σ_i ‖x_i − x̄‖²`, when measured.
    pub consensus_distance: Option<f64>,
    /// Bytes this worker sent for the merge (the rule's exchange and the statistics).
    pub bytes_sent: u64,
    /// Bytes this worker received for the merge.
    pub bytes_received: u64,
    /// Bytes this worker sent only to measure the consensus distance.
    pub consensus_bytes_sent: u64,
    /// Of `bytes_sent`, those sent inside sub-groups (the group level of hierarchical
    /// averaging); the rest crossed the whole group.
    pub subgroup_bytes_sent: u64,
    /// Mean training loss over workers since the previous merge, when the schedule asked for it.
    pub mean_loss: Option<f64>,
    /// Seconds this worker was blocked in the merge's collectives (including the wait for a
    /// collective an overlapping rule started at an earlier merge).
    pub comm_wait_seconds: f64,
    /// Seconds collectives started at earlier merges travelled while this worker computed
    /// (overlapping rules; 0 for blocking ones).
    pub comm_inflight_seconds: f64,
    /// This worker's simulated clock after the merge, when a network is simulated.
    pub sim_clock: Option<SimClock>,
    /// What an event-triggered rule decided on this worker (sent or not, and its statistic).
    pub trigger: Option<Triggered>,
    /// Every worker's columns, when asked for with [`Synchronizer::with_worker_columns`].
    pub workers: Option<WorkerColumns>,
}

/// Every worker's entries of the learner's `syncs.csv` row for a merge, gathered in the merge's
/// one statistics collective when asked for ([`Synchronizer::with_worker_columns`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WorkerColumns {
    /// Each worker's mean training loss since the previous merge.
    pub losses: Vec<f64>,
    /// Bytes each worker has sent for merges so far (this merge included).
    pub bytes_sent: Vec<u64>,
    /// Bytes each worker has sent so far only to measure the consensus distance.
    pub consensus_bytes_sent: Vec<u64>,
    /// Of `bytes_sent`, those each worker sent inside its sub-group.
    pub subgroup_bytes_sent: Vec<u64>,
    /// Seconds each worker was blocked in this merge's collectives.
    pub wait_seconds: Vec<f64>,
    /// Seconds each worker's collectives started at earlier merges travelled while it computed.
    pub inflight_seconds: Vec<f64>,
    /// Each worker's simulated clock after the merge, when a network is simulated.
    pub sim_seconds: Option<Vec<f64>>,
    /// Of that, the seconds each worker waited for communication.
    pub sim_comm_seconds: Option<Vec<f64>>,
    /// For event-triggered rules: how many workers sent, and the trigger's mean statistic.
    pub trigger: Option<(u64, f64)>,
}

impl WorkerColumns {
    /// The columns from the reduced `values` (column `k` of worker `r` at `k · world + r`).
    fn from_sums(values: &[f64], world: usize, mine: &ColumnEntries) -> Self {
        let column = |k: usize| worker_column(values, k, world);
        let whole = |k: usize| column(k).into_iter().map(|b| b as u64).collect();
        Self {
            losses: column(0),
            bytes_sent: whole(1),
            consensus_bytes_sent: whole(2),
            subgroup_bytes_sent: whole(3),
            wait_seconds: column(4),
            inflight_seconds: column(5),
            sim_seconds: mine.clock.map(|_| column(6)),
            sim_comm_seconds: mine.clock.map(|_| column(7)),
            trigger: mine
                .trigger
                .map(|_| (column(8).iter().sum::<f64>() as u64, column(9).iter().sum::<f64>() / world as f64)),
        }
    }
}

/// This worker's entries of [`WorkerColumns`].
struct ColumnEntries {
    loss: f64,
    bytes_sent: u64,
    consensus_bytes_sent: u64,
    subgroup_bytes_sent: u64,
    wait: CommTime,
    clock: Option<SimClock>,
    trigger: Option<Triggered>,
}

impl ColumnEntries {
    /// Laid out for the sum over workers: column `k` of worker `rank` at `k · world + rank`.
    fn to_values(&self, rank: usize, world: usize) -> Vec<f64> {
        let mut mine = vec![
            self.loss,
            self.bytes_sent as f64,
            self.consensus_bytes_sent as f64,
            self.subgroup_bytes_sent as f64,
            self.wait.wait_seconds,
            self.wait.inflight_seconds,
            self.clock.map_or(0.0, |c| c.now),
            self.clock.map_or(0.0, |c| c.comm_seconds),
        ];
        if let Some(trigger) = self.trigger {
            mine.extend([f64::from(u8::from(trigger.sent)), trigger.statistic]);
        }
        spread_by_worker(&mine, rank, world)
    }
}

/// This worker's values laid out for a sum over `world` workers: value `k` of worker `rank` at
/// `k · world + rank`, zeros elsewhere, so every sum is exact and each worker's value comes back.
pub(crate) fn spread_by_worker(mine: &[f64], rank: usize, world: usize) -> Vec<f64> {
    let mut values = vec![0.0; mine.len() * world];
    for (k, v) in mine.iter().enumerate() {
        values[k * world + rank] = *v;
    }
    values
}

/// Value `k` of every worker, from a sum of [`spread_by_worker`] layouts.
pub(crate) fn worker_column(values: &[f64], k: usize, world: usize) -> Vec<f64> {
    values[k * world..(k + 1) * world].to_vec()
}

/// What this merge's statistics collective carries.
struct StatisticsPlan {
    /// The consensus distance is measured by an all-reduce of the model (rules that do not
    /// measure it themselves, every `consensus_every` merges).
    measure: bool,
    /// The schedule asked for the mean loss (and the simulated clock).
    wants_loss: bool,
    /// The rule's and schedule's statistics travel (and are counted as traffic).
    reduce: bool,
    /// Every worker's columns travel too (the learner's `syncs.csv`).
    columns: bool,
}

impl StatisticsPlan {
    /// The values the rule's and schedule's statistics take: the non-finite counts, the
    /// distance, then the loss and the clock when the schedule wants them.
    fn counted_values(&self, world: usize, clock: bool) -> usize {
        world + 1 + usize::from(self.wants_loss) + usize::from(clock)
    }
}

/// This worker's share of a merge's statistics.
struct Statistics {
    non_finite: usize,
    /// Values of this worker's model (for the error naming a worker's non-finite values).
    values: usize,
    local_distance: Option<f64>,
    clock: Option<SimClock>,
    trigger: Option<Triggered>,
    /// Seconds of communication of this merge before its statistics collective.
    wait: CommTime,
}

/// What a merge's statistics collective gave back.
#[derive(Default)]
struct Reduced {
    consensus_distance: Option<f64>,
    mean_loss: Option<f64>,
    sim_seconds: Option<f64>,
    workers: Option<WorkerColumns>,
}

/// Counters of a synchronizer.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CoopStats {
    /// Local steps taken.
    pub steps: u64,
    /// Merges done.
    pub syncs: u64,
    /// Bytes this worker sent and received for merges (the initial broadcast included;
    /// collectives the training loop runs itself through [`Synchronizer::comm`] are not).
    pub traffic: Traffic,
    /// Bytes spent only on measuring the consensus distance.
    pub consensus_traffic: Traffic,
    /// Of `traffic`, the bytes that moved inside sub-groups (hierarchical averaging's groups).
    #[serde(default)]
    pub subgroup_traffic: Traffic,
    /// Consensus distance measured at the last merge.
    pub last_consensus_distance: Option<f64>,
}

/// The synchronizer's small counters, saved as JSON in checkpoints (the rule's and schedule's
/// buffers go to a binary [`StateFile`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SyncState {
    /// Counters.
    pub stats: CoopStats,
    /// Local steps since the last merge.
    pub steps_since_sync: u64,
    /// Sum of this worker's losses since the last merge.
    pub loss_sum: f64,
    /// Number of losses in `loss_sum`.
    pub loss_count: u64,
    /// Whether the initial broadcast and the rule's start have run.
    pub started: bool,
    /// The simulated clock, when a network is simulated.
    #[serde(default)]
    pub sim_clock: Option<SimClock>,
}

/// The default bucket size of merges taken a bucket at a time
/// ([`Synchronizer::with_bucket_size`]): 4 MiB. Measured on a 64 MiB model (bench P2, four
/// workers on threads), an averaging merge takes 4.4× the memory-bandwidth bound with 1 MiB
/// buckets, 4.9× with 4 MiB, 6.6× with 16 MiB and 14.6× in one piece; 4 MiB stays within 10%
/// of the fastest while a ResNet-20 (1.1 MB) still merges in one piece, exactly as before.
pub const DEFAULT_BUCKET_BYTES: usize = 4 << 20;

/// Where the values given to [`merge_pieces`] sit in a merge taken in buckets.
struct Pieces {
    /// Their offset in the flat model.
    at: usize,
    /// The largest piece.
    size: usize,
    /// Whether they start the merge.
    first: bool,
    /// Whether they end it.
    last: bool,
    /// Scratch the rule may keep ([`Bucket::keep`]).
    keep: usize,
}

/// Merges `values` with the rule in pieces of at most `pieces.size` values; the sum of the
/// pieces' distances, when the rule measures them.
fn merge_pieces(
    rule: &mut dyn MergeRule,
    comm: &mut dyn Communicator,
    values: &mut [f32],
    pieces: Pieces,
    ctx: &SyncContext,
) -> Result<Option<f64>, CoopError> {
    let count = values.len().div_ceil(pieces.size);
    let mut local = None;
    for (p, values) in values.chunks_mut(pieces.size).enumerate() {
        let bucket = Bucket {
            values,
            at: pieces.at + p * pieces.size,
            first: pieces.first && p == 0,
            last: pieces.last && p + 1 == count,
            keep: pieces.keep,
        };
        if let Some(distance) = rule.merge_bucket(bucket, ctx, comm)?.local_squared_distance {
            *local.get_or_insert(0.0) += distance;
        }
    }
    Ok(local)
}

/// The one tensor of `bucket` when it holds a single tensor of the flat buffer.
fn lone_tensor(layout: &ParamLayout, bucket: &LayoutBucket) -> Option<usize> {
    let mut included = bucket.slots.clone().filter(|&index| layout.slots()[index].offset.is_some());
    match (included.next(), included.next()) {
        (Some(index), None) => Some(index),
        _ => None,
    }
}

/// What a merge recorded before its rule ran.
struct Begun {
    /// Values of the merged model.
    values: usize,
    start: TrafficByKind,
    start_time: CommTime,
    before_rule: TrafficByKind,
    measured: Option<f64>,
}

/// The merge engine every front end drives after each local step. A synchronizer owns the merge rule, the schedule, this worker's communicator (wrapped in
/// a [`Metered`] ledger), the parameter layout, the flat buffer and the counters. The training
/// loop calls [`Synchronizer::before_step`] and [`Synchronizer::after_step`] around each local
/// optimizer step; on the steps the schedule selects, `after_step` merges and returns a
/// [`SyncReport`]. [`LocalSgd`](crate::LocalSgd) is a Burn optimizer plus a synchronizer; the
/// learner and the burn-train strategy drive a synchronizer directly.
///
/// One merge, in order:
/// 1. flatten the module (BatchNorm statistics flushed first) and count non-finite values;
/// 2. measure the consensus distance first when asked and the rule does not measure it itself
///    (one all-reduce of the model; its bytes are counted apart);
/// 3. the rule's [`merge`](crate::rules::MergeRule::merge);
/// 4. one small statistics collective, when there is something to reduce (the rule's distance,
///    the loss a schedule asked for): every worker learns which workers held NaN or infinite
///    values, so all stop with the same error. Without it, a worker whose own values are not
///    finite stops before sending them, and the others see it as lost at their next collective;
/// 5. write the merged values back into the module and tell the schedule what was measured.
pub struct Synchronizer {
    rule: Box<dyn MergeRule>,
    schedule: Box<dyn SyncSchedule>,
    comm: Metered<Box<dyn Communicator>>,
    buffer_policy: BufferPolicy,
    initial_broadcast: bool,
    consensus_every: u64,
    seed: u64,
    layout: Option<ParamLayout>,
    flat: Vec<f32>,
    bucket_values: usize,
    state: SyncState,
    lr: Option<f64>,
    last_report: Option<SyncReport>,
    step_time: StepTime,
    worker_columns: bool,
}

impl std::fmt::Debug for Synchronizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synchronizer")
            .field("schedule", &self.schedule.name())
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Synchronizer {
    /// A synchronizer for this worker. A rule built for another number of workers than the
    /// communicator has fails when it starts.
    pub fn new(
        rule: impl MergeRule + 'static,
        schedule: impl SyncSchedule + 'static,
        comm: impl Communicator + 'static,
    ) -> Result<Self, CoopError> {
        Ok(Self {
            rule: Box::new(rule),
            schedule: Box::new(schedule),
            comm: Metered::new(Box::new(comm)),
            buffer_policy: BufferPolicy::default(),
            initial_broadcast: true,
            consensus_every: 0,
            seed: 0,
            layout: None,
            flat: Vec::new(),
            bucket_values: DEFAULT_BUCKET_BYTES / 4,
            state: SyncState::default(),
            lr: None,
            last_report: None,
            step_time: StepTime::default(),
            worker_columns: false,
        })
    }

    /// Simulates `network` (see [`NetworkModel`]): every worker
    /// keeps a simulated clock, moved by each local step (`step_time`) and by each collective.
    /// Every worker must simulate the same network, from its first step.
    pub fn with_simulation(mut self, network: NetworkModel, step_time: StepTime) -> Self {
        self.comm.simulate(network, self.state.sim_clock.unwrap_or_default());
        self.step_time = step_time;
        self
    }

    /// Whether the rule decides at each merge whether to send (its reports carry
    /// [`SyncReport::trigger`]).
    pub fn event_triggered(&self) -> bool {
        self.rule.event_triggered()
    }

    /// This worker's simulated clock, when simulating.
    pub fn sim_clock(&self) -> Option<SimClock> {
        self.comm.clock()
    }

    /// Chooses whether buffers (BatchNorm running statistics) are merged or kept local. Must be
    /// set before the first step.
    pub fn with_buffer_policy(self, policy: BufferPolicy) -> Self {
        Self { buffer_policy: policy, layout: None, ..self }
    }

    /// The bucket size in bytes of `f32` values (default [`DEFAULT_BUCKET_BYTES`]) for rules
    /// that merge a bucket of tensors at a time (averaging, elastic averaging with one anchor,
    /// DiLoCo without a compressor): the memory a merge needs beyond the model and the rule's
    /// own state. A model within one bucket merges exactly as in one piece; in several buckets
    /// every parameter is still the same, bit for bit (the rules are elementwise), and only the
    /// measured consensus distance may differ in its last digits (it is summed per bucket).
    pub fn with_bucket_size(self, bytes: usize) -> Self {
        Self { bucket_values: (bytes / 4).max(1), ..self }
    }

    /// Whether workers adopt worker 0's parameters before the first step (default: yes, so that
    /// all start from the same model, as Cooperative SGD assumes).
    pub fn with_initial_broadcast(self, broadcast: bool) -> Self {
        Self { initial_broadcast: broadcast, ..self }
    }

    /// Measure the consensus distance at every `k`-th merge for rules that do not measure it
    /// by themselves (gossip); 0 (the default) never does. Its bytes are counted apart.
    pub fn with_consensus_every(self, k: u64) -> Self {
        Self { consensus_every: k, ..self }
    }

    /// The learning rate the next merges see in their [`SyncContext`] until a step signal
    /// brings another (for callers of [`Synchronizer::merge_flat`], which take no steps).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = Some(lr);
    }

    /// Gathers every worker's columns of a `syncs.csv` row (losses since the last merge, bytes,
    /// seconds, simulated clocks, trigger decisions) in each merge's one statistics collective:
    /// [`SyncReport::workers`]. Those values are bookkeeping, not the rule's traffic, so they are
    /// not counted in the bytes (the learner turns this on).
    pub fn with_worker_columns(self) -> Self {
        Self { worker_columns: true, ..self }
    }

    /// The seed shared by every worker, handed to the rule in its [`SyncContext`].
    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    fn context(&self) -> SyncContext {
        SyncContext {
            step: self.state.stats.steps,
            round: self.state.stats.syncs,
            steps_since_sync: self.state.steps_since_sync,
            lr: self.lr,
            rank: self.comm.rank(),
            world_size: self.comm.world_size(),
            seed: self.seed,
        }
    }

    fn ensure_layout<M: Module>(&mut self, module: &M) {
        if self.layout.is_none() {
            let layout = ParamLayout::of(module, self.buffer_policy);
            self.rule.set_segments(&layout.segments());
            self.layout = Some(layout);
        }
    }

    /// Before the first step: every worker adopts worker 0's parameters (unless turned off with
    /// [`Synchronizer::with_initial_broadcast`]) and the rule sees the initial model. Does
    /// nothing once started.
    pub fn start<M: Module>(&mut self, module: M) -> Result<M, CoopError> {
        if self.state.started {
            return Ok(module);
        }
        self.ensure_layout(&module);
        let layout = self.layout.take().expect("layout recorded above");
        let started = self.broadcast_start(&layout, module);
        self.layout = Some(layout);
        let module = started?;
        let ctx = self.context();
        self.rule.start(&self.flat, &ctx, &mut self.comm)?;
        self.state.started = true;
        if self.rule.merges_in_buckets() && self.flat.len() > self.bucket_values {
            // Merges read the model a bucket at a time: no copy of it is kept.
            self.flat = Vec::new();
        }
        Ok(module)
    }

    fn broadcast_start<M: Module>(&mut self, layout: &ParamLayout, module: M) -> Result<M, CoopError> {
        layout.flatten_into(&module, &mut self.flat)?;
        if !self.initial_broadcast || self.comm.world_size() == 1 {
            return Ok(module);
        }
        let before = self.comm.traffic().total();
        self.comm.broadcast(&mut self.flat, 0)?;
        self.state.stats.traffic.add(self.comm.traffic().total().since(before));
        Ok(layout.unflatten(module, &self.flat)?)
    }

    /// Call before each local step: starts the synchronizer on the first call.
    pub fn before_step<M: Module>(&mut self, module: M) -> Result<M, CoopError> {
        self.start(module)
    }

    /// Call after each local step: counts it and merges when the schedule says so. Returns the
    /// (possibly merged) module and, on a merge, its report.
    pub fn after_step<M: Module>(
        &mut self,
        module: M,
        signal: StepSignal,
    ) -> Result<(M, Option<SyncReport>), CoopError> {
        let module = self.start(module)?;
        self.count_step(signal);
        if self.merge_due() {
            let (module, report) = self.sync_now(module)?;
            Ok((module, Some(report)))
        } else {
            Ok((module, None))
        }
    }

    /// [`Synchronizer::after_step`] for loops that hold their model elsewhere (burn-train's
    /// learner): `module` is called only when the synchronizer needs the model (a merge, the
    /// start). Returns `None` when the model was not touched.
    pub fn after_step_with<M: Module>(
        &mut self,
        signal: StepSignal,
        module: impl FnOnce() -> M,
    ) -> Result<Option<(M, Option<SyncReport>)>, CoopError> {
        if !self.state.started {
            return self.after_step(module(), signal).map(Some);
        }
        self.count_step(signal);
        if self.merge_due() {
            let (module, report) = self.sync_now(module())?;
            Ok(Some((module, Some(report))))
        } else {
            Ok(None)
        }
    }

    fn count_step(&mut self, signal: StepSignal) {
        self.state.stats.steps += 1;
        let measured = signal.seconds.or_else(|| signal.started.map(|s| s.elapsed().as_secs_f64())).unwrap_or(0.0);
        let seconds = self.step_time.seconds(measured, self.seed, self.comm.rank(), self.state.stats.steps);
        self.comm.local_step(seconds);
        self.state.steps_since_sync += 1;
        self.lr = signal.lr.or(self.lr);
        if let Some(loss) = signal.loss {
            self.state.loss_sum += loss;
            self.state.loss_count += 1;
        }
    }

    fn merge_due(&mut self) -> bool {
        let signal =
            ScheduleSignal { step: self.state.stats.steps, lr: self.lr, steps_since_sync: self.state.steps_since_sync };
        self.schedule.is_sync_step(&signal)
    }

    /// Merges now, whatever the schedule (e.g. before evaluating or saving the final model).
    /// Every worker must call it at the same point.
    pub fn sync_now<M: Module>(&mut self, module: M) -> Result<(M, SyncReport), CoopError> {
        let module = self.start(module)?;
        self.ensure_layout(&module);
        let layout = self.layout.take().expect("layout recorded above");
        let merged = self.merge_with(&layout, module);
        self.layout = Some(layout);
        merged
    }

    /// Replaces every worker's model by the workers' average, weights and buffers, whatever the
    /// rule (one all-reduce of the model; the rule's own state, e.g. an anchor, is untouched):
    /// the model to evaluate or save at the end. Every worker must call it at the same point.
    pub fn average_now<M: Module>(&mut self, module: M) -> Result<M, CoopError> {
        let module = self.start(module)?;
        let layout = ParamLayout::of(&module, BufferPolicy::Merge);
        let mut values = layout.flatten(&module)?;
        self.comm.all_reduce_sum(&mut values)?;
        crate::rules::kernels::divide(&mut values, self.world_size());
        Ok(layout.unflatten(module, &values)?)
    }

    fn merge_with<M: Module>(&mut self, layout: &ParamLayout, module: M) -> Result<(M, SyncReport), CoopError> {
        if self.rule.merges_in_buckets() && !self.statistics_plan().measure {
            return self.merge_in_buckets(layout, module);
        }
        layout.flatten_into(&module, &mut self.flat)?;
        let report = self.merge_flat_buffer()?;
        Ok((layout.unflatten(module, &self.flat)?, report))
    }

    /// Starts the rule on a flat buffer (the initial model: anchors start there), once; without
    /// it, the first [`Synchronizer::merge_flat`] starts from the buffer it merges. No broadcast:
    /// callers of flat buffers give every worker the same initial values themselves.
    pub fn start_flat(&mut self, params: &[f32]) -> Result<(), CoopError> {
        if !self.state.started {
            let ctx = self.context();
            self.rule.start(params, &ctx, &mut self.comm)?;
            self.state.started = true;
        }
        Ok(())
    }

    /// Merges a flat buffer now, whatever the schedule: the merge engine without a module
    /// (benchmarks, callers that keep their parameters flat). Every worker must call it at the
    /// same point with a buffer of the same length.
    pub fn merge_flat(&mut self, params: &mut Vec<f32>) -> Result<SyncReport, CoopError> {
        self.start_flat(params)?;
        std::mem::swap(&mut self.flat, params);
        let report = self.merge_flat_buffer();
        std::mem::swap(&mut self.flat, params);
        report
    }

    fn merge_flat_buffer(&mut self) -> Result<SyncReport, CoopError> {
        let ctx = self.context();
        let non_finite = count_non_finite(&self.flat);
        let plan = self.statistics_plan();
        if !plan.reduce && non_finite > 0 {
            return Err(self.non_finite(ctx.rank, non_finite, self.flat.len()));
        }

        let start = self.comm.traffic();
        let start_time = self.comm.time();
        let measured = if plan.measure { Some(self.measure_consensus(ctx.world_size)?) } else { None };
        let before_rule = self.comm.traffic();
        let outcome = self.rule.merge(&mut self.flat, &ctx, &mut self.comm)?;
        let begun = Begun { values: self.flat.len(), start, start_time, before_rule, measured };
        self.finish_merge(ctx, plan, begun, outcome, non_finite)
    }

    /// A merge a bucket of tensors at a time, for rules that merge in buckets: each bucket is
    /// read from the module, checked for non-finite values, merged (in pieces of at most the
    /// bucket size when one tensor is larger) and written back before the next is read, so the
    /// merge needs one bucket of memory, not a copy of the model. A model that fits in one
    /// bucket keeps its buffers between merges; a larger one gives them back.
    fn merge_in_buckets<M: Module>(&mut self, layout: &ParamLayout, module: M) -> Result<(M, SyncReport), CoopError> {
        let ctx = self.context();
        let plan = self.statistics_plan();
        let size = self.bucket_values;
        let buckets = layout.buckets(size);
        let keep = if buckets.len() > 1 { 0 } else { usize::MAX };
        crate::params::flush_buffers(&module);
        let start = self.comm.traffic();
        let start_time = self.comm.time();
        let mut module = module;
        let (mut non_finite, mut local) = (0, None);
        let mut staging = std::mem::take(&mut self.flat);
        for (k, bucket) in buckets.iter().enumerate() {
            let (first, last) = (k == 0, k + 1 == buckets.len());
            let mut merge = |values: &mut [f32]| -> Result<(), CoopError> {
                let bad = count_non_finite(values);
                non_finite += bad;
                if !plan.reduce && bad > 0 {
                    let (rank, step, total) = (ctx.rank, ctx.step, layout.len());
                    return Err(CoopError::NonFiniteParameters { rank, step, count: bad, total });
                }
                let pieces = Pieces { at: bucket.values.start, size, first, last, keep };
                if let Some(distance) = merge_pieces(&mut *self.rule, &mut self.comm, values, pieces, &ctx)? {
                    *local.get_or_insert(0.0) += distance;
                }
                Ok(())
            };
            module = match lone_tensor(layout, bucket) {
                // A tensor alone in its bucket is merged in its own memory, without a copy.
                Some(slot) => layout.merge_tensor_in_place(module, slot, &mut merge).map_err(|error| match error {
                    InPlaceError::Layout(error) => CoopError::from(error),
                    InPlaceError::Merge(error) => error,
                })?,
                None => {
                    layout.flatten_bucket_into(&module, bucket, &mut staging)?;
                    merge(&mut staging)?;
                    layout.unflatten_bucket(module, bucket, &staging)?
                }
            };
        }
        if keep > 0 {
            self.flat = staging;
        }
        let outcome = MergeOutcome { local_squared_distance: local, trigger: None };
        let begun = Begun { values: layout.len(), start, start_time, before_rule: start, measured: None };
        let report = self.finish_merge(ctx, plan, begun, outcome, non_finite)?;
        Ok((module, report))
    }

    /// The rest of a merge once the rule has merged: traffic, the statistics collective, the
    /// report and the schedule's feedback.
    fn finish_merge(
        &mut self,
        ctx: SyncContext,
        plan: StatisticsPlan,
        begun: Begun,
        outcome: MergeOutcome,
        non_finite: usize,
    ) -> Result<SyncReport, CoopError> {
        let Begun { values, start, start_time, before_rule, measured } = begun;
        let after_rule = self.comm.traffic();
        let local_distance = outcome.local_squared_distance.or(measured);
        // The schedule's clock is read before the statistics collective, which it pays for.
        let clock = self.comm.clock().filter(|_| plan.wants_loss);
        if plan.reduce {
            self.comm.charge_scalars(plan.counted_values(ctx.world_size, clock.is_some()))?;
        }
        let end = self.comm.traffic();

        // The statistics collective belongs to the merge when the rule measures for free or the
        // schedule asked for the loss; otherwise it exists only for the measurement.
        let (merge_traffic, consensus_traffic) = if plan.measure && !plan.wants_loss {
            let mut measuring = before_rule.total().since(start.total());
            measuring.add(end.total().since(after_rule.total()));
            (after_rule.total().since(before_rule.total()), measuring)
        } else {
            (end.total().since(before_rule.total()), before_rule.total().since(start.total()))
        };
        let subgroup_traffic = end.in_subgroups().since(start.in_subgroups());
        let stats = &mut self.state.stats;
        stats.syncs += 1;
        stats.traffic.add(merge_traffic);
        stats.consensus_traffic.add(consensus_traffic);
        stats.subgroup_traffic.add(subgroup_traffic);

        let mine = Statistics {
            non_finite,
            values,
            local_distance,
            clock,
            trigger: outcome.trigger,
            wait: self.comm.time().since(start_time),
        };
        let reduced = self.reduce_statistics(&plan, &mine)?;
        let comm_time = self.comm.time().since(start_time);
        let stats = &mut self.state.stats;
        if reduced.consensus_distance.is_some() {
            stats.last_consensus_distance = reduced.consensus_distance;
        }
        let report = SyncReport {
            step: stats.steps,
            syncs: stats.syncs,
            consensus_distance: reduced.consensus_distance,
            bytes_sent: merge_traffic.bytes_sent,
            bytes_received: merge_traffic.bytes_received,
            consensus_bytes_sent: consensus_traffic.bytes_sent,
            subgroup_bytes_sent: subgroup_traffic.bytes_sent,
            mean_loss: reduced.mean_loss,
            comm_wait_seconds: comm_time.wait_seconds,
            comm_inflight_seconds: comm_time.inflight_seconds,
            sim_clock: self.comm.clock(),
            trigger: outcome.trigger,
            workers: reduced.workers,
        };
        self.schedule.after_sync(&SyncFeedback {
            step: report.step,
            syncs: report.syncs,
            lr: self.lr,
            mean_loss: reduced.mean_loss,
            consensus_distance: reduced.consensus_distance,
            sim_seconds: reduced.sim_seconds,
        });
        self.state.steps_since_sync = 0;
        self.state.loss_sum = 0.0;
        self.state.loss_count = 0;
        self.last_report = Some(report.clone());
        Ok(report)
    }

    /// What this merge's statistics collective carries.
    fn statistics_plan(&self) -> StatisticsPlan {
        let measure = !self.rule.measures_consensus()
            && self.consensus_every > 0
            && (self.state.stats.syncs + 1).is_multiple_of(self.consensus_every);
        let wants_loss = self.schedule.wants_loss();
        let reduce = self.rule.measures_consensus() || measure || wants_loss;
        StatisticsPlan { measure, wants_loss, reduce, columns: self.worker_columns }
    }

    /// `‖x_i − x̄‖²` for a rule that does not measure it itself: one all-reduce of the model.
    fn measure_consensus(&mut self, world: usize) -> Result<f64, CoopError> {
        let mut sum = self.flat.clone();
        self.comm.all_reduce_sum(&mut sum)?;
        Ok(distance_to_mean(&self.flat, &sum, world))
    }

    /// The merge's one statistics collective: every worker's non-finite count, the consensus
    /// distance, the loss and the simulated clock the schedule asked for, and, when the learner
    /// asked for them, every worker's columns of `syncs.csv`. Only the rule's and the schedule's
    /// values are counted as traffic (they were charged before); the columns are bookkeeping.
    fn reduce_statistics(&mut self, plan: &StatisticsPlan, mine: &Statistics) -> Result<Reduced, CoopError> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mut reduced = Reduced::default();
        if !plan.reduce && !plan.columns {
            return Ok(reduced);
        }
        let local_loss = self.state.loss_sum / self.state.loss_count.max(1) as f64;
        let mut values = vec![0.0; world + 3];
        values[rank] = mine.non_finite as f64;
        values[world] = mine.local_distance.unwrap_or(0.0);
        values[world + 1] = local_loss;
        values[world + 2] = mine.clock.map_or(0.0, |c| c.now);
        let columns = plan.columns.then(|| self.column_entries(local_loss, mine));
        if let Some(columns) = &columns {
            values.extend(columns.to_values(rank, world));
        }
        if plan.columns {
            self.comm.all_reduce_f64_uncharged(&mut values)?;
        } else {
            let used = plan.counted_values(world, mine.clock.is_some());
            self.comm.all_reduce_f64_uncharged(&mut values[..used])?;
        }
        if plan.reduce
            && let Some(bad_rank) = values[..world].iter().position(|&count| count > 0.0)
        {
            return Err(self.non_finite(bad_rank, values[bad_rank] as usize, mine.values));
        }
        if plan.reduce {
            reduced.sim_seconds = mine.clock.map(|_| values[world + 2] / world as f64);
            reduced.consensus_distance = mine.local_distance.map(|_| values[world] / world as f64);
            reduced.mean_loss = plan.wants_loss.then(|| values[world + 1] / world as f64);
        }
        reduced.workers = columns.map(|c| WorkerColumns::from_sums(&values[world + 3..], world, &c));
        Ok(reduced)
    }

    /// This worker's entries of the learner's columns, taken after the merge's traffic and
    /// simulated time were counted.
    fn column_entries(&self, local_loss: f64, mine: &Statistics) -> ColumnEntries {
        let stats = &self.state.stats;
        ColumnEntries {
            loss: local_loss,
            bytes_sent: stats.traffic.bytes_sent,
            consensus_bytes_sent: stats.consensus_traffic.bytes_sent,
            subgroup_bytes_sent: stats.subgroup_traffic.bytes_sent,
            wait: mine.wait,
            clock: self.comm.clock(),
            trigger: self.rule.event_triggered().then(|| mine.trigger.unwrap_or_default()),
        }
    }

    fn non_finite(&self, rank: usize, count: usize, total: usize) -> CoopError {
        CoopError::NonFiniteParameters { rank, step: self.state.stats.steps, count, total }
    }

    /// Counters: steps, merges, traffic, last consensus distance.
    pub fn stats(&self) -> CoopStats {
        self.state.stats
    }

    /// What the last merge did, if one has run since this synchronizer was built or restored.
    pub fn last_sync(&self) -> Option<&SyncReport> {
        self.last_report.as_ref()
    }

    /// Whether every worker holds the same model now: the last step merged with a rule that
    /// leaves every worker with the average (averaging, DiLoCo, …), buffers included.
    pub fn workers_agree(&self) -> bool {
        self.rule.reaches_consensus()
            && self.buffer_policy == BufferPolicy::Merge
            && self.last_report.as_ref().is_some_and(|report| report.step == self.state.stats.steps)
    }

    /// Seconds the synchronizer's collectives have taken so far (measured, so not part of the
    /// saved state): blocked, and in flight while computing.
    pub fn comm_time(&self) -> CommTime {
        self.comm.time()
    }

    /// Every byte the synchronizer's collectives moved, by kind of collective.
    pub fn traffic_by_kind(&self) -> TrafficByKind {
        self.comm.traffic()
    }

    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The merge rule.
    pub fn rule(&self) -> &dyn MergeRule {
        self.rule.as_ref()
    }

    /// The period between merges in force now.
    pub fn period(&self) -> u64 {
        self.schedule.period(self.state.stats.steps)
    }

    /// The communicator, for collectives of the training loop's own (averaging a metric,
    /// checkpoint barriers). Its traffic is not counted as merge traffic.
    pub fn comm(&mut self) -> &mut dyn Communicator {
        self.comm.inner_mut().as_mut()
    }

    /// Gives the communicator back (e.g. to build another synchronizer).
    pub fn into_comm(self) -> Box<dyn Communicator> {
        self.comm.into_inner()
    }

    /// The small counters to checkpoint (as JSON).
    pub fn state(&self) -> SyncState {
        SyncState { sim_clock: self.comm.clock(), ..self.state.clone() }
    }

    /// The rule's and the schedule's records (model-sized buffers) to checkpoint (binary).
    pub fn records(&self) -> StateFile {
        let mut file = StateFile::default();
        file.records.insert("rule".into(), self.rule.record());
        file.records.insert("schedule".into(), self.schedule.record());
        file
    }

    /// Restores what [`Synchronizer::state`] and [`Synchronizer::records`] saved (with the same
    /// rule and schedule).
    pub fn load(&mut self, state: SyncState, mut records: StateFile) -> Result<(), CoopError> {
        let mut take = |name: &str| records.records.remove(name).unwrap_or_default();
        let (rule, schedule) = (take("rule"), take("schedule"));
        self.rule.load_record(rule)?;
        self.schedule.load_record(schedule)?;
        if let (Some(clock), Some(_)) = (state.sim_clock, self.comm.clock()) {
            self.comm.restore_clock(clock);
        }
        self.state = state;
        self.last_report = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::comm::InProcessGroup;
    use crate::launch::{Failure, run_group};
    use crate::rules::{averaging::Averaging, gossip::Gossip};
    use crate::schedule::fixed::PeriodicSchedule;
    use crate::testing::{Tiny, tiny_for, worker_buffer};
    use crate::topology::Topology;

    /// Halves τ after every merge whose mean loss over workers is below `threshold`.
    struct HalveBelow {
        tau: u64,
        threshold: f64,
        last_merge: u64,
    }

    impl SyncSchedule for HalveBelow {
        fn name(&self) -> &'static str {
            "halve-below"
        }
        fn is_sync_step(&mut self, signal: &ScheduleSignal) -> bool {
            signal.step - self.last_merge >= self.tau
        }
        fn after_sync(&mut self, feedback: &SyncFeedback) {
            self.last_merge = feedback.step;
            if feedback.mean_loss.expect("asked for") < self.threshold {
                self.tau = (self.tau / 2).max(1);
            }
        }
        fn wants_loss(&self) -> bool {
            true
        }
        fn period(&self, _step: u64) -> u64 {
            self.tau
        }
    }

    fn group<R: Send>(
        m: usize,
        work: impl Fn(usize, crate::comm::InProcessComm) -> Result<R, CoopError> + Sync,
    ) -> Vec<R> {
        run_group(InProcessGroup::new(m).into_communicators(), work).unwrap_or_else(|f| panic!("{:?}", f.primary()))
    }

    #[test]
    fn a_loss_driven_schedule_decides_the_same_on_every_worker() {
        // Worker r's loss at step s is 3 − s/4 + r; only the mean crosses the threshold.
        let loss = |rank: usize, step: u64| 3.0 - step as f64 / 4.0 + rank as f64;
        let runs = group(3, |rank, comm| {
            let schedule = HalveBelow { tau: 4, threshold: 2.0, last_merge: 0 };
            let mut sync = Synchronizer::new(Averaging::new(), schedule, comm)?.with_initial_broadcast(false);
            let mut model: Tiny = tiny_for(rank, &Device::flex());
            let mut merges = Vec::new();
            for step in 1..=16 {
                let (next, report) = sync.after_step(model, StepSignal::new(0.1, loss(rank, step)))?;
                model = next;
                if let Some(report) = report {
                    merges.push((report.step, report.mean_loss.unwrap()));
                }
            }
            Ok(merges)
        });
        assert!(runs.windows(2).all(|w| w[0] == w[1]), "{runs:?}");
        // Mean losses 3.375 (steps 1–4), 2.375 (5–8), then 1.375 (9–12) < 2: τ halves to 2, and
        // after 0.625 (13–14) to 1.
        let steps: Vec<u64> = runs[0].iter().map(|m| m.0).collect();
        let expected_mean = |from: u64, to: u64| {
            (from..=to).flat_map(|s| (0..3).map(move |r| loss(r, s))).sum::<f64>() / (3 * (to - from + 1)) as f64
        };
        let mut previous = 0;
        for &(step, mean) in &runs[0] {
            assert!((mean - expected_mean(previous + 1, step)).abs() < 1e-12, "merge at {step}: {mean}");
            previous = step;
        }
        assert_eq!(steps, vec![4, 8, 12, 14, 15, 16]);
    }

    #[test]
    fn gossip_consensus_is_measured_when_asked_and_counted_apart() {
        let n = 50;
        let runs = group(4, |rank, comm| {
            let gossip = Gossip::on(&Topology::ring(4).unwrap()).unwrap();
            let mut sync =
                Synchronizer::new(gossip, PeriodicSchedule::every(1).unwrap(), comm)?.with_consensus_every(2);
            let mut params = worker_buffer(rank, n);
            (0..4).map(|_| sync.merge_flat(&mut params)).collect::<Result<Vec<_>, _>>()
        });
        for reports in &runs {
            for (k, report) in reports.iter().enumerate() {
                assert_eq!(report.bytes_sent, 2 * 4 * n as u64, "merge {k}: the exchange alone");
                if k % 2 == 1 {
                    assert!(report.consensus_distance.unwrap() > 0.0);
                    // One all-reduce of the model and one of the statistics (m + 1 values).
                    assert_eq!(report.consensus_bytes_sent, (2 * 3 * 4 * n as u64) / 4 + (2 * 3 * 8 * 5) / 4);
                } else {
                    assert_eq!((report.consensus_distance, report.consensus_bytes_sent), (None, 0));
                }
            }
        }
        assert!(runs.windows(2).all(|w| w[0][1].consensus_distance == w[1][1].consensus_distance));
    }

    #[test]
    fn a_worker_with_nan_stops_before_sending_and_is_named_first() {
        let failure = run_group(InProcessGroup::new(4).into_communicators(), |rank, comm| -> Result<(), CoopError> {
            let gossip = Gossip::on(&Topology::ring(4).unwrap()).unwrap();
            let mut sync = Synchronizer::new(gossip, PeriodicSchedule::every(1).unwrap(), comm)?;
            let mut params = worker_buffer(rank, 8);
            if rank == 2 {
                params[3] = f32::NAN;
            }
            sync.merge_flat(&mut params)?;
            sync.merge_flat(&mut params).map(drop)
        })
        .unwrap_err();
        assert!(matches!(
            failure.primary().failure,
            Failure::Error(CoopError::NonFiniteParameters { rank: 2, count: 1, total: 8, .. })
        ));
        for other in &failure.all()[1..] {
            assert!(matches!(
                other.failure,
                Failure::Error(CoopError::Comm(crate::comm::CommError::PeerLost { rank: 2 }))
            ));
        }
    }
}
