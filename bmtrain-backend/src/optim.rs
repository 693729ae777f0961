//! The ZeRO optimizer side: AdamW over this rank's parameter slice (f32 master weights and
//! moments), global-norm gradient clipping across shards, a dynamic loss scaler whose overflow
//! check is all-reduced, and BMTrain's learning-rate schedules.

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::kernels::simd::avx512_version;

/// AdamW hyper-parameters, PyTorch's defaults unless set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Decoupled weight decay (`p -= lr · wd · p`).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW state for one slice of parameters: the moments, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWState {
    /// First moment.
    pub exp_avg: Vec<f32>,
    /// Second moment.
    pub exp_avg_sq: Vec<f32>,
}

impl AdamWState {
    /// Zero moments for `len` parameters.
    pub fn new(len: usize) -> Self {
        Self {
            exp_avg: vec![0.0; len],
            exp_avg_sq: vec![0.0; len],
        }
    }

    /// One AdamW step (`step` counts from 1), as `torch.optim.AdamW`: decoupled decay, then Adam
    /// with bias corrections.
    pub fn step(
        &mut self,
        config: &AdamWConfig,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
        step: u64,
    ) {
        adamw(
            params,
            grads,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            Update::new(config, lr, step),
        );
    }

    /// [`Self::step`] on the host's threads, a chunk of elements per task. Every element goes
    /// through the same operations as in [`Self::step`], so the result is the same bits.
    pub fn step_parallel(
        &mut self,
        config: &AdamWConfig,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
        step: u64,
    ) {
        use rayon::prelude::*;
        // Large enough that a task amortises its scheduling, small enough to spread a block.
        const CHUNK: usize = 1 << 16;
        let update = Update::new(config, lr, step);
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.exp_avg.par_chunks_mut(CHUNK))
            .zip(self.exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| adamw(p, g, m, v, update));
    }
}

/// What the device state's AdamW divides the gradient by and then multiplies it by as it reads
/// it ([`crate::resident::Resident::adamw`]): the host path's unscale, `g /= divisor`, and
/// clipping, `g *= coefficient`, without a pass of their own. `1.0` leaves the gradient exact:
/// `x / 1` and `x · 1` are `x` in IEEE arithmetic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradFactors {
    /// The loss scale times the micro-batches (1: none).
    pub divisor: f32,
    /// The clipping coefficient (1: none).
    pub coefficient: f32,
}

impl Default for GradFactors {
    fn default() -> Self {
        Self {
            divisor: 1.0,
            coefficient: 1.0,
        }
    }
}

/// One step's coefficients (the device kernel, `kernels::fused_adamw`, takes them too).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Update {
    pub(crate) decay: f32,
    pub(crate) beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) eps: f32,
    pub(crate) step_size: f32,
    pub(crate) bias2_sqrt: f32,
}

impl Update {
    /// The coefficients of step `step` (1-based) at learning rate `lr`.
    pub(crate) fn new(config: &AdamWConfig, lr: f32, step: u64) -> Self {
        let bias1 = 1.0 - config.beta1.powi(step as i32);
        let bias2 = 1.0 - config.beta2.powi(step as i32);
        Self {
            decay: 1.0 - lr * config.weight_decay,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            step_size: lr / bias1,
            bias2_sqrt: bias2.sqrt(),
        }
    }
}

avx512_version! {
    /// The element-wise AdamW update (a loop LLVM vectorises; its AVX-512 copy computes the same
    /// bits, every operation being IEEE-exact per element).
    fn adamw(params: &mut [f32], grads: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], u: Update) {
        let moments = exp_avg.iter_mut().zip(exp_avg_sq.iter_mut());
        for ((p, &g), (m, v)) in params.iter_mut().zip(grads).zip(moments) {
            *p *= u.decay;
            *m = u.beta1 * *m + (1.0 - u.beta1) * g;
            *v = u.beta2 * *v + (1.0 - u.beta2) * g * g;
            let denom = v.sqrt() / u.bias2_sqrt + u.eps;
            *p -= u.step_size * *m / denom;
        }
    }
}

/// The global L2 norm of gradients sharded over ranks: each rank passes its slices (padding is
/// zero and adds nothing); the squares are summed across ranks.
pub fn global_grad_norm(comm: &dyn Communicator, slices: &[&[f32]]) -> Result<f32, CommError> {
    let squares = slices
        .iter()
        .flat_map(|s| s.iter())
        .map(|g| (*g as f64) * (*g as f64))
        .sum::<f64>() as f32;
    global_norm_of(comm, squares)
}

