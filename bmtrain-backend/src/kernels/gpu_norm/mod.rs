//! Layer norm and RMS norm on the GPU backends (CUDA, wgpu): cubecl kernels with their own
//! backward, registered with burn's autodiff as one operation.
//!
//! burn's composition of layer norm in f32 (what half-precision training needs: f16 squared
//! deviations overflow) is a cast, a mean, a variance, a subtraction, a division, a scale and a
//! shift, and its autodiff keeps the f32 copy of the input and several f32 intermediates for
//! backward. Here a forward reads the input once per statistic and writes the output once, and
//! keeps for backward only the input (its own dtype) and each row's `(mean, rstd)` in f32:
//!
//! ```text
//!   layer norm:  x̂ = (x − mean)·rstd,  rstd = 1/√(var + eps)      y = x̂·γ + β
//!                dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),  g = dy·γ    dγ = Σ dy·x̂    dβ = Σ dy
//!   RMS norm:    x̂ = x·rstd,  rstd = 1/√(mean(x²) + eps)          y = x̂·γ
//!                dx = rstd·(g − x̂·mean(g·x̂)),  g = dy·γ              dγ = Σ dy·x̂
//! ```
//!
//! Statistics, scale and shift are f32 whatever the input's dtype (f32, f16, bf16), and the
//! output is rounded to that dtype once. (transformers' T5 and Llama RMS norms round `x̂` to the
//! weight's half dtype before scaling; this rounds `x̂·γ` instead, within one half-precision ulp.)
//!
//! The kernels run on a `CubeBackend` and, through a custom operation, under burn's `Fusion`
//! (what `burn::backend::{Cuda, Wgpu}` are). The tests (`tests/wgpu/norm.rs`) run them on
//! wgpu (lavapipe in CI) against burn's composition, values and gradients.

mod kernel;

pub use kernel::{MAX_ROW_CUBES, UNITS};

use std::marker::PhantomData;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::autodiff_node as record;
use super::custom_op::register;
use super::flash::as_backend;

/// The shape and settings of one normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct NormGeometry {
    /// Rows normalised (every dimension but the last, multiplied).
    pub rows: usize,
    /// The normalised (last) dimension.
    pub width: usize,
    /// Added to the variance (mean square) before the square root.
    pub epsilon: f32,
    /// RMS norm (no mean subtraction, no shift) instead of layer norm.
    pub rms: bool,
}

impl NormGeometry {
    /// Whether the kernels take this shape: the kernels index rows and columns in 32 bits, and
    /// the scale gradient's chunks are one grid dimension (at most 65535).
    pub fn supported(&self) -> bool {
        self.rows > 0
            && self.width > 0
            && self.rows.saturating_mul(self.width) < u32::MAX as usize
            && self.rows.div_ceil(kernel::CHUNK_ROWS) <= 65_535
    }
}

