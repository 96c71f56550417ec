//! Two-level averaging: within groups every merge, across all workers every `k`-th merge.
//!
//! Workers `0..m` form `G` groups of `m/G` consecutive ranks (a group is typically one machine:
//! with `mpirun --map-by ppr:4:node` ranks on a node are consecutive). At merge number `r`
//! (counted from 1) with period τ:
//!
//! - if `k` divides `r` (every `k·τ` steps): `x_i ← (1/m) Σ_j x_j`, the global average;
//! - otherwise (every τ steps): `x_i ← (1/|g|) Σ_{j ∈ g(i)} x_j`, the average of `i`'s group.
//!
//! On a merge that is both, only the global average runs, as in PyTorch's
//! `HierarchicalModelAverager` (`torch.distributed.algorithms.model_averaging.hierarchical_model_averager`);
//! as a Cooperative SGD matrix the group merges are the block-diagonal `W = diag(J_{m/G}, …)` and
//! the global ones `J` (Wang & Joshi, "Cooperative SGD", JMLR 2021; hierarchical local SGD: Lin
//! et al., ICLR 2020). The groups are sub-communicators split by colour (over MPI,
//! `MPI_Comm_split`), made at the first merge on every worker (also after a resume), so a group
//! merge moves data only inside the group. With one group every merge is a global average; with
//! `G = m` a group merge leaves every worker alone, so the rule is averaging every `k·τ` steps.
//! Each worker's distance to the global mean is measured on global merges (for free, as
//! averaging does); group merges report none.

use serde::{Deserialize, Serialize};

use super::kernels::replace_by_mean;
use super::{CooperativeRule, MatrixForm, MergeOutcome, MergeRule, Merged, RuleError, SyncContext, check_world_size};
use crate::comm::{Communicator, Traffic};
use crate::mixing::MixingMatrix;
use crate::registry::{RuleConfig, SpecError};

/// `--rule hierarchical`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HierarchicalConfig {
    /// Number of groups G, dividing the number of workers (default 2).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<u64>,
    /// Average across all workers every k-th merge (k ≥ 1; default 4).
    #[arg(long, value_parser = crate::registry::at_least_one)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_every: Option<u64>,
}

impl RuleConfig for HierarchicalConfig {
    const NAME: &'static str = "hierarchical";

    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        let groups = self.groups.unwrap_or(2) as usize;
        let every = self.global_every.unwrap_or(4);
        if groups == 0 || !world_size.is_multiple_of(groups) {
            let reason = format!("{groups} groups do not divide {world_size} workers into groups of equal size");
            return Err(SpecError::new("groups", groups.to_string(), reason));
        }
        if every == 0 {
            return Err(SpecError::new("global-every", "0", "the global average needs a period of at least 1 merge"));
        }
        let rule = Hierarchical::new(groups, every, world_size)
            .map_err(|error| SpecError::new("groups", groups.to_string(), error))?;
        Ok(Box::new(rule))
    }

    fn describe(&self) -> String {
        format!(
            "hierarchical averaging, {} groups, global every {} merges",
            self.groups.unwrap_or(2),
            self.global_every.unwrap_or(4)
        )
    }

    fn run_tag(&self) -> String {
        format!("hierarchical-g{}-k{}", self.groups.unwrap_or(2), self.global_every.unwrap_or(4))
    }

    fn resolved(&self) -> Self {
        Self { groups: Some(self.groups.unwrap_or(2)), global_every: Some(self.global_every.unwrap_or(4)) }
    }
}

/// Two-level averaging; see the [module documentation](crate::rules::hierarchical).
pub struct Hierarchical {
    groups: usize,
    global_every: u64,
    workers: usize,
    group: Option<Box<dyn Communicator>>,
    sum: Vec<f32>,
}

impl std::fmt::Debug for Hierarchical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hierarchical")
            .field("groups", &self.groups)
            .field("global_every", &self.global_every)
            .field("workers", &self.workers)
            .field("split", &self.group.is_some())
            .finish_non_exhaustive()
    }
}

