//! Refactors keep the numbers: three short runs on the real CIFAR-10 must reproduce, bit for bit,
//! the `syncs.csv` files recorded before the core was reshaped (`tests/golden/`), with the
//! commands below. Losses, learning rates and periods must match exactly; averaging and elastic
//! averaging must measure the same consensus distance and send the same bytes per merge (the
//! broadcast before the first step may only have become cheaper); gossip must send exactly its
//! neighbour exchange, two models per merge on a ring, and no longer measure the consensus by
//! default.
//!
//! The real CIFAR-10 archive is looked for at `<repo>/../shared/datasets/cifar10/` or in
//! `BURN_COOP_CIFAR10`; without it the test says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn real_cifar() -> Option<PathBuf> {
    let shared =
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/datasets/cifar10/cifar-10-binary.tar.gz"));
    let candidates = std::env::var_os("BURN_COOP_CIFAR10").map(PathBuf::from).into_iter().chain([shared]);
    for path in candidates {
        if path.exists() {
            return Some(path);
        }
    }
    println!("skipping: the real CIFAR-10 archive was not found (set BURN_COOP_CIFAR10)");
    None
}

/// One row of `syncs.csv`, split into its columns.
fn rows(text: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let columns = "epoch,step,syncs,lr,tau,train_loss,worker_train_loss,consensus_distance,bytes_sent_per_worker,";
    assert!(header.starts_with(columns), "{header}");
    lines.map(|line| line.split(',').map(str::to_string).collect()).collect()
}

fn bytes(row: &[String]) -> Vec<u64> {
    row[8].split(';').map(|b| b.parse().unwrap()).collect()
}

/// The `coop` binary under test: this build's, or `BURN_COOP_GOLDEN_BIN` (a copy of the binary the
/// recordings were made with, so that recording can go on while the tree is rebuilt).
fn coop() -> Command {
    Command::new(std::env::var_os("BURN_COOP_GOLDEN_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_coop").into()))
}

fn run(data: &Path, output: &Path, rule: &[&str]) -> String {
    let status = coop()
        .args(["train", "--data", data.to_str().unwrap(), "--workers", "4"])
        .args(rule)
        .args(["--batch-size", "8", "--max-steps", "32", "--output", output.to_str().unwrap()])
        .status()
        .expect("run coop");
    assert!(status.success());
    std::fs::read_to_string(output.join("syncs.csv")).unwrap()
}

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.syncs.csv"));
    std::fs::read_to_string(path).unwrap()
}

/// The columns epoch, step, syncs, lr, tau, train_loss and worker_train_loss, as written.
fn losses(rows: &[Vec<String>]) -> Vec<Vec<String>> {
    rows.iter().map(|r| r[..7].to_vec()).collect()
}

/// Bytes each worker sent per merge, from the second merge on (the first also holds the
/// initial broadcast).
fn per_merge(rows: &[Vec<String>]) -> Vec<Vec<u64>> {
    rows.windows(2).map(|w| bytes(&w[1]).iter().zip(bytes(&w[0])).map(|(b, a)| b - a).collect()).collect()
}

