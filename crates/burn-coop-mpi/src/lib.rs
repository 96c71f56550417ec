//! # burn-coop-mpi
//!
//! An MPI [`Communicator`] for [`burn_coop`]: run local SGD, elastic averaging, gossip or any
//! other rule with one worker per MPI rank, on one machine or across a cluster.
//!
//! ```no_run
//! use burn::optim::SgdConfig;
//! use burn_coop::{LocalSgd, rules::averaging::Averaging, comm::Communicator, schedule::fixed::PeriodicSchedule};
//! use burn_coop_mpi::MpiComm;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let comm = MpiComm::world()?;
//! println!("rank {} of {}", comm.rank(), comm.world_size());
//! let optim = LocalSgd::new(SgdConfig::new().init(), Averaging::new(), PeriodicSchedule::every(8)?, comm)?;
//! # drop(optim);
//! # Ok(())
//! # }
//! ```
//!
//! Start it with `mpirun -np 4 ./trainer` (or `srun`, or `mpirun --hostfile hosts`).
//!
//! ## Mapping onto MPI
//!
//! | [`Communicator`] call | MPI |
//! |---|---|
//! | [`Communicator::all_reduce_sum`], [`Communicator::all_reduce_sum_into`] | `MPI_Allreduce(MPI_SUM)` on `f32` |
//! | [`Communicator::start_all_reduce_sum`] | `MPI_Iallreduce(MPI_SUM)` on `f32`; `MPI_Test` / `MPI_Wait` in the pending handle |
//! | [`Communicator::all_reduce_f64`] | up to 16 values: carried by the agreement and summed in rank order; more: `MPI_Allreduce(MPI_SUM)` on `f64` |
//! | [`Communicator::broadcast`] | `MPI_Bcast` |
//! | [`Communicator::all_gather_bytes`] | lengths from the agreement, then `MPI_Allgatherv` |
//! | [`Communicator::exchange`], [`Communicator::exchange_directed`] | one `MPI_Irecv` of the whole buffer per rank received from, one `MPI_Isend` per rank sent to, then `MPI_Waitall` |
//! | [`Communicator::split`] | `MPI_Comm_split` (key: the rank here) |
//! | [`Communicator::barrier`] | `MPI_Barrier` |
//!
//! The communicator works on its own duplicate of the communicator it was given, with
//! `MPI_ERRORS_RETURN` set, so MPI failures come back as [`CommError::Backend`] and its
//! messages never mix with the application's own MPI traffic. Before each collective the ranks
//! exchange a small record (one `MPI_Allgather`): the operation, the buffer length, a bad peer,
//! the peers sent to and received from as bit sets (worlds of up to 512 ranks) and small payloads, so calls that
//! diverge, mismatched buffers and invalid or one-sided neighbours are reported as
//! [`CommError::OperationMismatch`], [`CommError::LengthMismatch`] and
//! [`CommError::BadNeighbor`] on every rank instead of corrupting memory or hanging; turn it
//! off with [`MpiComm::with_length_checks`]. Bytes are counted by
//! [`burn_coop::comm::Metered`], not here; the agreement is not counted.
//!
//! ## When a rank dies
//!
//! MPI has no elastic membership. When a process exits abnormally (a crash, `kill -9`, an
//! abort), the launcher ends the whole job: OpenMPI's `mpirun` prints which rank died and exits
//! with a non-zero status within a few seconds, pending non-blocking collectives included.
//! Restart from a checkpoint to continue.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "tools")]
pub mod testing;

use std::ffi::{c_int, c_void};
use std::fmt;
use std::sync::Arc;

use burn_coop::comm::{CommError, Communicator, PendingOp, PendingSum, Receive, Route};
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::{Threading, environment::Universe};

/// The `mpi` crate this communicator is built on, for applications that need MPI calls of their own.
pub use mpi;

/// Tag of the neighbour exchange messages on the communicator's private MPI communicator.
const EXCHANGE_TAG: c_int = 0x6d78;
/// Tag of the byte payloads of a neighbour exchange of bytes.
const EXCHANGE_BYTES_TAG: c_int = 0x6d79;

