//! Fused CPU kernels for the hot operations of Transformer training, with their own backward.
//!
//! burn-flex runs each tensor operation as its own pass over memory, most of them on one thread,
//! and composite layers (attention, GELU, layer norm, cross-entropy) become chains of such passes
//! and copies: attention alone splits heads, scales, adds the mask, runs a five-pass softmax, draws
//! a dropout mask through a ChaCha sampler and merges heads again. Here each of those layers is
//! one operation that reads its inputs once, runs on every thread of rayon's current pool, and
//! registers one backward step with burn's autodiff:
//!
//! - [`attention`]: `softmax(q·kᵀ·scale + bias)·v` with dropout, straight from and to the
//!   `[batch, len, heads·head_dim]` layout of the projections (no head split/merge copies, no
//!   score tensors besides the probabilities kept for backward);
//! - [`gelu`], [`silu`]: the erf and tanh GELUs and SiLU in one pass each way;
//! - [`rotary`]: rotary position embeddings (`rotate_half`) in one pass each way;
//! - [`layer_norm`], [`rms_norm`]: the statistics, scale (and shift) in one pass, backward in one
//!   more;
//! - [`cross_entropy`]: log-softmax, pick and mean in one pass over the logits; the gradient
//!   `softmax − one-hot` in one more;
//! - [`linear`]: `x·W + b` on `gemm` with the bias as the accumulator's start and the transposes
//!   of backward as strides (no zeroed-then-copied outputs, no transposed copies);
//! - [`dropout`]: a counter-based mask (SplitMix64 of the element's index) applied in one pass and
//!   regenerated in backward instead of stored;
//! - [`gelu`] on the GPU backends: burn's exact GELU with the exact gradient (burn's default
//!   backward, which they inherit, is the tanh approximation's derivative);
//! - [`lm_head_loss`] (GPU backends): a language model's head and cross-entropy in chunks of
//!   rows, never the whole `[tokens, vocab]` logits, its gradients computed in the forward.
//! - [`attention`] on the GPU backends (`flash`): hand-written cubecl kernels, flash attention
//!   forward and backward, that never hold the `[batch, heads, q_len, k_len]` scores;
//! - [`layer_norm`], [`rms_norm`] on the GPU backends (`gpu_norm`): cubecl kernels, statistics
//!   in f32 for any input dtype, backward keeping only the input and two floats per row;
//! - [`fused_adamw`] (GPU backends): the device-resident AdamW step as one cubecl kernel.
//!
//! Their element-wise loops are compiled twice, for baseline x86-64 and for AVX-512, and the
//! AVX-512 copy runs when the CPU has it (`simd.rs`); the transcendental functions in them are
//! branch-free polynomials so that they vectorise.
//!
//! Every kernel takes and returns ordinary `Tensor<B, D>`s. It runs when `B` is the CPU backend
//! ([`Cpu`]) or its autodiff ([`CpuTrain`]) and the tensors are f32; otherwise (CUDA, half
//! precision) it answers with burn's own composition of the same maths, so models call the kernel
//! unconditionally. `ZOO_KERNELS=off` in the environment turns the fused path off (for
//! before/after benchmarks); `ZOO_KERNELS=attention,gelu` keeps only the named ones, and
//! `ZOO_KERNELS=-flash_attention` all but the named ones.
//!
//! The tests compare each kernel's outputs and gradients with burn's composition on random
//! inputs.

mod activation;
#[cfg(feature = "gpu-kernels")]
mod adamw;
mod attention;
#[cfg(feature = "gpu-kernels")]
mod custom_op;
mod dropout;
#[cfg(feature = "gpu-kernels")]
pub mod flash;
mod gelu_grad;
#[cfg(feature = "gpu-kernels")]
pub mod gpu_norm;
mod head_loss;
mod linear;
mod loss;
mod norm;
mod quantized;
mod rotary;
pub(crate) mod simd;

