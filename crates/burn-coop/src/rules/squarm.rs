//! Compressed gossip to public copies of the models: CHOCO-SGD (`choco`) and its
//! event-triggered form SQuARM-SGD (`squarm`).
//!
//! Every worker keeps public copies `x̂_j` of its own model and of its neighbours' (all start at
//! the initial model, the same everywhere). At a merge `t`, with `η_t` the learning rate of the
//! last step and `x_i` the model after the local steps (SQuARM's local steps use Nesterov
//! momentum: the local optimizer's `--momentum` with `--nesterov`):
//!
//! ```text
//! fire_i = ‖x_i − x̂_i‖² > c_t · η_t²                          (the event trigger)
//! q_i    = C(x_i − x̂_i)  sent to every neighbour, if fire_i    (else an empty message)
//! x̂_j   ← x̂_j + q_j     for j = i and every neighbour that sent
//! x_i    ← x_i + γ Σ_j w_ij (x̂_j − x̂_i)                      (consensus step over the neighbours)
//! ```
//!
//! (Singh, Data, George & Diggavi, "SQuARM-SGD: Communication-Efficient Momentum SGD for
//! Decentralized Optimization", arXiv 2005.07041, 2020; the threshold sequence grows as
//! `c_t = c_0 (t+1)^p`, `p < 1`, as in their SPARQ-SGD, arXiv 1910.14280.) With `c_t = 0` every
//! worker whose model moved sends, and this is CHOCO-SGD (Koloskova, Stich & Jaggi, ICML 2019;
//! Koloskova, Lin, Stich & Jaggi, ICLR 2020), offered as `--rule choco`. The public copies carry
//! the error feedback: what a compressed message left out stays in `x_i − x̂_i` and is sent
//! later. With the identity compressor and `γ = 1` the merge is gossip, `x_i ← Σ_j w_ij x_j`
//! (checked to rounding).
//!
//! Compression acts on each tensor of the model on its own and sends buffers (BatchNorm running
//! statistics) exact, as the [`Synchronizer`](crate::Synchronizer) tells the rule with
//! [`MergeRule::set_segments`]; the trigger's `‖x_i − x̂_i‖²` sums the trained parameters only
//! (buffers ride along whenever a worker sends).
//!
//! The trigger is decided locally, but every worker sends every neighbour a message at every
//! merge, empty when it did not fire, through [`Communicator::exchange_bytes`]: a neighbour
//! learns from the empty message that nothing changed, and nobody waits for a message that
//! will not come. Bytes count the payloads actually sent (an empty message is zero bytes; its
//! latency is still paid on a simulated network), and each merge's outcome says whether this
//! worker sent, counted over the workers in the metrics (`senders` in `syncs.csv`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext, Triggered};
use crate::comm::{Communicator, Route};
use crate::compress::{CompressContext, Compressor, Segments};
use crate::mixing::MixingMatrix;
use crate::registry::{RuleConfig, SpecError, serde_name_of};
use crate::state::StateRecord;
use crate::topology::{TopologyError, TopologySpec, WeightRule};

/// The compressor of choco and squarm when none is given: scaled sign.
pub const DEFAULT_COMPRESSOR: Compressor = Compressor::Sign;

/// The consensus step for `compressor` when none is given, ours per family of compressors: 1 for
/// the lossless and nearly lossless (16- and 8-bit) ones, 0.8 for sign and QSGD, 0.04 for the
/// sparsifiers. (CHOCO-SGD's own ResNet-20 script on a ring of 8 uses 0.45 with sign.)
pub fn default_consensus_step(compressor: Compressor) -> f64 {
    match compressor {
        Compressor::Identity | Compressor::Bf16 | Compressor::Fp16 | Compressor::Int8 | Compressor::Fp8 => 1.0,
        Compressor::Sign | Compressor::Qsgd(_) => 0.8,
        Compressor::TopK(_) | Compressor::TopKSign(_) | Compressor::RandK(_) => 0.04,
    }
}

