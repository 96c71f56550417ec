//! `coop report`: the results tables of a README, written from the run folders they quote.
//!
//! A manifest (TOML) lists the tables, each a name, a kind and its rows (a run folder relative
//! to the manifest, and the label its row shows). Every number of a row is read from the folder
//! (`config.toml`, `syncs.csv`, `epochs.csv`), formatted once:
//!
//! - `epochs`: period(s) `τ` as they were logged, merges, the average model's test accuracy per
//!   epoch, the final one, the lowest training loss averaged over `window` steps, bytes sent per
//!   worker;
//! - `simulated` (runs with `--network`): merges, final accuracy, bytes, the whole run's
//!   simulated time (the slowest worker's clock), the time to the synchronous run's final
//!   training loss and to `target-loss` (the first merge where the windowed loss reaches it,
//!   as `coop compare` finds it), and the speed-up over the synchronous run, which the table
//!   must hold.
//!
//! Each table is printed between `<!-- coop report: NAME -->` and `<!-- /coop report -->`.
//! `--check FILE` fails, naming the table and the first line that differs, when FILE does not
//! hold exactly these blocks; `--write FILE` replaces them in FILE.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::compare::{Merge, best, merges, reached};
use crate::runs::{Reduce, Run};

/// Arguments of `coop report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The manifest: the tables, their kinds and their rows (run folders and labels).
    pub manifest: PathBuf,
    /// Fail when this file's report blocks differ from the tables (naming the first difference).
    #[arg(long, conflicts_with = "write")]
    pub check: Option<PathBuf>,
    /// Replace this file's report blocks by the tables.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

