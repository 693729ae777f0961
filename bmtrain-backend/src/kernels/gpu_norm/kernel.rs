//! The `#[cube]` kernels of layer norm and RMS norm and their launches on a [`CubeBackend`]'s
//! tensors.
//!
//! Every kernel computes in f32 whatever the tensors' dtype (f32, f16, bf16: the `F` each launch
//! defines from `x`), and the scale and shift are f32. A cube of [`UNITS`] units owns a row at a
//! time: its units stride over the row's columns and add up their partial sums in shared memory.
//! The scale's and shift's gradients are column sums over every row: each cube sums
//! [`CHUNK_ROWS`] rows of a band of columns into a partial, and one more kernel adds the partials
//! in chunk order (no atomics, so a run's gradients do not depend on scheduling).
//!
//! [`CubeBackend`]: burn_cubecl::CubeBackend

use burn::tensor::{DType, Shape};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, kernel::into_contiguous};
use cubecl::prelude::*;

use super::NormGeometry;

/// Units per cube: WebGPU's guaranteed workgroup size, and enough to cover a row of 1024 in
/// four strides.
pub const UNITS: usize = 256;
/// Half of [`UNITS`]: the first stride of the shared-memory reduction.
const HALF_UNITS: i64 = 128;
/// The most cubes a row kernel launches; each loops over rows `CUBE_POS, CUBE_POS + CUBE_COUNT, …`.
/// 1024 cubes of 256 units fill an H100 (132 SMs × 2048 resident units) and stay under every
/// API's per-dimension limit of 65535.
pub const MAX_ROW_CUBES: usize = 1024;
/// Rows each cube of the scale-gradient kernel sums into one partial.
pub(super) const CHUNK_ROWS: usize = 64;

/// The sum of every unit's `value`, returned to every unit (`shared` holds [`UNITS`] floats and
/// is free again on return).
#[cube]
fn cube_sum(value: f32, shared: &mut SharedMemory<f32>) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = u32::new(HALF_UNITS);
    while stride > 0 {
        if UNIT_POS_X < stride {
            shared[unit] = shared[unit] + shared[unit + stride as usize];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    // No unit may overwrite `shared` for the next sum before every unit has read this one.
    sync_cube();
    total
}

/// Forward: `y = (x − mean)·rstd·γ (+ β)` per row (RMS norm: `mean = 0`,
/// `rstd = 1/√(mean(x²) + eps)`), and each row's `(mean, rstd)` into `stats` (`[rows·2]`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    y: &mut Tensor<F>,
    stats: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    inv_width: f32,
    epsilon: f32,
    #[comptime] rms: bool,
    #[comptime] shift: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, width) = (rows as usize, width as usize);
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(UNITS);
    let mut row = CUBE_POS;
    while row < rows {
        let base = row * width;
        let mut mean = 0.0f32;
        if comptime!(!rms) {
            let mut sum = 0.0f32;
            let mut i = unit;
            while i < width {
                sum += f32::cast_from(x[base + i]);
                i += UNITS;
            }
            mean = cube_sum(sum, &mut shared) * inv_width;
        }
        // Two passes (deviations from the mean, not E[x²] − mean²): no cancellation for rows
        // far from zero.
        let mut squares = 0.0f32;
        let mut i = unit;
        while i < width {
            let centred = f32::cast_from(x[base + i]) - mean;
            squares += centred * centred;
            i += UNITS;
        }
        let variance = cube_sum(squares, &mut shared) * inv_width;
        let rstd = 1.0f32 / (variance + epsilon).sqrt();
        let mut i = unit;
        while i < width {
            let mut value = (f32::cast_from(x[base + i]) - mean) * rstd * gamma[i];
            if shift {
                value += beta[i];
            }
            y[base + i] = F::cast_from(value);
            i += UNITS;
        }
        if unit == 0 {
            stats[row * 2] = mean;
            stats[row * 2 + 1] = rstd;
        }
        row += CUBE_COUNT;
    }
}

