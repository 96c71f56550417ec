//! Train ResNet-20 on CIFAR-10 with four cooperating replicas: each takes 8 local SGD steps on
//! its own quarter of the data, then they average their models.
//!
//! ```sh
//! cargo run --release -p cifar10-resnet -- [EPOCHS] [CIFAR10_PATH]
//! ```

use std::sync::Arc;

use burn::tensor::Device;
use burn_coop::learner::{LrSchedule, LrShape};
use burn_coop::rules::averaging::AveragingConfig;
use burn_coop::schedule::fixed::FixedConfig;
use burn_coop::{
    learner::{Learner, LearnerConfig},
    rules::RuleSpec,
    schedule::ScheduleSpec,
};
use burn_coop_vision::task::{CifarTask, ModelKind};
use burn_coop_vision::{Cifar10, LocateOptions, Partition, Verify, locate};

#[allow(unreachable_code)]
fn device() -> Device {
    #[cfg(feature = "cuda")]
    return Device::cuda(0);
    #[cfg(feature = "wgpu")]
    return Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    Device::flex()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let epochs: usize = args.next().map_or(Ok(5), |s| s.parse())?;
    let data = args.next();

    // CIFAR-10: from the given path, $BURN_COOP_CIFAR10, datasets/cifar10/, or downloaded.
    let mut options = LocateOptions::new();
    if let Some(path) = data {
        options = options.with_path(path);
    }
    let (train, test) = Cifar10::load_splits(&locate(&options)?, Verify::Official)?;

    // Four workers, each with an equal random quarter of the training set and batches of 32.
    let workers = 4;
    let partition = Partition::iid(train.len(), workers, 1)?;
    let task = CifarTask::new(Arc::new(train), Arc::new(test), partition, ModelKind::Resnet20, 32, true, 1);

    // Local SGD: average every 8 steps; SGD with Nesterov momentum, warm-up then cosine decay.
    let config = LearnerConfig {
        workers,
        rule: RuleSpec::Average(AveragingConfig::default()),
        schedule: ScheduleSpec::Fixed(FixedConfig { tau: Some(8), warmup_steps: None }),
        epochs,
        lr: LrSchedule { lr: 0.2, shape: LrShape::Cosine, warmup_epochs: 1.0, min_lr: 0.0 },
        output: "runs/cifar10-resnet-example".into(),
        ..LearnerConfig::default()
    };
    let summary = Learner::new(task, config, vec![device()]).run()?;

    if let Some(last) = summary.last_epoch() {
        println!("test accuracy of the average model: {:.2}%", 100.0 * last.test_accuracy);
    }
    Ok(())
}
