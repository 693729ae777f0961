//! `zoo quantize`: a model directory's linear layers (and, with `--embeddings`, its token tables
//! and untied heads) as int8 or NF4 codes, in a zoo directory that `zoo forward` and `zoo
//! generate` run directly (see [`models::quantize`] for which weights and
//! [`bmtrain_backend::quant`] for the formats).
//!
//! A quantized weight `K` (a zoo key) is stored as two tensors, and its codes' shape is recorded
//! in `zoo.json` (`hf_config.zoo_quantization.weights`):
//!
//! ```text
//!   K.int8    I8  [rows, cols]            K.absmax  F32 [rows]              (int8)
//!   K.nf4     U8  [⌈rows·cols / 2⌉]       K.absmax  F32 [⌈rows·cols / 64⌉]  (NF4)
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bmtrain_backend::quant::{NF4_BLOCK, QuantFormat, QuantizedMatrix};
use burn::tensor::{DType, TensorData};
use models::quantize::QuantSpec;

use crate::error::{ConvertError, Result};
use crate::model_dir::{
    ModelSpec, ZOO_MANIFEST, ZooManifest, check_output, copy_tokenizer_files, publish_dir,
    read_spec, write_json_file,
};
use crate::tensors::{IndexedTensor, TensorIndex, WeightsFormat, transpose_2d, write_safetensors};

/// The suffix of an absmax tensor.
const ABSMAX: &str = "absmax";

/// What `zoo quantize` did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// The format written.
    pub format: QuantFormat,
    /// Weights quantized.
    pub quantized: usize,
    /// Tensors kept as they were.
    pub kept: usize,
    /// Bytes of the tensors before (as stored) and after.
    pub bytes: (u64, u64),
}

/// Writes `from` (an HF or zoo directory) to `out` with its weights quantized to `bits` (8:
/// int8, 4: NF4), the token tables too when `embeddings`. `out` is written whole or not at all.
pub fn quantize_dir(
    from: &Path,
    out: &Path,
    bits: u32,
    embeddings: bool,
    overwrite: bool,
) -> Result<QuantizeReport> {
    let format = QuantFormat::from_bits(bits).ok_or_else(|| ConvertError::Quantize {
        path: from.to_path_buf(),
        message: format!("--bits {bits}: zoo quantizes to 8 (int8) or 4 (NF4) bits"),
    })?;
    check_output(out, overwrite)?;
    let mut spec = read_spec(from)?;
    let refuse = |message: &str| ConvertError::Quantize {
        path: from.to_path_buf(),
        message: message.to_string(),
    };
    if spec.lora()?.is_some() {
        return Err(refuse(
            "holds LoRA adapters: merge them first (zoo convert --merge-adapter)",
        ));
    }
    if spec.quantization()?.is_some() {
        return Err(refuse("is quantized already"));
    }
    let reader = spec.open_weights(WeightsFormat::default())?;
    let mut model = spec.new_model::<bmtrain_backend::Cpu>(&Default::default())?;
    let targets = models::quantize::targets(&mut model, embeddings).map_err(|error| {
        ConvertError::Config {
            path: from.to_path_buf(),
            error,
        }
    })?;
    let targets: BTreeMap<&str, _> = targets.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut tensors = BTreeMap::new();
    let mut quant = QuantSpec {
        format: format.name().into(),
        block_size: (format == QuantFormat::Nf4).then_some(NF4_BLOCK),
        embeddings,
        weights: BTreeMap::new(),
    };
    let mut bytes = (0u64, 0u64);
    for name in reader.names() {
        let data = reader.read(name).expect("a key of the reader")?;
        bytes.0 += data.as_bytes().len() as u64;
        let Some(target) = targets.get(name) else {
            tensors.insert(name.to_string(), data);
            continue;
        };
        let data = if target.transposed {
            transpose_2d(&data)
        } else {
            data
        };
        let values = data
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| ConvertError::Apply(format!("{name}: {e:?}")))?;
        let [rows, cols] = target.shape;
        let codes = QuantizedMatrix::quantize(format, &values, rows, cols);
        let (dtype, shape) = codes_layout(format, rows, cols);
        tensors.insert(
            format!("{name}.{format}"),
            TensorData::from_bytes_vec(codes.codes().to_vec(), shape, dtype),
        );
        tensors.insert(
            format!("{name}.{ABSMAX}"),
            TensorData::new(codes.absmax().to_vec(), [codes.absmax().len()]),
        );
        quant.weights.insert(name.to_string(), target.shape);
    }
    bytes.1 = tensors.values().map(|t| t.as_bytes().len() as u64).sum();
    let mut hf_config = spec.hf_config.clone();
    hf_config["zoo_quantization"] = serde_json::to_value(&quant).expect("serialises");
    let manifest = ZooManifest {
        format: "zoo".into(),
        format_version: 1,
        architecture: spec.architecture.hf_name().into(),
        hf_config,
    };
    let report = QuantizeReport {
        format,
        quantized: quant.weights.len(),
        kept: tensors.len() - 2 * quant.weights.len(),
        bytes,
    };
    publish_dir(out, overwrite, |staging| {
        write_json_file(&staging.join(ZOO_MANIFEST), &manifest)?;
        write_safetensors(&staging.join("model.safetensors"), &tensors, None)?;
        copy_tokenizer_files(from, staging)
    })?;
    Ok(report)
}

