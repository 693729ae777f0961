//! BERT (Devlin et al., 2018), as transformers' `modeling_bert.py`: post-LN encoder layers, learned
//! absolute positions, token types, a tanh pooler over `[CLS]`, and the MLM and classification heads.
//!
//! Reading order: config → embeddings (shared layer) → layer → encoder → pooler → models → heads.
//! RoBERTa (`roberta.rs`) reuses the encoder, pooler and MLM head defined here.

use crate::layers::Embedding;
use crate::layers::{Dropout, DropoutConfig};
use crate::layers::{Linear, LinearConfig};
use burn::module::{Initializer, Module, Param};
use burn::tensor::{Int, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

pub mod zero;

use crate::ModelError;
/// The inputs and losses every family shares, also reachable here (they began in this file).
pub use crate::io::{EncoderInput, EncoderOutput, cross_entropy, mean_squared_error};
use crate::io::{Logits, ModelClass, ModelOutput};
use crate::layers::{
    Activation, AttentionMask, Embeddings, EmbeddingsConfig, FeedForward, FeedForwardConfig,
    LayerNorm, LayerNormConfig, MultiHeadAttention, MultiHeadAttentionConfig,
};

// ---------------------------------------------------------------------------------------------
// Config

/// BERT's `config.json`, with transformers' field names and defaults. RoBERTa uses the same schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Number of encoder layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Inner width of the feed-forward layers.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Feed-forward activation (`"gelu"` is the erf GELU).
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Dropout on embeddings and sublayer outputs.
    #[serde(default = "defaults::dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "defaults::dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Size of the learned position table.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "defaults::type_vocab_size")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token (RoBERTa derives position ids from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<usize>,
    /// Only `"absolute"` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// Dropout before the classifier; `hidden_dropout_prob` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_dropout: Option<f64>,
    /// Number of labels of a classification head, when the config says it directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Label names by id; its length is the number of labels when `num_labels` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<serde_json::Map<String, serde_json::Value>>,
    /// `"regression"`, `"single_label_classification"` or `"multi_label_classification"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem_type: Option<String>,
    /// Whether the MLM decoder shares the word embeddings (zoo supports only `true`).
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    /// A BERT used as a decoder (causal, cross-attention) is not supported.
    #[serde(default)]
    pub is_decoder: bool,
}

mod defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn hidden_act() -> String {
        "gelu".into()
    }
    pub fn dropout() -> f64 {
        0.1
    }
    pub fn max_position_embeddings() -> usize {
        512
    }
    pub fn type_vocab_size() -> usize {
        2
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn yes() -> bool {
        true
    }
}

impl BertConfig {
    /// A config with transformers' defaults for everything but the vocabulary size.
    pub fn new(vocab_size: usize) -> Self {
        serde_json::from_value(serde_json::json!({ "vocab_size": vocab_size }))
            .expect("a config with only vocab_size is valid")
    }

    /// Checks what serde cannot: sizes that fit together and features zoo does not implement.
    pub fn validate(&self) -> Result<(), ModelError> {
        let field = |name: &str, message: String| Err(ModelError::config(name, message));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return field(name, "must be greater than 0".into());
            }
        }
        crate::check_blocks("num_hidden_layers", self.num_hidden_layers)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return field(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        self.activation()?;
        if let Some(kind) = &self.position_embedding_type
            && kind != "absolute"
        {
            return field(
                "position_embedding_type",
                format!("'{kind}' is not supported (only 'absolute')"),
            );
        }
        if self.is_decoder {
            return field("is_decoder", "BERT as a decoder is not supported".into());
        }
        if !self.tie_word_embeddings {
            return field(
                "tie_word_embeddings",
                "an MLM decoder untied from the word embeddings is not supported".into(),
            );
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("classifier_dropout", self.classifier_dropout.unwrap_or(0.0)),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return field(name, format!("{p} is not a probability"));
            }
        }
        Ok(())
    }

    /// The feed-forward activation.
    pub fn activation(&self) -> Result<Activation, ModelError> {
        Activation::from_hf(&self.hidden_act)
            .map_err(|e| ModelError::config("hidden_act", e.to_string()))
    }

    /// Number of labels of a classification head: `num_labels`, else `id2label`'s size, else 2.
    pub fn labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(2)
    }

    /// Sets every dropout probability to `p` (0 makes training deterministic, as in parity tests).
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.hidden_dropout_prob = p;
        self.attention_probs_dropout_prob = p;
        self.classifier_dropout = Some(p);
        self
    }

    fn embeddings(&self) -> EmbeddingsConfig {
        EmbeddingsConfig::new(self.vocab_size, self.hidden_size)
            .with_max_positions(Some(self.max_position_embeddings))
            .with_type_vocab_size(Some(self.type_vocab_size))
            .with_layer_norm_eps(Some(self.layer_norm_eps))
            .with_dropout(self.hidden_dropout_prob)
    }

    fn layer_norm(&self) -> LayerNormConfig {
        LayerNormConfig::new(self.hidden_size).with_epsilon(self.layer_norm_eps)
    }

    /// Dropout before the classifier: `classifier_dropout`, else `hidden_dropout_prob`.
    pub fn classifier_dropout(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}

