//! Inputs for property tests of parsers and file readers: random text or bytes and small edits
//! of valid inputs, from a seeded generator (every run tries the same cases, so a failure
//! reproduces), and [`never_panics`], which runs a parser over them.

use std::fmt::Debug;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A seeded source of arbitrary inputs (xorshift64*).
#[derive(Debug, Clone)]
pub struct Inputs {
    state: u64,
}

impl Inputs {
    /// A generator; the same `seed` gives the same inputs.
    pub fn new(seed: u64) -> Self {
        Self { state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` at least 1).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `count` texts: a third random over `alphabet` (up to 40 characters), the rest one to four
    /// edits (delete, insert, replace, duplicate a run, truncate) of one of the `valid` texts.
    pub fn texts(&mut self, valid: &[&str], alphabet: &str, count: usize) -> Vec<String> {
        let alphabet: Vec<char> = alphabet.chars().collect();
        (0..count)
            .map(|k| {
                if valid.is_empty() || k % 3 == 0 {
                    let len = self.below(41);
                    return (0..len).map(|_| alphabet[self.below(alphabet.len())]).collect();
                }
                let mut chars: Vec<char> = valid[self.below(valid.len())].chars().collect();
                for _ in 0..=self.below(4) {
                    let inserted = alphabet[self.below(alphabet.len())];
                    self.edit(&mut chars, inserted);
                }
                chars.into_iter().collect()
            })
            .collect()
    }

    /// `count` byte strings: a quarter random (up to 256 bytes), the rest one to four edits of
    /// `valid` (a flipped bit, a changed, inserted or deleted byte, a duplicated run, a cut).
    pub fn bytes(&mut self, valid: &[u8], count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|k| {
                if k % 4 == 0 {
                    let len = self.below(257);
                    return (0..len).map(|_| self.next() as u8).collect();
                }
                let mut bytes = valid.to_vec();
                for _ in 0..=self.below(4) {
                    if !bytes.is_empty() && self.below(3) == 0 {
                        let at = self.below(bytes.len());
                        bytes[at] ^= 1 << self.below(8);
                    } else {
                        let inserted = self.next() as u8;
                        self.edit(&mut bytes, inserted);
                    }
                }
                bytes
            })
            .collect()
    }

    fn edit<T: Copy>(&mut self, items: &mut Vec<T>, new: T) {
        let len = items.len();
        match self.below(5) {
            0 if len > 0 => {
                items.remove(self.below(len));
            }
            1 => items.insert(self.below(len + 1), new),
            2 if len > 0 => items[self.below(len)] = new,
            3 if len > 0 => {
                let start = self.below(len);
                let end = start + 1 + self.below(len - start);
                let run: Vec<T> = items[start..end].to_vec();
                let at = self.below(len + 1);
                items.splice(at..at, run);
            }
            _ => items.truncate(self.below(len + 1)),
        }
    }
}

/// Runs `parse` on every input and returns the results; a panic fails the test with the input
/// that caused it.
pub fn never_panics<I: Debug, T>(inputs: impl IntoIterator<Item = I>, parse: impl Fn(&I) -> T) -> Vec<T> {
    inputs
        .into_iter()
        .map(|input| match catch_unwind(AssertUnwindSafe(|| parse(&input))) {
            Ok(result) => result,
            Err(_) => panic!("the parser panicked on {input:?}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs_and_edits_stay_near_the_valid_ones() {
        let a = Inputs::new(7).texts(&["bandwidth=1Gbit"], "abc=,", 30);
        assert_eq!(a, Inputs::new(7).texts(&["bandwidth=1Gbit"], "abc=,", 30));
        assert_ne!(a, Inputs::new(8).texts(&["bandwidth=1Gbit"], "abc=,", 30));
        let edited = a.iter().enumerate().filter(|(k, _)| k % 3 != 0);
        assert!(edited.clone().filter(|(_, t)| t.contains("bandwidth")).count() > 5, "{a:?}");
        assert!(edited.clone().any(|(_, t)| t != "bandwidth=1Gbit"), "edits change the text");
        let bytes = Inputs::new(1).bytes(&[0u8; 64], 40);
        assert!(
            bytes.iter().any(|b| b.len() != 64) && bytes.iter().any(|b| b.len() == 64 && b.iter().any(|&x| x != 0))
        );
    }

    #[test]
    #[should_panic(expected = "the parser panicked on 3")]
    fn a_panicking_parser_is_named_with_its_input() {
        never_panics([1, 2, 3], |&x| assert!(x < 3));
    }
}
