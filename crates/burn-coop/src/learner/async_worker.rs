//! The worker loop of asynchronous local SGD (`--rule async`; see
//! [`crate::rules::async_local_sgd`]).
//!
//! Within an epoch, `--local-threads` threads take the worker's batches in turn (the next index
//! from a shared counter), each with its own module and optimizer, and update the worker's
//! [`SharedParams`] without locks; the worker's own thread is the communication thread: every τ
//! completed steps it snapshots the shared buffer, all-reduces the snapshot with the other
//! workers (blocking only itself) and applies the average in place, then gathers the losses for
//! `syncs.csv`. Every worker runs the same number of merges per epoch (one per τ of its steps),
//! so the collectives stay in lockstep. At the end of an epoch the local threads join, and the
//! shared model is evaluated (the average over workers, as for every rule). The local threads
//! race by design, so async runs are not reproducible bit for bit and take no checkpoints.
//!
//! With a simulated network (`--network`) each worker keeps two timelines. Its compute clock:
//! the local threads share the worker's device, so every completed step advances it by the step
//! time, whichever thread took it (`--step-time measured`: by the real time since the previous
//! completion; stragglers per step as for every rule). Its communication thread's clock: a merge
//! snapshots the model when the compute clock reaches its step, or later if the previous
//! all-reduce is still travelling (one collective at a time), and the α–β all-reduce starts when
//! the last worker's snapshot arrives. The local steps never wait for a merge; only the end of an
//! epoch does (the threads join and the last merge must have landed), and that wait is the
//! worker's communication time (`sim_comm_seconds`). A merge's `sim_seconds` is when its average
//! was applied (the end of its all-reduce); an epoch's is when the worker's next epoch starts.
//! The training itself runs on this machine's timing: when the simulated all-reduces queue
//! behind each other, the real snapshots are fresher than on that network, so the clock tells
//! when the merges would land, not how much staler they would be.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::Device;

use super::LearnerError;
use super::config::LearnerConfig;
use super::metrics::{Columns, EpochMetrics, MetricsWriter, RunPoint, SyncMetrics};
use super::shared::{WallClock, WorkerPlan, WorkerReport, evaluate_average, init_seeded, plan_steps, save_average};
use super::task::CoopTask;
use crate::comm::{Communicator, Metered, SimClock};
use crate::error::CoopError;
use crate::params::ParamLayout;
use crate::rules::apply_average_in_place;
use crate::schedule::ScheduleSpec;
use crate::schedule::SyncSchedule;
use crate::schedule::fixed::PeriodicSchedule;
use crate::shared_params::SharedParams;
use crate::sync::{spread_by_worker, worker_column};

/// What the local threads report to the communication thread.
#[derive(Debug, Default)]
struct Progress {
    /// Steps completed this epoch.
    done: usize,
    /// Losses since the last merge.
    loss_sum: f64,
    loss_count: u64,
    /// Losses this epoch.
    epoch_sum: f64,
    epoch_count: u64,
    /// The first failure of a local thread.
    failure: Option<LearnerError>,
    /// When simulating: the compute clock's seconds since the epoch started, after each step
    /// completed this epoch (in completion order).
    compute: Vec<f64>,
    /// When the last step completed (a measured step lasts from the previous completion).
    last_completion: Option<Instant>,
}

