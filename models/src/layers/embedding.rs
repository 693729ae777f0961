//! One token table: burn's `Embedding` (same config, field and initialisation, so records and
//! key tables are unchanged) that may instead hold its table quantized ([`Embedding::quantize`]),
//! looked up and, as a tied LM head, multiplied without ever being dequantized whole.

use std::sync::Arc;

use bmtrain_backend::kernels;
use bmtrain_backend::quant::{CodesSlot, QuantFormat, QuantizedMatrix};
use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::{Int, Tensor, backend::Backend};

use super::linear::{dense_values, lazy_dequantized};

/// Hyper-parameters of [`Embedding`].
#[derive(Config, Debug)]
pub struct EmbeddingConfig {
    /// Number of rows (token ids, positions, …).
    pub n_embedding: usize,
    /// Width of a row.
    pub d_model: usize,
    /// How fresh rows are drawn (burn's default: N(0, 1)).
    #[config(default = "Initializer::Normal{mean:0.0, std:1.0}")]
    pub initializer: Initializer,
}

/// A `[n_embedding, d_model]` table whose rows token ids pick.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[n_embedding, d_model]`; dequantized lazily (only if read) when the table is quantized.
    pub weight: Param<Tensor<B, 2>>,
    /// The table's codes when it is quantized (each row one output channel of a tied head).
    #[module(skip)]
    pub quantized: Option<CodesSlot>,
}

impl EmbeddingConfig {
    /// Builds the table with freshly initialised (lazy) rows.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Embedding<B> {
        Embedding {
            weight: self
                .initializer
                .init([self.n_embedding, self.d_model], device),
            quantized: None,
        }
    }
}

impl<B: Backend> Embedding<B> {
    /// - ids: `[batch, seq]` → `[batch, seq, d_model]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        if let Some(table) = self.codes()
            && let Some(rows) = kernels::quantized_embedding(&table, &ids)
        {
            return rows;
        }
        burn::tensor::module::embedding(self.weight.val(), ids)
    }

    /// The table as a tied output layer: `hidden · tableᵀ`, `[batch, seq, d_model]` →
    /// `[batch, seq, n_embedding]`.
    pub fn tied_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        if let Some(table) = self.codes() {
            return kernels::quantized_linear(&hidden, &table, None);
        }
        let [batch, seq, width] = hidden.dims();
        let table = self.weight.val();
        let rows = table.dims()[0];
        hidden
            .reshape([batch * seq, width])
            .matmul(table.transpose())
            .reshape([batch, seq, rows])
    }

    /// Quantizes the table in place (rows are the channels).
    pub fn quantize(&mut self, format: QuantFormat) {
        let [rows, cols] = self.weight.lazy_shape().dims();
        let values = dense_values(self.weight.val());
        self.set_quantized(Arc::new(QuantizedMatrix::quantize(
            format, &values, rows, cols,
        )));
    }

    /// Holds `table` (`[n_embedding, d_model]`) instead of dense rows; the weight becomes its lazy
    /// dequantization.
    pub fn set_quantized(&mut self, table: Arc<QuantizedMatrix>) {
        let device = self.weight.lazy_device();
        self.weight = lazy_dequantized(self.weight.id, table.clone(), false, &device);
        self.quantized = Some(CodesSlot::resident(table));
    }

    /// The table's codes, when it is quantized.
    pub fn codes(&self) -> Option<Arc<QuantizedMatrix>> {
        self.quantized.as_ref().and_then(CodesSlot::codes)
    }
}
