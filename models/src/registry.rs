//! Which model classes zoo has and how an HF `config.json` picks one: the families, their configs,
//! and the declarative list of classes ([`classes!`]) that generates [`Architecture`] and
//! [`AnyModel`]. Presets are in [`crate::presets`], parameter-tree utilities in [`crate::params`].

use burn::module::Module;
use burn::tensor::backend::Backend;
use serde_json::Value;

use crate::ModelError;
use crate::bert::{BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel};
use crate::gpt2::{Gpt2Config, Gpt2ForSequenceClassification, Gpt2LmHeadModel, Gpt2Model};
use crate::io::{EncoderInput, FamilyConfig, ModelClass};
pub use crate::io::{Logits, ModelOutput};
use crate::llama::{LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel};
use crate::roberta::{RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel};
use crate::t5::{T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Model};

/// Counts the rows of [`families!`] and [`classes!`].
macro_rules! count {
    () => { 0usize };
    ($head:ident $($tail:ident)*) => { 1usize + count!($($tail)*) };
}

/// The families and the configs they read, one row each. `configs`: `Variant(ConfigType), as_x;`
/// (the [`ModelConfig`] variants and their accessors). `families`: `Variant = "model_type"
/// ["other model_types"], body "prefix", config Variant, base Class;` — HF's `model_type`s, where
/// the body's keys sit under a head (`bert.`, `transformer.`, `model.`), which config the family
/// reads and its bare class. Generates [`Family`], [`ModelConfig`] and their dispatch; what a
/// config answers is its [`FamilyConfig`] impl beside it.
macro_rules! families {
    (
        configs {$(
            $(#[$cdoc:meta])*
            $cvariant:ident($config:ty), $accessor:ident;
        )*}
        families {$(
            $(#[$fdoc:meta])*
            $family:ident = $model_type:literal [$($alias:literal),*], body $body:literal,
                config $fconfig:ident, base $base:ident;
        )*}
    ) => {
        /// A model family: one file in `models/src`, one key table in `checkpoints-convert`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Family {
            $($(#[$fdoc])* $family,)*
        }

        impl Family {
            /// Every family, in `zoo list` order.
            pub const ALL: [Family; count!($($family)*)] = [$(Family::$family),*];

            /// HF's `model_type`.
            pub fn model_type(self) -> &'static str {
                match self {
                    $(Self::$family => $model_type,)*
                }
            }

            /// Parses HF's `model_type` (`mt5` is T5's, `mistral` and `qwen2` are Llama's).
            pub fn from_model_type(model_type: &str) -> Result<Self, ModelError> {
                match model_type {
                    $($model_type $(| $alias)* => Ok(Self::$family),)*
                    _ => Err(ModelError::config(
                        "model_type",
                        format!(
                            "unknown model_type '{model_type}' (zoo knows: {})",
                            [$($model_type $(, $alias)*),*].join(", ")
                        ),
                    )),
                }
            }

            /// Where the body's keys sit under a head, in HF and in zoo: `bert.` / `roberta.` /
            /// `transformer.` / `model.` (T5's classes share one layout: no prefix).
            pub fn body_prefix(self) -> &'static str {
                match self {
                    $(Self::$family => $body,)*
                }
            }

            /// Parses an HF `config.json` into this family's config and validates it.
            pub fn parse_config(self, value: &Value) -> Result<ModelConfig, ConfigError> {
                let config = match self {
                    $(Self::$family => ModelConfig::$fconfig(
                        FamilyConfig::from_hf(value).map_err(ConfigError::Json)?,
                    ),)*
                };
                config.validate().map_err(ConfigError::Model)?;
                Ok(config)
            }
        }

        impl Architecture {
            /// The bare class of a family.
            pub fn base(family: Family) -> Self {
                match family {
                    $(Family::$family => Self::$base,)*
                }
            }
        }

        /// The config of any family.
        #[derive(Debug, Clone, PartialEq)]
        pub enum ModelConfig {
            $($(#[$cdoc])* $cvariant($config),)*
        }

        impl ModelConfig {
            /// The config as its family's [`FamilyConfig`].
            fn family_config(&self) -> &dyn FamilyConfigObject {
                match self {
                    $(Self::$cvariant(c) => c,)*
                }
            }

            /// The same config with every dropout probability set to `p`.
            pub fn with_dropout(self, p: f64) -> Self {
                match self {
                    $(Self::$cvariant(c) => Self::$cvariant(c.with_dropout(p)),)*
                }
            }

            /// Sets the padding id.
            pub fn set_pad_token_id(&mut self, id: u32) {
                match self {
                    $(Self::$cvariant(c) => FamilyConfig::set_pad_token_id(c, id),)*
                }
            }

            /// Sets the number of labels of a sequence-classification head.
            pub fn set_num_labels(&mut self, labels: usize) {
                match self {
                    $(Self::$cvariant(c) => FamilyConfig::set_num_labels(c, labels),)*
                }
            }

            /// Unties the output head from the token embeddings (a transformers-5 T5 config says
            /// `tie_word_embeddings: true` even when the checkpoint has its own `lm_head`).
            pub fn untie_word_embeddings(&mut self) {
                match self {
                    $(Self::$cvariant(c) => FamilyConfig::untie_word_embeddings(c),)*
                }
            }

            $(
                /// The family's config, or an error naming what was expected.
                pub fn $accessor(&self) -> Result<&$config, ModelError> {
                    match self {
                        Self::$cvariant(c) => Ok(c),
                        #[allow(unreachable_patterns)]
                        _ => Err(ModelError::Unsupported(format!(
                            "a {} config for a class that reads {}",
                            self.kind(),
                            stringify!($cvariant)
                        ))),
                    }
                }
            )*

            /// The variant's name, for errors.
            fn kind(&self) -> &'static str {
                match self {
                    $(Self::$cvariant(_) => stringify!($cvariant),)*
                }
            }
        }
    };
}

/// [`FamilyConfig`]'s questions, object-safe, so that [`ModelConfig`] forwards them once.
trait FamilyConfigObject {
    fn validate(&self) -> Result<(), ModelError>;
    fn num_layers(&self) -> usize;
    fn num_decoder_layers(&self) -> usize;
    fn tie_word_embeddings(&self) -> bool;
    fn gated_ffn(&self) -> bool;
    fn optional_biases(&self) -> [bool; 3];
    fn head_tie_follows_checkpoint(&self) -> bool;
    fn pad_token_id(&self) -> Option<u32>;
    fn vocab_size(&self) -> usize;
    fn eos_token_ids(&self) -> Vec<u32>;
    fn end_of_text_tokens(&self) -> &'static [&'static str];
    fn max_positions(&self, family: Family) -> Option<usize>;
    fn model_type(&self) -> Option<&str>;
    fn activation_dims(&self) -> [usize; 3];
    fn to_hf(&self) -> Value;
}

impl<C: FamilyConfig> FamilyConfigObject for C {
    fn validate(&self) -> Result<(), ModelError> {
        FamilyConfig::validate(self)
    }
    fn num_layers(&self) -> usize {
        FamilyConfig::num_layers(self)
    }
    fn num_decoder_layers(&self) -> usize {
        FamilyConfig::num_decoder_layers(self)
    }
    fn tie_word_embeddings(&self) -> bool {
        FamilyConfig::tie_word_embeddings(self)
    }
    fn gated_ffn(&self) -> bool {
        FamilyConfig::gated_ffn(self)
    }
    fn optional_biases(&self) -> [bool; 3] {
        FamilyConfig::optional_biases(self)
    }
    fn head_tie_follows_checkpoint(&self) -> bool {
        FamilyConfig::head_tie_follows_checkpoint(self)
    }
    fn pad_token_id(&self) -> Option<u32> {
        FamilyConfig::pad_token_id(self)
    }
    fn vocab_size(&self) -> usize {
        FamilyConfig::vocab_size(self)
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        FamilyConfig::eos_token_ids(self)
    }
    fn end_of_text_tokens(&self) -> &'static [&'static str] {
        FamilyConfig::end_of_text_tokens(self)
    }
    fn max_positions(&self, family: Family) -> Option<usize> {
        FamilyConfig::max_positions(self, family)
    }
    fn model_type(&self) -> Option<&str> {
        FamilyConfig::model_type(self)
    }
    fn activation_dims(&self) -> [usize; 3] {
        FamilyConfig::activation_dims(self)
    }
    fn to_hf(&self) -> Value {
        FamilyConfig::to_hf(self)
    }
}