impl Hierarchical {
    /// `groups` groups of consecutive ranks among `workers` workers, a global average every
    /// `global_every` merges: an error unless the groups divide the workers and
    /// `global_every ≥ 1`.
    pub fn new(groups: usize, global_every: u64, workers: usize) -> Result<Self, RuleError> {
        if !(groups > 0 && workers.is_multiple_of(groups) && global_every > 0) {
            let reason = format!("{groups} groups, global every {global_every} merges, for {workers} workers");
            return Err(RuleError::BadState { rule: HierarchicalConfig::NAME, reason });
        }
        Ok(Self { groups, global_every, workers, group: None, sum: Vec::new() })
    }
}

impl MergeRule for Hierarchical {
    fn start(&mut self, _initial: &[f32], ctx: &SyncContext, _comm: &mut dyn Communicator) -> Result<(), RuleError> {
        check_world_size(HierarchicalConfig::NAME, self.workers, ctx)
    }

    /// Splits the group communicator on the first merge, then averages at this merge's level.
    fn merge(&mut self, params: &mut [f32], ctx: &SyncContext, comm: &mut dyn Communicator) -> Merged {
        check_world_size(HierarchicalConfig::NAME, self.workers, ctx)?;
        if self.group.is_none() {
            let size = ctx.world_size / self.groups;
            self.group = Some(comm.split(ctx.rank / size)?);
        }
        let global = (ctx.round + 1).is_multiple_of(self.global_every);
        self.sum.resize(params.len(), 0.0);
        let group = self.group.as_mut().expect("split above");
        let members = if global { ctx.world_size } else { group.world_size() };
        let level: &mut dyn Communicator = if global { comm } else { group.as_mut() };
        level.all_reduce_sum_into(params, &mut self.sum)?;
        let local = replace_by_mean(params, &self.sum, members);
        Ok(MergeOutcome { local_squared_distance: global.then_some(local), trigger: None })
    }

    fn measures_consensus(&self) -> bool {
        true
    }
}

impl MatrixForm for Hierarchical {
    fn mixing_second_moment(&self, world_size: usize) -> Option<MixingMatrix> {
        // k − 1 group merges (block-diagonal J_{m/G}, its own square) and one global J per cycle.
        let size = world_size / self.groups.max(1);
        let mut entries = vec![0.0; world_size * world_size];
        let k = self.global_every as f64;
        for i in 0..world_size {
            for j in 0..world_size {
                let group = if i / size == j / size { (k - 1.0) / size as f64 } else { 0.0 };
                entries[i * world_size + j] = (group + 1.0 / world_size as f64) / k;
            }
        }
        Some(MixingMatrix::from_dense_unchecked(world_size, entries))
    }

