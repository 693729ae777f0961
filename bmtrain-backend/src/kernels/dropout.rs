//! Dropout with a counter-based mask: one pass forward, one backward, and no mask stored (backward
//! regenerates it from the seed). burn's dropout draws a uniform tensor through a ChaCha sampler,
//! compares, casts and multiplies: four passes and a tensor per call.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::{
    CHUNK, Kernel, Mask, OnCpu, contiguous, draw_seed, flex_from, on_cpu, output_grad, record,
    register_grads, values,
};
use crate::Cpu;

/// Zeroes each element with probability `prob` and scales the others by `1/(1 − prob)` when `B`
/// tracks gradients (as burn's `Dropout`: identity otherwise), or `None` where the kernel does
/// not apply (see [`super`]).
pub fn dropout<B: Backend, const D: usize>(x: &Tensor<B, D>, prob: f64) -> Option<Tensor<B, D>> {
    if !Kernel::Dropout.enabled() {
        return None;
    }
    if !B::ad_enabled(&x.device()) || prob == 0.0 {
        return Some(x.clone());
    }
    if !(0.0..1.0).contains(&prob) {
        return None;
    }
    let OnCpu::Train(x) = on_cpu(x)? else {
        return None;
    };
    let mask = Mask::new(draw_seed(), prob);
    let x = x.into_primitive().tensor();
    let input = contiguous(x.primitive.clone());
    let shape = input.layout().shape().to_vec();
    let y = flex_from(apply(&mask, values(&input)), shape);
    Some(record(DropoutBackward, [&x], mask, y))
}

/// `x ⊙ mask / (1 − p)` on all threads.
fn apply(mask: &Mask, x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| mask.apply_in_place(chunk, (c * CHUNK) as u64));
    y
}

#[derive(Debug)]
struct DropoutBackward;

impl Backward<Cpu, 1> for DropoutBackward {
    type State = Mask;

    fn backward(self, ops: Ops<Mask, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (grad, [Some(parent)]) = output_grad(&ops, grads) else {
            return;
        };
        let shape = grad.layout().shape().to_vec();
        let dx = apply(&ops.state, values(&grad));
        register_grads(grads, [Some(parent)], [(dx, shape)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTrain;
    use crate::kernels::testing::{leaf, random};

    #[test]
    fn drops_the_expected_share_scales_the_rest_and_masks_the_gradient_alike() {
        let n = 40_000;
        let x_values: Vec<f32> = random(n, 1, 1.0).iter().map(|v| v + 2.0).collect();
        let x = leaf(x_values.clone(), [n]);
        let y = dropout(&x, 0.3).expect("fused path");
        let grads = y.clone().sum().backward();
        let y: Vec<f32> = y.inner().into_data().to_vec().unwrap();
        let dx: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let mut dropped = 0;
        for i in 0..n {
            if y[i] == 0.0 {
                dropped += 1;
                assert_eq!(dx[i], 0.0, "the gradient follows the mask");
            } else {
                assert!((y[i] - x_values[i] / 0.7).abs() < 1e-5);
                assert!((dx[i] - 1.0 / 0.7).abs() < 1e-5);
            }
        }
        let share = dropped as f64 / n as f64;
        assert!((share - 0.3).abs() < 0.01, "dropped {share}");
    }

    #[test]
    fn the_seeded_generator_replays_the_same_mask() {
        let x = leaf(vec![1.0; 1000], [1000]);
        let run = || {
            <CpuTrain as Backend>::seed(&Default::default(), 7);
            dropout(&x, 0.5)
                .unwrap()
                .inner()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(run(), run());
    }
}