pub use activation::{gelu, silu};
#[cfg(feature = "gpu-kernels")]
pub use adamw::fused_adamw;
pub use attention::{attention, computes_causal_masks};
pub use dropout::dropout;
pub use gelu_grad::exact_gelu_train;
pub use head_loss::{
    CHUNK_BYTES, Head, HeadLayout, chunk_rows, chunked_head_loss, chunked_head_loss_train,
    lm_head_loss,
};
pub use linear::linear;
pub use loss::cross_entropy;
pub use norm::{layer_norm, rms_norm};
pub use quantized::{quantized_embedding, quantized_linear};
pub use rotary::rotary;

use std::any::Any;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Distribution, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use crate::{Cpu, CpuTrain};

/// The widest attention head (queries/keys, and values) the GPU backends' flash attention
/// kernels take; wider heads run burn's composition.
pub const FLASH_MAX_HEAD_DIM: usize = 128;

/// A GPU route's result typed back as the caller's backend `B`, which it is: the route matched
/// the caller's tensors as backend `C` by downcasting.
#[allow(dead_code)] // unused when no GPU backend is compiled in
fn typed_back<B: Backend, C: Backend, const D: usize>(tensor: Tensor<C, D>) -> Tensor<B, D> {
    let any: Box<dyn Any> = Box::new(tensor);
    *any.downcast::<Tensor<B, D>>()
        .unwrap_or_else(|_| unreachable!("the route's backend is the caller's"))
}

/// The fused kernels, as `ZOO_KERNELS` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// [`attention`].
    Attention,
    /// [`gelu`].
    Gelu,
    /// [`layer_norm`].
    LayerNorm,
    /// [`cross_entropy`].
    CrossEntropy,
    /// [`dropout`].
    Dropout,
    /// [`linear`].
    Linear,
    /// [`silu`].
    Silu,
    /// [`rotary`].
    Rotary,
    /// [`rms_norm`].
    RmsNorm,
    /// [`lm_head_loss`] (the GPU backends' chunked head and loss).
    LmHeadLoss,
    /// [`attention`] on the GPU backends: the flash attention kernels (`flash`).
    FlashAttention,
    /// The device-resident AdamW step as one kernel on the GPU backends (`adamw`).
    FusedAdamW,
}

impl Kernel {
    const ALL: [Kernel; 12] = [
        Kernel::Attention,
        Kernel::Gelu,
        Kernel::LayerNorm,
        Kernel::CrossEntropy,
        Kernel::Dropout,
        Kernel::Linear,
        Kernel::Silu,
        Kernel::Rotary,
        Kernel::RmsNorm,
        Kernel::LmHeadLoss,
        Kernel::FlashAttention,
        Kernel::FusedAdamW,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Attention => "attention",
            Kernel::Gelu => "gelu",
            Kernel::LayerNorm => "layer_norm",
            Kernel::CrossEntropy => "cross_entropy",
            Kernel::Dropout => "dropout",
            Kernel::Linear => "linear",
            Kernel::Silu => "silu",
            Kernel::Rotary => "rotary",
            Kernel::RmsNorm => "rms_norm",
            Kernel::LmHeadLoss => "lm_head_loss",
            Kernel::FlashAttention => "flash_attention",
            Kernel::FusedAdamW => "fused_adamw",
        }
    }

    /// Whether `ZOO_KERNELS` lets this kernel run (all of them when it is unset).
    pub fn enabled(self) -> bool {
        static ENABLED: OnceLock<Vec<Kernel>> = OnceLock::new();
        ENABLED
            .get_or_init(|| match std::env::var("ZOO_KERNELS") {
                Err(_) => Kernel::ALL.to_vec(),
                Ok(list) => Kernel::parse(&list),
            })
            .contains(&self)
    }

    /// The kernels a `ZOO_KERNELS` value lets run: `all` (or empty), `off`, the names to keep
    /// (`attention,gelu`), or the names to leave out of all (`-flash_attention,-fused_adamw`).
    fn parse(list: &str) -> Vec<Kernel> {
        let names: Vec<&str> = list.split(',').map(str::trim).collect();
        match list.trim() {
            "" | "all" | "on" => Kernel::ALL.to_vec(),
            "off" | "none" => Vec::new(),
            _ if names.iter().all(|n| n.starts_with('-')) => Kernel::ALL
                .into_iter()
                .filter(|k| !names.iter().any(|n| n[1..].trim() == k.name()))
                .collect(),
            _ => Kernel::ALL
                .into_iter()
                .filter(|k| names.contains(&k.name()))
                .collect(),
        }
    }
}

