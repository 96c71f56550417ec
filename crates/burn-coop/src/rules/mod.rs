//! Merge rules: what happens to the workers' models at a synchronization step.
//!
//! Most rules are one mixing matrix `W` of Cooperative SGD applied through a [`Communicator`]
//! (an outer optimizer such as DiLoCo is not, but reduces to one in a special case):
//!
//! | rule | `W` | anchors | file | reference |
//! |---|---|---|---|---|
//! | [`Averaging`](averaging::Averaging) (local SGD, FedAvg; synchronous SGD at τ = 1) | `J = 11ᵀ/m` | 0 | `averaging.rs` | Stich, ICLR 2019; McMahan et al., AISTATS 2017 |
//! | [`Elastic`](elastic::Elastic) (EASGD; `--anchors v`: generalized elastic averaging) | `[[(1−α)I, α1], [α1ᵀ, 1−mα]]`; with `v` anchors, groups of `m/v` workers each pulled by one anchor, anchors averaged | `v` (default 1) | `elastic.rs` | Zhang, Choromanska & LeCun, NeurIPS 2015; Wang & Joshi, JMLR 2021 |
//! | [`Gossip`](gossip::Gossip) (decentralized periodic averaging; D-PSGD at τ = 1; one-peer exponential graph) | a topology's `W`; `½(I + P_k)` for the one-peer exponential graph | 0 | `gossip.rs` | Lian et al., NeurIPS 2017; Ying et al., NeurIPS 2021 |
//! | [`Matcha`](matcha::Matcha) (random disjoint matchings under a budget) | `I − α Σ_j B_j^k L_j` | 0 | `matcha.rs` | Wang, Sahu, Yang, Joshi & Kar, arXiv 1905.09435 |
//! | [`Overlap`](overlap::Overlap) (Overlap Local-SGD: pull towards an anchor averaged in the background, anchor momentum) | none (with `γ = 0` the anchor is the mean of the pulled models) | 1 per worker (kept locally) | `overlap.rs` | Wang, Liang & Joshi, ICASSP 2020 |
//! | [`ElasticOverlap`](elastic_overlap::ElasticOverlap) (EASGD with its all-reduce hidden behind the next τ steps) | EASGD's `W_α` (the same recurrence) | 1 | `elastic_overlap.rs` | Wang & Joshi, JMLR 2021 |
//! | [`AsyncAveraging`](async_local_sgd::AsyncAveraging) (asynchronous local SGD: Hogwild local threads, averaging applied in place as `x + (mean − s)`) | none (`J` with one thread) | 0 | `async_local_sgd.rs` | "Local SGD Meets Asynchrony", ICLR 2021 submission |
//! | [`Hierarchical`](hierarchical::Hierarchical) (groups every merge, everyone every `k`-th) | `diag(J_{m/G}, …)`, then `J` | 0 | `hierarchical.rs` | Lin et al., ICLR 2020; PyTorch's `HierarchicalModelAverager` |
//! | [`EcLocalSgd`] (local SGD with error-compensated double compression; `average --compressor`: compressed changes without memories) | `J` with the identity compressor | 0 (keeps `x_s` and two error memories) | `ec_local_sgd.rs` | Gao, Xu & Huang, AAAI 2021; Tang et al., ICML 2019 |
//! | [`Squarm`](squarm::Squarm) (`choco`: compressed gossip to public copies; `squarm`: sent only past a threshold) | `I + γ(W − I)` on the public copies | 0 (keeps the public copies of itself and its neighbours) | `squarm.rs` | Koloskova, Stich & Jaggi, ICML 2019; Singh, Data, George & Diggavi, arXiv 2005.07041 |
//! | [`DiLoCo`](diloco::DiLoCo) (outer Nesterov momentum on `x_sync − x̄`; SlowMo) | none (`J` at `lr_outer = 1`, `β = 0`) | 0 (keeps `x_sync` and `u`) | `diloco.rs` | Douillard et al., arXiv 2311.08105; Wang et al., ICLR 2020 |
//! | [`StreamingDiLoCo`](streaming_diloco::StreamingDiLoCo) (DiLoCo one fragment per merge, its all-reduce travelling during the next τ steps, mixed with share α) | none (DiLoCo with one fragment, no overlap, `α = 0`) | 0 (keeps `x_sync`, the outer state and the fragment in flight) | `streaming_diloco.rs` | Douillard et al., arXiv 2501.18512; torchft's `DiLoCo` |
//!
//! A rule is a [`MergeRule`]: [`MergeRule::merge`] replaces this worker's flat parameters by
//! their merged value, talking to the other workers only through the communicator; a rule
//! whose communication travels during the next local steps (Overlap Local-SGD, overlapped
//! EASGD) starts it in one merge and collects it in the next, inside `merge`. What the theory
//! says about a rule (its mixing matrix, per merge or in expectation, and the bytes of a merge)
//! is a separate trait, [`MatrixForm`], which the advisor and the test kit use; the registry
//! builds a [`CooperativeRule`], both at once. A rule's state is a [`StateRecord`]. A rule
//! whose validity depends on the number of workers is built for that number (its constructor
//! checks every setting against it) and refuses to run with another.
//!
//! Adding a rule: a file here with its config (implementing [`RuleConfig`](crate::registry::RuleConfig),
//! whose `build` checks every setting), the rule implementing [`MergeRule`] (`merge`;
//! `record`/`load_record` when it keeps buffers) and [`MatrixForm`] (empty when it is no mixing
//! matrix), its update written in the module doc with the paper's reference, and its tests (see
//! `crate::testing`, feature `test-util`); here, a `pub mod` line, a `pub(crate) use` of the config, one registry line and a row in the
//! table above; a row in the README's rule table.

