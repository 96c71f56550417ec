//! One merge of m = 4 workers equals `X · W` computed independently, for every rule.

mod common;

use burn::optim::SgdConfig;
use burn_coop::state::StateRecord;
use burn_coop::{
    LocalSgd,
    mixing::MixingMatrix,
    rules::{MatrixForm, MergeRule, averaging::Averaging, elastic::Elastic, gossip::Gossip},
    schedule::fixed::PeriodicSchedule,
    topology::Topology,
};
use common::{assert_close, fixed_grads, flat, run_workers, tiny_for};

const M: usize = 4;
const LR: f64 = 0.05;

/// The columns `x_i − η g_i` of every worker after one plain SGD step, computed on the host.
/// Buffers (BatchNorm running statistics) have no gradient and stay as they are.
fn pre_merge_columns() -> Vec<Vec<f64>> {
    (0..M)
        .map(|rank| {
            let model = tiny_for(rank);
            let x = flat(&model);
            let layout = burn_coop::params::ParamLayout::of(&model, burn_coop::params::BufferPolicy::Merge);
            let mut column: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            for slot in layout.slots().iter().filter(|s| s.role == burn_coop::params::TensorRole::Parameter) {
                let offset = slot.offset.unwrap();
                for k in offset..offset + slot.len() {
                    column[k] -= LR * f64::from(common::value(rank, k, 100));
                }
            }
            column
        })
        .collect()
}

/// `Y = X W` for columns `X` and a row-major `order × order` matrix `w`.
fn times(columns: &[Vec<f64>], w: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let d = columns[0].len();
    (0..w.len()).map(|j| (0..d).map(|k| (0..w.len()).map(|i| columns[i][k] * w[i][j]).sum()).collect()).collect()
}

/// Runs one local step with τ = 1 on every worker and returns their merged flat models and
/// the rule state of worker 0.
fn one_merge<R: MergeRule + 'static>(rule: impl Fn() -> R + Sync) -> (Vec<Vec<f32>>, StateRecord) {
    let results = run_workers(M, |rank, comm| {
        let model = tiny_for(rank);
        let mut optim = LocalSgd::new(SgdConfig::new().init(), rule(), PeriodicSchedule::every(1).unwrap(), comm)
            .unwrap()
            .with_initial_broadcast(false);
        let grads = fixed_grads(&model, rank, 0);
        let model = optim.step(LR, model, grads).unwrap();
        assert_eq!(optim.stats().syncs, 1);
        (flat(&model), optim.state().records.records["rule"].clone())
    });
    let state = results[0].1.clone();
    (results.into_iter().map(|r| r.0).collect(), state)
}

fn graph_matrix(edges: &[(usize, usize)], weight: f64) -> Vec<Vec<f64>> {
    let mut w = vec![vec![0.0; M]; M];
    for &(i, j) in edges {
        w[i][j] = weight;
        w[j][i] = weight;
    }
    for (i, row) in w.iter_mut().enumerate() {
        row[i] = 1.0 - row.iter().sum::<f64>();
    }
    w
}

#[test]
fn averaging_equals_x_times_j() {
    let expected = times(&pre_merge_columns(), &vec![vec![0.25; M]; M]);
    let (merged, _) = one_merge(Averaging::new);
    for rank in 0..M {
        assert_close(&merged[rank], &expected[rank], 1e-6, &format!("averaging worker {rank}"));
    }
}

#[test]
fn gossip_on_ring_equals_x_times_w() {
    let w = graph_matrix(&[(0, 1), (1, 2), (2, 3), (3, 0)], 1.0 / 3.0);
    let expected = times(&pre_merge_columns(), &w);
    let (merged, _) = one_merge(|| Gossip::on(&Topology::ring(M).unwrap()).unwrap());
    for rank in 0..M {
        assert_close(&merged[rank], &expected[rank], 1e-6, &format!("ring gossip worker {rank}"));
    }
}

#[test]
fn gossip_on_torus_equals_x_times_w() {
    // A 2 x 2 torus links (0,0)-(0,1), (0,0)-(1,0), (0,1)-(1,1), (1,0)-(1,1).
    let w = graph_matrix(&[(0, 1), (0, 2), (1, 3), (2, 3)], 1.0 / 3.0);
    let expected = times(&pre_merge_columns(), &w);
    let (merged, _) = one_merge(|| Gossip::on(&Topology::torus(2, 2).unwrap()).unwrap());
    for rank in 0..M {
        assert_close(&merged[rank], &expected[rank], 1e-6, &format!("torus gossip worker {rank}"));
    }
}

#[test]
fn gossip_with_user_matrix_equals_x_times_w() {
    let rows =
        vec![vec![0.5, 0.2, 0.0, 0.3], vec![0.2, 0.6, 0.2, 0.0], vec![0.0, 0.2, 0.7, 0.1], vec![0.3, 0.0, 0.1, 0.6]];
    let expected = times(&pre_merge_columns(), &rows);
    let (merged, _) = one_merge(|| Gossip::new(MixingMatrix::new(rows.clone()).unwrap()));
    for rank in 0..M {
        assert_close(&merged[rank], &expected[rank], 1e-6, &format!("custom gossip worker {rank}"));
    }
}

#[test]
fn elastic_equals_x_times_w_alpha_with_anchor_column() {
    let alpha = 0.3;
    let d = flat(&tiny_for(0)).len();
    let anchor: Vec<f32> = (0..d).map(|k| common::value(9, k, 7)).collect();
    // (m+1) x (m+1): workers pulled towards the anchor, anchor towards the workers.
    let mut w = vec![vec![0.0; M + 1]; M + 1];
    for i in 0..M {
        w[i][i] = 1.0 - alpha;
        w[i][M] = alpha;
        w[M][i] = alpha;
    }
    w[M][M] = 1.0 - M as f64 * alpha;
    let mut columns = pre_merge_columns();
    columns.push(anchor.iter().map(|&v| f64::from(v)).collect());
    let expected = times(&columns, &w);

    let (merged, mut state) = one_merge(|| Elastic::new(alpha, M).unwrap().with_anchor(anchor.clone()));
    for rank in 0..M {
        assert_close(&merged[rank], &expected[rank], 1e-6, &format!("elastic worker {rank}"));
    }
    assert_close(&state.take_buffer("anchor").unwrap(), &expected[M], 1e-6, "elastic anchor");
}

#[test]
fn rules_report_their_mixing_matrices() {
    let j = Averaging::new().mixing_matrix(M).unwrap();
    assert!(j.to_rows().concat().iter().all(|&v| (v - 0.25).abs() < 1e-15));
    let elastic = Elastic::new(0.3, M).unwrap().mixing_matrix(M).unwrap();
    assert_eq!(elastic.order(), M + 1);
    assert!((elastic.get(M, M) - (1.0 - 4.0 * 0.3)).abs() < 1e-12);
    // Eigenvalues of W_α: 1, 1 − α (m − 1 times), 1 − (m + 1) α.
    let values = elastic.eigenvalues().unwrap();
    let mut expected: Vec<f64> = vec![1.0, 0.7, 0.7, 0.7, 1.0 - 5.0 * 0.3];
    expected.sort_by(|a, b| b.total_cmp(a));
    for (v, e) in values.iter().zip(&expected) {
        assert!((v - e).abs() < 1e-9, "{values:?}");
    }
}
