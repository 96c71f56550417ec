//! `coop train`'s configuration: defaults, then a TOML file, then command-line flags.

use std::path::{Path, PathBuf};

use burn_coop::comm::{NetworkModel, StepTime};
use burn_coop::learner::{InjectedFault, LrSchedule, LrShape, OptimizerSpec};
use burn_coop::{
    InnerStatePolicy, learner::LearnerConfig, params::BufferPolicy, rules::RuleSpec, schedule::ScheduleSpec,
};
use burn_coop::{
    registry::{SpecError, at_least_one, positive_f64, serde_name},
    rules::RuleFlags,
    schedule::ScheduleFlags,
};
use burn_coop_vision::task::ModelKind;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::device::DeviceName;

/// Inner optimizer by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerName {
    /// SGD with momentum.
    Sgd,
    /// Adam.
    Adam,
    /// AdamW.
    Adamw,
}

/// Learning-rate shape by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LrShapeName {
    /// Constant after the warm-up.
    Constant,
    /// Step decay at the milestones.
    Step,
    /// Cosine decay to `min-lr`.
    Cosine,
}

/// How the training set is split across workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionName {
    /// Equal random shards.
    Iid,
    /// Label skew: class proportions per worker drawn from Dirichlet(β).
    Dirichlet,
}

/// Where the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TransportName {
    /// Threads of this process.
    Threads,
    /// One worker per MPI rank (start with `mpirun -np M coop train --transport mpi`).
    Mpi,
}

/// A complete `coop train` configuration.
///
/// In a TOML file every setting is a top-level key: the rule is `rule = "NAME"` beside the
/// rule's own settings (`alpha`, `topology`, …) and the schedule is `schedule = "NAME"` beside
/// its own (`tau`, `warmup-steps`); which keys exist is decided by the registries in
/// [`burn_coop::registry`], so a new rule needs no change here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainConfig {
    /// Model.
    pub model: ModelKind,
    /// Merge rule and its settings (flat keys in files, see above).
    #[serde(skip)]
    pub rule: RuleSpec,
    /// Schedule and its settings (flat keys in files, see above).
    #[serde(skip)]
    pub schedule: ScheduleSpec,
    /// Measure the consensus distance every N merges for rules that do not measure it by
    /// themselves (gossip); 0: never.
    pub consensus_every: u64,
    /// The bucket size in MiB of merges taken a bucket of tensors at a time (averaging,
    /// elastic averaging with one anchor, DiLoCo without a compressor); unset: 4.
    pub bucket_mib: Option<f64>,
    /// Workers (model replicas).
    pub workers: usize,
    /// Devices; replica r runs on `devices[r % len]`.
    pub devices: Vec<DeviceName>,
    /// Training epochs.
    pub epochs: usize,
    /// Images per batch per worker.
    pub batch_size: usize,
    /// Inner optimizer.
    pub optimizer: OptimizerName,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate shape after the warm-up.
    pub lr_schedule: LrShapeName,
    /// Linear learning-rate warm-up, in epochs.
    pub lr_warmup_epochs: f64,
    /// Final learning rate of the cosine shape.
    pub min_lr: f64,
    /// Epochs at which the step shape multiplies the rate by `gamma`.
    pub milestones: Vec<usize>,
    /// Step-decay factor.
    pub gamma: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f64,
    /// How the training set is split.
    pub partition: PartitionName,
    /// Dirichlet concentration β (smaller: more skew).
    pub beta: f64,
    /// Random crop and flip augmentation.
    pub augment: bool,
    /// Whether BatchNorm statistics are merged.
    pub buffers: BufferPolicy,
    /// The inner optimizer's state at a merge.
    pub inner_state: InnerStatePolicy,
    /// Seed of initialization, partition, shuffling and augmentation.
    pub seed: u64,
    /// Output folder (default `runs/<model>-<rule>-m<workers>-tau<tau>`).
    pub output: Option<PathBuf>,
    /// Checkpoint every N merges (0: at the end of each epoch).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Also evaluate each worker's own model every epoch.
    pub eval_workers: bool,
    /// Stop after this many steps (smoke runs).
    pub max_steps: Option<u64>,
    /// CIFAR-10 location (archive or folder).
    pub data: Option<PathBuf>,
    /// Download CIFAR-10 when no local copy is found.
    pub download: bool,
    /// Check every data file against the official md5 sums (turn off for other CIFAR-format data).
    pub verify: bool,
    /// Where workers run.
    pub transport: TransportName,
    /// Simulate this network (`bandwidth=1Gbit,latency=50us`): the metrics get a simulated
    /// clock (`sim_seconds`, `sim_comm_seconds`). Unset: no simulated clock.
    pub network: Option<String>,
    /// A local step's time on the simulated clock: `measured` (what it really took) or seconds.
    pub step_time: String,
    /// A straggler delay added to every simulated step, `exp:MEAN` (exponential, seeded per
    /// worker and step).
    pub straggler: Option<String>,
    /// Faults to inject, `RANK@STEP[:panic|nan|hang|exit]` (threads only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inject_fault: Vec<InjectedFault>,
    /// Seconds a worker waits at a collective before declaring the missing workers lost
    /// (threads only; unset: as long as they are alive).
    pub peer_timeout: Option<f64>,
}

