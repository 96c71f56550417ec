//! P1: what [`LocalSgd`] adds to an optimizer step that does not merge.
//!
//! Two identical ResNets train side by side on the same batches, one with the bare
//! `ModuleOptimizer`, one with the same optimizer inside `LocalSgd` (one worker, a period longer
//! than the run, so no step merges). Only the `step` calls are timed, alternating which goes
//! first; forward and backward run outside the clock. A whole training step is also compared.

use burn::module::Module;
use burn_coop::{LocalSgd, comm::InProcessGroup, rules::averaging::Averaging, schedule::fixed::PeriodicSchedule};

use crate::setup::{fmt_seconds, gradients, median, random_batch, reference_device, resnet, seconds, sgd};
use crate::{BenchError, Goal, Options, Row};

/// Runs P1.
pub fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let scale = options.scale;
    let (batch, reps) = (scale.pick(32, 4), scale.pick(60, 4));
    let device = reference_device().autodiff();
    let mut bare_model = resnet(scale.depth(), &device)?;
    // An independent replica (clones would share BatchNorm state) with the same weights.
    let mut coop_model = resnet(scale.depth(), &device)?.load_record(bare_model.clone().into_record());
    let mut bare = sgd();
    let comm = InProcessGroup::new(1).into_communicators().remove(0);
    let mut coop = LocalSgd::new(sgd(), Averaging::new(), PeriodicSchedule::every(u64::MAX)?, comm)?;

    let (mut bare_step, mut coop_step, mut bare_total, mut coop_total) = (vec![], vec![], vec![], vec![]);
    for rep in 0..reps + 2 {
        let (images, targets) = random_batch(batch, &device);
        let warm = rep >= 2;
        let mut bare_turn = |model: burn_coop_vision::models::CifarResNet| -> Result<_, BenchError> {
            let (forward, (_, grads)) = seconds(&device, || gradients(&model, images.clone(), targets.clone()))?;
            let (step, model) = seconds(&device, || bare.step(0.05, model, grads))?;
            if warm {
                bare_step.push(step);
                bare_total.push(forward + step);
            }
            Ok(model)
        };
        let mut coop_turn = |model: burn_coop_vision::models::CifarResNet| -> Result<_, BenchError> {
            let (forward, (_, grads)) = seconds(&device, || gradients(&model, images.clone(), targets.clone()))?;
            let (step, model) = seconds(&device, || coop.step(0.05, model, grads))?;
            if warm {
                coop_step.push(step);
                coop_total.push(forward + step);
            }
            Ok(model?)
        };
        if rep % 2 == 0 {
            bare_model = bare_turn(bare_model)?;
            coop_model = coop_turn(coop_model)?;
        } else {
            coop_model = coop_turn(coop_model)?;
            bare_model = bare_turn(bare_model)?;
        }
    }
    if coop.stats().syncs != 0 {
        return Err("P1 must not merge".into());
    }
    let (b, c) = (median(&bare_step), median(&coop_step));
    let (bt, ct) = (median(&bare_total), median(&coop_total));
    let depth = scale.depth();
    Ok(vec![
        Row {
            id: "P1",
            what: format!("optimizer step without merge, ResNet-{depth}, batch {batch} (median of {reps})"),
            ours: format!("LocalSgd {}", fmt_seconds(c)),
            reference: format!("bare {}", fmt_seconds(b)),
            ratio: c / b,
            goal: Goal::AtMost(1.02),
        },
        Row {
            id: "P1",
            what: format!("whole training step (forward, backward, step), ResNet-{depth}, batch {batch}"),
            ours: format!("LocalSgd {}", fmt_seconds(ct)),
            reference: format!("bare {}", fmt_seconds(bt)),
            ratio: ct / bt,
            goal: Goal::AtMost(1.02),
        },
    ])
}
