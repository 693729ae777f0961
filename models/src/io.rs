//! What every family reads and how every family is scored: model inputs and outputs, token-id
//! lists of configs, the ignore label and the losses. Families depend on [`crate::layers`] and
//! this module, not on each other.

use bmtrain_backend::kernels;
use burn::tensor::{Int, Tensor, TensorData, activation::log_softmax, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::layers::Embedding;
use crate::layers::{AttentionMask, KvCache, Linear};

// ---------------------------------------------------------------------------------------------
// Inputs and outputs

/// A tokenised batch.
#[derive(Debug, Clone)]
pub struct EncoderInput<B: Backend> {
    /// `[batch, seq]` token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`, 1 for tokens, 0 for padding; no padding when `None`.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// `[batch, seq]` segment ids; zeros when `None`.
    pub token_type_ids: Option<Tensor<B, 2, Int>>,
    /// Encoder-decoder models only: `[batch, tgt]` decoder ids; when `None`, one decoder step from
    /// the start token. Encoder-only and decoder-only models ignore it.
    pub decoder_input_ids: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> EncoderInput<B> {
    /// The batch as a decoder-only model reads it (right padding; `token_type_ids` ignored;
    /// positions counted from 0).
    pub fn decoder_input(&self) -> DecoderInput<B> {
        DecoderInput {
            input_ids: self.input_ids.clone(),
            attention_mask: self.attention_mask.clone(),
            position_ids: None,
        }
    }

    /// The padding mask as attention scores see it.
    pub fn mask(&self) -> AttentionMask<B> {
        match &self.attention_mask {
            Some(mask) => AttentionMask::padding(mask.clone()),
            None => AttentionMask::none(),
        }
    }
}

/// What an encoder model returns.
#[derive(Debug, Clone)]
pub struct EncoderOutput<B: Backend> {
    /// `[batch, seq, hidden]`: the last layer's hidden states.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[batch, hidden]`: the pooler's output, for models built with a pooler.
    pub pooler_output: Option<Tensor<B, 2>>,
}

/// What a decoder-only model reads.
#[derive(Debug, Clone)]
pub struct DecoderInput<B: Backend> {
    /// `[batch, seq]` token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, past + seq]`: 1 for real tokens, 0 for padding (left padding in generation).
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// `[batch, seq]`; `past..past + seq` when absent, as transformers' forward.
    pub position_ids: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> DecoderInput<B> {
    /// Ids only: no padding, positions counted from the cache length.
    pub fn new(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
        }
    }
}

/// Every block's keys and values: what a generation step needs from the steps before.
#[derive(Debug, Clone)]
pub struct DecoderCache<B: Backend> {
    /// One entry per block.
    pub layers: Vec<KvCache<B>>,
}

impl<B: Backend> DecoderCache<B> {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the batch rows `indices`, in that order.
    pub fn select(&self, indices: Tensor<B, 1, Int>) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.select(indices.clone()))
                .collect(),
        }
    }
}

/// Hidden states → logits through an untied `lm_head`, or through the token embeddings `wte`
/// (`[vocab, width]`) when the head is tied (GPT-2, tied Llama-family models).
pub fn vocab_logits<B: Backend>(
    hidden: Tensor<B, 3>,
    lm_head: Option<&Linear<B>>,
    wte: &Embedding<B>,
) -> Tensor<B, 3> {
    match lm_head {
        Some(head) => head.forward(hidden),
        None => wte.tied_logits(hidden),
    }
}

/// The score (`score`, a linear layer) of each row's last non-padding token, as transformers 5
/// picks it for GPT-2's and the Llama family's sequence classifiers: the largest
/// position whose id is not `pad` (position 0 when every id is `pad`), the last position when
/// the config has no `pad_token_id`.
pub fn last_token_score<B: Backend>(
    score: &Linear<B>,
    hidden: Tensor<B, 3>,
    input_ids: &Tensor<B, 2, Int>,
    pad: Option<u32>,
) -> Tensor<B, 2> {
    let [batch, seq, width] = hidden.dims();
    let device = hidden.device();
    let last = match pad {
        Some(pad) => {
            let real = input_ids.clone().not_equal_elem(pad as i64).int();
            let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
                .reshape([1, seq])
                .expand([batch, seq]);
            (positions * real).argmax(1)
        }
        None => Tensor::<B, 2, Int>::full([batch, 1], seq as i64 - 1, &device),
    };
    let picked = hidden.gather(1, last.reshape([batch, 1, 1]).expand([batch, 1, width]));
    score.forward(picked.reshape([batch, width]))
}

