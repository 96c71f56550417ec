//! Metrics of a run: JSON lines and CSV files in the output folder, and progress on a terminal.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// What a row of `syncs.csv` and a row of `epochs.csv` both hold: where the run is, its losses
/// and its counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunPoint {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Global steps done (the step a merge followed, 1-based).
    pub step: u64,
    /// Merges so far.
    pub syncs: u64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Period between merges.
    pub tau: u64,
    /// Mean training loss over workers (since the previous merge, or over the epoch).
    pub train_loss: f64,
    /// Each worker's mean training loss (since the previous merge, or over the epoch).
    pub worker_train_loss: Vec<f64>,
    /// Consensus distance (before this merge, or at the epoch's last merge).
    pub consensus_distance: Option<f64>,
    /// Bytes each worker has sent so far for merges.
    pub bytes_sent_per_worker: Vec<u64>,
    /// Bytes each worker has sent so far only to measure the consensus distance (gossip with
    /// `consensus_every`), apart from the rule's own bytes.
    pub consensus_bytes_sent_per_worker: Vec<u64>,
    /// Of `bytes_sent_per_worker`, the bytes each worker has sent inside its sub-group (the
    /// group level of hierarchical averaging; 0 for flat rules).
    pub subgroup_bytes_sent_per_worker: Vec<u64>,
    /// Each worker's simulated clock, when a network is simulated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sim_seconds: Option<Vec<f64>>,
    /// Of that, the seconds each worker waited for communication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sim_comm_seconds: Option<Vec<f64>>,
    /// Seconds since the run started.
    pub wall_seconds: f64,
}

impl RunPoint {
    /// The row's first columns: epoch, step, syncs, lr, tau, train_loss, worker_train_loss.
    fn position(&self) -> String {
        let (epoch, step, syncs, lr, tau, loss) =
            (self.epoch, self.step, self.syncs, self.lr, self.tau, self.train_loss);
        format!("{epoch},{step},{syncs},{lr},{tau},{loss},{}", joined(&self.worker_train_loss))
    }

    /// The consensus distance and the three byte columns.
    fn counters(&self) -> String {
        format!(
            "{},{},{},{}",
            optional(self.consensus_distance),
            joined(&self.bytes_sent_per_worker),
            joined(&self.consensus_bytes_sent_per_worker),
            joined(&self.subgroup_bytes_sent_per_worker)
        )
    }
}

/// Measured at one merge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncMetrics {
    /// Where the run is, its losses and counters.
    #[serde(flatten)]
    pub at: RunPoint,
    /// Seconds each worker was blocked in this merge's collectives.
    pub comm_wait_seconds: Vec<f64>,
    /// Seconds the collectives each worker waited on at this merge had travelled while it
    /// computed (overlapping rules).
    pub comm_inflight_seconds: Vec<f64>,
    /// How many workers sent their message at this merge, for event-triggered rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub senders: Option<u64>,
    /// The event trigger's statistic at this merge, mean over workers (SQuARM-SGD:
    /// `‖x − x̂‖²/η²`, compared with the threshold `c_t`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger_statistic: Option<f64>,
}

/// Measured at the end of an epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochMetrics {
    /// Where the run is, its losses over the epoch and its counters.
    #[serde(flatten)]
    pub at: RunPoint,
    /// Test loss of the average model x̄.
    pub test_loss: f64,
    /// Test accuracy of the average model x̄.
    pub test_accuracy: f64,
    /// Test accuracy of each worker's own model, when evaluated.
    pub worker_test_accuracy: Option<Vec<f64>>,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum Line<'a> {
    Sync(&'a SyncMetrics),
    Epoch(&'a EpochMetrics),
}

/// Writes `metrics.jsonl`, `syncs.csv` and `epochs.csv` and shows progress.
pub struct MetricsWriter {
    jsonl: BufWriter<File>,
    syncs: BufWriter<File>,
    epochs: BufWriter<File>,
    bar: Option<ProgressBar>,
}

/// Which optional columns the metric files carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Columns {
    /// The simulated clock's (`sim_seconds`, `sim_comm_seconds`, before `wall_seconds`).
    pub simulated: bool,
    /// How many workers sent at each merge and the trigger's mean statistic (`senders`,
    /// `trigger_statistic` in `syncs.csv`, after `comm_inflight_seconds`), for event-triggered
    /// rules.
    pub senders: bool,
}

/// The simulated clock's columns of a row (empty when not simulating).
fn simulated(sim: &Option<Vec<f64>>, comm: &Option<Vec<f64>>) -> String {
    match (sim, comm) {
        (Some(sim), Some(comm)) => format!(",{},{}", seconds(sim), seconds(comm)),
        _ => String::new(),
    }
}

