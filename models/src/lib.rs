//! zoo's model zoo: Transformer layers shared by every family, and the families themselves, each
//! in one file and each built from its HF `config.json`.
//!
//! - [`layers`]: embeddings, LayerNorm / RMSNorm, multi-head attention (padding mask, causal mask,
//!   additive position bias), feed-forward (ReLU, GELU, gelu_new, gated), dropout.
//! - [`bert`]: `BertModel`, `BertForMaskedLM`, `BertForSequenceClassification`.
//! - [`roberta`]: `RobertaModel`, `RobertaForMaskedLM`, `RobertaForSequenceClassification`.
//! - [`gpt2`]: `GPT2Model`, `GPT2LMHeadModel` (GPT-2, the GPT-3 sizes, CPM-1), causal-LM loss.
//! - [`t5`]: `T5Model`, `T5ForConditionalGeneration`, `T5EncoderModel` (T5 v1.0/v1.1, mT5, FLAN-T5, CPM-2).
//! - [`llama`]: `LlamaModel`, `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` (Llama 2 / 3.x,
//!   Mistral, Qwen2 / 2.5).
//! - [`train`]: each trainable family cut into ZeRO segments (GPT-2 causal LM, BERT/RoBERTa classifiers).
//! - [`generation`]: KV-cache generation (greedy, sampling, beam search) for any [`generation::Decoder`].
//! - [`registry`]: which class a config asks for, [`AnyModel`] to run any of them.
//! - [`presets`]: named configurations of published checkpoints; [`params`]: parameter-tree utilities.
//!
//! Every model is generic over the burn backend: on `Autodiff<B>` it trains (dropout active), on
//! `B` it runs inference.

#![warn(missing_docs)]

pub mod adapters;
pub mod bert;
pub mod generation;
pub mod gpt2;
pub mod io;
pub mod layers;
pub mod llama;
pub mod params;
pub mod presets;
pub mod quantize;
pub mod registry;
pub mod roberta;
pub mod t5;
pub mod train;

pub use params::{ParamInfo, ParamPath, cast_float_params, count_params, param_infos, param_names};
pub use presets::{Preset, preset, presets};
pub use registry::{
    AnyModel, Architecture, ConfigError, Family, Head, Logits, ModelConfig, ModelOutput,
};

/// Errors from building a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config field has a value zoo cannot use.
    #[error("config field '{field}': {message}")]
    Config {
        /// The `config.json` field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A feature zoo does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A checkpoint tensor a model cannot start from.
    #[error("tensor '{name}': {message}")]
    Weights {
        /// The tensor's zoo name.
        name: String,
        /// What is wrong with it (missing, its shape).
        message: String,
    },
}

/// The most blocks a config may ask for. Every block is a module of its own, built (lazily,
/// but its structure all the same) before anything else can be checked, so an absurd count (a
/// damaged `config.json`) would allocate without bound; the deepest published models have a few
/// hundred.
pub const MAX_BLOCKS: usize = 4096;

/// Refuses a block count above [`MAX_BLOCKS`], naming the field.
pub fn check_blocks(field: &str, blocks: usize) -> Result<(), ModelError> {
    if blocks > MAX_BLOCKS {
        return Err(ModelError::config(
            field,
            format!("{blocks} blocks: zoo builds at most {MAX_BLOCKS}"),
        ));
    }
    Ok(())
}

impl ModelError {
    /// An error about one config field.
    pub fn config(field: &str, message: String) -> Self {
        Self::Config {
            field: field.to_string(),
            message,
        }
    }
}
