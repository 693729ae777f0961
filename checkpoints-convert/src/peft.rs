//! LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<HF module>.lora_A.weight` (`[r, in]`) and `….lora_B.weight` (`[out, r]`),
//! as `peft.PeftModel.save_pretrained` writes them and `PeftModel.from_pretrained(model, dir)`
//! reads them. The HF module of each zoo layer comes from the family's key table (one table per
//! family, so adapters need nothing per family): zoo's `P.lora.a` / `P.lora.b` (`[in, r]`,
//! `[r, out]`, burn's row layout) are the transposes of PEFT's matrices of the module whose weight
//! is `P.weight`'s HF key. GPT-2's fused `c_attn` is read into zoo's split query, key and value
//! (PEFT's shared `A`, `B`'s rows sliced) and written as one update of rank `3r` whose `B` is
//! block-diagonal (`rank_pattern` / `alpha_pattern` keep the scale), which zoo reads back into its
//! three updates.

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
    let r = field("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(&config_path, "no rank 'r'".into()))? as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad(&config_path, "no 'lora_alpha'".into()))?;
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    // Per-module ranks: only the form zoo writes for a fused module (`parts × r` with
    // `parts × alpha`, so the scale is the same; its B block-diagonal, checked below).
    let pattern = |key: &str| -> BTreeMap<String, f64> {
        field(key)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (ranks, alphas) = (pattern("rank_pattern"), pattern("alpha_pattern"));
    for (module, &rank) in &ranks {
        let scale = alphas.get(module).copied().unwrap_or(alpha) / rank;
        let parts = rank / r as f64;
        if parts.fract() != 0.0 || (scale - alpha / r as f64).abs() > 1e-12 * scale.abs() {
            return Err(bad(
                &config_path,
                format!(
                    "rank_pattern '{module}': {rank} — per-layer ranks or scales are not \
                     supported (only a fused module's parts × r with parts × alpha)"
                ),
            ));
        }
    }
    if let Some(module) = alphas.keys().find(|m| !ranks.contains_key(*m)) {
        return Err(bad(
            &config_path,
            format!("alpha_pattern '{module}': per-layer scales are not supported"),
        ));
    }

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
        // A saved module (PEFT's `modules_to_save`: a classifier's head) replaces the base's.
        if let Some(hf) = key.strip_prefix(PEFT_PREFIX)
            && is_task_head(hf)
            && let Some(layers) = zoo_of_hf.get(hf)
        {
            for &(zoo, layout) in layers {
                let data = stored.data.clone().convert::<f32>();
                let data = match layout {
                    Layout::Transposed => crate::tensors::transpose_2d(&data),
                    _ => data,
                };
                tensors.insert(zoo.to_string(), data);
            }
            continue;
        }
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
        let leaf = module.rsplit('.').next().unwrap_or(module);
        let rank = ranks.get(leaf).map_or(r, |&rank| rank as usize);
        if (is_a && rows != rank) || (!is_a && cols != rank) {
            return Err(bad(
                &weights_path,
                format!("key '{key}' has shape [{rows}, {cols}]; the rank is {rank}"),
            ));
        }
        let values = data.to_vec::<f32>().expect("converted to f32");
        // A fused module of rank parts × r holds one r-rank update per part: A's rows and B's
        // columns in blocks of r, B block-diagonal.
        let blocked = rank != r;
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
            let part = match layout {
                Layout::Split { part, parts } => Some((part, parts)),
                _ => None,
            };
            // The rows of PEFT's matrix this zoo layer reads, and the columns.
            let (row_range, col_range) = match (is_a, part, blocked) {
                (true, Some((p, _)), true) => (p * r..(p + 1) * r, 0..cols),
                (true, _, _) => (0..rows, 0..cols),
                (false, Some((p, parts)), blocked) => {
                    let each = rows / parts;
                    let cols_of = if blocked { p * r..(p + 1) * r } else { 0..cols };
                    if blocked {
                        // Off the diagonal block, B must be zero (else it is not zoo's form).
                        let off = (p * each..(p + 1) * each).any(|i| {
                            (0..cols)
                                .filter(|j| !cols_of.contains(j))
                                .any(|j| values[i * cols + j] != 0.0)
                        });
                        if off {
                            return Err(bad(
                                &weights_path,
                                format!(
                                    "key '{key}': per-layer ranks are supported only \
                                     block-diagonal (a fused module's parts)"
                                ),
                            ));
                        }
                    }
                    (p * each..(p + 1) * each, cols_of)
                }
                (false, None, _) => (0..rows, 0..cols),
            };
            let (count, width) = (row_range.len(), col_range.len());
            let mut transposed = vec![0.0f32; count * width];
            for (i, row) in row_range.clone().enumerate() {
                for (j, col) in col_range.clone().enumerate() {
                    transposed[j * count + i] = values[row * cols + col];
                }
            }
            let name = format!("{path}.lora.{}", if is_a { "a" } else { "b" });
            tensors.insert(name, TensorData::new(transposed, [width, count]));
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

/// Whether an HF key is a sequence classifier's head (PEFT's default `modules_to_save`).
fn is_task_head(hf: &str) -> bool {
    hf.starts_with("classifier.") || hf.starts_with("score.")
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

/// Writes the LoRA tensors of `named` (zoo names `….lora.a` / `….lora.b`, and a classifier's head,
/// which PEFT saves whole as `modules_to_save`; others are ignored) as a PEFT adapter into `dir` for the base `spec` with setup `lora`; `base` is what
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
    // Parts of fused HF modules (GPT-2's c_attn), written together below: HF key → part →
    // (A, B) in PEFT's orientation.
    type Fused = BTreeMap<usize, (Option<Vec<f32>>, Option<Vec<f32>>, usize, usize)>;
    let mut fused: BTreeMap<String, (usize, Fused)> = BTreeMap::new();
    let classifies = spec.architecture.head() == Head::Classify;
    for (name, data) in named {
        let Some((path, matrix)) = name
            .strip_suffix(".lora.a")
            .map(|p| (p, "lora_A"))
            .or_else(|| name.strip_suffix(".lora.b").map(|p| (p, "lora_B")))
        else {
            // A classifier's head trains whole: PEFT's `modules_to_save` (`classifier`,
            // `score`), saved under the base model's own keys.
            if let Some((hf, layout)) = hf_keys.get(name)
                && classifies
                && is_task_head(hf)
            {
                let data = match layout {
                    Layout::Transposed => {
                        crate::tensors::transpose_2d(&data.clone().convert::<f32>())
                    }
                    _ => data.clone().convert::<f32>(),
                };
                out.insert(format!("{PEFT_PREFIX}{hf}"), data);
            }
            continue;
        };
        let (hf, layout) =
            hf_keys
                .get(&format!("{path}.weight"))
                .ok_or_else(|| ConvertError::Adapter {
                    path: weights_path.clone(),
                    message: format!("zoo layer '{path}' has no HF weight in the key table"),
                })?;
        let module = hf.strip_suffix(".weight").unwrap_or(hf);
        modules.insert(module.rsplit('.').next().unwrap_or(module).to_string());
        let values = data.clone().convert::<f32>();
        let [rows, cols] = <[usize; 2]>::try_from(values.shape.to_vec()).map_err(|shape| {
            ConvertError::Adapter {
                path: weights_path.clone(),
                message: format!("'{name}' has shape {shape:?}, not a matrix"),
            }
        })?;
        let transposed = crate::tensors::transpose_2d(&values)
            .to_vec::<f32>()
            .expect("f32");
        if let Layout::Split { part, parts } = layout {
            let entry = fused
                .entry(module.to_string())
                .or_insert((*parts, BTreeMap::new()));
            let slot = entry.1.entry(*part).or_insert((None, None, 0, 0));
            match matrix {
                "lora_A" => (slot.0, slot.2) = (Some(transposed), rows),
                _ => (slot.1, slot.3) = (Some(transposed), cols),
            }
            continue;
        }
        out.insert(
            format!("{PEFT_PREFIX}{module}.{matrix}.weight"),
            TensorData::new(transposed, [cols, rows]),
        );
    }
    // A fused module gets one update of rank parts × r: A stacks the parts' A rows, B is
    // block-diagonal (part p's rows and columns p·r…), so B·A is each part's B·A in its rows;
    // PEFT's rank_pattern / alpha_pattern keep the scale alpha / r.
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (module, (parts, blocks)) in fused {
        let (r, d_in) = (
            lora.r,
            blocks
                .values()
                .find_map(|b| b.0.as_ref().map(|_| b.2))
                .unwrap_or(0),
        );
        let d_out = blocks
            .values()
            .find_map(|b| b.1.as_ref().map(|_| b.3))
            .unwrap_or(0);
        let rank = parts * r;
        let mut a = vec![0.0f32; rank * d_in];
        let mut b = vec![0.0f32; parts * d_out * rank];
        for (part, (block_a, block_b, _, _)) in &blocks {
            if let Some(block_a) = block_a {
                a[part * r * d_in..(part + 1) * r * d_in].copy_from_slice(block_a);
            }
            if let Some(block_b) = block_b {
                for i in 0..d_out {
                    for j in 0..r {
                        b[(part * d_out + i) * rank + part * r + j] = block_b[i * r + j];
                    }
                }
            }
        }
        out.insert(
            format!("{PEFT_PREFIX}{module}.lora_A.weight"),
            TensorData::new(a, [rank, d_in]),
        );
        out.insert(
            format!("{PEFT_PREFIX}{module}.lora_B.weight"),
            TensorData::new(b, [parts * d_out, rank]),
        );
        let leaf = module.rsplit('.').next().unwrap_or(&module).to_string();
        modules.insert(leaf.clone());
        rank_pattern.insert(leaf.clone(), json!(rank));
        alpha_pattern.insert(leaf, json!(parts as f64 * lora.alpha));
    }
    let saved_head = out.keys().any(|k| !k.contains(".lora_"));
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
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": if saved_head { json!(["classifier", "score"]) } else { Value::Null },
    });
    let path: PathBuf = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("JSON serialises");
    write_atomic(&path, text.as_bytes())
}

