//! T5 (Raffel et al., 2019), as transformers' `modeling_t5.py`, and the models built on it: T5 v1.1,
//! mT5, FLAN-T5 and CPM-2 (Zhang et al., 2021).
//!
//! - RMS layer norm without bias, statistics in f32 whatever the model's dtype;
//! - relative position buckets, bidirectional in the encoder and causal in the decoder, one table
//!   per stack (HF keeps it in block 0) shared by every block;
//! - no `1/sqrt(d)` attention scaling (T5 folds it into its weights);
//! - v1.0: ReLU FFN, head tied to `shared`, decoder output scaled by `d_model^-0.5`;
//!   v1.1 / mT5 / FLAN / CPM-2: gated `gelu_new` FFN, untied `lm_head`, no scaling;
//! - a decoder cache that grows the self-attention K/V and computes the cross-attention K/V once.
//!
//! Reading order: config → relative buckets → block → stack → models → loss helpers.

use crate::layers::{Dropout, DropoutConfig};
use crate::layers::{Embedding, EmbeddingConfig};
use crate::layers::{Linear, LinearConfig};
use burn::module::Module;
use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::io::{EncoderInput, ModelClass, ModelOutput, TokenIds};
pub mod zero;

use crate::layers::{
    Activation, AttentionMask, FeedForward, FeedForwardConfig, KvCache, MultiHeadAttention,
    MultiHeadAttentionConfig, RmsNorm, RmsNormConfig,
};

// ---------------------------------------------------------------------------------------------
// Config

/// T5's `config.json`, with transformers' field names and defaults (t5-small's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    /// Number of token ids.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    /// Width of one attention head.
    #[serde(default = "defaults::d_kv")]
    pub d_kv: usize,
    /// Inner width of the feed-forward layers.
    #[serde(default = "defaults::d_ff")]
    pub d_ff: usize,
    /// Encoder blocks.
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// Decoder blocks; `num_layers` when absent.
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    /// Attention heads.
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    /// Relative position buckets.
    #[serde(default = "defaults::relative_attention_num_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which positions share the last bucket.
    #[serde(default = "defaults::relative_attention_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Dropout everywhere (sublayer outputs, attention probabilities, FFN inner).
    #[serde(default = "defaults::dropout_rate")]
    pub dropout_rate: f64,
    /// RMSNorm epsilon.
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// `"relu"`, `"gated-gelu"` (gated `gelu_new`), `"gated-<act>"` or `"<act>"`.
    #[serde(default = "defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
    /// Whether `lm_head` is `shared` (v1.0). transformers 5 always writes `true` and records the
    /// v1.0 / v1.1 difference in `scale_decoder_outputs`; the loader then unties the head when
    /// the checkpoint holds a distinct `lm_head.weight`.
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    /// transformers 5: whether the decoder output is scaled by `d_model^-0.5` before the head.
    /// When absent (transformers 4 configs), it follows `tie_word_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    /// The first decoder input (T5: the padding id).
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// End-of-text id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        32128
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        2048
    }
    pub fn num_layers() -> usize {
        6
    }
    pub fn num_heads() -> usize {
        8
    }
    pub fn relative_attention_num_buckets() -> usize {
        32
    }
    pub fn relative_attention_max_distance() -> usize {
        128
    }
    pub fn dropout_rate() -> f64 {
        0.1
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-6
    }
    pub fn feed_forward_proj() -> String {
        "relu".into()
    }
    pub fn yes() -> bool {
        true
    }
}

impl T5Config {
    /// transformers' `T5Config()`: t5-small.
    pub fn new() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("an empty T5 config is valid")
    }

    /// Decoder blocks.
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// The FFN activation and whether the FFN is gated, from `feed_forward_proj`.
    pub fn activation(&self) -> Result<(Activation, bool), ModelError> {
        let proj = self.feed_forward_proj.as_str();
        let (name, gated) = match proj.split_once('-') {
            Some(("gated", act)) => (act, true),
            None => (proj, false),
            Some(_) => {
                return Err(ModelError::config(
                    "feed_forward_proj",
                    format!("'{proj}' is neither '<act>' nor 'gated-<act>'"),
                ));
            }
        };
        // transformers reads "gated-gelu" as gated gelu_new, for backward compatibility.
        let name = if proj == "gated-gelu" {
            "gelu_new"
        } else {
            name
        };
        let activation = Activation::from_hf(name)
            .map_err(|e| ModelError::config("feed_forward_proj", e.to_string()))?;
        Ok((activation, gated))
    }

    /// Whether the decoder output is scaled by `d_model^-0.5` before the head.
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings)
    }

    /// The same config with every dropout probability set to `p`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout_rate = p;
        self
    }

    /// Checks what the model code relies on, naming the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
            (
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::config(field, "must be positive".into()));
            }
        }
        crate::check_blocks("num_layers", self.num_layers)?;
        if let Some(decoder) = self.num_decoder_layers {
            crate::check_blocks("num_decoder_layers", decoder)?;
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(ModelError::config(
                "relative_attention_num_buckets",
                "needs at least 4 (half exact, half logarithmic, per direction)".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout_rate) {
            return Err(ModelError::config(
                "dropout_rate",
                format!("{} is not in [0, 1)", self.dropout_rate),
            ));
        }
        self.activation()?;
        Ok(())
    }
}

