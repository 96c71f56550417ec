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
//!   worker-0.sums             each file above with its length and FNV-1a 64 checksum, and the
//!                             checksum of those lines; written last
//!   ...
//! ```
//!
//! Every worker writes its files into `.step-XXXXXXXX.partial/`; after a barrier, rank 0 renames
//! that folder into place and then rewrites `LATEST` through a temporary file and a rename. A
//! crash at any point leaves `LATEST` naming a complete checkpoint. Reading checks every file
//! against its sum first (a changed byte is named as a checksum mismatch, a short file as
//! truncated), then that the checkpoint is this worker's and was written under the same merge
//! rule and schedule.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::{StateFile, fnv1a};
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
    /// The merge rule and schedule with every setting resolved ([`merging_of`]); absent in
    /// checkpoints of earlier versions.
    #[serde(default)]
    pub merging: Option<String>,
}

/// The merge rule and schedule of `config`, every setting resolved, as one line of JSON: what a
/// checkpoint must have been written under to be resumed.
pub(crate) fn merging_of(config: &super::LearnerConfig) -> String {
    let schedule = config.rule.with_default_period(&config.schedule).resolved();
    serde_json::json!({ "rule": config.rule.resolved(), "schedule": schedule }).to_string()
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
    /// `LATEST` names a folder that is not there.
    #[error("{latest} names the checkpoint {folder}, which does not exist")]
    Dangling {
        /// The `LATEST` file.
        latest: PathBuf,
        /// The folder it names.
        folder: PathBuf,
    },
    /// A checkpoint file is shorter or longer than when it was written.
    #[error("checkpoint file {path} is truncated or extended: {found} bytes, written with {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length now.
        found: u64,
        /// Its length when written.
        expected: u64,
    },
    /// A checkpoint file's bytes changed since it was written.
    #[error(
        "checkpoint file {path} is corrupt: its checksum {found:016x} does not match the one written ({expected:016x})"
    )]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// Checksum of the bytes now.
        found: u64,
        /// Checksum written with the file.
        expected: u64,
    },
    /// The checkpoint was written under another merge rule or schedule.
    #[error(
        "checkpoint {path} was written under {saved}, but this run uses {now}: resume with the same rule and schedule, or start a new run"
    )]
    RuleChanged {
        /// The state file.
        path: PathBuf,
        /// The rule and schedule recorded.
        saved: String,
        /// The rule and schedule of this run.
        now: String,
    },
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

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = fs::File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// A worker's `.sums` file: a line `NAME LENGTH CHECKSUM` per file, then `sums CHECKSUM` of the
/// lines before it.
fn sums_text(entries: &[(String, u64, u64)]) -> String {
    let mut text: String = entries.iter().map(|(name, len, sum)| format!("{name} {len} {sum:016x}\n")).collect();
    let own = fnv1a(text.as_bytes());
    text.push_str(&format!("sums {own:016x}\n"));
    text
}

