//! The in-process transport: `m` workers on threads of one process exchanging buffers through
//! shared memory.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use super::{ReduceOp, Traffic, Transport, TransportError};

/// Builder for a group of in-process workers.
///
/// ```
/// use burn_coop::transport::{InProcessGroup, ReduceOp, Transport};
///
/// let handles = InProcessGroup::new(2).into_transports();
/// let threads: Vec<_> = handles
///     .into_iter()
///     .map(|mut t| {
///         std::thread::spawn(move || {
///             let send = [t.rank() as f32 + 1.0; 3];
///             let mut recv = [0.0; 3];
///             t.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
///             recv
///         })
///     })
///     .collect();
/// for thread in threads {
///     assert_eq!(thread.join().unwrap(), [3.0; 3]);
/// }
/// ```
#[derive(Debug, Clone)]
pub struct InProcessGroup {
    world: usize,
    timeout: Option<Duration>,
}

impl InProcessGroup {
    /// A group of `world` workers (at least one).
    pub fn new(world: usize) -> Self {
        assert!(world > 0, "an in-process group needs at least one worker");
        Self { world, timeout: None }
    }

    /// Fail a collective with [`TransportError::Timeout`] when the other workers have not all
    /// arrived within `timeout` (default: wait as long as they are alive). A lost worker is
    /// always reported at once, whatever the timeout.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout: Some(timeout), ..self }
    }

    /// One transport handle per rank, in rank order. Move each into its worker's thread.
    pub fn into_transports(self) -> Vec<InProcessTransport> {
        let shared = Arc::new(Shared {
            world: self.world,
            timeout: self.timeout,
            state: Mutex::new(State {
                gathering: 0,
                arrived_at: vec![None; self.world],
                arrived_count: 0,
                departed: vec![false; self.world],
                broken: None,
            }),
            changed: Condvar::new(),
            slots: [0, 1].map(|_| (0..self.world).map(|_| RwLock::new(Slot::default())).collect()),
        });
        (0..self.world)
            .map(|rank| InProcessTransport {
                rank,
                shared: Arc::clone(&shared),
                traffic: Traffic::default(),
                generation: Cell::new(0),
            })
            .collect()
    }
}

/// Values combined per block in reductions (16 KiB of f32: the running result stays in L1).
const BLOCK: usize = 4096;

/// One worker's handle on an [`InProcessGroup`].
///
/// Dropping the handle (also while unwinding from a panic) tells the other workers that this
/// one is gone: their collectives then fail with [`TransportError::PeerLost`].
#[derive(Debug)]
pub struct InProcessTransport {
    rank: usize,
    shared: Arc<Shared>,
    traffic: Traffic,
    /// Collectives this worker has entered.
    generation: Cell<u64>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    changed: Condvar,
    /// Two sets of slots, used by alternate collectives.
    slots: [Vec<RwLock<Slot>>; 2],
}

#[derive(Debug, Default)]
struct Slot {
    values: Vec<f32>,
    stats: Vec<f64>,
}

/// Collective number `g` writes and reads slot set `g % 2`. Each worker writes its own slot,
/// arrives, and once all have arrived, reads every slot of the set. Nobody waits for the
/// readers: a worker can only write set `g % 2` again in collective `g + 2`, which cannot start
/// before collective `g + 1` has gathered everyone — and every worker arrives at `g + 1` only
/// after it has finished reading `g`.
#[derive(Debug)]
struct State {
    /// The collective being gathered.
    gathering: u64,
    /// The last collective each worker arrived at.
    arrived_at: Vec<Option<u64>>,
    arrived_count: usize,
    departed: Vec<bool>,
    broken: Option<TransportError>,
}

impl State {
    fn has_arrived(&self, rank: usize, generation: u64) -> bool {
        self.arrived_at[rank].is_some_and(|g| g >= generation)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until collective `generation` has gathered every worker.
    fn wait<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        generation: u64,
    ) -> Result<MutexGuard<'a, State>, TransportError> {
        loop {
            if let Some(error) = &state.broken {
                return Err(error.clone());
            }
            if state.gathering > generation {
                return Ok(state);
            }
            if let Some(rank) = (0..self.world).find(|&r| state.departed[r] && !state.has_arrived(r, generation)) {
                let error = TransportError::PeerLost { rank };
                state.broken = Some(error.clone());
                self.changed.notify_all();
                return Err(error);
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let waiting_for = (0..self.world).filter(|&r| !state.has_arrived(r, generation)).collect();
                        let seconds = self.timeout.map_or(0.0, |t| t.as_secs_f64());
                        let error = TransportError::Timeout { seconds, waiting_for };
                        state.broken = Some(error.clone());
                        self.changed.notify_all();
                        return Err(error);
                    }
                    self.changed.wait_timeout(state, deadline - now).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
    }
}

