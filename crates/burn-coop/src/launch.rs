//! Running one closure per worker on threads of this process, and reporting failures cause
//! first.
//!
//! [`run_group`] is the one thread launcher: [`launch`], the learner, the burn-train strategy and
//! the tests all use it. [`launch`] hands each worker a [`Worker`]: its rank, its communicator,
//! its shard of a dataset ([`shard`]), its seed and a model initialized one worker at a time.

use std::panic::{self, AssertUnwindSafe};
use std::thread;

use burn::data::dataset::Dataset;
use burn::data::dataset::transform::PartialDataset;
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use crate::comm::{CommError, InProcessComm, InProcessGroup};
use crate::error::CoopError;
use crate::local_sgd::LocalSgd;
use crate::rules::{MergeRule, RuleError};
use crate::schedule::SyncSchedule;

/// How far an error is from the cause of a group's failure.
pub trait FailureCause {
    /// 0: a cause (this worker's own failure); higher: a consequence of another worker's
    /// failure (1: another worker's non-finite parameters; 2: a lost peer).
    fn consequence_level(&self) -> u8 {
        0
    }
}

impl FailureCause for std::convert::Infallible {}

/// Any error: a [`CoopError`], [`CommError`] or [`RuleError`] inside keeps its level, anything
/// else is a cause.
impl FailureCause for Box<dyn std::error::Error + Send + Sync> {
    fn consequence_level(&self) -> u8 {
        if let Some(error) = self.downcast_ref::<CoopError>() {
            return error.consequence_level();
        }
        if let Some(error) = self.downcast_ref::<CommError>() {
            return error.consequence_level();
        }
        self.downcast_ref::<RuleError>().map_or(0, FailureCause::consequence_level)
    }
}

impl FailureCause for CommError {
    /// A lost peer is the consequence of that peer's own failure; a timeout is what the others
    /// see of a worker that stopped making progress, whose own error (when it has one) says why.
    fn consequence_level(&self) -> u8 {
        match self {
            Self::PeerLost { .. } => 2,
            Self::Timeout { .. } => 1,
            _ => 0,
        }
    }
}

impl FailureCause for RuleError {
    fn consequence_level(&self) -> u8 {
        match self {
            Self::Comm(error) => error.consequence_level(),
            _ => 0,
        }
    }
}

impl FailureCause for CoopError {
    fn consequence_level(&self) -> u8 {
        match self {
            Self::Comm(error) => error.consequence_level(),
            Self::NonFiniteParameters { .. } => 1,
            _ => 0,
        }
    }
}

/// Why one worker of a group stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure<E> {
    /// The worker's closure returned an error.
    Error(E),
    /// The worker's thread panicked (the panic message).
    Panicked(String),
}

/// One worker's failure.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerFailure<E> {
    /// The worker's rank.
    pub rank: usize,
    /// What happened.
    pub failure: Failure<E>,
}

impl<E: FailureCause> WorkerFailure<E> {
    fn level(&self) -> u8 {
        match &self.failure {
            Failure::Panicked(_) => 0,
            Failure::Error(error) => error.consequence_level(),
        }
    }
}

/// The failures of a group's workers, cause first. When several workers fail, one failure usually
/// causes the others (a worker that panics or hits NaN makes the rest see a lost peer), so
/// failures are ordered by [`FailureCause::consequence_level`]: a panic or a worker's own error
/// first, then another worker's non-finite parameters as seen by the rest, then lost peers; ties
/// go to the lower rank.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupFailure<E> {
    failures: Vec<WorkerFailure<E>>,
}

impl<E: FailureCause> GroupFailure<E> {
    fn new(mut failures: Vec<WorkerFailure<E>>) -> Self {
        failures.sort_by_key(|f| (f.level(), f.rank));
        Self { failures }
    }

    /// The failure reported first: the likeliest cause.
    pub fn primary(&self) -> &WorkerFailure<E> {
        &self.failures[0]
    }

