//! `coop plot`: curves of several runs on one chart, as PNG or SVG (by the file's extension),
//! drawn with `plotters`; and the small loss-and-accuracy chart every `coop train` run leaves in
//! its folder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::{Args, ValueEnum};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::runs::{Reduce, Run};

/// The horizontal axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XAxis {
    /// Local steps.
    Step,
    /// Simulated seconds (runs with `--network`).
    SimTime,
    /// Wall-clock seconds.
    Wall,
    /// Megabytes sent per worker.
    Bytes,
}

/// The vertical axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum YAxis {
    /// Training loss at each merge (mean over workers and the steps since the previous merge).
    TrainLoss,
    /// Test accuracy of the average model, per epoch.
    TestAcc,
    /// Consensus distance at the merges where it was measured.
    Consensus,
    /// The period τ.
    Tau,
}

/// Arguments of `coop plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run folders written by `coop train`.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Horizontal axis.
    #[arg(long, value_enum, default_value = "step")]
    pub x: XAxis,
    /// Vertical axis.
    #[arg(long, value_enum, default_value = "train-loss")]
    pub y: YAxis,
    /// The image to write: `.png` or `.svg`.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Steps the training loss is averaged over (1: each merge's loss as logged).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub window: u64,
}

impl XAxis {
    fn label(self) -> &'static str {
        match self {
            Self::Step => "local steps",
            Self::SimTime => "simulated time (s)",
            Self::Wall => "wall-clock time (s)",
            Self::Bytes => "sent per worker (MB)",
        }
    }

    /// The column and its reduction, in the rows of `syncs.csv` or `epochs.csv`.
    fn values(self, table: &crate::runs::Table) -> Result<Vec<Option<f64>>, String> {
        match self {
            Self::Step => table.column("step", Reduce::Mean),
            Self::SimTime => table.column("sim_seconds", Reduce::Max).map_err(|_| {
                "the run has no simulated clock (train it with --network); use --x wall or step".to_string()
            }),
            Self::Wall => table.column("wall_seconds", Reduce::Max),
            Self::Bytes => Ok(table
                .column("bytes_sent_per_worker", Reduce::Mean)?
                .into_iter()
                .map(|b| b.map(|b| b / 1e6))
                .collect()),
        }
    }
}

impl YAxis {
    fn label(self) -> &'static str {
        match self {
            Self::TrainLoss => "training loss",
            Self::TestAcc => "test accuracy (%)",
            Self::Consensus => "consensus distance",
            Self::Tau => "period τ (steps)",
        }
    }

    /// The points of one run.
    fn points(self, run: &Run, x: XAxis) -> Result<Vec<(f64, f64)>, String> {
        let (table, column, scale) = match self {
            Self::TrainLoss => (&run.syncs, "train_loss", 1.0),
            Self::TestAcc => (&run.epochs, "test_accuracy", 100.0),
            Self::Consensus => (&run.syncs, "consensus_distance", 1.0),
            Self::Tau => (&run.syncs, "tau", 1.0),
        };
        let xs = run.context(x.values(table))?;
        let ys = run.context(table.column(column, Reduce::Mean))?;
        Ok(xs.into_iter().zip(ys).filter_map(|(x, y)| Some((x?, y? * scale))).collect())
    }

    /// The points of one run, the training loss averaged over the last `window` steps.
    fn smoothed_points(self, run: &Run, x: XAxis, window: u64) -> Result<Vec<(f64, f64)>, String> {
        if self != Self::TrainLoss || window == 1 {
            return self.points(run, x);
        }
        let xs = run.context(x.values(&run.syncs))?;
        let steps = run.context(run.syncs.column("step", Reduce::Mean))?;
        let losses = run.context(run.syncs.column("train_loss", Reduce::Mean))?;
        let rows: Vec<(f64, u64, f64)> = xs
            .into_iter()
            .zip(steps)
            .zip(losses)
            .filter_map(|((x, step), loss)| Some((x?, step? as u64, loss?)))
            .collect();
        let steps: Vec<u64> = rows.iter().map(|r| r.1).collect();
        let losses: Vec<f64> = rows.iter().map(|r| r.2).collect();
        let smoothed = crate::runs::windowed_loss(&steps, &losses, window);
        Ok(rows.iter().zip(smoothed).filter_map(|(r, loss)| Some((r.0, loss?))).collect())
    }
}

