//! Trains a small classifier with burn-train, using local SGD over 4 workers
//! (`--single` runs burn-train's default single-device strategy instead).
//!
//! ```sh
//! cargo run --release -p burn-train-local-sgd [-- --single] [--workers N] [--tau T] [--epochs E]
//! ```

use burn_train_local_sgd::{Options, train};

fn main() {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} needs a positive integer"))
        };
        match arg.as_str() {
            "--single" => options.local_sgd = false,
            "--workers" => options.workers = value("--workers") as usize,
            "--tau" => options.tau = value("--tau"),
            "--epochs" => options.epochs = value("--epochs") as usize,
            "--help" | "-h" => {
                println!("usage: burn-train-local-sgd [--single] [--workers N] [--tau T] [--epochs E]");
                return;
            }
            other => panic!("unknown argument {other} (see --help)"),
        }
    }
    match train(&options) {
        Ok(outcome) => {
            let mode = if options.local_sgd {
                format!("local SGD, {} workers, τ = {}", options.workers, options.tau)
            } else {
                "single device".to_string()
            };
            println!(
                "{mode}: held-out accuracy {:.4} after {} epochs in {:.1} s",
                outcome.accuracy,
                options.epochs,
                outcome.elapsed.as_secs_f64()
            );
            for worker in outcome.run.iter().flat_map(|run| &run.workers) {
                println!(
                    "  worker {}: {} batches, {} optimizer steps, {} merges, {} bytes sent",
                    worker.rank,
                    worker.batches,
                    worker.optimizer_steps,
                    worker.coop.syncs,
                    worker.coop.traffic.bytes_sent
                );
            }
        }
        Err(error) => {
            eprintln!("training failed: {error}");
            std::process::exit(1);
        }
    }
}