pub mod async_local_sgd;
pub mod averaging;
pub mod diloco;
pub mod ec_local_sgd;
pub mod elastic;
pub mod elastic_overlap;
pub mod gossip;
pub mod hierarchical;
mod in_flight;
pub(crate) mod kernels;
pub mod matcha;
pub mod outer;
pub mod overlap;
pub mod squarm;
pub mod streaming_diloco;

pub(crate) use async_local_sgd::AsyncConfig;
pub(crate) use async_local_sgd::apply_average_in_place;
pub(crate) use averaging::{AveragingConfig, SynchronousConfig};
pub(crate) use diloco::DiLoCoConfig;
pub(crate) use ec_local_sgd::{EcLocalSgd, EcLocalSgdConfig};
pub(crate) use elastic::ElasticConfig;
pub(crate) use elastic_overlap::ElasticOverlapConfig;
pub(crate) use gossip::GossipConfig;
pub(crate) use hierarchical::HierarchicalConfig;
pub(crate) use matcha::MatchaConfig;
pub(crate) use overlap::OverlapConfig;
pub(crate) use squarm::{ChocoConfig, SquarmConfig};
pub(crate) use streaming_diloco::StreamingDiLoCoConfig;

use in_flight::InFlightAnchor;

/// Flags that several rules take, declared once: each is a key of every rule config that has
/// it (`#[arg(skip)]` there), and giving it to a rule without that key is an error naming the
/// rules that have it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, rename_all = "kebab-case")]
pub struct SharedRuleFlags {
    /// Elastic moving rate α in (0, 2/(m+1)), default 2/(m+2) (elastic, elastic-overlap;
    /// `--moving-rate` is its former name for elastic-overlap).
    #[arg(long, alias = "moving-rate", value_parser = crate::registry::positive_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// What travels instead of dense values: identity, topk:F, topk:F+sign, randk:F, sign, qsgd:S,
    /// bf16, fp16, int8, fp8 (average, ec-local-sgd, choco, squarm; diloco and streaming-diloco
    /// take the elementwise ones, bf16 to fp8, for their pseudo-gradients).
    #[arg(long, value_parser = crate::registry::serde_name::<crate::compress::Compressor>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressor: Option<crate::compress::Compressor>,
    /// Gossip topology: ring, torus, exponential, complete, one-peer-exponential (default ring;
    /// gossip, choco, squarm).
    #[arg(long, value_parser = crate::registry::serde_name::<crate::topology::TopologySpec>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<crate::topology::TopologySpec>,
    /// Gossip weights: metropolis-hastings, best-constant (default metropolis-hastings; gossip,
    /// choco, squarm).
    #[arg(long, value_parser = crate::registry::serde_name::<crate::topology::WeightRule>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<crate::topology::WeightRule>,
    /// Consensus step γ of choco and squarm in (0, 1] (default: 1 for lossless and 16-bit
    /// compressors, 0.8 for sign and qsgd, 0.04 for top-k and rand-k).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consensus_step: Option<f64>,
    /// The outer optimizer: sgd (momentum SGD, default) or adam (diloco, streaming-diloco).
    #[arg(long, value_parser = crate::registry::serde_name::<diloco::OuterOptimizerName>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_optimizer: Option<diloco::OuterOptimizerName>,
    /// The outer learning rate: in (0, 2) for sgd (default 0.7), positive for adam (no default;
    /// diloco, streaming-diloco).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// The outer momentum β (Adam's β₁) in [0, 1), default 0.9 (diloco, streaming-diloco).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<f64>,
    /// Nesterov outer momentum, for sgd (true/false; default true; diloco, streaming-diloco).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_nesterov: Option<bool>,
    /// Adam's β₂ in [0, 1), default 0.999 (diloco, streaming-diloco).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_beta2: Option<f64>,
    /// Adam's ε, positive, default 1e-8 (diloco, streaming-diloco).
    #[arg(long, value_parser = crate::registry::finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_eps: Option<f64>,
}

