//! The simulated network clock against hand computations: local steps of a fixed time, the α–β
//! cost of each merge, stragglers that make everyone wait, and overlap that hides the
//! all-reduce behind the local steps.

use burn::tensor::Device;
use burn_coop::comm::{CollectiveKind, NetworkModel, SimClock, StepTime, Traffic};
use burn_coop::rules::{averaging::Averaging, overlap::Overlap};
use burn_coop::testing::{Tiny, tiny_for};
use burn_coop::{
    CoopError, StepSignal, SyncReport, Synchronizer, launch, rules::MergeRule, schedule::fixed::PeriodicSchedule,
};

/// Runs `steps` local steps on `m` workers with merges every `tau`; every worker's reports and
/// the bytes of its model all-reduces so far at each merge.
fn run(
    m: usize,
    tau: u64,
    steps: u64,
    network: NetworkModel,
    step_time: StepTime,
    rule: impl Fn() -> Box<dyn MergeRule> + Sync,
) -> Vec<Vec<(SyncReport, u64)>> {
    launch(m, |worker| {
        let rank = worker.rank();
        let comm = worker.comm()?;
        let mut sync = Synchronizer::new(rule(), PeriodicSchedule::every(tau)?, comm)?
            .with_seed(5)
            .with_simulation(network, step_time);
        let mut model: Tiny = tiny_for(rank, &Device::flex());
        let mut reports = Vec::new();
        for _ in 0..steps {
            let (next, report) = sync.after_step(model, StepSignal::new(0.1, 1.0).with_seconds(123.0))?;
            model = next;
            if let Some(report) = report {
                reports.push((report, sync.traffic_by_kind().of(CollectiveKind::AllReduce).bytes_sent));
            }
        }
        Ok::<_, CoopError>(reports)
    })
    .unwrap()
}

fn clock(report: &SyncReport) -> SimClock {
    report.sim_clock.expect("simulating")
}

#[test]
fn between_merges_the_clock_moves_by_the_steps_and_the_bytes() {
    let network: NetworkModel = "bandwidth=1Gbit,latency=0".parse().unwrap();
    let step_time = StepTime { fixed: Some(0.1), straggler_mean: None };
    let runs = run(4, 4, 16, network, step_time, || Box::new(Averaging::new()));
    for reports in &runs {
        assert_eq!(reports.len(), 4);
        for pair in reports.windows(2) {
            let ((before, bytes_before), (after, bytes_after)) = (&pair[0], &pair[1]);
            let expected = 0.4 + (bytes_after - bytes_before) as f64 / 1.25e8;
            let grown = clock(after).now - clock(before).now;
            assert!((grown - expected).abs() <= 1e-9 * expected, "grew {grown}, expected {expected}");
        }
    }
    // Every worker's clock agrees after a blocking merge.
    for k in 0..4 {
        assert!(runs.iter().all(|r| clock(&r[k].0) == clock(&runs[0][k].0)));
    }
}

#[test]
fn stragglers_make_everyone_wait() {
    // Two workers, a merge after every step, 1 ms latency, 1 MB/s.
    let network = NetworkModel::new(1e6, 1e-3).unwrap();
    let step_time = StepTime { fixed: Some(0.1), straggler_mean: Some(0.05) };
    let runs = run(2, 1, 5, network, step_time, || Box::new(Averaging::new()));
    let values = burn_coop::testing::flat(&tiny_for(0, &Device::flex())).len() as u64;
    let model_bytes = Traffic::ring_all_reduce(4 * values, 2) as f64;
    // By hand: each worker's step is 0.1 + its exponential delay; the merge starts when the
    // slower arrives, then the model all-reduce (2 latencies + bytes) and the statistics (2
    // latencies, a few scalars) run.
    let delay = |rank: u64, step: u64| {
        let u = burn_coop::random::uniform(5 ^ 0x5354_5241_4747_4C45, rank, step);
        -0.05 * (1.0 - u).ln()
    };
    let start = clock(&runs[0][0].0).now - (0.1 + delay(0, 1)).max(0.1 + delay(1, 1)) - 4e-3 - model_bytes / 1e6;
    let mut now = start;
    for step in 1..=5u64 {
        let arrive = (0..2).map(|r| now + 0.1 + delay(r, step)).fold(f64::MIN, f64::max);
        now = arrive + 2e-3 + model_bytes / 1e6 + 2e-3;
        for reports in &runs {
            let got = clock(&reports[step as usize - 1].0).now;
            assert!((got - now).abs() < 1e-9, "merge {step}: {got} against {now}");
        }
    }
    // The faster worker waited for the slower one: its communication time is longer.
    let waited: Vec<f64> = runs.iter().map(|r| clock(&r[4].0).comm_seconds).collect();
    assert!(waited[0] != waited[1], "{waited:?}");
}

#[test]
fn overlap_hides_the_all_reduce_behind_the_local_steps() {
    let values = burn_coop::testing::flat(&tiny_for(0, &Device::flex())).len() as f64;
    let bytes = 2.0 * 3.0 / 4.0 * 4.0 * values; // a ring all-reduce of the model on 4 workers
    let step_time = StepTime { fixed: Some(0.1), straggler_mean: None };
    // The all-reduce takes 0.15 s: hidden by the next τ = 2 steps (0.2 s).
    let fast = NetworkModel::new(bytes / 0.15, 0.0).unwrap();
    let runs = run(4, 2, 10, fast, step_time, || Box::new(Overlap::new(0.6, 0.7).unwrap()));
    let first = clock(&runs[0][0].0);
    for (k, (report, _)) in runs[0].iter().enumerate() {
        let c = clock(report);
        assert!((c.now - first.now - 0.2 * k as f64).abs() < 1e-9, "merge {k}: {}", c.now);
        assert!((c.comm_seconds - first.comm_seconds).abs() < 1e-12, "nothing waited for");
    }
    // It takes 0.3 s: each merge from the second on waits the 0.1 s the steps did not cover.
    let slow = NetworkModel::new(bytes / 0.3, 0.0).unwrap();
    let runs = run(4, 2, 10, slow, step_time, || Box::new(Overlap::new(0.6, 0.7).unwrap()));
    let first = clock(&runs[0][0].0);
    for (k, (report, _)) in runs[0].iter().enumerate().skip(1) {
        let c = clock(report);
        assert!((c.now - first.now - 0.3 * k as f64).abs() < 1e-9, "merge {k}: {}", c.now);
        assert!((c.comm_seconds - first.comm_seconds - 0.1 * k as f64).abs() < 1e-9);
    }
    // Blocking averaging pays the whole 0.3 s at every merge (and its statistics cost nothing
    // at zero latency).
    let runs = run(4, 2, 10, slow, step_time, || Box::new(Averaging::new()));
    for pair in runs[0].windows(2) {
        let grown = clock(&pair[1].0).now - clock(&pair[0].0).now;
        assert!((grown - 0.5).abs() < 1e-9, "{grown}");
    }
}
