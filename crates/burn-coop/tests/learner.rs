//! The cooperative learner end to end on a small synthetic task: every rule runs and writes its
//! metrics, interrupted runs resume bit-identically, and failures stop the run with a clear error.

mod common;

use std::path::{Path, PathBuf};

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_coop::learner::{Evaluation, LrSchedule, LrShape, latest_checkpoint};
use burn_coop::rules::{
    averaging::{AveragingConfig, SynchronousConfig},
    elastic::ElasticConfig,
    gossip::GossipConfig,
};
use burn_coop::schedule::fixed::FixedConfig;
use burn_coop::{
    learner::{CoopTask, Learner, LearnerConfig, LearnerError},
    topology::WeightRule,
};
use burn_coop::{rules::RuleSpec, schedule::ScheduleSpec, topology::TopologySpec};
use common::{Tiny, value};

/// Two-class points in 3-D: the label is the sign of `x0 + x1 − x2`.
#[derive(Clone)]
struct Synthetic {
    batches: usize,
    batch: usize,
    panic_at: Option<(usize, usize)>,
    nan_at: Option<(usize, usize)>,
    nan_test_loss: bool,
}

impl Synthetic {
    fn new() -> Self {
        Self { batches: 6, batch: 8, panic_at: None, nan_at: None, nan_test_loss: false }
    }

    fn points(&self, seed: usize, n: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let xs: Vec<f32> = (0..n * 3).map(|k| value(seed, k, 11) * 2.0).collect();
        let ys: Vec<i64> = xs.chunks(3).map(|p| i64::from(p[0] + p[1] - p[2] > 0.0)).collect();
        (Tensor::from_data(TensorData::new(xs, [n, 3]), device), Tensor::from_data(TensorData::new(ys, [n]), device))
    }
}

impl CoopTask for Synthetic {
    type Model = Tiny;
    type Batch = (Tensor<2>, Tensor<1, Int>);

    fn init_model(&self, device: &Device) -> Tiny {
        Tiny::new(device)
    }

    fn batches_per_epoch(&self, _worker: usize, _workers: usize) -> usize {
        self.batches
    }

    fn train_batch(&self, worker: usize, _workers: usize, epoch: usize, index: usize, device: &Device) -> Self::Batch {
        let step = epoch * self.batches + index;
        if self.panic_at == Some((worker, step)) {
            panic!("data shard of worker {worker} is unreadable");
        }
        let (x, y) = self.points(1000 * worker + step, self.batch, device);
        if self.nan_at == Some((worker, step)) {
            return (x.mul_scalar(f32::NAN), y);
        }
        (x, y)
    }

    fn loss(&self, model: &Tiny, (x, y): Self::Batch) -> Tensor<1> {
        let logits = model.forward(x);
        CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, y)
    }

    fn evaluate(&self, model: &Tiny, part: usize, parts: usize, device: &Device) -> Evaluation {
        let (x, y) = self.points(999_999, 64, device);
        let chunk = 64 / parts;
        let (x, y) = (x.slice(part * chunk..(part + 1) * chunk), y.slice(part * chunk..(part + 1) * chunk));
        let logits = model.forward(x);
        let loss = CrossEntropyLossConfig::new().init(device).forward(logits.clone(), y.clone());
        let correct = logits.argmax(1).squeeze_dim::<1>(1).equal(y).int().sum().into_scalar::<i64>();
        let loss = if self.nan_test_loss { f32::NAN } else { loss.into_scalar::<f32>() };
        Evaluation { loss_sum: f64::from(loss) * chunk as f64, correct: correct as u64, count: chunk as u64 }
    }
}

