//! The optimizer wrapper: any Burn optimizer plus a merge rule, a schedule and a transport.

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer, OptimizerRecord};
use serde::{Deserialize, Serialize};

use crate::error::CoopError;
use crate::params::{BufferPolicy, ParamLayout};
use crate::rules::{MergeOutcome, MergeRule, PeriodicAveraging, RuleState};
use crate::schedule::{PeriodicSchedule, SyncSchedule};
use crate::transport::{ReduceOp, Traffic, Transport};

/// What happens to the inner optimizer's state (momentum, Adam moments) at a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InnerStatePolicy {
    /// Each worker keeps its own state (as PyTorch's `PostLocalSGDOptimizer` does).
    #[default]
    KeepLocal,
    /// The state is reset to the optimizer as it was given to [`LocalSgd::new`].
    Reset,
}

/// What one synchronization did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SyncReport {
    /// The local step (1-based) the merge followed.
    pub step: u64,
    /// How many merges have run, this one included.
    pub syncs: u64,
    /// Consensus distance before the merge, `(1/m) Σ_i ‖x_i − x̄‖²`, when measured.
    pub consensus_distance: Option<f64>,
    /// Bytes this worker sent during the merge.
    pub bytes_sent: u64,
    /// Bytes this worker received during the merge.
    pub bytes_received: u64,
}

/// Counters of a [`LocalSgd`] optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CoopStats {
    /// Local steps taken.
    pub steps: u64,
    /// Merges done.
    pub syncs: u64,
    /// Bytes this worker sent and received in merges (collectives the training loop runs
    /// itself through [`LocalSgd::transport_mut`] are not counted here).
    pub traffic: Traffic,
    /// Consensus distance measured at the last merge.
    pub last_consensus_distance: Option<f64>,
}

/// The wrapper's own state (the inner optimizer's state is saved with
/// [`LocalSgd::to_record`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalSgdState {
    /// Local steps taken.
    pub steps: u64,
    /// Merges done.
    pub syncs: u64,
    /// Traffic counted so far.
    pub traffic: Traffic,
    /// Consensus distance at the last merge.
    pub last_consensus_distance: Option<f64>,
    /// The rule's state (anchor, …).
    pub rule: RuleState,
    /// The schedule's state.
    pub schedule: Vec<u8>,
    /// Whether the rule has seen the initial parameters.
    pub started: bool,
}

/// Cooperative SGD as a drop-in replacement for a Burn [`ModuleOptimizer`].
///
/// Each call to [`LocalSgd::step`] applies the inner optimizer to this worker's model; on the
/// steps the schedule selects, the merge rule then combines the workers' models through the
/// transport. In the notation of Cooperative SGD, `X_{k+1} = (X_k − η G_k) W_k` with `W_k = I`
/// between merges.
///
/// Swapping it into a training loop changes the optimizer's construction and adds a `?`:
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::{GradientsParams, SgdConfig};
/// use burn::tensor::{Device, Tensor};
/// use burn_coop::{InProcessGroup, LocalSgd, PeriodicAveraging, PeriodicSchedule};
///
/// # fn main() -> Result<(), burn_coop::CoopError> {
/// let device = Device::flex().autodiff();
/// let mut handles = InProcessGroup::new(1).into_transports();
/// let mut model: Linear = LinearConfig::new(4, 2).init(&device);
///
/// // Before: let mut optim = SgdConfig::new().init();
/// let mut optim = LocalSgd::new(
///     SgdConfig::new().init(),
///     PeriodicAveraging::new(),
///     PeriodicSchedule::every(8)?,
///     handles.remove(0),
/// )?;
///
/// for _ in 0..16 {
///     let x = Tensor::<2>::ones([3, 4], &device);
///     let loss = model.forward(x).powi_scalar(2).mean();
///     let grads = GradientsParams::from_grads(loss.backward(), &model);
///     // Before: model = optim.step(0.1, model, grads);
///     model = optim.step(0.1, model, grads)?;
/// }
/// assert_eq!(optim.stats().syncs, 2);
/// # Ok(())
/// # }
/// ```
pub struct LocalSgd {
    inner: ModuleOptimizer,
    pristine: ModuleOptimizer,
    rule: Box<dyn MergeRule>,
    schedule: Box<dyn SyncSchedule>,
    transport: Box<dyn Transport>,
    buffer_policy: BufferPolicy,
    inner_state: InnerStatePolicy,
    initial_broadcast: bool,
    layout: Option<ParamLayout>,
    flat: Vec<f32>,
    steps: u64,
    syncs: u64,
    started: bool,
    traffic: Traffic,
    last_report: Option<SyncReport>,
}