    /// The primary failure, by value.
    pub fn into_primary(mut self) -> WorkerFailure<E> {
        self.failures.swap_remove(0)
    }

    /// Every failure at the primary's level (all the causes), in rank order.
    pub fn causes(&self) -> impl Iterator<Item = &WorkerFailure<E>> {
        let level = self.primary().level();
        self.failures.iter().filter(move |f| f.level() == level)
    }

    /// Every failure, cause first.
    pub fn all(&self) -> &[WorkerFailure<E>] {
        &self.failures
    }
}

/// Runs `work(rank, item)` for every item, item 0 on the calling thread and the others on
/// threads of their own, and returns the results in rank order, or every failure, cause first.
/// The closure may borrow from the caller. A panic is caught and reported as
/// [`Failure::Panicked`]; what the item owns (a communicator) is dropped while unwinding, so the
/// other workers see a lost peer instead of waiting.
pub fn run_group<T: Send, R: Send, E: Send + FailureCause>(
    items: Vec<T>,
    work: impl Fn(usize, T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, GroupFailure<E>> {
    run_group_led(items, |item| work(0, item), &work)
}

/// [`run_group`] with a different closure for item 0, which runs on the calling thread and so
/// may use what cannot cross threads (an event processor, a user interface).
pub fn run_group_led<T: Send, R: Send, E: Send + FailureCause>(
    items: Vec<T>,
    leader: impl FnOnce(T) -> Result<R, E>,
    follower: impl Fn(usize, T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, GroupFailure<E>> {
    let follower = &follower;
    let outcomes: Vec<Result<R, Failure<E>>> = thread::scope(|scope| {
        let mut items = items.into_iter();
        let first = items.next();
        let spawned: Vec<_> = items
            .enumerate()
            .map(|(k, item)| {
                let rank = k + 1;
                thread::Builder::new()
                    .name(format!("coop-worker-{rank}"))
                    .spawn_scoped(scope, move || follower(rank, item))
                    .map_err(|e| format!("could not start the worker thread: {e}"))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(spawned.len() + 1);
        if let Some(item) = first {
            let result = panic::catch_unwind(AssertUnwindSafe(|| leader(item)));
            outcomes.push(flatten(result.map_err(|payload| panic_message(payload.as_ref()))));
        }
        for handle in spawned {
            let result = handle.and_then(|h| h.join().map_err(|payload| panic_message(payload.as_ref())));
            outcomes.push(flatten(result));
        }
        outcomes
    });
    let mut results = Vec::with_capacity(outcomes.len());
    let mut failures = Vec::new();
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(result) => results.push(result),
            Err(failure) => failures.push(WorkerFailure { rank, failure }),
        }
    }
    if failures.is_empty() { Ok(results) } else { Err(GroupFailure::new(failures)) }
}

fn flatten<R, E>(result: Result<Result<R, E>, String>) -> Result<R, Failure<E>> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failure::Error(error)),
        Err(message) => Err(Failure::Panicked(message)),
    }
}

/// One worker of [`launch`]: what a training loop needs to run as one of several.
#[derive(Debug)]
pub struct Worker {
    rank: usize,
    world_size: usize,
    comm: Option<InProcessComm>,
}

impl Worker {
    /// This worker's rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Whether this is worker 0, the one that prints, validates and saves.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// The communicator, to give to [`LocalSgd`](crate::LocalSgd) or a
    /// [`Synchronizer`](crate::Synchronizer); a worker has one
    /// ([`CoopError::CommunicatorTaken`] the second time).
    pub fn comm(&mut self) -> Result<InProcessComm, CoopError> {
        self.comm.take().ok_or(CoopError::CommunicatorTaken { rank: self.rank })
    }

    /// The optimizer wrapper for this worker: `inner` (any Burn optimizer) with a merge rule, a
    /// schedule and this worker's communicator ([`LocalSgd::new`](crate::LocalSgd::new)); one per
    /// worker, as the communicator.
    pub fn local_sgd(
        &mut self,
        inner: ModuleOptimizer,
        rule: impl MergeRule + 'static,
        schedule: impl SyncSchedule + 'static,
    ) -> Result<LocalSgd, CoopError> {
        LocalSgd::new(inner, rule, schedule, self.comm()?)
    }

    /// This worker's share of `dataset`: the `rank`-th of `world_size` contiguous parts, which
    /// are disjoint and cover it (see [`shard`]).
    pub fn shard<D: Dataset<I>, I>(&self, dataset: D) -> PartialDataset<D, I> {
        shard(dataset, self.rank, self.world_size)
    }

    /// A seed of this worker's own, the same in every run with the same `seed` (for its data
    /// order and augmentation; the model is [`Worker::init`]'s).
    pub fn seed(&self, seed: u64) -> u64 {
        crate::random::bits(seed, self.rank as u64, 0)
    }

    /// The model `init` builds on `device` from `seed`, one worker at a time: the workers of
    /// one process share a device's random numbers, so concurrent initializations would draw
    /// them in a different order each run. Every worker passing the same `seed` builds the same
    /// model (and [`LocalSgd`](crate::LocalSgd) starts them all from worker 0's anyway).
    pub fn init<M: Module>(&self, seed: u64, device: &Device, init: impl FnOnce(&Device) -> M) -> M {
        init_seeded(seed, device, init)
    }

    /// `lr × world_size`: the linear scaling rule (Goyal et al., 2017), a choice to make
    /// explicitly. Each worker takes `world_size` times fewer steps per epoch on its shard, so
    /// at the single loop's rate the cooperative run learns less per epoch; this rate makes up
    /// for it (with a warm-up for large groups), at the risk of diverging where the single
    /// loop's rate was already near its limit.
    pub fn scaled_lr(&self, lr: f64) -> f64 {
        lr * self.world_size as f64
    }
}

/// The `rank`-th of `workers` contiguous parts of `dataset` (sizes differ by at most one): the
/// parts are disjoint and cover it. Shuffle an ordered dataset first, with the same seed on
/// every worker (`ShuffledDataset::with_seed`).
pub fn shard<D: Dataset<I>, I>(dataset: D, rank: usize, workers: usize) -> PartialDataset<D, I> {
    let len = dataset.len();
    let workers = workers.max(1);
    let (start, end) = (len * rank / workers, len * (rank + 1) / workers);
    PartialDataset::new(dataset, start, end)
}

/// Initializes a model under a process-wide lock, after seeding the device, and touches every
/// parameter (they are initialized lazily) before the lock is released.
pub(crate) fn init_seeded<M: Module>(seed: u64, device: &Device, init: impl FnOnce(&Device) -> M) -> M {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    device.seed(seed);
    let model = init(device);
    crate::params::flush_buffers(&model);
    let _ = crate::params::ParamLayout::of(&model, crate::params::BufferPolicy::Merge);
    model
}

impl<E: std::fmt::Display> std::fmt::Display for WorkerFailure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.failure {
            Failure::Error(error) => write!(f, "worker {}: {error}", self.rank),
            Failure::Panicked(message) => write!(f, "worker {} panicked: {message}", self.rank),
        }
    }
}

