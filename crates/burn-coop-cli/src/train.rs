//! `coop train`.

use std::sync::Arc;

use burn_coop::learner::Learner;
use burn_coop::learner::TrainingSummary;
use burn_coop_vision::task::CifarTask;
use burn_coop_vision::{Cifar10, LocateOptions, Partition, Verify, locate};
use clap::CommandFactory;
use clap::error::ErrorKind;

use crate::config::{PartitionName, TrainArgs, TrainConfig, TransportName};

/// Resolves the configuration: defaults, then `--config FILE` (or the resumed run's
/// `config.toml`), then flags. Invalid values exit like clap's own errors, naming the value; so
/// do settings the run does not use. `for_advice`: the setting is read by `coop advise`, not
/// trained (`--step-time` is its runtime model's without a network, and the number of workers is
/// not bounded by threads).
pub fn resolve(args: &TrainArgs, for_advice: bool) -> TrainConfig {
    let also_used: &[&str] = if for_advice { &["step-time"] } else { &[] };
    let file = args.resume.as_ref().map(|dir| dir.join("config.toml")).or_else(|| args.config.clone());
    let (mut config, in_file) = match &file {
        Some(path) => TrainConfig::from_toml_file_with_keys(path)
            .unwrap_or_else(|message| crate::Cli::command().error(ErrorKind::InvalidValue, message).exit()),
        None => (TrainConfig::default(), Vec::new()),
    };
    if let Err(invalid) = args.apply(&mut config) {
        let invalid = crate::config::InvalidValue::from(invalid);
        crate::Cli::command().error(ErrorKind::ValueValidation, invalid.to_string()).exit();
    }
    // A setting the run does not use is an error naming it, in the file or among the flags.
    let from_file = file.as_ref().map(|path| format!("the configuration file {}", path.display()));
    let checked = |keys: Vec<String>| keys.into_iter().filter(|k| !also_used.contains(&k.as_str())).collect::<Vec<_>>();
    let unused = config
        .refuse_unused(&checked(args.given_keys()), "the command line")
        .and_then(|()| from_file.map_or(Ok(()), |source| config.refuse_unused(&checked(in_file.clone()), &source)));
    if let Err(message) = unused {
        crate::Cli::command().error(ErrorKind::ArgumentConflict, message).exit();
    }
    if let Some(dir) = &args.resume {
        config.output = Some(dir.clone());
    }
    let given: Vec<String> = args.given_keys().into_iter().chain(in_file.iter().cloned()).collect();
    config.take_rule_defaults(&given);
    // Under MPI the number of workers is the number of ranks: the rule and schedule are checked
    // once it is known (in `run_mpi`).
    let checked = config.validate().and_then(|()| match config.transport {
        _ if for_advice => Ok(()),
        TransportName::Threads => config.validate_threads().and_then(|()| config.validate_for(config.workers)),
        TransportName::Mpi => Ok(()),
    });
    if let Err(invalid) = checked {
        // Named where it came from: a flag, or else the file's key.
        let message = match &file {
            Some(path)
                if !args.given_keys().iter().any(|k| k == invalid.option)
                    && in_file.iter().any(|k| k == invalid.option) =>
            {
                format!(
                    "the configuration file {}: invalid value '{}' for '{}': {}",
                    path.display(),
                    invalid.value,
                    invalid.option,
                    invalid.reason
                )
            }
            _ => invalid.to_string(),
        };
        crate::Cli::command().error(ErrorKind::ValueValidation, message).exit();
    }
    config
}

/// Runs `coop train`.
pub fn run(args: &TrainArgs) -> Result<(), String> {
    let config = resolve(args, false);
    let resume = args.resume.is_some();
    let output = config.output_folder();
    let has_checkpoints = burn_coop::learner::latest_checkpoint(&output).is_ok_and(|latest| latest.is_some());
    if has_checkpoints && !resume {
        return Err(format!(
            "{} already holds a run with checkpoints: continue it with --resume {0} or choose another --output",
            output.display()
        ));
    }
    if config.transport == TransportName::Mpi {
        return run_mpi(config, resume);
    }

    let task = build_task(&config)?;
    std::fs::create_dir_all(&output).map_err(|e| format!("cannot create {}: {e}", output.display()))?;
    let resolved = output.join("config.toml");
    std::fs::write(&resolved, config.to_toml()).map_err(|e| format!("cannot write {}: {e}", resolved.display()))?;

    let devices: Vec<_> = config.devices.iter().map(|d| d.open()).collect();
    eprintln!(
        "training {} with {} workers ({}) on {} for {} epochs; output in {}",
        crate::config::serde_name_of(&config.model),
        config.workers,
        config.describe_rule(),
        config.devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        config.epochs,
        output.display()
    );
    let mut learner = Learner::new(task, config.learner_config(), devices);
    if resume {
        learner = learner.resume();
    }
    let summary = learner.run().map_err(|e| e.to_string())?;
    print_summary(&summary);
    leave_chart(&summary.output);
    Ok(())
}