/// Backward for the input: `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))` with `g = dy·γ` (RMS norm:
/// without the `mean(g)` term), one row per cube at a time.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_input_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<f32>,
    stats: &Tensor<f32>,
    d_y: &Tensor<F>,
    d_x: &mut Tensor<F>,
    rows: u32,
    width: u32,
    inv_width: f32,
    #[comptime] rms: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, width) = (rows as usize, width as usize);
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(UNITS);
    let mut row = CUBE_POS;
    while row < rows {
        let base = row * width;
        let (mean, rstd) = (stats[row * 2], stats[row * 2 + 1]);
        let mut sum_g = 0.0f32;
        let mut sum_gx = 0.0f32;
        let mut i = unit;
        while i < width {
            let x_hat = (f32::cast_from(x[base + i]) - mean) * rstd;
            let g = f32::cast_from(d_y[base + i]) * gamma[i];
            sum_g += g;
            sum_gx += g * x_hat;
            i += UNITS;
        }
        let mut mean_g = 0.0f32;
        if comptime!(!rms) {
            mean_g = cube_sum(sum_g, &mut shared) * inv_width;
        }
        let mean_gx = cube_sum(sum_gx, &mut shared) * inv_width;
        let mut i = unit;
        while i < width {
            let x_hat = (f32::cast_from(x[base + i]) - mean) * rstd;
            let g = f32::cast_from(d_y[base + i]) * gamma[i];
            d_x[base + i] = F::cast_from(rstd * (g - mean_g - x_hat * mean_gx));
            i += UNITS;
        }
        row += CUBE_COUNT;
    }
}

/// The scale's (and shift's) gradient over one chunk of [`CHUNK_ROWS`] rows: `Σ dy·x̂` (and
/// `Σ dy`) per column into `partials[chunk, 0 | 1, column]`. Cubes: (column band, chunk).
#[cube(launch)]
fn backward_scale_kernel<F: Float>(
    x: &Tensor<F>,
    stats: &Tensor<f32>,
    d_y: &Tensor<F>,
    partials: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    #[comptime] shift: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, width) = (rows as usize, width as usize);
    let column = CUBE_POS_X as usize * UNITS + UNIT_POS_X as usize;
    let chunk = CUBE_POS_Y as usize;
    if column < width {
        let first = chunk * CHUNK_ROWS;
        let mut last = first + CHUNK_ROWS;
        if last > rows {
            last = rows;
        }
        let mut d_gamma = 0.0f32;
        let mut d_beta = 0.0f32;
        for row in first..last {
            let x_hat =
                (f32::cast_from(x[row * width + column]) - stats[row * 2]) * stats[row * 2 + 1];
            let d_y = f32::cast_from(d_y[row * width + column]);
            d_gamma += d_y * x_hat;
            d_beta += d_y;
        }
        partials[chunk * 2 * width + column] = d_gamma;
        if shift {
            partials[(chunk * 2 + 1) * width + column] = d_beta;
        }
    }
}

/// Adds the partials of every chunk, in chunk order: `d_gamma[c] = Σ partials[k, 0, c]` (and
/// `d_beta` from `partials[k, 1, c]`). One unit per column.
#[cube(launch)]
fn sum_chunks_kernel(
    partials: &Tensor<f32>,
    d_gamma: &mut Tensor<f32>,
    d_beta: &mut Tensor<f32>,
    chunks: u32,
    width: u32,
    #[comptime] shift: bool,
) {
    let column = ABSOLUTE_POS;
    let width = width as usize;
    if column < width {
        let mut scale = 0.0f32;
        let mut offset = 0.0f32;
        for chunk in 0..chunks as usize {
            scale += partials[chunk * 2 * width + column];
            if shift {
                offset += partials[(chunk * 2 + 1) * width + column];
            }
        }
        d_gamma[column] = scale;
        if shift {
            d_beta[column] = offset;
        }
    }
}

/// What every launch needs: the client, the device and the input's dtype.
struct Launch<R: CubeRuntime> {
    client: ComputeClient<R>,
    device: R::Device,
    dtype: DType,
}

