//! `coop advise`: what Cooperative SGD's theory says about a `coop train` setting, before
//! training (see [`burn_coop::advisor`]).

use burn_coop::advisor::{AdaCommInputs, Advice};
use burn_coop::{
    params::ParamLayout,
    rules::{MatrixForm, MergeRule, RuleSpec},
};
use clap::Args;

use crate::config::TrainArgs;
use crate::device::DeviceName;

/// Arguments of `coop advise`: `coop train`'s, and the runtime model's.
#[derive(Debug, Args)]
pub struct AdviseArgs {
    /// The setting, exactly as for `coop train` (`--rule`, `--workers`, `--tau`, `--topology`,
    /// `--alpha`, `--anchors`, `--lr`, a `--config` file, …).
    #[command(flatten)]
    pub train: TrainArgs,
    /// Values in the model (default: counted from `--model`; at most 2^40).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub params: Option<u64>,
    /// Seconds of one merge, D (AdaComm's runtime model; default with `--network`: the rule's
    /// bytes per merge over the bandwidth plus a ring's latencies).
    #[arg(long, value_parser = burn_coop::registry::positive_f64)]
    pub comm_delay: Option<f64>,
    /// Initial training loss above its floor, F(x₀) − F_inf (for AdaComm's τ*).
    #[arg(long, value_parser = burn_coop::registry::positive_f64)]
    pub loss_gap: Option<f64>,
    /// Smoothness L of the loss (for AdaComm's τ*).
    #[arg(long, value_parser = burn_coop::registry::positive_f64)]
    pub smoothness: Option<f64>,
    /// Variance σ² of a stochastic gradient (for AdaComm's τ*).
    #[arg(long, value_parser = burn_coop::registry::positive_f64)]
    pub grad_variance: Option<f64>,
    /// Training time T in seconds (for AdaComm's τ*).
    #[arg(long, value_parser = burn_coop::registry::positive_f64)]
    pub wall_time: Option<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Refuses more workers than the rule's matrix form is computed for: gossip's matrices are
/// sparse (a ring of 100,000 workers holds 300,000 entries, and its spectrum has a closed form),
/// every other rule's is dense (`m²` entries, spectrum in time cubic in `m`).
fn check_matrix_size(rule: &RuleSpec, workers: usize) -> Result<(), String> {
    let most = burn_coop::mixing::MAX_DENSE_ORDER;
    if workers > most && !matches!(rule, RuleSpec::Gossip(_)) {
        let gib = (workers as f64).powi(2) * 8.0 / f64::from(1 << 30);
        return Err(format!(
            "{workers} workers: the theory's quantities of {} come from its dense matrix \
             ({gib:.1} GiB, and time cubic in the workers for its spectrum); at most {most} workers \
             (gossip on a ring or an exponential graph goes further)",
            rule.name().as_str()
        ));
    }
    Ok(())
}

/// Runs `coop advise`.
pub fn run(args: &AdviseArgs) -> Result<(), String> {
    // `--step-time` is the runtime model's Y here, with or without a network.
    let config = crate::train::resolve(&args.train, true);
    let (mut rule, schedule) =
        burn_coop::registry::build_pair(&config.rule, &config.schedule, config.workers).map_err(|e| e.to_string())?;
    // The period after any warm-up (an adaptive schedule's first one).
    let tau = schedule.period(u64::MAX / 2);
    check_matrix_size(&config.rule, config.workers)?;
    let values = match args.params {
        Some(values) => values as usize,
        None => {
            // On an autodiff device, as in training, so that weights and buffers are told apart.
            let device = DeviceName::default_for_build().open().autodiff();
            let model = config.model.init(&device).map_err(|e| e.to_string())?;
            // The model's tensors, so that a compressed payload counts its per-tensor parts.
            let layout = ParamLayout::of(&model, config.buffers);
            rule.set_segments(&layout.segments());
            layout.len()
        }
    };
    // D: given, or the rule's bytes per merge on the simulated network (`--network`).
    let comm_delay = args.comm_delay.or_else(|| {
        let network = config.network.as_deref()?.parse::<burn_coop::comm::NetworkModel>().ok()?;
        let bytes = rule.expected_bytes_per_merge(values, config.workers)?;
        Some(network.seconds(burn_coop::comm::CollectiveKind::AllReduce, bytes as u64, config.workers, 0, false))
    });
    // Y: `--step-time` as `coop train` takes it, when it is a number of seconds.
    let step_time = config.step_time.parse::<f64>().ok();
    let adacomm = match (args.loss_gap, comm_delay, args.smoothness, args.grad_variance, args.wall_time) {
        (Some(loss_gap), Some(comm_delay), Some(smoothness), Some(variance), Some(seconds)) => {
            Some(AdaCommInputs { loss_gap, comm_delay, smoothness, variance, seconds })
        }
        _ => None,
    };
    let name = config.rule.name().as_str();
    let mut advice = Advice::new(name, rule.as_ref(), config.workers, tau, config.lr, values)
        .map_err(|e| e.to_string())?
        .with_runtime(step_time, comm_delay);
    if let Some(inputs) = adacomm {
        advice = advice.with_adacomm(inputs);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&advice).expect("advice serializes"));
        return Ok(());
    }
    println!("{} with {} workers, lr = {}", config.describe_rule(), advice.workers, advice.lr);
    println!();
    let row = |name: &str, value: String| println!("{name:<48} {value}");
    let number = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |v| format!("{v:.6}"));
    row("zeta (second-largest |eigenvalue| of W)", number(advice.zeta));
    row("spectral gap 1 - zeta", number(advice.spectral_gap));
    row("anchors v", advice.anchors.to_string());
    row("effective lr m*lr/(m+v)", format!("{:.6}", advice.eta_eff));
    row("error-floor factor (1+z^2)/(1-z^2)*tau - 1", number(advice.error_floor_factor));
    row("  periodic averaging at this tau: tau - 1", format!("{:.6}", advice.averaging_error_floor_factor));
    row(
        "  this W every step beats averaging every tau",
        advice.decentralized_beats_averaging.map_or_else(|| "-".into(), |b| if b { "yes" } else { "no" }.into()),
    );
    row("optimal EASGD alpha 2/(m+2)", format!("{:.6}", advice.optimal_easgd_alpha));
    row("model values", advice.model_values.to_string());
    row("bytes per merge per worker", advice.bytes_per_merge.map_or_else(|| "-".into(), |b| format!("{b:.0}")));
    row("bytes per step per worker", advice.bytes_per_step.map_or_else(|| "-".into(), |b| format!("{b:.0}")));
    if let Some(seconds) = advice.seconds_per_step {
        row("seconds per step Y + D/tau", format!("{seconds:.6}"));
    }
    match advice.adacomm_tau_star {
        Some(tau_star) => row("AdaComm tau*", format!("{tau_star:.3}")),
        None => row(
            "AdaComm tau*",
            "- (give --loss-gap, --smoothness, --grad-variance, --wall-time, and --comm-delay or --network)".into(),
        ),
    }
    Ok(())
}
