//! A language model's head and its token cross-entropy in chunks of rows, so that the whole
//! `[tokens, vocab]` logits never exist: on a GPU they are the largest tensors of a causal-LM
//! step (GPT-2 at 8 × 1024 tokens: 412 M logits, 1.6 GB in f32, and burn's log-softmax and its
//! backward keep several such copies), larger than all of GPT-2 124M's training state.
//!
//! ```text
//!   for each chunk of rows c (about CHUNK_BYTES of f32 logits):
//!     z  = h_c · W (+ b)            in the compute dtype (the backend's matmul), then f32
//!     ℓ += Σ_kept logsumexp(z) − z[target]
//!     dz = softmax(z) − one-hot     (0 on ignored rows), back in the compute dtype
//!     dh_c = dz · Wᵀ,  dW += h_cᵀ · dz,  db += Σ_rows dz      only for inputs that take a gradient
//!   loss = ℓ / kept
//! ```
//!
//! The gradients are computed in the forward, chunk by chunk, as Liger-Kernel's fused linear
//! cross-entropy does, so no logits are kept or recomputed; backward only scales them by
//! `g / kept` (the upstream gradient, which carries the loss scale). They are held in f32 until
//! then: `dz` is `softmax − one-hot` unscaled (entries in `[−1, 1]`), so it does not underflow in
//! f16 the way `dz / tokens` would before the loss scale is applied. A frozen head (LoRA's base)
//! costs no weight gradient.
//!
//! It runs on the GPU backends ([`crate::Wgpu`], [`crate::Cuda`], with or without autodiff),
//! where the CPU's fused [`super::cross_entropy`] does not; on the CPU backend [`lm_head_loss`]
//! answers `None` and the caller keeps its fused kernels. The generic [`chunked_head_loss`] and
//! [`chunked_head_loss_train`] run on any backend (the tests check them on burn-flex and wgpu
//! against burn's composition).

use std::any::Any;

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorMetadata, TensorPrimitive};

use super::{Kernel, autodiff_node};

/// About how many bytes one chunk's f32 logits take (the rows per chunk follow from the
/// vocabulary: GPT-2's 50257 → 640 rows, Llama 3's 128256 → 256).
pub const CHUNK_BYTES: usize = 128 << 20;

/// How a head's weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[hidden, vocab]`: a linear layer in burn's layout (`logits = h · W`).
    HiddenByVocab,
    /// `[vocab, hidden]`: an embedding table tied to the head (`logits = h · Wᵀ`).
    VocabByHidden,
}

/// A language model's output layer.
#[derive(Debug, Clone)]
pub struct Head<B: Backend> {
    /// The weight, laid out as `layout` says.
    pub weight: Tensor<B, 2>,
    /// Which of the weight's dimensions is the vocabulary.
    pub layout: HeadLayout,
    /// `[vocab]`, when the layer has one.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Head<B> {
    /// The vocabulary size.
    fn vocab(&self) -> usize {
        match self.layout {
            HeadLayout::HiddenByVocab => self.weight.dims()[1],
            HeadLayout::VocabByHidden => self.weight.dims()[0],
        }
    }

    /// The weight as the right-hand side of `h · rhs` (`[hidden, vocab]`, a view when tied).
    fn rhs(&self) -> Tensor<B, 2> {
        match self.layout {
            HeadLayout::HiddenByVocab => self.weight.clone(),
            HeadLayout::VocabByHidden => self.weight.clone().transpose(),
        }
    }
}

/// Rows per chunk for a vocabulary: [`CHUNK_BYTES`] of f32 logits, a multiple of 64, at least 64.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_BYTES / 4 / vocab.max(1)).max(64) / 64 * 64
}