/// Declares a config struct with the settings choco and squarm share (the shared
/// `--compressor`, `--topology`, `--weights` and `--consensus-step` flags, keys of each config
/// that reach it through [`SharedRuleFlags`](super::SharedRuleFlags)), then the struct's own
/// fields; and the struct's [`GossipSettings`], read and written back.
macro_rules! compressed_gossip_config {
    ($(#[$meta:meta])* pub struct $Name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $Name {
            /// What a message holds (shared `--compressor`; default sign).
            #[arg(skip)]
            #[serde(skip_serializing_if = "Option::is_none")]
            pub compressor: Option<Compressor>,
            /// The graph (shared `--topology`; default ring).
            #[arg(skip)]
            #[serde(skip_serializing_if = "Option::is_none")]
            pub topology: Option<TopologySpec>,
            /// The gossip weights (shared `--weights`; default metropolis-hastings).
            #[arg(skip)]
            #[serde(skip_serializing_if = "Option::is_none")]
            pub weights: Option<WeightRule>,
            /// The consensus step γ in (0, 1] (shared `--consensus-step`; default by compressor).
            #[arg(skip)]
            #[serde(skip_serializing_if = "Option::is_none")]
            pub consensus_step: Option<f64>,
            $($own)*
        }

        impl $Name {
            /// The compressed gossip's settings.
            fn gossip(&self) -> GossipSettings {
                GossipSettings {
                    compressor: self.compressor,
                    topology: self.topology,
                    weights: self.weights,
                    consensus_step: self.consensus_step,
                }
            }

            /// The same config with the compressed gossip's settings `gossip`.
            fn with_gossip(&self, gossip: GossipSettings) -> Self {
                let mut config = self.clone();
                config.compressor = gossip.compressor;
                config.topology = gossip.topology;
                config.weights = gossip.weights;
                config.consensus_step = gossip.consensus_step;
                config
            }
        }
    };
}

/// The settings of compressed gossip, as choco and squarm take them.
#[derive(Debug, Clone, Copy)]
struct GossipSettings {
    compressor: Option<Compressor>,
    topology: Option<TopologySpec>,
    weights: Option<WeightRule>,
    consensus_step: Option<f64>,
}

impl GossipSettings {
    fn compressor(&self) -> Compressor {
        self.compressor.unwrap_or(DEFAULT_COMPRESSOR)
    }

    fn gamma(&self) -> f64 {
        self.consensus_step.unwrap_or_else(|| default_consensus_step(self.compressor()))
    }

    /// The rule for `world_size` workers, after checking every setting.
    fn build(&self, world_size: usize, trigger: Option<Trigger>) -> Result<Squarm, SpecError> {
        let gamma = self.gamma();
        if !(gamma > 0.0 && gamma <= 1.0) {
            return Err(SpecError::new("consensus-step", gamma.to_string(), "the consensus step must be in (0, 1]"));
        }
        let topology = self.topology.unwrap_or_default();
        let invalid = |error: TopologyError| SpecError::new("topology", serde_name_of(&topology), error);
        if topology.is_time_varying() {
            let reason = "compressed gossip keeps public copies of fixed neighbours; use a fixed graph";
            return Err(SpecError::new("topology", serde_name_of(&topology), reason));
        }
        let matrix = topology
            .build(world_size)
            .map_err(invalid)?
            .mixing_matrix(self.weights.unwrap_or_default())
            .map_err(invalid)?;
        Ok(Squarm::with_trigger(matrix, self.compressor(), gamma, trigger))
    }

    /// Every default written out.
    fn resolved(&self) -> Self {
        Self {
            compressor: Some(self.compressor()),
            topology: Some(self.topology.unwrap_or_default()),
            weights: Some(self.weights.unwrap_or_default()),
            consensus_step: Some(self.gamma()),
        }
    }

    /// `"{algorithm} on a {graph}, {compressor}, consensus step {γ}"`.
    fn describe(&self, algorithm: &str) -> String {
        format!(
            "{algorithm} on a {}, {}, consensus step {}",
            serde_name_of(&self.topology.unwrap_or_default()),
            self.compressor(),
            self.gamma()
        )
    }

