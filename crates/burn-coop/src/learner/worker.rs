//! The worker loop: one replica's whole training run, written once for every communicator.
//!
//! The in-process learner runs it on one thread per replica; under MPI each rank runs it once.
//! Every collective happens at the same step on every worker, so the loop is in lockstep by
//! construction: local steps, merges chosen by the (identical) schedule, metric gathering at
//! merges, evaluation and checkpoints at fixed steps.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};

use super::LearnerError;
use super::checkpoint::{CheckpointError, Checkpoints, WorkerFiles, WorkerState};
use super::config::LearnerConfig;
use super::metrics::{Columns, EpochMetrics, MetricsWriter, SyncMetrics};
use super::task::{CoopTask, Evaluation};
use crate::comm::Communicator;
use crate::error::CoopError;
use crate::local_sgd::InnerStatePolicy;
use crate::params::{BufferPolicy, ParamLayout};
use crate::rules::Triggered;
use crate::rules::kernels::divide;
use crate::state::StateFile;
use crate::sync::{StepSignal, Synchronizer};

/// What a worker's run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerReport {
    /// This worker's rank.
    pub rank: usize,
    /// Global steps done (including those before a resume).
    pub steps: u64,
    /// Merges done.
    pub syncs: u64,
    /// Bytes this worker sent.
    pub bytes_sent: u64,
    /// The last epoch's metrics (identical on every worker), if an epoch ended.
    pub last_epoch: Option<EpochMetrics>,
    /// This worker's final flat parameters (weights and buffers, in visiting order).
    pub final_parameters: Vec<f32>,
}

