//! Raw tensors as files hold them: safetensors (single or sharded), PyTorch `.bin` pickles, and
//! atomic safetensors writing. Tensors keep their dtype and bytes, so conversions are bit-exact.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, SafeTensors, serialize};
use serde::Deserialize;

use crate::error::{ConvertError, Result};

/// A tensor read from a checkpoint, with the file it came from (for error messages).
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Dtype, shape and bytes, as stored.
    pub data: TensorData,
    /// The file it was read from.
    pub file: PathBuf,
}

/// Tensors by key, sorted.
pub type TensorMap = BTreeMap<String, StoredTensor>;

/// The weight files zoo reads, in the order it looks for them.
pub const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// Which weights file of a directory to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsFormat {
    /// The first of [`WEIGHT_FILES`] that exists: safetensors before pickles.
    #[default]
    Auto,
    /// `model.safetensors` or its sharded index.
    Safetensors,
    /// `pytorch_model.bin` or its sharded index.
    PytorchBin,
}

/// Reads every tensor of a model directory's weights.
pub fn read_dir_weights(dir: &Path, format: WeightsFormat) -> Result<TensorMap> {
    let candidates: &[&str] = match format {
        WeightsFormat::Auto => &WEIGHT_FILES,
        WeightsFormat::Safetensors => &WEIGHT_FILES[..2],
        WeightsFormat::PytorchBin => &WEIGHT_FILES[2..],
    };
    let found = candidates
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| ConvertError::NoWeights {
            dir: dir.to_path_buf(),
        })?;
    read_weights_file(&found)
}

/// Reads a safetensors file, a `.bin` pickle, or a sharded `*.index.json` and all its shards.
pub fn read_weights_file(path: &Path) -> Result<TensorMap> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        read_sharded(path)
    } else if name.ends_with(".safetensors") {
        read_safetensors(path)
    } else {
        read_pytorch_bin(path)
    }
}

/// `{"weight_map": {"key": "shard file"}}`, as transformers writes for sharded checkpoints.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn read_sharded(index_path: &Path) -> Result<TensorMap> {
    let index: ShardIndex = read_json(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&String> = index.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    let mut tensors = TensorMap::new();
    for shard in shards {
        tensors.extend(read_weights_file(&dir.join(shard))?);
    }
    // Every key the index names must be in the shard it names.
    for (key, shard) in &index.weight_map {
        if !tensors.contains_key(key) {
            return Err(ConvertError::MissingKeys {
                source_name: dir.join(shard).display().to_string(),
                architecture: "the shard index",
                keys: vec![key.clone()],
            });
        }
    }
    Ok(tensors)
}

/// Reads a JSON file into `T`, naming the file (and serde's line/column) on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| ConvertError::io(path, e))?;
    serde_json::from_str(&text).map_err(|error| ConvertError::Json {
        path: path.to_path_buf(),
        error,
    })
}

fn read_safetensors(path: &Path) -> Result<TensorMap> {
    let bytes = fs::read(path).map_err(|e| ConvertError::io(path, e))?;
    let bad = |message: String| ConvertError::BadWeightsFile {
        path: path.to_path_buf(),
        format: "safetensors",
        message,
    };
    let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = TensorMap::new();
    for (key, view) in file.tensors() {
        let dtype = burn_dtype(view.dtype()).ok_or_else(|| ConvertError::UnsupportedDtype {
            file: path.display().to_string(),
            key: key.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let data = TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype);
        tensors.insert(
            key,
            StoredTensor {
                data,
                file: path.to_path_buf(),
            },
        );
    }
    Ok(tensors)
}

/// Reads a `torch.save` state dict. burn-store's reader interprets the pickle opcodes itself and
/// never runs pickled code, so a malicious `.bin` cannot execute anything.
fn read_pytorch_bin(path: &Path) -> Result<TensorMap> {
    let bad = |message: String| ConvertError::BadWeightsFile {
        path: path.to_path_buf(),
        format: "PyTorch pickle",
        message,
    };
    if !path.is_file() {
        return Err(ConvertError::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let reader = burn_store::pytorch::PytorchReader::new(path).map_err(|e| bad(e.to_string()))?;
    let mut tensors = TensorMap::new();
    for (key, snapshot) in reader.into_tensors() {
        let data = snapshot
            .to_data()
            .map_err(|e| bad(format!("key '{key}': {e:?}")))?;
        tensors.insert(
            key,
            StoredTensor {
                data,
                file: path.to_path_buf(),
            },
        );
    }
    Ok(tensors)
}

fn burn_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool(burn::tensor::BoolStore::Native),
        _ => return None,
    })
}

fn safetensors_dtype(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::Bool(burn::tensor::BoolStore::Native) => Dtype::BOOL,
        _ => return None,
    })
}

/// Swaps the two dimensions of a 2-D tensor, on its bytes, whatever its dtype.
pub fn transpose_2d(data: &TensorData) -> TensorData {
    let [rows, cols]: [usize; 2] = data
        .shape
        .to_vec()
        .try_into()
        .expect("transpose_2d needs a 2-D tensor");
    let size = data.dtype.size();
    let bytes = data.as_bytes();
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let from = (r * cols + c) * size;
            let to = (c * rows + r) * size;
            out[to..to + size].copy_from_slice(&bytes[from..from + size]);
        }
    }
    TensorData::from_bytes_vec(out, vec![cols, rows], data.dtype)
}

