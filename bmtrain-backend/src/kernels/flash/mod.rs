//! Flash attention on the GPU backends (CUDA, wgpu): hand-written cubecl kernels with their own
//! backward, registered with burn's autodiff as one operation.
//!
//! burn's composition of attention keeps the `[batch, heads, q_len, k_len]` scores, their
//! softmax and (for backward) both, in the compute dtype; these kernels keep neither. The forward
//! walks the keys a tile at a time with an online softmax and saves only the output and each query
//! row's log-sum-exp (f32); backward recomputes the probabilities from those, tile by tile:
//!
//! ```text
//!   S = scale·Q·Kᵀ + bias     P = exp(S − lse)     P̃ = P ⊙ M / (1 − p)     O = P̃·V
//!   delta = rowsum(dO ⊙ O)    dV = P̃ᵀ·dO    dP = (dO·Vᵀ) ⊙ M / (1 − p)    dS = P ⊙ (dP − delta)
//!   dQ = scale·dS·K    dK = scale·dSᵀ·Q    d(bias) = dS summed over the bias's broadcast dims
//! ```
//!
//! Supported: f32, f16 and bf16 tensors (statistics and sums in f32); the projections'
//! `[batch, len, heads·head_dim]` layout; grouped-query attention (k and v with fewer heads); an
//! additive bias of dims `[batch | 1, heads | 1, q_len | 1, k_len]` (padding masks, causal masks,
//! T5's relative position bias, whose gradient backward computes when the bias needs one, as the
//! one `[batch, heads, q_len, k_len]` tensor this path materialises); causal masking computed in
//! the kernel (no mask tensor); dropout on the probabilities from a counter-based hash of the
//! seed and the element's index, so backward and a checkpointed block's recomputation regenerate
//! the forward's mask instead of storing it. Head sizes up to [`MAX_HEAD_DIM`].
//!
//! The kernels run on a `CubeBackend` (burn-cubecl's tensors) and, through a custom operation,
//! under burn's `Fusion` (what `burn::backend::{Cuda, Wgpu}` are). The tests (`tests/wgpu/flash.rs`)
//! run them on wgpu (lavapipe in CI) against burn's composition, values and gradients.

mod fusion;
mod kernel;

use std::any::Any;
use std::marker::PhantomData;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::autodiff_node as record;

/// The largest head size (of queries/keys, and of values) the kernels take: each unit holds a
/// row of each in registers.
pub const MAX_HEAD_DIM: usize = super::FLASH_MAX_HEAD_DIM;

/// The shapes and settings of one flash attention call.
#[derive(Debug, Clone, PartialEq)]
pub struct FlashGeometry {
    /// Batch rows.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`; fewer for grouped-query attention).
    pub kv_heads: usize,
    /// Queries per row.
    pub q_len: usize,
    /// Keys per row.
    pub k_len: usize,
    /// Size of a query/key head.
    pub head_dim: usize,
    /// Size of a value head.
    pub value_dim: usize,
    /// The scores' scale (usually `1/√head_dim`).
    pub scale: f32,
    /// Query `i` sees keys `0..=i + k_len − q_len` only.
    pub causal: bool,
    /// Dropout probability on the attention probabilities (0: none).
    pub dropout: f32,
    /// The dropout mask's seed.
    pub seed: u64,
}

impl FlashGeometry {
    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Whether the kernels take these shapes.
    pub fn supported(&self) -> bool {
        self.heads > 0
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && (1..=MAX_HEAD_DIM).contains(&self.head_dim)
            && (1..=MAX_HEAD_DIM).contains(&self.value_dim)
            && self.batch > 0
            && self.q_len > 0
            && self.k_len > 0
            && (0.0..1.0).contains(&self.dropout)
            // Causal queries are the last q_len positions of the keys'.
            && (!self.causal || self.k_len >= self.q_len)
            // The kernels index rows and the mask's counter in 32 bits.
            && self.batch * self.heads * self.q_len.max(self.k_len) < u32::MAX as usize
    }
}

/// A backend that runs the flash attention kernels on its float tensors.
pub trait FlashBackend: Backend {
    /// The output `[batch, q_len, heads·value_dim]` (q's dtype) and the rows' log-sum-exp
    /// `[batch·heads·q_len]` (f32). `bias` is f32.
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        geometry: &FlashGeometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `[dq, dk, dv, d_bias]`: the inputs' gradients (their dtype) and, when `bias_grad` and a
    /// bias was given, the bias's gradient before broadcasting, `[batch, heads, q_len, k_len]`
    /// (f32).
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        geometry: &FlashGeometry,
        bias_grad: bool,
    ) -> [Option<FloatTensor<Self>>; 4];
}

impl<R, F, I, BT> FlashBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        geometry: &FlashGeometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        kernel::forward(q, k, v, bias, geometry)
    }

    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        geometry: &FlashGeometry,
        bias_grad: bool,
    ) -> [Option<FloatTensor<Self>>; 4] {
        kernel::backward(q, k, v, bias, out, lse, d_out, geometry, bias_grad)
    }
}

