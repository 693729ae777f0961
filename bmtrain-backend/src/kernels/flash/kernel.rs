//! The `#[cube]` kernels of flash attention and their launches on a [`CubeBackend`]'s tensors.
//!
//! Every kernel computes in f32 whatever the tensors' dtype (f32, f16, bf16: the `F` each launch
//! defines from the tensors), so half-precision training keeps f32 softmax statistics. One unit
//! (thread) owns one row: a query row in the forward and in `dQ`, a key row in `dK`/`dV`. The cube's
//! units load the other side's rows a tile of [`FlashGeometry::block`] rows at a time into shared
//! memory, so each key and value is read from global memory once per tile of queries (and each
//! query once per tile of keys), never the `[q_len, k_len]` scores.
//!
//! The dropout mask is a hash of `(seed, (batch·heads + head)·q_len + query, key)`, so the
//! backward kernels (and a checkpointed block's recomputation) regenerate exactly the forward's.

use burn::tensor::{DType, Shape};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, kernel::into_contiguous};
use cubecl::prelude::*;

use super::FlashGeometry;

/// The lowest f32: the running maximum's start and the score of a key no query may see. A mask's
/// most negative value plus a score rounds to it, so a row with every key masked gets the uniform
/// distribution that transformers gives it (never `exp(-inf - -inf)`).
const LOWEST: f32 = -3.402_823_5e38;

/// lowbias32, a 32-bit integer hash (no 64-bit integers: WGSL has none).
#[cube]
fn hash32(x: u32) -> u32 {
    let mut z = x;
    z = (z ^ (z >> 16)) * 0x7feb_352du32;
    z = (z ^ (z >> 15)) * 0x846c_a68bu32;
    z ^ (z >> 16)
}

/// Whether dropout keeps probability `(row, key)`: true with probability `1 − p`, where
/// `threshold = p · 2³²`.
#[cube]
fn kept(seed_lo: u32, seed_hi: u32, row: u32, key: u32, threshold: u32) -> bool {
    let row_hash = hash32(row ^ seed_lo);
    hash32(row_hash ^ (key * 0x9e37_79b9u32 + seed_hi)) >= threshold
}

/// Whether query `i` may see key `j` (`j` inside the keys, and not in its future when causal;
/// queries are the last `q_len` positions of the keys', as with a KV cache).
#[cube]
fn visible(i: usize, j: usize, q_len: usize, k_len: usize, #[comptime] causal: bool) -> bool {
    let mut seen = j < k_len;
    if causal {
        seen = seen && j + q_len <= i + k_len;
    }
    seen
}

/// The end of the keys the cube's queries (`first_query..first_query + block`) may see: all
/// `k_len`, or with a causal mask up to the last query's own position, so the key tiles past it
/// are never loaded (half the work of a causal square).
#[cube]
fn keys_seen(
    first_query: usize,
    q_len: usize,
    k_len: usize,
    #[comptime] block: usize,
    #[comptime] causal: bool,
) -> usize {
    let mut end = k_len;
    if causal {
        let mut last_query = first_query + block;
        if last_query > q_len {
            last_query = q_len;
        }
        // Query i sees keys j ≤ i + k_len − q_len (k_len ≥ q_len: `FlashGeometry::supported`).
        let limit = last_query + k_len - q_len;
        if limit < end {
            end = limit;
        }
    }
    end
}

/// The first query tile that can see any of the cube's keys (`first_key..`): 0, or with a causal
/// mask the tile of the first query at or after the first key's position.
#[cube]
fn first_query_tile(
    first_key: usize,
    q_len: usize,
    k_len: usize,
    #[comptime] block: usize,
    #[comptime] causal: bool,
) -> usize {
    let mut tile = 0usize;
    if causal {
        // Query i sees key j when i ≥ j + q_len − k_len.
        if first_key + q_len > k_len {
            tile = (first_key + q_len - k_len) / block;
        }
    }
    tile
}

