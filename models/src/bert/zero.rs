//! The BERT / RoBERTa cuts for the ZeRO trainer ([`bmtrain_backend::trainer`]): the encoder
//! (embeddings, layers) with a sequence-classification head ([`ClassifierSpec`]) or the
//! masked-LM head ([`MlmSpec`], its decoder the word table of the embedding segment). The
//! segments run the models' own modules (`Embeddings`, `BertLayer`, the heads).

use bmtrain_backend::trainer::{SegmentId, ZeroSpec};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::{
    BertConfig, BertForMaskedLM, BertForSequenceClassification, BertLayer, BertPooler, MlmHead,
};
pub use crate::io::ClassifierBatch;
use crate::io::cross_entropy;
use crate::layers::{AttentionMask, Dropout, DropoutConfig, Embeddings, Linear};
use crate::roberta::{
    RobertaClassificationHead, RobertaForMaskedLM, RobertaForSequenceClassification, position_ids,
};

// ---------------------------------------------------------------------------------------------
// Sequence classification (BERT, RoBERTa)

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
        module
            .lm_head
            .loss(hidden, &embed.word, batch.labels.clone())
    }

    fn head_reads_embed(&self) -> bool {
        true
    }

    fn prefix(&self, segment: SegmentId) -> String {
        self.cut.prefix(segment)
    }
}
