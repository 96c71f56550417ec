//! A simulated network clock: what a run would take on a given network, measured on any machine.
//!
//! On one machine the workers exchange models through memory, so every rule looks equally fast.
//! With a [`NetworkModel`] the [`Metered`](super::Metered) communicator keeps a simulated clock
//! per worker ([`SimClock`]), advanced by the local steps (their measured or a fixed time, plus
//! an optional straggler delay; see [`StepTime`]) and by the collectives, timed with the α–β
//! model (each worker has one link of bandwidth `B` bytes/s and a latency `L` per message; `S`
//! the bytes this worker sends in the collective, as metered, so compression counts):
//!
//! | collective | seconds |
//! |---|---|
//! | all-reduce of a buffer (ring) | `2(m−1)·L + S/B` |
//! | broadcast (scatter + ring all-gather) | `2(m−1)·L + S/B` |
//! | all-gather of payloads (ring) | `(m−1)·L + S/B` |
//! | neighbour exchange with `d` peers | `d·L + S/B` |
//! | a sum of at most 64 `f64` scalars (statistics, flags) | its latency terms only |
//!
//! A collective starts when its last participant arrives (the largest clock among them:
//! stragglers make everyone wait; a neighbour exchange waits for the neighbours only) and every
//! participant's clock moves to its end; the time between a worker's arrival and the end counts
//! as its communication time. A started (non-blocking) collective runs in the background: the
//! worker's clock moves on with its local steps, and when it asks for the result it waits only
//! for what is left. Learning the arrivals costs one small all-reduce of the clocks per
//! collective, outside the simulated time and the byte counts.
//!
//! Asynchronous local SGD (`--rule async`) runs its merges on a communication thread beside the
//! local steps: the learner keeps that thread's clock here and the steps' compute clock apart,
//! and a worker waits for communication only when an epoch ends before its last merge has landed.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Sums of at most this many `f64` scalars (statistics, flags) cost their latency terms only.
pub const SMALL_COLLECTIVE_VALUES: usize = 64;

/// The α–β network model: per-worker link bandwidth and per-message latency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NetworkModel {
    /// Bytes per second of each worker's link.
    pub bandwidth: f64,
    /// Seconds per message.
    pub latency: f64,
}

impl NetworkModel {
    /// The model, checked: a finite positive bandwidth and a finite non-negative latency.
    pub fn new(bandwidth: f64, latency: f64) -> Result<Self, String> {
        if !(bandwidth.is_finite() && bandwidth > 0.0) {
            return Err(format!("the bandwidth must be a positive number of bytes per second, got {bandwidth}"));
        }
        if !(latency.is_finite() && latency >= 0.0) {
            return Err(format!("the latency must be a non-negative number of seconds, got {latency}"));
        }
        Ok(Self { bandwidth, latency })
    }

    /// Seconds of a collective of `kind` in which this worker sends `bytes` among `workers`
    /// (`peers` for a neighbour exchange); `small` for collectives of at most
    /// [`SMALL_COLLECTIVE_VALUES`] scalars.
    pub fn seconds(&self, kind: super::CollectiveKind, bytes: u64, workers: usize, peers: usize, small: bool) -> f64 {
        use super::CollectiveKind::*;
        if workers <= 1 && kind != Exchange {
            return 0.0;
        }
        let hops = match kind {
            AllReduce | Scalars | Broadcast => 2 * workers.saturating_sub(1),
            AllGather => workers.saturating_sub(1),
            Exchange => peers,
        } as f64;
        let transfer = if small { 0.0 } else { bytes as f64 / self.bandwidth };
        hops * self.latency + transfer
    }
}

impl FromStr for NetworkModel {
    type Err = String;

