//! Every collective of the MPI communicator on every rank, checked against what it must give:
//! started and blocking sums in flight together, broadcast, all-gather of byte payloads of
//! different lengths, neighbour exchange on a ring, directed exchange, exchanges of byte payloads
//! of different lengths (empty ones included), sub-groups by colour, and
//! the errors for mismatched calls (also a send that no rank receives). Prints `rank R: all
//! collectives agree` or exits non-zero naming the first mismatch.
//!
//! Usage: `mpirun -np 4 mpi-collectives`.

use std::process::ExitCode;

use burn_coop::comm::{CommError, Communicator, Route};
use burn_coop_mpi::MpiComm;

fn check(what: &str, ok: bool, detail: impl std::fmt::Debug) -> Result<(), String> {
    if ok { Ok(()) } else { Err(format!("{what}: {detail:?}")) }
}

fn run(comm: &mut MpiComm) -> Result<(), Box<dyn std::error::Error>> {
    let (rank, m) = (comm.rank(), comm.world_size());
    let total = (m * (m - 1) / 2) as f32;

    let pending = comm.start_all_reduce_sum(vec![rank as f32; 1000])?;
    let mut scalars = [rank as f64, 1.0];
    comm.all_reduce_f64(&mut scalars)?;
    let second = comm.start_all_reduce_sum(vec![2.0 * rank as f32; 3])?;
    check("f64 sum while a sum is in flight", scalars == [total as f64, m as f64], scalars)?;
    let first = pending.wait()?;
    check("started sum", first.iter().all(|&v| v == total), &first[..3])?;
    check("second started sum", second.wait()? == vec![2.0 * total; 3], ())?;

    let mut values = vec![rank as f32 + 0.5; 7];
    comm.broadcast(&mut values, m - 1)?;
    check("broadcast", values == vec![(m - 1) as f32 + 0.5; 7], &values)?;

    let gathered = comm.all_gather_bytes(&vec![rank as u8 + 1; rank * 3])?;
    let expected: Vec<Vec<u8>> = (0..m).map(|j| vec![j as u8 + 1; j * 3]).collect();
    check("all-gather of payloads of different lengths", gathered == expected, &gathered)?;

    let peers = [(rank + 1) % m, (rank + m - 1) % m];
    let mut received = Vec::new();
    burn_coop::comm::exchange_into(comm, &[rank as f32; 5], &peers, &mut received)?;
    let want: Vec<Vec<f32>> = peers.iter().map(|&j| vec![j as f32; 5]).collect();
    check("ring exchange", received == want, &received)?;

    // One-peer exponential style: send to rank − 1, receive from rank + 1.
    let (to, from) = ((rank + m - 1) % m, (rank + 1) % m);
    let mut got = Vec::new();
    comm.exchange_directed(&[rank as f32; 3], Route { send_to: &[to], receive_from: &[from] }, &mut |k, v| {
        got.push((k, v.to_vec()))
    })?;
    check("directed exchange", got == vec![(0, vec![from as f32; 3])], &got)?;
    // A send nobody receives is the same error on every rank, before any message moves.
    let receive_from: &[usize] = if rank == 0 { &[] } else { &[from] };
    let error = comm.exchange_directed(&[0.0], Route { send_to: &[to], receive_from }, &mut |_, _| {}).unwrap_err();
    check("unmatched send", matches!(error, CommError::BadNeighbor { rank: 1, neighbor: 0, .. }), &error)?;

    // Byte payloads of any length on a ring, empty ones included (a rule that did not fire),
    // twice in a row so that a message of one exchange cannot be taken for the next one's.
    for round in 0..2usize {
        let payload = vec![(rank + round) as u8; (rank * 3 + round) % 4];
        let mut got = vec![Vec::new(); 2];
        comm.exchange_bytes(&payload, Route::both_ways(&peers), &mut |k, bytes| got[k] = bytes.to_vec())?;
        let want: Vec<Vec<u8>> = peers.iter().map(|&j| vec![(j + round) as u8; (j * 3 + round) % 4]).collect();
        check("exchange of byte payloads", got == want, &got)?;
    }
    let error = comm.exchange_bytes(&[1], Route { send_to: &[to], receive_from }, &mut |_, _| {}).unwrap_err();
    check("unmatched byte send", matches!(error, CommError::BadNeighbor { rank: 1, neighbor: 0, .. }), &error)?;

    let mut group = comm.split(rank % 2)?;
    let mut local = [rank as f64];
    group.all_reduce_f64(&mut local)?;
    let members: Vec<usize> = (0..m).filter(|j| j % 2 == rank % 2).collect();
    check(
        "split",
        (group.rank(), group.world_size()) == (rank / 2, members.len()),
        (group.rank(), group.world_size()),
    )?;
    check("sum within the group", local[0] == members.iter().sum::<usize>() as f64, local)?;
    let mut in_group = vec![1.0f32; 4];
    group.all_reduce_sum(&mut in_group)?;
    check("all-reduce within the group", in_group == vec![members.len() as f32; 4], &in_group)?;
    drop(group);

    // Mismatched calls are errors on every rank, not hangs.
    let mut uneven = vec![0.0f32; 3 + rank % 2];
    let error = comm.all_reduce_sum(&mut uneven).unwrap_err();
    check("length mismatch", matches!(error, CommError::LengthMismatch { .. }), &error)?;
    let error = if rank == 0 { comm.broadcast(&mut [0.0], 0) } else { comm.all_reduce_f64(&mut [0.0]) }.unwrap_err();
    check("operation mismatch", matches!(error, CommError::OperationMismatch { .. }), &error)?;
    comm.barrier()?;
    Ok(())
}

fn main() -> ExitCode {
    let mut comm = match MpiComm::world() {
        Ok(comm) => comm,
        Err(error) => {
            eprintln!("mpi-collectives: {error}");
            return ExitCode::FAILURE;
        }
    };
    match run(&mut comm) {
        Ok(()) => {
            println!("rank {}: all collectives agree", comm.rank());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("rank {}: {error}", comm.rank());
            ExitCode::FAILURE
        }
    }
}
