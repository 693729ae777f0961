//! GPT-2 (Radford et al., 2019), as transformers' `modeling_gpt2.py`: pre-LN decoder blocks, learned
//! absolute positions, `gelu_new`, and an LM head tied to the token embeddings. The same file covers
//! the GPT-3 sizes (Brown et al., 2020; optional alternating locally banded attention) and CPM-1
//! (`TsinghuaAI/CPM-Generate`), which is a GPT-2 with a Chinese vocabulary.
//!
//! Reading order: config → block → model (with its KV cache) → LM head → loss.

use crate::layers::{Dropout, DropoutConfig};
use crate::layers::{Embedding, EmbeddingConfig};
use crate::layers::{Linear, LinearConfig};
use burn::module::Module;
use burn::tensor::{Int, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

pub mod zero;

use crate::ModelError;
pub use crate::io::positions;
/// The inputs and losses every family shares, also reachable here (they began in this file).
pub use crate::io::{
    DecoderCache, DecoderInput, IGNORE_INDEX, causal_lm_loss, token_cross_entropy,
};
use crate::io::{EncoderInput, Logits, ModelClass, ModelOutput};
use crate::io::{last_position_logits, last_token_score, vocab_logits};
use crate::layers::{
    Activation, AttentionMask, FeedForward, FeedForwardConfig, KvCache, LayerNorm, LayerNormConfig,
    MultiHeadAttention, MultiHeadAttentionConfig,
};

// ---------------------------------------------------------------------------------------------
// Config

/// GPT-2's `config.json`, with transformers' field names and defaults, plus two zoo fields for the
/// GPT-3 shapes that transformers' GPT-2 cannot express (`head_dim`, `local_attention_window`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Number of token ids.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Size of the learned position table: the longest context.
    #[serde(default = "defaults::n_positions")]
    pub n_positions: usize,
    /// Width of the hidden states.
    #[serde(default = "defaults::n_embd")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(default = "defaults::n_layer")]
    pub n_layer: usize,
    /// Number of attention heads.
    #[serde(default = "defaults::n_head")]
    pub n_head: usize,
    /// Inner width of the MLP; `4 · n_embd` when absent.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// MLP activation.
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    /// Dropout on sublayer outputs.
    #[serde(default = "defaults::dropout")]
    pub resid_pdrop: f64,
    /// Dropout on the embeddings.
    #[serde(default = "defaults::dropout")]
    pub embd_pdrop: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "defaults::dropout")]
    pub attn_pdrop: f64,
    /// LayerNorm epsilon.
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Whether scores are scaled by `1/sqrt(head_dim)`.
    #[serde(default = "defaults::yes")]
    pub scale_attn_weights: bool,
    /// Whether block `i`'s scores are further divided by `i + 1` (Mistral's GPT-2 runs).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Start-of-text id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-text id(s): a number or a list.
    #[serde(default)]
    pub eos_token_id: Option<crate::io::TokenIds>,
    /// Padding id, when the checkpoint has one.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Whether `lm_head` shares the token embeddings (every published GPT-2 does).
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    /// Cross-attention (GPT-2 as a seq2seq decoder) is not supported.
    #[serde(default)]
    pub add_cross_attention: bool,
    /// zoo: width of one head when it is not `n_embd / n_head` (GPT-3 13B: 5140 wide, 40 × 128).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// zoo: GPT-3's alternating dense / locally banded attention. When set, every odd block
    /// (1, 3, …) attends only to the last `local_attention_window` positions; even blocks are dense.
    #[serde(default)]
    pub local_attention_window: Option<usize>,
    /// Number of labels of `GPT2ForSequenceClassification`, when the config says it directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Label names by id; its length is the number of labels when `num_labels` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        50257
    }
    pub fn n_positions() -> usize {
        1024
    }
    pub fn n_embd() -> usize {
        768
    }
    pub fn n_layer() -> usize {
        12
    }
    pub fn n_head() -> usize {
        12
    }
    pub fn activation_function() -> String {
        "gelu_new".into()
    }
    pub fn dropout() -> f64 {
        0.1
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
}