/// The most workers on threads of one process.
const MAX_THREAD_WORKERS: usize = 1024;

/// `--step-time`: `measured`, or a fixed number of seconds.
fn parse_step_time(text: &str) -> Result<Option<f64>, String> {
    match text {
        "measured" => Ok(None),
        _ => match text.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(Some(v)),
            _ => Err(format!("'{text}' is neither 'measured' nor a non-negative number of seconds")),
        },
    }
}

/// `--straggler exp:MEAN`: the mean of the exponential delay.
fn parse_straggler(text: &str) -> Result<f64, String> {
    let mean = text.strip_prefix("exp:").ok_or_else(|| format!("'{text}' is not exp:MEAN"))?;
    match mean.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{mean}' is not a non-negative number of seconds")),
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: ModelKind::Resnet20,
            rule: RuleSpec::default(),
            schedule: ScheduleSpec::default(),
            consensus_every: 0,
            bucket_mib: None,
            workers: 4,
            devices: vec![DeviceName::default_for_build()],
            epochs: 5,
            batch_size: 32,
            optimizer: OptimizerName::Sgd,
            lr: 0.2,
            lr_schedule: LrShapeName::Cosine,
            lr_warmup_epochs: 1.0,
            min_lr: 0.0,
            milestones: Vec::new(),
            gamma: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            partition: PartitionName::Iid,
            beta: 0.5,
            augment: true,
            buffers: BufferPolicy::Merge,
            inner_state: InnerStatePolicy::KeepLocal,
            seed: 1,
            output: None,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            eval_workers: false,
            max_steps: None,
            data: None,
            download: true,
            verify: true,
            transport: TransportName::Threads,
            network: None,
            step_time: "measured".into(),
            straggler: None,
            inject_fault: Vec::new(),
            peer_timeout: None,
        }
    }
}

fn non_negative_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{text}' is not a non-negative number")),
    }
}

