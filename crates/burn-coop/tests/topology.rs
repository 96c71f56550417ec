//! Topologies, mixing matrices, their spectra and every validation error.

use std::f64::consts::PI;

use burn::optim::SgdConfig;
use burn_coop::{
    CoopError, LocalSgd,
    comm::InProcessGroup,
    mixing::{MixingError, MixingMatrix},
    rules::{MatrixForm, RuleError, averaging::Averaging, elastic::Elastic, gossip::Gossip},
    schedule::{ScheduleError, fixed::PeriodicSchedule},
    topology::{Topology, TopologyError, TopologyKind, WeightRule},
};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn ring_zeta_matches_the_closed_form() {
    for m in 4..=16 {
        let w = Topology::ring(m).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
        assert!(close(w.get(0, 1), 1.0 / 3.0) && close(w.get(0, 0), 1.0 / 3.0));
        let expected = (1.0 + 2.0 * (2.0 * PI / m as f64).cos()) / 3.0;
        assert!(close(w.zeta().unwrap(), expected), "m = {m}: ζ = {} expected {expected}", w.zeta().unwrap());
        assert!(close(w.spectral_gap().unwrap(), 1.0 - expected));
    }
}

#[test]
fn complete_graph_is_exact_averaging() {
    for m in [1, 2, 5, 8] {
        let w = Topology::complete(m).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
        assert!(w.to_rows().concat().iter().all(|&v| close(v, 1.0 / m as f64)));
        assert!(w.zeta().unwrap().abs() < 1e-9, "m = {m}");
        assert!(MixingMatrix::averaging(m).zeta().unwrap().abs() < 1e-9);
    }
}

#[test]
fn torus_zeta_matches_the_closed_form() {
    // k x k torus with weights 1/5: eigenvalues (1 + 2cos(2πa/k) + 2cos(2πb/k)) / 5.
    for k in [3, 4, 5] {
        let w = Topology::torus(k, k).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
        let mut expected: f64 = 0.0;
        for a in 0..k {
            for b in 0..k {
                if a + b > 0 {
                    let c = |x: usize| (2.0 * PI * x as f64 / k as f64).cos();
                    expected = expected.max(((1.0 + 2.0 * c(a) + 2.0 * c(b)) / 5.0).abs());
                }
            }
        }
        assert!(close(w.zeta().unwrap(), expected), "k = {k}");
    }
    assert_eq!(Topology::torus_for(6).unwrap().kind(), &TopologyKind::Torus { rows: 2, cols: 3 });
    assert_eq!(Topology::torus_for(16).unwrap().kind(), &TopologyKind::Torus { rows: 4, cols: 4 });
}

#[test]
fn exponential_graph_has_log_degree_and_a_larger_gap_than_the_ring() {
    let topology = Topology::exponential(16).unwrap();
    // Hops 1, 2, 4, 8 in both directions; 8 and −8 coincide.
    assert_eq!(topology.neighbors(0).collect::<Vec<_>>(), vec![1, 2, 4, 8, 12, 14, 15]);
    let w = topology.mixing_matrix(WeightRule::MetropolisHastings).unwrap();
    let ring = Topology::ring(16).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
    assert!(w.spectral_gap().unwrap() > 4.0 * ring.spectral_gap().unwrap());
}

#[test]
fn best_constant_weights_never_do_worse_than_metropolis_hastings() {
    let star =
        Topology::from_adjacency((0..5).map(|i| (0..5).map(|j| i != j && (i == 0 || j == 0)).collect()).collect())
            .unwrap();
    for topology in [Topology::ring(8).unwrap(), Topology::torus(3, 4).unwrap(), star] {
        let mh = topology.mixing_matrix(WeightRule::MetropolisHastings).unwrap();
        let best = topology.mixing_matrix(WeightRule::BestConstant).unwrap();
        assert!(
            best.zeta().unwrap() <= mh.zeta().unwrap() + 1e-9,
            "{topology}: {} > {}",
            best.zeta().unwrap(),
            mh.zeta().unwrap()
        );
    }
    // A star's best α = 2/(1 + 5) would give the hub weight 1 − 4/3 < 0: capped at 1/4.
    let star =
        Topology::from_adjacency((0..5).map(|i| (0..5).map(|j| i != j && (i == 0 || j == 0)).collect()).collect())
            .unwrap();
    let capped = star.mixing_matrix(WeightRule::BestConstant).unwrap();
    assert!(close(capped.get(0, 0), 0.0) && close(capped.get(0, 1), 0.25) && close(capped.get(1, 1), 0.75));
    // Ring of 8: L has λ₂ = 2 − 2cos(2π/8) and λ_max = 4, so α = 2/(6 − √2).
    let best = Topology::ring(8).unwrap().mixing_matrix(WeightRule::BestConstant).unwrap();
    assert!(close(best.get(0, 1), 2.0 / (6.0 - 2f64.sqrt())));
}