impl Gpt2Config {
    /// Number of labels of a classification head: `num_labels`, else `id2label`'s length, else 2
    /// (transformers' default).
    pub fn labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(2)
    }

    /// transformers' `GPT2Config()`: the 124M gpt2 shape.
    pub fn new() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("an empty GPT-2 config is valid")
    }

    /// A config of the given shape, the rest as [`Gpt2Config::new`].
    pub fn sized(n_layer: usize, n_embd: usize, n_head: usize, n_positions: usize) -> Self {
        Self {
            n_layer,
            n_embd,
            n_head,
            n_positions,
            ..Self::new()
        }
    }

    /// Checks what the model code relies on, naming the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::config(field, "must be positive".into()));
            }
        }
        crate::check_blocks("n_layer", self.n_layer)?;
        if self.head_dim.is_none() && !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::config(
                "n_head",
                format!(
                    "n_embd {} is not divisible by n_head {}",
                    self.n_embd, self.n_head
                ),
            ));
        }
        if self.add_cross_attention {
            return Err(ModelError::Unsupported(
                "add_cross_attention (GPT-2 as an encoder-decoder's decoder)".into(),
            ));
        }
        if self.local_attention_window == Some(0) {
            return Err(ModelError::config(
                "local_attention_window",
                "must be positive".into(),
            ));
        }
        for p in [self.resid_pdrop, self.embd_pdrop, self.attn_pdrop] {
            if !(0.0..1.0).contains(&p) {
                return Err(ModelError::config(
                    "resid_pdrop",
                    format!("dropout {p} is not in [0, 1)"),
                ));
            }
        }
        self.activation()?;
        Ok(())
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation, ModelError> {
        Activation::from_hf(&self.activation_function)
            .map_err(|e| ModelError::config("activation_function", e.to_string()))
    }

    /// The same config with every dropout probability set to `p`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.resid_pdrop = p;
        self.embd_pdrop = p;
        self.attn_pdrop = p;
        self
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head)
    }

    /// Whether block `index` uses the locally banded pattern.
    pub fn is_local_block(&self, index: usize) -> bool {
        self.local_attention_window.is_some() && index % 2 == 1
    }
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::io::FamilyConfig for Gpt2Config {
    fn from_hf(value: &serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value.clone())
    }
    fn validate(&self) -> Result<(), ModelError> {
        Gpt2Config::validate(self)
    }
    fn num_layers(&self) -> usize {
        self.n_layer
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }
    fn untie_word_embeddings(&mut self) {
        self.tie_word_embeddings = false;
    }
    fn with_dropout(self, p: f64) -> Self {
        Gpt2Config::with_dropout(self, p)
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
            .map(crate::io::TokenIds::to_vec)
            .unwrap_or_default()
    }
    fn end_of_text_tokens(&self) -> &'static [&'static str] {
        &["<|endoftext|>"]
    }
    fn max_positions(&self, _: crate::Family) -> Option<usize> {
        Some(self.n_positions)
    }
    fn set_num_labels(&mut self, labels: usize) {
        self.num_labels = Some(labels);
    }
    fn activation_dims(&self) -> [usize; 3] {
        [
            self.n_embd,
            self.n_inner.unwrap_or(4 * self.n_embd),
            self.n_head,
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Block

/// One pre-LN decoder block: `x + attn(ln_1(x))`, then `h + mlp(ln_2(h))`. HF `h.{i}`.
#[derive(Module, Debug)]
pub struct Gpt2Block<B: Backend> {
    /// HF `ln_1`.
    pub ln_1: LayerNorm<B>,
    /// HF `attn` (`c_attn` is split into query/key/value by the key table; `c_proj` is `output`).
    pub attention: MultiHeadAttention<B>,
    /// HF `ln_2`.
    pub ln_2: LayerNorm<B>,
    /// HF `mlp` (`c_fc` is `input`, `c_proj` is `output`).
    pub mlp: FeedForward<B>,
    dropout: Dropout,
}

impl<B: Backend> Gpt2Block<B> {
    fn new(config: &Gpt2Config, index: usize, device: &B::Device) -> Result<Self, ModelError> {
        let d_ff = config.n_inner.unwrap_or(4 * config.n_embd);
        let norm = || {
            LayerNormConfig::new(config.n_embd)
                .with_epsilon(config.layer_norm_epsilon)
                .init(device)
        };
        let divisor = if config.scale_attn_by_inverse_layer_idx {
            (index + 1) as f64
        } else {
            1.0
        };
        Ok(Self {
            ln_1: norm(),
            attention: MultiHeadAttentionConfig::new(config.n_embd, config.n_head)
                .with_head_dim(Some(config.head_dim()))
                .with_scale_scores(config.scale_attn_weights)
                .with_score_divisor(divisor)
                .with_dropout(config.attn_pdrop)
                .init(device),
            ln_2: norm(),
            mlp: FeedForwardConfig::new(config.n_embd, d_ff, config.activation()?).init(device),
            dropout: DropoutConfig::new(config.resid_pdrop).init(),
        })
    }

    /// - hidden: `[batch, seq, n_embd]` → same shape, and the block's grown KV cache.
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        cache: Option<KvCache<B>>,
        mask: &AttentionMask<B>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let (attended, cache) =
            self.attention
                .forward_cached(self.ln_1.forward(hidden.clone()), cache, mask);
        let hidden = hidden + self.dropout.forward(attended);
        let fed = self.mlp.forward(self.ln_2.forward(hidden.clone()));
        (hidden + self.dropout.forward(fed), cache)
    }
}

// ---------------------------------------------------------------------------------------------
// Model

/// The GPT-2 decoder stack without a head. HF `GPT2Model` (under `transformer.` in the LM model).
#[derive(Module, Debug)]
pub struct Gpt2Model<B: Backend> {
    /// HF `wte`: token embeddings `[vocab, n_embd]`, also the tied LM head.
    pub wte: Embedding<B>,
    /// HF `wpe`: position embeddings `[n_positions, n_embd]`.
    pub wpe: Embedding<B>,
    /// HF `h`.
    pub blocks: Vec<Gpt2Block<B>>,
    /// HF `ln_f`.
    pub ln_f: LayerNorm<B>,
    pub(crate) dropout: Dropout,
    pub(crate) local_window: Option<usize>,
}

impl<B: Backend> Gpt2Model<B> {
    /// Every block's linear layers: `query`, `key`, `value` (HF's fused `attn.c_attn`, split),
    /// `attn_c_proj`, `c_fc`, `mlp_c_proj`.
    pub fn adaptable(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out = Vec::new();
        for block in &mut self.blocks {
            out.extend(
                block
                    .attention
                    .named_projections(["query", "key", "value", "attn_c_proj"]),
            );
            out.extend(block.mlp.named_linears(["c_fc", "c_fc", "mlp_c_proj"]));
        }
        out
    }

    /// Builds the stack from a config (weights lazily initialised).
    pub fn new(config: &Gpt2Config, device: &B::Device) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            wte: EmbeddingConfig::new(config.vocab_size, config.n_embd).init(device),
            wpe: EmbeddingConfig::new(config.n_positions, config.n_embd).init(device),
            blocks: (0..config.n_layer)
                .map(|i| Gpt2Block::new(config, i, device))
                .collect::<Result<_, _>>()?,
            ln_f: LayerNormConfig::new(config.n_embd)
                .with_epsilon(config.layer_norm_epsilon)
                .init(device),
            dropout: DropoutConfig::new(config.embd_pdrop).init(),
            local_window: config.local_attention_window,
        })
    }

    /// The longest context: the size of the position table.
    pub fn max_positions(&self) -> usize {
        self.wpe.weight.lazy_shape().dims::<2>()[0]
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.wte.weight.lazy_shape().dims::<2>()[0]
    }

    /// Full-sequence forward (training, scoring): `[batch, seq]` → `[batch, seq, n_embd]`, after `ln_f`.
    pub fn forward(&self, input: &DecoderInput<B>) -> Tensor<B, 3> {
        self.forward_cached(input, None).0
    }

    /// Forward that continues `cache` (or starts one) and returns the grown cache.
    pub fn forward_cached(
        &self,
        input: &DecoderInput<B>,
        cache: Option<DecoderCache<B>>,
    ) -> (Tensor<B, 3>, DecoderCache<B>) {
        let [batch, seq] = input.input_ids.dims();
        let device = input.input_ids.device();
        let past = cache.as_ref().map_or(0, DecoderCache::len);
        let position_ids = match &input.position_ids {
            Some(p) => p.clone(),
            None => positions(batch, seq, past, &device),
        };
        let mut hidden = self.embed(input.input_ids.clone(), position_ids);
        let padding = match &input.attention_mask {
            Some(mask) => AttentionMask::padding(mask.clone()),
            None => AttentionMask::none(),
        };
        let masks = BlockMasks::new(padding, self.local_window, seq, past, &device);

        let mut caches = cache.map(|c| c.layers.into_iter());
        let mut grown = Vec::with_capacity(self.blocks.len());
        for (index, block) in self.blocks.iter().enumerate() {
            let mask = masks.of_block(index);
            let past = caches.as_mut().and_then(Iterator::next);
            let (out, layer_cache) = block.forward(hidden, past, mask);
            hidden = out;
            grown.push(layer_cache);
        }
        (self.ln_f.forward(hidden), DecoderCache { layers: grown })
    }

    /// Token plus position embeddings, then dropout: `[batch, seq]` → `[batch, seq, n_embd]`.
    pub fn embed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        embed(&self.wte, &self.wpe, &self.dropout, input_ids, position_ids)
    }
}

