//! Both versions of the example train: each prints one validation loss per epoch, and it falls.

use std::process::Command;

fn losses(binary: &str, epochs: usize) -> Vec<f64> {
    let output = Command::new(binary).arg(epochs.to_string()).output().expect("run the example");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap_or_else(|_| panic!("{line}")))
        .collect()
}

#[test]
fn the_single_loop_and_the_cooperative_one_both_learn() {
    for binary in [env!("CARGO_BIN_EXE_plain"), env!("CARGO_BIN_EXE_swap-optimizer")] {
        let losses = losses(binary, 3);
        assert_eq!(losses.len(), 3, "{binary}: one line per epoch");
        assert!(losses[2] < losses[0] && losses[2] < 0.01, "{binary}: {losses:?}");
    }
}