    /// `bandwidth=1Gbit,latency=50us`: bandwidth in `bit`, `Kbit`, `Mbit`, `Gbit` (per second,
    /// decimal: 1Gbit = 1.25e8 bytes/s) or `B`, `KB`, `MB`, `GB` (bytes per second); latency in
    /// `s`, `ms`, `us` or `ns` (default 0). Units are required (a bare `100` is refused: bytes or
    /// bits, seconds or microseconds?), except for a latency of `0`; a setting given twice is
    /// refused.
    fn from_str(text: &str) -> Result<Self, String> {
        let (mut bandwidth, mut latency) = (None, None);
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("'{part}' is not key=value"))?;
            match key.trim() {
                "bandwidth" if bandwidth.is_some() => return Err("bandwidth is given twice".into()),
                "latency" if latency.is_some() => return Err("latency is given twice".into()),
                "bandwidth" => bandwidth = Some(parse_rate(value.trim())?),
                "latency" => latency = Some(parse_seconds(value.trim())?),
                other => return Err(format!("unknown network setting '{other}' (bandwidth, latency)")),
            }
        }
        let bandwidth = bandwidth.ok_or("the network needs a bandwidth, e.g. bandwidth=1Gbit")?;
        Self::new(bandwidth, latency.unwrap_or(0.0))
    }
}

/// Splits `12.5Gbit` into `(12.5, "Gbit")`.
fn number_and_unit(text: &str) -> Result<(f64, &str), String> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'))
        .unwrap_or(text.len());
    let number = text[..end].parse::<f64>().map_err(|_| format!("'{text}' does not start with a number"))?;
    Ok((number, &text[end..]))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let (number, unit) = number_and_unit(text)?;
    let bytes_per_second = match unit {
        "bit" => 1.0 / 8.0,
        "Kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        "B" => 1.0,
        "" => {
            return Err(format!(
                "'{text}' has no unit: write bytes (B, KB, MB, GB) or bits (bit, Kbit, Mbit, Gbit) per second"
            ));
        }
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return Err(format!("unknown bandwidth unit '{unit}' (bit, Kbit, Mbit, Gbit, B, KB, MB, GB)")),
    };
    Ok(number * bytes_per_second)
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    let (number, unit) = number_and_unit(text)?;
    let scale = match unit {
        "s" => 1.0,
        "" if number == 0.0 => 1.0,
        "" => return Err(format!("'{text}' has no unit: write s, ms, us or ns")),
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        _ => return Err(format!("unknown time unit '{unit}' (s, ms, us, ns)")),
    };
    Ok(number * scale)
}

/// How long a local step takes on the simulated clock.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StepTime {
    /// A fixed number of seconds per step; `None`: the seconds the step really took.
    pub fixed: Option<f64>,
    /// The mean of an exponential straggler delay added to every step, drawn per worker and
    /// step from the shared seed (the runtime model of AdaComm); `None`: no straggling.
    pub straggler_mean: Option<f64>,
}

impl StepTime {
    /// Seconds of local step `step` (1-based) of worker `rank`, given the seconds it really
    /// took.
    pub fn seconds(&self, measured: f64, seed: u64, rank: usize, step: u64) -> f64 {
        let base = self.fixed.unwrap_or(measured);
        let delay = self.straggler_mean.map_or(0.0, |mean| {
            let u = crate::random::uniform(seed ^ 0x5354_5241_4747_4C45, rank as u64, step);
            -mean * (1.0 - u).ln()
        });
        base + delay
    }
}

/// One worker's simulated clock.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SimClock {
    /// Simulated seconds since the run started.
    pub now: f64,
    /// Of those, the seconds spent waiting for communication.
    pub comm_seconds: f64,
}

impl SimClock {
    /// Moves the clock by a local step of `seconds`.
    pub fn step(&mut self, seconds: f64) {
        self.now += seconds;
    }