fn output(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-coop-learner-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(name: &str, rule: RuleSpec) -> LearnerConfig {
    LearnerConfig {
        workers: 2,
        rule,
        schedule: ScheduleSpec::Fixed(FixedConfig { tau: Some(2), warmup_steps: None }),
        epochs: 2,
        lr: LrSchedule { lr: 0.1, shape: LrShape::Cosine, warmup_epochs: 0.5, min_lr: 0.0 },
        output: output(name),
        progress: false,
        ..LearnerConfig::default()
    }
}

fn run(task: Synthetic, config: &LearnerConfig) -> Result<burn_coop::learner::TrainingSummary, LearnerError> {
    Learner::new(task, config.clone(), vec![Device::flex()]).run()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn every_rule_trains_and_writes_metrics() {
    let rules = [
        ("sync", RuleSpec::Sync(SynchronousConfig {})),
        ("average", RuleSpec::Average(AveragingConfig::default())),
        ("elastic", RuleSpec::Elastic(ElasticConfig { alpha: None, anchors: None })),
        (
            "gossip",
            RuleSpec::Gossip(GossipConfig {
                topology: Some(TopologySpec::Ring),
                weights: Some(WeightRule::MetropolisHastings),
            }),
        ),
    ];
    for (name, rule) in rules {
        let config = config(name, rule);
        let summary = run(Synthetic::new(), &config).unwrap();
        let expected_syncs = if name == "sync" { 12 } else { 6 };
        for worker in &summary.workers {
            assert_eq!((worker.steps, worker.syncs), (12, expected_syncs), "{name}");
        }
        let out = &config.output;
        let epochs = lines(&out.join("epochs.csv"));
        assert_eq!(epochs.len(), 3, "{name}: header and two epochs");
        assert!(epochs[0].starts_with("epoch,step,syncs,lr,tau,train_loss"));
        let syncs = lines(&out.join("syncs.csv"));
        assert_eq!(syncs.len(), 1 + expected_syncs as usize, "{name}");
        let jsonl = lines(&out.join("metrics.jsonl"));
        assert_eq!(jsonl.len(), 2 + expected_syncs as usize);
        let last: serde_json::Value = serde_json::from_str(jsonl.last().unwrap()).unwrap();
        assert_eq!(last["kind"], "epoch");
        assert_eq!(last["step"], 12);
        assert!(last["test_accuracy"].as_f64().unwrap() > 0.5, "{name}: {last}");
        assert_eq!(last["worker_train_loss"].as_array().unwrap().len(), 2);
        assert!(last["bytes_sent_per_worker"][0].as_u64().unwrap() > 0);
        assert!(out.join("model-average.bpk").exists());
        assert!(out.join("learner.json").exists());
        if name != "elastic" {
            // The last step is an averaging merge (gossip on a ring of two is averaging too):
            // both workers hold the same parameters.
            assert_eq!(summary.workers[0].final_parameters, summary.workers[1].final_parameters, "{name}");
        } else {
            assert_ne!(summary.workers[0].final_parameters, summary.workers[1].final_parameters, "elastic");
        }
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn an_interrupted_run_resumes_bit_identically() {
    let mut straight = config("straight", RuleSpec::Elastic(ElasticConfig { alpha: Some(0.3), anchors: None }));
    straight.checkpoint_every = 1;
    straight.keep_checkpoints = 100;
    let reference = run(Synthetic::new(), &straight).unwrap();

    let mut interrupted = config("interrupted", RuleSpec::Elastic(ElasticConfig { alpha: Some(0.3), anchors: None }));
    interrupted.checkpoint_every = 1;
    interrupted.max_steps = Some(8);
    let first = run(Synthetic::new(), &interrupted).unwrap();
    assert_eq!(first.workers[0].steps, 8);
    let latest = latest_checkpoint(&interrupted.output).unwrap().unwrap();
    assert!(latest.ends_with("step-00000008"), "{}", latest.display());

    let saved = |dir: &Path, rank: usize| {
        let model = std::fs::read(dir.join(format!("worker-{rank}.model.bpk"))).unwrap();
        let record = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(model)).unwrap();
        common::flat(&burn::module::Module::load_record(Tiny::new(&common::device()), record))
    };
    for rank in 0..2 {
        let at_eight = straight.output.join("checkpoints/step-00000008");
        assert_eq!(saved(&at_eight, rank), saved(&latest, rank), "worker {rank} differs at the interruption");
        // The anchor is stored in binary: 4 bytes per value plus a small header, not JSON text.
        let records = std::fs::read(latest.join(format!("worker-{rank}.coop.bin"))).unwrap();
        let file = burn_coop::state::StateFile::from_bytes(&records).unwrap();
        assert_eq!(file.records["rule"].buffers["anchor"].len(), 42);
        assert!(records.len() <= 4 * 42 + 128, "{} bytes", records.len());
        let counters = std::fs::metadata(latest.join(format!("worker-{rank}.state.json"))).unwrap().len();
        assert!(counters < 2048, "the JSON holds small counters only: {counters} bytes");
    }
    interrupted.max_steps = None;
    let resumed = Learner::new(Synthetic::new(), interrupted.clone(), vec![Device::flex()]).resume().run().unwrap();
    for (a, b) in reference.workers.iter().zip(&resumed.workers) {
        assert_eq!((a.steps, a.syncs), (b.steps, b.syncs));
        assert!(
            a.final_parameters.iter().zip(&b.final_parameters).all(|(x, y)| x.to_bits() == y.to_bits()),
            "worker {}: parameters differ after resume",
            a.rank
        );
    }
    let epochs = lines(&interrupted.output.join("epochs.csv"));
    assert_eq!(epochs.len(), 3, "resumed run appends its epochs: {epochs:?}");
    std::fs::remove_dir_all(&straight.output).unwrap();
    std::fs::remove_dir_all(&interrupted.output).unwrap();
}

#[test]
fn a_panicking_worker_stops_the_run_with_its_message() {
    let config = config("panic", RuleSpec::Average(AveragingConfig::default()));
    let task = Synthetic { panic_at: Some((1, 3)), ..Synthetic::new() };
    let error = run(task, &config).unwrap_err();
    assert!(
        matches!(&error, LearnerError::WorkerPanicked { worker: 1, message } if message == "data shard of worker 1 is unreadable"),
        "{error}"
    );
    std::fs::remove_dir_all(&config.output).unwrap();
}

#[test]
fn a_nan_test_loss_stops_the_run_with_its_cause() {
    let config = config("nan-test", RuleSpec::Average(AveragingConfig::default()));
    let task = Synthetic { nan_test_loss: true, ..Synthetic::new() };
    let error = run(task, &config).unwrap_err();
    assert!(matches!(error, LearnerError::NonFiniteTestLoss { step: 6, non_finite: 0, values: 42, .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "the average model's test loss is NaN at step 6: 0 of its 42 values are NaN or infinite (all finite: look at the buffers, e.g. a BatchNorm running variance below zero); the last good checkpoint is kept"
    );
    assert!(!config.output.join("epochs.csv").exists() || lines(&config.output.join("epochs.csv")).len() == 1);
    std::fs::remove_dir_all(&config.output).unwrap();
}

#[test]
fn a_nan_loss_names_worker_and_step_and_keeps_the_last_checkpoint() {
    let mut config = config("nan", RuleSpec::Average(AveragingConfig::default()));
    config.checkpoint_every = 1;
    let task = Synthetic { nan_at: Some((1, 6)), ..Synthetic::new() };
    let error = run(task, &config).unwrap_err();
    assert!(matches!(error, LearnerError::NonFiniteLoss { worker: 1, step: 7, .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "worker 1 has a non-finite training loss (NaN) at step 7; the last good checkpoint is kept"
    );
    let latest = latest_checkpoint(&config.output).unwrap().unwrap();
    assert!(latest.ends_with("step-00000006"), "{}", latest.display());
    for rank in 0..2 {
        let state = std::fs::read(latest.join(format!("worker-{rank}.state.json"))).unwrap();
        let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
        assert_eq!(state["step"], 6);
    }
    // The run can resume from it.
    let resumed = Learner::new(Synthetic::new(), config.clone(), vec![Device::flex()]).resume().run().unwrap();
    assert_eq!(resumed.workers[0].steps, 12);
    std::fs::remove_dir_all(&config.output).unwrap();
}

#[test]
fn bad_configurations_are_reported() {
    let mut bad = config("bad", RuleSpec::Elastic(ElasticConfig { alpha: Some(0.9), anchors: None }));
    let error = run(Synthetic::new(), &bad).unwrap_err();
    assert!(matches!(&error, LearnerError::Spec(spec) if spec.option == "alpha"), "{error}");
    bad.rule = RuleSpec::Average(AveragingConfig::default());
    bad.schedule = ScheduleSpec::Fixed(FixedConfig { tau: Some(0), warmup_steps: None });
    let error = run(Synthetic::new(), &bad).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid value '0' for 'tau': the synchronization period τ must be at least 1, got 0 (τ = 1 is fully synchronous)"
    );
    let missing = Learner::new(
        Synthetic::new(),
        config("missing", RuleSpec::Average(AveragingConfig::default())),
        vec![Device::flex()],
    )
    .resume()
    .run();
    assert!(matches!(missing, Err(LearnerError::Checkpoint(_))));
    let _ = std::fs::remove_dir_all(&bad.output);
    let _ = std::fs::remove_dir_all(output("missing"));
}

#[test]
fn a_corrupt_or_foreign_state_file_is_named() {
    let mut config = config("corrupt", RuleSpec::Elastic(ElasticConfig { alpha: Some(0.3), anchors: None }));
    config.checkpoint_every = 1;
    config.max_steps = Some(4);
    run(Synthetic::new(), &config).unwrap();
    config.max_steps = None;
    let latest = latest_checkpoint(&config.output).unwrap().unwrap();
    let path = latest.join("worker-1.coop.bin");
    let good = std::fs::read(&path).unwrap();

    std::fs::write(&path, &good[..good.len() - 9]).unwrap();
    let error = Learner::new(Synthetic::new(), config.clone(), vec![Device::flex()]).resume().run().unwrap_err();
    let message = error.to_string();
    assert!(message.contains("worker-1.coop.bin") && message.contains("truncated"), "{message}");

    // One changed byte keeps the length: it is a checksum mismatch naming the file.
    std::fs::write(&path, &good).unwrap();
    let model = latest.join("worker-0.model.bpk");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x04;
    std::fs::write(&model, &bytes).unwrap();
    let error = Learner::new(Synthetic::new(), config.clone(), vec![Device::flex()]).resume().run().unwrap_err();
    let message = error.to_string();
    assert!(message.contains("worker-0.model.bpk") && message.contains("checksum"), "{message}");
    assert!(!message.contains("truncated"), "{message}");
    bytes[middle] ^= 0x04;
    std::fs::write(&model, &bytes).unwrap();

    // A consistent file (its sum rewritten) with an entry the rule does not keep.
    let mut foreign = burn_coop::state::StateFile::from_bytes(&good).unwrap();
    foreign.records.get_mut("rule").unwrap().scalars.insert("momentum".into(), 0.9);
    let foreign = foreign.to_bytes();
    std::fs::write(&path, &foreign).unwrap();
    let sums = latest.join("worker-1.sums");
    let listed = std::fs::read_to_string(&sums).unwrap();
    let body: String = listed
        .lines()
        .filter(|line| !line.starts_with("sums "))
        .map(|line| match line.starts_with("worker-1.coop.bin ") {
            true => format!("worker-1.coop.bin {} {:016x}\n", foreign.len(), fnv1a(&foreign)),
            false => format!("{line}\n"),
        })
        .collect();
    std::fs::write(&sums, format!("{body}sums {:016x}\n", fnv1a(body.as_bytes()))).unwrap();
    let error = Learner::new(Synthetic::new(), config.clone(), vec![Device::flex()]).resume().run().unwrap_err();
    let message = error.to_string();
    assert!(message.contains("worker-1.coop.bin") && message.contains("momentum"), "{message}");
    std::fs::write(&path, &good).unwrap();
    std::fs::write(&sums, listed).unwrap();

    // Another rule (or the same with other settings) does not continue from this checkpoint.
    let mut gossip = config.clone();
    gossip.rule = RuleSpec::Gossip(GossipConfig::default());
    let error = Learner::new(Synthetic::new(), gossip, vec![Device::flex()]).resume().run().unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("was written under") && message.contains("elastic") && message.contains("gossip"),
        "{message}"
    );
    let mut other_alpha = config.clone();
    other_alpha.rule = RuleSpec::Elastic(ElasticConfig { alpha: Some(0.2), anchors: None });
    let error = Learner::new(Synthetic::new(), other_alpha, vec![Device::flex()]).resume().run().unwrap_err();
    assert!(error.to_string().contains("was written under"), "{error}");
    Learner::new(Synthetic::new(), config.clone(), vec![Device::flex()]).resume().run().unwrap();

    // LATEST naming a folder that is gone is said so.
    std::fs::write(config.output.join("checkpoints/LATEST"), "step-99999999").unwrap();
    let error = Learner::new(Synthetic::new(), config.clone(), vec![Device::flex()]).resume().run().unwrap_err();
    assert!(
        error.to_string().contains("names the checkpoint") && error.to_string().contains("step-99999999"),
        "{error}"
    );
    std::fs::remove_dir_all(&config.output).unwrap();
}

/// FNV-1a, 64 bits: the checksum of checkpoint files.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[test]
fn an_outer_optimizer_with_an_adaptive_schedule_resumes_bit_identically() {
    use burn_coop::rules::diloco::DiLoCoConfig;
    use burn_coop::schedule::adacomm::AdaCommConfig;
    let setup = |name: &str| {
        let mut config = config(name, RuleSpec::Diloco(DiLoCoConfig::default()));
        config.schedule = ScheduleSpec::Adacomm(AdaCommConfig {
            tau0: Some(4),
            interval: Some(4),
            interval_seconds: None,
            adacomm_lr_aware: None,
        });
        config.checkpoint_every = 1;
        config
    };
    let straight = setup("diloco-straight");
    let reference = run(Synthetic::new(), &straight).unwrap();
    let mut interrupted = setup("diloco-interrupted");
    interrupted.max_steps = Some(8);
    run(Synthetic::new(), &interrupted).unwrap();
    let latest = latest_checkpoint(&interrupted.output).unwrap().unwrap();
    let records = std::fs::read(latest.join("worker-0.coop.bin")).unwrap();
    let file = burn_coop::state::StateFile::from_bytes(&records).unwrap();
    assert_eq!(file.records["rule"].buffers["momentum"].len(), 42, "the outer momentum is saved");
    assert!(file.records["schedule"].scalar("loss0").is_some(), "AdaComm's first-interval loss is saved");
    interrupted.max_steps = None;
    let resumed = Learner::new(Synthetic::new(), interrupted.clone(), vec![Device::flex()]).resume().run().unwrap();
    for (a, b) in reference.workers.iter().zip(&resumed.workers) {
        assert_eq!((a.steps, a.syncs), (b.steps, b.syncs));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.final_parameters), bits(&b.final_parameters), "worker {}", a.rank);
    }
    // Everything but the measured times (communication waits, wall time): merges, losses,
    // periods and bytes after the resume.
    let without_wall = |path: PathBuf| -> Vec<String> {
        lines(&path).into_iter().map(|l| l.rsplitn(4, ',').last().unwrap().to_string()).collect()
    };
    assert_eq!(without_wall(straight.output.join("syncs.csv")), without_wall(interrupted.output.join("syncs.csv")));
    std::fs::remove_dir_all(&straight.output).unwrap();
    std::fs::remove_dir_all(&interrupted.output).unwrap();
}

#[test]
fn asynchronous_local_sgd_trains_with_local_threads_and_merges_in_place() {
    use burn_coop::comm::Traffic;
    use burn_coop::rules::async_local_sgd::AsyncConfig;
    let config = config("async", RuleSpec::Async(AsyncConfig { local_threads: Some(3) }));
    let summary = run(Synthetic::new(), &config).unwrap();
    let n = summary.workers[0].final_parameters.len() as u64;
    for worker in &summary.workers {
        assert_eq!((worker.steps, worker.syncs), (12, 6), "a merge every τ = 2 of the worker's steps");
        let expected = Traffic::broadcast(4 * n, 2) + 6 * Traffic::ring_all_reduce(4 * n, 2);
        assert_eq!(worker.bytes_sent, expected, "the initial broadcast and one all-reduce per merge");
    }
    let out = &config.output;
    let syncs = lines(&out.join("syncs.csv"));
    assert_eq!(syncs.len(), 7);
    assert!(syncs[0].contains("comm_inflight_seconds"), "{}", syncs[0]);
    let epochs = lines(&out.join("epochs.csv"));
    assert_eq!(epochs.len(), 3);
    let last: serde_json::Value = serde_json::from_str(lines(&out.join("metrics.jsonl")).last().unwrap()).unwrap();
    assert!(last["test_accuracy"].as_f64().unwrap() > 0.5, "{last}");
    std::fs::remove_dir_all(out).unwrap();

    // A warm-up of 5 steps (LAPSGD's `--pre_post_epochs`): merges after steps 1–5, then every
    // τ = 2 steps from there (7, 9, 11), with averaging of the trained parameters only: each
    // worker keeps its BatchNorm statistics, which are not sent.
    let mut config = self::config("async-warmup", RuleSpec::Async(AsyncConfig { local_threads: Some(2) }));
    config.schedule = ScheduleSpec::Fixed(FixedConfig { tau: Some(2), warmup_steps: Some(5) });
    config.buffers = burn_coop::params::BufferPolicy::KeepLocal;
    let summary = run(Synthetic::new(), &config).unwrap();
    let trained = summary.workers[0].final_parameters.len() as u64;
    assert!(trained < n, "the buffers stay out of the averaged values");
    for worker in &summary.workers {
        assert_eq!((worker.steps, worker.syncs), (12, 8), "5 warm-up merges and 3 after");
        let expected = Traffic::broadcast(4 * trained, 2) + 8 * Traffic::ring_all_reduce(4 * trained, 2);
        assert_eq!(worker.bytes_sent, expected);
    }
    let syncs = lines(&config.output.join("syncs.csv"));
    let at = |name: &str| syncs[0].split(',').position(|c| c == name).unwrap();
    let (step, tau) = (at("step"), at("tau"));
    let merges: Vec<(u64, u64)> = syncs[1..]
        .iter()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            (cells[step].parse().unwrap(), cells[tau].parse().unwrap())
        })
        .collect();
    assert_eq!(merges, vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (7, 2), (9, 2), (11, 2)]);
    std::fs::remove_dir_all(&config.output).unwrap();

    // A NaN loss on one worker's local thread stops every worker, naming the cause.
    let config = self::config("async-nan", RuleSpec::Async(AsyncConfig { local_threads: Some(2) }));
    let error = run(Synthetic { nan_at: Some((1, 6)), ..Synthetic::new() }, &config).unwrap_err();
    assert!(matches!(error, LearnerError::NonFiniteLoss { worker: 1, step: 7, .. }), "{error}");
    let _ = std::fs::remove_dir_all(&config.output);

    // A panic in a local thread (here the task's data) stops every worker too, with its message.
    let config = self::config("async-panic", RuleSpec::Async(AsyncConfig { local_threads: Some(2) }));
    let error = run(Synthetic { panic_at: Some((0, 3)), ..Synthetic::new() }, &config).unwrap_err();
    assert!(error.to_string().contains("data shard of worker 0 is unreadable"), "{error}");
    let _ = std::fs::remove_dir_all(&config.output);

    // No checkpoints to resume from: a clear error.
    let error = Learner::new(Synthetic::new(), config.clone(), vec![Device::flex()]).resume().run().unwrap_err();
    assert!(error.to_string().contains("asynchronous local SGD takes no checkpoints"), "{error}");
    let _ = std::fs::remove_dir_all(&config.output);
}

