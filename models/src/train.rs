//! How each trainable family runs under the ZeRO trainer ([`bmtrain_backend::trainer`]): its cut
//! into an embedding segment, blocks and a head, and the loss.
//!
//! Segment prefixes are the model's zoo names, so a trainer checkpoint's `model.safetensors` holds
//! exactly the tensors of the full model (`zoo convert --to-hf` and every command read it beside a
//! `zoo.json`).
//!
//! - [`Gpt2Spec`]: `GPT2LMHeadModel` (GPT-2, the GPT-3 sizes, CPM-1) with the causal-LM loss; the
//!   LM head tied to `wte` reads the embedding segment ([`ZeroSpec::head_reads_embed`]).
//! - [`ClassifierSpec`]: `BertForSequenceClassification` and `RobertaForSequenceClassification`
//!   with the cross-entropy over labels.

use std::collections::BTreeMap;

use crate::ModelError;
use crate::layers::Linear;
use crate::layers::{Dropout, DropoutConfig};
use bmtrain_backend::trainer::{SegmentId, ZeroSpec};
use bmtrain_backend::zero::{FlatEntry, FlatLayout};
use burn::module::Module;
use burn::nn::Embedding;
use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::bert::{
    BertConfig, BertForMaskedLM, BertForSequenceClassification, BertLayer, BertPooler, MlmHead,
    cross_entropy,
};
use crate::gpt2::{Gpt2Block, Gpt2LmHeadModel, causal_lm_loss};
use crate::layers::{AttentionMask, Embeddings, LayerNorm};
use crate::roberta::{
    RobertaClassificationHead, RobertaForMaskedLM, RobertaForSequenceClassification, position_ids,
};

// ---------------------------------------------------------------------------------------------
// GPT-2

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

/// GPT-2's embedding segment: token and position tables (HF `transformer.wte`, `transformer.wpe`).
#[derive(Module, Debug)]
pub struct Gpt2Embedding<B: Backend> {
    /// HF `transformer.wte`; the LM head when tied.
    pub wte: Embedding<B>,
    /// HF `transformer.wpe`.
    pub wpe: Embedding<B>,
    dropout: Dropout,
}

/// The final LayerNorm, under its zoo name `transformer.ln_f`.
#[derive(Module, Debug)]
pub struct Gpt2FinalNorm<B: Backend> {
    /// HF `transformer.ln_f`.
    pub ln_f: LayerNorm<B>,
}

/// GPT-2's head segment: the final norm and, when untied, the LM head.
#[derive(Module, Debug)]
pub struct Gpt2Head<B: Backend> {
    /// `transformer.ln_f` (named so that the segment's prefix can be empty).
    pub transformer: Gpt2FinalNorm<B>,
    /// HF `lm_head`, only when `tie_word_embeddings` is false.
    pub lm_head: Option<Linear<B>>,
}

/// `GPT2LMHeadModel` as ZeRO segments.
#[derive(Debug, Clone)]
pub struct Gpt2Spec {
    local_window: Option<usize>,
    tied: bool,
}

impl Gpt2Spec {
    /// Cuts a model into the spec and its segments.
    pub fn split<B: Backend>(
        model: Gpt2LmHeadModel<B>,
    ) -> (Self, Gpt2Embedding<B>, Vec<Gpt2Block<B>>, Gpt2Head<B>) {
        let transformer = model.transformer;
        let spec = Self {
            local_window: transformer.local_window,
            tied: model.lm_head.is_none(),
        };
        let embed = Gpt2Embedding {
            wte: transformer.wte,
            wpe: transformer.wpe,
            dropout: transformer.dropout,
        };
        let head = Gpt2Head {
            transformer: Gpt2FinalNorm {
                ln_f: transformer.ln_f,
            },
            lm_head: model.lm_head,
        };
        (spec, embed, transformer.blocks, head)
    }
}

