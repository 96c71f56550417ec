//! `mpirun -np 2 coop train --transport mpi` runs the same worker loop as the threads and gets
//! the same numbers.
#![cfg(feature = "mpi")]

mod common;

use std::process::Command;

use common::generated_cifar;

fn mpirun_available() -> bool {
    Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn metrics_without_wall_time(run: &std::path::Path) -> Vec<String> {
    let epochs = std::fs::read_to_string(run.join("epochs.csv")).unwrap();
    epochs.lines().map(|line| line.rsplit_once(',').unwrap().0.to_string()).collect()
}

#[test]
fn mpi_ranks_reproduce_the_threaded_run() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = generated_cifar(dir.path(), 32);
    let coop = env!("CARGO_BIN_EXE_coop");
    let common = [
        "train", "--workers", "2", "--rule", "elastic", "--tau", "2", "--batch-size", "8", "--epochs", "2",
        "--verify", "false", "--checkpoint-every", "1", "--data", data.to_str().unwrap(),
    ];
    let threads = dir.path().join("threads");
    let output = Command::new(coop).args(common).args(["--output", threads.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let ranks = dir.path().join("ranks");
    let output = Command::new("timeout")
        .args(["300", "mpirun", "--oversubscribe", "--mca", "btl", "self,vader", "--mca", "oob_tcp_if_include", "lo"])
        .args(["--mca", "mpi_yield_when_idle", "1", "-np", "2", coop])
        .args(common)
        .args(["--transport", "mpi", "--output", ranks.to_str().unwrap()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.matches("final test accuracy").count(), 1, "only rank 0 reports: {stdout}");

    let (a, b) = (metrics_without_wall_time(&threads), metrics_without_wall_time(&ranks));
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a, b, "losses, accuracies, merges and bytes agree between threads and MPI ranks");
    for rank in 0..2 {
        assert!(ranks.join(format!("checkpoints/step-00000020/worker-{rank}.model.bpk")).exists());
    }
}