#[test]
fn small_rings_collapse_duplicate_edges() {
    let two = Topology::ring(2).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
    assert_eq!(two.to_rows(), vec![vec![0.5, 0.5], vec![0.5, 0.5]]);
    let one = Topology::ring(1).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
    assert_eq!(one.to_rows(), vec![vec![1.0]]);
    assert_eq!(one.zeta().unwrap(), 0.0);
}

#[test]
fn every_mixing_matrix_error_names_the_problem() {
    let cases: Vec<(Vec<Vec<f64>>, MixingError)> = vec![
        (vec![], MixingError::Empty),
        (vec![vec![1.0, 0.0], vec![1.0]], MixingError::NotSquare { row: 1, len: 1, rows: 2 }),
        (vec![vec![f64::NAN, 1.0], vec![1.0, 0.0]], MixingError::NotFinite { row: 0, col: 0, value: f64::NAN }),
        (vec![vec![1.5, -0.5], vec![-0.5, 1.5]], MixingError::Negative { row: 0, col: 1, value: -0.5 }),
        (vec![vec![0.5, 0.4], vec![0.4, 0.5]], MixingError::RowSum { row: 0, sum: 0.9 }),
        (vec![vec![0.5, 0.5], vec![0.0, 1.0]], MixingError::ColumnSum { col: 0, sum: 0.5 }),
        (
            vec![vec![0.5, 0.5, 0.0], vec![0.0, 0.5, 0.5], vec![0.5, 0.0, 0.5]],
            MixingError::NotSymmetric { row: 0, col: 1, upper: 0.5, lower: 0.0 },
        ),
        (
            vec![
                vec![1.0, 0.0, 0.0, 0.0],
                vec![0.0, 1.0, 0.0, 0.0],
                vec![0.0, 0.0, 0.5, 0.5],
                vec![0.0, 0.0, 0.5, 0.5],
            ],
            MixingError::Disconnected { unreachable: 1, components: 3 },
        ),
    ];
    for (rows, expected) in cases {
        let error = MixingMatrix::new(rows).unwrap_err();
        match (&error, &expected) {
            (MixingError::NotFinite { row, col, value }, MixingError::NotFinite { row: r, col: c, .. }) => {
                assert!(row == r && col == c && value.is_nan());
            }
            (MixingError::RowSum { row, sum }, MixingError::RowSum { row: r, sum: s }) => {
                assert!(row == r && (sum - s).abs() < 1e-12);
            }
            _ => assert_eq!(error, expected),
        }
    }
    let message = MixingMatrix::new(vec![vec![0.5, 0.4], vec![0.4, 0.5]]).unwrap_err().to_string();
    assert_eq!(message, "mixing matrix row 0 sums to 0.9, not 1");
    let message = MixingMatrix::new(vec![vec![1.0, 0.0], vec![0.0, 1.0]]).unwrap_err().to_string();
    assert!(message.contains("worker 1 cannot be reached from worker 0"), "{message}");
}

#[test]
fn every_topology_error_names_the_problem() {
    assert_eq!(Topology::ring(0), Err(TopologyError::NoWorkers));
    assert_eq!(Topology::torus(0, 3), Err(TopologyError::EmptyTorus { rows: 0, cols: 3 }));
    assert_eq!(
        Topology::new(5, TopologyKind::Torus { rows: 2, cols: 3 }),
        Err(TopologyError::TorusSize { rows: 2, cols: 3, product: 6, workers: 5 })
    );
    assert_eq!(Topology::torus_for(7), Err(TopologyError::NoSquareishTorus { workers: 7 }));
    assert_eq!(
        Topology::from_adjacency(vec![vec![false, true], vec![false]]),
        Err(TopologyError::AdjacencyNotSquare { row: 1, len: 1, rows: 2 })
    );
    assert_eq!(
        Topology::from_adjacency(vec![vec![false, true], vec![false, false]]),
        Err(TopologyError::AdjacencyNotSymmetric { row: 0, col: 1, forward: true, backward: false })
    );
    let split = vec![
        vec![false, true, false, false],
        vec![true, false, false, false],
        vec![false, false, false, true],
        vec![false, false, true, false],
    ];
    assert_eq!(Topology::from_adjacency(split), Err(TopologyError::Disconnected { unreachable: 2, components: 2 }));
}