/// The mean over rows whose target is not `ignore` of `−log softmax(hidden · W + b)[target]`,
/// as `[1]` in f32 (0 when every row is ignored), computed in chunks of rows (see the module);
/// `None` on the CPU backend (whose fused kernels the caller keeps) or when `ZOO_KERNELS`
/// turns it off.
///
/// - hidden: `[rows, hidden]`; targets: `[rows]`, each in the vocabulary or `ignore`
pub fn lm_head_loss<B: Backend>(
    hidden: Tensor<B, 2>,
    head: Head<B>,
    targets: Tensor<B, 1, Int>,
    ignore: i64,
) -> Option<Tensor<B, 1>> {
    if !Kernel::LmHeadLoss.enabled() {
        return None;
    }
    let args: Box<dyn Any> = Box::new((hidden, head, targets));
    // Each GPU backend, trained (autodiff) or not; anything else falls through to `None`.
    #[allow(unused_macros)] // without a GPU backend compiled in
    macro_rules! route {
        ($args:ident, $inner:ty) => {
            let $args = match $args.downcast::<Args<Autodiff<$inner>>>() {
                Ok(args) => {
                    let (hidden, head, targets) = *args;
                    let rows = chunk_rows(head.vocab());
                    let loss = chunked_head_loss_train(hidden, head, targets, ignore, rows);
                    return Some(super::typed_back(loss));
                }
                Err(args) => args,
            };
            let $args = match $args.downcast::<Args<$inner>>() {
                Ok(args) => {
                    let (hidden, head, targets) = *args;
                    let rows = chunk_rows(head.vocab());
                    let loss = chunked_head_loss(hidden, head, targets, ignore, rows);
                    return Some(super::typed_back(loss));
                }
                Err(args) => args,
            };
        };
    }
    #[cfg(feature = "wgpu")]
    route!(args, crate::Wgpu);
    #[cfg(feature = "cuda")]
    route!(args, crate::Cuda);
    let _ = (args, ignore);
    None
}

/// [`lm_head_loss`]'s arguments on one backend.
#[allow(dead_code)] // unused when no GPU backend is compiled in
type Args<B> = (Tensor<B, 2>, Head<B>, Tensor<B, 1, Int>);

/// [`lm_head_loss`] on any backend without gradients: the loss only, chunk by chunk.
pub fn chunked_head_loss<B: Backend>(
    hidden: Tensor<B, 2>,
    head: Head<B>,
    targets: Tensor<B, 1, Int>,
    ignore: i64,
    rows: usize,
) -> Tensor<B, 1> {
    let chunks = run(hidden, &head, targets, ignore, rows, [false; 3]);
    chunks.total.div(chunks.kept)
}

