//! The linear layer: burn's `Linear` (same config, fields and initialisation, so records and key
//! tables are unchanged), run through the fused kernel where it applies, or on quantized weights
//! ([`Linear::quantize`]: the product reads int8 / NF4 codes in place).

use std::sync::Arc;

use bmtrain_backend::kernels;
use bmtrain_backend::quant::{CodesSlot, QuantFormat, QuantizedMatrix};
use burn::config::Config;
use burn::module::{Initializer, Module, Param, ParamId};
use burn::tensor::{Shape, Tensor, TensorData, backend::Backend};

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
    /// `[d_input, d_output]` (burn's row layout; HF's `nn.Linear` stores the transpose);
    /// dequantized lazily (only if read) when the layer is quantized.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA update, when one is attached ([`Linear::attach_lora`]).
    pub lora: Option<super::lora::Lora<B>>,
    /// Where the weight's codes are when the layer is quantized: `[d_output, d_input]` (HF's
    /// layout, a row per output channel). Held for good by a quantized model; lent by the ZeRO
    /// trainer while the layer's segment runs for QLoRA's frozen base. Never trained.
    #[module(skip)]
    pub quantized: Option<CodesSlot>,
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
            quantized: None,
        }
    }
}

impl<B: Backend> Linear<B> {
    /// - input: `[..., d_input]` → `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        let update = self.lora.as_ref().map(|lora| lora.forward(input.clone()));
        let output = if let Some(slot) = &self.quantized {
            let codes = slot
                .codes()
                .expect("a quantized layer runs while its codes are held or lent");
            kernels::quantized_linear(&input, &codes, bias.as_ref())
        } else {
            let weight = self.weight.val();
            match kernels::linear(&input, &weight, bias.as_ref()) {
                Some(output) => output,
                None => burn::tensor::module::linear(input, weight, bias),
            }
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

    /// Folds an attached LoRA update into the weight (`W + (α/r)·A·B`) and drops it (a
    /// quantized layer becomes dense: the merge is not on the quantization grid).
    pub fn merge_lora(mut self) -> Self {
        if let Some(lora) = self.lora.take() {
            let merged = self.weight.val() + lora.delta();
            self.weight = Param::from_tensor(merged);
            self.quantized = None;
        }
        self
    }

    /// Quantizes the weight in place (per output channel for int8, in blocks for NF4).
    pub fn quantize(&mut self, format: QuantFormat) {
        let [d_input, d_output] = self.weight.lazy_shape().dims();
        let values = dense_values(self.weight.val().transpose());
        let codes = QuantizedMatrix::quantize(format, &values, d_output, d_input);
        self.set_quantized(Arc::new(codes));
    }

    /// Holds `codes` (`[d_output, d_input]`) instead of a dense weight; the weight becomes their
    /// lazy dequantization, frozen.
    pub fn set_quantized(&mut self, codes: Arc<QuantizedMatrix>) {
        let device = self.weight.lazy_device();
        self.weight = lazy_dequantized(self.weight.id, codes.clone(), true, &device);
        self.quantized = Some(CodesSlot::resident(codes));
    }

    /// Makes the layer run on codes the ZeRO trainer lends it (QLoRA's frozen base) and returns
    /// the slot. The weight keeps its values: the trainer quantizes them when it shards the
    /// layer's segment, and keeps no dense copy.
    pub fn lend_codes(&mut self) -> CodesSlot {
        let slot = CodesSlot::lent();
        self.quantized = Some(slot.clone());
        slot
    }

    /// The codes the layer runs on, when it is quantized and they are held or lent.
    pub fn codes(&self) -> Option<Arc<QuantizedMatrix>> {
        self.quantized.as_ref().and_then(CodesSlot::codes)
    }
}

/// A tensor's values, row-major f32.
pub(crate) fn dense_values<B: Backend>(tensor: Tensor<B, 2>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 values")
}

/// A frozen parameter that dequantizes `codes` when (and only when) it is read, transposed to
/// burn's `[d_input, d_output]` when `transposed`.
pub(crate) fn lazy_dequantized<B: Backend>(
    id: ParamId,
    codes: Arc<QuantizedMatrix>,
    transposed: bool,
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    let (rows, cols) = (codes.rows(), codes.cols());
    let shape = if transposed {
        [cols, rows]
    } else {
        [rows, cols]
    };
    Param::uninitialized(
        id,
        move |device, _| {
            let dense = Tensor::<B, 2>::from_data(
                TensorData::new(codes.dequantize(), [rows, cols]),
                device,
            );
            if transposed { dense.transpose() } else { dense }
        },
        device.clone(),
        false,
        Shape::new(shape),
    )
}
