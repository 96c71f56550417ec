//! A quantized sum all-reduce: a ring reduce-scatter then a ring all-gather whose every message
//! is a compressed chunk, built on [`Communicator::exchange_bytes`], so it runs on every
//! communicator (threads, MPI) and its bytes are metered from the payloads.
//!
//! The buffer is cut into `m` chunks. Reduce-scatter: in `m − 1` steps each worker sends one
//! chunk's running sum, compressed, to the next rank and adds the previous rank's (decoded) to
//! its own values of that chunk; the sums accumulate in `f32`, and after the last step worker `r`
//! holds the complete sum of chunk `r + 1 mod m`. It compresses that sum once and uses the
//! decoded values itself; all-gather: in `m − 1` steps the payloads travel on around the ring
//! unchanged, each worker decoding each. Every worker ends with bit-identical sums, and each
//! sends `2(m − 1)` payloads of about `1/m` of the buffer: `2(m − 1)/m` of the compressed model,
//! against `m − 1` for an all-gather of whole compressed models.
//!
//! The compressor must be elementwise ([`Compressor::is_elementwise`]: `bf16`, `fp16`, `int8`,
//! `fp8`): a sum of decoded values then stands for the decoded sum. Exact segments of the split
//! (BatchNorm statistics) travel as `f32`, so their sums are exact up to `f32` addition. Each
//! hop of the reduce-scatter rounds the running sum again; the error of a value is bounded by
//! the sum of each hop's rounding of the partial sums it carried (tested).

use std::ops::Range;

use super::{CommError, Communicator, Route};
use crate::compress::{CompressContext, CompressError, Compressor, Segments};

/// Why a quantized all-reduce failed.
#[derive(Debug, thiserror::Error)]
pub enum QuantizedReduceError {
    /// The exchange failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A neighbour's payload cannot be decoded.
    #[error("worker {from}'s quantized chunk cannot be decoded: {error}")]
    Payload {
        /// The sender's rank.
        from: usize,
        /// What is wrong with it.
        error: CompressError,
    },
    /// The compressor does not quantize value by value.
    #[error("{0} cannot be summed after decoding (a quantized all-reduce takes bf16, fp16, int8 or fp8)")]
    NotElementwise(Compressor),
}

/// Chunk `k` of `m` of a buffer of `n` values.
fn chunk(n: usize, m: usize, k: usize) -> Range<usize> {
    (k * n).div_ceil(m)..((k + 1) * n).div_ceil(m)
}

/// Replaces `values` by their element-wise sum over the workers, every message compressed by
/// `compressor` (exact segments of `split` as `f32`; `None`: all values compressed). `ctx`'s
/// seed and round go into the payloads' context (the sender's rank is set per message).
pub fn quantized_all_reduce_sum(
    comm: &mut dyn Communicator,
    values: &mut [f32],
    compressor: Compressor,
    split: Option<&Segments>,
    ctx: CompressContext,
) -> Result<(), QuantizedReduceError> {
    if !compressor.is_elementwise() {
        return Err(QuantizedReduceError::NotElementwise(compressor));
    }
    let (m, r, n) = (comm.world_size(), comm.rank(), values.len());
    if m == 1 {
        return Ok(());
    }
    let whole = Segments::whole(n);
    let split = match split {
        Some(split) if split.len() == n => split,
        _ => &whole,
    };
    let (next, previous) = ([(r + 1) % m], [(r + m - 1) % m]);
    let route = Route { send_to: &next, receive_from: &previous };
    let at = |rank: usize| CompressContext { rank, ..ctx };
    let (mut payload, mut decoded) = (Vec::new(), Vec::new());
    // Reduce-scatter: step s sends chunk r − s and adds chunk r − s − 1 from the previous rank.
    for s in 0..m - 1 {
        let (sent, received) = (chunk(n, m, (r + m - s) % m), chunk(n, m, (r + 2 * m - s - 1) % m));
        compressor.compress(&values[sent.clone()], &split.slice(&sent), at(r), &mut payload);
        let mut outcome = Ok(());
        comm.exchange_bytes(&payload, route, &mut |_, bytes| {
            outcome = compressor.decompress(bytes, &split.slice(&received), at(previous[0]), &mut decoded);
        })?;
        outcome.map_err(|error| QuantizedReduceError::Payload { from: previous[0], error })?;
        values[received].iter_mut().zip(&decoded).for_each(|(v, d)| *v += d);
    }
    // This worker's complete chunk, compressed once; it keeps the decoded values, as everyone.
    let owned = chunk(n, m, (r + 1) % m);
    compressor.compress(&values[owned.clone()], &split.slice(&owned), at(r), &mut payload);
    compressor
        .decompress(&payload, &split.slice(&owned), at(r), &mut decoded)
        .map_err(|error| QuantizedReduceError::Payload { from: r, error })?;
    values[owned].copy_from_slice(&decoded);
    // All-gather: step s forwards the payload of chunk r + 1 − s and receives chunk r − s.
    for s in 0..m - 1 {
        let received = chunk(n, m, (r + m - s) % m);
        let origin = (r + 2 * m - s - 1) % m;
        let mut incoming = Vec::new();
        comm.exchange_bytes(&payload, route, &mut |_, bytes| incoming = bytes.to_vec())?;
        compressor
            .decompress(&incoming, &split.slice(&received), at(origin), &mut decoded)
            .map_err(|error| QuantizedReduceError::Payload { from: previous[0], error })?;
        values[received].copy_from_slice(&decoded);
        payload = incoming;
    }
    Ok(())
}

