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
use super::metrics::{Columns, EpochMetrics, MetricsWriter, SyncMetrics};
use super::shared::{Steps, WorkerReport, evaluate_average, init_seeded, plan_steps, save_average};
use super::task::CoopTask;
use crate::comm::{Communicator, Metered, SimClock};
use crate::error::CoopError;
use crate::params::ParamLayout;
use crate::rules::async_local_sgd::apply_average_in_place;
use crate::schedule::FixedConfig;
use crate::shared_params::SharedParams;
use crate::spec::ScheduleSpec;

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
    let tau = match config.rule.with_default_period(&config.schedule) {
        ScheduleSpec::Fixed(FixedConfig { tau, warmup_steps }) if warmup_steps.unwrap_or(0) == 0 => tau.unwrap_or(8),
        _ => {
            return Err(LearnerError::Config(
                "asynchronous local SGD averages every τ steps of a worker: use the fixed schedule without warm-up steps".into(),
            ));
        }
    };
    let (rank, workers) = (comm.rank(), comm.world_size());
    let device = device.clone().autodiff();
    let Steps { per_epoch: steps_per_epoch, planned: planned_steps, total: total_steps } =
        plan_steps(task, config, workers)?;

    let mut comm = Metered::new(comm);
    let simulating = config.network.is_some();
    if let Some(network) = config.network {
        comm.simulate(network, SimClock::default());
    }
    let mut locals: Vec<T::Model> = (0..threads).map(|_| init_seeded(task, &device, config.seed)).collect();
    // One layout per local model: a layout knows its module's tensors by id. Every layout
    // visits the same parameters in the same order, so the flat buffers line up.
    let layouts: Vec<ParamLayout> = locals.iter().map(|m| ParamLayout::of(m, config.buffers)).collect();
    let layout = &layouts[0];
    let mut flat = layout.flatten(&locals[0])?;
    if workers > 1 {
        comm.broadcast(&mut flat, 0).map_err(CoopError::from)?;
    }
    let shared = SharedParams::new(&flat);
    let mut optimizers: Vec<_> = (0..threads).map(|_| config.optimizer.build()).collect();

    let mut writer = match rank {
        0 => Some(
            MetricsWriter::create(
                &config.output,
                total_steps,
                0,
                config.progress,
                Columns { simulated: simulating, ..Columns::default() },
            )
            .map_err(|source| LearnerError::Io { path: config.output.clone(), source })?,
        ),
        _ => None,
    };
    let io = |source| LearnerError::Io { path: config.output.clone(), source };
    let started = Instant::now();
    let (mut step, mut syncs, mut last_epoch) = (0u64, 0u64, None);
    let mut last_distance = None;
    // The simulated clock: where this epoch's steps start, and how long the worker has waited
    // for merges at the ends of epochs.
    let clock_now = |comm: &Metered<_>| comm.clock().map_or(0.0, |c: SimClock| c.now);
    let mut epoch_base = clock_now(&comm);
    let mut waited = 0.0;

    while step < total_steps {
        let epoch = (step / steps_per_epoch) as usize;
        let epoch_start = step;
        let epoch_steps = (total_steps - epoch_start).min(steps_per_epoch) as usize;
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let progress = (Mutex::new(Progress::default()), Condvar::new());
        let epoch_began = Instant::now();
        let lr_at = |s: u64| config.lr.at(s, steps_per_epoch, planned_steps);

        let outcome = std::thread::scope(|scope| -> Result<(), LearnerError> {
            let handles: Vec<_> = locals
                .drain(..)
                .zip(optimizers.drain(..))
                .zip(&layouts)
                .map(|((mut model, mut optim), layout)| {
                    let (next, stop, progress, shared, device) = (&next, &stop, &progress, &shared, &device);
                    scope.spawn(move || {
                        let mut read = Vec::new();
                        let mut after = Vec::new();
                        loop {
                            let index = next.fetch_add(1, Ordering::SeqCst);
                            if index >= epoch_steps || stop.load(Ordering::SeqCst) {
                                break;
                            }
                            // A panic inside a step (the task's code) becomes this worker's failure,
                            // so the communication thread is told instead of waiting for a step
                            // that will never complete.
                            let step = std::panic::AssertUnwindSafe(|| -> Result<f64, LearnerError> {
                                shared.read_into(&mut read);
                                let current = layout.unflatten(model.clone(), &read)?;
                                let batch = task.train_batch(rank, workers, epoch, index, device);
                                let loss = task.loss(&current, batch);
                                let value = f64::from(loss.clone().into_scalar::<f32>());
                                if !value.is_finite() {
                                    let at = epoch_start + index as u64 + 1;
                                    return Err(LearnerError::NonFiniteLoss { worker: rank, step: at, loss: value });
                                }
                                let grads = GradientsParams::from_grads(loss.backward(), &current);
                                model = optim.step(lr_at(epoch_start + index as u64), current, grads);
                                layout.flatten_into(&model, &mut after)?;
                                after.iter_mut().zip(&read).for_each(|(a, r)| *a -= r);
                                shared.add(&after);
                                Ok(value)
                            });
                            let result = std::panic::catch_unwind(step).unwrap_or_else(|panic| {
                                let message = crate::launch::panic_message(panic.as_ref());
                                Err(LearnerError::WorkerPanicked { worker: rank, message })
                            });
                            let (lock, ready) = progress;
                            let mut p = lock.lock().unwrap_or_else(PoisonError::into_inner);
                            match result {
                                Ok(value) => {
                                    p.done += 1;
                                    if simulating {
                                        let now = Instant::now();
                                        let measured =
                                            now.duration_since(p.last_completion.unwrap_or(epoch_began)).as_secs_f64();
                                        p.last_completion = Some(now);
                                        let at = epoch_start + p.done as u64;
                                        let seconds = config.step_time.seconds(measured, config.seed, rank, at);
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
                                    stop.store(true, Ordering::SeqCst);
                                }
                            }
                            ready.notify_all();
                        }
                        (model, optim)
                    })
                })
                .collect();

            // The communication thread: a merge every τ completed steps of this worker.
            let first = (epoch_start / tau + 1) * tau;
            let merges: Vec<u64> =
                (0..).map(|k| first + k * tau).take_while(|&s| s <= epoch_start + epoch_steps as u64).collect();
            let mut result = Ok(());
            let mut snapshot = Vec::new();
            for merge_step in merges {
                let (lock, ready) = &progress;
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
                // A failed worker still takes part in the collectives, flagging its failure, so
                // the others learn of it instead of waiting.
                let merged = (|| -> Result<(), LearnerError> {
                    // The snapshot leaves when the compute clock reaches the merge's step, or
                    // when the previous all-reduce has landed, whichever is later.
                    if let Some(computed) = computed {
                        let ready = epoch_base + computed;
                        let now = clock_now(&comm);
                        if ready > now {
                            comm.local_step(ready - now);
                        }
                    }
                    shared.read_into(&mut snapshot);
                    let flight = Instant::now();
                    let mut sum = snapshot.clone();
                    comm.all_reduce_sum(&mut sum).map_err(CoopError::from)?;
                    let inflight = flight.elapsed().as_secs_f64();
                    let distance = apply_average_in_place(&shared, &snapshot, sum, workers);
                    syncs += 1;
                    let stats = comm.traffic().total().bytes_sent as f64;
                    let mut values = vec![0.0; 7 * workers];
                    values[rank] = loss;
                    values[workers + rank] = stats;
                    values[2 * workers + rank] = inflight;
                    values[3 * workers + rank] = distance;
                    values[4 * workers + rank] = f64::from(u8::from(failed));
                    values[5 * workers + rank] = clock_now(&comm);
                    values[6 * workers + rank] = waited;
                    comm.inner_mut().all_reduce_f64(&mut values).map_err(CoopError::from)?;
                    if let Some(worker) = values[4 * workers..5 * workers].iter().position(|&f| f > 0.0)
                        && !failed
                    {
                        return Err(LearnerError::PeerFailed { worker });
                    }
                    let losses = values[..workers].to_vec();
                    let consensus = values[3 * workers..4 * workers].iter().sum::<f64>() / workers as f64;
                    last_distance = Some(consensus);
                    if let Some(w) = writer.as_mut() {
                        for _ in 0..tau {
                            w.step(epoch, loss, lr_at(merge_step - 1));
                        }
                        let metrics = SyncMetrics {
                            epoch,
                            step: merge_step,
                            syncs,
                            lr: lr_at(merge_step - 1),
                            tau,
                            train_loss: losses.iter().sum::<f64>() / workers as f64,
                            worker_train_loss: losses,
                            consensus_distance: Some(consensus),
                            bytes_sent_per_worker: values[workers..2 * workers].iter().map(|&b| b as u64).collect(),
                            consensus_bytes_sent_per_worker: vec![0; workers],
                            subgroup_bytes_sent_per_worker: vec![0; workers],
                            comm_wait_seconds: vec![0.0; workers],
                            comm_inflight_seconds: values[2 * workers..3 * workers].to_vec(),
                            sim_seconds: simulating.then(|| values[5 * workers..6 * workers].to_vec()),
                            sim_comm_seconds: simulating.then(|| values[6 * workers..].to_vec()),
                            senders: None,
                            trigger_statistic: None,
                            wall_seconds: started.elapsed().as_secs_f64(),
                        };
                        w.sync(&metrics).map_err(io)?;
                    }
                    Ok(())
                })();
                if let Err(error) = merged {
                    stop.store(true, Ordering::SeqCst);
                    result = Err(error);
                    break;
                }
                if failed {
                    break;
                }
            }
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
        let failure = progress.0.into_inner().unwrap_or_else(PoisonError::into_inner);
        if let Some(error) = failure.failure {
            return Err(error);
        }
        outcome?;
        step = epoch_start + epoch_steps as u64;
        if simulating {
            // The threads join: the next epoch starts once both the steps and the last merge
            // are done; waiting for the merge is communication time.
            let computed = epoch_base + failure.compute.last().copied().unwrap_or(0.0);
            let landed = clock_now(&comm);
            waited += (landed - computed).max(0.0);
            epoch_base = computed.max(landed);
            comm.restore_clock(SimClock { now: epoch_base, comm_seconds: waited });
        }

        // End of the epoch: every local thread has joined; the shared buffer is the model.
        let model = layout.unflatten(locals[0].clone(), &shared.to_vec())?;
        let epoch_loss = failure.epoch_sum / failure.epoch_count.max(1) as f64;
        let mut values = vec![0.0; 4 * workers];
        values[rank] = epoch_loss;
        values[workers + rank] = comm.traffic().total().bytes_sent as f64;
        values[2 * workers + rank] = epoch_base;
        values[3 * workers + rank] = waited;
        comm.inner_mut().all_reduce_f64(&mut values).map_err(CoopError::from)?;
        let (average, evaluation) = evaluate_average(task, &model, step, comm.inner_mut(), &device, false)?;
        let losses = values[..workers].to_vec();
        let metrics = EpochMetrics {
            epoch,
            step,
            syncs,
            lr: lr_at(step - 1),
            tau,
            train_loss: losses.iter().sum::<f64>() / workers as f64,
            worker_train_loss: losses,
            test_loss: evaluation.loss(),
            test_accuracy: evaluation.accuracy(),
            worker_test_accuracy: None,
            consensus_distance: last_distance,
            bytes_sent_per_worker: values[workers..2 * workers].iter().map(|&b| b as u64).collect(),
            consensus_bytes_sent_per_worker: vec![0; workers],
            subgroup_bytes_sent_per_worker: vec![0; workers],
            sim_seconds: simulating.then(|| values[2 * workers..3 * workers].to_vec()),
            sim_comm_seconds: simulating.then(|| values[3 * workers..].to_vec()),
            wall_seconds: started.elapsed().as_secs_f64(),
        };
        if let Some(w) = writer.as_mut() {
            w.epoch(&metrics).map_err(io)?;
            save_average(&average, &config.output)?;
        }
        last_epoch = Some(metrics);
    }
    if let Some(w) = &writer {
        w.finish();
    }
    Ok(WorkerReport {
        rank,
        steps: step,
        syncs,
        bytes_sent: comm.traffic().total().bytes_sent,
        last_epoch,
        final_parameters: shared.to_vec(),
    })
}
