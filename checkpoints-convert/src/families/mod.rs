//! HF ⇄ zoo key mapping: one table per family (data), and the code that applies a table.
//!
//! A table row maps an HF key to a zoo key. `{i}` stands for a layer index. Rows of the encoder
//! ("body") are written without the `bert.` / `roberta.` prefix that transformers adds under a
//! head; the prefix is added for head models and is optional when reading (a bare `BertModel` can
//! load a `BertForMaskedLM` checkpoint and the other way round, as in transformers).
//!
//! HF `nn.Linear` stores weights `[out, in]`, burn's `Linear` `[in, out]`: those rows are
//! [`Layout::Transposed`]. GPT-2's `Conv1D` already stores `[in, out]` ([`Layout::Same`]), and its
//! fused `c_attn` is split into zoo's query/key/value by three [`Layout::Split`] rows. Every layout
//! moves bytes only, so HF → zoo → HF is bit-exact.

pub mod bert;
pub mod gpt2;
pub mod llama;
pub mod roberta;
pub mod t5;

use std::collections::BTreeMap;

use models::{Architecture, Family};

/// How a tensor's layout differs between HF and zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Same shape and order.
    Same,
    /// A 2-D weight whose dimensions are swapped (`nn.Linear` ↔ burn `Linear`).
    Transposed,
    /// Slice `part` of `parts` equal slices of the HF tensor's last dimension (several zoo
    /// tensors fused into one HF tensor).
    Split {
        /// Which slice.
        part: usize,
        /// How many slices.
        parts: usize,
    },
}

/// When a row applies, depending on the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Always.
    Always,
    /// Only when the output head is not the token embeddings (`tie_word_embeddings: false`).
    Untied,
    /// Only with gated feed-forward layers (T5 v1.1: `wi_0`, `wi_1`).
    Gated,
    /// Only with plain feed-forward layers (T5 v1.0: `wi`).
    NotGated,
    /// Only when q/k/v projections have biases (Qwen2; Llama's `attention_bias`).
    QkvBias,
    /// Only when the attention output projection has a bias (Llama's `attention_bias`).
    OutputBias,
    /// Only when the MLP projections have biases (Llama's `mlp_bias`).
    MlpBias,
}

/// One row of a key table.
#[derive(Debug, Clone, Copy)]
pub struct KeyRule {
    /// The HF key, with `{i}` for an (encoder) layer index or `{d}` for a decoder layer index.
    pub hf: &'static str,
    /// The zoo key, with the same placeholder.
    pub zoo: &'static str,
    /// Layout difference.
    pub layout: Layout,
    /// When the row applies.
    pub when: When,
}

/// Shorthand for table rows: `rule("hf", "zoo", Layout::Same)`.
pub const fn rule(hf: &'static str, zoo: &'static str, layout: Layout) -> KeyRule {
    KeyRule {
        hf,
        zoo,
        layout,
        when: When::Always,
    }
}

/// A row that applies only `when`.
pub const fn rule_if(when: When, hf: &'static str, zoo: &'static str, layout: Layout) -> KeyRule {
    KeyRule {
        hf,
        zoo,
        layout,
        when,
    }
}

/// What of a config decides which rows apply and how often layer rows repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Layers (`{i}`).
    pub layers: usize,
    /// Decoder layers (`{d}`).
    pub decoder_layers: usize,
    /// Whether the output head is the token embeddings.
    pub tied: bool,
    /// Whether feed-forward layers are gated.
    pub gated: bool,
    /// Llama family: which optional biases exist (`[q/k/v, o, mlp]`; all true elsewhere, where
    /// no row asks).
    pub biases: [bool; 3],
}

impl Variant {
    /// The variant of a config.
    pub fn of(config: &models::ModelConfig) -> Self {
        Self {
            layers: config.num_layers(),
            decoder_layers: config.num_decoder_layers(),
            tied: config.tie_word_embeddings(),
            gated: config.gated_ffn(),
            biases: config.optional_biases(),
        }
    }

    fn applies(&self, when: When) -> bool {
        match when {
            When::Always => true,
            When::Untied => !self.tied,
            When::Gated => self.gated,
            When::NotGated => !self.gated,
            When::QkvBias => self.biases[0],
            When::OutputBias => self.biases[1],
            When::MlpBias => self.biases[2],
        }
    }
}