fn open(path: &Path, header: &str) -> std::io::Result<BufWriter<File>> {
    let fresh = !path.exists();
    let mut file = BufWriter::new(OpenOptions::new().create(true).append(true).open(path)?);
    if fresh && !header.is_empty() {
        writeln!(file, "{header}")?;
    }
    Ok(file)
}

fn joined<T: ToString>(values: &[T]) -> String {
    values.iter().map(T::to_string).collect::<Vec<_>>().join(";")
}

/// Seconds to the microsecond, `;`-joined.
fn seconds(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.6}")).collect::<Vec<_>>().join(";")
}

fn optional(value: Option<f64>) -> String {
    value.map_or_else(String::new, |v| v.to_string())
}

impl MetricsWriter {
    /// Opens (appending, for resumed runs) the metric files in `folder`. A progress bar over
    /// `total_steps` is shown when `progress` is set and standard error is a terminal;
    /// otherwise one line per epoch is printed. `columns` says which optional columns the rows
    /// carry.
    pub fn create(
        folder: &Path,
        total_steps: u64,
        done_steps: u64,
        progress: bool,
        columns: Columns,
    ) -> std::io::Result<Self> {
        let sim = if columns.simulated { ",sim_seconds,sim_comm_seconds" } else { "" };
        let senders = if columns.senders { ",senders,trigger_statistic" } else { "" };
        std::fs::create_dir_all(folder)?;
        let bar = (progress && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_steps).with_position(done_steps);
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} steps ({eta}) {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Ok(Self {
            jsonl: open(&folder.join("metrics.jsonl"), "")?,
            syncs: open(
                &folder.join("syncs.csv"),
                &format!(
                    "epoch,step,syncs,lr,tau,train_loss,worker_train_loss,consensus_distance,bytes_sent_per_worker,consensus_bytes_sent_per_worker,subgroup_bytes_sent_per_worker,comm_wait_seconds,comm_inflight_seconds{senders}{sim},wall_seconds"
                ),
            )?,
            epochs: open(
                &folder.join("epochs.csv"),
                &format!(
                    "epoch,step,syncs,lr,tau,train_loss,worker_train_loss,test_loss,test_accuracy,worker_test_accuracy,consensus_distance,bytes_sent_per_worker,consensus_bytes_sent_per_worker,subgroup_bytes_sent_per_worker{sim},wall_seconds"
                ),
            )?,
            bar,
        })
    }

    /// Advances the progress bar by one step.
    pub fn step(&self, epoch: usize, loss: f64, lr: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("epoch {} loss {loss:.4} lr {lr:.4}", epoch + 1));
        }
    }

    /// Records a merge.
    pub fn sync(&mut self, m: &SyncMetrics) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.jsonl, &Line::Sync(m))?;
        writeln!(self.jsonl)?;
        writeln!(
            self.syncs,
            "{},{},{},{}{}{},{:.3}",
            m.at.position(),
            m.at.counters(),
            seconds(&m.comm_wait_seconds),
            seconds(&m.comm_inflight_seconds),
            match (m.senders, m.trigger_statistic) {
                (Some(n), Some(statistic)) => format!(",{n},{statistic}"),
                _ => String::new(),
            },
            simulated(&m.at.sim_seconds, &m.at.sim_comm_seconds),
            m.at.wall_seconds
        )?;
        self.jsonl.flush()?;
        self.syncs.flush()
    }

    /// Records an epoch and prints its summary.
    pub fn epoch(&mut self, m: &EpochMetrics) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.jsonl, &Line::Epoch(m))?;
        writeln!(self.jsonl)?;
        writeln!(
            self.epochs,
            "{},{},{},{},{}{},{:.3}",
            m.at.position(),
            m.test_loss,
            m.test_accuracy,
            m.worker_test_accuracy.as_deref().map_or_else(String::new, joined),
            m.at.counters(),
            simulated(&m.at.sim_seconds, &m.at.sim_comm_seconds),
            m.at.wall_seconds
        )?;
        self.jsonl.flush()?;
        self.epochs.flush()?;
        let line = format!(
            "epoch {:>3}  step {:>6}  train loss {:.4}  test loss {:.4}  test acc {:.2}%  consensus {}  sent/worker {:.1} MB  {:.0} s",
            m.at.epoch + 1,
            m.at.step,
            m.at.train_loss,
            m.test_loss,
            100.0 * m.test_accuracy,
            m.at.consensus_distance.map_or_else(|| "-".into(), |c| format!("{c:.3e}")),
            m.at.bytes_sent_per_worker.iter().sum::<u64>() as f64
                / m.at.bytes_sent_per_worker.len().max(1) as f64
                / 1e6,
            m.at.wall_seconds
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
        Ok(())
    }

    /// Prints a line above the progress bar (or to standard error).
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the progress bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
