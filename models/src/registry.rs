//! Which model classes zoo has and how an HF `config.json` picks one: the families, their configs,
//! and the declarative list of classes ([`classes!`]) that generates [`Architecture`] and
//! [`AnyModel`]. Presets are in [`crate::presets`], parameter-tree utilities in [`crate::params`].

use burn::module::Module;
use burn::tensor::backend::Backend;
use serde_json::Value;

use crate::ModelError;
use crate::bert::{BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel};
use crate::gpt2::{Gpt2Config, Gpt2ForSequenceClassification, Gpt2LmHeadModel, Gpt2Model};
use crate::io::{EncoderInput, ModelClass};
pub use crate::io::{Logits, ModelOutput};
use crate::llama::{LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel};
use crate::roberta::{RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel};
use crate::t5::{T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Model};

/// A model family: one file in `models/src`, one key table in `checkpoints-convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// BERT (`model_type: "bert"`).
    Bert,
    /// RoBERTa (`model_type: "roberta"`).
    Roberta,
    /// GPT-2, and the GPT-3 sizes and CPM-1 built on it (`model_type: "gpt2"`).
    Gpt2,
    /// T5, T5 v1.1, mT5, FLAN-T5 and CPM-2 (`model_type: "t5"` or `"mt5"`).
    T5,
    /// Llama 2 / 3.x, Mistral and Qwen2 / 2.5 (`model_type: "llama"`, `"mistral"`, `"qwen2"`).
    Llama,
}

impl Family {
    /// Every family, in `zoo list` order.
    pub const ALL: [Family; 5] = [
        Family::Bert,
        Family::Roberta,
        Family::Gpt2,
        Family::T5,
        Family::Llama,
    ];

    /// HF's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta => "roberta",
            Self::Gpt2 => "gpt2",
            Self::T5 => "t5",
            Self::Llama => "llama",
        }
    }

    /// Parses HF's `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Self, ModelError> {
        match model_type {
            "mt5" => return Ok(Self::T5),
            "mistral" | "qwen2" => return Ok(Self::Llama),
            _ => {}
        }
        Self::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
            .ok_or_else(|| {
                ModelError::config(
                    "model_type",
                    format!(
                        "unknown model_type '{model_type}' (zoo knows: {})",
                        Self::ALL.map(Self::model_type).join(", ")
                    ),
                )
            })
    }

    /// Where the body's keys sit under a head, in HF and in zoo: `bert.` / `roberta.` /
    /// `transformer.`.
    pub fn body_prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert.",
            Self::Roberta => "roberta.",
            Self::Gpt2 => "transformer.",
            // T5 classes share one key layout (shared, encoder, decoder, lm_head).
            Self::T5 => "",
            Self::Llama => "model.",
        }
    }

    /// Parses an HF `config.json` into this family's config and validates it.
    pub fn parse_config(self, value: &Value) -> Result<ModelConfig, ConfigError> {
        let config = match self {
            Self::Bert | Self::Roberta => {
                ModelConfig::Bert(serde_json::from_value(value.clone()).map_err(ConfigError::Json)?)
            }
            Self::Gpt2 => {
                ModelConfig::Gpt2(serde_json::from_value(value.clone()).map_err(ConfigError::Json)?)
            }
            Self::T5 => {
                ModelConfig::T5(serde_json::from_value(value.clone()).map_err(ConfigError::Json)?)
            }
            Self::Llama => {
                ModelConfig::Llama(LlamaConfig::from_hf(value).map_err(ConfigError::Json)?)
            }
        };
        config.validate().map_err(ConfigError::Model)?;
        Ok(config)
    }
}

/// Why a `config.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not the schema (a field of the wrong type, say).
    #[error(transparent)]
    Json(serde_json::Error),
    /// Well-formed, but a value zoo cannot use.
    #[error(transparent)]
    Model(ModelError),
}

