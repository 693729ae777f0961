//! AdamW as one cubecl kernel on the GPU backends: each element's master weight, gradient and
//! two moments are read once and the three new values written once, where the same update as
//! tensor operations is about ten element-wise passes (before burn's fusion merges what it can).
//!
//! The arithmetic is the host loop's ([`crate::optim`]), operation for operation and in the
//! same order: the gradient unscaled (`g / divisor`, the loss scale times the micro-batches)
//! and clipped (`· coefficient`) as it is read, so neither is a pass of its own over the
//! gradient; then decoupled decay, the moments, the bias-corrected step.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
// cubecl's prelude has a `Tensor` too (the kernels' view of a buffer).
use burn::tensor::{DType, Shape, Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
};
use burn_fusion::{Fusion, FusionBackend};
use cubecl::prelude::*;

use super::custom_op::register;
use crate::optim::{AdamWConfig, GradFactors, Update};

/// One step's coefficients, as the kernel takes them.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct UpdateArgs {
    decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    step_size: f32,
    bias2_sqrt: f32,
    divisor: f32,
    coefficient: f32,
}

/// The coefficients of step `step` (1-based) at learning rate `lr` (the host loop's), then the
/// gradient's factors.
fn coefficients(config: &AdamWConfig, lr: f32, step: u64, factors: GradFactors) -> [f32; 8] {
    let u = Update::new(config, lr, step);
    [
        u.decay,
        u.beta1,
        u.beta2,
        u.eps,
        u.step_size,
        u.bias2_sqrt,
        factors.divisor,
        factors.coefficient,
    ]
}

/// `p, m, v ← AdamW(p, g, m, v)`, one unit per element.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel(
    params: &Tensor<f32>,
    grads: &Tensor<f32>,
    exp_avg: &Tensor<f32>,
    exp_avg_sq: &Tensor<f32>,
    new_params: &mut Tensor<f32>,
    new_exp_avg: &mut Tensor<f32>,
    new_exp_avg_sq: &mut Tensor<f32>,
    update: UpdateArgs,
    len: u32,
) {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        let g = grads[i] / update.divisor * update.coefficient;
        let p = params[i] * update.decay;
        let m = update.beta1 * exp_avg[i] + (1.0f32 - update.beta1) * g;
        let v = update.beta2 * exp_avg_sq[i] + (1.0f32 - update.beta2) * g * g;
        let denom = v.sqrt() / update.bias2_sqrt + update.eps;
        new_params[i] = p - update.step_size * m / denom;
        new_exp_avg[i] = m;
        new_exp_avg_sq[i] = v;
    }
}

/// A backend that runs the fused AdamW kernel on its f32 tensors.
pub trait AdamWBackend: Backend {
    /// `[params, exp_avg, exp_avg_sq]` after one step with coefficients `update`
    /// ([`coefficients`]); all four inputs are 1-D f32 of one length.
    fn fused_adamw(
        params: FloatTensor<Self>,
        grads: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        update: [f32; 8],
    ) -> [FloatTensor<Self>; 3];
}

impl<R, F, I, BT> AdamWBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fused_adamw(
        params: FloatTensor<Self>,
        grads: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        update: [f32; 8],
    ) -> [FloatTensor<Self>; 3] {
        let contiguous = |t: CubeTensor<R>| into_contiguous(t);
        let (params, grads) = (contiguous(params), contiguous(grads));
        let (exp_avg, exp_avg_sq) = (contiguous(exp_avg), contiguous(exp_avg_sq));
        let len = params.meta.num_elements();
        let client = params.client.clone();
        let empty = || {
            empty_device_dtype::<R>(
                client.clone(),
                params.device.clone(),
                Shape::new([len]),
                DType::F32,
            )
        };
        let outputs = [empty(), empty(), empty()];
        let units = 256;
        let [
            decay,
            beta1,
            beta2,
            eps,
            step_size,
            bias2_sqrt,
            divisor,
            coefficient,
        ] = update;
        adamw_kernel::launch::<R>(
            &client,
            CubeCount::Static(len.div_ceil(units) as u32, 1, 1),
            CubeDim::new_1d(units as u32),
            params.into_tensor_arg(),
            grads.into_tensor_arg(),
            exp_avg.into_tensor_arg(),
            exp_avg_sq.into_tensor_arg(),
            outputs[0].clone().into_tensor_arg(),
            outputs[1].clone().into_tensor_arg(),
            outputs[2].clone().into_tensor_arg(),
            UpdateArgsLaunch::new(
                decay,
                beta1,
                beta2,
                eps,
                step_size,
                bias2_sqrt,
                divisor,
                coefficient,
            ),
            len as u32,
        );
        outputs
    }
}

impl<B: FusionBackend + AdamWBackend> AdamWBackend for Fusion<B> {
    fn fused_adamw(
        params: FloatTensor<Self>,
        grads: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        update: [f32; 8],
    ) -> [FloatTensor<Self>; 3] {
        let output = (params.shape.clone(), DType::F32);
        let outputs = [output.clone(), output.clone(), output];
        let run = move |inputs: Vec<FloatTensor<B>>| {
            let [p, g, m, v]: [FloatTensor<B>; 4] = inputs.try_into().expect("four inputs");
            B::fused_adamw(p, g, m, v, update).to_vec()
        };
        let inputs = vec![params, grads, exp_avg, exp_avg_sq];
        register::<B>("zoo_fused_adamw", inputs, &outputs, run)
            .try_into()
            .expect("three outputs")
    }
}

/// One AdamW step as the fused kernel when `B` is a GPU backend of this build and every tensor
/// is f32 (`[params, exp_avg, exp_avg_sq]`), the gradient read as `grads / divisor ·
/// coefficient` ([`GradFactors`]); `None` otherwise (the caller's tensor operations).
pub fn fused_adamw<B: Backend>(
    params: &BurnTensor<B, 1>,
    grads: &BurnTensor<B, 1>,
    (exp_avg, exp_avg_sq): (&BurnTensor<B, 1>, &BurnTensor<B, 1>),
    config: &AdamWConfig,
    (lr, step): (f32, u64),
    factors: GradFactors,
) -> Option<[BurnTensor<B, 1>; 3]> {
    if !super::Kernel::FusedAdamW.enabled()
        || [params, grads, exp_avg, exp_avg_sq]
            .iter()
            .any(|t| t.dtype() != DType::F32 || t.dims() != params.dims())
        || params.dims()[0] >= u32::MAX as usize
    {
        return None;
    }
    let update = coefficients(config, lr, step, factors);
    #[allow(unused_macros)] // without a GPU backend compiled in
    macro_rules! route {
        ($backend:ty) => {
            let as_gpu = |t: &BurnTensor<B, 1>| {
                super::flash::as_backend::<$backend, B, 1>(t).map(|t| t.into_primitive().tensor())
            };
            if let Some(p) = as_gpu(params) {
                let (g, m, v) = (as_gpu(grads)?, as_gpu(exp_avg)?, as_gpu(exp_avg_sq)?);
                let out = <$backend>::fused_adamw(p, g, m, v, update).map(|t| {
                    super::typed_back(BurnTensor::<$backend, 1>::from_primitive(
                        TensorPrimitive::Float(t),
                    ))
                });
                return Some(out);
            }
        };
    }
    #[cfg(feature = "wgpu")]
    route!(crate::Wgpu);
    #[cfg(feature = "cuda")]
    route!(crate::Cuda);
    None
}
