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
use super::checkpoint::{CheckpointError, Checkpoints, WorkerFiles, WorkerState, merging_of};
use super::config::LearnerConfig;
use super::fault::{FaultKind, InjectedFault};
use super::metrics::{Columns, EpochMetrics, MetricsWriter, RunPoint, SyncMetrics};
use super::shared::{WallClock, WorkerPlan, WorkerReport, evaluate_average, init_seeded, plan_steps, save_average};
use super::task::CoopTask;
use crate::comm::Communicator;
use crate::error::CoopError;
use crate::local_sgd::{LocalSgd, LocalSgdState};
use crate::params::{BufferPolicy, ParamLayout};
use crate::sync::{StepSignal, SyncReport, Synchronizer, spread_by_worker, worker_column};

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
    super::fault::check_faults(&config.faults, comm.world_size(), config.peer_timeout).map_err(LearnerError::Config)?;
    if let crate::rules::RuleSpec::Async(asynchronous) = &config.rule {
        if let Some(fault) = config.faults.first() {
            let reason = format!(
                "the fault {fault} cannot be injected with asynchronous local SGD (its steps run on several threads per worker)"
            );
            return Err(LearnerError::Config(reason));
        }
        return super::async_worker::run_async_worker(task, config, device, comm, asynchronous.threads(), resume);
    }
    let (rank, workers) = (comm.rank(), comm.world_size());
    let device = device.clone().autodiff();
    let steps = plan_steps(task, config, workers)?;
    if let Some(fault) = config.faults.iter().find(|f| f.step > steps.total) {
        let reason = format!("the fault {fault} comes after the run's last step, {}", steps.total);
        return Err(LearnerError::Config(reason));
    }
    let checkpoints = Checkpoints::in_output(&config.output);

    let (rule, schedule) = crate::registry::build_pair(&config.rule, &config.schedule, workers)?;
    let mut model = init_seeded(task, &device, config.seed);
    let mut sync = Synchronizer::new(rule, schedule, comm)?
        .with_buffer_policy(config.buffers)
        .with_consensus_every(config.consensus_every)
        .with_bucket_size(config.bucket_bytes)
        .with_seed(config.seed)
        .with_worker_columns();
    if let Some(network) = config.network {
        sync = sync.with_simulation(network, config.step_time);
    }
    // The engine: the inner optimizer and the synchronizer, with one set of counters (its step
    // count is the run's) and the inner-state policy applied at merges.
    let mut optim = LocalSgd::with_synchronizer(config.optimizer.build(), sync).with_inner_state(config.inner_state);
    let mut elapsed_before = 0.0;
    if resume {
        let dir = checkpoints.latest()?.ok_or_else(|| CheckpointError::Missing(checkpoints.root().to_path_buf()))?;
        let files = Checkpoints::read_worker(&dir, rank, workers, &merging_of(config))?;
        elapsed_before = files.state.elapsed_seconds;
        model = restore(model, &mut optim, files, &dir, rank)?;
    }

    let mut writer = match rank {
        0 => Some(
            MetricsWriter::create(
                &config.output,
                steps.total,
                optim.stats().steps,
                config.progress,
                Columns { simulated: config.network.is_some(), senders: optim.synchronizer().event_triggered() },
            )
            .map_err(|source| LearnerError::Io { path: config.output.clone(), source })?,
        ),
        _ => None,
    };
    let clock = WallClock { started: Instant::now(), before: elapsed_before };
    let mut run = StepRun {
        plan: WorkerPlan { task, config, device: &device, rank, workers, steps },
        clock,
        epoch_loss: (0.0, 0),
        bad_loss: None,
    };
    let mut last_epoch = None;
    let mut last_checkpoint = optim.stats().steps;
    while optim.stats().steps < steps.total {
        let epoch = (optim.stats().steps / steps.per_epoch) as usize;
        let (trained, epoch_loss) = run.train_epoch(epoch, model, &mut optim, writer.as_mut())?;
        model = trained;
        let step = optim.stats().steps;
        let epoch_ends = step.is_multiple_of(steps.per_epoch);
        if let Some(epoch_loss) = epoch_loss.filter(|_| epoch_ends) {
            last_epoch = Some(run.end_epoch(epoch, epoch_loss, &model, &mut optim, writer.as_mut())?);
        }
        if step != last_checkpoint && (epoch_ends || run.checkpoint_due(&optim)) {
            let state = WorkerState {
                rank,
                workers,
                step,
                epochs_done: (step / steps.per_epoch) as usize,
                sync: optim.synchronizer().state(),
                elapsed_seconds: clock.now(),
                merging: Some(merging_of(config)),
            };
            checkpoint(&checkpoints, &model, &mut optim, state, config.keep_checkpoints)?;
            last_checkpoint = step;
            if let Some(w) = &writer {
                w.note(&format!("checkpoint at step {step} written to {}", checkpoints.root().display()));
            }
        }
    }
    if let Some(w) = &writer {
        w.finish();
    }
    let stats = optim.stats();
    let layout = ParamLayout::of(&model, BufferPolicy::Merge);
    Ok(WorkerReport {
        rank,
        steps: stats.steps,
        syncs: stats.syncs,
        bytes_sent: stats.traffic.bytes_sent,
        last_epoch,
        final_parameters: layout.flatten(&model)?,
    })
}

