//! Model directories, HF and zoo: reading what they describe, checking their weights against the
//! config, loading them into a burn model, and converting one kind into the other.
//!
//! ```text
//!  HF dir:  config.json + model.safetensors | *.index.json | pytorch_model.bin, tokenizer files
//!  zoo dir: zoo.json (architecture + the HF config) + model.safetensors under zoo names, tokenizer files
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bmtrain_backend::quant::QuantizedMatrix;

use burn::module::ParamId;
use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, TensorSnapshot};
use models::{AnyModel, Architecture, ConfigError, ModelConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ConvertError, Result};
use crate::families::{KeyPair, Layout, Variant, by_hf_key, table};
use crate::quantize::{StoredCodes, take_stored_codes};
use crate::tensors::{
    IndexedTensor, TensorIndex, WeightsFormat, concat_last_dim, index_dir_weights, read_json,
    split_last_dim, transpose_2d, write_atomic, write_safetensors,
};
use crate::tokenizer;

/// The file that marks a zoo model directory.
pub const ZOO_MANIFEST: &str = "zoo.json";

/// The key a QLoRA run's checkpoints record in their config (the base's format, `nf4` or
/// `int8`): such a checkpoint holds no base linear layers (`zoo finetune --quantize-base`).
pub const QLORA_KEY: &str = "zoo_quantized_base";
/// The HF config file.
pub const HF_CONFIG: &str = "config.json";
/// Tokenizer files (and `generation_config.json`, which holds the end-of-text and padding ids
/// `zoo generate` uses) copied between directories as they are.
pub const TOKENIZER_FILES: [&str; 9] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "added_tokens.json",
];

/// Which kind of directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// A HuggingFace model directory, as on the hub.
    Hf,
    /// A directory written by `zoo convert`.
    Zoo,
}

/// `zoo.json`: what a zoo directory holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZooManifest {
    /// Always `"zoo"`.
    pub format: String,
    /// Layout version of the directory.
    pub format_version: u32,
    /// The transformers class name.
    pub architecture: String,
    /// The HF `config.json`, kept whole so `--to-hf` writes it back unchanged.
    pub hf_config: Value,
}

/// What a model directory describes, before any weights are read.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// HF or zoo.
    pub kind: DirKind,
    /// The directory.
    pub dir: PathBuf,
    /// The model class.
    pub architecture: Architecture,
    /// The parsed and validated config.
    pub config: ModelConfig,
    /// The HF config as JSON.
    pub hf_config: Value,
}

