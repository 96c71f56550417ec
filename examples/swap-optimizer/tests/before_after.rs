//! The README's before/after is the real one: its diff is the diff of `src/bin/plain.rs` and
//! `src/main.rs`, with the count it claims; the workers share one data set without overlap; and
//! a run repeats bit for bit.

use std::collections::BTreeSet;
use std::process::Command;

use burn::data::dataset::Dataset;
use burn_coop::{CoopError, launch};
use swap_optimizer::dataset;

/// The lines of a file after its module doc comment.
fn code(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    text.lines().skip_while(|line| line.starts_with("//!") || line.is_empty()).map(String::from).collect()
}

/// A shortest line diff (longest common subsequence): each line prefixed with ' ', '-' or '+'.
fn diff(before: &[String], after: &[String]) -> Vec<String> {
    let (n, m) = (before.len(), after.len());
    let mut common = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            common[i][j] =
                if before[i] == after[j] { common[i + 1][j + 1] + 1 } else { common[i + 1][j].max(common[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && before[i] == after[j] {
            lines.push(format!(" {}", before[i]));
            (i, j) = (i + 1, j + 1);
        } else if j == m || (i < n && common[i + 1][j] >= common[i][j + 1]) {
            lines.push(format!("-{}", before[i]));
            i += 1;
        } else {
            lines.push(format!("+{}", after[j]));
            j += 1;
        }
    }
    lines
}

/// The lines of the first ```diff block after `marker` in `readme`.
fn diff_block(readme: &str, marker: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{}/{readme}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let after = &text[text.find(marker).unwrap_or_else(|| panic!("{readme} has no '{marker}'"))..];
    let start = after.find("```diff\n").expect("a diff block") + "```diff\n".len();
    let end = start + after[start..].find("```").expect("the block ends");
    after[start..end].lines().map(String::from).collect()
}

#[test]
fn the_readmes_show_the_real_diff_and_count_it_right() {
    let lines = diff(&code("src/bin/plain.rs"), &code("src/main.rs"));
    let removed = lines.iter().filter(|l| l.starts_with('-')).count();
    let added = lines.iter().filter(|l| l.starts_with('+')).count();
    let claim = format!("{removed} lines removed and {added} added");
    for readme in ["../../README.md", "README.md"] {
        let shown = diff_block(readme, "The complete before/after");
        assert_eq!(shown, lines, "{readme}: the diff block must be the diff of the two files:\n{}", lines.join("\n"));
        let text = std::fs::read_to_string(format!("{}/{readme}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(text.contains(&claim), "{readme} must say '{claim}'");
    }
}

#[test]
fn every_worker_trains_on_its_own_part_of_one_data_set() {
    let (train, _) = dataset(4096, 7);
    let shards = launch(4, |worker| {
        let shard = worker.shard(train.clone());
        Ok::<_, CoopError>((0..shard.len()).map(|i| shard.get(i).unwrap().x.map(f32::to_bits)).collect::<Vec<_>>())
    })
    .unwrap();
    let all: Vec<[u32; 4]> = (0..train.len()).map(|i| train.get(i).unwrap().x.map(f32::to_bits)).collect();
    assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), [896, 896, 896, 896]);
    assert_eq!(shards.concat(), all, "the shards are disjoint and cover the training set");
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), all.len(), "no sample twice");
}

#[test]
fn a_cooperative_run_repeats_bit_for_bit() {
    let run = || Command::new(env!("CARGO_BIN_EXE_swap-optimizer")).arg("2").output().unwrap();
    let (first, second) = (run(), run());
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let printed = String::from_utf8(first.stdout).unwrap();
    assert_eq!(printed.lines().count(), 2, "only worker 0 prints, once per epoch: {printed}");
    assert_eq!(printed, String::from_utf8(second.stdout).unwrap());
}