/// Dropout's run-time settings, as the kernels take them.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct DropoutArgs {
    seed_lo: u32,
    seed_hi: u32,
    threshold: u32,
    keep_scale: f32,
}

/// The additive bias's strides (0 on a broadcast dimension).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct BiasStrides {
    batch: u32,
    head: u32,
    query: u32,
    key: u32,
}

/// `bias[b, h, i, j]`, or 0 without a bias.
#[cube]
fn bias_at(
    bias: &Tensor<f32>,
    strides: &BiasStrides,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
    #[comptime] has_bias: bool,
) -> f32 {
    let mut value = 0.0f32;
    if has_bias {
        value = bias[b * strides.batch as usize
            + h * strides.head as usize
            + i * strides.query as usize
            + j * strides.key as usize];
    }
    value
}

/// Copies rows `first..first + block` of one head (`width` columns starting at `column`) of a
/// `[batch, len, ·]` tensor into shared memory as f32 (zeros past `len`), all units together.
#[cube]
fn load_tile<F: Float>(
    source: &Tensor<F>,
    tile: &mut SharedMemory<f32>,
    b: usize,
    first: usize,
    len: usize,
    column: usize,
    #[comptime] width: usize,
    #[comptime] block: usize,
) {
    let mut index = UNIT_POS_X as usize;
    while index < block * width {
        let row = first + index / width;
        let mut value = 0.0f32;
        if row < len {
            value = f32::cast_from(
                source[b * source.stride(0) + row * source.stride(1) + column + index % width],
            );
        }
        tile[index] = value;
        index += block;
    }
}

/// Copies `block` per-row f32 statistics (zeros past `len`) into shared memory.
#[cube]
fn load_stats(
    source: &Tensor<f32>,
    tile: &mut SharedMemory<f32>,
    first_index: usize,
    first: usize,
    len: usize,
) {
    let row = first + UNIT_POS_X as usize;
    let mut value = 0.0f32;
    if row < len {
        value = source[first_index + UNIT_POS_X as usize];
    }
    tile[UNIT_POS_X as usize] = value;
}

/// Forward: `out = softmax(scale·q·kᵀ + bias) ⊙ mask · v` by online softmax, and each query row's
/// log-sum-exp (`lse`, `[batch·heads·q_len]`) for backward. Cubes: (query tile, batch·heads).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<f32>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    q_len: u32,
    k_len: u32,
    heads: u32,
    group: u32,
    scale: f32,
    strides: BiasStrides,
    dropout: DropoutArgs,
    #[comptime] head_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] causal: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_dropout: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (q_len, k_len) = (q_len as usize, k_len as usize);
    let bh = CUBE_POS_Y as usize;
    let (b, h) = (bh / heads as usize, bh % heads as usize);
    let kv_head = h / group as usize;
    let i = CUBE_POS_X as usize * block + UNIT_POS_X as usize;
    let valid = i < q_len;

    let mut q_row = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(value_dim);
    let mut scores = Array::<f32>::new(block);
    for d in 0..head_dim {
        let mut value = 0.0f32;
        if valid {
            value = f32::cast_from(q[b * q.stride(0) + i * q.stride(1) + h * head_dim + d]) * scale;
        }
        q_row[d] = value;
    }
    for e in 0..value_dim {
        acc[e] = 0.0f32;
    }
    let mut running_max = f32::new(LOWEST);
    let mut sum = 0.0f32;
    let mut k_tile = SharedMemory::<f32>::new(block * head_dim);
    let mut v_tile = SharedMemory::<f32>::new(block * value_dim);

    let first_query = CUBE_POS_X as usize * block;
    let tiles = keys_seen(first_query, q_len, k_len, block, causal).div_ceil(block);
    for t in 0..tiles {
        let first = t * block;
        load_tile::<F>(
            k,
            &mut k_tile,
            b,
            first,
            k_len,
            kv_head * head_dim,
            head_dim,
            block,
        );
        load_tile::<F>(
            v,
            &mut v_tile,
            b,
            first,
            k_len,
            kv_head * value_dim,
            value_dim,
            block,
        );
        sync_cube();
        if valid {
            let mut tile_max = running_max;
            for kk in 0..block {
                let j = first + kk;
                let mut score = f32::new(LOWEST);
                if visible(i, j, q_len, k_len, causal) {
                    let mut dot = 0.0f32;
                    for d in 0..head_dim {
                        dot += q_row[d] * k_tile[kk * head_dim + d];
                    }
                    score = dot + bias_at(bias, &strides, b, h, i, j, has_bias);
                    if score > tile_max {
                        tile_max = score;
                    }
                }
                scores[kk] = score;
            }
            let correction = (running_max - tile_max).exp();
            sum *= correction;
            for e in 0..value_dim {
                acc[e] *= correction;
            }
            running_max = tile_max;
            for kk in 0..block {
                let j = first + kk;
                if visible(i, j, q_len, k_len, causal) {
                    let p = (scores[kk] - running_max).exp();
                    sum += p;
                    let mut weight = p;
                    if has_dropout {
                        let row = (bh * q_len + i) as u32;
                        weight = 0.0f32;
                        if kept(
                            dropout.seed_lo,
                            dropout.seed_hi,
                            row,
                            j as u32,
                            dropout.threshold,
                        ) {
                            weight = p * dropout.keep_scale;
                        }
                    }
                    for e in 0..value_dim {
                        acc[e] += weight * v_tile[kk * value_dim + e];
                    }
                }
            }
        }
        sync_cube();
    }
    if valid {
        let mut inverse = 0.0f32;
        if sum > 0.0f32 {
            inverse = 1.0f32 / sum;
        }
        let base = b * out.stride(0) + i * out.stride(1) + h * value_dim;
        for e in 0..value_dim {
            out[base + e] = F::cast_from(acc[e] * inverse);
        }
        lse[bh * q_len + i] = running_max + sum.ln();
    }
}

