//! Device-resident ZeRO state ([`StatePlacement::Device`]): a segment's f32 master shard, its
//! accumulated gradient and its AdamW moments as tensors on the training device, so that a
//! step moves no parameter, gradient or moment across PCIe.
//!
//! ```text
//!   host placement     master, grad, moments: Vec<f32>    working copy: upload per parameter
//!   device placement   master, grad, moments: Tensor<B>   working copy: views of the gathered
//!                                                          segment (one buffer per part)
//! ```
//!
//! Every operation is the same IEEE operation, element by element, as the host loops of
//! [`crate::optim`], in the same order, so on the CPU backend the two placements give the same
//! bits. What crosses to the host: with one rank, nothing inside a step but one two-number
//! read (the squared gradient norm and an inf/NaN probe) when the loss scaler or clipping asks
//! for it; with more ranks over a host communicator, each segment's shard once down and the
//! gathered segment once up per gather, and its gradient once down and its slice once up per
//! reduce-scatter (never a transfer per parameter).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::optim::{AdamWConfig, GradFactors};
use crate::zero::ShardLayout;

/// Where a trainer keeps its master weights, gradient accumulators and AdamW moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatePlacement {
    /// f32 slices in host memory, the optimizer a host loop (the CPU backend's default; on a GPU,
    /// what `--offload-optimizer` asks for).
    #[default]
    Host,
    /// Tensors on the training device; unscale, the overflow check, clipping and AdamW are
    /// tensor operations there, AdamW one fused kernel on the GPU backends (the default on a
    /// GPU).
    Device,
    /// ZeRO-Offload (`--offload-optimizer`): the f32 master weights and the AdamW moments in
    /// host memory, the gradient accumulator and a copy of the weights (in the compute dtype)
    /// on the device. Gradients come down and weights go up once per optimizer step, one
    /// transfer per segment, never per micro-batch; AdamW runs on the host's threads.
    Offload,
}

/// One segment's state on the device; a part with no elements is `None` (no zero-sized
/// buffers, which not every device backend accepts).
#[derive(Debug, Clone)]
pub struct Resident<B: Backend> {
    /// This rank's slice of the trainable parameters (f32 master values).
    pub params: Option<Tensor<B, 1>>,
    /// This rank's slice of the frozen parameters.
    pub frozen: Option<Tensor<B, 1>>,
    /// This rank's slice of the accumulated gradient.
    pub grad: Option<Tensor<B, 1>>,
    /// AdamW's first moment.
    pub exp_avg: Option<Tensor<B, 1>>,
    /// AdamW's second moment.
    pub exp_avg_sq: Option<Tensor<B, 1>>,
}

/// `values` as a device tensor (`None` when empty).
pub fn upload<B: Backend>(values: &[f32], device: &B::Device) -> Option<Tensor<B, 1>> {
    upload_as(values.to_vec(), None, device)
}

/// `values` as a device tensor in `dtype` (converted on the host, so that only the compute
/// dtype's bytes cross; f32, the buffer given away, when `None`), `None` when empty.
pub fn upload_as<B: Backend>(
    values: Vec<f32>,
    dtype: Option<DType>,
    device: &B::Device,
) -> Option<Tensor<B, 1>> {
    if values.is_empty() {
        return None;
    }
    let len = values.len();
    let data = TensorData::new(values, [len]);
    Some(match dtype {
        // Created in `dtype`: without it, `from_data` makes the device's default float dtype
        // (f32) of the converted values, twice the bytes on the device.
        Some(dtype) if dtype != DType::F32 => {
            Tensor::from_data(data.convert_dtype(dtype), (device, dtype))
        }
        _ => Tensor::from_data(data, device),
    })
}

/// `values` as a device tensor, the buffer given away (a host backend keeps it without a copy).
fn owned_upload<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

/// A device tensor's values on the host, as f32 (one blocking read); empty for `None`.
pub fn download<B: Backend>(tensor: Option<&Tensor<B, 1>>) -> Vec<f32> {
    match tensor {
        None => Vec::new(),
        Some(tensor) => {
            let data = tensor.clone().into_data();
            match data.dtype {
                DType::F32 => data.into_vec::<f32>().expect("an f32 tensor's values"),
                _ => data
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("converted to f32"),
            }
        }
    }
}