    fn tag(&self, name: &str) -> String {
        format!("{name}-{}-{}", serde_name_of(&self.topology.unwrap_or_default()), self.compressor()).replace(':', "")
    }
}

compressed_gossip_config! {
    /// `--rule choco`: compressed gossip that always sends.
    pub struct ChocoConfig {}
}

impl RuleConfig for ChocoConfig {
    const NAME: &'static str = "choco";

    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        Ok(Box::new(self.gossip().build(world_size, None)?))
    }

    fn describe(&self) -> String {
        self.gossip().describe("CHOCO-SGD")
    }

    fn run_tag(&self) -> String {
        self.gossip().tag(Self::NAME)
    }

    fn resolved(&self) -> Self {
        self.with_gossip(self.gossip().resolved())
    }
}

/// The trigger threshold `c_0` when none is given: about the statistic `‖x − x̂‖²/η²` (trained
/// parameters only) of ResNet-20 on CIFAR-10 with sign compression, 4 workers on a ring, τ = 1
/// and every worker sending (threshold 0): between 106 and 216 over the first 120 steps
/// (learning rate 0.02 to 0.075). At this level a worker skips when its model moved less than
/// usual and sends at the next merge. The statistic grows with the model's size and with τ;
/// read it from `trigger_statistic` in `syncs.csv` (a run with `--trigger-threshold 0`) and set
/// `--trigger-threshold` for another model or period.
pub const DEFAULT_TRIGGER_THRESHOLD: f64 = 150.0;

compressed_gossip_config! {
    /// `--rule squarm`: choco's settings and the event trigger's.
    pub struct SquarmConfig {
        /// The trigger threshold c_0 ≥ 0: a worker sends when ‖x − x̂‖² > c_t·η² (default 150, see `trigger_statistic` in syncs.csv).
        #[arg(long, value_parser = crate::registry::finite_f64)]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub trigger_threshold: Option<f64>,
        /// The threshold's growth p in [0, 1): c_t = c_0·(t+1)^p at merge t (default 0, constant).
        #[arg(long, value_parser = crate::registry::finite_f64)]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub trigger_growth: Option<f64>,
    }
}

impl SquarmConfig {
    fn trigger(&self) -> Result<Trigger, SpecError> {
        let trigger = Trigger {
            threshold: self.trigger_threshold.unwrap_or(DEFAULT_TRIGGER_THRESHOLD),
            growth: self.trigger_growth.unwrap_or(0.0),
        };
        if !(trigger.threshold >= 0.0 && trigger.threshold.is_finite()) {
            let reason = "the trigger threshold must be a finite number ≥ 0";
            return Err(SpecError::new("trigger-threshold", trigger.threshold.to_string(), reason));
        }
        if !(0.0..1.0).contains(&trigger.growth) {
            let reason = "the threshold's growth exponent must be in [0, 1)";
            return Err(SpecError::new("trigger-growth", trigger.growth.to_string(), reason));
        }
        Ok(trigger)
    }
}

impl RuleConfig for SquarmConfig {
    const NAME: &'static str = "squarm";

    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        Ok(Box::new(self.gossip().build(world_size, Some(self.trigger()?))?))
    }

    fn describe(&self) -> String {
        let trigger = self.trigger().unwrap_or(Trigger::ALWAYS);
        format!("{}, trigger {}·(t+1)^{}·η²", self.gossip().describe("SQuARM-SGD"), trigger.threshold, trigger.growth)
    }

    fn run_tag(&self) -> String {
        self.gossip().tag(Self::NAME)
    }

    fn resolved(&self) -> Self {
        Self {
            trigger_threshold: Some(self.trigger_threshold.unwrap_or(DEFAULT_TRIGGER_THRESHOLD)),
            trigger_growth: Some(self.trigger_growth.unwrap_or(0.0)),
            ..self.with_gossip(self.gossip().resolved())
        }
    }
}

/// When a worker sends: `‖x − x̂‖² > threshold · (t+1)^growth · η²`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trigger {
    /// `c_0`.
    pub threshold: f64,
    /// `p`.
    pub growth: f64,
}

