//! A rank that dies ends the MPI job with an error naming it, instead of a hang.

use std::time::Duration;

use burn_coop_mpi::testing::{find_mpirun, mpirun_local, run_with_deadline};

/// A hang guard only: the job is expected to end within a few seconds.
const DEADLINE: Duration = Duration::from_secs(60);

fn dead_rank_ends_the_job(how: &str, signal: &str) {
    let Some(mpirun) = find_mpirun() else {
        eprintln!("skipping: mpirun is not on PATH (install openmpi-bin)");
        return;
    };
    let mut command = mpirun_local(&mpirun, 4);
    command.arg(env!("CARGO_BIN_EXE_mpi-dead-rank")).args(["2", how]);
    let run = run_with_deadline(command, DEADLINE).unwrap();
    let output = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let status = run.status.unwrap_or_else(|| panic!("mpirun still running after {DEADLINE:?} ({how})\n{output}"));
    eprintln!("{how}: mpirun exited with {status} after {:.2} s", run.elapsed.as_secs_f64());
    assert!(!status.success(), "mpirun succeeded although rank 2 died\n{output}");
    assert!(run.stdout.contains("rank 2: collective 0 done"), "rank 2 never took part\n{output}");
    assert!(!run.stdout.contains("rank 2: collective 1 done"), "rank 2 did not die\n{output}");
    assert!(!output.contains("finished every collective"), "a surviving rank ran to the end\n{output}");
    assert!(output.contains("process rank 2"), "mpirun's message does not name rank 2\n{output}");
    assert!(output.contains(signal), "mpirun's message does not name signal {signal}\n{output}");
}

#[test]
fn aborting_rank_ends_the_job_naming_it() {
    dead_rank_ends_the_job("abort", "signal 6");
}

#[test]
fn killed_rank_ends_the_job_naming_it() {
    dead_rank_ends_the_job("kill", "signal 9");
}