impl crate::io::FamilyConfig for BertConfig {
    fn from_hf(value: &serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value.clone())
    }
    fn validate(&self) -> Result<(), ModelError> {
        BertConfig::validate(self)
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }
    fn untie_word_embeddings(&mut self) {
        self.tie_word_embeddings = false;
    }
    fn with_dropout(self, p: f64) -> Self {
        BertConfig::with_dropout(self, p)
    }
    fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id.map(|id| id as u32)
    }
    fn set_pad_token_id(&mut self, id: u32) {
        self.pad_token_id = Some(id as usize);
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        Vec::new()
    }
    /// Documents are separated as BERT's sentence pairs are.
    fn end_of_text_tokens(&self) -> &'static [&'static str] {
        &["[SEP]", "</s>", "<|endoftext|>"]
    }
    /// RoBERTa's positions start after the padding id, so two fewer fit (transformers'
    /// `create_position_ids_from_input_ids`).
    fn max_positions(&self, family: crate::Family) -> Option<usize> {
        Some(match family {
            crate::Family::Roberta => self
                .max_position_embeddings
                .saturating_sub(self.pad_token_id.unwrap_or(1) + 1),
            _ => self.max_position_embeddings,
        })
    }
    fn set_num_labels(&mut self, labels: usize) {
        self.num_labels = Some(labels);
    }
    fn activation_dims(&self) -> [usize; 3] {
        [
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs and outputs

// ---------------------------------------------------------------------------------------------
// Encoder

/// One post-LN encoder layer: `x = norm(x + attn(x))`, `x = norm(x + ffn(x))`.
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// Self-attention (HF `attention.self.*` + `attention.output.dense`).
    pub attention: MultiHeadAttention<B>,
    /// HF `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm<B>,
    /// HF `intermediate.dense` + `output.dense`.
    pub ffn: FeedForward<B>,
    /// HF `output.LayerNorm`.
    pub ffn_norm: LayerNorm<B>,
    dropout: Dropout,
}

impl<B: Backend> BertLayer<B> {
    /// - hidden: `[batch, seq, hidden]` → same shape
    pub fn forward(&self, hidden: Tensor<B, 3>, mask: &AttentionMask<B>) -> Tensor<B, 3> {
        let attended = self
            .dropout
            .forward(self.attention.forward(hidden.clone(), mask));
        let hidden = self.attention_norm.forward(hidden + attended);
        let transformed = self.dropout.forward(self.ffn.forward(hidden.clone()));
        self.ffn_norm.forward(hidden + transformed)
    }
}

/// The stack of encoder layers.
#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    /// The layers, in order (HF `encoder.layer.N`).
    pub layers: Vec<BertLayer<B>>,
}

impl<B: Backend> BertEncoder<B> {
    /// Every layer's linear layers: `query`, `key`, `value`, `attention_output` (HF
    /// `attention.output.dense`), `intermediate` (`intermediate.dense`), `output`
    /// (`output.dense`).
    pub fn adaptable(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            out.extend(layer.attention.named_projections([
                "query",
                "key",
                "value",
                "attention_output",
            ]));
            out.extend(
                layer
                    .ffn
                    .named_linears(["intermediate", "intermediate", "output"]),
            );
        }
        out
    }

    /// Builds `config.num_hidden_layers` layers.
    pub fn new(config: &BertConfig, device: &B::Device) -> Result<Self, ModelError> {
        let activation = config.activation()?;
        let layer = || BertLayer {
            attention: MultiHeadAttentionConfig::new(
                config.hidden_size,
                config.num_attention_heads,
            )
            .with_dropout(config.attention_probs_dropout_prob)
            .init(device),
            attention_norm: config.layer_norm().init(device),
            ffn: FeedForwardConfig::new(config.hidden_size, config.intermediate_size, activation)
                .init(device),
            ffn_norm: config.layer_norm().init(device),
            dropout: DropoutConfig::new(config.hidden_dropout_prob).init(),
        };
        Ok(Self {
            layers: (0..config.num_hidden_layers).map(|_| layer()).collect(),
        })
    }

    /// - hidden: `[batch, seq, hidden]` → same shape
    pub fn forward(&self, mut hidden: Tensor<B, 3>, mask: &AttentionMask<B>) -> Tensor<B, 3> {
        for layer in &self.layers {
            hidden = layer.forward(hidden, mask);
        }
        hidden
    }
}