/// Words of small payload that travel inside the agreement itself: an
/// [`Communicator::all_reduce_f64`] of at most this many values (merge statistics, metrics)
/// costs one small collective, not two; exchanges carry their peers as a bit set.
const PIGGYBACK: usize = 16;
/// Words each rank contributes to the agreement: operation, length, bad peer + 1, payload.
const RECORD: usize = 3 + PIGGYBACK;
/// The two peer sets of an exchange fit in the payload words for worlds up to this size.
const PEER_BITS: usize = 64 * PIGGYBACK / 2;

/// Operations, as numbered in the agreement.
const OPERATIONS: [&str; 7] =
    ["all_reduce_sum", "all_reduce_f64", "broadcast", "all_gather_bytes", "exchange", "split", "exchange_bytes"];

fn operation_code(name: &str) -> u64 {
    OPERATIONS.iter().position(|&o| o == name).expect("a known operation") as u64 + 1
}

/// Owns the private MPI communicator (and, for [`MpiComm::world`], MPI itself). Pending
/// operations keep it alive until they complete.
struct Handle {
    comm: ffi::MPI_Comm,
    universe: Option<Universe>,
    /// Buffers of finished non-blocking sums, reused as the next ones' receive buffers.
    spare: std::sync::Mutex<Vec<Vec<f32>>>,
}

impl Handle {
    fn new(comm: ffi::MPI_Comm, universe: Option<Universe>) -> Self {
        Self { comm, universe, spare: std::sync::Mutex::default() }
    }

    fn spare(&self, len: usize) -> Vec<f32> {
        let mut buffer = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default();
        buffer.resize(len, 0.0);
        buffer
    }

    fn give_back(&self, buffer: Vec<f32>) {
        let mut spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if spare.len() < 4 {
            spare.push(buffer);
        }
    }
}

// SAFETY: the handle owns its communicator (a duplicate or a split no one else uses); MPI calls
// on it are serialized by `&mut` access to the `MpiComm` or by the single pending operation that
// owns a request on it. `world` only succeeds when the MPI library grants at least
// `MPI_THREAD_SERIALIZED`, which allows calls from any thread as long as they are not concurrent.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `comm` was created by MPI_Comm_dup or MPI_Comm_split and is freed once, before
        // MPI_Finalize (run by `universe` when it drops after this).
        unsafe {
            if !mpi::environment::is_finalized() {
                ffi::MPI_Comm_free(&mut self.comm);
            }
        }
        drop(self.universe.take());
    }
}

/// The largest copy (in values) `all_reduce_sum` keeps for its next call: 4 MiB, one merge
/// bucket ([`burn_coop::DEFAULT_BUCKET_BYTES`]).
const SCRATCH_LIMIT: usize = burn_coop::DEFAULT_BUCKET_BYTES / 4;

/// A [`Communicator`] whose workers are the ranks of an MPI communicator.
///
/// Build it with [`MpiComm::world`] (initializes MPI, one worker per rank of `MPI_COMM_WORLD`)
/// or [`MpiComm::from_communicator`] (MPI already initialized by the application). Dropping
/// the handle made by `world` (and every group split from it) finalizes MPI.
pub struct MpiComm {
    handle: Arc<Handle>,
    rank: usize,
    world_size: usize,
    check_lengths: bool,
    records: Vec<[u64; RECORD]>,
    scratch: Vec<f32>,
    neighbor_buffers: Vec<Vec<f32>>,
}

impl fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("check_lengths", &self.check_lengths)
            .field("owns_mpi", &self.handle.universe.is_some())
            .finish_non_exhaustive()
    }
}

/// Turns an MPI return code into a [`CommError::Backend`] naming the operation.
fn check(code: c_int, what: &str) -> Result<(), CommError> {
    if code == ffi::MPI_SUCCESS as c_int {
        return Ok(());
    }
    let mut text = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: `text` holds MPI_MAX_ERROR_STRING bytes plus one, as MPI_Error_string requires.
    let described = unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr().cast(), &mut len) };
    let message = if described == ffi::MPI_SUCCESS as c_int {
        String::from_utf8_lossy(&text[..len.clamp(0, text.len() as c_int) as usize]).trim_end_matches('\0').to_string()
    } else {
        format!("MPI error code {code}")
    };
    Err(CommError::Backend(format!("{what} failed: {message}")))
}

