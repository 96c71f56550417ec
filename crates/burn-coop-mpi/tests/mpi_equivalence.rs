//! Four MPI ranks end the deterministic scenarios with the same parameters, anchors, merge
//! counts and traffic counters as four in-process workers.

mod common;

use std::time::Duration;

use burn_coop_mpi::testing::{find_mpirun, mpirun_local, run_with_deadline};

const M: usize = 4;

#[test]
fn four_mpi_ranks_match_in_process_workers() {
    let Some(mpirun) = find_mpirun() else {
        eprintln!("skipping: mpirun is not on PATH (install openmpi-bin)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut command = mpirun_local(&mpirun, M);
    command.arg(env!("CARGO_BIN_EXE_mpi-equivalence")).arg(dir.path());
    let run = run_with_deadline(command, Duration::from_secs(180)).unwrap();
    assert!(
        run.status.is_some_and(|s| s.success()),
        "mpirun failed or hung ({:?} after {:?})\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.elapsed,
        run.stdout,
        run.stderr
    );
    common::check_against_in_process(dir.path(), M);
}
