//! The normalisation kernels on wgpu (Mesa's lavapipe in CI) against burn's composition of the
//! same normalisation in f32 on the same device: values and the gradients of x, γ and β.

use burn::tensor::{Tensor, TensorData};

use bmtrain_backend::kernels::gpu_norm::{MAX_ROW_CUBES, NormGeometry, UNITS, norm, norm_train};
use bmtrain_backend::{Wgpu, WgpuTrain};
use burn::tensor::DType;
use burn::tensor::backend::Backend as _;

use super::{device_lock, flat, leaf, random, relative};

/// burn's composition, as the models ran it before these kernels: in f32 whatever `x`'s dtype,
/// the output cast back.
fn composed(
    x: Tensor<WgpuTrain, 3>,
    gamma: Tensor<WgpuTrain, 1>,
    beta: Option<Tensor<WgpuTrain, 1>>,
    g: &NormGeometry,
) -> Tensor<WgpuTrain, 3> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let normed = if g.rms {
        let mean_square = x.clone().square().mean_dim(2);
        x * (mean_square + f64::from(g.epsilon)).sqrt().recip()
    } else {
        let (var, mean) = x.clone().var_mean_bias(2);
        (x - mean) / (var + f64::from(g.epsilon)).sqrt()
    };
    let mut y = normed * gamma.cast(DType::F32).unsqueeze::<3>();
    if let Some(beta) = beta {
        y = y + beta.cast(DType::F32).unsqueeze::<3>();
    }
    y.cast(dtype)
}

/// Runs the kernel and the composition on the same inputs (`[batch, len, width]`, values around
/// `offset`) and returns the relative errors of the output and of the gradients of x, γ and β.
fn compare(
    shape: [usize; 3],
    rms: bool,
    shift: bool,
    dtype: DType,
    offset: f32,
) -> Vec<(&'static str, f32)> {
    let _device = device_lock();
    let [batch, len, width] = shape;
    let rows = batch * len;
    let x_values: Vec<f32> = random(rows * width, 1, 2.0)
        .into_iter()
        .map(|v| v + offset)
        .collect();
    let gamma_values: Vec<f32> = random(width, 2, 0.5).iter().map(|v| 1.0 + v).collect();
    let beta_values = random(width, 3, 0.5);
    let weights = random(rows * width, 4, 1.0);
    let geometry = NormGeometry {
        rows,
        width,
        epsilon: if rms { 1e-6 } else { 1e-5 },
        rms,
    };
    let run = |kernel: bool| {
        let x = leaf(x_values.clone(), shape, dtype);
        // The scale and shift in the model's dtype, as the ZeRO trainer gathers them.
        let gamma = leaf(gamma_values.clone(), [width], dtype);
        let beta = shift.then(|| leaf(beta_values.clone(), [width], dtype));
        let y = if kernel {
            norm_train::<Wgpu, 3>(x.clone(), gamma.clone(), beta.clone(), &geometry)
        } else {
            composed(x.clone(), gamma.clone(), beta.clone(), &geometry)
        };
        assert_eq!(y.dtype(), dtype);
        let weights = leaf(weights.clone(), shape, DType::F32).detach();
        let grads = (y.clone().cast(DType::F32) * weights).sum().backward();
        let grad = |t: &Tensor<WgpuTrain, 1>| t.grad(&grads).expect("a gradient");
        let mut out = vec![
            flat(y),
            x.grad(&grads).expect("dx").cast(DType::F32).flatten(0, 2),
            grad(&gamma).cast(DType::F32),
        ];
        if let Some(beta) = &beta {
            out.push(grad(beta).cast(DType::F32));
        }
        out
    };
    let (kernel, reference) = (run(true), run(false));
    ["y", "dx", "dgamma", "dbeta"]
        .into_iter()
        .zip(kernel.into_iter().zip(reference))
        .map(|(name, (got, want))| (name, relative(got, want)))
        .collect()
}

fn check(errors: &[(&str, f32)], bound: f32) {
    println!("{errors:?}");
    for (name, error) in errors {
        assert!(
            *error <= bound,
            "{name}: {error:e} > {bound:e} ({errors:?})"
        );
    }
}

/// Shapes that take every path: a row narrower than a cube's units, rows of several strides with
/// a ragged last one, and more rows than the kernels launch cubes for (each cube then loops).
const SHAPES: [[usize; 3]; 3] = [[2, 7, 40], [3, 5, 2 * UNITS + 37], [3, 400, 24]];

