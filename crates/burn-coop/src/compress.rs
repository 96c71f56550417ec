//! Compressors: what a worker sends instead of its dense `f32` buffer, as compact byte payloads.
//!
//! | spec | body of one tensor of `n` values | bytes for `n` values |
//! |---|---|---|
//! | `identity` | the values, `f32` little-endian | `4n` |
//! | `topk:F` | the `k = ⌈F·n⌉` largest magnitudes: `u32` indices (increasing) then `f32` values | `8k` |
//! | `topk:F+sign` | the `k` largest magnitudes' indices (increasing), their mean magnitude (`f32`) and one sign bit each (sparsify ∘ quantize, as in SPARQ- and SQuARM-SGD) | `4k + 4 + ⌈k/8⌉` |
//! | `randk:F` | `k = ⌈F·n⌉` values at indices every worker draws alike from the shared seed and the round (Floyd's sampling), so no index travels | `4k` |
//! | `sign` | the mean magnitude `‖v‖₁/n` (`f32`) and one sign bit per value (scaled sign) | `4 + ⌈n/8⌉` |
//! | `qsgd:S` | `‖v‖₂` (`f32`) and per value a sign bit and a level in `0..=S`, packed (QSGD, Alistarh et al., NeurIPS 2017: `v_i ≈ ‖v‖₂ · sign(v_i) · ℓ_i/S` with `ℓ_i` rounded up with probability `S|v_i|/‖v‖₂ − ⌊S|v_i|/‖v‖₂⌋`, so the decoded value is unbiased) | `4 + ⌈n(1 + ⌈log₂(S+1)⌉)/8⌉` |
//! | `bf16`, `fp16` | each value rounded to nearest-even in 16 bits | `2n` |
//! | `int8` | per block of 256 values a scale `max|v|/127` (`f32`), then each value as the nearest whole multiple of it (`i8`, ties to even) | `n + 4⌈n/256⌉` |
//! | `fp8` | per block of 256 values a scale `max|v|/448` (`f32`), then each `v/scale` as the nearest FP8 E4M3 value (OCP's, largest 448, ties to the even code) | `n + 4⌈n/256⌉` |
//!
//! A payload is an 8-byte header (kind, flags, value count) followed by one body per
//! [`Segment`] of the buffer, in order: each tensor of a model is compressed on its own (its own
//! scale, norm, top-k share), and exact segments (buffers such as BatchNorm running statistics)
//! travel as `f32`, `4n` bytes ([`Segments`]). Without a split the buffer is one tensor.
//!
//! The metered bytes of a compressed merge are the payloads' real sizes. Random choices
//! (rand-k's indices, QSGD's rounding) come from [`crate::random::uniform`] with the shared seed,
//! the merge round, the segment (rand-k) or the value's position (QSGD) and, for QSGD, the
//! worker's rank, so they are reproducible and a resumed run
//! draws the same. Decoding checks the header, the value count and the payload's length and
//! rejects a malformed payload with a [`CompressError`], never a panic.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::random::uniform;

/// Bytes before every payload: kind, flags (unused, 0), two reserved bytes, the value count.
pub const HEADER_BYTES: usize = 8;

/// A compressor by name and parameter (`topk:0.01`, `sign`, …).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Compressor {
    /// The dense values.
    Identity,
    /// The largest magnitudes, with their indices.
    TopK(f64),
    /// The largest magnitudes' indices and signs, scaled by their mean magnitude (top-k then
    /// scaled sign: the "sparsify ∘ quantize" of SPARQ- and SQuARM-SGD).
    TopKSign(f64),
    /// Values at indices drawn from the shared seed.
    RandK(f64),
    /// Scaled sign: one bit per value and the mean magnitude.
    Sign,
    /// Stochastic uniform quantization with `S` levels.
    Qsgd(u32),
    /// Brain floating point, 16 bits.
    Bf16,
    /// IEEE half precision.
    Fp16,
    /// 8-bit integers with one `f32` scale per block of [`QUANT_BLOCK`] values.
    Int8,
    /// FP8 E4M3 with one `f32` scale per block of [`QUANT_BLOCK`] values.
    Fp8,
}

/// Values per scale of the block-scaled 8-bit compressors (`int8`, `fp8`).
pub const QUANT_BLOCK: usize = 256;

/// Where a payload is made or read: the shared seed, the merge round and the sender's rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompressContext {
    /// The seed shared by every worker.
    pub seed: u64,
    /// The merge round.
    pub round: u64,
    /// The rank of the worker that compresses (the sender, when decoding).
    pub rank: usize,
}

/// Why a payload cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    /// The payload is shorter than its header or than its header says.
    #[error("a {compressor} payload of {len} bytes is too short: {expected} expected")]
    Truncated {
        /// The compressor.
        compressor: String,
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        expected: usize,
    },
    /// The payload is longer than its header says.
    #[error("a {compressor} payload has {extra} bytes after its end")]
    TrailingBytes {
        /// The compressor.
        compressor: String,
        /// Bytes left over.
        extra: usize,
    },
    /// The header names another compressor.
    #[error("the payload was made by compressor kind {found}, not by {expected}")]
    WrongKind {
        /// The compressor decoding.
        expected: String,
        /// The kind byte found.
        found: u8,
    },
    /// The payload is for a buffer of another length.
    #[error("the payload holds {found} values but the buffer has {expected}")]
    WrongLength {
        /// The buffer's length.
        expected: usize,
        /// The count in the header.
        found: usize,
    },
    /// An index out of range, repeated or out of order (top-k), or a level above `S` (QSGD).
    #[error("a {compressor} payload is malformed: {reason}")]
    Malformed {
        /// The compressor.
        compressor: String,
        /// What is wrong.
        reason: String,
    },
}