// The registry: one line per rule (its `--rule` name comes from its config's `NAME`).
crate::registry::registry! {
    /// Which merge rule a run uses, with its settings (`kind` names it in JSON).
    spec RuleSpec;
    /// A merge rule by name.
    names RuleName;
    /// `--rule NAME` and every rule's own flags.
    flags RuleFlags, flag "rule", key rule, what "rule";
    trait RuleConfig;
    default Average;
    dyn BuildRule;
    shared SharedRuleFlags;
    /// Synchronous SGD: averaging after every step (τ is forced to 1).
    Sync(sync: SynchronousConfig),
    /// Periodic averaging (local SGD).
    Average(average: AveragingConfig),
    /// Elastic averaging (EASGD).
    Elastic(elastic: ElasticConfig),
    /// Gossip over a topology.
    Gossip(gossip: GossipConfig),
    /// An outer optimizer (Nesterov momentum) on the averaged update (DiLoCo, SlowMo).
    Diloco(diloco: DiLoCoConfig),
    /// DiLoCo one fragment of the model per merge, its all-reduce overlapping the local steps.
    StreamingDiloco(streaming_diloco: StreamingDiLoCoConfig),
    /// Averaging within groups every merge and across all workers every k-th merge.
    Hierarchical(hierarchical: HierarchicalConfig),
    /// Gossip on randomly activated matchings of a base graph under a budget (MATCHA).
    Matcha(matcha: MatchaConfig),
    /// Overlap Local-SGD: a pull towards an anchor whose all-reduce travels during the local steps.
    Overlap(overlap: OverlapConfig),
    /// Elastic averaging whose anchor all-reduce travels during the local steps.
    ElasticOverlap(elastic_overlap: ElasticOverlapConfig),
    /// Asynchronous local SGD: Hogwild local threads, averaging applied in place.
    Async(asynchronous: AsyncConfig),
    /// Local SGD with error-compensated double compression of the model changes.
    EcLocalSgd(ec_local_sgd: EcLocalSgdConfig),
    /// CHOCO-SGD: gossip of compressed changes to public copies of the models.
    Choco(choco: ChocoConfig),
    /// SQuARM-SGD: CHOCO-style compressed gossip that sends only when the model moved enough.
    Squarm(squarm: SquarmConfig),
}

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::comm::{CommError, Communicator};
use crate::mixing::MixingMatrix;
use crate::state::StateRecord;

/// Why a rule cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// EASGD's moving rate outside the stable range.
    #[error(
        "elastic averaging needs 0 < α < {upper:.6} for m = {workers} workers and v = {anchors} anchor(s) (the (m+v)x(m+v) mixing matrix is stable below 2/(m+1) with one anchor, below v/m with several), got α = {alpha}"
    )]
    ElasticAlphaOutOfRange {
        /// The α given.
        alpha: f64,
        /// Number of workers.
        workers: usize,
        /// Number of anchors.
        anchors: usize,
        /// The exclusive upper bound.
        upper: f64,
    },
    /// The rule was built for a different number of workers than the communicator has.
    #[error("the {rule} rule was built for {expected} workers but the communicator has {found}")]
    WorldSizeMismatch {
        /// Rule name.
        rule: &'static str,
        /// Workers the rule expects.
        expected: usize,
        /// Workers the communicator has.
        found: usize,
    },
    /// Saved state that does not fit the rule.
    #[error("cannot restore the {rule} rule's state: {reason}")]
    BadState {
        /// Rule name.
        rule: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The split into tensors given by [`MergeRule::set_segments`] does not fit the model.
    #[error("the {rule} rule was told of tensors of {told} values in all, but the model has {found}")]
    SplitMismatch {
        /// Rule name.
        rule: &'static str,
        /// Values the split covers.
        told: usize,
        /// Values in the model.
        found: usize,
    },
    /// A restored record with entries for a rule that keeps no state.
    #[error("cannot restore the rule's state: unexpected entries {keys:?} (the rule keeps no state)")]
    UnexpectedState {
        /// The entries the record holds.
        keys: Vec<String>,
    },
    /// A compressed payload from another worker that cannot be decoded.
    #[error("worker {from}'s compressed message cannot be decoded: {error}")]
    Payload {
        /// The sender's rank.
        from: usize,
        /// What is wrong with it.
        error: crate::compress::CompressError,
    },
    /// Communication failed during the merge.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A quantized all-reduce was asked of a compressor that cannot be summed after decoding.
    #[error("{0} cannot be summed after decoding (a quantized all-reduce takes bf16, fp16, int8 or fp8)")]
    NotElementwise(crate::compress::Compressor),
}