/// A backend that runs the normalisation kernels on its float tensors.
pub trait NormBackend: Backend {
    /// `y` (x's shape and dtype) and the rows' `(mean, rstd)` (`[rows·2]`, f32); `gamma` and
    /// `beta` are f32 `[width]`, and `beta` is absent for RMS norm (and a layer norm without
    /// shift).
    fn norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        geometry: &NormGeometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dx, dγ, dβ)`: dx in x's dtype, dγ and (when `shift`) dβ in f32.
    fn norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        d_y: FloatTensor<Self>,
        geometry: &NormGeometry,
        shift: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    );
}

impl<R, F, I, BT> NormBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        geometry: &NormGeometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        kernel::forward(x, gamma, beta, geometry)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        d_y: FloatTensor<Self>,
        geometry: &NormGeometry,
        shift: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    ) {
        kernel::backward(x, gamma, stats, d_y, geometry, shift)
    }
}

/// Under `Fusion`, each call is one custom operation in fusion's stream.
impl<B: FusionBackend + NormBackend> NormBackend for Fusion<B> {
    fn norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        geometry: &NormGeometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let g = geometry.clone();
        let outputs = [
            (x.shape.clone(), x.dtype),
            (Shape::new([g.rows * 2]), DType::F32),
        ];
        let inputs = [Some(x), Some(gamma), beta].into_iter().flatten().collect();
        let run = move |mut inputs: Vec<FloatTensor<B>>| {
            let beta = (inputs.len() == 3).then(|| inputs.pop()).flatten();
            let [x, gamma]: [FloatTensor<B>; 2] = inputs.try_into().expect("x, gamma");
            let (y, stats) = B::norm_forward(x, gamma, beta, &g);
            vec![y, stats]
        };
        let [y, stats]: [FusionTensor<B::FusionRuntime>; 2] =
            register::<B>("zoo_norm_forward", inputs, &outputs, run)
                .try_into()
                .expect("two outputs");
        (y, stats)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        d_y: FloatTensor<Self>,
        geometry: &NormGeometry,
        shift: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    ) {
        let g = geometry.clone();
        let mut outputs = vec![
            (x.shape.clone(), x.dtype),
            (Shape::new([g.width]), DType::F32),
        ];
        if shift {
            outputs.push((Shape::new([g.width]), DType::F32));
        }
        let run = move |inputs: Vec<FloatTensor<B>>| {
            let [x, gamma, stats, d_y]: [FloatTensor<B>; 4] =
                inputs.try_into().expect("four inputs");
            let (d_x, d_gamma, d_beta) = B::norm_backward(x, gamma, stats, d_y, &g, shift);
            [Some(d_x), Some(d_gamma), d_beta]
                .into_iter()
                .flatten()
                .collect()
        };
        let inputs = vec![x, gamma, stats, d_y];
        let mut grads = register::<B>("zoo_norm_backward", inputs, &outputs, run).into_iter();
        let (d_x, d_gamma) = (grads.next().expect("dx"), grads.next().expect("dγ"));
        (d_x, d_gamma, grads.next())
    }
}

/// The normalisation without autodiff: `y`, x's shape and dtype. `gamma` and `beta` are cast
/// to f32 first.
pub fn norm<B: NormBackend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    geometry: &NormGeometry,
) -> Tensor<B, D> {
    let f32_primitive = |t: Tensor<B, 1>| t.cast(DType::F32).into_primitive().tensor();
    let (y, _) = B::norm_forward(
        x.into_primitive().tensor(),
        f32_primitive(gamma),
        beta.map(f32_primitive),
        geometry,
    );
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// The normalisation under autodiff: one graph node whose backward runs the backward kernels.
/// `gamma` and `beta` are cast to f32 in the graph, so their gradients flow back to their own
/// dtype.
pub fn norm_train<B: NormBackend, const D: usize>(
    x: Tensor<Autodiff<B>, D>,
    gamma: Tensor<Autodiff<B>, 1>,
    beta: Option<Tensor<Autodiff<B>, 1>>,
    geometry: &NormGeometry,
) -> Tensor<Autodiff<B>, D> {
    let f32_primitive = |t: Tensor<Autodiff<B>, 1>| t.cast(DType::F32).into_primitive().tensor();
    let x = x.into_primitive().tensor();
    let gamma = f32_primitive(gamma);
    let beta = beta.map(f32_primitive);
    let (y, stats) = B::norm_forward(
        x.primitive.clone(),
        gamma.primitive.clone(),
        beta.as_ref().map(|beta| beta.primitive.clone()),
        geometry,
    );
    let saved = Saved {
        x: x.primitive.clone(),
        gamma: gamma.primitive.clone(),
        stats,
        geometry: geometry.clone(),
    };
    let output = match beta {
        Some(beta) => record(
            NormBackward::<B>(PhantomData),
            [&x, &gamma, &beta],
            saved,
            y,
        ),
        None => record(NormBackward::<B>(PhantomData), [&x, &gamma], saved, y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

/// What backward needs: the input, the f32 scale and the rows' statistics.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    stats: FloatTensor<B>,
    geometry: NormGeometry,
}

/// The normalisation's backward step.
#[derive(Debug)]
struct NormBackward<B>(PhantomData<fn() -> B>);

impl<B: NormBackend, const N: usize> Backward<B, N> for NormBackward<B> {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_y = grads.consume::<B>(&ops.node);
        let saved = ops.state;
        let shift = N == 3;
        let (d_x, d_gamma, d_beta) = B::norm_backward(
            saved.x,
            saved.gamma,
            saved.stats,
            d_y,
            &saved.geometry,
            shift,
        );
        for (parent, grad) in ops.parents.iter().zip([Some(d_x), Some(d_gamma), d_beta]) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

/// The normalisation for `kernels::{layer_norm, rms_norm}` when `B` is a GPU backend of this
/// build (or its autodiff) and the dtypes and shape fit; `None` otherwise.
pub(super) fn route<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    beta: Option<&Tensor<B, 1>>,
    epsilon: f64,
    rms: bool,
) -> Option<Tensor<B, D>> {
    let dims = x.dims();
    let width = dims[D - 1];
    let geometry = NormGeometry {
        rows: dims[..D - 1].iter().product(),
        width,
        epsilon: epsilon as f32,
        rms,
    };
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        || gamma.dims() != [width]
        || beta.is_some_and(|beta| beta.dims() != [width])
        || (rms && beta.is_some())
        || !geometry.supported()
    {
        return None;
    }
    #[allow(unused_macros)] // without a GPU backend compiled in
    macro_rules! route {
        ($inner:ty) => {
            if let Some(x) = as_backend::<Autodiff<$inner>, B, D>(x) {
                let beta = match beta {
                    Some(beta) => Some(as_backend(beta)?),
                    None => None,
                };
                let y = norm_train::<$inner, D>(x, as_backend(gamma)?, beta, &geometry);
                return Some(super::typed_back(y));
            }
            if let Some(x) = as_backend::<$inner, B, D>(x) {
                let beta = match beta {
                    Some(beta) => Some(as_backend(beta)?),
                    None => None,
                };
                let y = norm::<$inner, D>(x, as_backend(gamma)?, beta, &geometry);
                return Some(super::typed_back(y));
            }
        };
    }
    #[cfg(feature = "wgpu")]
    route!(crate::Wgpu);
    #[cfg(feature = "cuda")]
    route!(crate::Cuda);
    let _ = (gamma, beta, geometry);
    None
}
