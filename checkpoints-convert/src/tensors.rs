//! Raw tensors as files hold them: safetensors (single or sharded), PyTorch `.bin` pickles, and
//! atomic safetensors writing. Tensors keep their dtype and bytes, so conversions are bit-exact.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, serialize};
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

/// A tensor of a checkpoint known by its header: dtype, shape and where its bytes are, read only
/// when asked ([`IndexedTensor::read`]). Cloning one is cheap.
#[derive(Debug, Clone)]
pub struct IndexedTensor {
    /// Dtype as stored.
    pub dtype: DType,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// The file it is in (for error messages).
    pub file: PathBuf,
    location: Location,
}

#[derive(Debug, Clone)]
enum Location {
    /// `len` bytes at `offset` of an open safetensors file.
    Region {
        file: Arc<fs::File>,
        offset: u64,
        len: usize,
    },
    /// Already in memory (a pickle's tensors are read whole).
    Loaded(Arc<TensorData>),
}

impl IndexedTensor {
    /// Reads the tensor's bytes (a positioned read of a safetensors file: nothing is mapped).
    pub fn read(&self) -> Result<TensorData> {
        match &self.location {
            Location::Loaded(data) => Ok(TensorData::clone(data)),
            Location::Region { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut bytes = vec![0u8; *len];
                file.read_exact_at(&mut bytes, *offset)
                    .map_err(|e| ConvertError::io(&self.file, e))?;
                Ok(TensorData::from_bytes_vec(
                    bytes,
                    self.shape.clone(),
                    self.dtype,
                ))
            }
        }
    }
}

impl IndexedTensor {
    /// The tensor's bytes as stored, in a fresh vector (no `TensorData` in between: a quantized
    /// layer keeps this buffer as its codes).
    pub fn read_bytes(&self) -> Result<Vec<u8>> {
        match &self.location {
            Location::Loaded(data) => Ok(data.as_bytes().to_vec()),
            Location::Region { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut bytes = vec![0u8; *len];
                file.read_exact_at(&mut bytes, *offset)
                    .map_err(|e| ConvertError::io(&self.file, e))?;
                Ok(bytes)
            }
        }
    }
}

/// Every tensor of a checkpoint by key, from the headers alone.
pub type TensorIndex = BTreeMap<String, IndexedTensor>;

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
    read_all(index_dir_weights(dir, format)?)
}

/// Indexes a model directory's weights (headers only; see [`index_weights_file`]).
pub fn index_dir_weights(dir: &Path, format: WeightsFormat) -> Result<TensorIndex> {
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
    index_weights_file(&found)
}

/// Reads a safetensors file, a `.bin` pickle, or a sharded `*.index.json` and all its shards.
pub fn read_weights_file(path: &Path) -> Result<TensorMap> {
    read_all(index_weights_file(path)?)
}

/// Every tensor of an index, read.
fn read_all(index: TensorIndex) -> Result<TensorMap> {
    index
        .into_iter()
        .map(|(key, tensor)| {
            let data = tensor.read()?;
            Ok((
                key,
                StoredTensor {
                    data,
                    file: tensor.file,
                },
            ))
        })
        .collect()
}

/// Indexes a safetensors file (its header, checked against the file's size), a `.bin` pickle
/// (read whole: pickles have no header to index), or a sharded `*.index.json` and its shards.
pub fn index_weights_file(path: &Path) -> Result<TensorIndex> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        index_sharded(path)
    } else if name.ends_with(".safetensors") {
        index_safetensors(path)
    } else {
        read_pytorch_bin(path)
    }
}