/// `coop train` flags; each one overrides the configuration file.
#[derive(Debug, Clone, Default, Args)]
pub struct TrainArgs {
    /// TOML configuration file (flags override its values).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in DIR from its newest checkpoint (uses DIR/config.toml).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Model: resnet20, resnet32, resnet44, resnet56, resnet110, resnet18.
    #[arg(long, value_parser = serde_name::<ModelKind>)]
    pub model: Option<ModelKind>,
    /// `--rule NAME` and the rules' own flags.
    #[command(flatten)]
    pub rule: RuleFlags,
    /// `--schedule NAME` and the schedules' own flags.
    #[command(flatten)]
    pub schedule: ScheduleFlags,
    /// Measure the consensus distance every N merges for rules that do not measure it by
    /// themselves (gossip; 0: never).
    #[arg(long)]
    pub consensus_every: Option<u64>,
    /// The bucket size in MiB of merges taken a bucket of tensors at a time (averaging, elastic
    /// with one anchor, DiLoCo without a compressor; default 4): the memory a merge needs
    /// beyond the model and the rule's state. Every parameter is the same whatever the size.
    #[arg(long, value_parser = positive_f64)]
    pub bucket_mib: Option<f64>,
    /// Number of workers.
    #[arg(long, value_parser = at_least_one)]
    pub workers: Option<u64>,
    /// Devices, comma-separated (flex, ndarray, wgpu, wgpu:cpu, cuda:0, ...).
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<DeviceName>>,
    /// Training epochs.
    #[arg(long, value_parser = at_least_one)]
    pub epochs: Option<u64>,
    /// Images per batch per worker.
    #[arg(long, value_parser = at_least_one)]
    pub batch_size: Option<u64>,
    /// Inner optimizer.
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerName>,
    /// Peak learning rate.
    #[arg(long, value_parser = positive_f64)]
    pub lr: Option<f64>,
    /// Learning-rate shape after the warm-up.
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrShapeName>,
    /// Linear warm-up length in epochs.
    #[arg(long, value_parser = non_negative_f64)]
    pub lr_warmup_epochs: Option<f64>,
    /// Final learning rate of the cosine shape.
    #[arg(long, value_parser = non_negative_f64)]
    pub min_lr: Option<f64>,
    /// Step-decay epochs, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub milestones: Option<Vec<usize>>,
    /// Step-decay factor.
    #[arg(long, value_parser = positive_f64)]
    pub gamma: Option<f64>,
    /// SGD momentum (0 disables it).
    #[arg(long, value_parser = non_negative_f64)]
    pub momentum: Option<f64>,
    /// Nesterov momentum (true/false).
    #[arg(long)]
    pub nesterov: Option<bool>,
    /// Weight decay.
    #[arg(long, value_parser = non_negative_f64)]
    pub weight_decay: Option<f64>,
    /// Training-set split across workers.
    #[arg(long, value_enum)]
    pub partition: Option<PartitionName>,
    /// Dirichlet concentration β.
    #[arg(long, value_parser = positive_f64)]
    pub beta: Option<f64>,
    /// Random crop and flip (true/false).
    #[arg(long)]
    pub augment: Option<bool>,
    /// BatchNorm statistics at a merge: merge, keep-local.
    #[arg(long, value_parser = serde_name::<BufferPolicy>)]
    pub buffers: Option<BufferPolicy>,
    /// Inner optimizer state at a merge: keep-local, reset.
    #[arg(long, value_parser = serde_name::<InnerStatePolicy>)]
    pub inner_state: Option<InnerStatePolicy>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Checkpoint every N merges (0: at each epoch end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept on disk.
    #[arg(long, value_parser = at_least_one)]
    pub keep_checkpoints: Option<u64>,
    /// Evaluate each worker's own model too (true/false).
    #[arg(long)]
    pub eval_workers: Option<bool>,
    /// Stop after N steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// CIFAR-10 archive or folder (also: BURN_COOP_CIFAR10).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Download CIFAR-10 if no local copy is found (true/false).
    #[arg(long)]
    pub download: Option<bool>,
    /// Check the data against the official md5 sums (true/false).
    #[arg(long)]
    pub verify: Option<bool>,
    /// Where workers run: threads, or mpi (one worker per rank).
    #[arg(long, value_enum)]
    pub transport: Option<TransportName>,
    /// Simulate a network and log a simulated clock: bandwidth=1Gbit,latency=50us.
    #[arg(long, value_name = "SPEC")]
    pub network: Option<String>,
    /// A local step's simulated time: measured, or seconds (e.g. 0.05).
    #[arg(long, value_name = "TIME")]
    pub step_time: Option<String>,
    /// A simulated straggler delay per step: exp:MEAN (seconds).
    #[arg(long, value_name = "exp:MEAN")]
    pub straggler: Option<String>,
    /// Make worker RANK fail right after its local step STEP, to see and test what a failure
    /// does: panic (default), nan (its parameters), hang (needs --peer-timeout), exit.
    /// Repeatable; threads only.
    #[arg(long, value_name = "RANK@STEP[:KIND]", action = clap::ArgAction::Append)]
    pub inject_fault: Option<Vec<InjectedFault>>,
    /// Seconds a worker waits at a collective for the others before it declares the missing
    /// ones lost (threads only; default: as long as they are alive).
    #[arg(long, value_name = "SECONDS", value_parser = positive_f64)]
    pub peer_timeout: Option<f64>,
}

impl TrainArgs {
    /// The keys of the flags that were given (a flag without `--`).
    pub fn given_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        macro_rules! given {
            ($($field:ident),*) => { $( if self.$field.is_some() { keys.push(stringify!($field).replace('_', "-")); } )* };
        }
        given!(model, consensus_every, bucket_mib, workers, devices, epochs, batch_size, optimizer, lr, lr_schedule);
        given!(lr_warmup_epochs, min_lr, milestones, gamma, momentum, nesterov, weight_decay, partition, beta);
        given!(augment, buffers, inner_state, seed, output, checkpoint_every, keep_checkpoints, eval_workers);
        given!(max_steps, data, download, verify, transport, network, step_time, straggler, inject_fault, peer_timeout);
        keys.extend(self.rule.given_keys());
        keys.extend(self.schedule.given_keys());
        keys
    }