impl Default for T5Config {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::io::FamilyConfig for T5Config {
    fn from_hf(value: &serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value.clone())
    }
    fn validate(&self) -> Result<(), ModelError> {
        T5Config::validate(self)
    }
    fn num_layers(&self) -> usize {
        self.num_layers
    }
    fn num_decoder_layers(&self) -> usize {
        self.decoder_layers()
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }
    /// A transformers-5 T5 config says `tie_word_embeddings: true` even when the checkpoint has
    /// its own `lm_head`; untying records v1.0 / v1.1 in `scale_decoder_outputs`.
    fn untie_word_embeddings(&mut self) {
        self.scale_decoder_outputs = Some(self.scales_decoder_output());
        self.tie_word_embeddings = false;
    }
    fn gated_ffn(&self) -> bool {
        self.activation().is_ok_and(|(_, gated)| gated)
    }
    /// True for T5 configs written by transformers 5 (they carry `scale_decoder_outputs`).
    fn head_tie_follows_checkpoint(&self) -> bool {
        self.scale_decoder_outputs.is_some()
    }
    fn with_dropout(self, p: f64) -> Self {
        T5Config::with_dropout(self, p)
    }
    fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }
    fn set_pad_token_id(&mut self, id: u32) {
        self.pad_token_id = Some(id);
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
    fn end_of_text_tokens(&self) -> &'static [&'static str] {
        &["</s>", "<|endoftext|>"]
    }
    /// Relative positions have no table.
    fn max_positions(&self, _: crate::Family) -> Option<usize> {
        None
    }
    /// T5 has no sequence-classification class in zoo.
    fn set_num_labels(&mut self, _: usize) {}
    /// The stream through the blocks carries the encoder and the decoder states (see
    /// [`zero`]); counted as blocks of `d_model` (within 15% of measured runs).
    fn activation_dims(&self) -> [usize; 3] {
        [self.d_model, self.d_ff, self.num_heads]
    }
}

// ---------------------------------------------------------------------------------------------
// Relative position buckets

/// T5's bucket of `relative = key_position − query_position`, as transformers'
/// `_relative_position_bucket`: half the buckets are exact small distances, the other half
/// logarithmic up to `max_distance`. Bidirectional tables split the buckets between the two
/// directions; causal ones map every future position to bucket 0. The logarithm is taken in f32,
/// as PyTorch does, so bucket boundaries agree.
pub fn relative_position_bucket(
    relative: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = num_buckets;
    let mut bucket = 0;
    let distance = if bidirectional {
        buckets /= 2;
        if relative > 0 {
            bucket += buckets;
        }
        relative.unsigned_abs() as usize
    } else {
        (-relative.min(0)) as usize
    };
    let max_exact = buckets / 2;
    if distance < max_exact {
        return bucket + distance;
    }
    let scale = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact
        + ((distance as f32 / max_exact as f32).ln() / scale * (buckets - max_exact) as f32)
            as usize;
    bucket + large.min(buckets - 1)
}

// ---------------------------------------------------------------------------------------------
// Block

/// One T5 block: self-attention, cross-attention (decoder only) and FFN, each as
/// `x + dropout(sublayer(rms_norm(x)))`. HF `block.{i}.layer.{0,1,2}`.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    /// HF `layer.0.SelfAttention` (q, k, v, o without biases).
    pub self_attention: MultiHeadAttention<B>,
    /// HF `layer.0.layer_norm`.
    pub self_attention_norm: RmsNorm<B>,
    /// HF `layer.1.EncDecAttention` (decoder only).
    pub cross_attention: Option<MultiHeadAttention<B>>,
    /// HF `layer.1.layer_norm` (decoder only).
    pub cross_attention_norm: Option<RmsNorm<B>>,
    /// HF `layer.{1|2}.DenseReluDense` (`wi` / `wi_0` + `wi_1`, `wo`).
    pub ffn: FeedForward<B>,
    /// HF `layer.{1|2}.layer_norm`.
    pub ffn_norm: RmsNorm<B>,
    dropout: Dropout,
}

/// What the decoder's cross-attention reads: the encoder's keys/values and its padding mask.
struct CrossInput<'a, B: Backend> {
    keys_values: &'a KvCache<B>,
    mask: &'a AttentionMask<B>,
}

impl<B: Backend> T5Block<B> {
    fn new(config: &T5Config, decoder: bool, device: &B::Device) -> Result<Self, ModelError> {
        let attention = || {
            MultiHeadAttentionConfig::new(config.d_model, config.num_heads)
                .with_head_dim(Some(config.d_kv))
                .with_bias(false)
                .with_scale_scores(false)
                .with_dropout(config.dropout_rate)
                .init(device)
        };
        let norm = || {
            RmsNormConfig::new(config.d_model)
                .with_epsilon(config.layer_norm_epsilon)
                .init(device)
        };
        let (activation, gated) = config.activation()?;
        Ok(Self {
            self_attention: attention(),
            self_attention_norm: norm(),
            cross_attention: decoder.then(attention),
            cross_attention_norm: decoder.then(norm),
            ffn: FeedForwardConfig::new(config.d_model, config.d_ff, activation)
                .with_gated(gated)
                .with_bias(false)
                .with_inner_dropout(config.dropout_rate)
                .init(device),
            ffn_norm: norm(),
            dropout: DropoutConfig::new(config.dropout_rate).init(),
        })
    }

