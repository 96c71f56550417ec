//! Byte accounting: a [`Communicator`] decorator that counts what each collective moves.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::network::{NetworkModel, SMALL_COLLECTIVE_VALUES, SimClock};
use super::{CommError, Communicator, PendingOp, PendingSum, Receive, Route};

/// Bytes this worker has sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Bytes sent by this worker.
    pub bytes_sent: u64,
    /// Bytes received by this worker.
    pub bytes_received: u64,
}

impl Traffic {
    /// Counts `bytes` sent and as many received (the collectives metered here are symmetric).
    pub fn record(&mut self, bytes: u64) {
        self.bytes_sent += bytes;
        self.bytes_received += bytes;
    }

    /// Ring all-reduce traffic for a payload of `bytes` on `world` workers, each way:
    /// `2 (m − 1) / m` times the payload (reduce-scatter, then all-gather).
    pub fn ring_all_reduce(bytes: u64, world: usize) -> u64 {
        if world <= 1 { 0 } else { 2 * (world as u64 - 1) * bytes / world as u64 }
    }

    /// Broadcast traffic for a payload of `bytes` on `world` workers, each way: `(m − 1) / m`
    /// times the payload (scatter from the root, then a ring all-gather).
    pub fn broadcast(bytes: u64, world: usize) -> u64 {
        if world <= 1 { 0 } else { (world as u64 - 1) * bytes / world as u64 }
    }

    /// The traffic since `earlier` (counters only grow).
    pub fn since(self, earlier: Traffic) -> Traffic {
        Traffic {
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
        }
    }

    /// Adds `other` to these counters.
    pub fn add(&mut self, other: Traffic) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
    }
}

/// The kinds of collective a [`Metered`] communicator counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CollectiveKind {
    /// Sum all-reduces of `f32` buffers (blocking and non-blocking).
    AllReduce,
    /// Sums of a few `f64` values.
    Scalars,
    /// Broadcasts.
    Broadcast,
    /// All-gathers of byte payloads.
    AllGather,
    /// Neighbour exchanges.
    Exchange,
}

impl CollectiveKind {
    /// Every kind, in a fixed order.
    pub const ALL: [CollectiveKind; 5] =
        [Self::AllReduce, Self::Scalars, Self::Broadcast, Self::AllGather, Self::Exchange];
}

/// Traffic and call counts per [`CollectiveKind`], and the part of it that moved inside
/// sub-groups made by [`Communicator::split`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficByKind {
    traffic: [Traffic; 5],
    calls: [u64; 5],
    subgroups: Traffic,
}

impl TrafficByKind {
    fn index(kind: CollectiveKind) -> usize {
        CollectiveKind::ALL.iter().position(|&k| k == kind).expect("every kind is listed")
    }

    /// Traffic of one kind.
    pub fn of(&self, kind: CollectiveKind) -> Traffic {
        self.traffic[Self::index(kind)]
    }

    /// Number of calls of one kind.
    pub fn calls(&self, kind: CollectiveKind) -> u64 {
        self.calls[Self::index(kind)]
    }

    /// All kinds together.
    pub fn total(&self) -> Traffic {
        let mut total = Traffic::default();
        self.traffic.iter().for_each(|t| total.add(*t));
        total
    }

    /// The traffic of collectives run in sub-groups (the lower level of a hierarchy), all kinds
    /// together; it is also counted in [`TrafficByKind::of`] and [`TrafficByKind::total`].
    pub fn in_subgroups(&self) -> Traffic {
        self.subgroups
    }

    fn record(&mut self, kind: CollectiveKind, sent: u64, received: u64, in_subgroup: bool) {
        if in_subgroup {
            self.subgroups.bytes_sent += sent;
            self.subgroups.bytes_received += received;
        }
        let k = Self::index(kind);
        self.traffic[k].bytes_sent += sent;
        self.traffic[k].bytes_received += received;
        self.calls[k] += 1;
    }
}

/// Seconds spent on communication, as a worker sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CommTime {
    /// Seconds this worker was blocked in collectives: the whole of every blocking one, and
    /// the wait at the end of every started one.
    pub wait_seconds: f64,
    /// Seconds started collectives travelled while this worker went on computing (from the
    /// start to the moment it asked for the result).
    pub inflight_seconds: f64,
}