/// Reads and checks a directory's config (`config.json` or `zoo.json`).
pub fn read_spec(dir: &Path) -> Result<ModelSpec> {
    let zoo_path = dir.join(ZOO_MANIFEST);
    let hf_path = dir.join(HF_CONFIG);
    let (kind, config_path, hf_config, named_architecture) = if zoo_path.is_file() {
        let manifest: ZooManifest = read_json(&zoo_path)?;
        (
            DirKind::Zoo,
            zoo_path,
            manifest.hf_config,
            Some(manifest.architecture),
        )
    } else if hf_path.is_file() {
        let value: Value = read_json(&hf_path)?;
        (DirKind::Hf, hf_path, value, None)
    } else if !dir.is_dir() {
        return Err(ConvertError::io(
            dir,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    } else {
        return Err(ConvertError::NotAModelDir {
            dir: dir.to_path_buf(),
        });
    };
    let config_error = |error| ConvertError::Config {
        path: config_path.clone(),
        error,
    };
    let architecture = match named_architecture {
        Some(name) => Architecture::from_hf_name(&name).map_err(config_error)?,
        None => Architecture::from_hf_config(&hf_config).map_err(config_error)?,
    };
    let config = architecture
        .family()
        .parse_config(&hf_config)
        .map_err(|error| match error {
            ConfigError::Json(error) => ConvertError::Json {
                path: config_path.clone(),
                error,
            },
            ConfigError::Model(error) => config_error(error),
        })?;
    Ok(ModelSpec {
        kind,
        dir: dir.to_path_buf(),
        architecture,
        config,
        hf_config,
    })
}

/// Weights checked against a spec, under zoo names, in their stored dtypes.
#[derive(Debug, Clone)]
pub struct ZooWeights {
    /// Tensors by zoo key.
    pub tensors: BTreeMap<String, TensorData>,
    /// Keys of the checkpoint that no parameter uses (reported, not fatal, as in transformers).
    pub unused: Vec<String>,
    /// Quantized weights by zoo key (a `zoo quantize` directory's; their keys are not in
    /// `tensors`).
    pub quantized: BTreeMap<String, Arc<QuantizedMatrix>>,
}

/// A directory's weights under zoo names, checked against the spec (every key and shape, from
/// the files' headers), each read from disk only when asked ([`ZooWeightsReader::read`]): a
/// training job builds its shards tensor by tensor without ever holding the whole checkpoint.
#[derive(Debug, Clone)]
pub struct ZooWeightsReader {
    /// Per zoo key: the stored tensor and how its layout becomes zoo's.
    recipes: BTreeMap<String, (IndexedTensor, Layout)>,
    /// Quantized weights by zoo key (not in `recipes`).
    quantized: BTreeMap<String, StoredCodes>,
    /// Keys of the checkpoint that no parameter uses.
    pub unused: Vec<String>,
}

impl ZooWeightsReader {
    /// The zoo keys, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.recipes.keys().map(String::as_str)
    }

    /// The zoo shape of `key`, if the checkpoint has it.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.recipes
            .get(key)
            .map(|(stored, layout)| zoo_shape(&stored.shape, *layout))
    }

    /// Reads `key` in zoo's layout and the stored dtype; `None` if the checkpoint lacks it.
    pub fn read(&self, key: &str) -> Option<Result<TensorData>> {
        let (stored, layout) = self.recipes.get(key)?;
        Some(stored.read().map(|data| match *layout {
            Layout::Same => data,
            Layout::Transposed => transpose_2d(&data),
            Layout::Split { part, parts } => split_last_dim(&data, part, parts),
        }))
    }

    /// Whether the directory holds quantized weights (which [`ZooWeightsReader::read`] does not
    /// give: [`ZooWeightsReader::read_all`] does).
    pub fn is_quantized(&self) -> bool {
        !self.quantized.is_empty()
    }

    /// Reads every tensor.
    pub fn read_all(self) -> Result<ZooWeights> {
        let mut tensors = BTreeMap::new();
        for key in self.recipes.keys() {
            let data = self.read(key).expect("a key of the reader")?;
            tensors.insert(key.clone(), data);
        }
        let mut quantized = BTreeMap::new();
        for (key, stored) in &self.quantized {
            quantized.insert(key.clone(), stored.read(key)?);
        }
        Ok(ZooWeights {
            tensors,
            unused: self.unused,
            quantized,
        })
    }
}

impl models::train::TensorSource for ZooWeightsReader {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        ZooWeightsReader::shape(self, name)
    }

    fn read(&self, name: &str) -> Option<std::result::Result<TensorData, String>> {
        ZooWeightsReader::read(self, name).map(|r| r.map_err(|e| e.to_string()))
    }
}

impl ModelSpec {
    /// The LoRA adapters a trained directory records (`zoo_lora` in its config), if any.
    pub fn lora(&self) -> Result<Option<models::adapters::LoraSpec>> {
        self.recorded("zoo_lora", models::adapters::LoraSpec::validate)
    }

