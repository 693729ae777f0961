//! T5's HF ⇄ zoo key table (transformers `modeling_t5.py` names → zoo module paths), for T5,
//! v1.1, mT5, FLAN-T5 and CPM-2 checkpoints.
//!
//! - `shared` is the token table; `encoder.embed_tokens` and `decoder.embed_tokens` are tied copies
//!   (dropped on read, not written on export), and so is `lm_head` when the config ties it;
//! - `relative_attention_bias` exists only in block 0 of each stack; zoo keeps it on the stack;
//! - v1.0 FFNs have `wi`, gated ones (v1.1 and later) `wi_0` (gate) and `wi_1` (input);
//! - every projection is an `nn.Linear` without bias, stored `[out, in]`: transposed.
//!
//! `{i}` is an encoder block, `{d}` a decoder block (the two stacks may differ in depth).

use models::{Architecture, Family};

use super::{KeyRule, KeyTable, Layout::*, When::*, rule, rule_if};

/// The token table and the encoder: every T5 class has them.
const ENCODER: &[KeyRule] = &[
    rule("shared.weight", "shared.weight", Same),
    rule(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.position_bias.weight",
        Same,
    ),
    rule(
        "encoder.block.{i}.layer.0.SelfAttention.q.weight",
        "encoder.blocks.{i}.self_attention.query.weight",
        Transposed,
    ),
    rule(
        "encoder.block.{i}.layer.0.SelfAttention.k.weight",
        "encoder.blocks.{i}.self_attention.key.weight",
        Transposed,
    ),
    rule(
        "encoder.block.{i}.layer.0.SelfAttention.v.weight",
        "encoder.blocks.{i}.self_attention.value.weight",
        Transposed,
    ),
    rule(
        "encoder.block.{i}.layer.0.SelfAttention.o.weight",
        "encoder.blocks.{i}.self_attention.output.weight",
        Transposed,
    ),
    rule(
        "encoder.block.{i}.layer.0.layer_norm.weight",
        "encoder.blocks.{i}.self_attention_norm.weight",
        Same,
    ),
    rule_if(
        NotGated,
        "encoder.block.{i}.layer.1.DenseReluDense.wi.weight",
        "encoder.blocks.{i}.ffn.input.weight",
        Transposed,
    ),
    rule_if(
        Gated,
        "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",
        "encoder.blocks.{i}.ffn.gate.weight",
        Transposed,
    ),
    rule_if(
        Gated,
        "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
        "encoder.blocks.{i}.ffn.input.weight",
        Transposed,
    ),
    rule(
        "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
        "encoder.blocks.{i}.ffn.output.weight",
        Transposed,
    ),
    rule(
        "encoder.block.{i}.layer.1.layer_norm.weight",
        "encoder.blocks.{i}.ffn_norm.weight",
        Same,
    ),
    rule(
        "encoder.final_layer_norm.weight",
        "encoder.final_norm.weight",
        Same,
    ),
];

/// The decoder: `T5Model` and `T5ForConditionalGeneration`.
const DECODER: &[KeyRule] = &[
    rule(
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.position_bias.weight",
        Same,
    ),
    rule(
        "decoder.block.{d}.layer.0.SelfAttention.q.weight",
        "decoder.blocks.{d}.self_attention.query.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.0.SelfAttention.k.weight",
        "decoder.blocks.{d}.self_attention.key.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.0.SelfAttention.v.weight",
        "decoder.blocks.{d}.self_attention.value.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.0.SelfAttention.o.weight",
        "decoder.blocks.{d}.self_attention.output.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.0.layer_norm.weight",
        "decoder.blocks.{d}.self_attention_norm.weight",
        Same,
    ),
    rule(
        "decoder.block.{d}.layer.1.EncDecAttention.q.weight",
        "decoder.blocks.{d}.cross_attention.query.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.1.EncDecAttention.k.weight",
        "decoder.blocks.{d}.cross_attention.key.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.1.EncDecAttention.v.weight",
        "decoder.blocks.{d}.cross_attention.value.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.1.EncDecAttention.o.weight",
        "decoder.blocks.{d}.cross_attention.output.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.1.layer_norm.weight",
        "decoder.blocks.{d}.cross_attention_norm.weight",
        Same,
    ),
    rule_if(
        NotGated,
        "decoder.block.{d}.layer.2.DenseReluDense.wi.weight",
        "decoder.blocks.{d}.ffn.input.weight",
        Transposed,
    ),
    rule_if(
        Gated,
        "decoder.block.{d}.layer.2.DenseReluDense.wi_0.weight",
        "decoder.blocks.{d}.ffn.gate.weight",
        Transposed,
    ),
    rule_if(
        Gated,
        "decoder.block.{d}.layer.2.DenseReluDense.wi_1.weight",
        "decoder.blocks.{d}.ffn.input.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.2.DenseReluDense.wo.weight",
        "decoder.blocks.{d}.ffn.output.weight",
        Transposed,
    ),
    rule(
        "decoder.block.{d}.layer.2.layer_norm.weight",
        "decoder.blocks.{d}.ffn_norm.weight",
        Same,
    ),
    rule(
        "decoder.final_layer_norm.weight",
        "decoder.final_norm.weight",
        Same,
    ),
];

/// `T5ForConditionalGeneration`: the decoder and, when untied, the head.
const CONDITIONAL_GENERATION: &[KeyRule] = &[rule_if(
    Untied,
    "lm_head.weight",
    "lm_head.weight",
    Transposed,
)];

/// `DECODER` followed by `CONDITIONAL_GENERATION`, as one list per class.
const DECODER_AND_HEAD: &[KeyRule] = &{
    let mut rows = [rule("", "", Same); DECODER.len() + CONDITIONAL_GENERATION.len()];
    let mut i = 0;
    while i < DECODER.len() {
        rows[i] = DECODER[i];
        i += 1;
    }
    rows[i] = CONDITIONAL_GENERATION[0];
    rows
};

/// T5's table.
pub static TABLE: KeyTable = KeyTable {
    family: Family::T5,
    body: ENCODER,
    pooler: &[],
    heads: &[
        (Architecture::T5Model, DECODER),
        (Architecture::T5ForConditionalGeneration, DECODER_AND_HEAD),
    ],
    ignored: &[
        // Tied copies of shared.weight (state dicts hold them; safetensors files do not).
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    ],
    aliases: &[],
    tied_output: Some(("lm_head.weight", "shared.weight")),
};
