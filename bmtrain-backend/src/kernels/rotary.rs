//! Rotary position embeddings (RoPE, as transformers' `apply_rotary_pos_emb`) in one pass each
//! way: `y = x·cos + rotate_half(x)·sin` over each head's two halves, instead of burn's slice, negate,
//! concatenate, two broadcast products and a sum over strided views.
//!
//! ```text
//!   y[j] = x[j]·cos[j] − x[j + h]·sin[j]          j < h = head_dim / 2
//!   y[j] = x[j]·cos[j] + x[j − h]·sin[j]          j ≥ h
//!   dx[j] = dy[j]·cos[j] + dy[j + h]·sin[j + h]   j < h
//!   dx[j] = dy[j]·cos[j] − dy[j − h]·sin[j − h]   j ≥ h
//! ```

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::{
    Kernel, OnCpu, contiguous, flex, flex_from, from_cpu, on_cpu, output_grad, record,
    register_grads, tensor_from, tracks_gradient, values,
};
use crate::Cpu;

/// `x·cos + rotate_half(x)·sin`, or `None` where the kernel does not apply (another backend,
/// half precision, tables that need a gradient, `ZOO_KERNELS`).
///
/// - x: `[batch, seq, heads, head_dim]` (`head_dim` even)
/// - cos, sin: `[batch, seq, 1, head_dim]` (no gradient)
pub fn rotary<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    if !Kernel::Rotary.enabled() {
        return None;
    }
    let [batch, seq, heads, dim] = x.dims();
    if cos.dims() != [batch, seq, 1, dim] || sin.dims() != [batch, seq, 1, dim] || dim % 2 != 0 {
        return None;
    }
    let table = |t: &Tensor<B, 4>| -> Option<FlexTensor> {
        match on_cpu(t)? {
            OnCpu::Train(t) if tracks_gradient(&t) => None,
            OnCpu::Train(t) => Some(flex(t.inner())),
            OnCpu::Infer(t) => Some(flex(t)),
        }
    };
    let (cos, sin) = (table(cos)?, table(sin)?);
    let geometry = Geometry { heads, dim };
    let shape = vec![batch, seq, heads, dim];
    match on_cpu(x)? {
        OnCpu::Infer(x) => {
            let x = flex(x);
            let y = rotate(&geometry, values(&x), values(&cos), values(&sin), false);
            Some(from_cpu(tensor_from::<4>(flex_from(y, shape))))
        }
        OnCpu::Train(x) => {
            let x = x.into_primitive().tensor();
            let input = contiguous(x.primitive.clone());
            let y = rotate(&geometry, values(&input), values(&cos), values(&sin), false);
            Some(record(
                RotaryBackward,
                [&x],
                (geometry, cos, sin, shape.clone()),
                flex_from(y, shape),
            ))
        }
    }
}

/// Heads per position and the width of one head.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    heads: usize,
    dim: usize,
}

/// The rotation of every head of every position (`inverse`: by −θ, which is backward's map of
/// `dy` to `dx`), one rayon task per position.
fn rotate(g: &Geometry, x: &[f32], cos: &[f32], sin: &[f32], inverse: bool) -> Vec<f32> {
    let (d, half) = (g.dim, g.dim / 2);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(g.heads * d)
        .zip(x.par_chunks(g.heads * d))
        .enumerate()
        .for_each(|(position, (out, x))| {
            let (c, s) = (&cos[position * d..][..d], &sin[position * d..][..d]);
            for (o, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                for j in 0..half {
                    let (a, b) = (x[j], x[j + half]);
                    if inverse {
                        o[j] = a * c[j] + b * s[j + half];
                        o[j + half] = b * c[j + half] - a * s[j];
                    } else {
                        o[j] = a * c[j] - b * s[j];
                        o[j + half] = b * c[j + half] + a * s[j + half];
                    }
                }
            }
        });
    out
}

#[derive(Debug)]
struct RotaryBackward;

impl Backward<Cpu, 1> for RotaryBackward {
    type State = (Geometry, FlexTensor, FlexTensor, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (grad, [Some(parent)]) = output_grad(&ops, grads) else {
            return;
        };
        let (geometry, cos, sin, shape) = ops.state;
        let dx = rotate(&geometry, values(&grad), values(&cos), values(&sin), true);
        register_grads(grads, [Some(parent)], [(dx, shape)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTrain;
    use crate::kernels::testing::{leaf, max_diff, random};

    /// burn's composition, as the models write it without the kernel.
    fn composed(
        x: Tensor<CpuTrain, 4>,
        cos: Tensor<CpuTrain, 4>,
        sin: Tensor<CpuTrain, 4>,
    ) -> Tensor<CpuTrain, 4> {
        let [b, s, h, d] = x.dims();
        let first = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
        let second = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos + rotated * sin
    }

    #[test]
    fn rotary_and_its_gradient_match_the_composition() {
        let (b, s, h, d) = (2, 5, 3, 8);
        // Tables as RoPE makes them: the same angle in both halves.
        let angles: Vec<f32> = (0..b * s)
            .flat_map(|p| (0..d).map(move |j| (p % s) as f32 * 0.3 / (1 + j % (d / 2)) as f32))
            .collect();
        let table = |f: fn(f32) -> f32| {
            Tensor::<CpuTrain, 4>::from_data(
                burn::tensor::TensorData::new(
                    angles.iter().map(|&a| f(a)).collect::<Vec<_>>(),
                    [b, s, 1, d],
                ),
                &Default::default(),
            )
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let values = random(b * s * h * d, 21, 2.0);
        let run = |fused: bool| {
            let x = leaf(values.clone(), [b, s, h, d]);
            let y = if fused {
                rotary(&x, &cos, &sin).expect("fused path")
            } else {
                composed(x.clone(), cos.clone(), sin.clone())
            };
            let weights = leaf(random(b * s * h * d, 22, 1.0), [b, s, h, d]);
            let grads = (y.clone() * weights).sum().backward();
            (y.inner(), x.grad(&grads).unwrap())
        };
        let (fused, reference) = (run(true), run(false));
        assert!(max_diff(fused.0, reference.0) < 1e-6);
        assert!(max_diff(fused.1, reference.1) < 1e-6);
    }
}