impl Compressor {
    fn kind(self) -> u8 {
        match self {
            Self::Identity => 1,
            Self::TopK(_) => 2,
            Self::TopKSign(_) => 8,
            Self::RandK(_) => 3,
            Self::Sign => 4,
            Self::Qsgd(_) => 5,
            Self::Bf16 => 6,
            Self::Fp16 => 7,
            Self::Int8 => 9,
            Self::Fp8 => 10,
        }
    }

    /// Whether the decoded values of several workers' payloads may be summed in place of their
    /// values (every value quantized deterministically on its own scale, none left out): the
    /// compressors a quantized all-reduce can carry (`bf16`, `fp16`, `int8`, `fp8`; the identity
    /// too, losslessly).
    pub fn is_elementwise(self) -> bool {
        matches!(self, Self::Identity | Self::Bf16 | Self::Fp16 | Self::Int8 | Self::Fp8)
    }

    /// Whether decoding gives back exactly the values encoded (the identity): then a rule may
    /// send the values themselves, dense, with a sum all-reduce.
    pub fn is_lossless(self) -> bool {
        matches!(self, Self::Identity)
    }

    /// Values kept by top-k and rand-k for a buffer of `n` (at least one when `n > 0`).
    pub fn kept(fraction: f64, n: usize) -> usize {
        if n == 0 { 0 } else { ((fraction * n as f64).ceil() as usize).clamp(1, n) }
    }

    /// Bits per value of QSGD with `levels` levels: a sign and `⌈log₂(S+1)⌉` for the level.
    fn qsgd_bits(levels: u32) -> usize {
        1 + (u32::BITS - levels.leading_zeros()) as usize
    }

    /// The exact payload size, header included, for a buffer split into `segments`.
    pub fn payload_bytes(self, segments: &Segments) -> usize {
        HEADER_BYTES
            + segments.parts.iter().map(|s| if s.exact { 4 * s.len } else { self.body_bytes(s.len) }).sum::<usize>()
    }

    /// The bytes one compressed tensor of `n` values takes after the header.
    fn body_bytes(self, n: usize) -> usize {
        match self {
            Self::Identity => 4 * n,
            Self::TopK(f) => 8 * Self::kept(f, n),
            Self::TopKSign(f) => 4 * Self::kept(f, n) + 4 + Self::kept(f, n).div_ceil(8),
            Self::RandK(f) => 4 * Self::kept(f, n),
            Self::Sign => 4 + n.div_ceil(8),
            Self::Qsgd(s) => 4 + (n * Self::qsgd_bits(s)).div_ceil(8),
            Self::Bf16 | Self::Fp16 => 2 * n,
            Self::Int8 | Self::Fp8 => n + 4 * n.div_ceil(QUANT_BLOCK),
        }
    }

    /// Compresses `values`, split into `segments` (which must cover them exactly), into `out`
    /// (replacing its contents): every tensor on its own, exact segments as `f32`.
    ///
    /// # Panics
    /// If `segments` does not have `values.len()` values (a caller's bug: rules check it first).
    pub fn compress(self, values: &[f32], segments: &Segments, ctx: CompressContext, out: &mut Vec<u8>) {
        assert_eq!(
            segments.len(),
            values.len(),
            "segments of {} values for a buffer of {}",
            segments.len(),
            values.len()
        );
        out.clear();
        out.reserve(self.payload_bytes(segments));
        out.extend_from_slice(&[self.kind(), 0, 0, 0]);
        out.extend_from_slice(&(values.len() as u32).to_le_bytes());
        for (index, (range, segment)) in segments.iter().enumerate() {
            let part = &values[range.clone()];
            if segment.exact {
                part.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            } else {
                self.encode_tensor(part, Place { offset: range.start, index }, ctx, out);
            }
        }
    }