impl<B: Backend> ZeroSpec<B> for Gpt2Spec {
    type Embed = Gpt2Embedding<B>;
    type Block = Gpt2Block<B>;
    type Head = Gpt2Head<B>;
    type Batch = LmBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        let [rows, seq] = batch.input_ids.dims();
        let device = batch.input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .expand([rows, seq]);
        let hidden = module.wte.forward(batch.input_ids.clone()) + module.wpe.forward(positions);
        module.dropout.forward(hidden)
    }

    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        _batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        let seq = hidden.dims()[1];
        let device = hidden.device();
        // GPT-3's alternating pattern: odd blocks see a band of the last W positions.
        let mask = match self.local_window {
            Some(window) if index % 2 == 1 => {
                AttentionMask::none().with_local_causal(seq, seq, window, &device)
            }
            _ => AttentionMask::none().with_causal(seq, seq, &device),
        };
        module.forward(hidden, None, &mask).0
    }

    fn loss(
        &self,
        module: &Self::Head,
        embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        let hidden = module.transformer.ln_f.forward(hidden);
        let logits = match (&module.lm_head, embed) {
            (Some(head), _) => head.forward(hidden),
            (None, Some(embed)) => {
                let [rows, seq, width] = hidden.dims();
                let table = embed.wte.weight.val(); // [vocab, n_embd]
                let vocab = table.dims()[0];
                hidden
                    .reshape([rows * seq, width])
                    .matmul(table.transpose())
                    .reshape([rows, seq, vocab])
            }
            (None, None) => unreachable!("a tied head is given the embedding segment"),
        };
        let labels = batch.labels.as_ref().unwrap_or(&batch.input_ids);
        causal_lm_loss(logits, labels.clone())
    }

    fn head_reads_embed(&self) -> bool {
        self.tied
    }

    fn prefix(&self, segment: SegmentId) -> String {
        match segment {
            SegmentId::Embed => "transformer".into(),
            SegmentId::Block(i) => format!("transformer.blocks.{i}"),
            SegmentId::Head => String::new(),
        }
    }
}

/// What a parameter is, from the module that holds it and its field name — not from where it
/// sits in the model, so an RMSNorm scale called `weight` starts at one like a LayerNorm's
/// `gamma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A norm's scale (LayerNorm `gamma`, RMSNorm `weight`): starts at 1.
    NormScale,
    /// A norm's shift or any bias: starts at 0.
    Bias,
    /// An embedding table.
    Embedding,
    /// A weight matrix (or anything else drawn from a normal).
    Matrix,
}

impl ParamKind {
    /// The kind of a layout entry (its holder's type and the field, the last part of its name).
    pub fn of(entry: &FlatEntry) -> Self {
        let field = entry.name.rsplit('.').next().unwrap_or_default();
        match (entry.owner.as_str(), field) {
            ("LayerNorm" | "RmsNorm", "gamma" | "weight") => Self::NormScale,
            (_, "beta" | "bias") => Self::Bias,
            ("Embedding", _) => Self::Embedding,
            _ => Self::Matrix,
        }
    }
}

/// How a family's parameters start when no checkpoint gives them (transformers'
/// `_init_weights`). Norm scales start at 1 and biases at 0 ([`ParamKind`]); the family says the
/// standard deviation of each matrix and embedding. Every parameter is drawn from the seed and
/// its own name alone, so it starts the same whatever segment holds it, whichever other
/// parameters the model has and however many ranks train it; the draws run on all threads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitScheme {
    /// GPT-2 (transformers' `GPT2PreTrainedModel._init_weights`, nanoGPT): every weight matrix
    /// and embedding `N(0, 0.02)`, the two residual projections of each block
    /// (`attention.output`, `mlp.output`) `N(0, 0.02 / √(2 · n_layer))`.
    Gpt2 {
        /// Blocks, for the residual scaling.
        n_layer: usize,
    },
    /// BERT and RoBERTa (`BertPreTrainedModel._init_weights`): weights and embeddings
    /// `N(0, 0.02)`.
    Bert,
    /// T5 and its descendants (`T5PreTrainedModel._init_weights`, factor 1): `shared` and
    /// `lm_head` `N(0, 1)`; attention queries `N(0, (d_model · d_kv)^-½)`, keys, values and the
    /// relative-position tables `N(0, d_model^-½)`, outputs `N(0, (heads · d_kv)^-½)`; FFN inputs
    /// (and gates) `N(0, d_model^-½)`, outputs `N(0, d_ff^-½)`.
    T5 {
        /// `d_model`.
        d_model: usize,
        /// `d_kv` (per-head width).
        d_kv: usize,
        /// `num_heads`.
        heads: usize,
        /// `d_ff`.
        d_ff: usize,
    },
}