impl Trigger {
    /// Send whenever the model moved (the threshold of CHOCO-SGD, seen as SQuARM-SGD).
    pub const ALWAYS: Self = Self { threshold: 0.0, growth: 0.0 };

    /// `c_t` at merge `round`.
    pub fn at(self, round: u64) -> f64 {
        self.threshold * ((round + 1) as f64).powf(self.growth)
    }
}

/// CHOCO-SGD and SQuARM-SGD; see the [module documentation](crate::rules::squarm).
#[derive(Debug, Clone)]
pub struct Squarm {
    matrix: MixingMatrix,
    compressor: Compressor,
    gamma: f64,
    trigger: Option<Trigger>,
    segments: Option<Segments>,
    /// Public copies: this worker's first, then its neighbours' in the matrix's order.
    public: Vec<Vec<f32>>,
    peers: Vec<usize>,
    weights: Vec<f64>,
    change: Vec<f32>,
    payload: Vec<u8>,
    decoded: Vec<f32>,
}

impl Squarm {
    /// SQuARM-SGD: compressed gossip with `matrix`'s weights, sending only past `trigger`.
    pub fn new(matrix: MixingMatrix, compressor: Compressor, gamma: f64, trigger: Trigger) -> Self {
        Self::with_trigger(matrix, compressor, gamma, Some(trigger))
    }

    fn with_trigger(matrix: MixingMatrix, compressor: Compressor, gamma: f64, trigger: Option<Trigger>) -> Self {
        Self {
            matrix,
            compressor,
            gamma,
            trigger,
            segments: None,
            public: Vec::new(),
            peers: Vec::new(),
            weights: Vec::new(),
            change: Vec::new(),
            payload: Vec::new(),
            decoded: Vec::new(),
        }
    }

    /// CHOCO-SGD: compressed gossip that always sends.
    pub fn choco(matrix: MixingMatrix, compressor: Compressor, gamma: f64) -> Self {
        Self::with_trigger(matrix, compressor, gamma, None)
    }

    /// The public copies (this worker's, then its neighbours' in the matrix's order).
    pub fn public_copies(&self) -> &[Vec<f32>] {
        &self.public
    }

    /// The registry's name of the rule: `squarm` with a trigger, `choco` without.
    fn registry_name(&self) -> &'static str {
        if self.trigger.is_some() { SquarmConfig::NAME } else { ChocoConfig::NAME }
    }

    fn bad_state(&self, reason: String) -> RuleError {
        RuleError::BadState { rule: self.registry_name(), reason }
    }

    /// This worker's neighbours and weights, in the matrix's order (once; a restored rule
    /// learns them at its first merge).
    fn find_neighbors(&mut self, rank: usize) {
        if self.weights.is_empty() {
            let neighbors = self.matrix.neighbors(rank);
            self.peers = neighbors.iter().map(|&(j, _)| j).collect();
            self.weights = neighbors.iter().map(|&(_, w)| w).collect();
        }
    }
}

impl MergeRule for Squarm {
    fn event_triggered(&self) -> bool {
        self.trigger.is_some()
    }

    fn set_segments(&mut self, segments: &Segments) {
        self.segments = Some(segments.clone());
    }

