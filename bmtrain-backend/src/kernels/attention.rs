//! Fused multi-head attention: `softmax(q·kᵀ·scale + bias)·v` with dropout on the probabilities,
//! on the projections' own `[batch, len, heads·head_dim]` layout, with grouped-query attention:
//! k and v may have fewer heads than q (`kv_heads` dividing `heads`), each kv head serving
//! `heads / kv_heads` query heads in a row, read in place (never repeated into copies).
//!
//! Each (batch row, head) pair is one rayon task that multiplies strided views of the inputs with
//! `gemm` (the matrix kernels burn-flex uses too) and writes its head's columns of the output, so
//! the heads are never split into `[batch, heads, len, head_dim]` copies and merged back. Forward
//! keeps the probabilities `P` for backward; the dropout mask is regenerated from its seed:
//!
//! ```text
//!   S = scale·Q·Kᵀ + bias     P = softmax(S)     P̃ = P ⊙ M / (1 − p)     O = P̃·V
//!   dV = P̃ᵀ·dO   dP̃ = dO·Vᵀ   dP = dP̃ ⊙ M / (1 − p)   dS = P ⊙ (dP − rowsum(dP ⊙ P))
//!   dQ = scale·dS·K   dK = scale·dSᵀ·Q
//! ```

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::simd::{self, avx512_version};
use super::{
    Kernel, Mask, OnCpu, SharedMut, contiguous, draw_seed, flex, flex_from, from_cpu, gemm, on_cpu,
    output_grad, record, register_grads, tensor_from, tracks_gradient, values,
};
use crate::{Cpu, CpuTrain};

/// Whether [`attention`] computes causal masks itself for backend `B` (the flash kernels on a
/// GPU backend of this build, or its autodiff): a model then need not build the
/// `[q_len, k_len]` mask tensor, and the kernels skip the key tiles no query of theirs sees.
pub fn computes_causal_masks<B: Backend>() -> bool {
    #[cfg(feature = "gpu-kernels")]
    if Kernel::FlashAttention.enabled() {
        return super::flash::runs_on::<B>();
    }
    false
}