/// A tensor seen as one of the two backends the kernels run on.
enum OnCpu<const D: usize> {
    Train(Tensor<CpuTrain, D>),
    Infer(Tensor<Cpu, D>),
}

/// `tensor` as a CPU tensor when `B` is [`Cpu`] or [`CpuTrain`] and the values are f32.
fn on_cpu<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> Option<OnCpu<D>> {
    if tensor.dtype() != DType::F32 {
        return None;
    }
    let any: Box<dyn Any> = Box::new(tensor.clone());
    match any.downcast::<Tensor<CpuTrain, D>>() {
        Ok(t) => Some(OnCpu::Train(*t)),
        Err(any) => any
            .downcast::<Tensor<Cpu, D>>()
            .ok()
            .map(|t| OnCpu::Infer(*t)),
    }
}

/// Calls `read` with a CPU f32 tensor's values in place (no copy, unless the tensor is a strided
/// view) and returns true; returns false, without calling it, for other backends and dtypes.
///
/// burn's `into_data` copies a tensor that is shared (a gradient handed out by `Gradients` is),
/// and then copies again to realign the bytes; the ZeRO trainer reads every gradient once a step.
pub fn read_f32<B: Backend, const D: usize>(
    tensor: &Tensor<B, D>,
    read: impl FnOnce(&[f32]),
) -> bool {
    let flex = match on_cpu(tensor) {
        Some(OnCpu::Infer(t)) => flex(t),
        Some(OnCpu::Train(t)) => flex(t.inner()),
        None => return false,
    };
    read(values(&flex));
    true
}

/// Whether a gradient flows into `tensor` in backward (a parameter, or anything computed from
/// one). burn's `is_require_grad` answers for leaves only.
fn tracks_gradient<const D: usize>(tensor: &Tensor<CpuTrain, D>) -> bool {
    !tensor
        .clone()
        .into_primitive()
        .tensor()
        .node
        .requirement
        .is_none()
}

/// The same tensor, typed back as `B` (which it is: [`on_cpu`] checked).
fn from_cpu<B: Backend, C: Backend, const D: usize>(tensor: Tensor<C, D>) -> Tensor<B, D> {
    let any: Box<dyn Any> = Box::new(tensor);
    *any.downcast::<Tensor<B, D>>()
        .unwrap_or_else(|_| unreachable!("the kernel's backend is the caller's"))
}

/// The flex tensor under an inference tensor, contiguous.
fn flex<const D: usize>(tensor: Tensor<Cpu, D>) -> FlexTensor {
    contiguous(tensor.into_primitive().tensor())
}

/// `tensor` laid out contiguously from the start of its buffer (a copy only when it is not).
fn contiguous(tensor: FlexTensor) -> FlexTensor {
    if tensor.is_contiguous() && tensor.layout().start_offset() == 0 {
        tensor
    } else {
        tensor.to_contiguous()
    }
}

/// The f32 values of a contiguous flex tensor.
fn values(tensor: &FlexTensor) -> &[f32] {
    &tensor.storage::<f32>()[..tensor.layout().num_elements()]
}

