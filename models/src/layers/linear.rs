//! The linear layer: burn's `Linear` (same config, fields and initialisation, so records and key
//! tables are unchanged), run through the fused kernel where it applies.

use bmtrain_backend::kernels;
use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::{Tensor, backend::Backend};

/// Hyper-parameters of [`Linear`].
#[derive(Config, Debug)]
pub struct LinearConfig {
    /// Input width.
    pub d_input: usize,
    /// Output width.
    pub d_output: usize,
    /// Whether there is a bias.
    #[config(default = true)]
    pub bias: bool,
    /// How fresh weights are drawn (burn's default: Kaiming uniform, gain 1/√3).
    #[config(default = "Initializer::KaimingUniform{gain:1.0/3.0f64.sqrt(), fan_out_only:false}")]
    pub initializer: Initializer,
}

/// `y = x·weight + bias` over the last dimension.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_input, d_output]` (burn's row layout; HF's `nn.Linear` stores the transpose).
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA update, when one is attached ([`Linear::attach_lora`]).
    pub lora: Option<super::lora::Lora<B>>,
}

impl LinearConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Linear<B> {
        let (fan_in, fan_out) = (Some(self.d_input), Some(self.d_output));
        Linear {
            weight: self.initializer.init_with(
                [self.d_input, self.d_output],
                fan_in,
                fan_out,
                device,
            ),
            bias: self.bias.then(|| {
                self.initializer
                    .init_with([self.d_output], fan_in, fan_out, device)
            }),
            lora: None,
        }
    }
}

impl<B: Backend> Linear<B> {
    /// - input: `[..., d_input]` → `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(|b| b.val());
        let update = self.lora.as_ref().map(|lora| lora.forward(input.clone()));
        let output = match kernels::linear(&input, &weight, bias.as_ref()) {
            Some(output) => output,
            None => burn::tensor::module::linear(input, weight, bias),
        };
        match update {
            Some(update) => output + update,
            None => output,
        }
    }

    /// Attaches a fresh LoRA update of `config` (replacing any).
    pub fn attach_lora(&mut self, config: &super::lora::LoraConfig, device: &B::Device) {
        let [d_input, d_output] = self.weight.lazy_shape().dims();
        self.lora = Some(config.init(d_input, d_output, device));
    }

    /// Folds an attached LoRA update into the weight (`W + (α/r)·A·B`) and drops it.
    pub fn merge_lora(mut self) -> Self {
        if let Some(lora) = self.lora.take() {
            let merged = self.weight.val() + lora.delta();
            self.weight = Param::from_tensor(merged);
        }
        self
    }
}