    /// Applies every flag that was given to `config`. A flag of a rule or schedule the run does
    /// not use is an error naming it.
    pub fn apply(&self, config: &mut TrainConfig) -> Result<(), SpecError> {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { config.$field = v.into(); } )* };
        }
        set!(model, consensus_every, bucket_mib, devices, optimizer, lr, lr_schedule);
        set!(lr_warmup_epochs, min_lr, milestones, gamma, momentum, nesterov, weight_decay, partition, beta);
        set!(augment, buffers, inner_state, seed, checkpoint_every, eval_workers, download, verify, transport);
        self.rule.apply(&mut config.rule)?;
        self.schedule.apply(&mut config.schedule)?;
        if let Some(v) = self.workers {
            config.workers = v as usize;
        }
        if let Some(v) = self.epochs {
            config.epochs = v as usize;
        }
        if let Some(v) = self.batch_size {
            config.batch_size = v as usize;
        }
        if let Some(v) = self.keep_checkpoints {
            config.keep_checkpoints = v as usize;
        }
        if let Some(v) = &self.output {
            config.output = Some(v.clone());
        }
        if let Some(v) = self.max_steps {
            config.max_steps = Some(v);
        }
        if let Some(v) = &self.data {
            config.data = Some(v.clone());
        }
        if let Some(v) = &self.network {
            config.network = Some(v.clone());
        }
        if let Some(v) = &self.step_time {
            config.step_time = v.clone();
        }
        if let Some(v) = &self.straggler {
            config.straggler = Some(v.clone());
        }
        if let Some(v) = &self.inject_fault {
            config.inject_fault = v.clone();
        }
        if let Some(v) = self.peer_timeout {
            config.peer_timeout = Some(v);
        }
        Ok(())
    }
}

/// A configuration value that cannot run, named as in the file and on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    /// The option's name.
    pub option: &'static str,
    /// The value given.
    pub value: String,
    /// Why it is invalid.
    pub reason: String,
}

impl From<SpecError> for InvalidValue {
    fn from(error: SpecError) -> Self {
        Self { option: error.option, value: error.value, reason: error.reason }
    }
}

impl std::fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid value '{}' for '--{}': {}", self.value, self.option, self.reason)
    }
}

