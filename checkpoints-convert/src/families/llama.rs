//! The Llama family's HF ⇄ zoo key table (transformers `modeling_llama.py`, and Mistral's and
//! Qwen2's, which save the same names). Every projection is an `nn.Linear` (`[out, in]` in HF,
//! transposed for burn); the MLP's `gate_proj` / `up_proj` / `down_proj` are zoo's gated
//! feed-forward `gate` / `input` / `output`. Biases exist by config: Qwen2's q/k/v, Llama's
//! `attention_bias` (q/k/v/o) and `mlp_bias`.

use models::{Architecture, Family};

use super::{KeyRule, KeyTable, Layout::*, When, rule, rule_if};

/// The decoder stack, relative to the `model.` prefix.
const BODY: &[KeyRule] = &[
    rule("embed_tokens.weight", "embed_tokens.weight", Same),
    rule(
        "layers.{i}.input_layernorm.weight",
        "layers.{i}.input_layernorm.weight",
        Same,
    ),
    rule(
        "layers.{i}.self_attn.q_proj.weight",
        "layers.{i}.self_attn.q_proj.weight",
        Transposed,
    ),
    rule_if(
        When::QkvBias,
        "layers.{i}.self_attn.q_proj.bias",
        "layers.{i}.self_attn.q_proj.bias",
        Same,
    ),
    rule(
        "layers.{i}.self_attn.k_proj.weight",
        "layers.{i}.self_attn.k_proj.weight",
        Transposed,
    ),
    rule_if(
        When::QkvBias,
        "layers.{i}.self_attn.k_proj.bias",
        "layers.{i}.self_attn.k_proj.bias",
        Same,
    ),
    rule(
        "layers.{i}.self_attn.v_proj.weight",
        "layers.{i}.self_attn.v_proj.weight",
        Transposed,
    ),
    rule_if(
        When::QkvBias,
        "layers.{i}.self_attn.v_proj.bias",
        "layers.{i}.self_attn.v_proj.bias",
        Same,
    ),
    rule(
        "layers.{i}.self_attn.o_proj.weight",
        "layers.{i}.self_attn.o_proj.weight",
        Transposed,
    ),
    rule_if(
        When::OutputBias,
        "layers.{i}.self_attn.o_proj.bias",
        "layers.{i}.self_attn.o_proj.bias",
        Same,
    ),
    rule(
        "layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.post_attention_layernorm.weight",
        Same,
    ),
    rule(
        "layers.{i}.mlp.gate_proj.weight",
        "layers.{i}.mlp.gate.weight",
        Transposed,
    ),
    rule_if(
        When::MlpBias,
        "layers.{i}.mlp.gate_proj.bias",
        "layers.{i}.mlp.gate.bias",
        Same,
    ),
    rule(
        "layers.{i}.mlp.up_proj.weight",
        "layers.{i}.mlp.input.weight",
        Transposed,
    ),
    rule_if(
        When::MlpBias,
        "layers.{i}.mlp.up_proj.bias",
        "layers.{i}.mlp.input.bias",
        Same,
    ),
    rule(
        "layers.{i}.mlp.down_proj.weight",
        "layers.{i}.mlp.output.weight",
        Transposed,
    ),
    rule_if(
        When::MlpBias,
        "layers.{i}.mlp.down_proj.bias",
        "layers.{i}.mlp.output.bias",
        Same,
    ),
    rule("norm.weight", "norm.weight", Same),
];

/// An untied head: `nn.Linear` without bias, `[vocab, hidden]` in HF.
const LM_HEAD: &[KeyRule] = &[rule_if(
    When::Untied,
    "lm_head.weight",
    "lm_head.weight",
    Transposed,
)];

/// The sequence classifiers' score: an `nn.Linear` without bias, `[num_labels, hidden]` in HF.
const SCORE: &[KeyRule] = &[rule("score.weight", "score.weight", Transposed)];

/// The Llama family's table.
pub static TABLE: KeyTable = KeyTable {
    family: Family::Llama,
    body: BODY,
    pooler: &[],
    heads: &[
        (Architecture::LlamaForCausalLM, LM_HEAD),
        (Architecture::MistralForCausalLM, LM_HEAD),
        (Architecture::Qwen2ForCausalLM, LM_HEAD),
        (Architecture::LlamaForSequenceClassification, SCORE),
        (Architecture::MistralForSequenceClassification, SCORE),
        (Architecture::Qwen2ForSequenceClassification, SCORE),
    ],
    // transformers re-ties a tied head to embed_tokens whatever the file holds; zoo does too.
    tied_output: None,
    ignored: &[
        // The rotary buffers older checkpoints saved (recomputed from the config).
        "layers.{i}.self_attn.rotary_emb.inv_freq",
        "rotary_emb.inv_freq",
        // Tied to embed_tokens.weight.
        "lm_head.weight",
    ],
    aliases: &[],
};
