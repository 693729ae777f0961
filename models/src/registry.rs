//! Which model classes zoo has, how an HF `config.json` picks one, and the named presets.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};
use serde_json::Value;

use crate::ModelError;
use crate::bert::{
    BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, EncoderInput,
};
use crate::roberta::{RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel};

/// A model family: one file in `models/src`, one key table in `checkpoints-convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// BERT (`model_type: "bert"`).
    Bert,
    /// RoBERTa (`model_type: "roberta"`).
    Roberta,
}

impl Family {
    /// Every family, in `zoo list` order.
    pub const ALL: [Family; 2] = [Family::Bert, Family::Roberta];

    /// HF's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta => "roberta",
        }
    }

    /// Parses HF's `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Self, ModelError> {
        Self::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
            .ok_or_else(|| {
                ModelError::config(
                    "model_type",
                    format!("unknown model_type '{model_type}' (zoo knows: bert, roberta)"),
                )
            })
    }

    /// Where the encoder's keys sit under a head, in HF and in zoo: `bert.` / `roberta.`.
    pub fn body_prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert.",
            Self::Roberta => "roberta.",
        }
    }
}

/// A model class, named as in transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `BertModel`: encoder and pooler.
    BertModel,
    /// `BertForMaskedLM`: encoder and MLM head.
    BertForMaskedLM,
    /// `BertForSequenceClassification`: encoder, pooler and linear classifier.
    BertForSequenceClassification,
    /// `RobertaModel`: encoder and pooler.
    RobertaModel,
    /// `RobertaForMaskedLM`: encoder and MLM head.
    RobertaForMaskedLM,
    /// `RobertaForSequenceClassification`: encoder and classification head.
    RobertaForSequenceClassification,
}

impl Architecture {
    /// Every architecture.
    pub const ALL: [Architecture; 6] = [
        Self::BertModel,
        Self::BertForMaskedLM,
        Self::BertForSequenceClassification,
        Self::RobertaModel,
        Self::RobertaForMaskedLM,
        Self::RobertaForSequenceClassification,
    ];