/// `wte(ids) + wpe(positions)`, then dropout (the model's embedding step, and its ZeRO
/// segment's).
pub(crate) fn embed<B: Backend>(
    wte: &Embedding<B>,
    wpe: &Embedding<B>,
    dropout: &Dropout,
    input_ids: Tensor<B, 2, Int>,
    position_ids: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    dropout.forward(wte.forward(input_ids) + wpe.forward(position_ids))
}

/// The attention masks of the blocks: causal everywhere, and GPT-3's locally banded one on odd
/// blocks when the config has `local_attention_window`.
pub(crate) struct BlockMasks<B: Backend> {
    dense: AttentionMask<B>,
    local: Option<AttentionMask<B>>,
}

impl<B: Backend> BlockMasks<B> {
    /// The masks of `seq` new positions after `past`, on top of `padding`.
    pub(crate) fn new(
        padding: AttentionMask<B>,
        local_window: Option<usize>,
        seq: usize,
        past: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            local: local_window.map(|window| {
                padding
                    .clone()
                    .with_local_causal(seq, past + seq, window, device)
            }),
            dense: padding.with_causal(seq, past + seq, device),
        }
    }

    /// Block `index`'s mask (GPT-3's alternating pattern: odd blocks see a band).
    pub(crate) fn of_block(&self, index: usize) -> &AttentionMask<B> {
        match &self.local {
            Some(local) if index % 2 == 1 => local,
            _ => &self.dense,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LM head

/// GPT-2 with its language-model head. HF `GPT2LMHeadModel`.
#[derive(Module, Debug)]
pub struct Gpt2LmHeadModel<B: Backend> {
    /// HF `transformer.*`.
    pub transformer: Gpt2Model<B>,
    /// HF `lm_head`, only when `tie_word_embeddings` is false; otherwise the head is `wte`.
    pub lm_head: Option<Linear<B>>,
}

impl<B: Backend> Gpt2LmHeadModel<B> {
    /// Builds the model from a config.
    pub fn new(config: &Gpt2Config, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            transformer: Gpt2Model::new(config, device)?,
            lm_head: (!config.tie_word_embeddings).then(|| {
                LinearConfig::new(config.n_embd, config.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        })
    }

    /// Hidden states → logits: `[batch, seq, n_embd]` → `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        vocab_logits(hidden, self.lm_head.as_ref(), &self.transformer.wte)
    }

    /// Full-sequence forward: hidden states and logits.
    pub fn forward(&self, input: &DecoderInput<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let hidden = self.transformer.forward(input);
        let logits = self.logits(hidden.clone());
        (hidden, logits)
    }

    /// One generation step: the logits of the last position only (`[batch, vocab]`), and the
    /// grown cache. Projecting only the last position saves `seq − 1` vocabulary-wide products.
    pub fn next_token_logits(
        &self,
        input: &DecoderInput<B>,
        cache: Option<DecoderCache<B>>,
    ) -> (Tensor<B, 2>, DecoderCache<B>) {
        let (hidden, cache) = self.transformer.forward_cached(input, cache);
        (last_position_logits(hidden, |h| self.logits(h)), cache)
    }
}

// ---------------------------------------------------------------------------------------------
// Sequence classification

/// GPT-2 with a linear score (no bias) read at each row's last non-padding token. HF
/// `GPT2ForSequenceClassification`.
#[derive(Module, Debug)]
pub struct Gpt2ForSequenceClassification<B: Backend> {
    /// HF `transformer.*`.
    pub transformer: Gpt2Model<B>,
    /// HF `score`: `[n_embd, num_labels]`.
    pub score: Linear<B>,
    pad_token_id: Option<u32>,
}

impl<B: Backend> Gpt2ForSequenceClassification<B> {
    /// Builds the model from a config (`num_labels` or `id2label`, default 2).
    pub fn new(config: &Gpt2Config, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            transformer: Gpt2Model::new(config, device)?,
            score: LinearConfig::new(config.n_embd, config.labels())
                .with_bias(false)
                .init(device),
            pad_token_id: config.pad_token_id,
        })
    }

    /// Full-sequence forward: hidden states and the logits `[batch, num_labels]` of each row's
    /// last token that is not `pad_token_id`.
    pub fn forward(&self, input: &DecoderInput<B>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let hidden = self.transformer.forward(input);
        let logits = last_token_score(
            &self.score,
            hidden.clone(),
            &input.input_ids,
            self.pad_token_id,
        );
        (hidden, logits)
    }
}

