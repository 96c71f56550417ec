//! The example's training, shortened: local SGD through burn-train ends with one model that
//! classifies held-out points well.

use burn_train_local_sgd::{Options, train};

#[test]
fn local_sgd_through_burn_train_learns_and_ends_with_one_model() {
    let artifacts = std::env::temp_dir().join(format!("burn-train-local-sgd-test-{}", std::process::id()));
    let options =
        Options { workers: 2, epochs: 2, train_points: 2048, artifacts: artifacts.clone(), ..Options::default() };
    let outcome = train(&options).expect("training succeeds");
    let _ = std::fs::remove_dir_all(&artifacts);

    assert!(outcome.accuracy > 0.8, "held-out accuracy {}", outcome.accuracy);
    let run = outcome.run.expect("local SGD reports its workers");
    assert_eq!(run.workers.len(), 2);
    // 1024 points per worker in batches of 32: 32 steps per epoch, a merge every 8 steps.
    for worker in &run.workers {
        assert_eq!(worker.optimizer_steps, 64);
        assert_eq!(worker.coop.syncs, 8);
        assert_eq!(worker.parameter_fingerprint, run.workers[0].parameter_fingerprint);
    }
}
