//! Times each merge rule over [`MpiComm`] against the raw MPI operation moving the same bytes,
//! interleaved in one run. A merge is what the synchronizer runs on its flat buffer
//! ([`Synchronizer::merge_flat`]): the rule, then, for rules that measure the consensus
//! distance, one small collective of the merge statistics (a non-finite count per rank and the
//! squared distance).
//!
//! Usage: `mpirun -np 4 mpi-merge-bench [floats (default 272474, ResNet-20)] [repetitions (default 200)]`.
//! Rank 0 prints, per operation, the median / 10th / 90th percentile over repetitions of the
//! slowest rank's time, and the ratio of medians to the raw all-reduce.

use std::ffi::{c_int, c_void};
use std::process::ExitCode;
use std::time::Instant;

use burn_coop::{
    CoopError, Synchronizer,
    comm::Communicator,
    rules::{MergeRule, averaging::Averaging, elastic::Elastic, gossip::Gossip},
    schedule::fixed::PeriodicSchedule,
    topology::Topology,
};
use burn_coop_mpi::MpiComm;
use burn_coop_mpi::mpi::ffi;
use burn_coop_mpi::mpi::topology::SimpleCommunicator;

type Op<'a> = Box<dyn FnMut(&mut Vec<f32>) -> Result<(), CoopError> + 'a>;

