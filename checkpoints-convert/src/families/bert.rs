//! BERT's HF ⇄ zoo key table (transformers `modeling_bert.py` names → zoo module paths).

use models::{Architecture, Family};

use super::{KeyRule, KeyTable, Layout::*, rule};

/// Encoder rows, relative to the `bert.` prefix. RoBERTa's encoder has the same names.
pub const BODY: &[KeyRule] = &[
    rule(
        "embeddings.word_embeddings.weight",
        "embeddings.word.weight",
        Same,
    ),
    rule(
        "embeddings.position_embeddings.weight",
        "embeddings.position.weight",
        Same,
    ),
    rule(
        "embeddings.token_type_embeddings.weight",
        "embeddings.token_type.weight",
        Same,
    ),
    rule("embeddings.LayerNorm.weight", "embeddings.norm.gamma", Same),
    rule("embeddings.LayerNorm.bias", "embeddings.norm.beta", Same),
    rule(
        "encoder.layer.{i}.attention.self.query.weight",
        "encoder.layers.{i}.attention.query.weight",
        Transposed,
    ),
    rule(
        "encoder.layer.{i}.attention.self.query.bias",
        "encoder.layers.{i}.attention.query.bias",
        Same,
    ),
    rule(
        "encoder.layer.{i}.attention.self.key.weight",
        "encoder.layers.{i}.attention.key.weight",
        Transposed,
    ),
    rule(
        "encoder.layer.{i}.attention.self.key.bias",
        "encoder.layers.{i}.attention.key.bias",
        Same,
    ),
    rule(
        "encoder.layer.{i}.attention.self.value.weight",
        "encoder.layers.{i}.attention.value.weight",
        Transposed,
    ),
    rule(
        "encoder.layer.{i}.attention.self.value.bias",
        "encoder.layers.{i}.attention.value.bias",
        Same,
    ),
    rule(
        "encoder.layer.{i}.attention.output.dense.weight",
        "encoder.layers.{i}.attention.output.weight",
        Transposed,
    ),
    rule(
        "encoder.layer.{i}.attention.output.dense.bias",
        "encoder.layers.{i}.attention.output.bias",
        Same,
    ),
    rule(
        "encoder.layer.{i}.attention.output.LayerNorm.weight",
        "encoder.layers.{i}.attention_norm.gamma",
        Same,
    ),
    rule(
        "encoder.layer.{i}.attention.output.LayerNorm.bias",
        "encoder.layers.{i}.attention_norm.beta",
        Same,
    ),
    rule(
        "encoder.layer.{i}.intermediate.dense.weight",
        "encoder.layers.{i}.ffn.input.weight",
        Transposed,
    ),
    rule(
        "encoder.layer.{i}.intermediate.dense.bias",
        "encoder.layers.{i}.ffn.input.bias",
        Same,
    ),
    rule(
        "encoder.layer.{i}.output.dense.weight",
        "encoder.layers.{i}.ffn.output.weight",
        Transposed,
    ),
    rule(
        "encoder.layer.{i}.output.dense.bias",
        "encoder.layers.{i}.ffn.output.bias",
        Same,
    ),
    rule(
        "encoder.layer.{i}.output.LayerNorm.weight",
        "encoder.layers.{i}.ffn_norm.gamma",
        Same,
    ),
    rule(
        "encoder.layer.{i}.output.LayerNorm.bias",
        "encoder.layers.{i}.ffn_norm.beta",
        Same,
    ),
];

/// Pooler rows, relative to the `bert.` prefix, for the classes that have a pooler.
pub const POOLER: &[KeyRule] = &[
    rule("pooler.dense.weight", "pooler.dense.weight", Transposed),
    rule("pooler.dense.bias", "pooler.dense.bias", Same),
];

const MASKED_LM: &[KeyRule] = &[
    rule(
        "cls.predictions.transform.dense.weight",
        "lm_head.transform.weight",
        Transposed,
    ),
    rule(
        "cls.predictions.transform.dense.bias",
        "lm_head.transform.bias",
        Same,
    ),
    rule(
        "cls.predictions.transform.LayerNorm.weight",
        "lm_head.norm.gamma",
        Same,
    ),
    rule(
        "cls.predictions.transform.LayerNorm.bias",
        "lm_head.norm.beta",
        Same,
    ),
    rule("cls.predictions.bias", "lm_head.bias", Same),
];

const SEQUENCE_CLASSIFICATION: &[KeyRule] = &[
    rule("classifier.weight", "classifier.weight", Transposed),
    rule("classifier.bias", "classifier.bias", Same),
];

/// BERT's table.
pub static TABLE: KeyTable = KeyTable {
    family: Family::Bert,
    body: BODY,
    pooler: POOLER,
    heads: &[
        (Architecture::BertForMaskedLM, MASKED_LM),
        (
            Architecture::BertForSequenceClassification,
            SEQUENCE_CLASSIFICATION,
        ),
    ],
    tied_output: None,
    ignored: &[
        // Buffers, not parameters.
        "embeddings.position_ids",
        "embeddings.token_type_ids",
        // Tied to embeddings.word_embeddings.weight (present in .bin files, dropped by safetensors).
        "cls.predictions.decoder.weight",
    ],
    aliases: &[("cls.predictions.decoder.bias", "cls.predictions.bias")],
};
