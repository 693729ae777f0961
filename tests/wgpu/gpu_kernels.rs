//! zoo's cubecl kernels on wgpu (lavapipe in CI) against burn's composition of the same maths on
//! the same device, and against the host loop: flash attention, layer norm and RMS norm, AdamW.
//! (Here rather than in bmtrain-backend's own tests, so that CI links burn with wgpu once.)

mod adamw;
mod flash;
mod norm;

use bmtrain_backend::{Wgpu, WgpuTrain};
use burn::tensor::{DType, Tensor, TensorData};

/// Held by every test: the allocator tests count every tensor on the shared device.
fn device_lock() -> std::sync::MutexGuard<'static, ()> {
    super::DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Deterministic values in `[-scale, scale)`.
fn random(len: usize, seed: u32, scale: f32) -> Vec<f32> {
    super::random(len, seed, scale)
}

/// The largest absolute difference over the reference's largest magnitude (any dtype, read as
/// f32).
fn relative(got: Tensor<Wgpu, 1>, want: Tensor<Wgpu, 1>) -> f32 {
    let got: Vec<f32> = got.into_data().convert::<f32>().to_vec().unwrap();
    let want: Vec<f32> = want.into_data().convert::<f32>().to_vec().unwrap();
    assert_eq!(got.len(), want.len());
    let error = super::relative(&got, &want);
    assert!(error.is_finite(), "non-finite values");
    error
}

/// A training tensor's values, flattened, as an f32 tensor without autodiff.
fn flat<const D: usize>(t: Tensor<WgpuTrain, D>) -> Tensor<Wgpu, 1> {
    t.inner().cast(DType::F32).flatten(0, D - 1)
}

/// A leaf of the graph in `dtype` that requires its gradient.
fn leaf<const D: usize>(values: Vec<f32>, shape: [usize; D], dtype: DType) -> Tensor<WgpuTrain, D> {
    Tensor::<WgpuTrain, D>::from_data(TensorData::new(values, shape), &Default::default())
        .cast(dtype)
        .detach()
        .require_grad()
}
