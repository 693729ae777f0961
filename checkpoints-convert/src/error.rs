//! Errors of checkpoint loading and conversion. Each names the file, key or shape involved.

use std::path::{Path, PathBuf};

/// Anything that can go wrong reading, checking, converting or writing a model directory.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A JSON file does not parse, or does not have the expected fields.
    #[error("{path}: invalid JSON: {error}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's message, with line and column.
        error: serde_json::Error,
    },
    /// A PEFT adapter this model cannot take (another base, an unsupported option, a key that
    /// names no layer).
    #[error("{path}: {message}")]
    Adapter {
        /// The adapter file.
        path: PathBuf,
        /// What is wrong (the key, the option, the shapes).
        message: String,
    },
    /// A quantization zoo cannot do or read (`--bits 3`, an adapter directory, a code tensor of
    /// the wrong shape).
    #[error("{path}: {message}")]
    Quantize {
        /// The directory or weights file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A config has a value zoo cannot use.
    #[error("{path}: {error}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        error: models::ModelError,
    },
    /// A weights file is not a readable safetensors / PyTorch file.
    #[error("{path}: not a valid {format} file: {message}")]
    BadWeightsFile {
        /// The file.
        path: PathBuf,
        /// `safetensors` or `PyTorch pickle`.
        format: &'static str,
        /// What the reader said.
        message: String,
    },
    /// The model would not fit in memory: refused before anything is allocated.
    #[error(
        "{path}: the weights alone need {:.2} GB ({parameters} parameters × {bytes_per_parameter} bytes), \
         more than the {:.2} GB of memory available",
        *needed as f64 / 1e9,
        *available as f64 / 1e9
    )]
    TooLarge {
        /// The config (or weights file) that describes the model.
        path: PathBuf,
        /// Parameters of the model.
        parameters: u128,
        /// Bytes each takes once loaded.
        bytes_per_parameter: u64,
        /// `parameters × bytes_per_parameter`.
        needed: u128,
        /// What the process may use.
        available: u64,
    },
    /// The directory has no weights file zoo can read.
    #[error(
        "{dir}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)"
    )]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory has neither `config.json` (HF) nor `zoo.json` (zoo).
    #[error("{dir}: not a model directory (no config.json or zoo.json)")]
    NotAModelDir {
        /// The directory.
        dir: PathBuf,
    },
    /// Weights the model needs are absent.
    #[error("{source_name}: missing {} key(s) for {architecture}: {}", keys.len(), keys.join(", "))]
    MissingKeys {
        /// The weights file or directory.
        source_name: String,
        /// The model class.
        architecture: &'static str,
        /// The missing keys, in the checkpoint's naming.
        keys: Vec<String>,
    },
    /// A tensor has the wrong shape for the config.
    #[error("{file}: key '{key}' has shape {found:?}, but the config needs {expected:?}")]
    ShapeMismatch {
        /// The file holding the tensor.
        file: String,
        /// The key, in the checkpoint's naming.
        key: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// The config ties the output head to the token embeddings, but the checkpoint's head differs.
    #[error(
        "{file}: '{head}' differs from '{embeddings}', but the config says tie_word_embeddings: \
         true (a tied head is a copy of the embeddings; a separate head needs \
         tie_word_embeddings: false)"
    )]
    TiedHeadMismatch {
        /// The file holding the head.
        file: String,
        /// The head's key.
        head: String,
        /// The embeddings' key.
        embeddings: String,
    },
    /// The hub (or mirror) refused or failed.
    #[error("hub repository '{repo}': {message}")]
    Hub {
        /// `org/name`.
        repo: String,
        /// What failed.
        message: String,
    },
    /// A tensor has a dtype zoo cannot store.
    #[error("{file}: key '{key}' has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        file: String,
        /// The key.
        key: String,
        /// The dtype.
        dtype: String,
    },
    /// A tokenizer could not be built.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer {
        /// The tokenizer file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The output exists and overwriting was not asked for.
    #[error("{path}: already exists (pass --overwrite to replace it)")]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// Applying checked weights to the model failed (a zoo bug if it ever happens).
    #[error("loading weights into the model: {0}")]
    Apply(String),
}

impl ConvertError {
    /// Wraps an I/O error with its path.
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Result with [`ConvertError`].
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;
