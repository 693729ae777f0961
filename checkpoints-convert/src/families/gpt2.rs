//! GPT-2's HF ⇄ zoo key table (transformers `modeling_gpt2.py` names → zoo module paths). It also
//! serves the GPT-3 sizes and CPM-1, which are saved as `GPT2LMHeadModel`.
//!
//! GPT-2's `Conv1D` keeps weights `[in, out]`, as burn's `Linear` does, so nothing is transposed.
//! The fused `attn.c_attn` (`[n_embd, 3·n_embd]`, columns q | k | v) is split into zoo's
//! `attention.query` / `key` / `value`, and joined again on export.

use models::{Architecture, Family};

use super::{KeyRule, KeyTable, Layout::*, When, rule, rule_if};

const Q: super::Layout = Split { part: 0, parts: 3 };
const K: super::Layout = Split { part: 1, parts: 3 };
const V: super::Layout = Split { part: 2, parts: 3 };

/// The decoder stack, relative to the `transformer.` prefix.
const BODY: &[KeyRule] = &[
    rule("wte.weight", "wte.weight", Same),
    rule("wpe.weight", "wpe.weight", Same),
    rule("h.{i}.ln_1.weight", "blocks.{i}.ln_1.gamma", Same),
    rule("h.{i}.ln_1.bias", "blocks.{i}.ln_1.beta", Same),
    rule(
        "h.{i}.attn.c_attn.weight",
        "blocks.{i}.attention.query.weight",
        Q,
    ),
    rule(
        "h.{i}.attn.c_attn.weight",
        "blocks.{i}.attention.key.weight",
        K,
    ),
    rule(
        "h.{i}.attn.c_attn.weight",
        "blocks.{i}.attention.value.weight",
        V,
    ),
    rule(
        "h.{i}.attn.c_attn.bias",
        "blocks.{i}.attention.query.bias",
        Q,
    ),
    rule("h.{i}.attn.c_attn.bias", "blocks.{i}.attention.key.bias", K),
    rule(
        "h.{i}.attn.c_attn.bias",
        "blocks.{i}.attention.value.bias",
        V,
    ),
    rule(
        "h.{i}.attn.c_proj.weight",
        "blocks.{i}.attention.output.weight",
        Same,
    ),
    rule(
        "h.{i}.attn.c_proj.bias",
        "blocks.{i}.attention.output.bias",
        Same,
    ),
    rule("h.{i}.ln_2.weight", "blocks.{i}.ln_2.gamma", Same),
    rule("h.{i}.ln_2.bias", "blocks.{i}.ln_2.beta", Same),
    rule("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.input.weight", Same),
    rule("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.input.bias", Same),
    rule(
        "h.{i}.mlp.c_proj.weight",
        "blocks.{i}.mlp.output.weight",
        Same,
    ),
    rule("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.output.bias", Same),
    rule("ln_f.weight", "ln_f.gamma", Same),
    rule("ln_f.bias", "ln_f.beta", Same),
];

/// An untied head is an `nn.Linear` without bias: `[vocab, n_embd]` in HF.
const LM_HEAD: &[KeyRule] = &[rule_if(
    When::Untied,
    "lm_head.weight",
    "lm_head.weight",
    Transposed,
)];

/// `GPT2ForSequenceClassification`'s score: an `nn.Linear` without bias, `[num_labels, n_embd]`.
const SCORE: &[KeyRule] = &[rule("score.weight", "score.weight", Transposed)];

/// GPT-2's table.
pub static TABLE: KeyTable = KeyTable {
    family: Family::Gpt2,
    body: BODY,
    pooler: &[],
    heads: &[
        (Architecture::Gpt2LmHeadModel, LM_HEAD),
        (Architecture::Gpt2ForSequenceClassification, SCORE),
    ],
    // transformers re-ties a GPT-2 head to wte whatever the file holds; zoo does the same.
    tied_output: None,
    ignored: &[
        // The causal-mask buffers older checkpoints saved.
        "h.{i}.attn.bias",
        "h.{i}.attn.masked_bias",
        // Tied to wte.weight.
        "lm_head.weight",
    ],
    aliases: &[],
};