/// The global L2 norm from this rank's sum of squared gradients (summed across ranks).
pub fn global_norm_of(comm: &dyn Communicator, local_squares: f32) -> Result<f32, CommError> {
    let mut sum = [local_squares];
    comm.all_reduce(&mut sum, ReduceOp::Sum)?;
    Ok(sum[0].sqrt())
}

/// The factor `clip_grad_norm_` scales gradients by at global norm `norm`, `None` when they
/// stay as they are.
pub fn clip_coefficient(norm: f32, max_norm: f32) -> Option<f32> {
    let coefficient = max_norm / (norm + 1e-6);
    (coefficient < 1.0).then_some(coefficient)
}

/// `clip_grad_norm_` across shards: scales every slice by `max_norm / (norm + 1e-6)` when the
/// global norm exceeds `max_norm`, and returns the norm before clipping.
pub fn clip_grad_norm(
    comm: &dyn Communicator,
    slices: &mut [&mut [f32]],
    max_norm: f32,
) -> Result<f32, CommError> {
    let views: Vec<&[f32]> = slices.iter().map(|s| &**s).collect();
    let norm = global_grad_norm(comm, &views)?;
    if let Some(coefficient) = clip_coefficient(norm, max_norm) {
        for slice in slices.iter_mut() {
            for g in slice.iter_mut() {
                *g *= coefficient;
            }
        }
    }
    Ok(norm)
}

/// Dynamic loss scaling: the loss is multiplied by `scale` before backward; a step whose gradients
/// hold inf or NaN on any rank is skipped and the scale halved; after `growth_interval` clean
/// steps the scale doubles; it stays within `[min_scale, max_scale]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    /// Current scale.
    pub scale: f32,
    /// Multiplier on growth, divisor on overflow.
    pub factor: f32,
    /// Clean steps before growing.
    pub growth_interval: u32,
    /// Lower bound.
    pub min_scale: f32,
    /// Upper bound.
    pub max_scale: f32,
    /// Clean steps since the last change.
    pub clean_steps: u32,
}

impl LossScaler {
    /// A scaler starting at `scale`, BMTrain's defaults otherwise (×2 every 1024 clean steps,
    /// bounds 1 and 2²⁴).
    pub fn new(scale: f32) -> Self {
        Self {
            scale,
            factor: 2.0,
            growth_interval: 1024,
            min_scale: 1.0,
            max_scale: 16_777_216.0,
            clean_steps: 0,
        }
    }

    /// Checks every rank's gradients for inf/NaN (all-reduced, so every rank decides the same)
    /// and updates the scale. Returns whether the step should be applied.
    pub fn update(
        &mut self,
        comm: &dyn Communicator,
        slices: &[&[f32]],
    ) -> Result<bool, CommError> {
        let local_overflow = slices.iter().flat_map(|s| s.iter()).any(|g| !g.is_finite());
        self.update_from(comm, local_overflow)
    }

    /// [`LossScaler::update`] from this rank's verdict (whether some local gradient is inf or
    /// NaN), all-reduced so that every rank decides the same.
    pub fn update_from(
        &mut self,
        comm: &dyn Communicator,
        local_overflow: bool,
    ) -> Result<bool, CommError> {
        let mut flag = [if local_overflow { 1.0 } else { 0.0 }];
        comm.all_reduce(&mut flag, ReduceOp::Max)?;
        if flag[0] > 0.0 {
            self.scale = (self.scale / self.factor).max(self.min_scale);
            self.clean_steps = 0;
            return Ok(false);
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.scale = (self.scale * self.factor).min(self.max_scale);
            self.clean_steps = 0;
        }
        Ok(true)
    }
}

/// A learning-rate schedule with linear warmup, BMTrain's formulas (`bmtrain/lr_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// `lr/sqrt(warmup) · it/warmup` during warmup, then `lr/sqrt(it)`.
    Noam,
    /// Linear decay to 0 at `end_iter`.
    Linear,
    /// Cosine decay to 0 at `end_iter`.
    Cosine,
    /// `lr · gamma^(it − warmup)` after warmup.
    Exponential {
        /// Decay per iteration.
        gamma: f32,
    },
    /// Constant after warmup.
    Constant,
}

