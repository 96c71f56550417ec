//! Invariants of the rules and of the optimizer wrapper.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Tensor, TensorData};
use burn_coop::params::TensorRole;
use burn_coop::rules::consensus_distance;
use burn_coop::state::StateFile;
use burn_coop::{
    CoopError, LocalSgd, LocalSgdState,
    comm::{CommError, Communicator, InProcessGroup},
    params::{BufferPolicy, ParamLayout},
    rules::{MergeRule, SyncContext, averaging::Averaging, elastic::Elastic, gossip::Gossip},
    schedule::fixed::PeriodicSchedule,
    topology::Topology,
};
use common::{fixed_grads, flat, run_workers, tiny_for, value};

fn sgd_momentum() -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
        .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
        .init()
}

/// Runs `rule` once on deterministic buffers of `m` workers; returns (before, after, measured
/// consensus distance, consensus distance after the merge).
fn merge_buffers<R: MergeRule>(m: usize, rule: impl Fn() -> R + Sync) -> Vec<(Vec<f32>, Vec<f32>, Option<f64>, f64)> {
    run_workers(m, |rank, mut comm| {
        let mut rule = rule();
        let ctx = SyncContext { rank, world_size: m, ..SyncContext::default() };
        let before: Vec<f32> = (0..257).map(|k| value(rank, k, 3)).collect();
        let mut after = before.clone();
        rule.start(&(0..257).map(|k| value(0, k, 3)).collect::<Vec<_>>(), &ctx, &mut comm).unwrap();
        // Rules that do not measure the distance themselves (gossip) have it measured before
        // the merge, as the synchronizer does when asked.
        let beforehand = (!rule.measures_consensus()).then(|| consensus_distance(&before, &mut comm).unwrap());
        let outcome = rule.merge(&mut after, &ctx, &mut comm).unwrap();
        let measured = outcome
            .local_squared_distance
            .map(|local| {
                let mut total = [local];
                comm.all_reduce_f64(&mut total).unwrap();
                total[0] / m as f64
            })
            .or(beforehand);
        let post = consensus_distance(&after, &mut comm).unwrap();
        (before, after, measured, post)
    })
}

fn worker_mean(buffers: &[Vec<f32>]) -> Vec<f64> {
    let m = buffers.len() as f64;
    (0..buffers[0].len()).map(|k| buffers.iter().map(|b| f64::from(b[k])).sum::<f64>() / m).collect()
}

fn independent_consensus(buffers: &[Vec<f32>]) -> f64 {
    let mean = worker_mean(buffers);
    buffers.iter().map(|b| b.iter().zip(&mean).map(|(&x, &avg)| (f64::from(x) - avg).powi(2)).sum::<f64>()).sum::<f64>()
        / buffers.len() as f64
}

#[test]
fn averaging_preserves_the_mean_and_reaches_consensus() {
    let results = merge_buffers(4, Averaging::new);
    let before: Vec<_> = results.iter().map(|r| r.0.clone()).collect();
    let after: Vec<_> = results.iter().map(|r| r.1.clone()).collect();
    common::assert_close(&after[0], &worker_mean(&before), 1e-6, "average");
    assert!(after.iter().all(|a| a == &after[0]), "all workers hold the same bits after averaging");
    let expected = independent_consensus(&before);
    for (_, _, measured, post) in &results {
        assert!((measured.unwrap() - expected).abs() < 1e-6 * expected, "{measured:?} vs {expected}");
        assert_eq!(*post, 0.0, "consensus distance after averaging");
    }
    assert!(expected > 0.1, "the workers started apart");
}

#[test]
fn gossip_preserves_the_mean_and_shrinks_the_distance() {
    for topology in [Topology::ring(6).unwrap(), Topology::exponential(6).unwrap(), Topology::torus(2, 3).unwrap()] {
        let results = merge_buffers(6, || Gossip::on(&topology).unwrap());
        let before: Vec<_> = results.iter().map(|r| r.0.clone()).collect();
        let after: Vec<_> = results.iter().map(|r| r.1.clone()).collect();
        let (mean_before, mean_after) = (worker_mean(&before), worker_mean(&after));
        for (a, b) in mean_after.iter().zip(&mean_before) {
            assert!((a - b).abs() < 1e-6, "{topology}: mean moved from {b} to {a}");
        }
        let (d_before, d_after) = (independent_consensus(&before), independent_consensus(&after));
        assert!((results[0].2.unwrap() - d_before).abs() < 1e-6 * d_before);
        assert!((results[0].3 - d_after).abs() < 1e-6 * d_before);
        // One gossip round contracts the disagreement by at least ζ².
        let zeta = topology.mixing_matrix(Default::default()).unwrap().zeta().unwrap();
        assert!(d_after <= zeta * zeta * d_before * (1.0 + 1e-6), "{topology}: {d_after} > ζ² {d_before}");
    }
}