    fn forward(
        &self,
        hidden: Tensor<B, 3>,
        self_mask: &AttentionMask<B>,
        cache: Option<KvCache<B>>,
        cross: Option<CrossInput<'_, B>>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let (attended, cache) = self.self_attention.forward_cached(
            self.self_attention_norm.forward(hidden.clone()),
            cache,
            self_mask,
        );
        let mut hidden = clamp_f16(hidden + self.dropout.forward(attended));
        if let (Some(attention), Some(norm), Some(cross)) =
            (&self.cross_attention, &self.cross_attention_norm, cross)
        {
            let attended =
                attention.attend_to(norm.forward(hidden.clone()), cross.keys_values, cross.mask);
            hidden = clamp_f16(hidden + self.dropout.forward(attended));
        }
        let fed = self.ffn.forward(self.ffn_norm.forward(hidden.clone()));
        (clamp_f16(hidden + self.dropout.forward(fed)), cache)
    }
}

/// transformers clamps T5's hidden states in f16 so that large activations (T5 is known for them)
/// saturate instead of overflowing to inf. It clamps at `max − 1000` once an inf appears; zoo
/// clamps there always, which saves a device-to-host check per sublayer.
fn clamp_f16<B: Backend>(hidden: Tensor<B, 3>) -> Tensor<B, 3> {
    if hidden.dtype() == DType::F16 {
        let limit = 65504.0 - 1000.0;
        hidden.clamp(-limit, limit)
    } else {
        hidden
    }
}

// ---------------------------------------------------------------------------------------------
// Stack

/// The decoder's per-block caches: self-attention K/V grow by one position per step;
/// cross-attention K/V are the encoder's, computed at the first step.
#[derive(Debug, Clone)]
pub struct T5DecoderCache<B: Backend> {
    /// Self-attention keys/values, one per block.
    pub self_attention: Vec<KvCache<B>>,
    /// Cross-attention keys/values, one per block.
    pub cross_attention: Vec<KvCache<B>>,
}

impl<B: Backend> T5DecoderCache<B> {
    /// Number of decoder positions seen.
    pub fn len(&self) -> usize {
        self.self_attention.first().map_or(0, KvCache::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the batch rows `indices`, in that order.
    pub fn select(&self, indices: Tensor<B, 1, Int>) -> Self {
        let pick =
            |caches: &Vec<KvCache<B>>| caches.iter().map(|c| c.select(indices.clone())).collect();
        Self {
            self_attention: pick(&self.self_attention),
            cross_attention: pick(&self.cross_attention),
        }
    }
}

/// An encoder or decoder stack. HF `encoder` / `decoder` (without `embed_tokens`, which is
/// `shared`).
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    /// HF `block`.
    pub blocks: Vec<T5Block<B>>,
    /// HF `block.0.layer.0.SelfAttention.relative_attention_bias`: `[num_buckets, num_heads]`.
    pub position_bias: Embedding<B>,
    /// HF `final_layer_norm`.
    pub final_norm: RmsNorm<B>,
    dropout: Dropout,
    is_decoder: bool,
    num_buckets: usize,
    max_distance: usize,
}

impl<B: Backend> T5Stack<B> {
    /// Every block's linear layers under HF's names: `q`, `k`, `v`, `o` (self- and
    /// cross-attention), `wi` (v1.0) or `wi_0` / `wi_1` (gated), `wo`.
    pub fn adaptable(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out = Vec::new();
        for block in &mut self.blocks {
            out.extend(block.self_attention.named_projections(["q", "k", "v", "o"]));
            if let Some(cross) = block.cross_attention.as_mut() {
                out.extend(cross.named_projections(["q", "k", "v", "o"]));
            }
            let input = if block.ffn.gate.is_some() {
                "wi_1"
            } else {
                "wi"
            };
            out.extend(block.ffn.named_linears([input, "wi_0", "wo"]));
        }
        out
    }

    fn new(config: &T5Config, decoder: bool, device: &B::Device) -> Result<Self, ModelError> {
        let layers = if decoder {
            config.decoder_layers()
        } else {
            config.num_layers
        };
        Ok(Self {
            blocks: (0..layers)
                .map(|_| T5Block::new(config, decoder, device))
                .collect::<Result<_, _>>()?,
            position_bias: EmbeddingConfig::new(
                config.relative_attention_num_buckets,
                config.num_heads,
            )
            .init(device),
            final_norm: RmsNormConfig::new(config.d_model)
                .with_epsilon(config.layer_norm_epsilon)
                .init(device),
            dropout: DropoutConfig::new(config.dropout_rate).init(),
            is_decoder: decoder,
            num_buckets: config.relative_attention_num_buckets,
            max_distance: config.relative_attention_max_distance,
        })
    }

    /// The relative position bias of queries `past..past + q_len` over keys `0..k_len`:
    /// `[1, heads, q_len, k_len]`, in the table's dtype.
    pub fn relative_bias(&self, q_len: usize, k_len: usize, past: usize) -> Tensor<B, 4> {
        relative_bias(
            self.position_bias.weight.val(),
            self.buckets(),
            q_len,
            k_len,
            past,
        )
    }

    /// How this stack buckets relative positions.
    fn buckets(&self) -> Buckets {
        Buckets {
            bidirectional: !self.is_decoder,
            count: self.num_buckets,
            max_distance: self.max_distance,
        }
    }

    /// Encoder: `[batch, seq, d_model]` embeddings and the `[batch, seq]` padding mask → hidden states.
    pub fn encode(
        &self,
        embeddings: Tensor<B, 3>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let seq = embeddings.dims()[1];
        let mask = padding_mask(attention_mask).with_bias(self.relative_bias(seq, seq, 0));
        let mut hidden = self.dropout.forward(embeddings);
        for block in &self.blocks {
            hidden = block.forward(hidden, &mask, None, None).0;
        }
        self.dropout.forward(self.final_norm.forward(hidden))
    }