/// Everything zoo knows about a family's HF checkpoints.
#[derive(Debug)]
pub struct KeyTable {
    /// The family.
    pub family: Family,
    /// Encoder rows, relative to the body prefix.
    pub body: &'static [KeyRule],
    /// Pooler rows, relative to the body prefix, used when the architecture has a pooler.
    pub pooler: &'static [KeyRule],
    /// Rows of each head, as full keys.
    pub heads: &'static [(Architecture, &'static [KeyRule])],
    /// `(head, embeddings)`: an HF output head that must equal the token embeddings when the
    /// config ties them (full keys). Checked on load; `None` when not checked.
    pub tied_output: Option<(&'static str, &'static str)>,
    /// HF keys that are not parameters (buffers) or are tied copies of another parameter; read and
    /// dropped. Body-relative or full; `{i}` matches a layer index.
    pub ignored: &'static [&'static str],
    /// Duplicate names of one parameter: `(alias, canonical)`. The alias is used only when the
    /// canonical key is absent (old checkpoints saved `cls.predictions.decoder.bias` alone).
    pub aliases: &'static [(&'static str, &'static str)],
}

/// The table of a family.
pub fn table(family: Family) -> &'static KeyTable {
    match family {
        Family::Bert => &bert::TABLE,
        Family::Roberta => &roberta::TABLE,
        Family::Gpt2 => &gpt2::TABLE,
        Family::T5 => &t5::TABLE,
        Family::Llama => &llama::TABLE,
    }
}

/// One concrete key pair, with layer indices filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// Full HF key, as transformers saves this architecture.
    pub hf: String,
    /// Full zoo key (the burn module path).
    pub zoo: String,
    /// Layout difference.
    pub layout: Layout,
}

impl KeyTable {
    /// Every key pair of `architecture` in the config `variant`, in table order.
    pub fn pairs(&self, architecture: Architecture, variant: &Variant) -> Vec<KeyPair> {
        let prefix = if architecture.is_base() {
            ""
        } else {
            self.family.body_prefix()
        };
        let mut pairs = Vec::new();
        let pooler = if architecture.has_pooler() {
            self.pooler
        } else {
            &[]
        };
        for rule in self.body.iter().chain(pooler) {
            if !variant.applies(rule.when) {
                continue;
            }
            for (hf, zoo) in expand(rule, variant) {
                pairs.push(KeyPair {
                    hf: format!("{prefix}{hf}"),
                    zoo: format!("{prefix}{zoo}"),
                    layout: rule.layout,
                });
            }
        }
        for (_, rules) in self.heads.iter().filter(|(a, _)| *a == architecture) {
            for rule in rules.iter().filter(|r| variant.applies(r.when)) {
                for (hf, zoo) in expand(rule, variant) {
                    pairs.push(KeyPair {
                        hf,
                        zoo,
                        layout: rule.layout,
                    });
                }
            }
        }
        pairs
    }

    /// Puts an HF key into the form [`KeyTable::pairs`] uses for `architecture`:
    /// old TF-era `gamma`/`beta` become `weight`/`bias`, and the body prefix is added or removed.
    pub fn normalize_hf_key(&self, key: &str, architecture: Architecture) -> String {
        let key = rename_norm_params(key);
        let prefix = self.family.body_prefix();
        match (architecture.is_base(), key.strip_prefix(prefix)) {
            (true, Some(body)) => body.to_string(),
            (false, None) if self.is_body_key(&key) => format!("{prefix}{key}"),
            _ => key,
        }
    }

    /// Whether an HF key (normalised) is dropped on purpose.
    pub fn is_ignored(&self, key: &str) -> bool {
        let body = key.strip_prefix(self.family.body_prefix()).unwrap_or(key);
        self.ignored
            .iter()
            .any(|pattern| matches_pattern(pattern, key) || matches_pattern(pattern, body))
    }

    /// The canonical key of an alias, if `key` is one.
    pub fn canonical(&self, key: &str) -> Option<&'static str> {
        self.aliases
            .iter()
            .find(|(alias, _)| *alias == key)
            .map(|(_, c)| *c)
    }

    /// Whether an unprefixed key belongs to the encoder: its first segment is one of the body
    /// rows' first segments (`embeddings`, `encoder`, `pooler`).
    fn is_body_key(&self, key: &str) -> bool {
        if self.family.body_prefix().is_empty() {
            return false;
        }
        let root = key.split('.').next().unwrap_or_default();
        self.body
            .iter()
            .chain(self.pooler)
            .any(|r| r.hf.split('.').next() == Some(root))
    }
}

