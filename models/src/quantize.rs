//! Quantized models: which weights `zoo quantize` turns into int8 / NF4 codes, what a quantized
//! directory records of it (`zoo_quantization` in its config), and how stored codes go into a
//! freshly built model ([`install`]) so that its linear layers and token tables run on them.
//!
//! The quantized weights are every linear layer of the blocks (those LoRA can adapt:
//! attention and feed-forward projections) and, when asked, the embedding tables (tokens, and
//! GPT-2's learned positions) and untied LM heads. Norms, biases, poolers and classifiers keep
//! their dtype.

use std::collections::BTreeMap;
use std::sync::Arc;

use bmtrain_backend::quant::{NF4_BLOCK, QuantFormat, QuantizedMatrix};
use bmtrain_backend::trainer::{QuantizedBase, QuantizedWeight};
use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::io::ModelClass;
use crate::layers::{Embedding, Linear};
use crate::{AnyModel, ModelError, params::param_names};

/// What a quantized directory records (`zoo_quantization` in its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantSpec {
    /// `"int8"` or `"nf4"`.
    pub format: String,
    /// NF4's block size (always [`NF4_BLOCK`]); absent for int8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// Whether the token tables and untied heads are quantized too.
    pub embeddings: bool,
    /// Quantized weights by zoo key: the codes' `[rows, cols]` (rows are output channels).
    pub weights: BTreeMap<String, [usize; 2]>,
}

impl QuantSpec {
    /// The format, checked.
    pub fn quant_format(&self) -> Result<QuantFormat, ModelError> {
        let format = QuantFormat::from_name(&self.format).ok_or_else(|| {
            ModelError::config(
                "zoo_quantization.format",
                format!("'{}' is not a format (int8, nf4)", self.format),
            )
        })?;
        if format == QuantFormat::Nf4 && self.block_size != Some(NF4_BLOCK) {
            return Err(ModelError::config(
                "zoo_quantization.block_size",
                format!(
                    "{:?}: zoo reads NF4 in blocks of {NF4_BLOCK}",
                    self.block_size
                ),
            ));
        }
        Ok(format)
    }
}

/// One weight `zoo quantize` quantizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantTarget {
    /// The weight's zoo key.
    pub name: String,
    /// The codes' rows (output channels) and columns.
    pub shape: [usize; 2],
    /// Whether the zoo tensor is the codes' transpose (a linear layer's `[d_input, d_output]`)
    /// rather than the same layout (a token table's `[vocab, width]`).
    pub transposed: bool,
}

/// A layer that can run on codes.
enum Slot<'a, B: Backend> {
    /// A linear layer: its `[d_input, d_output]` weight is the codes' transpose.
    Linear(&'a mut Linear<B>),
    /// An embedding table: the codes' layout.
    Table(&'a mut Embedding<B>),
}

impl<B: Backend> Slot<'_, B> {
    fn id(&self) -> ParamId {
        match self {
            Slot::Linear(l) => l.weight.id,
            Slot::Table(t) => t.weight.id,
        }
    }

    /// The codes' `[rows, cols]` (rows are output channels).
    fn shape(&self) -> [usize; 2] {
        match self {
            Slot::Linear(l) => {
                let [d_input, d_output] = l.weight.lazy_shape().dims();
                [d_output, d_input]
            }
            Slot::Table(t) => t.weight.lazy_shape().dims(),
        }
    }

    fn set(self, codes: Arc<QuantizedMatrix>) {
        match self {
            Slot::Linear(l) => l.set_quantized(codes),
            Slot::Table(t) => t.set_quantized(codes),
        }
    }
}