/// Runs one worker of asynchronous local SGD with `threads` local threads.
pub(super) fn run_async_worker<T: CoopTask>(
    task: &T,
    config: &LearnerConfig,
    device: &Device,
    comm: impl Communicator + 'static,
    threads: usize,
    resume: bool,
) -> Result<WorkerReport, LearnerError> {
    if resume {
        return Err(LearnerError::Config(
            "asynchronous local SGD takes no checkpoints (its local threads race by design, so no run could continue bit for bit): start it again instead of resuming".into(),
        ));
    }
    let schedule = match config.rule.with_default_period(&config.schedule) {
        ScheduleSpec::Fixed(fixed) => PeriodicSchedule::every(fixed.tau())
            .map_err(|error| LearnerError::Config(error.to_string()))?
            .with_warmup(fixed.warmup_steps()),
        _ => {
            return Err(LearnerError::Config(
                "asynchronous local SGD averages every τ steps of a worker (after any warm-up steps, every step): use the fixed schedule".into(),
            ));
        }
    };
    let (rank, workers) = (comm.rank(), comm.world_size());
    let device = device.clone().autodiff();
    let steps = plan_steps(task, config, workers)?;

    let mut comm: Metered<Box<dyn Communicator>> = Metered::new(Box::new(comm));
    if let Some(network) = config.network {
        comm.simulate(network, SimClock::default());
    }
    let mut locals: Vec<T::Model> = (0..threads).map(|_| init_seeded(task, &device, config.seed)).collect();
    // One layout per local model: a layout knows its module's tensors by id. Every layout
    // visits the same parameters in the same order, so the flat buffers line up.
    let layouts: Vec<ParamLayout> = locals.iter().map(|m| ParamLayout::of(m, config.buffers)).collect();
    let mut flat = layouts[0].flatten(&locals[0])?;
    if workers > 1 {
        comm.broadcast(&mut flat, 0).map_err(CoopError::from)?;
    }
    let shared = SharedParams::new(&flat);
    let mut optimizers: Vec<_> = (0..threads).map(|_| config.optimizer.build()).collect();
    let writer = match rank {
        0 => Some(
            MetricsWriter::create(
                &config.output,
                steps.total,
                0,
                config.progress,
                Columns { simulated: config.network.is_some(), ..Columns::default() },
            )
            .map_err(|source| LearnerError::Io { path: config.output.clone(), source })?,
        ),
        _ => None,
    };
    let epoch_base = clock_now(&comm);
    let mut run = AsyncRun {
        local: LocalSteps { plan: WorkerPlan { task, config, device: &device, rank, workers, steps }, shared: &shared },
        schedule,
        last_merge: 0,
        layouts: &layouts,
        comm,
        writer,
        clock: WallClock { started: Instant::now(), before: 0.0 },
        syncs: 0,
        last_distance: None,
        epoch_base,
        waited: 0.0,
    };
    let (mut step, mut last_epoch) = (0u64, None);
    while step < steps.total {
        let epoch = (step / steps.per_epoch) as usize;
        let epoch_steps = (steps.total - step).min(steps.per_epoch) as usize;
        let progress = run.train_epoch(epoch, step, epoch_steps, &mut locals, &mut optimizers)?;
        step += epoch_steps as u64;
        last_epoch = Some(run.end_epoch(epoch, step, &progress, &locals[0])?);
    }
    if let Some(w) = &run.writer {
        w.finish();
    }
    Ok(WorkerReport {
        rank,
        steps: step,
        syncs: run.syncs,
        bytes_sent: run.comm.traffic().total().bytes_sent,
        last_epoch,
        final_parameters: shared.to_vec(),
    })
}

/// The simulated clock's time (0 when not simulating).
fn clock_now(comm: &Metered<Box<dyn Communicator>>) -> f64 {
    comm.clock().map_or(0.0, |c| c.now)
}

/// What the local threads share (read only).
struct LocalSteps<'a, T: CoopTask> {
    plan: WorkerPlan<'a, T>,
    shared: &'a SharedParams,
}

impl<T: CoopTask> Clone for LocalSteps<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: CoopTask> Copy for LocalSteps<'_, T> {}

/// One worker of asynchronous local SGD: what its epochs share.
struct AsyncRun<'a, T: CoopTask> {
    local: LocalSteps<'a, T>,
    /// Every τ steps of the worker, every step during the warm-up.
    schedule: PeriodicSchedule,
    /// The step of the last merge.
    last_merge: u64,
    layouts: &'a [ParamLayout],
    comm: Metered<Box<dyn Communicator>>,
    writer: Option<MetricsWriter>,
    clock: WallClock,
    syncs: u64,
    last_distance: Option<f64>,
    /// The simulated clock: where this epoch's steps start, and how long the worker has waited
    /// for merges at the ends of epochs.
    epoch_base: f64,
    waited: f64,
}

/// An epoch's shared counters between the local threads and the communication thread.
struct EpochSync {
    next: AtomicUsize,
    stop: AtomicBool,
    progress: (Mutex<Progress>, Condvar),
    began: Instant,
}