    /// Waits until `until` (nothing if it has passed), counting the wait as communication.
    pub fn wait_until(&mut self, until: f64) {
        if until > self.now {
            self.comm_seconds += until - self.now;
            self.now = until;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::CollectiveKind;
    use super::*;

    #[test]
    fn settings_parse_with_units() {
        let net: NetworkModel = "bandwidth=1Gbit,latency=50us".parse().unwrap();
        assert_eq!(net.bandwidth, 1.25e8);
        assert!((net.latency - 50e-6).abs() < 1e-18);
        let net: NetworkModel = "bandwidth=100MB".parse().unwrap();
        assert_eq!((net.bandwidth, net.latency), (1e8, 0.0));
        let net: NetworkModel = "bandwidth=1Gbit,latency=0".parse().unwrap();
        assert_eq!(net.latency, 0.0, "zero needs no unit");
        for bad in ["latency=1ms", "bandwidth=0Gbit", "bandwidth=1Gbps", "bandwidth=1Gbit,jitter=2", "bandwidth"] {
            assert!(bad.parse::<NetworkModel>().is_err(), "{bad}");
        }
        // A number without a unit is ambiguous (bytes or bits, seconds or microseconds).
        let error = "bandwidth=100".parse::<NetworkModel>().unwrap_err();
        assert!(error.contains("'100' has no unit"), "{error}");
        let error = "bandwidth=1Gbit,latency=50".parse::<NetworkModel>().unwrap_err();
        assert!(error.contains("'50' has no unit"), "{error}");
        for bad in ["bandwidth=NaNGbit", "bandwidth=1e999Gbit", "bandwidth=1Gbit,latency=-1ms"] {
            assert!(bad.parse::<NetworkModel>().is_err(), "{bad}");
        }
        let error = "bandwidth=1Gbit,bandwidth=2Gbit".parse::<NetworkModel>().unwrap_err();
        assert!(error.contains("twice"), "{error}");
    }

    #[test]
    fn collectives_cost_the_alpha_beta_model() {
        let net = NetworkModel::new(1e6, 1e-3).unwrap();
        assert!((net.seconds(CollectiveKind::AllReduce, 3000, 4, 0, false) - (6e-3 + 3e-3)).abs() < 1e-15);
        assert!((net.seconds(CollectiveKind::Exchange, 2000, 4, 2, false) - (2e-3 + 2e-3)).abs() < 1e-15);
        assert!((net.seconds(CollectiveKind::AllGather, 1000, 4, 0, false) - (3e-3 + 1e-3)).abs() < 1e-15);
        assert!((net.seconds(CollectiveKind::Scalars, 48, 4, 0, true) - 6e-3).abs() < 1e-15, "latency only");
        assert_eq!(net.seconds(CollectiveKind::AllReduce, 3000, 1, 0, false), 0.0);
    }

    #[test]
    fn stragglers_are_exponential_and_shared() {
        let time = StepTime { fixed: Some(0.1), straggler_mean: Some(0.05) };
        let draws: Vec<f64> = (0..20_000).map(|s| time.seconds(9.0, 3, 1, s) - 0.1).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.05).abs() < 0.002, "mean delay {mean}");
        assert!(draws.iter().all(|&d| d >= 0.0));
        assert_eq!(time.seconds(0.0, 3, 1, 7), time.seconds(5.0, 3, 1, 7), "fixed time ignores the measurement");
        assert_ne!(time.seconds(0.0, 3, 1, 7), time.seconds(0.0, 3, 2, 7), "workers straggle apart");
        assert_eq!(StepTime::default().seconds(0.25, 3, 1, 7), 0.25);
    }

    #[test]
    fn a_clock_waits_only_for_what_is_left() {
        let mut clock = SimClock::default();
        clock.step(0.4);
        clock.wait_until(0.3);
        assert_eq!((clock.now, clock.comm_seconds), (0.4, 0.0));
        clock.wait_until(0.5);
        assert!((clock.now - 0.5).abs() < 1e-15 && (clock.comm_seconds - 0.1).abs() < 1e-15);
    }
}