/// Calls `visit` on every layer that can run on codes: the blocks' linear layers and, with
/// `tables`, the embedding tables and untied heads. Returns how many embedding tables the class
/// offers.
fn each_slot<B: Backend, E>(
    model: &mut AnyModel<B>,
    tables: bool,
    mut visit: impl FnMut(Slot<'_, B>) -> Result<(), E>,
) -> Result<usize, E> {
    for (_, linear) in model.adaptable() {
        visit(Slot::Linear(linear))?;
    }
    if !tables {
        return Ok(0);
    }
    let vocab = model.vocab_tables();
    let count = vocab.embeddings.len();
    for table in vocab.embeddings {
        visit(Slot::Table(table))?;
    }
    for head in vocab.heads {
        visit(Slot::Linear(head))?;
    }
    Ok(count)
}

/// The weights of `model` to quantize, in key order; with `embeddings`, also the embedding
/// tables and untied heads (an error for a class that has none to offer).
pub fn targets<B: Backend>(
    model: &mut AnyModel<B>,
    embeddings: bool,
) -> Result<Vec<QuantTarget>, ModelError> {
    let names = param_names::<B, _>(model);
    let mut out = BTreeMap::new();
    let tables = each_slot(model, embeddings, |slot| {
        let name = names[&slot.id()].clone();
        let target = QuantTarget {
            name: name.clone(),
            shape: slot.shape(),
            transposed: matches!(slot, Slot::Linear(_)),
        };
        out.insert(name, target);
        Ok::<_, ModelError>(())
    })?;
    if embeddings && tables == 0 {
        return Err(ModelError::config(
            "embeddings",
            "this model class has no token tables zoo quantizes".into(),
        ));
    }
    Ok(out.into_values().collect())
}

/// Puts stored codes (by zoo key) into `model`'s layers: each must be a weight [`targets`]
/// lists, with its shape. The layers' dense weights become lazy (never allocated unless read).
pub fn install<B: Backend>(
    model: &mut AnyModel<B>,
    mut codes: BTreeMap<String, Arc<QuantizedMatrix>>,
) -> Result<(), ModelError> {
    let names = param_names::<B, _>(model);
    each_slot(model, true, |slot| {
        let name = &names[&slot.id()];
        let Some(layer_codes) = codes.remove(name) else {
            return Ok(());
        };
        let [rows, cols] = slot.shape();
        if [layer_codes.rows(), layer_codes.cols()] != [rows, cols] {
            return Err(ModelError::config(
                "zoo_quantization.weights",
                format!(
                    "{name}: codes of {}x{}, the layer needs {rows}x{cols}",
                    layer_codes.rows(),
                    layer_codes.cols(),
                ),
            ));
        }
        slot.set(layer_codes);
        Ok(())
    })?;
    match codes.keys().next() {
        None => Ok(()),
        Some(name) => Err(ModelError::config(
            "zoo_quantization.weights",
            format!("{name} is not a weight zoo runs quantized in this model"),
        )),
    }
}

/// QLoRA's frozen base: makes every [`ModelClass::adaptable`] linear layer of `model` run on
/// codes the ZeRO trainer will lend it, and returns what the trainer needs to quantize, shard
/// and lend them (by zoo name). The layers keep their weights' values until the trainer has
/// quantized them.
pub fn lend_base<B: Backend, M: ModelClass<B> + Module<B>>(
    model: &mut M,
    format: QuantFormat,
) -> QuantizedBase {
    let names = param_names::<B, _>(model);
    let weights = model
        .adaptable()
        .into_iter()
        .map(|(_, linear)| {
            let name = names[&linear.weight.id].clone();
            let slot = linear.lend_codes();
            let weight = QuantizedWeight {
                slot,
                transposed: true,
            };
            (name, weight)
        })
        .collect();
    QuantizedBase { format, weights }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Architecture;
    use crate::io::Logits;
    use bmtrain_backend::Cpu;
    use burn::tensor::{Int, Tensor};

    fn tiny_gpt2() -> AnyModel<Cpu> {
        let arch = Architecture::from_hf_name("GPT2LMHeadModel").unwrap();
        let config = arch
            .family()
            .parse_config(&serde_json::json!({"model_type": "gpt2", "vocab_size": 64,
                "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 16}))
            .unwrap();
        let model = AnyModel::new(arch, &config, &Default::default()).unwrap();
        // Drawn now: a clone of a lazy parameter would draw its own values.
        crate::cast_float_params(model, burn::tensor::FloatDType::F32)
    }

    /// A model whose layers hold codes gives the same logits as the same model with the
    /// dequantized weights written back densely (the kernels read the codes exactly).
    #[test]
    fn installed_codes_run_as_their_dequantized_weights() {
        for format in [QuantFormat::Int8, QuantFormat::Nf4] {
            let mut model = tiny_gpt2();
            let targets = targets(&mut model, true).unwrap();
            assert_eq!(targets.len(), 2 * 6 + 2, "{targets:?}");
            assert!(
                targets
                    .iter()
                    .any(|t| t.name == "transformer.wte.weight" && !t.transposed)
            );
            let mut dense = model.clone();
            let mut codes = BTreeMap::new();
            for (_, linear) in dense.adaptable() {
                linear.quantize(format);
            }
            for table in dense.vocab_tables().embeddings {
                table.quantize(format);
            }
            let names = param_names::<Cpu, _>(&dense);
            for (_, linear) in dense.adaptable() {
                codes.insert(names[&linear.weight.id].clone(), linear.codes().unwrap());
                // Back to dense: the dequantized values as an ordinary weight.
                let values = linear.weight.val();
                linear.quantized = None;
                linear.weight = burn::module::Param::from_tensor(values);
            }
            for table in dense.vocab_tables().embeddings {
                codes.insert(names[&table.weight.id].clone(), table.codes().unwrap());
                let values = table.weight.val();
                table.quantized = None;
                table.weight = burn::module::Param::from_tensor(values);
            }
            install(&mut model, codes).unwrap();
            let ids = Tensor::<Cpu, 2, Int>::from_ints([[1, 5, 9, 2, 7, 63]], &Default::default());
            let input = crate::io::EncoderInput {
                input_ids: ids,
                attention_mask: None,
                token_type_ids: None,
                decoder_input_ids: None,
            };
            let logits = |m: &AnyModel<Cpu>| match m.forward(&input).logits {
                Some(Logits::PerToken(t)) => t,
                _ => unreachable!("an LM's logits"),
            };
            let diff = (logits(&model) - logits(&dense)).abs().max().into_scalar();
            assert!(diff < 1e-4, "{format}: {diff}");
        }
    }

    #[test]
    fn codes_for_a_layer_the_model_lacks_or_of_the_wrong_shape_are_refused() {
        let mut model = tiny_gpt2();
        let codes = |rows, cols| {
            Arc::new(QuantizedMatrix::quantize(
                QuantFormat::Int8,
                &vec![0.5; rows * cols],
                rows,
                cols,
            ))
        };
        let err = install(
            &mut model,
            BTreeMap::from([("transformer.ln_f.weight".to_string(), codes(1, 64))]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("transformer.ln_f.weight"), "{err}");
        let err = install(
            &mut model,
            BTreeMap::from([(
                "transformer.blocks.0.attention.query.weight".to_string(),
                codes(3, 64),
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("3x64") && err.contains("64x64"), "{err}");
    }
}
