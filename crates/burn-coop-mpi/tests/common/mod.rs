//! Comparison of MPI outcomes with the in-process reference.
#![allow(dead_code)]

use std::path::Path;

use burn_coop::comm::InProcessGroup;
use burn_coop_mpi::testing::{Outcome, STEPS, Scenario, TAU, flat, tiny_for};

const TOLERANCE: f32 = 1e-6;

/// Every scenario's outcomes on `m` in-process worker threads.
pub fn in_process(scenario: Scenario, m: usize) -> Vec<Outcome> {
    let comms = InProcessGroup::new(m).into_communicators();
    burn_coop::run_group(comms, |_, comm| scenario.run(comm).map(|(outcome, _)| outcome))
        .unwrap_or_else(|failure| panic!("in-process run failed: {:?}", failure.primary()))
}

fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (k, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= TOLERANCE, "{what}: value {k} is {a} over MPI but {e} in process");
    }
}

/// Checks the outcomes `m` MPI ranks wrote into `dir` against `m` in-process workers:
/// parameters and anchors to 1e-6, merge counts and traffic counters exactly.
pub fn check_against_in_process(dir: &Path, m: usize) {
    for scenario in Scenario::ALL {
        let expected = in_process(scenario, m);
        let name = scenario.name();
        let mpi: Vec<Outcome> = (0..m).map(|rank| Outcome::load(dir, scenario, rank).unwrap()).collect();
        for rank in 0..m {
            let (got, want) = (&mpi[rank], &expected[rank]);
            assert_eq!((got.rank, got.world_size), (rank, m), "{name}");
            assert_eq!(got.syncs, want.syncs, "{name} rank {rank}: merges");
            assert_eq!(got.syncs, STEPS / TAU);
            assert_eq!(got.traffic, want.traffic, "{name} rank {rank}: traffic counters");
            assert!(got.traffic.bytes_sent > 0);
            assert_close(&got.params(), &want.params(), &format!("{name} rank {rank} params"));
            match (got.anchor(), want.anchor()) {
                (None, None) => {}
                (Some(a), Some(b)) => assert_close(&a, &b, &format!("{name} rank {rank} anchor")),
                other => panic!("{name} rank {rank}: anchors differ in presence: {other:?}"),
            }
            let (c_got, c_want) = (got.consensus_distance.unwrap(), want.consensus_distance.unwrap());
            assert!((c_got - c_want).abs() <= 1e-6 * (1.0 + c_want.abs()), "{name} rank {rank}: {c_got} vs {c_want}");
        }
        // The workers really trained: the result differs from the start.
        assert_ne!(mpi[0].params(), flat(&tiny_for(0)), "{name}");
        match scenario {
            Scenario::Averaging => {
                // After the last merge every rank holds the same average model.
                for rank in 1..m {
                    assert_close(&mpi[rank].params(), &mpi[0].params(), &format!("{name}: rank {rank} vs rank 0"));
                }
            }
            Scenario::Elastic | Scenario::ElasticCommonStart => {
                // Every rank keeps its own copy of the anchor; the copies stay equal.
                let anchor0 = mpi[0].anchor().unwrap();
                for rank in 1..m {
                    assert_close(&mpi[rank].anchor().unwrap(), &anchor0, &format!("{name}: anchor of rank {rank}"));
                }
                assert_ne!(mpi[0].params(), mpi[1].params(), "{name}: elastic workers stay apart");
            }
            Scenario::GossipRing => {
                assert_ne!(mpi[0].params(), mpi[2].params(), "{name}: gossip does not reach consensus at once");
            }
            _ => {}
        }
    }
}
