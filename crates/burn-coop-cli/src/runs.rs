//! A finished (or running) `coop train` folder read back: its settings and its metric tables,
//! for `coop compare` and `coop plot`.

use std::path::{Path, PathBuf};

/// One CSV table (`syncs.csv` or `epochs.csv`): a header and rows of cells.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// How a `;`-joined list of per-worker values becomes one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Their mean.
    Mean,
    /// The largest (a clock: the slowest worker).
    Max,
}

impl Table {
    fn parse(text: &str, path: &Path) -> Result<Self, String> {
        let mut lines = text.lines();
        let header: Vec<String> =
            lines.next().ok_or_else(|| format!("{} is empty", path.display()))?.split(',').map(String::from).collect();
        let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
        if let Some(k) = rows.iter().position(|r| r.len() != header.len()) {
            return Err(format!(
                "{}: row {} has {} cells, the header {}",
                path.display(),
                k + 2,
                rows[k].len(),
                header.len()
            ));
        }
        Ok(Self { header, rows })
    }

    /// Whether the table has this column.
    pub fn has(&self, name: &str) -> bool {
        self.header.iter().any(|h| h == name)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The column `name` as numbers, per-worker lists reduced by `reduce`; an empty cell is
    /// `None` (a value not measured at that row).
    pub fn column(&self, name: &str, reduce: Reduce) -> Result<Vec<Option<f64>>, String> {
        let i = self.header.iter().position(|h| h == name).ok_or_else(|| format!("no {name} column"))?;
        self.rows
            .iter()
            .map(|row| {
                let cell = &row[i];
                if cell.is_empty() {
                    return Ok(None);
                }
                let values: Vec<f64> = cell
                    .split(';')
                    .map(|v| v.parse::<f64>().map_err(|_| format!("{name}: '{v}' is not a number")))
                    .collect::<Result<_, _>>()?;
                Ok(Some(match reduce {
                    Reduce::Mean => values.iter().sum::<f64>() / values.len() as f64,
                    Reduce::Max => values.iter().copied().fold(f64::MIN, f64::max),
                }))
            })
            .collect()
    }
}

/// A run folder's settings and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The folder.
    pub folder: PathBuf,
    /// The rule, its compressor if any, and its period or schedule, for legends (`average τ=8`,
    /// `ec-local-sgd sign τ=8`, `sync`).
    pub label: String,
    /// Whether the run is synchronous SGD.
    pub synchronous: bool,
    /// `syncs.csv`: one row per merge.
    pub syncs: Table,
    /// `epochs.csv`: one row per epoch (empty before the first epoch ends).
    pub epochs: Table,
}

impl Run {
    /// Reads `folder` (its `config.toml`, `syncs.csv` and, when present, `epochs.csv`).
    pub fn load(folder: &Path) -> Result<Self, String> {
        let read = |name: &str| {
            let path = folder.join(name);
            std::fs::read_to_string(&path)
                .map(|text| (text, path))
                .map_err(|e| format!("cannot read {}: {e}", folder.join(name).display()))
        };
        let (config, path) = read("config.toml")?;
        let table: toml::Table = config.parse().map_err(|e| format!("{}: {e}", path.display()))?;
        let text = |key: &str| table.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let rule = text("rule").unwrap_or_else(|| "average".into());
        let schedule = text("schedule").unwrap_or_else(|| "fixed".into());
        let tau = table.get("tau").and_then(toml::Value::as_integer);
        let named = match text("compressor").filter(|c| c != "none") {
            Some(compressor) => format!("{rule} {compressor}"),
            None => rule.clone(),
        };
        let label = match (rule.as_str(), schedule.as_str(), tau) {
            ("sync", _, _) => "sync".to_string(),
            (_, "fixed", Some(tau)) => format!("{named} τ={tau}"),
            (_, schedule, _) => format!("{named} {schedule}"),
        };
        let (syncs, path) = read("syncs.csv")?;
        let syncs = Table::parse(&syncs, &path)?;
        let epochs = match read("epochs.csv") {
            Ok((text, path)) => Table::parse(&text, &path)?,
            Err(_) => Table::default(),
        };
        Ok(Self { folder: folder.to_path_buf(), label, synchronous: rule == "sync", syncs, epochs })
    }

    /// The folder's name.
    pub fn name(&self) -> String {
        self.folder.file_name().map_or_else(|| self.folder.display().to_string(), |n| n.to_string_lossy().into())
    }

