//! LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<HF module>.lora_A.weight` (`[r, in]`) and `….lora_B.weight` (`[out, r]`),
//! as `peft.PeftModel.save_pretrained` writes them and `PeftModel.from_pretrained(model, dir)`
//! reads them. The HF module of each zoo layer comes from the family's key table (one table per
//! family, so adapters need nothing per family): zoo's `P.lora.a` / `P.lora.b` (`[in, r]`,
//! `[r, out]`, burn's row layout) are the transposes of PEFT's matrices of the module whose weight
//! is `P.weight`'s HF key. GPT-2's fused `c_attn` is read into zoo's split query, key and value
//! (the shared `A`, `B`'s rows sliced); writing it back is not supported yet.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use models::adapters::LoraSpec;
use models::{AnyModel, Architecture, Head};
use serde_json::{Value, json};

use crate::error::{ConvertError, Result};
use crate::families::Layout;
use crate::model_dir::ModelSpec;
use crate::tensors::{read_weights_file, write_atomic, write_safetensors};

/// PEFT's adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before the base model's module names.
const PEFT_PREFIX: &str = "base_model.model.";

/// An adapter read for a base model: its setup and its tensors under zoo names.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Rank, scale, dropout and the zoo target names it adapts.
    pub lora: LoraSpec,
    /// `….lora.a` / `….lora.b` tensors (f32).
    pub tensors: BTreeMap<String, TensorData>,
}

/// The zoo target name of every adaptable layer of `spec`'s model, by the layer's zoo path
/// (`model.layers.0.self_attn.q_proj` → `q_proj`): found by attaching each target alone to the
/// lazily built model and listing where its adapters land.
fn target_of_paths(spec: &ModelSpec) -> Result<BTreeMap<String, String>> {
    type Cpu = bmtrain_backend::Cpu;
    let device = Default::default();
    let config_error = |error| ConvertError::Config {
        path: spec.dir.clone(),
        error,
    };
    let build = || AnyModel::<Cpu>::new(spec.architecture, &spec.config, &device);
    let mut model = build().map_err(config_error)?;
    let mut targets: Vec<&'static str> = Vec::new();
    for (name, _) in model.adaptable() {
        if !targets.contains(&name) {
            targets.push(name);
        }
    }
    let mut out = BTreeMap::new();
    for target in targets {
        let mut model = build().map_err(config_error)?;
        let probe = LoraSpec {
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            targets: vec![target.to_string()],
        };
        probe
            .attach(model.adaptable(), &device)
            .map_err(config_error)?;
        for info in models::param_infos::<Cpu, _>(&model) {
            if let Some(path) = info.name.strip_suffix(".lora.a") {
                out.insert(path.to_string(), target.to_string());
            }
        }
    }
    Ok(out)
}

/// The HF key pair of each zoo weight of `spec`'s model: `zoo key → (HF key, layout)`.
fn hf_of_zoo(spec: &ModelSpec) -> BTreeMap<String, (String, Layout)> {
    spec.key_pairs()
        .into_iter()
        .map(|pair| (pair.zoo, (pair.hf, pair.layout)))
        .collect()
}

