//! `mpirun -np 2 coop train --transport mpi` runs the same worker loop as the threads and gets
//! the same numbers.
#![cfg(feature = "mpi")]

mod common;

use std::process::Command;

use common::generated_cifar;

fn mpirun_available() -> bool {
    Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn mpirun(np: &str) -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["300", "mpirun", "--oversubscribe", "--mca", "btl", "self,vader", "--mca", "oob_tcp_if_include", "lo"])
        .args(["--mca", "mpi_yield_when_idle", "1", "-np", np, env!("CARGO_BIN_EXE_coop")])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    command
}

/// `coop train` on 2 workers for 2 epochs of `data` (τ = 2, batch 8, a checkpoint every merge),
/// with `extra` flags.
fn two_epochs_of_two_workers(extra: &str, data: &std::path::Path) -> Vec<String> {
    let flags = "train --workers 2 --tau 2 --batch-size 8 --epochs 2 --verify false --checkpoint-every 1 --data";
    let mut args: Vec<String> = flags.split_whitespace().chain([data.to_str().unwrap()]).map(String::from).collect();
    args.extend(extra.split_whitespace().map(String::from));
    args
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
    let common = two_epochs_of_two_workers("--rule elastic", &data);
    let threads = dir.path().join("threads");
    let output = Command::new(coop).args(&common).args(["--output", threads.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let ranks = dir.path().join("ranks");
    let output =
        mpirun("2").args(&common).args(["--transport", "mpi", "--output", ranks.to_str().unwrap()]).output().unwrap();
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

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_from_its_last_checkpoint() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = generated_cifar(dir.path(), 32);
    let run = dir.path().join("killed");
    let common = two_epochs_of_two_workers("", &data);
    let job = mpirun("2")
        .args(&common)
        .args(["--transport", "mpi", "--output", run.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first published checkpoint, then kill -9 one rank.
    let latest = run.join("checkpoints/LATEST");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !latest.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ranks = format!("^{} train .*{}", env!("CARGO_BIN_EXE_coop"), run.display());
    let pids = Command::new("pgrep").args(["-f", &ranks]).output().unwrap();
    let pids: Vec<String> = String::from_utf8(pids.stdout).unwrap().lines().map(String::from).collect();
    let victim = pids.iter().max_by_key(|p| p.parse::<u32>().unwrap()).expect("a coop rank is running");
    assert!(Command::new("kill").args(["-9", victim]).status().unwrap().success());
    let killed_at = std::time::Instant::now();
    let output = job.wait_with_output().unwrap();
    assert!(!output.status.success(), "the job must fail when a rank dies");
    assert!(killed_at.elapsed() < std::time::Duration::from_secs(60), "the job hung after a rank died");

    // The last checkpoint is complete and the run resumes from it under MPI.
    let resumed =
        mpirun("2").args(["train", "--resume", run.to_str().unwrap(), "--transport", "mpi"]).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let straight = dir.path().join("straight");
    let output = Command::new(env!("CARGO_BIN_EXE_coop"))
        .args(&common)
        .args(["--output", straight.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (a, b) = (metrics_without_wall_time(&straight), metrics_without_wall_time(&run));
    assert_eq!(a.last(), b.last(), "the resumed run ends exactly like an uninterrupted one");
}

#[test]
fn settings_are_checked_against_the_number_of_ranks() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = generated_cifar(dir.path(), 32);
    // α = 0.5 is out of range for the default 4 workers (2/(m+1) = 0.4) but fine for 2 ranks
    // (2/3): validation must wait for the number of ranks.
    let run = |np: &str, output: &str| {
        let args = ["train", "--rule", "elastic", "--alpha", "0.5", "--tau", "2", "--batch-size", "8"];
        mpirun(np)
            .args(args)
            .args(["--max-steps", "4", "--verify", "false", "--transport", "mpi", "--data", data.to_str().unwrap()])
            .args(["--output", dir.path().join(output).to_str().unwrap()])
            .output()
            .unwrap()
    };
    let two = run("2", "two");
    assert!(two.status.success(), "{}", String::from_utf8_lossy(&two.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("two/syncs.csv")).unwrap().lines().count(), 3);
    let four = run("4", "four");
    assert!(!four.status.success());
    let stderr = String::from_utf8_lossy(&four.stderr);
    assert!(stderr.contains("invalid value '0.5' for '--alpha'") && stderr.contains("m = 4 workers"), "{stderr}");
}

/// The mean training loss of each merge in a run's `syncs.csv`, with the merge's step and bytes.
fn merges(run: &std::path::Path) -> Vec<(String, f64, String)> {
    let text = std::fs::read_to_string(run.join("syncs.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields[1].to_string(), fields[5].parse().unwrap(), fields[8].to_string())
        })
        .collect()
}

#[test]
fn new_rules_and_schedules_run_with_their_defaults_on_threads_and_ranks() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = generated_cifar(dir.path(), 32);
    // Two ranks for the rules that sum models: a sum of two values does not depend on the order
    // MPI adds them in, so the runs must agree to the bit (with four, MPI's order differs from
    // the rank order of the threads, and this tiny BatchNorm model on generated data amplifies
    // the last bit of a merge to 1e-3 within a few steps, for plain averaging too). Four ranks
    // for the rules that only exchange with neighbours (sums built in a fixed order) and for
    // several anchors (sums of two group members, and of anchors with zeros).
    // The compressed rules gather or exchange byte payloads and add them in rank order, and the
    // quantized all-reduce adds in ring order: four ranks agree to the bit.
    let settings: [(&str, &[&str]); 19] = [
        ("2", &["--rule", "diloco"]),
        ("2", &["--rule", "hierarchical"]),
        ("2", &["--schedule", "adacomm"]),
        ("2", &["--schedule", "qsr"]),
        ("4", &["--rule", "elastic", "--anchors", "2"]),
        ("4", &["--rule", "gossip", "--topology", "one-peer-exponential"]),
        ("4", &["--rule", "matcha"]),
        ("2", &["--rule", "overlap"]),
        ("2", &["--rule", "elastic-overlap"]),
        ("4", &["--rule", "ec-local-sgd"]),
        ("4", &["--rule", "average", "--compressor", "qsgd:4"]),
        ("4", &["--rule", "choco", "--compressor", "topk:0.1"]),
        ("4", &["--rule", "squarm", "--trigger-threshold", "1"]),
        ("2", &["--rule", "streaming-diloco", "--fragments", "2", "--tau", "2"]),
        ("4", &["--rule", "diloco", "--compressor", "int8", "--tau", "2"]),
        ("4", &["--rule", "average", "--compressor", "fp8", "--tau", "2"]),
        // Merges in buckets of 10 KiB: groups of small tensors and large tensors in pieces.
        ("2", &["--rule", "average", "--bucket-mib", "0.01"]),
        ("2", &["--rule", "elastic", "--bucket-mib", "0.01"]),
        ("2", &["--rule", "diloco", "--bucket-mib", "0.01"]),
    ];
    for (k, (np, setting)) in settings.into_iter().enumerate() {
        let common = ["train", "--batch-size", "8", "--max-steps", "16", "--lr", "0.02", "--verify", "false"];
        let common = [&common[..], &["--data", data.to_str().unwrap()]].concat();
        let threads = dir.path().join(format!("threads-{k}"));
        let output = Command::new(env!("CARGO_BIN_EXE_coop"))
            .args(&common)
            .args(setting)
            .args(["--workers", np, "--output", threads.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(output.status.success(), "{setting:?}: {}", String::from_utf8_lossy(&output.stderr));
        let ranks = dir.path().join(format!("ranks-{k}"));
        let output = mpirun(np)
            .args(&common)
            .args(setting)
            .args(["--transport", "mpi", "--output", ranks.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(output.status.success(), "{setting:?}: {}", String::from_utf8_lossy(&output.stderr));
        let (a, b) = (merges(&threads), merges(&ranks));
        assert!(!a.is_empty(), "{setting:?}: no merge in 16 steps");
        assert_eq!(a.len(), b.len(), "{setting:?}: merges");
        for ((step_a, loss_a, bytes_a), (step_b, loss_b, bytes_b)) in a.iter().zip(&b) {
            assert_eq!((step_a, bytes_a), (step_b, bytes_b), "{setting:?}: merge steps and bytes");
            assert_eq!(loss_a.to_bits(), loss_b.to_bits(), "{setting:?}: {loss_a} vs {loss_b}");
        }
    }
}

#[test]
fn asynchronous_local_sgd_runs_on_ranks_as_on_threads() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = generated_cifar(dir.path(), 32);
    let common = ["train", "--rule", "async", "--local-threads", "2", "--batch-size", "4", "--max-steps", "8"];
    let common = [&common[..], &["--tau", "2", "--verify", "false", "--data", data.to_str().unwrap()]].concat();
    let threads = dir.path().join("threads");
    let output = Command::new(env!("CARGO_BIN_EXE_coop"))
        .args(&common)
        .args(["--workers", "2", "--output", threads.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ranks = dir.path().join("ranks");
    let output =
        mpirun("2").args(&common).args(["--transport", "mpi", "--output", ranks.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The local threads race, so losses differ from run to run; merges and bytes do not.
    let (a, b) = (merges(&threads), merges(&ranks));
    assert_eq!(a.len(), 4, "a merge every 2 of 8 steps");
    let steps_and_bytes =
        |m: &[(String, f64, String)]| m.iter().map(|(s, _, b)| (s.clone(), b.clone())).collect::<Vec<_>>();
    assert_eq!(steps_and_bytes(&a), steps_and_bytes(&b));
}
