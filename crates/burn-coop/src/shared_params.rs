//! One flat `f32` parameter buffer that several threads read and update at once, lock-free.
//!
//! Asynchronous local SGD (`--rule async`) runs several local threads on one worker's model
//! (Hogwild, Recht et al., NeurIPS 2011) and averages it in place while they keep going. What
//! is racy here, by design, and why it is sound:
//!
//! - **Reads are not snapshots.** [`SharedParams::read_into`] loads every value on its own, so a
//!   thread may see some values before another thread's update and some after it: the
//!   inconsistent read Hogwild's analysis allows. Each value read is one that some thread wrote
//!   in full (a 32-bit atomic load never tears).
//! - **No update is lost.** [`SharedParams::add`] adds element by element with a
//!   compare-and-swap loop, so two threads adding to one value at once both land: the final
//!   value is the initial one plus every delta (up to the order of the floating-point
//!   additions). A plain load-then-store would drop one of them.
//! - **No undefined behaviour.** Every cell is an [`AtomicU32`] holding an `f32`'s bits, every
//!   access is an atomic operation (relaxed ordering: nothing else is published through these
//!   cells), and the module has no `unsafe` code, so the Rust memory model rules out data races
//!   in the language's sense; what races is only the order of whole-value updates.

use std::sync::atomic::{AtomicU32, Ordering};

/// A flat buffer of `f32` shared between threads; see the [module documentation](self).
#[derive(Debug)]
pub struct SharedParams {
    cells: Box<[AtomicU32]>,
}

impl SharedParams {
    /// A shared buffer holding `values`.
    pub fn new(values: &[f32]) -> Self {
        Self { cells: values.iter().map(|v| AtomicU32::new(v.to_bits())).collect() }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Loads every value into `out` (one atomic load each: not a snapshot, see above).
    pub fn read_into(&self, out: &mut Vec<f32>) {
        out.clear();
        out.extend(self.cells.iter().map(|c| f32::from_bits(c.load(Ordering::Relaxed))));
    }

    /// The values, as [`SharedParams::read_into`] loads them.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len());
        self.read_into(&mut out);
        out
    }

    /// Adds `delta` element by element; concurrent adds all land.
    ///
    /// # Panics
    /// When `delta` does not have one value per cell (a caller's bug, not a runtime condition).
    pub fn add(&self, delta: &[f32]) {
        assert_eq!(delta.len(), self.cells.len(), "a delta needs one value per shared cell");
        for (cell, &d) in self.cells.iter().zip(delta) {
            if d == 0.0 {
                continue;
            }
            let _ = cell
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f32::from_bits(bits) + d).to_bits()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_adds_all_land() {
        let shared = SharedParams::new(&[0.0; 64]);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..5_000 {
                        shared.add(&[1.0; 64]);
                    }
                });
            }
        });
        // Whole numbers below 2^24 add exactly in f32: any lost update would show.
        assert_eq!(shared.to_vec(), vec![20_000.0; 64]);
    }

    #[test]
    fn reads_see_whole_values_while_others_write() {
        let shared = SharedParams::new(&[1.5; 1000]);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..200 {
                    shared.add(&[1.0; 1000]);
                }
            });
            let mut seen = Vec::new();
            for _ in 0..200 {
                shared.read_into(&mut seen);
                assert!(seen.iter().all(|v| v.fract() == 0.5 && (1.5..=201.5).contains(v)), "torn or foreign value");
            }
        });
        assert_eq!(shared.to_vec(), vec![201.5; 1000]);
    }
}