/// [`lm_head_loss`] on any autodiff backend: the gradients of the hidden states, the weight
/// and the bias (those that take one) are computed chunk by chunk in the forward and handed
/// out, scaled by the upstream gradient, in backward.
pub fn chunked_head_loss_train<I: Backend>(
    hidden: Tensor<Autodiff<I>, 2>,
    head: Head<Autodiff<I>>,
    targets: Tensor<Autodiff<I>, 1, Int>,
    ignore: i64,
    rows: usize,
) -> Tensor<Autodiff<I>, 1> {
    let hidden = hidden.into_primitive().tensor();
    let weight = head.weight.into_primitive().tensor();
    let bias = head.bias.map(|bias| bias.into_primitive().tensor());
    let takes_grad = |t: &FloatTensor<Autodiff<I>>| !t.node.requirement.is_none();
    let need = [
        takes_grad(&hidden),
        takes_grad(&weight),
        bias.as_ref().is_some_and(takes_grad),
    ];
    let dtypes = [
        Some(hidden.primitive.dtype()),
        Some(weight.primitive.dtype()),
        bias.as_ref().map(|b| b.primitive.dtype()),
    ];
    let inner = |t: &FloatTensor<Autodiff<I>>| {
        Tensor::from_primitive(TensorPrimitive::Float(t.primitive.clone()))
    };
    let inner_head = Head::<I> {
        weight: inner(&weight),
        layout: head.layout,
        bias: bias
            .as_ref()
            .map(|b| Tensor::from_primitive(TensorPrimitive::Float(b.primitive.clone()))),
    };
    let chunks = run(
        inner(&hidden),
        &inner_head,
        targets.inner(),
        ignore,
        rows,
        need,
    );
    let loss = chunks
        .total
        .div(chunks.kept.clone())
        .into_primitive()
        .tensor();
    let saved = Saved::<I> {
        grads: [
            chunks.d_hidden.map(|t| t.into_primitive().tensor()),
            chunks.d_weight.map(|t| t.into_primitive().tensor()),
            chunks.d_bias.map(|t| t.into_primitive().tensor()),
        ],
        dtypes,
        kept: chunks.kept.into_primitive().tensor(),
    };
    let output = match &bias {
        Some(bias) => autodiff_node(HeadLossBackward, [&hidden, &weight, bias], saved, loss),
        None => autodiff_node(HeadLossBackward, [&hidden, &weight], saved, loss),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

/// What the chunks add up to.
struct Chunks<B: Backend> {
    /// `Σ_kept −log softmax[target]`, `[1]` f32.
    total: Tensor<B, 1>,
    /// The number of kept rows, at least 1, `[1]` f32.
    kept: Tensor<B, 1>,
    /// `∂ total / ∂ hidden`, f32, when asked for.
    d_hidden: Option<Tensor<B, 2>>,
    /// `∂ total / ∂ weight`, f32, in the weight's layout, when asked for.
    d_weight: Option<Tensor<B, 2>>,
    /// `∂ total / ∂ bias`, f32, when asked for (and there is a bias).
    d_bias: Option<Tensor<B, 1>>,
}

/// The chunked loop of the module's sketch; `need` says which of (hidden, weight, bias) take a
/// gradient. Nothing is read back to the host.
fn run<B: Backend>(
    hidden: Tensor<B, 2>,
    head: &Head<B>,
    targets: Tensor<B, 1, Int>,
    ignore: i64,
    rows: usize,
    need: [bool; 3],
) -> Chunks<B> {
    let [n, width] = hidden.dims();
    let vocab = head.vocab();
    let compute = hidden.dtype();
    let rhs = head.rhs();
    let bias = head.bias.as_ref().map(|b| b.clone().reshape([1, vocab]));
    let need = [need[0], need[1], need[2] && bias.is_some()];
    let kept_rows = targets.clone().not_equal_elem(ignore);
    let keep = kept_rows.clone().float().cast(DType::F32);
    let kept = keep.clone().sum().clamp_min(1.0);
    // Ignored rows gather (and scatter to) class 0; their loss and gradient are zeroed.
    let safe = targets.mask_fill(kept_rows.bool_not(), 0);

    let mut total: Option<Tensor<B, 1>> = None;
    let mut d_hidden = Vec::new();
    let mut d_weight: Option<Tensor<B, 2>> = None;
    let mut d_bias: Option<Tensor<B, 2>> = None;
    for start in (0..n).step_by(rows.max(1)) {
        let end = (start + rows).min(n);
        let h = hidden.clone().slice([start..end, 0..width]);
        let mut logits = h.clone().matmul(rhs.clone());
        if let Some(bias) = &bias {
            logits = logits.add(bias.clone());
        }
        let logits = logits.cast(DType::F32);
        let shifted = logits.clone().sub(logits.max_dim(1));
        let log_sum = shifted.clone().exp().sum_dim(1).log();
        let index = safe.clone().slice(start..end).reshape([end - start, 1]);
        let keep = keep.clone().slice(start..end).reshape([end - start, 1]);
        let picked = shifted.clone().gather(1, index.clone());
        let losses = log_sum.clone().sub(picked).mul(keep.clone()).sum();
        total = Some(match total {
            None => losses,
            Some(total) => total.add(losses),
        });
        if !need.contains(&true) {
            continue;
        }
        // softmax − one-hot on kept rows, 0 on ignored ones.
        let dz = shifted
            .sub(log_sum)
            .exp()
            .scatter(1, index, keep.clone().neg(), IndexingUpdateOp::Add)
            .mul(keep);
        if need[2] {
            let db = dz.clone().sum_dim(0);
            d_bias = Some(match d_bias {
                None => db,
                Some(acc) => acc.add(db),
            });
        }
        let dz = dz.cast(compute);
        if need[0] {
            d_hidden.push(dz.clone().matmul(rhs.clone().transpose()).cast(DType::F32));
        }
        if need[1] {
            let dw = match head.layout {
                HeadLayout::HiddenByVocab => h.transpose().matmul(dz),
                HeadLayout::VocabByHidden => dz.transpose().matmul(h),
            }
            .cast(DType::F32);
            d_weight = Some(match d_weight {
                None => dw,
                Some(acc) => acc.add(dw),
            });
        }
    }
    let device = hidden.device();
    Chunks {
        total: total.unwrap_or_else(|| Tensor::<B, 1>::zeros([1], &device).cast(DType::F32)),
        kept,
        d_hidden: (need[0] && !d_hidden.is_empty()).then(|| Tensor::cat(d_hidden, 0)),
        d_weight,
        d_bias: d_bias.map(|db| db.reshape([vocab])),
    }
}

/// The gradients computed in the forward (f32, for `g = 1` and before the division by the
/// kept rows), the dtypes their inputs have, and the kept rows.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    grads: [Option<FloatTensor<B>>; 3],
    dtypes: [Option<DType>; 3],
    kept: FloatTensor<B>,
}

#[derive(Debug)]
struct HeadLossBackward;

impl HeadLossBackward {
    /// Hands each saved gradient, times `g / kept`, to its parent in its parent's dtype.
    fn run<B: Backend, const N: usize>(ops: Ops<Saved<B>, N>, grads: &mut Gradients) {
        let g = grads.consume::<B>(&ops.node);
        let g = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(g)).cast(DType::F32);
        let saved = ops.state;
        let kept = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(saved.kept));
        let coefficient = g.div(kept);
        let parents: Vec<Option<NodeId>> = ops
            .parents
            .iter()
            .map(|parent| parent.as_ref().map(|node| node.id))
            .collect();
        for ((parent, grad), dtype) in parents.into_iter().zip(saved.grads).zip(saved.dtypes) {
            let (Some(id), Some(grad), Some(dtype)) = (parent, grad, dtype) else {
                continue;
            };
            let grad = match grad.shape().num_dims() {
                1 => scaled::<B, 1>(grad, &coefficient, dtype),
                _ => scaled::<B, 2>(grad, &coefficient, dtype),
            };
            grads.register::<B>(id, grad);
        }
    }
}

