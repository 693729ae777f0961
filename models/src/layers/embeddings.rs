//! Token embeddings: word, and optionally learned positions, token types, a LayerNorm and dropout.

use super::dropout::{Dropout, DropoutConfig};
use crate::layers::{Embedding, EmbeddingConfig};
use burn::config::Config;
use burn::module::Module;

use super::norm::{LayerNorm, LayerNormConfig};
use burn::tensor::{Int, Tensor, backend::Backend};

/// Hyper-parameters of [`Embeddings`].
#[derive(Config, Debug)]
pub struct EmbeddingsConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the embeddings.
    pub d_model: usize,
    /// Size of the learned position table; `None` for models without one (T5).
    #[config(default = "None")]
    pub max_positions: Option<usize>,
    /// Number of token types (segments); `None` or 0 for models without them (GPT-2, T5).
    #[config(default = "None")]
    pub type_vocab_size: Option<usize>,
    /// Epsilon of a LayerNorm applied to the sum; `None` for no norm (GPT-2, T5).
    #[config(default = "None")]
    pub layer_norm_eps: Option<f64>,
    /// Dropout on the output (active only in training).
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// `dropout(norm(word[ids] + position[pos] + token_type[types]))`, each part optional but `word`.
#[derive(Module, Debug)]
pub struct Embeddings<B: Backend> {
    /// `[vocab_size, d_model]`.
    pub word: Embedding<B>,
    /// `[max_positions, d_model]`.
    pub position: Option<Embedding<B>>,
    /// `[type_vocab_size, d_model]`.
    pub token_type: Option<Embedding<B>>,
    /// LayerNorm over the sum.
    pub norm: Option<LayerNorm<B>>,
    dropout: Dropout,
}

impl EmbeddingsConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Embeddings<B> {
        let table = |n| EmbeddingConfig::new(n, self.d_model).init(device);
        Embeddings {
            word: table(self.vocab_size),
            position: self.max_positions.map(table),
            token_type: self.type_vocab_size.filter(|&n| n > 0).map(table),
            norm: self.layer_norm_eps.map(|eps| {
                LayerNormConfig::new(self.d_model)
                    .with_epsilon(eps)
                    .init(device)
            }),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

impl<B: Backend> Embeddings<B> {
    /// - input_ids: `[batch, seq]`
    /// - position_ids: `[batch, seq]`; `0..seq` when `None`
    /// - token_type_ids: `[batch, seq]`; zeros when `None`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Option<Tensor<B, 2, Int>>,
        token_type_ids: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let mut hidden = self.word.forward(input_ids);
        if let Some(position) = &self.position {
            let ids = position_ids.unwrap_or_else(|| {
                Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
                    .unsqueeze::<2>()
                    .expand([batch, seq])
            });
            hidden = hidden + position.forward(ids);
        }
        if let Some(token_type) = &self.token_type {
            let ids = token_type_ids.unwrap_or_else(|| Tensor::zeros([batch, seq], &device));
            hidden = hidden + token_type.forward(ids);
        }
        if let Some(norm) = &self.norm {
            hidden = norm.forward(hidden);
        }
        self.dropout.forward(hidden)
    }

    /// Number of learned positions, if the model has a position table.
    pub fn max_positions(&self) -> Option<usize> {
        self.position
            .as_ref()
            .map(|p| p.weight.lazy_shape().dims::<2>()[0])
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.word.weight.lazy_shape().dims::<2>()[0]
    }
}