impl LrSchedule {
    /// The learning rate at iteration `iter` (from 0) for base rate `lr`.
    pub fn lr(&self, lr: f32, iter: u64, warmup: u64, end_iter: u64) -> f32 {
        let it = iter as f32;
        let warm = warmup as f32;
        if iter < warmup {
            return match self {
                Self::Noam => lr / warm.sqrt() * it / warm,
                _ => lr * it / warm,
            };
        }
        match self {
            Self::Noam => lr / it.max(1.0).sqrt(),
            Self::Linear => {
                (lr * (end_iter as f32 - it) / (end_iter as f32 - warm).max(1.0)).max(0.0)
            }
            Self::Cosine => {
                let progress = (it - warm) / (end_iter as f32 - warm).max(1.0);
                (lr * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())).max(0.0)
            }
            Self::Exponential { gamma } => (lr * gamma.powf(it - warm)).max(0.0),
            Self::Constant => lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{SingleRank, ThreadGroup};
    use std::time::Duration;

    /// AdamW against the formula written out for one parameter over two steps.
    #[test]
    fn adamw_matches_the_pytorch_formula() {
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut state = AdamWState::new(1);
        let mut p = [1.0f32];
        let (lr, g1, g2) = (0.01f32, 0.5f32, -0.25f32);
        state.step(&config, &mut p, &[g1], lr, 1);
        state.step(&config, &mut p, &[g2], lr, 2);
        let mut want = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (t, g) in [(1, g1 as f64), (2, g2 as f64)] {
            want *= 1.0 - 0.01 * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let m_hat = m / (1.0 - 0.9f64.powi(t));
            let v_hat = v / (1.0 - 0.999f64.powi(t));
            want -= 0.01 * m_hat / (v_hat.sqrt() + 1e-8);
        }
        assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
    }

    #[test]
    fn clipping_uses_the_global_norm_across_shards() {
        // Four ranks hold [3], [4], [0], [12]: global norm 13, as one process would compute it.
        let results = ThreadGroup::run(4, Duration::from_secs(10), |comm| {
            let mut grads = [[3.0f32], [4.0], [0.0], [12.0]][comm.rank()];
            let norm = clip_grad_norm(&comm, &mut [&mut grads], 6.5).unwrap();
            (norm, grads[0])
        });
        for (rank, result) in results.into_iter().enumerate() {
            let (norm, clipped) = result.unwrap();
            assert!((norm - 13.0).abs() < 1e-5);
            let want = [3.0f32, 4.0, 0.0, 12.0][rank] * 6.5 / (13.0 + 1e-6);
            assert!((clipped - want).abs() < 1e-5);
        }
    }

    #[test]
    fn the_scaler_skips_an_overflowing_step_and_recovers() {
        let results = ThreadGroup::run(2, Duration::from_secs(10), |comm| {
            let mut scaler = LossScaler::new(1024.0);
            scaler.growth_interval = 2;
            let mut applied = Vec::new();
            let mut scales = Vec::new();
            for step in 0..4 {
                // An inf on rank 1 only, at step 1: both ranks must skip.
                let g = if step == 1 && comm.rank() == 1 {
                    f32::INFINITY
                } else {
                    1.0
                };
                applied.push(scaler.update(&comm, &[&[g, 2.0]]).unwrap());
                scales.push(scaler.scale);
            }
            (applied, scales)
        });
        for result in results {
            let (applied, scales) = result.unwrap();
            assert_eq!(applied, [true, false, true, true]);
            assert_eq!(scales, [1024.0, 512.0, 512.0, 1024.0]);
        }
        let mut floor = LossScaler::new(1.0);
        assert!(!floor.update(&SingleRank, &[&[f32::NAN]]).unwrap());
        assert_eq!(floor.scale, 1.0, "bounded below");
    }

    #[test]
    fn schedules_follow_bmtrain_formulas() {
        let (lr, warmup, end) = (1.0f32, 10, 110);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        for schedule in [LrSchedule::Linear, LrSchedule::Cosine, LrSchedule::Constant] {
            assert!(
                close(schedule.lr(lr, 5, warmup, end), 0.5),
                "{schedule:?} warmup"
            );
            assert!(
                close(schedule.lr(lr, 10, warmup, end), 1.0),
                "{schedule:?} peak"
            );
        }
        assert!(close(LrSchedule::Linear.lr(lr, 60, warmup, end), 0.5));
        assert!(close(LrSchedule::Linear.lr(lr, 200, warmup, end), 0.0));
        assert!(close(LrSchedule::Cosine.lr(lr, 60, warmup, end), 0.5));
        assert!(close(LrSchedule::Cosine.lr(lr, 110, warmup, end), 0.0));
        assert!(close(
            LrSchedule::Noam.lr(lr, 5, warmup, end),
            1.0 / 10f32.sqrt() * 0.5
        ));
        assert!(close(LrSchedule::Noam.lr(lr, 100, warmup, end), 0.1));
        let exp = LrSchedule::Exponential { gamma: 0.5 };
        assert!(close(exp.lr(lr, 12, warmup, end), 0.25));
        assert!(close(LrSchedule::Constant.lr(lr, 1000, warmup, end), 1.0));
    }
}
