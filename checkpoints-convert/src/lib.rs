//! Checkpoints in and out of zoo: HF model directories (safetensors, sharded safetensors,
//! PyTorch `.bin` read without running pickled code), the HF ⇄ zoo key tables (one per family,
//! in [`families`]), zoo's own directory format, and tokenizers.
//!
//! The usual entry points:
//! - [`load_model`]: an HF or zoo directory → a burn model, with every key and shape checked;
//! - [`convert_hf_to_zoo`] / [`export_zoo_to_hf`]: `zoo convert` both ways, bit-exact;
//! - [`hub::download`]: `zoo download` from the HF hub or a mirror;
//! - [`load_tokenizer`]: `tokenizer.json`, or one built from `vocab.txt` / `vocab.json` + `merges.txt`,
//!   or CPM's jieba + SentencePiece ([`cpm`], [`sentencepiece`]).

#![warn(missing_docs)]

pub mod batch;
pub mod cpm;
pub mod cpm2;
pub mod error;
pub mod families;
pub mod hub;
pub mod model_dir;
pub mod peft;
mod pickle_guard;
pub mod quantize;
pub mod sentencepiece;
pub mod tensors;
pub mod tokenizer;

pub use batch::Batch;
pub use error::{ConvertError, Result};
pub use model_dir::{
    ConvertReport, DirKind, LoadOptions, LoadedModel, ModelSpec, QLORA_KEY, ZooManifest,
    ZooWeights, ZooWeightsReader, build_model, convert_hf_to_zoo, convert_hf_to_zoo_within,
    export_zoo_to_hf, export_zoo_to_hf_within, load_model, merge_adapter_within, read_spec,
};
pub use tensors::{
    IndexedTensor, StoredTensor, TensorIndex, TensorMap, WeightsFormat, index_dir_weights,
    index_weights_file, read_dir_weights, read_weights_file, write_safetensors,
};
pub use tokenizer::{TextTokenizer, encode, load_tokenizer};