#[test]
fn elastic_preserves_the_mean_of_workers_and_anchor() {
    let m = 4;
    let results = merge_buffers(m, || Elastic::new(0.2, m).unwrap());
    let anchor: Vec<f64> = (0..257).map(|k| f64::from(value(0, k, 3))).collect();
    let before: Vec<_> = results.iter().map(|r| r.0.clone()).collect();
    let after: Vec<_> = results.iter().map(|r| r.1.clone()).collect();
    for k in 0..257 {
        let sum_before: f64 = before.iter().map(|b| f64::from(b[k])).sum::<f64>() + anchor[k];
        let sum_workers_after: f64 = after.iter().map(|a| f64::from(a[k])).sum();
        // z' = z + α Σ (x_i − z); check Σ x_i' + z' = Σ x_i + z.
        let anchor_after = anchor[k] + 0.2 * before.iter().map(|b| f64::from(b[k]) - anchor[k]).sum::<f64>();
        assert!((sum_workers_after + anchor_after - sum_before).abs() < 1e-5);
    }
}

#[test]
fn one_worker_is_bit_identical_to_the_bare_optimizer() {
    for (name, optimizer) in [("sgd", sgd_momentum()), ("adam", AdamConfig::new().init())] {
        let mut bare = optimizer.clone();
        let mut bare_model = tiny_for(0);
        let mut transports = InProcessGroup::new(1).into_communicators();
        let mut wrapped =
            LocalSgd::new(optimizer, Averaging::new(), PeriodicSchedule::every(3).unwrap(), transports.remove(0))
                .unwrap();
        let mut wrapped_model = tiny_for(0);
        for step in 0..10 {
            bare_model = bare.step(0.1, bare_model, fixed_grads(&tiny_for(0), 0, step));
            wrapped_model = wrapped.step(0.1, wrapped_model, fixed_grads(&tiny_for(0), 0, step)).unwrap();
            let (a, b) = (flat(&bare_model), flat(&wrapped_model));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: step {step} differs");
        }
        assert_eq!(wrapped.stats().syncs, 3);
    }
}

#[test]
fn tau_one_averaging_equals_synchronous_sgd_on_averaged_gradients() {
    let m = 4;
    let steps = 5;
    let models = run_workers(m, move |rank, comm| {
        let mut optim = LocalSgd::synchronous(sgd_momentum(), comm);
        let mut model = tiny_for(0);
        for step in 0..steps {
            model = {
                let grads = fixed_grads(&model, rank, step);
                optim.step(0.05, model, grads)
            }
            .unwrap();
        }
        flat(&model)
    });
    // One model, one optimizer, gradients averaged over the workers.
    let mut optim = sgd_momentum();
    let mut model = tiny_for(0);
    let layout = ParamLayout::of(&model, BufferPolicy::Merge);
    for step in 0..steps {
        let mut grads = GradientsParams::new();
        for slot in layout.slots().iter().filter(|s| s.role == TensorRole::Parameter) {
            let offset = slot.offset.unwrap();
            let values: Vec<f32> = (0..slot.len())
                .map(|k| (0..m).map(|r| value(r, offset + k, 100 + step)).sum::<f32>() / m as f32)
                .collect();
            let data = TensorData::new(values, slot.shape.clone());
            let plain = burn::tensor::Device::flex();
            match slot.shape.len() {
                1 => grads.register::<1>(slot.id, Tensor::from_data(data, &plain)),
                _ => grads.register::<2>(slot.id, Tensor::from_data(data, &plain)),
            }
        }
        model = optim.step(0.05, model, grads);
    }
    let reference: Vec<f64> = flat(&model).iter().map(|&v| f64::from(v)).collect();
    for (rank, worker) in models.iter().enumerate() {
        common::assert_close(worker, &reference, 1e-5, &format!("worker {rank}"));
    }
}

