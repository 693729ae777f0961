//! The activation functions HF configs name in `hidden_act` / `feed_forward_proj`.

use bmtrain_backend::kernels;
use burn::tensor::{Tensor, activation, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// An element-wise activation, named as in transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// The exact GELU, `x · Φ(x)` with the erf. HF's `"gelu"`.
    Gelu,
    /// The tanh approximation of GELU. HF's `"gelu_new"`, `"gelu_pytorch_tanh"` and `"gelu_fast"`.
    GeluNew,
    /// `x · sigmoid(x)`. HF's `"silu"` and `"swish"`.
    Silu,
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    /// Parses an HF activation name, such as `config.json`'s `hidden_act`.
    pub fn from_hf(name: &str) -> Result<Self, ModelError> {
        match name {
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluNew),
            "silu" | "swish" => Ok(Self::Silu),
            "tanh" => Ok(Self::Tanh),
            other => Err(ModelError::Unsupported(format!(
                "activation '{other}' (known: relu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, swish, tanh)"
            ))),
        }
    }

    /// The HF name that [`Activation::from_hf`] reads back to `self`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Relu => "relu",
            Self::Gelu => "gelu",
            Self::GeluNew => "gelu_new",
            Self::Silu => "silu",
            Self::Tanh => "tanh",
        }
    }

    /// Applies the activation element-wise.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Relu => activation::relu(x),
            Self::Gelu => kernels::gelu(&x, false).unwrap_or_else(|| activation::gelu(x)),
            // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as transformers' NewGELUActivation.
            Self::GeluNew => {
                kernels::gelu(&x, true).unwrap_or_else(|| activation::gelu_approximate(x))
            }
            Self::Silu => kernels::silu(&x).unwrap_or_else(|| activation::silu(x)),
            Self::Tanh => x.tanh(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;
    use burn::tensor::TensorData;

    fn apply(act: Activation, values: &[f32]) -> Vec<f32> {
        let x = Tensor::<Cpu, 1>::from_data(TensorData::from(values), &Default::default());
        act.forward(x).into_data().to_vec().unwrap()
    }

    #[test]
    fn gelu_variants_match_their_formulas() {
        let xs = [-3.0f32, -1.0, -0.1, 0.0, 0.5, 2.0];
        let erf_gelu = apply(Activation::Gelu, &xs);
        let tanh_gelu = apply(Activation::GeluNew, &xs);
        for (i, &x) in xs.iter().enumerate() {
            let x = x as f64;
            // Φ(x) from the complementary error function, computed independently in f64.
            let exact = 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            let approx = 0.5 * x * (1.0 + inner.tanh());
            assert!((erf_gelu[i] as f64 - exact).abs() < 1e-5, "gelu({x})");
            assert!((tanh_gelu[i] as f64 - approx).abs() < 1e-5, "gelu_new({x})");
        }
    }

    /// Abramowitz–Stegun 7.1.26 is too coarse for 1e-5; use the series / continued fraction.
    fn erf(x: f64) -> f64 {
        // Taylor series, converges quickly for |x| < 3.
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn unknown_activation_is_named() {
        let err = Activation::from_hf("mish").unwrap_err();
        assert!(err.to_string().contains("'mish'"), "{err}");
        for act in [
            Activation::Relu,
            Activation::Gelu,
            Activation::GeluNew,
            Activation::Silu,
        ] {
            assert_eq!(Activation::from_hf(act.hf_name()).unwrap(), act);
        }
    }
}