/// Reads the PEFT LoRA adapter in `dir` for the base model `spec`: every key must name a layer of
/// this model (an adapter for another base is an error naming the key), and options zoo does not
/// implement (DoRA, rsLoRA, per-layer ranks, LoRA biases) are refused by name.
pub fn read_adapter(dir: &Path, spec: &ModelSpec) -> Result<Adapter> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let bad = |path: &Path, message: String| ConvertError::Adapter {
        path: path.to_path_buf(),
        message,
    };
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| ConvertError::io(&config_path, e))?;
    let config: Value = serde_json::from_str(&text).map_err(|error| ConvertError::Json {
        path: config_path.clone(),
        error,
    })?;
    let field = |key: &str| config.get(key).filter(|v| !v.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(
                &config_path,
                format!("peft_type {other:?}: zoo reads LoRA adapters (\"LORA\")"),
            ));
        }
    }
    for (key, what) in [
        ("use_dora", "DoRA"),
        ("use_rslora", "rsLoRA scaling"),
        ("lora_bias", "LoRA biases"),
    ] {
        if field(key).and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                &config_path,
                format!("{key}: true — {what} is not supported"),
            ));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(
                &config_path,
                format!("{key}: per-layer ranks or scales are not supported"),
            ));
        }
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(&config_path, "no rank 'r'".into()))? as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad(&config_path, "no 'lora_alpha'".into()))?;
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);

    let targets_by_path = target_of_paths(spec)?;
    let hf_keys = hf_of_zoo(spec);
    // HF weight key → the zoo layers it feeds (several when fused), with their layouts.
    let mut zoo_of_hf: BTreeMap<&str, Vec<(&str, Layout)>> = BTreeMap::new();
    for (zoo, (hf, layout)) in &hf_keys {
        zoo_of_hf.entry(hf).or_default().push((zoo, *layout));
    }
    let file = read_weights_file(&weights_path)?;
    let mut tensors = BTreeMap::new();
    let mut targets = BTreeSet::new();
    for (key, stored) in file {
        let module = key
            .strip_prefix(PEFT_PREFIX)
            .and_then(|k| {
                k.strip_suffix(".lora_A.weight")
                    .map(|m| (m, true))
                    .or_else(|| k.strip_suffix(".lora_B.weight").map(|m| (m, false)))
            })
            .ok_or_else(|| {
                bad(
                    &weights_path,
                    format!(
                        "key '{key}' is not a LoRA matrix (base_model.model.<module>.lora_A|B.weight)"
                    ),
                )
            })?;
        let (module, is_a) = module;
        let layers = zoo_of_hf
            .get(format!("{module}.weight").as_str())
            .ok_or_else(|| {
                bad(
                    &weights_path,
                    format!(
                        "key '{key}': this {} has no layer '{module}' (an adapter for another \
                         base model?)",
                        spec.architecture.hf_name()
                    ),
                )
            })?;
        let data = stored.data.convert::<f32>();
        let [rows, cols] = <[usize; 2]>::try_from(data.shape.to_vec()).map_err(|shape| {
            bad(
                &weights_path,
                format!("key '{key}' has shape {shape:?}, not a matrix"),
            )
        })?;
        if (is_a && rows != r) || (!is_a && cols != r) {
            return Err(bad(
                &weights_path,
                format!("key '{key}' has shape [{rows}, {cols}]; the rank is {r}"),
            ));
        }
        let values = data.to_vec::<f32>().expect("converted to f32");
        for &(zoo, layout) in layers {
            let path = zoo.strip_suffix(".weight").unwrap_or(zoo);
            let target = targets_by_path.get(path).ok_or_else(|| {
                bad(
                    &weights_path,
                    format!("key '{key}': zoo cannot adapt '{module}' (zoo layer {path})"),
                )
            })?;
            targets.insert(target.clone());
            // PEFT's matrices are nn.Linear-shaped whatever the base stores; zoo's are their
            // transposes. A fused module's B is sliced by rows (its output), A shared.
            let (from, count) = match (is_a, layout) {
                (false, Layout::Split { part, parts }) => {
                    let rows_each = rows / parts;
                    (part * rows_each, rows_each)
                }
                _ => (0, rows),
            };
            let mut transposed = vec![0.0f32; count * cols];
            for i in 0..count {
                for j in 0..cols {
                    transposed[j * count + i] = values[(from + i) * cols + j];
                }
            }
            let name = format!("{path}.lora.{}", if is_a { "a" } else { "b" });
            tensors.insert(name, TensorData::new(transposed, [cols, count]));
        }
    }
    let lora = LoraSpec {
        r,
        alpha,
        dropout,
        targets: targets.into_iter().collect(),
    };
    lora.validate().map_err(|error| ConvertError::Config {
        path: config_path.clone(),
        error,
    })?;
    Ok(Adapter { lora, tensors })
}

/// PEFT's `task_type` of a class.
fn task_type(architecture: Architecture) -> Value {
    match architecture.head() {
        Head::CausalLm => json!("CAUSAL_LM"),
        Head::Seq2seq => json!("SEQ_2_SEQ_LM"),
        Head::Classify => json!("SEQ_CLS"),
        Head::MaskedLm | Head::Body => Value::Null,
    }
}

/// Writes the LoRA tensors of `named` (zoo names `….lora.a` / `….lora.b`; others are ignored) as
/// a PEFT adapter into `dir` for the base `spec` with setup `lora`; `base` is what
/// `base_model_name_or_path` records. Each file is written through a temporary and renamed.
pub fn write_adapter(
    dir: &Path,
    spec: &ModelSpec,
    lora: &LoraSpec,
    named: &BTreeMap<String, TensorData>,
    base: &str,
) -> Result<()> {
    let hf_keys = hf_of_zoo(spec);
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let mut out = BTreeMap::new();
    let mut modules = BTreeSet::new();
    for (name, data) in named {
        let Some((path, matrix)) = name
            .strip_suffix(".lora.a")
            .map(|p| (p, "lora_A"))
            .or_else(|| name.strip_suffix(".lora.b").map(|p| (p, "lora_B")))
        else {
            continue;
        };
        let (hf, layout) =
            hf_keys
                .get(&format!("{path}.weight"))
                .ok_or_else(|| ConvertError::Adapter {
                    path: weights_path.clone(),
                    message: format!("zoo layer '{path}' has no HF weight in the key table"),
                })?;
        if let Layout::Split { .. } = layout {
            return Err(ConvertError::Adapter {
                path: weights_path.clone(),
                message: format!(
                    "'{path}' is part of the fused HF tensor '{hf}' (GPT-2's c_attn): writing a \
                     PEFT adapter for it is not supported yet (adapt attn_c_proj, c_fc or \
                     mlp_c_proj, or merge with zoo convert)"
                ),
            });
        }
        let module = hf.strip_suffix(".weight").unwrap_or(hf);
        modules.insert(module.rsplit('.').next().unwrap_or(module).to_string());
        let values = data.clone().convert::<f32>();
        let [rows, cols] = <[usize; 2]>::try_from(values.shape.to_vec()).map_err(|shape| {
            ConvertError::Adapter {
                path: weights_path.clone(),
                message: format!("'{name}' has shape {shape:?}, not a matrix"),
            }
        })?;
        let values = values.to_vec::<f32>().expect("converted to f32");
        let mut transposed = vec![0.0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                transposed[j * rows + i] = values[i * cols + j];
            }
        }
        out.insert(
            format!("{PEFT_PREFIX}{module}.{matrix}.weight"),
            TensorData::new(transposed, [cols, rows]),
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| ConvertError::io(dir, e))?;
    write_safetensors(&weights_path, &out, None)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": task_type(spec.architecture),
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules.into_iter().collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": null,
    });
    let path: PathBuf = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("JSON serialises");
    write_atomic(&path, text.as_bytes())
}