impl std::fmt::Debug for LocalSgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSgd")
            .field("rule", &self.rule.name())
            .field("rank", &self.transport.rank())
            .field("world_size", &self.transport.world_size())
            .field("steps", &self.steps)
            .field("syncs", &self.syncs)
            .finish_non_exhaustive()
    }
}

impl LocalSgd {
    /// Wraps `inner` (any Burn optimizer, e.g. `SgdConfig::new().init()` or
    /// `AdamConfig::new().init()`) with a merge rule, a schedule and this worker's transport.
    ///
    /// Fails when the rule cannot run with the transport's number of workers (e.g. an elastic
    /// α out of range, or a gossip matrix of the wrong order).
    pub fn new(
        inner: ModuleOptimizer,
        rule: impl MergeRule + 'static,
        schedule: impl SyncSchedule + 'static,
        transport: impl Transport + 'static,
    ) -> Result<Self, CoopError> {
        rule.validate(transport.world_size())?;
        Ok(Self {
            pristine: inner.clone(),
            inner,
            rule: Box::new(rule),
            schedule: Box::new(schedule),
            transport: Box::new(transport),
            buffer_policy: BufferPolicy::default(),
            inner_state: InnerStatePolicy::default(),
            initial_broadcast: true,
            layout: None,
            flat: Vec::new(),
            steps: 0,
            syncs: 0,
            started: false,
            traffic: Traffic::default(),
            last_report: None,
        })
    }

    /// Synchronous SGD: model averaging after every step (`τ = 1`, `W = J`).
    pub fn synchronous(inner: ModuleOptimizer, transport: impl Transport + 'static) -> Self {
        let every_step = PeriodicSchedule::every(1).expect("a period of 1 is valid");
        Self::new(inner, PeriodicAveraging::new(), every_step, transport)
            .expect("averaging runs with any number of workers")
    }

    /// Chooses whether buffers (BatchNorm running statistics) are merged or kept local.
    /// Must be set before the first step.
    pub fn with_buffer_policy(self, policy: BufferPolicy) -> Self {
        Self { buffer_policy: policy, layout: None, ..self }
    }

    /// Whether workers adopt worker 0's parameters before the first step (default: yes, so that
    /// all start from the same model, as Cooperative SGD assumes). Turn it off only when the
    /// models are already equal or when different starting points are intended.
    pub fn with_initial_broadcast(self, broadcast: bool) -> Self {
        Self { initial_broadcast: broadcast, ..self }
    }

    /// Chooses what happens to the inner optimizer's state at a merge.
    pub fn with_inner_state(self, policy: InnerStatePolicy) -> Self {
        Self { inner_state: policy, ..self }
    }

    /// One optimizer step, followed by a merge when the schedule says so. Same call as
    /// [`ModuleOptimizer::step`], returning a `Result` because a merge can fail (a lost worker,
    /// non-finite parameters).
    pub fn step<M: Module>(
        &mut self,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        grads: GradientsParams,
    ) -> Result<M, CoopError> {
        let module = if self.started { module } else { self.start(module)? };
        let module = self.inner.step(lr, module, grads);
        self.steps += 1;
        if self.schedule.is_sync_step(self.steps) { self.merge(module) } else { Ok(module) }
    }

