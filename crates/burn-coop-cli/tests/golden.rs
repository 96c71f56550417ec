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

fn run(data: &Path, output: &Path, rule: &[&str]) -> String {
    let status = Command::new(env!("CARGO_BIN_EXE_coop"))
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