/// A synchronizer for `rule` on a fresh duplicate of `MPI_COMM_WORLD`.
fn synchronizer(rule: impl MergeRule + 'static, checked: bool) -> Result<Synchronizer, Box<dyn std::error::Error>> {
    let comm = MpiComm::from_communicator(&SimpleCommunicator::world())?.with_length_checks(checked);
    Ok(Synchronizer::new(rule, PeriodicSchedule::every(1)?, comm)?)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mpi-merge-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn raw_all_reduce(comm: ffi::MPI_Comm, send: &[f32], recv: &mut [f32]) {
    // SAFETY: both buffers hold `send.len()` f32.
    let code = unsafe {
        ffi::MPI_Allreduce(
            send.as_ptr().cast::<c_void>(),
            recv.as_mut_ptr().cast::<c_void>(),
            send.len() as c_int,
            ffi::RSMPI_FLOAT,
            ffi::RSMPI_SUM,
            comm,
        )
    };
    assert_eq!(code, 0, "MPI_Allreduce failed");
}

fn raw_ring_exchange(comm: ffi::MPI_Comm, rank: usize, m: usize, send: &[f32], left: &mut [f32], right: &mut [f32]) {
    let peers = [(rank + m - 1) % m, (rank + 1) % m];
    let mut requests = [unsafe { ffi::RSMPI_REQUEST_NULL }; 4];
    let n = send.len() as c_int;
    // SAFETY: the buffers outlive the requests, completed by MPI_Waitall below.
    unsafe {
        for (k, (peer, buffer)) in peers.iter().zip([left, right]).enumerate() {
            let peer = *peer as c_int;
            ffi::MPI_Irecv(buffer.as_mut_ptr().cast(), n, ffi::RSMPI_FLOAT, peer, 7, comm, &mut requests[2 * k]);
            ffi::MPI_Isend(send.as_ptr().cast(), n, ffi::RSMPI_FLOAT, peer, 7, comm, &mut requests[2 * k + 1]);
        }
        assert_eq!(ffi::MPI_Waitall(4, requests.as_mut_ptr(), ffi::RSMPI_STATUSES_IGNORE), 0);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(272_474);
    let reps: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);

    let mut checked = MpiComm::world()?;
    let (rank, m) = (checked.rank(), checked.world_size());
    let comm = checked.as_raw();

    let initial: Vec<f32> = (0..n).map(|k| ((k * 7 + rank * 13) % 101) as f32 * 0.01).collect();
    let mut scratch = vec![0.0f32; n];

    let mut averaging = synchronizer(Averaging::new(), true)?;
    let mut averaging_unchecked = synchronizer(Averaging::new(), false)?;
    let mut elastic = synchronizer(Elastic::optimal(m)?, true)?;
    let mut all_reduce = MpiComm::from_communicator(&SimpleCommunicator::world())?;
    let ring = if m >= 3 { Some(Topology::ring(m)?) } else { None };
    let mut gossip =
        ring.as_ref().map(|r| Gossip::on(r).map_err(Box::from).and_then(|g| synchronizer(g, true))).transpose()?;
    let mut gossip_consensus = ring
        .as_ref()
        .map(|r| {
            Gossip::on(r).map_err(Box::from).and_then(|g| synchronizer(g, true)).map(|s| s.with_consensus_every(1))
        })
        .transpose()?;
    let mut left = vec![0.0f32; n];
    let mut right = vec![0.0f32; n];

    let mut ops: Vec<(&str, Op<'_>)> = vec![
        (
            "raw MPI_Allreduce (f32 sum)",
            Box::new(|buf| {
                raw_all_reduce(comm, buf, &mut scratch);
                Ok(())
            }),
        ),
        ("averaging merge", Box::new(|buf| averaging.merge_flat(buf).map(drop))),
        ("averaging merge, no length check", Box::new(|buf| averaging_unchecked.merge_flat(buf).map(drop))),
        ("communicator all_reduce_sum", Box::new(|buf| Ok(all_reduce.all_reduce_sum(buf)?))),
        ("elastic merge", Box::new(|buf| elastic.merge_flat(buf).map(drop))),
    ];
    if let (Some(g), Some(gc)) = (gossip.as_mut(), gossip_consensus.as_mut()) {
        ops.push((
            "raw ring Isend/Irecv (2 neighbours)",
            Box::new(|buf| {
                raw_ring_exchange(comm, rank, m, buf, &mut left, &mut right);
                Ok(())
            }),
        ));
        ops.push(("gossip ring merge, no consensus", Box::new(|buf| g.merge_flat(buf).map(drop))));
        ops.push(("gossip ring merge (+ consensus)", Box::new(|buf| gc.merge_flat(buf).map(drop))));
    }

    let warmup = 10.min(reps);
    let mut samples = vec![vec![0.0f64; reps]; ops.len()];
    let mut buf = initial.clone();
    for rep in 0..warmup + reps {
        for (k, (_, op)) in ops.iter_mut().enumerate() {
            buf.copy_from_slice(&initial);
            checked.barrier()?;
            let start = Instant::now();
            op(&mut buf)?;
            let elapsed = start.elapsed().as_secs_f64();
            if rep >= warmup {
                samples[k][rep - warmup] = elapsed;
            }
        }
    }
    drop(ops);

    // The slowest rank's time of each sample.
    let mut flat: Vec<f64> = samples.concat();
    let local = flat.clone();
    // SAFETY: both buffers hold `flat.len()` f64.
    let code = unsafe {
        ffi::MPI_Allreduce(
            local.as_ptr().cast(),
            flat.as_mut_ptr().cast(),
            flat.len() as c_int,
            ffi::RSMPI_DOUBLE,
            ffi::RSMPI_MAX,
            comm,
        )
    };
    assert_eq!(code, 0, "MPI_Allreduce (max) failed");

    if rank == 0 {
        let names = [
            "raw MPI_Allreduce (f32 sum)",
            "averaging merge",
            "averaging merge, no length check",
            "communicator all_reduce_sum",
            "elastic merge",
            "raw ring Isend/Irecv (2 neighbours)",
            "gossip ring merge, no consensus",
            "gossip ring merge (+ consensus)",
        ];
        let rows = samples.len();
        println!(
            "np={m}, {n} f32 ({:.2} MB) per rank, {reps} repetitions after {warmup} warm-up, times in µs (slowest rank)",
            n as f64 * 4.0 / 1e6
        );
        println!("{}", MpiComm::library_version().lines().next().unwrap_or(""));
        println!("| operation | median | p10 | p90 | ratio to raw all-reduce (medians) |");
        println!("|---|---:|---:|---:|---:|");
        let mut medians = Vec::new();
        for (k, name) in names.iter().enumerate().take(rows) {
            let mut times: Vec<f64> = flat[k * reps..(k + 1) * reps].iter().map(|t| t * 1e6).collect();
            times.sort_by(f64::total_cmp);
            let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            let median = pick(0.5);
            medians.push(median);
            println!("| {name} | {median:.0} | {:.0} | {:.0} | {:.2} |", pick(0.1), pick(0.9), median / medians[0]);
        }
        if rows > 5 {
            println!(
                "gossip ring merge (+ consensus) / (raw ring exchange + raw all-reduce): {:.2}",
                medians[7] / (medians[5] + medians[0])
            );
            println!("gossip ring merge, no consensus / raw ring exchange: {:.2}", medians[6] / medians[5]);
        }
    }
    checked.barrier()?;
    Ok(())
}