    fn start(&mut self, initial: &[f32], ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        super::check_world_size(self.registry_name(), self.matrix.order(), ctx)?;
        self.find_neighbors(ctx.rank);
        if self.public.is_empty() {
            self.public = vec![initial.to_vec(); 1 + self.peers.len()];
        }
        Ok(())
    }

    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        super::check_world_size(self.registry_name(), self.matrix.order(), ctx)?;
        let n = params.len();
        self.find_neighbors(ctx.rank);
        if self.public.len() != 1 + self.peers.len() || self.public.iter().any(|p| p.len() != n) {
            let lengths: Vec<usize> = self.public.iter().map(Vec::len).collect();
            let reason = format!(
                "it keeps public copies of {lengths:?} values for itself and {} neighbours, but the model has {n} values",
                self.peers.len()
            );
            return Err(self.bad_state(reason));
        }
        let segments = super::split_for(self.registry_name(), self.segments.as_ref(), n)?;
        let threshold = self.trigger.map_or(0.0, |t| t.at(ctx.round));
        let lr = match ctx.lr {
            Some(lr) if lr.is_finite() => lr,
            _ if threshold == 0.0 => 0.0,
            _ => {
                return Err(
                    self.bad_state("the event trigger needs the learning rate of the step (none was given)".into())
                );
            }
        };
        self.change.clear();
        self.change.extend(params.iter().zip(&self.public[0]).map(|(x, h)| x - h));
        // How far the trained parameters moved (buffers, sent exact, do not count).
        let moved: f64 = segments
            .compressed_ranges()
            .flat_map(|range| &self.change[range])
            .map(|&d| f64::from(d) * f64::from(d))
            .sum();
        // CHOCO-SGD always sends; SQuARM-SGD only when the model moved past the threshold.
        let fire = self.trigger.is_none() || moved > threshold * lr * lr;
        let statistic = if lr > 0.0 { moved / (lr * lr) } else { f64::INFINITY };
        let at = |rank: usize| CompressContext { seed: ctx.seed, round: ctx.round, rank };
        self.payload.clear();
        if fire {
            self.compressor.compress(&self.change, &segments, at(ctx.rank), &mut self.payload);
            self.compressor
                .decompress(&self.payload, &segments, at(ctx.rank), &mut self.decoded)
                .map_err(|error| RuleError::Payload { from: ctx.rank, error })?;
            self.public[0].iter_mut().zip(&self.decoded).for_each(|(h, q)| *h += q);
        }
        let (compressor, peers) = (self.compressor, &self.peers);
        let (public, decoded) = (&mut self.public, &mut self.decoded);
        let mut bad = None;
        comm.exchange_bytes(&self.payload, Route::both_ways(peers), &mut |k, bytes| {
            if bytes.is_empty() || bad.is_some() {
                return;
            }
            match compressor.decompress(bytes, &segments, at(peers[k]), decoded) {
                Ok(()) => public[k + 1].iter_mut().zip(decoded.iter()).for_each(|(h, q)| *h += q),
                Err(error) => bad = Some(RuleError::Payload { from: peers[k], error }),
            }
        })?;
        if let Some(error) = bad {
            return Err(error);
        }
        // x_i += γ Σ_j w_ij (x̂_j − x̂_i), the terms added in the matrix's neighbour order.
        let gamma = self.gamma as f32;
        let weights: Vec<f32> = self.weights.iter().map(|&w| w as f32).collect();
        let (own, neighbors) = self.public.split_first().expect("started");
        for (k, x) in params.iter_mut().enumerate() {
            let mut pull = 0.0f32;
            for (w, copy) in weights.iter().zip(neighbors) {
                pull += w * (copy[k] - own[k]);
            }
            *x += gamma * pull;
        }
        let trigger = self.event_triggered().then_some(Triggered { sent: fire, statistic });
        Ok(MergeOutcome { local_squared_distance: None, trigger })
    }

    fn record(&self) -> StateRecord {
        self.public
            .iter()
            .enumerate()
            .fold(StateRecord::new(), |record, (k, copy)| record.with_buffer(&format!("public-{k}"), copy.clone()))
    }

    fn load_record(&mut self, mut record: StateRecord) -> Result<(), RuleError> {
        let mut public = Vec::new();
        while let Some(copy) = record.take_buffer(&format!("public-{}", public.len())) {
            public.push(copy);
        }
        self.public = public;
        super::no_leftovers(self.registry_name(), &record, "`public-0`, `public-1`, …")
    }
}

