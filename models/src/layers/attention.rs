//! Multi-head attention with a padding mask, an optional causal mask and an optional additive
//! position bias (T5's relative buckets).

use super::dropout::{Dropout, DropoutConfig};
use super::linear::{Linear, LinearConfig};
use bmtrain_backend::kernels;
use burn::config::Config;
use burn::module::Module;
use burn::tensor::{DType, Int, Tensor, TensorData, activation::softmax, backend::Backend};

/// Hyper-parameters of [`MultiHeadAttention`].
#[derive(Config, Debug)]
pub struct MultiHeadAttentionConfig {
    /// Width of the hidden states going in and out.
    pub d_model: usize,
    /// Number of heads.
    pub n_heads: usize,
    /// Width of one head; `d_model / n_heads` when not set (T5 sets it: `d_kv`).
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// Whether the four projections have biases (BERT, GPT-2: yes; T5: no).
    #[config(default = true)]
    pub bias: bool,
    /// Whether scores are scaled by `1/sqrt(head_dim)`. T5 folds the scaling into its weights.
    #[config(default = true)]
    pub scale_scores: bool,
    /// Dropout on the attention probabilities (active only in training).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Scores are further divided by this (GPT-2's `scale_attn_by_inverse_layer_idx` sets
    /// `layer_idx + 1`).
    #[config(default = 1.0)]
    pub score_divisor: f64,
}

/// Multi-head attention: `softmax(q·kᵀ·scale + bias + mask)·v`, then an output projection.
///
/// Parameter names (`query`, `key`, `value`, `output`) are the zoo names the key tables map to.
#[derive(Module, Debug)]
pub struct MultiHeadAttention<B: Backend> {
    /// Query projection, `[d_model, n_heads·head_dim]`.
    pub query: Linear<B>,
    /// Key projection.
    pub key: Linear<B>,
    /// Value projection.
    pub value: Linear<B>,
    /// Output projection, `[n_heads·head_dim, d_model]`.
    pub output: Linear<B>,
    dropout: Dropout,
    n_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MultiHeadAttentionConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MultiHeadAttention<B> {
        let head_dim = self.head_dim.unwrap_or(self.d_model / self.n_heads);
        let inner = self.n_heads * head_dim;
        let linear = |d_in, d_out| {
            LinearConfig::new(d_in, d_out)
                .with_bias(self.bias)
                .init(device)
        };
        MultiHeadAttention {
            query: linear(self.d_model, inner),
            key: linear(self.d_model, inner),
            value: linear(self.d_model, inner),
            output: linear(inner, self.d_model),
            dropout: DropoutConfig::new(self.dropout).init(),
            n_heads: self.n_heads,
            head_dim,
            scale: if self.scale_scores {
                1.0 / (head_dim as f64).sqrt() / self.score_divisor
            } else {
                1.0 / self.score_divisor
            },
        }
    }
}

/// What a query may not attend to, as an additive bias on the scores.
///
/// Masked positions get the dtype's most negative finite value, as transformers does, so that a row
/// with every key masked gives a uniform distribution instead of NaN.
///
/// On the GPU backends the attention kernels compute a causal mask themselves
/// ([`kernels::computes_causal_masks`]): there [`Self::with_causal`] only sets a flag, and the
/// `[q_len, k_len]` tensor is built only if a composition needs it ([`Self::dense`]).
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    /// `[batch | 1, 1 | heads, q_len | 1, k_len]`, 0 where attending is allowed.
    additive: Option<Tensor<B, 4>>,
    /// A causal mask not in `additive`, left to the attention kernel.
    causal: bool,
}

impl<B: Backend> AttentionMask<B> {
    /// No mask at all.
    pub fn none() -> Self {
        Self {
            additive: None,
            causal: false,
        }
    }

    /// Masks padded keys. `attention_mask` is `[batch, k_len]`, 1 for real tokens, 0 for padding,
    /// as HF tokenizers give it.
    pub fn padding(attention_mask: Tensor<B, 2, Int>) -> Self {
        let [batch, k_len] = attention_mask.dims();
        let device = attention_mask.device();
        let masked = attention_mask.equal_elem(0).reshape([batch, 1, 1, k_len]);
        let zeros = Tensor::<B, 4>::zeros([batch, 1, 1, k_len], &device);
        let value = most_negative(zeros.dtype());
        Self {
            additive: Some(zeros.mask_fill(masked, value)),
            causal: false,
        }
    }

    /// The materialised additive bias, `[batch | 1, 1 | heads, q_len | 1, k_len]`; `None` when
    /// nothing is materialised. A causal mask left to the kernel ([`Self::causal`]) is not in
    /// it: compositions take [`Self::dense`].
    pub fn additive(&self) -> Option<&Tensor<B, 4>> {
        self.additive.as_ref()
    }

