//! Layers shared by every model family.
//!
//! Each layer follows burn's pattern: a `*Config` holding the hyper-parameters, whose `init` builds
//! a `#[derive(Module)]` struct, whose `forward` runs it. The layers work on any backend, with or
//! without autodiff, so a later backend layer can wrap and shard whole blocks built from them.

pub mod activation;
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod embeddings;
pub mod feed_forward;
pub mod linear;
pub mod lora;
pub mod norm;

pub use activation::Activation;
pub use attention::{AttentionMask, KvCache, MultiHeadAttention, MultiHeadAttentionConfig};
pub use dropout::{Dropout, DropoutConfig};
pub use embedding::{Embedding, EmbeddingConfig};
pub use embeddings::{Embeddings, EmbeddingsConfig};
pub use feed_forward::{FeedForward, FeedForwardConfig};
pub use linear::{Linear, LinearConfig};
pub use lora::{Lora, LoraConfig};
pub use norm::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig, rms_norm};