impl MatrixForm for Squarm {
    fn expected_bytes_per_merge(&self, values: usize, _world_size: usize) -> Option<f64> {
        // Every message sent (choco): the payload to each neighbour.
        if self.event_triggered() {
            return None;
        }
        let split =
            Segments::resolve(self.segments.as_ref(), values).unwrap_or_else(|| Cow::Owned(Segments::whole(values)));
        Some(self.compressor.payload_bytes(&split) as f64 * self.matrix.mean_degree())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{CollectiveKind, InProcessGroup};
    use crate::compress::Segment;
    use crate::launch::run_group;
    use crate::rules::gossip::Gossip;
    use crate::testing::{initial_buffer, merge_trajectories, run_one_merge, with_segments, worker_buffer};
    use crate::topology::Topology;

    fn ring(m: usize) -> MixingMatrix {
        Topology::ring(m).unwrap().mixing_matrix(WeightRule::default()).unwrap()
    }

    /// Every worker's buffer and sends after `merges` merges on a ring of `m`, started from
    /// [`initial_buffer`] and moved by `step(rank, round)` before each merge.
    fn run(
        m: usize,
        n: usize,
        merges: u64,
        make: impl Fn() -> Squarm + Sync,
        step: impl Fn(usize, u64) -> Vec<f32> + Sync,
    ) -> Vec<(Vec<f32>, Vec<Option<bool>>)> {
        let comms = InProcessGroup::new(m).into_communicators();
        run_group(comms, |rank, mut comm| -> Result<_, RuleError> {
            let mut rule = make();
            let mut params = initial_buffer(m, n);
            let mut ctx = SyncContext { lr: Some(0.1), rank, world_size: m, seed: 5, ..SyncContext::default() };
            rule.start(&params, &ctx, &mut comm)?;
            let mut sent = Vec::new();
            for round in 0..merges {
                ctx.round = round;
                params.iter_mut().zip(step(rank, round)).for_each(|(v, s)| *v += s);
                sent.push(rule.merge(&mut params, &ctx, &mut comm)?.trigger.map(|t| t.sent));
            }
            Ok((params, sent))
        })
        .unwrap_or_else(|failure| panic!("a worker failed: {:?}", failure.primary()))
    }

    /// The same merges computed independently in f64 over the whole group (every public copy
    /// of every worker, as one vector per worker, since all neighbours hold the same copy of
    /// a worker), with the compressor applied through its own encode/decode.
    fn reference(
        m: usize,
        segments: &Segments,
        merges: u64,
        compressor: Compressor,
        gamma: f64,
        trigger: Trigger,
        step: impl Fn(usize, u64) -> Vec<f32>,
    ) -> (Vec<Vec<f64>>, Vec<Vec<bool>>) {
        let (w, n) = (ring(m), segments.len());
        let mut x: Vec<Vec<f64>> =
            (0..m).map(|_| initial_buffer(m, n).iter().map(|&v| f64::from(v)).collect()).collect();
        let mut public = x.clone();
        let mut fired = Vec::new();
        for round in 0..merges {
            let mut this_round = Vec::new();
            for (i, xi) in x.iter_mut().enumerate() {
                xi.iter_mut().zip(step(i, round)).for_each(|(v, s)| *v = f64::from(*v as f32 + s));
                let change: Vec<f32> = (0..n).map(|k| (xi[k] - public[i][k]) as f32).collect();
                let moved: f64 =
                    segments.compressed_ranges().flat_map(|r| &change[r]).map(|&d| f64::from(d) * f64::from(d)).sum();
                let fire = moved > trigger.at(round) * 0.1 * 0.1;
                if fire {
                    let ctx = CompressContext { seed: 5, round, rank: i };
                    let (mut payload, mut q) = (Vec::new(), Vec::new());
                    compressor.compress(&change, segments, ctx, &mut payload);
                    compressor.decompress(&payload, segments, ctx, &mut q).unwrap();
                    (0..n).for_each(|k| public[i][k] += f64::from(q[k]));
                }
                this_round.push(fire);
            }
            for (i, xi) in x.iter_mut().enumerate() {
                for (j, wij) in w.neighbors(i) {
                    (0..n).for_each(|k| xi[k] += gamma * wij * (public[j][k] - public[i][k]));
                }
            }
            fired.push(this_round);
        }
        (x, fired)
    }

    fn steps(rank: usize, round: u64) -> Vec<f32> {
        worker_buffer(rank + round as usize, 60).iter().map(|v| v * 0.1).collect()
    }

    /// Three tensors and, at values 20..30, a buffer that travels exact.
    fn split() -> Segments {
        Segments::new([
            Segment { len: 20, exact: false },
            Segment { len: 10, exact: true },
            Segment { len: 5, exact: false },
            Segment { len: 25, exact: false },
        ])
    }

    #[test]
    fn choco_on_a_ring_of_four_follows_the_recurrence() {
        let settings = [
            (Compressor::Sign, 0.8),
            (Compressor::TopK(0.1), 0.5),
            (Compressor::TopKSign(0.2), 0.3),
            (Compressor::Qsgd(4), 0.6),
        ];
        let split = split();
        for ((compressor, gamma), segments) in settings.into_iter().flat_map(|s| [(s, None), (s, Some(&split))]) {
            let runs = run(4, 60, 6, || with_segments(Squarm::choco(ring(4), compressor, gamma), segments), steps);
            let whole = Segments::whole(60);
            let (expected, _) = reference(4, segments.unwrap_or(&whole), 6, compressor, gamma, Trigger::ALWAYS, steps);
            for (i, (params, sent)) in runs.iter().enumerate() {
                assert!(sent.iter().all(Option::is_none), "choco does not report sends");
                for (got, want) in params.iter().zip(&expected[i]) {
                    assert!((f64::from(*got) - want).abs() < 1e-4, "{compressor}, worker {i}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn squarm_sends_only_past_the_threshold_and_follows_the_recurrence() {
        // Workers 0 and 2 barely move (they never fire after the first merges); 1 and 3 do.
        let uneven = |rank: usize, round: u64| -> Vec<f32> {
            let scale = if rank.is_multiple_of(2) { 1e-4 } else { 0.1 };
            worker_buffer(rank + round as usize, 60).iter().map(|v| v * scale).collect()
        };
        let trigger = Trigger { threshold: 5.0, growth: 0.5 };
        let split = split();
        let runs =
            run(4, 60, 6, || with_segments(Squarm::new(ring(4), Compressor::Sign, 0.8, trigger), Some(&split)), uneven);
        let (expected, fired) = reference(4, &split, 6, Compressor::Sign, 0.8, trigger, uneven);
        for (i, (params, sent)) in runs.iter().enumerate() {
            let expected_sent: Vec<Option<bool>> = fired.iter().map(|round| Some(round[i])).collect();
            assert_eq!(sent, &expected_sent, "worker {i}");
            for (got, want) in params.iter().zip(&expected[i]) {
                assert!((f64::from(*got) - want).abs() < 1e-4, "worker {i}: {got} vs {want}");
            }
        }
        assert!(fired.iter().all(|round| !round[0] && !round[2]), "the still workers never fire: {fired:?}");
        assert!(fired.iter().flatten().any(|&f| f), "the moving workers fire: {fired:?}");
    }

    #[test]
    fn buffers_are_gossiped_exactly_under_any_compressor() {
        // The buffer at 20..30 follows CHOCO-SGD with the identity (exact public copies) to
        // rounding, whatever compresses the tensors around it.
        let split = split();
        let exact =
            run(4, 60, 5, || with_segments(Squarm::choco(ring(4), Compressor::Identity, 0.8), Some(&split)), steps);
        for spec in ["sign", "topk:0.05", "topk:0.1+sign", "randk:0.1", "qsgd:2"] {
            let c: Compressor = spec.parse().unwrap();
            let runs = run(4, 60, 5, || with_segments(Squarm::choco(ring(4), c, 0.8), Some(&split)), steps);
            for ((params, _), (plain, _)) in runs.iter().zip(&exact) {
                for k in 20..30 {
                    assert!((params[k] - plain[k]).abs() <= 1e-6 * plain[k].abs().max(1.0), "{spec}, value {k}");
                }
                assert!(params[..20].iter().zip(plain).any(|(a, b)| a != b), "{spec} compresses the rest");
            }
        }
    }

    #[test]
    fn a_worker_that_never_fires_sends_empty_messages_and_nobody_waits() {
        // A threshold nobody reaches: every merge completes, nothing but empty messages moves,
        // and the models only take their local steps.
        let trigger = Trigger { threshold: 1e12, growth: 0.0 };
        for run in run_one_merge(4, 10, |_| Box::new(Squarm::new(ring(4), Compressor::Sign, 0.8, trigger))) {
            assert_eq!(run.traffic.calls(CollectiveKind::Exchange), 1);
            assert_eq!(run.traffic.total().bytes_sent, 0);
            let trigger = run.outcome.trigger.expect("squarm reports its decision");
            assert!(!trigger.sent && trigger.statistic < 1e12, "{trigger:?}");
        }
    }

    #[test]
    fn choco_with_the_identity_and_a_full_step_is_gossip() {
        let choco = merge_trajectories(4, 5, None, || Box::new(Squarm::choco(ring(4), Compressor::Identity, 1.0)));
        let gossip = merge_trajectories(4, 5, None, || Box::new(Gossip::new(ring(4))));
        for (a, b) in choco.iter().flatten().flatten().zip(gossip.iter().flatten().flatten()) {
            assert!((f32::from_bits(*a) - f32::from_bits(*b)).abs() < 1e-5);
        }
    }

    #[test]
    fn the_public_copies_survive_a_checkpoint_bit_for_bit() {
        let make = || -> Box<dyn CooperativeRule> {
            Box::new(Squarm::new(ring(4), Compressor::TopK(0.2), 0.5, Trigger { threshold: 0.01, growth: 0.2 }))
        };
        assert_eq!(merge_trajectories(4, 6, Some(3), make), merge_trajectories(4, 6, None, make));
    }

    #[test]
    fn bytes_are_the_payloads_sent_to_each_neighbour() {
        let make = || -> Box<dyn CooperativeRule> { Box::new(Squarm::choco(ring(4), Compressor::TopK(0.1), 0.5)) };
        let measured = crate::testing::measured_bytes_per_merge(4, 100, 2, make);
        assert_eq!(measured, (2 * (8 + 8 * 10)) as f64);
        assert_eq!(make().expected_bytes_per_merge(100, 4), Some(measured));
    }

    #[test]
    fn bad_settings_and_payloads_are_errors() {
        let config = ChocoConfig { consensus_step: Some(1.5), ..ChocoConfig::default() };
        assert_eq!(config.build(4).err().unwrap().option, "consensus-step");
        let config = ChocoConfig { topology: Some(TopologySpec::OnePeerExponential), ..ChocoConfig::default() };
        assert_eq!(config.build(4).err().unwrap().option, "topology");
        let config = SquarmConfig { trigger_growth: Some(1.0), ..SquarmConfig::default() };
        assert_eq!(config.build(4).err().unwrap().option, "trigger-growth");
        let config = SquarmConfig { trigger_threshold: Some(-1.0), ..SquarmConfig::default() };
        assert_eq!(config.build(4).err().unwrap().option, "trigger-threshold");

        // A rule built for four workers refuses three.
        let mismatch = RuleError::WorldSizeMismatch { rule: "choco", expected: 4, found: 3 };
        let refused = crate::testing::refusals(Squarm::choco(ring(4), Compressor::Sign, 0.5), 3);
        assert_eq!(refused, [Some(mismatch.clone()), Some(mismatch)]);

        // A neighbour speaking another format is named in the error.
        let comms = InProcessGroup::new(2).into_communicators();
        let complete = Topology::complete(2).unwrap().mixing_matrix(WeightRule::default()).unwrap();
        let failure = run_group(comms, |rank, mut comm| -> Result<(), RuleError> {
            let ctx = SyncContext { rank, world_size: 2, lr: Some(0.1), ..SyncContext::default() };
            let compressor = if rank == 1 { Compressor::TopK(0.5) } else { Compressor::Sign };
            let mut rule = Squarm::choco(complete.clone(), compressor, 0.5);
            rule.start(&[0.0; 4], &ctx, &mut comm)?;
            rule.merge(&mut [1.0, 2.0, 3.0, 4.0], &ctx, &mut comm).map(|_| ())
        })
        .unwrap_err();
        let message = match &failure.primary().failure {
            crate::launch::Failure::Error(error) => error.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(message.contains("worker 1's compressed message cannot be decoded"), "{message}");
    }
}