    /// Whether a causal mask is left to the attention kernel (not in [`Self::additive`]).
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// The whole mask as one additive bias for `q_len` queries over `k_len` keys: the
    /// materialised part plus, when it was left to the kernel, the causal mask.
    pub fn dense(&self, q_len: usize, k_len: usize, device: &B::Device) -> Option<Tensor<B, 4>> {
        if !self.causal {
            return self.additive.clone();
        }
        let materialised = Self {
            additive: self.additive.clone(),
            causal: false,
        };
        materialised.add(causal_mask(q_len, k_len, device)).additive
    }

    /// Adds a causal mask: query `i` sees keys `0..=i + (k_len - q_len)`. The offset lets queries
    /// that continue a cached prefix see the whole prefix. Where the attention kernel computes it
    /// ([`kernels::computes_causal_masks`]), this only sets [`Self::causal`].
    pub fn with_causal(self, q_len: usize, k_len: usize, device: &B::Device) -> Self {
        if kernels::computes_causal_masks::<B>() {
            return Self {
                causal: true,
                ..self
            };
        }
        self.add(causal_mask(q_len, k_len, device))
    }

    /// Adds a locally banded causal mask (the Sparse Transformer's "local" pattern, used by GPT-3 in
    /// every other layer): query `i` sees only the `window` keys up to and including itself.
    pub fn with_local_causal(
        self,
        q_len: usize,
        k_len: usize,
        window: usize,
        device: &B::Device,
    ) -> Self {
        let offset = k_len - q_len;
        let value = most_negative(DType::F32);
        let band: Vec<f32> = (0..q_len)
            .flat_map(|i| {
                let position = i + offset;
                (0..k_len).map(move |j| {
                    if j > position || j + window <= position {
                        value
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let band = Tensor::<B, 4>::from_data(TensorData::new(band, [1, 1, q_len, k_len]), device);
        self.add(band)
    }

    /// Adds an additive bias (such as T5's relative position bias), broadcastable to the scores.
    pub fn with_bias(self, bias: Tensor<B, 4>) -> Self {
        self.add(bias)
    }

    fn add(self, extra: Tensor<B, 4>) -> Self {
        let additive = match self.additive {
            // Parts may come in different dtypes (an f16 model's position bias, f32 masks): the
            // sum keeps the first part's, and `attend` casts the whole to the scores' dtype.
            // Two masked parts would sum to -inf; transformers combines masks before filling, so
            // a query with every key masked (padding under a sliding window) gets the most
            // negative value everywhere, hence uniform attention, not NaN: clamp to it.
            Some(current) => {
                let dtype = current.dtype();
                (current + extra.cast(dtype)).clamp_min(most_negative(dtype))
            }
            None => extra,
        };
        Self {
            additive: Some(additive),
            causal: self.causal,
        }
    }
}

/// The causal mask `[1, 1, q_len, k_len]`: query `i` sees keys `0..=i + (k_len - q_len)`.
fn causal_mask<B: Backend>(q_len: usize, k_len: usize, device: &B::Device) -> Tensor<B, 4> {
    let offset = k_len - q_len;
    let value = most_negative(DType::F32);
    let causal: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..k_len).map(move |j| if j > i + offset { value } else { 0.0 }))
        .collect();
    Tensor::<B, 4>::from_data(TensorData::new(causal, [1, 1, q_len, k_len]), device)
}

/// The most negative finite value of a float dtype: the "-inf" of attention masks.
fn most_negative(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,
        // bf16 keeps f32's exponent; its largest finite value is slightly below f32's.
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN,
    }
}

/// The keys and values a decoder layer has seen so far, so that each generation step computes only
/// the new position's. Both are kept as the projections give them, `[batch, len, heads·head_dim]`
/// (the layout the fused attention kernel reads, so a cached step never splits heads).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Keys, after the key projection (and, in rotary models, the rotation).
    pub key: Tensor<B, 3>,
    /// Values, after the value projection.
    pub value: Tensor<B, 3>,
}

impl<B: Backend> KvCache<B> {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.key.dims()[1]
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the rows `indices` of the batch, in that order (beam search reorders its beams).
    pub fn select(&self, indices: Tensor<B, 1, Int>) -> Self {
        Self {
            key: self.key.clone().select(0, indices.clone()),
            value: self.value.clone().select(0, indices),
        }
    }

