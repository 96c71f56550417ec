//! `coop compare`: the time and bytes each run needed to reach a target training loss.
//!
//! For every run folder (as `coop train` writes it), the training loss is smoothed over the last
//! `--window` local steps (a step-weighted mean of the per-merge losses in `syncs.csv`) and the
//! first merge where it reaches the target gives the run's time — simulated seconds when the run
//! simulated a network (the slowest worker's clock), wall seconds otherwise — and bytes sent per
//! worker. `--target-loss auto` takes the final training loss (last epoch's mean) of the
//! synchronous run among them, the seeds' metric; the speed-up is over that run.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::runs::{Reduce, Run};

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

/// What a run needed to reach the target.
#[derive(Debug, Clone, PartialEq)]
struct Reached {
    step: u64,
    seconds: f64,
    bytes: f64,
}

/// The run's merges: step, loss, time (the slowest worker's simulated clock, or wall seconds)
/// and mean bytes sent per worker.
fn merges(run: &Run) -> Result<Vec<Merge>, String> {
    let column = |name: &str, reduce: Reduce| run.context(run.syncs.column(name, reduce));
    let time = if run.simulated() { column("sim_seconds", Reduce::Max)? } else { column("wall_seconds", Reduce::Max)? };
    let (steps, losses, bytes) = (
        column("step", Reduce::Mean)?,
        column("train_loss", Reduce::Mean)?,
        column("bytes_sent_per_worker", Reduce::Mean)?,
    );
    let merges = (0..run.syncs.len())
        .filter_map(|k| Some(Merge { step: steps[k]? as u64, loss: losses[k]?, seconds: time[k]?, bytes: bytes[k]? }))
        .collect();
    Ok(merges)
}

/// The first merge where the loss averaged over the last `window` steps reaches `target`.
fn reached(merges: &[Merge], target: f64, window: u64) -> Option<Reached> {
    let mut previous_step = 0;
    let mut recent: Vec<(u64, f64)> = Vec::new(); // (steps covered, loss)
    for merge in merges {
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
    let runs: Vec<Run> = args.runs.iter().map(|folder| Run::load(folder)).collect::<Result<_, _>>()?;
    let all_merges: Vec<Vec<Merge>> = runs.iter().map(merges).collect::<Result<_, _>>()?;
    let baseline = runs.iter().position(|r| r.synchronous);
    let target = match args.target_loss.as_str() {
        "auto" => {
            let sync =
                &runs[baseline.ok_or("--target-loss auto needs a synchronous run (--rule sync) among the runs")?];
            sync.final_loss()
                .ok_or_else(|| format!("{}: no finished epoch to take the final loss from", sync.folder.display()))?
        }
        text => text.parse::<f64>().map_err(|_| format!("--target-loss: '{text}' is neither a number nor auto"))?,
    };
    let reference = baseline.and_then(|b| reached(&all_merges[b], target, args.window));
    let clock = if runs.iter().all(Run::simulated) { "simulated s" } else { "s" };
    let mut csv = String::from("run,label,step,seconds,bytes_per_worker,speedup\n");
    let mut md = format!(
        "Target training loss {target:.4} (averaged over {} steps); time in {clock}.\n\n| run | steps | time | sent per worker | speed-up |\n|---|---:|---:|---:|---:|\n",
        args.window
    );
    for (run, merges) in runs.iter().zip(&all_merges) {
        let name = run.name();
        match reached(merges, target, args.window) {
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

    fn run_of(losses: &[(u64, f64)]) -> Vec<Merge> {
        losses
            .iter()
            .map(|&(step, loss)| Merge { step, loss, seconds: step as f64 * 0.5, bytes: step as f64 })
            .collect()
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
}