#[test]
fn sync_counts_follow_the_schedule() {
    let counts = run_workers(2, |rank, comm| {
        let mut optim =
            LocalSgd::new(sgd_momentum(), Averaging::new(), PeriodicSchedule::every(4).unwrap(), comm).unwrap();
        let mut model = tiny_for(rank);
        let mut synced_at = Vec::new();
        for step in 0..8 {
            model = {
                let grads = fixed_grads(&model, rank, step);
                optim.step(0.01, model, grads)
            }
            .unwrap();
            if optim.last_sync().is_some_and(|s| s.step == step + 1) {
                synced_at.push(step + 1);
            }
        }
        (optim.stats().syncs, synced_at)
    });
    assert_eq!(counts, vec![(2, vec![4, 8]), (2, vec![4, 8])]);

    let warm = run_workers(2, |rank, comm| {
        let schedule = PeriodicSchedule::every(4).unwrap().with_warmup(3);
        let mut optim = LocalSgd::new(sgd_momentum(), Averaging::new(), schedule, comm).unwrap();
        let mut model = tiny_for(rank);
        for step in 0..11 {
            model = {
                let grads = fixed_grads(&model, rank, step);
                optim.step(0.01, model, grads)
            }
            .unwrap();
        }
        optim.stats().syncs
    });
    // Steps 1, 2, 3 (warm-up), then 7 and 11.
    assert_eq!(warm, vec![5, 5]);
}

#[test]
fn traffic_counts_ring_all_reduce_bytes() {
    let m = 4;
    let reports = run_workers(m, move |rank, comm| {
        let mut optim =
            LocalSgd::new(sgd_momentum(), Averaging::new(), PeriodicSchedule::every(2).unwrap(), comm).unwrap();
        let mut model = tiny_for(rank);
        for step in 0..4 {
            model = {
                let grads = fixed_grads(&model, rank, step);
                optim.step(0.01, model, grads)
            }
            .unwrap();
        }
        (optim.stats(), flat(&model).len() as u64)
    });
    for (stats, d) in reports {
        // Per merge: the model (d f32), then the statistics: a non-finite count per worker and
        // the squared distance (m + 1 f64).
        let per_merge = 2 * 3 * (4 * d) / 4 + 2 * 3 * ((m as u64 + 1) * 8) / 4;
        // Before the first step, worker 0's model is broadcast (scatter + all-gather: (m − 1)/m
        // of the model each way).
        let broadcast = 3 * (4 * d) / 4;
        assert_eq!(stats.syncs, 2);
        assert_eq!(stats.traffic.bytes_sent, broadcast + 2 * per_merge);
        assert_eq!(stats.traffic.bytes_received, broadcast + 2 * per_merge);
        assert!(stats.last_consensus_distance.unwrap() > 0.0);
    }
}

