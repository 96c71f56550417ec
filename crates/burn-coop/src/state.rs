//! State records: what a rule or a schedule saves in a checkpoint, and its binary file format.
//!
//! A [`StateRecord`] holds any number of named model-sized `f32` buffers (anchors, momenta,
//! error memories) and named `f64` scalars (counters, adaptive periods). A [`StateFile`] holds
//! several records by name (`"rule"`, `"schedule"`) and is written as plain little-endian
//! binary:
//!
//! ```text
//! magic "COOPSTAT" · version u32 · record count u32
//! per record:  name · scalar count u32 · (key · f64)* · buffer count u32 · (key · len u64 · f32 × len)*
//! trailer:     FNV-1a 64 checksum of everything before it
//! (name and key: length u32 · UTF-8 bytes)
//! ```
//!
//! Reading checks the magic, the version, every length against the bytes that are left and the
//! checksum, so a truncated or corrupt file is an error naming what is wrong, never a panic.

use std::collections::BTreeMap;

/// A rule's or schedule's saved state: named buffers and scalars.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateRecord {
    /// Model-sized (or any-sized) `f32` buffers by name.
    pub buffers: BTreeMap<String, Vec<f32>>,
    /// `f64` scalars by name.
    pub scalars: BTreeMap<String, f64>,
}

impl StateRecord {
    /// An empty record (stateless rules and schedules).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the record holds nothing.
    pub fn is_empty(&self) -> bool {
        self.buffers.is_empty() && self.scalars.is_empty()
    }

    /// Adds a buffer.
    pub fn with_buffer(mut self, name: &str, values: Vec<f32>) -> Self {
        self.buffers.insert(name.to_string(), values);
        self
    }

    /// Adds `values` under `name` when the state exists: `None` and an empty buffer (state not
    /// made yet) are left out.
    pub fn with_held(self, name: &str, values: Option<&Vec<f32>>) -> Self {
        match values {
            Some(values) if !values.is_empty() => self.with_buffer(name, values.clone()),
            _ => self,
        }
    }

    /// Adds a scalar.
    pub fn with_scalar(mut self, name: &str, value: f64) -> Self {
        self.scalars.insert(name.to_string(), value);
        self
    }

    /// Removes and returns a buffer.
    pub fn take_buffer(&mut self, name: &str) -> Option<Vec<f32>> {
        self.buffers.remove(name)
    }

    /// Removes and returns a scalar.
    pub fn take_scalar(&mut self, name: &str) -> Option<f64> {
        self.scalars.remove(name)
    }

    /// A scalar, if present.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.scalars.get(name).copied()
    }

    /// The names of everything in the record, for error messages.
    pub fn keys(&self) -> Vec<String> {
        self.buffers.keys().chain(self.scalars.keys()).cloned().collect()
    }

    /// Size of the record's values in bytes.
    pub fn value_bytes(&self) -> usize {
        self.buffers.values().map(|b| 4 * b.len()).sum::<usize>() + 8 * self.scalars.len()
    }
}

/// Why a state file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateFileError {
    /// The file does not start with the format's magic bytes.
    #[error("not a burn-coop state file (bad magic bytes)")]
    BadMagic,
    /// Written by a format version this build cannot read.
    #[error("state file format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The file ends before a length it announced.
    #[error("state file is truncated: {what} needs {needed} more bytes but {left} are left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes left.
        left: usize,
    },
    /// The checksum does not match the contents.
    #[error("state file is corrupt: checksum {found:016x} does not match the contents ({expected:016x})")]
    Checksum {
        /// Checksum stored.
        found: u64,
        /// Checksum computed.
        expected: u64,
    },
    /// A name is not UTF-8.
    #[error("state file is corrupt: a name is not valid UTF-8")]
    BadName,
    /// Bytes after the checksum.
    #[error("state file is corrupt: {0} unexpected bytes after the checksum")]
    TrailingBytes(usize),
}

/// Several named [`StateRecord`]s in one binary file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateFile {
    /// The records by name.
    pub records: BTreeMap<String, StateRecord>,
}

const MAGIC: &[u8; 8] = b"COOPSTAT";
const VERSION: u32 = 1;