impl<R: CubeRuntime> Launch<R> {
    fn new(x: &CubeTensor<R>) -> Self {
        Self {
            client: x.client.clone(),
            device: x.device.clone(),
            dtype: x.dtype,
        }
    }

    fn empty(&self, shape: Shape, dtype: DType) -> CubeTensor<R> {
        empty_device_dtype(self.client.clone(), self.device.clone(), shape, dtype)
    }

    /// A one-element f32 stand-in for an absent tensor argument (its kernel branch is compiled
    /// out).
    fn placeholder(&self) -> CubeTensor<R> {
        self.empty(Shape::new([1]), DType::F32)
    }
}

/// Cubes for the row kernels: one per row, at most [`MAX_ROW_CUBES`].
fn row_cubes(rows: usize) -> CubeCount {
    CubeCount::Static(rows.clamp(1, MAX_ROW_CUBES) as u32, 1, 1)
}

/// The forward: `y` (x's shape and dtype) and the rows' `(mean, rstd)`, `[rows·2]` f32.
pub(super) fn forward<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    beta: Option<CubeTensor<R>>,
    g: &NormGeometry,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
    let launch = Launch::new(&x);
    let shift = beta.is_some();
    let beta = beta.map_or_else(|| launch.placeholder(), into_contiguous);
    let y = launch.empty(x.meta.shape().clone(), launch.dtype);
    let stats = launch.empty(Shape::new([g.rows * 2]), DType::F32);
    forward_kernel::launch::<R>(
        &launch.client,
        row_cubes(g.rows),
        CubeDim::new_1d(UNITS as u32),
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        g.rows as u32,
        g.width as u32,
        1.0 / g.width as f32,
        g.epsilon,
        g.rms,
        shift,
        launch.dtype.into(),
    );
    (y, stats)
}

/// The gradients of [`forward`]: `dx` (x's dtype), `dγ` and, when `shift`, `dβ` (f32, `[width]`).
pub(super) fn backward<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    stats: CubeTensor<R>,
    d_y: CubeTensor<R>,
    g: &NormGeometry,
    shift: bool,
) -> (CubeTensor<R>, CubeTensor<R>, Option<CubeTensor<R>>) {
    let (x, gamma, d_y) = (
        into_contiguous(x),
        into_contiguous(gamma),
        into_contiguous(d_y),
    );
    let launch = Launch::new(&x);
    let d_x = launch.empty(x.meta.shape().clone(), launch.dtype);
    backward_input_kernel::launch::<R>(
        &launch.client,
        row_cubes(g.rows),
        CubeDim::new_1d(UNITS as u32),
        x.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        d_y.clone().into_tensor_arg(),
        d_x.clone().into_tensor_arg(),
        g.rows as u32,
        g.width as u32,
        1.0 / g.width as f32,
        g.rms,
        launch.dtype.into(),
    );

    let chunks = g.rows.div_ceil(CHUNK_ROWS);
    let partials = launch.empty(Shape::new([chunks * 2 * g.width]), DType::F32);
    backward_scale_kernel::launch::<R>(
        &launch.client,
        CubeCount::Static(g.width.div_ceil(UNITS) as u32, chunks as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        x.into_tensor_arg(),
        stats.into_tensor_arg(),
        d_y.into_tensor_arg(),
        partials.clone().into_tensor_arg(),
        g.rows as u32,
        g.width as u32,
        shift,
        launch.dtype.into(),
    );
    let d_gamma = launch.empty(Shape::new([g.width]), DType::F32);
    let d_beta = if shift {
        launch.empty(Shape::new([g.width]), DType::F32)
    } else {
        launch.placeholder()
    };
    sum_chunks_kernel::launch::<R>(
        &launch.client,
        CubeCount::Static(g.width.div_ceil(UNITS) as u32, 1, 1),
        CubeDim::new_1d(UNITS as u32),
        partials.into_tensor_arg(),
        d_gamma.clone().into_tensor_arg(),
        d_beta.clone().into_tensor_arg(),
        chunks as u32,
        g.width as u32,
        shift,
    );
    (d_x, d_gamma, shift.then_some(d_beta))
}