impl From<crate::comm::QuantizedReduceError> for RuleError {
    fn from(error: crate::comm::QuantizedReduceError) -> Self {
        use crate::comm::QuantizedReduceError as Q;
        match error {
            Q::Comm(error) => Self::Comm(error),
            Q::Payload { from, error } => Self::Payload { from, error },
            Q::NotElementwise(compressor) => Self::NotElementwise(compressor),
        }
    }
}

/// What a rule knows about the merge it is running. Identical on every worker, except `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SyncContext {
    /// Local steps taken so far (1-based step the merge follows).
    pub step: u64,
    /// Merges before this one (0 for the first merge).
    pub round: u64,
    /// Local steps since the previous merge.
    pub steps_since_sync: u64,
    /// Learning rate of the last local step (`None` where the caller did not give one).
    pub lr: Option<f64>,
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers.
    pub world_size: usize,
    /// A seed shared by every worker (for rules that draw random choices together).
    pub seed: u64,
}

/// What a merge measured on this worker.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MergeOutcome {
    /// This worker's squared distance to the average model before the merge, `‖x_i − x̄‖²`,
    /// when the rule measured it (at no extra communication). Its mean over workers is the
    /// consensus distance, which the [`Synchronizer`](crate::Synchronizer) reduces with its
    /// other per-merge statistics.
    pub local_squared_distance: Option<f64>,
    /// What an event-triggered rule (which skips sending when the model moved too little)
    /// decided at this merge; `None` for rules that always send.
    pub trigger: Option<Triggered>,
}

/// An event trigger's decision on one worker at one merge.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Triggered {
    /// Whether the worker sent its message.
    pub sent: bool,
    /// The statistic the trigger compared with its threshold (for SQuARM-SGD `‖x − x̂‖²/η²`,
    /// compared with `c_t`), for choosing a threshold.
    pub statistic: f64,
}

/// What [`MergeRule::merge`] returns: what the merge measured on this worker, or why it failed.
pub type Merged = Result<MergeOutcome, RuleError>;

/// One bucket of a merge taken a bucket at a time ([`MergeRule::merge_bucket`]): consecutive
/// values of the flat model, given in order from the first to the last, every worker the same
/// ranges.
#[derive(Debug)]
pub struct Bucket<'a> {
    /// This worker's values of the bucket, merged in place.
    pub values: &'a mut [f32],
    /// Where `values` start in the flat model.
    pub at: usize,
    /// Whether this is the merge's first bucket (a rule counts its merges here).
    pub first: bool,
    /// Whether this is the merge's last bucket.
    pub last: bool,
    /// How many values of scratch space the rule may keep for the next merge once the last
    /// bucket is merged: a model in one bucket keeps its buffers (reused at every merge), a
    /// model in several gives them back, so that between merges a worker holds only the rule's
    /// own state.
    pub keep: usize,
}

impl Bucket<'_> {
    /// The bucket's range in the flat model.
    pub fn range(&self) -> Range<usize> {
        self.at..self.at + self.values.len()
    }

    /// Gives `scratch` back when this is the last bucket and it holds more than
    /// [`Bucket::keep`] values.
    pub fn release<T>(&self, scratch: &mut Vec<T>) {
        if self.last && scratch.capacity() > self.keep {
            *scratch = Vec::new();
        }
    }
}