fn running_means(model: &common::Tiny) -> Vec<f32> {
    model.bn.running_mean.value().into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn buffers_are_merged_or_kept_local_by_policy() {
    for policy in [BufferPolicy::Merge, BufferPolicy::KeepLocal] {
        let results = run_workers(2, move |rank, comm| {
            let model = tiny_for(rank);
            let before = running_means(&model);
            let ids_before: Vec<_> =
                ParamLayout::of(&model, BufferPolicy::Merge).slots().iter().map(|s| s.id).collect();
            let mut optim = LocalSgd::new(sgd_momentum(), Averaging::new(), PeriodicSchedule::every(1).unwrap(), comm)
                .unwrap()
                .with_buffer_policy(policy)
                .with_initial_broadcast(false);
            let model = optim.step(0.01, model, fixed_grads(&tiny_for(rank), rank, 0)).unwrap();
            let ids_after: Vec<_> = ParamLayout::of(&model, BufferPolicy::Merge).slots().iter().map(|s| s.id).collect();
            assert_eq!(ids_before, ids_after, "ParamIds survive the merge");
            (before, running_means(&model), model.fc1.weight.val().into_data().try_to_vec::<f32>().unwrap())
        });
        let (before0, after0, w0) = &results[0];
        let (before1, after1, w1) = &results[1];
        assert_eq!(w0, w1, "{policy:?}: weights are averaged");
        match policy {
            BufferPolicy::Merge => {
                let mean: Vec<f64> =
                    before0.iter().zip(before1).map(|(a, b)| (f64::from(*a) + f64::from(*b)) / 2.0).collect();
                common::assert_close(after0, &mean, 1e-6, "merged running mean");
                assert_eq!(after0, after1);
            }
            BufferPolicy::KeepLocal => {
                assert_eq!(after0, before0, "worker 0 keeps its running mean");
                assert_eq!(after1, before1, "worker 1 keeps its running mean");
                assert_ne!(after0, after1);
            }
        }
    }
}

#[test]
fn restored_state_continues_exactly() {
    let run = |interrupt: bool| {
        run_workers(2, move |rank, comm| {
            let rule = Elastic::new(0.25, 2).unwrap();
            let schedule = PeriodicSchedule::every(2).unwrap();
            let mut optim = LocalSgd::new(sgd_momentum(), rule, schedule, comm).unwrap();
            let mut model = tiny_for(0);
            for step in 0..6 {
                if interrupt && step == 3 {
                    // Save everything as bytes, then rebuild model and optimizer from them.
                    let saved = optim.state();
                    let counters = serde_json::to_vec(&saved.sync).unwrap();
                    let records = saved.records.to_bytes();
                    let optim_bytes = optim.to_record().into_bytes().unwrap();
                    let model_bytes = model.into_record().into_bytes().unwrap();
                    let record = burn::store::ModuleRecord::from_bytes(model_bytes).unwrap();
                    model = common::Tiny::new(&common::device()).load_record(record);
                    let state = LocalSgdState {
                        sync: serde_json::from_slice(&counters).unwrap(),
                        records: StateFile::from_bytes(&records).unwrap(),
                    };
                    let record = burn::optim::OptimizerRecord::from_bytes(optim_bytes).unwrap();
                    let comm = std::mem::replace(&mut optim, placeholder()).into_comm();
                    optim = LocalSgd::new(
                        sgd_momentum(),
                        Elastic::new(0.25, 2).unwrap(),
                        PeriodicSchedule::every(2).unwrap(),
                        comm,
                    )
                    .unwrap();
                    optim.load_state(state).unwrap();
                    optim.load_record(record);
                }
                model = {
                    let grads = fixed_grads(&model, rank, step);
                    optim.step(0.05, model, grads)
                }
                .unwrap();
            }
            (flat(&model), optim.state())
        })
    };
    let straight = run(false);
    let resumed = run(true);
    for (a, b) in straight.iter().zip(&resumed) {
        assert_eq!(a.0, b.0, "parameters after resume");
        assert_eq!(a.1, b.1, "optimizer state after resume");
    }
}

fn placeholder() -> LocalSgd {
    let comm = InProcessGroup::new(1).into_communicators().remove(0);
    LocalSgd::synchronous(SgdConfig::new().init(), comm)
}

#[test]
fn a_panicking_worker_makes_the_others_fail_fast() {
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = InProcessGroup::new(4)
        .into_communicators()
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut optim =
                    LocalSgd::new(sgd_momentum(), Averaging::new(), PeriodicSchedule::every(2).unwrap(), comm).unwrap();
                let mut model = tiny_for(rank);
                for step in 0..4 {
                    if rank == 2 && step == 1 {
                        panic!("worker 2 fails on purpose");
                    }
                    match optim.step(0.01, model, fixed_grads(&tiny_for(rank), rank, step)) {
                        Ok(next) => model = next,
                        Err(error) => {
                            tx.send((
                                rank,
                                error.to_string(),
                                matches!(error, CoopError::Comm(CommError::PeerLost { rank: 2 })),
                            ))
                            .unwrap();
                            return;
                        }
                    }
                }
                tx.send((rank, "finished".into(), false)).unwrap();
            })
        })
        .collect();
    drop(tx);
    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(rx.recv_timeout(Duration::from_secs(60)).expect("a surviving worker hung"));
    }
    reports.sort_by_key(|r| r.0);
    for (rank, message, lost_two) in &reports {
        assert!(lost_two, "worker {rank} reported: {message}");
        assert!(message.contains("worker 2 was lost"), "{message}");
    }
    let panicked: Vec<bool> = handles.into_iter().map(|h| h.join().is_err()).collect();
    assert_eq!(panicked, vec![false, false, true, false]);
}

#[test]
fn non_finite_parameters_stop_every_worker_with_the_culprit_named() {
    // The whole model in one bucket, and in buckets of two values.
    for bucket in [burn_coop::DEFAULT_BUCKET_BYTES, 8] {
        let results = run_workers(3, |rank, comm| non_finite_at_worker_1(rank, comm, bucket));
        for message in results {
            assert_eq!(message, "worker 1 has non-finite parameters at step 2 (1 of 42 values are NaN or infinite)");
        }
    }
}

