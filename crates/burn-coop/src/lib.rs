//! # burn-coop
//!
//! Communication-efficient distributed training for [Burn](https://burn.dev), built on the
//! *Cooperative SGD* framework (Wang & Joshi): `m` workers each take τ local optimizer steps,
//! then merge their models with a rule — periodic averaging (local SGD, FedAvg), elastic
//! averaging (EASGD, with one or several anchors), gossip over a fixed or time-varying graph,
//! MATCHA, hierarchical averaging or an outer optimizer (DiLoCo). In matrix form every rule is
//! `X_{k+1} = (X_k − η G_k) W_k`, with `W_k = I` between merges.
//!
//! The pieces, one concept per module:
//! - [`topology`] and [`mixing`]: graphs, mixing matrices `W`, validation, `ζ`;
//! - [`rules`]: the [`MergeRule`](rules::MergeRule) trait (the merge, its context, state records), the theory of
//!   a rule ([`MatrixForm`](rules::MatrixForm): mixing matrices, bytes per merge) and the rules;
//! - [`schedule`]: when to merge ([`SyncSchedule`](schedule::SyncSchedule), fed with signals and merge feedback);
//! - [`registry`]: the registries of rules and schedules (settings for files and flags);
//! - [`comm`]: the [`Communicator`](comm::Communicator) that moves data between workers,
//!   [`InProcessGroup`](comm::InProcessGroup) for
//!   threads, and [`Metered`](comm::Metered) byte accounting;
//! - [`compress`]: compressors (top-k, rand-k, scaled sign, QSGD, 16-bit casts) and their
//!   compact, checked payloads;
//! - [`params`]: flat parameter buffers for any Burn module;
//! - [`random`]: numbers every worker draws alike from the shared seed;
//! - [`shared_params`]: one flat buffer updated by several threads at once, lock-free (async);
//! - [`state`]: binary state records of rules and schedules;
//! - [`Synchronizer`]: the merge engine driven after each local step;
//! - [`LocalSgd`]: a Burn optimizer plus a synchronizer, what a training loop swaps in;
//! - [`learner`]: replicas trained together, with metrics, evaluation and checkpoints;
//! - [`launch()`] / [`run_group`]: one thread per worker, failures reported cause first;
//! - [`advisor`]: what the theory says about a setting (`ζ`, error floor, bytes, AdaComm's `τ*`);
//! - `testing` (feature `test-util`): a test kit for rule authors.

pub mod advisor;
pub mod comm;
pub mod compress;
mod error;
mod launch;
pub mod learner;
mod local_sgd;
pub mod mixing;
pub mod params;
pub mod random;
pub mod registry;
pub mod rules;
pub mod schedule;
pub mod shared_params;
mod spectrum;
pub mod state;
mod sync;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod topology;
#[cfg(feature = "burn-train")]
pub mod train_strategy;

pub use error::CoopError;
pub use launch::{Failure, FailureCause, GroupFailure, Worker, WorkerFailure, launch, run_group, run_group_led, shard};
pub use local_sgd::{InnerStatePolicy, LocalSgd, LocalSgdState};
pub use sync::{CoopStats, DEFAULT_BUCKET_BYTES, StepSignal, SyncReport, SyncState, Synchronizer, WorkerColumns};

/// The README's code blocks, compiled and run as documentation tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