/// A new f32 flex tensor owning `values` (no copy).
fn flex_from(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// An inference tensor from a flex tensor.
fn tensor_from<const D: usize>(tensor: FlexTensor) -> Tensor<Cpu, D> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

thread_local! {
    /// This thread's stream of dropout seeds, once [`seed_thread`] has started it.
    static THREAD_SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Starts this thread's own stream of dropout seeds at `seed`: from then on the fused kernels
/// on this thread draw their masks from it instead of from the backend's process-wide generator.
/// The ZeRO trainer calls it before every segment (from the seed, step, micro-batch, rank and
/// segment), so thread ranks, which share one process and so one backend generator, draw the
/// same masks whatever the interleaving of their threads: as process ranks do.
pub fn seed_thread(seed: u64) {
    THREAD_SEED.set(Some(seed));
}

/// 64 random bits for a mask: from this thread's stream when [`seed_thread`] started one, else
/// from the backend's seeded generator, so that a fused kernel's dropout follows `B::seed` as
/// burn's own dropout does (block recomputation replays the same masks either way).
fn draw_seed() -> u64 {
    if let Some(state) = THREAD_SEED.get() {
        let next = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        THREAD_SEED.set(Some(next));
        return mix(next);
    }
    let device = Default::default();
    let words: Vec<f32> = Tensor::<Cpu, 1>::random([4], Distribution::Default, &device)
        .into_data()
        .to_vec()
        .unwrap_or_default();
    words
        .iter()
        .fold(0u64, |acc, w| acc.rotate_left(16) ^ u64::from(w.to_bits()))
}

/// SplitMix64's finaliser: a counter-based generator, so that backward regenerates the forward's
/// dropout mask from `(seed, index)` instead of storing it.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d1_49bb_133e_b111);
    z ^ (z >> 31)
}

/// Dropout's keep test for element `index` of a mask: true with probability `1 − p`, where
/// `threshold = p · 2³²`.
#[inline(always)]
fn keep(seed: u64, index: u64, threshold: u64) -> bool {
    (mix(seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15))) >> 32) >= threshold
}

/// A dropout mask: element `i` is kept when `keep(seed, i, threshold)` and then scaled by
/// `scale = 1/(1 − p)`.
#[derive(Debug, Clone, Copy)]
struct Mask {
    seed: u64,
    threshold: u64,
    scale: f32,
}

impl Mask {
    /// The mask of dropout probability `prob` drawn from `seed`.
    fn new(seed: u64, prob: f64) -> Self {
        Self {
            seed,
            threshold: (prob * 4_294_967_296.0) as u64,
            scale: (1.0 / (1.0 - prob)) as f32,
        }
    }

    /// `x ⊙ mask · scale` in place, `x` being elements `first..` of the masked tensor.
    fn apply_in_place(&self, x: &mut [f32], first: u64) {
        masked_in_place(x, *self, first);
    }
}

simd::avx512_version! {
    /// [`Mask::apply_in_place`]'s loop (SplitMix64 vectorises with AVX-512's 64-bit multiply).
    fn masked_in_place(x: &mut [f32], mask: Mask, first: u64) {
        for (i, v) in x.iter_mut().enumerate() {
            let kept = keep(mask.seed, first + i as u64, mask.threshold);
            *v = if kept { *v * mask.scale } else { 0.0 };
        }
    }
}

/// The autodiff primitive of a training tensor (its values and its graph node).
type TrainPrimitive = burn::tensor::ops::FloatTensor<CpuTrain>;