    /// What zoo recorded under `key` in the directory's config (`zoo_lora`, `zoo_quantization`),
    /// parsed and checked by `check`; errors name the config file.
    pub(crate) fn recorded<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        check: impl FnOnce(&T) -> std::result::Result<(), models::ModelError>,
    ) -> Result<Option<T>> {
        let Some(value) = self.hf_config.get(key).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let path = self.dir.join(match self.kind {
            DirKind::Hf => HF_CONFIG,
            DirKind::Zoo => ZOO_MANIFEST,
        });
        let config_error = |error| ConvertError::Config {
            path: path.clone(),
            error,
        };
        let entry: T = serde_json::from_value(value.clone())
            .map_err(|e| config_error(models::ModelError::config(key, e.to_string())))?;
        check(&entry).map_err(config_error)?;
        Ok(Some(entry))
    }

    /// The model this directory describes, with fresh (lazy) weights and its LoRA adapters.
    pub fn new_model<B: Backend>(&self, device: &B::Device) -> Result<AnyModel<B>> {
        let config_error = |error| ConvertError::Config {
            path: self.dir.join(HF_CONFIG),
            error,
        };
        let mut model =
            AnyModel::<B>::new(self.architecture, &self.config, device).map_err(config_error)?;
        if let Some(lora) = self.lora()? {
            lora.attach(model.adaptable(), device)
                .map_err(config_error)?;
        }
        Ok(model)
    }

    /// Parameters of the model the config describes, counted on the lazily built model (its
    /// shapes alone: nothing is allocated, whatever the config claims).
    pub fn parameter_count(&self) -> Result<u128> {
        let device = Default::default();
        let model = self.new_model::<bmtrain_backend::Cpu>(&device)?;
        Ok(models::param_infos::<bmtrain_backend::Cpu, _>(&model)
            .iter()
            .map(|p| p.shape.iter().map(|&d| d as u128).product::<u128>())
            .sum())
    }

    /// Refuses a model whose weights, at `bytes_per_parameter`, exceed `available` bytes.
    pub fn check_fits(&self, bytes_per_parameter: u64, available: u64) -> Result<()> {
        let parameters = self.parameter_count()?;
        let needed = parameters * u128::from(bytes_per_parameter);
        if needed > u128::from(available) {
            return Err(ConvertError::TooLarge {
                path: self.dir.join(match self.kind {
                    DirKind::Hf => HF_CONFIG,
                    DirKind::Zoo => ZOO_MANIFEST,
                }),
                parameters,
                bytes_per_parameter,
                needed,
                available,
            });
        }
        Ok(())
    }

    /// The key pairs of this model.
    pub fn key_pairs(&self) -> Vec<KeyPair> {
        table(self.architecture.family()).pairs(self.architecture, &Variant::of(&self.config))
    }

    /// Zoo key → shape the config implies, from lazily built parameters (nothing is allocated).
    fn expected_shapes(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        let device = Default::default();
        let model = self.new_model::<bmtrain_backend::Cpu>(&device)?;
        Ok(models::param_infos::<bmtrain_backend::Cpu, _>(&model)
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect())
    }

    /// Maps HF tensors to zoo names, checking that every parameter is there with the right shape.
    pub fn hf_to_zoo(&self, hf: TensorIndex, source_name: &str) -> Result<ZooWeightsReader> {
        let table = table(self.architecture.family());
        let pairs = self.key_pairs();
        let lookup = by_hf_key(&pairs);
        let mut found: BTreeMap<&str, IndexedTensor> = BTreeMap::new();
        let mut aliased = Vec::new();
        let mut unused = Vec::new();
        for (key, tensor) in hf {
            let normalized = table.normalize_hf_key(&key, self.architecture);
            if let Some((hf_key, _)) = lookup.get_key_value(normalized.as_str()) {
                found.insert(hf_key, tensor);
            } else if table.is_ignored(&normalized) {
                continue;
            } else if let Some(canonical) = table.canonical(&normalized) {
                aliased.push((canonical, key, tensor));
            } else {
                unused.push(key);
            }
        }
        for (canonical, key, tensor) in aliased {
            match lookup.get_key_value(canonical) {
                Some((hf_key, _)) => {
                    found.entry(hf_key).or_insert(tensor);
                }
                None => unused.push(key),
            }
        }
        let missing: Vec<String> = lookup
            .keys()
            .filter(|k| !found.contains_key(*k))
            .map(|k| k.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(ConvertError::MissingKeys {
                source_name: source_name.to_string(),
                architecture: self.architecture.hf_name(),
                keys: missing,
            });
        }
        let expected = self.expected_shapes()?;
        let mut recipes = BTreeMap::new();
        for pair in &pairs {
            let stored = &found[pair.hf.as_str()];
            let want = &expected[&pair.zoo];
            check_shape(stored, &pair.hf, &hf_shape(want, pair.layout))?;
            recipes.insert(pair.zoo.clone(), (stored.clone(), pair.layout));
        }
        Ok(ZooWeightsReader {
            recipes,
            quantized: BTreeMap::new(),
            unused,
        })
    }

    /// Checks zoo-named tensors (a zoo directory's) the same way.
    pub fn check_zoo(&self, mut zoo: TensorIndex, source_name: &str) -> Result<ZooWeightsReader> {
        let mut expected = self.expected_shapes()?;
        let quantized = match self.quantization()? {
            Some(spec) => take_stored_codes(&spec, &mut zoo, source_name)?,
            None => BTreeMap::new(),
        };
        for key in quantized.keys() {
            if expected.remove(key).is_none() {
                return Err(ConvertError::Quantize {
                    path: self.dir.join(ZOO_MANIFEST),
                    message: format!(
                        "{key} is recorded as quantized but is no weight of this model"
                    ),
                });
            }
        }
        let missing: Vec<String> = expected
            .keys()
            .filter(|k| !zoo.contains_key(*k))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(ConvertError::MissingKeys {
                source_name: source_name.to_string(),
                architecture: self.architecture.hf_name(),
                keys: missing,
            });
        }
        let mut recipes = BTreeMap::new();
        for (key, shape) in &expected {
            let stored = zoo.remove(key).expect("checked above");
            check_shape(&stored, key, shape)?;
            recipes.insert(key.clone(), (stored, Layout::Same));
        }
        Ok(ZooWeightsReader {
            recipes,
            quantized,
            unused: zoo.into_keys().collect(),
        })
    }

    /// Reads and checks the directory's weights, whatever its kind. An HF T5 checkpoint saved by
    /// transformers 5 may untie the head here (see [`ModelSpec::resolve_tied_output`]).
    pub fn read_weights(&mut self, format: WeightsFormat) -> Result<ZooWeights> {
        self.open_weights(format)?.read_all()
    }

    /// [`ModelSpec::open_weights`] for where a training job starts: a quantized directory is
    /// refused (its linear layers have no dense values to start from).
    pub fn open_for_training(&mut self, format: WeightsFormat) -> Result<ZooWeightsReader> {
        if let Some(quantized) = self.quantization()? {
            let bits = match quantized.format.as_str() {
                "nf4" => 4,
                _ => 8,
            };
            return Err(ConvertError::Quantize {
                path: self.dir.clone(),
                message: format!(
                    "is quantized ({}): training starts from dense weights; give the directory \
                     it was quantized from (with --quantize-base {bits} --lora-r R to train on \
                     the same codes)",
                    quantized.format
                ),
            });
        }
        self.open_weights(format)
    }

    /// Checks the directory's weights from their headers and returns a reader of them under zoo
    /// names: what [`ModelSpec::read_weights`] reads at once, tensor by tensor.
    pub fn open_weights(&mut self, format: WeightsFormat) -> Result<ZooWeightsReader> {
        if let Some(format) = self.hf_config.get(QLORA_KEY) {
            return Err(ConvertError::Quantize {
                path: self.dir.join(ZOO_MANIFEST),
                message: format!(
                    "is a checkpoint of QLoRA training ({QLORA_KEY}: {format}): it holds the \
                     adapters and the parameters that were not quantized, not the base's linear \
                     layers; run it as --model BASE --adapter {} (BASE the model it trained \
                     on, or that model after zoo quantize), or continue it with --resume",
                    self.dir.display()
                ),
            });
        }
        let source_name = self.dir.display().to_string();
        let tensors = index_dir_weights(&self.dir, format)?;
        match self.kind {
            DirKind::Hf => {
                self.resolve_tied_output(&tensors)?;
                self.hf_to_zoo(tensors, &source_name)
            }
            DirKind::Zoo => self.check_zoo(tensors, &source_name),
        }
    }

    /// Decides whether the output head is tied when the config alone cannot say. A head that is
    /// a byte copy of the embeddings is tied (state dicts store both). A distinct head is a
    /// separate parameter when the config comes from transformers 5, which writes
    /// `tie_word_embeddings: true` for every T5 and keeps a separate head in the file; the config
    /// is then untied (also in the HF config zoo stores). With any other config a distinct head
    /// contradicts `tie_word_embeddings: true` and is an error.
    pub fn resolve_tied_output(&mut self, hf: &TensorIndex) -> Result<()> {
        let table = table(self.architecture.family());
        let Some((head, embeddings)) = table.tied_output else {
            return Ok(());
        };
        let has_head = table
            .heads
            .iter()
            .any(|(a, rows)| *a == self.architecture && rows.iter().any(|r| r.hf == head));
        if !has_head || !self.config.tie_word_embeddings() {
            return Ok(());
        }
        let (Some(h), Some(e)) = (hf.get(head), hf.get(embeddings)) else {
            return Ok(());
        };
        if h.shape == e.shape && h.dtype == e.dtype && h.read()?.as_bytes() == e.read()?.as_bytes()
        {
            return Ok(());
        }
        if !self.config.head_tie_follows_checkpoint() {
            return Err(ConvertError::TiedHeadMismatch {
                file: h.file.display().to_string(),
                head: head.to_string(),
                embeddings: embeddings.to_string(),
            });
        }
        self.config.untie_word_embeddings();
        if let Some(object) = self.hf_config.as_object_mut() {
            object.insert("tie_word_embeddings".into(), Value::Bool(false));
            if let models::ModelConfig::T5(c) = &self.config {
                object.insert(
                    "scale_decoder_outputs".into(),
                    Value::Bool(c.scales_decoder_output()),
                );
            }
        }
        Ok(())
    }
}