impl CommTime {
    /// The time since `earlier` (counters only grow).
    pub fn since(self, earlier: CommTime) -> CommTime {
        CommTime {
            wait_seconds: self.wait_seconds - earlier.wait_seconds,
            inflight_seconds: self.inflight_seconds - earlier.inflight_seconds,
        }
    }
}

/// The ledger a [`Metered`] communicator and its sub-groups and pending operations share.
#[derive(Debug, Default)]
struct Ledger {
    traffic: TrafficByKind,
    time: CommTime,
    /// The simulated network and this worker's clock, when simulating.
    simulation: Option<(NetworkModel, SimClock)>,
}

/// Counts the bytes of every collective that goes through it, from the payloads themselves:
///
/// | collective | sent = received, per worker |
/// |---|---|
/// | all-reduce of `n` `f32` | ring all-reduce: `2 (m − 1) / m · 4n` |
/// | sum of `n` `f64` | ring all-reduce: `2 (m − 1) / m · 8n` |
/// | broadcast of `n` `f32` | scatter + all-gather: `(m − 1) / m · 4n` |
/// | all-gather of byte payloads `p_j` | every other worker's payload once: `Σ_{j ≠ i} │p_j│` received, as many sent (ring) |
/// | exchange of `n` `f32` with `d` peers | `4n · d` (directed: `4n` per rank sent to, and per rank received from) |
/// | barrier, split | 0 |
///
/// The counts do not depend on the algorithm the underlying library picks, so they are equal
/// across communicators and match what a real network carries for the usual algorithms.
/// Groups made by [`Communicator::split`] count into the same ledger, and also apart
/// ([`TrafficByKind::in_subgroups`]), so a hierarchy's two levels can be told apart. It also
/// times the collectives ([`CommTime`]): blocking ones are waits; a started one is in flight
/// until its result is asked for, and a wait from then on. With a network
/// ([`Metered::simulate`]) it also keeps the worker's simulated clock (see
/// [`NetworkModel`](super::NetworkModel)).
#[derive(Debug)]
pub struct Metered<C> {
    inner: C,
    ledger: Arc<Mutex<Ledger>>,
    subgroup: bool,
    /// The latencies of the neighbour exchange being simulated.
    exchange_degree: usize,
}

impl<C: Communicator> Metered<C> {
    /// Counts the traffic of `inner`.
    pub fn new(inner: C) -> Self {
        Self { inner, ledger: Arc::default(), subgroup: false, exchange_degree: 0 }
    }