families! {
    configs {
        /// BERT and RoBERTa.
        Bert(BertConfig), as_bert;
        /// GPT-2, GPT-3 sizes, CPM-1.
        Gpt2(Gpt2Config), as_gpt2;
        /// T5, v1.1, mT5, FLAN-T5, CPM-2.
        T5(T5Config), as_t5;
        /// Llama, Mistral, Qwen2.
        Llama(LlamaConfig), as_llama;
    }
    families {
        /// BERT (`model_type: "bert"`).
        Bert = "bert" [], body "bert.", config Bert, base BertModel;
        /// RoBERTa (`model_type: "roberta"`).
        Roberta = "roberta" [], body "roberta.", config Bert, base RobertaModel;
        /// GPT-2, and the GPT-3 sizes and CPM-1 built on it (`model_type: "gpt2"`).
        Gpt2 = "gpt2" [], body "transformer.", config Gpt2, base Gpt2Model;
        /// T5, T5 v1.1, mT5, FLAN-T5 and CPM-2 (`model_type: "t5"` or `"mt5"`).
        T5 = "t5" ["mt5"], body "", config T5, base T5Model;
        /// Llama 2 / 3.x, Mistral and Qwen2 / 2.5 (`model_type: "llama"`, `"mistral"`, `"qwen2"`).
        Llama = "llama" ["mistral", "qwen2"], body "model.", config Llama, base LlamaModel;
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

impl ModelConfig {
    /// Checks the config, naming the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.family_config().validate()
    }

    /// Number of (encoder) layers.
    pub fn num_layers(&self) -> usize {
        self.family_config().num_layers()
    }

    /// Number of decoder layers of an encoder-decoder model (0 otherwise).
    pub fn num_decoder_layers(&self) -> usize {
        self.family_config().num_decoder_layers()
    }

    /// Whether the LM head shares the token embeddings.
    pub fn tie_word_embeddings(&self) -> bool {
        self.family_config().tie_word_embeddings()
    }

    /// Whether the feed-forward layers are gated (T5 v1.1 and later, the Llama family).
    pub fn gated_ffn(&self) -> bool {
        self.family_config().gated_ffn()
    }

    /// Which optional biases exist, `[q/k/v, attention output, MLP]` (the Llama family's depend
    /// on the config; every other family has all it has).
    pub fn optional_biases(&self) -> [bool; 3] {
        self.family_config().optional_biases()
    }

    /// Whether a checkpoint's own output head unties it although the config says tied: true for
    /// T5 configs written by transformers 5 (they carry `scale_decoder_outputs`).
    pub fn head_tie_follows_checkpoint(&self) -> bool {
        self.family_config().head_tie_follows_checkpoint()
    }

    /// The padding id, when the config names one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.family_config().pad_token_id()
    }

    /// Number of token ids the embeddings hold.
    pub fn vocab_size(&self) -> usize {
        self.family_config().vocab_size()
    }

    /// The end-of-text ids the config names (the first ends a document).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.family_config().eos_token_ids()
    }

    /// The id that ends a document: the first of the family's end-of-text tokens `tokenizer`
    /// knows (its `token_to_id`), else the config's first end-of-text id.
    pub fn end_of_text(&self, token_to_id: impl Fn(&str) -> Option<u32>) -> Option<u32> {
        let config = self.family_config();
        config
            .end_of_text_tokens()
            .iter()
            .find_map(|t| token_to_id(t))
            .or_else(|| config.eos_token_ids().first().copied())
    }

    /// The longest input the position table of `family` allows; `None` where positions are
    /// relative or rotary.
    pub fn max_positions(&self, family: Family) -> Option<usize> {
        self.family_config().max_positions(family)
    }

    /// HF's `model_type`: the config's own (`mistral`, `qwen2`) or the family's.
    pub fn model_type(&self, family: Family) -> &str {
        self.family_config()
            .model_type()
            .unwrap_or(family.model_type())
    }

    /// `[hidden, ffn, heads]` for activation accounting (a gated feed-forward counts twice).
    pub fn activation_dims(&self) -> [usize; 3] {
        self.family_config().activation_dims()
    }

    /// The HF `config.json` of `architecture` with this config.
    pub fn to_hf(&self, architecture: Architecture) -> Value {
        let mut value = self.family_config().to_hf();
        if value.get("model_type").is_none_or(Value::is_null) {
            value["model_type"] = Value::from(architecture.family().model_type());
        }
        value["architectures"] = Value::from(vec![architecture.hf_name()]);
        value
    }
}