/// Registers a TrueType font for the charts' text, once: `COOP_FONT`, or a common system font.
fn ensure_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
            "/Library/Fonts/Arial.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        let chosen = std::env::var_os("COOP_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(candidates.iter().map(PathBuf::from))
            .find(|p| p.is_file())
            .ok_or(
                "charts need a TrueType font: install one (Debian: fonts-dejavu-core) or set COOP_FONT to a .ttf file",
            )?;
        let bytes = std::fs::read(&chosen).map_err(|e| format!("cannot read the font {}: {e}", chosen.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a TrueType font", chosen.display()))
    })
    .clone()
}

/// One curve: its legend and points.
type Curve = (String, Vec<(f64, f64)>);

/// The curves without their non-finite points (a NaN or infinite loss cannot be drawn), with a
/// warning naming each curve that had some.
fn finite_points(curves: &[Curve]) -> Vec<Curve> {
    curves
        .iter()
        .map(|(name, points)| {
            let kept: Vec<(f64, f64)> =
                points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            if kept.len() < points.len() {
                let left = points.len() - kept.len();
                eprintln!("warning: {name}: {left} of {} points are NaN or infinite and are left out", points.len());
            }
            (name.clone(), kept)
        })
        .collect()
}

/// The range of `values` with a margin, never empty.
fn span(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !low.is_finite() {
        return 0.0..1.0;
    }
    let margin = ((high - low) * 0.05).max(1e-9);
    (low - margin)..(high + margin)
}

fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    curves: &[Curve],
    x_label: &str,
    y_label: &str,
) -> Result<(), String> {
    let text = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("cannot draw the chart: {e}");
    let curves = &finite_points(curves);
    let x_range = span(curves.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let y_range = span(curves.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range)
        .map_err(text)?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(text)?;
    for (k, (name, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(text)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(text)?;
    Ok(())
}

/// A chart's panels: title, curves, axis labels.
type Panel<'a> = (String, Vec<Curve>, &'a str, &'a str);

/// Draws `panels` side by side on `root` and writes it.
fn paint<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, path: &Path, panels: &[Panel<'_>]) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| format!("cannot draw: {e}"))?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (title, curves, x, y)) in areas.iter().zip(panels) {
        draw(area, title, curves, x, y)?;
    }
    root.present().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Draws `panels` side by side into `path` (PNG or SVG by extension).
fn render(path: &Path, size: (u32, u32), panels: &[Panel<'_>]) -> Result<(), String> {
    ensure_font()?;
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("svg") => paint(SVGBackend::new(path, size).into_drawing_area(), path, panels),
        Some("png") => paint(BitMapBackend::new(path, size).into_drawing_area(), path, panels),
        _ => Err(format!("{}: the chart is written as .png or .svg", path.display())),
    }
}

/// Runs `coop plot`.
pub fn run(args: &PlotArgs) -> Result<(), String> {
    let runs: Vec<Run> = args.runs.iter().map(|folder| Run::load(folder)).collect::<Result<_, _>>()?;
    let curves: Vec<Curve> = runs
        .iter()
        .map(|run| Ok((format!("{} ({})", run.label, run.name()), args.y.smoothed_points(run, args.x, args.window)?)))
        .collect::<Result<_, String>>()?;
    let title = format!("{} against {}", args.y.label(), args.x.label());
    render(&args.output, (900, 600), &[(title, curves, args.x.label(), args.y.label())])?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}

/// The small chart of one run: training loss and test accuracy against steps, in
/// `<folder>/curves.svg`.
pub fn run_chart(folder: &Path) -> Result<PathBuf, String> {
    let run = Run::load(folder)?;
    let name = format!("{} ({})", run.label, run.name());
    let loss = vec![(name.clone(), YAxis::TrainLoss.points(&run, XAxis::Step)?)];
    let accuracy = vec![(name, YAxis::TestAcc.points(&run, XAxis::Step)?)];
    let path = folder.join("curves.svg");
    render(
        &path,
        (1000, 400),
        &[
            ("training loss".into(), loss, XAxis::Step.label(), YAxis::TrainLoss.label()),
            ("test accuracy of the average model".into(), accuracy, XAxis::Step.label(), YAxis::TestAcc.label()),
        ],
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::span;

    #[test]
    fn ranges_have_a_margin_and_are_never_empty() {
        let r = span([1.0, 3.0].into_iter());
        assert!((r.start - 0.9).abs() < 1e-12 && (r.end - 3.1).abs() < 1e-12);
        assert_eq!(span(std::iter::empty()), 0.0..1.0);
        let flat = span([2.0, 2.0].into_iter());
        assert!(flat.start < 2.0 && flat.end > 2.0);
    }
}