impl<B: Backend> crate::generation::Decoder<B> for Gpt2LmHeadModel<B> {
    type State = DecoderCache<B>;

    fn vocab_size(&self) -> usize {
        self.transformer.vocab_size()
    }

    fn max_positions(&self) -> usize {
        self.transformer.max_positions()
    }

    fn step(
        &self,
        input: &DecoderInput<B>,
        state: Option<Self::State>,
    ) -> (Tensor<B, 2>, Self::State) {
        self.next_token_logits(input, state)
    }

    fn reorder(&self, state: &Self::State, indices: Tensor<B, 1, Int>) -> Self::State {
        state.select(indices)
    }
}

// ---------------------------------------------------------------------------------------------
// The classes as the registry runs them

impl<B: Backend> ModelClass<B> for Gpt2Model<B> {
    type Config = Gpt2Config;
    fn build(config: &Gpt2Config, device: &B::Device) -> Result<Self, ModelError> {
        Gpt2Model::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        ModelOutput::hidden(self.forward(&input.decoder_input()), None)
    }
    fn max_sequence_length(&self) -> usize {
        self.max_positions()
    }
    fn vocab_size(&self) -> usize {
        Gpt2Model::vocab_size(self)
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        Gpt2Model::adaptable(self)
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        crate::io::VocabTables {
            embeddings: vec![&mut self.wte, &mut self.wpe],
            heads: Vec::new(),
        }
    }
}