impl TrainConfig {
    /// Reads a TOML file (missing keys keep their defaults; unknown keys are errors), with the
    /// keys the file sets.
    pub fn from_toml_file_with_keys(path: &Path) -> Result<(Self, Vec<String>), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_toml_str_with_keys(&text).map_err(|e| format!("invalid configuration file {}: {e}", path.display()))
    }

    /// Reads the TOML form, with the keys the text sets: the rule's and the schedule's keys go to
    /// their registries, the rest to the fields of this struct. A non-finite number is an
    /// error naming its key (it must not turn into "unset" on the way); so is an unknown key,
    /// with the closest known one when there is one.
    pub fn from_toml_str_with_keys(text: &str) -> Result<(Self, Vec<String>), String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some((key, value)) = first_non_finite(&table) {
            return Err(format!("invalid value '{value}' for '{key}': not a finite number"));
        }
        let keys: Vec<String> = table.keys().cloned().collect();
        let Value::Object(mut table) = serde_json::to_value(&table).map_err(|e| e.to_string())? else {
            return Err("the configuration must be a table of keys".into());
        };
        let rule = RuleSpec::take_from_flat(&mut table).map_err(|e| e.to_string())?;
        let schedule = ScheduleSpec::take_from_flat(&mut table).map_err(|e| e.to_string())?;
        let own = burn_coop::registry::field_names::<Self>();
        if let Some(unknown) = table.keys().find(|key| !own.contains(&key.as_str())) {
            let known = own.iter().chain(&RuleSpec::keys()).chain(&ScheduleSpec::keys()).copied().collect::<Vec<_>>();
            return Err(match closest(unknown, &known) {
                Some(near) => format!("unknown key '{unknown}' (did you mean '{near}'?)"),
                None => format!(
                    "unknown key '{unknown}' (`coop train --help` lists the settings; a key is a flag without --)"
                ),
            });
        }
        let mut config: Self = burn_coop::registry::from_map(table, "configuration").map_err(|e| e.to_string())?;
        config.rule = rule;
        config.schedule = schedule;
        Ok((config, keys))
    }

    /// The configuration as TOML, with the rule's and schedule's defaults written out.
    pub fn to_toml(&self) -> String {
        let Value::Object(mut table) = serde_json::to_value(self).expect("the configuration serializes") else {
            unreachable!("a struct serializes to a map")
        };
        table.extend(self.rule.resolved().to_flat());
        table.extend(self.schedule.resolved().to_flat());
        let unused = self.unused_keys();
        let table: Map<String, Value> = table
            .into_iter()
            .filter(|(key, value)| !value.is_null() && !unused.iter().any(|(k, _)| k == key))
            .collect();
        toml::to_string_pretty(&table).expect("the configuration serializes")
    }

    /// Checks values that flags alone cannot (they may come from a file) and that depend on each
    /// other. The rule and schedule are checked by [`TrainConfig::validate_for`] once the number
    /// of workers is known.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        let invalid = |option, value: String, reason: &str| Err(InvalidValue { option, value, reason: reason.into() });
        if self.workers == 0 {
            return invalid("workers", "0".into(), "at least one worker is needed");
        }
        if self.epochs == 0 {
            return invalid("epochs", "0".into(), "at least one epoch is needed");
        }
        if self.batch_size == 0 {
            return invalid("batch-size", "0".into(), "a batch needs at least one image");
        }
        if let Some(mib) = self.bucket_mib
            && !(mib.is_finite() && mib * (1 << 20) as f64 >= 4.0)
        {
            return invalid("bucket-mib", mib.to_string(), "a bucket must hold at least one value (4 bytes)");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return invalid("lr", self.lr.to_string(), "the learning rate must be positive");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid("momentum", self.momentum.to_string(), "momentum must lie in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid("weight-decay", self.weight_decay.to_string(), "the weight decay must be 0 or more");
        }
        if !(self.lr_warmup_epochs.is_finite() && self.lr_warmup_epochs >= 0.0) {
            return invalid("lr-warmup-epochs", self.lr_warmup_epochs.to_string(), "the warm-up is 0 or more epochs");
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return invalid("min-lr", self.min_lr.to_string(), "the final rate lies in [0, lr]");
        }
        if !(self.gamma.is_finite() && self.gamma > 0.0 && self.gamma <= 1.0) {
            return invalid("gamma", self.gamma.to_string(), "the step-decay factor lies in (0, 1]");
        }
        if let Some(pair) = self.milestones.windows(2).find(|pair| pair[0] >= pair[1]) {
            return invalid(
                "milestones",
                format!("{:?}", self.milestones),
                &format!("{} is not before {}", pair[0], pair[1]),
            );
        }
        if let Some(late) = self.milestones.iter().find(|&&m| m == 0 || m >= self.epochs) {
            let reason =
                format!("epoch {late} is not inside the run's {} epochs (1 to {})", self.epochs, self.epochs - 1);
            return invalid("milestones", format!("{:?}", self.milestones), &reason);
        }
        if self.keep_checkpoints == 0 {
            return invalid("keep-checkpoints", "0".into(), "at least one checkpoint must be kept");
        }
        if self.partition == PartitionName::Dirichlet && !(self.beta.is_finite() && self.beta > 0.0) {
            return invalid("beta", self.beta.to_string(), "the Dirichlet concentration must be positive");
        }
        if self.devices.is_empty() {
            return invalid("devices", String::new(), "at least one device is needed");
        }
        if let Some(network) = &self.network
            && let Err(reason) = network.parse::<NetworkModel>()
        {
            return invalid("network", network.clone(), &reason);
        }
        if let Err(reason) = parse_step_time(&self.step_time) {
            return invalid("step-time", self.step_time.clone(), &reason);
        }
        if let Some(straggler) = &self.straggler
            && let Err(reason) = parse_straggler(straggler)
        {
            return invalid("straggler", straggler.clone(), &reason);
        }
        Ok(())
    }

    /// The keys this configuration does not use, each with the setting that would use it.
    pub fn unused_keys(&self) -> Vec<(&'static str, &'static str)> {
        let mut unused = Vec::new();
        if self.optimizer != OptimizerName::Sgd {
            let why = "SGD's momentum (optimizer = sgd)";
            unused.extend([("momentum", why), ("nesterov", why)]);
        }
        if self.lr_schedule != LrShapeName::Step {
            let why = "the step decay's (lr-schedule = step)";
            unused.extend([("milestones", why), ("gamma", why)]);
        }
        if self.lr_schedule != LrShapeName::Cosine {
            unused.push(("min-lr", "the cosine shape's final rate (lr-schedule = cosine)"));
        }
        if self.partition != PartitionName::Dirichlet {
            unused.push(("beta", "the Dirichlet split's concentration (partition = dirichlet)"));
        }
        if self.network.is_none() {
            let why = "a setting of the simulated clock, which needs a network (--network)";
            unused.extend([("step-time", why), ("straggler", why), ("interval-seconds", why)]);
        }
        if self.rule.forced_period().is_some() {
            let why = "a schedule's, but this rule merges after every step";
            unused.extend(ScheduleSpec::keys().into_iter().map(|key| (key, why)));
        }
        unused
    }

    /// Refuses every key of `given` (set in `source`: a file, or flags) that this configuration
    /// does not use.
    pub fn refuse_unused(&self, given: &[String], source: &str) -> Result<(), String> {
        let unused = self.unused_keys();
        match given.iter().find_map(|key| unused.iter().find(|(k, _)| k == key)) {
            Some((key, why)) => Err(format!("{source} sets '{key}', which this run does not use: it is {why}")),
            None => Ok(()),
        }
    }

    /// Checks that the workers fit on threads of this process.
    pub fn validate_threads(&self) -> Result<(), InvalidValue> {
        if self.workers > MAX_THREAD_WORKERS {
            let reason = format!(
                "each worker is a thread of this process holding its own model, optimizer state and batches; at most {MAX_THREAD_WORKERS} (more: --transport mpi)"
            );
            return Err(InvalidValue { option: "workers", value: self.workers.to_string(), reason });
        }
        Ok(())
    }

    /// Checks the rule and schedule against the real number of workers (`--workers` for
    /// threads, the number of ranks under MPI), by building them.
    pub fn validate_for(&self, workers: usize) -> Result<(), InvalidValue> {
        if let Err(reason) = burn_coop::learner::check_faults(&self.inject_fault, workers, self.peer_timeout) {
            let (option, value) = match self.peer_timeout {
                Some(seconds) if !(seconds.is_finite() && seconds > 0.0) => ("peer-timeout", seconds.to_string()),
                _ => ("inject-fault", self.inject_fault.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")),
            };
            return Err(InvalidValue { option, value, reason });
        }
        let (rule, _) = burn_coop::registry::build_pair(&self.rule, &self.schedule, workers)?;
        if let Some(mib) = self.bucket_mib
            && !rule.merges_in_buckets()
        {
            let reason = format!(
                "{} merges the whole model at once; buckets apply to average, sync, elastic with one anchor and diloco without --compressor",
                self.rule.describe()
            );
            return Err(InvalidValue { option: "bucket-mib", value: mib.to_string(), reason });
        }
        Ok(())
    }

    /// How the run merges, for logs (`"elastic averaging, tau = 4"`).
    pub fn describe_rule(&self) -> String {
        match self.rule.forced_period() {
            Some(_) => self.rule.describe(),
            None => format!("{}, {}", self.rule.describe(), self.schedule.describe()),
        }
    }

    /// The output folder, explicit or derived from the run's main choices.
    pub fn output_folder(&self) -> PathBuf {
        self.output.clone().unwrap_or_else(|| {
            let rule = match self.rule.forced_period() {
                Some(_) => self.rule.run_tag(),
                None => format!("{}-{}", self.rule.run_tag(), self.schedule.run_tag()),
            };
            PathBuf::from("runs").join(format!("{}-{rule}-m{}", serde_name_of(&self.model), self.workers))
        })
    }

    /// The rule's own defaults for what the run did not set (`given`: the keys set by flags or
    /// the file): its period for a fixed schedule without `--tau` (Overlap Local-SGD: 2) and
    /// its authors' buffer policy without `--buffers` (asynchronous local SGD: parameters only).
    pub fn take_rule_defaults(&mut self, given: &[String]) {
        self.schedule = self.rule.with_default_period(&self.schedule);
        if let (false, Some(policy)) = (given.iter().any(|key| key == "buffers"), self.rule.default_buffers()) {
            self.buffers = policy;
        }
    }

    /// The learner's part of the configuration.
    pub fn learner_config(&self) -> LearnerConfig {
        let optimizer = match self.optimizer {
            OptimizerName::Sgd => {
                OptimizerSpec::Sgd { momentum: self.momentum, nesterov: self.nesterov, weight_decay: self.weight_decay }
            }
            OptimizerName::Adam => OptimizerSpec::Adam { weight_decay: self.weight_decay },
            OptimizerName::Adamw => OptimizerSpec::AdamW { weight_decay: self.weight_decay },
        };
        let shape = match self.lr_schedule {
            LrShapeName::Constant => LrShape::Constant,
            LrShapeName::Step => LrShape::Step { gamma: self.gamma, milestones: self.milestones.clone() },
            LrShapeName::Cosine => LrShape::Cosine,
        };
        LearnerConfig {
            workers: self.workers,
            rule: self.rule.clone(),
            schedule: self.schedule.clone(),
            consensus_every: self.consensus_every,
            bucket_bytes: self
                .bucket_mib
                .map_or(burn_coop::DEFAULT_BUCKET_BYTES, |mib| (mib * (1 << 20) as f64) as usize),
            epochs: self.epochs,
            optimizer,
            lr: LrSchedule { lr: self.lr, shape, warmup_epochs: self.lr_warmup_epochs, min_lr: self.min_lr },
            buffers: self.buffers,
            inner_state: self.inner_state,
            eval_workers: self.eval_workers,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            output: self.output_folder(),
            max_steps: self.max_steps,
            seed: self.seed,
            progress: true,
            network: self.network.as_deref().and_then(|n| n.parse().ok()),
            step_time: StepTime {
                fixed: parse_step_time(&self.step_time).ok().flatten(),
                straggler_mean: self.straggler.as_deref().and_then(|s| parse_straggler(s).ok()),
            },
            faults: self.inject_fault.clone(),
            peer_timeout: self.peer_timeout,
        }
    }
}

