//! Running one closure per worker on threads of this process.

use std::thread;

use crate::transport::{InProcessGroup, InProcessTransport, Transport};

/// One worker of [`launch`]: its rank and its handle on the group.
#[derive(Debug)]
pub struct Worker {
    transport: InProcessTransport,
}

impl Worker {
    /// This worker's rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.transport.world_size()
    }

    /// The transport, to give to [`LocalSgd`](crate::LocalSgd).
    pub fn transport(self) -> InProcessTransport {
        self.transport
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

/// Runs `work` once per worker, each on its own thread with its own [`Worker`], and returns the
/// results in rank order. The closure may borrow from the caller. If a worker panics, the others
/// see [`TransportError::PeerLost`](crate::TransportError::PeerLost) at their next collective
/// and `launch` returns the first panic.
///
/// ```
/// use burn_coop::{launch, ReduceOp, Transport};
///
/// let sums = launch(3, |worker| {
///     let rank = worker.rank() as f32;
///     let mut transport = worker.transport();
///     let mut total = [0.0];
///     transport.all_reduce(&[rank], &mut total, ReduceOp::Sum).unwrap();
///     total[0]
/// })
/// .unwrap();
/// assert_eq!(sums, vec![3.0, 3.0, 3.0]);
/// ```
pub fn launch<R: Send>(workers: usize, work: impl Fn(Worker) -> R + Sync) -> Result<Vec<R>, WorkerPanicked> {
    let transports = InProcessGroup::new(workers).into_transports();
    thread::scope(|scope| {
        let handles: Vec<_> = transports
            .into_iter()
            .map(|transport| {
                let work = &work;
                thread::Builder::new()
                    .name(format!("coop-worker-{}", transport.rank()))
                    .spawn_scoped(scope, move || work(Worker { transport }))
                    .expect("spawn worker thread")
            })
            .collect();
        let mut results = Vec::with_capacity(workers);
        let mut first_panic = None;
        for (rank, handle) in handles.into_iter().enumerate() {
            match handle.join() {
                Ok(result) => results.push(result),
                Err(payload) => {
                    let message = panic_message(payload.as_ref());
                    first_panic.get_or_insert(WorkerPanicked { rank, message });
                }
            }
        }
        match first_panic {
            Some(panic) => Err(panic),
            None => Ok(results),
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
