//! The in-process communicator: `m` workers on threads of one process exchanging data through
//! shared memory.
//!
//! Every collective is a numbered *round*: a worker's k-th call (blocking or non-blocking)
//! joins round k. A worker deposits its payload and, for a blocking call, waits until every
//! worker has deposited; a non-blocking call returns at once and waits later. Each worker then
//! reads all payloads (sums run in rank order, so every worker gets bit-identical results), and
//! the last reader retires the round and hands each deposit's allocation (up to one merge bucket,
//! 4 MiB) back to its owner.
//! Several rounds can be open at once, which is what lets communication overlap computation.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{CommError, Communicator, PendingOp, PendingSum, Receive, Route};

/// Builder for a group of in-process workers.
///
/// ```
/// use burn_coop::comm::{Communicator, InProcessGroup};
///
/// let handles = InProcessGroup::new(2).into_communicators();
/// let threads: Vec<_> = handles
///     .into_iter()
///     .map(|mut comm| {
///         std::thread::spawn(move || {
///             let mut values = [comm.rank() as f32 + 1.0; 3];
///             comm.all_reduce_sum(&mut values).unwrap();
///             values
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

    /// Fail a collective with [`CommError::Timeout`] when the other workers have not all
    /// arrived within `timeout` (default: wait as long as they are alive). A lost worker is
    /// always reported at once, whatever the timeout.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout: Some(timeout), ..self }
    }

    /// One communicator per rank, in rank order. Move each into its worker's thread.
    pub fn into_communicators(self) -> Vec<InProcessComm> {
        let shared = Shared::new(self.world, self.timeout);
        (0..self.world).map(|rank| InProcessComm { rank, shared: Arc::clone(&shared), next_round: 0 }).collect()
    }
}

/// One worker's handle on an [`InProcessGroup`].
///
/// Dropping the handle (also while unwinding from a panic) tells the other workers that this
/// one is gone: their collectives, pending ones included, then fail with
/// [`CommError::PeerLost`].
#[derive(Debug)]
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
    next_round: u64,
}

/// What a worker deposits in a round.
#[derive(Debug)]
enum Payload {
    Nothing,
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    Exchange { values: Vec<f32>, send_to: Vec<usize>, receive_from: Vec<usize> },
    ExchangeBytes { bytes: Vec<u8>, send_to: Vec<usize>, receive_from: Vec<usize> },
    Broadcast { values: Option<Vec<f32>>, root: usize, len: usize },
    Color(usize),
}

impl Payload {
    fn f32_allocation(self) -> Option<Vec<f32>> {
        match self {
            Self::F32(v) | Self::Exchange { values: v, .. } | Self::Broadcast { values: Some(v), .. } => Some(v),
            _ => None,
        }
    }
}

/// The largest allocation (in values) a worker keeps for its next deposit, one at a time: 4 MiB,
/// a merge bucket ([`crate::DEFAULT_BUCKET_BYTES`]). Larger ones go back to the system, so that
/// a large model's merge leaves no copy of it behind.
const SPARE_LIMIT: usize = crate::sync::DEFAULT_BUCKET_BYTES / 4;

#[derive(Debug)]
struct Round {
    operation: &'static str,
    first: usize,
    deposits: Vec<Option<Arc<Payload>>>,
    arrived: usize,
    readers_left: usize,
    groups: BTreeMap<usize, Arc<Shared>>,
}

