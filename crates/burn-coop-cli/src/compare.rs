//! `coop compare`: the time and bytes each run needed to reach a target training loss.
//!
//! For every run folder (as `coop train` writes it), the training loss is smoothed over the last
//! `--window` local steps (a step-weighted mean of the per-merge losses in `syncs.csv`) and the
//! first merge where it reaches the target gives the run's time — simulated seconds when the run
//! simulated a network (the slowest worker's clock), wall seconds otherwise — and bytes sent per
//! worker. `--target-loss auto` takes the final training loss (last epoch's mean) of the
//! synchronous run among them, the seeds' metric; the speed-up is over that run. Each row also
//! gives the lowest windowed loss the run reached (what a run that falls short got to), its
//! final test accuracy, and its whole time and bytes (at the end of its last epoch, or of its last
//! merge while no epoch has finished).

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
    /// Also write the table as `<PREFIX>.csv` and `<PREFIX>.md` (the extensions are appended:
    /// `-o compare-0.65` writes `compare-0.65.csv`).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// One merge row of a run, as far as the comparison needs it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Merge {
    pub(crate) step: u64,
    pub(crate) loss: f64,
    pub(crate) seconds: f64,
    pub(crate) bytes: f64,
}

/// What a run needed to reach the target.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reached {
    pub(crate) step: u64,
    pub(crate) seconds: f64,
    pub(crate) bytes: f64,
}

/// The run's merges: step, loss, time (the slowest worker's simulated clock, or wall seconds)
/// and mean bytes sent per worker.
pub(crate) fn merges(run: &Run) -> Result<Vec<Merge>, String> {
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

/// The training loss averaged over the last `window` steps at each merge (`None` until the run
/// has covered `window` steps).
fn windowed(merges: &[Merge], window: u64) -> Vec<Option<f64>> {
    let steps: Vec<u64> = merges.iter().map(|m| m.step).collect();
    let losses: Vec<f64> = merges.iter().map(|m| m.loss).collect();
    crate::runs::windowed_loss(&steps, &losses, window)
}

/// The first merge where the loss averaged over the last `window` steps reaches `target`.
pub(crate) fn reached(merges: &[Merge], target: f64, window: u64) -> Option<Reached> {
    merges
        .iter()
        .zip(windowed(merges, window))
        .find(|(_, loss)| loss.is_some_and(|l| l <= target))
        .map(|(merge, _)| Reached { step: merge.step, seconds: merge.seconds, bytes: merge.bytes })
}

/// The lowest windowed loss a run reached.
pub(crate) fn best(merges: &[Merge], window: u64) -> Option<f64> {
    windowed(merges, window).into_iter().flatten().reduce(f64::min)
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
        text => match text.parse::<f64>() {
            Ok(loss) if loss.is_finite() => loss,
            _ => return Err(format!("--target-loss: '{text}' is neither a finite number nor auto")),
        },
    };
    let reference = baseline.and_then(|b| reached(&all_merges[b], target, args.window));
    let clock = if runs.iter().all(Run::simulated) { "simulated s" } else { "s" };
    let mut csv = String::from(
        "run,label,step,seconds,bytes_per_worker,speedup,best_loss,final_test_accuracy,total_seconds,total_bytes_per_worker\n",
    );
    let mut md = format!(
        "Target training loss {target:.4} (averaged over {} steps); time in {clock}.\n\n| run | steps to target | time to target | sent to target (per worker) | speed-up | lowest loss | final test accuracy | whole run: time, sent |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        args.window
    );
    let optional = |value: Option<f64>| value.map_or_else(String::new, |v| v.to_string());
    for (run, merges) in runs.iter().zip(&all_merges) {
        let name = run.name();
        let lowest = best(merges, args.window);
        let accuracy = run.final_accuracy();
        let last = run.context(run.totals())?.or_else(|| merges.last().map(|m| (m.seconds, m.bytes)));
        let whole = last.map_or_else(|| "—".into(), |(seconds, bytes)| format!("{seconds:.1}, {:.1} MB", bytes / 1e6));
        let tail = format!(
            "{} | {} | {whole}",
            lowest.map_or_else(|| "—".into(), |l| format!("{l:.4}")),
            accuracy.map_or_else(|| "—".into(), |a| format!("{:.2}%", 100.0 * a)),
        );
        let totals = format!(
            "{},{},{},{}",
            optional(lowest),
            optional(accuracy),
            optional(last.map(|(seconds, _)| seconds)),
            optional(last.map(|(_, bytes)| bytes))
        );
        match reached(merges, target, args.window) {
            Some(hit) => {
                let speedup = reference.as_ref().map(|r| r.seconds / hit.seconds);
                let _ = writeln!(
                    csv,
                    "{name},{},{},{},{},{},{totals}",
                    run.label,
                    hit.step,
                    hit.seconds,
                    hit.bytes,
                    optional(speedup)
                );
                let _ = writeln!(
                    md,
                    "| {} (`{name}`) | {} | {:.1} | {:.1} MB | {} | {tail} |",
                    run.label,
                    hit.step,
                    hit.seconds,
                    hit.bytes / 1e6,
                    speedup.map_or_else(|| "—".into(), |s| format!("{s:.2}×"))
                );
            }
            None => {
                let _ = writeln!(csv, "{name},{},,,,,{totals}", run.label);
                let _ = writeln!(md, "| {} (`{name}`) | not reached | — | — | — | {tail} |", run.label);
            }
        }
    }
    print!("{md}");
    if let Some(prefix) = &args.output {
        let write = |extension: &str, text: &str| {
            let mut path = prefix.clone().into_os_string();
            path.push(format!(".{extension}"));
            let path = PathBuf::from(path);
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
        assert_eq!(best(&run, 4), Some(0.7), "(2·0.9 + 2·0.5)/4 at step 10");
        // A merge covering more steps than the window counts only the window's share.
        let run = run_of(&[(8, 2.0), (16, 1.0)]);
        assert_eq!(reached(&run, 1.0, 4).unwrap().step, 16);
    }
}
