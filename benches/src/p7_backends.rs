//! P7: ResNet-20 training throughput on each Burn backend in the build, against PyTorch on CPU.
//!
//! The Burn side times full training steps (forward, loss read-out, backward, SGD step) on
//! random images, median over steps after a warm-up. The PyTorch side is
//! `benches/pytorch/resnet20_train.py`: the same model (269,722 parameters, checked), optimizer,
//! batch and thread count. It runs when the interpreter (`COOP_BENCH_PYTHON`, default
//! `python3`) can import torch; otherwise the row says so.

use std::path::PathBuf;
use std::process::Command;

use burn::tensor::Device;
use burn_coop_vision::models::count_trainable_params;

use crate::setup::{cpu_threads, median, resnet, seconds, sgd, train_step};
use crate::{BenchError, Goal, Options, Row};

/// The Burn devices compiled into this build, by backend name.
pub fn backends() -> Vec<(&'static str, Device)> {
    #[allow(unused_mut)]
    let mut devices = vec![("flex", Device::flex())];
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    devices.push(("ndarray", Device::ndarray()));
    #[cfg(feature = "wgpu")]
    devices.push(("wgpu", Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)));
    devices
}

/// Runs P7.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let depth = scale.depth();
    let threads = cpu_threads();
    let mut rows = Vec::new();
    for (name, device) in backends() {
        // NdArray's backward is very slow (no native convolution backward): fewer steps.
        let slow = name == "ndarray";
        let batches: &[usize] = match (scale, name) {
            (crate::Scale::Smoke, _) => &[2],
            (_, "flex") => &[32, 128],
            _ => &[32],
        };
        for &batch in batches {
            let (warmup, steps) = if slow { (1, 2) } else { scale.pick((3, if batch > 32 { 6 } else { 12 }), (1, 2)) };
            let ours = match burn_images_per_second(&device, depth, batch, warmup, steps) {
                Ok(ips) => ips,
                Err(error) => {
                    eprintln!("  P7: {name} could not train: {error}");
                    continue;
                }
            };
            let pytorch = match scale {
                crate::Scale::Full => pytorch_images_per_second(options, batch, threads),
                crate::Scale::Smoke => Err("not run at the smoke scale".into()),
            };
            let (reference, ratio) = match pytorch {
                Ok(ips) => (format!("PyTorch {ips:.1} img/s"), ours / ips),
                Err(reason) => (format!("PyTorch: {reason}"), f64::NAN),
            };
            rows.push(Row {
                id: "P7",
                what: format!("ResNet-{depth} training, batch {batch}, {threads} threads"),
                ours: format!("{name} {ours:.1} img/s"),
                reference,
                ratio,
                goal: Goal::Report,
            });
        }
    }
    Ok(rows)
}

fn burn_images_per_second(
    device: &Device,
    depth: usize,
    batch: usize,
    warmup: usize,
    steps: usize,
) -> Result<f64, BenchError> {
    let device = device.clone().autodiff();
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<f64, BenchError> {
        let mut model = resnet(depth, &device)?;
        let mut optim = sgd();
        let mut times = Vec::new();
        for step in 0..warmup + steps {
            let (elapsed, next) = seconds(&device, || train_step(model, &mut optim, batch, &device))?;
            model = next?;
            if step >= warmup {
                times.push(elapsed);
            }
        }
        Ok(batch as f64 / median(&times))
    }));
    attempt.unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into());
        Err(text.into())
    })
}

/// The PyTorch script's path.
pub fn pytorch_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pytorch").join("resnet20_train.py")
}

fn pytorch_images_per_second(options: &Options, batch: usize, threads: usize) -> Result<f64, String> {
    let python =
        options.python.clone().or_else(|| std::env::var("COOP_BENCH_PYTHON").ok()).unwrap_or_else(|| "python3".into());
    let steps = if batch > 32 { 6 } else { 12 };
    let output = Command::new(&python)
        .arg(pytorch_script())
        .args(["--batch", &batch.to_string(), "--steps", &steps.to_string(), "--warmup", "3"])
        .args(["--threads", &threads.to_string()])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("No module named 'torch'") {
            return Err(format!("not installed for {python} (see benches/README.md)"));
        }
        return Err(format!("{python} failed: {}", stderr.lines().last().unwrap_or("")));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |key: &str| -> Option<f64> {
        let rest = stdout.split(&format!("\"{key}\": ")).nth(1)?;
        rest.split([',', '}']).next()?.trim().parse().ok()
    };
    let params = field("params").ok_or("no parameter count in the script's output")? as usize;
    let expected = count_trainable_params(&resnet(20, &Device::flex()).map_err(|e| e.to_string())?);
    if params != expected {
        return Err(format!("the PyTorch model has {params} parameters, ours {expected}"));
    }
    field("images_per_second").ok_or_else(|| "no throughput in the script's output".into())
}