impl<B: Backend> ModelClass<B> for Gpt2ForSequenceClassification<B> {
    type Config = Gpt2Config;
    fn build(config: &Gpt2Config, device: &B::Device) -> Result<Self, ModelError> {
        Gpt2ForSequenceClassification::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (hidden, logits) = self.forward(&input.decoder_input());
        let mut output = ModelOutput::hidden(hidden, None);
        output.logits = Some(Logits::PerSequence(logits));
        output
    }
    fn max_sequence_length(&self) -> usize {
        self.transformer.max_positions()
    }
    fn vocab_size(&self) -> usize {
        self.transformer.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.transformer.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        self.transformer.vocab_tables()
    }
}

impl<B: Backend> ModelClass<B> for Gpt2LmHeadModel<B> {
    type Config = Gpt2Config;
    fn build(config: &Gpt2Config, device: &B::Device) -> Result<Self, ModelError> {
        Gpt2LmHeadModel::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (hidden, logits) = self.forward(&input.decoder_input());
        ModelOutput::hidden(hidden, Some(logits))
    }
    fn max_sequence_length(&self) -> usize {
        self.transformer.max_positions()
    }
    fn vocab_size(&self) -> usize {
        self.transformer.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.transformer.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        self.transformer.vocab_tables()
    }
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &crate::generation::GenerationConfig,
        device: &B::Device,
        on_tokens: &mut dyn FnMut(&[Option<u32>]),
    ) -> Option<Result<crate::generation::Generated, crate::generation::GenerationError>> {
        Some(crate::generation::generate(
            self, prompts, config, device, on_tokens,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;
    use burn::tensor::TensorData;

    fn tiny(layers: usize) -> Gpt2Config {
        Gpt2Config {
            vocab_size: 13,
            n_positions: 16,
            n_embd: 8,
            n_layer: layers,
            n_head: 2,
            ..Gpt2Config::new()
        }
        .with_dropout(0.0)
    }

    fn ids(rows: &[&[i64]]) -> Tensor<Cpu, 2, Int> {
        let width = rows[0].len();
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(
            TensorData::new(flat, [rows.len(), width]),
            &Default::default(),
        )
    }

    fn floats<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn gpt2_config_defaults_are_transformers_defaults() {
        let config = Gpt2Config::new();
        assert_eq!(
            (config.vocab_size, config.n_positions, config.n_embd),
            (50257, 1024, 768)
        );
        assert_eq!((config.n_layer, config.n_head), (12, 12));
        assert_eq!(config.activation_function, "gelu_new");
        assert!(config.tie_word_embeddings);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let config = Gpt2Config {
            n_embd: 10,
            n_head: 3,
            ..Gpt2Config::new()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("n_head"), "{err}");
        let config = Gpt2Config {
            activation_function: "swish2".into(),
            ..Gpt2Config::new()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("activation_function"), "{err}");
    }

    /// A wide enough band is the dense pattern; a narrow one changes the local blocks' output.
    #[test]
    fn local_attention_with_a_full_window_equals_dense() {
        let device = Default::default();
        let dense = Gpt2LmHeadModel::<Cpu>::new(&tiny(2), &device).unwrap();
        let input = DecoderInput::new(ids(&[&[1, 5, 7, 2, 9, 3]]));
        let want = floats(dense.forward(&input).1);
        let with_window = |window| {
            let mut model = Gpt2LmHeadModel::<Cpu>::new(&tiny(2), &device).unwrap();
            model = model.load_record(dense.clone().into_record());
            model.transformer.local_window = Some(window);
            floats(model.forward(&input).1)
        };
        assert_eq!(with_window(6), want);
        let narrow = with_window(2);
        // Position 0 and 1 see the same keys either way; position 5 does not.
        assert_eq!(narrow[..2 * 13], want[..2 * 13]);
        assert_ne!(narrow[5 * 13..], want[5 * 13..]);
    }

    /// Through a local block, an output depends only on the last `window` tokens.
    #[test]
    fn local_attention_ignores_tokens_outside_the_window() {
        let device = Default::default();
        let model = Gpt2Model::<Cpu>::new(&tiny(1), &device).unwrap();
        let run = |tokens: &[i64]| {
            let input = ids(&[tokens]);
            let positions = Tensor::<Cpu, 1, Int>::arange(0..4, &device).reshape([1, 4]);
            let hidden = model.wte.forward(input) + model.wpe.forward(positions);
            let mask = AttentionMask::none().with_local_causal(4, 4, 2, &device);
            floats(model.blocks[0].forward(hidden, None, &mask).0)
        };
        let a = run(&[1, 5, 7, 2]);
        let b = run(&[9, 4, 7, 2]);
        // Tokens 0 and 1 differ: position 2 (window 1..=2) sees token 1; position 3 (2..=3) does not.
        assert_ne!(a[2 * 8..3 * 8], b[2 * 8..3 * 8]);
        assert_eq!(a[3 * 8..], b[3 * 8..]);
    }

    #[test]
    fn causal_lm_loss_skips_ignored_labels() {
        let device = Default::default();
        // batch 1, seq 3, vocab 2: predictions at t = 0, 1 for labels at t = 1, 2.
        let logits = Tensor::<Cpu, 3>::from_data(
            TensorData::from([[[0.0f32, 1.0], [2.0, 0.0], [5.0, 5.0]]]),
            &device,
        );
        let labels = ids(&[&[0, 1, IGNORE_INDEX]]);
        let got = floats(causal_lm_loss(logits, labels))[0];
        // Only t = 0 → label 1 counts: -log softmax([0, 1])[1].
        let want = -(1f32.exp() / (1.0 + 1f32.exp())).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