/// `tanh(dense(hidden[:, 0]))`: the `[CLS]` summary used by BERT's classification head.
#[derive(Module, Debug)]
pub struct BertPooler<B: Backend> {
    /// `[hidden, hidden]`.
    pub dense: Linear<B>,
}

impl<B: Backend> BertPooler<B> {
    /// Builds the pooler.
    pub fn new(config: &BertConfig, device: &B::Device) -> Self {
        Self {
            dense: LinearConfig::new(config.hidden_size, config.hidden_size).init(device),
        }
    }

    /// - hidden: `[batch, seq, hidden]` → `[batch, hidden]`
    pub fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        self.dense.forward(first_token(hidden)).tanh()
    }
}

/// `hidden[:, 0, :]`.
pub(crate) fn first_token<B: Backend>(hidden: Tensor<B, 3>) -> Tensor<B, 2> {
    let [batch, _, width] = hidden.dims();
    hidden.narrow(1, 0, 1).reshape([batch, width])
}

// ---------------------------------------------------------------------------------------------
// Models

/// BERT's encoder: embeddings, layers and (optionally) the pooler. HF `BertModel`.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    /// Word + position + token-type embeddings, LayerNorm, dropout.
    pub embeddings: Embeddings<B>,
    /// The layers.
    pub encoder: BertEncoder<B>,
    /// Present in `BertModel` and `BertForSequenceClassification`, absent under the MLM head.
    pub pooler: Option<BertPooler<B>>,
}

impl<B: Backend> BertModel<B> {
    /// Builds the model with freshly initialised weights (lazily: nothing is allocated until used
    /// or loaded).
    pub fn new(
        config: &BertConfig,
        with_pooler: bool,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            embeddings: config.embeddings().init(device),
            encoder: BertEncoder::new(config, device)?,
            pooler: with_pooler.then(|| BertPooler::new(config, device)),
        })
    }

    /// Runs the encoder.
    pub fn forward(&self, input: &EncoderInput<B>) -> EncoderOutput<B> {
        let embedded =
            self.embeddings
                .forward(input.input_ids.clone(), None, input.token_type_ids.clone());
        let last_hidden_state = self.encoder.forward(embedded, &input.mask());
        let pooler_output = self
            .pooler
            .as_ref()
            .map(|p| p.forward(last_hidden_state.clone()));
        EncoderOutput {
            last_hidden_state,
            pooler_output,
        }
    }
}

/// The MLM head: `norm(act(transform(h))) · word_embeddingsᵀ + bias`. The decoder weight is the
/// word embedding table itself (tied), so it has no parameter of its own.
#[derive(Module, Debug)]
pub struct MlmHead<B: Backend> {
    /// HF `cls.predictions.transform.dense` / RoBERTa `lm_head.dense`.
    pub transform: Linear<B>,
    /// HF `cls.predictions.transform.LayerNorm` / RoBERTa `lm_head.layer_norm`.
    pub norm: LayerNorm<B>,
    /// `[vocab]`, HF `cls.predictions.bias` / RoBERTa `lm_head.bias`.
    pub bias: Param<Tensor<B, 1>>,
    #[module(skip)]
    activation: Activation,
}

impl<B: Backend> MlmHead<B> {
    /// Builds the head; RoBERTa passes GELU whatever `hidden_act` says, as transformers does.
    pub fn new(config: &BertConfig, activation: Activation, device: &B::Device) -> Self {
        Self {
            transform: LinearConfig::new(config.hidden_size, config.hidden_size).init(device),
            norm: config.layer_norm().init(device),
            bias: Initializer::Zeros.init([config.vocab_size], device),
            activation,
        }
    }