/// Folds every LoRA update of `tensors` (zoo names `P.lora.a` `[in, r]`, `P.lora.b` `[r, out]`)
/// into its layer's weight, `P.weight += (alpha / r)·a·b` (in f32, stored back in the weight's
/// dtype), and removes the adapter tensors: the merged model, with the base's keys only.
pub fn merge_into(tensors: &mut BTreeMap<String, TensorData>, lora: &LoraSpec) -> Result<()> {
    let scaling = (lora.alpha / lora.r as f64) as f32;
    let paths: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".lora.a").map(str::to_string))
        .collect();
    let missing = |key: String| ConvertError::Apply(format!("merging LoRA: no tensor '{key}'"));
    for path in paths {
        let a = tensors
            .remove(&format!("{path}.lora.a"))
            .expect("listed above");
        let b = tensors
            .remove(&format!("{path}.lora.b"))
            .ok_or_else(|| missing(format!("{path}.lora.b")))?;
        let weight_key = format!("{path}.weight");
        let weight = tensors
            .get_mut(&weight_key)
            .ok_or_else(|| missing(weight_key.clone()))?;
        let dtype = weight.dtype;
        let (d_in, r, d_out) = (a.shape[0], a.shape[1], b.shape[1]);
        if weight.shape.as_slice() != [d_in, d_out] || b.shape[0] != r {
            return Err(ConvertError::Apply(format!(
                "merging LoRA into '{weight_key}' {:?}: the update is [{d_in}, {r}]·{:?}",
                weight.shape, b.shape
            )));
        }
        let a = a.convert::<f32>().to_vec::<f32>().expect("f32");
        let b = b.convert::<f32>().to_vec::<f32>().expect("f32");
        let mut w = weight
            .clone()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32");
        for i in 0..d_in {
            for k in 0..r {
                let scaled = scaling * a[i * r + k];
                let row = &mut w[i * d_out..(i + 1) * d_out];
                for (value, b) in row.iter_mut().zip(&b[k * d_out..(k + 1) * d_out]) {
                    *value += scaled * b;
                }
            }
        }
        *weight = TensorData::new(w, [d_in, d_out]).convert_dtype(dtype);
    }
    Ok(())
}
