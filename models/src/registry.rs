//! Which model classes zoo has, how an HF `config.json` picks one, and the named presets.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::FloatDType;
use burn::tensor::{Tensor, backend::Backend};
use serde_json::Value;

use crate::ModelError;
use crate::bert::{BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel};
use crate::gpt2::{Gpt2Config, Gpt2ForSequenceClassification, Gpt2LmHeadModel, Gpt2Model};
use crate::io::{EncoderInput, ModelClass};
pub use crate::io::{Logits, ModelOutput};
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
}

impl Family {
    /// Every family, in `zoo list` order.
    pub const ALL: [Family; 4] = [Family::Bert, Family::Roberta, Family::Gpt2, Family::T5];

    /// HF's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta => "roberta",
            Self::Gpt2 => "gpt2",
            Self::T5 => "t5",
        }
    }

    /// Parses HF's `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Self, ModelError> {
        if model_type == "mt5" {
            return Ok(Self::T5);
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
}

impl ModelConfig {
    /// Checks the config, naming the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Self::Bert(c) => c.validate(),
            Self::Gpt2(c) => c.validate(),
            Self::T5(c) => c.validate(),
        }
    }

    /// Number of (encoder) layers.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Bert(c) => c.num_hidden_layers,
            Self::Gpt2(c) => c.n_layer,
            Self::T5(c) => c.num_layers,
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
        }
    }

    /// Whether the feed-forward layers are gated (T5 v1.1 and later).
    pub fn gated_ffn(&self) -> bool {
        match self {
            Self::T5(c) => c.activation().is_ok_and(|(_, gated)| gated),
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
        }
    }

    /// The padding id, when the config names one.
    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            Self::Bert(c) => c.pad_token_id.map(|id| id as u32),
            Self::Gpt2(c) => c.pad_token_id,
            Self::T5(c) => c.pad_token_id,
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
}

impl Architecture {
    /// The bare encoder of a family.
    pub fn base(family: Family) -> Self {
        match family {
            Family::Bert => Self::BertModel,
            Family::Roberta => Self::RobertaModel,
            Family::Gpt2 => Self::Gpt2Model,
            Family::T5 => Self::T5Model,
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

/// One float parameter of a module: its zoo name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Dotted path, e.g. `bert.encoder.layers.0.attention.query.weight`.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
}

/// The dotted zoo name of the parameter a [`ModuleVisitor`] is at: call [`ParamPath::enter`] and
/// [`ParamPath::exit`] from the visitor's `enter_module` / `exit_module`.
#[derive(Debug, Default)]
pub struct ParamPath {
    segments: Vec<String>,
}

impl ParamPath {
    /// Enters a sub-module. Enum variants (such as [`AnyModel`]'s) are not part of zoo names.
    pub fn enter(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.segments.push(name.to_string());
        }
    }

    /// Leaves the sub-module entered last.
    pub fn exit(&mut self, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.segments.pop();
        }
    }

    /// The current name, e.g. `bert.encoder.layers.0.attention.query.weight`.
    pub fn name(&self) -> String {
        self.segments.join(".")
    }
}

/// Lists a module's float parameters without initialising them (lazy shapes only), so this is
/// cheap even for a 175B preset.
pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    #[derive(Default)]
    struct Lister {
        path: ParamPath,
        params: Vec<ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for Lister {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.path.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.params.push(ParamInfo {
                name: self.path.name(),
                shape: param.lazy_shape().to_vec(),
            });
        }
    }
    let mut lister = Lister::default();
    module.visit(&mut lister);
    lister.params
}

/// Casts every float parameter of a module to `dtype` (f16 / bf16 inference, or back to f32).
pub fn cast_float_params<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let dtype = self.0;
            param.map(|tensor| tensor.cast(dtype))
        }
    }
    module.map(&mut Cast(dtype))
}

/// Number of float parameters, from lazy shapes.
pub fn count_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    param_infos::<B, M>(module)
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum()
}

/// A named configuration of a published checkpoint (or, for GPT-3, of a paper's table row).
#[derive(Debug, Clone)]
pub struct Preset {
    /// The hub name, e.g. `bert-base-uncased`.
    pub name: &'static str,
    /// The class the hub checkpoint is saved as.
    pub architecture: Architecture,
    /// Its config.
    pub config: ModelConfig,
}