/// The HF-layout shape of a zoo shape.
fn hf_shape(zoo_shape: &[usize], layout: Layout) -> Vec<usize> {
    match layout {
        Layout::Same => zoo_shape.to_vec(),
        Layout::Transposed => zoo_shape.iter().rev().copied().collect(),
        Layout::Split { parts, .. } => {
            let mut shape = zoo_shape.to_vec();
            if let Some(last) = shape.last_mut() {
                *last *= parts;
            }
            shape
        }
    }
}

/// The zoo-layout shape of an HF shape (the inverse of [`hf_shape`]).
fn zoo_shape(hf: &[usize], layout: Layout) -> Vec<usize> {
    match layout {
        Layout::Same => hf.to_vec(),
        Layout::Transposed => hf.iter().rev().copied().collect(),
        Layout::Split { parts, .. } => {
            let mut shape = hf.to_vec();
            if let Some(last) = shape.last_mut() {
                *last /= parts;
            }
            shape
        }
    }
}

fn check_shape(stored: &IndexedTensor, key: &str, expected: &[usize]) -> Result<()> {
    let found = stored.shape.clone();
    if found != expected {
        return Err(ConvertError::ShapeMismatch {
            file: stored.file.display().to_string(),
            key: key.to_string(),
            expected: expected.to_vec(),
            found,
        });
    }
    Ok(())
}

