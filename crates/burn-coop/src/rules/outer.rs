//! The outer optimizers of DiLoCo: a step on the synchronized model from the pseudo-gradient
//! `g = x_sync − x̄` (old minus new), on one range of the flat buffer at a time.
//!
//! - **Momentum SGD** (DiLoCo's, SlowMo's): `u ← β u + g`, then `x_sync ← x_sync − lr (β u + g)`
//!   with Nesterov momentum, `x_sync − lr u` without. Written
//!   `x_sync ← x̄ + (1 − lr) g − lr β u'` (`u'` the new `u` with Nesterov, the old without), the
//!   same algebraically, so that `lr = 1`, `β = 0` is the plain mean bit for bit.
//! - **Adam** (FedAdam, Reddi et al., "Adaptive Federated Optimization", ICLR 2021, with
//!   PyTorch's `torch.optim.Adam` bias correction as a DiLoCo with an Adam outer optimizer gets
//!   it): `m ← β₁ m + (1 − β₁) g`, `v ← β₂ v + (1 − β₂) g²`,
//!   `x_sync ← x_sync − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)`, `t` the number of outer
//!   steps taken on that range (FedAdam's own Algorithm 2 has no bias correction and calls `ε`
//!   the adaptivity `τ`).
//!
//! Both keep their state per value of the buffer, so a rule that steps parts of the model at
//! different merges (Streaming DiLoCo's fragments) keeps one optimizer and passes each part's
//! own step count.

use std::ops::Range;

use crate::state::StateRecord;

/// Which outer optimizer, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OuterKind {
    /// Momentum SGD with momentum `beta` in [0, 1), Nesterov's or heavy ball.
    Momentum {
        /// The momentum β.
        beta: f64,
        /// Nesterov momentum (else heavy ball).
        nesterov: bool,
    },
    /// Adam with decay rates `beta1`, `beta2` in [0, 1) and `eps` > 0.
    Adam {
        /// The first moment's decay β₁.
        beta1: f64,
        /// The second moment's decay β₂.
        beta2: f64,
        /// Added to `√v̂`.
        eps: f64,
    },
}

/// An outer optimizer's settings and per-value state; see the
/// [module documentation](crate::rules::outer).
#[derive(Debug, Clone, PartialEq)]
pub struct OuterOptimizer {
    lr: f64,
    kind: OuterKind,
    /// The momentum `u`, or Adam's first moment `m`.
    first: Vec<f32>,
    /// Adam's second moment `v` (empty for momentum SGD).
    second: Vec<f32>,
}

