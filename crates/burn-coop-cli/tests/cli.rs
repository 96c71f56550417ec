//! The `coop` binary: parsing, configuration merging, clear errors, and a short real run on
//! generated CIFAR-format data.

use std::process::{Command, Output};

mod common;

use common::generated_cifar;

fn coop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coop")).args(args).env_remove("BURN_COOP_CIFAR10").output().expect("run coop")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn topology_prints_w_and_zeta_as_json() {
    let output = coop(&["topology", "--topology", "ring", "--workers", "6", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let expected = (1.0 + 2.0 * (2.0 * std::f64::consts::PI / 6.0).cos()) / 3.0;
    assert!((report["zeta"].as_f64().unwrap() - expected).abs() < 1e-9, "{report}");
    assert_eq!(report["w"].as_array().unwrap().len(), 6);
    assert!((report["w"][0][1].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    let table = coop(&["topology", "--topology", "complete", "--workers", "4"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("complete graph on 4 workers") && text.contains("zeta (second-largest |eigenvalue|): 0.000000"),
        "{text}"
    );
}

/// `coop advise --json` for a setting, parsed.
fn advise(args: &[&str]) -> serde_json::Value {
    let output = coop(&[&["advise", "--json", "--params", "1000"], args].concat());
    assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn advise_prints_the_theory_of_a_setting() {
    let close = |value: &serde_json::Value, expected: f64| (value.as_f64().unwrap() - expected).abs() < 1e-9;
    let local = advise(&["--rule", "average", "--workers", "4", "--tau", "8", "--lr", "0.1"]);
    assert!(close(&local["zeta"], 0.0) && close(&local["error_floor_factor"], 7.0), "{local}");
    assert!(close(&local["bytes_per_merge"], 6000.0) && close(&local["bytes_per_step"], 750.0), "{local}");
    assert!(close(&local["eta_eff"], 0.1), "{local}");

    let ring = advise(&["--rule", "gossip", "--topology", "ring", "--workers", "8", "--tau", "4"]);
    let zeta = (1.0 + 2.0 * (std::f64::consts::PI / 4.0).cos()) / 3.0;
    let factor = (1.0 + zeta * zeta) / (1.0 - zeta * zeta);
    assert!(close(&ring["zeta"], zeta) && close(&ring["error_floor_factor"], factor * 4.0 - 1.0), "{ring}");
    assert_eq!(ring["decentralized_beats_averaging"], factor < 4.0);
    assert!(close(&ring["bytes_per_merge"], 8000.0), "two neighbours, 4000 bytes each: {ring}");

    let easgd = advise(&["--rule", "elastic", "--workers", "4", "--lr", "0.1"]);
    assert!(close(&easgd["zeta"], 4.0 / 6.0) && close(&easgd["eta_eff"], 0.08) && easgd["anchors"] == 1, "{easgd}");

    let adacomm = advise(&[
        "--rule",
        "average",
        "--lr",
        "0.1",
        "--step-time",
        "0.1",
        "--comm-delay",
        "0.5",
        "--loss-gap",
        "2",
        "--smoothness",
        "1",
        "--grad-variance",
        "4",
        "--wall-time",
        "100",
        "--tau",
        "5",
    ]);
    assert!(close(&adacomm["adacomm_tau_star"], 5f64.sqrt()) && close(&adacomm["seconds_per_step"], 0.2), "{adacomm}");

    // ResNet-20's own tensors: each compressed on its own (2,737 of 269,722 weights kept, with
    // their indices), its 1,376 BatchNorm statistics exact, the message sent to 3 others.
    let output = coop(&["advise", "--json", "--rule", "ec-local-sgd", "--compressor", "topk:0.01", "--workers", "4"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let topk: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(close(&topk["model_values"], 271_098.0), "{topk}");
    assert!(close(&topk["bytes_per_merge"], 3.0 * (8.0 + 8.0 * 2737.0 + 4.0 * 1376.0)), "{topk}");

    let table = coop(&["advise", "--rule", "matcha", "--workers", "8", "--params", "1000"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success() && text.contains("zeta") && text.contains("bytes per step"), "{text}");
    let bad = coop(&["advise", "--rule", "elastic", "--anchors", "3", "--workers", "4"]);
    assert!(!bad.status.success() && stderr(&bad).contains("anchors"), "{}", stderr(&bad));
}

#[test]
fn overlap_takes_its_papers_period_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::generated_cifar(dir.path(), 32);
    let run = |output: &str, extra: &[&str]| {
        let out = dir.path().join(output);
        let args = [
            &["train", "--rule", "overlap", "--workers", "2", "--batch-size", "4", "--max-steps", "8"][..],
            &["--verify", "false", "--data", data.to_str().unwrap(), "--output", out.to_str().unwrap()],
            extra,
        ]
        .concat();
        let output = coop(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        std::fs::read_to_string(out.join("config.toml")).unwrap()
    };
    assert!(run("default", &[]).contains("tau = 2"));
    assert!(run("told", &["--tau", "4"]).contains("tau = 4"));
}

#[test]
fn a_simulated_network_adds_a_clock_to_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::generated_cifar(dir.path(), 32);
    let out = dir.path().join("sim");
    let args = [
        &["train", "--workers", "2", "--tau", "4", "--batch-size", "4", "--max-steps", "12", "--verify", "false"][..],
        &["--network", "bandwidth=1Gbit,latency=0", "--step-time", "0.1"],
        &["--data", data.to_str().unwrap(), "--output", out.to_str().unwrap()],
    ]
    .concat();
    let output = coop(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = std::fs::read_to_string(out.join("syncs.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name}"));
    let (sim, bytes) = (column("sim_seconds"), column("bytes_sent_per_worker"));
    let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    assert_eq!(rows.len(), 3);
    let first = |row: &Vec<String>, k: usize| row[k].split(';').next().unwrap().parse::<f64>().unwrap();
    for pair in rows.windows(2) {
        let grown = first(&pair[1], sim) - first(&pair[0], sim);
        let sent = first(&pair[1], bytes) - first(&pair[0], bytes);
        // Four steps of 0.1 s and the merge's bytes at 1.25e8 B/s (the few statistics bytes
        // cost only their latency, here 0).
        let expected = 0.4 + sent / 1.25e8;
        assert!((grown - expected).abs() < 1e-6 * expected, "grew {grown}, expected {expected}");
    }
    assert!(
        std::fs::read_to_string(out.join("epochs.csv")).unwrap().lines().next().unwrap().contains("sim_comm_seconds")
    );
    for (flag, value) in [("--network", "bandwidth=fast"), ("--step-time", "slow"), ("--straggler", "5")] {
        let bad = coop(&["train", flag, value, "--max-steps", "1"]);
        assert!(!bad.status.success() && stderr(&bad).contains(&flag[2..]), "{flag}: {}", stderr(&bad));
    }
}

#[test]
fn compare_reports_time_and_bytes_to_the_synchronous_runs_final_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::generated_cifar(dir.path(), 32);
    let train = |name: &str, rule: &[&str]| {
        let out = dir.path().join(name);
        let args = [
            &["train", "--workers", "2", "--batch-size", "4", "--epochs", "2", "--verify", "false"][..],
            &["--network", "bandwidth=10MB,latency=1ms", "--step-time", "0.05"],
            &["--data", data.to_str().unwrap(), "--output", out.to_str().unwrap()],
            rule,
        ]
        .concat();
        let output = coop(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        out
    };
    let (sync, local) = (train("sync", &["--rule", "sync"]), train("local", &["--tau", "2"]));
    let prefix = dir.path().join("table-0.5");
    let output = coop(&[
        "compare",
        sync.to_str().unwrap(),
        local.to_str().unwrap(),
        "--window",
        "2",
        "-o",
        prefix.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let written = |extension: &str| std::fs::read_to_string(dir.path().join(format!("table-0.5.{extension}"))).unwrap();
    let csv = written("csv");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows[0][0], "sync");
    assert_eq!(rows[0][5], "1", "the synchronous run is its own reference");
    for row in &rows {
        let accuracy: f64 = row[7].parse().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "final test accuracy {accuracy}");
        let (to_target, whole): (f64, f64) = (row[3].parse().unwrap_or(0.0), row[8].parse().unwrap());
        assert!(whole >= to_target && whole > 0.0, "the whole run ({whole} s) ends after the target");
        // The whole run ends with its last epoch, on the slowest worker's clock.
        let epochs = std::fs::read_to_string(dir.path().join(row[0]).join("epochs.csv")).unwrap();
        let header: Vec<&str> = epochs.lines().next().unwrap().split(',').collect();
        let at = header.iter().position(|&h| h == "sim_seconds").unwrap();
        let last: Vec<&str> = epochs.lines().last().unwrap().split(',').collect();
        let end = last[at].split(';').map(|v| v.parse::<f64>().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!(whole, end, "{}", row[0]);
    }
    assert!(written("md").contains("| sync (`sync`) |"), "the extension is appended to the prefix");
    let bad = coop(&["compare", local.to_str().unwrap()]);
    assert!(!bad.status.success() && stderr(&bad).contains("needs a synchronous run"), "{}", stderr(&bad));

    // Charts: every run leaves one; `coop plot` draws several runs as PNG or SVG.
    assert!(std::fs::read_to_string(sync.join("curves.svg")).unwrap().contains("<svg"));
    let png = dir.path().join("loss.png");
    let svg = dir.path().join("loss.svg");
    for (path, x) in [(&png, "sim-time"), (&svg, "bytes")] {
        let (sync, local, path) = (sync.to_str().unwrap(), local.to_str().unwrap(), path.to_str().unwrap());
        let output = coop(&["plot", sync, local, "--x", x, "--window", "2", "-o", path]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("sent per worker (MB)") && text.contains("training loss"), "axis labels with units");
    assert!(text.contains("sync (sync)") && text.contains("average τ=2 (local)"), "one legend entry per run");
    let bad = coop(&["plot", sync.to_str().unwrap(), "-o", dir.path().join("x.gif").to_str().unwrap()]);
    assert!(!bad.status.success() && stderr(&bad).contains(".png or .svg"), "{}", stderr(&bad));
}

/// Each command line ends as a usage error (status 2) whose message contains its text.
fn assert_each_refused(cases: &[(&[&str], &str)]) {
    for (args, expected) in cases {
        let output = coop(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
}

#[test]
fn bad_values_are_named_like_clap_errors() {
    let cases: [(&[&str], &str); 5] = [
        (&["train", "--tau", "0"], "invalid value '0' for '--tau <TAU>': must be at least 1"),
        (&["train", "--rule", "elastic", "--alpha", "0.5", "--workers", "4"], "invalid value '0.5' for '--alpha'"),
        (&["train", "--topology", "hex"], "invalid value 'hex' for '--topology <TOPOLOGY>'"),
        (&["train", "--rule", "gossip", "--topology", "torus", "--workers", "7"], "7 workers cannot form a 2-D torus"),
        (&["train", "--devices", "quantum"], "unknown device 'quantum'"),
    ];
    assert_each_refused(&cases);
}

#[test]
fn a_bucket_size_is_refused_where_it_means_nothing() {
    let cases: [(&[&str], &str); 5] = [
        (&["train", "--bucket-mib", "0"], "invalid value '0' for '--bucket-mib <BUCKET_MIB>'"),
        (&["train", "--bucket-mib", "NaN"], "invalid value 'NaN' for '--bucket-mib <BUCKET_MIB>'"),
        (&["train", "--bucket-mib", "0.000001"], "invalid value '0.000001' for '--bucket-mib'"),
        (
            &["train", "--rule", "gossip", "--bucket-mib", "1"],
            "invalid value '1' for '--bucket-mib': gossip on a ring merges the whole model at once",
        ),
        // The default's value given explicitly is still a setting gossip does not use.
        (&["train", "--rule", "gossip", "--bucket-mib", "4"], "invalid value '4' for '--bucket-mib'"),
    ];
    assert_each_refused(&cases);
}

#[test]
fn an_injected_fault_stops_the_run_naming_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_cifar(dir.path(), 32);
    let base = ["train", "--data", data.to_str().unwrap(), "--verify", "false", "--workers", "2", "--batch-size", "8"];
    let run = dir.path().join("run");
    let output = coop(&[&base[..], &["--inject-fault", "1@3:exit", "--output", run.to_str().unwrap()]].concat());
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("worker 1 failed on purpose after step 3: injected fault 'exit'"),
        "{}",
        stderr(&output)
    );
    let cases: [(&[&str], &str); 4] = [
        (
            &["--inject-fault", "2@3"],
            "invalid value '2@3:panic' for '--inject-fault': the fault 2@3:panic is for worker 2",
        ),
        (&["--inject-fault", "1@3:hang"], "give a peer timeout"),
        (&["--inject-fault", "1@x"], "invalid value '1@x' for '--inject-fault <RANK@STEP[:KIND]>'"),
        (&["--peer-timeout", "0"], "invalid value '0' for '--peer-timeout <SECONDS>'"),
    ];
    for (args, expected) in cases {
        let output = coop(&[&base[..], args].concat());
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
    let file = dir.path().join("faults.toml");
    std::fs::write(&file, "workers = 2\ninject-fault = [\"0@2:hang\"]\npeer-timeout = -1.0\n").unwrap();
    let output = coop(&["train", "--config", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("'peer-timeout'"), "{}", stderr(&output));
}

#[test]
fn config_file_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "tau = 4\nlearning-rate = 0.1\n").unwrap();
    let output = coop(&["train", "--config", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("unknown key 'learning-rate' (`coop train --help`"), "{}", stderr(&output));
    std::fs::write(&file, "rule = \"elastic\"\nalfa = 0.3\n").unwrap();
    let output = coop(&["train", "--config", file.to_str().unwrap()]);
    assert!(stderr(&output).contains("unknown key 'alfa' (did you mean 'alpha'?)"), "{}", stderr(&output));
    std::fs::write(&file, "tau = 0\n").unwrap();
    let output = coop(&["train", "--config", file.to_str().unwrap()]);
    let expected = format!("the configuration file {}: invalid value '0' for 'tau'", file.display());
    assert!(stderr(&output).contains(&expected), "{}", stderr(&output));
    // The same value as a flag is named as the flag.
    let output = coop(&["train", "--config", file.to_str().unwrap(), "--schedule", "fixed", "--tau", "0"]);
    assert!(stderr(&output).contains("'--tau"), "{}", stderr(&output));
}

#[test]
fn missing_data_tells_how_to_point_at_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let output =
        coop(&["train", "--data", missing.to_str().unwrap(), "--output", dir.path().join("run").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("nowhere"), "{}", stderr(&output));
}

#[test]
fn a_short_run_merges_file_and_flags_writes_metrics_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_cifar(dir.path(), 32);
    let run = dir.path().join("run");
    let file = dir.path().join("run.toml");
    std::fs::write(&file, "workers = 2\ntau = 4\nbatch-size = 8\nepochs = 1\nrule = \"elastic\"\nverify = false\n")
        .unwrap();
    let args = [
        "train",
        "--config",
        file.to_str().unwrap(),
        "--tau",
        "2",
        "--data",
        data.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--checkpoint-every",
        "2",
    ];
    let output = coop(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("final test accuracy"), "{stdout}");

    let resolved: toml::Value = toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    assert_eq!(resolved["tau"].as_integer(), Some(2), "the flag overrides the file");
    assert_eq!(resolved["workers"].as_integer(), Some(2), "the file overrides the default");
    assert_eq!(resolved["rule"].as_str(), Some("elastic"));
    assert_eq!(resolved["lr"].as_float(), Some(0.2), "defaults fill the rest");

    // 2 workers x 80 images each / batch 8 = 10 steps, merges every 2 steps.
    let epochs = std::fs::read_to_string(run.join("epochs.csv")).unwrap();
    let last = epochs.lines().last().unwrap();
    assert!(last.starts_with("0,10,5,"), "{epochs}");
    assert_eq!(std::fs::read_to_string(run.join("syncs.csv")).unwrap().lines().count(), 6);
    assert!(run.join("checkpoints/LATEST").exists());

    let again = coop(&args);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already holds a run with checkpoints"), "{}", stderr(&again));
    let resumed = coop(&["train", "--resume", run.to_str().unwrap(), "--epochs", "2"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let epochs = std::fs::read_to_string(run.join("epochs.csv")).unwrap();
    assert!(epochs.lines().last().unwrap().starts_with("1,20,10,"), "{epochs}");
}

#[test]
fn a_setting_of_another_rule_is_named() {
    let output = coop(&["train", "--rule", "gossip", "--alpha", "0.3"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(
            "invalid value '0.3' for '--alpha': --alpha is a setting of the elastic, elastic-overlap rules, but this run uses gossip"
        ),
        "{}",
        stderr(&output)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.toml");
    std::fs::write(&file, "rule = \"average\"\ntopology = \"torus\"\n").unwrap();
    let output = coop(&["train", "--config", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("'topology' is a setting of the gossip rule, but this run uses average"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn event_triggered_gossip_counts_its_senders_and_never_waits_for_a_silent_worker() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::generated_cifar(dir.path(), 32);
    let senders = |threshold: &str| -> Vec<u64> {
        let out = dir.path().join(format!("squarm-{threshold}"));
        let args = [
            &["train", "--rule", "squarm", "--trigger-threshold", threshold, "--workers", "4", "--tau", "2"][..],
            &["--batch-size", "4", "--max-steps", "8", "--verify", "false"],
            &["--data", data.to_str().unwrap(), "--output", out.to_str().unwrap()],
        ]
        .concat();
        let output = coop(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        let text = std::fs::read_to_string(out.join("syncs.csv")).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let column = header.iter().position(|h| *h == "senders").expect("a senders column");
        assert_eq!(header[column + 1], "trigger_statistic");
        lines
            .map(|l| {
                let fields: Vec<&str> = l.split(',').collect();
                let statistic: f64 = fields[column + 1].parse().unwrap();
                assert!(statistic.is_finite() && statistic > 0.0, "‖x − x̂‖²/η² = {statistic}");
                fields[column].parse().unwrap()
            })
            .collect()
    };
    // Nobody reaches a huge threshold: four merges of empty messages, and the run completes.
    assert_eq!(senders("1e12"), vec![0; 4]);
    // Everybody passes a tiny one.
    assert_eq!(senders("1e-12"), vec![4; 4]);
}

#[test]
fn shared_rule_flags_reach_every_rule_that_has_them_and_only_those() {
    let refused = |args: &[&str], message: &str| {
        let output = coop(&[&["train"][..], args].concat());
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(message), "{args:?}: {}", stderr(&output));
    };
    refused(
        &["--rule", "gossip", "--compressor", "sign"],
        "--compressor is a setting of the average, diloco, streaming-diloco, ec-local-sgd, choco, squarm rules, but this run uses gossip",
    );
    refused(
        &["--rule", "average", "--outer-lr", "0.5"],
        "--outer-lr is a setting of the diloco, streaming-diloco rules, but this run uses average",
    );
    refused(
        &["--rule", "elastic", "--topology", "torus"],
        "--topology is a setting of the gossip, choco, squarm rules, but this run uses elastic",
    );
    refused(
        &["--rule", "gossip", "--consensus-step", "0.5"],
        "--consensus-step is a setting of the choco, squarm rules, but this run uses gossip",
    );
    // A shared flag reaches the rule in use: the resolved configuration says so.
    let dir = tempfile::tempdir().unwrap();
    let data = common::generated_cifar(dir.path(), 16);
    let out = dir.path().join("choco");
    let args = [
        &["train", "--rule", "choco", "--consensus-step", "0.3", "--compressor", "topk:0.5", "--topology", "complete"]
            [..],
        &["--workers", "3", "--batch-size", "4", "--max-steps", "2", "--verify", "false"],
        &["--data", data.to_str().unwrap(), "--output", out.to_str().unwrap()],
    ]
    .concat();
    let output = coop(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    for line in ["consensus-step = 0.3", "compressor = \"topk:0.5\"", "topology = \"complete\""] {
        assert!(config.lines().any(|l| l == line), "{line} in\n{config}");
    }
    let output = coop(&["train", "--rule", "choco", "--compressor", "lz4"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--compressor"), "{}", stderr(&output));
}

/// The README's results tables are what `coop report` writes from the committed run folders.
#[test]
fn the_readme_results_tables_are_the_run_folders() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = root.join("examples/cifar10-resnet/results/report.toml");
    let readme = root.join("README.md");
    let out = coop(&["report", manifest.to_str().unwrap(), "--check", readme.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