/// Elements drawn from one generator: the unit of parallel initialisation.
const INIT_CHUNK: usize = 1 << 16;

impl InitScheme {
    /// The standard deviation of the matrix or embedding named `name`.
    fn std(&self, name: &str) -> f64 {
        match *self {
            InitScheme::Gpt2 { n_layer }
                if name.ends_with("attention.output.weight")
                    || name.ends_with("mlp.output.weight") =>
            {
                0.02 / (2.0 * n_layer as f64).sqrt()
            }
            InitScheme::Gpt2 { .. } | InitScheme::Bert => 0.02,
            InitScheme::T5 {
                d_model,
                d_kv,
                heads,
                d_ff,
            } => {
                let inverse_root = |n: usize| (n as f64).powf(-0.5);
                let attention = name.contains("attention.");
                if name.ends_with("position_bias.weight") {
                    inverse_root(d_model)
                } else if attention && name.ends_with("query.weight") {
                    inverse_root(d_model * d_kv)
                } else if attention && name.ends_with("output.weight") {
                    inverse_root(heads * d_kv)
                } else if attention {
                    inverse_root(d_model)
                } else if name.ends_with("ffn.output.weight") {
                    inverse_root(d_ff)
                } else if name.contains("ffn.") {
                    inverse_root(d_model)
                } else {
                    // `shared`, `lm_head`.
                    1.0
                }
            }
        }
    }

    /// The initial values of the parameter `entry` of a segment whose prefix made `name` its
    /// zoo name: by kind, then the family's standard deviation.
    pub fn values(&self, seed: u64, name: &str, entry: &FlatEntry) -> Vec<f32> {
        use rand::{RngExt, SeedableRng, rngs::StdRng};
        use rayon::prelude::*;
        let len = entry.len();
        match ParamKind::of(entry) {
            ParamKind::NormScale => return vec![1.0; len],
            ParamKind::Bias => return vec![0.0; len],
            ParamKind::Embedding | ParamKind::Matrix => {}
        }
        let std = self.std(name);
        // FNV-1a of the name: parameters of one seed get unrelated streams.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut out = vec![0.0f32; len];
        out.par_chunks_mut(INIT_CHUNK)
            .enumerate()
            .for_each(|(chunk, values)| {
                let mut rng = StdRng::seed_from_u64(
                    seed ^ name_hash.rotate_left(17) ^ (chunk as u64).wrapping_mul(0x9E37_79B9),
                );
                for value in values {
                    // Box–Muller: two uniforms in (0, 1] give one standard normal.
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    *value =
                        (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
                }
            });
        out
    }
}

/// GPT-2's initialisation ([`InitScheme::Gpt2`]) of a whole model, from `seed`.
pub fn gpt2_init<B: Backend>(
    model: Gpt2LmHeadModel<B>,
    n_layer: usize,
    seed: u64,
    device: &B::Device,
) -> Gpt2LmHeadModel<B> {
    init_module(model, InitScheme::Gpt2 { n_layer }, seed, device)
}

/// BERT's initialisation ([`InitScheme::Bert`]) of a whole model, from `seed`.
pub fn bert_init<B: Backend, M: Module<B>>(model: M, seed: u64, device: &B::Device) -> M {
    init_module(model, InitScheme::Bert, seed, device)
}

/// `model` with every parameter drawn by `scheme` (names are the module's own).
fn init_module<B: Backend, M: Module<B>>(
    model: M,
    scheme: InitScheme,
    seed: u64,
    device: &B::Device,
) -> M {
    let layout = bmtrain_backend::zero::layout_of::<B, _>(&model);
    let mut values = Vec::with_capacity(layout.len);
    for entry in &layout.entries {
        values.extend(scheme.values(seed, &entry.name, entry));
    }
    bmtrain_backend::zero::load_flat(model, &layout, &values, device, false)
}

/// Tensors by zoo name a trainer can start from: a checkpoint's, read when asked (so that a
/// model's segments are built one at a time, never the whole checkpoint at once).
pub trait TensorSource {
    /// The shape of `name`, if the source has it.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Reads `name` (any float dtype); `None` if the source lacks it.
    fn read(&self, name: &str) -> Option<Result<TensorData, String>>;
}

impl TensorSource for BTreeMap<String, TensorData> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|data| data.shape.to_vec())
    }

    fn read(&self, name: &str) -> Option<Result<TensorData, String>> {
        self.get(name).cloned().map(Ok)
    }
}

