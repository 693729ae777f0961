//! Normalisation layers: LayerNorm (BERT, GPT-2) and an RMSNorm computed in f32 (T5).

use bmtrain_backend::kernels;
use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::{FloatDType, Tensor, backend::Backend};

/// Hyper-parameters of [`LayerNorm`] (the fields and defaults of burn's `LayerNormConfig`).
#[derive(Config, Debug)]
pub struct LayerNormConfig {
    /// Width of the normalised (last) dimension.
    pub d_model: usize,
    /// Added to the variance before the square root.
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Whether there is a shift (`beta`).
    #[config(default = true)]
    pub bias: bool,
}

/// Layer normalisation over the last dimension: `(x − mean) / √(var + eps) · gamma + beta`.
///
/// The parameters are burn's `LayerNorm`'s (`gamma`, `beta`), so records and key tables are the
/// same; the forward runs the fused kernel ([`kernels::layer_norm`]) where it applies, and
/// elsewhere (GPU backends, half precision) computes in f32 and returns `x`'s dtype.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Per-channel scale, `[d_model]`, initialised to ones.
    pub gamma: Param<Tensor<B, 1>>,
    /// Per-channel shift, `[d_model]`, initialised to zeros.
    pub beta: Option<Param<Tensor<B, 1>>>,
    epsilon: f64,
}

impl LayerNormConfig {
    /// Builds the layer with unit scale and zero shift.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        LayerNorm {
            // Lazy, like burn's own layers: a model is built (and measured) before it is allocated.
            gamma: Initializer::Ones.init([self.d_model], device),
            beta: self
                .bias
                .then(|| Initializer::Zeros.init([self.d_model], device)),
            epsilon: self.epsilon,
        }
    }
}

impl<B: Backend> LayerNorm<B> {
    /// - x: `[..., d_model]` → same shape.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gamma = self.gamma.val();
        if let Some(beta) = &self.beta
            && let Some(y) = kernels::layer_norm(&x, &gamma, &beta.val(), self.epsilon)
        {
            return y;
        }
        // In f32 whatever `x`'s dtype, as torch's autocast runs layer norm: in f16 the squared
        // deviations overflow (65504) once hidden states pass ~256, and the variance then is inf.
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let normed = (x - mean) / (var + self.epsilon).sqrt();
        let scaled = normed * gamma.cast(FloatDType::F32).unsqueeze::<D>();
        match &self.beta {
            Some(beta) => scaled + beta.val().cast(FloatDType::F32).unsqueeze::<D>(),
            None => scaled,
        }
        .cast(dtype)
    }
}

/// Hyper-parameters of [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Width of the normalised dimension.
    pub d_model: usize,
    /// Added to the mean square before the square root.
    #[config(default = 1e-6)]
    pub epsilon: f64,
}

/// Root-mean-square norm without mean subtraction and without bias: `weight · x / sqrt(mean(x²) + eps)`.
///
/// As in T5, the statistics are computed in f32 even when the model runs in half precision: the
/// mean of squares overflows f16 for hidden states above ~256.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale, `[d_model]`, initialised to ones.
    pub weight: Param<Tensor<B, 1>>,
    epsilon: f64,
}

impl RmsNormConfig {
    /// Builds the layer with unit scale.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm {
            weight: Initializer::Ones.init([self.d_model], device),
            epsilon: self.epsilon,
        }
    }
}

impl<B: Backend> RmsNorm<B> {
    /// - x: `[..., d_model]` → same shape and dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        rms_norm(x, self.weight.val(), self.epsilon)
    }

    /// The ε added to the mean square.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }
}

/// RMS norm of `x` `[..., d_model]` with the scale `weight` `[d_model]` given as a tensor (the
/// layer's, or one a ZeRO segment carries from another): statistics in f32, scaled in `x`'s
/// dtype, as T5.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, D> {
    if let Some(y) = bmtrain_backend::kernels::rms_norm(&x, &weight, epsilon) {
        return y;
    }
    let dtype = x.dtype();
    let x32 = x.cast(FloatDType::F32);
    let mean_square = x32.clone().square().mean_dim(D - 1);
    let normed = x32 * (mean_square + epsilon).sqrt().recip();
    weight.cast(dtype).unsqueeze::<D>() * normed.cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;
    use burn::tensor::TensorData;

    #[test]
    fn rms_norm_divides_by_the_root_mean_square() {
        let device = Default::default();
        let norm = RmsNormConfig::new(4).with_epsilon(0.0).init::<Cpu>(&device);
        let x = Tensor::<Cpu, 2>::from_data(TensorData::from([[1.0f32, -2.0, 3.0, -4.0]]), &device);
        let got: Vec<f32> = norm.forward(x).into_data().to_vec().unwrap();
        let rms = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0f32).sqrt();
        for (g, w) in got.iter().zip([1.0, -2.0, 3.0, -4.0]) {
            assert!((g - w / rms).abs() < 1e-6);
        }
    }

    /// Hidden states of ±1000 in f16: their squared deviations (1e6) overflow f16, so a variance
    /// computed in f16 is inf and the output 0; in f32 it is ±1 (times gamma, plus beta).
    #[test]
    fn layer_norm_of_large_f16_values_is_computed_in_f32() {
        let device = Default::default();
        let norm = LayerNormConfig::new(4).init::<Cpu>(&device);
        let x = Tensor::<Cpu, 2>::from_data(
            TensorData::from([[1000.0f32, -1000.0, 1000.0, -1000.0]]),
            &device,
        )
        .cast(FloatDType::F16);
        let y = norm.forward(x);
        assert_eq!(y.dtype(), burn::tensor::DType::F16);
        let got: Vec<f32> = y.cast(FloatDType::F32).into_data().to_vec().unwrap();
        for (g, w) in got.iter().zip([1.0, -1.0, 1.0, -1.0]) {
            assert!((g - w).abs() < 1e-2, "{got:?}");
        }
    }

    #[test]
    fn rms_norm_of_large_f16_values_stays_finite() {
        let device = Default::default();
        let norm = RmsNormConfig::new(2).init::<Cpu>(&device);
        let x = Tensor::<Cpu, 2>::from_data(TensorData::from([[1000.0f32, -1000.0]]), &device)
            .cast(FloatDType::F16);
        let got: Vec<f32> = norm
            .forward(x)
            .cast(FloatDType::F32)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(
            (got[0] - 1.0).abs() < 1e-2 && (got[1] + 1.0).abs() < 1e-2,
            "{got:?}"
        );
    }
}
