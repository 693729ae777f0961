//! The exact GELU's gradient on the GPU backends. burn 0.21's default `gelu_backward`, which
//! burn-cubecl (wgpu, CUDA) inherits and only burn-flex overrides, differentiates the tanh
//! approximation whatever the forward ran, so an exact GELU (HF's `"gelu"`: BERT, RoBERTa)
//! trained on a GPU got gradients 3.3e-4 (relative) off burn-flex's through a two-block BERT.
//! Here the forward is burn's exact GELU and the backward `dy · (Φ(x) + x·φ(x))`, in f32, from
//! the saved input alone, as burn's own op saves it.

use std::any::Any;
use std::f32::consts::{FRAC_1_SQRT_2, PI};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorMetadata, TensorPrimitive, activation};

use super::autodiff_node;

/// The exact GELU of `x` with an exact backward, on a GPU backend under autodiff; `None`
/// elsewhere (without autodiff burn's forward is already exact; the CPU has its fused kernel).
pub(super) fn exact_gelu<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    #[allow(unused_mut)] // without a GPU backend compiled in
    let mut x: Box<dyn Any> = Box::new(x.clone());
    #[allow(unused_macros)]
    macro_rules! route {
        ($inner:ty) => {
            x = match x.downcast::<Tensor<Autodiff<$inner>, D>>() {
                Ok(x) => return Some(super::typed_back(exact_gelu_train(*x))),
                Err(x) => x,
            };
        };
    }
    #[cfg(feature = "wgpu")]
    route!(crate::Wgpu);
    #[cfg(feature = "cuda")]
    route!(crate::Cuda);
    let _ = x;
    None
}

/// `exact_gelu` on any autodiff backend: burn's exact forward, the input saved for backward.
pub fn exact_gelu_train<I: Backend, const D: usize>(
    x: Tensor<Autodiff<I>, D>,
) -> Tensor<Autodiff<I>, D> {
    let x = x.into_primitive().tensor();
    let inner = Tensor::<I, D>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
    let y = activation::gelu(inner).into_primitive().tensor();
    let output = autodiff_node(ExactGeluBackward, [&x], x.primitive.clone(), y);
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

#[derive(Debug)]
struct ExactGeluBackward;

impl<B: Backend> Backward<B, 1> for ExactGeluBackward {
    /// The input.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [Some(parent)] = &ops.parents else {
            return;
        };
        let shape = ops.state.shape();
        let dtype = ops.state.dtype();
        let flat = |t: FloatTensor<B>| {
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(
                t,
                Shape::new([shape.num_elements()]),
            )))
            .cast(DType::F32)
        };
        let (x, dy) = (flat(ops.state), flat(dy));
        // Φ(x) = (1 + erf(x/√2)) / 2, φ(x) = exp(−x²/2) / √(2π).
        let cdf = x
            .clone()
            .mul_scalar(FRAC_1_SQRT_2)
            .erf()
            .add_scalar(1.0)
            .mul_scalar(0.5);
        let pdf = x
            .clone()
            .powi_scalar(2)
            .mul_scalar(-0.5)
            .exp()
            .mul_scalar(1.0 / (2.0 * PI).sqrt());
        let dx = dy.mul(cdf.add(x.mul(pdf))).cast(dtype);
        grads.register::<B>(
            parent.id,
            B::float_reshape(dx.into_primitive().tensor(), shape),
        );
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;
    use crate::CpuTrain;
    use crate::kernels::testing::random;

    /// On burn-flex (whose own `gelu_backward` is exact) the op's value and gradient equal
    /// burn's; the tanh approximation's derivative, what burn's default gives the GPU backends,
    /// is measurably off on the same values (so the comparison can tell them apart).
    #[test]
    fn the_exact_gelu_gradient_matches_burn_flex_and_not_the_tanh_derivative() {
        let values = random(4 * 777, 11, 4.0);
        let leaf = || {
            Tensor::<CpuTrain, 2>::from_data(
                TensorData::new(values.clone(), [4, 777]),
                &Default::default(),
            )
            .require_grad()
        };
        let weights = Tensor::<CpuTrain, 2>::from_data(
            TensorData::new(random(4 * 777, 12, 1.0), [4, 777]),
            &Default::default(),
        );
        let run = |f: &dyn Fn(Tensor<CpuTrain, 2>) -> Tensor<CpuTrain, 2>| {
            let x = leaf();
            let y = f(x.clone());
            let grads = (y.clone() * weights.clone()).sum().backward();
            let dx: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let y: Vec<f32> = y.into_data().to_vec().unwrap();
            (y, dx)
        };
        let (y, dx) = run(&|x| exact_gelu_train(x));
        let (want_y, want_dx) = run(&|x| activation::gelu(x));
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
        };
        assert!(diff(&y, &want_y) < 1e-6, "{}", diff(&y, &want_y));
        assert!(diff(&dx, &want_dx) < 1e-6, "{}", diff(&dx, &want_dx));
        // burn's default `gelu_backward` is the tanh approximation's derivative, which autodiff
        // of the approximation gives too: it is measurably off the exact one here.
        let (_, tanh_dx) = run(&|x| activation::gelu_approximate(x));
        assert!(
            diff(&tanh_dx, &want_dx) > 1e-4,
            "{}",
            diff(&tanh_dx, &want_dx)
        );
    }
}