/// Two steps of averaging with a NaN gradient at worker 1's second step: the error each
/// worker stops with.
fn non_finite_at_worker_1(rank: usize, comm: burn_coop::comm::InProcessComm, bucket: usize) -> String {
    let sync = burn_coop::Synchronizer::new(Averaging::new(), PeriodicSchedule::every(2).unwrap(), comm)
        .unwrap()
        .with_bucket_size(bucket);
    let mut optim = LocalSgd::with_synchronizer(SgdConfig::new().init(), sync);
    let mut model = tiny_for(rank);
    for step in 0..2 {
        let mut grads = fixed_grads(&model, rank, step);
        if rank == 1 && step == 1 {
            let id = model.fc2.bias.as_ref().unwrap().id;
            grads.register::<1>(id, Tensor::from_data([f32::NAN, 0.0], &burn::tensor::Device::flex()));
        }
        match optim.step(0.1, model, grads) {
            Ok(next) => model = next,
            Err(error) => return error.to_string(),
        }
    }
    "no error".to_string()
}

#[test]
fn a_timeout_names_the_missing_worker() {
    let mut comms = InProcessGroup::new(2).with_timeout(Duration::from_millis(200)).into_communicators();
    let _silent = comms.pop().unwrap();
    let mut first = comms.pop().unwrap();
    let error = first.barrier().unwrap_err();
    assert!(matches!(&error, CommError::Timeout { waiting_for, .. } if waiting_for == &vec![1]), "{error}");
}

#[test]
fn mismatched_buffers_are_reported() {
    let results = run_workers(2, |rank, mut comm| {
        let mut values = vec![1.0; 3 + rank];
        comm.all_reduce_sum(&mut values).unwrap_err().to_string()
    });
    assert_eq!(results[0], "worker 0 passed a buffer of 3 values but worker 1 passed 4");
    assert_eq!(results[1], "worker 1 passed a buffer of 4 values but worker 0 passed 3");
}

#[test]
fn workers_start_from_worker_zeros_model() {
    let starts = run_workers(3, |rank, comm| {
        let mut optim =
            LocalSgd::new(SgdConfig::new().init(), Averaging::new(), PeriodicSchedule::every(5).unwrap(), comm)
                .unwrap();
        let model = tiny_for(rank);
        let grads = GradientsParams::new();
        flat(&optim.step(0.1, model, grads).unwrap())
    });
    let zero = flat(&tiny_for(0));
    for start in &starts {
        assert_eq!(start, &zero);
    }
}

#[test]
fn modules_round_trip_through_flat_buffers() {
    let model = tiny_for(3);
    let layout = ParamLayout::of(&model, BufferPolicy::Merge);
    // fc1: 12 + 4, bn: gamma 4 + beta 4 + running mean 4 + running var 4, fc2: 8 + 2.
    assert_eq!(layout.len(), 42);
    assert_eq!(layout.parameter_count(), 34);
    assert_eq!(ParamLayout::of(&model, BufferPolicy::KeepLocal).len(), 34);
    // For compression: one segment per tensor, the two running statistics exact.
    let segments = layout.segments();
    assert_eq!((segments.len(), segments.count()), (42, 8));
    let exact: Vec<usize> = segments.iter().filter(|(_, s)| s.exact).map(|(range, _)| range.len()).collect();
    assert_eq!(exact, [4, 4]);
    assert_eq!(segments.compressed_ranges().map(|range| range.len()).sum::<usize>(), 34);
    let local = ParamLayout::of(&model, BufferPolicy::KeepLocal).segments();
    assert_eq!((local.len(), local.count(), local.compressed_ranges().count()), (34, 6, 6));
    // Without autodiff nothing trains: every tensor is compressed rather than all sent exact.
    let plain = ParamLayout::of(&common::Tiny::new(&burn::tensor::Device::flex()), BufferPolicy::Merge);
    assert_eq!(plain.parameter_count(), 0);
    assert_eq!(plain.segments().compressed_ranges().map(|range| range.len()).sum::<usize>(), 42);
    let values: Vec<f32> = (0..42).map(|k| k as f32 * 0.5 - 3.0).collect();
    let model = layout.unflatten(model, &values).unwrap();
    assert_eq!(layout.flatten(&model).unwrap(), values);
    assert!(model.fc1.weight.val().is_require_grad());
    assert!(!model.bn.running_var.value().is_require_grad());
    assert_eq!(model.fc1.weight.val().dims(), [3, 4]);
    let other = common::Tiny::new(&common::device());
    assert!(matches!(layout.flatten(&other), Err(burn_coop::params::LayoutError::TensorChanged { index: 0, .. })));
    assert!(matches!(
        layout.unflatten(tiny_for(0), &values[..41]),
        Err(burn_coop::params::LayoutError::BufferLength { expected: 42, found: 41 })
    ));
    // The merged module still trains: gradients reach the written-back weights.
    let x = Tensor::<2>::ones([5, 3], &common::device());
    let loss = model.forward(x).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    assert_eq!(grads.len(), 6);
    let _ = model.num_params();
}