    /// Appends one tensor's compressed values (no header).
    fn encode_tensor(self, values: &[f32], place: Place, ctx: CompressContext, out: &mut Vec<u8>) {
        match self {
            Self::Identity => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::TopK(f) => {
                let chosen = top_indices(values, Self::kept(f, values.len()));
                chosen.iter().for_each(|i| out.extend_from_slice(&i.to_le_bytes()));
                chosen.iter().for_each(|&i| out.extend_from_slice(&values[i as usize].to_le_bytes()));
            }
            Self::TopKSign(f) => {
                let chosen = top_indices(values, Self::kept(f, values.len()));
                chosen.iter().for_each(|i| out.extend_from_slice(&i.to_le_bytes()));
                let selected: Vec<f32> = chosen.iter().map(|&i| values[i as usize]).collect();
                push_scaled_signs(&selected, out);
            }
            Self::RandK(f) => {
                for i in random_indices(values.len(), Self::kept(f, values.len()), ctx, place.index) {
                    out.extend_from_slice(&values[i].to_le_bytes());
                }
            }
            Self::Sign => push_scaled_signs(values, out),
            Self::Qsgd(levels) => {
                let norm = values.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt() as f32;
                out.extend_from_slice(&norm.to_le_bytes());
                let width = Self::qsgd_bits(levels) - 1;
                let mut bits = BitWriter::new(out);
                for (i, v) in values.iter().enumerate() {
                    let scaled = if norm > 0.0 { f64::from(v.abs() / norm) * f64::from(levels) } else { 0.0 };
                    let floor = scaled.floor();
                    let draw = (place.offset + i) as u64;
                    let u = uniform(ctx.seed ^ 0x5153_4744, ctx.round.wrapping_mul(1 << 20) ^ ctx.rank as u64, draw);
                    let level = (floor as u32 + u32::from(u < scaled - floor)).min(levels);
                    bits.push(u32::from(v.is_sign_negative()), 1);
                    bits.push(level, width);
                }
                bits.finish();
            }
            Self::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            Self::Fp16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Self::Int8 | Self::Fp8 => {
                let blocks = values.chunks(QUANT_BLOCK);
                let scales: Vec<f32> = blocks.clone().map(|block| self.block_scale(block)).collect();
                scales.iter().for_each(|scale| out.extend_from_slice(&scale.to_le_bytes()));
                for (block, scale) in blocks.zip(scales) {
                    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for v in block {
                        let code = match self {
                            Self::Int8 => (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8 as u8,
                            _ => fp8::encode(v * inverse),
                        };
                        out.push(code);
                    }
                }
            }
        }
    }

    /// A block's scale: its largest magnitude over the largest code (127 for `int8`, 448 for
    /// `fp8`), 0 for a block of zeros; a non-finite value makes it non-finite (and every value
    /// of the block decodes to NaN or 0, as the sender's model already was).
    fn block_scale(self, block: &[f32]) -> f32 {
        let largest = block.iter().fold(0.0f32, |m, v| if v.abs() > m || v.is_nan() { v.abs() } else { m });
        let top = if self == Self::Int8 { 127.0 } else { fp8::MAX };
        largest / top
    }

    /// Decodes `payload` (made by this compressor for a buffer split into `segments`) into
    /// `out`, a dense buffer of `segments.len()` values (zeros where nothing was sent).
    pub fn decompress(
        self,
        payload: &[u8],
        segments: &Segments,
        ctx: CompressContext,
        out: &mut Vec<f32>,
    ) -> Result<(), CompressError> {
        let name = self.to_string();
        let len = segments.len();
        let expected = self.payload_bytes(segments);
        if payload.len() < HEADER_BYTES {
            return Err(CompressError::Truncated { compressor: name, len: payload.len(), expected });
        }
        if payload[0] != self.kind() {
            return Err(CompressError::WrongKind { expected: name, found: payload[0] });
        }
        let count = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
        if count != len {
            return Err(CompressError::WrongLength { expected: len, found: count });
        }
        if payload.len() < expected {
            return Err(CompressError::Truncated { compressor: name, len: payload.len(), expected });
        }
        if payload.len() > expected {
            return Err(CompressError::TrailingBytes { compressor: name, extra: payload.len() - expected });
        }
        out.clear();
        out.resize(len, 0.0);
        let mut at = HEADER_BYTES;
        for (index, (range, segment)) in segments.iter().enumerate() {
            let size = if segment.exact { 4 * segment.len } else { self.body_bytes(segment.len) };
            let (body, part) = (&payload[at..at + size], &mut out[range.clone()]);
            if segment.exact {
                part.iter_mut()
                    .zip(body.chunks_exact(4))
                    .for_each(|(v, b)| *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            } else {
                self.decode_tensor(body, part, Place { offset: range.start, index }, ctx, &name)?;
            }
            at += size;
        }
        Ok(())
    }

    /// Decodes one tensor's body (of exactly [`Compressor::body_bytes`]) into `out`, zeroed.
    fn decode_tensor(
        self,
        body: &[u8],
        out: &mut [f32],
        place: Place,
        ctx: CompressContext,
        name: &str,
    ) -> Result<(), CompressError> {
        let len = out.len();
        let f32_at = |k: usize| f32::from_le_bytes(body[4 * k..4 * k + 4].try_into().expect("4 bytes"));
        match self {
            Self::Identity => (0..len).for_each(|k| out[k] = f32_at(k)),
            Self::TopK(f) => {
                let k = Self::kept(f, len);
                for (j, index) in read_indices(body, k, len, name)?.into_iter().enumerate() {
                    out[index] = f32_at(k + j);
                }
            }
            Self::TopKSign(f) => {
                let k = Self::kept(f, len);
                let indices = read_indices(body, k, len, name)?;
                let scale = f32_at(k);
                let signs = &body[4 * k + 4..];
                for (j, index) in indices.into_iter().enumerate() {
                    out[index] = scaled_sign(signs, j, scale);
                }
            }
            Self::RandK(f) => {
                for (j, i) in random_indices(len, Self::kept(f, len), ctx, place.index).into_iter().enumerate() {
                    out[i] = f32_at(j);
                }
            }
            Self::Sign => {
                let scale = f32_at(0);
                out.iter_mut().enumerate().for_each(|(j, v)| *v = scaled_sign(&body[4..], j, scale));
            }
            Self::Qsgd(levels) => {
                let norm = f32_at(0);
                let width = Self::qsgd_bits(levels) - 1;
                let mut bits = BitReader::new(&body[4..]);
                for (i, v) in out.iter_mut().enumerate() {
                    let negative = bits.take(1) == 1;
                    let level = bits.take(width);
                    if level > levels {
                        let reason = format!("level {level} of value {} above {levels}", place.offset + i);
                        return Err(CompressError::Malformed { compressor: name.to_string(), reason });
                    }
                    let magnitude = norm * level as f32 / levels as f32;
                    *v = if negative { -magnitude } else { magnitude };
                }
            }
            Self::Bf16 => out.iter_mut().zip(body.chunks_exact(2)).for_each(|(v, b)| {
                *v = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }),
            Self::Fp16 => out.iter_mut().zip(body.chunks_exact(2)).for_each(|(v, b)| {
                *v = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }),
            Self::Int8 | Self::Fp8 => {
                let blocks = len.div_ceil(QUANT_BLOCK);
                let codes = &body[4 * blocks..];
                for (b, block) in out.chunks_mut(QUANT_BLOCK).enumerate() {
                    let scale = f32_at(b);
                    for (v, &code) in block.iter_mut().zip(&codes[b * QUANT_BLOCK..]) {
                        *v = match self {
                            Self::Int8 => f32::from(code as i8) * scale,
                            _ => fp8::decode(code) * scale,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where a tensor sits: the position of its first value in the buffer (QSGD's random draws are
/// indexed by it) and its rank among the segments (rand-k's draws are).
#[derive(Debug, Clone, Copy)]
struct Place {
    offset: usize,
    index: usize,
}

/// One run of consecutive values of a flat buffer: a tensor, compressed on its own, or values
/// that travel exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Number of values.
    pub len: usize,
    /// Whether the values travel as exact `f32` (buffers such as BatchNorm running statistics).
    pub exact: bool,
}

/// How a flat buffer splits into the tensors it holds, for compression. Each tensor is
/// compressed on its own, with its own scale (sign), norm (QSGD) and share of top-k or rand-k
/// (at least one value each), so a tensor of small values is not drowned by a large one.
/// Buffers (BatchNorm running means and variances, [`TensorRole::Buffer`](crate::params::TensorRole))
/// travel exact: a lossy compressor would bias them, and a scaled sign could make a variance
/// negative. Built from a model with [`ParamLayout::segments`](crate::params::ParamLayout::segments);
/// a buffer without a split is one tensor ([`Segments::whole`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Segments {
    parts: Vec<Segment>,
    len: usize,
}

impl Segments {
    /// `segments` in buffer order (empty ones are dropped).
    pub fn new(segments: impl IntoIterator<Item = Segment>) -> Self {
        let parts: Vec<Segment> = segments.into_iter().filter(|s| s.len > 0).collect();
        let len = parts.iter().map(|s| s.len).sum();
        Self { parts, len }
    }

    /// One compressed tensor of `len` values.
    pub fn whole(len: usize) -> Self {
        Self::new([Segment { len, exact: false }])
    }

    /// Number of values covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is covered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of segments.
    pub fn count(&self) -> usize {
        self.parts.len()
    }

    /// Each segment with the range of the buffer it covers, in order.
    pub fn iter(&self) -> impl Iterator<Item = (std::ops::Range<usize>, Segment)> + '_ {
        self.parts.iter().scan(0, |start, &segment| {
            let range = *start..*start + segment.len;
            *start = range.end;
            Some((range, segment))
        })
    }

    /// The split to use for a buffer of `len` values: `split` when there is one (`None` when it
    /// covers another number of values), else the whole buffer as one tensor.
    pub fn resolve(split: Option<&Self>, len: usize) -> Option<std::borrow::Cow<'_, Self>> {
        match split {
            None => Some(std::borrow::Cow::Owned(Self::whole(len))),
            Some(split) if split.len == len => Some(std::borrow::Cow::Borrowed(split)),
            Some(_) => None,
        }
    }

    /// The part of this split that falls in `range` (of the buffer it covers), as a split of
    /// its own.
    pub fn slice(&self, range: &std::ops::Range<usize>) -> Self {
        Self::new(self.iter().filter_map(|(r, part)| {
            let (start, end) = (r.start.max(range.start), r.end.min(range.end));
            (start < end).then(|| Segment { len: end - start, exact: part.exact })
        }))
    }

    /// The ranges of the values a lossy compressor acts on (every segment but the exact ones).
    pub fn compressed_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.iter().filter(|(_, s)| !s.exact).map(|(range, _)| range)
    }
}

/// Scaled sign of `values`: their mean magnitude (`f32`, summed in `f64`), then eight sign bits a
/// byte, the first value in the lowest bit (BitWriter's order).
fn push_scaled_signs(values: &[f32], out: &mut Vec<u8>) {
    let total: f64 = values.iter().map(|v| f64::from(v.abs())).sum();
    let scale = if values.is_empty() { 0.0 } else { (total / values.len() as f64) as f32 };
    out.extend_from_slice(&scale.to_le_bytes());
    out.extend(
        values.chunks(8).map(|chunk| {
            chunk.iter().enumerate().fold(0u8, |byte, (b, v)| byte | (u8::from(v.is_sign_negative()) << b))
        }),
    );
}

/// The `j`-th value of a scaled-sign message: `-scale` where its bit is set, `scale` otherwise.
fn scaled_sign(bits: &[u8], j: usize, scale: f32) -> f32 {
    if (bits[j / 8] >> (j % 8)) & 1 == 1 { -scale } else { scale }
}

/// The indices of the `k` largest magnitudes (ties to the lower index), in increasing order.
fn top_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    if k < values.len() {
        order.select_nth_unstable_by(k, |&a, &b| {
            values[b as usize].abs().total_cmp(&values[a as usize].abs()).then(a.cmp(&b))
        });
    }
    let mut chosen = order[..k].to_vec();
    chosen.sort_unstable();
    chosen
}

/// The `k` indices at the start of a top-k payload's body, checked: in range and increasing.
fn read_indices(body: &[u8], k: usize, len: usize, name: &str) -> Result<Vec<usize>, CompressError> {
    let mut indices = Vec::with_capacity(k);
    for j in 0..k {
        let index = u32::from_le_bytes(body[4 * j..4 * j + 4].try_into().expect("4 bytes")) as usize;
        if index >= len || indices.last().is_some_and(|&p| index <= p) {
            let reason = format!("index {index} at position {j} (indices increase and stay below {len})");
            return Err(CompressError::Malformed { compressor: name.to_string(), reason });
        }
        indices.push(index);
    }
    Ok(indices)
}

/// `k` distinct indices below `n`, the same on every worker for one seed, round and segment
/// (Floyd's algorithm), in increasing order.
fn random_indices(n: usize, k: usize, ctx: CompressContext, segment: usize) -> Vec<usize> {
    let mut chosen = std::collections::BTreeSet::new();
    for (step, j) in (n - k..n).enumerate() {
        let draw = step as u64 | (segment as u64) << 40;
        let t = (uniform(ctx.seed ^ 0x5241_4e44, ctx.round, draw) * (j + 1) as f64) as usize;
        let t = t.min(j);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    chosen.into_iter().collect()
}

/// Packs values of a few bits each, least significant first.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    filled: usize,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out, acc: 0, filled: 0 }
    }

    fn push(&mut self, value: u32, bits: usize) {
        self.acc |= u64::from(value) << self.filled;
        self.filled += bits;
        while self.filled >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    fn finish(self) {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
    }
}

/// Reads what [`BitWriter`] packed (the caller checked the length).
struct BitReader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    fn take(&mut self, bits: usize) -> u32 {
        // The (up to five) bytes holding the field, least significant first.
        let (first, shift) = (self.position / 8, self.position % 8);
        let last = (self.position + bits).div_ceil(8).min(self.bytes.len());
        let window = self.bytes[first..last].iter().rev().fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte));
        self.position += bits;
        ((window >> shift) & ((1u64 << bits) - 1)) as u32
    }
}

impl fmt::Display for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identity => write!(f, "identity"),
            Self::TopK(fraction) => write!(f, "topk:{fraction}"),
            Self::TopKSign(fraction) => write!(f, "topk:{fraction}+sign"),
            Self::RandK(fraction) => write!(f, "randk:{fraction}"),
            Self::Sign => write!(f, "sign"),
            Self::Qsgd(levels) => write!(f, "qsgd:{levels}"),
            Self::Bf16 => write!(f, "bf16"),
            Self::Fp16 => write!(f, "fp16"),
            Self::Int8 => write!(f, "int8"),
            Self::Fp8 => write!(f, "fp8"),
        }
    }
}