    /// Before the first step: every worker adopts worker 0's parameters (unless disabled with
    /// [`LocalSgd::with_initial_broadcast`]), and the rule sees the initial model.
    fn start<M: Module>(&mut self, module: M) -> Result<M, CoopError> {
        self.ensure_layout(&module);
        let layout = self.layout.take().expect("layout recorded above");
        let started = self.broadcast_start(&layout, module);
        self.layout = Some(layout);
        let module = started?;
        self.rule.start(&self.flat);
        self.started = true;
        Ok(module)
    }

    fn broadcast_start<M: Module>(&mut self, layout: &ParamLayout, module: M) -> Result<M, CoopError> {
        layout.flatten_into(&module, &mut self.flat)?;
        if !self.initial_broadcast || self.transport.world_size() == 1 {
            return Ok(module);
        }
        // A sum in which every other worker contributes zeros is an exact broadcast.
        let mut mine = self.flat.clone();
        if self.transport.rank() != 0 {
            mine.iter_mut().for_each(|v| *v = 0.0);
        }
        let before = self.transport.traffic();
        self.transport.all_reduce(&mine, &mut self.flat, ReduceOp::Sum)?;
        self.count_traffic_since(before);
        Ok(layout.unflatten(module, &self.flat)?)
    }

    /// Merges now, whatever the schedule (e.g. before evaluating or saving the final model).
    /// Every worker must call it at the same point.
    pub fn merge<M: Module>(&mut self, module: M) -> Result<M, CoopError> {
        self.ensure_layout(&module);
        let layout = self.layout.take().expect("layout recorded above");
        let merged = self.merge_with(&layout, module);
        self.layout = Some(layout);
        merged
    }

    fn merge_with<M: Module>(&mut self, layout: &ParamLayout, module: M) -> Result<M, CoopError> {
        layout.flatten_into(&module, &mut self.flat)?;
        let non_finite = count_non_finite(&self.flat);
        let before = self.transport.traffic();
        let outcome = self.rule.merge(&mut self.flat, self.transport.as_mut())?;
        let consensus_distance = self.merge_statistics(non_finite, outcome)?;
        let traffic = self.count_traffic_since(before);
        let module = layout.unflatten(module, &self.flat)?;
        self.syncs += 1;
        if self.inner_state == InnerStatePolicy::Reset {
            self.inner = self.pristine.clone();
        }
        self.last_report = Some(SyncReport {
            step: self.steps,
            syncs: self.syncs,
            consensus_distance,
            bytes_sent: traffic.bytes_sent,
            bytes_received: traffic.bytes_received,
        });
        Ok(module)
    }

    /// One small collective after the rule's exchange: every worker learns which workers held
    /// NaN or infinite values (so all stop with the same error instead of waiting on a worker
    /// that gave up) and the consensus distance.
    fn merge_statistics(&mut self, non_finite: usize, outcome: MergeOutcome) -> Result<Option<f64>, CoopError> {
        let (world, rank) = (self.transport.world_size(), self.transport.rank());
        let mut values = vec![0.0; world + 1];
        values[rank] = non_finite as f64;
        values[world] = outcome.local_squared_distance.unwrap_or(0.0);
        self.transport.all_reduce_f64(&mut values)?;
        if let Some(bad_rank) = values[..world].iter().position(|&count| count > 0.0) {
            return Err(CoopError::NonFiniteParameters {
                rank: bad_rank,
                step: self.steps,
                count: values[bad_rank] as usize,
                total: self.flat.len(),
            });
        }
        Ok(outcome.local_squared_distance.map(|_| values[world] / world as f64))
    }

    /// Adds the transport's traffic since `before` to the merge counters and returns it.
    fn count_traffic_since(&mut self, before: Traffic) -> Traffic {
        let after = self.transport.traffic();
        let delta = Traffic {
            bytes_sent: after.bytes_sent - before.bytes_sent,
            bytes_received: after.bytes_received - before.bytes_received,
        };
        self.traffic.bytes_sent += delta.bytes_sent;
        self.traffic.bytes_received += delta.bytes_received;
        delta
    }