impl<T: CoopTask> LocalSteps<'_, T> {
    /// A local thread: takes the epoch's next batch until none is left (or a failure stops
    /// every thread), adding each step's change to the shared buffer.
    #[allow(clippy::too_many_arguments)]
    fn local_thread(
        &self,
        epoch: usize,
        epoch_start: u64,
        epoch_steps: usize,
        state: &EpochSync,
        mut model: T::Model,
        mut optim: burn::optim::ModuleOptimizer,
        layout: &ParamLayout,
    ) -> (T::Model, burn::optim::ModuleOptimizer) {
        let (mut read, mut after) = (Vec::new(), Vec::new());
        loop {
            let index = state.next.fetch_add(1, Ordering::SeqCst);
            if index >= epoch_steps || state.stop.load(Ordering::SeqCst) {
                break;
            }
            // A panic inside a step (the task's code) becomes this worker's failure, so the
            // communication thread is told instead of waiting for a step that will never come.
            let step = std::panic::AssertUnwindSafe(|| -> Result<f64, LearnerError> {
                self.shared.read_into(&mut read);
                let current = layout.unflatten(model.clone(), &read)?;
                let batch =
                    self.plan.task.train_batch(self.plan.rank, self.plan.workers, epoch, index, self.plan.device);
                let loss = self.plan.task.loss(&current, batch);
                let value = f64::from(loss.clone().into_scalar::<f32>());
                if !value.is_finite() {
                    let at = epoch_start + index as u64 + 1;
                    return Err(LearnerError::NonFiniteLoss { worker: self.plan.rank, step: at, loss: value });
                }
                let grads = GradientsParams::from_grads(loss.backward(), &current);
                model = optim.step(self.plan.lr_at(epoch_start + index as u64), current, grads);
                layout.flatten_into(&model, &mut after)?;
                after.iter_mut().zip(&read).for_each(|(a, r)| *a -= r);
                self.shared.add(&after);
                Ok(value)
            });
            let result = std::panic::catch_unwind(step).unwrap_or_else(|panic| {
                let message = crate::launch::panic_message(panic.as_ref());
                Err(LearnerError::WorkerPanicked { worker: self.plan.rank, message })
            });
            self.record_step(epoch_start, state, result);
        }
        (model, optim)
    }

    /// Records a completed step (its loss and, when simulating, the compute clock) or the
    /// thread's failure, and wakes the communication thread.
    fn record_step(&self, epoch_start: u64, state: &EpochSync, result: Result<f64, LearnerError>) {
        let (lock, ready) = &state.progress;
        let mut p = lock.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(value) => {
                p.done += 1;
                if self.plan.config.network.is_some() {
                    let now = Instant::now();
                    let measured = now.duration_since(p.last_completion.unwrap_or(state.began)).as_secs_f64();
                    p.last_completion = Some(now);
                    let at = epoch_start + p.done as u64;
                    let seconds =
                        self.plan.config.step_time.seconds(measured, self.plan.config.seed, self.plan.rank, at);
                    let total = p.compute.last().copied().unwrap_or(0.0) + seconds;
                    p.compute.push(total);
                }
                p.loss_sum += value;
                p.loss_count += 1;
                p.epoch_sum += value;
                p.epoch_count += 1;
            }
            Err(error) => {
                p.failure.get_or_insert(error);
                state.stop.store(true, Ordering::SeqCst);
            }
        }
        ready.notify_all();
    }
}