/// Flash attention without autodiff (inference, or a backend that tracks nothing): the output
/// `[batch, q_len, heads·value_dim]`.
pub fn flash_attention<B: FlashBackend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    bias: Option<Tensor<B, 4>>,
    geometry: &FlashGeometry,
) -> Tensor<B, 3> {
    let float = |t: Tensor<B, 3>| t.into_primitive().tensor();
    let bias = bias.map(|bias| bias.cast(DType::F32).into_primitive().tensor());
    let (out, _) = B::flash_forward(float(q), float(k), float(v), bias, geometry);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Flash attention under autodiff: one graph node whose backward runs the backward kernels.
/// The bias is cast to f32 first (in the graph, so its gradient flows back to its own dtype).
pub fn flash_attention_train<B: FlashBackend>(
    q: Tensor<Autodiff<B>, 3>,
    k: Tensor<Autodiff<B>, 3>,
    v: Tensor<Autodiff<B>, 3>,
    bias: Option<Tensor<Autodiff<B>, 4>>,
    geometry: &FlashGeometry,
) -> Tensor<Autodiff<B>, 3> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let bias = bias.map(|bias| bias.cast(DType::F32).into_primitive().tensor());
    let (out, lse) = B::flash_forward(
        q.primitive.clone(),
        k.primitive.clone(),
        v.primitive.clone(),
        bias.as_ref().map(|bias| bias.primitive.clone()),
        geometry,
    );
    let saved = Saved {
        q: q.primitive.clone(),
        k: k.primitive.clone(),
        v: v.primitive.clone(),
        bias: bias.as_ref().map(|bias| bias.primitive.clone()),
        out: out.clone(),
        lse,
        geometry: geometry.clone(),
    };
    let output = match bias {
        Some(bias) => record(
            FlashBackward::<B>(PhantomData),
            [&q, &k, &v, &bias],
            saved,
            out,
        ),
        None => record(FlashBackward::<B>(PhantomData), [&q, &k, &v], saved, out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

/// What backward needs: the inputs, the output and its rows' log-sum-exp.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    geometry: FlashGeometry,
}

/// Flash attention's backward step.
#[derive(Debug)]
struct FlashBackward<B>(PhantomData<fn() -> B>);

impl<B: FlashBackend, const N: usize> Backward<B, N> for FlashBackward<B> {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let saved = ops.state;
        let bias_parent = ops.parents.get(3).and_then(|parent| parent.as_ref());
        let bias_dims = saved.bias.as_ref().map(|bias| {
            Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(bias.clone())).dims()
        });
        let [d_q, d_k, d_v, d_bias] = B::flash_backward(
            saved.q,
            saved.k,
            saved.v,
            saved.bias,
            saved.out,
            saved.lse,
            d_out,
            &saved.geometry,
            bias_parent.is_some(),
        );
        let d_bias = d_bias.zip(bias_dims).map(|(d_bias, dims)| {
            // Sum the per-element gradient over the dimensions the bias was broadcast along.
            let mut d_bias = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(d_bias));
            for (axis, &size) in dims.iter().enumerate() {
                if size == 1 && d_bias.dims()[axis] != 1 {
                    d_bias = d_bias.sum_dim(axis);
                }
            }
            d_bias.into_primitive().tensor()
        });
        for (parent, grad) in ops.parents.iter().zip([d_q, d_k, d_v, d_bias]) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

/// `tensor` as a tensor of backend `C`, when `B` is `C`.
pub(crate) fn as_backend<C: Backend, B: Backend, const D: usize>(
    tensor: &Tensor<B, D>,
) -> Option<Tensor<C, D>> {
    let any: Box<dyn Any> = Box::new(tensor.clone());
    any.downcast::<Tensor<C, D>>().ok().map(|t| *t)
}

/// Whether `B` is a GPU backend of this build, or its autodiff: the backends [`route`] runs the
/// kernels on.
pub(crate) fn runs_on<B: Backend>() -> bool {
    let b = std::any::TypeId::of::<B>();
    let is = |backends: [std::any::TypeId; 2]| backends.contains(&b);
    #[cfg(feature = "wgpu")]
    if is([
        std::any::TypeId::of::<crate::Wgpu>(),
        std::any::TypeId::of::<Autodiff<crate::Wgpu>>(),
    ]) {
        return true;
    }
    #[cfg(feature = "cuda")]
    if is([
        std::any::TypeId::of::<crate::Cuda>(),
        std::any::TypeId::of::<Autodiff<crate::Cuda>>(),
    ]) {
        return true;
    }
    let _ = is;
    false
}

/// An optional bias as a tensor of backend `C` (`Some(None)` without one), when `B` is `C`.
#[allow(dead_code)] // without a GPU backend compiled in
fn bias_as<C: Backend, B: Backend>(bias: Option<&Tensor<B, 4>>) -> Option<Option<Tensor<C, 4>>> {
    match bias {
        Some(bias) => as_backend(bias).map(Some),
        None => Some(None),
    }
}

/// Flash attention for `kernels::attention` when `B` is a GPU backend of this build (or its
/// autodiff) and the dtypes and shapes fit; `None` otherwise.
pub(super) fn route<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    bias: Option<&Tensor<B, 4>>,
    geometry: &FlashGeometry,
) -> Option<Tensor<B, 3>> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        || k.dtype() != dtype
        || v.dtype() != dtype
        || !geometry.supported()
    {
        return None;
    }
    #[allow(unused_macros)] // without a GPU backend compiled in
    macro_rules! route {
        ($inner:ty) => {
            if let Some(q) = as_backend::<Autodiff<$inner>, B, 3>(q) {
                let out = flash_attention_train::<$inner>(
                    q,
                    as_backend(k)?,
                    as_backend(v)?,
                    bias_as(bias)?,
                    geometry,
                );
                return Some(super::typed_back(out));
            }
            if let Some(q) = as_backend::<$inner, B, 3>(q) {
                let out = flash_attention::<$inner>(
                    q,
                    as_backend(k)?,
                    as_backend(v)?,
                    bias_as(bias)?,
                    geometry,
                );
                return Some(super::typed_back(out));
            }
        };
    }
    #[cfg(feature = "wgpu")]
    route!(crate::Wgpu);
    #[cfg(feature = "cuda")]
    route!(crate::Cuda);
    let _ = (k, v, bias);
    None
}