impl<B: Backend> Resident<B> {
    /// The state of one segment, uploaded from its host slices.
    pub fn upload(
        params: &[f32],
        frozen: &[f32],
        grad: &[f32],
        (exp_avg, exp_avg_sq): (&[f32], &[f32]),
        device: &B::Device,
    ) -> Self {
        Self {
            params: upload(params, device),
            frozen: upload(frozen, device),
            grad: upload(grad, device),
            exp_avg: upload(exp_avg, device),
            exp_avg_sq: upload(exp_avg_sq, device),
        }
    }

    /// Zeroes the gradient slice.
    pub fn zero_grad(&mut self) {
        if let Some(grad) = self.grad.as_mut() {
            *grad = grad.zeros_like();
        }
    }

    /// Adds this rank's slice of a reduced gradient to the accumulator (`acc + g`, as the host
    /// loop's `*acc += g`).
    pub fn accumulate(&mut self, slice: Tensor<B, 1>) {
        if let Some(grad) = self.grad.take() {
            self.grad = Some(grad.add(slice));
        }
    }

    /// Divides the gradient by `divisor` (`*g /= divisor`).
    pub fn unscale(&mut self, divisor: f32) {
        if let Some(grad) = self.grad.take() {
            self.grad = Some(grad.div_scalar(divisor));
        }
    }

    /// Multiplies the gradient by `coefficient` (clipping: `*g *= coefficient`).
    pub fn scale_grad(&mut self, coefficient: f32) {
        if let Some(grad) = self.grad.take() {
            self.grad = Some(grad.mul_scalar(coefficient));
        }
    }

    /// `[Σ g², Σ g·0]` of the gradient slice divided by `divisor` (its unscaled values, not
    /// stored), on the device: the squared norm, and a probe that is NaN exactly when some
    /// gradient is inf or NaN (0 otherwise). In f64 where the device supports it (what the host's
    /// norm sums in), else f32. `None` for an empty slice.
    pub fn grad_health(&self, wide: bool, divisor: f32) -> Option<Tensor<B, 1>> {
        let mut grad = self.grad.as_ref()?.clone();
        if divisor != 1.0 {
            grad = grad.div_scalar(divisor);
        }
        let grad = if wide { grad.cast(DType::F64) } else { grad };
        let squares = grad.clone().mul(grad.clone()).sum();
        let probe = grad.mul_scalar(0.0).sum();
        Some(Tensor::cat(vec![squares, probe], 0))
    }

    /// One AdamW step on the device of the gradient read as `g / divisor · coefficient`
    /// (`factors`: the unscale and clipping the host path applies in passes of their own),
    /// element for element the host loop of [`crate::optim::AdamWState::step`]: decoupled
    /// decay, the moments, the bias-corrected update, in the same order. On the GPU backends one
    /// fused kernel ([`crate::kernels::fused_adamw`]), elsewhere tensor operations.
    pub fn adamw(&mut self, config: &AdamWConfig, lr: f32, step: u64, factors: GradFactors) {
        let (Some(p), Some(g), Some(m), Some(v)) = (
            self.params.take(),
            self.grad.clone(),
            self.exp_avg.take(),
            self.exp_avg_sq.take(),
        ) else {
            return;
        };
        #[cfg(feature = "gpu-kernels")]
        if let Some([p, m, v]) =
            crate::kernels::fused_adamw(&p, &g, (&m, &v), config, (lr, step), factors)
        {
            (self.params, self.exp_avg, self.exp_avg_sq) = (Some(p), Some(m), Some(v));
            return;
        }
        let mut g = g;
        if factors.divisor != 1.0 {
            g = g.div_scalar(factors.divisor);
        }
        if factors.coefficient != 1.0 {
            g = g.mul_scalar(factors.coefficient);
        }
        let bias1 = 1.0 - config.beta1.powi(step as i32);
        let bias2 = 1.0 - config.beta2.powi(step as i32);
        let (step_size, bias2_sqrt) = (lr / bias1, bias2.sqrt());
        let p = p.mul_scalar(1.0 - lr * config.weight_decay);
        let m = m
            .mul_scalar(config.beta1)
            .add(g.clone().mul_scalar(1.0 - config.beta1));
        let v = v
            .mul_scalar(config.beta2)
            .add(g.clone().mul_scalar(1.0 - config.beta2).mul(g));
        let denom = v
            .clone()
            .sqrt()
            .div_scalar(bias2_sqrt)
            .add_scalar(config.eps);
        self.params = Some(p.sub(m.clone().mul_scalar(step_size).div(denom)));
        self.exp_avg = Some(m);
        self.exp_avg_sq = Some(v);
    }
}

