//! Runs the deterministic training scenarios of `burn_coop_mpi::testing` over MPI and writes
//! every rank's outcome as JSON.
//!
//! Usage: `mpirun -np 4 mpi-equivalence <output dir> [scenario ...]` (default: every scenario).

use std::path::PathBuf;
use std::process::ExitCode;

use burn_coop::comm::Communicator;
use burn_coop_mpi::MpiComm;
use burn_coop_mpi::testing::Scenario;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: mpi-equivalence <output dir> [scenario ...]");
        return ExitCode::from(2);
    };
    let mut scenarios = Vec::new();
    for name in args {
        match Scenario::from_name(&name) {
            Some(s) => scenarios.push(s),
            None => {
                eprintln!("unknown scenario {name:?}");
                return ExitCode::from(2);
            }
        }
    }
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    match run(&dir, &scenarios) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mpi-equivalence: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(dir: &std::path::Path, scenarios: &[Scenario]) -> Result<(), Box<dyn std::error::Error>> {
    let comm = MpiComm::world()?;
    let (rank, m, host) = (comm.rank(), comm.world_size(), comm.processor_name());
    let mut comm: Box<dyn Communicator> = Box::new(comm);
    for &scenario in scenarios {
        let (outcome, back) = scenario.run(comm)?;
        comm = back;
        outcome.save(dir)?;
        println!("rank {rank}/{m} on host {host}: {} done ({} merges)", scenario.name(), outcome.syncs);
    }
    comm.barrier()?;
    Ok(())
}