/// One synchronization rule of Cooperative SGD, applied to a worker's flat parameter buffer.
///
/// All workers call the same methods at the same steps; the rule talks to the others only
/// through the communicator, so it runs unchanged over threads or MPI.
pub trait MergeRule: Send {
    /// Told, before the first merge, how the flat buffer splits into the model's tensors (the
    /// [`Synchronizer`](crate::Synchronizer) does it when it first sees the module, also after a
    /// resume). Rules that compress compress each tensor on its own and send buffers exact;
    /// without it a buffer is one tensor. Others ignore it.
    fn set_segments(&mut self, _segments: &crate::compress::Segments) {}

    /// Called once with the initial parameters (identical on every worker after the initial
    /// broadcast) before the first local step. A rule built for a number of workers fails here
    /// with [`RuleError::WorldSizeMismatch`] when the communicator has another.
    fn start(&mut self, _initial: &[f32], _ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        Ok(())
    }

    /// Replaces `params` by this worker's merged model. A rule whose communication overlaps the
    /// local steps collects here what it started at the previous merge and starts what the next
    /// one collects.
    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged;

    /// Whether the rule can merge the model a bucket at a time ([`MergeRule::merge_bucket`]):
    /// rules whose update is elementwise, with state per value. The
    /// [`Synchronizer`](crate::Synchronizer) then reads, merges and writes back one bucket of
    /// tensors at a time instead of the whole model.
    fn merges_in_buckets(&self) -> bool {
        false
    }

    /// Merges one bucket; a merge is the buckets covering the model in order, and leaves every
    /// value as [`MergeRule::merge`] would (the distance it returns is this bucket's share).
    /// Only called when [`MergeRule::merges_in_buckets`] says so.
    fn merge_bucket(&mut self, bucket: Bucket<'_>, ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        let _ = (bucket, ctx, comm);
        Err(RuleError::BadState { rule: "this rule", reason: "it does not merge in buckets".into() })
    }

    /// Whether the rule measures `‖x_i − x̄‖²` itself at every merge (no extra communication);
    /// others have the consensus distance measured only when asked.
    fn measures_consensus(&self) -> bool {
        false
    }

    /// Whether every worker holds the same model after a merge (averaging): then `x̄` is any
    /// worker's model and need not be computed again.
    fn reaches_consensus(&self) -> bool {
        false
    }

    /// Whether the rule decides at each merge whether to send (event-triggered gossip); its
    /// [`MergeOutcome::trigger`] then goes to the metrics (workers that sent, mean statistic).
    fn event_triggered(&self) -> bool {
        false
    }

    /// The rule's state to checkpoint.
    fn record(&self) -> StateRecord {
        StateRecord::new()
    }

    /// Restores state produced by [`MergeRule::record`]; a rule that keeps none refuses any
    /// entry ([`RuleError::UnexpectedState`]).
    fn load_record(&mut self, record: StateRecord) -> Result<(), RuleError> {
        if record.is_empty() { Ok(()) } else { Err(RuleError::UnexpectedState { keys: record.keys() }) }
    }
}

impl<R: MergeRule + ?Sized> MergeRule for Box<R> {
    fn set_segments(&mut self, segments: &crate::compress::Segments) {
        (**self).set_segments(segments)
    }
    fn start(&mut self, initial: &[f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Result<(), RuleError> {
        (**self).start(initial, ctx, comm)
    }
    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        (**self).merge(params, ctx, comm)
    }
    fn merges_in_buckets(&self) -> bool {
        (**self).merges_in_buckets()
    }
    fn merge_bucket(&mut self, bucket: Bucket<'_>, ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        (**self).merge_bucket(bucket, ctx, comm)
    }
    fn measures_consensus(&self) -> bool {
        (**self).measures_consensus()
    }
    fn reaches_consensus(&self) -> bool {
        (**self).reaches_consensus()
    }
    fn event_triggered(&self) -> bool {
        (**self).event_triggered()
    }
    fn record(&self) -> StateRecord {
        (**self).record()
    }
    fn load_record(&mut self, record: StateRecord) -> Result<(), RuleError> {
        (**self).load_record(record)
    }
}

/// What Cooperative SGD's theory knows of a rule: its mixing matrix, per merge or in
/// expectation, and the bytes of a merge. Used by the [advisor](crate::advisor) and the
/// test kit (`testing`, feature `test-util`), never by a merge; a rule that is no mixing matrix implements it
/// empty (every answer `None`).
pub trait MatrixForm {
    /// The rule's mixing matrix for `world_size` workers (`(m+v) × (m+v)` with `v` anchors),
    /// for rules that are one.
    fn mixing_matrix(&self, _world_size: usize) -> Option<MixingMatrix> {
        None
    }

