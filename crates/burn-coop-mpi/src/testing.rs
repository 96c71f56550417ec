//! Deterministic training runs shared by the MPI test binaries and the in-process reference,
//! so both sides execute identical code and only the communicator differs.
//!
//! A [`Scenario`] trains the [`Tiny`] model (Linear(3→4) → BatchNorm(4) → Linear(4→2)) for
//! [`STEPS`] local steps of SGD with momentum and merges every [`TAU`] steps. Parameters and
//! gradients are fixed functions of the rank and step, so any two transports must end with the
//! same parameters.

use std::path::Path;
use std::process::Command;

use burn::optim::SgdConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::Device;
use burn_coop::comm::Traffic;
use burn_coop::compress::Compressor;
use burn_coop::rules::{
    ec_local_sgd::EcLocalSgdConfig, elastic::ElasticConfig, gossip::GossipConfig, hierarchical::HierarchicalConfig,
    squarm::SquarmConfig,
};
use burn_coop::{
    CoopError, LocalSgd,
    comm::Communicator,
    rules::{RuleSpec, averaging::Averaging, elastic::Elastic, gossip::Gossip},
    schedule::fixed::PeriodicSchedule,
    topology::Topology,
};
use serde::{Deserialize, Serialize};

pub use burn_coop::testing::{Tiny, flat, test_value as value};

/// Local steps per run.
pub const STEPS: u64 = 6;
/// Steps between merges.
pub const TAU: u64 = 2;
/// Learning rate.
pub const LR: f64 = 0.05;

/// The device the runs use: Flex with autodiff.
pub fn device() -> Device {
    Device::flex().autodiff()
}

/// A fresh [`Tiny`] whose every float tensor holds deterministic values for `seed`.
pub fn tiny_for(seed: usize) -> Tiny {
    burn_coop::testing::tiny_for(seed, &device())
}

/// Fixed gradients for every trainable tensor of `module`, depending on rank and step.
pub fn fixed_grads<M: burn::module::Module>(module: &M, rank: usize, step: u64) -> burn::optim::GradientsParams {
    burn_coop::testing::fixed_grads(module, rank, step, &Device::flex())
}

