//! NCCL on burn's own buffers: the gathers and reduce-scatters of device-resident ZeRO state
//! ([`crate::resident`]) on a CUDA device, with NCCL reading and writing the tensors' cubecl
//! buffers by pointer, so that no parameter or gradient crosses PCIe.
//!
//! ```text
//!   gather          master slice (f32) ─cast─► send (compute dtype, count)
//!                   recv = empty(world · count) ◄─ ncclAllGather ─ every rank's send
//!                   segment = recv[..len]
//!   reduce-scatter  full gradient (f32, len) ─pad─► send (world · count)
//!                   recv = empty(count) ◄─ ncclReduceScatter(sum)
//! ```
//!
//! Both are queued and left running ([`Queued`]) until the caller finishes them, so the trainer
//! can queue the next segment's kernels meanwhile (its `Overlap`).
//!
//! Ordering. cubecl 0.10 runs kernels on a stream of its own and exposes neither that stream
//! nor an event on it, so NCCL (on the communicator's stream) is ordered behind the kernels that
//! wrote `send` by waiting for cubecl's stream (`client.sync()`, no data read back), and the
//! kernels that read `recv` are queued only after the collective has finished (the
//! communicator waits for it, with its timeout and abort). Buffers are held (their tensors'
//! handles) until then, so the memory pool cannot hand them to anything else.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use burn_fusion::{Fusion, FusionBackend};
use cubecl::cuda::CudaRuntime;

use crate::comm::{CommError, Communicator, DeviceCollectives, PendingCollective, ReduceOp};
use crate::zero::ShardLayout;

/// A backend whose float tensors are cubecl buffers on a CUDA device.
trait CudaBuffers: Backend {
    /// The cubecl tensor behind `tensor` (under `Fusion`, once the operations writing it ran).
    fn cube(tensor: FloatTensor<Self>) -> CubeTensor<CudaRuntime>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> CudaBuffers
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn cube(tensor: FloatTensor<Self>) -> CubeTensor<CudaRuntime> {
        tensor
    }
}

impl<B: FusionBackend + CudaBuffers> CudaBuffers for Fusion<B> {
    fn cube(tensor: FloatTensor<Self>) -> CubeTensor<CudaRuntime> {
        let client = tensor.client.clone();
        B::cube(client.resolve_tensor_float::<B>(tensor))
    }
}

/// `tensor` as a tensor of backend `C`, when `B` is `C`.
fn as_backend<C: Backend, B: Backend>(tensor: &Tensor<B, 1>) -> Option<Tensor<C, 1>> {
    let any: Box<dyn std::any::Any> = Box::new(tensor.clone());
    any.downcast::<Tensor<C, 1>>().ok().map(|t| *t)
}

/// A tensor of backend `C` as one of `B` (the caller checked that they are the same).
fn back<C: Backend, B: Backend>(tensor: Tensor<C, 1>) -> Tensor<B, 1> {
    let any: Box<dyn std::any::Any> = Box::new(tensor);
    *any.downcast::<Tensor<B, 1>>().expect("the backend checked")
}

/// The device collectives to run a gather or reduce-scatter of `B`'s tensors with, when `B` is
/// this build's CUDA backend and `comm` has them.
fn in_place<B: Backend>(comm: &dyn Communicator) -> Option<&dyn DeviceCollectives> {
    if std::any::TypeId::of::<B>() != std::any::TypeId::of::<crate::Cuda>() {
        return None;
    }
    comm.device_collectives()
}

/// A collective queued on the GPU by [`start_gather`] or [`start_reduce_scatter`]: the buffer it
/// writes and the buffers it uses, held until NCCL is done with them.
pub(crate) struct Queued<B: Backend> {
    /// What the collective writes; read by nothing before [`Queued::finish`].
    recv: Tensor<B, 1>,
    /// How many of its elements are the result (a gather's padding is cut off).
    len: usize,
    /// The buffers NCCL reads and writes (their handles keep the memory reserved).
    _held: [Buffer; 2],
    pending: PendingCollective,
}

impl<B: Backend> Queued<B> {
    /// Waits for the collective and returns its result.
    pub(crate) fn finish(self, comm: &dyn Communicator) -> Result<Tensor<B, 1>, CommError> {
        let collectives = comm
            .device_collectives()
            .ok_or_else(|| CommError::Mismatch {
                rank: comm.rank(),
                message: "a collective queued on NCCL finished on another communicator".into(),
            })?;
        collectives.finish(self.pending)?;
        // Only now may kernels read the buffer NCCL wrote.
        if self.len == self.recv.dims()[0] {
            Ok(self.recv)
        } else {
            Ok(self.recv.slice(0..self.len))
        }
    }
}

/// [`crate::resident::start_gather`] on the GPU, in place, when `B` is the CUDA backend and
/// `comm` is NCCL: this rank's padded slice in `dtype` (the compute dtype, or f32) all-gathered
/// into a new buffer, queued on NCCL's stream after the kernels queued so far have run. `None`
/// when it does not apply.
pub(crate) fn start_gather<B: Backend>(
    local: &Tensor<B, 1>,
    shards: &ShardLayout,
    comm: &dyn Communicator,
    dtype: Option<DType>,
) -> Option<Result<Queued<B>, CommError>> {
    let collectives = in_place::<B>(comm)?;
    let local = as_backend::<crate::Cuda, B>(local)?;
    let dtype = match dtype {
        Some(half @ (DType::F16 | DType::BF16)) => half,
        _ => DType::F32,
    };
    let count = local.dims()[0];
    let send = if local.dtype() == dtype {
        local
    } else {
        local.cast(dtype)
    };
    let device = send.device();
    let recv = Tensor::<crate::Cuda, 1>::empty([count * shards.world], (&device, dtype));
    Some(queue(
        comm,
        [(send, count), (recv, count * shards.world)],
        shards.len,
        |[send, recv]| unsafe {
            // SAFETY: `queue`'s: held, sized, written, and unread until NCCL is done.
            collectives.start_all_gather_device(send, recv, count, dtype)
        },
    ))
}

