//! # burn-coop-mpi
//!
//! An MPI [`Transport`] for [`burn_coop`]: run local SGD, elastic averaging or gossip with one
//! worker per MPI rank, on one machine or across a cluster.
//!
//! ```no_run
//! use burn::optim::SgdConfig;
//! use burn_coop::{LocalSgd, PeriodicAveraging, PeriodicSchedule};
//! use burn_coop_mpi::MpiTransport;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = MpiTransport::world()?;
//! println!("rank {} of {}", transport.rank(), transport.world_size());
//! let optim = LocalSgd::new(SgdConfig::new().init(), PeriodicAveraging::new(), PeriodicSchedule::every(8)?, transport)?;
//! # drop(optim);
//! # Ok(())
//! # }
//! ```
//!
//! Start it with `mpirun -np 4 ./trainer` (or `srun`, or `mpirun --hostfile hosts`).
//!
//! ## Mapping onto MPI
//!
//! | [`Transport`] call | MPI |
//! |---|---|
//! | [`Transport::all_reduce`] | `MPI_Allreduce(MPI_SUM)` on `f32`, then `/ m` for [`ReduceOp::Mean`] |
//! | [`Transport::all_reduce_f64`] | up to 16 values: carried by the length exchange and summed in rank order; more: `MPI_Allreduce(MPI_SUM)` on `f64` |
//! | [`Transport::mix`] | one `MPI_Irecv` and one `MPI_Isend` of the whole buffer per neighbour, then `MPI_Waitall` |
//! | [`Transport::barrier`] | `MPI_Barrier` |
//!
//! The transport works on its own duplicate of the communicator it was given, with
//! `MPI_ERRORS_RETURN` set, so MPI failures come back as [`TransportError::Backend`] and its
//! messages never mix with the application's own MPI traffic. Before each collective the ranks
//! exchange their buffer lengths (one small `MPI_Allgather`), so mismatched buffers and invalid
//! neighbours are reported as [`TransportError::LengthMismatch`] and
//! [`TransportError::BadNeighbor`] on every rank instead of corrupting memory or hanging; turn
//! it off with [`MpiTransport::with_length_checks`].
//!
//! Traffic is counted exactly as [`burn_coop::Traffic`] documents (ring all-reduce volume for
//! all-reduces, buffer × neighbours for mixing), so the counters equal those of the in-process
//! transport whatever algorithm MPI picks internally. The length exchange is not counted.
//!
//! ## When a rank dies
//!
//! MPI has no elastic membership. When a process exits abnormally (a crash, `kill -9`, an
//! abort), the launcher ends the whole job: OpenMPI's `mpirun` prints which rank died and exits
//! with a non-zero status within a few seconds. Restart from a checkpoint
//! ([`burn_coop::LocalSgd::state`]) to continue.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "tools")]
pub mod testing;

use std::ffi::{c_int, c_void};
use std::fmt;

use burn_coop::{ReduceOp, Traffic, Transport, TransportError};
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::{Threading, environment::Universe};

/// The `mpi` crate this transport is built on, for applications that need MPI calls of their own.
pub use mpi;

/// Tag of the neighbour exchange messages on the transport's private communicator.
const MIX_TAG: c_int = 0x6d78;

/// `f64` values that travel inside the length agreement itself: an [`Transport::all_reduce_f64`]
/// of at most this many values (merge statistics, metrics) costs one small collective, not two.
const PIGGYBACK: usize = 16;
/// Words each rank contributes to the agreement: length, bad neighbour + 1, piggybacked values.
const RECORD: usize = 2 + PIGGYBACK;

/// A [`Transport`] whose workers are the ranks of an MPI communicator.
///
/// Build it with [`MpiTransport::world`] (initializes MPI, one worker per rank of
/// `MPI_COMM_WORLD`) or [`MpiTransport::from_communicator`] (MPI already initialized by the
/// application). Dropping the handle made by `world` finalizes MPI.
pub struct MpiTransport {
    comm: ffi::MPI_Comm,
    rank: usize,
    world_size: usize,
    check_lengths: bool,
    traffic: Traffic,
    neighbor_buffers: Vec<Vec<f32>>,
    sizes: Vec<[u64; RECORD]>,
    universe: Option<Universe>,
}