/// Restores a worker's model, optimizer and synchronizer from a checkpoint's files.
fn restore<M: Module>(
    model: M,
    optim: &mut LocalSgd,
    files: WorkerFiles,
    dir: &Path,
    rank: usize,
) -> Result<M, LearnerError> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(files.model))
        .map_err(|e| LearnerError::Record(format!("{}: {e:?}", dir.display())))?;
    let model = model.load_record(record);
    let record = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(files.optimizer))
        .map_err(|e| LearnerError::Record(format!("{}: {e:?}", dir.display())))?;
    optim.load_record(record);
    optim.load_state(LocalSgdState { sync: files.state.sync, records: files.records }).map_err(|error| {
        CheckpointError::Corrupt { path: dir.join(format!("worker-{rank}.coop.bin")), cause: error.to_string() }
    })?;
    Ok(model)
}

/// One worker's run of local steps: what every epoch of it needs.
struct StepRun<'a, T: CoopTask> {
    plan: WorkerPlan<'a, T>,
    clock: WallClock,
    /// This worker's losses over the epoch so far: their sum and number.
    epoch_loss: (f64, u64),
    /// The first non-finite loss (its step and value), which names the cause when the
    /// parameters then turn non-finite.
    bad_loss: Option<(u64, f64)>,
}