#[test]
fn rule_and_schedule_errors_surface_when_built_or_started() {
    assert_eq!(PeriodicSchedule::every(0), Err(ScheduleError::ZeroPeriod));
    let transport = || InProcessGroup::new(4).into_communicators().remove(0);
    let every = || PeriodicSchedule::every(2).unwrap();
    // α must lie in (0, 2/(m+1)) = (0, 0.4) for 4 workers.
    for alpha in [0.0, -0.1, 0.4, 0.5, f64::NAN] {
        let error = Elastic::new(alpha, 4).unwrap_err();
        assert!(
            matches!(error, RuleError::ElasticAlphaOutOfRange { workers: 4, upper, .. } if (upper - 0.4).abs() < 1e-12),
            "α = {alpha}: {error}"
        );
    }
    assert!(LocalSgd::new(SgdConfig::new().init(), Elastic::new(0.39, 4).unwrap(), every(), transport()).is_ok());
    assert!(LocalSgd::new(SgdConfig::new().init(), Elastic::optimal(4).unwrap(), every(), transport()).is_ok());
    // A rule built for 5 workers refuses to start with 4.
    let ring5 = Gossip::on(&Topology::ring(5).unwrap()).unwrap();
    let mut optim = LocalSgd::new(SgdConfig::new().init(), ring5, every(), transport()).unwrap();
    let error = optim.synchronizer().start_flat(&[0.0; 3]).unwrap_err();
    assert!(matches!(error, CoopError::Rule(RuleError::WorldSizeMismatch { expected: 5, found: 4, .. })), "{error}");
    assert_eq!(error.to_string(), "the gossip rule was built for 5 workers but the communicator has 4");
    assert!(LocalSgd::new(SgdConfig::new().init(), Averaging::new(), every(), transport()).is_ok());
}

#[test]
fn elastic_optimum_minimizes_zeta() {
    for m in [2, 4, 8] {
        let best = Elastic::optimal(m).unwrap();
        let zeta = |alpha: f64| Elastic::new(alpha, m).unwrap().mixing_matrix(m).unwrap().zeta().unwrap();
        let at_best = best.mixing_matrix(m).unwrap().zeta().unwrap();
        assert!(close(at_best, m as f64 / (m as f64 + 2.0)), "m = {m}: ζ* = {at_best}");
        for alpha in [0.5 * best.alpha(), 0.9 * best.alpha(), 1.1 * best.alpha()] {
            assert!(zeta(alpha) > at_best);
        }
    }
}

#[test]
fn large_graphs_mix_sparse_and_circulant_ones_have_their_spectrum_in_closed_form() {
    use burn_coop::mixing::{MAX_DENSE_ORDER, MAX_NONZEROS};
    let m = 100_000;
    let ring = Topology::ring(m).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
    assert_eq!(ring.nonzeros(), 3 * m, "a ring of {m} holds three entries a row");
    let expected = (1.0 + 2.0 * (2.0 * PI / m as f64).cos()) / 3.0;
    assert!((ring.zeta().unwrap() - expected).abs() < 1e-12, "{} vs {expected}", ring.zeta().unwrap());
    let exponential = Topology::exponential(4096).unwrap().mixing_matrix(WeightRule::BestConstant).unwrap();
    assert!(exponential.zeta().unwrap() < 0.9);
    // Just above the dense bound, the closed form agrees with Jacobi's method just below it.
    for m in [MAX_DENSE_ORDER, MAX_DENSE_ORDER + 1] {
        let w = Topology::ring(m).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
        let expected = (1.0 + 2.0 * (2.0 * PI / m as f64).cos()) / 3.0;
        assert!((w.zeta().unwrap() - expected).abs() < 1e-9, "m = {m}");
    }
    // A torus is block-circulant: ζ = 1 − (2 − 2cos(2π/400))/5 along its longer side.
    let torus = Topology::torus(250, 400).unwrap().mixing_matrix(WeightRule::MetropolisHastings).unwrap();
    assert_eq!(torus.nonzeros(), 5 * m);
    let expected = (3.0 + 2.0 * (2.0 * PI / 400.0).cos()) / 5.0;
    assert!((torus.zeta().unwrap() - expected).abs() < 1e-12, "{} vs {expected}", torus.zeta().unwrap());
    // Just above the dense bound the closed form agrees with the torus of the dense range.
    let (small, large) = (Topology::torus(16, 16).unwrap(), Topology::torus(17, 16).unwrap());
    for (topology, rows) in [(small, 16.0), (large, 17.0)] {
        let w = topology.mixing_matrix(WeightRule::MetropolisHastings).unwrap();
        let expected = (3.0 + 2.0 * (2.0 * PI / rows).cos()) / 5.0;
        assert!((w.zeta().unwrap() - expected).abs() < 1e-9, "{rows} x 16");
    }
    // A circulant matrix that is not symmetric (one-peer exponential) has complex eigenvalues:
    // refused, while its second moment, symmetric, has its closed form.
    let one_peer = burn_coop::topology::one_peer_exponential_matrix(1024, 0);
    assert!(matches!(one_peer.eigenvalues(), Err(MixingError::SpectrumTooLarge { order: 1024, .. })));
    assert!(one_peer.gram().zeta().unwrap() < 1.0);
    // A complete graph of that size would not fit.
    let error = Topology::complete(m).unwrap_err();
    assert!(matches!(error, TopologyError::TooLarge { workers: 100_000, nonzeros: 10_000_000_000 }));
    let message = error.to_string();
    assert!(message.contains("152587 MiB") && message.contains(&format!("at most {MAX_NONZEROS}")), "{message}");
}