/// `output` as the autodiff node of `op` over `parents`, on any backend: `state` is kept for
/// `op`'s backward when a parent tracks gradients, and dropped otherwise. Every kernel's
/// autodiff operation ends here (the CPU kernels through [`record`]).
pub(crate) fn autodiff_node<B: Backend, Op: Backward<B, N>, const N: usize>(
    op: Op,
    parents: [&FloatTensor<Autodiff<B>>; N],
    state: Op::State,
    output: FloatTensor<B>,
) -> FloatTensor<Autodiff<B>> {
    let nodes = parents.map(|parent| parent.node.clone());
    match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// `output` as a training tensor computed by `op` from `parents`: when a parent tracks gradients,
/// `op`'s backward is registered with `state` (what it needs later); otherwise `state` is dropped.
fn record<Op, B, const N: usize, const D: usize>(
    op: Op,
    parents: [&TrainPrimitive; N],
    state: Op::State,
    output: FlexTensor,
) -> Tensor<B, D>
where
    Op: Backward<Cpu, N>,
    B: Backend,
{
    let output = autodiff_node(op, parents, state, output);
    from_cpu(Tensor::<CpuTrain, D>::from_primitive(
        TensorPrimitive::Float(output),
    ))
}

/// Where every backward step starts: the gradient of the op's output (contiguous) and the ids of
/// the parents that take a gradient (`None` for the others).
fn output_grad<S, const N: usize>(
    ops: &Ops<S, N>,
    grads: &mut Gradients,
) -> (FlexTensor, [Option<NodeId>; N]) {
    let grad = contiguous(grads.consume::<Cpu>(&ops.node));
    let parents = ops
        .parents
        .each_ref()
        .map(|parent| parent.as_ref().map(|node| node.id));
    (grad, parents)
}

/// Hands each computed gradient (values, shape) to its parent, in order; parents that take none
/// are skipped, and so are gradients past the last parent.
fn register_grads(
    grads: &mut Gradients,
    parents: impl IntoIterator<Item = Option<NodeId>>,
    computed: impl IntoIterator<Item = (Vec<f32>, Vec<usize>)>,
) {
    for (parent, (values, shape)) in parents.into_iter().zip(computed) {
        if let Some(id) = parent {
            grads.register::<Cpu>(id, flex_from(values, shape));
        }
    }
}

/// A strided matrix operand: pointer, row stride, column stride (in elements).
type View = (*const f32, isize, isize);

/// `dst[m×n] = beta · lhs[m×k] · rhs[k×n]`, or `dst + beta · lhs · rhs` when `accumulate`, with
/// `gemm` (the matrix kernels burn-flex uses); on rayon's current pool when `threaded`.
///
/// # Safety
/// `dst` must address `m×n` writable elements (initialised when `accumulate`), the views `m×k`
/// and `k×n` valid ones, and `dst` must not alias them.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    lhs: View,
    rhs: View,
    beta: f32,
    accumulate: bool,
    threaded: bool,
) {
    let parallelism = if threaded {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller. gemm takes (column stride, row stride) pairs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            accumulate,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Elements per rayon task in the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// A `len`-long buffer filled on all threads in chunks of [`CHUNK`]: `fill(start, out)` writes
/// every element of `out`, the chunk that starts at element `start` (nothing is zeroed first).
fn par_filled(len: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| fill(c * CHUNK, chunk));
    // SAFETY: `fill` initialised every element of the `len` spare slots.
    unsafe { out.set_len(len) };
    out
}

/// A raw pointer that rayon tasks may share: each task writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);

// SAFETY: the kernels only write through it to regions no other task touches.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Kernel;

    #[test]
    fn zoo_kernels_keeps_or_leaves_out_the_named_kernels() {
        assert_eq!(Kernel::parse(""), Kernel::ALL.to_vec());
        assert_eq!(Kernel::parse("off"), Vec::new());
        assert_eq!(
            Kernel::parse("attention, gelu"),
            vec![Kernel::Attention, Kernel::Gelu]
        );
        let without = Kernel::parse("-flash_attention, -fused_adamw");
        assert_eq!(without.len(), Kernel::ALL.len() - 2);
        assert!(!without.contains(&Kernel::FlashAttention));
        assert!(!without.contains(&Kernel::FusedAdamW));
        assert!(without.contains(&Kernel::Attention));
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for comparing a kernel with burn's composition.

    use super::*;

    /// Deterministic values in `[-scale, scale)` (an LCG, so the tests need no RNG crate).
    pub fn random(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// A training tensor that requires its gradient.
    pub fn leaf<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<CpuTrain, D> {
        Tensor::<CpuTrain, D>::from_data(TensorData::new(values, shape), &Default::default())
            .require_grad()
    }

    /// The largest absolute difference between two tensors' values.
    pub fn max_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        let a: Vec<f32> = a.into_data().to_vec().unwrap();
        let b: Vec<f32> = b.into_data().to_vec().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}