/// Where a trainer's segments take their first values ([`ZeroTrainer::from_source`]): a
/// checkpoint's tensors (zoo names, any float dtype) where it has them, the family's
/// initialisation for the rest. One segment's buffer is built at a time, so a model is never
/// held twice.
///
/// [`ZeroTrainer::from_source`]: bmtrain_backend::trainer::ZeroTrainer::from_source
pub struct StartValues<'a> {
    /// The checkpoint's tensors by zoo name, if training starts from one.
    pub tensors: Option<&'a dyn TensorSource>,
    /// With a checkpoint: whether every parameter must come from it (continuing a model), or
    /// missing and differently shaped ones start fresh (a new classification head).
    pub strict: bool,
    /// The initialisation of the parameters the checkpoint lacks.
    pub init: InitScheme,
    /// Its seed.
    pub seed: u64,
    /// The names of the parameters that started fresh although a checkpoint was given.
    pub fresh: Vec<String>,
}

impl StartValues<'_> {
    /// The whole f32 buffer of the segment whose tensors are `prefix.` + `layout`'s names.
    pub fn segment(&mut self, prefix: &str, layout: &FlatLayout) -> Result<Vec<f32>, ModelError> {
        let mut values = Vec::with_capacity(layout.len);
        for entry in &layout.entries {
            let name = bmtrain_backend::checkpoint::tensor_name(prefix, &entry.name);
            let stored = self.tensors.and_then(|t| t.shape(&name));
            let error = |message: String| ModelError::Weights {
                name: name.clone(),
                message,
            };
            match (stored, self.tensors) {
                (Some(shape), Some(tensors)) if shape == entry.shape => {
                    let data = tensors
                        .read(&name)
                        .expect("a tensor the source has a shape for")
                        .map_err(error)?;
                    match data.as_slice::<f32>() {
                        Ok(slice) => values.extend_from_slice(slice),
                        Err(_) => values.extend(data.convert::<f32>().iter::<f32>()),
                    }
                }
                (shape, Some(_)) if self.strict => {
                    return Err(error(match shape {
                        Some(shape) => format!(
                            "the checkpoint's is {shape:?}, the model's {:?}",
                            entry.shape
                        ),
                        None => "not in the checkpoint".into(),
                    }));
                }
                (_, tensors) => {
                    if tensors.is_some() {
                        self.fresh.push(name.clone());
                    }
                    values.extend(self.init.values(self.seed, &name, entry));
                }
            }
        }
        Ok(values)
    }
}

// ---------------------------------------------------------------------------------------------
// Sequence classification (BERT, RoBERTa)

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

