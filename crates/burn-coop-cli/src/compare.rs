//! `coop compare`: the time and bytes each run needed to reach a target training loss.
//!
//! For every run folder (as `coop train` writes it), the training loss is smoothed over the last
//! `--window` local steps (a step-weighted mean of the per-merge losses in `syncs.csv`) and the
//! first merge where it reaches the target gives the run's time — simulated seconds when the run
//! simulated a network (the slowest worker's clock), wall seconds otherwise — and bytes sent per
//! worker. `--target-loss auto` takes the final training loss (last epoch's mean) of the
//! synchronous run among them, the seeds' metric; the speed-up is over that run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;

/// Arguments of `coop compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run folders written by `coop train`.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The training loss to reach: a number, or `auto` (the synchronous run's final loss).
    #[arg(long, default_value = "auto")]
    pub target_loss: String,
    /// Steps the training loss is averaged over before comparing it with the target.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub window: u64,
    /// Also write the table as `<PREFIX>.csv` and `<PREFIX>.md`.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// One merge row of a run, as far as the comparison needs it.
#[derive(Debug, Clone, PartialEq)]
struct Merge {
    step: u64,
    loss: f64,
    seconds: f64,
    bytes: f64,
}

/// One run, read from its folder.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    folder: PathBuf,
    label: String,
    synchronous: bool,
    simulated: bool,
    final_loss: Option<f64>,
    merges: Vec<Merge>,
}

