//! Checkpoints that do not depend on the world size, written and read one segment at a time.
//!
//! A checkpoint directory holds:
//! - `model.safetensors`: f32 weights named `<segment prefix>.<parameter>` (the spec's prefixes,
//!   so a model whose prefixes are its zoo names gives a file `zoo convert --to-hf` reads);
//! - `optimizer.safetensors`: `exp_avg.<name>` and `exp_avg_sq.<name>`, with metadata `step`,
//!   `loss_scale`, `loss_scale_clean_steps` (the LR schedules are functions of `step`).
//!
//! Saving never holds more than one segment: both files' headers are known from the layouts
//! before any value is gathered, so rank 0 writes them first and then streams each segment's
//! gathered weights and moments behind them, tensor by tensor, in model order. Each file is
//! written to a temporary name in the same directory, synced and renamed, so a crash or a full
//! disk leaves any previous file whole; [`save`] returns every file's size and xxh3 hash, for
//! [`verify`].
//!
//! Loading reads each rank's slice of each segment straight from the files (positioned reads:
//! nothing is mapped, so nothing of the file counts as the process's memory), after checking
//! every key, dtype and shape.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use xxhash_rust::xxh3::Xxh3;

use crate::comm::{CommError, Communicator};
use crate::zero::{FlatLayout, ShardLayout, ShardedParams};

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
    /// Its parameters (borrowed from the trainer, or read back from the device).
    pub params: Cow<'a, ShardedParams>,
    /// This rank's first-moment slice.
    pub exp_avg: Cow<'a, [f32]>,
    /// This rank's second-moment slice.
    pub exp_avg_sq: Cow<'a, [f32]>,
    /// Whether the parameters train: frozen ones (BitFit, adapters) have weights in the model
    /// file and no moments in the optimizer file (their moment slices are empty).
    pub trains: bool,
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

/// A file as written: its name in the checkpoint directory, its size and its xxh3-128 hash
/// (32 hex digits), what `trainer_state.json` records and [`verify`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// File name within the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// xxh3-128 of the contents, lower-case hex.
    pub xxh3: String,
}

/// The weights file of a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// The optimizer-state file of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// `prefix.name`, or `name` alone under an empty prefix.
pub fn tensor_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Writes the checkpoint from rank 0, streaming one segment at a time; every rank must call it
/// (the gathers are collectives). Returns the files rank 0 wrote (none on other ranks).
pub fn save(
    comm: &dyn Communicator,
    dir: &Path,
    segments: &[SegmentState<'_>],
    counters: TrainCounters,
) -> Result<Vec<FileDigest>, CheckpointError> {
    let lead = comm.rank() == 0;
    let mut files = None;
    if lead {
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
        let weights = segments.iter().flat_map(|s| names(s, ""));
        let moments = segments
            .iter()
            .filter(|s| s.trains)
            .flat_map(|s| names(s, "exp_avg.").chain(names(s, "exp_avg_sq.")));
        files = Some((
            StreamWriter::create(&dir.join(MODEL_FILE), weights, None)?,
            StreamWriter::create(&dir.join(OPTIMIZER_FILE), moments, Some(metadata))?,
        ));
    }
    // Every rank gathers every segment; rank 0 writes it and drops it before the next.
    let mut outcome = Ok(());
    for segment in segments {
        let len = segment.params.layout.len;
        let weights = segment.params.gather(comm)?;
        if let (Some((model, _)), Ok(())) = (files.as_mut(), &outcome) {
            outcome = model.write_f32(&weights);
        }
        drop(weights);
        if !segment.trains || len == 0 {
            continue;
        }
        for moment in [&segment.exp_avg, &segment.exp_avg_sq] {
            let mut full = comm.all_gather(moment)?;
            full.truncate(len);
            if let (Some((_, optimizer)), Ok(())) = (files.as_mut(), &outcome) {
                outcome = optimizer.write_f32(&full);
            }
        }
    }
    // A write error stops rank 0 only after the gathers, so no peer waits on it in vain; the
    // temporaries are removed when the writers drop.
    let finished = match (files, outcome) {
        (Some((model, optimizer)), Ok(())) => model
            .finish()
            .and_then(|model| Ok(vec![model, optimizer.finish()?])),
        (Some(_), Err(error)) => Err(error),
        (None, _) => Ok(Vec::new()),
    };
    // Every rank learns whether rank 0 wrote the files (and nobody reads them before then).
    let mut failed = [if finished.is_err() { 1.0 } else { 0.0 }];
    comm.all_reduce(&mut failed, crate::comm::ReduceOp::Max)?;
    match finished {
        Err(error) => Err(error),
        Ok(_) if failed[0] > 0.0 => Err(CheckpointError::Format {
            path: dir.to_path_buf(),
            message: "rank 0 could not write the checkpoint".into(),
        }),
        Ok(digests) => Ok(digests),
    }
}

/// `(name, shape)` of a segment's tensors in layout order, each name under `key_prefix`.
fn names<'a>(
    segment: &'a SegmentState<'_>,
    key_prefix: &'a str,
) -> impl Iterator<Item = (String, Vec<usize>)> + 'a {
    segment.params.layout.entries.iter().map(move |entry| {
        (
            format!("{key_prefix}{}", tensor_name(&segment.prefix, &entry.name)),
            entry.shape.clone(),
        )
    })
}