impl FromStr for Compressor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(sparsifier) = text.strip_suffix("+sign") {
            if sparsifier.ends_with("+sign") {
                return Err(format!("'{text}': sign is applied once (topk:F+sign)"));
            }
            return match sparsifier.parse::<Self>()? {
                Self::TopK(fraction) => Ok(Self::TopKSign(fraction)),
                _ => Err(format!("'{text}': only top-k composes with sign (topk:F+sign)")),
            };
        }
        let (name, parameter) = match text.split_once(':') {
            Some((name, parameter)) => (name, Some(parameter)),
            None => (text, None),
        };
        let fraction = |p: Option<&str>| -> Result<f64, String> {
            let p = p.ok_or_else(|| format!("{name} needs the fraction kept, e.g. {name}:0.01"))?;
            match p.parse::<f64>() {
                Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
                _ => Err(format!("{name}: the fraction kept must lie in (0, 1], got '{p}'")),
            }
        };
        match (name, parameter) {
            ("identity", None) => Ok(Self::Identity),
            ("topk", p) => Ok(Self::TopK(fraction(p)?)),
            ("randk", p) => Ok(Self::RandK(fraction(p)?)),
            ("sign", None) => Ok(Self::Sign),
            ("qsgd", Some(p)) => match p.parse::<u32>() {
                Ok(levels) if (1..=(1 << 16)).contains(&levels) => Ok(Self::Qsgd(levels)),
                _ => Err(format!("qsgd: the number of levels must be a whole number in 1..=65536, got '{p}'")),
            },
            ("qsgd", None) => Err("qsgd needs its number of levels, e.g. qsgd:16".into()),
            ("bf16", None) => Ok(Self::Bf16),
            ("fp16", None) => Ok(Self::Fp16),
            ("int8", None) => Ok(Self::Int8),
            ("fp8", None) => Ok(Self::Fp8),
            _ => Err(format!(
                "unknown compressor '{text}' (identity, topk:F, topk:F+sign, randk:F, sign, qsgd:S, bf16, fp16, int8, fp8)"
            )),
        }
    }
}

