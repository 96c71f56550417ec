//! The optimizer wrapper: any Burn optimizer plus a [`Synchronizer`] (merge rule, schedule, communicator).

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer, OptimizerRecord};
use serde::{Deserialize, Serialize};

use crate::comm::Communicator;
use crate::error::CoopError;
use crate::params::BufferPolicy;
use crate::rules::{MergeRule, averaging::Averaging};
use crate::schedule::{SyncSchedule, fixed::PeriodicSchedule};
use crate::state::StateFile;
use crate::sync::{CoopStats, StepSignal, SyncReport, SyncState, Synchronizer};

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

/// The wrapper's own state: the synchronizer's counters (JSON) and the rule's and schedule's
/// records (binary). The inner optimizer's state is saved with [`LocalSgd::to_record`].
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSgdState {
    /// The synchronizer's counters.
    pub sync: SyncState,
    /// The rule's and the schedule's records.
    pub records: StateFile,
}

/// Cooperative SGD as a drop-in replacement for a Burn [`ModuleOptimizer`].
///
/// Each call to [`LocalSgd::step`] applies the inner optimizer to this worker's model; on the
/// steps the schedule selects, the merge rule then combines the workers' models through the
/// communicator. In the notation of Cooperative SGD, `X_{k+1} = (X_k − η G_k) W_k` with `W_k = I`
/// between merges.
///
/// Swapping it into a training loop changes the optimizer's construction and adds a `?`:
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::{GradientsParams, SgdConfig};
/// use burn::tensor::{Device, Tensor};
/// use burn_coop::{LocalSgd, comm::InProcessGroup, rules::averaging::Averaging, schedule::fixed::PeriodicSchedule};
///
/// # fn main() -> Result<(), burn_coop::CoopError> {
/// let device = Device::flex().autodiff();
/// let mut handles = InProcessGroup::new(1).into_communicators();
/// let mut model: Linear = LinearConfig::new(4, 2).init(&device);
///
/// // Before: let mut optim = SgdConfig::new().init();
/// let mut optim = LocalSgd::new(
///     SgdConfig::new().init(),
///     Averaging::new(),
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
    sync: Synchronizer,
    inner_state: InnerStatePolicy,
}

impl std::fmt::Debug for LocalSgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSgd")
            .field("sync", &self.sync)
            .field("inner_state", &self.inner_state)
            .finish_non_exhaustive()
    }
}

impl LocalSgd {
    /// Wraps `inner` (any Burn optimizer, e.g. `SgdConfig::new().init()` or
    /// `AdamConfig::new().init()`) with a merge rule, a schedule and this worker's communicator.
    ///
    /// A rule built for another number of workers than the communicator has fails at the first
    /// step.
    pub fn new(
        inner: ModuleOptimizer,
        rule: impl MergeRule + 'static,
        schedule: impl SyncSchedule + 'static,
        comm: impl Communicator + 'static,
    ) -> Result<Self, CoopError> {
        Ok(Self::with_synchronizer(inner, Synchronizer::new(rule, schedule, comm)?))
    }

    /// Wraps `inner` with a synchronizer built and configured by the caller.
    pub fn with_synchronizer(inner: ModuleOptimizer, sync: Synchronizer) -> Self {
        Self { pristine: inner.clone(), inner, sync, inner_state: InnerStatePolicy::default() }
    }

    /// Synchronous SGD: model averaging after every step (`τ = 1`, `W = J`).
    pub fn synchronous(inner: ModuleOptimizer, comm: impl Communicator + 'static) -> Self {
        let every_step = PeriodicSchedule::every(1).expect("a period of 1 is valid");
        Self::new(inner, Averaging::new(), every_step, comm).expect("averaging runs with any number of workers")
    }

    /// Chooses whether buffers (BatchNorm running statistics) are merged or kept local.
    /// Must be set before the first step.
    pub fn with_buffer_policy(self, policy: BufferPolicy) -> Self {
        Self { sync: self.sync.with_buffer_policy(policy), ..self }
    }

    /// Whether workers adopt worker 0's parameters before the first step (default: yes, so that
    /// all start from the same model, as Cooperative SGD assumes). Turn it off only when the
    /// models are already equal or when different starting points are intended.
    pub fn with_initial_broadcast(self, broadcast: bool) -> Self {
        Self { sync: self.sync.with_initial_broadcast(broadcast), ..self }
    }