/// A safetensors file written front to back: the header (known in advance from the tensors'
/// names and shapes), then the f32 values in header order, hashed on the way. It is written
/// under a temporary name and renamed by [`StreamWriter::finish`]; dropped unfinished, it
/// deletes the temporary.
struct StreamWriter {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<BufWriter<File>>,
    hasher: Xxh3,
    written: u64,
    expected: u64,
    /// Little-endian bytes of the values being written, reused.
    buffer: Vec<u8>,
}

impl StreamWriter {
    fn create(
        path: &Path,
        tensors: impl Iterator<Item = (String, Vec<usize>)>,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Self, CheckpointError> {
        let format = |message: String| CheckpointError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut infos = Vec::new();
        let mut offset = 0;
        for (name, shape) in tensors {
            let bytes = 4 * shape.iter().product::<usize>();
            infos.push((
                name,
                TensorInfo {
                    dtype: Dtype::F32,
                    shape,
                    data_offsets: (offset, offset + bytes),
                },
            ));
            offset += bytes;
        }
        let header = Metadata::new(metadata, infos).map_err(|e| format(e.to_string()))?;
        let mut header = serde_json::to_vec(&header).map_err(|e| format(e.to_string()))?;
        // The data starts 8-aligned, as safetensors' own writer pads it.
        header.resize(header.len().next_multiple_of(8), b' ');

        let temporary = path.with_file_name(format!(
            ".{}.tmp-{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("checkpoint"),
            std::process::id()
        ));
        let file = File::create(&temporary).map_err(|error| CheckpointError::Io {
            path: temporary.clone(),
            error,
        })?;
        let mut writer = Self {
            path: path.to_path_buf(),
            temporary,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: Xxh3::new(),
            written: 0,
            expected: (8 + header.len() + offset) as u64,
            buffer: Vec::new(),
        };
        writer.write_bytes(&(header.len() as u64).to_le_bytes())?;
        writer.write_bytes(&header)?;
        Ok(writer)
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        let file = self.file.as_mut().expect("open until finished");
        file.write_all(bytes).map_err(|error| CheckpointError::Io {
            path: self.path.clone(),
            error,
        })?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends values, converted to little-endian bytes 1 MiB at a time.
    fn write_f32(&mut self, values: &[f32]) -> Result<(), CheckpointError> {
        for chunk in values.chunks(1 << 18) {
            let mut buffer = std::mem::take(&mut self.buffer);
            buffer.clear();
            buffer.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            let result = self.write_bytes(&buffer);
            self.buffer = buffer;
            result?;
        }
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; returns its digest.
    fn finish(mut self) -> Result<FileDigest, CheckpointError> {
        let io = |path: &Path, error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        };
        assert_eq!(
            self.written,
            self.expected,
            "{}: every tensor of the header is written",
            self.path.display()
        );
        let file = self.file.take().expect("open until finished");
        let file = file
            .into_inner()
            .map_err(|e| io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| io(&self.path, e))?;
        drop(file);
        std::fs::rename(&self.temporary, &self.path).map_err(|e| io(&self.path, e))?;
        Ok(FileDigest {
            name: self
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string(),
            bytes: self.written,
            xxh3: format!("{:032x}", self.hasher.digest128()),
        })
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// The size and xxh3-128 hash of a file, read in 8 MiB pieces.
pub fn digest(path: &Path) -> Result<FileDigest, CheckpointError> {
    let io = |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Xxh3::new();
    let mut buffer = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    Ok(FileDigest {
        name: path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string(),
        bytes,
        xxh3: format!("{:032x}", hasher.digest128()),
    })
}

/// Checks that every file of `expected` in `dir` has the recorded size and hash; the error names
/// the first file that differs and how.
pub fn verify(dir: &Path, expected: &[FileDigest]) -> Result<(), CheckpointError> {
    for want in expected {
        let path = dir.join(&want.name);
        let size = std::fs::metadata(&path)
            .map_err(|error| CheckpointError::Io {
                path: path.clone(),
                error,
            })?
            .len();
        let mismatch = |message: String| CheckpointError::Format {
            path: path.clone(),
            message,
        };
        if size != want.bytes {
            return Err(mismatch(format!(
                "{size} bytes, the checkpoint recorded {} (truncated or replaced)",
                want.bytes
            )));
        }
        let got = digest(&path)?;
        if got.xxh3 != want.xxh3 {
            return Err(mismatch(format!(
                "xxh3 {} differs from the recorded {} (the file is corrupt)",
                got.xxh3, want.xxh3
            )));
        }
    }
    Ok(())
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

/// A safetensors file opened for positioned reads: its header, checked against the file's size.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    header: Metadata,
    data_start: u64,
}

/// The largest header zoo reads (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

impl TensorFile {
    /// Opens `path` and reads its header (no tensor data); a header that is not JSON, claims
    /// more bytes than the file has, or whose tensors do not tile the data exactly is an error
    /// naming the file.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let io = |error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        };
        let format = |message: String| CheckpointError::Format {
            path: path.to_path_buf(),
            message: format!("not a safetensors file: {message}"),
        };
        let file = File::open(path).map_err(io)?;
        let (header, data_start) = read_header(&file).map_err(format)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
            data_start,
        })
    }

    /// The file's `__metadata__` strings.
    pub fn metadata(&self) -> HashMap<String, String> {
        self.header.metadata().clone().unwrap_or_default()
    }

    /// Reads elements `range` of the f32 tensor `key` (which must have `shape`) into `out`.
    pub fn read_f32(
        &self,
        key: &str,
        shape: &[usize],
        range: Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), CheckpointError> {
        let info = self
            .header
            .info(key)
            .ok_or_else(|| CheckpointError::Format {
                path: self.path.clone(),
                message: format!("missing tensor '{key}'"),
            })?;
        if info.dtype != Dtype::F32 || info.shape != shape {
            return Err(CheckpointError::Format {
                path: self.path.clone(),
                message: format!(
                    "'{key}' is {:?} {:?}, the model needs F32 {shape:?}",
                    info.dtype, info.shape
                ),
            });
        }
        let mut bytes = vec![0u8; 4 * range.len()];
        let at = self.data_start + (info.data_offsets.0 + 4 * range.start) as u64;
        self.file
            .read_exact_at(&mut bytes, at)
            .map_err(|error| CheckpointError::Io {
                path: self.path.clone(),
                error,
            })?;
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        Ok(())
    }
}

/// Reads a safetensors header with positioned reads (no tensor data): its 8-byte length, bounded
/// by safetensors' own limit and by the file's size before anything is allocated, then the JSON,
/// whose tensors must tile the rest of the file exactly. Returns the header and where the data
/// starts; the error says what is wrong (callers name the file).
pub fn read_header(file: &File) -> Result<(Metadata, u64), String> {
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size < 8 {
        return Err(format!("{size} bytes, shorter than its header"));
    }
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, 0)
        .map_err(|e| e.to_string())?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER || header_len > size - 8 {
        return Err(format!(
            "its header claims {header_len} bytes of a {size}-byte file"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| e.to_string())?;
    let header: Metadata = serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let data_start = 8 + header_len;
    if data_start + header.data_len() as u64 != size {
        return Err(format!(
            "the header describes {} bytes of tensors, the file holds {}",
            header.data_len(),
            size - data_start
        ));
    }
    Ok((header, data_start))
}

/// Reads a checkpoint and slices it for `rank` of `world`, segment by segment (`(prefix, layout,
/// trains)`, in the order of the model; frozen parts, `trains` false, have no moments and load
/// empty ones): each rank reads only its own slice of each tensor. Every key and shape is
/// checked.
pub fn load(
    dir: &Path,
    segments: &[(String, FlatLayout, bool)],
    rank: usize,
    world: usize,
) -> Result<(Vec<LoadedSegment>, TrainCounters), CheckpointError> {
    let model = TensorFile::open(&dir.join(MODEL_FILE))?;
    let optimizer = TensorFile::open(&dir.join(OPTIMIZER_FILE))?;
    let meta = optimizer.metadata();
    let number = |key: &str| meta.get(key).and_then(|v| v.parse::<f64>().ok());
    let counters = TrainCounters {
        step: number("step").ok_or_else(|| CheckpointError::Format {
            path: optimizer.path.clone(),
            message: "metadata has no 'step'".into(),
        })? as u64,
        loss_scale: number("loss_scale").map(|s| s as f32),
        loss_scale_clean_steps: number("loss_scale_clean_steps").unwrap_or(0.0) as u32,
    };

    let mut out = Vec::with_capacity(segments.len());
    for (prefix, layout, trains) in segments {
        let shards = ShardLayout {
            len: layout.len,
            world,
        };
        // This rank's slice of the segment: the parts of the tensors that overlap it.
        let mine = shards.range(rank);
        let slice = |file: &TensorFile, key_prefix: &str| -> Result<Vec<f32>, CheckpointError> {
            let mut values = Vec::with_capacity(shards.shard_len());
            for entry in &layout.entries {
                let (start, end) = (entry.offset, entry.offset + entry.len());
                let (from, to) = (start.max(mine.start), end.min(mine.end));
                let key = format!("{key_prefix}{}", tensor_name(prefix, &entry.name));
                // Every tensor is checked, also those outside this rank's slice.
                let range = if from < to {
                    from - start..to - start
                } else {
                    0..0
                };
                file.read_f32(&key, &entry.shape, range, &mut values)?;
            }
            values.resize(shards.shard_len(), 0.0);
            Ok(values)
        };
        let moment = |key_prefix: &str| match trains {
            true => slice(&optimizer, key_prefix),
            false => Ok(Vec::new()),
        };
        out.push(LoadedSegment {
            params: slice(&model, "")?,
            exp_avg: moment("exp_avg.")?,
            exp_avg_sq: moment("exp_avg_sq.")?,
        });
    }
    Ok((out, counters))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{SingleRank, ThreadGroup};
    use crate::zero::FlatEntry;
    use std::time::Duration;

    fn layout() -> FlatLayout {
        FlatLayout {
            entries: vec![
                FlatEntry {
                    name: "w".into(),
                    shape: vec![2, 3],
                    offset: 0,
                    owner: String::new(),
                },
                FlatEntry {
                    name: "b".into(),
                    shape: vec![3],
                    offset: 6,
                    owner: String::new(),
                },
            ],
            len: 9,
        }
    }

    #[test]
    fn streamed_files_are_safetensors_that_the_crate_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let full: Vec<f32> = (0..9).map(|i| i as f32 * 0.5).collect();
        let params = ShardedParams::from_full(layout(), &full, 0, 1);
        let m: Vec<f32> = full.iter().map(|v| v + 100.0).collect();
        let v: Vec<f32> = full.iter().map(|v| v + 200.0).collect();
        let segments = [SegmentState {
            prefix: "blocks.0".into(),
            params: Cow::Borrowed(&params),
            exp_avg: Cow::Borrowed(&m),
            exp_avg_sq: Cow::Borrowed(&v),
            trains: true,
        }];
        let counters = TrainCounters {
            step: 7,
            loss_scale: Some(1024.0),
            loss_scale_clean_steps: 3,
        };
        let digests = save(&SingleRank, dir.path(), &segments, counters).unwrap();
        assert_eq!(digests.len(), 2);
        // The safetensors crate parses what was streamed, with the right values.
        let bytes = std::fs::read(dir.path().join(MODEL_FILE)).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let b = file.tensor("blocks.0.b").unwrap();
        assert_eq!(b.shape(), [3]);
        let values: Vec<f32> = b
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [3.0, 3.5, 4.0]);
        assert_eq!(digests[0].bytes, bytes.len() as u64);
        verify(dir.path(), &digests).unwrap();
        // Only the two files are left: no temporaries.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        let (loaded, read) =
            load(dir.path(), &[("blocks.0".into(), layout(), true)], 0, 1).unwrap();
        assert_eq!(read, counters);
        assert_eq!(loaded[0].params, full);
        assert_eq!(loaded[0].exp_avg, m);
        assert_eq!(loaded[0].exp_avg_sq, v);
        // Three ranks each read their own slice, zero-padded.
        let (third, _) = load(dir.path(), &[("blocks.0".into(), layout(), true)], 2, 3).unwrap();
        assert_eq!(third[0].params, [3.0, 3.5, 4.0]);
        let (second, _) = load(dir.path(), &[("blocks.0".into(), layout(), true)], 1, 4).unwrap();
        assert_eq!(second[0].params, [1.5, 2.0, 2.5]);
    }