/// One row of Table 2.1 of the GPT-3 paper (Brown et al., 2020, "Language Models are Few-Shot
/// Learners"): the name, `n_params` as printed, `n_layers`, `d_model`, `n_heads`, `d_head`.
#[derive(Debug, Clone, Copy)]
pub struct Gpt3Row {
    /// Preset name.
    pub name: &'static str,
    /// `n_params` as the paper prints it.
    pub paper_params: f64,
    /// `n_layers`.
    pub layers: usize,
    /// `d_model`.
    pub d_model: usize,
    /// `n_heads`.
    pub heads: usize,
    /// `d_head`.
    pub head_dim: usize,
}

/// The eight GPT-3 sizes. Every model has a 2048-token context and GPT-2's 50257-token vocabulary.
///
/// The paper's XL row is inconsistent: 24 heads × 128 = 3072 ≠ d_model 2048, and with a
/// 3072-wide attention the model would have 1.52B parameters, not 1.3B. The preset keeps
/// d_model and d_head and uses 16 heads, which gives the printed 1.3B. The 13B row (5140 wide,
/// 40 × 128 = 5120 attention) is kept as printed, with `head_dim` set.
pub const GPT3_TABLE: [Gpt3Row; 8] = [
    Gpt3Row {
        name: "gpt3-small",
        paper_params: 125e6,
        layers: 12,
        d_model: 768,
        heads: 12,
        head_dim: 64,
    },
    Gpt3Row {
        name: "gpt3-medium",
        paper_params: 350e6,
        layers: 24,
        d_model: 1024,
        heads: 16,
        head_dim: 64,
    },
    Gpt3Row {
        name: "gpt3-large",
        paper_params: 760e6,
        layers: 24,
        d_model: 1536,
        heads: 16,
        head_dim: 96,
    },
    Gpt3Row {
        name: "gpt3-xl",
        paper_params: 1.3e9,
        layers: 24,
        d_model: 2048,
        heads: 16,
        head_dim: 128,
    },
    Gpt3Row {
        name: "gpt3-2.7b",
        paper_params: 2.7e9,
        layers: 32,
        d_model: 2560,
        heads: 32,
        head_dim: 80,
    },
    Gpt3Row {
        name: "gpt3-6.7b",
        paper_params: 6.7e9,
        layers: 32,
        d_model: 4096,
        heads: 32,
        head_dim: 128,
    },
    Gpt3Row {
        name: "gpt3-13b",
        paper_params: 13.0e9,
        layers: 40,
        d_model: 5140,
        heads: 40,
        head_dim: 128,
    },
    Gpt3Row {
        name: "gpt3-175b",
        paper_params: 175.0e9,
        layers: 96,
        d_model: 12288,
        heads: 96,
        head_dim: 128,
    },
];