/// The lengths and checksums in a worker's `.sums` file; anything but the form
/// [`sums_text`] writes, with its own checksum right, is an error naming the file.
fn read_sums(path: &Path) -> Result<Vec<(String, u64, u64)>, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let corrupt = |cause: &str| CheckpointError::Corrupt { path: path.to_path_buf(), cause: cause.to_string() };
    let text = std::str::from_utf8(&bytes).map_err(|_| corrupt("not text"))?;
    let entries: Vec<(String, u64, u64)> = text
        .lines()
        .filter(|line| !line.starts_with("sums "))
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let (name, len, sum) = (parts.next()?, parts.next()?.parse().ok()?, parts.next()?);
            Some((name.to_string(), len, u64::from_str_radix(sum, 16).ok()?))
        })
        .collect();
    if sums_text(&entries) != text {
        return Err(corrupt("its lines or its own checksum do not match the form written"));
    }
    Ok(entries)
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
        let mut sums = Vec::new();
        for (suffix, bytes) in [
            ("model.bpk", &files.model[..]),
            ("optim.bpk", &files.optimizer[..]),
            ("state.json", &state[..]),
            ("coop.bin", &records[..]),
        ] {
            let name = format!("worker-{rank}.{suffix}");
            write_synced(&dir.join(&name), bytes)?;
            sums.push((name, bytes.len() as u64, fnv1a(bytes)));
        }
        write_synced(&dir.join(format!("worker-{rank}.sums")), sums_text(&sums).as_bytes())
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
                if dir.is_dir() { Ok(Some(dir)) } else { Err(CheckpointError::Dangling { latest, folder: dir }) }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io { path: latest, source }),
        }
    }

    /// Reads worker `rank`'s files from the checkpoint folder `dir`, checking each against its
    /// sum, then that they belong to worker `rank` of `workers` and were written under `merging`
    /// ([`merging_of`]).
    pub fn read_worker(dir: &Path, rank: usize, workers: usize, merging: &str) -> Result<WorkerFiles, CheckpointError> {
        let sums = read_sums(&dir.join(format!("worker-{rank}.sums")))?;
        let read = |suffix: &str| {
            let name = format!("worker-{rank}.{suffix}");
            let path = dir.join(&name);
            let bytes = fs::read(&path).map_err(io(&path))?;
            let Some(&(_, len, sum)) = sums.iter().find(|(n, ..)| *n == name) else {
                return Err(CheckpointError::Corrupt { path, cause: format!("not listed in worker-{rank}.sums") });
            };
            if bytes.len() as u64 != len {
                return Err(CheckpointError::Truncated { path, found: bytes.len() as u64, expected: len });
            }
            let found = fnv1a(&bytes);
            if found != sum {
                return Err(CheckpointError::ChecksumMismatch { path, found, expected: sum });
            }
            Ok(bytes)
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
        if let Some(saved) = state.merging.as_deref().filter(|saved| *saved != merging) {
            return Err(CheckpointError::RuleChanged { path: state_path, saved: saved.into(), now: merging.into() });
        }
        let records_path = dir.join(format!("worker-{rank}.coop.bin"));
        let records = StateFile::from_bytes(&read("coop.bin")?)
            .map_err(|e| CheckpointError::Corrupt { path: records_path, cause: e.to_string() })?;
        Ok(WorkerFiles { model: read("model.bpk")?, optimizer: read("optim.bpk")?, state, records })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::StateRecord;
    use crate::testing::inputs::{Inputs, never_panics};

    fn files() -> WorkerFiles {
        let rule = StateRecord::new().with_buffer("anchor", vec![0.5, -1.25, 3.0]);
        WorkerFiles {
            model: (0..200u8).collect(),
            optimizer: vec![7; 64],
            state: WorkerState {
                rank: 0,
                workers: 2,
                step: 12,
                epochs_done: 1,
                sync: SyncState::default(),
                elapsed_seconds: 3.5,
                merging: Some("{\"rule\":\"average\"}".into()),
            },
            records: StateFile { records: BTreeMap::from([("rule".to_string(), rule)]) },
        }
    }

    #[test]
    fn every_changed_file_of_a_checkpoint_is_refused_by_name() {
        let root = std::env::temp_dir().join(format!("burn-coop-checkpoint-{}", std::process::id()));
        let checkpoints = Checkpoints { root: root.clone() };
        checkpoints.write_worker(12, &files()).unwrap();
        let dir = checkpoints.commit(12, 2).unwrap();
        let merging = "{\"rule\":\"average\"}";
        let read = || Checkpoints::read_worker(&dir, 0, 2, merging);
        assert_eq!(read().unwrap().model, files().model);
        let mut inputs = Inputs::new(21);
        for name in ["model.bpk", "optim.bpk", "state.json", "coop.bin", "sums"] {
            let path = dir.join(format!("worker-0.{name}"));
            let good = fs::read(&path).unwrap();
            let changed: Vec<Vec<u8>> = inputs.bytes(&good, 300).into_iter().filter(|b| *b != good).collect();
            let results = never_panics(&changed, |bytes| {
                fs::write(&path, bytes).unwrap();
                read().map(|_| ())
            });
            for (bytes, result) in changed.iter().zip(results) {
                let error = result.expect_err("a changed file is never read as good").to_string();
                assert!(error.contains(&format!("worker-0.{name}")), "{name}: {error}");
                if name != "sums" && bytes.len() == good.len() {
                    assert!(error.contains("checksum"), "a changed byte is a checksum mismatch: {error}");
                }
            }
            fs::write(&path, &good).unwrap();
        }
        assert!(read().is_ok());
        let other = Checkpoints::read_worker(&dir, 0, 2, "{\"rule\":\"elastic\"}").unwrap_err().to_string();
        assert!(
            other.contains("was written under") && other.contains("average") && other.contains("elastic"),
            "{other}"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