/// Part `part` of `parts` equal slices of the last dimension (GPT-2's fused `c_attn` → q, k, v),
/// on bytes, whatever the dtype.
pub fn split_last_dim(data: &TensorData, part: usize, parts: usize) -> TensorData {
    let shape = data.shape.to_vec();
    let last = *shape
        .last()
        .expect("split_last_dim needs at least one dimension");
    let width = last / parts;
    let size = data.dtype.size();
    let bytes = data.as_bytes();
    let rows = bytes.len() / (last * size);
    let mut out = Vec::with_capacity(rows * width * size);
    for r in 0..rows {
        let start = (r * last + part * width) * size;
        out.extend_from_slice(&bytes[start..start + width * size]);
    }
    let mut out_shape = shape;
    *out_shape.last_mut().expect("checked") = width;
    TensorData::from_bytes_vec(out, out_shape, data.dtype)
}

/// Joins tensors of equal shape (but the last dimension) along their last dimension: the inverse
/// of [`split_last_dim`].
pub fn concat_last_dim(parts: &[TensorData]) -> TensorData {
    let size = parts[0].dtype.size();
    let widths: Vec<usize> = parts
        .iter()
        .map(|p| *p.shape.to_vec().last().expect("at least one dimension"))
        .collect();
    let rows = parts[0].as_bytes().len() / (widths[0] * size);
    let mut out = Vec::new();
    for r in 0..rows {
        for (p, width) in parts.iter().zip(&widths) {
            let start = r * width * size;
            out.extend_from_slice(&p.as_bytes()[start..start + width * size]);
        }
    }
    let mut shape = parts[0].shape.to_vec();
    *shape.last_mut().expect("checked") = widths.iter().sum();
    TensorData::from_bytes_vec(out, shape, parts[0].dtype)
}

/// Serialises `tensors` as safetensors into `path` without ever leaving a partial file there:
/// the bytes go to a temporary file in the same directory, which is then renamed over `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (key, data) in tensors {
        let dtype =
            safetensors_dtype(data.dtype).ok_or_else(|| ConvertError::UnsupportedDtype {
                file: path.display().to_string(),
                key: key.clone(),
                dtype: format!("{:?}", data.dtype),
            })?;
        let view =
            safetensors::tensor::TensorView::new(dtype, data.shape.to_vec(), data.as_bytes())
                .map_err(|e| ConvertError::Apply(format!("{key}: {e}")))?;
        views.push((key.clone(), view));
    }
    let bytes = serialize(views, metadata).map_err(|e| ConvertError::Apply(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path);
    fs::write(&tmp, bytes).map_err(|e| ConvertError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ConvertError::io(path, e)
    })
}

/// `dir/.name.tmp-<pid>`: same filesystem as `path`, so a rename is atomic.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_concat_of_the_last_dim_are_inverses() {
        // [2, 6] = two rows of [q q | k k | v v].
        let fused = TensorData::new(vec![1i32, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [2, 6]);
        let parts: Vec<TensorData> = (0..3).map(|p| split_last_dim(&fused, p, 3)).collect();
        assert_eq!(parts[1].to_vec::<i32>().unwrap(), [3, 4, 9, 10]);
        assert_eq!(parts[1].shape.to_vec(), [2, 2]);
        let bias = TensorData::new(vec![1.0f32, 2.0, 3.0], [3]);
        assert_eq!(split_last_dim(&bias, 2, 3).to_vec::<f32>().unwrap(), [3.0]);
        let joined = concat_last_dim(&parts);
        assert_eq!(joined.shape.to_vec(), [2, 6]);
        assert_eq!(joined.as_bytes(), fused.as_bytes());
    }

    #[test]
    fn transpose_moves_bytes_for_any_dtype() {
        let data = TensorData::new(vec![1i64, 2, 3, 4, 5, 6], [2, 3]);
        let t = transpose_2d(&data);
        assert_eq!(t.shape.to_vec(), vec![3, 2]);
        assert_eq!(t.to_vec::<i64>().unwrap(), [1, 4, 2, 5, 3, 6]);
        assert_eq!(transpose_2d(&t).as_bytes(), data.as_bytes());
    }

    #[test]
    fn safetensors_round_trip_keeps_dtype_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut tensors = BTreeMap::new();
        let half = TensorData::new(
            vec![half::f16::from_f32(1.5), half::f16::from_f32(-2.0)],
            [2],
        );
        tensors.insert("a".to_string(), half.clone());
        tensors.insert(
            "b".to_string(),
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
        );
        write_safetensors(&path, &tensors, None).unwrap();
        let read = read_weights_file(&path).unwrap();
        assert_eq!(read["a"].data.dtype, DType::F16);
        assert_eq!(read["a"].data.as_bytes(), half.as_bytes());
        assert_eq!(read["b"].data.shape.to_vec(), vec![2, 2]);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A pickle that, unpickled by Python, would run `os.system("touch PWNED")`. zoo's reader
    /// interprets opcodes without calling anything: the file is refused, nothing runs.
    #[test]
    fn pickles_that_call_functions_are_refused_without_running_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pytorch_model.bin");
        let marker = dir.path().join("PWNED");
        let command = format!("touch {}", marker.display());
        let mut pickle = b"\x80\x02cos\nsystem\nq\x00X".to_vec();
        pickle.extend((command.len() as u32).to_le_bytes());
        pickle.extend(command.as_bytes());
        pickle.extend(b"q\x01\x85q\x02Rq\x03.");
        fs::write(&path, &pickle).unwrap();
        let result = read_weights_file(&path);
        assert!(!marker.exists(), "pickled code ran");
        let err = result
            .expect_err("a pickle with a function call is refused")
            .to_string();
        assert!(
            err.contains("pytorch_model.bin") && err.contains("os.system"),
            "{err}"
        );
    }

    #[test]
    fn truncated_safetensors_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert("w".to_string(), TensorData::new(vec![0.5f32; 64], [8, 8]));
        write_safetensors(&path, &tensors, None).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_weights_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("safetensors"),
            "{err}"
        );
    }
}