/// The config of any family.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// BERT and RoBERTa.
    Bert(BertConfig),
    /// GPT-2, GPT-3 sizes, CPM-1.
    Gpt2(Gpt2Config),
    /// T5, v1.1, mT5, FLAN-T5, CPM-2.
    T5(T5Config),
    /// Llama, Mistral, Qwen2.
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Checks the config, naming the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Self::Bert(c) => c.validate(),
            Self::Gpt2(c) => c.validate(),
            Self::T5(c) => c.validate(),
            Self::Llama(c) => c.validate(),
        }
    }

    /// Number of (encoder) layers.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Bert(c) => c.num_hidden_layers,
            Self::Gpt2(c) => c.n_layer,
            Self::T5(c) => c.num_layers,
            Self::Llama(c) => c.num_hidden_layers,
        }
    }

    /// Number of decoder layers of an encoder-decoder model (0 otherwise).
    pub fn num_decoder_layers(&self) -> usize {
        match self {
            Self::T5(c) => c.decoder_layers(),
            _ => 0,
        }
    }

    /// Whether the LM head shares the token embeddings.
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            Self::Bert(c) => c.tie_word_embeddings,
            Self::Gpt2(c) => c.tie_word_embeddings,
            Self::T5(c) => c.tie_word_embeddings,
            Self::Llama(c) => c.tie_word_embeddings,
        }
    }

    /// Whether the feed-forward layers are gated (T5 v1.1 and later).
    pub fn gated_ffn(&self) -> bool {
        match self {
            Self::T5(c) => c.activation().is_ok_and(|(_, gated)| gated),
            Self::Llama(_) => true,
            _ => false,
        }
    }

    /// Whether a checkpoint's own output head unties it although the config says tied: true for
    /// T5 configs written by transformers 5 (they carry `scale_decoder_outputs`).
    pub fn head_tie_follows_checkpoint(&self) -> bool {
        matches!(self, Self::T5(c) if c.scale_decoder_outputs.is_some())
    }

    /// Unties the output head from the token embeddings (a transformers-5 T5 config says
    /// `tie_word_embeddings: true` even when the checkpoint has its own `lm_head`).
    pub fn untie_word_embeddings(&mut self) {
        match self {
            Self::Bert(c) => c.tie_word_embeddings = false,
            Self::Gpt2(c) => c.tie_word_embeddings = false,
            Self::Llama(c) => c.tie_word_embeddings = false,
            Self::T5(c) => {
                c.scale_decoder_outputs = Some(c.scales_decoder_output());
                c.tie_word_embeddings = false;
            }
        }
    }

    /// The same config with every dropout probability set to `p`.
    pub fn with_dropout(self, p: f64) -> Self {
        match self {
            Self::Bert(c) => Self::Bert(c.with_dropout(p)),
            Self::Gpt2(c) => Self::Gpt2(c.with_dropout(p)),
            Self::T5(c) => Self::T5(c.with_dropout(p)),
            Self::Llama(c) => Self::Llama(c.with_dropout(p)),
        }
    }

    /// The padding id, when the config names one.
    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            Self::Bert(c) => c.pad_token_id.map(|id| id as u32),
            Self::Gpt2(c) => c.pad_token_id,
            Self::T5(c) => c.pad_token_id,
            Self::Llama(c) => c.pad_token_id,
        }
    }

    /// The T5 config, or an error naming what was expected.
    pub fn as_t5(&self) -> Result<&T5Config, ModelError> {
        match self {
            Self::T5(c) => Ok(c),
            _ => Err(ModelError::Unsupported(
                "a non-T5 config for a T5 class".into(),
            )),
        }
    }

    /// The BERT config, or an error naming what was expected.
    pub fn as_bert(&self) -> Result<&BertConfig, ModelError> {
        match self {
            Self::Bert(c) => Ok(c),
            _ => Err(ModelError::Unsupported(
                "a non-BERT config for a BERT-family class".into(),
            )),
        }
    }

    /// The Llama-family config, or an error naming what was expected.
    pub fn as_llama(&self) -> Result<&LlamaConfig, ModelError> {
        match self {
            Self::Llama(c) => Ok(c),
            _ => Err(ModelError::Unsupported(
                "a non-Llama config for a Llama-family class".into(),
            )),
        }
    }

    /// The GPT-2 config, or an error naming what was expected.
    pub fn as_gpt2(&self) -> Result<&Gpt2Config, ModelError> {
        match self {
            Self::Gpt2(c) => Ok(c),
            _ => Err(ModelError::Unsupported(
                "a non-GPT-2 config for a GPT-2 class".into(),
            )),
        }
    }
}

