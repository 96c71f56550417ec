//! Serializable descriptions of a run's inner optimizer and learning-rate schedule (the rule's
//! and the synchronization schedule's live in [`crate::registry`]).

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};
use serde::{Deserialize, Serialize};

/// The inner optimizer of every worker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum OptimizerSpec {
    /// SGD with momentum (dampening 0, as PyTorch) and L2 weight decay.
    Sgd {
        /// Momentum factor (0 disables momentum).
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// Adam with L2 weight decay.
    Adam {
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// AdamW (decoupled weight decay).
    AdamW {
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self::Sgd { momentum: 0.9, nesterov: true, weight_decay: 5e-4 }
    }
}

impl OptimizerSpec {
    /// Builds the Burn optimizer.
    pub fn build(&self) -> ModuleOptimizer {
        let decay = |w: f64| (w > 0.0).then(|| WeightDecayConfig::new(w as f32));
        match *self {
            Self::Sgd { momentum, nesterov, weight_decay } => {
                SgdConfig::new()
                    .with_momentum((momentum > 0.0).then(|| {
                        MomentumConfig::new().with_momentum(momentum).with_dampening(0.0).with_nesterov(nesterov)
                    }))
                    .with_weight_decay(decay(weight_decay))
                    .init()
            }
            Self::Adam { weight_decay } => AdamConfig::new().with_weight_decay(decay(weight_decay)).init(),
            Self::AdamW { weight_decay } => AdamWConfig::new().with_weight_decay(weight_decay as f32).init(),
        }
    }
}

/// The shape of the learning rate over training (after the warm-up).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum LrShape {
    /// Constant.
    Constant,
    /// Multiply by `gamma` at each milestone epoch.
    Step {
        /// Factor applied at each milestone.
        gamma: f64,
        /// Epochs (counted from 0) at which the factor is applied.
        milestones: Vec<usize>,
    },
    /// Cosine decay from the peak to `min_lr` at the last step.
    #[default]
    Cosine,
}

/// The learning rate as a function of the global step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Shape after the warm-up.
    pub shape: LrShape,
    /// Linear warm-up length in epochs (fractions allowed), from `lr / 10` to `lr`.
    pub warmup_epochs: f64,
    /// Final learning rate of the cosine shape.
    pub min_lr: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self { lr: 0.1, shape: LrShape::Cosine, warmup_epochs: 1.0, min_lr: 0.0 }
    }
}

impl LrSchedule {
    /// The learning rate used for step `step` (0-based) of a run of `total_steps` steps with
    /// `steps_per_epoch` steps per epoch.
    pub fn at(&self, step: u64, steps_per_epoch: u64, total_steps: u64) -> f64 {
        let warmup = (self.warmup_epochs * steps_per_epoch as f64).round() as u64;
        if step < warmup {
            let start = self.lr / 10.0;
            return start + (self.lr - start) * (step + 1) as f64 / warmup as f64;
        }
        match &self.shape {
            LrShape::Constant => self.lr,
            LrShape::Step { gamma, milestones } => {
                let epoch = (step / steps_per_epoch.max(1)) as usize;
                self.lr * gamma.powi(milestones.iter().filter(|&&m| epoch >= m).count() as i32)
            }
            LrShape::Cosine => {
                let span = total_steps.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_the_floor() {
        let schedule = LrSchedule { lr: 0.4, shape: LrShape::Cosine, warmup_epochs: 1.0, min_lr: 0.0 };
        assert!((schedule.at(0, 10, 50) - (0.04 + 0.36 / 10.0)).abs() < 1e-12);
        assert!((schedule.at(9, 10, 50) - 0.4).abs() < 1e-12);
        assert!((schedule.at(10, 10, 50) - 0.4).abs() < 1e-12);
        assert!((schedule.at(30, 10, 50) - 0.2).abs() < 1e-12);
        assert!(schedule.at(49, 10, 50) < 0.001);
    }

    #[test]
    fn step_decay_applies_at_milestones() {
        let shape = LrShape::Step { gamma: 0.1, milestones: vec![2, 4] };
        let schedule = LrSchedule { lr: 1.0, shape, warmup_epochs: 0.0, min_lr: 0.0 };
        let lrs: Vec<f64> = (0..6).map(|epoch| schedule.at(epoch * 5, 5, 30)).collect();
        let expected = [1.0, 1.0, 0.1, 0.1, 0.01, 0.01];
        for (lr, e) in lrs.iter().zip(expected) {
            assert!((lr - e).abs() < 1e-12, "{lrs:?}");
        }
    }
}
