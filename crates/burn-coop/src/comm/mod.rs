//! How workers exchange data: the [`Communicator`] trait, which only moves data.
//!
//! A communicator does no arithmetic beyond the element-wise sum of an all-reduce and counts
//! nothing: weighted sums belong to the rules (`rules/kernels.rs`), and bytes are counted by the
//! [`Metered`] decorator from the payloads that really travel. The same rule code runs over
//! threads in one process ([`InProcessComm`]) and over MPI ranks (the `burn-coop-mpi` crate).
//!
//! | operation | blocking | non-blocking | what travels |
//! |---|---|---|---|
//! | sum all-reduce of `f32` | [`Communicator::all_reduce_sum`], [`Communicator::all_reduce_sum_into`] | [`Communicator::start_all_reduce_sum`] → [`PendingSum::wait`] | the buffer |
//! | sum of a few `f64` | [`Communicator::all_reduce_f64`] | | statistics, flags, losses |
//! | broadcast of `f32` | [`Communicator::broadcast`] | | a root's buffer |
//! | all-gather of bytes | [`Communicator::all_gather_bytes`] | | variable-size payloads (compressed messages) |
//! | neighbour exchange | [`Communicator::exchange`], [`Communicator::exchange_directed`] | | a buffer to each peer, one from each peer (or to some, from others) |
//! | neighbour exchange of bytes | [`Communicator::exchange_bytes`] | | a payload of any length (zero: nothing sent) to some peers, one from others |
//! | sub-groups | [`Communicator::split`] | | ranks with the same colour form a new group |
//! | barrier | [`Communicator::barrier`] | | nothing |

mod in_process;
mod metered;
mod network;

pub use in_process::{InProcessComm, InProcessGroup};
pub use metered::{CollectiveKind, CommTime, Metered, Traffic, TrafficByKind};
pub use network::{NetworkModel, SMALL_COLLECTIVE_VALUES, SimClock, StepTime};

/// Why communication failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// Another worker died, panicked or left before taking part in a collective.
    #[error(
        "worker {rank} was lost (it panicked, exited or dropped its communicator) before joining the collective operation"
    )]
    PeerLost {
        /// The lost worker's rank.
        rank: usize,
    },
    /// The collective did not complete in time.
    #[error("timed out after {seconds:.1} s waiting for worker(s) {waiting_for:?}")]
    Timeout {
        /// Seconds waited.
        seconds: f64,
        /// Ranks that had not arrived.
        waiting_for: Vec<usize>,
    },
    /// Workers passed buffers of different lengths to the same collective.
    #[error("worker {rank} passed a buffer of {len} values but worker {other_rank} passed {other_len}")]
    LengthMismatch {
        /// This worker.
        rank: usize,
        /// This worker's length.
        len: usize,
        /// The other worker.
        other_rank: usize,
        /// The other worker's length.
        other_len: usize,
    },
    /// Workers called different collectives at the same point (their call sequences diverged).
    #[error("worker {rank} called {operation} while worker {other_rank} called {other_operation} at the same point")]
    OperationMismatch {
        /// This worker.
        rank: usize,
        /// This worker's operation.
        operation: &'static str,
        /// The other worker.
        other_rank: usize,
        /// The other worker's operation.
        other_operation: &'static str,
    },
    /// A peer rank outside `0..world_size`, equal to the caller, or not listing the caller back.
    #[error(
        "worker {rank} named an invalid neighbour {neighbor} (world size {world_size}; neighbours must be other ranks that name this worker back)"
    )]
    BadNeighbor {
        /// This worker.
        rank: usize,
        /// The invalid neighbour.
        neighbor: usize,
        /// The world size.
        world_size: usize,
    },
    /// Workers named different roots for the same broadcast, or a root outside the group.
    #[error(
        "worker {rank} broadcast from root {root} but the group has {world_size} workers or another worker named another root"
    )]
    BadRoot {
        /// This worker.
        rank: usize,
        /// The root it named.
        root: usize,
        /// The world size.
        world_size: usize,
    },
    /// A failure reported by the underlying communication library.
    #[error("communication failure: {0}")]
    Backend(String),
}

/// A sum all-reduce in flight, started by [`Communicator::start_all_reduce_sum`].
///
/// The local steps can go on while it travels; [`PendingSum::wait`] returns the element-wise
/// sum over workers. A lost worker makes `wait` fail instead of hanging, as a blocking call would.
pub struct PendingSum {
    op: Box<dyn PendingOp>,
    len: usize,
}