#[test]
fn refactored_merges_reproduce_the_recorded_runs() {
    let Some(data) = real_cifar() else { return };
    let dir = tempfile::tempdir().unwrap();
    let runs: [(&str, &[&str]); 3] = [
        ("average", &["--rule", "average", "--tau", "4"]),
        ("elastic", &["--rule", "elastic", "--tau", "4", "--alpha", "0.25"]),
        ("gossip", &["--rule", "gossip", "--tau", "2", "--topology", "ring"]),
    ];
    for (name, rule) in runs {
        let now = rows(&run(&data, &dir.path().join(name), rule));
        let before = rows(&golden(name));
        assert_eq!(now.len(), before.len(), "{name}: merges");
        assert_eq!(losses(&now), losses(&before), "{name}: losses, learning rates and periods are bit-identical");
        let first_now = bytes(&now[0]);
        let first_before = bytes(&before[0]);
        match name {
            "gossip" => {
                // 271,098 values (weights and BatchNorm statistics) to two neighbours.
                let model_bytes = 4 * 271_098;
                for merge in per_merge(&now) {
                    assert_eq!(merge, vec![2 * model_bytes; 4], "{name}: the neighbour exchange alone");
                }
                assert!(now.iter().all(|r| r[7].is_empty()), "{name}: consensus only when asked");
                assert!(now.iter().all(|r| r[9] == "0;0;0;0"), "{name}: no bytes spent on measuring it");
                // First merge: the broadcast ((m − 1)/m of the model) plus the exchange.
                assert_eq!(first_now, vec![3 * model_bytes / 4 + 2 * model_bytes; 4]);
            }
            _ => {
                let consensus = |rows: &[Vec<String>]| rows.iter().map(|r| r[7].clone()).collect::<Vec<_>>();
                assert_eq!(consensus(&now), consensus(&before), "{name}: consensus distance");
                assert_eq!(per_merge(&now), per_merge(&before), "{name}: bytes per merge");
                assert!(first_now.iter().zip(&first_before).all(|(n, b)| n < b), "{name}: a cheaper broadcast");
            }
        }
    }
}

/// Columns that hold wall-clock seconds (they differ from run to run).
const WALL_COLUMNS: [&str; 3] = ["comm_wait_seconds", "comm_inflight_seconds", "wall_seconds"];

/// A CSV file's rows, without the wall-clock columns, with its header.
fn without_wall_clock(text: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let keep: Vec<usize> = (0..header.len()).filter(|&k| !WALL_COLUMNS.contains(&header[k])).collect();
    let row = |line: &str| {
        let cells: Vec<&str> = line.split(',').collect();
        keep.iter().map(|&k| cells[k].to_string()).collect::<Vec<_>>()
    };
    std::iter::once(keep.iter().map(|&k| header[k].to_string()).collect()).chain(lines.map(row)).collect()
}

/// The family's rules and schedules, each a short run. Every one is deterministic, so each must
/// reproduce its recording bit for bit: losses, learning rates, periods, consensus distances,
/// bytes of every kind, simulated clocks, trigger decisions. Asynchronous local SGD is not here:
/// its local threads race by design. The recordings of `diloco`, `overlap`, `overlap-simulated`,
/// `adacomm` and `adacomm-simulated` were made again when those algorithms became the published
/// ones (outer steps on trained parameters only; AdaComm's own rule); every other recording
/// reproduced bit for bit across that change. `streaming-diloco` and `diloco-adam` were recorded
/// when those rules were added.
const FAMILY: [(&str, &[&str]); 24] = [
    ("sync", &["--rule", "sync"]),
    ("average-tau4", &["--rule", "average", "--tau", "4"]),
    ("post-local", &["--rule", "average", "--tau", "4", "--warmup-steps", "8"]),
    ("elastic-tau4", &["--rule", "elastic", "--tau", "4", "--alpha", "0.25"]),
    ("elastic-anchors2", &["--rule", "elastic", "--tau", "4", "--anchors", "2"]),
    ("gossip-ring", &["--rule", "gossip", "--tau", "2", "--topology", "ring", "--consensus-every", "2"]),
    ("gossip-one-peer", &["--rule", "gossip", "--tau", "2", "--topology", "one-peer-exponential"]),
    ("matcha", &["--rule", "matcha", "--graph", "complete", "--budget", "0.5", "--tau", "2"]),
    ("hierarchical", &["--rule", "hierarchical", "--tau", "2", "--groups", "2", "--global-every", "2"]),
    ("diloco", &["--rule", "diloco", "--tau", "4"]),
    ("overlap", &["--rule", "overlap"]),
    ("streaming-diloco", &["--rule", "streaming-diloco", "--fragments", "3", "--tau", "2"]),
    ("diloco-adam", &["--rule", "diloco", "--tau", "4", "--outer-optimizer", "adam", "--outer-lr", "0.05"]),
    ("elastic-overlap", &["--rule", "elastic-overlap", "--tau", "4"]),
    ("ec-sign", &["--rule", "ec-local-sgd", "--compressor", "sign", "--tau", "4"]),
    ("average-topk", &["--rule", "average", "--compressor", "topk:0.01", "--tau", "4"]),
    ("choco-sign", &["--rule", "choco", "--compressor", "sign", "--consensus-step", "0.8", "--tau", "1"]),
    ("squarm", &["--rule", "squarm", "--trigger-threshold", "150", "--tau", "1"]),
    ("adacomm", &["--schedule", "adacomm", "--tau0", "4", "--interval", "8"]),
    ("qsr", &["--schedule", "qsr"]),
    (
        "average-simulated",
        &["--rule", "average", "--tau", "4", "--network", "bandwidth=100Mbit,latency=50us", "--step-time", "0.01"],
    ),
    ("overlap-simulated", &["--rule", "overlap", "--network", "bandwidth=100Mbit,latency=50us", "--step-time", "0.01"]),
    (
        "adacomm-simulated",
        &[
            "--schedule",
            "adacomm",
            "--tau0",
            "4",
            "--interval-seconds",
            "0.1",
            "--network",
            "bandwidth=100Mbit,latency=50us",
            "--step-time",
            "0.01",
        ],
    ),
    (
        "gossip-simulated",
        &["--rule", "gossip", "--tau", "2", "--network", "bandwidth=100Mbit,latency=50us", "--step-time", "0.01"],
    ),
];