    #[test]
    fn saving_on_several_ranks_gathers_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let full: Vec<f32> = (0..9).map(|i| i as f32).collect();
        let results = ThreadGroup::run(2, Duration::from_secs(10), move |comm| {
            let params = ShardedParams::from_full(layout(), &full, comm.rank(), 2);
            let m = params.local.clone();
            let segments = [SegmentState {
                prefix: String::new(),
                params: Cow::Borrowed(&params),
                exp_avg: Cow::Borrowed(&m),
                exp_avg_sq: Cow::Borrowed(&m),
                trains: true,
            }];
            let counters = TrainCounters {
                step: 1,
                loss_scale: None,
                loss_scale_clean_steps: 0,
            };
            save(&comm, &path, &segments, counters).unwrap()
        });
        let digests: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(digests[0].len(), 2, "rank 0 writes");
        assert!(digests[1].is_empty(), "rank 1 does not");
        let (loaded, _) = load(dir.path(), &[(String::new(), layout(), true)], 0, 1).unwrap();
        assert_eq!(
            loaded[0].params,
            (0..9).map(|i| i as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn damaged_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let full = vec![1.0f32; 9];
        let params = ShardedParams::from_full(layout(), &full, 0, 1);
        let segments = [SegmentState {
            prefix: "s".into(),
            params: Cow::Borrowed(&params),
            exp_avg: Cow::Borrowed(&full),
            exp_avg_sq: Cow::Borrowed(&full),
            trains: true,
        }];
        let counters = TrainCounters {
            step: 1,
            loss_scale: None,
            loss_scale_clean_steps: 0,
        };
        let digests = save(&SingleRank, dir.path(), &segments, counters).unwrap();
        let path = dir.path().join(MODEL_FILE);
        let bytes = std::fs::read(&path).unwrap();

        // One flipped bit: the size matches, the hash does not.
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let err = verify(dir.path(), &digests).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("corrupt"),
            "{err}"
        );

        // Truncated: the size, and the reader, say so.
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = verify(dir.path(), &digests).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let err = load(dir.path(), &[("s".into(), layout(), true)], 0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");

        // A header claiming more than the file holds is refused before any allocation.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        std::fs::write(&path, &huge).unwrap();
        let err = TensorFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("header claims"), "{err}");

        // Another model's layout: the missing key is named.
        std::fs::write(&path, &bytes).unwrap();
        let err = load(dir.path(), &[("other".into(), layout(), true)], 0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing tensor 'other.w'"), "{err}");
    }
}