/// The model classes, one row each: `Variant(ModelType) = "transformers name", Family,
/// config accessor, base, pooler;` — whether it is the bare body (keys without the `bert.` /
/// `roberta.` / `transformer.` prefix) and whether it has BERT's tanh pooler. Generates
/// [`Architecture`], [`AnyModel`] and their dispatch; what a class does is its
/// [`ModelClass`] impl beside the model.
macro_rules! classes {
    ($(
        $(#[$doc:meta])*
        $variant:ident($model:ident) = $hf:literal, $family:ident, $config:ident, $head:ident,
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

            /// What the class's output head does.
            pub fn head(self) -> Head {
                match self {
                    $(Self::$variant => Head::$head,)*
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

            /// The linear layers a LoRA update may adapt (see [`ModelClass::adaptable`]).
            pub fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
                match self {
                    $(Self::$variant(m) => m.adaptable(),)*
                }
            }

            /// The token tables and untied heads (see [`ModelClass::vocab_tables`]).
            pub fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
                match self {
                    $(Self::$variant(m) => m.vocab_tables(),)*
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
    BertModel(BertModel) = "BertModel", Bert, as_bert, Body, base: true, pooler: true;
    /// `BertForMaskedLM`: encoder and MLM head.
    BertForMaskedLM(BertForMaskedLM) = "BertForMaskedLM", Bert, as_bert, MaskedLm,
        base: false, pooler: false;
    /// `BertForSequenceClassification`: encoder, pooler and linear classifier.
    BertForSequenceClassification(BertForSequenceClassification) =
        "BertForSequenceClassification", Bert, as_bert, Classify, base: false, pooler: true;
    /// `RobertaModel`: encoder and pooler.
    RobertaModel(RobertaModel) = "RobertaModel", Roberta, as_bert, Body, base: true, pooler: true;
    /// `RobertaForMaskedLM`: encoder and MLM head.
    RobertaForMaskedLM(RobertaForMaskedLM) = "RobertaForMaskedLM", Roberta, as_bert, MaskedLm,
        base: false, pooler: false;
    /// `RobertaForSequenceClassification`: encoder and classification head.
    RobertaForSequenceClassification(RobertaForSequenceClassification) =
        "RobertaForSequenceClassification", Roberta, as_bert, Classify, base: false, pooler: false;
    /// `GPT2Model`: the decoder stack.
    Gpt2Model(Gpt2Model) = "GPT2Model", Gpt2, as_gpt2, Body, base: true, pooler: false;
    /// `GPT2LMHeadModel`: the decoder stack and the (tied) LM head.
    Gpt2LmHeadModel(Gpt2LmHeadModel) = "GPT2LMHeadModel", Gpt2, as_gpt2, CausalLm,
        base: false, pooler: false;
    /// `GPT2ForSequenceClassification`: the decoder stack and a score at the last real token.
    Gpt2ForSequenceClassification(Gpt2ForSequenceClassification) =
        "GPT2ForSequenceClassification", Gpt2, as_gpt2, Classify, base: false, pooler: false;
    /// `T5Model`: encoder and decoder.
    T5Model(T5Model) = "T5Model", T5, as_t5, Body, base: false, pooler: false;
    /// `T5ForConditionalGeneration`: encoder, decoder and LM head.
    T5ForConditionalGeneration(T5ForConditionalGeneration) = "T5ForConditionalGeneration", T5,
        as_t5, Seq2seq, base: false, pooler: false;
    /// `T5EncoderModel`: the encoder alone.
    T5EncoderModel(T5EncoderModel) = "T5EncoderModel", T5, as_t5, Body, base: false, pooler: false;
    /// `LlamaModel`: the decoder stack (also Mistral's and Qwen2's).
    LlamaModel(LlamaModel) = "LlamaModel", Llama, as_llama, Body, base: true, pooler: false;
    /// `LlamaForCausalLM`: the decoder stack and the LM head.
    LlamaForCausalLM(LlamaForCausalLM) = "LlamaForCausalLM", Llama, as_llama, CausalLm,
        base: false, pooler: false;
    /// `MistralForCausalLM`: a Llama with Mistral's config (sliding window).
    MistralForCausalLM(LlamaForCausalLM) = "MistralForCausalLM", Llama, as_llama, CausalLm,
        base: false, pooler: false;
    /// `Qwen2ForCausalLM`: a Llama with Qwen2's config (q/k/v biases).
    Qwen2ForCausalLM(LlamaForCausalLM) = "Qwen2ForCausalLM", Llama, as_llama, CausalLm,
        base: false, pooler: false;
    /// `LlamaForSequenceClassification`: the stack and a score at the last real token.
    LlamaForSequenceClassification(LlamaForSequenceClassification) =
        "LlamaForSequenceClassification", Llama, as_llama, Classify, base: false, pooler: false;
    /// `MistralForSequenceClassification`: the same with Mistral's config.
    MistralForSequenceClassification(LlamaForSequenceClassification) =
        "MistralForSequenceClassification", Llama, as_llama, Classify, base: false, pooler: false;
    /// `Qwen2ForSequenceClassification`: the same with Qwen2's config.
    Qwen2ForSequenceClassification(LlamaForSequenceClassification) =
        "Qwen2ForSequenceClassification", Llama, as_llama, Classify, base: false, pooler: false;
}

/// What a class's output head does; with the family it picks the class a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Head {
    /// None: the bare body (or T5's encoder alone).
    Body,
    /// Next-token logits (GPT-2, the Llama family).
    CausalLm,
    /// Masked-token logits (BERT, RoBERTa).
    MaskedLm,
    /// Encoder-decoder LM logits (T5).
    Seq2seq,
    /// One score vector per sequence.
    Classify,
}

impl Architecture {
    /// The class of `family` with `head` for `config`: among several (Llama's, Mistral's and
    /// Qwen2's share a family), the one named after the config's `model_type`. `None` when the
    /// family has no such class.
    pub fn for_head(family: Family, config: &ModelConfig, head: Head) -> Option<Self> {
        let model_type = config.model_type(family).replace('_', "");
        let mut classes = Self::ALL
            .into_iter()
            .filter(|a| a.family() == family && a.head() == head);
        let first = classes.next()?;
        Some(
            std::iter::once(first)
                .chain(classes)
                .find(|a| a.hf_name().to_ascii_lowercase().starts_with(&model_type))
                .unwrap_or(first),
        )
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
    fn a_family_and_a_head_pick_the_class_named_after_the_model_type() {
        let llama = |model_type: &str| {
            let value = serde_json::json!({"model_type": model_type, "vocab_size": 8,
                "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 1, "num_key_value_heads": 1});
            Family::Llama.parse_config(&value).unwrap()
        };
        let pick =
            |family, config: &ModelConfig, head| Architecture::for_head(family, config, head);
        assert_eq!(
            pick(Family::Llama, &llama("mistral"), Head::CausalLm),
            Some(Architecture::MistralForCausalLM)
        );
        assert_eq!(
            pick(Family::Llama, &llama("qwen2"), Head::Classify),
            Some(Architecture::Qwen2ForSequenceClassification)
        );
        assert_eq!(
            pick(Family::Llama, &llama("llama"), Head::CausalLm),
            Some(Architecture::LlamaForCausalLM)
        );
        let bert = ModelConfig::Bert(BertConfig::new(10));
        assert_eq!(
            pick(Family::Roberta, &bert, Head::MaskedLm),
            Some(Architecture::RobertaForMaskedLM)
        );
        assert_eq!(pick(Family::Bert, &bert, Head::CausalLm), None);
        let gpt2 = ModelConfig::Gpt2(crate::gpt2::Gpt2Config::new());
        assert_eq!(
            pick(Family::Gpt2, &gpt2, Head::Classify),
            Some(Architecture::Gpt2ForSequenceClassification)
        );
        let t5 = ModelConfig::T5(crate::t5::T5Config::new());
        assert_eq!(
            pick(Family::T5, &t5, Head::Seq2seq),
            Some(Architecture::T5ForConditionalGeneration)
        );
        assert_eq!(pick(Family::T5, &t5, Head::Classify), None);
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