/// Options for [`load_model`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Which weights file to read.
    pub format: WeightsFormat,
    /// Replaces every dropout probability of the config (0 for deterministic training).
    pub dropout: Option<f64>,
    /// The parameters' dtype. `None` is f32 whatever the checkpoint stores (bf16 and f16
    /// checkpoints are widened on load); `Some(F16)` / `Some(BF16)` casts after loading.
    pub dtype: Option<burn::tensor::FloatDType>,
    /// Bytes of memory the process may use: a model whose weights alone need more is refused
    /// ([`ConvertError::TooLarge`]) from its config, before any tensor is read. `None`: no check.
    pub memory_limit: Option<u64>,
    /// A PEFT LoRA adapter directory to attach (see [`crate::peft`]).
    pub adapter: Option<PathBuf>,
}

/// A model loaded from a directory.
#[derive(Debug)]
pub struct LoadedModel<B: Backend> {
    /// The model, weights in f32.
    pub model: AnyModel<B>,
    /// What the directory describes.
    pub spec: ModelSpec,
    /// Checkpoint keys no parameter used.
    pub unused: Vec<String>,
}

/// Loads an HF or zoo directory into a model on `device`. Weights are checked (missing keys and
/// wrong shapes are errors naming the key and file) and converted to f32.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<LoadedModel<B>> {
    let mut spec = read_spec(dir)?;
    if let Some(limit) = options.memory_limit {
        // Loaded as f32 (4 bytes) whatever the file stores, then cast.
        spec.check_fits(4, limit)?;
    }
    let mut weights = spec.read_weights(options.format)?;
    if let Some(p) = options.dropout {
        spec.config = spec.config.with_dropout(p);
    }
    if let Some(dir) = &options.adapter {
        // The base's weights are read as the base; the adapter adds its layers and tensors.
        let adapter = crate::peft::read_adapter(dir, &spec)?;
        spec.hf_config["zoo_lora"] =
            serde_json::to_value(&adapter.lora).expect("a LoRA setup serialises");
        weights.tensors.extend(adapter.tensors);
    }
    if options.dtype.is_some() && !weights.quantized.is_empty() {
        return Err(ConvertError::Quantize {
            path: spec.dir.clone(),
            message: "is quantized: it runs in f32 around its codes, not in another dtype".into(),
        });
    }
    let mut model = build_model(&spec, weights.tensors, weights.quantized, device)?;
    if let Some(dtype) = options.dtype {
        model = models::cast_float_params(model, dtype);
    }
    Ok(LoadedModel {
        model,
        spec,
        unused: weights.unused,
    })
}