#[derive(Debug)]
struct State {
    rounds: BTreeMap<u64, Round>,
    departed: Vec<bool>,
    broken: Option<CommError>,
    /// Allocations handed back to each worker, reused by its next deposit.
    spare: Vec<Vec<Vec<f32>>>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn new(world: usize, timeout: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            world,
            timeout,
            state: Mutex::new(State {
                rounds: BTreeMap::new(),
                departed: vec![false; world],
                broken: None,
                spare: vec![Vec::new(); world],
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, state: &mut State, error: CommError) -> CommError {
        state.broken = Some(error.clone());
        self.changed.notify_all();
        error
    }

    /// Puts `rank`'s payload into round `round`.
    fn deposit(&self, rank: usize, round: u64, operation: &'static str, payload: Payload) -> Result<(), CommError> {
        let mut state = self.lock();
        if let Some(error) = &state.broken {
            return Err(error.clone());
        }
        let world = self.world;
        let entry = state.rounds.entry(round).or_insert_with(|| Round {
            operation,
            first: rank,
            deposits: (0..world).map(|_| None).collect(),
            arrived: 0,
            readers_left: world,
            groups: BTreeMap::new(),
        });
        if entry.operation != operation {
            let (other_rank, other_operation) = (entry.first, entry.operation);
            let error = CommError::OperationMismatch { rank, operation, other_rank, other_operation };
            return Err(self.fail(&mut state, error));
        }
        entry.deposits[rank] = Some(Arc::new(payload));
        entry.arrived += 1;
        if entry.arrived == world {
            self.changed.notify_all();
        }
        Ok(())
    }

    /// Waits until every worker has deposited into `round`, then returns all deposits (and the
    /// round's sub-groups map for `split`).
    fn collect(
        &self,
        round: u64,
        read: impl FnOnce(&mut Round) -> Result<(), CommError>,
    ) -> Result<Vec<Arc<Payload>>, CommError> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        loop {
            if let Some(error) = &state.broken {
                return Err(error.clone());
            }
            let entry = state.rounds.get_mut(&round).expect("a round exists once this worker has deposited");
            if entry.arrived == self.world {
                read(entry)?;
                return Ok(entry.deposits.iter().map(|d| Arc::clone(d.as_ref().expect("all arrived"))).collect());
            }
            let missing: Vec<usize> = (0..self.world).filter(|&r| entry.deposits[r].is_none()).collect();
            if let Some(&rank) = missing.iter().find(|&&r| state.departed[r]) {
                return Err(self.fail(&mut state, CommError::PeerLost { rank }));
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let seconds = self.timeout.map_or(0.0, |t| t.as_secs_f64());
                        return Err(self.fail(&mut state, CommError::Timeout { seconds, waiting_for: missing }));
                    }
                    self.changed.wait_timeout(state, deadline - now).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
    }

    /// This worker is done reading `round`; the last reader retires it and hands every `f32`
    /// allocation back to the worker that deposited it.
    fn release(&self, round: u64, deposits: Vec<Arc<Payload>>) {
        drop(deposits);
        let mut state = self.lock();
        let Some(entry) = state.rounds.get_mut(&round) else { return };
        entry.readers_left -= 1;
        if entry.readers_left > 0 {
            return;
        }
        let entry = state.rounds.remove(&round).expect("present");
        for (rank, deposit) in entry.deposits.into_iter().enumerate() {
            if let Some(values) = deposit.and_then(|d| Arc::try_unwrap(d).ok()).and_then(Payload::f32_allocation)
                && values.capacity() <= SPARE_LIMIT
                && state.spare[rank].is_empty()
            {
                state.spare[rank].push(values);
            }
        }
    }

    fn spare(&self, rank: usize) -> Vec<f32> {
        self.lock().spare[rank].pop().unwrap_or_default()
    }
}

impl InProcessComm {
    fn begin(&mut self, operation: &'static str, payload: Payload) -> Result<u64, CommError> {
        let round = self.next_round;
        self.next_round += 1;
        self.shared.deposit(self.rank, round, operation, payload)?;
        Ok(round)
    }

    /// A blocking collective: deposit, wait for everyone, read, release.
    fn collective<R>(
        &mut self,
        operation: &'static str,
        payload: Payload,
        read: impl FnOnce(&[Arc<Payload>]) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let round = self.begin(operation, payload)?;
        let deposits = self.shared.collect(round, |_| Ok(()))?;
        let result = read(&deposits);
        self.shared.release(round, deposits);
        result
    }

    /// A neighbour exchange: checks this worker's lists, deposits `payload`, checks every
    /// worker's lists against each other (the same error everywhere) and hands the deposits to
    /// `deliver`.
    fn neighbor_round(
        &mut self,
        operation: &'static str,
        payload: Payload,
        route: Route<'_>,
        deliver: impl FnOnce(&[Arc<Payload>]) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let (rank, world_size) = (self.rank, self.shared.world);
        if let Some(&neighbor) = route.send_to.iter().chain(route.receive_from).find(|&&j| j >= world_size || j == rank)
        {
            return Err(CommError::BadNeighbor { rank, neighbor, world_size });
        }
        self.collective(operation, payload, |deposits| {
            let lists = |i: usize| match &*deposits[i] {
                Payload::Exchange { send_to, receive_from, .. }
                | Payload::ExchangeBytes { send_to, receive_from, .. } => (send_to.as_slice(), receive_from.as_slice()),
                _ => unreachable!("rounds hold one kind of payload"),
            };
            if let Some((bad, neighbor)) = super::first_bad_neighbor(world_size, lists) {
                return Err(CommError::BadNeighbor { rank: bad, neighbor, world_size });
            }
            deliver(deposits)
        })
    }

    fn copy_of(&self, values: &[f32]) -> Vec<f32> {
        let mut copy = self.shared.spare(self.rank);
        copy.clear();
        copy.extend_from_slice(values);
        copy
    }
}

/// `out ← Σ_j deposits[j]` in rank order, after checking every length.
fn sum_in_rank_order(rank: usize, out: &mut [f32], deposits: &[Arc<Payload>]) -> Result<(), CommError> {
    let mut parts = Vec::with_capacity(deposits.len());
    for (other_rank, deposit) in deposits.iter().enumerate() {
        let Payload::F32(values) = &**deposit else { unreachable!("rounds hold one kind of payload") };
        if values.len() != out.len() {
            return Err(CommError::LengthMismatch { rank, len: out.len(), other_rank, other_len: values.len() });
        }
        parts.push(values);
    }
    out.copy_from_slice(parts[0]);
    for part in &parts[1..] {
        out.iter_mut().zip(part.iter()).for_each(|(o, v)| *o += v);
    }
    Ok(())
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.departed[self.rank] = true;
        self.shared.changed.notify_all();
    }
}

/// A sum all-reduce deposited but not yet read.
struct PendingInProcess {
    shared: Arc<Shared>,
    rank: usize,
    round: u64,
    len: usize,
}

impl PendingOp for PendingInProcess {
    fn is_ready(&mut self) -> Result<bool, CommError> {
        let state = self.shared.lock();
        if let Some(error) = &state.broken {
            return Err(error.clone());
        }
        let entry = state.rounds.get(&self.round).expect("a pending round stays until read");
        if let Some(rank) = (0..self.shared.world).find(|&r| entry.deposits[r].is_none() && state.departed[r]) {
            return Err(CommError::PeerLost { rank });
        }
        Ok(entry.arrived == self.shared.world)
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>, CommError> {
        let deposits = self.shared.collect(self.round, |_| Ok(()))?;
        let mut sum = self.shared.spare(self.rank);
        sum.resize(self.len, 0.0);
        let result = sum_in_rank_order(self.rank, &mut sum, &deposits);
        self.shared.release(self.round, deposits);
        result.map(|()| sum)
    }
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        let payload = Payload::F32(self.copy_of(values));
        let rank = self.rank;
        self.collective("all_reduce_sum", payload, |deposits| sum_in_rank_order(rank, values, deposits))
    }