/// Positions `past..past + seq` for every row, as transformers counts them without padding.
pub fn positions<B: Backend>(
    batch: usize,
    seq: usize,
    past: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::arange(past as i64..(past + seq) as i64, device)
        .reshape([1, seq])
        .expand([batch, seq])
}

/// One generation step's logits: `logits` of each row's last hidden state only (`[batch,
/// vocab]`), which saves `seq − 1` vocabulary-wide products.
pub fn last_position_logits<B: Backend>(
    hidden: Tensor<B, 3>,
    logits: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [batch, seq, width] = hidden.dims();
    let logits = logits(hidden.slice([0..batch, seq - 1..seq, 0..width]));
    let vocab = logits.dims()[2];
    logits.reshape([batch, vocab])
}

/// A causal LM cut's logits: through its own `lm_head`, or through the token table the head is
/// tied to (the embedding segment the trainer hands a head that reads it).
pub fn head_logits<B: Backend>(
    hidden: Tensor<B, 3>,
    lm_head: Option<&Linear<B>>,
    tied_to: Option<&Embedding<B>>,
) -> Tensor<B, 3> {
    match (lm_head, tied_to) {
        (Some(head), _) => head.forward(hidden),
        (None, Some(table)) => vocab_logits(hidden, None, table),
        (None, None) => unreachable!("a tied head is given the embedding segment"),
    }
}

/// A language model's head as the chunked loss takes it ([`kernels::lm_head_loss`]): a dense
/// linear head or the dense embedding table it is tied to; `None` for a quantized or
/// LoRA-adapted head (whose forward is not one matrix product).
pub(crate) fn dense_head<B: Backend>(
    lm_head: Option<&Linear<B>>,
    tied_to: Option<&Embedding<B>>,
) -> Option<kernels::Head<B>> {
    match (lm_head, tied_to) {
        (Some(head), _) if head.quantized.is_none() && head.lora.is_none() => Some(kernels::Head {
            weight: head.weight.val(),
            layout: kernels::HeadLayout::HiddenByVocab,
            bias: head.bias.as_ref().map(|b| b.val()),
        }),
        (None, Some(table)) if table.codes().is_none() => Some(kernels::Head {
            weight: table.weight.val(),
            layout: kernels::HeadLayout::VocabByHidden,
            bias: None,
        }),
        _ => None,
    }
}