/// Builds the model of `spec` from checked zoo tensors and quantized weights.
pub fn build_model<B: Backend>(
    spec: &ModelSpec,
    tensors: BTreeMap<String, TensorData>,
    quantized: BTreeMap<String, Arc<QuantizedMatrix>>,
    device: &B::Device,
) -> Result<AnyModel<B>> {
    let mut model = spec.new_model::<B>(device)?;
    let quantized_keys: Vec<String> = quantized.keys().cloned().collect();
    // First: the quantized layers' weights become lazy, and the snapshots leave them so.
    models::quantize::install(&mut model, quantized).map_err(|error| ConvertError::Config {
        path: spec.dir.join(ZOO_MANIFEST),
        error,
    })?;
    let snapshots = tensors
        .into_iter()
        .map(|(key, data)| {
            let path = key.split('.').map(str::to_string).collect();
            TensorSnapshot::from_data(data.convert::<f32>(), path, Vec::new(), ParamId::new())
        })
        .collect();
    // Enum variants (AnyModel::BertModel, …) are not part of zoo names.
    let mut result = model.apply(snapshots, None, None, true);
    result
        .missing
        .retain(|(path, _)| !quantized_keys.contains(path));
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(ConvertError::Apply(format!(
            "errors {:?}, missing {:?}, unused {:?}",
            result
                .errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>(),
            result.missing,
            result.unused
        )));
    }
    Ok(model)
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The model class.
    pub architecture: Architecture,
    /// Number of tensors written.
    pub tensors: usize,
    /// Checkpoint keys no parameter used (not written).
    pub unused: Vec<String>,
    /// Tokenizer files written.
    pub tokenizer_files: Vec<String>,
}

/// `zoo convert --from HF_DIR --out ZOO_DIR`: checks everything, then writes the zoo directory in
/// one rename, so a failed conversion leaves nothing at `out`.
pub fn convert_hf_to_zoo(
    from: &Path,
    out: &Path,
    format: WeightsFormat,
    overwrite: bool,
) -> Result<ConvertReport> {
    convert_hf_to_zoo_within(from, out, format, overwrite, None)
}

/// [`convert_hf_to_zoo`], refusing (before reading any tensor) a model whose weights in their
/// stored dtype exceed `memory_limit` bytes: a conversion holds every tensor at once.
pub fn convert_hf_to_zoo_within(
    from: &Path,
    out: &Path,
    format: WeightsFormat,
    overwrite: bool,
    memory_limit: Option<u64>,
) -> Result<ConvertReport> {
    check_output(out, overwrite)?;
    let mut spec = read_spec(from)?;
    if spec.kind != DirKind::Hf {
        return Err(ConvertError::NotAModelDir {
            dir: from.join(HF_CONFIG),
        });
    }
    if let Some(limit) = memory_limit {
        // At least two bytes a parameter (half precision), whatever the file stores.
        spec.check_fits(2, limit)?;
    }
    let weights = spec.read_weights(format)?;
    // Check the tokenizer before writing anything, and keep a tokenizer.json for zoo.
    let tokenizer = tokenizer::load_tokenizer(from)?;
    let manifest = ZooManifest {
        format: "zoo".into(),
        format_version: 1,
        architecture: spec.architecture.hf_name().into(),
        hf_config: spec.hf_config.clone(),
    };
    let tensors = weights.tensors.len();
    let tokenizer_files = publish_dir(out, overwrite, |staging| {
        write_json_file(&staging.join(ZOO_MANIFEST), &manifest)?;
        write_safetensors(&staging.join("model.safetensors"), &weights.tensors, None)?;
        let mut files = copy_tokenizer_files(from, staging)?;
        // A CPM tokenizer has no tokenizer.json form (jieba); its spiece.model is copied.
        if let Some(tokenizer) = tokenizer.as_ref().and_then(|t| t.as_hf())
            && !files.iter().any(|f| f == "tokenizer.json")
        {
            tokenizer::save_tokenizer(tokenizer, &staging.join("tokenizer.json"))?;
            files.push("tokenizer.json".into());
        }
        Ok(files)
    })?;
    Ok(ConvertReport {
        architecture: spec.architecture,
        tensors,
        unused: weights.unused,
        tokenizer_files,
    })
}