    /// Counters so far.
    pub fn traffic(&self) -> TrafficByKind {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner).traffic
    }

    /// Seconds spent on communication so far.
    pub fn time(&self) -> CommTime {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner).time
    }

    /// Simulates `network` from now on, with this worker's clock at `clock` (every worker must
    /// simulate, or none: the arrivals are exchanged at each collective).
    pub fn simulate(&mut self, network: NetworkModel, clock: SimClock) {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner).simulation = Some((network, clock));
    }

    /// This worker's simulated clock, when simulating.
    pub fn clock(&self) -> Option<SimClock> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner).simulation.map(|(_, clock)| clock)
    }

    /// Sets the simulated clock (a resumed run's), when simulating.
    pub fn restore_clock(&self, restored: SimClock) {
        if let Some((_, clock)) = &mut self.ledger.lock().unwrap_or_else(PoisonError::into_inner).simulation {
            *clock = restored;
        }
    }

    /// Moves the simulated clock by a local step of `seconds` (nothing when not simulating).
    pub fn local_step(&self, seconds: f64) {
        if let Some((_, clock)) = &mut self.ledger.lock().unwrap_or_else(PoisonError::into_inner).simulation {
            clock.step(seconds);
        }
    }

    /// When simulating: exchanges the arrival times of the participants (`peers`, or everyone)
    /// and returns when the collective ends on the simulated clock.
    fn simulated_end(
        &mut self,
        kind: CollectiveKind,
        bytes: u64,
        peers: Option<&[usize]>,
        small: bool,
    ) -> Result<Option<f64>, CommError> {
        let Some((network, clock)) = self.ledger.lock().unwrap_or_else(PoisonError::into_inner).simulation else {
            return Ok(None);
        };
        let (rank, world) = (self.inner.rank(), self.inner.world_size());
        let mut clocks = vec![0.0; world];
        clocks[rank] = clock.now;
        self.inner.all_reduce_f64(&mut clocks)?;
        let start = match peers {
            Some(peers) => peers.iter().map(|&j| clocks[j]).fold(clock.now, f64::max),
            None => clocks.iter().copied().fold(clock.now, f64::max),
        };
        let degree = self.exchange_degree;
        Ok(Some(start + network.seconds(kind, bytes, world, degree, small)))
    }

    /// Records a neighbour exchange of `sent` and `received` bytes and advances the simulated
    /// clock: messages go out and come in at once on a full-duplex link, so it pays as many
    /// latencies as the larger of the two lists.
    fn exchanged(&mut self, sent: u64, received: u64, route: Route<'_>) -> Result<(), CommError> {
        self.record(CollectiveKind::Exchange, sent, received);
        let mut peers: Vec<usize> = route.send_to.iter().chain(route.receive_from).copied().collect();
        peers.sort_unstable();
        peers.dedup();
        self.exchange_degree = route.send_to.len().max(route.receive_from.len());
        self.simulate_blocking(CollectiveKind::Exchange, sent, Some(&peers), false)
    }

    /// Runs a neighbour exchange through `call`, handing it `receive` behind a count of the bytes
    /// received, then records it: `send`'s bytes once per rank in `send_to`, and the bytes
    /// received ([`Metered::exchanged`]).
    fn metered_exchange<T>(
        &mut self,
        send: &[T],
        route: Route<'_>,
        recv: Receive<'_, T>,
        call: impl FnOnce(&mut C, Receive<'_, T>) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let mut got = 0;
        self.timed(|inner| {
            call(inner, &mut |k, values| {
                got += size_of_val(values) as u64;
                recv(k, values)
            })
        })?;
        self.exchanged(size_of_val(send) as u64 * route.send_to.len() as u64, got, route)
    }

    /// A blocking collective: the simulated clock waits for its end.
    fn simulate_blocking(
        &mut self,
        kind: CollectiveKind,
        bytes: u64,
        peers: Option<&[usize]>,
        small: bool,
    ) -> Result<(), CommError> {
        if let Some(end) = self.simulated_end(kind, bytes, peers, small)?
            && let Some((_, clock)) = &mut self.ledger.lock().unwrap_or_else(PoisonError::into_inner).simulation
        {
            clock.wait_until(end);
        }
        Ok(())
    }

    /// Counts, and moves the simulated clock for, a sum all-reduce of `values` `f64` that then
    /// travels inside a larger collective run with [`Metered::all_reduce_f64_uncharged`] (the
    /// synchronizer's statistics, which carry the learner's bookkeeping columns beside them).
    pub fn charge_scalars(&mut self, values: usize) -> Result<(), CommError> {
        let bytes = Traffic::ring_all_reduce(8 * values as u64, self.inner.world_size());
        self.record(CollectiveKind::Scalars, bytes, bytes);
        self.simulate_blocking(CollectiveKind::Scalars, bytes, None, values <= SMALL_COLLECTIVE_VALUES)
    }

    /// A sum all-reduce of `f64` whose bytes were counted with [`Metered::charge_scalars`] (or
    /// are not the merge's): only its seconds are added to the waits.
    pub fn all_reduce_f64_uncharged(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        self.timed(|inner| inner.all_reduce_f64(values))
    }

    /// The communicator underneath (its calls are not counted).
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// Gives the communicator underneath back.
    pub fn into_inner(self) -> C {
        self.inner
    }

    fn record(&self, kind: CollectiveKind, sent: u64, received: u64) {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner).traffic.record(kind, sent, received, self.subgroup);
    }

    /// Runs a blocking collective, adding its duration to the waits.
    fn timed<T>(&mut self, call: impl FnOnce(&mut C) -> T) -> T {
        let started = Instant::now();
        let result = call(&mut self.inner);
        let seconds = started.elapsed().as_secs_f64();
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner).time.wait_seconds += seconds;
        result
    }
}

/// A started sum that reports its time in flight and its wait to the ledger.
struct TimedSum {
    inner: PendingSum,
    started: Instant,
    ledger: Arc<Mutex<Ledger>>,
    /// When the sum ends on the simulated clock.
    simulated_end: Option<f64>,
}

