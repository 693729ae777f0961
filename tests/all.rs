//! zoo's cross-crate integration tests (one binary): parity with transformers, gradients,
//! conversion round trips, tokenizers.

mod convert;
mod gradients;
mod parity;
mod tokenizers;