    fn expected_bytes_per_merge(&self, values: usize, world_size: usize) -> Option<f64> {
        let bytes = 4 * values as u64;
        let group = Traffic::ring_all_reduce(bytes, world_size / self.groups.max(1)) as f64;
        let global = Traffic::ring_all_reduce(bytes, world_size) as f64;
        let k = self.global_every as f64;
        Some(((k - 1.0) * group + global) / k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::InProcessGroup;
    use crate::launch::run_group;
    use crate::rules::averaging::Averaging;
    use crate::schedule::fixed::PeriodicSchedule;
    use crate::sync::Synchronizer;
    use crate::testing::worker_buffer;

    /// Every worker's buffer after each of `merges` merges of `rule()` (the buffer moved a little
    /// before each merge, as local steps would).
    fn trajectories<R: MergeRule + 'static>(
        m: usize,
        merges: usize,
        rule: impl Fn() -> R + Sync,
    ) -> Vec<Vec<Vec<u32>>> {
        let comms = InProcessGroup::new(m).into_communicators();
        run_group(comms, |rank, comm| -> Result<_, crate::CoopError> {
            let mut sync = Synchronizer::new(rule(), PeriodicSchedule::every(1).unwrap(), comm)?;
            let mut params = worker_buffer(rank, 41);
            let mut states = Vec::new();
            for round in 0..merges {
                params.iter_mut().enumerate().for_each(|(k, v)| *v += worker_buffer(rank + round, 41)[k] * 0.1);
                sync.merge_flat(&mut params)?;
                states.push(params.iter().map(|v| v.to_bits()).collect());
            }
            Ok(states)
        })
        .unwrap()
    }

    #[test]
    fn one_group_is_averaging_bit_for_bit() {
        let hierarchical =
            trajectories(4, 5, || HierarchicalConfig { groups: Some(1), global_every: Some(3) }.build(4).unwrap());
        let averaging = trajectories(4, 5, Averaging::new);
        assert_eq!(hierarchical, averaging);
    }

    #[test]
    fn one_worker_per_group_is_averaging_every_k_merges() {
        let states =
            trajectories(4, 4, || HierarchicalConfig { groups: Some(4), global_every: Some(2) }.build(4).unwrap());
        for round in 0..4 {
            let equal = states.windows(2).all(|w| w[0][round] == w[1][round]);
            assert_eq!(equal, round % 2 == 1, "merge {}: everyone equal only on global merges", round + 1);
        }
    }

    #[test]
    fn group_merges_average_within_groups_only() {
        let states =
            trajectories(4, 3, || HierarchicalConfig { groups: Some(2), global_every: Some(3) }.build(4).unwrap());
        for round in [0, 1] {
            assert_eq!(states[0][round], states[1][round]);
            assert_eq!(states[2][round], states[3][round]);
            assert_ne!(states[0][round], states[2][round]);
        }
        assert!(states.windows(2).all(|w| w[0][2] == w[1][2]), "the third merge is global");
    }

    #[test]
    fn bytes_are_counted_per_level() {
        let (m, n) = (4, 41);
        let comms = InProcessGroup::new(m).into_communicators();
        let reports = run_group(comms, |_, comm| -> Result<_, crate::CoopError> {
            let rule = HierarchicalConfig { groups: Some(2), global_every: Some(2) }.build(m).unwrap();
            let mut sync = Synchronizer::new(rule, PeriodicSchedule::every(1).unwrap(), comm)?;
            let mut params = worker_buffer(0, n);
            (0..4).map(|_| sync.merge_flat(&mut params)).collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
        // A ring all-reduce in a group of two: 2 (2 − 1) / 2 of the model each way.
        let group_all_reduce = 4 * n as u64;
        for worker in reports {
            let levels: Vec<u64> = worker.iter().map(|r| r.subgroup_bytes_sent).collect();
            assert_eq!(levels, [group_all_reduce, 0, group_all_reduce, 0], "group merges inside the group only");
            let global_all_reduce = 2 * (4 - 1) * 4 * n as u64 / 4;
            assert!(worker[1].bytes_sent >= global_all_reduce, "{}", worker[1].bytes_sent);
        }
    }

    #[test]
    fn the_theory_matches_the_merges() {
        let make = || HierarchicalConfig { groups: Some(2), global_every: Some(3) }.build(4).unwrap();
        let measured = crate::testing::measured_bytes_per_merge(4, 40, 6, make);
        assert_eq!(make().expected_bytes_per_merge(40, 4), Some(measured));
        // The second moment of the cycle: two group merges and one global one.
        let rule = make();
        let block = |i: usize, j: usize| if i / 2 == j / 2 { 0.5 } else { 0.0 };
        let gram = rule.mixing_second_moment(4).unwrap();
        for i in 0..4 {
            for j in 0..4 {
                assert!((gram.get(i, j) - (2.0 * block(i, j) + 0.25) / 3.0).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let error = HierarchicalConfig { groups: Some(3), global_every: None }.build(4).err().unwrap();
        assert_eq!(error.option, "groups");
        let error = HierarchicalConfig { groups: Some(2), global_every: Some(0) }.build(4).err().unwrap();
        assert_eq!(error.option, "global-every");
        let error = Hierarchical::new(3, 2, 4).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot restore the hierarchical rule's state: 3 groups, global every 2 merges, for 4 workers"
        );
        assert!(Hierarchical::new(0, 2, 4).is_err() && Hierarchical::new(2, 0, 4).is_err());
        let mismatch = RuleError::WorldSizeMismatch { rule: "hierarchical", expected: 4, found: 6 };
        let refused = crate::testing::refusals(Hierarchical::new(2, 2, 4).unwrap(), 6);
        assert_eq!(refused, [Some(mismatch.clone()), Some(mismatch)]);
    }
}