    /// - hidden: `[batch, seq, hidden]` → logits `[batch, seq, vocab]`
    pub fn forward(&self, hidden: Tensor<B, 3>, word_embeddings: &Embedding<B>) -> Tensor<B, 3> {
        word_embeddings.tied_logits(self.features(hidden)) + self.bias.val().unsqueeze::<3>()
    }

    /// The transform before the vocabulary projection (dense, activation, layer norm), same
    /// shape.
    pub fn features(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.norm
            .forward(self.activation.forward(self.transform.forward(hidden)))
    }

    /// The masked-LM loss against `labels` (`[batch, seq]`, -100 not scored): on a GPU backend
    /// in chunks of tokens, never the whole `[tokens, vocab]` logits
    /// ([`bmtrain_backend::kernels::lm_head_loss`]); elsewhere the logits' cross-entropy.
    pub fn loss(
        &self,
        hidden: Tensor<B, 3>,
        word_embeddings: &Embedding<B>,
        labels: Tensor<B, 2, Int>,
    ) -> Tensor<B, 1> {
        let features = self.features(hidden);
        if let Some(mut head) = crate::io::dense_head(None, Some(word_embeddings)) {
            head.bias = Some(self.bias.val());
            let loss = crate::io::chunked_token_loss(features.clone(), head, labels.clone());
            if let Some(loss) = loss {
                return loss;
            }
        }
        let logits = word_embeddings.tied_logits(features) + self.bias.val().unsqueeze::<3>();
        let [rows, seq, vocab] = logits.dims();
        crate::io::token_cross_entropy(
            logits.reshape([rows * seq, vocab]),
            labels.reshape([rows * seq]),
            crate::io::IGNORE_INDEX,
        )
    }
}

/// BERT with the masked-LM head. HF `BertForMaskedLM` (no pooler).
#[derive(Module, Debug)]
pub struct BertForMaskedLM<B: Backend> {
    /// The encoder (HF `bert.*`).
    pub bert: BertModel<B>,
    /// HF `cls.predictions.*`.
    pub lm_head: MlmHead<B>,
}

impl<B: Backend> BertForMaskedLM<B> {
    /// Builds the model with freshly initialised weights.
    pub fn new(config: &BertConfig, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            bert: BertModel::new(config, false, device)?,
            lm_head: MlmHead::new(config, config.activation()?, device),
        })
    }

    /// Returns the encoder output and the logits `[batch, seq, vocab]`.
    pub fn forward(&self, input: &EncoderInput<B>) -> (EncoderOutput<B>, Tensor<B, 3>) {
        let output = self.bert.forward(input);
        let logits = self
            .lm_head
            .forward(output.last_hidden_state.clone(), &self.bert.embeddings.word);
        (output, logits)
    }
}

/// BERT with a linear classifier over the pooled `[CLS]`. HF `BertForSequenceClassification`.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification<B: Backend> {
    /// The encoder, with its pooler (HF `bert.*`).
    pub bert: BertModel<B>,
    /// HF `classifier`: `[hidden, num_labels]`.
    pub classifier: Linear<B>,
    dropout: Dropout,
}

impl<B: Backend> BertForSequenceClassification<B> {
    /// Builds the model with `config.labels()` outputs.
    pub fn new(config: &BertConfig, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            bert: BertModel::new(config, true, device)?,
            classifier: LinearConfig::new(config.hidden_size, config.labels()).init(device),
            dropout: DropoutConfig::new(config.classifier_dropout()).init(),
        })
    }

    /// Returns the encoder output and the logits `[batch, num_labels]`.
    pub fn forward(&self, input: &EncoderInput<B>) -> (EncoderOutput<B>, Tensor<B, 2>) {
        let output = self.bert.forward(input);
        let pooled = output.pooler_output.clone().expect("built with a pooler");
        let logits = self.classifier.forward(self.dropout.forward(pooled));
        (output, logits)
    }
}

// ---------------------------------------------------------------------------------------------
// The classes as the registry runs them