/// `delta[row] = Σ_e dO[row, e]·O[row, e]` per (batch, head, query): the softmax backward's row
/// term (it equals `Σ_j dP_ij·P_ij` with or without dropout). One unit per row.
#[cube(launch)]
fn delta_kernel<F: Float>(
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    delta: &mut Tensor<f32>,
    q_len: u32,
    heads: u32,
    rows: u32,
    #[comptime] value_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = ABSOLUTE_POS;
    if row < rows as usize {
        let q_len = q_len as usize;
        let bh = row / q_len;
        let i = row % q_len;
        let (b, h) = (bh / heads as usize, bh % heads as usize);
        let base = b * out.stride(0) + i * out.stride(1) + h * value_dim;
        let d_base = b * d_out.stride(0) + i * d_out.stride(1) + h * value_dim;
        let mut dot = 0.0f32;
        for e in 0..value_dim {
            dot += f32::cast_from(out[base + e]) * f32::cast_from(d_out[d_base + e]);
        }
        delta[row] = dot;
    }
}

/// Backward for the queries: `dQ = scale · dS · K` with `dS = P ⊙ (dP − delta)`, recomputing `P`
/// from the saved log-sum-exp; with `has_bias_grad`, also `dS` itself into `d_bias`
/// (`[batch, heads, q_len, k_len]`, f32), the gradient of an additive bias before broadcasting.
/// Cubes: (query tile, batch·heads), as the forward.
#[cube(launch)]
// `has_bias_grad` is a comptime flag: its branch is compiled out, not tested with the runtime one.
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
fn backward_query_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<f32>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    d_q: &mut Tensor<F>,
    d_bias: &mut Tensor<f32>,
    q_len: u32,
    k_len: u32,
    heads: u32,
    group: u32,
    scale: f32,
    strides: BiasStrides,
    dropout: DropoutArgs,
    #[comptime] head_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] causal: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_dropout: bool,
    #[comptime] has_bias_grad: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (q_len, k_len) = (q_len as usize, k_len as usize);
    let bh = CUBE_POS_Y as usize;
    let (b, h) = (bh / heads as usize, bh % heads as usize);
    let kv_head = h / group as usize;
    let i = CUBE_POS_X as usize * block + UNIT_POS_X as usize;
    let valid = i < q_len;

    let mut q_row = Array::<f32>::new(head_dim);
    let mut d_out_row = Array::<f32>::new(value_dim);
    let mut d_q_row = Array::<f32>::new(head_dim);
    let mut row_lse = 0.0f32;
    let mut row_delta = 0.0f32;
    for d in 0..head_dim {
        let mut value = 0.0f32;
        if valid {
            value = f32::cast_from(q[b * q.stride(0) + i * q.stride(1) + h * head_dim + d]) * scale;
        }
        q_row[d] = value;
        d_q_row[d] = 0.0f32;
    }
    for e in 0..value_dim {
        let mut value = 0.0f32;
        if valid {
            value = f32::cast_from(
                d_out[b * d_out.stride(0) + i * d_out.stride(1) + h * value_dim + e],
            );
        }
        d_out_row[e] = value;
    }
    if valid {
        row_lse = lse[bh * q_len + i];
        row_delta = delta[bh * q_len + i];
    }
    let mut k_tile = SharedMemory::<f32>::new(block * head_dim);
    let mut v_tile = SharedMemory::<f32>::new(block * value_dim);

    let first_query = CUBE_POS_X as usize * block;
    let tiles = keys_seen(first_query, q_len, k_len, block, causal).div_ceil(block);
    for t in 0..tiles {
        let first = t * block;
        load_tile::<F>(
            k,
            &mut k_tile,
            b,
            first,
            k_len,
            kv_head * head_dim,
            head_dim,
            block,
        );
        load_tile::<F>(
            v,
            &mut v_tile,
            b,
            first,
            k_len,
            kv_head * value_dim,
            value_dim,
            block,
        );
        sync_cube();
        if valid {
            for kk in 0..block {
                let j = first + kk;
                let mut d_score = 0.0f32;
                if visible(i, j, q_len, k_len, causal) {
                    let mut dot = 0.0f32;
                    for d in 0..head_dim {
                        dot += q_row[d] * k_tile[kk * head_dim + d];
                    }
                    let score = dot + bias_at(bias, &strides, b, h, i, j, has_bias);
                    let p = (score - row_lse).exp();
                    let mut d_p = 0.0f32;
                    for e in 0..value_dim {
                        d_p += d_out_row[e] * v_tile[kk * value_dim + e];
                    }
                    if has_dropout {
                        let row = (bh * q_len + i) as u32;
                        let mut factor = 0.0f32;
                        if kept(
                            dropout.seed_lo,
                            dropout.seed_hi,
                            row,
                            j as u32,
                            dropout.threshold,
                        ) {
                            factor = dropout.keep_scale;
                        }
                        d_p *= factor;
                    }
                    d_score = p * (d_p - row_delta);
                    for d in 0..head_dim {
                        d_q_row[d] += d_score * k_tile[kk * head_dim + d];
                    }
                }
                if has_bias_grad {
                    if j < k_len {
                        d_bias[(bh * q_len + i) * k_len + j] = d_score;
                    }
                }
            }
        }
        sync_cube();
    }
    if valid {
        let base = b * d_q.stride(0) + i * d_q.stride(1) + h * head_dim;
        for d in 0..head_dim {
            d_q[base + d] = F::cast_from(d_q_row[d] * scale);
        }
    }
}