    /// Decoder: new positions' embeddings, the encoder output and its mask, and the cache of the
    /// steps before → hidden states and the grown cache.
    pub fn decode(
        &self,
        embeddings: Tensor<B, 3>,
        encoder_hidden: &Tensor<B, 3>,
        encoder_mask: &AttentionMask<B>,
        cache: Option<T5DecoderCache<B>>,
    ) -> (Tensor<B, 3>, T5DecoderCache<B>) {
        let seq = embeddings.dims()[1];
        let past = cache.as_ref().map_or(0, T5DecoderCache::len);
        let self_mask = decoder_self_mask(self.relative_bias(seq, past + seq, past), seq, past);
        let (mut self_caches, cross_caches) = match cache {
            Some(c) => (
                c.self_attention.into_iter().map(Some).collect(),
                c.cross_attention,
            ),
            None => (
                vec![None; self.blocks.len()],
                self.blocks
                    .iter()
                    .map(|b| {
                        b.cross_attention
                            .as_ref()
                            .expect("decoder blocks have cross-attention")
                            .keys_values(encoder_hidden.clone())
                    })
                    .collect(),
            ),
        };
        let mut hidden = self.dropout.forward(embeddings);
        let mut grown = Vec::with_capacity(self.blocks.len());
        for (index, block) in self.blocks.iter().enumerate() {
            let cross = CrossInput {
                keys_values: &cross_caches[index],
                mask: encoder_mask,
            };
            let (out, cache) =
                block.forward(hidden, &self_mask, self_caches[index].take(), Some(cross));
            hidden = out;
            grown.push(cache);
        }
        let hidden = self.dropout.forward(self.final_norm.forward(hidden));
        (
            hidden,
            T5DecoderCache {
                self_attention: grown,
                cross_attention: cross_caches,
            },
        )
    }
}

/// How a stack buckets relative positions: both directions (encoder) or the past only
/// (decoder), into `count` buckets up to `max_distance`.
#[derive(Debug, Clone, Copy)]
struct Buckets {
    bidirectional: bool,
    count: usize,
    max_distance: usize,
}

/// The relative position bias from a `[buckets, heads]` table (a stack's, or the one its ZeRO
/// blocks carry): queries `past..past + q_len` over keys `0..k_len`, `[1, heads, q_len, k_len]`.
fn relative_bias<B: Backend>(
    table: Tensor<B, 2>,
    buckets: Buckets,
    q_len: usize,
    k_len: usize,
    past: usize,
) -> Tensor<B, 4> {
    let device = table.device();
    let heads = table.dims()[1];
    let ids: Vec<i64> = (0..q_len)
        .flat_map(|i| {
            (0..k_len).map(move |j| {
                let relative = j as i64 - (i + past) as i64;
                relative_position_bucket(
                    relative,
                    buckets.bidirectional,
                    buckets.count,
                    buckets.max_distance,
                ) as i64
            })
        })
        .collect();
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [q_len * k_len]), &device);
    table
        .select(0, ids)
        .reshape([q_len, k_len, heads])
        .permute([2, 0, 1])
        .unsqueeze::<4>()
}

/// The encoder's self-attention mask and the decoder's cross-attention mask: the source padding.
fn padding_mask<B: Backend>(attention_mask: Option<Tensor<B, 2, Int>>) -> AttentionMask<B> {
    match attention_mask {
        Some(m) => AttentionMask::padding(m),
        None => AttentionMask::none(),
    }
}

/// The decoder's self-attention mask for `seq` new positions after `past`: causal, plus `bias`.
fn decoder_self_mask<B: Backend>(bias: Tensor<B, 4>, seq: usize, past: usize) -> AttentionMask<B> {
    let device = bias.device();
    AttentionMask::none()
        .with_causal(seq, past + seq, &device)
        .with_bias(bias)
}

/// What turns decoder states into logits: `lm_head`, or `shared` when tied.
enum OutputLayer<'a, B: Backend> {
    Head(&'a Linear<B>),
    Tied(&'a Embedding<B>),
}

/// Decoder hidden states → logits `[batch, tgt, vocab]`, scaled by `output_scale` first (v1.0
/// scales when tied).
fn lm_logits<B: Backend>(
    hidden: Tensor<B, 3>,
    output: OutputLayer<'_, B>,
    output_scale: f64,
) -> Tensor<B, 3> {
    let hidden = if output_scale != 1.0 {
        hidden * output_scale
    } else {
        hidden
    };
    match output {
        OutputLayer::Head(head) => head.forward(hidden),
        OutputLayer::Tied(shared) => shared.tied_logits(hidden),
    }
}

// ---------------------------------------------------------------------------------------------
// Models

/// The encoder alone. HF `T5EncoderModel`.
#[derive(Module, Debug)]
pub struct T5EncoderModel<B: Backend> {
    /// HF `shared` (also `encoder.embed_tokens`).
    pub shared: Embedding<B>,
    /// HF `encoder`.
    pub encoder: T5Stack<B>,
}

impl<B: Backend> T5EncoderModel<B> {
    /// Builds the encoder from a config.
    pub fn new(config: &T5Config, device: &B::Device) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            shared: EmbeddingConfig::new(config.vocab_size, config.d_model).init(device),
            encoder: T5Stack::new(config, false, device)?,
        })
    }

    /// `[batch, seq]` ids (+ padding mask) → `[batch, seq, d_model]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.encoder
            .encode(self.shared.forward(input_ids), attention_mask)
    }
}