impl<T: CoopTask> StepRun<'_, T> {
    /// The steps of `epoch` (to its end, or to the run's last step), with the merges the
    /// schedule picks, each recorded in `syncs.csv`. Returns the model and, when the epoch
    /// ended, this worker's mean loss over it.
    fn train_epoch(
        &mut self,
        epoch: usize,
        mut model: T::Model,
        optim: &mut LocalSgd,
        mut writer: Option<&mut MetricsWriter>,
    ) -> Result<(T::Model, Option<f64>), LearnerError> {
        let (config, steps) = (self.plan.config, self.plan.steps);
        loop {
            let step = optim.stats().steps;
            let index = (step % steps.per_epoch) as usize;
            let lr = config.lr.at(step, steps.per_epoch, steps.planned);
            let started = Instant::now();
            let batch = self.plan.task.train_batch(self.plan.rank, self.plan.workers, epoch, index, self.plan.device);
            let loss = self.plan.task.loss(&model, batch);
            let loss_value = f64::from(loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            if !loss_value.is_finite() && self.bad_loss.is_none() {
                self.bad_loss = Some((step + 1, loss_value));
            }
            let signal = StepSignal::new(lr, loss_value).timed_from(started);
            let report = match optim.step_with(signal, model, grads) {
                Ok((stepped, report)) => {
                    model = stepped;
                    report
                }
                Err(CoopError::NonFiniteParameters { rank: bad, .. })
                    if bad == self.plan.rank && self.bad_loss.is_some() =>
                {
                    let (step, loss) = self.bad_loss.expect("checked above");
                    return Err(LearnerError::NonFiniteLoss { worker: self.plan.rank, step, loss });
                }
                Err(error) => return Err(error.into()),
            };
            self.epoch_loss.0 += loss_value;
            self.epoch_loss.1 += 1;
            if let Some(w) = writer.as_deref() {
                w.step(epoch, loss_value, lr);
            }
            let step = optim.stats().steps;
            if let Some(fault) = config.faults.iter().find(|f| f.rank == self.plan.rank && f.step == step) {
                model = inject(*fault, model, config.peer_timeout)?;
            }
            if let (Some(report), Some(w)) = (report, writer.as_deref_mut()) {
                let metrics = sync_metrics(epoch, lr, optim.period(), &report, self.clock.now());
                w.sync(&metrics).map_err(|source| LearnerError::Io { path: config.output.clone(), source })?;
            }
            if step.is_multiple_of(steps.per_epoch) {
                let (sum, count) = std::mem::take(&mut self.epoch_loss);
                return Ok((model, Some(sum / count.max(1) as f64)));
            }
            if step >= steps.total || self.checkpoint_due(optim) {
                return Ok((model, None));
            }
        }
    }

    /// Whether a merge just ran that `checkpoint_every` asks a checkpoint after.
    fn checkpoint_due(&self, optim: &LocalSgd) -> bool {
        let stats = optim.stats();
        self.plan.config.checkpoint_every > 0
            && optim.last_sync().is_some_and(|report| report.step == stats.steps)
            && stats.syncs.is_multiple_of(self.plan.config.checkpoint_every)
    }

    /// The end of an epoch: every worker's loss and counters, the average model evaluated (and
    /// each worker's own, when asked), `epochs.csv`, the average model saved.
    fn end_epoch(
        &mut self,
        epoch: usize,
        epoch_loss: f64,
        model: &T::Model,
        optim: &mut LocalSgd,
        writer: Option<&mut MetricsWriter>,
    ) -> Result<EpochMetrics, LearnerError> {
        let (config, workers, step) = (self.plan.config, self.plan.workers, optim.stats().steps);
        let sync = optim.synchronizer();
        // Right after a merge that left every worker with the same model (weights and buffers),
        // that model is the average: nothing to all-reduce.
        let agreed = sync.workers_agree();
        let Gathered { losses, bytes, consensus_bytes, subgroup_bytes, sim, sim_comm } = gather(sync, epoch_loss)?;
        let (average, evaluation) =
            evaluate_average(self.plan.task, model, step, sync.comm(), self.plan.device, agreed)?;
        let worker_accuracy = if config.eval_workers {
            let own = self.plan.task.evaluate(&model.valid(), 0, 1, &self.plan.device.clone().without_autodiff());
            let mut accuracies = vec![0.0; workers];
            accuracies[self.plan.rank] = own.accuracy();
            sync.comm().all_reduce_f64(&mut accuracies).map_err(CoopError::from)?;
            Some(accuracies)
        } else {
            None
        };
        let stats = sync.stats();
        let metrics = EpochMetrics {
            at: RunPoint {
                epoch,
                step,
                syncs: stats.syncs,
                lr: self.plan.lr_at(step - 1),
                tau: sync.period(),
                train_loss: losses.iter().sum::<f64>() / workers as f64,
                worker_train_loss: losses,
                consensus_distance: stats.last_consensus_distance,
                bytes_sent_per_worker: bytes,
                consensus_bytes_sent_per_worker: consensus_bytes,
                subgroup_bytes_sent_per_worker: subgroup_bytes,
                sim_seconds: sim,
                sim_comm_seconds: sim_comm,
                wall_seconds: self.clock.now(),
            },
            test_loss: evaluation.loss(),
            test_accuracy: evaluation.accuracy(),
            worker_test_accuracy: worker_accuracy,
        };
        if let Some(w) = writer {
            w.epoch(&metrics).map_err(|source| LearnerError::Io { path: config.output.clone(), source })?;
            save_average(&average, &config.output)?;
        }
        Ok(metrics)
    }
}

/// A merge's row of `syncs.csv`, from its report's columns (every worker's).
fn sync_metrics(epoch: usize, lr: f64, tau: u64, report: &SyncReport, wall_seconds: f64) -> SyncMetrics {
    let columns = report.workers.clone().unwrap_or_default();
    let workers = columns.losses.len().max(1);
    SyncMetrics {
        at: RunPoint {
            epoch,
            step: report.step,
            syncs: report.syncs,
            lr,
            tau,
            train_loss: columns.losses.iter().sum::<f64>() / workers as f64,
            worker_train_loss: columns.losses,
            consensus_distance: report.consensus_distance,
            bytes_sent_per_worker: columns.bytes_sent,
            consensus_bytes_sent_per_worker: columns.consensus_bytes_sent,
            subgroup_bytes_sent_per_worker: columns.subgroup_bytes_sent,
            sim_seconds: columns.sim_seconds,
            sim_comm_seconds: columns.sim_comm_seconds,
            wall_seconds,
        },
        comm_wait_seconds: columns.wait_seconds,
        comm_inflight_seconds: columns.inflight_seconds,
        senders: columns.trigger.map(|(senders, _)| senders),
        trigger_statistic: columns.trigger.map(|(_, statistic)| statistic),
    }
}