#[test]
fn layer_norm_matches_burns_composition_in_f32() {
    assert!(SHAPES[2][0] * SHAPES[2][1] > MAX_ROW_CUBES);
    for shape in SHAPES {
        check(&compare(shape, false, true, DType::F32, 0.0), 1e-5);
        check(&compare(shape, false, false, DType::F32, 0.0), 1e-5);
    }
    // Rows far from zero: the variance is of the deviations (E[x²] − mean² would lose about
    // 4e-5 of it to cancellation here).
    check(&compare([2, 7, 300], false, true, DType::F32, 30.0), 1e-5);
}

#[test]
fn rms_norm_matches_burns_composition_in_f32() {
    for shape in SHAPES {
        check(&compare(shape, true, false, DType::F32, 0.0), 1e-5);
    }
}

/// In f16 both sides compute in f32 from the same f16 inputs; they differ by the output's and
/// the gradients' rounding (f16 keeps 11 significant bits). (wgpu has no bf16; the kernels'
/// bf16 instantiation runs on CUDA only.)
#[test]
fn norms_in_f16_stay_within_its_rounding() {
    let shape = [3, 5, 2 * UNITS + 37];
    check(&compare(shape, false, true, DType::F16, 0.0), 2e-3);
    check(&compare(shape, true, false, DType::F16, 0.0), 2e-3);
}

/// Hidden states of ±1000 in f16: the composition in f16 would overflow its squares (1e6 >
/// 65504); the kernel's statistics are f32, so the output is ±1 (times γ, plus β).
#[test]
fn layer_norm_of_large_f16_values_is_finite() {
    let _device = device_lock();
    let x = Tensor::<Wgpu, 2>::from_data(
        TensorData::from([[1000.0f32, -1000.0, 1000.0, -1000.0]]),
        &Default::default(),
    )
    .cast(DType::F16);
    let ones = Tensor::<Wgpu, 1>::ones([4], &Default::default());
    let geometry = NormGeometry {
        rows: 1,
        width: 4,
        epsilon: 1e-5,
        rms: false,
    };
    let y = norm(x, ones.clone(), Some(ones.zeros_like()), &geometry);
    let y: Vec<f32> = y.into_data().convert::<f32>().to_vec().unwrap();
    assert_eq!(y, [1.0, -1.0, 1.0, -1.0]);
}

/// What a training forward leaves on the device for backward (the allocator's bytes in use,
/// inputs excluded): the kernel keeps its output and two f32 per row; the f32 composition keeps
/// at least one more `[rows, width]` tensor (the centred input, the normalised rows).
#[test]
fn layer_norm_keeps_two_floats_per_row_for_backward() {
    let _device = device_lock();
    let (rows, width) = (512, 256);
    let device: burn::backend::wgpu::WgpuDevice = Default::default();
    let geometry = NormGeometry {
        rows,
        width,
        epsilon: 1e-5,
        rms: false,
    };
    let in_use = || {
        Wgpu::sync(&device).expect("the device runs");
        bmtrain_backend::device_memory::usage(&device)
            .expect("wgpu's allocator")
            .in_use as i64
    };
    let held = |kernel: bool| {
        let x = leaf(random(rows * width, 1, 1.0), [1, rows, width], DType::F32);
        let gamma = leaf(random(width, 2, 1.0), [width], DType::F32);
        let beta = leaf(random(width, 3, 1.0), [width], DType::F32);
        let before = in_use();
        let y = if kernel {
            norm_train::<Wgpu, 3>(x.clone(), gamma.clone(), Some(beta.clone()), &geometry)
        } else {
            composed(x.clone(), gamma.clone(), Some(beta.clone()), &geometry)
        };
        let held = in_use() - before;
        let grads = y.sum().backward();
        drop((grads, x, gamma, beta));
        held
    };
    let (kernel, composition) = (held(true), held(false));
    let y_bytes = (rows * width * 4) as i64;
    let stats_bytes = (rows * 2 * 4) as i64;
    println!(
        "held for backward: kernel {kernel} bytes (output {y_bytes} + stats {stats_bytes}), \
         composition {composition} bytes"
    );
    assert!(
        kernel <= y_bytes + stats_bytes + 64 * 1024,
        "kernel held {kernel}"
    );
    assert!(
        composition - kernel >= y_bytes,
        "composition {composition}, kernel {kernel}"
    );
}