impl<B: Backend> ModelClass<B> for BertModel<B> {
    type Config = BertConfig;
    fn build(config: &BertConfig, device: &B::Device) -> Result<Self, ModelError> {
        BertModel::new(config, true, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        ModelOutput::encoder(self.forward(input), None)
    }
    fn max_sequence_length(&self) -> usize {
        self.embeddings.max_positions().unwrap_or(usize::MAX)
    }
    fn vocab_size(&self) -> usize {
        self.embeddings.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.encoder.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        crate::io::VocabTables {
            embeddings: vec![&mut self.embeddings.word],
            heads: Vec::new(),
        }
    }
}

impl<B: Backend> ModelClass<B> for BertForMaskedLM<B> {
    type Config = BertConfig;
    fn build(config: &BertConfig, device: &B::Device) -> Result<Self, ModelError> {
        BertForMaskedLM::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (output, logits) = self.forward(input);
        ModelOutput::encoder(output, Some(Logits::PerToken(logits)))
    }
    fn max_sequence_length(&self) -> usize {
        self.bert.max_sequence_length()
    }
    fn vocab_size(&self) -> usize {
        self.bert.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.bert.encoder.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        self.bert.vocab_tables()
    }
}

impl<B: Backend> ModelClass<B> for BertForSequenceClassification<B> {
    type Config = BertConfig;
    fn build(config: &BertConfig, device: &B::Device) -> Result<Self, ModelError> {
        BertForSequenceClassification::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (output, logits) = self.forward(input);
        ModelOutput::encoder(output, Some(Logits::PerSequence(logits)))
    }
    fn max_sequence_length(&self) -> usize {
        self.bert.max_sequence_length()
    }
    fn vocab_size(&self) -> usize {
        self.bert.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.bert.encoder.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        self.bert.vocab_tables()
    }
}

/// Whole-word masking as transformers' `DataCollatorForWholeWordMask`: the words of `ids` (a
/// token and the `##` pieces after it, `continues(id)` telling which ids continue a word) are
/// taken in random order while their tokens fit in `max(1, round(len · probability))`, every
/// token of a taken word is chosen, and chosen tokens are then replaced 80% / 10% / 10% as
/// [`mlm_mask`] does. Special tokens are never chosen.
pub fn whole_word_mask(
    ids: &[u32],
    is_special: impl Fn(u32) -> bool,
    continues: impl Fn(u32) -> bool,
    mask_id: u32,
    vocab_size: usize,
    probability: f64,
    rng: &mut impl rand::Rng,
) -> (Vec<u32>, Vec<i64>) {
    use rand::RngExt;
    use rand::seq::SliceRandom;
    let mut words: Vec<Vec<usize>> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        if is_special(id) {
            continue;
        }
        match words.last_mut() {
            Some(word) if continues(id) && word.last() == Some(&(i - 1)) => word.push(i),
            _ => words.push(vec![i]),
        }
    }
    words.shuffle(rng);
    let budget = ((ids.len() as f64 * probability).round() as usize).max(1);
    let mut chosen = vec![false; ids.len()];
    let mut covered = 0;
    for word in words {
        if covered >= budget {
            break;
        }
        if covered + word.len() > budget {
            continue;
        }
        covered += word.len();
        for i in word {
            chosen[i] = true;
        }
    }
    let mut inputs = ids.to_vec();
    let mut labels = vec![crate::io::IGNORE_INDEX; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if !chosen[i] {
            continue;
        }
        labels[i] = i64::from(id);
        if rng.random_bool(0.8) {
            inputs[i] = mask_id;
        } else if rng.random_bool(0.5) {
            inputs[i] = rng.random_range(0..vocab_size as u32);
        }
    }
    (inputs, labels)
}