    /// Measure the consensus distance at every `k`-th merge for rules that do not measure it by
    /// themselves (gossip); 0 (the default) never does. Its bytes are counted apart.
    pub fn with_consensus_every(self, k: u64) -> Self {
        Self { sync: self.sync.with_consensus_every(k), ..self }
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
        let lr = lr.into();
        let signal = StepSignal { lr: Some(lr.base()), ..StepSignal::default() };
        let module = self.sync.before_step(module)?;
        let module = self.inner.step(lr, module, grads);
        let (module, report) = self.sync.after_step(module, signal)?;
        if report.is_some() {
            self.after_merge();
        }
        Ok(module)
    }

    /// Like [`LocalSgd::step`], also telling the synchronizer this worker's training loss (for
    /// schedules that adapt to it) and returning the merge's report when one ran.
    pub fn step_with_loss<M: Module>(
        &mut self,
        lr: f64,
        loss: f64,
        module: M,
        grads: GradientsParams,
    ) -> Result<(M, Option<SyncReport>), CoopError> {
        let module = self.sync.before_step(module)?;
        let module = self.inner.step(lr, module, grads);
        let (module, report) = self.sync.after_step(module, StepSignal::new(lr, loss))?;
        if report.is_some() {
            self.after_merge();
        }
        Ok((module, report))
    }

    /// One optimizer step described by `signal` (its learning rate, this worker's loss, its
    /// timing), followed by a merge when the schedule says so; returns the merge's report.
    pub fn step_with<M: Module>(
        &mut self,
        signal: StepSignal,
        module: M,
        grads: GradientsParams,
    ) -> Result<(M, Option<SyncReport>), CoopError> {
        let lr = signal.lr.unwrap_or_default();
        let module = self.sync.before_step(module)?;
        let module = self.inner.step(lr, module, grads);
        let (module, report) = self.sync.after_step(module, signal)?;
        if report.is_some() {
            self.after_merge();
        }
        Ok((module, report))
    }

    fn after_merge(&mut self) {
        if self.inner_state == InnerStatePolicy::Reset {
            self.inner = self.pristine.clone();
        }
    }

    /// Makes every worker hold the same model now (before evaluating or saving it): nothing
    /// when the last step's merge already did (a rule that reaches consensus, buffers merged),
    /// otherwise an averaging of the models. Every worker must call it at the same point.
    pub fn agree<M: Module>(&mut self, module: M) -> Result<M, CoopError> {
        if self.sync.workers_agree() {
            return Ok(module);
        }
        self.sync.average_now(module)
    }

    /// Merges now with the rule, whatever the schedule (its merge: a gossip rule moves the models
    /// towards each other without making them equal; [`LocalSgd::agree`] makes them equal).
    /// Every worker must call it at the same point.
    pub fn merge<M: Module>(&mut self, module: M) -> Result<M, CoopError> {
        let (module, _) = self.sync.sync_now(module)?;
        self.after_merge();
        Ok(module)
    }

    /// Counters: steps, merges, traffic, last consensus distance.
    pub fn stats(&self) -> CoopStats {
        self.sync.stats()
    }

    /// What the last merge did, if any has run.
    pub fn last_sync(&self) -> Option<&SyncReport> {
        self.sync.last_sync()
    }

    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.sync.rank()
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.sync.world_size()
    }

    /// The current period between merges.
    pub fn period(&self) -> u64 {
        self.sync.period()
    }

    /// The synchronizer (rule, schedule, communicator, counters).
    pub fn synchronizer(&mut self) -> &mut Synchronizer {
        &mut self.sync
    }

    /// The communicator, for collectives of the training loop's own (e.g. averaging a metric).
    pub fn comm(&mut self) -> &mut dyn Communicator {
        self.sync.comm()
    }

    /// Gives the communicator back (e.g. to rebuild the optimizer with another rule).
    pub fn into_comm(self) -> Box<dyn Communicator> {
        self.sync.into_comm()
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
        LocalSgdState { sync: self.sync.state(), records: self.sync.records() }
    }

    /// Restores state produced by [`LocalSgd::state`] (with the same rule and schedule).
    pub fn load_state(&mut self, state: LocalSgdState) -> Result<(), CoopError> {
        self.sync.load(state.sync, state.records)
    }
}