    /// Whether the run simulated a network (its metrics carry `sim_seconds`).
    pub fn simulated(&self) -> bool {
        self.syncs.has("sim_seconds")
    }

    /// The last epoch's mean training loss.
    pub fn final_loss(&self) -> Option<f64> {
        self.epochs.column("train_loss", Reduce::Mean).ok()?.last().copied().flatten()
    }

    /// The average model's test accuracy at the last epoch (a fraction).
    pub fn final_accuracy(&self) -> Option<f64> {
        self.epochs.column("test_accuracy", Reduce::Mean).ok()?.last().copied().flatten()
    }

    /// The whole run's time (the slowest worker's simulated clock, or wall seconds) and mean
    /// bytes sent per worker at the end of its last epoch; `None` before an epoch has finished.
    /// A run may take local steps after its last merge (a period longer than what is left), so
    /// this can be later than the last merge.
    pub fn totals(&self) -> Result<Option<(f64, f64)>, String> {
        let time = if self.simulated() { "sim_seconds" } else { "wall_seconds" };
        let last = |name: &str, reduce: Reduce| -> Result<Option<f64>, String> {
            Ok(self.epochs.column(name, reduce)?.last().copied().flatten())
        };
        Ok(last(time, Reduce::Max)?.zip(last("bytes_sent_per_worker", Reduce::Mean)?))
    }

    /// Errors name the run's folder.
    pub fn context<T>(&self, result: Result<T, String>) -> Result<T, String> {
        result.map_err(|e| format!("{}: {e}", self.folder.display()))
    }
}

/// The training loss averaged over the last `window` local steps at each merge, from the merges'
/// steps and their losses (each the mean over the steps since the previous merge, weighted by
/// those steps); `None` until `window` steps are covered. A window of 1 gives the logged losses.
pub fn windowed_loss(steps: &[u64], losses: &[f64], window: u64) -> Vec<Option<f64>> {
    let mut previous_step = 0;
    let mut recent: Vec<(u64, f64)> = Vec::new(); // (steps covered, loss)
    steps
        .iter()
        .zip(losses)
        .map(|(&step, &loss)| {
            recent.push((step.saturating_sub(previous_step), loss));
            previous_step = step;
            let mut covered = 0;
            let mut weighted = 0.0;
            for &(steps, loss) in recent.iter().rev() {
                let take = steps.min(window - covered);
                weighted += take as f64 * loss;
                covered += take;
                if covered == window {
                    break;
                }
            }
            (covered == window).then(|| weighted / window as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_reduce_worker_lists_and_keep_gaps() {
        let table = Table::parse("step,x,y\n1,1;3,\n2,2;6,0.5\n", Path::new("t.csv")).unwrap();
        assert_eq!(table.column("x", Reduce::Mean).unwrap(), vec![Some(2.0), Some(4.0)]);
        assert_eq!(table.column("x", Reduce::Max).unwrap(), vec![Some(3.0), Some(6.0)]);
        assert_eq!(table.column("y", Reduce::Mean).unwrap(), vec![None, Some(0.5)]);
        assert!(table.column("z", Reduce::Mean).is_err());
        assert!(Table::parse("a,b\n1\n", Path::new("t.csv")).is_err(), "a short row is named");
    }

    #[test]
    fn labels_name_the_rule_its_compressor_and_its_period() {
        let dir = tempfile::tempdir().unwrap();
        let label = |config: &str| {
            std::fs::write(dir.path().join("config.toml"), config).unwrap();
            std::fs::write(dir.path().join("syncs.csv"), "step,train_loss\n8,1.5\n").unwrap();
            Run::load(dir.path()).unwrap().label
        };
        assert_eq!(label("rule = \"sync\"\ntau = 8\n"), "sync");
        assert_eq!(label("rule = \"average\"\nschedule = \"fixed\"\ntau = 8\n"), "average τ=8");
        let compressed = "rule = \"ec-local-sgd\"\nschedule = \"fixed\"\ntau = 8\ncompressor = \"topk:0.01\"\n";
        assert_eq!(label(compressed), "ec-local-sgd topk:0.01 τ=8");
        assert_eq!(label("rule = \"average\"\nschedule = \"qsr\"\ncompressor = \"none\"\n"), "average qsr");
    }
}