/// Backward for the keys and values: `dV = P̃ᵀ · dO` and `dK = scale · dSᵀ · Q`, summed over the
/// query heads that share the kv head (grouped-query attention) without atomics.
/// Cubes: (key tile, batch·kv_heads).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_key_value_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<f32>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    d_k: &mut Tensor<F>,
    d_v: &mut Tensor<F>,
    q_len: u32,
    k_len: u32,
    heads: u32,
    group: u32,
    scale: f32,
    strides: BiasStrides,
    dropout: DropoutArgs,
    #[comptime] head_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] causal: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_dropout: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (q_len, k_len) = (q_len as usize, k_len as usize);
    let group = group as usize;
    let kv_heads = heads as usize / group;
    let bkv = CUBE_POS_Y as usize;
    let (b, kv_head) = (bkv / kv_heads, bkv % kv_heads);
    let j = CUBE_POS_X as usize * block + UNIT_POS_X as usize;
    let valid = j < k_len;

    let mut k_row = Array::<f32>::new(head_dim);
    let mut v_row = Array::<f32>::new(value_dim);
    let mut d_k_row = Array::<f32>::new(head_dim);
    let mut d_v_row = Array::<f32>::new(value_dim);
    for d in 0..head_dim {
        let mut value = 0.0f32;
        if valid {
            value = f32::cast_from(k[b * k.stride(0) + j * k.stride(1) + kv_head * head_dim + d]);
        }
        k_row[d] = value;
        d_k_row[d] = 0.0f32;
    }
    for e in 0..value_dim {
        let mut value = 0.0f32;
        if valid {
            value = f32::cast_from(v[b * v.stride(0) + j * v.stride(1) + kv_head * value_dim + e]);
        }
        v_row[e] = value;
        d_v_row[e] = 0.0f32;
    }
    let mut q_tile = SharedMemory::<f32>::new(block * head_dim);
    let mut d_out_tile = SharedMemory::<f32>::new(block * value_dim);
    let mut lse_tile = SharedMemory::<f32>::new(block);
    let mut delta_tile = SharedMemory::<f32>::new(block);

    let tiles = q_len.div_ceil(block);
    let first_tile = first_query_tile(CUBE_POS_X as usize * block, q_len, k_len, block, causal);
    for g in 0..group {
        let h = kv_head * group + g;
        let bh = b * heads as usize + h;
        for t in first_tile..tiles {
            let first = t * block;
            load_tile::<F>(
                q,
                &mut q_tile,
                b,
                first,
                q_len,
                h * head_dim,
                head_dim,
                block,
            );
            load_tile::<F>(
                d_out,
                &mut d_out_tile,
                b,
                first,
                q_len,
                h * value_dim,
                value_dim,
                block,
            );
            load_stats(lse, &mut lse_tile, bh * q_len + first, first, q_len);
            load_stats(delta, &mut delta_tile, bh * q_len + first, first, q_len);
            sync_cube();
            if valid {
                for ii in 0..block {
                    let i = first + ii;
                    if i < q_len && visible(i, j, q_len, k_len, causal) {
                        let mut dot = 0.0f32;
                        for d in 0..head_dim {
                            dot += q_tile[ii * head_dim + d] * k_row[d];
                        }
                        let score = dot * scale + bias_at(bias, &strides, b, h, i, j, has_bias);
                        let p = (score - lse_tile[ii]).exp();
                        let mut factor = 1.0f32;
                        if has_dropout {
                            factor = 0.0f32;
                            if kept(
                                dropout.seed_lo,
                                dropout.seed_hi,
                                (bh * q_len + i) as u32,
                                j as u32,
                                dropout.threshold,
                            ) {
                                factor = dropout.keep_scale;
                            }
                        }
                        let weight = p * factor;
                        let mut d_p = 0.0f32;
                        for e in 0..value_dim {
                            let d_o = d_out_tile[ii * value_dim + e];
                            d_v_row[e] += weight * d_o;
                            d_p += d_o * v_row[e];
                        }
                        let d_score = p * (d_p * factor - delta_tile[ii]);
                        for d in 0..head_dim {
                            d_k_row[d] += d_score * q_tile[ii * head_dim + d];
                        }
                    }
                }
            }
            sync_cube();
        }
    }
    if valid {
        let base = b * d_k.stride(0) + j * d_k.stride(1) + kv_head * head_dim;
        for d in 0..head_dim {
            d_k[base + d] = F::cast_from(d_k_row[d] * scale);
        }
        let base = b * d_v.stride(0) + j * d_v.stride(1) + kv_head * value_dim;
        for e in 0..value_dim {
            d_v[base + e] = F::cast_from(d_v_row[e]);
        }
    }
}

