//! md5 checksums of data files.

use std::io::Read;
use std::path::Path;

use md5::{Digest, Md5};

use crate::error::{CifarError, Result};

/// Lowercase hex md5 of a byte slice.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
}

/// Lowercase hex md5 of a file, streamed.
///
/// # Errors
/// [`CifarError::MissingFile`] or [`CifarError::Io`].
pub fn md5_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| CifarError::io(path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| CifarError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Checks `bytes` against an expected md5 (hex, any case); `file` names them in the error.
///
/// # Errors
/// [`CifarError::ChecksumMismatch`].
pub fn verify_bytes(file: &str, bytes: &[u8], expected: &str) -> Result<()> {
    check(file, md5_hex(bytes), expected)
}

/// Checks a file against an expected md5 (hex, any case).
///
/// # Errors
/// [`CifarError::ChecksumMismatch`], [`CifarError::MissingFile`] or [`CifarError::Io`].
pub fn verify_file(path: &Path, expected: &str) -> Result<()> {
    check(&path.display().to_string(), md5_file(path)?, expected)
}

fn check(file: &str, actual: String, expected: &str) -> Result<()> {
    if actual.eq_ignore_ascii_case(expected.trim()) {
        Ok(())
    } else {
        Err(CifarError::ChecksumMismatch {
            file: file.to_string(),
            expected: expected.trim().to_ascii_lowercase(),
            actual,
        })
    }
}

/// Lowercase hex of a digest.
#[cfg(feature = "download")]
pub(crate) fn md5_hex_of(digest: &[u8]) -> String {
    hex(digest)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
