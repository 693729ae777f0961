//! Position-wise feed-forward: `output(act(input(x)))`, or the gated `output(act(gate(x)) · input(x))`.

use super::dropout::{Dropout, DropoutConfig};
use super::linear::{Linear, LinearConfig};
use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use super::Activation;

/// Hyper-parameters of [`FeedForward`].
#[derive(Config, Debug)]
pub struct FeedForwardConfig {
    /// Width of the hidden states going in and out.
    pub d_model: usize,
    /// Inner width.
    pub d_ff: usize,
    /// The activation.
    pub activation: Activation,
    /// Gated variant (T5 v1.1, mT5, flan): a second input projection multiplies the activation.
    #[config(default = false)]
    pub gated: bool,
    /// Whether the projections have biases.
    #[config(default = true)]
    pub bias: bool,
    /// Dropout on the inner activations (T5 has it; BERT and GPT-2 do not).
    #[config(default = 0.0)]
    pub inner_dropout: f64,
}

/// Position-wise feed-forward layer.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `[d_model, d_ff]`: activated when ungated; the linear branch when gated (T5's `wi_1`).
    pub input: Linear<B>,
    /// `[d_model, d_ff]`, only when gated: the activated branch (T5's `wi_0`).
    pub gate: Option<Linear<B>>,
    /// `[d_ff, d_model]`.
    pub output: Linear<B>,
    dropout: Dropout,
    #[module(skip)]
    activation: Activation,
}

impl FeedForwardConfig {
    /// Builds the layer with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> FeedForward<B> {
        let linear = |d_in, d_out| {
            LinearConfig::new(d_in, d_out)
                .with_bias(self.bias)
                .init(device)
        };
        FeedForward {
            input: linear(self.d_model, self.d_ff),
            gate: self.gated.then(|| linear(self.d_model, self.d_ff)),
            output: linear(self.d_ff, self.d_model),
            dropout: DropoutConfig::new(self.inner_dropout).init(),
            activation: self.activation,
        }
    }
}

impl<B: Backend> FeedForward<B> {
    /// The linear layers under the given names, `[input, gate, output]` (no gate when ungated).
    pub fn named_linears(
        &mut self,
        [input, gate, output]: [&'static str; 3],
    ) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out = vec![(input, &mut self.input)];
        if let Some(g) = self.gate.as_mut() {
            out.push((gate, g));
        }
        out.push((output, &mut self.output));
        out
    }

    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let inner = match &self.gate {
            Some(gate) => self.activation.forward(gate.forward(x.clone())) * self.input.forward(x),
            None => self.activation.forward(self.input.forward(x)),
        };
        self.output.forward(self.dropout.forward(inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;
    use burn::tensor::TensorData;

    #[test]
    fn gated_relu_is_the_product_of_its_branches() {
        let device = Default::default();
        let ffn = FeedForwardConfig::new(2, 3, Activation::Relu)
            .with_gated(true)
            .with_bias(false)
            .init::<Cpu>(&device);
        let x = Tensor::<Cpu, 3>::from_data(TensorData::from([[[0.5f32, -1.0]]]), &device);
        let got: Vec<f32> = ffn.forward(x.clone()).into_data().to_vec().unwrap();
        // Recompute by hand from the weights.
        let w = |l: &Linear<Cpu>| -> Vec<f32> { l.weight.val().into_data().to_vec().unwrap() };
        let (wi, wg, wo) = (w(&ffn.input), w(ffn.gate.as_ref().unwrap()), w(&ffn.output));
        let xs = [0.5f32, -1.0];
        let inner: Vec<f32> = (0..3)
            .map(|j| {
                let up: f32 = (0..2).map(|i| xs[i] * wi[i * 3 + j]).sum();
                let gate: f32 = (0..2).map(|i| xs[i] * wg[i * 3 + j]).sum();
                gate.max(0.0) * up
            })
            .collect();
        for k in 0..2 {
            let want: f32 = (0..3).map(|j| inner[j] * wo[j * 2 + k]).sum();
            assert!((got[k] - want).abs() < 1e-6);
        }
    }
}