// SAFETY: the handle owns its communicator (a duplicate no one else uses) and every MPI call
// takes `&mut self`, so calls through one handle are serialized. `world` only succeeds when
// the MPI library grants at least `MPI_THREAD_SERIALIZED`, which allows calls from any thread
// as long as they are not concurrent; `from_communicator` states the same requirement.
unsafe impl Send for MpiTransport {}

impl fmt::Debug for MpiTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiTransport")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("check_lengths", &self.check_lengths)
            .field("traffic", &self.traffic)
            .field("owns_mpi", &self.universe.is_some())
            .finish_non_exhaustive()
    }
}

/// Turns an MPI return code into a [`TransportError::Backend`] naming the operation.
fn check(code: c_int, what: &str) -> Result<(), TransportError> {
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
    Err(TransportError::Backend(format!("{what} failed: {message}")))
}

fn count(len: usize, what: &str) -> Result<c_int, TransportError> {
    c_int::try_from(len).map_err(|_| {
        TransportError::Backend(format!("{what}: a buffer of {len} values is larger than one MPI message can carry"))
    })
}

impl MpiTransport {
    /// Initializes MPI and returns the transport over every rank of `MPI_COMM_WORLD`.
    ///
    /// MPI can be initialized once per process: this fails when it already was (by an earlier
    /// call or by the application; use [`MpiTransport::from_communicator`] then), and when the
    /// MPI library does not support `MPI_THREAD_SERIALIZED`. The returned handle finalizes MPI
    /// when dropped.
    pub fn world() -> Result<Self, TransportError> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
            return Err(TransportError::Backend(
                "MPI is already initialized in this process; build the transport with \
                 MpiTransport::from_communicator instead of MpiTransport::world"
                    .into(),
            ));
        };
        if threading < Threading::Serialized {
            return Err(TransportError::Backend(format!(
                "the MPI library grants thread support {threading:?}, but the transport needs at least Serialized"
            )));
        }
        let world = universe.world();
        let mut transport = Self::from_raw(world.as_raw())?;
        transport.universe = Some(universe);
        Ok(transport)
    }

    /// A transport over the ranks of `comm`, with MPI initialized by the application (which
    /// also finalizes it, after dropping this handle). The communicator is duplicated, so the
    /// transport's messages never match the application's.
    ///
    /// MPI must have been initialized with at least `MPI_THREAD_SERIALIZED` if the handle is
    /// moved to another thread.
    pub fn from_communicator(comm: &SimpleCommunicator) -> Result<Self, TransportError> {
        Self::from_raw(comm.as_raw())
    }

    fn from_raw(parent: ffi::MPI_Comm) -> Result<Self, TransportError> {
        let mut comm: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: `parent` is a valid communicator and MPI is initialized.
        check(unsafe { ffi::MPI_Comm_dup(parent, &mut comm) }, "MPI_Comm_dup")?;
        let mut transport = Self {
            comm,
            rank: 0,
            world_size: 1,
            check_lengths: true,
            traffic: Traffic::default(),
            neighbor_buffers: Vec::new(),
            sizes: Vec::new(),
            universe: None,
        };
        // SAFETY: `comm` is the valid communicator just created.
        unsafe {
            check(ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN), "MPI_Comm_set_errhandler")?;
            let (mut rank, mut size): (c_int, c_int) = (0, 0);
            check(ffi::MPI_Comm_rank(comm, &mut rank), "MPI_Comm_rank")?;
            check(ffi::MPI_Comm_size(comm, &mut size), "MPI_Comm_size")?;
            transport.rank = rank as usize;
            transport.world_size = size as usize;
        }
        transport.sizes = vec![[0; RECORD]; transport.world_size];
        Ok(transport)
    }

    /// Whether to exchange buffer lengths before every collective (default: on). Without the
    /// check, ranks that pass buffers of different lengths or asymmetric neighbour lists get
    /// MPI errors, truncated data or a hang.
    pub fn with_length_checks(mut self, check: bool) -> Self {
        self.check_lengths = check;
        self
    }

    /// This rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Whether this handle initialized MPI (and finalizes it when dropped).
    pub fn owns_mpi(&self) -> bool {
        self.universe.is_some()
    }

    /// The name of the processor (host) this rank runs on.
    pub fn processor_name(&self) -> String {
        mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into())
    }

    /// The MPI library's version string.
    pub fn library_version() -> String {
        mpi::environment::library_version().map(|v| v.trim_end_matches('\0').trim().to_string()).unwrap_or_default()
    }

    /// The raw MPI communicator used by the transport (a private duplicate), for calls of the
    /// application's own through [`mpi::ffi`].
    pub fn as_raw(&self) -> ffi::MPI_Comm {
        self.comm
    }

    /// Exchanges `(len, bad neighbour + 1, payload)` with every rank and turns any disagreement
    /// into the same error on every rank. Every rank's `payload` (at most [`PIGGYBACK`] values)
    /// is left in `self.sizes`.
    fn agree(
        &mut self,
        len: usize,
        bad_neighbor: Option<usize>,
        peers: Option<&[(usize, f32)]>,
        payload: &[f64],
    ) -> Result<(), TransportError> {
        if !self.check_lengths {
            return match bad_neighbor {
                Some(neighbor) => {
                    Err(TransportError::BadNeighbor { rank: self.rank, neighbor, world_size: self.world_size })
                }
                None => Ok(()),
            };
        }
        let mut mine = [0u64; RECORD];
        mine[0] = len as u64;
        mine[1] = bad_neighbor.map_or(0, |n| n as u64 + 1);
        mine[2..2 + payload.len()].iter_mut().zip(payload).for_each(|(word, v)| *word = v.to_bits());
        // SAFETY: `mine` holds RECORD u64 and `sizes` RECORD u64 per rank of `comm`.
        check(
            unsafe {
                ffi::MPI_Allgather(
                    mine.as_ptr().cast::<c_void>(),
                    RECORD as c_int,
                    ffi::RSMPI_UINT64_T,
                    self.sizes.as_mut_ptr().cast::<c_void>(),
                    RECORD as c_int,
                    ffi::RSMPI_UINT64_T,
                    self.comm,
                )
            },
            "MPI_Allgather (buffer lengths)",
        )?;
        if let Some((rank, entry)) = self.sizes.iter().enumerate().find(|(_, e)| e[1] != 0) {
            return Err(TransportError::BadNeighbor {
                rank,
                neighbor: (entry[1] - 1) as usize,
                world_size: self.world_size,
            });
        }
        let mismatch = match peers {
            None => self.sizes.iter().position(|e| e[0] != len as u64),
            Some(peers) => peers.iter().map(|&(j, _)| j).find(|&j| self.sizes[j][0] != len as u64),
        };
        match mismatch {
            None => Ok(()),
            Some(other_rank) => Err(TransportError::LengthMismatch {
                rank: self.rank,
                len,
                other_rank,
                other_len: self.sizes[other_rank][0] as usize,
            }),
        }
    }
}