/// Runs one worker: `comm` decides its rank among the workers. With `resume`, continues
/// from the newest checkpoint in the output folder. Rank 0 writes metrics and publishes
/// checkpoints; every worker writes its own checkpoint files.
pub fn run_worker<T: CoopTask>(
    task: &T,
    config: &LearnerConfig,
    device: &Device,
    comm: impl Communicator + 'static,
    resume: bool,
) -> Result<WorkerReport, LearnerError> {
    if let crate::spec::RuleSpec::Async(asynchronous) = &config.rule {
        return super::async_worker::run_async_worker(task, config, device, comm, asynchronous.threads(), resume);
    }
    let (rank, workers) = (comm.rank(), comm.world_size());
    let device = device.clone().autodiff();
    let Steps { per_epoch: steps_per_epoch, planned: planned_steps, total: total_steps } =
        plan_steps(task, config, workers)?;
    let checkpoints = Checkpoints::in_output(&config.output);

    let (rule, schedule) = crate::spec::build_pair(&config.rule, &config.schedule, workers)?;
    let mut model = init_seeded(task, &device, config.seed);
    let mut sync = Synchronizer::new(rule, schedule, comm)?
        .with_buffer_policy(config.buffers)
        .with_consensus_every(config.consensus_every)
        .with_seed(config.seed);
    if let Some(network) = config.network {
        sync = sync.with_simulation(network, config.step_time);
    }
    let pristine = config.optimizer.build();
    let mut optim = pristine.clone();
    let (mut step, mut elapsed_before) = (0u64, 0.0);
    if resume {
        let dir = checkpoints.latest()?.ok_or_else(|| CheckpointError::Missing(checkpoints.root().to_path_buf()))?;
        let files = Checkpoints::read_worker(&dir, rank, workers)?;
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(files.model))
            .map_err(|e| LearnerError::Record(format!("{}: {e:?}", dir.display())))?;
        model = model.load_record(record);
        let record = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(files.optimizer))
            .map_err(|e| LearnerError::Record(format!("{}: {e:?}", dir.display())))?;
        optim = optim.load_record(record);
        sync.load(files.state.sync, files.records).map_err(|error| CheckpointError::Corrupt {
            path: dir.join(format!("worker-{rank}.coop.bin")),
            cause: error.to_string(),
        })?;
        step = files.state.step;
        elapsed_before = files.state.elapsed_seconds;
    }

    let mut writer = match rank {
        0 => Some(
            MetricsWriter::create(
                &config.output,
                total_steps,
                step,
                config.progress,
                Columns { simulated: config.network.is_some(), senders: sync.event_triggered() },
            )
            .map_err(|source| LearnerError::Io { path: config.output.clone(), source })?,
        ),
        _ => None,
    };
    let started = Instant::now();
    let wall = |elapsed_before: f64| elapsed_before + started.elapsed().as_secs_f64();
    let (mut since_sync, mut since_sync_n, mut epoch_sum, mut epoch_n) = (0.0, 0u64, 0.0, 0u64);
    let mut first_bad_loss: Option<(u64, f64)> = None;
    let mut last_epoch = None;
    let mut lr;
    let mut last_checkpoint = step;

    while step < total_steps {
        let epoch = (step / steps_per_epoch) as usize;
        let index = (step % steps_per_epoch) as usize;
        lr = config.lr.at(step, steps_per_epoch, planned_steps);
        let step_started = Instant::now();
        let batch = task.train_batch(rank, workers, epoch, index, &device);
        let loss = task.loss(&model, batch);
        let loss_value = f64::from(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        step += 1;
        if !loss_value.is_finite() && first_bad_loss.is_none() {
            first_bad_loss = Some((step, loss_value));
        }
        let stepped = sync.before_step(model).and_then(|model| {
            let model = optim.step(lr, model, grads);
            let seconds = step_started.elapsed().as_secs_f64();
            sync.after_step(model, StepSignal::new(lr, loss_value).with_seconds(seconds))
        });
        let merged_now = match stepped {
            Ok((stepped_model, report)) => {
                model = stepped_model;
                report
            }
            Err(CoopError::NonFiniteParameters { rank: bad, .. }) if bad == rank && first_bad_loss.is_some() => {
                let (step, loss) = first_bad_loss.expect("checked above");
                return Err(LearnerError::NonFiniteLoss { worker: rank, step, loss });
            }
            Err(error) => return Err(error.into()),
        };
        if merged_now.is_some() && config.inner_state == InnerStatePolicy::Reset {
            optim = pristine.clone();
        }
        since_sync += loss_value;
        since_sync_n += 1;
        epoch_sum += loss_value;
        epoch_n += 1;
        if let Some(w) = &writer {
            w.step(epoch, loss_value, lr);
        }

        if let Some(report) = merged_now {
            let timing = (report.comm_wait_seconds, report.comm_inflight_seconds);
            let Gathered { losses, bytes, consensus_bytes, subgroup_bytes, wait, inflight, sim, sim_comm, trigger } =
                gather(&mut sync, since_sync / since_sync_n.max(1) as f64, timing, report.trigger)?;
            since_sync = 0.0;
            since_sync_n = 0;
            if let Some(w) = writer.as_mut() {
                let metrics = SyncMetrics {
                    epoch,
                    step,
                    syncs: report.syncs,
                    lr,
                    tau: sync.period(),
                    train_loss: losses.iter().sum::<f64>() / workers as f64,
                    worker_train_loss: losses,
                    consensus_distance: report.consensus_distance,
                    bytes_sent_per_worker: bytes,
                    consensus_bytes_sent_per_worker: consensus_bytes,
                    subgroup_bytes_sent_per_worker: subgroup_bytes,
                    comm_wait_seconds: wait,
                    comm_inflight_seconds: inflight,
                    sim_seconds: sim,
                    sim_comm_seconds: sim_comm,
                    senders: trigger.map(|(senders, _)| senders),
                    trigger_statistic: trigger.map(|(_, statistic)| statistic),
                    wall_seconds: wall(elapsed_before),
                };
                w.sync(&metrics).map_err(|source| LearnerError::Io { path: config.output.clone(), source })?;
            }
        }

        let epoch_ends = step.is_multiple_of(steps_per_epoch);
        if epoch_ends {
            let Gathered { losses, bytes, consensus_bytes, subgroup_bytes, sim, sim_comm, .. } =
                gather(&mut sync, epoch_sum / epoch_n.max(1) as f64, (0.0, 0.0), None)?;
            epoch_sum = 0.0;
            epoch_n = 0;
            let (average, evaluation) = evaluate_average(task, &model, step, sync.comm(), &device)?;
            let worker_accuracy = if config.eval_workers {
                let own = task.evaluate(&model.valid(), 0, 1, &device.clone().without_autodiff());
                let mut accuracies = vec![0.0; workers];
                accuracies[rank] = own.accuracy();
                sync.comm().all_reduce_f64(&mut accuracies).map_err(CoopError::from)?;
                Some(accuracies)
            } else {
                None
            };
            let stats = sync.stats();
            let metrics = EpochMetrics {
                epoch,
                step,
                syncs: stats.syncs,
                lr,
                tau: sync.period(),
                train_loss: losses.iter().sum::<f64>() / workers as f64,
                worker_train_loss: losses,
                test_loss: evaluation.loss(),
                test_accuracy: evaluation.accuracy(),
                worker_test_accuracy: worker_accuracy,
                consensus_distance: stats.last_consensus_distance,
                bytes_sent_per_worker: bytes,
                consensus_bytes_sent_per_worker: consensus_bytes,
                subgroup_bytes_sent_per_worker: subgroup_bytes,
                sim_seconds: sim,
                sim_comm_seconds: sim_comm,
                wall_seconds: wall(elapsed_before),
            };
            if let Some(w) = writer.as_mut() {
                w.epoch(&metrics).map_err(|source| LearnerError::Io { path: config.output.clone(), source })?;
                save_average(&average, &config.output)?;
            }
            last_epoch = Some(metrics);
        }

        let checkpoint_due = (merged_now.is_some()
            && config.checkpoint_every > 0
            && sync.stats().syncs.is_multiple_of(config.checkpoint_every))
            || epoch_ends;
        if checkpoint_due && step != last_checkpoint {
            let state = WorkerState {
                rank,
                workers,
                step,
                epochs_done: (step / steps_per_epoch) as usize,
                sync: sync.state(),
                elapsed_seconds: wall(elapsed_before),
            };
            let records = sync.records();
            let optimizer = optim.to_record();
            checkpoint(&checkpoints, &model, optimizer, &mut sync, state, records, config.keep_checkpoints)?;
            last_checkpoint = step;
            if let Some(w) = &writer {
                w.note(&format!("checkpoint at step {step} written to {}", checkpoints.root().display()));
            }
        }
    }
    if let Some(w) = &writer {
        w.finish();
    }
    let stats = sync.stats();
    let layout = ParamLayout::of(&model, BufferPolicy::Merge);
    Ok(WorkerReport {
        rank,
        steps: step,
        syncs: stats.syncs,
        bytes_sent: stats.traffic.bytes_sent,
        last_epoch,
        final_parameters: layout.flatten(&model)?,
    })
}

