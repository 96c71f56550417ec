//! Typed errors of the data pipeline, the partitioner and the model configurations.

use std::path::PathBuf;

/// Result alias for CIFAR-10 data operations.
pub type Result<T, E = CifarError> = std::result::Result<T, E>;

/// Everything that can go wrong while locating, downloading, extracting, verifying or parsing
/// CIFAR-10. No data problem panics; each is reported as one of these variants.
#[derive(Debug, thiserror::Error)]
pub enum CifarError {
    /// A required file (or folder) does not exist.
    #[error("missing CIFAR-10 file: {}", path.display())]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// A batch file whose size is not a multiple of the 3,073-byte record.
    #[error(
        "{}: size {size} bytes is not a multiple of the 3,073-byte CIFAR-10 record",
        path.display()
    )]
    BadFileSize {
        /// The offending file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// A record whose label byte is not a class index 0..=9.
    #[error("{}: record {record} has label {label}, expected 0..=9", path.display())]
    BadLabel {
        /// The offending file.
        path: PathBuf,
        /// Zero-based index of the record inside the file.
        record: usize,
        /// The label byte that was read.
        label: u8,
    },
    /// A file whose md5 differs from the manifest.
    #[error("checksum mismatch for {file}: expected md5 {expected}, got {actual}")]
    ChecksumMismatch {
        /// The file (name or path) that was checked.
        file: String,
        /// The md5 from the manifest, lowercase hex.
        expected: String,
        /// The md5 that was computed, lowercase hex.
        actual: String,
    },
    /// A truncated or otherwise unreadable `.tar.gz` archive.
    #[error("corrupt or truncated archive {}: {cause}", path.display())]
    CorruptArchive {
        /// The archive.
        path: PathBuf,
        /// What the gzip or tar decoder reported.
        cause: String,
    },
    /// An archive entry that would be written outside the extraction folder (absolute path,
    /// `..` component, or a link pointing outside).
    #[error("unsafe path in archive: {entry}")]
    UnsafeArchivePath {
        /// The entry path (and link target, for links) as stored in the archive.
        entry: String,
    },
    /// The download failed; the message tells how to provide a local copy instead.
    #[error(
        "could not download CIFAR-10 from {url}: {cause}. Put cifar-10-binary.tar.gz (or the \
         extracted cifar-10-batches-bin folder) at {} or pass --data PATH / set {env}",
        default.display()
    )]
    Download {
        /// The URL that was tried.
        url: String,
        /// Why it failed.
        cause: String,
        /// The default data folder where a local copy would be found.
        default: PathBuf,
        /// The environment variable that selects a local copy.
        env: &'static str,
    },
    /// Downloading is needed but the crate was built without the `download` feature.
    #[error(
        "CIFAR-10 not found and downloading is disabled. Put cifar-10-binary.tar.gz (or the \
         extracted cifar-10-batches-bin folder) at {} or pass --data PATH / set {env}",
        default.display()
    )]
    DownloadDisabled {
        /// The default data folder where a local copy would be found.
        default: PathBuf,
        /// The environment variable that selects a local copy.
        env: &'static str,
    },
    /// In-memory data whose shape is inconsistent (e.g. image bytes not matching the labels).
    #[error("invalid CIFAR-10 data: {0}")]
    InvalidData(String),
    /// Any other I/O failure, with the path it happened on.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl CifarError {
    /// Wraps an I/O error with its path, turning "not found" into [`CifarError::MissingFile`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            CifarError::MissingFile { path }
        } else {
            CifarError::Io { path, source }
        }
    }
}

/// Errors of [`Partition`](crate::Partition) construction.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    /// Zero workers were requested.
    #[error("the number of workers must be at least 1")]
    NoWorkers,
    /// More workers than items: some worker would get no data.
    #[error("cannot split {items} items across {workers} workers")]
    TooFewItems {
        /// Number of items.
        items: usize,
        /// Number of workers.
        workers: usize,
    },
    /// The Dirichlet concentration must be a positive finite number.
    #[error("Dirichlet concentration beta must be > 0 and finite, got {beta}")]
    InvalidBeta {
        /// The rejected value.
        beta: f64,
    },
    /// No draw gave every worker at least one item.
    #[error("Dirichlet(beta={beta}) left worker {worker} without data after {attempts} draws")]
    EmptyWorker {
        /// The concentration used.
        beta: f64,
        /// A worker that stayed empty in the last draw.
        worker: usize,
        /// How many draws were tried.
        attempts: usize,
    },
}

/// Errors of model configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A CIFAR ResNet depth that is not of the form 6n+2 with n ≥ 1.
    #[error("CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")]
    InvalidDepth {
        /// The rejected depth.
        depth: usize,
    },
}