impl<T: CoopTask> AsyncRun<'_, T> {
    fn lr_at(&self, step: u64) -> f64 {
        self.local.plan.lr_at(step)
    }

    /// One epoch: the local threads take its steps while this thread merges every τ of them.
    /// Returns the epoch's progress once every thread has joined.
    fn train_epoch(
        &mut self,
        epoch: usize,
        epoch_start: u64,
        epoch_steps: usize,
        locals: &mut Vec<T::Model>,
        optimizers: &mut Vec<burn::optim::ModuleOptimizer>,
    ) -> Result<Progress, LearnerError> {
        let shared_state = EpochSync {
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            progress: (Mutex::new(Progress::default()), Condvar::new()),
            began: Instant::now(),
        };
        let local = self.local;
        let layouts = self.layouts;
        let outcome = std::thread::scope(|scope| -> Result<(), LearnerError> {
            let handles: Vec<_> = locals
                .drain(..)
                .zip(optimizers.drain(..))
                .zip(layouts)
                .map(|((model, optim), layout)| {
                    let (state, local) = (&shared_state, &local);
                    scope
                        .spawn(move || local.local_thread(epoch, epoch_start, epoch_steps, state, model, optim, layout))
                })
                .collect();
            let mut result = self.merges(epoch, epoch_start, epoch_steps, &shared_state);
            for handle in handles {
                match handle.join() {
                    Ok((model, optim)) => {
                        locals.push(model);
                        optimizers.push(optim);
                    }
                    Err(_) => result = result.and(Err(LearnerError::Config("a local thread panicked".into()))),
                }
            }
            result
        });
        let mut progress = shared_state.progress.0.into_inner().unwrap_or_else(PoisonError::into_inner);
        if let Some(error) = progress.failure.take() {
            return Err(error);
        }
        outcome?;
        if self.local.plan.config.network.is_some() {
            // The threads join: the next epoch starts once both the steps and the last merge
            // are done; waiting for the merge is communication time.
            let computed = self.epoch_base + progress.compute.last().copied().unwrap_or(0.0);
            let landed = clock_now(&self.comm);
            self.waited += (landed - computed).max(0.0);
            self.epoch_base = computed.max(landed);
            self.comm.restore_clock(SimClock { now: self.epoch_base, comm_seconds: self.waited });
        }
        Ok(progress)
    }

    /// The communication thread: a merge every τ completed steps of this worker.
    fn merges(
        &mut self,
        epoch: usize,
        epoch_start: u64,
        epoch_steps: usize,
        state: &EpochSync,
    ) -> Result<(), LearnerError> {
        let last = epoch_start + epoch_steps as u64;
        let merges: Vec<u64> = (epoch_start + 1..=last).filter(|&s| self.schedule.syncs_at(s)).collect();
        for merge_step in merges {
            let (lock, ready) = &state.progress;
            let (loss, failed, computed) = {
                let mut p = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let due = (merge_step - epoch_start) as usize;
                while p.done < due && p.failure.is_none() {
                    p = ready.wait(p).unwrap_or_else(PoisonError::into_inner);
                }
                let loss = p.loss_sum / p.loss_count.max(1) as f64;
                p.loss_sum = 0.0;
                p.loss_count = 0;
                (loss, p.failure.is_some(), p.compute.get(due - 1).copied())
            };
            // A failed worker still takes part in the collectives, flagging its failure, so the
            // others learn of it instead of waiting.
            if let Err(error) = self.merge(epoch, merge_step, loss, failed, computed) {
                state.stop.store(true, Ordering::SeqCst);
                return Err(error);
            }
            if failed {
                break;
            }
        }
        Ok(())
    }

    /// One merge: the snapshot all-reduced, its average applied in place, every worker's
    /// statistics (and failure flag) in one collective, the row of `syncs.csv`.
    fn merge(
        &mut self,
        epoch: usize,
        merge_step: u64,
        loss: f64,
        failed: bool,
        computed: Option<f64>,
    ) -> Result<(), LearnerError> {
        let (rank, workers) = (self.local.plan.rank, self.local.plan.workers);
        // The snapshot leaves when the compute clock reaches the merge's step, or when the
        // previous all-reduce has landed, whichever is later.
        if let Some(computed) = computed {
            let ready = self.epoch_base + computed;
            let now = clock_now(&self.comm);
            if ready > now {
                self.comm.local_step(ready - now);
            }
        }
        let snapshot = self.local.shared.to_vec();
        let flight = Instant::now();
        let mut sum = snapshot.clone();
        self.comm.all_reduce_sum(&mut sum).map_err(CoopError::from)?;
        let inflight = flight.elapsed().as_secs_f64();
        let distance = apply_average_in_place(self.local.shared, &snapshot, sum, workers);
        self.syncs += 1;
        let mine = [
            loss,
            self.comm.traffic().total().bytes_sent as f64,
            inflight,
            distance,
            f64::from(u8::from(failed)),
            clock_now(&self.comm),
            self.waited,
        ];
        let mut values = spread_by_worker(&mine, rank, workers);
        self.comm.inner_mut().all_reduce_f64(&mut values).map_err(CoopError::from)?;
        if let Some(worker) = values[4 * workers..5 * workers].iter().position(|&f| f > 0.0)
            && !failed
        {
            return Err(LearnerError::PeerFailed { worker });
        }
        let column = |k: usize| worker_column(&values, k, workers);
        let losses = column(0);
        let consensus = column(3).iter().sum::<f64>() / workers as f64;
        self.last_distance = Some(consensus);
        let simulating = self.local.plan.config.network.is_some();
        let lr = self.lr_at(merge_step - 1);
        let (tau, syncs, wall) = (self.schedule.period(merge_step - 1), self.syncs, self.clock.now());
        let steps = merge_step - std::mem::replace(&mut self.last_merge, merge_step);
        if let Some(w) = self.writer.as_mut() {
            for _ in 0..steps {
                w.step(epoch, loss, lr);
            }
            let metrics = SyncMetrics {
                at: RunPoint {
                    epoch,
                    step: merge_step,
                    syncs,
                    lr,
                    tau,
                    train_loss: losses.iter().sum::<f64>() / workers as f64,
                    worker_train_loss: losses,
                    consensus_distance: Some(consensus),
                    bytes_sent_per_worker: column(1).into_iter().map(|b| b as u64).collect(),
                    consensus_bytes_sent_per_worker: vec![0; workers],
                    subgroup_bytes_sent_per_worker: vec![0; workers],
                    sim_seconds: simulating.then(|| column(5)),
                    sim_comm_seconds: simulating.then(|| column(6)),
                    wall_seconds: wall,
                },
                comm_wait_seconds: vec![0.0; workers],
                comm_inflight_seconds: column(2),
                senders: None,
                trigger_statistic: None,
            };
            w.sync(&metrics)
                .map_err(|source| LearnerError::Io { path: self.local.plan.config.output.clone(), source })?;
        }
        Ok(())
    }

    /// The end of an epoch: every local thread has joined and the shared buffer is the model;
    /// every worker's loss and counters, the average model evaluated, `epochs.csv`.
    fn end_epoch(
        &mut self,
        epoch: usize,
        step: u64,
        progress: &Progress,
        local: &T::Model,
    ) -> Result<EpochMetrics, LearnerError> {
        let (rank, workers) = (self.local.plan.rank, self.local.plan.workers);
        let model = self.layouts[0].unflatten(local.clone(), &self.local.shared.to_vec())?;
        let epoch_loss = progress.epoch_sum / progress.epoch_count.max(1) as f64;
        let mine = [epoch_loss, self.comm.traffic().total().bytes_sent as f64, self.epoch_base, self.waited];
        let mut values = spread_by_worker(&mine, rank, workers);
        self.comm.inner_mut().all_reduce_f64(&mut values).map_err(CoopError::from)?;
        let (average, evaluation) = evaluate_average(
            self.local.plan.task,
            &model,
            step,
            self.comm.inner_mut().as_mut(),
            self.local.plan.device,
            false,
        )?;
        let column = |k: usize| worker_column(&values, k, workers);
        let losses = column(0);
        let simulating = self.local.plan.config.network.is_some();
        let metrics = EpochMetrics {
            at: RunPoint {
                epoch,
                step,
                syncs: self.syncs,
                lr: self.lr_at(step - 1),
                tau: self.schedule.period(step - 1),
                train_loss: losses.iter().sum::<f64>() / workers as f64,
                worker_train_loss: losses,
                consensus_distance: self.last_distance,
                bytes_sent_per_worker: column(1).into_iter().map(|b| b as u64).collect(),
                consensus_bytes_sent_per_worker: vec![0; workers],
                subgroup_bytes_sent_per_worker: vec![0; workers],
                sim_seconds: simulating.then(|| column(2)),
                sim_comm_seconds: simulating.then(|| column(3)),
                wall_seconds: self.clock.now(),
            },
            test_loss: evaluation.loss(),
            test_accuracy: evaluation.accuracy(),
            worker_test_accuracy: None,
        };
        if let Some(w) = self.writer.as_mut() {
            w.epoch(&metrics)
                .map_err(|source| LearnerError::Io { path: self.local.plan.config.output.clone(), source })?;
            save_average(&average, &self.local.plan.config.output)?;
        }
        Ok(metrics)
    }
}