/// The whole of a sharded part (padding removed) on the device: [`start_gather`], then
/// [`InFlight::finish`].
pub fn gather<B: Backend>(
    local: Option<&Tensor<B, 1>>,
    shards: &ShardLayout,
    comm: &dyn Communicator,
    device: &B::Device,
    dtype: Option<DType>,
) -> Result<Option<Tensor<B, 1>>, CommError> {
    start_gather(local, shards, comm, device, dtype)?.finish(comm)
}

/// A collective's result on the device ([`start_gather`], [`start_reduce_scatter`]): there, or
/// still being written on the GPU until [`InFlight::finish`] (NCCL in place), so that the caller
/// can queue other work meanwhile.
pub struct InFlight<B: Backend>(Progress<B>);

enum Progress<B: Backend> {
    /// The result (`None`: an empty part).
    Ready(Option<Tensor<B, 1>>),
    /// An NCCL collective on the GPU, not yet waited for.
    #[cfg(feature = "cuda")]
    Queued(Box<crate::nccl_in_place::Queued<B>>),
}

impl<B: Backend> InFlight<B> {
    fn ready(result: Option<Tensor<B, 1>>) -> Self {
        Self(Progress::Ready(result))
    }

    #[cfg(feature = "cuda")]
    fn queued(queued: crate::nccl_in_place::Queued<B>) -> Self {
        Self(Progress::Queued(Box::new(queued)))
    }

    /// The result, once the collective has finished.
    pub fn finish(self, comm: &dyn Communicator) -> Result<Option<Tensor<B, 1>>, CommError> {
        #[cfg(not(feature = "cuda"))]
        let _ = comm; // only a queued collective waits on it
        match self.0 {
            Progress::Ready(result) => Ok(result),
            #[cfg(feature = "cuda")]
            Progress::Queued(queued) => queued.finish(comm).map(Some),
        }
    }
}

/// Starts gathering the whole of a sharded part (padding removed) on the device: this rank's
/// slice itself with one rank; with NCCL on a CUDA device, an all-gather queued on the GPU in
/// place ([`crate::nccl`]'s device buffers), left running until [`InFlight::finish`]; else
/// (host communicators) done at once: the slice goes down once, is all-gathered, and the
/// segment comes up once. In a half compute `dtype` the slice is converted on the device
/// first, so the gather moves halves (half the bytes down, across ranks and up) and the segment
/// comes up in that dtype; in f32 (`None`) it moves f32.
pub fn start_gather<B: Backend>(
    local: Option<&Tensor<B, 1>>,
    shards: &ShardLayout,
    comm: &dyn Communicator,
    device: &B::Device,
    dtype: Option<DType>,
) -> Result<InFlight<B>, CommError> {
    let Some(local) = local else {
        return Ok(InFlight::ready(None));
    };
    if shards.world == 1 {
        return Ok(InFlight::ready(Some(local.clone())));
    }
    #[cfg(feature = "cuda")]
    if let Some(queued) = crate::nccl_in_place::start_gather(local, shards, comm, dtype) {
        return queued.map(InFlight::queued);
    }
    if let Some(half @ (DType::F16 | DType::BF16)) = dtype {
        let slice = local.clone().cast(half).into_data();
        let mut full = comm.all_gather_bytes(slice.as_bytes())?;
        full.truncate(shards.len * half.size());
        let data = TensorData::from_bytes_vec(full, [shards.len], half);
        return Ok(InFlight::ready(Some(Tensor::from_data(
            data,
            (device, half),
        ))));
    }
    let mut full = comm.all_gather(&download(Some(local)))?;
    full.truncate(shards.len);
    Ok(InFlight::ready(upload_as(full, dtype, device)))
}