/// Every preset zoo knows, in `zoo list` order.
pub fn presets() -> Vec<Preset> {
    let bert = |name, vocab, large: bool| {
        let mut config = BertConfig::new(vocab);
        if large {
            config.hidden_size = 1024;
            config.num_hidden_layers = 24;
            config.num_attention_heads = 16;
            config.intermediate_size = 4096;
        }
        config.pad_token_id = Some(0);
        (name, Architecture::BertForMaskedLM, config)
    };
    let roberta = |name, large: bool| {
        let (name, _, mut config) = bert(name, 50265, large);
        config.max_position_embeddings = 514;
        config.type_vocab_size = 1;
        config.layer_norm_eps = 1e-5;
        config.pad_token_id = Some(1);
        (name, Architecture::RobertaForMaskedLM, config)
    };
    let encoders = [
        bert("bert-base-uncased", 30522, false),
        bert("bert-base-cased", 28996, false),
        bert("bert-large-uncased", 30522, true),
        bert("bert-large-cased", 28996, true),
        bert("bert-base-chinese", 21128, false),
        roberta("roberta-base", false),
        roberta("roberta-large", true),
    ];
    let gpt = |name, config: Gpt2Config| Preset {
        name,
        architecture: Architecture::Gpt2LmHeadModel,
        config: ModelConfig::Gpt2(config),
    };
    let gpt2 = [
        ("gpt2", 12, 768, 12),
        ("gpt2-medium", 24, 1024, 16),
        ("gpt2-large", 36, 1280, 20),
        ("gpt2-xl", 48, 1600, 25),
    ]
    .map(|(name, layers, width, heads)| {
        let mut config = Gpt2Config::sized(layers, width, heads, 1024);
        config.bos_token_id = Some(50256);
        config.eos_token_id = Some(crate::generation::TokenIds::One(50256));
        gpt(name, config)
    });
    let gpt3 = GPT3_TABLE.map(|row| {
        let mut config = Gpt2Config::sized(row.layers, row.d_model, row.heads, 2048);
        config.head_dim = Some(row.head_dim);
        config.bos_token_id = Some(50256);
        config.eos_token_id = Some(crate::generation::TokenIds::One(50256));
        gpt(row.name, config)
    });
    // TsinghuaAI/CPM-Generate: GPT-2 blocks, 30000 SentencePiece ids, 1024 positions.
    let cpm = gpt(
        "cpm-generate",
        Gpt2Config {
            vocab_size: 30000,
            ..Gpt2Config::sized(32, 2560, 32, 1024)
        },
    );
    // (name, d_model, d_kv, d_ff, layers, heads, vocab, v1.1-style: gated gelu_new + untied head)
    let t5_rows = [
        ("t5-small", 512, 64, 2048, 6, 8, 32128, false),
        ("t5-base", 768, 64, 3072, 12, 12, 32128, false),
        ("t5-large", 1024, 64, 4096, 24, 16, 32128, false),
        ("t5-3b", 1024, 128, 16384, 24, 32, 32128, false),
        ("t5-11b", 1024, 128, 65536, 24, 128, 32128, false),
        ("t5-v1_1-small", 512, 64, 1024, 8, 6, 32128, true),
        ("t5-v1_1-base", 768, 64, 2048, 12, 12, 32128, true),
        ("t5-v1_1-large", 1024, 64, 2816, 24, 16, 32128, true),
        ("t5-v1_1-xl", 2048, 64, 5120, 24, 32, 32128, true),
        ("t5-v1_1-xxl", 4096, 64, 10240, 24, 64, 32128, true),
        ("mt5-small", 512, 64, 1024, 8, 6, 250112, true),
        ("mt5-base", 768, 64, 2048, 12, 12, 250112, true),
        ("mt5-large", 1024, 64, 2816, 24, 16, 250112, true),
        ("mt5-xl", 2048, 64, 5120, 24, 32, 250112, true),
        ("mt5-xxl", 4096, 64, 10240, 24, 64, 250112, true),
        ("flan-t5-small", 512, 64, 1024, 8, 6, 32128, true),
        ("flan-t5-base", 768, 64, 2048, 12, 12, 32128, true),
        ("flan-t5-large", 1024, 64, 2816, 24, 16, 32128, true),
        ("flan-t5-xl", 2048, 64, 5120, 24, 32, 32128, true),
        ("flan-t5-xxl", 4096, 64, 10240, 24, 64, 32128, true),
    ];
    let t5 = t5_rows.map(
        |(name, d_model, d_kv, d_ff, layers, heads, vocab, v11)| Preset {
            name,
            architecture: Architecture::T5ForConditionalGeneration,
            config: ModelConfig::T5(T5Config {
                vocab_size: vocab,
                d_model,
                d_kv,
                d_ff,
                num_layers: layers,
                num_heads: heads,
                feed_forward_proj: if v11 { "gated-gelu" } else { "relu" }.into(),
                tie_word_embeddings: !v11,
                decoder_start_token_id: Some(0),
                pad_token_id: Some(0),
                eos_token_id: Some(crate::generation::TokenIds::One(1)),
                ..T5Config::new()
            }),
        },
    );
    encoders
        .into_iter()
        .map(|(name, architecture, config)| Preset {
            name,
            architecture,
            config: ModelConfig::Bert(config),
        })
        .chain(gpt2)
        .chain(gpt3)
        .chain([cpm])
        .chain(t5)
        .chain([Preset {
            name: "cpm2",
            architecture: Architecture::T5ForConditionalGeneration,
            config: ModelConfig::T5(cpm2_config()),
        }])
        .collect()
}

/// CPM-2 (Zhang et al., 2021, "CPM-2: Large-scale Cost-effective Pre-trained Language Models"):
/// a T5 v1.1-style encoder-decoder, 24 + 24 blocks, d_model 4096, 64 heads × 64, d_ff 10240 with
/// gated GELU, relative buckets 32 / max distance 128, RMSNorm eps 1e-6, no biases, untied head,
/// and a 26240-id Chinese vocabulary whose 190 span sentinels are `<s_0>` … `<s_189>`.
pub fn cpm2_config() -> T5Config {
    T5Config {
        vocab_size: 26240,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_decoder_layers: Some(24),
        num_heads: 64,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward_proj: "gated-gelu".into(),
        tie_word_embeddings: false,
        ..T5Config::new()
    }
}

