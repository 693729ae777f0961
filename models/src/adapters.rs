//! Delta tuning: which linear layers a LoRA update adapts ([`LoraSpec`]), attached to any class
//! through its [`ModelClass::adaptable`] list, so every family and task takes the same path (the
//! ZeRO cut of an adapted model carries the adapters in its segments).

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::layers::{Linear, LoraConfig};
use crate::{Family, ModelError};

/// A LoRA setup: rank, scale, dropout and the target layers by their family names (see each
/// family's `adaptable`). Recorded in a trained model's `zoo.json` (`zoo_lora`), so the
/// directory rebuilds its adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// `lora_dropout`.
    pub dropout: f64,
    /// The adapted layers' names (`q_proj`, `query`, `q`, …).
    pub targets: Vec<String>,
}

/// PEFT's default targets of a family (its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`:
/// the query and value projections; GPT-2's fused `c_attn`, which zoo holds split, is its query,
/// key and value).
pub fn default_targets(family: Family) -> &'static [&'static str] {
    match family {
        Family::Llama => &["q_proj", "v_proj"],
        Family::Bert | Family::Roberta => &["query", "value"],
        Family::Gpt2 => &["query", "key", "value"],
        Family::T5 => &["q", "v"],
    }
}

impl LoraSpec {
    /// The layer config of one adapter.
    pub fn layer(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
        }
    }

    /// Checks the numbers, naming the option.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, message: String| Err(ModelError::config(field, message));
        if self.r == 0 {
            return bad("lora_r", "the rank must be at least 1".into());
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return bad(
                "lora_alpha",
                format!("{} is not a positive scale", self.alpha),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("lora_dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return bad("lora_targets", "no target layers".into());
        }
        Ok(())
    }

    /// Attaches a fresh adapter to every layer of `layers` (a class's
    /// [`ModelClass::adaptable`](crate::io::ModelClass::adaptable) list) whose name is a target;
    /// returns how many. A target the model does not have is an error listing those it has.
    pub fn attach<B: Backend>(
        &self,
        layers: Vec<(&'static str, &mut Linear<B>)>,
        device: &B::Device,
    ) -> Result<usize, ModelError> {
        self.validate()?;
        let mut names: Vec<&str> = layers.iter().map(|(name, _)| *name).collect();
        names.dedup();
        let mut known: Vec<&str> = Vec::new();
        for name in names {
            if !known.contains(&name) {
                known.push(name);
            }
        }
        if let Some(missing) = self.targets.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(ModelError::config(
                "lora_targets",
                format!(
                    "'{missing}' is not a linear layer of this model (it has: {})",
                    known.join(", ")
                ),
            ));
        }
        let layer = self.layer();
        let mut count = 0;
        for (name, linear) in layers {
            if self.targets.iter().any(|t| t == name) {
                linear.attach_lora(&layer, device);
                count += 1;
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::ModelClass;
    use crate::llama::{LlamaConfig, LlamaForCausalLM};
    use bmtrain_backend::Cpu;
    use burn::tensor::{Distribution, Int, Tensor};

    fn tiny_llama() -> LlamaConfig {
        LlamaConfig::from_hf(&serde_json::json!({"model_type": "llama", "vocab_size": 32,
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}))
        .unwrap()
    }

    /// A LoRA model equals the merged model (`W + (α/r)·A·B`) within 1e-5, once `B` is non-zero.
    #[test]
    fn an_adapted_model_equals_its_merged_weights() {
        let device = Default::default();
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        };
        let mut model = LlamaForCausalLM::<Cpu>::new(&tiny_llama(), &device).unwrap();
        let attached = spec.attach(model.adaptable(), &device).unwrap();
        assert_eq!(attached, 2 * 3);
        // B starts at zero; give it values so the update is real.
        for (_, linear) in model.adaptable() {
            if let Some(lora) = linear.lora.as_mut() {
                let shape = lora.b.val().dims();
                lora.b = burn::module::Param::from_tensor(Tensor::random(
                    shape,
                    Distribution::Normal(0.0, 0.5),
                    &device,
                ));
            }
        }
        let ids = Tensor::<Cpu, 2, Int>::from_ints([[1, 5, 9, 2, 7]], &device);
        let adapted = model.forward(&crate::io::DecoderInput::new(ids.clone())).1;
        let mut merged = model;
        for (_, linear) in merged.adaptable() {
            *linear = linear.clone().merge_lora();
        }
        assert!(merged.adaptable().iter().all(|(_, l)| l.lora.is_none()));
        let plain = merged.forward(&crate::io::DecoderInput::new(ids)).1;
        let diff = (adapted - plain).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn unknown_targets_and_bad_numbers_are_refused() {
        let device = Default::default();
        let mut model = LlamaForCausalLM::<Cpu>::new(&tiny_llama(), &device).unwrap();
        let mut spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["query".into()],
        };
        let err = spec
            .attach(model.adaptable(), &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'query'") && err.contains("q_proj"), "{err}");
        spec.targets = vec!["q_proj".into()];
        spec.r = 0;
        let err = spec
            .attach(model.adaptable(), &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lora_r"), "{err}");
    }
}