/// BERT's pooler under its zoo name `bert.pooler`.
#[derive(Module, Debug)]
pub struct BertPoolerOnly<B: Backend> {
    /// HF `bert.pooler`.
    pub pooler: BertPooler<B>,
}

/// A classification head segment: BERT's pooler and linear classifier, or RoBERTa's
/// dense–tanh–projection head.
#[derive(Module, Debug)]
pub enum ClassifierHead<B: Backend> {
    /// HF `bert.pooler.*` and `classifier.*`.
    Bert(BertHead<B>),
    /// HF `classifier.dense`, `classifier.out_proj`.
    Roberta(RobertaHead<B>),
}

/// BERT's head: pooler, dropout, linear classifier.
#[derive(Module, Debug)]
pub struct BertHead<B: Backend> {
    /// `bert.pooler`.
    pub bert: BertPoolerOnly<B>,
    /// HF `classifier`.
    pub classifier: Linear<B>,
    dropout: Dropout,
}

/// RoBERTa's head.
#[derive(Module, Debug)]
pub struct RobertaHead<B: Backend> {
    /// HF `classifier`.
    pub classifier: RobertaClassificationHead<B>,
}

/// The BERT / RoBERTa encoder as ZeRO segments, whatever head follows: the embeddings and the
/// layers, run by the model's own modules.
#[derive(Debug, Clone)]
pub struct EncoderCut {
    /// `bert` or `roberta`: the zoo name of the encoder.
    encoder: &'static str,
    /// RoBERTa counts positions from `padding_idx + 1`, skipping padding.
    roberta_padding_idx: Option<usize>,
}

impl EncoderCut {
    fn bert() -> Self {
        Self {
            encoder: "bert",
            roberta_padding_idx: None,
        }
    }

    fn roberta(padding_idx: usize) -> Self {
        Self {
            encoder: "roberta",
            roberta_padding_idx: Some(padding_idx),
        }
    }

    fn embed<B: Backend>(
        &self,
        module: &Embeddings<B>,
        input_ids: &Tensor<B, 2, Int>,
        token_type_ids: &Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let positions = self
            .roberta_padding_idx
            .map(|pad| position_ids(input_ids.clone(), pad));
        module.forward(input_ids.clone(), positions, token_type_ids.clone())
    }

    fn block<B: Backend>(
        &self,
        module: &BertLayer<B>,
        hidden: Tensor<B, 3>,
        attention_mask: &Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        module.forward(hidden, &AttentionMask::padding(attention_mask.clone()))
    }

    fn prefix(&self, segment: SegmentId) -> String {
        match segment {
            SegmentId::Embed => format!("{}.embeddings", self.encoder),
            SegmentId::Block(i) => format!("{}.encoder.layers.{i}", self.encoder),
            // Heads name their own fields (`bert.pooler`, `classifier`, `lm_head`).
            SegmentId::Head => String::new(),
        }
    }
}

/// `BertForSequenceClassification` / `RobertaForSequenceClassification` as ZeRO segments.
#[derive(Debug, Clone)]
pub struct ClassifierSpec {
    cut: EncoderCut,
}

impl ClassifierSpec {
    /// Cuts a BERT classifier into the spec and its segments.
    pub fn split_bert<B: Backend>(
        model: BertForSequenceClassification<B>,
        config: &BertConfig,
    ) -> (Self, Embeddings<B>, Vec<BertLayer<B>>, ClassifierHead<B>) {
        let bert = model.bert;
        let head = ClassifierHead::Bert(BertHead {
            bert: BertPoolerOnly {
                pooler: bert.pooler.expect("a classifier has a pooler"),
            },
            classifier: model.classifier,
            dropout: DropoutConfig::new(config.classifier_dropout()).init(),
        });
        let spec = Self {
            cut: EncoderCut::bert(),
        };
        (spec, bert.embeddings, bert.encoder.layers, head)
    }