/// One value per worker and every worker's counters, gathered from all workers.
struct Gathered {
    losses: Vec<f64>,
    bytes: Vec<u64>,
    consensus_bytes: Vec<u64>,
    subgroup_bytes: Vec<u64>,
    wait: Vec<f64>,
    inflight: Vec<f64>,
    /// Every worker's simulated clock and its communication part, when simulating.
    sim: Option<Vec<f64>>,
    sim_comm: Option<Vec<f64>>,
    /// How many workers sent at the merge and the trigger's mean statistic, for
    /// event-triggered rules.
    trigger: Option<(u64, f64)>,
}

/// Gathers one value per worker, every worker's merge bytes sent, consensus bytes sent and
/// sub-group bytes sent, and a pair of seconds (`timing`: the last merge's wait and in-flight
/// time) and, for event-triggered rules, the trigger's decision on this worker at the merge.
fn gather(
    sync: &mut Synchronizer,
    value: f64,
    timing: (f64, f64),
    trigger: Option<Triggered>,
) -> Result<Gathered, LearnerError> {
    let (rank, workers) = (sync.rank(), sync.world_size());
    let stats = sync.stats();
    let clock = sync.sim_clock();
    let triggered = sync.event_triggered();
    let mut values = vec![0.0; (8 + 2 * usize::from(triggered)) * workers];
    if let (true, Some(trigger)) = (triggered, trigger) {
        values[8 * workers + rank] = f64::from(u8::from(trigger.sent));
        values[9 * workers + rank] = trigger.statistic;
    }
    let mine = [
        value,
        stats.traffic.bytes_sent as f64,
        stats.consensus_traffic.bytes_sent as f64,
        stats.subgroup_traffic.bytes_sent as f64,
        timing.0,
        timing.1,
        clock.map_or(0.0, |c| c.now),
        clock.map_or(0.0, |c| c.comm_seconds),
    ];
    for (k, v) in mine.into_iter().enumerate() {
        values[k * workers + rank] = v;
    }
    sync.comm().all_reduce_f64(&mut values).map_err(CoopError::from)?;
    let column = |k: usize| values[k * workers..(k + 1) * workers].to_vec();
    let whole = |k: usize| column(k).into_iter().map(|b| b as u64).collect();
    Ok(Gathered {
        losses: column(0),
        bytes: whole(1),
        consensus_bytes: whole(2),
        subgroup_bytes: whole(3),
        wait: column(4),
        inflight: column(5),
        sim: clock.map(|_| column(6)),
        sim_comm: clock.map(|_| column(7)),
        trigger: triggered
            .then(|| (column(8).iter().sum::<f64>() as u64, column(9).iter().sum::<f64>() / workers as f64)),
    })
}