/// The settings every launch shares, from a geometry and the tensors.
struct Launch<R: CubeRuntime> {
    client: ComputeClient<R>,
    device: R::Device,
    dtype: DType,
    bias: CubeTensor<R>,
    has_bias: bool,
    strides: (u32, u32, u32, u32),
    dropout: (u32, u32, u32, f32),
}

impl<R: CubeRuntime> Launch<R> {
    fn new(q: &CubeTensor<R>, bias: Option<CubeTensor<R>>, geometry: &FlashGeometry) -> Self {
        let client = q.client.clone();
        let device = q.device.clone();
        let (bias, has_bias, strides) = match bias {
            Some(bias) => {
                let bias = into_contiguous(bias);
                let dims = bias.meta.shape().clone();
                let strides = bias.meta.strides().clone();
                // A broadcast dimension (size 1) reads the same element for every index.
                let stride = |d: usize| if dims[d] == 1 { 0 } else { strides[d] as u32 };
                (bias, true, (stride(0), stride(1), stride(2), stride(3)))
            }
            None => (
                empty_device_dtype(client.clone(), device.clone(), Shape::new([1]), DType::F32),
                false,
                (0, 0, 0, 0),
            ),
        };
        let probability = f64::from(geometry.dropout);
        let dropout = (
            geometry.seed as u32,
            (geometry.seed >> 32) as u32,
            (probability * 4_294_967_296.0).min(f64::from(u32::MAX)) as u32,
            (1.0 / (1.0 - probability)) as f32,
        );
        Self {
            client,
            device,
            dtype: q.dtype,
            bias,
            has_bias,
            strides,
            dropout,
        }
    }