/// Multi-head attention of `q` over `k`/`v`, fused (see the module docs), or `None` when the
/// kernel does not apply (another backend, half precision, a bias that needs its gradient, or
/// `ZOO_KERNELS`); the caller then runs its own composition. On the GPU backends (CUDA, wgpu)
/// it is the flash attention kernels (`super::flash`: any float dtype, a learned bias too).
///
/// - q: `[batch, q_len, heads·head_dim]`, k: `[batch, k_len, kv_heads·head_dim]`,
///   v: `[batch, k_len, kv_heads·value_dim]` (`kv_heads` is k's width over `head_dim`; it must
///   divide `heads`)
/// - bias: additive, `[batch | 1, heads | 1, q_len | 1, k_len]` (masks; on the CPU no gradient)
/// - causal: query `i` sees keys `0..=i + k_len − q_len` only, on top of the bias; only the
///   flash kernels compute it (see [`computes_causal_masks`]), so with `causal` every other
///   backend answers `None` and the caller materialises the mask for its composition
/// - dropout: probability on the attention probabilities, applied when `B` tracks gradients
/// - output: `[batch, q_len, heads·value_dim]`
#[allow(clippy::too_many_arguments)]
pub fn attention<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    bias: Option<&Tensor<B, 4>>,
    causal: bool,
    heads: usize,
    scale: f64,
    dropout: f64,
) -> Option<Tensor<B, 3>> {
    if !Kernel::Attention.enabled() && !Kernel::FlashAttention.enabled() {
        return None;
    }
    let [batch, q_len, width] = q.dims();
    let [k_batch, k_len, k_width] = k.dims();
    let [v_batch, v_len, v_width] = v.dims();
    let head_dim = width.checked_div(heads).unwrap_or(0);
    let kv_heads = k_width.checked_div(head_dim).unwrap_or(0);
    let shapes_fit = heads > 0
        && head_dim > 0
        && width.is_multiple_of(heads)
        && kv_heads > 0
        && k_width == kv_heads * head_dim
        && heads.is_multiple_of(kv_heads)
        && v_width.is_multiple_of(kv_heads)
        && k_batch == batch
        && v_batch == batch
        && v_len == k_len;
    if !shapes_fit {
        return None;
    }
    let bias_dims = match bias {
        None => None,
        Some(bias) => {
            let [mb, mh, mq, mk] = bias.dims();
            let fits = (mb == 1 || mb == batch)
                && (mh == 1 || mh == heads)
                && (mq == 1 || mq == q_len)
                && mk == k_len;
            if !fits {
                return None;
            }
            Some([mb, mh, mq, mk])
        }
    };
    let dropout = if B::ad_enabled(&q.device()) {
        dropout
    } else {
        0.0
    };
    let geometry = Geometry {
        batch,
        heads,
        kv_heads,
        q_len,
        k_len,
        head_dim,
        value_dim: v_width / kv_heads,
        scale: scale as f32,
        dropout: dropout as f32,
        seed: if dropout > 0.0 { draw_seed() } else { 0 },
    };
    #[cfg(feature = "gpu-kernels")]
    if Kernel::FlashAttention.enabled() {
        let flash = super::flash::FlashGeometry {
            batch,
            heads,
            kv_heads,
            q_len,
            k_len,
            head_dim,
            value_dim: geometry.value_dim,
            scale: geometry.scale,
            causal,
            dropout: geometry.dropout,
            seed: geometry.seed,
        };
        if let Some(out) = super::flash::route(q, k, v, bias, &flash) {
            return Some(out);
        }
    }
    if !Kernel::Attention.enabled() || causal {
        return None;
    }
    let bias = match (bias, bias_dims) {
        (Some(bias), Some(dims)) => Some(Bias {
            values: match on_cpu(bias)? {
                // A learned bias (T5's relative positions) needs its gradient: not this kernel's.
                OnCpu::Train(t) if tracks_gradient(&t) => return None,
                OnCpu::Train(t) => flex(t.inner()),
                OnCpu::Infer(t) => flex(t),
            },
            dims,
        }),
        _ => None,
    };
    match (on_cpu(q)?, on_cpu(k)?, on_cpu(v)?) {
        (OnCpu::Infer(q), OnCpu::Infer(k), OnCpu::Infer(v)) => {
            let (q, k, v) = (flex(q), flex(k), flex(v));
            let (out, _) = forward(&geometry, values(&q), values(&k), values(&v), bias.as_ref());
            let shape = vec![batch, q_len, geometry.out_stride()];
            Some(from_cpu(tensor_from::<3>(flex_from(out, shape))))
        }
        (OnCpu::Train(q), OnCpu::Train(k), OnCpu::Train(v)) => {
            Some(from_cpu(train(geometry, q, k, v, bias)))
        }
        _ => None,
    }
}

/// Shapes and settings of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    k_len: usize,
    head_dim: usize,
    value_dim: usize,
    scale: f32,
    dropout: f32,
    seed: u64,
}