/// One deterministic training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Periodic averaging; every rank starts from its own model.
    Averaging,
    /// Elastic averaging (α = 2/(m+2)) from a given common anchor; every rank starts from its
    /// own model.
    Elastic,
    /// Elastic averaging where every rank starts from the same model, which becomes the anchor
    /// each rank keeps a copy of.
    ElasticCommonStart,
    /// Gossip on a ring with Metropolis–Hastings weights; every rank starts from its own model.
    GossipRing,
    /// DiLoCo with its defaults (outer Nesterov momentum); every rank starts from its own model.
    Diloco,
    /// Hierarchical averaging, 2 groups, a global average every 2nd merge (sub-communicators).
    Hierarchical,
    /// Elastic averaging with two anchors (a sub-communicator per anchor's group).
    ElasticAnchors,
    /// Gossip on the one-peer exponential graph (directed exchanges).
    OnePeerExponential,
    /// MATCHA on a ring, budget 0.5 (matchings drawn from the shared seed).
    Matcha,
    /// Overlap Local-SGD with its defaults (sums in flight across merges).
    Overlap,
    /// Elastic averaging with its all-reduce overlapped.
    ElasticOverlap,
    /// Local SGD with error-compensated double compression (top-25% then sign; all-gathers of
    /// byte payloads).
    EcLocalSgd,
    /// CHOCO-SGD on a ring with sign compression (exchanges of byte payloads).
    Choco,
    /// SQuARM-SGD on a ring with a threshold some merges do not reach (empty messages).
    Squarm,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 14] = [
        Scenario::Averaging,
        Scenario::Elastic,
        Scenario::ElasticCommonStart,
        Scenario::GossipRing,
        Scenario::Diloco,
        Scenario::Hierarchical,
        Scenario::ElasticAnchors,
        Scenario::OnePeerExponential,
        Scenario::Matcha,
        Scenario::Overlap,
        Scenario::ElasticOverlap,
        Scenario::EcLocalSgd,
        Scenario::Choco,
        Scenario::Squarm,
    ];

    /// The scenario's name, as used on command lines and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Averaging => "averaging",
            Scenario::Elastic => "elastic",
            Scenario::ElasticCommonStart => "elastic-common-start",
            Scenario::GossipRing => "gossip-ring",
            Scenario::Diloco => "diloco",
            Scenario::Hierarchical => "hierarchical",
            Scenario::ElasticAnchors => "elastic-anchors",
            Scenario::OnePeerExponential => "one-peer-exponential",
            Scenario::Matcha => "matcha",
            Scenario::Overlap => "overlap",
            Scenario::ElasticOverlap => "elastic-overlap",
            Scenario::EcLocalSgd => "ec-local-sgd",
            Scenario::Choco => "choco",
            Scenario::Squarm => "squarm",
        }
    }

    /// The scenario called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The registered rule of the scenarios that run one with its settings.
    fn rule_spec(self) -> Option<RuleSpec> {
        let spec = match self {
            Scenario::Diloco => RuleSpec::Diloco(Default::default()),
            Scenario::Hierarchical => {
                RuleSpec::Hierarchical(HierarchicalConfig { groups: Some(2), global_every: Some(2) })
            }
            Scenario::ElasticAnchors => RuleSpec::Elastic(ElasticConfig { alpha: None, anchors: Some(2) }),
            Scenario::OnePeerExponential => RuleSpec::Gossip(GossipConfig {
                topology: Some(burn_coop::topology::TopologySpec::OnePeerExponential),
                weights: None,
            }),
            Scenario::Matcha => RuleSpec::Matcha(Default::default()),
            Scenario::Overlap => RuleSpec::Overlap(Default::default()),
            Scenario::ElasticOverlap => RuleSpec::ElasticOverlap(Default::default()),
            Scenario::EcLocalSgd => RuleSpec::EcLocalSgd(EcLocalSgdConfig {
                compressor: Some(Compressor::TopK(0.25)),
                server_compressor: Some(Compressor::Sign),
            }),
            Scenario::Choco => RuleSpec::Choco(Default::default()),
            Scenario::Squarm => RuleSpec::Squarm(SquarmConfig {
                trigger_threshold: Some(0.05),
                trigger_growth: Some(0.5),
                ..Default::default()
            }),
            _ => return None,
        };
        Some(spec)
    }

    /// Runs the scenario on this worker and gives the communicator back for the next run.
    pub fn run<C: Communicator + 'static>(self, comm: C) -> Result<(Outcome, Box<dyn Communicator>), CoopError> {
        let rank = comm.rank();
        let m = comm.world_size();
        let model = match self {
            Scenario::ElasticCommonStart => tiny_for(0),
            _ => tiny_for(rank),
        };
        let inner = SgdConfig::new().with_momentum(Some(MomentumConfig::new())).init();
        let schedule = PeriodicSchedule::every(TAU)?;
        let mut optim = match self {
            Scenario::Averaging => LocalSgd::new(inner, Averaging::new(), schedule, comm)?,
            Scenario::Elastic => {
                let anchor: Vec<f32> = (0..flat(&model).len()).map(|k| value(9, k, 7)).collect();
                LocalSgd::new(inner, Elastic::optimal(m)?.with_anchor(anchor), schedule, comm)?
            }
            Scenario::ElasticCommonStart => LocalSgd::new(inner, Elastic::optimal(m)?, schedule, comm)?,
            Scenario::GossipRing => {
                LocalSgd::new(inner, Gossip::on(&Topology::ring(m)?)?, schedule, comm)?.with_consensus_every(1)
            }
            _ => {
                let spec = self.rule_spec().expect("the other scenarios name a registered rule");
                let rule = spec.build(m)?;
                LocalSgd::new(inner, rule, schedule, comm)?.with_consensus_every(1)
            }
        };
        let mut model = model;
        for step in 0..STEPS {
            let grads = fixed_grads(&model, rank, step);
            model = optim.step(LR, model, grads)?;
        }
        let stats = optim.stats();
        let mut state = optim.state();
        let traffic = optim.synchronizer().traffic_by_kind().total();
        let comm = optim.into_comm();
        let anchor = state.records.records.get_mut("rule").and_then(|r| r.take_buffer("anchor"));
        let outcome = Outcome {
            scenario: self,
            rank,
            world_size: m,
            params: flat(&model).iter().map(|v| v.to_bits()).collect(),
            anchor: anchor.map(|a| a.iter().map(|v| v.to_bits()).collect()),
            syncs: stats.syncs,
            traffic,
            consensus_distance: stats.last_consensus_distance,
        };
        Ok((outcome, comm))
    }
}

