//! Both versions of the example train and print one held-out loss per worker; the cooperative
//! one ends with the workers agreeing closely, the plain one does not.

use std::process::Command;

fn losses(binary: &str) -> Vec<f64> {
    let output = Command::new(binary).arg("64").output().expect("run the example");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap_or_else(|_| panic!("{line}")))
        .collect()
}

#[test]
fn local_sgd_workers_agree_and_plain_workers_do_not() {
    let cooperative = losses(env!("CARGO_BIN_EXE_swap-optimizer"));
    let plain = losses(env!("CARGO_BIN_EXE_plain"));
    assert_eq!((cooperative.len(), plain.len()), (4, 4));
    // 64 steps with τ = 8: the last step is a merge, so all four models are the same model.
    assert!(cooperative.windows(2).all(|w| w[0] == w[1]), "{cooperative:?}");
    assert!(plain.windows(2).any(|w| w[0] != w[1]), "{plain:?}");
    assert!(cooperative.iter().chain(&plain).all(|l| l.is_finite() && *l < 1.0), "{cooperative:?} {plain:?}");
}
