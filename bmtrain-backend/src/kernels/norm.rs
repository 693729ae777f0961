//! Layer norm and RMS norm in one pass per row forward and one backward (burn composes them from
//! about ten element-wise passes and reductions, and twice that in backward).
//!
//! ```text
//!   layer norm:  x̂ = (x − mean)·rstd,  rstd = 1/√(var + eps)      y = x̂·γ + β
//!                dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),  g = dy·γ    dγ = Σ dy·x̂    dβ = Σ dy
//!   RMS norm:    x̂ = x·rstd,  rstd = 1/√(mean(x²) + eps)          y = x̂·γ
//!                dx = rstd·(g − x̂·mean(g·x̂)),  g = dy·γ              dγ = Σ dy·x̂
//! ```

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::{
    Kernel, OnCpu, contiguous, flex, flex_from, from_cpu, on_cpu, output_grad, record,
    register_grads, tensor_from, values,
};
use crate::Cpu;

/// Rows per rayon task.
const ROWS: usize = 16;

/// Layer norm over the last dimension with scale `gamma` and shift `beta` (both `[width]`), or
/// `None` where the kernel does not apply (see [`super`]). On the GPU backends it is the cubecl
/// kernels of `gpu_norm` (f32, f16, bf16; statistics in f32).
pub fn layer_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    beta: &Tensor<B, 1>,
    epsilon: f64,
) -> Option<Tensor<B, D>> {
    if !Kernel::LayerNorm.enabled() {
        return None;
    }
    let shape = x.dims().to_vec();
    let width = shape[D - 1];
    if width == 0 || gamma.dims() != [width] || beta.dims() != [width] {
        return None;
    }
    #[cfg(feature = "gpu-kernels")]
    if let Some(y) = super::gpu_norm::route(x, gamma, Some(beta), epsilon, false) {
        return Some(y);
    }
    let eps = epsilon as f32;
    match (on_cpu(x)?, on_cpu(gamma)?, on_cpu(beta)?) {
        (OnCpu::Infer(x), OnCpu::Infer(gamma), OnCpu::Infer(beta)) => {
            let (x, gamma, beta) = (flex(x), flex(gamma), flex(beta));
            let (y, _) = forward(values(&x), values(&gamma), values(&beta), eps);
            Some(from_cpu(tensor_from::<D>(flex_from(y, shape))))
        }
        (OnCpu::Train(x), OnCpu::Train(gamma), OnCpu::Train(beta)) => {
            let (x, gamma, beta) = (
                x.into_primitive().tensor(),
                gamma.into_primitive().tensor(),
                beta.into_primitive().tensor(),
            );
            let input = contiguous(x.primitive.clone());
            let scale = contiguous(gamma.primitive.clone());
            let (y, stats) = forward(
                values(&input),
                values(&scale),
                values(&contiguous(beta.primitive.clone())),
                eps,
            );
            let y = flex_from(y, shape);
            let saved = Saved {
                input,
                gamma: scale,
                stats: Arc::new(stats),
            };
            Some(record(LayerNormBackward, [&x, &gamma, &beta], saved, y))
        }
        _ => None,
    }
}

/// Forward: the normalised rows and, per row, `(mean, rstd)`.
fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<(f32, f32)>) {
    let width = gamma.len();
    let rows = x.len() / width;
    let mut y = vec![0.0f32; x.len()];
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    y.par_chunks_mut(ROWS * width)
        .zip(stats.par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * width))
        .for_each(|((y, stats), x)| {
            for ((y, stat), x) in y.chunks_mut(width).zip(stats).zip(x.chunks(width)) {
                let mean = x.iter().sum::<f32>() / width as f32;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *y = (x - mean) * rstd * g + b;
                }
                *stat = (mean, rstd);
            }
        });
    (y, stats)
}