/// What one worker ended a [`Scenario`] with. Floats are stored as their bit patterns so a
/// round trip through JSON is exact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The scenario run.
    pub scenario: Scenario,
    /// The worker's rank.
    pub rank: usize,
    /// Number of workers.
    pub world_size: usize,
    /// Final flat parameters (buffers included), as `f32::to_bits`.
    pub params: Vec<u32>,
    /// Final anchor of rules that keep one, as `f32::to_bits`.
    pub anchor: Option<Vec<u32>>,
    /// Merges done.
    pub syncs: u64,
    /// Traffic counted during the run (every collective of the synchronizer).
    pub traffic: Traffic,
    /// Consensus distance measured at the last merge.
    pub consensus_distance: Option<f64>,
}

impl Outcome {
    /// The final parameters.
    pub fn params(&self) -> Vec<f32> {
        self.params.iter().map(|&b| f32::from_bits(b)).collect()
    }

    /// The final anchor, if any.
    pub fn anchor(&self) -> Option<Vec<f32>> {
        self.anchor.as_ref().map(|a| a.iter().map(|&b| f32::from_bits(b)).collect())
    }

    /// The file a worker writes its outcome to in `dir`.
    pub fn file_name(scenario: Scenario, rank: usize) -> String {
        format!("{}-rank{rank}.json", scenario.name())
    }

    /// Writes the outcome as JSON into `dir`.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(Self::file_name(self.scenario, self.rank)), json)
    }

    /// Reads the outcome `scenario`/`rank` from `dir`.
    pub fn load(dir: &Path, scenario: Scenario, rank: usize) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(dir.join(Self::file_name(scenario, rank)))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

/// The path of `mpirun` when it is on `PATH`.
pub fn find_mpirun() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("mpirun")).find(|p| p.is_file())
}

/// An `mpirun -np <np>` command for this machine: shared memory and loopback only, yielding
/// when idle, oversubscription allowed, runnable as root (OpenMPI flags).
pub fn mpirun_local(mpirun: &Path, np: usize) -> Command {
    let mut command = Command::new(mpirun);
    command
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--mca", "btl", "self,vader", "--mca", "oob_tcp_if_include", "lo"])
        .args(["--mca", "mpi_yield_when_idle", "1", "-np", &np.to_string()]);
    command
}

/// How a child process ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status, or `None` when it was killed for running past the deadline.
    pub status: Option<std::process::ExitStatus>,
    /// Time until it ended.
    pub elapsed: std::time::Duration,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `command` with its output captured, killing it when it runs longer than `deadline`.
pub fn run_with_deadline(mut command: Command, deadline: std::time::Duration) -> std::io::Result<Finished> {
    use std::process::Stdio;
    use std::time::Instant;

    let dir = std::env::temp_dir();
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = format!("burn-coop-mpi-{}-{run}", std::process::id());
    let (out_path, err_path) = (dir.join(format!("{tag}.out")), dir.join(format!("{tag}.err")));
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&out_path)?))
        .stderr(Stdio::from(std::fs::File::create(&err_path)?))
        .spawn()?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    Ok(Finished { status, elapsed, stdout, stderr })
}