/// Every worker's values of `column` in each row of a metrics CSV (`;`-joined per worker).
fn column(lines: &[String], column: &str) -> Vec<Vec<f64>> {
    let at = lines[0].split(',').position(|c| c == column).unwrap_or_else(|| panic!("no {column}: {}", lines[0]));
    lines[1..].iter().map(|l| l.split(',').nth(at).unwrap().split(';').map(|v| v.parse().unwrap()).collect()).collect()
}

#[test]
fn asynchronous_local_sgd_on_a_simulated_network_waits_only_at_the_ends_of_epochs() {
    use burn_coop::comm::{NetworkModel, StepTime, Traffic};
    use burn_coop::rules::async_local_sgd::AsyncConfig;
    // 2 workers, 2 local threads, τ = 2, 6 steps per epoch of 0.1 s, 2 epochs, no latency: the
    // compute clock reaches merge k of an epoch at base + 0.2k.
    let values = burn_coop::testing::flat(&Tiny::new(&Device::flex())).len() as u64;
    let (model, broadcast) = (Traffic::ring_all_reduce(4 * values, 2) as f64, Traffic::broadcast(4 * values, 2) as f64);
    // (seconds of one all-reduce, merges' sim_seconds, epochs' sim_seconds, epochs' sim_comm_seconds),
    // by hand, from the end of the initial broadcast.
    let cases = [
        // 0.05 s: hidden by the τ steps; only each epoch's last merge is waited for.
        (0.05, vec![0.25, 0.45, 0.65, 0.9, 1.1, 1.3], [0.65, 1.3], [0.05, 0.1]),
        // 0.5 s: merges queue behind each other (the snapshot leaves when the previous one has
        // landed); the steps still run on, and each epoch's end waits for the queue.
        (0.5, vec![0.7, 1.2, 1.7, 2.4, 2.9, 3.4], [1.7, 3.4], [1.1, 2.2]),
    ];
    for (seconds, merges, epochs, waits) in cases {
        let bandwidth = model / seconds;
        let mut config = config("async-sim", RuleSpec::Async(AsyncConfig { local_threads: Some(2) }));
        config.network = Some(NetworkModel::new(bandwidth, 0.0).unwrap());
        config.step_time = StepTime { fixed: Some(0.1), straggler_mean: None };
        run(Synthetic::new(), &config).unwrap();
        let start = broadcast / bandwidth;
        let close = |got: &[f64], want: f64, what: &str| {
            for g in got {
                assert!(
                    (g - start - want).abs() < 2e-6,
                    "{what} (all-reduce {seconds} s): {g} against {}",
                    start + want
                );
            }
        };
        let syncs = lines(&config.output.join("syncs.csv"));
        let sim = column(&syncs, "sim_seconds");
        assert_eq!(sim.len(), merges.len());
        for (k, (got, want)) in sim.iter().zip(&merges).enumerate() {
            close(got, *want, &format!("merge {}", k + 1));
        }
        let epoch_rows = lines(&config.output.join("epochs.csv"));
        for (e, (got, want)) in column(&epoch_rows, "sim_seconds").iter().zip(epochs).enumerate() {
            close(got, want, &format!("end of epoch {e}"));
        }
        for (e, (got, want)) in column(&epoch_rows, "sim_comm_seconds").iter().zip(waits).enumerate() {
            assert!(got.iter().all(|g| (g - want).abs() < 2e-6), "waited by epoch {e}: {got:?} against {want}");
        }
        std::fs::remove_dir_all(&config.output).unwrap();
    }
}

