//! LoRA (Hu et al. 2021; PEFT's `LoraLayer`): a frozen linear layer plus a trained low-rank
//! update, `y = x·W + b + (α/r)·dropout(x)·A·B`. `A` starts Kaiming-uniform and `B` at zero, so
//! training starts from the base model's outputs exactly; merging writes `W + (α/r)·A·B`.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

use super::dropout::Dropout;

/// LoRA's hyper-parameters (PEFT's `LoraConfig`: `r`, `lora_alpha`, `lora_dropout`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank of the update.
    pub r: usize,
    /// The scale's numerator: the update is multiplied by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the update's input (training only).
    pub dropout: f64,
}

impl LoraConfig {
    /// The update's scale, `alpha / r` (PEFT's default, without rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The adapter of a `d_input → d_output` layer: `A` drawn as PEFT draws `lora_A` (Kaiming
    /// uniform with `a = √5`: `U(−1/√d_input, 1/√d_input)`), `B` zero. A trainer replaces both
    /// with the values its initialisation gives (the same distributions, see
    /// `models::train::ParamKind`).
    pub fn init<B: Backend>(&self, d_input: usize, d_output: usize, device: &B::Device) -> Lora<B> {
        let bound = 1.0 / (d_input as f64).sqrt();
        let a = Tensor::random(
            [d_input, self.r],
            burn::tensor::Distribution::Uniform(-bound, bound),
            device,
        );
        Lora {
            a: Param::from_tensor(a),
            b: Param::from_tensor(Tensor::zeros([self.r, d_output], device)),
            scaling: self.scaling(),
            dropout: Dropout { prob: self.dropout },
        }
    }
}

/// The trained low-rank update of one linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[d_input, r]`: PEFT's `lora_A.weight` transposed (burn's row layout, as `Linear`).
    pub a: Param<Tensor<B, 2>>,
    /// `[r, d_output]`: PEFT's `lora_B.weight` transposed.
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    pub scaling: f64,
    /// Dropout on the update's input.
    pub dropout: Dropout,
}

impl<B: Backend> Lora<B> {
    /// The update: `[..., d_input]` → `[..., d_output]`.
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let down = burn::tensor::module::linear(self.dropout.forward(input), self.a.val(), None);
        burn::tensor::module::linear(down, self.b.val(), None).mul_scalar(self.scaling)
    }

    /// The update as a full `[d_input, d_output]` matrix, `(α/r)·A·B`: what merging adds to the
    /// layer's weight.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scaling)
    }
}