/// FNV-1a, 64 bits: a cheap checksum that catches truncation and bit rot.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl StateFile {
    /// Encodes the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let size = 24
            + self
                .records
                .values()
                .map(|r| r.value_bytes() + 64 * (r.buffers.len() + r.scalars.len() + 1))
                .sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        let name = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for (record_name, record) in &self.records {
            name(&mut out, record_name);
            out.extend_from_slice(&(record.scalars.len() as u32).to_le_bytes());
            for (key, value) in &record.scalars {
                name(&mut out, key);
                out.extend_from_slice(&value.to_le_bytes());
            }
            out.extend_from_slice(&(record.buffers.len() as u32).to_le_bytes());
            for (key, values) in &record.buffers {
                name(&mut out, key);
                out.extend_from_slice(&(values.len() as u64).to_le_bytes());
                values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
        }
        let checksum = fnv1a(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Decodes a file written by [`StateFile::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateFileError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(StateFileError::BadMagic);
        }
        let mut reader = Reader { bytes, at: MAGIC.len() };
        let version = reader.u32("version")?;
        if version != VERSION {
            return Err(StateFileError::UnsupportedVersion { found: version, supported: VERSION });
        }
        let count = reader.u32("record count")?;
        let mut file = StateFile::default();
        for _ in 0..count {
            let record_name = reader.name()?;
            let mut record = StateRecord::new();
            for _ in 0..reader.u32("scalar count")? {
                let key = reader.name()?;
                let value = f64::from_le_bytes(reader.take(8, "scalar")?.try_into().expect("8 bytes"));
                record.scalars.insert(key, value);
            }
            for _ in 0..reader.u32("buffer count")? {
                let key = reader.name()?;
                let len = reader.u64("buffer length")?;
                let data = reader.take(len.saturating_mul(4), "buffer values")?;
                let values = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
                record.buffers.insert(key, values);
            }
            file.records.insert(record_name, record);
        }
        let body_end = reader.at;
        let found = reader.u64("checksum")?;
        let expected = fnv1a(&bytes[..body_end]);
        if found != expected {
            return Err(StateFileError::Checksum { found, expected });
        }
        match bytes.len() - reader.at {
            0 => Ok(file),
            extra => Err(StateFileError::TrailingBytes(extra)),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, needed: u64, what: &'static str) -> Result<&'a [u8], StateFileError> {
        let left = self.bytes.len() - self.at;
        if needed > left as u64 {
            return Err(StateFileError::Truncated { what, needed, left });
        }
        let slice = &self.bytes[self.at..self.at + needed as usize];
        self.at += needed as usize;
        Ok(slice)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StateFileError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, StateFileError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    fn name(&mut self) -> Result<String, StateFileError> {
        let len = self.u32("name length")?;
        let bytes = self.take(u64::from(len), "name")?;
        String::from_utf8(bytes.to_vec()).map_err(|_| StateFileError::BadName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        let rule = StateRecord::new()
            .with_buffer("anchor", vec![1.5, -0.0, f32::MIN_POSITIVE, 3.25e-7])
            .with_buffer("momentum", vec![])
            .with_scalar("round", 17.0);
        let schedule = StateRecord::new().with_scalar("tau", 4.0).with_scalar("loss0", 2.125);
        StateFile { records: [("rule".to_string(), rule), ("schedule".to_string(), schedule)].into() }
    }

    #[test]
    fn records_round_trip_bit_for_bit() {
        let file = sample();
        let bytes = file.to_bytes();
        let back = StateFile::from_bytes(&bytes).unwrap();
        assert_eq!(back, file);
        let anchor = &back.records["rule"].buffers["anchor"];
        assert_eq!(anchor[1].to_bits(), (-0.0f32).to_bits());
        // Header 16; "rule": name 8, 1 scalar (4 + 9 + 8), 2 buffers (4 + 10 + 8 + 16, 12 + 8);
        // "schedule": name 12, 2 scalars (4 + 17 + 15), no buffer (4); checksum 8.
        assert_eq!(bytes.len(), 16 + 8 + 21 + 4 + 34 + 20 + 12 + 36 + 4 + 8);
    }

    #[test]
    fn corrupt_files_are_named_errors() {
        let bytes = sample().to_bytes();
        assert_eq!(StateFile::from_bytes(b"{\"json\": true}"), Err(StateFileError::BadMagic));
        let mut future = bytes.clone();
        future[8] = 9;
        assert_eq!(StateFile::from_bytes(&future), Err(StateFileError::UnsupportedVersion { found: 9, supported: 1 }));
        for cut in [13, 40, bytes.len() - 20, bytes.len() - 1] {
            assert!(matches!(StateFile::from_bytes(&bytes[..cut]), Err(StateFileError::Truncated { .. })), "cut {cut}");
        }
        let mut flipped = bytes.clone();
        let at = bytes.len() - 30;
        flipped[at] ^= 0x40;
        assert!(matches!(StateFile::from_bytes(&flipped), Err(StateFileError::Checksum { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(StateFile::from_bytes(&longer), Err(StateFileError::TrailingBytes(1)));
        let mut huge = bytes;
        // The first buffer's length field: a length far beyond the file must not allocate or panic.
        let offset = 16 + 8 + 4 + (4 + 5 + 8) + 4 + (4 + 6);
        huge[offset..offset + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(StateFile::from_bytes(&huge), Err(StateFileError::Truncated { .. })));
    }
}
