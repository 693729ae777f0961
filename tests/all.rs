//! zoo's cross-crate integration tests (one binary): parity with transformers, gradients,
//! conversion round trips, tokenizers.

mod convert;
mod generation;
#[cfg(feature = "cuda")]
mod gpu;
mod gradients;
mod llama_train;
mod parity;
mod peft;
mod quantize;
mod t5;
mod t5_train;
mod tokenizers;
mod train_specs;
mod zero;