/// `{"weight_map": {"key": "shard file"}}`, as transformers writes for sharded checkpoints.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn index_sharded(index_path: &Path) -> Result<TensorIndex> {
    let index: ShardIndex = read_json(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&String> = index.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    let mut tensors = TensorIndex::new();
    for shard in shards {
        tensors.extend(index_weights_file(&dir.join(shard))?);
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

/// Indexes a safetensors file: its header, checked against the file's size before anything it
/// claims is allocated; each tensor is read later with a positioned read of its bytes. The file
/// is never held whole in memory, nor mapped.
fn index_safetensors(path: &Path) -> Result<TensorIndex> {
    let bad = |message: String| ConvertError::BadWeightsFile {
        path: path.to_path_buf(),
        format: "safetensors",
        message,
    };
    let io = |e| ConvertError::io(path, e);
    let file = fs::File::open(path).map_err(io)?;
    let (header, data_start) = bmtrain_backend::checkpoint::read_header(&file).map_err(bad)?;
    let file = Arc::new(file);
    let mut tensors = TensorIndex::new();
    for key in header.offset_keys() {
        let info = header.info(&key).expect("a key of the header");
        let dtype = burn_dtype(info.dtype).ok_or_else(|| ConvertError::UnsupportedDtype {
            file: path.display().to_string(),
            key: key.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        tensors.insert(
            key,
            IndexedTensor {
                dtype,
                shape: info.shape.clone(),
                file: path.to_path_buf(),
                location: Location::Region {
                    file: file.clone(),
                    offset: data_start + start as u64,
                    len: end - start,
                },
            },
        );
    }
    Ok(tensors)
}

/// Reads a `torch.save` state dict. burn-store's reader interprets the pickle opcodes itself and
/// never runs pickled code, so a malicious `.bin` cannot execute anything.
fn read_pytorch_bin(path: &Path) -> Result<TensorIndex> {
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
    // burn-store trusts the lengths a file declares: they are checked against its size first.
    crate::pickle_guard::check(path).map_err(bad)?;
    let size = fs::metadata(path)
        .map_err(|e| ConvertError::io(path, e))?
        .len();
    let reader = burn_store::pytorch::PytorchReader::new(path).map_err(|e| bad(e.to_string()))?;
    let mut tensors = TensorIndex::new();
    for (key, snapshot) in reader.into_tensors() {
        // A tensor's bytes are in the file: its shape cannot claim more.
        let bytes = snapshot
            .shape
            .iter()
            .try_fold(snapshot.dtype.size() as u128, |n, &d| {
                n.checked_mul(d as u128)
            });
        if bytes.is_none_or(|b| b > u128::from(size)) {
            return Err(bad(format!(
                "key '{key}': shape {:?} of {:?} needs more bytes than the {size}-byte file has",
                snapshot.shape.as_slice(),
                snapshot.dtype
            )));
        }
        let data = snapshot
            .to_data()
            .map_err(|e| bad(format!("key '{key}': {e:?}")))?;
        tensors.insert(
            key,
            IndexedTensor {
                dtype: data.dtype,
                shape: data.shape.to_vec(),
                file: path.to_path_buf(),
                location: Location::Loaded(Arc::new(data)),
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
    let bytes = data.as_bytes();
    let out = match data.dtype.size() {
        1 => transpose_elements::<1>(bytes, rows, cols),
        2 => transpose_elements::<2>(bytes, rows, cols),
        4 => transpose_elements::<4>(bytes, rows, cols),
        8 => transpose_elements::<8>(bytes, rows, cols),
        size => unreachable!("no dtype has {size}-byte elements"),
    };
    TensorData::from_bytes_vec(out, vec![cols, rows], data.dtype)
}

/// `[rows, cols]` elements of `N` bytes → `[cols, rows]`, in 32 × 32 tiles (both sides stay in
/// cache), each band of output rows on its own thread.
fn transpose_elements<const N: usize>(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let (input, _) = bytes.as_chunks::<N>();
    let mut out = vec![0u8; bytes.len()];
    let (output, _) = out.as_chunks_mut::<N>();
    // Output row c holds input column c; a band is TILE output rows.
    output
        .par_chunks_mut(TILE * rows.max(1))
        .enumerate()
        .for_each(|(band, block)| {
            let c0 = band * TILE;
            let band_cols = block.len() / rows.max(1);
            for r0 in (0..rows).step_by(TILE) {
                for c in 0..band_cols {
                    for r in r0..(r0 + TILE).min(rows) {
                        block[c * rows + r] = input[r * cols + c0 + c];
                    }
                }
            }
        });
    out
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
