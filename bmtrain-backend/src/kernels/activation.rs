//! GELU in one pass forward and one backward, instead of burn's chain of element-wise passes (the
//! tanh form alone is eight: cube, scale, add, scale, tanh, add, product, half).

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

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

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
    match on_cpu(x)? {
        OnCpu::Infer(x) => {
            let x = flex(x);
            let y = map(values(&x), |v| forward(v, approximate));
            Some(from_cpu(tensor_from::<D>(flex_from(y, shape))))
        }
        OnCpu::Train(x) => {
            let x = x.into_primitive().tensor();
            let input = contiguous(x.primitive.clone());
            let y = flex_from(map(values(&input), |v| forward(v, approximate)), shape);
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
        let dx: Vec<f32> = values(&input)
            .par_chunks(CHUNK)
            .zip(values(&grad).par_chunks(CHUNK))
            .flat_map_iter(|(x, g)| {
                x.iter()
                    .zip(g)
                    .map(move |(&x, &g)| g * derivative(x, approximate))
            })
            .collect();
        let shape = input.layout().shape().to_vec();
        register_grads(grads, [Some(parent)], [(dx, shape)]);
    }
}

/// `f` of every value, on all threads.
fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    x.par_chunks(CHUNK)
        .flat_map_iter(|c| c.iter().map(|&v| f(v)))
        .collect()
}

#[inline(always)]
fn forward(x: f32, approximate: bool) -> f32 {
    if approximate {
        let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
        0.5 * x * (1.0 + u.tanh())
    } else {
        0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
    }
}

#[inline(always)]
fn derivative(x: f32, approximate: bool) -> f32 {
    if approximate {
        let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
        let t = u.tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x)
    } else {
        // Φ(x) + x·φ(x)
        let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
        cdf + x * pdf
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
}
