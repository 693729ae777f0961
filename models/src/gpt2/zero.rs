//! GPT-2's cut for the ZeRO trainer ([`bmtrain_backend::trainer`]): `GPT2LMHeadModel` (GPT-2,
//! the GPT-3 sizes, CPM-1) as an embedding segment (`wte`, `wpe`), its blocks and a head (`ln_f`,
//! the LM head) that ends in the causal-LM loss. A head tied to `wte` reads the embedding segment
//! ([`ZeroSpec::head_reads_embed`]). The segments run the model's own steps (`embed`, the block
//! masks, `io::head_logits`), so there is no second copy of GPT-2's forward.

use crate::layers::Embedding;
use bmtrain_backend::trainer::{SegmentId, ZeroSpec};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::{
    BlockMasks, Gpt2Block, Gpt2ForSequenceClassification, Gpt2LmHeadModel, embed, positions,
};
pub use crate::io::LmBatch;
use crate::io::{ClassifierBatch, cross_entropy, last_token_score};
use crate::layers::{AttentionMask, Dropout, LayerNorm, Linear};

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
        let spec = Self {
            local_window: model.transformer.local_window,
            tied: model.lm_head.is_none(),
        };
        let (embed, blocks, transformer) = split_body(model.transformer);
        let head = Gpt2Head {
            transformer,
            lm_head: model.lm_head,
        };
        (spec, embed, blocks, head)
    }
}

/// The decoder stack's segments: embedding, blocks, and the final norm every head starts with.
fn split_body<B: Backend>(
    transformer: super::Gpt2Model<B>,
) -> (Gpt2Embedding<B>, Vec<Gpt2Block<B>>, Gpt2FinalNorm<B>) {
    let embed = Gpt2Embedding {
        wte: transformer.wte,
        wpe: transformer.wpe,
        dropout: transformer.dropout,
    };
    let ln_f = Gpt2FinalNorm {
        ln_f: transformer.ln_f,
    };
    (embed, transformer.blocks, ln_f)
}

/// The embedding segment on `[batch, seq]` ids (positions from 0; rows right-padded).
fn embed_segment<B: Backend>(
    module: &Gpt2Embedding<B>,
    input_ids: &Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    let [rows, seq] = input_ids.dims();
    let positions = positions(rows, seq, 0, &input_ids.device());
    embed(
        &module.wte,
        &module.wpe,
        &module.dropout,
        input_ids.clone(),
        positions,
    )
}

/// Block `index` with the model's mask for it (causal; GPT-3's band on odd blocks).
fn run_block<B: Backend>(
    local_window: Option<usize>,
    index: usize,
    module: &Gpt2Block<B>,
    hidden: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let seq = hidden.dims()[1];
    let masks = BlockMasks::new(
        AttentionMask::none(),
        local_window,
        seq,
        0,
        &hidden.device(),
    );
    module.forward(hidden, None, masks.of_block(index)).0
}

impl<B: Backend> ZeroSpec<B> for Gpt2Spec {
    type Embed = Gpt2Embedding<B>;
    type Block = Gpt2Block<B>;
    type Head = Gpt2Head<B>;
    type Batch = LmBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        embed_segment(module, &batch.input_ids)
    }

    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        _batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        run_block(self.local_window, index, module, hidden)
    }

    fn loss(
        &self,
        module: &Self::Head,
        embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        let hidden = module.transformer.ln_f.forward(hidden);
        let tied_to = embed.map(|e| &e.wte);
        batch.head_loss(hidden, module.lm_head.as_ref(), tied_to)
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

// ---------------------------------------------------------------------------------------------
// Sequence classification

/// `GPT2ForSequenceClassification`'s head segment: the final norm and the score.
#[derive(Module, Debug)]
pub struct Gpt2ScoreHead<B: Backend> {
    /// `transformer.ln_f`.
    pub transformer: Gpt2FinalNorm<B>,
    /// HF `score`.
    pub score: Linear<B>,
}

/// `GPT2ForSequenceClassification` as ZeRO segments: GPT-2's embedding and blocks, and a head
/// that scores each row's last non-padding token, then the cross-entropy over labels.
#[derive(Debug, Clone)]
pub struct Gpt2ClassifierSpec {
    local_window: Option<usize>,
    pad_token_id: Option<u32>,
}

impl Gpt2ClassifierSpec {
    /// Cuts a model into the spec and its segments.
    pub fn split<B: Backend>(
        model: Gpt2ForSequenceClassification<B>,
    ) -> (Self, Gpt2Embedding<B>, Vec<Gpt2Block<B>>, Gpt2ScoreHead<B>) {
        let spec = Self {
            local_window: model.transformer.local_window,
            pad_token_id: model.pad_token_id,
        };
        let (embed, blocks, transformer) = split_body(model.transformer);
        let head = Gpt2ScoreHead {
            transformer,
            score: model.score,
        };
        (spec, embed, blocks, head)
    }

    /// The head's logits `[batch, num_labels]` for the last hidden states of `batch`.
    pub fn logits<B: Backend>(
        &self,
        head: &Gpt2ScoreHead<B>,
        hidden: Tensor<B, 3>,
        batch: &ClassifierBatch<B>,
    ) -> Tensor<B, 2> {
        let hidden = head.transformer.ln_f.forward(hidden);
        last_token_score(&head.score, hidden, &batch.input_ids, self.pad_token_id)
    }
}

impl<B: Backend> ZeroSpec<B> for Gpt2ClassifierSpec {
    type Embed = Gpt2Embedding<B>;
    type Block = Gpt2Block<B>;
    type Head = Gpt2ScoreHead<B>;
    type Batch = ClassifierBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        embed_segment(module, &batch.input_ids)
    }

    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        _batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        run_block(self.local_window, index, module, hidden)
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
            SegmentId::Embed => "transformer".into(),
            SegmentId::Block(i) => format!("transformer.blocks.{i}"),
            SegmentId::Head => String::new(),
        }
    }
}