/// Backward: `(dx, dγ, dβ)`.
fn backward(
    x: &[f32],
    gamma: &[f32],
    stats: &[(f32, f32)],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let mut dx = vec![0.0f32; x.len()];
    // Each task's partial sums of dγ and dβ, added up in task order afterwards: the result does
    // not depend on how rayon schedules the tasks (runs stay bit-identical at any thread count).
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS * width)
        .zip(x.par_chunks(ROWS * width))
        .zip(dy.par_chunks(ROWS * width))
        .zip(stats.par_chunks(ROWS))
        .map(|(((dx, x), dy), stats)| {
            let (mut dg, mut db) = (vec![0.0f32; width], vec![0.0f32; width]);
            for (((dx, x), dy), &(mean, rstd)) in dx
                .chunks_mut(width)
                .zip(x.chunks(width))
                .zip(dy.chunks(width))
                .zip(stats)
            {
                let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
                for i in 0..width {
                    let xhat = (x[i] - mean) * rstd;
                    let g = dy[i] * gamma[i];
                    sum_g += g;
                    sum_gx += g * xhat;
                    dg[i] += dy[i] * xhat;
                    db[i] += dy[i];
                }
                let (mean_g, mean_gx) = (sum_g / width as f32, sum_gx / width as f32);
                for i in 0..width {
                    let xhat = (x[i] - mean) * rstd;
                    dx[i] = rstd * (dy[i] * gamma[i] - mean_g - xhat * mean_gx);
                }
            }
            (dg, db)
        })
        .collect();
    let (mut d_gamma, mut d_beta) = (vec![0.0f32; width], vec![0.0f32; width]);
    for (dg, db) in partials {
        d_gamma.iter_mut().zip(dg).for_each(|(a, b)| *a += b);
        d_beta.iter_mut().zip(db).for_each(|(a, b)| *a += b);
    }
    (dx, d_gamma, d_beta)
}

#[derive(Debug, Clone)]
struct Saved {
    input: FlexTensor,
    gamma: FlexTensor,
    stats: Arc<Vec<(f32, f32)>>,
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Cpu, 3> for LayerNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (dy, parents) = output_grad(&ops, grads);
        let saved = ops.state;
        let (dx, d_gamma, d_beta) = backward(
            values(&saved.input),
            values(&saved.gamma),
            &saved.stats,
            values(&dy),
        );
        let width = vec![d_gamma.len()];
        let computed = [
            (dx, saved.input.layout().shape().to_vec()),
            (d_gamma, width.clone()),
            (d_beta, width),
        ];
        register_grads(grads, parents, computed);
    }
}

/// RMS norm over the last dimension with scale `gamma` (`[width]`), as T5 and the Llama family
/// apply it (statistics and scaling in f32), or `None` where the kernel does not apply.
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    epsilon: f64,
) -> Option<Tensor<B, D>> {
    if !Kernel::RmsNorm.enabled() {
        return None;
    }
    let shape = x.dims().to_vec();
    let width = shape[D - 1];
    if width == 0 || gamma.dims() != [width] {
        return None;
    }
    #[cfg(feature = "gpu-kernels")]
    if let Some(y) = super::gpu_norm::route(x, gamma, None, epsilon, true) {
        return Some(y);
    }
    let eps = epsilon as f32;
    match (on_cpu(x)?, on_cpu(gamma)?) {
        (OnCpu::Infer(x), OnCpu::Infer(gamma)) => {
            let (x, gamma) = (flex(x), flex(gamma));
            let (y, _) = rms_forward(values(&x), values(&gamma), eps);
            Some(from_cpu(tensor_from::<D>(flex_from(y, shape))))
        }
        (OnCpu::Train(x), OnCpu::Train(gamma)) => {
            let (x, gamma) = (x.into_primitive().tensor(), gamma.into_primitive().tensor());
            let input = contiguous(x.primitive.clone());
            let scale = contiguous(gamma.primitive.clone());
            let (y, rstd) = rms_forward(values(&input), values(&scale), eps);
            let saved = RmsSaved {
                input,
                gamma: scale,
                rstd: Arc::new(rstd),
            };
            Some(record(
                RmsNormBackward,
                [&x, &gamma],
                saved,
                flex_from(y, shape),
            ))
        }
        _ => None,
    }
}

/// Forward: the normalised rows and each row's `rstd`.
fn rms_forward(x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let rows = x.len() / width;
    let mut y = vec![0.0f32; x.len()];
    let mut rstds = vec![0.0f32; rows];
    y.par_chunks_mut(ROWS * width)
        .zip(rstds.par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * width))
        .for_each(|((y, rstds), x)| {
            for ((y, rstd), x) in y.chunks_mut(width).zip(rstds).zip(x.chunks(width)) {
                let mean_square = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
                *rstd = 1.0 / (mean_square + eps).sqrt();
                for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                    *y = g * (x * *rstd);
                }
            }
        });
    (y, rstds)
}