/// Whether `key` is `pattern` with each `{i}` segment replaced by a number.
fn matches_pattern(pattern: &str, key: &str) -> bool {
    let (mut p, mut k) = (pattern.split('.'), key.split('.'));
    loop {
        match (p.next(), k.next()) {
            (None, None) => return true,
            (Some("{i}"), Some(segment))
                if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// `LayerNorm.gamma` → `LayerNorm.weight`, `LayerNorm.beta` → `LayerNorm.bias` (TF-converted BERTs).
fn rename_norm_params(key: &str) -> String {
    if let Some(stem) = key.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = key.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        key.to_string()
    }
}

fn expand(rule: &KeyRule, variant: &Variant) -> Vec<(String, String)> {
    for (placeholder, count) in [("{i}", variant.layers), ("{d}", variant.decoder_layers)] {
        if rule.hf.contains(placeholder) {
            return (0..count)
                .map(|i| {
                    (
                        rule.hf.replace(placeholder, &i.to_string()),
                        rule.zoo.replace(placeholder, &i.to_string()),
                    )
                })
                .collect();
        }
    }
    vec![(rule.hf.to_string(), rule.zoo.to_string())]
}

/// HF key → its pairs (several when the HF tensor is split), for lookups.
pub fn by_hf_key(pairs: &[KeyPair]) -> BTreeMap<&str, Vec<&KeyPair>> {
    let mut map: BTreeMap<&str, Vec<&KeyPair>> = BTreeMap::new();
    for pair in pairs {
        map.entry(pair.hf.as_str()).or_default().push(pair);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn tiny(family: Family, tied: bool, gated: bool) -> models::ModelConfig {
        match family {
            Family::T5 => models::ModelConfig::T5(models::t5::T5Config {
                vocab_size: 11,
                d_model: 4,
                d_kv: 2,
                d_ff: 8,
                num_layers: 2,
                num_decoder_layers: Some(3),
                num_heads: 2,
                feed_forward_proj: if gated { "gated-gelu" } else { "relu" }.into(),
                tie_word_embeddings: tied,
                ..Default::default()
            }),
            // For the Llama family `gated` picks the biases: Qwen2's q/k/v, or every optional
            // bias of a Llama (`attention_bias`, `mlp_bias`).
            Family::Llama => {
                let model_type = if tied { "qwen2" } else { "llama" };
                let config = models::llama::LlamaConfig::from_hf(&serde_json::json!({
                    "model_type": model_type, "vocab_size": 11, "hidden_size": 8,
                    "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "tie_word_embeddings": tied,
                    "attention_bias": gated, "mlp_bias": gated,
                }))
                .unwrap();
                models::ModelConfig::Llama(config)
            }
            Family::Gpt2 => models::ModelConfig::Gpt2(models::gpt2::Gpt2Config {
                vocab_size: 11,
                n_positions: 8,
                n_embd: 4,
                n_layer: 2,
                n_head: 2,
                tie_word_embeddings: tied,
                ..Default::default()
            }),
            _ => {
                let mut config = models::bert::BertConfig::new(11);
                config.hidden_size = 4;
                config.num_attention_heads = 2;
                config.intermediate_size = 8;
                config.num_hidden_layers = 2;
                config.max_position_embeddings = 8;
                models::ModelConfig::Bert(config)
            }
        }
    }

    /// Every parameter of every model is covered by exactly one table row.
    #[test]
    fn tables_cover_every_parameter_of_every_architecture() {
        let device = Default::default();
        for architecture in Architecture::ALL {
            let family = architecture.family();
            let variants: &[(bool, bool)] = match family {
                Family::Gpt2 => &[(true, false), (false, false)],
                Family::T5 => &[(true, false), (false, true), (true, true)],
                Family::Llama => &[(true, false), (false, false), (false, true)],
                _ => &[(true, false)],
            };
            for &(tied, gated) in variants {
                let config = tiny(family, tied, gated);
                let model = models::AnyModel::<Flex>::new(architecture, &config, &device).unwrap();
                let mut params: Vec<String> = models::param_infos::<Flex, _>(&model)
                    .into_iter()
                    .map(|p| p.name)
                    .collect();
                let mut zoo: Vec<String> = table(family)
                    .pairs(architecture, &Variant::of(&config))
                    .into_iter()
                    .map(|p| p.zoo)
                    .collect();
                params.sort();
                zoo.sort();
                assert_eq!(params, zoo, "{architecture:?}, tied {tied}, gated {gated}");
            }
        }
    }

    #[test]
    fn ignored_patterns_match_layer_indices_only() {
        let t = table(Family::Gpt2);
        assert!(t.is_ignored("transformer.h.11.attn.masked_bias"));
        assert!(t.is_ignored("h.0.attn.bias"));
        assert!(!t.is_ignored("h.x.attn.bias"));
        assert!(!t.is_ignored("h.0.attn.c_attn.bias"));
    }

    #[test]
    fn hf_keys_are_normalised() {
        let t = table(Family::Bert);
        assert_eq!(
            t.normalize_hf_key("bert.embeddings.LayerNorm.gamma", Architecture::BertModel),
            "embeddings.LayerNorm.weight"
        );
        assert_eq!(
            t.normalize_hf_key(
                "encoder.layer.0.output.dense.weight",
                Architecture::BertForMaskedLM
            ),
            "bert.encoder.layer.0.output.dense.weight"
        );
        assert_eq!(
            t.normalize_hf_key("cls.predictions.bias", Architecture::BertForMaskedLM),
            "cls.predictions.bias"
        );
        assert!(t.is_ignored("bert.embeddings.position_ids"));
        assert_eq!(
            t.canonical("cls.predictions.decoder.bias"),
            Some("cls.predictions.bias")
        );
    }
}
