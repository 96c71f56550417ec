//! The machine a table was measured on.

use std::process::Command;

/// One line: CPU model, cores, Burn thread count, date (UTC) and build features.
pub fn describe() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let features: Vec<&str> = [
        (cfg!(feature = "x86-v4"), "x86-v4"),
        (cfg!(feature = "ndarray"), "ndarray"),
        (cfg!(feature = "wgpu"), "wgpu"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    format!(
        "{cpu}, {cores} cores available, {} CPU threads for Burn, {date}, features: flex{}{}",
        crate::setup::cpu_threads(),
        if features.is_empty() { "" } else { ", " },
        features.join(", ")
    )
}
