//! Checkpoints that do not depend on the world size: every segment's slices are gathered into
//! full tensors under their names, rank 0 writes them, and loading on any number of ranks slices
//! them again.
//!
//! A checkpoint directory holds:
//! - `model.safetensors`: f32 weights named `<segment prefix>.<parameter>` (the spec's prefixes,
//!   so a model whose prefixes are its zoo names gives a file `zoo convert --to-hf` reads);
//! - `optimizer.safetensors`: `exp_avg.<name>` and `exp_avg_sq.<name>`, with metadata `step`,
//!   `loss_scale`, `loss_scale_clean_steps` (the LR schedules are functions of `step`).
//!
//! Each file is written to a temporary name in the same directory and renamed, so a crash leaves
//! the previous checkpoint whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::comm::{CommError, Communicator};
use crate::zero::{FlatLayout, ShardedParams};

/// Why saving or loading failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Reading or writing a file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// A file that is not the checkpoint this model needs.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong (the key, the shapes).
        message: String,
    },
}

/// One segment as a checkpoint sees it: its name prefix, its sharded parameters and its AdamW
/// moment slices.
pub struct SegmentState<'a> {
    /// Prefix of its tensors' names.
    pub prefix: String,
    /// Its parameters.
    pub params: &'a ShardedParams,
    /// This rank's first-moment slice.
    pub exp_avg: &'a [f32],
    /// This rank's second-moment slice.
    pub exp_avg_sq: &'a [f32],
}

/// Training counters saved beside the tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainCounters {
    /// Optimizer steps applied.
    pub step: u64,
    /// Loss scale, when scaling.
    pub loss_scale: Option<f32>,
    /// Clean steps since the scale last changed.
    pub loss_scale_clean_steps: u32,
}

/// `prefix.name`, or `name` alone under an empty prefix.
pub fn tensor_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Gathers every segment and writes the checkpoint from rank 0; every rank must call it.
pub fn save(
    comm: &dyn Communicator,
    dir: &Path,
    segments: &[SegmentState<'_>],
    counters: TrainCounters,
) -> Result<(), CheckpointError> {
    let mut weights = BTreeMap::new();
    let mut moments = BTreeMap::new();
    for segment in segments {
        let len = segment.params.layout.len;
        let full = segment.params.gather(comm)?;
        let mut m = comm.all_gather(segment.exp_avg)?;
        let mut v = comm.all_gather(segment.exp_avg_sq)?;
        m.truncate(len);
        v.truncate(len);
        for entry in &segment.params.layout.entries {
            let name = tensor_name(&segment.prefix, &entry.name);
            let range = entry.offset..entry.offset + entry.len();
            weights.insert(
                name.clone(),
                (entry.shape.clone(), full[range.clone()].to_vec()),
            );
            moments.insert(
                format!("exp_avg.{name}"),
                (entry.shape.clone(), m[range.clone()].to_vec()),
            );
            moments.insert(
                format!("exp_avg_sq.{name}"),
                (entry.shape.clone(), v[range].to_vec()),
            );
        }
    }
    if comm.rank() == 0 {
        std::fs::create_dir_all(dir).map_err(|error| CheckpointError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let mut metadata = HashMap::new();
        metadata.insert("step".to_string(), counters.step.to_string());
        if let Some(scale) = counters.loss_scale {
            metadata.insert("loss_scale".to_string(), scale.to_string());
        }
        metadata.insert(
            "loss_scale_clean_steps".to_string(),
            counters.loss_scale_clean_steps.to_string(),
        );
        write(&dir.join("model.safetensors"), &weights, None)?;
        write(&dir.join("optimizer.safetensors"), &moments, Some(metadata))?;
    }
    // Nobody reads the checkpoint before it is complete.
    comm.barrier()?;
    Ok(())
}

fn write(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, values))| {
            let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape.clone(), raw)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, raw)| {
            TensorView::new(Dtype::F32, shape.clone(), raw)
                .map(|view| (name.clone(), view))
                .map_err(|e| CheckpointError::Format {
                    path: path.to_path_buf(),
                    message: format!("{name}: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let serialized =
        safetensors::serialize(views, metadata).map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let temporary = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("checkpoint"),
        std::process::id()
    ));
    let io = |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    };
    std::fs::write(&temporary, serialized).map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CheckpointError> {
    SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: format!("not a safetensors file: {e}"),
    })
}

/// What [`load`] reads for one segment: its parameter slice and moment slices for this rank.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedSegment {
    /// Parameter slice.
    pub params: Vec<f32>,
    /// First-moment slice.
    pub exp_avg: Vec<f32>,
    /// Second-moment slice.
    pub exp_avg_sq: Vec<f32>,
}

/// Reads a checkpoint and slices it for `rank` of `world`, segment by segment (`(prefix, layout)`
/// pairs, in the order of the model). Every key and shape is checked.
pub fn load(
    dir: &Path,
    segments: &[(String, FlatLayout)],
    rank: usize,
    world: usize,
) -> Result<(Vec<LoadedSegment>, TrainCounters), CheckpointError> {
    let model_path = dir.join("model.safetensors");
    let optimizer_path = dir.join("optimizer.safetensors");
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        })
    };
    let model_bytes = read(&model_path)?;
    let optimizer_bytes = read(&optimizer_path)?;
    let model = parse(&model_path, &model_bytes)?;
    let optimizer = parse(&optimizer_path, &optimizer_bytes)?;
    let (_, metadata) =
        SafeTensors::read_metadata(&optimizer_bytes).map_err(|e| CheckpointError::Format {
            path: optimizer_path.clone(),
            message: e.to_string(),
        })?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let number = |key: &str| meta.get(key).and_then(|v| v.parse::<f64>().ok());
    let counters = TrainCounters {
        step: number("step").ok_or_else(|| CheckpointError::Format {
            path: optimizer_path.clone(),
            message: "metadata has no 'step'".into(),
        })? as u64,
        loss_scale: number("loss_scale").map(|s| s as f32),
        loss_scale_clean_steps: number("loss_scale_clean_steps").unwrap_or(0.0) as u32,
    };

    let mut out = Vec::with_capacity(segments.len());
    for (prefix, layout) in segments {
        let full = |file: &SafeTensors<'_>,
                    path: &Path,
                    key_prefix: &str|
         -> Result<Vec<f32>, CheckpointError> {
            let mut values = Vec::with_capacity(layout.len);
            for entry in &layout.entries {
                let key = format!("{key_prefix}{}", tensor_name(prefix, &entry.name));
                let tensor = file.tensor(&key).map_err(|_| CheckpointError::Format {
                    path: path.to_path_buf(),
                    message: format!("missing tensor '{key}'"),
                })?;
                if tensor.dtype() != Dtype::F32 || tensor.shape() != entry.shape.as_slice() {
                    return Err(CheckpointError::Format {
                        path: path.to_path_buf(),
                        message: format!(
                            "'{key}' is {:?} {:?}, the model needs F32 {:?}",
                            tensor.dtype(),
                            tensor.shape(),
                            entry.shape
                        ),
                    });
                }
                values.extend(
                    tensor
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
            }
            Ok(values)
        };
        let shards = crate::zero::ShardLayout {
            len: layout.len,
            world,
        };
        out.push(LoadedSegment {
            params: shards.slice_of(&full(&model, &model_path, "")?, rank),
            exp_avg: shards.slice_of(&full(&optimizer, &optimizer_path, "exp_avg.")?, rank),
            exp_avg_sq: shards.slice_of(&full(&optimizer, &optimizer_path, "exp_avg_sq.")?, rank),
        });
    }
    Ok((out, counters))
}