impl OuterOptimizer {
    /// The optimizer with learning rate `lr` (checked by the rule that uses it).
    pub fn new(lr: f64, kind: OuterKind) -> Self {
        Self { lr, kind, first: Vec::new(), second: Vec::new() }
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The settings.
    pub fn kind(&self) -> OuterKind {
        self.kind
    }

    /// The state sized for a model of `n` values (new entries zero).
    pub fn fit(&mut self, n: usize) {
        self.first.resize(n, 0.0);
        if matches!(self.kind, OuterKind::Adam { .. }) {
            self.second.resize(n, 0.0);
        }
    }

    /// The number of values the state covers (0 before the first step).
    pub fn len(&self) -> usize {
        self.first.len()
    }

    /// Whether the optimizer has no state yet.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// One outer step on the values `at` of the model: on entry `mean` holds their `x̄` and
    /// `synced` their synchronized values (both `at.len()` long); on exit both hold the new
    /// synchronized values. `t` (≥ 1) counts the outer steps taken on this range, this one
    /// included (Adam's bias correction). The state must have been sized with
    /// [`OuterOptimizer::fit`].
    pub fn step(&mut self, mean: &mut [f32], synced: &mut [f32], at: Range<usize>, t: u64) {
        debug_assert!(mean.len() == at.len() && synced.len() == at.len());
        let (x, z) = (mean, synced);
        match self.kind {
            OuterKind::Momentum { beta, nesterov } => {
                let (lr, beta) = (self.lr as f32, beta as f32);
                for ((x, z), u) in x.iter_mut().zip(z.iter_mut()).zip(&mut self.first[at]) {
                    let delta = *z - *x;
                    let previous = *u;
                    *u = beta * previous + delta;
                    let carried = if nesterov { *u } else { previous };
                    *x += (1.0 - lr) * delta - lr * beta * carried;
                    *z = *x;
                }
            }
            OuterKind::Adam { beta1, beta2, eps } => {
                let t = t.max(1).min(i32::MAX as u64) as i32;
                let step_size = (self.lr / (1.0 - beta1.powi(t))) as f32;
                let root = (1.0 - beta2.powi(t)).sqrt() as f32;
                let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
                let moments = self.first[at.clone()].iter_mut().zip(&mut self.second[at]);
                for ((x, z), (m, v)) in x.iter_mut().zip(z.iter_mut()).zip(moments) {
                    let g = *z - *x;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *z -= step_size * *m / (v.sqrt() / root + eps);
                    *x = *z;
                }
            }
        }
    }

    /// The state into `record`: `momentum` (the first moment), and for Adam `second-moment`.
    pub fn record_into(&self, record: StateRecord) -> StateRecord {
        let record = record.with_held("momentum", Some(&self.first));
        match self.kind {
            OuterKind::Momentum { .. } => record,
            OuterKind::Adam { .. } => record.with_held("second-moment", Some(&self.second)),
        }
    }

    /// Takes what [`OuterOptimizer::record_into`] saved out of `record`.
    pub fn load(&mut self, record: &mut StateRecord) {
        self.first = record.take_buffer("momentum").unwrap_or_default();
        if matches!(self.kind, OuterKind::Adam { .. }) {
            self.second = record.take_buffer("second-moment").unwrap_or_default();
        }
    }

    /// Whether the state fits a model of `n` values (or is still empty).
    pub fn fits(&self, n: usize) -> bool {
        let second_fits = match self.kind {
            OuterKind::Momentum { .. } => true,
            OuterKind::Adam { .. } => self.second.len() == self.first.len(),
        };
        (self.first.is_empty() || self.first.len() == n) && second_fits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adam on one value over several steps, in `f64`, as `torch.optim.Adam` writes it.
    fn adam_reference(gradients: &[f64], lr: f64, beta1: f64, beta2: f64, eps: f64, z0: f64) -> Vec<f64> {
        let (mut m, mut v, mut z) = (0.0, 0.0, z0);
        let mut out = Vec::new();
        for (k, g) in gradients.iter().enumerate() {
            let t = k as i32 + 1;
            m = beta1 * m + (1.0 - beta1) * g;
            v = beta2 * v + (1.0 - beta2) * g * g;
            let m_hat = m / (1.0 - beta1.powi(t));
            let v_hat = v / (1.0 - beta2.powi(t));
            z -= lr * m_hat / (v_hat.sqrt() + eps);
            out.push(z);
        }
        out
    }

    #[test]
    fn adam_follows_the_independent_recurrence() {
        let (lr, beta1, beta2, eps) = (0.05, 0.9, 0.99, 1e-8);
        let mut outer = OuterOptimizer::new(lr, OuterKind::Adam { beta1, beta2, eps });
        outer.fit(3);
        // Three values; at each step the mean moves by a different amount from the synced model.
        let mut synced = vec![1.0f32, -2.0, 0.5];
        let shifts = [[0.1f32, -0.3, 0.0], [0.05, 0.2, 0.01], [-0.2, 0.1, 0.02], [0.3, 0.3, -0.05]];
        let mut gradients = vec![Vec::new(); 3];
        let z0: Vec<f64> = synced.iter().map(|&z| f64::from(z)).collect();
        for (k, shift) in shifts.iter().enumerate() {
            let mut mean: Vec<f32> = synced.iter().zip(shift).map(|(z, s)| z + s).collect();
            for i in 0..3 {
                gradients[i].push(f64::from(synced[i] - mean[i]));
            }
            outer.step(&mut mean, &mut synced, 0..3, k as u64 + 1);
            assert_eq!(mean, synced, "every worker adopts the new synchronized model");
        }
        for i in 0..3 {
            let want = adam_reference(&gradients[i], lr, beta1, beta2, eps, z0[i]);
            let got = f64::from(synced[i]);
            assert!((got - want[3]).abs() < 1e-5, "value {i}: {got} vs {}", want[3]);
        }
        // The first step of Adam moves each value by lr · sign(g) (to ε).
        let mut fresh = OuterOptimizer::new(lr, OuterKind::Adam { beta1, beta2, eps });
        fresh.fit(2);
        let (mut mean, mut synced) = (vec![0.5f32, 2.0], vec![1.0f32, 1.0]);
        fresh.step(&mut mean, &mut synced, 0..2, 1);
        assert!((synced[0] - 0.95).abs() < 1e-6 && (synced[1] - 1.05).abs() < 1e-6, "{synced:?}");
    }

    #[test]
    fn steps_on_a_range_leave_the_rest_alone_and_the_state_round_trips() {
        let mut outer = OuterOptimizer::new(0.5, OuterKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 });
        outer.fit(4);
        let (mut mean, mut synced) = (vec![1.0f32, 2.0, 3.0, 4.0], vec![0.0f32; 4]);
        outer.step(&mut mean[1..3], &mut synced[1..3], 1..3, 1);
        assert_eq!((mean[0], mean[3], synced[0], synced[3]), (1.0, 4.0, 0.0, 0.0));
        let record = outer.record_into(StateRecord::new());
        let mut back = OuterOptimizer::new(0.5, OuterKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 });
        back.load(&mut record.clone());
        assert_eq!(back, outer);
        assert!(outer.fits(4) && !outer.fits(5));
    }
}