#[test]
fn a_merge_of_the_learner_takes_one_statistics_collective() {
    use burn_coop::comm::InProcessGroup;
    use burn_coop::run_group;
    use burn_coop::testing::RecordingComm;

    // One epoch of 6 steps, τ = 2: three merges. Averaging measures the consensus distance, so
    // the rule's statistics and every worker's syncs.csv columns travel together, once a merge;
    // the epoch's end adds the epoch's columns and the evaluation's sums.
    for (name, rule) in [
        ("count-average", RuleSpec::Average(AveragingConfig::default())),
        ("count-gossip", RuleSpec::Gossip(GossipConfig::default())),
    ] {
        let config = LearnerConfig { epochs: 1, ..config(name, rule) };
        let comms: Vec<_> = InProcessGroup::new(2).into_communicators().into_iter().map(RecordingComm::new).collect();
        let logs: Vec<_> = comms.iter().map(RecordingComm::log).collect();
        let reports = run_group(comms, |_, comm| {
            burn_coop::learner::run_worker(&Synthetic::new(), &config, &Device::flex(), comm, false)
        })
        .unwrap_or_else(|failure| panic!("{:?}", failure.primary()));
        for (report, log) in reports.iter().zip(&logs) {
            assert_eq!(report.syncs, 3, "{name}");
            let calls = log.lock().unwrap().clone();
            assert_eq!(calls.scalars, 3 + 2, "{name}: one statistics collective per merge, two at the epoch's end");
        }
        let rows = lines(&config.output.join("syncs.csv"));
        assert_eq!(rows.len(), 1 + 3, "{name}");
    }
}

