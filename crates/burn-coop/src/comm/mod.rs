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
//!
//! # Writing a wrapper
//!
//! A wrapper holds an inner communicator and changes some collectives (it counts, logs, delays
//! or gates them). It writes those methods itself and lists the others in
//! [`forward_communicator!`](crate::forward_communicator), which writes each as a call of the
//! same method on the inner communicator: `forward_communicator!(self.inner => rank, barrier);`
//! inside the `impl Communicator` block ([`Metered`] lists `rank` and `world_size` only; `Box`
//! lists all thirteen methods, on `**self`). The compiler names a required method neither written
//! nor listed, but not a provided one ([`Communicator::all_reduce_sum`],
//! [`Communicator::all_reduce_sum_into`], [`Communicator::exchange`]): left out, it runs the
//! trait's default on the wrapper (a started sum and a wait; a directed exchange) instead of the
//! inner communicator's own version, and the in-process and MPI communicators have their own
//! blocking sums. So list the provided methods too, unless the wrapper means them to go through
//! its own methods: one that holds back started sums writes
//! [`Communicator::start_all_reduce_sum`] alone and leaves both blocking sums to the defaults, so
//! that they are held back too.

mod in_process;
mod metered;
mod network;
mod quantized;

pub use in_process::{InProcessComm, InProcessGroup};
pub use metered::{CollectiveKind, CommTime, Metered, Traffic, TrafficByKind};
pub use network::{NetworkModel, SMALL_COLLECTIVE_VALUES, SimClock, StepTime};
pub use quantized::{QuantizedReduceError, quantized_all_reduce_bytes, quantized_all_reduce_sum};

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

/// What a neighbour exchange hands every buffer it received to, as `recv(k, values)`: `k` is
/// the sender's index in the list of ranks received from, and `values` its buffer (`f32` values,
/// or the bytes of a payload), read where it arrived.
pub type Receive<'a, T> = &'a mut dyn FnMut(usize, &[T]);

/// Whom a neighbour exchange sends to and receives from: ranks of the group, each listed once.
/// Across workers the two lists must match: `j` is in this worker's `receive_from` exactly when
/// this worker is in `j`'s `send_to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route<'a> {
    /// The ranks this worker's buffer goes to.
    pub send_to: &'a [usize],
    /// The ranks whose buffers this worker receives, in the order `receive` sees them.
    pub receive_from: &'a [usize],
}