/// How a `rows × cols` matrix's codes are stored: int8 as I8 `[rows, cols]`, NF4 as U8 packed
/// pairs, flat.
fn codes_layout(format: QuantFormat, rows: usize, cols: usize) -> (DType, Vec<usize>) {
    match format {
        QuantFormat::Int8 => (DType::I8, vec![rows, cols]),
        QuantFormat::Nf4 => (DType::U8, vec![format.code_bytes(rows, cols)]),
    }
}

/// A stored quantized weight, known by its headers.
#[derive(Debug, Clone)]
pub(crate) struct StoredCodes {
    format: QuantFormat,
    shape: [usize; 2],
    codes: IndexedTensor,
    absmax: IndexedTensor,
}

impl StoredCodes {
    /// Reads the codes and scales.
    pub(crate) fn read(&self, key: &str) -> Result<Arc<QuantizedMatrix>> {
        let codes = self.codes.read_bytes()?;
        let absmax = self.absmax.read()?;
        let absmax = absmax
            .to_vec::<f32>()
            .map_err(|e| bad(&self.absmax, key, format!("{e:?}")))?;
        let [rows, cols] = self.shape;
        QuantizedMatrix::from_parts(self.format, rows, cols, codes, absmax)
            .map(Arc::new)
            .map_err(|message| bad(&self.codes, key, message))
    }
}

fn bad(tensor: &IndexedTensor, key: &str, message: String) -> ConvertError {
    ConvertError::Quantize {
        path: tensor.file.clone(),
        message: format!("{key}: {message}"),
    }
}

impl ModelSpec {
    /// The quantization a directory records (`zoo_quantization`), if any.
    pub fn quantization(&self) -> Result<Option<QuantSpec>> {
        self.recorded("zoo_quantization", |spec: &QuantSpec| {
            spec.quant_format().map(|_| ())
        })
    }
}

/// Takes the quantized weights `spec` records out of `index` (both tensors of each, checked
/// against the recorded shape), leaving the dense tensors.
pub(crate) fn take_stored_codes(
    spec: &QuantSpec,
    index: &mut TensorIndex,
    source_name: &str,
) -> Result<BTreeMap<String, StoredCodes>> {
    let format = spec.quant_format().expect("checked when read");
    let mut out = BTreeMap::new();
    for (key, &[rows, cols]) in &spec.weights {
        let codes_key = format!("{key}.{format}");
        let absmax_key = format!("{key}.{ABSMAX}");
        let (Some(codes), Some(absmax)) = (index.remove(&codes_key), index.remove(&absmax_key))
        else {
            return Err(ConvertError::Quantize {
                path: source_name.into(),
                message: format!(
                    "{key} is recorded as quantized but {codes_key} or {absmax_key} is missing"
                ),
            });
        };
        let (dtype, shape) = codes_layout(format, rows, cols);
        if codes.dtype != dtype || codes.shape != shape {
            return Err(bad(
                &codes,
                &codes_key,
                format!(
                    "{:?} {:?}, a {rows}x{cols} {format} matrix is {dtype:?} {shape:?}",
                    codes.dtype, codes.shape
                ),
            ));
        }
        let scales = vec![format.scale_count(rows, cols)];
        if absmax.dtype != DType::F32 || absmax.shape != scales {
            return Err(bad(
                &absmax,
                &absmax_key,
                format!(
                    "{:?} {:?}, expected F32 {scales:?}",
                    absmax.dtype, absmax.shape
                ),
            ));
        }
        out.insert(
            key.clone(),
            StoredCodes {
                format,
                shape: [rows, cols],
                codes,
                absmax,
            },
        );
    }
    Ok(out)
}
