//! `coop topology`: a graph's mixing matrix and how fast it mixes.

use burn_coop::topology::TopologySpec;
use burn_coop::topology::WeightRule;
use clap::Args;
use serde::Serialize;

use burn_coop::registry::serde_name;

/// Arguments of `coop topology`.
#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// ring, torus, exponential or complete.
    #[arg(long, default_value = "ring", value_parser = serde_name::<TopologySpec>)]
    topology: TopologySpec,
    /// Number of workers.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    workers: u64,
    /// Edge weights: metropolis-hastings or best-constant.
    #[arg(long, default_value = "metropolis-hastings", value_parser = serde_name::<WeightRule>)]
    weights: WeightRule,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    topology: String,
    workers: usize,
    weights: WeightRule,
    /// `W` by rows, up to [`PRINTED`] workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    w: Option<Vec<Vec<f64>>>,
    nonzeros: usize,
    eigenvalues: Vec<f64>,
    zeta: f64,
    spectral_gap: f64,
}

/// The most workers whose `W` is printed.
const PRINTED: usize = 64;

/// Runs `coop topology`.
pub fn run(args: &TopologyArgs) -> Result<(), String> {
    let workers = args.workers as usize;
    let topology = args.topology.build(workers).map_err(|e| e.to_string())?;
    let w = topology.mixing_matrix(args.weights).map_err(|e| e.to_string())?;
    let eigenvalues = w.eigenvalues().map_err(|e| e.to_string())?;
    let zeta = w.zeta().map_err(|e| e.to_string())?;
    let report = Report {
        topology: topology.to_string(),
        workers,
        weights: args.weights,
        w: (workers <= PRINTED).then(|| w.to_rows()),
        nonzeros: w.nonzeros(),
        eigenvalues,
        zeta,
        spectral_gap: 1.0 - zeta,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        println!("{} ({} weights)", report.topology, crate::config::serde_name_of(&args.weights));
        println!();
        match workers <= PRINTED {
            true => print!("{w}"),
            false => println!("W: {} non-zeros (printed up to {PRINTED} workers)", report.nonzeros),
        }
        println!();
        // A large ring's gap is below a millionth: shown in scientific notation.
        let number = |v: f64| if v == 0.0 || v.abs() >= 1e-4 { format!("{v:.6}") } else { format!("{v:.6e}") };
        println!("zeta (second-largest |eigenvalue|): {:.6}", report.zeta);
        println!("spectral gap 1 - zeta:              {}", number(report.spectral_gap));
    }
    Ok(())
}
