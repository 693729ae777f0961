//! GELU and SiLU in one pass forward and one backward, instead of burn's chain of element-wise
//! passes (the tanh GELU alone is eight: cube, scale, add, scale, tanh, add, product, half; SiLU's
//! sigmoid runs libm's scalar `expf`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use std::mem::MaybeUninit;

use super::simd::{self, avx512_version};
use super::{
    Kernel, OnCpu, contiguous, flex, flex_from, from_cpu, on_cpu, output_grad, par_filled, record,
    register_grads, tensor_from, values,
};
use crate::Cpu;

/// `√(2/π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `x·Φ(x)`, exactly (`approximate = false`, HF's `"gelu"`) or with the tanh approximation
/// (`true`, HF's `"gelu_new"`), or `None` where the kernel does not apply (see [`super`]).
pub fn gelu<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    approximate: bool,
) -> Option<Tensor<B, D>> {
    if !Kernel::Gelu.enabled() {
        return None;
    }
    let shape = x.dims().to_vec();
    let Some(x) = on_cpu(x) else {
        // A GPU backend: burn's exact forward with an exact backward (burn's own is the tanh
        // approximation's derivative); the tanh GELU's composition is differentiated exactly.
        return if approximate {
            None
        } else {
            super::gelu_grad::exact_gelu(x)
        };
    };
    match x {
        OnCpu::Infer(x) => {
            let x = flex(x);
            let y = map(values(&x), approximate);
            Some(from_cpu(tensor_from::<D>(flex_from(y, shape))))
        }
        OnCpu::Train(x) => {
            let x = x.into_primitive().tensor();
            let input = contiguous(x.primitive.clone());
            let y = flex_from(map(values(&input), approximate), shape);
            Some(record(GeluBackward, [&x], (input, approximate), y))
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Cpu, 1> for GeluBackward {
    type State = (FlexTensor, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (grad, [Some(parent)]) = output_grad(&ops, grads) else {
            return;
        };
        let (input, approximate) = ops.state;
        let (x, dy) = (values(&input), values(&grad));
        let dx = par_filled(x.len(), |start, out| {
            let range = start..start + out.len();
            backward_chunk(&x[range.clone()], &dy[range], out, approximate)
        });
        let shape = input.layout().shape().to_vec();
        register_grads(grads, [Some(parent)], [(dx, shape)]);
    }
}

/// GELU of every value, on all threads.
fn map(x: &[f32], approximate: bool) -> Vec<f32> {
    par_filled(x.len(), |start, out| {
        forward_chunk(&x[start..start + out.len()], out, approximate)
    })
}

avx512_version! {
    /// `out = gelu(x)`.
    fn forward_chunk(x: &[f32], out: &mut [MaybeUninit<f32>], approximate: bool) {
        if approximate {
            for (o, &v) in out.iter_mut().zip(x) {
                let u = SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v);
                o.write(0.5 * v * (1.0 + simd::tanh(u)));
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(v * simd::normal_cdf(v));
            }
        }
    }
}

avx512_version! {
    /// `dx = dy · gelu'(x)`.
    fn backward_chunk(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], approximate: bool) {
        if approximate {
            for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                let u = SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v);
                let t = simd::tanh(u);
                let slope = 0.5 * (1.0 + t)
                    + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * v * v);
                o.write(g * slope);
            }
        } else {
            for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                // Φ(x) + x·φ(x)
                let pdf = simd::exp(-0.5 * v * v) * 0.398_942_3;
                o.write(g * (simd::normal_cdf(v) + v * pdf));
            }
        }
    }
}

/// `x·sigmoid(x)` (HF's `"silu"`, the Llama family's MLP gate), or `None` where the kernel does not
/// apply (see [`super`]).
pub fn silu<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    if !Kernel::Silu.enabled() {
        return None;
    }
    let shape = x.dims().to_vec();
    let map = |x: &[f32]| {
        par_filled(x.len(), |start, out| {
            silu_chunk(&x[start..start + out.len()], out)
        })
    };
    match on_cpu(x)? {
        OnCpu::Infer(x) => {
            let x = flex(x);
            Some(from_cpu(tensor_from::<D>(flex_from(
                map(values(&x)),
                shape,
            ))))
        }
        OnCpu::Train(x) => {
            let x = x.into_primitive().tensor();
            let input = contiguous(x.primitive.clone());
            let y = flex_from(map(values(&input)), shape);
            Some(record(SiluBackward, [&x], input, y))
        }
    }
}

#[derive(Debug)]
struct SiluBackward;

impl Backward<Cpu, 1> for SiluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (grad, [Some(parent)]) = output_grad(&ops, grads) else {
            return;
        };
        let input = ops.state;
        let (x, dy) = (values(&input), values(&grad));
        let dx = par_filled(x.len(), |start, out| {
            let range = start..start + out.len();
            silu_backward_chunk(&x[range.clone()], &dy[range], out)
        });
        let shape = input.layout().shape().to_vec();
        register_grads(grads, [Some(parent)], [(dx, shape)]);
    }
}

avx512_version! {
    /// `out = x · sigmoid(x)`.
    fn silu_chunk(x: &[f32], out: &mut [MaybeUninit<f32>]) {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(v / (1.0 + simd::exp(-v)));
        }
    }
}

avx512_version! {
    /// `dx = dy · (s + x·s·(1 − s))`, `s = sigmoid(x)`.
    fn silu_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let s = 1.0 / (1.0 + simd::exp(-v));
            o.write(g * (s + v * s * (1.0 - s)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{leaf, max_diff, random};
    use burn::tensor::activation;

    #[test]
    fn both_gelus_and_their_gradients_match_burn() {
        for approximate in [false, true] {
            let values = random(3 * 5000, 3, 4.0);
            let run = |fused: bool| {
                let x = leaf(values.clone(), [3, 5000]);
                let y = if fused {
                    gelu(&x, approximate).expect("fused path")
                } else if approximate {
                    activation::gelu_approximate(x.clone())
                } else {
                    activation::gelu(x.clone())
                };
                let weights = leaf(random(3 * 5000, 4, 1.0), [3, 5000]);
                let grads = (y.clone() * weights).sum().backward();
                (y.inner(), x.grad(&grads).unwrap())
            };
            let (fused, reference) = (run(true), run(false));
            assert!(max_diff(fused.0, reference.0) < 1e-5, "{approximate}");
            assert!(max_diff(fused.1, reference.1) < 1e-5, "{approximate} grad");
        }
        let x = Tensor::<Cpu, 1>::from_data(
            burn::tensor::TensorData::new(random(100, 5, 3.0), [100]),
            &Default::default(),
        );
        assert!(max_diff(gelu(&x, false).unwrap(), activation::gelu(x)) < 1e-5);
    }

    #[test]
    fn silu_and_its_gradient_match_burn() {
        let values = random(3 * 5000, 7, 12.0);
        let run = |fused: bool| {
            let x = leaf(values.clone(), [3, 5000]);
            let y = if fused {
                silu(&x).expect("fused path")
            } else {
                activation::silu(x.clone())
            };
            let weights = leaf(random(3 * 5000, 8, 1.0), [3, 5000]);
            let grads = (y.clone() * weights).sum().backward();
            (y.inner(), x.grad(&grads).unwrap())
        };
        let (fused, reference) = (run(true), run(false));
        assert!(max_diff(fused.0, reference.0) < 1e-5);
        assert!(max_diff(fused.1, reference.1) < 1e-5);
    }
}