/// [`crate::resident::start_reduce_scatter`] on the GPU, in place, when `B` is the CUDA backend
/// and `comm` is NCCL: the full gradient padded, summed across ranks in its dtype, this rank's
/// slice written to a new buffer, queued on NCCL's stream after the kernels queued so far have
/// run. The gradient comes back (`Err`) when it does not apply.
pub(crate) fn start_reduce_scatter<B: Backend>(
    full_grad: Tensor<B, 1>,
    shards: &ShardLayout,
    comm: &dyn Communicator,
) -> Result<Result<Queued<B>, CommError>, Tensor<B, 1>> {
    let (Some(collectives), Some(full)) = (
        in_place::<B>(comm),
        as_backend::<crate::Cuda, B>(&full_grad),
    ) else {
        return Err(full_grad);
    };
    drop(full_grad);
    let (dtype, device) = (full.dtype(), full.device());
    let padded = shards.padded_len();
    let pad = padded - shards.len;
    let send = if pad == 0 {
        full
    } else {
        let zeros = Tensor::<crate::Cuda, 1>::zeros([pad], (&device, dtype));
        Tensor::cat(vec![full, zeros], 0)
    };
    let count = padded / shards.world;
    let recv = Tensor::<crate::Cuda, 1>::empty([count], (&device, dtype));
    Ok(queue(
        comm,
        [(send, padded), (recv, count)],
        count,
        |[send, recv]| unsafe {
            // SAFETY: `queue`'s: held, sized, written, and unread until NCCL is done.
            collectives.start_reduce_scatter_device(send, recv, count, dtype, ReduceOp::Sum)
        },
    ))
}

/// Queues `start` on the device pointers of `send` and `recv` (each with the number of elements
/// it must hold), once every kernel queued so far has run; `recv`'s first `len` elements are the
/// result.
///
/// What makes the pointers safe to hand to NCCL: both buffers are held by the [`Queued`] until
/// its `finish` has waited for NCCL, and sized as [`Buffer::of`] checked; the kernels writing
/// `send` have run (the wait); `recv` was allocated before the wait, so no kernel still queued
/// can be using its memory, and nothing reads it before `finish`.
fn queue<B: Backend>(
    comm: &dyn Communicator,
    [(send, send_len), (recv, recv_len)]: [(Tensor<crate::Cuda, 1>, usize); 2],
    len: usize,
    start: impl FnOnce([u64; 2]) -> Result<PendingCollective, CommError>,
) -> Result<Queued<B>, CommError> {
    let rank = comm.rank();
    let send_buffer = Buffer::of(send, send_len, rank)?;
    let recv_buffer = Buffer::of(recv.clone(), recv_len, rank)?;
    send_buffer.wait_for_writers(rank)?;
    let pending = start([send_buffer.ptr, recv_buffer.ptr])?;
    Ok(Queued {
        recv: back(recv),
        len,
        _held: [send_buffer, recv_buffer],
        pending,
    })
}

/// A tensor's cubecl buffer and its device pointer; the tensor's handle keeps the memory
/// reserved (the pool cannot hand it to another tensor) while this lives.
struct Buffer {
    tensor: CubeTensor<CudaRuntime>,
    ptr: u64,
}

impl Buffer {
    /// The buffer of `tensor`, which must be contiguous and hold `elements` values.
    fn of(tensor: Tensor<crate::Cuda, 1>, elements: usize, rank: usize) -> Result<Self, CommError> {
        let dtype = tensor.dtype();
        let tensor = <crate::Cuda as CudaBuffers>::cube(tensor.into_primitive().tensor());
        let fail = |message: String| CommError::Transport { rank, message };
        if !tensor.is_contiguous() || tensor.meta.shape().num_elements() != elements {
            return Err(fail(format!(
                "an in-place NCCL buffer must be {elements} contiguous elements, got shape {:?}",
                tensor.meta.shape()
            )));
        }
        let resource = tensor
            .client
            .get_resource(tensor.handle.clone())
            .map_err(|e| fail(format!("the device buffer of a tensor: {e:?}")))?;
        let (ptr, size) = (resource.resource().ptr, resource.resource().size);
        let needed = (elements * dtype.size()) as u64;
        if size < needed {
            return Err(fail(format!(
                "a device buffer of {size} bytes for {elements} {dtype:?} values ({needed} bytes)"
            )));
        }
        Ok(Self { tensor, ptr })
    }

    /// Waits until cubecl's stream has run every kernel queued before now (the writers of this
    /// buffer among them); reads nothing back.
    fn wait_for_writers(&self, rank: usize) -> Result<(), CommError> {
        cubecl::future::block_on(self.tensor.client.sync()).map_err(|e| CommError::Transport {
            rank,
            message: format!("waiting for the GPU's compute stream: {e:?}"),
        })
    }
}
