//! Every benchmark runs end to end at the smoke scale (a tiny model, a few repetitions) and
//! produces finite, positive figures. Timings are not judged here.

use burn_coop_benches::alloc::CountingAllocator;
use burn_coop_benches::{Goal, Options, Scale};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn every_benchmark_runs_at_smoke_scale() {
    let options = Options { scale: Scale::Smoke, ..Options::default() };
    let rows = burn_coop_benches::run(&options).expect("benchmarks run");
    let count = |id: &str| rows.iter().filter(|r| r.id == id).count();
    assert_eq!(count("P1"), 2);
    assert_eq!(count("P2"), 16, "per rule: the whole merge and its three parts; the wide model at four bucket sizes");
    let p2_goals = rows.iter().filter(|r| r.id == "P2" && r.goal == Goal::AtMost(2.0)).count();
    assert_eq!(p2_goals, 4, "one goal row per rule, and the wide model's default bucket size");
    assert_eq!(count("P3"), 1);
    assert_eq!(count("P4"), 3, "two overlapped rules and blocking averaging");
    assert_eq!(count("P6"), 4, "Streaming DiLoCo, two quantizers for DiLoCo, quantized averaging");
    for row in rows.iter().filter(|r| r.id == "P6" && r.goal != Goal::Report) {
        assert_eq!(row.met(), Some(true), "bytes are deterministic: {}", row.summary());
    }
    assert!(count("P7") >= 1, "at least the Flex backend");
    assert_eq!(count("P8"), 8, "ResNet peak and held; held and peak of the wide model per rule");
    for row in &rows {
        if row.id != "P7" {
            assert!(row.ratio.is_finite() && row.ratio > 0.0, "{}", row.summary());
        }
        assert!(!row.ours.is_empty() && !row.reference.is_empty());
    }
    // P7's PyTorch side is not run at the smoke scale: no ratio, and it says why.
    let p7 = rows.iter().find(|r| r.id == "P7").unwrap();
    assert!(p7.ratio.is_nan() && p7.reference.contains("smoke"), "{}", p7.summary());
    assert_eq!(p7.goal, Goal::Report);
    let table = burn_coop_benches::report::markdown(&rows);
    assert_eq!(table.lines().count(), rows.len() + 2);
}

#[test]
fn the_pytorch_script_builds_the_same_model() {
    let script = std::fs::read_to_string(burn_coop_benches::p7_backends::pytorch_script()).unwrap();
    assert!(script.contains("nesterov=True") && script.contains("weight_decay=5e-4"));
    assert!(script.contains("bias=False"), "convolutions without bias, as ours");
}
