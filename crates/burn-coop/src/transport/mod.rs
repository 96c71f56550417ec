//! How workers exchange flat parameter buffers.
//!
//! Merge rules only ever talk to a [`Transport`], so the same rule code runs over threads in
//! one process ([`InProcessTransport`]) and over MPI ranks (the `burn-coop-mpi` crate).

mod in_process;

pub use in_process::{InProcessGroup, InProcessTransport};

use serde::{Deserialize, Serialize};

/// A reduction applied element-wise across workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReduceOp {
    /// `Σ_j x_j`.
    Sum,
    /// `(1/m) Σ_j x_j`.
    Mean,
}

/// Bytes this worker has sent and received so far.
///
/// All-reduce traffic is counted as a bandwidth-optimal ring all-reduce would move it:
/// `2 (m − 1) / m` times the buffer, each way. A neighbour exchange counts the buffer once per
/// neighbour, each way. This makes the counters comparable across transports (MPI chooses its
/// own algorithm internally) and equal to what a real network carries for the usual algorithms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Bytes sent by this worker.
    pub bytes_sent: u64,
    /// Bytes received by this worker.
    pub bytes_received: u64,
}

impl Traffic {
    /// Counts `bytes` sent and as many received (every collective here is symmetric).
    pub fn record(&mut self, bytes: u64) {
        self.bytes_sent += bytes;
        self.bytes_received += bytes;
    }

    /// Ring all-reduce traffic for `bytes` on `world` workers, each way.
    pub fn ring_all_reduce(bytes: u64, world: usize) -> u64 {
        if world <= 1 { 0 } else { 2 * (world as u64 - 1) * bytes / world as u64 }
    }
}

/// Why communication failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    /// Another worker died, panicked or left before taking part in a collective.
    #[error(
        "worker {rank} was lost (it panicked, exited or dropped its transport) before joining the collective operation"
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
    /// A neighbour rank outside `0..world_size` or equal to the caller.
    #[error("worker {rank} named an invalid neighbour {neighbor} (world size {world_size})")]
    BadNeighbor {
        /// This worker.
        rank: usize,
        /// The invalid neighbour.
        neighbor: usize,
        /// The world size.
        world_size: usize,
    },
    /// A failure reported by the underlying communication library.
    #[error("communication failure: {0}")]
    Backend(String),
}

/// A worker's handle on the group of workers it trains with.
///
/// All workers must call the same collectives in the same order with buffers of the same
/// length. A worker that dies makes every other worker's next (or current) collective return
/// [`TransportError::PeerLost`] or [`TransportError::Timeout`] instead of hanging.
pub trait Transport: Send {
    /// This worker's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of workers.
    fn world_size(&self) -> usize;

    /// Element-wise reduction of every worker's `send` into every worker's `recv`.
    /// `send` and `recv` have the same length.
    fn all_reduce(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<(), TransportError>;

    /// Sum of small `f64` vectors across workers, in place (statistics, agreement flags).
    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), TransportError>;

    /// Neighbour mixing: `recv = self_weight · send + Σ_(j, w) w · send_j`, where `send_j` is
    /// neighbour `j`'s `send`. The neighbour relation must be symmetric: `j` lists this worker
    /// whenever this worker lists `j`. Every worker calls it, also those with no neighbours.
    fn mix(
        &mut self,
        send: &[f32],
        recv: &mut [f32],
        self_weight: f32,
        neighbors: &[(usize, f32)],
    ) -> Result<(), TransportError>;

    /// Blocks until every worker has called `barrier`.
    fn barrier(&mut self) -> Result<(), TransportError>;

    /// Traffic counters of this worker.
    fn traffic(&self) -> Traffic;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<(), TransportError> {
        (**self).all_reduce(send, recv, op)
    }
    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), TransportError> {
        (**self).all_reduce_f64(values)
    }
    fn mix(
        &mut self,
        send: &[f32],
        recv: &mut [f32],
        self_weight: f32,
        neighbors: &[(usize, f32)],
    ) -> Result<(), TransportError> {
        (**self).mix(send, recv, self_weight, neighbors)
    }
    fn barrier(&mut self) -> Result<(), TransportError> {
        (**self).barrier()
    }
    fn traffic(&self) -> Traffic {
        (**self).traffic()
    }
}