/// One worker per MPI rank: every rank loads the data and runs the same worker loop; rank 0
/// writes metrics and publishes checkpoints, every rank writes its own checkpoint files (the
/// output folder must be shared between machines for multi-node resumes).
#[cfg(feature = "mpi")]
fn run_mpi(mut config: TrainConfig, resume: bool) -> Result<(), String> {
    use burn_coop::learner::run_worker;

    use burn_coop::comm::Communicator;

    if let Some(fault) = config.inject_fault.first() {
        return Err(format!("--inject-fault {fault}: faults are injected on threads only, not yet over MPI"));
    }
    if let Some(seconds) = config.peer_timeout {
        return Err(format!("--peer-timeout {seconds}: a peer timeout applies on threads only, not yet over MPI"));
    }
    let comm = burn_coop_mpi::MpiComm::world().map_err(|e| e.to_string())?;
    let (rank, world) = (comm.rank(), comm.world_size());
    config.workers = world;
    config.validate().and_then(|()| config.validate_for(world)).map_err(|invalid| invalid.to_string())?;
    let output = config.output_folder();
    let task = build_task(&config)?;
    if rank == 0 {
        std::fs::create_dir_all(&output).map_err(|e| format!("cannot create {}: {e}", output.display()))?;
        let resolved = output.join("config.toml");
        std::fs::write(&resolved, config.to_toml()).map_err(|e| format!("cannot write {}: {e}", resolved.display()))?;
        eprintln!(
            "training {} with {world} MPI ranks ({}) for {} epochs; output in {}",
            crate::config::serde_name_of(&config.model),
            config.describe_rule(),
            config.epochs,
            output.display()
        );
    }
    let device = config.devices[rank % config.devices.len()].open();
    let report =
        run_worker(&task, &config.learner_config(), &device, comm, resume).map_err(|e| format!("rank {rank}: {e}"))?;
    if rank == 0 {
        print_summary(&TrainingSummary { workers: vec![report], output: output.clone() });
        leave_chart(&output);
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_config: TrainConfig, _resume: bool) -> Result<(), String> {
    Err("this binary was built without MPI support: rebuild burn-coop-cli with --features mpi".into())
}

/// Draws the run's loss and accuracy into `curves.svg` in its folder; a chart that cannot be
/// drawn (no font on this machine) is a warning, not a failed run.
fn leave_chart(output: &std::path::Path) {
    match crate::plot::run_chart(output) {
        Ok(path) => eprintln!("chart: {}", path.display()),
        Err(error) => eprintln!("warning: no chart drawn: {error}"),
    }
}

/// Loads CIFAR-10 (verified), splits it and builds the task.
pub fn build_task(config: &TrainConfig) -> Result<CifarTask, String> {
    let mut options = LocateOptions::new().with_download(config.download);
    if let Some(path) = &config.data {
        options = options.with_path(path);
    }
    let source = locate(&options).map_err(|e| e.to_string())?;
    let verify = if config.verify { Verify::Official } else { Verify::Skip };
    let (train, test) = Cifar10::load_splits(&source, verify).map_err(|e| e.to_string())?;
    let partition = match config.partition {
        PartitionName::Iid => Partition::iid(train.len(), config.workers, config.seed),
        PartitionName::Dirichlet => Partition::dirichlet(train.labels(), config.workers, config.beta, config.seed),
    }
    .map_err(|e| e.to_string())?;
    Ok(CifarTask::new(
        Arc::new(train),
        Arc::new(test),
        partition,
        config.model,
        config.batch_size,
        config.augment,
        config.seed,
    ))
}

fn print_summary(summary: &TrainingSummary) {
    let Some(last) = summary.last_epoch() else {
        println!("stopped before the end of the first epoch; output in {}", summary.output.display());
        return;
    };
    let sent = last.at.bytes_sent_per_worker.iter().sum::<u64>() as f64 / last.at.bytes_sent_per_worker.len() as f64;
    println!(
        "final test accuracy {:.2}% (loss {:.4}) after {} steps and {} merges in {:.0} s; {:.1} MB sent per worker; output in {}",
        100.0 * last.test_accuracy,
        last.test_loss,
        last.at.step,
        last.at.syncs,
        last.at.wall_seconds,
        sent / 1e6,
        summary.output.display()
    );
}
