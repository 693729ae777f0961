//! RoBERTa's HF ⇄ zoo key table. The encoder rows are BERT's; the heads are RoBERTa's own.

use models::{Architecture, Family};

use super::{KeyRule, KeyTable, Layout::*, rule};

const MASKED_LM: &[KeyRule] = &[
    rule(
        "lm_head.dense.weight",
        "lm_head.transform.weight",
        Transposed,
    ),
    rule("lm_head.dense.bias", "lm_head.transform.bias", Same),
    rule("lm_head.layer_norm.weight", "lm_head.norm.gamma", Same),
    rule("lm_head.layer_norm.bias", "lm_head.norm.beta", Same),
    rule("lm_head.bias", "lm_head.bias", Same),
];

const SEQUENCE_CLASSIFICATION: &[KeyRule] = &[
    rule(
        "classifier.dense.weight",
        "classifier.dense.weight",
        Transposed,
    ),
    rule("classifier.dense.bias", "classifier.dense.bias", Same),
    rule(
        "classifier.out_proj.weight",
        "classifier.out_proj.weight",
        Transposed,
    ),
    rule("classifier.out_proj.bias", "classifier.out_proj.bias", Same),
];

/// RoBERTa's table.
pub static TABLE: KeyTable = KeyTable {
    family: Family::Roberta,
    body: super::bert::BODY,
    pooler: super::bert::POOLER,
    heads: &[
        (Architecture::RobertaForMaskedLM, MASKED_LM),
        (
            Architecture::RobertaForSequenceClassification,
            SEQUENCE_CLASSIFICATION,
        ),
    ],
    tied_output: None,
    ignored: &[
        "embeddings.position_ids",
        "embeddings.token_type_ids",
        // Tied to embeddings.word_embeddings.weight.
        "lm_head.decoder.weight",
    ],
    aliases: &[("lm_head.decoder.bias", "lm_head.bias")],
};