impl Drop for MpiTransport {
    fn drop(&mut self) {
        // SAFETY: `comm` was created by MPI_Comm_dup and is freed once, before MPI_Finalize
        // (run by `universe` when it drops after this).
        unsafe {
            if !mpi::environment::is_finalized() {
                ffi::MPI_Comm_free(&mut self.comm);
            }
        }
        drop(self.universe.take());
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<(), TransportError> {
        assert_eq!(send.len(), recv.len(), "all_reduce needs send and recv of the same length");
        let n = count(send.len(), "all_reduce")?;
        self.agree(send.len(), None, None, &[])?;
        // SAFETY: both buffers hold `n` f32 and do not overlap (one is shared, one exclusive).
        check(
            unsafe {
                ffi::MPI_Allreduce(
                    send.as_ptr().cast::<c_void>(),
                    recv.as_mut_ptr().cast::<c_void>(),
                    n,
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    self.comm,
                )
            },
            "MPI_Allreduce (f32 sum)",
        )?;
        if op == ReduceOp::Mean {
            if self.world_size.is_power_of_two() {
                // Scaling by an exact power of two rounds exactly as dividing does, and is faster.
                let inv_m = 1.0 / self.world_size as f32;
                recv.iter_mut().for_each(|r| *r *= inv_m);
            } else {
                let m = self.world_size as f32;
                recv.iter_mut().for_each(|r| *r /= m);
            }
        }
        self.traffic.record(Traffic::ring_all_reduce(4 * send.len() as u64, self.world_size));
        Ok(())
    }

    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), TransportError> {
        let n = count(values.len(), "all_reduce_f64")?;
        let traffic = Traffic::ring_all_reduce(8 * values.len() as u64, self.world_size);
        if self.check_lengths && values.len() <= PIGGYBACK {
            // The values ride in the agreement; every rank sums them in rank order, so all get
            // bit-identical sums (the same as the in-process transport's).
            self.agree(values.len(), None, None, values)?;
            for (k, value) in values.iter_mut().enumerate() {
                *value = self.sizes.iter().map(|record| f64::from_bits(record[2 + k])).sum();
            }
            self.traffic.record(traffic);
            return Ok(());
        }
        self.agree(values.len(), None, None, &[])?;
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
                    self.comm,
                )
            },
            "MPI_Allreduce (f64 sum)",
        )?;
        self.traffic.record(traffic);
        Ok(())
    }

    fn mix(
        &mut self,
        send: &[f32],
        recv: &mut [f32],
        self_weight: f32,
        neighbors: &[(usize, f32)],
    ) -> Result<(), TransportError> {
        assert_eq!(send.len(), recv.len(), "mix needs send and recv of the same length");
        let n = count(send.len(), "mix")?;
        let bad = neighbors.iter().map(|&(j, _)| j).find(|&j| j >= self.world_size || j == self.rank);
        self.agree(send.len(), bad, Some(neighbors), &[])?;

        if self.neighbor_buffers.len() < neighbors.len() {
            self.neighbor_buffers.resize_with(neighbors.len(), Vec::new);
        }
        let buffers = &mut self.neighbor_buffers[..neighbors.len()];
        buffers.iter_mut().for_each(|b| b.resize(send.len(), 0.0));
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        let mut requests = vec![null; 2 * neighbors.len()];
        let mut posted = Ok(());
        for (k, (&(j, _), buffer)) in neighbors.iter().zip(buffers.iter_mut()).enumerate() {
            // SAFETY: every buffer outlives the requests, which are all completed by the
            // MPI_Waitall below before the buffers are read or `send` is released.
            posted = unsafe {
                check(
                    ffi::MPI_Irecv(
                        buffer.as_mut_ptr().cast::<c_void>(),
                        n,
                        ffi::RSMPI_FLOAT,
                        j as c_int,
                        MIX_TAG,
                        self.comm,
                        &mut requests[2 * k],
                    ),
                    "MPI_Irecv (neighbour buffer)",
                )
                .and_then(|()| {
                    check(
                        ffi::MPI_Isend(
                            send.as_ptr().cast::<c_void>(),
                            n,
                            ffi::RSMPI_FLOAT,
                            j as c_int,
                            MIX_TAG,
                            self.comm,
                            &mut requests[2 * k + 1],
                        ),
                        "MPI_Isend (neighbour buffer)",
                    )
                })
            };
            if posted.is_err() {
                break;
            }
        }
        // SAFETY: `requests` holds valid or null requests; null ones complete at once.
        let waited = check(
            unsafe { ffi::MPI_Waitall(requests.len() as c_int, requests.as_mut_ptr(), ffi::RSMPI_STATUSES_IGNORE) },
            "MPI_Waitall (neighbour exchange)",
        );
        posted?;
        waited?;

        recv.iter_mut().zip(send).for_each(|(r, s)| *r = self_weight * s);
        for (&(_, weight), buffer) in neighbors.iter().zip(buffers.iter()) {
            recv.iter_mut().zip(buffer).for_each(|(r, v)| *r += weight * v);
        }
        self.traffic.record(4 * send.len() as u64 * neighbors.len() as u64);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), TransportError> {
        // SAFETY: `comm` is valid while the handle lives.
        check(unsafe { ffi::MPI_Barrier(self.comm) }, "MPI_Barrier")
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}