/// `zoo convert --to-hf --from ZOO_DIR --out HF_DIR`: the HF layout transformers writes
/// (`config.json`, `model.safetensors` with tied weights stored once, tokenizer files).
pub fn export_zoo_to_hf(from: &Path, out: &Path, overwrite: bool) -> Result<ConvertReport> {
    export_zoo_to_hf_within(from, out, overwrite, None)
}

/// [`export_zoo_to_hf`], refusing a model that does not fit `memory_limit` bytes (see
/// [`convert_hf_to_zoo_within`]).
pub fn export_zoo_to_hf_within(
    from: &Path,
    out: &Path,
    overwrite: bool,
    memory_limit: Option<u64>,
) -> Result<ConvertReport> {
    check_output(out, overwrite)?;
    let mut spec = read_spec(from)?;
    if spec.kind != DirKind::Zoo {
        return Err(ConvertError::NotAModelDir {
            dir: from.join(ZOO_MANIFEST),
        });
    }
    refuse_quantized(&spec)?;
    if let Some(limit) = memory_limit {
        spec.check_fits(2, limit)?;
    }
    let mut zoo = spec.read_weights(WeightsFormat::Safetensors)?.tensors;
    // A LoRA checkpoint exports merged: HF's layout has no place for the adapters (they are
    // beside it, as PEFT's adapter files).
    if let Some(lora) = spec.lora()? {
        crate::peft::merge_into(&mut zoo, &lora)?;
        if let Some(config) = spec.hf_config.as_object_mut() {
            config.remove("zoo_lora");
        }
    }
    let hf = hf_tensors(&spec, zoo);
    let tensors = hf.len();
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    let tokenizer_files = publish_dir(out, overwrite, |staging| {
        write_json_file(&staging.join(HF_CONFIG), &spec.hf_config)?;
        write_safetensors(&staging.join("model.safetensors"), &hf, metadata)?;
        copy_tokenizer_files(from, staging)
    })?;
    Ok(ConvertReport {
        architecture: spec.architecture,
        tensors,
        unused: Vec::new(),
        tokenizer_files,
    })
}

/// `zoo convert --from BASE --merge-adapter ADAPTER --out OUT [--to-hf]`: the base (HF or zoo)
/// with the PEFT adapter folded into its weights, written as a zoo directory or (`to_hf`) in
/// HF's layout; a model larger than `memory_limit` is refused first.
pub fn merge_adapter_within(
    from: &Path,
    adapter: &Path,
    out: &Path,
    to_hf: bool,
    format: WeightsFormat,
    overwrite: bool,
    memory_limit: Option<u64>,
) -> Result<ConvertReport> {
    check_output(out, overwrite)?;
    let mut spec = read_spec(from)?;
    refuse_quantized(&spec)?;
    if let Some(limit) = memory_limit {
        spec.check_fits(4, limit)?;
    }
    let weights = spec.read_weights(format)?;
    let lora = crate::peft::read_adapter(adapter, &spec)?;
    let mut zoo = weights.tensors;
    zoo.extend(lora.tensors);
    crate::peft::merge_into(&mut zoo, &lora.lora)?;
    if let Some(config) = spec.hf_config.as_object_mut() {
        config.remove("zoo_lora");
    }
    let tokenizer = tokenizer::load_tokenizer(from)?;
    let (tensors, tokenizer_files) = if to_hf {
        let hf = hf_tensors(&spec, zoo);
        let metadata = Some(
            [("format".to_string(), "pt".to_string())]
                .into_iter()
                .collect(),
        );
        let files = publish_dir(out, overwrite, |staging| {
            write_json_file(&staging.join(HF_CONFIG), &spec.hf_config)?;
            write_safetensors(&staging.join("model.safetensors"), &hf, metadata)?;
            copy_tokenizer_files(from, staging)
        })?;
        (hf.len(), files)
    } else {
        let manifest = ZooManifest {
            format: "zoo".into(),
            format_version: 1,
            architecture: spec.architecture.hf_name().into(),
            hf_config: spec.hf_config.clone(),
        };
        let files = publish_dir(out, overwrite, |staging| {
            write_json_file(&staging.join(ZOO_MANIFEST), &manifest)?;
            write_safetensors(&staging.join("model.safetensors"), &zoo, None)?;
            let mut files = copy_tokenizer_files(from, staging)?;
            if let Some(tokenizer) = tokenizer.as_ref().and_then(|t| t.as_hf())
                && !files.iter().any(|f| f == "tokenizer.json")
            {
                tokenizer::save_tokenizer(tokenizer, &staging.join("tokenizer.json"))?;
                files.push("tokenizer.json".into());
            }
            Ok(files)
        })?;
        (zoo.len(), files)
    };
    Ok(ConvertReport {
        architecture: spec.architecture,
        tensors,
        unused: weights.unused,
        tokenizer_files,
    })
}