pub use burn_coop::registry::serde_name_of;

/// The first non-finite number in a TOML table (nested tables and arrays included), with its key.
fn first_non_finite(table: &toml::Table) -> Option<(String, f64)> {
    fn find(key: &str, value: &toml::Value) -> Option<(String, f64)> {
        match value {
            toml::Value::Float(f) if !f.is_finite() => Some((key.to_string(), *f)),
            toml::Value::Array(items) => items.iter().find_map(|item| find(key, item)),
            toml::Value::Table(table) => table.iter().find_map(|(inner, v)| find(&format!("{key}.{inner}"), v)),
            _ => None,
        }
    }
    table.iter().find_map(|(key, value)| find(key, value))
}

/// The known key closest to `unknown` (at most a third of its letters, and at most three,
/// different), if any.
fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut previous = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let substitution = previous + usize::from(ca != *cb);
                previous = row[j + 1];
                row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
            }
        }
        row[b.len()]
    };
    let limit = unknown.chars().count().div_ceil(3).clamp(1, 3);
    known.iter().map(|k| (distance(unknown, k), *k)).filter(|(d, _)| *d <= limit).min().map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use std::any::TypeId;

    use burn_coop::testing::inputs::{Inputs, never_panics};
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    #[command(allow_negative_numbers = true)]
    struct Train {
        #[command(flatten)]
        args: TrainArgs,
    }

    /// `coop train FLAGS` resolved over the defaults, as `train::resolve` does it.
    fn flags(line: &str) -> Result<TrainConfig, String> {
        let parsed = Train::try_parse_from(std::iter::once("train").chain(line.split_whitespace()));
        let args = parsed.map_err(|e| e.to_string())?.args;
        let mut config = TrainConfig::default();
        args.apply(&mut config).map_err(|e| InvalidValue::from(e).to_string())?;
        config.refuse_unused(&args.given_keys(), "the command line")?;
        config.take_rule_defaults(&args.given_keys());
        let checked = config.validate().and_then(|()| config.validate_threads());
        checked.and_then(|()| config.validate_for(config.workers)).map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// A configuration file's text resolved over the defaults.
    fn file(text: &str) -> Result<TrainConfig, String> {
        let (mut config, keys) = TrainConfig::from_toml_str_with_keys(text)?;
        config.refuse_unused(&keys, "the file")?;
        config.take_rule_defaults(&keys);
        let checked = config.validate().and_then(|()| config.validate_threads());
        checked.and_then(|()| config.validate_for(config.workers)).map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn asynchronous_local_sgd_averages_parameters_only_unless_told() {
        assert_eq!(flags("--rule async").unwrap().buffers, BufferPolicy::KeepLocal);
        assert_eq!(flags("--rule async --buffers merge").unwrap().buffers, BufferPolicy::Merge);
        assert_eq!(file("rule = \"async\"\nbuffers = \"merge\"").unwrap().buffers, BufferPolicy::Merge);
        assert_eq!(file("rule = \"async\"").unwrap().buffers, BufferPolicy::KeepLocal);
        assert_eq!(flags("--rule average").unwrap().buffers, BufferPolicy::Merge);
        // With a warm-up (LAPSGD's recipe) the fixed schedule keeps its steps.
        let config = flags("--rule async --warmup-steps 780 --tau 8").unwrap();
        assert_eq!(config.learner_config().schedule.describe(), "tau = 8 after 780 synchronous steps");
    }

    #[test]
    fn no_float_flag_reads_nan_or_infinity_as_unset() {
        let command = Train::command();
        let floats: Vec<String> = command
            .get_arguments()
            .filter(|arg| arg.get_value_parser().type_id() == TypeId::of::<f64>())
            .filter_map(|arg| arg.get_long().map(String::from))
            .collect();
        assert!(floats.len() >= 18, "every float flag is here: {floats:?}");
        for flag in &floats {
            for value in ["NaN", "inf", "-inf"] {
                let error = Train::try_parse_from(["train", &format!("--{flag}={value}")]).unwrap_err().to_string();
                assert!(error.contains(&format!("--{flag}")) && error.contains(value), "--{flag} {value}: {error}");
            }
        }
        for (key, value) in [("outer-lr", "nan"), ("alpha", "inf"), ("lr", "-inf"), ("trigger-growth", "nan")] {
            let error = file(&format!("rule = \"diloco\"\n{key} = {value}")).unwrap_err();
            assert!(error.contains(&format!("'{key}'")) && error.contains("finite"), "{error}");
        }
    }

    #[test]
    fn a_negative_number_is_refused_by_its_flag_name() {
        let error = flags("--lr -0.1").unwrap_err();
        assert!(error.contains("--lr") && error.contains("-0.1"), "{error}");
    }

    #[test]
    fn settings_the_run_does_not_use_are_refused_by_name() {
        for (line, key) in [
            ("--step-time 0.1", "step-time"),
            ("--straggler exp:0.1", "straggler"),
            ("--schedule adacomm --interval-seconds 4", "interval-seconds"),
            ("--rule sync --tau 8", "tau"),
            ("--rule sync --schedule adacomm", "schedule"),
            ("--gamma 0.5", "gamma"),
            ("--lr-schedule step --min-lr 0.01", "min-lr"),
            ("--beta 0.3", "beta"),
            ("--optimizer adam --momentum 0.5", "momentum"),
        ] {
            let error = flags(line).unwrap_err();
            assert!(error.contains(&format!("'{key}'")) && error.contains("does not use"), "{line}: {error}");
        }
        let error = file("rule = \"sync\"\ntau = 8").unwrap_err();
        assert!(error.contains("'tau'"), "{error}");
        // Used, they are accepted.
        flags("--network bandwidth=1Gbit --step-time 0.1 --straggler exp:0.1").unwrap();
        flags("--lr-schedule step --gamma 0.5 --milestones 2,4").unwrap();
        flags("--partition dirichlet --beta 0.3").unwrap();
    }

    #[test]
    fn files_are_held_to_the_flags_rules() {
        for (text, key) in [
            ("schedule = \"adacomm\"\nnetwork = \"bandwidth=1Gbit\"\ninterval-seconds = -5.0", "interval-seconds"),
            ("keep-checkpoints = 0", "keep-checkpoints"),
            ("weight-decay = -1.0", "weight-decay"),
            ("min-lr = -1.0", "min-lr"),
            ("lr-warmup-epochs = -1.0", "lr-warmup-epochs"),
            ("lr-schedule = \"step\"\ngamma = 0.0", "gamma"),
            ("lr-schedule = \"step\"\nmilestones = [3, 2]", "milestones"),
            ("lr-schedule = \"step\"\nmilestones = [9]", "milestones"),
            ("lr = 0.1\nmin-lr = 0.5", "min-lr"),
            ("workers = 100000", "workers"),
            ("rule = \"async\"\nlocal-threads = 10000", "local-threads"),
        ] {
            let error = file(text).unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
        let error = file("rule = \"elastic\"\nalfa = 0.3").unwrap_err();
        assert!(error.contains("'alfa'") && error.contains("did you mean 'alpha'"), "{error}");
        let error = file("rule = \"elastic\"\nalpha = \"high\"").unwrap_err();
        assert!(error.contains("'alpha'") && error.contains("high") && !error.contains('{'), "{error}");
        let error = flags("--lr 0.1 --min-lr 0.5").unwrap_err();
        assert!(error.contains("min-lr"), "{error}");
    }

    #[test]
    fn a_written_configuration_reads_back_without_unused_keys() {
        for line in ["", "--rule sync", "--rule diloco --schedule adacomm", "--optimizer adam --lr-schedule step"] {
            let config = flags(line).unwrap();
            let back = file(&config.to_toml()).unwrap_or_else(|e| panic!("{line}: {e}\n{}", config.to_toml()));
            assert_eq!(back.to_toml(), config.to_toml(), "{line}");
        }
    }

    #[test]
    fn arbitrary_configuration_files_parse_or_are_refused() {
        let valid = [
            "rule = \"elastic\"\nalpha = 0.3\nworkers = 4\ntau = 2\n",
            "lr = 0.1\nlr-schedule = \"step\"\nmilestones = [1, 2]\ngamma = 0.5\n",
            "network = \"bandwidth=1Gbit,latency=50us\"\nstep-time = \"0.05\"\nstraggler = \"exp:0.1\"\n",
            "rule = \"choco\"\ntopology = \"ring\"\ncompressor = \"topk:0.1+sign\"\nconsensus-step = 0.5\n",
        ];
        let texts = Inputs::new(11).texts(&valid, "abcdelrtu=\"[]#.,:-+0123456789\n \\", 2000);
        let results = never_panics(&texts, |text| file(text));
        assert!(results.iter().filter(|r| r.is_ok()).count() > 20, "some edits still parse");
    }

    #[test]
    fn arbitrary_step_time_and_straggler_specs_parse_or_are_refused() {
        let texts = Inputs::new(12).texts(&["measured", "0.05", "exp:0.1"], "measurdxp:0.123456789e-+nif", 3000);
        for (text, (time, straggler)) in
            texts.iter().zip(never_panics(&texts, |t| (parse_step_time(t), parse_straggler(t))))
        {
            if let Ok(Some(seconds)) = time {
                assert!(seconds.is_finite() && seconds >= 0.0, "{text}");
            }
            if let Ok(mean) = straggler {
                assert!(mean.is_finite() && mean >= 0.0, "{text}");
            }
        }
    }
}