#[test]
fn writing_back_leaves_shared_handles_alone() {
    let model = tiny_for(2);
    let layout = ParamLayout::of(&model, BufferPolicy::Merge);
    // A handle on the same weights held elsewhere (as a user's copy of the model would be).
    let kept = model.fc1.weight.val();
    let kept_values = kept.clone().into_data().try_to_vec::<f32>().unwrap();
    let written: Vec<f32> = (0..layout.len()).map(|k| 1.0 + k as f32).collect();
    let model = layout.unflatten(model, &written).unwrap();
    assert_eq!(layout.flatten(&model).unwrap(), written);
    assert_eq!(kept.into_data().try_to_vec::<f32>().unwrap(), kept_values, "a shared handle never sees the write");
    assert!(model.fc1.weight.val().is_require_grad());
    assert!(!model.bn.running_mean.value().is_require_grad());
}

/// The model of every worker after `merges` merges of `rule` (no local step between them: the
/// model each worker starts from is its own, [`tiny_for`] of its rank), as flat buffers, with
/// the layout's split into trained parameters and buffers.
fn merged_tiny<R: MergeRule + 'static>(
    m: usize,
    merges: u64,
    rule: impl Fn() -> R + Sync,
) -> (Vec<Vec<f32>>, Vec<bool>) {
    let models = run_workers(m, |rank, comm| {
        let mut sync = burn_coop::Synchronizer::new(rule(), PeriodicSchedule::every(1).unwrap(), comm)
            .unwrap()
            .with_initial_broadcast(false);
        let mut model = tiny_for(rank);
        for _ in 0..merges {
            model = sync.after_step(model, burn_coop::StepSignal::new(0.1, 1.0)).unwrap().0;
        }
        flat(&model)
    });
    let layout = ParamLayout::of(&tiny_for(0), BufferPolicy::Merge);
    let mut is_buffer = vec![false; layout.len()];
    for slot in layout.slots() {
        let offset = slot.offset.unwrap();
        is_buffer[offset..offset + slot.len()].fill(slot.role == TensorRole::Buffer);
    }
    (models, is_buffer)
}

#[test]
fn extrapolating_rules_move_trained_parameters_only_and_average_buffers() {
    use burn_coop::rules::{diloco::DiLoCo, overlap::Overlap};
    let m = 3;
    let (averaged, is_buffer) = merged_tiny(m, 1, Averaging::new);
    assert!(is_buffer.iter().any(|b| *b) && is_buffer.iter().any(|b| !*b));
    let starts: Vec<Vec<f32>> = (0..m).map(|rank| flat(&tiny_for(rank))).collect();
    let mean = worker_mean(&starts);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let buffers = |v: &[f32]| v.iter().zip(&is_buffer).filter(|(_, b)| **b).map(|(x, _)| *x).collect::<Vec<_>>();

    // DiLoCo, one merge: x_sync = z_i (each worker's own start), Δ = z_i − x̄, u = Δ, and the
    // Nesterov step z_i − lr (β u + Δ) on the weights; buffers are averaging's, bit for bit.
    let (lr, beta) = (0.7, 0.9);
    let (diloco, _) = merged_tiny(m, 1, || DiLoCo::new(lr, beta, true).unwrap());
    for (rank, model) in diloco.iter().enumerate() {
        assert_eq!(bits(&buffers(model)), bits(&buffers(&averaged[rank])), "DiLoCo buffers, worker {rank}");
        let expected: Vec<f64> = starts[rank]
            .iter()
            .zip(&mean)
            .map(|(&z, &mean)| f64::from(z) - lr * (1.0 + beta) * (f64::from(z) - mean))
            .collect();
        for (k, (&got, want)) in model.iter().zip(&expected).enumerate().filter(|(k, _)| !is_buffer[*k]) {
            assert!((f64::from(got) - want).abs() < 1e-5, "DiLoCo weight {k} of worker {rank}: {got} vs {want}");
        }
        // The outer step moved the weights well away from the mean (it extrapolates).
        assert!(model.iter().zip(&mean).zip(&is_buffer).any(|((x, mu), b)| !b && (f64::from(*x) - mu).abs() > 1e-2));
    }

    // Overlap, two merges: the first pulls towards each worker's own start (x stays z_i) and
    // sends z_i / m; the second pulls towards their mean: x_i = (1 − α) z_i + α x̄. Buffers are
    // averaged at the first merge and stay averaged.
    let (pull, gamma) = (0.6, 0.7);
    let (overlap, _) = merged_tiny(m, 2, || Overlap::new(pull, gamma).unwrap());
    for (rank, model) in overlap.iter().enumerate() {
        assert_eq!(bits(&buffers(model)), bits(&buffers(&averaged[rank])), "Overlap buffers, worker {rank}");
        for (k, &got) in model.iter().enumerate().filter(|(k, _)| !is_buffer[*k]) {
            let want = (1.0 - pull) * f64::from(starts[rank][k]) + pull * mean[k];
            assert!((f64::from(got) - want).abs() < 1e-5, "Overlap weight {k} of worker {rank}: {got} vs {want}");
        }
    }
}