    fn strides(&self) -> BiasStridesLaunch<R> {
        let (batch, head, query, key) = self.strides;
        BiasStridesLaunch::new(batch, head, query, key)
    }

    fn dropout(&self) -> DropoutArgsLaunch<R> {
        let (seed_lo, seed_hi, threshold, keep_scale) = self.dropout;
        DropoutArgsLaunch::new(seed_lo, seed_hi, threshold, keep_scale)
    }

    fn empty(&self, shape: Shape, dtype: DType) -> CubeTensor<R> {
        empty_device_dtype(self.client.clone(), self.device.clone(), shape, dtype)
    }
}

/// Rows per tile (and units per cube): the most, of 64, 32, 16 and 8, whose tiles (one row of
/// each side's two operands per unit, and two statistics) fit the device's shared memory (at most
/// 48 KiB, CUDA's static limit; WebGPU guarantees 16 KiB).
fn block<R: CubeRuntime>(client: &ComputeClient<R>, geometry: &FlashGeometry) -> usize {
    let limit = client
        .properties()
        .hardware
        .max_shared_memory_size
        .min(48 * 1024);
    let per_row = (geometry.head_dim + geometry.value_dim + 2) * size_of::<f32>();
    [64, 32, 16, 8]
        .into_iter()
        .find(|block| block * per_row <= limit)
        .unwrap_or(8)
}

/// Cubes of `block` units over `rows` rows, for `pairs` (batch, head) pairs.
fn tiles(rows: usize, block: usize, pairs: usize) -> CubeCount {
    CubeCount::Static(rows.div_ceil(block) as u32, pairs as u32, 1)
}

