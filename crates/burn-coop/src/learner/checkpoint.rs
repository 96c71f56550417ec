//! Checkpoints of a cooperative run, written so that a crash never leaves a broken one behind.
//!
//! Layout under `<output>/checkpoints/`:
//!
//! ```text
//! LATEST                      name of the newest complete checkpoint (replaced atomically)
//! step-00001200/
//!   worker-0.model.bpk        module record (weights, BatchNorm statistics, ParamIds)
//!   worker-0.optim.bpk        inner optimizer record (momentum, Adam moments)
//!   worker-0.state.json       step and the synchronizer's counters (small JSON)
//!   worker-0.coop.bin         the rule's and schedule's records (anchors, momenta: binary,
//!                             see [`crate::state`])
//!   ...
//! ```
//!
//! Every worker writes its files into `.step-XXXXXXXX.partial/`; after a barrier, rank 0 renames
//! that folder into place and then rewrites `LATEST` through a temporary file and a rename. A
//! crash at any point leaves `LATEST` naming a complete checkpoint.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::StateFile;
use crate::sync::SyncState;

/// One worker's saved state besides its model and optimizer records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WorkerState {
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers in the run.
    pub workers: usize,
    /// Global steps completed.
    pub step: u64,
    /// Epochs completed.
    pub epochs_done: usize,
    /// The synchronizer's counters.
    pub sync: SyncState,
    /// Wall-clock seconds trained before this checkpoint.
    pub elapsed_seconds: f64,
}

/// The files of one worker in a checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct WorkerFiles {
    /// Module record bytes.
    pub model: Vec<u8>,
    /// Optimizer record bytes.
    pub optimizer: Vec<u8>,
    /// The rest of the state.
    pub state: WorkerState,
    /// The rule's and the schedule's records.
    pub records: StateFile,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("checkpoint file {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A state file does not parse (JSON counters or binary records).
    #[error("checkpoint state {path} is corrupt: {cause}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: String,
    },
    /// No checkpoint to resume from.
    #[error("no checkpoint found under {0} (expected a LATEST file naming a step-* folder)")]
    Missing(PathBuf),
    /// The checkpoint was written by a run with another number of workers or another rank.
    #[error(
        "checkpoint {path} belongs to worker {rank} of {workers}, not worker {expected_rank} of {expected_workers}"
    )]
    Mismatch {
        /// The state file.
        path: PathBuf,
        /// Rank recorded.
        rank: usize,
        /// Workers recorded.
        workers: usize,
        /// Rank expected.
        expected_rank: usize,
        /// Workers expected.
        expected_workers: usize,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// The newest complete checkpoint of the run in `output`, if any.
pub fn latest_checkpoint(output: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    Checkpoints::in_output(output).latest()
}

/// The checkpoint folder of a run.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoints {
    root: PathBuf,
}

impl Checkpoints {
    /// Checkpoints under `<output>/checkpoints`.
    pub fn in_output(output: &Path) -> Self {
        Self { root: output.join("checkpoints") }
    }

    /// The folder holding the checkpoints.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn name(step: u64) -> String {
        format!("step-{step:08}")
    }

    fn partial(&self, step: u64) -> PathBuf {
        self.root.join(format!(".{}.partial", Self::name(step)))
    }

    /// Writes one worker's files for the checkpoint at `step` into its partial folder.
    pub fn write_worker(&self, step: u64, files: &WorkerFiles) -> Result<(), CheckpointError> {
        let dir = self.partial(step);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let rank = files.state.rank;
        let state = serde_json::to_vec_pretty(&files.state).expect("worker state serializes");
        let records = files.records.to_bytes();
        for (suffix, bytes) in [
            ("model.bpk", &files.model[..]),
            ("optim.bpk", &files.optimizer[..]),
            ("state.json", &state[..]),
            ("coop.bin", &records[..]),
        ] {
            let path = dir.join(format!("worker-{rank}.{suffix}"));
            let mut file = fs::File::create(&path).map_err(io(&path))?;
            file.write_all(bytes).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        Ok(())
    }

    /// Publishes the checkpoint at `step` once every worker has written its files (rank 0, after
    /// a barrier), then deletes all but the newest `keep` checkpoints.
    pub fn commit(&self, step: u64, keep: usize) -> Result<PathBuf, CheckpointError> {
        let partial = self.partial(step);
        let done = self.root.join(Self::name(step));
        if done.exists() {
            fs::remove_dir_all(&done).map_err(io(&done))?;
        }
        fs::rename(&partial, &done).map_err(io(&partial))?;
        let latest = self.root.join("LATEST");
        let temporary = self.root.join("LATEST.tmp");
        fs::write(&temporary, Self::name(step)).map_err(io(&temporary))?;
        fs::File::open(&temporary).and_then(|f| f.sync_all()).map_err(io(&temporary))?;
        fs::rename(&temporary, &latest).map_err(io(&latest))?;
        let mut finished: Vec<PathBuf> = fs::read_dir(&self.root)
            .map_err(io(&self.root))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.is_dir() && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
            .collect();
        finished.sort();
        let excess = finished.len().saturating_sub(keep.max(1));
        for old in &finished[..excess] {
            fs::remove_dir_all(old).map_err(io(old))?;
        }
        Ok(done)
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>, CheckpointError> {
        let latest = self.root.join("LATEST");
        match fs::read_to_string(&latest) {
            Ok(name) => {
                let dir = self.root.join(name.trim());
                if dir.is_dir() { Ok(Some(dir)) } else { Err(CheckpointError::Missing(dir)) }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io { path: latest, source }),
        }
    }

    /// Reads worker `rank`'s files from the checkpoint folder `dir`, checking that they belong to
    /// worker `rank` of `workers`.
    pub fn read_worker(dir: &Path, rank: usize, workers: usize) -> Result<WorkerFiles, CheckpointError> {
        let read = |suffix: &str| {
            let path = dir.join(format!("worker-{rank}.{suffix}"));
            fs::read(&path).map_err(|source| CheckpointError::Io { path, source })
        };
        let state_path = dir.join(format!("worker-{rank}.state.json"));
        let state: WorkerState = serde_json::from_slice(&read("state.json")?)
            .map_err(|e| CheckpointError::Corrupt { path: state_path.clone(), cause: e.to_string() })?;
        if state.rank != rank || state.workers != workers {
            return Err(CheckpointError::Mismatch {
                path: state_path,
                rank: state.rank,
                workers: state.workers,
                expected_rank: rank,
                expected_workers: workers,
            });
        }
        let records_path = dir.join(format!("worker-{rank}.coop.bin"));
        let records = StateFile::from_bytes(&read("coop.bin")?)
            .map_err(|e| CheckpointError::Corrupt { path: records_path, cause: e.to_string() })?;
        Ok(WorkerFiles { model: read("model.bpk")?, optimizer: read("optim.bpk")?, state, records })
    }
}