    /// The transformers class name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::BertModel => "BertModel",
            Self::BertForMaskedLM => "BertForMaskedLM",
            Self::BertForSequenceClassification => "BertForSequenceClassification",
            Self::RobertaModel => "RobertaModel",
            Self::RobertaForMaskedLM => "RobertaForMaskedLM",
            Self::RobertaForSequenceClassification => "RobertaForSequenceClassification",
        }
    }

    /// The family the class belongs to.
    pub fn family(self) -> Family {
        match self {
            Self::BertModel | Self::BertForMaskedLM | Self::BertForSequenceClassification => {
                Family::Bert
            }
            _ => Family::Roberta,
        }
    }

    /// Whether this is the bare encoder (keys without the `bert.` / `roberta.` prefix).
    pub fn is_base(self) -> bool {
        matches!(self, Self::BertModel | Self::RobertaModel)
    }

    /// Whether the class has BERT's tanh pooler (the MLM and RoBERTa classification heads do not).
    pub fn has_pooler(self) -> bool {
        matches!(
            self,
            Self::BertModel | Self::BertForSequenceClassification | Self::RobertaModel
        )
    }

    /// The bare encoder of a family.
    pub fn base(family: Family) -> Self {
        match family {
            Family::Bert => Self::BertModel,
            Family::Roberta => Self::RobertaModel,
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
        if let Some(arch) = Self::ALL
            .into_iter()
            .find(|a| a.hf_name() == name && a.family() == family)
        {
            return Ok(arch);
        }
        Ok(match (family, name.ends_with("ForPreTraining")) {
            (Family::Bert, true) => Self::BertForMaskedLM,
            (Family::Roberta, true) => Self::RobertaForMaskedLM,
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

/// Any zoo model, so that commands can run whatever a directory holds.
#[derive(Module, Debug)]
pub enum AnyModel<B: Backend> {
    /// `BertModel`.
    BertModel(BertModel<B>),
    /// `BertForMaskedLM`.
    BertForMaskedLM(BertForMaskedLM<B>),
    /// `BertForSequenceClassification`.
    BertForSequenceClassification(BertForSequenceClassification<B>),
    /// `RobertaModel`.
    RobertaModel(RobertaModel<B>),
    /// `RobertaForMaskedLM`.
    RobertaForMaskedLM(RobertaForMaskedLM<B>),
    /// `RobertaForSequenceClassification`.
    RobertaForSequenceClassification(RobertaForSequenceClassification<B>),
}

/// Logits of a head: per token (MLM) or per sequence (classification).
#[derive(Debug, Clone)]
pub enum Logits<B: Backend> {
    /// `[batch, seq, vocab]`.
    PerToken(Tensor<B, 3>),
    /// `[batch, num_labels]`.
    PerSequence(Tensor<B, 2>),
}

/// What [`AnyModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[batch, hidden]`, when the model has a pooler.
    pub pooler_output: Option<Tensor<B, 2>>,
    /// When the model has a head.
    pub logits: Option<Logits<B>>,
}

impl<B: Backend> AnyModel<B> {
    /// Builds `architecture` from `config` with fresh (lazy) weights.
    pub fn new(
        architecture: Architecture,
        config: &BertConfig,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Ok(match architecture {
            Architecture::BertModel => Self::BertModel(BertModel::new(config, true, device)?),
            Architecture::BertForMaskedLM => {
                Self::BertForMaskedLM(BertForMaskedLM::new(config, device)?)
            }
            Architecture::BertForSequenceClassification => Self::BertForSequenceClassification(
                BertForSequenceClassification::new(config, device)?,
            ),
            Architecture::RobertaModel => {
                Self::RobertaModel(RobertaModel::new(config, true, device)?)
            }
            Architecture::RobertaForMaskedLM => {
                Self::RobertaForMaskedLM(RobertaForMaskedLM::new(config, device)?)
            }
            Architecture::RobertaForSequenceClassification => {
                Self::RobertaForSequenceClassification(RobertaForSequenceClassification::new(
                    config, device,
                )?)
            }
        })
    }

    /// Runs the model.
    pub fn forward(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (output, logits) = match self {
            Self::BertModel(m) => (m.forward(input), None),
            Self::RobertaModel(m) => (m.forward(input), None),
            Self::BertForMaskedLM(m) => {
                let (o, l) = m.forward(input);
                (o, Some(Logits::PerToken(l)))
            }
            Self::RobertaForMaskedLM(m) => {
                let (o, l) = m.forward(input);
                (o, Some(Logits::PerToken(l)))
            }
            Self::BertForSequenceClassification(m) => {
                let (o, l) = m.forward(input);
                (o, Some(Logits::PerSequence(l)))
            }
            Self::RobertaForSequenceClassification(m) => {
                let (o, l) = m.forward(input);
                (o, Some(Logits::PerSequence(l)))
            }
        };
        ModelOutput {
            last_hidden_state: output.last_hidden_state,
            pooler_output: output.pooler_output,
            logits,
        }
    }

    /// The longest input the position table allows.
    pub fn max_sequence_length(&self) -> usize {
        let embeddings = match self {
            Self::BertModel(m) => &m.embeddings,
            Self::BertForMaskedLM(m) => &m.bert.embeddings,
            Self::BertForSequenceClassification(m) => &m.bert.embeddings,
            Self::RobertaModel(m) => return m.max_sequence_length(),
            Self::RobertaForMaskedLM(m) => return m.roberta.max_sequence_length(),
            Self::RobertaForSequenceClassification(m) => return m.roberta.max_sequence_length(),
        };
        embeddings.max_positions().unwrap_or(usize::MAX)
    }

    /// Number of token ids the model accepts.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::BertModel(m) => m.embeddings.vocab_size(),
            Self::BertForMaskedLM(m) => m.bert.embeddings.vocab_size(),
            Self::BertForSequenceClassification(m) => m.bert.embeddings.vocab_size(),
            Self::RobertaModel(m) => m.embeddings.vocab_size(),
            Self::RobertaForMaskedLM(m) => m.roberta.embeddings.vocab_size(),
            Self::RobertaForSequenceClassification(m) => m.roberta.embeddings.vocab_size(),
        }
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

/// Number of float parameters, from lazy shapes.
pub fn count_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    param_infos::<B, M>(module)
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum()
}

/// A named configuration of a published checkpoint.
#[derive(Debug, Clone)]
pub struct Preset {
    /// The hub name, e.g. `bert-base-uncased`.
    pub name: &'static str,
    /// The class the hub checkpoint is saved as.
    pub architecture: Architecture,
    /// Its config.
    pub config: BertConfig,
}

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
        Preset {
            name,
            architecture: Architecture::BertForMaskedLM,
            config,
        }
    };
    let roberta = |name, large: bool| {
        let mut p = bert(name, 50265, large);
        p.architecture = Architecture::RobertaForMaskedLM;
        p.config.max_position_embeddings = 514;
        p.config.type_vocab_size = 1;
        p.config.layer_norm_eps = 1e-5;
        p.config.pad_token_id = Some(1);
        p
    };
    vec![
        bert("bert-base-uncased", 30522, false),
        bert("bert-base-cased", 28996, false),
        bert("bert-large-uncased", 30522, true),
        bert("bert-large-cased", 28996, true),
        bert("bert-base-chinese", 21128, false),
        roberta("roberta-base", false),
        roberta("roberta-large", true),
    ]
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
        let model = AnyModel::<Cpu>::new(Architecture::BertForMaskedLM, &config, &device).unwrap();
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
