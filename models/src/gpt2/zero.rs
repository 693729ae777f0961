//! GPT-2's cut for the ZeRO trainer ([`bmtrain_backend::trainer`]): `GPT2LMHeadModel` (GPT-2,
//! the GPT-3 sizes, CPM-1) as an embedding segment (`wte`, `wpe`), its blocks and a head (`ln_f`,
//! the LM head) that ends in the causal-LM loss. A head tied to `wte` reads the embedding segment
//! ([`ZeroSpec::head_reads_embed`]). The segments run the model's own steps (`embed`, the block
//! masks, `lm_logits`), so there is no second copy of GPT-2's forward.

use bmtrain_backend::trainer::{SegmentId, ZeroSpec};
use burn::module::Module;
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::{BlockMasks, Gpt2Block, Gpt2LmHeadModel, embed, lm_logits, positions};
use crate::io::causal_lm_loss;
use crate::layers::{AttentionMask, Dropout, LayerNorm, Linear};

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
        let positions = positions(rows, seq, 0, &batch.input_ids.device());
        embed(
            &module.wte,
            &module.wpe,
            &module.dropout,
            batch.input_ids.clone(),
            positions,
        )
    }

    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        _batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        let seq = hidden.dims()[1];
        let masks = BlockMasks::new(
            AttentionMask::none(),
            self.local_window,
            seq,
            0,
            &hidden.device(),
        );
        module.forward(hidden, None, masks.of_block(index)).0
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
            (None, Some(embed)) => lm_logits(hidden, None, &embed.wte),
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
