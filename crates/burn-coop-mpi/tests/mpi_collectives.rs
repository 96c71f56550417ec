//! Every collective of `MpiComm` on four ranks (see the `mpi-collectives` binary).

use std::time::Duration;

use burn_coop_mpi::testing::{find_mpirun, mpirun_local, run_with_deadline};

#[test]
fn every_collective_moves_the_right_data_over_mpi() {
    let Some(mpirun) = find_mpirun() else {
        eprintln!("skipping: mpirun is not on PATH (install openmpi-bin)");
        return;
    };
    let mut command = mpirun_local(&mpirun, 4);
    command.arg(env!("CARGO_BIN_EXE_mpi-collectives"));
    let run = run_with_deadline(command, Duration::from_secs(120)).unwrap();
    assert!(
        run.status.is_some_and(|s| s.success()),
        "mpirun failed or hung ({:?})\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    for rank in 0..4 {
        assert!(run.stdout.contains(&format!("rank {rank}: all collectives agree")), "{}", run.stdout);
    }
}