    fn ensure_layout<M: Module>(&mut self, module: &M) {
        if self.layout.is_none() {
            self.layout = Some(ParamLayout::of(module, self.buffer_policy));
        }
    }

    /// Counters: steps, merges, traffic, last consensus distance.
    pub fn stats(&self) -> CoopStats {
        CoopStats {
            steps: self.steps,
            syncs: self.syncs,
            traffic: self.traffic,
            last_consensus_distance: self.last_report.and_then(|r| r.consensus_distance),
        }
    }

    /// What the last merge did, if any has run.
    pub fn last_sync(&self) -> Option<&SyncReport> {
        self.last_report.as_ref()
    }

    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.transport.world_size()
    }

    /// The merge rule's name.
    pub fn rule_name(&self) -> &'static str {
        self.rule.name()
    }

    /// The current period between merges.
    pub fn period(&self) -> u64 {
        self.schedule.period(self.steps)
    }

    /// The transport, for collectives of the training loop's own (e.g. averaging a metric).
    pub fn transport_mut(&mut self) -> &mut dyn Transport {
        self.transport.as_mut()
    }

    /// Gives the transport back (e.g. to rebuild the optimizer with another rule).
    pub fn into_transport(self) -> Box<dyn Transport> {
        self.transport
    }

    /// The inner optimizer.
    pub fn inner(&self) -> &ModuleOptimizer {
        &self.inner
    }

    /// The inner optimizer's record (momentum buffers, Adam moments, …).
    pub fn to_record(&self) -> OptimizerRecord {
        self.inner.to_record()
    }

    /// Restores the inner optimizer's record.
    pub fn load_record(&mut self, record: OptimizerRecord) {
        self.inner = self.inner.clone().load_record(record);
    }

    /// The wrapper's own state: counters, the rule's state and the schedule's state.
    pub fn state(&self) -> LocalSgdState {
        LocalSgdState {
            steps: self.steps,
            syncs: self.syncs,
            traffic: self.traffic,
            last_consensus_distance: self.last_report.and_then(|r| r.consensus_distance),
            rule: self.rule.export_state(),
            schedule: self.schedule.export_state(),
            started: self.started,
        }
    }

    /// Restores state produced by [`LocalSgd::state`] (with the same rule and schedule).
    pub fn load_state(&mut self, state: LocalSgdState) -> Result<(), CoopError> {
        self.rule.import_state(state.rule)?;
        self.schedule.import_state(&state.schedule)?;
        self.traffic = state.traffic;
        self.steps = state.steps;
        self.syncs = state.syncs;
        self.started = state.started;
        self.last_report = state.last_consensus_distance.map(|c| SyncReport {
            step: state.steps,
            syncs: state.syncs,
            consensus_distance: Some(c),
            bytes_sent: 0,
            bytes_received: 0,
        });
        Ok(())
    }
}

/// NaN and infinite values in `values` (counted in lanes so the loop vectorizes).
fn count_non_finite(values: &[f32]) -> usize {
    const LANES: usize = 16;
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().filter(|v| !v.is_finite()).count();
    let mut acc = [0u32; LANES];
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += u32::from(!chunk[l].is_finite());
        }
    }
    tail + acc.iter().map(|&a| a as usize).sum::<usize>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn non_finite_values_are_counted_in_body_and_tail() {
        let mut values = vec![1.0f32; 37];
        values[3] = f32::NAN;
        values[20] = f32::INFINITY;
        values[36] = f32::NEG_INFINITY;
        assert_eq!(super::count_non_finite(&values), 3);
        assert_eq!(super::count_non_finite(&values[..16]), 1);
        assert_eq!(super::count_non_finite(&[]), 0);
    }
}