/// `grad · coefficient` (`coefficient` a `[1]` tensor), cast to `dtype`.
fn scaled<B: Backend, const D: usize>(
    grad: FloatTensor<B>,
    coefficient: &Tensor<B, 1>,
    dtype: DType,
) -> FloatTensor<B> {
    let grad = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(grad));
    let coefficient = coefficient.clone().reshape([1; D]);
    grad.mul(coefficient).cast(dtype).into_primitive().tensor()
}

impl<B: Backend> Backward<B, 3> for HeadLossBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run(ops, grads);
    }
}

impl<B: Backend> Backward<B, 2> for HeadLossBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run(ops, grads);
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;
    use burn::tensor::activation::log_softmax;

    use super::*;
    use crate::kernels::testing::random;
    use crate::{Cpu, CpuTrain};

    /// burn's composition: the full logits, log-softmax, pick, mean over kept rows.
    fn reference<B: Backend>(
        hidden: Tensor<B, 2>,
        head: &Head<B>,
        targets: &[i64],
        ignore: i64,
    ) -> Tensor<B, 1> {
        let device = hidden.device();
        let mut logits = hidden.matmul(head.rhs());
        if let Some(bias) = &head.bias {
            logits = logits.add(bias.clone().unsqueeze());
        }
        let n = targets.len();
        let safe: Vec<i64> = targets
            .iter()
            .map(|&t| if t == ignore { 0 } else { t })
            .collect();
        let keep: Vec<f32> = targets.iter().map(|&t| f32::from(t != ignore)).collect();
        let count = keep.iter().sum::<f32>().max(1.0);
        let index = Tensor::<B, 2, Int>::from_data(TensorData::new(safe, [n, 1]), &device);
        let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [n, 1]), &device);
        let picked = log_softmax(logits, 1).gather(1, index);
        picked.mul(keep).sum().neg().div_scalar(count)
    }

    fn relative(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// Loss and gradients of the chunked op and of the composition, on burn-flex: chunks of 3
    /// rows over 10 (the last chunk short), both layouts, with and without a bias, an ignored
    /// row, a frozen weight.
    #[test]
    fn the_chunked_head_loss_matches_the_full_logits_and_their_gradients() {
        let (n, width, vocab) = (10, 6, 13);
        let targets: Vec<i64> = vec![3, 12, -100, 0, 7, 7, 1, 11, -100, 5];
        let device = Default::default();
        let leaf = |values: Vec<f32>, shape: [usize; 2]| {
            Tensor::<CpuTrain, 2>::from_data(TensorData::new(values, shape), &device).require_grad()
        };
        for (layout, with_bias, frozen) in [
            (HeadLayout::HiddenByVocab, true, false),
            (HeadLayout::VocabByHidden, false, false),
            (HeadLayout::HiddenByVocab, false, true),
        ] {
            let shape = match layout {
                HeadLayout::HiddenByVocab => [width, vocab],
                HeadLayout::VocabByHidden => [vocab, width],
            };
            let hidden = leaf(random(n * width, 1, 2.0), [n, width]);
            let weight = leaf(random(width * vocab, 2, 1.0), shape);
            let weight = if frozen {
                weight.set_require_grad(false)
            } else {
                weight
            };
            let bias = with_bias.then(|| {
                Tensor::<CpuTrain, 1>::from_data(
                    TensorData::new(random(vocab, 3, 0.5), [vocab]),
                    &device,
                )
                .require_grad()
            });
            let head = Head {
                weight: weight.clone(),
                layout,
                bias: bias.clone(),
            };
            let ids = Tensor::<CpuTrain, 1, Int>::from_data(
                TensorData::new(targets.clone(), [n]),
                &device,
            );

            let ours = chunked_head_loss_train(hidden.clone(), head.clone(), ids, -100, 3);
            let theirs = reference(hidden.clone(), &head, &targets, -100);
            let (a, b) = (values(ours.clone()), values(theirs.clone()));
            assert!(relative(&a, &b) < 1e-6, "{layout:?}: loss {a:?} vs {b:?}");
            // A scaled upstream gradient, as the trainer's loss scale gives.
            let ours = ours.mul_scalar(512.0).backward();
            let theirs = theirs.mul_scalar(512.0).backward();
            let grad = |t: &Tensor<CpuTrain, 2>, g| t.grad(g).map(values);
            let (ha, hb) = (
                grad(&hidden, &ours).unwrap(),
                grad(&hidden, &theirs).unwrap(),
            );
            assert!(
                relative(&ha, &hb) < 1e-5,
                "{layout:?}: hidden grad {}",
                relative(&ha, &hb)
            );
            match frozen {
                true => assert!(
                    weight.grad(&ours).is_none(),
                    "a frozen weight takes no gradient"
                ),
                false => {
                    let (wa, wb) = (
                        grad(&weight, &ours).unwrap(),
                        grad(&weight, &theirs).unwrap(),
                    );
                    assert!(
                        relative(&wa, &wb) < 1e-5,
                        "{layout:?}: weight grad {}",
                        relative(&wa, &wb)
                    );
                }
            }
            if let Some(bias) = &bias {
                let (ba, bb) = (
                    values(bias.grad(&ours).unwrap()),
                    values(bias.grad(&theirs).unwrap()),
                );
                assert!(
                    relative(&ba, &bb) < 1e-5,
                    "bias grad {}",
                    relative(&ba, &bb)
                );
            }
        }
    }

    /// Without autodiff: the loss alone, and 0 (not NaN) when every row is ignored.
    #[test]
    fn the_inference_loss_matches_and_an_all_ignored_batch_scores_zero() {
        let (n, width, vocab) = (7, 4, 9);
        let device = Default::default();
        let hidden = Tensor::<Cpu, 2>::from_data(
            TensorData::new(random(n * width, 4, 1.5), [n, width]),
            &device,
        );
        let weight = Tensor::<Cpu, 2>::from_data(
            TensorData::new(random(width * vocab, 5, 1.0), [vocab, width]),
            &device,
        );
        let head = Head {
            weight,
            layout: HeadLayout::VocabByHidden,
            bias: None,
        };
        let targets: Vec<i64> = vec![0, 8, 4, -100, 2, 2, 6];
        let ids = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(targets.clone(), [n]), &device);
        let ours = values(chunked_head_loss(
            hidden.clone(),
            head.clone(),
            ids,
            -100,
            2,
        ));
        let theirs = values(reference(hidden.clone(), &head, &targets, -100));
        assert!(relative(&ours, &theirs) < 1e-6, "{ours:?} vs {theirs:?}");
        let none =
            Tensor::<Cpu, 1, Int>::from_data(TensorData::new(vec![-100i64; n], [n]), &device);
        assert_eq!(
            values(chunked_head_loss(hidden, head, none, -100, 2)),
            vec![0.0]
        );
    }
}