fn count(len: usize, what: &str) -> Result<c_int, CommError> {
    c_int::try_from(len).map_err(|_| {
        CommError::Backend(format!("{what}: a buffer of {len} values is larger than one MPI message can carry"))
    })
}

/// What a rank tells the others before a collective.
struct Agreement<'a> {
    operation: &'static str,
    len: usize,
    bad_peer: Option<usize>,
    words: &'a [u64],
}

impl MpiComm {
    /// Initializes MPI and returns the communicator over every rank of `MPI_COMM_WORLD`.
    ///
    /// MPI can be initialized once per process: this fails when it already was (by an earlier
    /// call or by the application; use [`MpiComm::from_communicator`] then), and when the MPI
    /// library does not support `MPI_THREAD_SERIALIZED`. MPI is finalized when the returned
    /// handle, every group split from it and every pending operation are dropped.
    pub fn world() -> Result<Self, CommError> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
            return Err(CommError::Backend(
                "MPI is already initialized in this process; build the communicator with \
                 MpiComm::from_communicator instead of MpiComm::world"
                    .into(),
            ));
        };
        if threading < Threading::Serialized {
            return Err(CommError::Backend(format!(
                "the MPI library grants thread support {threading:?}, but the communicator needs at least Serialized"
            )));
        }
        let world = universe.world();
        let mut comm: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: `world` is a valid communicator and MPI is initialized.
        check(unsafe { ffi::MPI_Comm_dup(world.as_raw(), &mut comm) }, "MPI_Comm_dup")?;
        Self::wrap(Handle::new(comm, Some(universe)))
    }

    /// A communicator over the ranks of `comm`, with MPI initialized by the application (which
    /// also finalizes it, after dropping this handle). The MPI communicator is duplicated, so
    /// these messages never match the application's.
    ///
    /// MPI must have been initialized with at least `MPI_THREAD_SERIALIZED` if the handle is
    /// moved to another thread.
    pub fn from_communicator(comm: &SimpleCommunicator) -> Result<Self, CommError> {
        let mut dup: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: `comm` is a valid communicator and MPI is initialized.
        check(unsafe { ffi::MPI_Comm_dup(comm.as_raw(), &mut dup) }, "MPI_Comm_dup")?;
        Self::wrap(Handle::new(dup, None))
    }

    fn wrap(handle: Handle) -> Result<Self, CommError> {
        let comm = handle.comm;
        let handle = Arc::new(handle);
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: `comm` is the valid communicator just created.
        unsafe {
            check(ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN), "MPI_Comm_set_errhandler")?;
            check(ffi::MPI_Comm_rank(comm, &mut rank), "MPI_Comm_rank")?;
            check(ffi::MPI_Comm_size(comm, &mut size), "MPI_Comm_size")?;
        }
        Ok(Self {
            handle,
            rank: rank as usize,
            world_size: size as usize,
            check_lengths: true,
            records: vec![[0; RECORD]; size as usize],
            scratch: Vec::new(),
            neighbor_buffers: Vec::new(),
        })
    }

    /// Whether to agree on the operation and buffer lengths before every collective (default:
    /// on). Without the check, ranks that pass buffers of different lengths or asymmetric
    /// neighbour lists get MPI errors, truncated data or a hang.
    pub fn with_length_checks(mut self, check: bool) -> Self {
        self.check_lengths = check;
        self
    }

    /// Whether this handle initialized MPI (and finalizes it when dropped).
    pub fn owns_mpi(&self) -> bool {
        self.handle.universe.is_some()
    }

    /// The name of the processor (host) this rank runs on.
    pub fn processor_name(&self) -> String {
        mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into())
    }

    /// The MPI library's version string.
    pub fn library_version() -> String {
        mpi::environment::library_version().map(|v| v.trim_end_matches('\0').trim().to_string()).unwrap_or_default()
    }

    /// The raw MPI communicator used here (a private duplicate), for calls of the application's
    /// own through [`mpi::ffi`].
    pub fn as_raw(&self) -> ffi::MPI_Comm {
        self.handle.comm
    }

    /// The agreement of a neighbour exchange: the operation, `len`, and both peer lists
    /// (carried as bit sets for worlds of up to `PEER_BITS` ranks), checked the same way on
    /// every rank.
    fn agree_on_neighbors(&mut self, operation: &'static str, len: usize, route: Route<'_>) -> Result<(), CommError> {
        let Route { send_to, receive_from } = route;
        let bad = send_to
            .iter()
            .chain(receive_from)
            .copied()
            .find(|&j| j >= self.world_size || j == self.rank)
            .or_else(|| burn_coop::comm::repeated(send_to))
            .or_else(|| burn_coop::comm::repeated(receive_from));
        let mut words = [0u64; PIGGYBACK];
        if self.world_size <= PEER_BITS {
            let half = PIGGYBACK / 2;
            for (offset, list) in [(0, send_to), (half, receive_from)] {
                for &j in list.iter().filter(|&&j| j < self.world_size) {
                    words[offset + j / 64] |= 1 << (j % 64);
                }
            }
        }
        self.agree(Agreement { operation, len, bad_peer: bad, words: &words }, Some((send_to, receive_from)))
    }

    /// The next byte payload from `source` on the exchange-of-bytes tag, of whatever length it
    /// has (learned by probing the message first; zero is a valid length).
    fn receive_probed(&mut self, source: usize) -> Result<Vec<u8>, CommError> {
        // SAFETY: MPI_Status is plain data that MPI_Probe fills in.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: the communicator is valid while the handle lives; `status` is writable.
        check(
            unsafe { ffi::MPI_Probe(source as c_int, EXCHANGE_BYTES_TAG, self.handle.comm, &mut status) },
            "MPI_Probe (neighbour payload)",
        )?;
        let mut len: c_int = 0;
        // SAFETY: `status` was filled by MPI_Probe.
        check(unsafe { ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut len) }, "MPI_Get_count")?;
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
        // SAFETY: `bytes` holds `len` bytes, the probed message's size.
        check(
            unsafe {
                ffi::MPI_Recv(
                    bytes.as_mut_ptr().cast::<c_void>(),
                    len,
                    ffi::RSMPI_UINT8_T,
                    source as c_int,
                    EXCHANGE_BYTES_TAG,
                    self.handle.comm,
                    ffi::RSMPI_STATUS_IGNORE,
                )
            },
            "MPI_Recv (neighbour payload)",
        )?;
        Ok(bytes)
    }

    /// Exchanges each rank's [`Agreement`] and turns any disagreement into the same error on
    /// every rank. Every rank's words are left in `self.records`. `peers` (`send_to`,
    /// `receive_from`, also as bit sets in the words): check only the lengths of the ranks this
    /// one receives from, and that every rank's sends match the receives of the others.
    fn agree(&mut self, mine: Agreement<'_>, peers: Option<(&[usize], &[usize])>) -> Result<(), CommError> {
        if !self.check_lengths {
            return match mine.bad_peer {
                Some(neighbor) => {
                    Err(CommError::BadNeighbor { rank: self.rank, neighbor, world_size: self.world_size })
                }
                None => Ok(()),
            };
        }
        let mut record = [0u64; RECORD];
        record[0] = operation_code(mine.operation);
        record[1] = mine.len as u64;
        record[2] = mine.bad_peer.map_or(0, |n| n as u64 + 1);
        record[3..3 + mine.words.len()].copy_from_slice(mine.words);
        // SAFETY: `record` holds RECORD u64 and `records` RECORD u64 per rank of the communicator.
        check(
            unsafe {
                ffi::MPI_Allgather(
                    record.as_ptr().cast::<c_void>(),
                    RECORD as c_int,
                    ffi::RSMPI_UINT64_T,
                    self.records.as_mut_ptr().cast::<c_void>(),
                    RECORD as c_int,
                    ffi::RSMPI_UINT64_T,
                    self.handle.comm,
                )
            },
            "MPI_Allgather (agreement)",
        )?;
        if let Some((other_rank, other)) = self.records.iter().enumerate().find(|(_, r)| r[0] != record[0]) {
            let other_operation =
                OPERATIONS.get((other[0] as usize).wrapping_sub(1)).copied().unwrap_or("an unknown operation");
            return Err(CommError::OperationMismatch {
                rank: self.rank,
                operation: mine.operation,
                other_rank,
                other_operation,
            });
        }
        if let Some((rank, entry)) = self.records.iter().enumerate().find(|(_, e)| e[2] != 0) {
            return Err(CommError::BadNeighbor {
                rank,
                neighbor: (entry[2] - 1) as usize,
                world_size: self.world_size,
            });
        }
        let mismatch = match peers {
            None => self.records.iter().position(|e| e[1] != mine.len as u64),
            Some((_, receive_from)) => receive_from.iter().copied().find(|&j| self.records[j][1] != mine.len as u64),
        };
        if let Some(other_rank) = mismatch {
            let other_len = self.records[other_rank][1] as usize;
            return Err(CommError::LengthMismatch { rank: self.rank, len: mine.len, other_rank, other_len });
        }
        if peers.is_some() && self.world_size <= PEER_BITS {
            // Every rank decodes every rank's two peer sets and runs the same check, so a
            // mismatch is the same error everywhere and nobody posts a receive that no send meets.
            let half = PIGGYBACK / 2;
            let decode = |words: &[u64]| -> Vec<usize> {
                (0..self.world_size).filter(|&j| words[j / 64] & (1 << (j % 64)) != 0).collect()
            };
            let lists: Vec<(Vec<usize>, Vec<usize>)> =
                self.records.iter().map(|r| (decode(&r[3..3 + half]), decode(&r[3 + half..3 + PIGGYBACK]))).collect();
            if let Some((rank, neighbor)) =
                burn_coop::comm::first_bad_neighbor(self.world_size, |i| (lists[i].0.as_slice(), lists[i].1.as_slice()))
            {
                return Err(CommError::BadNeighbor { rank, neighbor, world_size: self.world_size });
            }
        }
        Ok(())
    }
}