/// Masked-LM corruption as transformers' `DataCollatorForLanguageModeling` (`mlm_probability`
/// 0.15): each token that is not special is chosen with probability `probability`; a chosen
/// token becomes `mask_id` with probability 0.8, a uniformly random id below `vocab_size` with
/// probability 0.1, and stays itself otherwise. Returns the corrupted ids and the labels (the
/// original id where chosen, -100 elsewhere).
pub fn mlm_mask(
    ids: &[u32],
    is_special: impl Fn(u32) -> bool,
    mask_id: u32,
    vocab_size: usize,
    probability: f64,
    rng: &mut impl rand::Rng,
) -> (Vec<u32>, Vec<i64>) {
    use rand::RngExt;
    let mut inputs = ids.to_vec();
    let mut labels = vec![crate::io::IGNORE_INDEX; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if is_special(id) || !rng.random_bool(probability) {
            continue;
        }
        labels[i] = i64::from(id);
        if rng.random_bool(0.8) {
            inputs[i] = mask_id;
        } else if rng.random_bool(0.5) {
            inputs[i] = rng.random_range(0..vocab_size as u32);
        }
    }
    (inputs, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;
    use burn::tensor::{Int, TensorData};

    #[test]
    fn mlm_masking_chooses_15_percent_and_splits_them_80_10_10() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let ids: Vec<u32> = (0..200_000).map(|i| 10 + (i % 90) as u32).collect();
        // Id 10 is special: never chosen.
        let (inputs, labels) = mlm_mask(&ids, |id| id == 10, 3, 100, 0.15, &mut rng);
        let chosen: Vec<usize> = (0..ids.len()).filter(|&i| labels[i] >= 0).collect();
        assert!(
            chosen
                .iter()
                .all(|&i| ids[i] != 10 && labels[i] == i64::from(ids[i]))
        );
        let share = |n: usize, of: usize| n as f64 / of as f64;
        let specials = ids.iter().filter(|&&id| id == 10).count();
        assert!((share(chosen.len(), ids.len() - specials) - 0.15).abs() < 0.005);
        let masked = chosen.iter().filter(|&&i| inputs[i] == 3).count();
        let kept = chosen.iter().filter(|&&i| inputs[i] == ids[i]).count();
        // Random replacements may draw the id itself (1 in 100) or the mask id (1 in 100).
        assert!(
            (share(masked, chosen.len()) - 0.801).abs() < 0.01,
            "{masked}"
        );
        assert!((share(kept, chosen.len()) - 0.101).abs() < 0.01, "{kept}");
        // Unchosen tokens are untouched.
        assert!((0..ids.len()).all(|i| labels[i] >= 0 || inputs[i] == ids[i]));
    }

    #[test]
    fn whole_word_masking_takes_every_piece_of_a_word_or_none() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Ids ≥ 100 are `##` pieces; 1 is special. Words: [10 100 101] [11] [12 102] …
        let ids: Vec<u32> = (0..4000)
            .flat_map(|w| match w % 3 {
                0 => vec![10, 100, 101],
                1 => vec![11],
                _ => vec![12, 102],
            })
            .chain([1])
            .collect();
        let (inputs, labels) =
            whole_word_mask(&ids, |id| id == 1, |id| id >= 100, 3, 200, 0.15, &mut rng);
        let chosen = |i: usize| labels[i] >= 0;
        // A piece is chosen exactly when the token that starts its word is.
        for (i, &id) in ids.iter().enumerate().skip(1) {
            if id >= 100 {
                assert_eq!(chosen(i), chosen(i - 1), "position {i}");
            }
        }
        assert!(!chosen(ids.len() - 1), "special tokens are never chosen");
        let count = (0..ids.len()).filter(|&i| chosen(i)).count();
        assert_eq!(count, (ids.len() as f64 * 0.15).round() as usize);
        let masked = (0..ids.len())
            .filter(|&i| chosen(i) && inputs[i] == 3)
            .count();
        assert!(
            (masked as f64 / count as f64 - 0.8).abs() < 0.03,
            "{masked} of {count}"
        );
    }

    #[test]
    fn config_defaults_are_transformers_defaults() {
        let config = BertConfig::new(30522);
        assert_eq!(
            (
                config.hidden_size,
                config.num_hidden_layers,
                config.intermediate_size
            ),
            (768, 12, 3072)
        );
        assert_eq!(config.layer_norm_eps, 1e-12);
        assert_eq!(config.labels(), 2);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut config = BertConfig::new(100);
        config.num_attention_heads = 5;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
        let mut config = BertConfig::new(100);
        config.position_embedding_type = Some("relative_key".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("relative_key"), "{err}");
    }

    #[test]
    fn cross_entropy_matches_the_formula() {
        let device = Default::default();
        let logits = Tensor::<Cpu, 2>::from_data(
            TensorData::from([[1.0f32, 2.0, 0.5], [0.0, 0.0, 3.0]]),
            &device,
        );
        let labels = Tensor::<Cpu, 1, Int>::from_data(TensorData::from([1i64, 0]), &device);
        let got: f32 = cross_entropy(logits, labels).into_scalar();
        let lse = |xs: [f64; 3]| xs.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = ((lse([1.0, 2.0, 0.5]) - 2.0) + (lse([0.0, 0.0, 3.0]) - 0.0)) / 2.0;
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }
}