    fn all_reduce_sum_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        super::check_same_length(send, recv)?;
        let payload = Payload::F32(self.copy_of(send));
        let rank = self.rank;
        self.collective("all_reduce_sum", payload, |deposits| sum_in_rank_order(rank, recv, deposits))
    }

    fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError> {
        let len = values.len();
        // The caller's buffer is deposited as it is (no copy); the sum is written into a spare
        // buffer of this worker's when it is collected. Blocking and non-blocking sums share the
        // operation name: MPI lets them match, too.
        let round = self.begin("all_reduce_sum", Payload::F32(values))?;
        let pending = PendingInProcess { shared: Arc::clone(&self.shared), rank: self.rank, round, len };
        Ok(PendingSum::new(Box::new(pending), len))
    }

    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        let rank = self.rank;
        self.collective("all_reduce_f64", Payload::F64(values.to_vec()), |deposits| {
            for (other_rank, deposit) in deposits.iter().enumerate() {
                let Payload::F64(other) = &**deposit else { unreachable!("rounds hold one kind of payload") };
                if other.len() != values.len() {
                    return Err(CommError::LengthMismatch {
                        rank,
                        len: values.len(),
                        other_rank,
                        other_len: other.len(),
                    });
                }
            }
            for (k, value) in values.iter_mut().enumerate() {
                *value = deposits.iter().map(|d| if let Payload::F64(v) = &**d { v[k] } else { 0.0 }).sum();
            }
            Ok(())
        })
    }

    fn broadcast(&mut self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        let (rank, world_size) = (self.rank, self.shared.world);
        if root >= world_size {
            return Err(CommError::BadRoot { rank, root, world_size });
        }
        let mine = (rank == root).then(|| self.copy_of(values));
        let payload = Payload::Broadcast { values: mine, root, len: values.len() };
        self.collective("broadcast", payload, |deposits| {
            for (other_rank, deposit) in deposits.iter().enumerate() {
                let Payload::Broadcast { root: other_root, len, .. } = &**deposit else { unreachable!() };
                if *other_root != root {
                    return Err(CommError::BadRoot { rank, root, world_size });
                }
                if *len != values.len() {
                    return Err(CommError::LengthMismatch { rank, len: values.len(), other_rank, other_len: *len });
                }
            }
            if rank != root {
                let Payload::Broadcast { values: Some(source), .. } = &*deposits[root] else { unreachable!() };
                values.copy_from_slice(source);
            }
            Ok(())
        })
    }

    fn all_gather_bytes(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.collective("all_gather_bytes", Payload::Bytes(payload.to_vec()), |deposits| {
            Ok(deposits
                .iter()
                .map(|d| match &**d {
                    Payload::Bytes(bytes) => bytes.clone(),
                    _ => unreachable!("rounds hold one kind of payload"),
                })
                .collect())
        })
    }

    fn exchange_directed(&mut self, send: &[f32], route: Route<'_>, recv: Receive<'_, f32>) -> Result<(), CommError> {
        let payload = Payload::Exchange {
            values: self.copy_of(send),
            send_to: route.send_to.to_vec(),
            receive_from: route.receive_from.to_vec(),
        };
        let (rank, receive_from) = (self.rank, route.receive_from);
        self.neighbor_round("exchange", payload, route, |deposits| {
            let values_of = |j: usize| match &*deposits[j] {
                Payload::Exchange { values, .. } => values.as_slice(),
                _ => unreachable!("rounds hold one kind of payload"),
            };
            if let Some(&j) = receive_from.iter().find(|&&j| values_of(j).len() != send.len()) {
                return Err(CommError::LengthMismatch {
                    rank,
                    len: send.len(),
                    other_rank: j,
                    other_len: values_of(j).len(),
                });
            }
            for (k, &j) in receive_from.iter().enumerate() {
                recv(k, values_of(j));
            }
            Ok(())
        })
    }

    fn exchange_bytes(&mut self, send: &[u8], route: Route<'_>, recv: Receive<'_, u8>) -> Result<(), CommError> {
        let payload = Payload::ExchangeBytes {
            bytes: send.to_vec(),
            send_to: route.send_to.to_vec(),
            receive_from: route.receive_from.to_vec(),
        };
        self.neighbor_round("exchange_bytes", payload, route, |deposits| {
            for (k, &j) in route.receive_from.iter().enumerate() {
                match &*deposits[j] {
                    Payload::ExchangeBytes { bytes, .. } => recv(k, bytes),
                    _ => unreachable!("rounds hold one kind of payload"),
                }
            }
            Ok(())
        })
    }

    fn split(&mut self, color: usize) -> Result<Box<dyn Communicator>, CommError> {
        let round = self.begin("split", Payload::Color(color))?;
        let (shared, timeout) = (&self.shared, self.shared.timeout);
        let mut group = None;
        let deposits = shared.collect(round, |entry| {
            let colors: Vec<usize> = entry
                .deposits
                .iter()
                .map(|d| match d.as_deref() {
                    Some(Payload::Color(c)) => *c,
                    _ => unreachable!("rounds hold one kind of payload"),
                })
                .collect();
            let members = colors.iter().filter(|&&c| c == color).count();
            let sub = entry.groups.entry(color).or_insert_with(|| Shared::new(members, timeout));
            let sub_rank = colors[..self.rank].iter().filter(|&&c| c == color).count();
            group = Some(InProcessComm { rank: sub_rank, shared: Arc::clone(sub), next_round: 0 });
            Ok(())
        })?;
        shared.release(round, deposits);
        Ok(Box::new(group.expect("set when the round completed")))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.collective("barrier", Payload::Nothing, |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;
    use crate::comm::Metered;

    fn run<R: Send>(world: usize, work: impl Fn(InProcessComm) -> R + Sync) -> Vec<R> {
        let comms = InProcessGroup::new(world).with_timeout(Duration::from_secs(20)).into_communicators();
        thread::scope(|scope| {
            let handles: Vec<_> = comms.into_iter().map(|c| scope.spawn(|| work(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_are_bit_identical_and_in_rank_order() {
        let sums = run(3, |mut comm| {
            let mut values = vec![0.1f32 * (comm.rank() as f32 + 1.0), 1e8, -1e8];
            comm.all_reduce_sum(&mut values).unwrap();
            values
        });
        let expected = [(0.1f32 + 0.2) + 0.3f32, 3e8, -3e8];
        for sum in sums {
            assert_eq!(sum, expected);
        }
    }

    #[test]
    fn non_blocking_sums_overlap_with_blocking_collectives() {
        let results = run(4, |mut comm| {
            let rank = comm.rank() as f32;
            let first = comm.start_all_reduce_sum(vec![rank; 5]).unwrap();
            let second = comm.start_all_reduce_sum(vec![2.0 * rank; 2]).unwrap();
            let mut scalars = [rank as f64];
            comm.all_reduce_f64(&mut scalars).unwrap();
            (second.wait().unwrap(), first.wait().unwrap(), scalars[0])
        });
        for (second, first, scalar) in results {
            assert_eq!(first, vec![6.0; 5]);
            assert_eq!(second, vec![12.0; 2]);
            assert_eq!(scalar, 6.0);
        }
    }

    #[test]
    fn broadcast_gather_exchange_and_split_move_the_right_data() {
        let results = run(4, |mut comm| {
            let rank = comm.rank();
            let mut values = vec![rank as f32; 3];
            comm.broadcast(&mut values, 2).unwrap();
            let gathered = comm.all_gather_bytes(&vec![rank as u8; rank]).unwrap();
            let peers = [(rank + 1) % 4, (rank + 3) % 4];
            let mut received = Vec::new();
            super::super::exchange_into(&mut comm, &[rank as f32 * 10.0], &peers, &mut received).unwrap();
            let mut sub = comm.split(rank % 2).unwrap();
            let mut local = [rank as f64];
            sub.all_reduce_f64(&mut local).unwrap();
            (values, gathered, received, sub.rank(), sub.world_size(), local[0])
        });
        for (rank, (values, gathered, received, sub_rank, sub_world, local)) in results.into_iter().enumerate() {
            assert_eq!(values, vec![2.0; 3]);
            assert_eq!(gathered, (0..4).map(|j| vec![j as u8; j]).collect::<Vec<_>>());
            assert_eq!(received, vec![vec![((rank + 1) % 4) as f32 * 10.0], vec![((rank + 3) % 4) as f32 * 10.0]]);
            assert_eq!((sub_rank, sub_world), (rank / 2, 2));
            assert_eq!(local, if rank % 2 == 0 { 2.0 } else { 4.0 });
        }
    }

    #[test]
    fn mismatches_are_errors_not_hangs() {
        let results = run(2, |mut comm| {
            let mut values = vec![0.0; 2 + comm.rank()];
            let length = comm.all_reduce_sum(&mut values);
            let operation = if comm.rank() == 0 { comm.barrier() } else { comm.all_reduce_f64(&mut [1.0]) };
            (length, operation)
        });
        assert!(matches!(results[0].0, Err(CommError::LengthMismatch { len: 2, other_len: 3, .. })));
        assert!(results.iter().any(|r| matches!(r.1, Err(CommError::OperationMismatch { .. }))));
    }

    #[test]
    fn directed_exchange_sends_to_some_and_receives_from_others() {
        let results = run(4, |mut comm| {
            let rank = comm.rank();
            let mut received = Vec::new();
            let route = Route { send_to: &[(rank + 3) % 4], receive_from: &[(rank + 1) % 4, (rank + 2) % 4] };
            comm.exchange_directed(&[rank as f32], route, &mut |k, v| received.push((k, v[0]))).map(|()| received)
        });
        assert!(results.iter().all(Result::is_err), "rank 2 does not send to 0: everyone is told");
        let results = run(4, |mut comm| {
            let rank = comm.rank();
            let mut received = Vec::new();
            let route = Route { send_to: &[(rank + 3) % 4], receive_from: &[(rank + 1) % 4] };
            comm.exchange_directed(&[rank as f32], route, &mut |k, v| received.push((k, v[0]))).map(|()| received)
        });
        for (rank, received) in results.into_iter().enumerate() {
            assert_eq!(received.unwrap(), vec![(0, ((rank + 1) % 4) as f32)]);
        }
    }

    #[test]
    fn byte_payloads_of_any_length_reach_their_neighbours() {
        let results = run(4, |comm| {
            let rank = comm.rank();
            let peers = [(rank + 1) % 4, (rank + 3) % 4];
            // Worker 2 sends nothing (an empty message); the others send rank + 1 bytes.
            let payload = if rank == 2 { Vec::new() } else { vec![rank as u8; rank + 1] };
            let mut received = vec![Vec::new(); 2];
            let mut metered = Metered::new(comm);
            metered
                .exchange_bytes(&payload, Route::both_ways(&peers), &mut |k, bytes| received[k] = bytes.to_vec())
                .unwrap();
            let one_sided: &[usize] = if rank == 0 { &[1] } else { &[] };
            let error = metered
                .exchange_bytes(&[1], Route { send_to: one_sided, receive_from: &[] }, &mut |_, _| {})
                .unwrap_err();
            (received, metered.traffic().total(), error)
        });
        for (rank, (received, traffic, error)) in results.into_iter().enumerate() {
            let expected = |j: usize| if j == 2 { Vec::new() } else { vec![j as u8; j + 1] };
            assert_eq!(received, vec![expected((rank + 1) % 4), expected((rank + 3) % 4)]);
            let sent = if rank == 2 { 0 } else { 2 * (rank as u64 + 1) };
            assert_eq!(traffic.bytes_sent, sent, "rank {rank}: bytes of the messages really sent");
            assert!(matches!(error, CommError::BadNeighbor { rank: 0, neighbor: 1, .. }), "{error:?}");
        }
    }

    #[test]
    fn a_neighbour_listed_twice_is_rejected_everywhere() {
        let results = run(3, |mut comm| {
            let rank = comm.rank();
            let peers: Vec<usize> = if rank == 0 { vec![1, 2, 1] } else { vec![0] };
            let others: Vec<usize> = (0..3).filter(|&j| j != rank).collect();
            let receive = if rank == 0 { others.clone() } else { vec![0] };
            comm.exchange_bytes(&[1], Route { send_to: &peers, receive_from: &receive }, &mut |_, _| {})
        });
        for result in &results {
            assert!(matches!(result, Err(CommError::BadNeighbor { rank: 0, neighbor: 1, .. })), "{result:?}");
        }
    }

    #[test]
    fn one_sided_neighbours_are_rejected() {
        let results = run(3, |mut comm| {
            let peers: &[usize] = if comm.rank() == 0 { &[1] } else { &[] };
            comm.exchange(&[1.0], peers, &mut |_, _| {})
        });
        for result in &results {
            assert!(matches!(result, Err(CommError::BadNeighbor { rank: 0, neighbor: 1, .. })), "{result:?}");
        }
        assert!(matches!(
            InProcessGroup::new(2).into_communicators().remove(0).exchange(&[1.0], &[0], &mut |_, _| {}),
            Err(CommError::BadNeighbor { neighbor: 0, .. })
        ));
    }

    #[test]
    fn a_lost_worker_fails_pending_sums_at_once() {
        let mut comms = InProcessGroup::new(3).into_communicators();
        let lost = comms.pop().unwrap();
        let mut first = comms.remove(0);
        let pending = first.start_all_reduce_sum(vec![1.0; 4]).unwrap();
        drop(lost);
        let started = Instant::now();
        assert_eq!(pending.wait().unwrap_err(), CommError::PeerLost { rank: 2 });
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