/// What a run needed to reach the target.
#[derive(Debug, Clone, PartialEq)]
struct Reached {
    step: u64,
    seconds: f64,
    bytes: f64,
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The mean of a `;`-joined list of numbers, or its largest.
fn joined(cell: &str, largest: bool) -> Result<f64, String> {
    let values: Vec<f64> = cell
        .split(';')
        .map(|v| v.parse::<f64>().map_err(|_| format!("'{v}' is not a number")))
        .collect::<Result<_, _>>()?;
    if values.is_empty() {
        return Err("an empty list".into());
    }
    Ok(if largest {
        values.iter().copied().fold(f64::MIN, f64::max)
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    })
}

fn load(folder: &Path) -> Result<Run, String> {
    let config = read(&folder.join("config.toml"))?;
    let table: toml::Table = config.parse().map_err(|e| format!("{}: {e}", folder.join("config.toml").display()))?;
    let text = |key: &str| table.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let rule = text("rule").unwrap_or_else(|| "average".into());
    let schedule = text("schedule").unwrap_or_else(|| "fixed".into());
    let tau = table.get("tau").and_then(|v| v.as_integer());
    let label = match (rule.as_str(), schedule.as_str(), tau) {
        ("sync", _, _) => "sync".to_string(),
        (rule, "fixed", Some(tau)) => format!("{rule} τ={tau}"),
        (rule, schedule, _) => format!("{rule} {schedule}"),
    };
    let syncs = read(&folder.join("syncs.csv"))?;
    let mut lines = syncs.lines();
    let header: Vec<&str> = lines.next().ok_or("syncs.csv is empty")?.split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let missing = |name: &str| format!("{}: syncs.csv has no {name} column", folder.display());
    let (step, loss, bytes) = (
        column("step").ok_or_else(|| missing("step"))?,
        column("train_loss").ok_or_else(|| missing("train_loss"))?,
        column("bytes_sent_per_worker").ok_or_else(|| missing("bytes_sent_per_worker"))?,
    );
    let sim = column("sim_seconds");
    let wall = column("wall_seconds").ok_or_else(|| missing("wall_seconds"))?;
    let mut merges = Vec::new();
    for (k, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        let at = |i: usize| {
            cells.get(i).copied().ok_or_else(|| format!("{}: syncs.csv row {} is short", folder.display(), k + 2))
        };
        let number = |i: usize| -> Result<f64, String> {
            at(i)?.parse::<f64>().map_err(|_| format!("{}: syncs.csv row {}: not a number", folder.display(), k + 2))
        };
        merges.push(Merge {
            step: number(step)? as u64,
            loss: number(loss)?,
            seconds: match sim {
                Some(i) => joined(at(i)?, true)?,
                None => number(wall)?,
            },
            bytes: joined(at(bytes)?, false)?,
        });
    }
    let final_loss = read(&folder.join("epochs.csv")).ok().and_then(|text| {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next()?.split(',').collect();
        let i = header.iter().position(|h| *h == "train_loss")?;
        lines.last()?.split(',').nth(i)?.parse().ok()
    });
    Ok(Run {
        folder: folder.to_path_buf(),
        label,
        synchronous: rule == "sync",
        simulated: sim.is_some(),
        final_loss,
        merges,
    })
}

/// The first merge where the loss averaged over the last `window` steps reaches `target`.
fn reached(run: &Run, target: f64, window: u64) -> Option<Reached> {
    let mut previous_step = 0;
    let mut recent: Vec<(u64, f64)> = Vec::new(); // (steps covered, loss)
    for merge in &run.merges {
        recent.push((merge.step - previous_step, merge.loss));
        previous_step = merge.step;
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
        if covered == window && weighted / window as f64 <= target {
            return Some(Reached { step: merge.step, seconds: merge.seconds, bytes: merge.bytes });
        }
    }
    None
}

/// Runs `coop compare`.
pub fn run(args: &CompareArgs) -> Result<(), String> {
    let runs: Vec<Run> = args.runs.iter().map(|folder| load(folder)).collect::<Result<_, _>>()?;
    let baseline = runs.iter().find(|r| r.synchronous);
    let target = match args.target_loss.as_str() {
        "auto" => {
            let sync = baseline.ok_or("--target-loss auto needs a synchronous run (--rule sync) among the runs")?;
            sync.final_loss
                .ok_or_else(|| format!("{}: no finished epoch to take the final loss from", sync.folder.display()))?
        }
        text => text.parse::<f64>().map_err(|_| format!("--target-loss: '{text}' is neither a number nor auto"))?,
    };
    let reference = baseline.and_then(|b| reached(b, target, args.window));
    let clock = if runs.iter().all(|r| r.simulated) { "simulated s" } else { "s" };
    let mut csv = String::from("run,label,step,seconds,bytes_per_worker,speedup\n");
    let mut md = format!(
        "Target training loss {target:.4} (averaged over {} steps); time in {clock}.\n\n| run | steps | time | sent per worker | speed-up |\n|---|---:|---:|---:|---:|\n",
        args.window
    );
    for run in &runs {
        let name =
            run.folder.file_name().map_or_else(|| run.folder.display().to_string(), |n| n.to_string_lossy().into());
        match reached(run, target, args.window) {
            Some(hit) => {
                let speedup = reference.as_ref().map(|r| r.seconds / hit.seconds);
                let _ = writeln!(
                    csv,
                    "{name},{},{},{},{},{}",
                    run.label,
                    hit.step,
                    hit.seconds,
                    hit.bytes,
                    speedup.map_or_else(String::new, |s| s.to_string())
                );
                let _ = writeln!(
                    md,
                    "| {} (`{name}`) | {} | {:.1} | {:.1} MB | {} |",
                    run.label,
                    hit.step,
                    hit.seconds,
                    hit.bytes / 1e6,
                    speedup.map_or_else(|| "—".into(), |s| format!("{s:.2}×"))
                );
            }
            None => {
                let _ = writeln!(csv, "{name},{},,,,", run.label);
                let _ = writeln!(md, "| {} (`{name}`) | not reached | — | — | — |", run.label);
            }
        }
    }
    print!("{md}");
    if let Some(prefix) = &args.output {
        let write = |extension: &str, text: &str| {
            let path = prefix.with_extension(extension);
            std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write("csv", &csv)?;
        write("md", &md)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(losses: &[(u64, f64)]) -> Run {
        Run {
            folder: PathBuf::from("x"),
            label: "x".into(),
            synchronous: false,
            simulated: true,
            final_loss: None,
            merges: losses
                .iter()
                .map(|&(step, loss)| Merge { step, loss, seconds: step as f64 * 0.5, bytes: step as f64 })
                .collect(),
        }
    }

    #[test]
    fn the_target_is_reached_by_the_windowed_loss() {
        // Merges every 2 steps; a window of 4 steps averages the last two merges.
        let run = run_of(&[(2, 3.0), (4, 2.0), (6, 1.0), (8, 0.9), (10, 0.5)]);
        // (2·1.0 + 2·0.9)/4 = 0.95 at step 8.
        assert_eq!(reached(&run, 0.95, 4), Some(Reached { step: 8, seconds: 4.0, bytes: 8.0 }));
        assert_eq!(reached(&run, 1.5, 4).unwrap().step, 6, "(2·2 + 2·1)/4 = 1.5");
        assert_eq!(reached(&run, 0.1, 4), None);
        // A merge covering more steps than the window counts only the window's share.
        let run = run_of(&[(8, 2.0), (16, 1.0)]);
        assert_eq!(reached(&run, 1.0, 4).unwrap().step, 16);
    }

    #[test]
    fn lists_average_or_take_the_largest() {
        assert_eq!(joined("1;2;6", false).unwrap(), 3.0);
        assert_eq!(joined("1;2;6", true).unwrap(), 6.0);
        assert!(joined("1;x", false).is_err());
    }
}
