//! Dropout: burn's `Dropout` module (same config and field), run through the fused kernel.

use bmtrain_backend::kernels;
use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

/// Hyper-parameters of [`Dropout`].
#[derive(Config, Debug)]
pub struct DropoutConfig {
    /// Probability of zeroing an element in training.
    pub prob: f64,
}

/// Zeroes elements with probability `prob` and scales the rest by `1/(1 − prob)` while gradients
/// are tracked (training); the identity otherwise. As burn's `Dropout`, whose masks follow
/// `B::seed`; on the CPU it runs [`kernels::dropout`].
#[derive(Module, Clone, Debug)]
pub struct Dropout {
    /// Probability of zeroing an element in training.
    pub prob: f64,
}

impl DropoutConfig {
    /// Builds the layer.
    pub fn init(&self) -> Dropout {
        Dropout { prob: self.prob }
    }
}

impl Dropout {
    /// - x: any shape → same shape.
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match kernels::dropout(&x, self.prob) {
            Some(y) => y,
            None => burn::nn::Dropout { prob: self.prob }.forward(x),
        }
    }
}