    /// The cache grown by the keys and values of new positions (`[batch, new, width]`).
    pub fn extended(past: Option<Self>, key: Tensor<B, 3>, value: Tensor<B, 3>) -> Self {
        match past {
            Some(past) => Self {
                key: Tensor::cat(vec![past.key, key], 1),
                value: Tensor::cat(vec![past.value, value], 1),
            },
            None => Self { key, value },
        }
    }
}

impl<B: Backend> MultiHeadAttention<B> {
    /// The four projections under the given names, `[query, key, value, output]`.
    pub fn named_projections(
        &mut self,
        [q, k, v, o]: [&'static str; 4],
    ) -> [(&'static str, &mut Linear<B>); 4] {
        [
            (q, &mut self.query),
            (k, &mut self.key),
            (v, &mut self.value),
            (o, &mut self.output),
        ]
    }

    /// Self-attention over the cached positions and `hidden`'s, returning the grown cache.
    /// The mask covers all `cache.len() + seq` keys.
    ///
    /// - hidden: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn forward_cached(
        &self,
        hidden: Tensor<B, 3>,
        cache: Option<KvCache<B>>,
        mask: &AttentionMask<B>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let q = self.query.forward(hidden.clone());
        let k = self.key.forward(hidden.clone());
        let v = self.value.forward(hidden);
        let cache = KvCache::extended(cache, k, v);
        let context = self.context(q, &cache.key, &cache.value, mask);
        (self.output.forward(context), cache)
    }

    /// Projects `source` to keys and values once, for cross-attention that many steps reuse
    /// (an encoder-decoder's decoder).
    ///
    /// - source: `[batch, k_len, d_model]`
    pub fn keys_values(&self, source: Tensor<B, 3>) -> KvCache<B> {
        KvCache {
            key: self.key.forward(source.clone()),
            value: self.value.forward(source),
        }
    }

    /// Attention of `queries` over keys/values projected before ([`Self::keys_values`]).
    ///
    /// - queries: `[batch, q_len, d_model]` → `[batch, q_len, d_model]`
    pub fn attend_to(
        &self,
        queries: Tensor<B, 3>,
        keys_values: &KvCache<B>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 3> {
        let q = self.query.forward(queries);
        let context = self.context(q, &keys_values.key, &keys_values.value, mask);
        self.output.forward(context)
    }

    /// Self-attention.
    ///
    /// - hidden: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn forward(&self, hidden: Tensor<B, 3>, mask: &AttentionMask<B>) -> Tensor<B, 3> {
        self.forward_cross(hidden.clone(), hidden, mask)
    }

    /// Attention of `queries` over `keys_values` (cross-attention when they differ).
    ///
    /// - queries: `[batch, q_len, d_model]`
    /// - keys_values: `[batch, k_len, d_model]`
    /// - output: `[batch, q_len, d_model]`
    pub fn forward_cross(
        &self,
        queries: Tensor<B, 3>,
        keys_values: Tensor<B, 3>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 3> {
        let q = self.query.forward(queries);
        let k = self.key.forward(keys_values.clone());
        let v = self.value.forward(keys_values);
        self.output.forward(self.context(q, &k, &v, mask))
    }

    /// The attention context `[batch, q_len, heads·head_dim]` of projections in their own
    /// layout: the fused kernel where it applies, else burn's composition on split heads.
    fn context(
        &self,
        q: Tensor<B, 3>,
        k: &Tensor<B, 3>,
        v: &Tensor<B, 3>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 3> {
        match self.fused(&q, k, v, mask) {
            Some(context) => context,
            None => {
                let (q, k, v) = (
                    self.split_heads(q),
                    self.split_heads(k.clone()),
                    self.split_heads(v.clone()),
                );
                self.merge_heads(self.attend(q, k, v, mask))
            }
        }
    }

    /// [`kernels::attention`] on the projections `[batch, len, heads·head_dim]`, where it applies.
    fn fused(
        &self,
        q: &Tensor<B, 3>,
        k: &Tensor<B, 3>,
        v: &Tensor<B, 3>,
        mask: &AttentionMask<B>,
    ) -> Option<Tensor<B, 3>> {
        kernels::attention(
            q,
            k,
            v,
            mask.additive.as_ref(),
            mask.causal,
            self.n_heads,
            self.scale,
            self.dropout.prob,
        )
    }

    /// `softmax(q·kᵀ·scale + mask)·v` on heads laid out as `[batch, heads, len, head_dim]`.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 4> {
        let mut scores = q.matmul(k.swap_dims(2, 3));
        if self.scale != 1.0 {
            scores = scores * self.scale;
        }
        let [_, _, q_len, k_len] = scores.dims();
        if let Some(additive) = mask.dense(q_len, k_len, &scores.device()) {
            // Masks are built in the default float dtype; follow the scores' dtype (f16, bf16).
            scores = scores.clone() + additive.cast(scores.dtype());
        }
        let probs = self.dropout.forward(softmax(scores, 3));
        probs.matmul(v)
    }

    /// `[batch, len, heads·head_dim]` → `[batch, heads, len, head_dim]`.
    fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, len, _] = x.dims();
        x.reshape([batch, len, self.n_heads, self.head_dim])
            .swap_dims(1, 2)
    }