    /// Cuts a RoBERTa classifier into the spec and its segments.
    pub fn split_roberta<B: Backend>(
        model: RobertaForSequenceClassification<B>,
    ) -> (Self, Embeddings<B>, Vec<BertLayer<B>>, ClassifierHead<B>) {
        let roberta = model.roberta;
        let spec = Self {
            cut: EncoderCut::roberta(roberta.padding_idx),
        };
        let head = ClassifierHead::Roberta(RobertaHead {
            classifier: model.classifier,
        });
        (spec, roberta.embeddings, roberta.encoder.layers, head)
    }
}

impl<B: Backend> ClassifierHead<B> {
    /// Last hidden states → logits `[batch, num_labels]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        match self {
            ClassifierHead::Bert(head) => {
                let pooled = head.bert.pooler.forward(hidden);
                head.classifier.forward(head.dropout.forward(pooled))
            }
            ClassifierHead::Roberta(head) => head.classifier.forward(hidden),
        }
    }
}

impl<B: Backend> ZeroSpec<B> for ClassifierSpec {
    type Embed = Embeddings<B>;
    type Block = BertLayer<B>;
    type Head = ClassifierHead<B>;
    type Batch = ClassifierBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        self.cut
            .embed(module, &batch.input_ids, &batch.token_type_ids)
    }

    fn block(
        &self,
        _index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        self.cut.block(module, hidden, &batch.attention_mask)
    }

    fn loss(
        &self,
        module: &Self::Head,
        _embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        cross_entropy(module.logits(hidden), batch.labels.clone())
    }

    fn prefix(&self, segment: SegmentId) -> String {
        self.cut.prefix(segment)
    }
}

// ---------------------------------------------------------------------------------------------
// Masked LM (BERT, RoBERTa)

/// Masked sequences: the inputs with their masked positions replaced, and the labels of those
/// positions (-100 elsewhere).
#[derive(Debug, Clone)]
pub struct MlmBatch<B: Backend> {
    /// `[batch, seq]` token ids after masking.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<B, 2, Int>,
    /// `[batch, seq]` segment ids (BERT), if any.
    pub token_type_ids: Option<Tensor<B, 2, Int>>,
    /// `[batch, seq]` the original ids at masked positions, -100 elsewhere.
    pub labels: Tensor<B, 2, Int>,
}

/// The MLM head segment, under its zoo name `lm_head`; its decoder is the word embedding table
/// of the embedding segment (tied).
#[derive(Module, Debug)]
pub struct MlmHeadSegment<B: Backend> {
    /// HF `cls.predictions` (BERT) / `lm_head` (RoBERTa).
    pub lm_head: MlmHead<B>,
}

/// `BertForMaskedLM` / `RobertaForMaskedLM` as ZeRO segments.
#[derive(Debug, Clone)]
pub struct MlmSpec {
    cut: EncoderCut,
}

impl MlmSpec {
    /// Cuts a BERT masked LM into the spec and its segments.
    pub fn split_bert<B: Backend>(
        model: BertForMaskedLM<B>,
    ) -> (Self, Embeddings<B>, Vec<BertLayer<B>>, MlmHeadSegment<B>) {
        let spec = Self {
            cut: EncoderCut::bert(),
        };
        let head = MlmHeadSegment {
            lm_head: model.lm_head,
        };
        (spec, model.bert.embeddings, model.bert.encoder.layers, head)
    }

    /// Cuts a RoBERTa masked LM into the spec and its segments.
    pub fn split_roberta<B: Backend>(
        model: RobertaForMaskedLM<B>,
    ) -> (Self, Embeddings<B>, Vec<BertLayer<B>>, MlmHeadSegment<B>) {
        let roberta = model.roberta;
        let spec = Self {
            cut: EncoderCut::roberta(roberta.padding_idx),
        };
        let head = MlmHeadSegment {
            lm_head: model.lm_head,
        };
        (spec, roberta.embeddings, roberta.encoder.layers, head)
    }
}