/// The bytes one worker sends in [`quantized_all_reduce_sum`] of a buffer split as `split`
/// among `m` workers, averaged over the workers (every chunk travels `2(m − 1)` times in all,
/// once per hop, each hop sent by a different worker on average).
pub fn quantized_all_reduce_bytes(compressor: Compressor, split: &Segments, m: usize) -> f64 {
    if m <= 1 {
        return 0.0;
    }
    let n = split.len();
    let total: usize = (0..m).map(|k| compressor.payload_bytes(&split.slice(&chunk(n, m, k)))).sum();
    2.0 * (m - 1) as f64 * total as f64 / m as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{InProcessGroup, Metered, Traffic};
    use crate::compress::Segment;
    use crate::launch::{Failure, run_group};
    use crate::rules::RuleError;
    use crate::testing::worker_buffer;

    /// Every worker's result and bytes sent, for `m` workers summing `worker_buffer(rank, n)`.
    fn reduce(m: usize, n: usize, compressor: Compressor, split: Option<Segments>) -> Vec<(Vec<f32>, u64)> {
        let comms = InProcessGroup::new(m).into_communicators();
        run_group(comms, |rank, comm| -> Result<_, crate::rules::RuleError> {
            let mut comm = Metered::new(comm);
            let mut values = worker_buffer(rank, n);
            let ctx = CompressContext { seed: 7, round: 3, rank };
            quantized_all_reduce_sum(&mut comm, &mut values, compressor, split.as_ref(), ctx)?;
            Ok((values, comm.traffic().total().bytes_sent))
        })
        .unwrap_or_else(|failure| panic!("{:?}", failure.primary()))
    }

    fn exact_sum(m: usize, n: usize) -> Vec<f64> {
        (0..n).map(|k| (0..m).map(|r| f64::from(worker_buffer(r, n)[k])).sum()).collect()
    }

    #[test]
    fn every_worker_gets_the_same_sum_within_the_codecs_error() {
        let (m, n) = (4, 1000);
        let exact = exact_sum(m, n);
        // Each value is rounded at most m times (m − 1 hops and the final rounding), each time a
        // partial sum of at most Σ_r |v_r|: by a relative `rel` (FP8 E4M3: 3 mantissa bits,
        // 2⁻⁴; bf16 2⁻⁸; fp16 2⁻¹¹) plus an absolute floor (int8: half a block's scale, at most
        // the largest partial sum / 254; FP8: its subnormal spacing, scale · 2⁻⁹).
        let magnitudes: Vec<f64> =
            (0..n).map(|k| (0..m).map(|r| f64::from(worker_buffer(r, n)[k].abs())).sum()).collect();
        let largest = magnitudes.iter().copied().fold(0.0, f64::max);
        for (compressor, rel, floor, worst) in [
            (Compressor::Int8, 0.0, largest / 254.0, 0.02),
            (Compressor::Fp8, 2f64.powi(-4), largest / 448.0 * 2f64.powi(-9), 0.2),
            (Compressor::Bf16, 2f64.powi(-8), 0.0, 0.02),
            (Compressor::Fp16, 2f64.powi(-11), 1e-7, 0.002),
        ] {
            let runs = reduce(m, n, compressor, None);
            assert!(runs.windows(2).all(|w| w[0].0 == w[1].0), "{compressor}: every worker bit-identical");
            let mut total = 0.0;
            for (k, ((got, want), magnitude)) in runs[0].0.iter().zip(&exact).zip(&magnitudes).enumerate() {
                let error = (f64::from(*got) - want).abs();
                let bound = m as f64 * (magnitude * rel + floor);
                assert!(error <= bound, "{compressor}, value {k}: error {error} above {bound}");
                total += error;
            }
            assert!(total > 0.0, "{compressor}: lossy, so not exact");
            assert!(total / n as f64 <= worst * largest / m as f64, "{compressor}: mean error {}", total / n as f64);
        }
    }

    #[test]
    fn each_worker_sends_two_m_minus_one_chunks() {
        let (m, n) = (4, 1000);
        for (rank, (_, bytes)) in reduce(m, n, Compressor::Int8, None).into_iter().enumerate() {
            // Worker r sends chunks r, r−1, r−2 in the reduce-scatter, then chunks r+1, r, r−1
            // (the one it owns, then those it received) in the all-gather; 250 values each,
            // one scale per block of 256 and an 8-byte header.
            let per_chunk = Compressor::Int8.payload_bytes(&Segments::whole(250)) as u64;
            assert_eq!(bytes, 6 * per_chunk, "worker {rank}");
            assert_eq!(quantized_all_reduce_bytes(Compressor::Int8, &Segments::whole(n), m), bytes as f64);
        }
        // Against an all-gather of whole int8 models: (m − 1) models per worker.
        let all_gather = (m as u64 - 1) * Compressor::Int8.payload_bytes(&Segments::whole(n)) as u64;
        assert!(6 * (Compressor::Int8.payload_bytes(&Segments::whole(250)) as u64) < all_gather / 2 + 100);
        let dense = Traffic::ring_all_reduce(4 * n as u64, m);
        assert!(reduce(m, n, Compressor::Int8, None)[0].1 * 3 < dense + 100, "about a quarter of f32's bytes");
    }

    #[test]
    fn exact_segments_sum_exactly_and_bad_compressors_are_refused() {
        let (m, n) = (3, 100);
        let split = Segments::new([
            Segment { len: 40, exact: false },
            Segment { len: 20, exact: true },
            Segment { len: 40, exact: false },
        ]);
        let runs = reduce(m, n, Compressor::Int8, Some(split));
        for k in 40..60 {
            // f32 sums in ring order: the same on every worker, within f32 rounding of the exact.
            let exact: f64 = (0..m).map(|r| f64::from(worker_buffer(r, n)[k])).sum();
            assert!((f64::from(runs[0].0[k]) - exact).abs() < 1e-5, "value {k}");
        }
        let comms = InProcessGroup::new(2).into_communicators();
        let failure = run_group(comms, |rank, mut comm| -> Result<(), crate::rules::RuleError> {
            let mut values = worker_buffer(rank, 10);
            Ok(quantized_all_reduce_sum(&mut comm, &mut values, Compressor::Sign, None, CompressContext::default())?)
        })
        .unwrap_err();
        let failure = &failure.primary().failure;
        assert!(matches!(failure, Failure::Error(RuleError::NotElementwise(Compressor::Sign))), "{failure:?}");
    }
}