/// The communicator-specific half of a [`PendingSum`] (implemented by communicators).
pub trait PendingOp: Send {
    /// Whether the result is ready (never blocks).
    fn is_ready(&mut self) -> Result<bool, CommError>;
    /// Blocks until the sum is complete and returns it.
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CommError>;
}

impl PendingSum {
    /// Wraps a communicator's pending operation on a buffer of `len` values.
    pub fn new(op: Box<dyn PendingOp>, len: usize) -> Self {
        Self { op, len }
    }

    /// A sum that is already complete (one worker, or a communicator without overlap).
    pub fn ready(values: Vec<f32>) -> Self {
        let len = values.len();
        Self { op: Box::new(Ready(values)), len }
    }

    /// Number of values being reduced.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the result is ready (never blocks).
    pub fn is_ready(&mut self) -> Result<bool, CommError> {
        self.op.is_ready()
    }

    /// Blocks until the sum is complete and returns it.
    pub fn wait(self) -> Result<Vec<f32>, CommError> {
        self.op.wait()
    }
}

impl std::fmt::Debug for PendingSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSum").field("len", &self.len).finish_non_exhaustive()
    }
}

struct Ready(Vec<f32>);

impl PendingOp for Ready {
    fn is_ready(&mut self) -> Result<bool, CommError> {
        Ok(true)
    }
    fn wait(self: Box<Self>) -> Result<Vec<f32>, CommError> {
        Ok(self.0)
    }
}

/// A worker's handle on the group of workers it trains with. It moves data and nothing else.
///
/// All workers must call the same collectives in the same order with buffers of the same
/// length (a non-blocking collective counts at the point it is started). A worker that dies
/// makes every other worker's next (or current, or pending) collective return
/// [`CommError::PeerLost`] or [`CommError::Timeout`] instead of hanging.
pub trait Communicator: Send {
    /// This worker's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of workers.
    fn world_size(&self) -> usize;

    /// Element-wise sum over workers, in place. Every worker gets bit-identical values.
    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        let pending = self.start_all_reduce_sum(values.to_vec())?;
        values.copy_from_slice(&pending.wait()?);
        Ok(())
    }

    /// Element-wise sum over workers of `send` into `recv` (same length). Every worker gets
    /// bit-identical values. Saves the caller a copy when it must keep `send`.
    fn all_reduce_sum_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        recv.copy_from_slice(send);
        self.all_reduce_sum(recv)
    }

    /// Starts an element-wise sum over workers of `values` and returns at once; the buffer comes
    /// back, holding the sum, from [`PendingSum::wait`].
    fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError>;

    /// Sum of a few `f64` values across workers, in place (statistics, agreement flags).
    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), CommError>;

    /// Every worker's `values` becomes `root`'s.
    fn broadcast(&mut self, values: &mut [f32], root: usize) -> Result<(), CommError>;

    /// Every worker's byte payload (of any length), in rank order, this worker's included.
    fn all_gather_bytes(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>, CommError>;

    /// Sends `send` to every rank in `peers` and hands each peer's `send` to `receive(k, values)`,
    /// `k` the peer's index in `peers`, in that order, once every length has been checked (the
    /// caller reads the values where they arrived, without a copy of its own). The relation must
    /// be symmetric: `j` lists this worker whenever this worker lists `j`. Every worker calls it,
    /// also those with no peers this time. The same as [`Communicator::exchange_directed`] with
    /// `peers` both ways.
    fn exchange(
        &mut self,
        send: &[f32],
        peers: &[usize],
        receive: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), CommError> {
        self.exchange_directed(send, peers, peers, receive)
    }

    /// Sends `send` to every rank in `send_to` and hands the buffer of every rank in
    /// `receive_from` to `receive(k, values)`, `k` the sender's index in `receive_from`, in that
    /// order, once every length has been checked. The two relations must match across workers:
    /// `j` is in this worker's `receive_from` exactly when this worker is in `j`'s `send_to`
    /// (otherwise every worker gets [`CommError::BadNeighbor`], naming the first worker of the
    /// mismatch; nobody waits for a message that will not come). Time-varying directed graphs
    /// (one-peer exponential) send to one peer and receive from another. Every worker calls it.
    fn exchange_directed(
        &mut self,
        send: &[f32],
        send_to: &[usize],
        receive_from: &[usize],
        receive: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), CommError>;

    /// Sends the byte payload `send` to every rank in `send_to` and hands the payload of every
    /// rank in `receive_from` to `receive(k, bytes)`, `k` the sender's index in `receive_from`, in
    /// that order. Unlike [`Communicator::exchange_directed`], every worker's payload may have its
    /// own length, zero included: an empty payload is the message of a worker that has nothing to
    /// send this time (an event-triggered rule that did not fire), so its neighbours learn that
    /// and nobody waits for a message that will not come. The relations must match across
    /// workers as for [`Communicator::exchange_directed`] (otherwise every worker gets
    /// [`CommError::BadNeighbor`]). Every worker calls it.
    fn exchange_bytes(
        &mut self,
        send: &[u8],
        send_to: &[usize],
        receive_from: &[usize],
        receive: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), CommError>;

    /// Splits the group: workers passing the same `color` form a new group, ranked in the order
    /// of their ranks here. Every worker calls it.
    fn split(&mut self, color: usize) -> Result<Box<dyn Communicator>, CommError>;

    /// Blocks until every worker has called `barrier`.
    fn barrier(&mut self) -> Result<(), CommError>;
}