/// Encoder and decoder without a head. HF `T5Model`.
#[derive(Module, Debug)]
pub struct T5Model<B: Backend> {
    /// HF `shared`.
    pub shared: Embedding<B>,
    /// HF `encoder`.
    pub encoder: T5Stack<B>,
    /// HF `decoder`.
    pub decoder: T5Stack<B>,
}

impl<B: Backend> T5Model<B> {
    /// Builds the model from a config.
    pub fn new(config: &T5Config, device: &B::Device) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            shared: EmbeddingConfig::new(config.vocab_size, config.d_model).init(device),
            encoder: T5Stack::new(config, false, device)?,
            decoder: T5Stack::new(config, true, device)?,
        })
    }

    /// Encoder output and decoder output.
    pub fn forward(&self, input: &Seq2SeqInput<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        run_seq2seq(&self.shared, &self.encoder, &self.decoder, input)
    }
}

/// What an encoder-decoder model reads.
#[derive(Debug, Clone)]
pub struct Seq2SeqInput<B: Backend> {
    /// `[batch, src]` encoder ids (right-padded).
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, src]`: 1 for real tokens, 0 for padding.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// `[batch, tgt]` decoder ids (start token, then the target shifted right).
    pub decoder_input_ids: Tensor<B, 2, Int>,
}

fn run_seq2seq<B: Backend>(
    shared: &Embedding<B>,
    encoder: &T5Stack<B>,
    decoder: &T5Stack<B>,
    input: &Seq2SeqInput<B>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let encoded = encoder.encode(
        shared.forward(input.input_ids.clone()),
        input.attention_mask.clone(),
    );
    let mask = padding_mask(input.attention_mask.clone());
    let (decoded, _) = decoder.decode(
        shared.forward(input.decoder_input_ids.clone()),
        &encoded,
        &mask,
        None,
    );
    (encoded, decoded)
}

/// T5 with its language-model head. HF `T5ForConditionalGeneration`.
#[derive(Module, Debug)]
pub struct T5ForConditionalGeneration<B: Backend> {
    /// HF `shared`.
    pub shared: Embedding<B>,
    /// HF `encoder`.
    pub encoder: T5Stack<B>,
    /// HF `decoder`.
    pub decoder: T5Stack<B>,
    /// HF `lm_head`, only when untied; otherwise the head is `shared`.
    pub lm_head: Option<Linear<B>>,
    output_scale: f64,
    decoder_start_token_id: Option<u32>,
}

impl<B: Backend> T5ForConditionalGeneration<B> {
    /// Builds the model from a config.
    pub fn new(config: &T5Config, device: &B::Device) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            shared: EmbeddingConfig::new(config.vocab_size, config.d_model).init(device),
            encoder: T5Stack::new(config, false, device)?,
            decoder: T5Stack::new(config, true, device)?,
            lm_head: (!config.tie_word_embeddings).then(|| {
                LinearConfig::new(config.d_model, config.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            output_scale: if config.scales_decoder_output() {
                (config.d_model as f64).powf(-0.5)
            } else {
                1.0
            },
            decoder_start_token_id: config.decoder_start_token_id,
        })
    }

    /// The first decoder input, when the config names it.
    pub fn decoder_start_token_id(&self) -> Option<u32> {
        self.decoder_start_token_id
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.shared.weight.lazy_shape().dims::<2>()[0]
    }

    /// Encoder: ids (+ mask) → `[batch, src, d_model]`.
    pub fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.encoder
            .encode(self.shared.forward(input_ids), attention_mask)
    }

    /// Decoder hidden states → logits `[batch, tgt, vocab]` (scaled first when tied, as v1.0).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let output = match &self.lm_head {
            Some(head) => OutputLayer::Head(head),
            None => OutputLayer::Tied(&self.shared),
        };
        lm_logits(hidden, output, self.output_scale)
    }

    /// Full forward: encoder output, decoder output and logits.
    pub fn forward(&self, input: &Seq2SeqInput<B>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let (encoded, decoded) = run_seq2seq(&self.shared, &self.encoder, &self.decoder, input);
        let logits = self.logits(decoded.clone());
        (encoded, decoded, logits)
    }

    /// One decoding step over new decoder ids, continuing `cache`: last-position logits
    /// `[batch, vocab]` and the grown cache.
    pub fn decode_step(
        &self,
        decoder_input_ids: Tensor<B, 2, Int>,
        encoder_hidden: &Tensor<B, 3>,
        encoder_mask: &AttentionMask<B>,
        cache: Option<T5DecoderCache<B>>,
    ) -> (Tensor<B, 2>, T5DecoderCache<B>) {
        let (hidden, cache) = self.decoder.decode(
            self.shared.forward(decoder_input_ids),
            encoder_hidden,
            encoder_mask,
            cache,
        );
        let [batch, seq, width] = hidden.dims();
        let logits = self.logits(hidden.slice([0..batch, seq - 1..seq, 0..width]));
        let vocab = logits.dims()[2];
        (logits.reshape([batch, vocab]), cache)
    }
}

// ---------------------------------------------------------------------------------------------
// Generation

/// A [`T5ForConditionalGeneration`] bound to one batch's encoder output, so that the shared
/// generation code ([`crate::generation`]) can drive its decoder. The first step repeats each
/// encoder row for its beams; later steps reuse the cached cross-attention keys/values.
pub struct T5Decoder<'a, B: Backend> {
    model: &'a T5ForConditionalGeneration<B>,
    encoded: Tensor<B, 3>,
    encoder_mask: Tensor<B, 2, Int>,
}

/// The state between steps: the decoder cache and the encoder output, one row per beam.
#[derive(Debug, Clone)]
pub struct T5DecoderState<B: Backend> {
    cache: T5DecoderCache<B>,
    encoded: Tensor<B, 3>,
    encoder_mask: Tensor<B, 2, Int>,
}

impl<B: Backend> crate::generation::Decoder<B> for T5Decoder<'_, B> {
    type State = T5DecoderState<B>;

    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn max_positions(&self) -> usize {
        // Relative positions: any length is positionable.
        usize::MAX / 2
    }

    fn step(
        &self,
        input: &crate::io::DecoderInput<B>,
        state: Option<Self::State>,
    ) -> (Tensor<B, 2>, Self::State) {
        let (cache, encoded, encoder_mask) = match state {
            Some(s) => (Some(s.cache), s.encoded, s.encoder_mask),
            None => {
                let rows = input.input_ids.dims()[0];
                let items = self.encoded.dims()[0];
                let per_item = rows / items;
                let device = self.encoded.device();
                let repeat: Vec<i64> = (0..rows).map(|r| (r / per_item) as i64).collect();
                let indices =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(repeat, [rows]), &device);
                (
                    None,
                    self.encoded.clone().select(0, indices.clone()),
                    self.encoder_mask.clone().select(0, indices),
                )
            }
        };
        let mask = AttentionMask::padding(encoder_mask.clone());
        let (logits, cache) =
            self.model
                .decode_step(input.input_ids.clone(), &encoded, &mask, cache);
        (
            logits,
            T5DecoderState {
                cache,
                encoded,
                encoder_mask,
            },
        )
    }

    fn reorder(&self, state: &Self::State, indices: Tensor<B, 1, Int>) -> Self::State {
        T5DecoderState {
            cache: state.cache.select(indices.clone()),
            encoded: state.encoded.clone().select(0, indices.clone()),
            encoder_mask: state.encoder_mask.clone().select(0, indices),
        }
    }
}

/// Generates target sequences for `prompts` (encoder inputs, one row each, unpadded; they are
/// right-padded with `pad`, as T5 tokenizers pad). Every decoder row starts with the model's
/// `decoder_start_token_id`; the result's rows are that start token followed by the new tokens, as
/// transformers returns them.
pub fn generate_seq2seq<B: Backend>(
    model: &T5ForConditionalGeneration<B>,
    prompts: &[Vec<u32>],
    config: &crate::generation::GenerationConfig,
    pad: u32,
    device: &B::Device,
    on_tokens: impl FnMut(&[Option<u32>]),
) -> Result<crate::generation::Generated, crate::generation::GenerationError> {
    use crate::generation::GenerationError;
    let start = model
        .decoder_start_token_id()
        .ok_or(GenerationError::Setting {
            name: "decoder_start_token_id",
            message: "the config has none; an encoder-decoder model needs it to start decoding"
                .into(),
        })?;
    crate::generation::check_prompt_ids(prompts, model.vocab_size())?;
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut mask = Vec::with_capacity(prompts.len() * width);
    for prompt in prompts {
        ids.extend(prompt.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(pad as i64, width - prompt.len()));
        mask.extend(std::iter::repeat_n(1i64, prompt.len()));
        mask.extend(std::iter::repeat_n(0i64, width - prompt.len()));
    }
    let shape = [prompts.len(), width];
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), device);
    let encoder_mask = Tensor::<B, 2, Int>::from_data(TensorData::new(mask, shape), device);
    let decoder = T5Decoder {
        model,
        encoded: model.encode(ids, Some(encoder_mask.clone())),
        encoder_mask,
    };
    let starts = vec![vec![start]; prompts.len()];
    crate::generation::generate(&decoder, &starts, config, device, on_tokens)
}

// ---------------------------------------------------------------------------------------------
// Training helpers

/// transformers' `_shift_right`: the decoder input for `labels` is the start token followed by
/// the labels without their last position, with ignored labels (-100) replaced by `pad`.
pub fn shift_right<B: Backend>(
    labels: Tensor<B, 2, Int>,
    start: u32,
    pad: u32,
) -> Tensor<B, 2, Int> {
    let [batch, len] = labels.dims();
    let device = labels.device();
    let starts = Tensor::<B, 2, Int>::full([batch, 1], start as i64, &device);
    let body = labels.slice([0..batch, 0..len - 1]);
    let body = body
        .clone()
        .mask_fill(body.equal_elem(crate::io::IGNORE_INDEX), pad as i64);
    Tensor::cat(vec![starts, body], 1)
}

/// T5's span corruption (the pre-training objective of T5 and CPM-2) over given spans: each span
/// `(start, len)` of `tokens` is replaced in the input by one sentinel, and the target lists each
/// sentinel followed by the tokens it hides, then the sentinel after the last span (T5's end
/// marker) and `end` when given. `sentinel(k)` is the id of the k-th sentinel. Spans must be
/// sorted and not overlap.
///
/// `[a b c d e f]`, spans `[(1, 2), (4, 1)]` → input `[a S0 d S1 f]`, target `[S0 b c S1 e S2]`.
pub fn span_corrupt(
    tokens: &[u32],
    spans: &[(usize, usize)],
    sentinel: impl Fn(usize) -> u32,
    end: Option<u32>,
) -> (Vec<u32>, Vec<u32>) {
    let mut input = Vec::with_capacity(tokens.len());
    let mut target = Vec::new();
    let mut next = 0;
    for (k, &(start, len)) in spans.iter().enumerate() {
        assert!(
            start >= next && start + len <= tokens.len(),
            "spans must be sorted, disjoint and inside the text"
        );
        input.extend_from_slice(&tokens[next..start]);
        input.push(sentinel(k));
        target.push(sentinel(k));
        target.extend_from_slice(&tokens[start..start + len]);
        next = start + len;
    }
    input.extend_from_slice(&tokens[next..]);
    target.push(sentinel(spans.len()));
    target.extend(end);
    (input, target)
}

/// T5's span-corruption noise (`random_spans_noise_mask` of the T5 paper's code, as
/// transformers' `run_t5_mlm_flax.py`): of `length` tokens, `round(length · density)` (at least
/// one, at most `length − 1`) are noise, in `round(noise / mean_span)` (at least one) spans; the
/// text alternates non-noise and noise runs, starting with non-noise, and the lengths of each
/// kind are a uniformly random split of its tokens into that many runs of at least one. Returns
/// the noise spans as sorted `(start, len)`, for [`span_corrupt`]. The number of spans and noise
/// tokens depends on `length` alone, so every row of a batch corrupts to the same lengths.
pub fn random_noise_spans(
    length: usize,
    density: f64,
    mean_span: f64,
    rng: &mut impl rand::Rng,
) -> Vec<(usize, usize)> {
    let (noise, spans) = noise_counts(length, density, mean_span);
    let noise_runs = random_segmentation(noise, spans, rng);
    let kept_runs = random_segmentation(length - noise, spans, rng);
    let mut out = Vec::with_capacity(spans);
    let mut position = 0;
    for (kept, noisy) in kept_runs.into_iter().zip(noise_runs) {
        position += kept;
        out.push((position, noisy));
        position += noisy;
    }
    out
}

/// `(noise tokens, noise spans)` of [`random_noise_spans`] for a text of `length` (≥ 2) tokens.
pub fn noise_counts(length: usize, density: f64, mean_span: f64) -> (usize, usize) {
    let noise = ((length as f64 * density).round() as usize).clamp(1, length.saturating_sub(1));
    let spans = ((noise as f64 / mean_span).round() as usize)
        .max(1)
        .min(noise)
        .min(length - noise);
    (noise, spans)
}

/// `items` split into `segments` runs of at least one, uniformly over the ways to cut them.
fn random_segmentation(items: usize, segments: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
    // Cut after `segments − 1` distinct positions among the `items − 1` gaps.
    let mut cuts: Vec<usize> = rand::seq::index::sample(rng, items - 1, segments - 1)
        .into_iter()
        .map(|gap| gap + 1)
        .collect();
    cuts.sort_unstable();
    cuts.push(items);
    let mut previous = 0;
    cuts.into_iter()
        .map(|cut| {
            let run = cut - previous;
            previous = cut;
            run
        })
        .collect()
}

/// Seq2seq loss as transformers computes it: cross-entropy of every decoder position against its
/// label (no shift: the decoder input is already shifted), labels -100 skipped.
pub fn seq2seq_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    crate::io::token_cross_entropy(
        logits.reshape([batch * seq, vocab]),
        labels.reshape([batch * seq]),
        crate::io::IGNORE_INDEX,
    )
}

// ---------------------------------------------------------------------------------------------
// The classes as the registry runs them

/// An encoder-decoder input from [`EncoderInput`]: its decoder ids, or one start token per row.
fn seq2seq_input<B: Backend>(input: &EncoderInput<B>, start: Option<u32>) -> Seq2SeqInput<B> {
    let decoder_input_ids = input.decoder_input_ids.clone().unwrap_or_else(|| {
        let batch = input.input_ids.dims()[0];
        Tensor::full(
            [batch, 1],
            start.unwrap_or(0) as i64,
            &input.input_ids.device(),
        )
    });
    Seq2SeqInput {
        input_ids: input.input_ids.clone(),
        attention_mask: input.attention_mask.clone(),
        decoder_input_ids,
    }
}

impl<B: Backend> ModelClass<B> for T5Model<B> {
    type Config = T5Config;
    fn build(config: &T5Config, device: &B::Device) -> Result<Self, ModelError> {
        T5Model::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (encoded, decoded) = self.forward(&seq2seq_input(input, None));
        let mut output = ModelOutput::hidden(decoded, None);
        output.encoder_last_hidden_state = Some(encoded);
        output
    }
    fn max_sequence_length(&self) -> usize {
        // Relative positions: no table limits the length.
        usize::MAX
    }
    fn vocab_size(&self) -> usize {
        self.shared.weight.lazy_shape().dims::<2>()[0]
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        let mut out = self.encoder.adaptable();
        out.extend(self.decoder.adaptable());
        out
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        crate::io::VocabTables {
            embeddings: vec![&mut self.shared],
            heads: Vec::new(),
        }
    }
}

impl<B: Backend> ModelClass<B> for T5ForConditionalGeneration<B> {
    type Config = T5Config;
    fn build(config: &T5Config, device: &B::Device) -> Result<Self, ModelError> {
        T5ForConditionalGeneration::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let start = self.decoder_start_token_id();
        let (encoded, decoded, logits) = self.forward(&seq2seq_input(input, start));
        let mut output = ModelOutput::hidden(decoded, Some(logits));
        output.encoder_last_hidden_state = Some(encoded);
        output
    }
    fn max_sequence_length(&self) -> usize {
        usize::MAX
    }
    fn vocab_size(&self) -> usize {
        T5ForConditionalGeneration::vocab_size(self)
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        let mut out = self.encoder.adaptable();
        out.extend(self.decoder.adaptable());
        out
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        crate::io::VocabTables {
            embeddings: vec![&mut self.shared],
            heads: self.lm_head.iter_mut().collect(),
        }
    }
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &crate::generation::GenerationConfig,
        device: &B::Device,
        on_tokens: &mut dyn FnMut(&[Option<u32>]),
    ) -> Option<Result<crate::generation::Generated, crate::generation::GenerationError>> {
        let pad = config.pad_token_id;
        Some(generate_seq2seq(
            self, prompts, config, pad, device, on_tokens,
        ))
    }
}

impl<B: Backend> ModelClass<B> for T5EncoderModel<B> {
    type Config = T5Config;
    fn build(config: &T5Config, device: &B::Device) -> Result<Self, ModelError> {
        T5EncoderModel::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let hidden = self.forward(input.input_ids.clone(), input.attention_mask.clone());
        ModelOutput::hidden(hidden, None)
    }
    fn max_sequence_length(&self) -> usize {
        usize::MAX
    }
    fn vocab_size(&self) -> usize {
        self.shared.weight.lazy_shape().dims::<2>()[0]
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.encoder.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        crate::io::VocabTables {
            embeddings: vec![&mut self.shared],
            heads: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `_relative_position_bucket` values for t5-small's table (32 buckets, max
    /// distance 128), computed by hand from its formula:
    /// bidirectional: 16 per direction, 8 exact; causal: 32 buckets, 16 exact.
    #[test]
    fn buckets_follow_the_t5_formula() {
        let bi = |r| relative_position_bucket(r, true, 32, 128);
        let causal = |r| relative_position_bucket(r, false, 32, 128);
        // Exact region.
        assert_eq!([bi(0), bi(-1), bi(-7), bi(1), bi(7)], [0, 1, 7, 17, 23]);
        // Logarithmic region: 8 + floor(ln(d/8) / ln(16) · 8).
        for d in [8i64, 9, 15, 16, 31, 32, 64, 100, 127] {
            let want = 8 + ((d as f64 / 8.0).ln() / 16f64.ln() * 8.0).floor() as usize;
            assert_eq!(bi(-d), want.min(15), "distance {d}");
            assert_eq!(bi(d), 16 + want.min(15), "distance +{d}");
        }
        assert_eq!(bi(-128), 15);
        assert_eq!(bi(-1000), 15);
        // Causal: the future is bucket 0; the past uses 32 buckets, 16 exact.
        assert_eq!(
            [causal(3), causal(0), causal(-5), causal(-15)],
            [0, 0, 5, 15]
        );
        let want = 16 + ((40f64 / 16.0).ln() / 8f64.ln() * 16.0).floor() as usize;
        assert_eq!(causal(-40), want);
        assert_eq!(causal(-500), 31);
    }

    #[test]
    fn span_corruption_hides_spans_behind_sentinels() {
        let (input, target) = span_corrupt(
            &[1, 2, 3, 4, 5, 6],
            &[(1, 2), (4, 1)],
            |k| 100 + k as u32,
            Some(9),
        );
        assert_eq!(input, [1, 100, 4, 101, 6]);
        assert_eq!(target, [100, 2, 3, 101, 5, 102, 9]);
    }

    #[test]
    fn noise_spans_have_t5s_counts_and_alternate_with_kept_text() {
        use rand::SeedableRng;
        // T5's defaults on 512 tokens: round(76.8) = 77 noise tokens in round(77 / 3) = 26 spans.
        assert_eq!(noise_counts(512, 0.15, 3.0), (77, 26));
        assert_eq!(noise_counts(10, 0.15, 3.0), (2, 1));
        assert_eq!(noise_counts(2, 0.15, 3.0), (1, 1));
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let spans = random_noise_spans(512, 0.15, 3.0, &mut rng);
            assert_eq!(spans.len(), 26);
            assert_eq!(spans.iter().map(|s| s.1).sum::<usize>(), 77);
            // Non-noise first, every run at least one token, inside the text.
            let mut end = 0;
            for &(start, len) in &spans {
                assert!(start > end, "{spans:?}");
                assert!(len >= 1);
                end = start + len;
            }
            assert!(end <= 512);
        }
    }

    #[test]
    fn feed_forward_proj_parses_like_transformers() {
        let parse = |p: &str| {
            T5Config {
                feed_forward_proj: p.into(),
                ..T5Config::new()
            }
            .activation()
        };
        assert_eq!(parse("relu").unwrap(), (Activation::Relu, false));
        assert_eq!(parse("gated-gelu").unwrap(), (Activation::GeluNew, true));
        assert_eq!(parse("gated-silu").unwrap(), (Activation::Silu, true));
        let err = parse("fancy-relu").unwrap_err().to_string();
        assert!(err.contains("feed_forward_proj"), "{err}");
    }

    #[test]
    fn decoder_output_scaling_follows_either_transformers_version() {
        let config = |tie, scale| T5Config {
            tie_word_embeddings: tie,
            scale_decoder_outputs: scale,
            ..T5Config::new()
        };
        assert!(config(true, None).scales_decoder_output());
        assert!(!config(false, None).scales_decoder_output());
        assert!(!config(true, Some(false)).scales_decoder_output());
    }
}
