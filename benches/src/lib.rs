//! # burn-coop benchmarks
//!
//! What the cooperative layer costs, each figure a ratio of two things measured side by side in
//! the same run (absolute times on a shared machine mean little):
//!
//! | id | ours | against | goal |
//! |---|---|---|---|
//! | P1 | [`LocalSgd::step`](burn_coop::LocalSgd::step) on a step without a merge | the bare `ModuleOptimizer::step` | ≤ 1.02 |
//! | P2 | one merge of 4 replicas (weights and BatchNorm buffers), per rule; an averaging merge of 4 × 64 MiB models at several bucket sizes | the bytes the merge must read and write at `memcpy` bandwidth | ≤ 2.0 |
//! | P3 | the learner, 4 replicas × batch 32, τ = 8 | a plain Burn loop at batch 128 (images/s) | ≥ 0.95 |
//! | P4 | local steps and merges with an all-reduce delayed by 60% of τ steps, overlapped rules and blocking averaging | the same local steps without merges | ≤ 1.05 (overlapped) |
//! | P6 | bytes per worker of the busiest merge: Streaming DiLoCo (4 fragments), DiLoCo with int8/fp8 pseudo-gradients, averaging int8 changes by the quantized all-reduce | DiLoCo's dense all-reduce; an all-gather of the same int8 payloads | report; ≤ 0.3; ≤ 2/m · 1.1 |
//! | P7 | ResNet-20 training on each Burn backend compiled in | PyTorch on CPU, same model, batch and threads | report (≥ 1.0 is the goal) |
//! | P8 | peak heap of 4 replicas training; heap held after training 4 × 64 MiB models with averaging, elastic, DiLoCo (and the peak of one merge) | 4 × one replica with its optimizer (weights + momentum) | ≤ 1.1; ≤ 1 + the rule's own state + 0.05 |
//!
//! `cargo bench -p burn-coop-benches` runs them all and prints one table; [`Scale::Smoke`] runs
//! the same code on a tiny model in seconds (the test suite does, so the benches cannot rot).

pub mod alloc;
pub mod machine;
pub mod p1_wrapper;
pub mod p2_merge;
pub mod p3_learner;
pub mod p4_overlap;
pub mod p5_compress;
pub mod p6_bytes;
pub mod p7_backends;
pub mod p8_memory;
pub mod report;
pub mod setup;

pub use report::{Goal, Row};

/// Any failure of a benchmark (a bad model, a lost worker, a child process that failed).
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// How much work each benchmark does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// ResNet-20 and enough repetitions for stable medians (several minutes).
    Full,
    /// A ResNet-8 on small batches, a few repetitions: checks that everything runs.
    Smoke,
}

impl Scale {
    /// CIFAR ResNet depth benchmarked.
    pub fn depth(self) -> usize {
        match self {
            Self::Full => 20,
            Self::Smoke => 8,
        }
    }

    /// Picks the full or the smoke value.
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        match self {
            Self::Full => full,
            Self::Smoke => smoke,
        }
    }
}

/// Which benchmarks to run and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Work per benchmark.
    pub scale: Scale,
    /// Benchmark ids to run (`P1`, `P2`, …); empty runs all.
    pub only: Vec<String>,
    /// The Python interpreter for P7's PyTorch side (`None`: `COOP_BENCH_PYTHON` or `python3`;
    /// skipped when it cannot import torch).
    pub python: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self { scale: Scale::Full, only: Vec::new(), python: None }
    }
}

impl Options {
    /// Whether benchmark `id` is selected.
    pub fn selected(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o.eq_ignore_ascii_case(id))
    }
}

/// Runs the selected benchmarks in order, printing each finished row to stderr as it goes, and
/// returns every row.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    type Bench = fn(&Options) -> Result<Vec<Row>, BenchError>;
    let benches: [(&str, Bench); 8] = [
        ("P1", p1_wrapper::run),
        ("P2", p2_merge::run),
        ("P3", p3_learner::run),
        ("P4", p4_overlap::run),
        ("P5", p5_compress::run),
        ("P6", p6_bytes::run),
        ("P7", p7_backends::run),
        ("P8", p8_memory::run),
    ];
    let mut rows = Vec::new();
    for (id, bench) in benches {
        if !options.selected(id) {
            continue;
        }
        eprintln!("running {id} ...");
        for row in bench(options)? {
            eprintln!("  {}", row.summary());
            rows.push(row);
        }
    }
    Ok(rows)
}