/// Backward: `(dx, dγ)`, dγ summed per task and then in task order (bit-identical at any
/// thread count).
fn rms_backward(x: &[f32], gamma: &[f32], rstds: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let mut dx = vec![0.0f32; x.len()];
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * width)
        .zip(x.par_chunks(ROWS * width))
        .zip(dy.par_chunks(ROWS * width))
        .zip(rstds.par_chunks(ROWS))
        .map(|(((dx, x), dy), rstds)| {
            let mut dg = vec![0.0f32; width];
            for (((dx, x), dy), &rstd) in dx
                .chunks_mut(width)
                .zip(x.chunks(width))
                .zip(dy.chunks(width))
                .zip(rstds)
            {
                let mut sum_gx = 0.0f32;
                for i in 0..width {
                    let xhat = x[i] * rstd;
                    sum_gx += dy[i] * gamma[i] * xhat;
                    dg[i] += dy[i] * xhat;
                }
                let mean_gx = sum_gx / width as f32;
                for i in 0..width {
                    let xhat = x[i] * rstd;
                    dx[i] = rstd * (dy[i] * gamma[i] - xhat * mean_gx);
                }
            }
            dg
        })
        .collect();
    let mut d_gamma = vec![0.0f32; width];
    for dg in partials {
        d_gamma.iter_mut().zip(dg).for_each(|(a, b)| *a += b);
    }
    (dx, d_gamma)
}

#[derive(Debug, Clone)]
struct RmsSaved {
    input: FlexTensor,
    gamma: FlexTensor,
    rstd: Arc<Vec<f32>>,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Cpu, 2> for RmsNormBackward {
    type State = RmsSaved;

    fn backward(self, ops: Ops<RmsSaved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (dy, parents) = output_grad(&ops, grads);
        let saved = ops.state;
        let (dx, d_gamma) = rms_backward(
            values(&saved.input),
            values(&saved.gamma),
            &saved.rstd,
            values(&dy),
        );
        let width = vec![d_gamma.len()];
        let computed = [
            (dx, saved.input.layout().shape().to_vec()),
            (d_gamma, width),
        ];
        register_grads(grads, parents, computed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{leaf, max_diff, random};

    /// burn's LayerNorm formula.
    fn composed<B: Backend>(
        x: Tensor<B, 3>,
        gamma: Tensor<B, 1>,
        beta: Tensor<B, 1>,
    ) -> Tensor<B, 3> {
        let (var, mean) = x.clone().var_mean_bias(2);
        let normed = (x - mean) / (var + 1e-5).sqrt();
        normed * gamma.unsqueeze::<3>() + beta.unsqueeze::<3>()
    }

    #[test]
    fn forward_and_gradients_match_burns_layer_norm() {
        let (rows, seq, width) = (3, 37, 24);
        let x_values = random(rows * seq * width, 1, 3.0);
        let run = |fused: bool| {
            let x = leaf(x_values.clone(), [rows, seq, width]);
            let gamma = leaf(random(width, 2, 1.0), [width]);
            let beta = leaf(random(width, 3, 1.0), [width]);
            let y = if fused {
                layer_norm(&x, &gamma, &beta, 1e-5).expect("fused path")
            } else {
                composed(x.clone(), gamma.clone(), beta.clone())
            };
            let weights = leaf(random(rows * seq * width, 4, 1.0), [rows, seq, width]);
            let grads = (y.clone() * weights).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                gamma.grad(&grads).unwrap(),
                beta.grad(&grads).unwrap(),
            )
        };
        let (fused, reference) = (run(true), run(false));
        assert!(max_diff(fused.0, reference.0) < 1e-5);
        assert!(max_diff(fused.1, reference.1) < 1e-4, "dx");
        assert!(max_diff(fused.2, reference.2) < 1e-4, "dgamma");
        assert!(max_diff(fused.3, reference.3) < 1e-4, "dbeta");
    }

    #[test]
    fn rms_norm_and_its_gradients_match_the_composition() {
        let (rows, seq, width) = (3, 37, 24);
        let values = random(rows * seq * width, 31, 3.0);
        let scale = random(width, 32, 1.0);
        let run = |fused: bool| {
            let x = leaf(values.clone(), [rows, seq, width]);
            let gamma = leaf(scale.clone(), [width]);
            let y = if fused {
                rms_norm(&x, &gamma, 1e-6).expect("fused path")
            } else {
                let mean_square = x.clone().square().mean_dim(2);
                gamma.clone().unsqueeze::<3>() * (x.clone() * (mean_square + 1e-6).sqrt().recip())
            };
            let weights = leaf(random(rows * seq * width, 33, 1.0), [rows, seq, width]);
            let grads = (y.clone() * weights).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                gamma.grad(&grads).unwrap(),
            )
        };
        let (fused, reference) = (run(true), run(false));
        assert!(max_diff(fused.0, reference.0) < 1e-5);
        assert!(max_diff(fused.1, reference.1) < 1e-5);
        assert!(max_diff(fused.2, reference.2) < 1e-4);
    }
}
