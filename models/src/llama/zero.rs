//! The Llama family's cut for the ZeRO trainer: `LlamaForCausalLM` (and Mistral's, Qwen2's) as
//! an embedding segment (`model.embed_tokens`), its blocks, and a head (`model.norm`, the LM head)
//! that ends in the causal-LM loss. A tied head reads the embedding segment. Blocks compute their
//! rotary tables and masks with the model's own functions ([`Rope::tables`], [`block_masks`]), so
//! there is no second copy of the forward.

use bmtrain_backend::trainer::{SegmentId, ZeroSpec};
use burn::module::Module;
use burn::nn::Embedding;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{LlamaDecoderLayer, LlamaForCausalLM, Rope, block_masks, float_dtype, positions};
use crate::io::{LmBatch, causal_lm_loss, vocab_logits};
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
        let [rows, seq, _] = hidden.dims();
        let device = hidden.device();
        let rotary = self
            .rope
            .tables(&positions::<B>(rows, seq, 0, &device), float_dtype(&hidden));
        let window = &self.windows[index..=index];
        let mask = block_masks(window, AttentionMask::none(), seq, 0, &device);
        module.forward(hidden, &rotary, None, &mask[0]).0
    }

    fn loss(
        &self,
        module: &Self::Head,
        embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        let hidden = module.model.norm.forward(hidden);
        let logits = match (&module.lm_head, embed) {
            (Some(head), _) => head.forward(hidden),
            (None, Some(embed)) => vocab_logits(hidden, None, &embed.embed_tokens),
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
            SegmentId::Embed => "model".into(),
            SegmentId::Block(i) => format!("model.layers.{i}"),
            SegmentId::Head => String::new(),
        }
    }
}