/// An `MPI_Iallreduce` in flight. It owns both buffers and a reference to the communicator, so
/// neither can go away before MPI is done with them; dropping it unwaited waits first.
struct PendingMpi {
    /// Keeps the communicator (and MPI) alive while the request is in flight; takes the send
    /// buffer back for reuse.
    handle: Arc<Handle>,
    request: ffi::MPI_Request,
    send: Vec<f32>,
    recv: Vec<f32>,
}

// SAFETY: the request and buffers are owned by this value alone; see `Handle`.
unsafe impl Send for PendingMpi {}

impl PendingMpi {
    fn complete(&mut self) -> Result<(), CommError> {
        // SAFETY: `request` is a valid or null request; a null one completes at once.
        check(unsafe { ffi::MPI_Wait(&mut self.request, ffi::RSMPI_STATUS_IGNORE) }, "MPI_Wait (all-reduce)")
    }
}

impl PendingOp for PendingMpi {
    fn is_ready(&mut self) -> Result<bool, CommError> {
        let mut flag: c_int = 0;
        // SAFETY: as in `complete`.
        check(
            unsafe { ffi::MPI_Test(&mut self.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) },
            "MPI_Test (all-reduce)",
        )?;
        Ok(flag != 0)
    }

    fn wait(mut self: Box<Self>) -> Result<Vec<f32>, CommError> {
        self.complete()?;
        self.handle.give_back(std::mem::take(&mut self.send));
        Ok(std::mem::take(&mut self.recv))
    }
}