/// The manifest file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Manifest {
    /// Steps the training loss is averaged over.
    window: u64,
    /// The training loss the `simulated` tables time every run to.
    target_loss: f64,
    /// The tables, in order.
    table: Vec<TableSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableSpec {
    name: String,
    kind: Kind,
    rows: Vec<RowSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Epochs,
    Simulated,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RowSpec {
    folder: PathBuf,
    label: String,
}

/// The opening marker of table `name`'s block.
fn opening(name: &str) -> String {
    format!("<!-- coop report: {name} -->")
}

const CLOSING: &str = "<!-- /coop report -->";

/// `1234567` → `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as MB: whole megabytes from 100 MB on (`3,174 MB`), one decimal below (`20.8 MB`).
fn megabytes(bytes: f64) -> String {
    let mb = bytes / 1e6;
    if mb >= 100.0 { format!("{} MB", thousands(mb.round() as u64)) } else { format!("{mb:.1} MB") }
}

/// What a row needs from its run folder.
struct Row {
    run: Run,
    merges: Vec<Merge>,
}

impl Row {
    fn load(base: &Path, spec: &RowSpec) -> Result<Self, String> {
        let run = Run::load(&base.join(&spec.folder))?;
        let merges = merges(&run)?;
        if run.epochs.len() == 0 {
            return Err(format!("{}: no finished epoch", run.folder.display()));
        }
        Ok(Self { run, merges })
    }

    fn column(&self, table: &crate::runs::Table, name: &str, reduce: Reduce) -> Result<Vec<f64>, String> {
        let values = self.run.context(table.column(name, reduce))?;
        values.into_iter().map(|v| v.ok_or_else(|| format!("{}: an empty {name}", self.run.folder.display()))).collect()
    }

    /// The periods as logged at the merges, each once in order of appearance: all of them when
    /// at most five, else the first and the last.
    fn periods(&self) -> Result<String, String> {
        let mut seen: Vec<u64> = Vec::new();
        for tau in self.column(&self.run.syncs, "tau", Reduce::Mean)? {
            if seen.last() != Some(&(tau as u64)) {
                seen.push(tau as u64);
            }
        }
        let shown: Vec<String> = match seen.len() {
            0..=5 => seen.iter().map(u64::to_string).collect(),
            _ => vec![seen[0].to_string(), seen[seen.len() - 1].to_string()],
        };
        Ok(shown.join(" → "))
    }

    fn accuracies(&self) -> Result<Vec<f64>, String> {
        self.column(&self.run.epochs, "test_accuracy", Reduce::Mean)
    }

    /// Bytes sent per worker (mean over workers) at the end of the last epoch.
    fn bytes(&self) -> Result<f64, String> {
        Ok(*self.column(&self.run.epochs, "bytes_sent_per_worker", Reduce::Mean)?.last().expect("an epoch"))
    }

    fn lowest(&self, window: u64) -> String {
        best(&self.merges, window).map_or_else(|| "—".into(), |l| format!("{l:.4}"))
    }
}

/// One table's markdown, between its markers.
fn table(manifest: &Manifest, base: &Path, spec: &TableSpec) -> Result<String, String> {
    let rows: Vec<Row> = spec.rows.iter().map(|row| Row::load(base, row)).collect::<Result<_, _>>()?;
    let mut md = opening(&spec.name) + "\n";
    match spec.kind {
        Kind::Epochs => {
            md += &format!(
                "| run | τ | merges | test accuracy per epoch | final | lowest loss ({} steps) | sent per worker |\n|---|---|---:|---|---:|---:|---:|\n",
                manifest.window
            );
            for (row, label) in rows.iter().zip(spec.rows.iter().map(|r| &r.label)) {
                let accuracies = row.accuracies()?;
                let (last, earlier) = accuracies.split_last().expect("an epoch");
                let mut per_epoch: Vec<String> = earlier.iter().map(|a| format!("{:.1}", 100.0 * a)).collect();
                per_epoch.push(format!("**{:.1}**%", 100.0 * last));
                let _ = writeln!(
                    md,
                    "| {label} | {} | {} | {} | {:.2}% | {} | {} |",
                    row.periods()?,
                    thousands(row.run.syncs.len() as u64),
                    per_epoch.join(", "),
                    100.0 * last,
                    row.lowest(manifest.window),
                    megabytes(row.bytes()?)
                );
            }
        }
        Kind::Simulated => {
            let sync = rows.iter().position(|row| row.run.synchronous).ok_or_else(|| {
                format!("table {}: a simulated table needs the synchronous run (--rule sync) among its rows", spec.name)
            })?;
            let final_loss = rows[sync].run.final_loss().ok_or("the synchronous run has no final loss")?;
            let (window, target) = (manifest.window, manifest.target_loss);
            let time_to = |row: &Row, loss: f64| reached(&row.merges, loss, window).map(|hit| hit.seconds);
            let sync_final = time_to(&rows[sync], final_loss);
            let sync_target = time_to(&rows[sync], target);
            md += &format!(
                "| run | merges | final test accuracy | sent per worker | simulated time | time to synchronous SGD's final loss {final_loss:.4} | time to loss {target} | speed-up to {target} |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
            );
            for (row, label) in rows.iter().zip(spec.rows.iter().map(|r| &r.label)) {
                let seconds = row.run.context(row.run.totals())?.map(|(seconds, _)| seconds).expect("an epoch");
                let to_final = match (time_to(row, final_loss), sync_final) {
                    (Some(t), Some(s)) => format!("{t:.1} s ({:.2}×)", s / t),
                    (Some(t), None) => format!("{t:.1} s"),
                    (None, _) => format!("not reached (lowest {})", row.lowest(window)),
                };
                let (to_target, speedup) = match (time_to(row, target), sync_target) {
                    (Some(t), Some(s)) => (format!("{t:.1} s"), format!("{:.2}×", s / t)),
                    (Some(t), None) => (format!("{t:.1} s"), "—".into()),
                    (None, _) => ("not reached".into(), "—".into()),
                };
                let _ = writeln!(
                    md,
                    "| {label} | {} | {:.2}% | {} | {seconds:.1} s | {to_final} | {to_target} | {speedup} |",
                    thousands(row.run.syncs.len() as u64),
                    100.0 * row.accuracies()?.last().expect("an epoch"),
                    megabytes(row.bytes()?),
                );
            }
        }
    }
    md += CLOSING;
    Ok(md)
}

/// Every table of the manifest at `path`, in order, each a block between its markers.
fn tables(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let manifest: Manifest = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if manifest.window == 0 || !manifest.target_loss.is_finite() {
        return Err(format!("{}: `window` must be at least 1 and `target-loss` finite", path.display()));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    manifest.table.iter().map(|spec| Ok((spec.name.clone(), table(&manifest, base, spec)?))).collect()
}

/// The block of table `name` in `text` (markers included), and where it starts.
fn block<'a>(text: &'a str, name: &str) -> Option<(usize, &'a str)> {
    let start = text.find(&opening(name))?;
    let end = start + text[start..].find(CLOSING)? + CLOSING.len();
    Some((start, &text[start..end]))
}

/// `None` when `text` holds every table exactly; else what differs, first.
fn difference(text: &str, tables: &[(String, String)]) -> Option<String> {
    for (name, table) in tables {
        let Some((_, found)) = block(text, name) else {
            return Some(format!("no block for table `{name}` (`{}` … `{CLOSING}`)", opening(name)));
        };
        if let Some((k, (want, got))) =
            table.lines().zip(found.lines()).enumerate().find(|(_, (want, got))| want != got)
        {
            return Some(format!("table `{name}`, line {}:\n  written: {want}\n  found:   {got}", k + 1));
        }
        if table.lines().count() != found.lines().count() {
            return Some(format!(
                "table `{name}`: {} lines written, {} found",
                table.lines().count(),
                found.lines().count()
            ));
        }
    }
    None
}

/// Runs `coop report`.
pub fn run(args: &ReportArgs) -> Result<(), String> {
    let tables = tables(&args.manifest)?;
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    if let Some(path) = &args.check {
        return match difference(&read(path)?, &tables) {
            None => Ok(()),
            Some(what) => Err(format!(
                "{} differs from the run folders ({what}); `coop report {} --write {}` rewrites it",
                path.display(),
                args.manifest.display(),
                path.display()
            )),
        };
    }
    if let Some(path) = &args.write {
        let mut text = read(path)?;
        for (name, table) in &tables {
            let (start, found) = block(&text, name).ok_or_else(|| {
                format!("{}: no block for table `{name}` (add `{}` and `{CLOSING}`)", path.display(), opening(name))
            })?;
            let end = start + found.len();
            text.replace_range(start..end, table);
        }
        let temporary = path.with_extension("report-tmp");
        std::fs::write(&temporary, &text).map_err(|e| format!("cannot write {}: {e}", temporary.display()))?;
        return std::fs::rename(&temporary, path).map_err(|e| format!("cannot replace {}: {e}", path.display()));
    }
    for (_, table) in &tables {
        println!("{table}\n");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder with `epochs` epochs of `merges_per_epoch` merges of τ = 2 steps.
    fn folder(dir: &Path, name: &str, rule: &str, loss: impl Fn(u64) -> f64) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("config.toml"), format!("rule = \"{rule}\"\nschedule = \"fixed\"\ntau = 2\n"))
            .unwrap();
        let mut syncs = String::from("step,tau,train_loss,bytes_sent_per_worker,sim_seconds\n");
        for k in 1..=4u64 {
            let _ = writeln!(syncs, "{},2,{},{};{},{}", 2 * k, loss(k), 1e6 * k as f64, 3e6 * k as f64, k as f64);
        }
        std::fs::write(path.join("syncs.csv"), syncs).unwrap();
        let epochs = "epoch,train_loss,test_accuracy,bytes_sent_per_worker,sim_seconds\n0,1.5,0.5,2e6;6e6,2\n1,0.75,0.8125,4e6;12e6,4.5\n";
        std::fs::write(path.join("epochs.csv"), epochs).unwrap();
        path
    }

    #[test]
    fn tables_are_written_from_the_folders_and_checked_against_a_file() {
        let dir = tempfile::tempdir().unwrap();
        // Sync: losses 2, 1.5, 1, 0.5 (final loss 0.75); local: 2, 1.8, 1.2, 0.9.
        folder(dir.path(), "sync", "sync", |k| 2.5 - 0.5 * k as f64);
        folder(dir.path(), "local", "average", |k| [2.0, 1.8, 1.2, 0.9][k as usize - 1]);
        let manifest = dir.path().join("report.toml");
        std::fs::write(
            &manifest,
            "window = 2\ntarget-loss = 1.25\n[[table]]\nname = \"main\"\nkind = \"epochs\"\nrows = [{ folder = \"sync\", label = \"synchronous\" }]\n[[table]]\nname = \"sim\"\nkind = \"simulated\"\nrows = [{ folder = \"sync\", label = \"synchronous\" }, { folder = \"local\", label = \"local SGD\" }]\n",
        )
        .unwrap();
        let written = tables(&manifest).unwrap();
        assert_eq!(
            written[0].1,
            "<!-- coop report: main -->\n| run | τ | merges | test accuracy per epoch | final | lowest loss (2 steps) | sent per worker |\n|---|---|---:|---|---:|---:|---:|\n| synchronous | 2 | 4 | 50.0, **81.2**% | 81.25% | 0.5000 | 8.0 MB |\n<!-- /coop report -->"
        );
        // Windows of one merge (2 steps): sync reaches 1.25 at merge 3 (1.0, at 3 s) and its
        // final loss 0.75 at merge 4 (4 s); local reaches 1.25 at merge 3 (1.2) and never 0.75.
        let sim: Vec<&str> = written[1].1.lines().collect();
        assert_eq!(sim[3], "| synchronous | 4 | 81.25% | 8.0 MB | 4.5 s | 4.0 s (1.00×) | 3.0 s | 1.00× |");
        assert_eq!(sim[4], "| local SGD | 4 | 81.25% | 8.0 MB | 4.5 s | not reached (lowest 0.9000) | 3.0 s | 1.00× |");
        assert!(sim[1].contains("final loss 0.7500"), "{}", sim[1]);

        // A file holding the blocks passes; one changed digit is named.
        let readme = dir.path().join("README.md");
        let text = format!("# Results\n\n{}\n\nprose\n\n{}\n", written[0].1, written[1].1);
        std::fs::write(&readme, &text).unwrap();
        let args = |check: bool| ReportArgs {
            manifest: manifest.clone(),
            check: check.then(|| readme.clone()),
            write: (!check).then(|| readme.clone()),
        };
        run(&args(true)).unwrap();
        std::fs::write(&readme, text.replace("81.25%", "81.26%")).unwrap();
        let error = run(&args(true)).unwrap_err();
        assert!(error.contains("table `main`, line 4") && error.contains("81.26%"), "{error}");
        // --write restores it and leaves the prose alone.
        run(&args(false)).unwrap();
        assert_eq!(std::fs::read_to_string(&readme).unwrap(), text);
        // A missing block, a bad manifest key and a simulated table without its synchronous run
        // are errors naming them.
        std::fs::write(&readme, "nothing").unwrap();
        assert!(run(&args(true)).unwrap_err().contains("no block for table `main`"));
        std::fs::write(&manifest, "window = 2\ntarget-loss = 1.0\ntables = []\n").unwrap();
        assert!(tables(&manifest).unwrap_err().contains("tables"));
        std::fs::write(
            &manifest,
            "window = 2\ntarget-loss = 1.0\n[[table]]\nname = \"sim\"\nkind = \"simulated\"\nrows = [{ folder = \"local\", label = \"l\" }]\n",
        )
        .unwrap();
        assert!(tables(&manifest).unwrap_err().contains("synchronous run"));
    }

    #[test]
    fn numbers_are_formatted_once() {
        assert_eq!(thousands(3_174), "3,174");
        assert_eq!(thousands(1_950), "1,950");
        assert_eq!(thousands(243), "243");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(megabytes(3_173_912_000.0), "3,174 MB");
        assert_eq!(megabytes(20_812_345.0), "20.8 MB");
        assert_eq!(megabytes(99_960_000.0), "100.0 MB");
    }
}