/// Evaluates the workers' average model x̄ (weights and buffers averaged), each worker on its
/// share of the test set, after `step` steps. Returns x̄ (without autodiff) and the summed
/// evaluation, or an error (on every worker alike) when the test loss is not finite.
pub(super) fn evaluate_average<T: CoopTask>(
    task: &T,
    model: &T::Model,
    step: u64,
    comm: &mut dyn Communicator,
    device: &Device,
) -> Result<(T::Model, Evaluation), LearnerError> {
    let layout = ParamLayout::of(model, BufferPolicy::Merge);
    let mut mean = layout.flatten(model)?;
    comm.all_reduce_sum(&mut mean).map_err(CoopError::from)?;
    divide(&mut mean, comm.world_size());
    // `valid` gives a copy with its own BatchNorm state, so the worker's model is untouched.
    let average = layout.unflatten(model.valid(), &mean)?;
    let (rank, workers) = (comm.rank(), comm.world_size());
    let part = task.evaluate(&average, rank, workers, &device.clone().without_autodiff());
    let mut totals = [part.loss_sum, part.correct as f64, part.count as f64];
    comm.all_reduce_f64(&mut totals).map_err(CoopError::from)?;
    let evaluation = Evaluation { loss_sum: totals[0], correct: totals[1] as u64, count: totals[2] as u64 };
    if !evaluation.loss().is_finite() {
        let non_finite = mean.iter().filter(|v| !v.is_finite()).count();
        let hint = if non_finite == 0 {
            " (all finite: look at the buffers, e.g. a BatchNorm running variance below zero)"
        } else {
            ""
        };
        return Err(LearnerError::NonFiniteTestLoss {
            step,
            loss: evaluation.loss(),
            non_finite,
            values: mean.len(),
            hint,
        });
    }
    Ok((average, evaluation))
}

/// Writes the average model to `<output>/model-average.bpk` through a temporary file.
pub(super) fn save_average<M: Module>(model: &M, output: &Path) -> Result<(), LearnerError> {
    let bytes = model.clone().into_record().into_bytes().map_err(|e| LearnerError::Record(format!("{e:?}")))?;
    let path = output.join("model-average.bpk");
    let temporary = output.join("model-average.bpk.tmp");
    std::fs::write(&temporary, &*bytes).map_err(|source| LearnerError::Io { path: temporary.clone(), source })?;
    std::fs::rename(&temporary, &path).map_err(|source| LearnerError::Io { path, source })
}

/// Every worker writes its files; after a barrier rank 0 publishes the checkpoint; a second
/// barrier keeps anyone from starting the next one before it is published.
fn checkpoint<M: Module>(
    checkpoints: &Checkpoints,
    model: &M,
    optimizer: OptimizerRecord,
    sync: &mut Synchronizer,
    state: WorkerState,
    records: StateFile,
    keep: usize,
) -> Result<(), LearnerError> {
    let step = state.step;
    let record = |e| LearnerError::Record(format!("{e:?}"));
    crate::params::flush_buffers(model);
    let files = WorkerFiles {
        model: model.clone().into_record().into_bytes().map_err(record)?.to_vec(),
        optimizer: optimizer.into_bytes().map_err(record)?.to_vec(),
        state,
        records,
    };
    checkpoints.write_worker(step, &files)?;
    sync.comm().barrier().map_err(CoopError::from)?;
    if sync.rank() == 0 {
        checkpoints.commit(step, keep)?;
    }
    sync.comm().barrier().map_err(CoopError::from)?;
    Ok(())
}

/// A run's step counts.
pub(super) struct Steps {
    /// Steps per epoch (the smallest shard's batches, so every worker takes as many).
    pub per_epoch: u64,
    /// Steps of all the epochs.
    pub planned: u64,
    /// Steps this run takes (`max_steps` may stop it earlier).
    pub total: u64,
}

/// Checks the number of workers against the configuration and plans the steps.
pub(super) fn plan_steps<T: CoopTask>(task: &T, config: &LearnerConfig, workers: usize) -> Result<Steps, LearnerError> {
    if workers != config.workers {
        return Err(LearnerError::Config(format!(
            "the configuration asks for {} workers but the communicator has {workers}",
            config.workers
        )));
    }
    let per_epoch = (0..workers).map(|w| task.batches_per_epoch(w, workers)).min().unwrap_or(0) as u64;
    if per_epoch == 0 {
        return Err(LearnerError::Config(
            "a worker has no training batch: its data shard is smaller than a batch".into(),
        ));
    }
    let planned = per_epoch * config.epochs as u64;
    Ok(Steps { per_epoch, planned, total: config.max_steps.map_or(planned, |max| max.min(planned)) })
}

/// Seeding and initializing happen under one process-wide lock: workers on threads share the
/// device's random generator, and the model must not depend on how their threads interleave.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A model initialized from `seed`: the same seed gives the same weights in every run.
pub(super) fn init_seeded<T: CoopTask>(task: &T, device: &Device, seed: u64) -> T::Model {
    let _guard = INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    device.seed(seed);
    let model = task.init_model(device);
    // Parameters are initialized lazily: touch them all while the lock is held.
    crate::params::flush_buffers(&model);
    let _ = ParamLayout::of(&model, BufferPolicy::Merge);
    model
}