impl InProcessTransport {
    /// Runs one collective: `deposit` fills this worker's slot, then `combine` reads every
    /// worker's slot once all have deposited.
    fn collective<R>(
        &self,
        deposit: impl FnOnce(&mut Slot),
        combine: impl FnOnce(&[RwLockReadGuard<'_, Slot>]) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let generation = self.generation.get();
        self.generation.set(generation + 1);
        let shared = &*self.shared;
        let slots = &shared.slots[(generation % 2) as usize];
        let deadline = shared.timeout.map(|t| Instant::now() + t);
        deposit(&mut slots[self.rank].write().unwrap_or_else(PoisonError::into_inner));

        let mut state = shared.lock();
        state.arrived_at[self.rank] = Some(generation);
        state.arrived_count += 1;
        if state.arrived_count == shared.world {
            state.arrived_count = 0;
            state.gathering = generation + 1;
            shared.changed.notify_all();
        }
        drop(shared.wait(state, deadline, generation)?);

        let guards: Vec<_> = slots.iter().map(|slot| slot.read().unwrap_or_else(PoisonError::into_inner)).collect();
        combine(&guards)
    }

    fn check_lengths(&self, slots: &[RwLockReadGuard<'_, Slot>], len: usize) -> Result<(), TransportError> {
        match slots.iter().position(|slot| slot.values.len() != len) {
            None => Ok(()),
            Some(other_rank) => Err(TransportError::LengthMismatch {
                rank: self.rank,
                len,
                other_rank,
                other_len: slots[other_rank].values.len(),
            }),
        }
    }
}

impl Drop for InProcessTransport {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.departed[self.rank] = true;
        self.shared.changed.notify_all();
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<(), TransportError> {
        assert_eq!(send.len(), recv.len(), "all_reduce needs send and recv of the same length");
        let world = self.shared.world;
        self.collective(
            |slot| {
                slot.values.clear();
                slot.values.extend_from_slice(send);
            },
            |slots| {
                self.check_lengths(slots, send.len())?;
                // Every worker sums in rank order, so all of them get bit-identical results. Block
                // by block, so the partial sum stays in L1 while the other slots stream past.
                let m = world as f32;
                for (start, block) in recv.chunks_mut(BLOCK).enumerate().map(|(b, r)| (b * BLOCK, r)) {
                    let range = start..start + block.len();
                    block.copy_from_slice(&slots[0].values[range.clone()]);
                    for slot in &slots[1..] {
                        block.iter_mut().zip(&slot.values[range.clone()]).for_each(|(r, v)| *r += v);
                    }
                    if op == ReduceOp::Mean {
                        block.iter_mut().for_each(|r| *r /= m);
                    }
                }
                Ok(())
            },
        )?;
        self.traffic.record(Traffic::ring_all_reduce(4 * send.len() as u64, world));
        Ok(())
    }

    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), TransportError> {
        let world = self.shared.world;
        let len = values.len();
        let rank = self.rank;
        let input = values.to_vec();
        self.collective(
            |slot| {
                slot.stats.clear();
                slot.stats.extend_from_slice(&input);
            },
            |slots| {
                if let Some(other_rank) = slots.iter().position(|s| s.stats.len() != len) {
                    let other_len = slots[other_rank].stats.len();
                    return Err(TransportError::LengthMismatch { rank, len, other_rank, other_len });
                }
                values.iter_mut().enumerate().for_each(|(k, v)| *v = slots.iter().map(|s| s.stats[k]).sum());
                Ok(())
            },
        )?;
        self.traffic.record(Traffic::ring_all_reduce(8 * len as u64, world));
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
        let (rank, world_size) = (self.rank, self.shared.world);
        if let Some(&(neighbor, _)) = neighbors.iter().find(|(j, _)| *j >= world_size || *j == rank) {
            return Err(TransportError::BadNeighbor { rank, neighbor, world_size });
        }
        self.collective(
            |slot| {
                slot.values.clear();
                slot.values.extend_from_slice(send);
            },
            |slots| {
                for &(j, _) in neighbors {
                    if slots[j].values.len() != send.len() {
                        let other_len = slots[j].values.len();
                        return Err(TransportError::LengthMismatch { rank, len: send.len(), other_rank: j, other_len });
                    }
                }
                for (start, block) in recv.chunks_mut(BLOCK).enumerate().map(|(b, r)| (b * BLOCK, r)) {
                    let range = start..start + block.len();
                    block.iter_mut().zip(&send[range.clone()]).for_each(|(r, s)| *r = self_weight * s);
                    for &(j, weight) in neighbors {
                        block.iter_mut().zip(&slots[j].values[range.clone()]).for_each(|(r, v)| *r += weight * v);
                    }
                }
                Ok(())
            },
        )?;
        self.traffic.record(4 * send.len() as u64 * neighbors.len() as u64);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), TransportError> {
        self.collective(|_| {}, |_| Ok(()))
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}