impl Geometry {
    /// Row stride of q.
    fn q_stride(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Row stride of k.
    fn k_stride(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Row stride of v.
    fn v_stride(&self) -> usize {
        self.kv_heads * self.value_dim
    }

    /// Row stride of the output.
    fn out_stride(&self) -> usize {
        self.heads * self.value_dim
    }

    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The dropout mask of the probabilities.
    fn mask(&self) -> Mask {
        Mask::new(self.seed, f64::from(self.dropout))
    }
}

/// An additive bias with its broadcast dims.
#[derive(Debug, Clone)]
struct Bias {
    values: FlexTensor,
    dims: [usize; 4],
}

impl Bias {
    /// The `k_len` biases of query `i` of (batch row `b`, head `h`).
    fn row(&self, b: usize, h: usize, i: usize) -> &[f32] {
        let [mb, mh, mq, mk] = self.dims;
        let (b, h, i) = (
            if mb == 1 { 0 } else { b },
            if mh == 1 { 0 } else { h },
            if mq == 1 { 0 } else { i },
        );
        let start = ((b * mh + h) * mq + i) * mk;
        &values(&self.values)[start..start + mk]
    }
}

/// Forward: the output `[batch, q_len, heads·value_dim]` and the probabilities
/// `[batch, heads, q_len, k_len]`.
fn forward(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&Bias>,
) -> (Vec<f32>, Vec<f32>) {
    let (sq, sk, d, dv) = (g.q_len, g.k_len, g.head_dim, g.value_dim);
    let (qs, ks, vs, os) = (g.q_stride(), g.k_stride(), g.v_stride(), g.out_stride());
    let mut out = vec![0.0f32; g.batch * sq * os];
    let mut probs = vec![0.0f32; g.batch * g.heads * sq * sk];
    let out_ptr = SharedMut(out.as_mut_ptr());
    let mask = g.mask();
    probs.par_chunks_mut(sq * sk).enumerate().for_each_init(
        || vec![0.0f32; if g.dropout > 0.0 { sq * sk } else { 0 }],
        |dropped, (unit, p)| {
            let (b, h) = (unit / g.heads, unit % g.heads);
            let kvh = h / g.group();
            let q_u = q[b * sq * qs + h * d..].as_ptr();
            let k_u = k[b * sk * ks + kvh * d..].as_ptr();
            let v_u = v[b * sk * vs + kvh * dv..].as_ptr();
            // SAFETY: q_u (k_u) addresses sq (sk) rows of d values at stride qs (ks) inside q
            // (k); p holds sq×sk values.
            unsafe {
                gemm(
                    sq,
                    sk,
                    d,
                    (p.as_mut_ptr(), sk as isize, 1),
                    (q_u, qs as isize, 1),
                    (k_u, 1, ks as isize),
                    g.scale,
                    false,
                    false,
                );
            }
            if let Some(bias) = bias {
                for (i, row) in p.chunks_mut(sk).enumerate() {
                    for (s, add) in row.iter_mut().zip(bias.row(b, h, i)) {
                        *s += add;
                    }
                }
            }
            softmax_rows(p, sk);
            let weights: &[f32] = if g.dropout > 0.0 {
                dropped.copy_from_slice(p);
                mask.apply_in_place(dropped, (unit * sq * sk) as u64);
                dropped
            } else {
                p
            };
            // SAFETY: this task alone writes the output's rows of batch row b, columns of
            // head h.
            unsafe {
                let o_u = out_ptr.get().add(b * sq * os + h * dv);
                gemm(
                    sq,
                    dv,
                    sk,
                    (o_u, os as isize, 1),
                    (weights.as_ptr(), sk as isize, 1),
                    (v_u, vs as isize, 1),
                    1.0,
                    false,
                    false,
                );
            }
        },
    );
    (out, probs)
}

avx512_version! {
    /// A numerically stable softmax of each `width`-long row, in place. A row whose scores are
    /// all `-inf` becomes zeros.
    fn softmax_rows(scores: &mut [f32], width: usize) {
        for row in scores.chunks_mut(width) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            for s in row.iter_mut() {
                *s = simd::exp(*s - max);
            }
            let inv = 1.0 / simd::sum(row);
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
    }
}

avx512_version! {
    /// Softmax backward on each `width`-long row, in place: `dP` becomes `P ⊙ (dP − ⟨dP, P⟩)`.
    fn softmax_backward_rows(d_probs: &mut [f32], probs: &[f32], width: usize) {
        for (dp, p) in d_probs.chunks_mut(width).zip(probs.chunks(width)) {
            let dot = simd::dot(dp, p);
            for (x, &pj) in dp.iter_mut().zip(p) {
                *x = pj * (*x - dot);
            }
        }
    }
}

/// Backward: the gradients of q, k and v, in their own layouts.
fn backward(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (sq, sk, d, dv) = (g.q_len, g.k_len, g.head_dim, g.value_dim);
    let (qs, ks, vs, os) = (g.q_stride(), g.k_stride(), g.v_stride(), g.out_stride());
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dval = vec![0.0f32; v.len()];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dval.as_mut_ptr()),
    );
    let mask = g.mask();
    // One task per (batch row, kv head): the query heads of its group run in turn and add
    // their shares to the kv head's dK and dV, which no other task touches.
    (0..g.batch * g.kv_heads).into_par_iter().for_each_init(
        || (vec![0.0f32; sq * sk], vec![0.0f32; sq * sk]),
        |(dp, dropped), kv_unit| {
            let (b, kvh) = (kv_unit / g.kv_heads, kv_unit % g.kv_heads);
            let k_u = k[b * sk * ks + kvh * d..].as_ptr();
            let v_u = v[b * sk * vs + kvh * dv..].as_ptr();
            for (member, h) in (kvh * g.group()..(kvh + 1) * g.group()).enumerate() {
                let unit = b * g.heads + h;
                let accumulate = member > 0;
                let p = &probs[unit * sq * sk..][..sq * sk];
                let q_u = q[b * sq * qs + h * d..].as_ptr();
                let do_u = d_out[b * sq * os + h * dv..].as_ptr();
                let base = (unit * sq * sk) as u64;
                let weights: &[f32] = if g.dropout > 0.0 {
                    dropped.copy_from_slice(p);
                    mask.apply_in_place(dropped, base);
                    dropped
                } else {
                    p
                };
                // SAFETY: the views stay inside their buffers (see forward); this task alone
                // writes the rows of batch row b: the columns of kv head kvh of dk and dv, and of
                // its group's query heads of dq.
                unsafe {
                    // dV += P̃ᵀ·dO
                    gemm(
                        sk,
                        dv,
                        sq,
                        (dv_ptr.get().add(b * sk * vs + kvh * dv), vs as isize, 1),
                        (weights.as_ptr(), 1, sk as isize),
                        (do_u, os as isize, 1),
                        1.0,
                        accumulate,
                        false,
                    );
                    // dP̃ = dO·Vᵀ
                    gemm(
                        sq,
                        sk,
                        dv,
                        (dp.as_mut_ptr(), sk as isize, 1),
                        (do_u, os as isize, 1),
                        (v_u, 1, vs as isize),
                        1.0,
                        false,
                        false,
                    );
                }
                if g.dropout > 0.0 {
                    mask.apply_in_place(dp, base);
                }
                softmax_backward_rows(dp, p, sk);
                // SAFETY: as above.
                unsafe {
                    // dQ = scale·dS·K
                    gemm(
                        sq,
                        d,
                        sk,
                        (dq_ptr.get().add(b * sq * qs + h * d), qs as isize, 1),
                        (dp.as_ptr(), sk as isize, 1),
                        (k_u, ks as isize, 1),
                        g.scale,
                        false,
                        false,
                    );
                    // dK += scale·dSᵀ·Q
                    gemm(
                        sk,
                        d,
                        sq,
                        (dk_ptr.get().add(b * sk * ks + kvh * d), ks as isize, 1),
                        (dp.as_ptr(), 1, sk as isize),
                        (q_u, qs as isize, 1),
                        g.scale,
                        accumulate,
                        false,
                    );
                }
            }
        },
    );
    (dq, dk, dval)
}