/// Checks that the two buffers of [`Communicator::all_reduce_sum_into`] have one length (for
/// communicator implementations).
pub fn check_same_length(send: &[f32], recv: &[f32]) -> Result<(), CommError> {
    if send.len() == recv.len() {
        Ok(())
    } else {
        Err(CommError::Backend(format!(
            "all_reduce_sum_into needs buffers of one length, got {} and {}",
            send.len(),
            recv.len()
        )))
    }
}

/// The first worker (in rank order) whose directed neighbours do not match the others', and the
/// neighbour at fault, given every worker's `(send_to, receive_from)`: `j` in `i`'s
/// `receive_from` must be exactly the workers `i` in `j`'s `send_to`, and every rank in range,
/// listed once and not the worker itself (for communicator implementations, which see every
/// worker's lists).
pub fn first_bad_neighbor<'a>(
    world_size: usize,
    lists: impl Fn(usize) -> (&'a [usize], &'a [usize]),
) -> Option<(usize, usize)> {
    (0..world_size).find_map(|i| {
        let (send_to, receive_from) = lists(i);
        let out_of_range = send_to.iter().chain(receive_from).copied().find(|&j| j >= world_size || j == i);
        out_of_range
            .or_else(|| repeated(send_to))
            .or_else(|| repeated(receive_from))
            .or_else(|| send_to.iter().copied().find(|&j| !lists(j).1.contains(&i)))
            .or_else(|| receive_from.iter().copied().find(|&j| !lists(j).0.contains(&i)))
            .map(|j| (i, j))
    })
}

/// The first rank listed twice in `peers`, if any (a repeated peer would send or expect one
/// message too many, which could be taken for the next exchange's).
pub fn repeated(peers: &[usize]) -> Option<usize> {
    peers.iter().enumerate().find(|(k, j)| peers[..*k].contains(j)).map(|(_, &j)| j)
}

/// Every peer's buffer from [`Communicator::exchange`], copied into `received` (one buffer per
/// peer, in the order of `peers`): for callers that keep them.
pub fn exchange_into(
    comm: &mut dyn Communicator,
    send: &[f32],
    peers: &[usize],
    received: &mut Vec<Vec<f32>>,
) -> Result<(), CommError> {
    received.resize_with(peers.len(), Vec::new);
    comm.exchange(send, peers, &mut |k, values| {
        received[k].clear();
        received[k].extend_from_slice(values);
    })
}

impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        (**self).all_reduce_sum(values)
    }
    fn all_reduce_sum_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        (**self).all_reduce_sum_into(send, recv)
    }
    fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError> {
        (**self).start_all_reduce_sum(values)
    }
    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        (**self).all_reduce_f64(values)
    }
    fn broadcast(&mut self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        (**self).broadcast(values, root)
    }
    fn all_gather_bytes(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        (**self).all_gather_bytes(payload)
    }
    fn exchange(
        &mut self,
        send: &[f32],
        peers: &[usize],
        receive: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), CommError> {
        (**self).exchange(send, peers, receive)
    }
    fn exchange_directed(
        &mut self,
        send: &[f32],
        send_to: &[usize],
        receive_from: &[usize],
        receive: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), CommError> {
        (**self).exchange_directed(send, send_to, receive_from, receive)
    }
    fn exchange_bytes(
        &mut self,
        send: &[u8],
        send_to: &[usize],
        receive_from: &[usize],
        receive: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), CommError> {
        (**self).exchange_bytes(send, send_to, receive_from, receive)
    }
    fn split(&mut self, color: usize) -> Result<Box<dyn Communicator>, CommError> {
        (**self).split(color)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        (**self).barrier()
    }
}