/// Three workers train `Tiny` (weights and BatchNorm buffers) for six steps with a merge every
/// two, with buckets of `bucket` bytes: every worker's final values, the consensus distance of
/// each merge and the number of sum all-reduces.
fn trained_in_buckets<R: MergeRule + 'static>(
    bucket: usize,
    rule: impl Fn() -> R + Sync,
) -> Vec<(Vec<f32>, Vec<Option<f64>>, u64)> {
    run_workers(3, |rank, comm| {
        let comm = burn_coop::testing::RecordingComm::new(comm);
        let log = comm.log();
        let sync = burn_coop::Synchronizer::new(rule(), PeriodicSchedule::every(2).unwrap(), comm)
            .unwrap()
            .with_bucket_size(bucket);
        let mut optim = LocalSgd::with_synchronizer(sgd_momentum(), sync);
        let mut model = tiny_for(0);
        let mut distances = Vec::new();
        for step in 0..6 {
            let grads = fixed_grads(&model, rank, step);
            model = optim.step(0.1, model, grads).unwrap();
            if let Some(report) = optim.last_sync().filter(|r| r.step == step + 1) {
                distances.push(report.consensus_distance);
            }
        }
        let all_reduces = log.lock().unwrap().all_reduce;
        (flat(&model), distances, all_reduces)
    })
}

#[test]
fn merges_in_buckets_leave_every_value_as_one_piece_does() {
    use burn_coop::rules::diloco::DiLoCo;
    fn check<R: MergeRule + 'static>(name: &str, rule: impl Fn() -> R + Sync) {
        let whole = trained_in_buckets(usize::MAX, &rule);
        // The initial broadcast is not a sum; three merges in one piece are three all-reduces.
        assert_eq!(whole[0].2, 3, "{name}: merges in one piece");
        let n = whole[0].0.len();
        for bucket in [4, 7 * 4, 64 * 4] {
            let pieces = trained_in_buckets(bucket, &rule);
            for (rank, (got, want)) in pieces.iter().zip(&whole).enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.0), bits(&want.0), "{name}, buckets of {bucket} bytes, worker {rank}");
                assert_eq!(got.1.len(), 3);
                for (a, b) in got.1.iter().zip(&want.1) {
                    let (a, b) = (a.expect("measured"), b.expect("measured"));
                    assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}: distance {a} vs {b}");
                }
                // Every merge took at least one all-reduce per piece of at most the bucket size.
                assert!(got.2 >= 3 * n.div_ceil(bucket / 4) as u64, "{name}: {} all-reduces", got.2);
            }
        }
        // The workers moved apart between merges, so the merges did something.
        assert!(whole[0].1.iter().all(|d| d.unwrap() > 0.0), "{name}");
    }
    check("averaging", Averaging::new);
    check("elastic", || Elastic::new(0.25, 3).unwrap());
    check("DiLoCo", || DiLoCo::new(0.7, 0.9, true).unwrap());
}