/// Twenty seeded trials of a 4-worker run losing a random worker at a random step to a random
/// fault: every trial stops (a hang ends with the others' peer timeout), with the error of the
/// worker that failed, named, whatever the others saw (a lost peer, a timeout, its NaN values).
#[test]
fn a_worker_failing_at_a_random_step_stops_the_run_naming_it() {
    use burn_coop::learner::{FaultKind, InjectedFault};
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let task = Synthetic::new();
    let total = 2 * task.batches as u64;
    for trial in 0..20 {
        let fault =
            InjectedFault { rank: next(4) as usize, step: 1 + next(total), kind: FaultKind::ALL[next(4) as usize] };
        let rule = RuleSpec::Average(Default::default());
        let config = LearnerConfig {
            workers: 4,
            faults: vec![fault],
            peer_timeout: Some(0.5),
            ..config(&format!("chaos-{trial}"), rule)
        };
        let error = run(task.clone(), &config).expect_err("a worker failed").to_string();
        let worker = format!("worker {}", fault.rank);
        let named = match fault.kind {
            FaultKind::Panic => error.contains(&format!("{worker} panicked: injected fault {fault}")),
            FaultKind::Nan => error.contains(&worker) && error.contains("non-finite"),
            FaultKind::Hang | FaultKind::Exit => error.contains(&format!(
                "{worker} failed on purpose after step {}: injected fault '{}'",
                fault.step,
                fault.kind.name()
            )),
        };
        assert!(named, "trial {trial}, fault {fault}: {error}");
        let _ = std::fs::remove_dir_all(&config.output);
    }
}

#[test]
fn faults_that_cannot_happen_are_refused() {
    let fault = |text: &str| text.parse::<burn_coop::learner::InjectedFault>().unwrap();
    let rule = RuleSpec::Average(Default::default());
    let cases = [
        (vec![fault("2@3")], None, "worker 2, but the run has 2 workers"),
        (vec![fault("1@13")], None, "comes after the run's last step, 12"),
        (vec![fault("1@3:hang")], None, "give a peer timeout"),
        (vec![], Some(0.0), "positive number of seconds"),
    ];
    for (faults, peer_timeout, expected) in cases {
        let config = LearnerConfig { faults, peer_timeout, ..config("bad-faults", rule.clone()) };
        let error = run(Synthetic::new(), &config).expect_err("refused").to_string();
        assert!(error.contains(expected), "{error}");
    }
}