/// One value per worker and every worker's counters, gathered from all workers at an epoch's end.
struct Gathered {
    losses: Vec<f64>,
    bytes: Vec<u64>,
    consensus_bytes: Vec<u64>,
    subgroup_bytes: Vec<u64>,
    /// Every worker's simulated clock and its communication part, when simulating.
    sim: Option<Vec<f64>>,
    sim_comm: Option<Vec<f64>>,
}

/// Gathers one value per worker (its epoch's loss), every worker's merge bytes sent, consensus
/// bytes sent and sub-group bytes sent, and its simulated clock.
fn gather(sync: &mut Synchronizer, value: f64) -> Result<Gathered, LearnerError> {
    let (rank, workers) = (sync.rank(), sync.world_size());
    let stats = sync.stats();
    let clock = sync.sim_clock();
    let mine = [
        value,
        stats.traffic.bytes_sent as f64,
        stats.consensus_traffic.bytes_sent as f64,
        stats.subgroup_traffic.bytes_sent as f64,
        clock.map_or(0.0, |c| c.now),
        clock.map_or(0.0, |c| c.comm_seconds),
    ];
    let mut values = spread_by_worker(&mine, rank, workers);
    sync.comm().all_reduce_f64(&mut values).map_err(CoopError::from)?;
    let column = |k: usize| worker_column(&values, k, workers);
    let whole = |k: usize| column(k).into_iter().map(|b| b as u64).collect();
    Ok(Gathered {
        losses: column(0),
        bytes: whole(1),
        consensus_bytes: whole(2),
        subgroup_bytes: whole(3),
        sim: clock.map(|_| column(4)),
        sim_comm: clock.map(|_| column(5)),
    })
}

/// Every worker writes its files; after a barrier rank 0 publishes the checkpoint; a second
/// barrier keeps anyone from starting the next one before it is published.
fn checkpoint<M: Module>(
    checkpoints: &Checkpoints,
    model: &M,
    optim: &mut LocalSgd,
    state: WorkerState,
    keep: usize,
) -> Result<(), LearnerError> {
    let step = state.step;
    let record = |e| LearnerError::Record(format!("{e:?}"));
    crate::params::flush_buffers(model);
    let files = WorkerFiles {
        model: model.clone().into_record().into_bytes().map_err(record)?.to_vec(),
        optimizer: optim.to_record().into_bytes().map_err(record)?.to_vec(),
        state,
        records: optim.synchronizer().records(),
    };
    checkpoints.write_worker(step, &files)?;
    optim.comm().barrier().map_err(CoopError::from)?;
    if optim.rank() == 0 {
        checkpoints.commit(step, keep)?;
    }
    optim.comm().barrier().map_err(CoopError::from)?;
    Ok(())
}

/// Makes this worker fail as `fault` says (see [`InjectedFault`]): panics, returns the model
/// with every value NaN, or returns the error that ends the worker (at once, or after three
/// peer timeouts for a hang, by when the others have given up on it).
fn inject<M: Module>(fault: InjectedFault, model: M, peer_timeout: Option<f64>) -> Result<M, LearnerError> {
    let failed = LearnerError::InjectedFault { worker: fault.rank, step: fault.step, kind: fault.kind.name() };
    match fault.kind {
        FaultKind::Panic => panic!("injected fault {fault}: worker {} panics after step {}", fault.rank, fault.step),
        FaultKind::Nan => {
            let layout = ParamLayout::of(&model, BufferPolicy::Merge);
            Ok(layout.unflatten(model, &vec![f32::NAN; layout.len()])?)
        }
        FaultKind::Hang => {
            std::thread::sleep(std::time::Duration::from_secs_f64(3.0 * peer_timeout.unwrap_or(0.0)));
            Err(failed)
        }
        FaultKind::Exit => Err(failed),
    }
}
