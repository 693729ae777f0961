//! The Llama family's cut for the ZeRO trainer: `LlamaForCausalLM` (and Mistral's, Qwen2's) as
//! an embedding segment (`model.embed_tokens`), its blocks, and a head (`model.norm`, the LM head)
//! that ends in the causal-LM loss. A tied head reads the embedding segment. Blocks compute their
//! rotary tables and masks with the model's own functions ([`Rope::tables`], [`block_masks`]), so
//! there is no second copy of the forward. `LlamaForSequenceClassification` shares the embedding
//! and blocks, with a head that scores the last non-padding token.

use crate::layers::Embedding;
use bmtrain_backend::trainer::{SegmentId, ZeroSpec};
use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{
    LlamaDecoderLayer, LlamaForCausalLM, LlamaForSequenceClassification, Rope, block_masks,
};
use crate::io::{ClassifierBatch, LmBatch, cross_entropy, last_token_score, positions};
use crate::layers::{AttentionMask, Linear, RmsNorm};

/// The embedding segment: the token table (HF `model.embed_tokens`; the LM head when tied).
#[derive(Module, Debug)]
pub struct LlamaEmbedding<B: Backend> {
    /// HF `model.embed_tokens`.
    pub embed_tokens: Embedding<B>,
}

/// The final RMSNorm, under its zoo name `model.norm`.
#[derive(Module, Debug)]
pub struct LlamaFinalNorm<B: Backend> {
    /// HF `model.norm`.
    pub norm: RmsNorm<B>,
}

/// The head segment: the final norm and, when untied, the LM head.
#[derive(Module, Debug)]
pub struct LlamaHead<B: Backend> {
    /// `model.norm` (named so that the segment's prefix can be empty).
    pub model: LlamaFinalNorm<B>,
    /// HF `lm_head`, only when `tie_word_embeddings` is false.
    pub lm_head: Option<Linear<B>>,
}

/// `LlamaForCausalLM` as ZeRO segments.
#[derive(Debug, Clone)]
pub struct LlamaSpec {
    rope: Rope,
    windows: Vec<Option<usize>>,
    tied: bool,
}

impl LlamaSpec {
    /// Cuts a model into the spec and its segments.
    pub fn split<B: Backend>(
        model: LlamaForCausalLM<B>,
    ) -> (
        Self,
        LlamaEmbedding<B>,
        Vec<LlamaDecoderLayer<B>>,
        LlamaHead<B>,
    ) {
        let body = model.model;
        let spec = Self {
            rope: body.rope,
            windows: body.windows,
            tied: model.lm_head.is_none(),
        };
        let head = LlamaHead {
            model: LlamaFinalNorm { norm: body.norm },
            lm_head: model.lm_head,
        };
        let embed = LlamaEmbedding {
            embed_tokens: body.embed_tokens,
        };
        (spec, embed, body.layers, head)
    }
}

/// Block `index` on positions from 0 (rows right-padded), with its causal or windowed mask.
fn run_block<B: Backend>(
    rope: &Rope,
    windows: &[Option<usize>],
    index: usize,
    module: &LlamaDecoderLayer<B>,
    hidden: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let [rows, seq, _] = hidden.dims();
    let device = hidden.device();
    let rotary = rope.tables(
        &positions::<B>(rows, seq, 0, &device),
        hidden.dtype().into(),
    );
    let mask = block_masks(
        &windows[index..=index],
        AttentionMask::none(),
        seq,
        0,
        &device,
    );
    module.forward(hidden, &rotary, None, &mask[0]).0
}

impl<B: Backend> ZeroSpec<B> for LlamaSpec {
    type Embed = LlamaEmbedding<B>;
    type Block = LlamaDecoderLayer<B>;
    type Head = LlamaHead<B>;
    type Batch = LmBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        module.embed_tokens.forward(batch.input_ids.clone())
    }

    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        _batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        run_block(&self.rope, &self.windows, index, module, hidden)
    }

    fn loss(
        &self,
        module: &Self::Head,
        embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        let hidden = module.model.norm.forward(hidden);
        let tied_to = embed.map(|e| &e.embed_tokens);
        batch.head_loss(hidden, module.lm_head.as_ref(), tied_to)
    }

    fn head_reads_embed(&self) -> bool {
        self.tied
    }

    fn prefix(&self, segment: SegmentId) -> String {
        match segment {
            SegmentId::Embed => "model".into(),
            SegmentId::Block(i) => format!("model.layers.{i}"),
            SegmentId::Head => String::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sequence classification

/// `LlamaForSequenceClassification`'s head segment: the final norm and the score.
#[derive(Module, Debug)]
pub struct LlamaScoreHead<B: Backend> {
    /// `model.norm`.
    pub model: LlamaFinalNorm<B>,
    /// HF `score`.
    pub score: Linear<B>,
}

/// `LlamaForSequenceClassification` as ZeRO segments: the embedding and blocks of the causal LM's
/// cut, and a head that scores each row's last non-padding token, then the cross-entropy.
#[derive(Debug, Clone)]
pub struct LlamaClassifierSpec {
    rope: Rope,
    windows: Vec<Option<usize>>,
    pad_token_id: Option<u32>,
}

impl LlamaClassifierSpec {
    /// Cuts a model into the spec and its segments.
    pub fn split<B: Backend>(
        model: LlamaForSequenceClassification<B>,
    ) -> (
        Self,
        LlamaEmbedding<B>,
        Vec<LlamaDecoderLayer<B>>,
        LlamaScoreHead<B>,
    ) {
        let body = model.model;
        let spec = Self {
            rope: body.rope,
            windows: body.windows,
            pad_token_id: model.pad_token_id,
        };
        let head = LlamaScoreHead {
            model: LlamaFinalNorm { norm: body.norm },
            score: model.score,
        };
        let embed = LlamaEmbedding {
            embed_tokens: body.embed_tokens,
        };
        (spec, embed, body.layers, head)
    }

    /// The head's logits `[batch, num_labels]` for the last hidden states of `batch`.
    pub fn logits<B: Backend>(
        &self,
        head: &LlamaScoreHead<B>,
        hidden: Tensor<B, 3>,
        batch: &ClassifierBatch<B>,
    ) -> Tensor<B, 2> {
        let hidden = head.model.norm.forward(hidden);
        last_token_score(&head.score, hidden, &batch.input_ids, self.pad_token_id)
    }
}

impl<B: Backend> ZeroSpec<B> for LlamaClassifierSpec {
    type Embed = LlamaEmbedding<B>;
    type Block = LlamaDecoderLayer<B>;
    type Head = LlamaScoreHead<B>;
    type Batch = ClassifierBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        module.embed_tokens.forward(batch.input_ids.clone())
    }

    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        _batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        run_block(&self.rope, &self.windows, index, module, hidden)
    }

    fn loss(
        &self,
        module: &Self::Head,
        _embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        cross_entropy(self.logits(module, hidden, batch), batch.labels.clone())
    }

    fn prefix(&self, segment: SegmentId) -> String {
        match segment {
            SegmentId::Embed => "model".into(),
            SegmentId::Block(i) => format!("model.layers.{i}"),
            SegmentId::Head => String::new(),
        }
    }
}
