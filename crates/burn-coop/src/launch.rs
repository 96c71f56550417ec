//! Running one closure per worker on threads of this process, and reporting failures cause
//! first.
//!
//! [`run_group`] is the one thread launcher: [`launch`], the learner, the burn-train strategy and
//! the tests all use it.

use std::panic::{self, AssertUnwindSafe};
use std::thread;

use crate::comm::{CommError, Communicator, InProcessComm, InProcessGroup};
use crate::error::CoopError;
use crate::rules::RuleError;

/// How far an error is from the cause of a group's failure.
pub trait FailureCause {
    /// 0: a cause (this worker's own failure); higher: a consequence of another worker's
    /// failure (1: another worker's non-finite parameters; 2: a lost peer).
    fn consequence_level(&self) -> u8 {
        0
    }
}

impl FailureCause for std::convert::Infallible {}

impl FailureCause for CommError {
    fn consequence_level(&self) -> u8 {
        match self {
            Self::PeerLost { .. } => 2,
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

/// One worker of [`launch`]: its rank and its handle on the group.
#[derive(Debug)]
pub struct Worker {
    comm: InProcessComm,
}

impl Worker {
    /// This worker's rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The communicator, to give to [`LocalSgd`](crate::LocalSgd) or a
    /// [`Synchronizer`](crate::Synchronizer).
    pub fn comm(self) -> InProcessComm {
        self.comm
    }
}

/// A worker thread that panicked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker {rank} panicked: {message}")]
pub struct WorkerPanicked {
    /// The worker's rank.
    pub rank: usize,
    /// The panic message.
    pub message: String,
}

/// Runs `work` once per worker, each with its own [`Worker`] (worker 0 on the calling thread),
/// and returns the results in rank order. The closure may borrow from the caller. If a worker
/// panics, the others see [`CommError::PeerLost`] at their next collective and `launch` returns
/// the first panic.
///
/// ```
/// use burn_coop::comm::Communicator;
/// use burn_coop::launch;
///
/// let sums = launch(3, |worker| {
///     let rank = worker.rank() as f32;
///     let mut comm = worker.comm();
///     let mut total = [rank];
///     comm.all_reduce_sum(&mut total).unwrap();
///     total[0]
/// })
/// .unwrap();
/// assert_eq!(sums, vec![3.0, 3.0, 3.0]);
/// ```
pub fn launch<R: Send>(workers: usize, work: impl Fn(Worker) -> R + Sync) -> Result<Vec<R>, WorkerPanicked> {
    let comms = InProcessGroup::new(workers).into_communicators();
    run_group(comms, |_, comm| Ok::<R, std::convert::Infallible>(work(Worker { comm }))).map_err(|failure| {
        let primary = failure.into_primary();
        match primary.failure {
            Failure::Panicked(message) => WorkerPanicked { rank: primary.rank, message },
            Failure::Error(never) => match never {},
        }
    })
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
        let panicked = launch(2, |worker| if worker.rank() == 0 { panic!("rank zero") } else { 7 }).unwrap_err();
        assert_eq!(panicked, WorkerPanicked { rank: 0, message: "rank zero".into() });
    }
}
