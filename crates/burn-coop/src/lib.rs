//! # burn-coop
//!
//! Communication-efficient distributed training for [Burn](https://burn.dev), built on the
//! *Cooperative SGD* framework (Wang & Joshi): `m` workers each take τ local optimizer steps,
//! then merge their models with a rule — periodic averaging (local SGD, FedAvg), elastic
//! averaging (EASGD) or gossip over a graph. In matrix form every rule is
//! `X_{k+1} = (X_k − η G_k) W_k`, with `W_k = I` between merges.
//!
//! The pieces, one concept per module:
//! - [`topology`] and [`mixing`]: graphs, mixing matrices `W`, validation, `ζ`;
//! - [`rules`]: the [`MergeRule`] trait and its implementations;
//! - [`schedule`]: when to merge ([`SyncSchedule`], [`PeriodicSchedule`]);
//! - [`params`]: flat parameter buffers for any Burn module;
//! - [`transport`]: how workers exchange buffers ([`Transport`], [`InProcessGroup`]);
//! - [`LocalSgd`]: the optimizer wrapper that puts them together;
//! - [`learner`]: replicas trained together, with metrics, evaluation and checkpoints.

pub mod error;
pub mod launch;
pub mod learner;
pub mod local_sgd;
pub mod mixing;
pub mod params;
pub mod rules;
pub mod schedule;
mod spectrum;
pub mod topology;
#[cfg(feature = "burn-train")]
pub mod train_strategy;
pub mod transport;

pub use error::CoopError;
pub use launch::{Worker, WorkerPanicked, launch};
pub use learner::{CoopTask, Learner, LearnerConfig, LearnerError};
pub use local_sgd::{CoopStats, InnerStatePolicy, LocalSgd, LocalSgdState, SyncReport};
pub use mixing::{MixingError, MixingMatrix};
pub use params::{BufferPolicy, ParamLayout};
pub use rules::{ElasticAveraging, Gossip, MergeOutcome, MergeRule, PeriodicAveraging, RuleError};
pub use schedule::{PeriodicSchedule, ScheduleError, SyncSchedule};
pub use topology::{Topology, TopologyError, TopologyKind, WeightRule};
#[cfg(feature = "burn-train")]
pub use train_strategy::LocalSgdStrategy;
pub use transport::{InProcessGroup, InProcessTransport, ReduceOp, Traffic, Transport, TransportError};

/// The README's code blocks, compiled and run as documentation tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