/// With `BURN_COOP_RECORD_GOLDEN=1` the runs are recorded into `tests/golden/family/` instead of
/// compared (done once, on the code the refactor starts from).
#[test]
fn every_rule_of_the_family_reproduces_its_recording() {
    let Some(data) = real_cifar() else { return };
    let dir = tempfile::tempdir().unwrap();
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/family");
    let record = std::env::var_os("BURN_COOP_RECORD_GOLDEN").is_some();
    for (name, rule) in FAMILY {
        let now = run(&data, &dir.path().join(name), rule);
        let path = folder.join(format!("{name}.syncs.csv"));
        if record {
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(&path, &now).unwrap();
            continue;
        }
        let before = std::fs::read_to_string(&path).unwrap();
        assert_eq!(without_wall_clock(&now), without_wall_clock(&before), "{name}: syncs.csv");
    }
}

/// Two epochs on a small generated data set: the end of an epoch (the evaluation of the average
/// model, the per-worker columns of `epochs.csv`) and the checkpoints reproduce their recording.
#[test]
fn epochs_reproduce_their_recording() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::generated_cifar(dir.path(), 40);
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/family");
    let record = std::env::var_os("BURN_COOP_RECORD_GOLDEN").is_some();
    let runs: [(&str, &[&str]); 3] = [
        ("epochs-average", &["--rule", "average", "--tau", "2"]),
        ("epochs-gossip", &["--rule", "gossip", "--tau", "2", "--eval-workers", "true"]),
        (
            "epochs-elastic-simulated",
            &["--rule", "elastic", "--tau", "2", "--network", "bandwidth=100Mbit,latency=50us", "--step-time", "0.01"],
        ),
    ];
    for (name, rule) in runs {
        let output = dir.path().join(name);
        let status = coop()
            .args(["train", "--data", data.to_str().unwrap(), "--verify", "false", "--workers", "4"])
            .args(["--batch-size", "8", "--epochs", "2"])
            .args(rule)
            .args(["--output", output.to_str().unwrap()])
            .status()
            .expect("run coop");
        assert!(status.success(), "{name}");
        for file in ["syncs.csv", "epochs.csv"] {
            let now = std::fs::read_to_string(output.join(file)).unwrap();
            let path = folder.join(format!("{name}.{file}"));
            if record {
                std::fs::create_dir_all(&folder).unwrap();
                std::fs::write(&path, &now).unwrap();
                continue;
            }
            let before = std::fs::read_to_string(&path).unwrap();
            assert_eq!(without_wall_clock(&now), without_wall_clock(&before), "{name}: {file}");
        }
    }
}