impl TryFrom<String> for Compressor {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Compressor> for String {
    fn from(compressor: Compressor) -> Self {
        compressor.to_string()
    }
}

/// FP8 E4M3 as OCP defines it ("FN": no infinities, one NaN code per sign): 4 exponent bits with
/// bias 7, 3 mantissa bits, subnormals, largest finite value 448.
mod fp8 {
    /// The largest finite value.
    pub const MAX: f32 = 448.0;

    /// The value of a code.
    pub fn decode(code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let (exponent, mantissa) = ((code >> 3) & 0x0f, code & 0x07);
        if exponent == 0x0f && mantissa == 0x07 {
            return f32::NAN;
        }
        let magnitude = if exponent == 0 {
            f32::from(mantissa) / 8.0 * 2f32.powi(-6)
        } else {
            (1.0 + f32::from(mantissa) / 8.0) * 2f32.powi(i32::from(exponent) - 7)
        };
        sign * magnitude
    }

    /// The code nearest `value` (ties to the even code), saturating at ±448; NaN for NaN.
    pub fn encode(value: f32) -> u8 {
        if value.is_nan() {
            return 0x7f;
        }
        let sign = if value.is_sign_negative() { 0x80 } else { 0 };
        let magnitude = value.abs().min(MAX);
        // Codes 0..=126 are the non-negative finite values, increasing.
        let (mut low, mut high) = (0u8, 126u8);
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if decode(middle) <= magnitude { low = middle } else { high = middle }
        }
        let (below, above) = (magnitude - decode(low), decode(high) - magnitude);
        let code = if below < above || (below == above && low % 2 == 0) { low } else { high };
        sign | code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: CompressContext = CompressContext { seed: 11, round: 3, rank: 1 };

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|k| crate::testing::test_value(5, k, 2)).collect()
    }

    fn round_trip(c: Compressor, v: &[f32]) -> (Vec<u8>, Vec<f32>) {
        split_round_trip(c, v, &Segments::whole(v.len()))
    }

    fn split_round_trip(c: Compressor, v: &[f32], segments: &Segments) -> (Vec<u8>, Vec<f32>) {
        let mut payload = Vec::new();
        c.compress(v, segments, CTX, &mut payload);
        let mut out = Vec::new();
        c.decompress(&payload, segments, CTX, &mut out).unwrap();
        (payload, out)
    }

    #[test]
    fn every_payload_has_its_exact_size() {
        let n = 1003;
        for spec in
            ["identity", "topk:0.01", "topk:0.01+sign", "randk:0.05", "sign", "qsgd:16", "qsgd:1", "bf16", "fp16"]
        {
            let c: Compressor = spec.parse().unwrap();
            let (payload, _) = round_trip(c, &values(n));
            assert_eq!(payload.len(), c.payload_bytes(&Segments::whole(n)), "{spec}");
        }
        // Top-1% of ResNet-20's buffer: 1% of the values, each with its index, and the header.
        let resnet20 = Segments::whole(271_098);
        assert_eq!(Compressor::TopK(0.01).payload_bytes(&resnet20), 8 + 8 * 2711);
        assert_eq!(Compressor::TopKSign(0.01).payload_bytes(&resnet20), 8 + 4 * 2711 + 4 + 339);
        assert_eq!(Compressor::Sign.payload_bytes(&resnet20), 8 + 4 + 33_888);
        assert_eq!(Compressor::Qsgd(16).payload_bytes(&resnet20), 8 + 4 + (271_098usize * 6).div_ceil(8));
    }

    #[test]
    fn round_trips_keep_what_each_compressor_promises() {
        let v = values(500);
        assert_eq!(round_trip(Compressor::Identity, &v).1, v);
        // Top-k: the 5 largest magnitudes exactly, zeros elsewhere.
        let (_, top) = round_trip(Compressor::TopK(0.01), &v);
        let mut magnitudes: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        magnitudes.sort_by(|a, b| b.total_cmp(a));
        let kept: Vec<usize> = (0..500).filter(|&i| top[i] != 0.0).collect();
        assert_eq!(kept.len(), 5);
        assert!(kept.iter().all(|&i| top[i] == v[i] && v[i].abs() >= magnitudes[4]));
        // Top-k then sign: the same 5 indices, ± their mean magnitude.
        let (_, top_sign) = round_trip(Compressor::TopKSign(0.01), &v);
        let scale = (kept.iter().map(|&i| f64::from(v[i].abs())).sum::<f64>() / 5.0) as f32;
        assert!((0..500).all(|i| if kept.contains(&i) {
            top_sign[i] == if v[i] < 0.0 { -scale } else { scale }
        } else {
            top_sign[i] == 0.0
        }));
        // Rand-k: the values at the shared indices, the same indices for every worker's ctx rank.
        let (_, rand) = round_trip(Compressor::RandK(0.1), &v);
        let idx = random_indices(500, 50, CTX, 0);
        assert_eq!(idx, random_indices(500, 50, CompressContext { rank: 3, ..CTX }, 0));
        assert_ne!(idx, random_indices(500, 50, CTX, 1), "another segment draws other indices");
        assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx.len() == 50);
        assert!((0..500).all(|i| if idx.contains(&i) { rand[i] == v[i] } else { rand[i] == 0.0 }));
        // Sign: ± the mean magnitude.
        let (_, sign) = round_trip(Compressor::Sign, &v);
        let scale = (v.iter().map(|x| f64::from(x.abs())).sum::<f64>() / 500.0) as f32;
        assert!(sign.iter().zip(&v).all(|(s, x)| *s == if *x < 0.0 { -scale } else { scale }));
        // Casts: within half a unit in the last place.
        let (_, b) = round_trip(Compressor::Bf16, &v);
        assert!(b.iter().zip(&v).all(|(b, x)| (b - x).abs() <= x.abs() * 2f32.powi(-8)));
        let (_, h) = round_trip(Compressor::Fp16, &v);
        assert!(h.iter().zip(&v).all(|(h, x)| (h - x).abs() <= x.abs() * 2f32.powi(-11) + 6e-8));
    }

    #[test]
    fn qsgd_is_unbiased_and_on_its_levels() {
        let v = values(64);
        let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
        let rounds = 4000;
        let mut mean = vec![0.0f64; 64];
        for round in 0..rounds {
            let ctx = CompressContext { round, ..CTX };
            let mut payload = Vec::new();
            Compressor::Qsgd(4).compress(&v, &Segments::whole(64), ctx, &mut payload);
            let mut out = Vec::new();
            Compressor::Qsgd(4).decompress(&payload, &Segments::whole(64), ctx, &mut out).unwrap();
            for (m, o) in mean.iter_mut().zip(&out) {
                let level = f64::from(o.abs()) / norm * 4.0;
                assert!((level - level.round()).abs() < 1e-4, "a value off the levels: {level}");
                *m += f64::from(*o) / rounds as f64;
            }
        }
        for (m, x) in mean.iter().zip(&v) {
            assert!((m - f64::from(*x)).abs() < 0.03 * norm, "mean {m} against {x}");
        }
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let v = values(100);
        let c = Compressor::TopK(0.05);
        let whole = Segments::whole(100);
        let mut payload = Vec::new();
        c.compress(&v, &whole, CTX, &mut payload);
        let mut out = Vec::new();
        let decode = |p: &[u8], out: &mut Vec<f32>| c.decompress(p, &whole, CTX, out);
        assert!(matches!(decode(&payload[..5], &mut out), Err(CompressError::Truncated { .. })));
        assert!(matches!(decode(&payload[..payload.len() - 1], &mut out), Err(CompressError::Truncated { .. })));
        let mut longer = payload.clone();
        longer.push(0);
        assert!(matches!(decode(&longer, &mut out), Err(CompressError::TrailingBytes { extra: 1, .. })));
        let shorter = Segments::whole(99);
        assert!(matches!(c.decompress(&payload, &shorter, CTX, &mut out), Err(CompressError::WrongLength { .. })));
        let mut foreign = payload.clone();
        foreign[0] = Compressor::Sign.kind();
        assert!(matches!(decode(&foreign, &mut out), Err(CompressError::WrongKind { .. })));
        // A top-k-then-sign payload with an index out of range.
        let mut signs = Vec::new();
        Compressor::TopKSign(0.05).compress(&v, &whole, CTX, &mut signs);
        signs[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&100u32.to_le_bytes());
        let result = Compressor::TopKSign(0.05).decompress(&signs, &whole, CTX, &mut out);
        assert!(matches!(result, Err(CompressError::Malformed { .. })), "{result:?}");
        let mut bad_index = payload.clone();
        bad_index[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&500u32.to_le_bytes());
        assert!(matches!(decode(&bad_index, &mut out), Err(CompressError::Malformed { .. })));
        let mut repeated = payload.clone();
        let second = payload[HEADER_BYTES..HEADER_BYTES + 4].to_vec();
        repeated[HEADER_BYTES + 4..HEADER_BYTES + 8].copy_from_slice(&second);
        assert!(matches!(decode(&repeated, &mut out), Err(CompressError::Malformed { .. })));
        // A QSGD level above S (all ones in a 3-bit field for S = 4).
        let mut q = Vec::new();
        Compressor::Qsgd(4).compress(&v, &whole, CTX, &mut q);
        q[HEADER_BYTES + 4] = 0xFF;
        assert!(matches!(
            Compressor::Qsgd(4).decompress(&q, &whole, CTX, &mut out),
            Err(CompressError::Malformed { .. })
        ));
        // A split payload whose second tensor's index leaves that tensor (60 values, 3 kept).
        let split = Segments::new([Segment { len: 40, exact: false }, Segment { len: 60, exact: false }]);
        c.compress(&v, &split, CTX, &mut payload);
        let second = HEADER_BYTES + 8 * 2;
        payload[second..second + 4].copy_from_slice(&60u32.to_le_bytes());
        assert!(matches!(c.decompress(&payload, &split, CTX, &mut out), Err(CompressError::Malformed { .. })));
    }

    #[test]
    fn every_tensor_is_compressed_on_its_own_and_exact_segments_travel_exact() {
        // Two tensors of very different magnitudes, then a buffer (a running variance).
        let v = [1.0f32, -1.0, 3.0, 100.0, -100.0, 300.0, 0.5, 0.25];
        let split = Segments::new([
            Segment { len: 3, exact: false },
            Segment { len: 0, exact: false },
            Segment { len: 3, exact: false },
            Segment { len: 2, exact: true },
        ]);
        assert_eq!((split.len(), split.count()), (8, 3));
        assert_eq!(split.compressed_ranges().collect::<Vec<_>>(), [0..3, 3..6]);
        // Sign: each tensor's own mean magnitude (5/3 and 500/3), the buffer untouched.
        let (payload, sign) = split_round_trip(Compressor::Sign, &v, &split);
        let (small, large) = ((5.0f64 / 3.0) as f32, (500.0f64 / 3.0) as f32);
        assert_eq!(sign, [small, -small, small, large, -large, large, 0.5, 0.25]);
        assert_eq!(payload.len(), 8 + (4 + 1) + (4 + 1) + 4 * 2);
        assert_eq!(payload.len(), Compressor::Sign.payload_bytes(&split));
        // One scale for the whole buffer overshoots the small tensor and the buffer's values.
        let (_, whole) = round_trip(Compressor::Sign, &v);
        assert_eq!(whole[0], (v.iter().map(|x| f64::from(x.abs())).sum::<f64>() / 8.0) as f32);
        // QSGD: each tensor's own norm, so the small tensor keeps its relative precision.
        let (_, q) = split_round_trip(Compressor::Qsgd(1 << 16), &v, &split);
        assert!(q.iter().zip(&v).all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0)), "{q:?}");
        assert_eq!(&q[6..], &v[6..]);
        // Top-k: at least one value from every tensor, the buffer whole.
        let (payload, top) = split_round_trip(Compressor::TopK(0.01), &v, &split);
        assert_eq!(top, [0.0, 0.0, 3.0, 0.0, 0.0, 300.0, 0.5, 0.25]);
        assert_eq!(payload.len(), 8 + 8 + 8 + 4 * 2);
        // Every compressor round-trips a split buffer with the exact segment untouched.
        for spec in ["identity", "topk:0.5", "topk:0.5+sign", "randk:0.5", "sign", "qsgd:4", "bf16", "fp16"] {
            let c: Compressor = spec.parse().unwrap();
            let (payload, out) = split_round_trip(c, &v, &split);
            assert_eq!(payload.len(), c.payload_bytes(&split), "{spec}");
            assert_eq!(&out[6..], &v[6..], "{spec}");
        }
    }

    #[test]
    fn specs_parse_and_print() {
        for spec in ["identity", "topk:0.01", "topk:0.01+sign", "randk:0.5", "sign", "qsgd:16", "bf16", "fp16"] {
            assert_eq!(spec.parse::<Compressor>().unwrap().to_string(), spec);
        }
        for bad in ["topk", "topk:0", "topk:2", "qsgd", "qsgd:0", "zip", "sign:3", "randk:0.1+sign", "sign+sign"] {
            assert!(bad.parse::<Compressor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn block_scaled_8_bit_codes_round_within_half_a_step() {
        // FP8 E4M3: every finite code decodes and encodes back; the extremes are OCP's.
        for code in (0u8..=0x7e).chain(0x80..=0xfe) {
            assert_eq!(fp8::encode(fp8::decode(code)), code, "code {code:#x}");
        }
        assert_eq!((fp8::decode(0x7e), fp8::decode(0x01), fp8::decode(0x08)), (448.0, 2f32.powi(-9), 2f32.powi(-6)));
        assert!(fp8::decode(0x7f).is_nan() && fp8::encode(f32::NAN) == 0x7f);
        assert_eq!((fp8::encode(1000.0), fp8::encode(-1000.0)), (0x7e, 0xfe), "saturates");
        // 1.0625 lies halfway between 1 (code 0x38) and 1.125 (0x39): the even code.
        assert_eq!(fp8::encode(1.0625), 0x38);
        // Round trips: int8 within half a block's scale, FP8 within 2⁻⁴ of the value (or the
        // subnormal spacing); a block of 256 values per scale, so 600 values make 3 blocks.
        let values: Vec<f32> = (0..600).map(|k| (k as f32 * 0.37).sin() * 10.0f32.powi(k % 4 - 2)).collect();
        for c in [Compressor::Int8, Compressor::Fp8] {
            let (payload, decoded) = round_trip(c, &values);
            assert_eq!(payload.len(), HEADER_BYTES + 600 + 4 * 3, "{c}");
            for (b, (block, back)) in values.chunks(QUANT_BLOCK).zip(decoded.chunks(QUANT_BLOCK)).enumerate() {
                let largest = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for (v, d) in block.iter().zip(back) {
                    let bound = match c {
                        Compressor::Int8 => largest / 127.0 / 2.0 * 1.0001,
                        _ => v.abs() * 2f32.powi(-4) + largest / 448.0 * 2f32.powi(-10),
                    };
                    assert!((v - d).abs() <= bound, "{c}, block {b}: {v} decoded {d}");
                }
            }
            assert_eq!(c.to_string().parse::<Compressor>().unwrap(), c);
            assert!(c.is_elementwise());
        }
        // A block of zeros has scale 0 and decodes to zeros.
        assert_eq!(round_trip(Compressor::Int8, &[0.0; 5]).1, vec![0.0; 5]);
    }
}