impl<B: Backend> ZeroSpec<B> for MlmSpec {
    type Embed = Embeddings<B>;
    type Block = BertLayer<B>;
    type Head = MlmHeadSegment<B>;
    type Batch = MlmBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        self.cut
            .embed(module, &batch.input_ids, &batch.token_type_ids)
    }

    fn block(
        &self,
        _index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        self.cut.block(module, hidden, &batch.attention_mask)
    }

    fn loss(
        &self,
        module: &Self::Head,
        embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        let embed = embed.expect("the MLM head reads the word embeddings");
        let logits = module.lm_head.forward(hidden, &embed.word);
        let [rows, seq, vocab] = logits.dims();
        crate::io::token_cross_entropy(
            logits.reshape([rows * seq, vocab]),
            batch.labels.clone().reshape([rows * seq]),
            crate::io::IGNORE_INDEX,
        )
    }

    fn head_reads_embed(&self) -> bool {
        true
    }

    fn prefix(&self, segment: SegmentId) -> String {
        self.cut.prefix(segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt2::Gpt2Config;
    use crate::param_infos;
    use bmtrain_backend::CpuTrain;
    use bmtrain_backend::trainer::SegmentId;
    use bmtrain_backend::zero::layout_of;

    type B = CpuTrain;

    /// Every segment's names under its prefix, in model order.
    fn segment_names<S: ZeroSpec<B>>(
        spec: &S,
        embed: &S::Embed,
        blocks: &[S::Block],
        head: &S::Head,
    ) -> Vec<(String, Vec<usize>)> {
        let named = |segment, layout: bmtrain_backend::zero::FlatLayout| {
            let prefix = spec.prefix(segment);
            layout
                .entries
                .into_iter()
                .map(move |e| {
                    let name = bmtrain_backend::checkpoint::tensor_name(&prefix, &e.name);
                    (name, e.shape)
                })
                .collect::<Vec<_>>()
        };
        let mut out = named(SegmentId::Embed, layout_of::<B, _>(embed));
        for (i, block) in blocks.iter().enumerate() {
            out.extend(named(SegmentId::Block(i), layout_of::<B, _>(block)));
        }
        out.extend(named(SegmentId::Head, layout_of::<B, _>(head)));
        out.sort();
        out
    }

    fn model_names<M: Module<B>>(model: &M) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<_> = param_infos::<B, M>(model)
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn gpt2_segments_carry_the_full_models_zoo_names() {
        let device = Default::default();
        for tied in [true, false] {
            let mut config = Gpt2Config::new();
            (config.vocab_size, config.n_positions, config.n_embd) = (50, 16, 8);
            (config.n_layer, config.n_head) = (2, 2);
            config.tie_word_embeddings = tied;
            let model = Gpt2LmHeadModel::<B>::new(&config, &device).unwrap();
            let want = model_names(&model);
            let (spec, embed, blocks, head) = Gpt2Spec::split(model);
            assert_eq!(ZeroSpec::<B>::head_reads_embed(&spec), tied);
            assert_eq!(segment_names(&spec, &embed, &blocks, &head), want);
        }
    }

    #[test]
    fn classifier_segments_carry_the_full_models_zoo_names() {
        let device = Default::default();
        let mut config = BertConfig::new(40);
        (config.hidden_size, config.num_hidden_layers) = (8, 2);
        (config.num_attention_heads, config.intermediate_size) = (2, 16);
        config.num_labels = Some(3);
        let bert = BertForSequenceClassification::<B>::new(&config, &device).unwrap();
        let want = model_names(&bert);
        let (spec, embed, blocks, head) = ClassifierSpec::split_bert(bert, &config);
        assert_eq!(segment_names(&spec, &embed, &blocks, &head), want);

        let roberta = RobertaForSequenceClassification::<B>::new(&config, &device).unwrap();
        let want = model_names(&roberta);
        let (spec, embed, blocks, head) = ClassifierSpec::split_roberta(roberta);
        assert_eq!(segment_names(&spec, &embed, &blocks, &head), want);
    }
}