    /// The rule's mixing matrix at the merge `ctx` describes (its round, the shared seed, the
    /// world size), for rules whose matrix changes from merge to merge (time-varying or random
    /// graphs); the fixed one by default.
    fn mixing_matrix_at(&self, ctx: &SyncContext) -> Option<MixingMatrix> {
        self.mixing_matrix(ctx.world_size)
    }

    /// `E[W_kᵀ W_k]` over the rule's merges (its cycle, or its random draws), whose
    /// second-largest eigenvalue is `ζ²` for the theory of time-varying graphs; by default
    /// `WᵀW` of [`MatrixForm::mixing_matrix`]. `None` for rules that are not mixing matrices.
    fn mixing_second_moment(&self, world_size: usize) -> Option<MixingMatrix> {
        self.mixing_matrix(world_size).map(|w| w.gram())
    }

    /// The bytes a worker sends in one merge of a model of `values` `f32`, averaged over the
    /// workers and over the rule's cycle (or expected over its random draws), as
    /// [`Metered`](crate::comm::Metered) counts them (without the few scalars of statistics a
    /// synchronizer adds). `None` when the rule does not say.
    fn expected_bytes_per_merge(&self, _values: usize, _world_size: usize) -> Option<f64> {
        None
    }
}

impl<R: MatrixForm + ?Sized> MatrixForm for Box<R> {
    fn mixing_matrix(&self, world_size: usize) -> Option<MixingMatrix> {
        (**self).mixing_matrix(world_size)
    }
    fn mixing_matrix_at(&self, ctx: &SyncContext) -> Option<MixingMatrix> {
        (**self).mixing_matrix_at(ctx)
    }
    fn mixing_second_moment(&self, world_size: usize) -> Option<MixingMatrix> {
        (**self).mixing_second_moment(world_size)
    }
    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        (**self).expected_bytes_per_merge(values, world_size)
    }
}

/// A merge rule together with its theory: what the registry builds
/// ([`RuleSpec::build`](crate::rules::RuleSpec::build)), usable as a [`MergeRule`] (a
/// `Box<dyn CooperativeRule>` is one) and as a [`MatrixForm`].
pub trait CooperativeRule: MergeRule + MatrixForm {}

impl<R: MergeRule + MatrixForm + ?Sized> CooperativeRule for R {}

/// The error of a rule built for `built_for` workers asked to run with `ctx.world_size`.
pub(crate) fn check_world_size(rule: &'static str, built_for: usize, ctx: &SyncContext) -> Result<(), RuleError> {
    if ctx.world_size == built_for {
        Ok(())
    } else {
        Err(RuleError::WorldSizeMismatch { rule, expected: built_for, found: ctx.world_size })
    }
}

/// The error for a restored record that still holds entries after the rule registered as
/// `rule` took what it keeps (`keeps` names them, for the message).
pub fn no_leftovers(rule: &'static str, record: &StateRecord, keeps: &str) -> Result<(), RuleError> {
    if record.is_empty() {
        Ok(())
    } else {
        let reason = format!("unexpected entries {:?} (the rule keeps {keeps})", record.keys());
        Err(RuleError::BadState { rule, reason })
    }
}

/// The split of a model of `n` values a compressing rule uses: the one the synchronizer gave
/// ([`MergeRule::set_segments`]), else the whole buffer as one tensor; an error when the split
/// given covers another number of values.
pub(crate) fn split_for<'a>(
    rule: &'static str,
    split: Option<&'a crate::compress::Segments>,
    n: usize,
) -> Result<std::borrow::Cow<'a, crate::compress::Segments>, RuleError> {
    crate::compress::Segments::resolve(split, n).ok_or_else(|| RuleError::SplitMismatch {
        rule,
        told: split.map_or(0, crate::compress::Segments::len),
        found: n,
    })
}

/// The consensus distance `(1/m) Σ_i ‖x_i − x̄‖²` of the workers' current `params`
/// (one all-reduce of the buffer and one of a scalar). All workers must call it.
pub fn consensus_distance(params: &[f32], comm: &mut dyn Communicator) -> Result<f64, CommError> {
    let m = comm.world_size();
    let mut sum = params.to_vec();
    comm.all_reduce_sum(&mut sum)?;
    let mut total = [kernels::distance_to_mean(params, &sum, m)];
    comm.all_reduce_f64(&mut total)?;
    Ok(total[0] / m as f64)
}