impl<'a> Route<'a> {
    /// Sending to and receiving from the same `peers` (an undirected graph).
    pub fn both_ways(peers: &'a [usize]) -> Self {
        Route { send_to: peers, receive_from: peers }
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

    /// Sends `send` to every rank in `peers` and hands each peer's `send` to `recv(k, values)`,
    /// `k` the peer's index in `peers`, in that order, once every length has been checked (the
    /// caller reads the values where they arrived, without a copy of its own). The relation must
    /// be symmetric: `j` lists this worker whenever this worker lists `j`. Every worker calls it,
    /// also those with no peers this time. The same as [`Communicator::exchange_directed`] with
    /// `peers` both ways.
    fn exchange(&mut self, send: &[f32], peers: &[usize], recv: Receive<'_, f32>) -> Result<(), CommError> {
        self.exchange_directed(send, Route::both_ways(peers), recv)
    }

    /// Sends `send` to every rank in `route.send_to` and hands the buffer of every rank in
    /// `route.receive_from` to `recv(k, values)`, `k` the sender's index in `receive_from`, in
    /// that order, once every length has been checked. The two relations must match across
    /// workers (see [`Route`]; otherwise every worker gets [`CommError::BadNeighbor`], naming the
    /// first worker of the mismatch; nobody waits for a message that will not come).
    /// Time-varying directed graphs (one-peer exponential) send to one peer and receive from
    /// another. Every worker calls it.
    fn exchange_directed(&mut self, send: &[f32], route: Route<'_>, recv: Receive<'_, f32>) -> Result<(), CommError>;

    /// Sends the byte payload `send` to every rank in `route.send_to` and hands the payload of
    /// every rank in `route.receive_from` to `recv(k, bytes)`, `k` the sender's index in
    /// `receive_from`, in that order. Unlike [`Communicator::exchange_directed`], every worker's payload may have its
    /// own length, zero included: an empty payload is the message of a worker that has nothing to
    /// send this time (an event-triggered rule that did not fire), so its neighbours learn that
    /// and nobody waits for a message that will not come. The relations must match across
    /// workers as for [`Communicator::exchange_directed`] (otherwise every worker gets
    /// [`CommError::BadNeighbor`]). Every worker calls it.
    fn exchange_bytes(&mut self, send: &[u8], route: Route<'_>, recv: Receive<'_, u8>) -> Result<(), CommError>;

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
    crate::forward_communicator!(**self =>
        rank, world_size, all_reduce_sum, all_reduce_sum_into, start_all_reduce_sum, all_reduce_f64, broadcast,
        all_gather_bytes, exchange, exchange_directed, exchange_bytes, split, barrier
    );
}

/// Writes [`Communicator`](crate::comm::Communicator) methods that forward to an inner
/// communicator, inside an `impl Communicator` block: the methods a wrapper does not change (see
/// [writing a wrapper](crate::comm#writing-a-wrapper)).
///
/// `forward_communicator!(self.inner => rank, world_size, ...)` writes each listed method as a
/// call of the same method on the field `inner` (any field: `self.0` in a tuple struct), and
/// `forward_communicator!(**self => ...)` on what `self` points to. List the provided methods
/// (`all_reduce_sum`, `all_reduce_sum_into`, `exchange`) too, unless they are meant to run the
/// trait's default through the wrapper's own methods.
///
/// ```
/// use burn_coop::comm::{CommError, Communicator, InProcessGroup};
///
/// /// Counts the barriers it takes part in.
/// struct CountBarriers<C> {
///     inner: C,
///     barriers: usize,
/// }
///
/// impl<C: Communicator> Communicator for CountBarriers<C> {
///     burn_coop::forward_communicator!(self.inner =>
///         rank, world_size, all_reduce_sum, all_reduce_sum_into, start_all_reduce_sum, all_reduce_f64,
///         broadcast, all_gather_bytes, exchange, exchange_directed, exchange_bytes, split
///     );
///
///     fn barrier(&mut self) -> Result<(), CommError> {
///         self.barriers += 1;
///         self.inner.barrier()
///     }
/// }
///
/// let inner = InProcessGroup::new(1).into_communicators().remove(0);
/// let mut comm = CountBarriers { inner, barriers: 0 };
/// comm.barrier()?;
/// let mut values = [1.0, 2.0];
/// comm.all_reduce_sum(&mut values)?;
/// assert_eq!((comm.barriers, values), (1, [1.0, 2.0]));
/// # Ok::<(), CommError>(())
/// ```
#[macro_export]
macro_rules! forward_communicator {
    ($this:ident . $field:tt => $($method:ident),+ $(,)?) => {
        $($crate::forward_communicator!(@method [$this] [$this.$field] $method);)+
    };
    (* * $this:ident => $($method:ident),+ $(,)?) => {
        $($crate::forward_communicator!(@method [$this] [**$this] $method);)+
    };
    // Every method of `Communicator`: its arguments and what it returns (in a `Result`, but for
    // the two that take `&self`).
    (@method $this:tt $to:tt rank) => {
        $crate::forward_communicator!(@shared $this $to rank);
    };
    (@method $this:tt $to:tt world_size) => {
        $crate::forward_communicator!(@shared $this $to world_size);
    };
    (@method $this:tt $to:tt all_reduce_sum) => {
        $crate::forward_communicator!(@mut $this $to all_reduce_sum(values: &mut [f32]) -> ());
    };
    (@method $this:tt $to:tt all_reduce_sum_into) => {
        $crate::forward_communicator!(@mut $this $to all_reduce_sum_into(send: &[f32], recv: &mut [f32]) -> ());
    };
    (@method $this:tt $to:tt start_all_reduce_sum) => {
        $crate::forward_communicator!(
            @mut $this $to start_all_reduce_sum(values: ::std::vec::Vec<f32>) -> $crate::comm::PendingSum
        );
    };
    (@method $this:tt $to:tt all_reduce_f64) => {
        $crate::forward_communicator!(@mut $this $to all_reduce_f64(values: &mut [f64]) -> ());
    };
    (@method $this:tt $to:tt broadcast) => {
        $crate::forward_communicator!(@mut $this $to broadcast(values: &mut [f32], root: usize) -> ());
    };
    (@method $this:tt $to:tt all_gather_bytes) => {
        $crate::forward_communicator!(
            @mut $this $to all_gather_bytes(payload: &[u8]) -> ::std::vec::Vec<::std::vec::Vec<u8>>
        );
    };
    (@method $this:tt $to:tt exchange) => {
        $crate::forward_communicator!(
            @mut $this $to exchange(send: &[f32], peers: &[usize], recv: $crate::comm::Receive<'_, f32>) -> ()
        );
    };
    (@method $this:tt $to:tt exchange_directed) => {
        $crate::forward_communicator!(@directed $this $to exchange_directed f32);
    };
    (@method $this:tt $to:tt exchange_bytes) => {
        $crate::forward_communicator!(@directed $this $to exchange_bytes u8);
    };
    (@method $this:tt $to:tt split) => {
        $crate::forward_communicator!(
            @mut $this $to split(color: usize) -> ::std::boxed::Box<dyn $crate::comm::Communicator>
        );
    };
    (@method $this:tt $to:tt barrier) => {
        $crate::forward_communicator!(@mut $this $to barrier() -> ());
    };
    (@method $this:tt $to:tt $other:ident) => {
        compile_error!(concat!("`", stringify!($other), "` is not a method of `Communicator`"));
    };
    // The two directed exchanges differ only in the values they carry.
    (@directed $this:tt $to:tt $method:ident $value:ty) => {
        $crate::forward_communicator!(@mut $this $to $method(
            send: &[$value],
            route: $crate::comm::Route<'_>,
            recv: $crate::comm::Receive<'_, $value>
        ) -> ());
    };
    (@shared [$this:ident] [$($to:tt)+] $method:ident) => {
        fn $method(&$this) -> usize {
            $crate::comm::Communicator::$method(&$($to)+)
        }
    };
    (@mut [$this:ident] [$($to:tt)+] $method:ident($($arg:ident: $type:ty),*) -> $output:ty) => {
        fn $method(&mut $this, $($arg: $type),*) -> ::core::result::Result<$output, $crate::comm::CommError> {
            $crate::comm::Communicator::$method(&mut $($to)+, $($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::testing::RecordingComm;

    /// A communicator with its own versions of the provided methods, which note that they ran.
    struct Probe {
        inner: InProcessComm,
        ran: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Communicator for Probe {
        crate::forward_communicator!(self.inner =>
            rank, world_size, start_all_reduce_sum, all_reduce_f64, broadcast, all_gather_bytes, exchange_directed,
            exchange_bytes, split, barrier
        );

        fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
            self.ran.lock().unwrap().push("all_reduce_sum");
            self.inner.all_reduce_sum(values)
        }
        fn all_reduce_sum_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
            self.ran.lock().unwrap().push("all_reduce_sum_into");
            self.inner.all_reduce_sum_into(send, recv)
        }
        fn exchange(&mut self, send: &[f32], peers: &[usize], recv: Receive<'_, f32>) -> Result<(), CommError> {
            self.ran.lock().unwrap().push("exchange");
            self.inner.exchange(send, peers, recv)
        }
    }

    /// Calls the provided methods on `wrap(probe)` and returns those of the probe that ran.
    fn reached<W: Communicator>(wrap: impl FnOnce(Probe) -> W) -> Vec<&'static str> {
        let ran = Arc::default();
        let inner = InProcessGroup::new(1).into_communicators().remove(0);
        let mut comm = wrap(Probe { inner, ran: Arc::clone(&ran) });
        let mut values = [1.0, 2.0];
        comm.all_reduce_sum(&mut values).unwrap();
        comm.all_reduce_sum_into(&[3.0, 4.0], &mut values).unwrap();
        comm.exchange(&values, &[], &mut |_, _| unreachable!("no peers")).unwrap();
        assert_eq!(values, [3.0, 4.0]);
        ran.lock().unwrap().clone()
    }

    #[test]
    fn wrappers_forward_the_provided_methods_to_the_inner_versions() {
        let all = ["all_reduce_sum", "all_reduce_sum_into", "exchange"];
        assert_eq!(reached(Box::new), all);
        assert_eq!(reached(|probe| Box::new(probe) as Box<dyn Communicator>), all);
        assert_eq!(reached(Metered::new), all);
        assert_eq!(reached(RecordingComm::new), all);
    }

    #[test]
    fn metered_counts_a_symmetric_exchange_as_a_directed_one() {
        let traffic = std::thread::scope(|scope| {
            let comms = InProcessGroup::new(3).into_communicators();
            let workers: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    scope.spawn(move || {
                        let mut comm = Metered::new(comm);
                        let rank = comm.rank();
                        let peers: Vec<usize> = (0..3).filter(|&j| j != rank).collect();
                        let mut got = Vec::new();
                        comm.exchange(&[rank as f32; 5], &peers, &mut |k, values| got.push((k, values[0]))).unwrap();
                        comm.exchange_directed(&[rank as f32; 5], Route::both_ways(&peers), &mut |_, _| {}).unwrap();
                        assert_eq!(got, peers.iter().enumerate().map(|(k, &j)| (k, j as f32)).collect::<Vec<_>>());
                        comm.traffic()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
        });
        for traffic in traffic {
            // Twice five f32 to each of two peers, and as many back.
            assert_eq!(traffic.calls(CollectiveKind::Exchange), 2);
            assert_eq!(traffic.of(CollectiveKind::Exchange), Traffic { bytes_sent: 80, bytes_received: 80 });
        }
    }
}