/// CPM-2's layout at test size: the preset's choices (gated GELU, untied head, relative buckets,
/// RMSNorm, no biases) with 2 + 2 blocks of width 32, 4 heads × 8, d_ff 64, dropout 0, for a
/// vocabulary of `vocab_size` (a test `vocab.txt`).
pub fn cpm2_tiny_config(vocab_size: usize) -> T5Config {
    T5Config {
        vocab_size,
        d_model: 32,
        d_kv: 8,
        num_heads: 4,
        d_ff: 64,
        num_layers: 2,
        num_decoder_layers: Some(2),
        dropout_rate: 0.0,
        ..cpm2_config()
    }
}

/// Finds a preset by name.
pub fn preset(name: &str) -> Option<Preset> {
    presets().into_iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;

    /// Parameter counts of the bare encoders (with pooler), as transformers counts them:
    /// `sum(p.numel() for p in BertModel(BertConfig(...)).parameters())`.
    #[test]
    fn preset_parameter_counts_match_transformers() {
        let device = Default::default();
        let expected = [
            ("bert-base-uncased", 109_482_240),
            ("bert-large-cased", 333_579_264),
            ("bert-base-chinese", 102_267_648),
            ("roberta-base", 124_645_632),
        ];
        for (name, count) in expected {
            let preset = preset(name).unwrap();
            let base = Architecture::base(preset.architecture.family());
            let model = AnyModel::<Cpu>::new(base, &preset.config, &device).unwrap();
            assert_eq!(count_params::<Cpu, _>(&model), count, "{name}");
        }
    }

    /// GPT-2 counts as transformers gives them:
    /// `sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(...)).parameters())` (tied head once).
    #[test]
    fn gpt2_preset_counts_match_transformers() {
        let device = Default::default();
        let expected = [
            ("gpt2", 124_439_808),
            ("gpt2-medium", 354_823_168),
            ("gpt2-large", 774_030_080),
            ("gpt2-xl", 1_557_611_200),
        ];
        for (name, count) in expected {
            let preset = preset(name).unwrap();
            let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device).unwrap();
            assert_eq!(count_params::<Cpu, _>(&model), count, "{name}");
        }
    }

    /// T5 counts as transformers gives them:
    /// `sum(p.numel() for p in T5ForConditionalGeneration(T5Config(...)).parameters())`.
    #[test]
    fn t5_preset_counts_match_transformers() {
        let device = Default::default();
        let expected = [
            ("t5-small", 60_506_624),
            ("t5-base", 222_903_552),
            ("t5-large", 737_668_096),
            ("flan-t5-small", 76_961_152),
            ("mt5-small", 300_176_768),
        ];
        for (name, count) in expected {
            let preset = preset(name).unwrap();
            let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device).unwrap();
            assert_eq!(count_params::<Cpu, _>(&model), count, "{name}");
        }
    }

    /// The GPT-3 presets against the paper's Table 2.1: exactly the closed-form count of the
    /// architecture (embeddings, per-block attention + MLP + norms, final norm), and within 2% of
    /// the printed `n_params` (the paper rounds: "350M" is 355.9M, "175.0B" is 174.6B).
    #[test]
    fn gpt3_preset_counts_match_the_paper() {
        let device = Default::default();
        let (vocab, context) = (50257usize, 2048usize);
        for row in GPT3_TABLE {
            let preset = preset(row.name).unwrap();
            let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device).unwrap();
            let count = count_params::<Cpu, _>(&model);
            let (d, a) = (row.d_model, row.heads * row.head_dim);
            let attention = 3 * (d * a + a) + (a * d + d);
            let mlp = (d * 4 * d + 4 * d) + (4 * d * d + d);
            let norms = 2 * 2 * d;
            let closed_form =
                vocab * d + context * d + row.layers * (attention + mlp + norms) + 2 * d;
            assert_eq!(count, closed_form, "{}", row.name);
            let off = (count as f64 - row.paper_params).abs() / row.paper_params;
            assert!(
                off < 0.02,
                "{}: {count} vs the paper's {}",
                row.name,
                row.paper_params
            );
        }
    }

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
        let config = serde_json::json!({"model_type": "llama"});
        let err = Architecture::from_hf_config(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'llama'"), "{err}");
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