/// What backward needs: the inputs (shared, not copied), the probabilities, the geometry.
#[derive(Debug, Clone)]
struct Saved {
    geometry: Geometry,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: Arc<Vec<f32>>,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Cpu, 3> for AttentionBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (d_out, parents) = output_grad(&ops, grads);
        let saved = ops.state;
        let (dq, dk, dv) = backward(
            &saved.geometry,
            values(&saved.q),
            values(&saved.k),
            values(&saved.v),
            &saved.probs,
            values(&d_out),
        );
        let shape = |t: &FlexTensor| t.layout().shape().to_vec();
        let computed = [
            (dq, shape(&saved.q)),
            (dk, shape(&saved.k)),
            (dv, shape(&saved.v)),
        ];
        register_grads(grads, parents, computed);
    }
}

/// The autodiff path: forward now, [`AttentionBackward`] registered for later.
fn train(
    geometry: Geometry,
    q: Tensor<CpuTrain, 3>,
    k: Tensor<CpuTrain, 3>,
    v: Tensor<CpuTrain, 3>,
    bias: Option<Bias>,
) -> Tensor<CpuTrain, 3> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let (qf, kf, vf) = (
        contiguous(q.primitive.clone()),
        contiguous(k.primitive.clone()),
        contiguous(v.primitive.clone()),
    );
    let (out, probs) = forward(
        &geometry,
        values(&qf),
        values(&kf),
        values(&vf),
        bias.as_ref(),
    );
    let shape = vec![geometry.batch, geometry.q_len, geometry.out_stride()];
    let out = flex_from(out, shape);
    let saved = Saved {
        geometry,
        q: qf,
        k: kf,
        v: vf,
        probs: Arc::new(probs),
    };
    record(AttentionBackward, [&q, &k, &v], saved, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{leaf, max_diff, random};
    use burn::tensor::activation::softmax;

    /// burn's composition: split heads, scores, bias, softmax, product, merge heads.
    fn composed<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        bias: Option<Tensor<B, 4>>,
        heads: usize,
        scale: f64,
    ) -> Tensor<B, 3> {
        let split = |x: Tensor<B, 3>| {
            let [b, s, w] = x.dims();
            x.reshape([b, s, heads, w / heads]).swap_dims(1, 2)
        };
        let mut scores = split(q).matmul(split(k).swap_dims(2, 3)) * scale;
        if let Some(bias) = bias {
            scores = scores + bias;
        }
        let context = softmax(scores, 3).matmul(split(v));
        let [b, h, s, d] = context.dims();
        context.swap_dims(1, 2).reshape([b, s, h * d])
    }

    fn causal_padding_bias(batch: usize, len: usize) -> Vec<f32> {
        // Row 1's last key is padding; every row is causal.
        (0..batch)
            .flat_map(|b| {
                (0..len).flat_map(move |i| {
                    (0..len).map(move |j| {
                        if j > i || (b == 1 && j == len - 1) {
                            f32::MIN
                        } else {
                            0.0
                        }
                    })
                })
            })
            .collect()
    }

    #[test]
    fn forward_and_gradients_match_burns_composition() {
        let (batch, len, heads, head_dim) = (2, 7, 3, 4);
        let width = heads * head_dim;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let inputs = [1, 2, 3].map(|s| random(batch * len * width, s, 1.5));
        let bias = causal_padding_bias(batch, len);
        let run = |fused: bool| {
            let [q, k, v] = inputs.clone().map(|x| leaf(x, [batch, len, width]));
            let bias_t = Tensor::<CpuTrain, 4>::from_data(
                burn::tensor::TensorData::new(bias.clone(), [batch, 1, len, len]),
                &Default::default(),
            );
            let out = if fused {
                attention(&q, &k, &v, Some(&bias_t), false, heads, scale, 0.0).expect("fused path")
            } else {
                composed(q.clone(), k.clone(), v.clone(), Some(bias_t), heads, scale)
            };
            // A loss that weighs every output differently.
            let weights = leaf(random(batch * len * width, 9, 1.0), [batch, len, width]);
            let grads = (out.clone() * weights).sum().backward();
            let g = |t: &Tensor<CpuTrain, 3>| t.grad(&grads).unwrap();
            (out.inner(), g(&q), g(&k), g(&v))
        };
        let (fused, reference) = (run(true), run(false));
        assert!(max_diff(fused.0, reference.0) < 1e-5);
        assert!(max_diff(fused.1, reference.1) < 1e-5, "dq");
        assert!(max_diff(fused.2, reference.2) < 1e-5, "dk");
        assert!(max_diff(fused.3, reference.3) < 1e-5, "dv");
    }

    #[test]
    fn inference_path_matches_and_cross_attention_lengths_differ() {
        let (batch, q_len, k_len, heads, head_dim) = (2, 3, 5, 2, 3);
        let width = heads * head_dim;
        let device = Default::default();
        let t = |len, seed| {
            Tensor::<Cpu, 3>::from_data(
                burn::tensor::TensorData::new(
                    random(batch * len * width, seed, 1.0),
                    [batch, len, width],
                ),
                &device,
            )
        };
        let (q, k, v) = (t(q_len, 4), t(k_len, 5), t(k_len, 6));
        let fused = attention(&q, &k, &v, None, false, heads, 0.5, 0.1).expect("fused path");
        let reference = composed(q, k, v, None, heads, 0.5);
        assert!(max_diff(fused, reference) < 1e-5);
    }

    #[test]
    fn a_bias_computed_from_parameters_is_left_to_the_caller() {
        let x = leaf(random(8, 1, 1.0), [1, 2, 4]);
        // Not a leaf, but a gradient flows into it (T5's relative position bias).
        let learned = leaf(random(4, 2, 1.0), [1, 1, 2, 2]) * 2.0;
        assert!(attention(&x, &x, &x, Some(&learned), false, 2, 1.0, 0.0).is_none());
        let fixed = Tensor::<CpuTrain, 4>::zeros([1, 1, 2, 2], &Default::default());
        assert!(attention(&x, &x, &x, Some(&fixed), false, 2, 1.0, 0.0).is_some());
    }

    /// Only the GPU backends' flash kernels compute a causal mask; the CPU kernel leaves it to
    /// the caller's composition (which materialises it), and models build it as a tensor here.
    #[test]
    fn a_causal_flag_is_left_to_the_caller_on_the_cpu() {
        let x = leaf(random(8, 1, 1.0), [1, 2, 4]);
        assert!(attention(&x, &x, &x, None, true, 2, 1.0, 0.0).is_none());
        assert!(!computes_causal_masks::<CpuTrain>());
    }

    #[test]
    fn dropout_keeps_the_expected_share_and_backward_replays_the_mask() {
        let (batch, len, heads, head_dim) = (2, 16, 2, 4);
        let width = heads * head_dim;
        let geometry = Geometry {
            batch,
            heads,
            kv_heads: heads,
            q_len: len,
            k_len: len,
            head_dim,
            value_dim: head_dim,
            scale: 0.5,
            dropout: 0.25,
            seed: 42,
        };
        // v = identity rows would be simplest, but any v works: check through the gradient of v,
        // which is P̃ᵀ·dO, against P̃ rebuilt from the saved probabilities and the same mask.
        let [q, k, v] = [7, 8, 9].map(|s| random(batch * len * width, s, 1.0));
        let (_, probs) = forward(&geometry, &q, &k, &v, None);
        let ones = vec![1.0f32; batch * len * width];
        let (_, _, dv) = backward(&geometry, &q, &k, &v, &probs, &ones);
        // With dO = 1, dV[j, c] = Σ_i P̃[i, j] for each column c of the head.
        let (threshold, keep_scale) = (0.25 * 4_294_967_296.0, 1.0 / 0.75);
        let mut dropped = 0usize;
        for unit in 0..batch * heads {
            let (b, h) = (unit / heads, unit % heads);
            for j in 0..len {
                let mut column = 0.0f32;
                for i in 0..len {
                    let index = unit * len * len + i * len + j;
                    if crate::kernels::keep(42, index as u64, threshold as u64) {
                        column += probs[index] * keep_scale;
                    } else {
                        dropped += 1;
                    }
                }
                let got = dv[b * len * width + j * width + h * head_dim];
                assert!((got - column).abs() < 1e-5, "{got} vs {column}");
            }
        }
        let share = dropped as f64 / (batch * heads * len * len) as f64;
        assert!((share - 0.25).abs() < 0.05, "dropped {share}");
    }

    /// Grouped-query attention (6 query heads over 2 kv heads, a cached prefix: q shorter than
    /// k) against burn's composition on k and v repeated per group, forward and every gradient;
    /// the kernel reads the kv heads in place.
    #[test]
    fn grouped_query_attention_matches_the_composition_on_repeated_heads() {
        let (batch, q_len, k_len, heads, kv_heads, head_dim) = (2, 4, 6, 6, 2, 3);
        let (width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let scale = 0.6;
        let bias: Vec<f32> = (0..q_len)
            .flat_map(|i| (0..k_len).map(move |j| if j > i + 2 { f32::MIN } else { 0.0 }))
            .collect();
        let repeat = |x: Tensor<CpuTrain, 3>, len: usize| {
            x.reshape([batch, len, kv_heads, 1, head_dim])
                .expand([batch, len, kv_heads, heads / kv_heads, head_dim])
                .reshape([batch, len, width])
        };
        let run = |fused: bool| {
            let q = leaf(
                random(batch * q_len * width, 11, 1.5),
                [batch, q_len, width],
            );
            let k = leaf(
                random(batch * k_len * kv_width, 12, 1.5),
                [batch, k_len, kv_width],
            );
            let v = leaf(
                random(batch * k_len * kv_width, 13, 1.5),
                [batch, k_len, kv_width],
            );
            let bias_t = Tensor::<CpuTrain, 4>::from_data(
                burn::tensor::TensorData::new(bias.clone(), [1, 1, q_len, k_len]),
                &Default::default(),
            );
            let out = if fused {
                attention(&q, &k, &v, Some(&bias_t), false, heads, scale, 0.0).expect("fused path")
            } else {
                composed(
                    q.clone(),
                    repeat(k.clone(), k_len),
                    repeat(v.clone(), k_len),
                    Some(bias_t),
                    heads,
                    scale,
                )
            };
            let weights = leaf(
                random(batch * q_len * width, 14, 1.0),
                [batch, q_len, width],
            );
            let grads = (out.clone() * weights).sum().backward();
            let grad = |t: &Tensor<CpuTrain, 3>| t.grad(&grads).unwrap();
            (out.inner(), grad(&q), grad(&k), grad(&v))
        };
        let (fused, reference) = (run(true), run(false));
        assert!(max_diff(fused.0, reference.0) < 1e-5);
        assert!(max_diff(fused.1, reference.1) < 1e-5);
        assert!(max_diff(fused.2, reference.2) < 1e-5);
        assert!(max_diff(fused.3, reference.3) < 1e-5);
    }
}