    /// `[batch, heads, len, head_dim]` → `[batch, len, heads·head_dim]`.
    fn merge_heads(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, len, head_dim] = x.dims();
        x.swap_dims(1, 2).reshape([batch, len, heads * head_dim])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;

    fn device() -> burn::backend::flex::FlexDevice {
        Default::default()
    }

    /// Reference attention for one head, written with plain loops over f64.
    fn naive_attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        t: usize,
        d: usize,
        allowed: impl Fn(usize, usize) -> bool,
    ) -> Vec<f64> {
        let mut out = vec![0.0; t * d];
        for i in 0..t {
            let scores: Vec<f64> = (0..t)
                .map(|j| {
                    if !allowed(i, j) {
                        return f64::NEG_INFINITY;
                    }
                    (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            for c in 0..d {
                out[i * d + c] = (0..t).map(|j| exps[j] / total * v[j * d + c]).sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // A fixed pseudo-random sequence (LCG), so the test needs no RNG crate.
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn causal_and_padding_masks_match_a_naive_softmax() {
        let (t, d) = (5, 4);
        let attention = MultiHeadAttentionConfig::new(d, 1).init::<Cpu>(&device());
        let [q, k, v] = [1, 2, 3].map(|s| values(t * d, s));
        let to_tensor = |x: &[f32]| {
            Tensor::<Cpu, 4>::from_data(TensorData::new(x.to_vec(), [1, 1, t, d]), &device())
        };
        // Key 4 is padding, and the mask is causal.
        let padding =
            Tensor::<Cpu, 2, Int>::from_data(TensorData::from([[1i64, 1, 1, 1, 0]]), &device());
        let mask = AttentionMask::padding(padding).with_causal(t, t, &device());
        let got: Vec<f32> = attention
            .attend(to_tensor(&q), to_tensor(&k), to_tensor(&v), &mask)
            .into_data()
            .to_vec()
            .unwrap();
        let as_f64 = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let want = naive_attention(&as_f64(&q), &as_f64(&k), &as_f64(&v), t, d, |i, j| {
            j <= i && j != 4
        });
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn causal_offset_lets_new_queries_see_the_cached_prefix() {
        let mask = AttentionMask::<Cpu>::none().with_causal(2, 5, &device());
        let bias: Vec<f32> = mask.additive.unwrap().into_data().to_vec().unwrap();
        // Query 0 is position 3 of 5: it sees keys 0..=3; query 1 sees all 5.
        let allowed: Vec<bool> = bias.iter().map(|&b| b == 0.0).collect();
        assert_eq!(
            allowed,
            [true, true, true, true, false, true, true, true, true, true]
        );
    }

    /// A causal mask left to the kernel (as on the GPU backends) materialises, for a
    /// composition, as the mask `with_causal` builds on the CPU, padding included.
    #[test]
    fn a_causal_mask_left_to_the_kernel_materialises_as_the_dense_one() {
        let padding =
            Tensor::<Cpu, 2, Int>::from_data(TensorData::from([[1i64, 1, 0, 1, 1]]), &device());
        let padding = AttentionMask::padding(padding);
        let dense = padding.clone().with_causal(3, 5, &device());
        assert!(!dense.causal(), "the CPU backend materialises causal masks");
        let flagged = AttentionMask {
            causal: true,
            ..padding
        };
        let read = |t: Tensor<Cpu, 4>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
        assert_eq!(
            read(flagged.dense(3, 5, &device()).unwrap()),
            read(dense.additive().unwrap().clone())
        );
    }

    #[test]
    fn local_band_sees_only_the_last_window_keys() {
        let mask = AttentionMask::<Cpu>::none().with_local_causal(4, 4, 2, &device());
        let bias: Vec<f32> = mask.additive.unwrap().into_data().to_vec().unwrap();
        let allowed: Vec<bool> = bias.iter().map(|&b| b == 0.0).collect();
        let naive: Vec<bool> = (0..4)
            .flat_map(|i: usize| (0..4).map(move |j: usize| j <= i && i - j < 2))
            .collect();
        assert_eq!(allowed, naive);
    }

    #[test]
    fn fully_masked_rows_stay_finite() {
        let attention = MultiHeadAttentionConfig::new(8, 2).init::<Cpu>(&device());
        let hidden = Tensor::<Cpu, 3>::ones([1, 3, 8], &device());
        let padding = Tensor::<Cpu, 2, Int>::zeros([1, 3], &device());
        let out: Vec<f32> = attention
            .forward(hidden, &AttentionMask::padding(padding))
            .into_data()
            .to_vec()
            .unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