impl Drop for PendingMpi {
    fn drop(&mut self) {
        if self.request != unsafe { ffi::RSMPI_REQUEST_NULL } && !mpi::environment::is_finalized() {
            let _ = self.complete();
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        let n = count(values.len(), "all_reduce_sum")?;
        self.agree(Agreement { operation: "all_reduce_sum", len: values.len(), bad_peer: None, words: &[] }, None)?;
        self.scratch.clear();
        self.scratch.extend_from_slice(values);
        // SAFETY: both buffers hold `n` f32 and are distinct allocations.
        let result = check(
            unsafe {
                ffi::MPI_Allreduce(
                    self.scratch.as_ptr().cast::<c_void>(),
                    values.as_mut_ptr().cast::<c_void>(),
                    n,
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    self.handle.comm,
                )
            },
            "MPI_Allreduce (f32 sum)",
        );
        // A copy of a large model is not kept between calls (merges in buckets use
        // `all_reduce_sum_into`, which needs none).
        if self.scratch.capacity() > SCRATCH_LIMIT {
            self.scratch = Vec::new();
        }
        result
    }

    fn all_reduce_sum_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        burn_coop::comm::check_same_length(send, recv)?;
        let n = count(send.len(), "all_reduce_sum_into")?;
        self.agree(Agreement { operation: "all_reduce_sum", len: send.len(), bad_peer: None, words: &[] }, None)?;
        // SAFETY: both buffers hold `n` f32 and do not overlap (one is shared, one exclusive).
        check(
            unsafe {
                ffi::MPI_Allreduce(
                    send.as_ptr().cast::<c_void>(),
                    recv.as_mut_ptr().cast::<c_void>(),
                    n,
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    self.handle.comm,
                )
            },
            "MPI_Allreduce (f32 sum)",
        )
    }

    fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError> {
        let len = values.len();
        let n = count(len, "start_all_reduce_sum")?;
        // Blocking and non-blocking sums agree under one name: MPI matches them in call order.
        self.agree(Agreement { operation: "all_reduce_sum", len, bad_peer: None, words: &[] }, None)?;
        let mut pending = PendingMpi {
            handle: Arc::clone(&self.handle),
            request: unsafe { ffi::RSMPI_REQUEST_NULL },
            send: values,
            recv: self.handle.spare(len),
        };
        // SAFETY: both buffers hold `n` f32, are owned by `pending` (heap allocations that do not
        // move when it does) and stay alive until the request completes (in `wait` or `drop`).
        check(
            unsafe {
                ffi::MPI_Iallreduce(
                    pending.send.as_ptr().cast::<c_void>(),
                    pending.recv.as_mut_ptr().cast::<c_void>(),
                    n,
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    self.handle.comm,
                    &mut pending.request,
                )
            },
            "MPI_Iallreduce (f32 sum)",
        )?;
        Ok(PendingSum::new(Box::new(pending), len))
    }

    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        let n = count(values.len(), "all_reduce_f64")?;
        if self.check_lengths && values.len() <= PIGGYBACK {
            // The values ride in the agreement; every rank sums them in rank order, so all get
            // bit-identical sums (the same as the in-process communicator's).
            let words: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
            self.agree(
                Agreement { operation: "all_reduce_f64", len: values.len(), bad_peer: None, words: &words },
                None,
            )?;
            for (k, value) in values.iter_mut().enumerate() {
                *value = self.records.iter().map(|record| f64::from_bits(record[3 + k])).sum();
            }
            return Ok(());
        }
        self.agree(Agreement { operation: "all_reduce_f64", len: values.len(), bad_peer: None, words: &[] }, None)?;
        let send = values.to_vec();
        // SAFETY: both buffers hold `n` f64 and are distinct allocations.
        check(
            unsafe {
                ffi::MPI_Allreduce(
                    send.as_ptr().cast::<c_void>(),
                    values.as_mut_ptr().cast::<c_void>(),
                    n,
                    ffi::RSMPI_DOUBLE,
                    ffi::RSMPI_SUM,
                    self.handle.comm,
                )
            },
            "MPI_Allreduce (f64 sum)",
        )
    }

    fn broadcast(&mut self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        let n = count(values.len(), "broadcast")?;
        if root >= self.world_size {
            return Err(CommError::BadRoot { rank: self.rank, root, world_size: self.world_size });
        }
        self.agree(
            Agreement { operation: "broadcast", len: values.len(), bad_peer: None, words: &[root as u64] },
            None,
        )?;
        if self.check_lengths && self.records.iter().any(|r| r[3] != root as u64) {
            return Err(CommError::BadRoot { rank: self.rank, root, world_size: self.world_size });
        }
        // SAFETY: `values` holds `n` f32 on every rank (checked above).
        check(
            unsafe {
                ffi::MPI_Bcast(
                    values.as_mut_ptr().cast::<c_void>(),
                    n,
                    ffi::RSMPI_FLOAT,
                    root as c_int,
                    self.handle.comm,
                )
            },
            "MPI_Bcast",
        )
    }

    fn all_gather_bytes(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        count(payload.len(), "all_gather_bytes")?;
        // Every rank's length rides in the payload words, so the lengths may differ.
        let mine = [payload.len() as u64];
        self.agree(Agreement { operation: "all_gather_bytes", len: 0, bad_peer: None, words: &mine }, None)?;
        let lengths: Vec<usize> = if self.check_lengths {
            self.records.iter().map(|r| r[3] as usize).collect()
        } else {
            let mut all = vec![0u64; self.world_size];
            // SAFETY: one u64 per rank.
            check(
                unsafe {
                    ffi::MPI_Allgather(
                        mine.as_ptr().cast::<c_void>(),
                        1,
                        ffi::RSMPI_UINT64_T,
                        all.as_mut_ptr().cast::<c_void>(),
                        1,
                        ffi::RSMPI_UINT64_T,
                        self.handle.comm,
                    )
                },
                "MPI_Allgather (payload lengths)",
            )?;
            all.into_iter().map(|l| l as usize).collect()
        };
        let counts = lengths.iter().map(|&l| count(l, "all_gather_bytes")).collect::<Result<Vec<c_int>, _>>()?;
        let mut displacements = Vec::with_capacity(counts.len());
        let mut total: usize = 0;
        for &l in &lengths {
            displacements.push(count(total, "all_gather_bytes")?);
            total += l;
        }
        let mut gathered = vec![0u8; total];
        // SAFETY: `payload` holds counts[rank] bytes; `gathered` holds the sum of all counts at the
        // displacements computed above.
        check(
            unsafe {
                ffi::MPI_Allgatherv(
                    payload.as_ptr().cast::<c_void>(),
                    counts[self.rank],
                    ffi::RSMPI_UINT8_T,
                    gathered.as_mut_ptr().cast::<c_void>(),
                    counts.as_ptr(),
                    displacements.as_ptr(),
                    ffi::RSMPI_UINT8_T,
                    self.handle.comm,
                )
            },
            "MPI_Allgatherv (byte payloads)",
        )?;
        let mut start = 0;
        Ok(lengths
            .iter()
            .map(|&l| {
                let part = gathered[start..start + l].to_vec();
                start += l;
                part
            })
            .collect())
    }

    fn exchange_directed(&mut self, send: &[f32], route: Route<'_>, recv: Receive<'_, f32>) -> Result<(), CommError> {
        let n = count(send.len(), "exchange")?;
        self.agree_on_neighbors("exchange", send.len(), route)?;
        let Route { send_to, receive_from } = route;

        let mut received = std::mem::take(&mut self.neighbor_buffers);
        received.resize_with(receive_from.len().max(received.len()), Vec::new);
        received.iter_mut().take(receive_from.len()).for_each(|b| b.resize(send.len(), 0.0));
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        let mut requests = vec![null; receive_from.len() + send_to.len()];
        let (receives, sends) = requests.split_at_mut(receive_from.len());
        let mut posted = Ok(());
        for ((&j, buffer), request) in receive_from.iter().zip(received.iter_mut()).zip(receives) {
            // SAFETY: every buffer outlives the requests, which are all completed by the
            // MPI_Waitall below before the buffers are read.
            posted = check(
                unsafe {
                    ffi::MPI_Irecv(
                        buffer.as_mut_ptr().cast::<c_void>(),
                        n,
                        ffi::RSMPI_FLOAT,
                        j as c_int,
                        EXCHANGE_TAG,
                        self.handle.comm,
                        request,
                    )
                },
                "MPI_Irecv (neighbour buffer)",
            );
            if posted.is_err() {
                break;
            }
        }
        for (&j, request) in send_to.iter().zip(sends) {
            if posted.is_err() {
                break;
            }
            // SAFETY: `send` outlives the requests, completed by the MPI_Waitall below.
            posted = check(
                unsafe {
                    ffi::MPI_Isend(
                        send.as_ptr().cast::<c_void>(),
                        n,
                        ffi::RSMPI_FLOAT,
                        j as c_int,
                        EXCHANGE_TAG,
                        self.handle.comm,
                        request,
                    )
                },
                "MPI_Isend (neighbour buffer)",
            );
        }
        // SAFETY: `requests` holds valid or null requests; null ones complete at once.
        let waited = check(
            unsafe { ffi::MPI_Waitall(requests.len() as c_int, requests.as_mut_ptr(), ffi::RSMPI_STATUSES_IGNORE) },
            "MPI_Waitall (neighbour exchange)",
        );
        let result = posted.and(waited);
        if result.is_ok() {
            for (k, buffer) in received.iter().take(receive_from.len()).enumerate() {
                recv(k, buffer);
            }
        }
        self.neighbor_buffers = received;
        result
    }

    fn exchange_bytes(&mut self, send: &[u8], route: Route<'_>, recv: Receive<'_, u8>) -> Result<(), CommError> {
        let n = count(send.len(), "exchange_bytes")?;
        // Lengths differ from worker to worker: the agreement checks the operation and the
        // neighbours only, and each receive learns its length by probing the message.
        self.agree_on_neighbors("exchange_bytes", 0, route)?;
        let Route { send_to, receive_from } = route;
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        let mut sends = vec![null; send_to.len()];
        let mut posted = Ok(());
        for (&j, request) in send_to.iter().zip(sends.iter_mut()) {
            // SAFETY: `send` outlives the requests, completed by the MPI_Waitall below.
            posted = check(
                unsafe {
                    ffi::MPI_Isend(
                        send.as_ptr().cast::<c_void>(),
                        n,
                        ffi::RSMPI_UINT8_T,
                        j as c_int,
                        EXCHANGE_BYTES_TAG,
                        self.handle.comm,
                        request,
                    )
                },
                "MPI_Isend (neighbour payload)",
            );
            if posted.is_err() {
                break;
            }
        }
        let mut received: Vec<Vec<u8>> = Vec::with_capacity(receive_from.len());
        if posted.is_ok() {
            for &j in receive_from {
                match self.receive_probed(j) {
                    Ok(bytes) => received.push(bytes),
                    Err(error) => {
                        posted = Err(error);
                        break;
                    }
                }
            }
        }
        // SAFETY: `sends` holds valid or null requests; null ones complete at once.
        let waited = check(
            unsafe { ffi::MPI_Waitall(sends.len() as c_int, sends.as_mut_ptr(), ffi::RSMPI_STATUSES_IGNORE) },
            "MPI_Waitall (neighbour payloads)",
        );
        posted.and(waited)?;
        for (k, bytes) in received.iter().enumerate() {
            recv(k, bytes);
        }
        Ok(())
    }

    fn split(&mut self, color: usize) -> Result<Box<dyn Communicator>, CommError> {
        let color = c_int::try_from(color)
            .map_err(|_| CommError::Backend(format!("split: colour {color} is too large for MPI")))?;
        self.agree(Agreement { operation: "split", len: 0, bad_peer: None, words: &[] }, None)?;
        let mut sub: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: the communicator is valid; every rank calls MPI_Comm_split at this point.
        check(unsafe { ffi::MPI_Comm_split(self.handle.comm, color, self.rank as c_int, &mut sub) }, "MPI_Comm_split")?;
        let mut group = Self::wrap(Handle::new(sub, None))?;
        group.check_lengths = self.check_lengths;
        Ok(Box::new(group))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        // SAFETY: the communicator is valid while the handle lives.
        check(unsafe { ffi::MPI_Barrier(self.handle.comm) }, "MPI_Barrier")
    }
}