impl PendingOp for TimedSum {
    fn is_ready(&mut self) -> Result<bool, CommError> {
        self.inner.is_ready()
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>, CommError> {
        let asked = Instant::now();
        let result = self.inner.wait();
        let waited = asked.elapsed().as_secs_f64();
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.time.inflight_seconds += asked.duration_since(self.started).as_secs_f64();
        ledger.time.wait_seconds += waited;
        if let (Some(end), Some((_, clock))) = (self.simulated_end, &mut ledger.simulation) {
            clock.wait_until(end);
        }
        result
    }
}

impl<C: Communicator> Communicator for Metered<C> {
    crate::forward_communicator!(self.inner => rank, world_size);

    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        self.timed(|inner| inner.all_reduce_sum(values))?;
        let bytes = Traffic::ring_all_reduce(4 * values.len() as u64, self.world_size());
        self.record(CollectiveKind::AllReduce, bytes, bytes);
        self.simulate_blocking(CollectiveKind::AllReduce, bytes, None, false)
    }

    fn all_reduce_sum_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.timed(|inner| inner.all_reduce_sum_into(send, recv))?;
        let bytes = Traffic::ring_all_reduce(4 * send.len() as u64, self.world_size());
        self.record(CollectiveKind::AllReduce, bytes, bytes);
        self.simulate_blocking(CollectiveKind::AllReduce, bytes, None, false)
    }

    fn start_all_reduce_sum(&mut self, values: Vec<f32>) -> Result<PendingSum, CommError> {
        let bytes = Traffic::ring_all_reduce(4 * values.len() as u64, self.world_size());
        let len = values.len();
        let started = Instant::now();
        let pending = self.inner.start_all_reduce_sum(values)?;
        self.record(CollectiveKind::AllReduce, bytes, bytes);
        let simulated_end = self.simulated_end(CollectiveKind::AllReduce, bytes, None, false)?;
        let timed = TimedSum { inner: pending, started, ledger: Arc::clone(&self.ledger), simulated_end };
        Ok(PendingSum::new(Box::new(timed), len))
    }

    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        self.timed(|inner| inner.all_reduce_f64(values))?;
        let bytes = Traffic::ring_all_reduce(8 * values.len() as u64, self.world_size());
        self.record(CollectiveKind::Scalars, bytes, bytes);
        self.simulate_blocking(CollectiveKind::Scalars, bytes, None, values.len() <= SMALL_COLLECTIVE_VALUES)
    }

    fn broadcast(&mut self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        self.timed(|inner| inner.broadcast(values, root))?;
        let bytes = Traffic::broadcast(4 * values.len() as u64, self.world_size());
        self.record(CollectiveKind::Broadcast, bytes, bytes);
        self.simulate_blocking(CollectiveKind::Broadcast, bytes, None, false)
    }

    fn all_gather_bytes(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let all = self.timed(|inner| inner.all_gather_bytes(payload))?;
        let others: u64 = all.iter().enumerate().filter(|(j, _)| *j != self.rank()).map(|(_, p)| p.len() as u64).sum();
        self.record(CollectiveKind::AllGather, others, others);
        self.simulate_blocking(CollectiveKind::AllGather, others, None, false)?;
        Ok(all)
    }

    fn exchange(&mut self, send: &[f32], peers: &[usize], recv: Receive<'_, f32>) -> Result<(), CommError> {
        self.metered_exchange(send, Route::both_ways(peers), recv, |inner, recv| inner.exchange(send, peers, recv))
    }

    fn exchange_directed(&mut self, send: &[f32], route: Route<'_>, recv: Receive<'_, f32>) -> Result<(), CommError> {
        self.metered_exchange(send, route, recv, |inner, recv| inner.exchange_directed(send, route, recv))
    }

    fn exchange_bytes(&mut self, send: &[u8], route: Route<'_>, recv: Receive<'_, u8>) -> Result<(), CommError> {
        self.metered_exchange(send, route, recv, |inner, recv| inner.exchange_bytes(send, route, recv))
    }

    fn split(&mut self, color: usize) -> Result<Box<dyn Communicator>, CommError> {
        let inner = self.inner.split(color)?;
        Ok(Box::new(Metered { inner, ledger: Arc::clone(&self.ledger), subgroup: true, exchange_degree: 0 }))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.timed(|inner| inner.barrier())
    }
}
