//! The in-process transport: `m` workers on threads of one process exchanging buffers through
//! shared memory.

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
                scattering: false,
                arrived: vec![false; self.world],
                arrived_count: 0,
                readers_left: 0,
                departed: vec![false; self.world],
                broken: None,
            }),
            changed: Condvar::new(),
            slots: (0..self.world).map(|_| RwLock::new(Slot::default())).collect(),
        });
        (0..self.world)
            .map(|rank| InProcessTransport { rank, shared: Arc::clone(&shared), traffic: Traffic::default() })
            .collect()
    }
}

/// One worker's handle on an [`InProcessGroup`].
///
/// Dropping the handle (also while unwinding from a panic) tells the other workers that this
/// one is gone: their collectives then fail with [`TransportError::PeerLost`].
#[derive(Debug)]
pub struct InProcessTransport {
    rank: usize,
    shared: Arc<Shared>,
    traffic: Traffic,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    changed: Condvar,
    slots: Vec<RwLock<Slot>>,
}

#[derive(Debug, Default)]
struct Slot {
    values: Vec<f32>,
    stats: Vec<f64>,
}

/// A collective has two phases: gathering (each worker writes its own slot) and scattering
/// (every worker reads all slots). The next gathering starts once every reader is done.
#[derive(Debug)]
struct State {
    scattering: bool,
    arrived: Vec<bool>,
    arrived_count: usize,
    readers_left: usize,
    departed: Vec<bool>,
    broken: Option<TransportError>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        mut done: impl FnMut(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, TransportError> {
        loop {
            if let Some(error) = &state.broken {
                return Err(error.clone());
            }
            if done(&state) {
                return Ok(state);
            }
            if let Some(rank) = (0..self.world).find(|&r| state.departed[r] && !state.arrived[r]) {
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
                        let waiting_for = (0..self.world).filter(|&r| !state.arrived[r]).collect();
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
        let shared = &*self.shared;
        let deadline = shared.timeout.map(|t| Instant::now() + t);
        let state = shared.wait(shared.lock(), deadline, |s| !s.scattering)?;
        drop(state);
        deposit(&mut shared.slots[self.rank].write().unwrap_or_else(PoisonError::into_inner));

        let mut state = shared.lock();
        state.arrived[self.rank] = true;
        state.arrived_count += 1;
        if state.arrived_count == shared.world {
            state.scattering = true;
            state.readers_left = shared.world;
            shared.changed.notify_all();
        }
        let state = shared.wait(state, deadline, |s| s.scattering)?;
        drop(state);

        let guards: Vec<_> =
            shared.slots.iter().map(|slot| slot.read().unwrap_or_else(PoisonError::into_inner)).collect();
        let result = combine(&guards);
        drop(guards);

        let mut state = shared.lock();
        state.readers_left -= 1;
        if state.readers_left == 0 {
            state.scattering = false;
            state.arrived.iter_mut().for_each(|a| *a = false);
            state.arrived_count = 0;
            shared.changed.notify_all();
        }
        result
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
                // Every worker sums in rank order, so all of them get bit-identical results.
                recv.copy_from_slice(&slots[0].values);
                for slot in &slots[1..] {
                    recv.iter_mut().zip(&slot.values).for_each(|(r, v)| *r += v);
                }
                if op == ReduceOp::Mean {
                    let m = world as f32;
                    recv.iter_mut().for_each(|r| *r /= m);
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
                recv.iter_mut().zip(send).for_each(|(r, s)| *r = self_weight * s);
                for &(j, weight) in neighbors {
                    recv.iter_mut().zip(&slots[j].values).for_each(|(r, v)| *r += weight * v);
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