/// One token id or several, as HF configs write `eos_token_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// Token rows for causal-LM training: each row predicts its own next tokens.
#[derive(Debug, Clone)]
pub struct LmBatch<B: Backend> {
    /// `[batch, seq]` token ids (right-padded when rows differ in length: causal attention never
    /// lets a real token see the padding after it).
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]` labels, shifted inside the loss as transformers does, -100 not scored
    /// (prompt tokens, padding); `None`: the ids themselves (pretraining windows).
    pub labels: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> LmBatch<B> {
    /// The causal-LM loss of `logits` against the labels (the ids themselves when there are none).
    pub fn loss(&self, logits: Tensor<B, 3>) -> Tensor<B, 1> {
        causal_lm_loss(
            logits,
            self.labels.as_ref().unwrap_or(&self.input_ids).clone(),
        )
    }
}

impl<B: Backend> LmBatch<B> {
    /// The causal-LM loss of the head over `hidden` (`[batch, seq, width]`): on a GPU backend
    /// in chunks of tokens, never the whole `[tokens, vocab]` logits
    /// ([`kernels::lm_head_loss`]); elsewhere the head's logits and [`LmBatch::loss`].
    pub fn head_loss(
        &self,
        hidden: Tensor<B, 3>,
        lm_head: Option<&Linear<B>>,
        tied_to: Option<&Embedding<B>>,
    ) -> Tensor<B, 1> {
        let [batch, seq, _] = hidden.dims();
        if let Some(head) = dense_head(lm_head, tied_to) {
            // Position t predicts label t + 1; each row's last position predicts nothing.
            let labels = self.labels.as_ref().unwrap_or(&self.input_ids).clone();
            let last = Tensor::full([batch, 1], IGNORE_INDEX, &labels.device());
            let targets = Tensor::cat(vec![labels.slice([0..batch, 1..seq]), last], 1);
            if let Some(loss) = chunked_token_loss(hidden.clone(), head, targets) {
                return loss;
            }
        }
        self.loss(head_logits(hidden, lm_head, tied_to))
    }
}

/// Labelled sequences for classification.
#[derive(Debug, Clone)]
pub struct ClassifierBatch<B: Backend> {
    /// `[batch, seq]` token ids (right-padded).
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<B, 2, Int>,
    /// `[batch, seq]` segment ids of sentence pairs (BERT).
    pub token_type_ids: Option<Tensor<B, 2, Int>>,
    /// `[batch]` class indices.
    pub labels: Tensor<B, 1, Int>,
}

/// A class's token tables and untied output layers ([`ModelClass::vocab_tables`]).
pub struct VocabTables<'a, B: Backend> {
    /// Embedding tables: the token embeddings (a tied head reads them too) and learned
    /// positions.
    pub embeddings: Vec<&'a mut Embedding<B>>,
    /// Untied LM heads.
    pub heads: Vec<&'a mut Linear<B>>,
}

impl<B: Backend> Default for VocabTables<'_, B> {
    fn default() -> Self {
        Self {
            embeddings: Vec::new(),
            heads: Vec::new(),
        }
    }
}

/// What every model class gives the registry's dispatch ([`crate::AnyModel`]), implemented beside
/// the model: how it is built from its family's config and how a command runs it.
pub trait ModelClass<B: Backend>: Sized {
    /// The family's config.
    type Config;
    /// Builds the class from `config` with fresh (lazy) weights.
    fn build(config: &Self::Config, device: &B::Device) -> Result<Self, crate::ModelError>;
    /// Runs the model on a tokenised batch (decoder-only models read `input_ids` and
    /// `attention_mask`, right padding; encoder-decoders also `decoder_input_ids`).
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B>;
    /// The longest input the position table allows (`usize::MAX` without one).
    fn max_sequence_length(&self) -> usize;
    /// Number of token ids the model accepts.
    fn vocab_size(&self) -> usize;
    /// The linear layers a LoRA update may adapt, each under its target name (the family's:
    /// `q_proj` … `down_proj`, `query` … `output`, `q` … `wo`); heads are not listed.
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        Vec::new()
    }
    /// The token tables and untied output layers (`zoo quantize --embeddings` quantizes them
    /// besides the [`ModelClass::adaptable`] layers); empty for classes without that support.
    fn vocab_tables(&mut self) -> VocabTables<'_, B> {
        VocabTables::default()
    }
    /// Generates continuations of `prompts` (a causal LM continues them; an encoder-decoder
    /// reads them and writes new text), calling `on_tokens` as [`crate::generation::generate`]
    /// does; `None` for a class without an LM head.
    fn generate(
        &self,
        _prompts: &[Vec<u32>],
        _config: &crate::generation::GenerationConfig,
        _device: &B::Device,
        _on_tokens: &mut dyn FnMut(&[Option<u32>]),
    ) -> Option<Result<crate::generation::Generated, crate::generation::GenerationError>> {
        None
    }
}

/// What a family's config gives the registry's dispatch ([`crate::ModelConfig`]), implemented
/// beside the config: how it is read from a `config.json` and what the key tables and training jobs
/// ask of it.
pub trait FamilyConfig: Sized + serde::Serialize {
    /// Reads a `config.json` value (fields it leaves out take the family's defaults).
    fn from_hf(value: &serde_json::Value) -> Result<Self, serde_json::Error>;
    /// Checks the config, naming the offending field.
    fn validate(&self) -> Result<(), crate::ModelError>;
    /// Number of (encoder) layers.
    fn num_layers(&self) -> usize;
    /// Number of decoder layers of an encoder-decoder model.
    fn num_decoder_layers(&self) -> usize {
        0
    }
    /// Whether the LM head shares the token embeddings.
    fn tie_word_embeddings(&self) -> bool;
    /// Unties the output head from the token embeddings.
    fn untie_word_embeddings(&mut self);
    /// Whether the feed-forward layers are gated.
    fn gated_ffn(&self) -> bool {
        false
    }
    /// Which optional biases exist, `[q/k/v, attention output, MLP]`, for families where a config
    /// decides (all present elsewhere).
    fn optional_biases(&self) -> [bool; 3] {
        [true; 3]
    }
    /// Whether a checkpoint's own output head unties it although the config says tied.
    fn head_tie_follows_checkpoint(&self) -> bool {
        false
    }
    /// The same config with every dropout probability set to `p`.
    fn with_dropout(self, p: f64) -> Self;
    /// The padding id, when the config names one.
    fn pad_token_id(&self) -> Option<u32>;
    /// Sets the padding id (GPT-2 and Llama classifiers pad with end-of-text, as transformers'
    /// recipes do).
    fn set_pad_token_id(&mut self, id: u32);
    /// Number of token ids the embeddings hold.
    fn vocab_size(&self) -> usize;
    /// The end-of-text ids the config names (the first ends a document), none when it names none.
    fn eos_token_ids(&self) -> Vec<u32>;
    /// The tokenizer tokens that end a document, in the order tried (before the config's ids).
    fn end_of_text_tokens(&self) -> &'static [&'static str];
    /// The longest input the position table allows for `family` (RoBERTa's positions start after
    /// the padding id); `None` where positions are relative or rotary.
    fn max_positions(&self, family: crate::Family) -> Option<usize>;
    /// Sets the number of labels of a sequence-classification head (BERT, RoBERTa, GPT-2, Llama).
    fn set_num_labels(&mut self, labels: usize);
    /// The `model_type` when the config itself carries one (the Llama family's `mistral` /
    /// `qwen2`); others are their family's.
    fn model_type(&self) -> Option<&str> {
        None
    }
    /// `[hidden, ffn, heads]` for activation accounting; a gated feed-forward counts twice its
    /// inner width (both inner projections and their product are kept).
    fn activation_dims(&self) -> [usize; 3];
    /// The config as HF `config.json` fields (without `model_type` / `architectures`, which the
    /// class adds): its serde form, whose field names are HF's.
    fn to_hf(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a config serialises")
    }
}

/// Logits of a head: per token (MLM) or per sequence (classification).
#[derive(Debug, Clone)]
pub enum Logits<B: Backend> {
    /// `[batch, seq, vocab]`.
    PerToken(Tensor<B, 3>),
    /// `[batch, num_labels]`.
    PerSequence(Tensor<B, 2>),
}

/// What [`AnyModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[batch, hidden]`, when the model has a pooler.
    pub pooler_output: Option<Tensor<B, 2>>,
    /// When the model has a head.
    pub logits: Option<Logits<B>>,
    /// Encoder-decoder models: the encoder's output `[batch, src, hidden]` (`last_hidden_state`
    /// is then the decoder's).
    pub encoder_last_hidden_state: Option<Tensor<B, 3>>,
}

impl<B: Backend> ModelOutput<B> {
    /// An encoder's output with its head's logits, if any.
    pub fn encoder(output: EncoderOutput<B>, logits: Option<Logits<B>>) -> Self {
        Self {
            last_hidden_state: output.last_hidden_state,
            pooler_output: output.pooler_output,
            logits,
            encoder_last_hidden_state: None,
        }
    }

    /// Hidden states and, for models with an LM head, per-token logits.
    pub fn hidden(last_hidden_state: Tensor<B, 3>, logits: Option<Tensor<B, 3>>) -> Self {
        Self {
            last_hidden_state,
            pooler_output: None,
            logits: logits.map(Logits::PerToken),
            encoder_last_hidden_state: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Losses

/// The label that [`causal_lm_loss`] skips, as PyTorch's `ignore_index`.
pub const IGNORE_INDEX: i64 = -100;

/// Causal-LM loss as transformers computes it: position `t` predicts label `t + 1`, labels equal to
/// [`IGNORE_INDEX`] (padding, prompts) are skipped, and the loss is the mean over the rest.
///
/// - logits: `[batch, seq, vocab]`, labels: `[batch, seq]` (usually the input ids) → `[1]`
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    // The fused kernel reads every row of the logits in place: each position's target is the next
    // label, and each row's last position is ignored (no slicing copy of the logits).
    let shifted = || {
        host_labels(labels.clone())
            .chunks(seq)
            .flat_map(|row| row[1..].iter().copied().chain([IGNORE_INDEX]))
            .collect()
    };
    let flat = logits.clone().reshape([batch * seq, vocab]);
    if let Some(loss) = kernels::cross_entropy(&flat, shifted, IGNORE_INDEX) {
        return loss;
    }
    let predicting = logits
        .slice([0..batch, 0..seq - 1, 0..vocab])
        .reshape([batch * (seq - 1), vocab]);
    let targets = labels
        .slice([0..batch, 1..seq])
        .reshape([batch * (seq - 1)]);
    token_cross_entropy(predicting, targets, IGNORE_INDEX)
}

/// Mean cross-entropy over the rows whose label is not `ignore`.
///
/// - logits: `[n, vocab]`, labels: `[n]` → `[1]` (0 when every label is ignored)
pub fn token_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    ignore: i64,
) -> Tensor<B, 1> {
    if let Some(loss) = kernels::cross_entropy(&logits, || host_labels(labels.clone()), ignore) {
        return loss;
    }
    let [n, _] = logits.dims();
    let device = logits.device();
    let ignored = labels.clone().equal_elem(ignore);
    // Gather needs a valid index; ignored rows read class 0 and are zeroed below.
    let safe = labels.mask_fill(ignored.clone(), 0).reshape([n, 1]);
    let picked = log_softmax(logits, 1).gather(1, safe).reshape([n]);
    let kept = ignored.bool_not().float();
    let count = kept
        .clone()
        .sum()
        .into_data()
        .to_vec::<f32>()
        .unwrap_or_default()[0];
    let total = (picked * kept).sum().neg();
    total / Tensor::from_data(TensorData::from([count.max(1.0)]), &device)
}

/// The mean cross-entropy of `head` over `hidden` (`[batch, seq, width]`) against `labels`
/// (`[batch, seq]`, [`IGNORE_INDEX`] not scored) in chunks of tokens, on a GPU backend
/// ([`kernels::lm_head_loss`]); `None` elsewhere (the caller computes the logits).
pub(crate) fn chunked_token_loss<B: Backend>(
    hidden: Tensor<B, 3>,
    head: kernels::Head<B>,
    labels: Tensor<B, 2, Int>,
) -> Option<Tensor<B, 1>> {
    let [batch, seq, width] = hidden.dims();
    kernels::lm_head_loss(
        hidden.reshape([batch * seq, width]),
        head,
        labels.reshape([batch * seq]),
        IGNORE_INDEX,
    )
}

/// Labels as host integers, for the fused loss.
fn host_labels<B: Backend, const D: usize>(labels: Tensor<B, D, Int>) -> Vec<i64> {
    labels
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap_or_default()
}

/// Mean cross-entropy of `logits` `[batch, classes]` against `labels` `[batch]`, as
/// `torch.nn.CrossEntropyLoss()`.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let [batch, _] = logits.dims();
    let picked = log_softmax(logits, 1).gather(1, labels.reshape([batch, 1]));
    picked.mean().neg()
}

/// Mean squared error, as `torch.nn.MSELoss()` (a one-label "regression" head).
pub fn mean_squared_error<B: Backend>(
    predictions: Tensor<B, 2>,
    targets: Tensor<B, 2>,
) -> Tensor<B, 1> {
    (predictions - targets).square().mean()
}