/// The zoo tensors of `spec`'s model under HF's keys and layouts (fused tensors joined).
fn hf_tensors(
    spec: &ModelSpec,
    mut zoo: BTreeMap<String, TensorData>,
) -> BTreeMap<String, TensorData> {
    let mut hf = BTreeMap::new();
    // Split parts of one HF tensor, gathered until all are there.
    let mut fused: BTreeMap<String, Vec<Option<TensorData>>> = BTreeMap::new();
    for pair in spec.key_pairs() {
        let data = zoo
            .remove(&pair.zoo)
            .expect("check_zoo guarantees every key");
        match pair.layout {
            Layout::Same => {
                hf.insert(pair.hf, data);
            }
            Layout::Transposed => {
                hf.insert(pair.hf, transpose_2d(&data));
            }
            Layout::Split { part, parts } => {
                let slots = fused
                    .entry(pair.hf.clone())
                    .or_insert_with(|| vec![None; parts]);
                slots[part] = Some(data);
                if slots.iter().all(Option::is_some) {
                    let parts: Vec<TensorData> = fused
                        .remove(&pair.hf)
                        .expect("just inserted")
                        .into_iter()
                        .flatten()
                        .collect();
                    hf.insert(pair.hf, concat_last_dim(&parts));
                }
            }
        }
    }
    hf
}

/// A quantized directory holds codes, not the weights HF's layout or a merge needs.
fn refuse_quantized(spec: &ModelSpec) -> Result<()> {
    match spec.quantization()? {
        Some(_) => Err(ConvertError::Quantize {
            path: spec.dir.clone(),
            message: "is quantized: convert or merge the directory it was quantized from".into(),
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_output(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !overwrite {
        return Err(ConvertError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    Ok(())
}

/// Fills a staging directory beside `out`, then renames it to `out`. On any error the staging
/// directory is removed and `out` is untouched. With `overwrite`, the old `out` is replaced only
/// after the new one is complete.
pub(crate) fn publish_dir<T>(
    out: &Path,
    overwrite: bool,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| ConvertError::io(&parent, e))?;
    let staging = crate::tensors::temporary_sibling(out);
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).map_err(|e| ConvertError::io(&staging, e))?;
    let result = fill(&staging).and_then(|value| {
        if out.exists() {
            if !overwrite {
                return Err(ConvertError::OutputExists {
                    path: out.to_path_buf(),
                });
            }
            let old = out.with_file_name(format!(
                ".{}.old-{}",
                out.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
                std::process::id()
            ));
            fs::rename(out, &old).map_err(|e| ConvertError::io(out, e))?;
            fs::rename(&staging, out).map_err(|e| ConvertError::io(out, e))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&staging, out).map_err(|e| ConvertError::io(out, e))?;
        }
        Ok(value)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Copies `(name, source, size)` files into `out`, all or nothing (staging directory, then one
/// rename). Returns the names written.
pub fn publish_files(
    out: &Path,
    overwrite: bool,
    files: &[(String, PathBuf, u64)],
) -> Result<Vec<String>> {
    publish_dir(out, overwrite, |staging| {
        for (name, source, _) in files {
            let target = staging.join(name);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| ConvertError::io(parent, e))?;
            }
            fs::copy(source, &target).map_err(|e| ConvertError::io(source, e))?;
        }
        Ok(files.iter().map(|f| f.0.clone()).collect())
    })
}

pub(crate) fn write_json_file<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

pub(crate) fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let source = from.join(name);
        if source.is_file() {
            fs::copy(&source, to.join(name)).map_err(|e| ConvertError::io(&source, e))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}