/// The forward: the output `[batch, q_len, heads·value_dim]` in q's dtype and the rows'
/// log-sum-exp `[batch·heads·q_len]` in f32.
pub(super) fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    geometry: &FlashGeometry,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let g = geometry;
    let launch = Launch::new(&q, bias, g);
    let out = launch.empty(
        Shape::new([g.batch, g.q_len, g.heads * g.value_dim]),
        launch.dtype,
    );
    let lse = launch.empty(Shape::new([g.batch * g.heads * g.q_len]), DType::F32);
    let block = block(&launch.client, g);
    forward_kernel::launch::<R>(
        &launch.client,
        tiles(g.q_len, block, g.batch * g.heads),
        CubeDim::new_1d(block as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        launch.bias.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        g.q_len as u32,
        g.k_len as u32,
        g.heads as u32,
        g.group() as u32,
        g.scale,
        launch.strides(),
        launch.dropout(),
        g.head_dim,
        g.value_dim,
        block,
        g.causal,
        launch.has_bias,
        g.dropout > 0.0,
        launch.dtype.into(),
    );
    (out, lse)
}

/// The gradients of [`forward`]: `(dq, dk, dv)` in the inputs' dtype and, when `bias_grad`, the
/// gradient of the bias before broadcasting, `[batch, heads, q_len, k_len]` in f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    d_out: CubeTensor<R>,
    geometry: &FlashGeometry,
    bias_grad: bool,
) -> [Option<CubeTensor<R>>; 4] {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let (out, d_out) = (into_contiguous(out), into_contiguous(d_out));
    let g = geometry;
    let launch = Launch::new(&q, bias, g);
    let bias_grad = bias_grad && launch.has_bias;
    let block = block(&launch.client, g);
    let rows = g.batch * g.heads * g.q_len;

    let delta = launch.empty(Shape::new([rows]), DType::F32);
    let delta_dim = CubeDim::new_1d(128);
    delta_kernel::launch::<R>(
        &launch.client,
        CubeCount::Static(rows.div_ceil(128) as u32, 1, 1),
        delta_dim,
        out.into_tensor_arg(),
        d_out.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        g.q_len as u32,
        g.heads as u32,
        rows as u32,
        g.value_dim,
        launch.dtype.into(),
    );

    let d_q = launch.empty(
        Shape::new([g.batch, g.q_len, g.heads * g.head_dim]),
        launch.dtype,
    );
    let d_bias = if bias_grad {
        launch.empty(Shape::new([g.batch, g.heads, g.q_len, g.k_len]), DType::F32)
    } else {
        launch.empty(Shape::new([1]), DType::F32)
    };
    backward_query_kernel::launch::<R>(
        &launch.client,
        tiles(g.q_len, block, g.batch * g.heads),
        CubeDim::new_1d(block as u32),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        launch.bias.clone().into_tensor_arg(),
        d_out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        d_q.clone().into_tensor_arg(),
        d_bias.clone().into_tensor_arg(),
        g.q_len as u32,
        g.k_len as u32,
        g.heads as u32,
        g.group() as u32,
        g.scale,
        launch.strides(),
        launch.dropout(),
        g.head_dim,
        g.value_dim,
        block,
        g.causal,
        launch.has_bias,
        g.dropout > 0.0,
        bias_grad,
        launch.dtype.into(),
    );

    let d_k = launch.empty(
        Shape::new([g.batch, g.k_len, g.kv_heads * g.head_dim]),
        launch.dtype,
    );
    let d_v = launch.empty(
        Shape::new([g.batch, g.k_len, g.kv_heads * g.value_dim]),
        launch.dtype,
    );
    backward_key_value_kernel::launch::<R>(
        &launch.client,
        tiles(g.k_len, block, g.batch * g.kv_heads),
        CubeDim::new_1d(block as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        launch.bias.clone().into_tensor_arg(),
        d_out.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        d_k.clone().into_tensor_arg(),
        d_v.clone().into_tensor_arg(),
        g.q_len as u32,
        g.k_len as u32,
        g.heads as u32,
        g.group() as u32,
        g.scale,
        launch.strides(),
        launch.dropout(),
        g.head_dim,
        g.value_dim,
        block,
        g.causal,
        launch.has_bias,
        g.dropout > 0.0,
        launch.dtype.into(),
    );
    [Some(d_q), Some(d_k), Some(d_v), bias_grad.then_some(d_bias)]
}