/// Starts summing a segment's full gradient (`shards.len` long) across ranks, for this rank's
/// slice of the sum on the device: the gradient itself with one rank; with NCCL on a CUDA
/// device, padded and reduce-scattered in place on the GPU, left running until
/// [`InFlight::finish`]; else (host communicators) done at once: it goes down once, is padded
/// and reduce-scattered, and the slice comes up once.
pub fn start_reduce_scatter<B: Backend>(
    full_grad: Tensor<B, 1>,
    shards: &ShardLayout,
    comm: &dyn Communicator,
    device: &B::Device,
) -> Result<InFlight<B>, CommError> {
    if shards.world == 1 {
        return Ok(InFlight::ready(Some(full_grad)));
    }
    #[cfg(feature = "cuda")]
    let full_grad = match crate::nccl_in_place::start_reduce_scatter(full_grad, shards, comm) {
        Ok(queued) => return queued.map(InFlight::queued),
        Err(full_grad) => full_grad,
    };
    let mut full = download(Some(&full_grad));
    drop(full_grad);
    full.resize(shards.padded_len(), 0.0);
    let slice = comm.reduce_scatter_owned(full, ReduceOp::Sum)?;
    Ok(InFlight::ready(Some(owned_upload(slice, device))))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use burn::tensor::{bf16, f16};

    use super::*;
    use crate::Cpu;
    use crate::comm::ThreadGroup;

    /// Rank `rank`'s padded slice of a part: values that neither half dtype holds exactly.
    fn slice(rank: usize, shards: &ShardLayout) -> Vec<f32> {
        shards
            .range(rank)
            .map(|i| 1.0 + i as f32 * 1.37e-3 + (i % 7) as f32 * 1e4)
            .collect()
    }

    /// An upload in a compute dtype makes a tensor of that dtype.
    #[test]
    fn an_upload_in_a_half_dtype_is_a_half_tensor() {
        let device = Default::default();
        for dtype in [DType::F16, DType::BF16] {
            let t = upload_as::<Cpu>(vec![1.0, 2.5], Some(dtype), &device).unwrap();
            assert_eq!(t.dtype(), dtype);
        }
    }

    /// A gather in a half dtype moves halves and gives the segment rounded as the `half` crate
    /// rounds the f32 segment (to nearest, ties to even): what the host path uploads.
    #[test]
    fn a_half_gather_gives_the_rounded_segment() {
        for (world, len) in [(2, 11), (3, 10), (4, 4)] {
            let shards = ShardLayout { len, world };
            let whole: Vec<f32> = (0..world).flat_map(|r| slice(r, &shards)).collect();
            for dtype in [DType::F16, DType::BF16] {
                let results = ThreadGroup::run(world, Duration::from_secs(10), move |comm| {
                    let device = Default::default();
                    let local = upload::<Cpu>(&slice(comm.rank(), &shards), &device);
                    let full = gather(local.as_ref(), &shards, &comm, &device, Some(dtype))
                        .unwrap()
                        .unwrap();
                    assert_eq!(full.dtype(), dtype);
                    full.into_data().convert::<f32>().into_vec::<f32>().unwrap()
                });
                let want: Vec<f32> = whole[..len]
                    .iter()
                    .map(|&x| match dtype {
                        DType::F16 => f16::from_f32(x).to_f32(),
                        _ => bf16::from_f32(x).to_f32(),
                    })
                    .collect();
                assert!(
                    want.iter().zip(&whole).any(|(w, x)| w != x),
                    "rounding shows"
                );
                for result in results {
                    assert_eq!(result.unwrap(), want, "N={world} {dtype:?}");
                }
            }
        }
    }
}