/// Counts the rows of [`classes!`].
macro_rules! count {
    () => { 0usize };
    ($head:ident $($tail:ident)*) => { 1usize + count!($($tail)*) };
}

/// The model classes, one row each: `Variant(ModelType) = "transformers name", Family,
/// config accessor, base, pooler;` — whether it is the bare body (keys without the `bert.` /
/// `roberta.` / `transformer.` prefix) and whether it has BERT's tanh pooler. Generates
/// [`Architecture`], [`AnyModel`] and their dispatch; what a class does is its
/// [`ModelClass`] impl beside the model.
macro_rules! classes {
    ($(
        $(#[$doc:meta])*
        $variant:ident($model:ident) = $hf:literal, $family:ident, $config:ident,
        base: $base:literal, pooler: $pooler:literal;
    )*) => {
        /// A model class, named as in transformers.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Architecture {
            $($(#[$doc])* $variant,)*
        }

        impl Architecture {
            /// Every architecture.
            pub const ALL: [Architecture; count!($($variant)*)] = [$(Self::$variant),*];

            /// The transformers class name.
            pub fn hf_name(self) -> &'static str {
                match self {
                    $(Self::$variant => $hf,)*
                }
            }

            /// The family the class belongs to.
            pub fn family(self) -> Family {
                match self {
                    $(Self::$variant => Family::$family,)*
                }
            }

            /// Whether this is the bare body (keys without the `bert.` / `roberta.` /
            /// `transformer.` prefix).
            pub fn is_base(self) -> bool {
                match self {
                    $(Self::$variant => $base,)*
                }
            }

            /// Whether the class has BERT's tanh pooler (the MLM and RoBERTa classification heads
            /// do not).
            pub fn has_pooler(self) -> bool {
                match self {
                    $(Self::$variant => $pooler,)*
                }
            }
        }

        /// Any zoo model, so that commands can run whatever a directory holds.
        #[derive(Module, Debug)]
        pub enum AnyModel<B: Backend> {
            $($(#[$doc])* $variant($model<B>),)*
        }

        impl<B: Backend> AnyModel<B> {
            /// Builds `architecture` from `config` with fresh (lazy) weights.
            pub fn new(
                architecture: Architecture,
                config: &ModelConfig,
                device: &B::Device,
            ) -> Result<Self, ModelError> {
                Ok(match architecture {
                    $(Architecture::$variant => {
                        Self::$variant($model::build(config.$config()?, device)?)
                    })*
                })
            }

            /// Runs the model (see [`ModelClass::run`]).
            pub fn forward(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
                match self {
                    $(Self::$variant(m) => m.run(input),)*
                }
            }

            /// The longest input the position table allows.
            pub fn max_sequence_length(&self) -> usize {
                match self {
                    $(Self::$variant(m) => m.max_sequence_length(),)*
                }
            }

            /// Number of token ids the model accepts.
            pub fn vocab_size(&self) -> usize {
                match self {
                    $(Self::$variant(m) => ModelClass::vocab_size(m),)*
                }
            }

            /// Generates continuations (see [`ModelClass::generate`]); `None` when the class has
            /// no LM head.
            pub fn generate(
                &self,
                prompts: &[Vec<u32>],
                config: &crate::generation::GenerationConfig,
                device: &B::Device,
                on_tokens: &mut dyn FnMut(&[Option<u32>]),
            ) -> Option<Result<crate::generation::Generated, crate::generation::GenerationError>> {
                match self {
                    $(Self::$variant(m) => m.generate(prompts, config, device, on_tokens),)*
                }
            }
        }
    };
}

classes! {
    /// `BertModel`: encoder and pooler.
    BertModel(BertModel) = "BertModel", Bert, as_bert, base: true, pooler: true;
    /// `BertForMaskedLM`: encoder and MLM head.
    BertForMaskedLM(BertForMaskedLM) = "BertForMaskedLM", Bert, as_bert,
        base: false, pooler: false;
    /// `BertForSequenceClassification`: encoder, pooler and linear classifier.
    BertForSequenceClassification(BertForSequenceClassification) =
        "BertForSequenceClassification", Bert, as_bert, base: false, pooler: true;
    /// `RobertaModel`: encoder and pooler.
    RobertaModel(RobertaModel) = "RobertaModel", Roberta, as_bert, base: true, pooler: true;
    /// `RobertaForMaskedLM`: encoder and MLM head.
    RobertaForMaskedLM(RobertaForMaskedLM) = "RobertaForMaskedLM", Roberta, as_bert,
        base: false, pooler: false;
    /// `RobertaForSequenceClassification`: encoder and classification head.
    RobertaForSequenceClassification(RobertaForSequenceClassification) =
        "RobertaForSequenceClassification", Roberta, as_bert, base: false, pooler: false;
    /// `GPT2Model`: the decoder stack.
    Gpt2Model(Gpt2Model) = "GPT2Model", Gpt2, as_gpt2, base: true, pooler: false;
    /// `GPT2LMHeadModel`: the decoder stack and the (tied) LM head.
    Gpt2LmHeadModel(Gpt2LmHeadModel) = "GPT2LMHeadModel", Gpt2, as_gpt2,
        base: false, pooler: false;
    /// `GPT2ForSequenceClassification`: the decoder stack and a score at the last real token.
    Gpt2ForSequenceClassification(Gpt2ForSequenceClassification) =
        "GPT2ForSequenceClassification", Gpt2, as_gpt2, base: false, pooler: false;
    /// `T5Model`: encoder and decoder.
    T5Model(T5Model) = "T5Model", T5, as_t5, base: false, pooler: false;
    /// `T5ForConditionalGeneration`: encoder, decoder and LM head.
    T5ForConditionalGeneration(T5ForConditionalGeneration) = "T5ForConditionalGeneration", T5,
        as_t5, base: false, pooler: false;
    /// `T5EncoderModel`: the encoder alone.
    T5EncoderModel(T5EncoderModel) = "T5EncoderModel", T5, as_t5, base: false, pooler: false;
    /// `LlamaModel`: the decoder stack (also Mistral's and Qwen2's).
    LlamaModel(LlamaModel) = "LlamaModel", Llama, as_llama, base: true, pooler: false;
    /// `LlamaForCausalLM`: the decoder stack and the LM head.
    LlamaForCausalLM(LlamaForCausalLM) = "LlamaForCausalLM", Llama, as_llama,
        base: false, pooler: false;
    /// `MistralForCausalLM`: a Llama with Mistral's config (sliding window).
    MistralForCausalLM(LlamaForCausalLM) = "MistralForCausalLM", Llama, as_llama,
        base: false, pooler: false;
    /// `Qwen2ForCausalLM`: a Llama with Qwen2's config (q/k/v biases).
    Qwen2ForCausalLM(LlamaForCausalLM) = "Qwen2ForCausalLM", Llama, as_llama,
        base: false, pooler: false;
    /// `LlamaForSequenceClassification`: the stack and a score at the last real token.
    LlamaForSequenceClassification(LlamaForSequenceClassification) =
        "LlamaForSequenceClassification", Llama, as_llama, base: false, pooler: false;
    /// `MistralForSequenceClassification`: the same with Mistral's config.
    MistralForSequenceClassification(LlamaForSequenceClassification) =
        "MistralForSequenceClassification", Llama, as_llama, base: false, pooler: false;
    /// `Qwen2ForSequenceClassification`: the same with Qwen2's config.
    Qwen2ForSequenceClassification(LlamaForSequenceClassification) =
        "Qwen2ForSequenceClassification", Llama, as_llama, base: false, pooler: false;
}

impl Architecture {
    /// The causal-LM class of a Llama-family config, by its `model_type`.
    pub fn for_llama(config: &LlamaConfig) -> Self {
        match config.model_type.as_str() {
            "mistral" => Self::MistralForCausalLM,
            "qwen2" => Self::Qwen2ForCausalLM,
            _ => Self::LlamaForCausalLM,
        }
    }

    /// The sequence-classification class of a Llama-family config, by its `model_type`.
    pub fn llama_classifier(config: &LlamaConfig) -> Self {
        match config.model_type.as_str() {
            "mistral" => Self::MistralForSequenceClassification,
            "qwen2" => Self::Qwen2ForSequenceClassification,
            _ => Self::LlamaForSequenceClassification,
        }
    }

    /// The bare encoder of a family.
    pub fn base(family: Family) -> Self {
        match family {
            Family::Bert => Self::BertModel,
            Family::Roberta => Self::RobertaModel,
            Family::Gpt2 => Self::Gpt2Model,
            Family::T5 => Self::T5Model,
            Family::Llama => Self::LlamaModel,
        }
    }

    /// Picks the class for an HF `config.json`: its first `architectures` entry when zoo has it;
    /// `*ForPreTraining` as the MLM model (its next-sentence head is left unused); otherwise the
    /// family's bare encoder (head weights are then reported as unused).
    pub fn from_hf_config(config: &Value) -> Result<Self, ModelError> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ModelError::config(
                    "model_type",
                    "missing (zoo needs it to pick the family)".into(),
                )
            })?;
        let family = Family::from_model_type(model_type)?;
        let named = config
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        let Some(name) = named else {
            return Ok(Self::base(family));
        };
        // mT5's classes are T5's.
        let name = name
            .strip_prefix('M')
            .filter(|n| n.starts_with("T5"))
            .unwrap_or(name);
        if let Some(arch) = Self::ALL
            .into_iter()
            .find(|a| a.hf_name() == name && a.family() == family)
        {
            return Ok(arch);
        }
        Ok(match (family, name.ends_with("ForPreTraining")) {
            (Family::Bert, true) => Self::BertForMaskedLM,
            (Family::Roberta, true) => Self::RobertaForMaskedLM,
            // GPT2DoubleHeadsModel's LM head is the same tied head.
            (Family::Gpt2, _) if name == "GPT2DoubleHeadsModel" => Self::Gpt2LmHeadModel,
            _ => Self::base(family),
        })
    }

    /// Parses a transformers class name.
    pub fn from_hf_name(name: &str) -> Result<Self, ModelError> {
        Self::ALL
            .into_iter()
            .find(|a| a.hf_name() == name)
            .ok_or_else(|| {
                ModelError::Unsupported(format!(
                    "architecture '{name}' (zoo has: {})",
                    Self::ALL.map(|a| a.hf_name()).join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::param_infos;
    use bmtrain_backend::Cpu;

    #[test]
    fn architecture_comes_from_the_config() {
        let config =
            serde_json::json!({"model_type": "bert", "architectures": ["BertForPreTraining"]});
        assert_eq!(
            Architecture::from_hf_config(&config).unwrap(),
            Architecture::BertForMaskedLM
        );
        let config = serde_json::json!({"model_type": "roberta"});
        assert_eq!(
            Architecture::from_hf_config(&config).unwrap(),
            Architecture::RobertaModel
        );
        let config =
            serde_json::json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]});
        assert_eq!(
            Architecture::from_hf_config(&config).unwrap(),
            Architecture::Qwen2ForCausalLM
        );
        let config = serde_json::json!({"model_type": "mamba"});
        let err = Architecture::from_hf_config(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'mamba'"), "{err}");
    }

    #[test]
    fn param_names_follow_the_module_tree() {
        let device = Default::default();
        let mut config = BertConfig::new(10);
        config.hidden_size = 4;
        config.num_attention_heads = 1;
        config.intermediate_size = 8;
        config.num_hidden_layers = 1;
        let model = AnyModel::<Cpu>::new(
            Architecture::BertForMaskedLM,
            &ModelConfig::Bert(config),
            &device,
        )
        .unwrap();
        let names: Vec<String> = param_infos::<Cpu, _>(&model)
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert!(
            names.contains(&"bert.encoder.layers.0.attention.query.weight".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"lm_head.bias".to_string()), "{names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("bert.pooler")),
            "{names:?}"
        );
    }
}