/// An error of its own (its text includes the worker's error), so that any error type, boxed
/// ones included, unpacks with `?`.
impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for WorkerFailure<E> {}

/// Runs `work` once per worker on threads of this process, each with its own [`Worker`] (worker
/// 0 on the calling thread), and returns the results in rank order, or the failure that caused
/// the others (see [`GroupFailure`]: a panic or a worker's own error before the lost peers it
/// made the others see). The closure may borrow from the caller; it returns a `Result` whose
/// error is [`CoopError`] or any error boxed (`Box<dyn Error + Send + Sync>`, so `?` works on
/// anything), and the whole unpacks with one `?`.
///
/// ```
/// use burn_coop::comm::Communicator;
/// use burn_coop::{CoopError, launch};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let sums = launch(3, |worker| {
///     let rank = worker.rank() as f32;
///     let mut comm = worker.comm()?;
///     let mut total = [rank];
///     comm.all_reduce_sum(&mut total)?;
///     Ok::<_, CoopError>(total[0])
/// })?;
/// assert_eq!(sums, vec![3.0, 3.0, 3.0]);
/// # Ok(())
/// # }
/// ```
pub fn launch<R: Send, E: Send + FailureCause>(
    workers: usize,
    work: impl Fn(&mut Worker) -> Result<R, E> + Sync,
) -> Result<Vec<R>, WorkerFailure<E>> {
    let comms = InProcessGroup::new(workers).into_communicators();
    run_group(comms, |rank, comm| work(&mut Worker { rank, world_size: workers, comm: Some(comm) }))
        .map_err(GroupFailure::into_primary)
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Communicator;
    use crate::random;

    #[test]
    fn failures_are_reported_cause_first() {
        let comms = InProcessGroup::new(3).into_communicators();
        let result = run_group(comms, |rank, mut comm| -> Result<(), CoopError> {
            if rank == 2 {
                return Err(CoopError::NonFiniteParameters { rank: 2, step: 1, count: 1, total: 1 });
            }
            comm.barrier()?;
            Ok(())
        });
        let failure = result.unwrap_err();
        assert_eq!(failure.primary().rank, 2, "{failure:?}");
        assert_eq!(failure.all().len(), 3);
        assert_eq!(failure.causes().count(), 1);
        assert!(matches!(failure.all()[1].failure, Failure::Error(CoopError::Comm(CommError::PeerLost { rank: 2 }))));
    }

    #[test]
    fn a_panic_comes_before_the_lost_peers_it_causes() {
        let comms = InProcessGroup::new(2).into_communicators();
        let failure = run_group(comms, |rank, mut comm| -> Result<(), CommError> {
            if rank == 1 {
                panic!("worker one gives up");
            }
            comm.barrier()
        })
        .unwrap_err();
        assert_eq!(
            failure.primary(),
            &WorkerFailure { rank: 1, failure: Failure::Panicked("worker one gives up".into()) }
        );
        let panicked = launch(2, |worker| if worker.rank() == 0 { panic!("rank zero") } else { Ok::<_, CoopError>(7) })
            .unwrap_err();
        assert!(matches!(&panicked, WorkerFailure { rank: 0, failure: Failure::Panicked(m) } if m == "rank zero"));
        assert_eq!(panicked.to_string(), "worker 0 panicked: rank zero");
    }

    #[test]
    fn a_worker_hands_out_one_communicator_its_shard_and_its_seed() {
        use burn::data::dataset::InMemDataset;
        let data = std::sync::Arc::new(InMemDataset::new((0..10).collect::<Vec<u32>>()));
        let shards = launch(3, |worker| {
            let first = worker.comm().map(|comm| comm.rank());
            let again = worker.comm().unwrap_err();
            let shard: Vec<u32> = worker.shard(data.clone()).iter().map(Result::unwrap).collect();
            Ok::<_, CoopError>((first?, again.to_string(), shard, worker.seed(5)))
        })
        .unwrap();
        let items: Vec<u32> = shards.iter().flat_map(|s| s.2.clone()).collect();
        assert_eq!(items, (0..10).collect::<Vec<_>>(), "disjoint shards that cover the data, in order");
        assert_eq!(shards.iter().map(|s| s.2.len()).collect::<Vec<_>>(), [3, 3, 4]);
        assert_eq!(shards[1].1, "worker 1's communicator was already taken: one per worker");
        assert!(shards[0].3 != shards[1].3 && shards[0].3 == random::bits(5, 0, 0));
        // A boxed error of any kind unpacks with `?`, a CoopError inside keeping its level.
        let boxed = launch(2, |worker| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let mut comm = worker.comm()?;
            if worker.rank() == 1 {
                "x".parse::<u32>()?;
            }
            comm.barrier()?;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(boxed.rank, 1, "the parse error caused rank 0's lost peer: {boxed}");
    }
}
