//! A job in which one rank dies: every rank all-reduces in a loop and rank `victim` ends its
//! process abnormally right after its first collective.
//!
//! Usage: `mpirun -np 4 mpi-dead-rank [victim (default 2)] [abort|kill (default abort)]`.
//! `abort` calls `std::process::abort()` (SIGABRT), `kill` sends itself SIGKILL.

use std::process::ExitCode;
use std::time::Duration;

use burn_coop::comm::Communicator;
use burn_coop_mpi::MpiComm;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let victim: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let how = args.next().unwrap_or_else(|| "abort".into());
    let mut comm = match MpiComm::world() {
        Ok(t) => t,
        Err(error) => {
            eprintln!("mpi-dead-rank: {error}");
            return ExitCode::FAILURE;
        }
    };
    let rank = comm.rank();
    let mut values = vec![rank as f32; 4096];
    for round in 0..200 {
        if let Err(error) = comm.all_reduce_sum(&mut values) {
            eprintln!("rank {rank}: collective {round} failed: {error}");
            return ExitCode::FAILURE;
        }
        println!("rank {rank}: collective {round} done");
        if rank == victim && round == 0 {
            eprintln!("rank {rank}: dying now ({how})");
            if how == "kill" {
                let pid = std::process::id().to_string();
                let _ = std::process::Command::new("kill").args(["-9", &pid]).status();
            }
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("rank {rank}: finished every collective although rank {victim} died");
    ExitCode::from(3)
}
