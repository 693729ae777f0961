//! ZeRO-3 training of a model cut into segments, with block checkpointing, driven block by block.
//!
//! A model is an embedding segment (batch → hidden), a list of blocks (hidden → hidden) and a head
//! (hidden → loss); [`ZeroSpec`] says how each runs. Every segment's parameters are sharded
//! ([`ShardedParams`]). One [`ZeroTrainer::forward_backward`]:
//!
//! 1. forward, segment by segment, without an autodiff graph: all-gather the segment's weights,
//!    load them into a copy of the module, run it, keep only its input (the checkpoint), drop the
//!    weights (kept until backward with `zero_level` 2);
//! 2. the head runs with autodiff and its loss is differentiated first (`loss · scale / world`);
//! 3. then, for each block in reverse, its weights are gathered again, the block is re-run on a
//!    fresh autodiff graph from fresh leaves (its saved input and its weights), and the incoming
//!    gradient is pushed through with an ordinary top-level `.backward()` of `sum(y · dy)`; the
//!    input's gradient goes to the block below, the weights' gradient is reduce-scattered (summed)
//!    into this rank's slice and accumulated;
//! 4. the embedding segment last.
//!
//! With [`ZeroOptions::overlap`] (on by default where NCCL works on the GPU's buffers) the
//! collectives move one segment off their turn, so that NCCL runs while the GPU computes: the
//! gather of the segment ahead starts before a segment runs, and a block's reduce-scattered
//! slice is added after the block below it has run backward. The arithmetic is the same.
//!
//! Every `.backward()` is top-level, so nothing nests: burn 0.21 deadlocks when a custom backward
//! step calls `.backward()` (`../shared/reference/burn.md` §7). A block that opts out of
//! checkpointing keeps its forward graph instead and back-propagates through it in step 3.
//!
//! [`ZeroTrainer::step`] then checks the loss scale (overflow all-reduced), unscales, clips by the
//! global norm across all shards, and runs AdamW on each rank's slices (f32 master weights).
//!
//! Frozen parameters ([`ZeroOptions::frozen`]) are sharded apart, without gradient or moments.
//! QLoRA's base ([`ZeroOptions::quantized`]) goes further: those frozen weights are quantized
//! when their segment is sharded and kept as codes, packed into words and sharded like the rest;
//! a working copy gathers its segment's codes and lends them to the layers' slots for as long
//! as it lives (its parameters for them are lazy and never read), so no f32 copy of them exists.
//!
//! ```text
//!   segment buffer   [ trainable │ frozen ]            f32 shards (values)
//!   codes            [ w₀ codes+absmax │ w₁ … ]        packed words, sharded (one rank: matrices)
//!   combined layout  entries in visit order; offsets past the values address the codes
//! ```

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::{
    self, CheckpointError, FileDigest, LoadedSegment, SegmentState, TrainCounters,
};
use crate::coded::SegmentCodes;
pub use crate::coded::{QuantizedBase, QuantizedWeight};
use crate::comm::{CommError, Communicator};
use crate::device_memory::{DeviceMemory, MemoryPeak};
use crate::inspect::{ParamStats, moments};
use crate::optim::{
    AdamWConfig, AdamWState, GradFactors, LossScaler, clip_coefficient, clip_grad_norm,
    global_norm_of,
};
use crate::quant::QuantizedMatrix;
use rayon::prelude::*;

pub use crate::resident::StatePlacement;
use crate::resident::{self, Resident};
use crate::zero::{
    FlatLayout, HeldCodes, ShardedParams, flat_grad_tensor, flat_grads_below, flatten, hollow,
    layout_of, load_flat_parts, load_flat_tensors,
};

/// How a model's segments run. Implemented once per model family, for every backend: the
/// trainer trains on an autodiff backend `B` and evaluates ([`ZeroTrainer::infer`]) on its
/// inner backend with the same functions.
pub trait ZeroSpec<B: Backend> {
    /// The embedding segment.
    type Embed: Module<B> + Clone;
    /// One block (all blocks share the type).
    type Block: Module<B> + Clone;
    /// The head, which ends in the loss.
    type Head: Module<B> + Clone;
    /// One micro-batch (ids, masks, labels).
    type Batch;

    /// Batch → `[batch, seq, hidden]`.
    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3>;
    /// Hidden → hidden, for block `index` (blocks may differ in masks, as GPT-3's banded ones).
    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 3>;
    /// Hidden → the mean loss of this micro-batch, `[1]`. `embed` is the embedding segment when
    /// [`ZeroSpec::head_reads_embed`] (a tied output layer), `None` otherwise.
    fn loss(
        &self,
        module: &Self::Head,
        embed: Option<&Self::Embed>,
        hidden: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1>;

    /// Whether the head reads the embedding segment's weights (an LM head tied to the token
    /// embeddings). The trainer then gathers the embedding for the head too, and the gradient the
    /// head gives it adds to the one from the embedding lookup.
    fn head_reads_embed(&self) -> bool {
        false
    }

    /// Name prefix of a segment's parameters in checkpoints (a model's zoo names, ideally; an
    /// empty prefix puts the segment's own names at the top level).
    fn prefix(&self, segment: SegmentId) -> String {
        match segment {
            SegmentId::Embed => "embed".into(),
            SegmentId::Block(i) => format!("blocks.{i}"),
            SegmentId::Head => "head".into(),
        }
    }
}

/// Which segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentId {
    /// The embedding segment.
    Embed,
    /// Block `i`.
    Block(usize),
    /// The head.
    Head,
}

/// A parameter gathered whole: `(name, shape, values)`.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A non-checkpointed block's forward graph, kept for backward: its input leaf, its output and
/// the module holding its weight leaves.
type KeptGraph<B, M> = (Tensor<B, 3>, Tensor<B, 3>, M);

/// Training options.
#[derive(Debug, Clone)]
pub struct ZeroOptions {
    /// 3: gather weights again in backward; 2: keep the gathered weights from forward to backward.
    pub zero_level: u8,
    /// Per block: recompute it in backward (store only its input). Shorter lists mean "no" for
    /// the blocks after; [`ZeroOptions::checkpoint_all`] is the one-liner.
    pub checkpoint: Vec<bool>,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Clip gradients to this global norm.
    pub max_grad_norm: Option<f32>,
    /// Dynamic loss scaling (for half precision; `None` trains unscaled).
    pub loss_scaler: Option<LossScaler>,
    /// The dtype segments compute in (f16 / bf16 mixed precision). Master weights, gradients
    /// and optimizer state stay f32 slices whatever it is. `None`: f32.
    pub compute_dtype: Option<DType>,
    /// Parameters that do not train (BitFit, adapters, `--freeze`): sharded like the others but
    /// with no gradient, no optimizer state and no reduce-scatter. `None`: every one trains.
    pub frozen: Option<Frozen>,
    /// QLoRA's base: frozen weights kept as int8 / NF4 codes instead of f32 values (sharded as
    /// packed words, gathered with their segment). `None`: none.
    pub quantized: Option<QuantizedBase>,
    /// Where the master weights, gradients and AdamW moments live: host slices, or tensors on
    /// the training device ([`crate::resident`]).
    pub placement: StatePlacement,
    /// Whether communication overlaps computation (BMTrain's overlap).
    pub overlap: Overlap,
}

/// Whether the trainer overlaps communication with computation, as BMTrain does: each segment's
/// gather starts before the segment ahead of it computes, and each gradient's reduce-scatter
/// lands after the block behind it has run backward. It holds one more gathered segment and one
/// more full gradient for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// On where the communicator works on the GPU (NCCL in place, whose collectives run while
    /// the GPU computes); off elsewhere: a host communicator finishes each collective at once,
    /// so overlapping would only hold more memory.
    #[default]
    Auto,
    /// Always (tests: the order of the collectives changes, not their values).
    On,
    /// Never.
    Off,
}

/// Which parameters are frozen, by checkpoint name (`prefix.name`, the model's zoo names).
#[derive(Clone)]
pub struct Frozen(std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl Frozen {
    /// Freezes the parameters whose checkpoint name `rule` accepts.
    pub fn new(rule: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(rule))
    }

    /// Whether the parameter named `name` is frozen.
    pub fn freezes(&self, name: &str) -> bool {
        (self.0)(name)
    }
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Frozen(..)")
    }
}

impl ZeroOptions {
    /// ZeRO-3 with every block checkpointed, AdamW's PyTorch defaults, no clipping or scaling.
    pub fn checkpoint_all(blocks: usize) -> Self {
        Self {
            zero_level: 3,
            checkpoint: vec![true; blocks],
            adamw: AdamWConfig::default(),
            max_grad_norm: None,
            loss_scaler: None,
            compute_dtype: None,
            frozen: None,
            quantized: None,
            placement: StatePlacement::Host,
            overlap: Overlap::Auto,
        }
    }
}

/// One segment: its module structure, this rank's parameter slice, gradient slice and AdamW
/// moments (host slices, or tensors on device `I`), and (zero level 2) the weights kept between
/// forward and backward.
#[derive(Debug, Clone)]
pub struct Segment<M, I: Backend> {
    template: M,
    /// Every parameter in visit order: offsets address the trainable buffer followed by the
    /// frozen one (the same as `params.layout` when nothing is frozen).
    layout: FlatLayout,
    /// The sharded trainable parameters.
    pub params: ShardedParams,
    /// The sharded frozen parameters (empty when none): no gradient, no optimizer state.
    pub frozen: ShardedParams,
    /// The frozen weights held as codes (QLoRA's base; empty when none).
    codes: SegmentCodes,
    /// This rank's slice of the accumulated gradient.
    pub grad: Vec<f32>,
    /// This rank's slice of the AdamW state.
    pub state: AdamWState,
    /// Where the state lives. [`StatePlacement::Device`]: in `resident`, the host slices above
    /// (parameters, gradient, moments) empty. [`StatePlacement::Offload`]: the master weights
    /// and moments above, a working copy of the weights and the gradient in `resident`.
    placement: StatePlacement,
    /// The state (or, offloaded, the weights' copy and the gradient) on the training device.
    resident: Option<Resident<I>>,
    kept: Option<Gathered<I>>,
}

/// A segment's gathered parameters: one host buffer (trainable, then frozen), or its two
/// parts on the device.
#[derive(Debug, Clone)]
enum Gathered<I: Backend> {
    Host(Vec<f32>),
    Device(Option<Tensor<I, 1>>, Option<Tensor<I, 1>>),
}

/// A segment's gather on its way ([`Segment::start_gather`]): on the host it is done; on the
/// device its parts may still be queued on the GPU.
enum GatherInFlight<I: Backend> {
    Host(Vec<f32>),
    Device(resident::InFlight<I>, resident::InFlight<I>),
}

impl<I: Backend> GatherInFlight<I> {
    /// The gathered parameters, once the collectives have finished.
    fn finish(self, comm: &dyn Communicator) -> Result<Gathered<I>, CommError> {
        Ok(match self {
            Self::Host(values) => Gathered::Host(values),
            Self::Device(params, frozen) => {
                Gathered::Device(params.finish(comm)?, frozen.finish(comm)?)
            }
        })
    }
}

/// The reduce-scatter left in flight behind backward ([`Overlap`]): whose gradient it is and
/// its slice on its way.
type Behind<I> = Option<(SegmentId, SliceInFlight<I>)>;

/// This rank's slice of a segment's reduced gradient, on its way
/// ([`Segment::start_reduce_scatter`]): on the host it is done; on the device it may still be
/// queued on the GPU.
enum SliceInFlight<I: Backend> {
    Ready(Flat<I>),
    Device(resident::InFlight<I>),
}

impl<I: Backend> SliceInFlight<I> {
    /// The slice, once the collective has finished.
    fn finish(self, comm: &dyn Communicator) -> Result<Flat<I>, CommError> {
        Ok(match self {
            Self::Ready(slice) => slice,
            Self::Device(in_flight) => Flat::Device(in_flight.finish(comm)?),
        })
    }
}

/// A segment's flat gradient, or this rank's slice of it: host values or a device tensor
/// (`None`: the segment has nothing that trains).
enum Flat<I: Backend> {
    Host(Vec<f32>),
    Device(Option<Tensor<I, 1>>),
}

impl<I: Backend> Flat<I> {
    /// `self + other`, element by element (`*g += t`).
    fn plus(self, other: Self) -> Self {
        match (self, other) {
            (Flat::Host(mut g), Flat::Host(t)) => {
                for (g, t) in g.iter_mut().zip(t) {
                    *g += t;
                }
                Flat::Host(g)
            }
            (Flat::Device(Some(g)), Flat::Device(Some(t))) => Flat::Device(Some(g.add(t))),
            (g, _) => g,
        }
    }
}

impl<M, I: Backend> Segment<M, I> {
    /// A segment with `template`'s structure (its values, if any, are dropped) holding this
    /// rank's slices of `full`, the segment's whole buffer laid out as `layout`; the parameters
    /// `frozen` names (by their name within the segment) are kept apart, without gradient or
    /// optimizer state, and those `base` names (by checkpoint name, `name_of` a layout name's)
    /// are quantized and kept as codes.
    fn from_full<B: Backend>(
        template: M,
        layout: FlatLayout,
        full: Vec<f32>,
        (rank, world): (usize, usize),
        frozen: impl Fn(&str) -> bool,
        (base, name_of): (Option<&QuantizedBase>, impl Fn(&str) -> String),
    ) -> Self
    where
        M: Module<B>,
    {
        assert_eq!(
            full.len(),
            layout.len,
            "a segment's values cover its layout exactly"
        );
        let entries = layout.entries.len();
        let (layout, full, codes, coded_at) =
            SegmentCodes::take(layout, full, base, name_of, (rank, world));
        let shard = |layout: FlatLayout, full: Vec<f32>| {
            if world == 1 {
                // The whole buffer is the one rank's slice: kept, not copied.
                ShardedParams::from_slice(layout, full, 1)
            } else {
                ShardedParams::from_full(layout, &full, rank, world)
            }
        };
        let split = layout.split(frozen);
        let (combined, params, frozen) = if split.frozen.entries.is_empty() {
            (
                layout.clone(),
                shard(layout, full),
                shard(FlatLayout::default(), Vec::new()),
            )
        } else {
            let (trainable, still) = split.split_values(&layout, &full);
            drop(full);
            (
                split.combined,
                shard(split.trainable, trainable),
                shard(split.frozen, still),
            )
        };
        let combined = codes.place(combined, &coded_at, entries);
        let shard = params.shards.shard_len();
        Self {
            template: hollow::<B, M>(template),
            layout: combined,
            codes,
            // Zeroed allocations: their pages are only touched (resident) once written.
            grad: vec![0.0; shard],
            state: AdamWState::new(shard),
            placement: StatePlacement::Host,
            resident: None,
            kept: None,
            params,
            frozen,
        }
    }

    /// Moves the state to `device` as `placement` says: [`StatePlacement::Device`] uploads the
    /// host slices (the gradient starts at zero) and frees them; [`StatePlacement::Offload`]
    /// uploads a copy of the weights (in `dtype`, the compute dtype, when given) and a zero
    /// gradient, and keeps the master weights and moments on the host. Called again (after a
    /// checkpoint load), it replaces the device state with the host slices just loaded.
    fn place(&mut self, device: &I::Device, placement: StatePlacement, dtype: Option<DType>) {
        self.placement = placement;
        let shard = self.params.shards.shard_len();
        let trains = shard > 0 && self.params.layout.len > 0;
        let grad = || trains.then(|| Tensor::zeros([shard], device));
        match placement {
            StatePlacement::Host => return,
            StatePlacement::Device => {
                // Frozen weights never change: in a half compute dtype the device holds them in
                // it (what every working copy needs: 2 bytes a parameter, not 4) and their f32
                // values stay on the host, untouched, for checkpoints (LoRA's base).
                let half = dtype.is_some_and(|d| d != DType::F32);
                let frozen = match half {
                    true => self.frozen.local.clone(),
                    false => std::mem::take(&mut self.frozen.local),
                };
                let mut resident = Resident::upload(
                    &self.params.local,
                    &[],
                    &[],
                    (&self.state.exp_avg, &self.state.exp_avg_sq),
                    device,
                );
                resident.frozen = resident::upload_as(frozen, dtype, device);
                resident.grad = grad();
                self.resident = Some(resident);
                self.params.local = Vec::new();
                self.state = AdamWState::new(0);
            }
            StatePlacement::Offload => {
                self.resident = Some(Resident {
                    params: resident::upload_as(self.params.local.to_vec(), dtype, device),
                    frozen: resident::upload_as(self.frozen.local.to_vec(), dtype, device),
                    grad: grad(),
                    exp_avg: None,
                    exp_avg_sq: None,
                });
            }
        }
        self.grad = Vec::new();
    }

    /// Offloaded ([`StatePlacement::Offload`]): takes the gradient slice down to the host (one
    /// read) and zeroes it on the device.
    fn take_grad(&mut self) -> Vec<f32> {
        let Some(resident) = self.resident.as_mut() else {
            return std::mem::take(&mut self.grad);
        };
        let mut values = resident::download(resident.grad.as_ref());
        values.resize(self.params.shards.shard_len(), 0.0);
        resident.zero_grad();
        values
    }

    /// Offloaded: one AdamW step of the host's master slice, on the host's threads, between one
    /// read of the gradient and one upload of the weights (in the compute dtype when given).
    fn offloaded_step(
        &mut self,
        config: &AdamWConfig,
        lr: f32,
        step: u64,
        device: &I::Device,
        dtype: Option<DType>,
    ) {
        let grad = self.take_grad();
        let params = self.params.local.as_mut_slice();
        self.state.step_parallel(config, params, &grad, lr, step);
        if let Some(resident) = self.resident.as_mut() {
            resident.params = resident::upload_as(self.params.local.to_vec(), dtype, device);
        }
    }

    /// The trainable parameters, the frozen ones and the moments as host slices: borrowed, or
    /// read back from the device (one read per part).
    #[allow(clippy::type_complexity)]
    fn host_state(
        &self,
    ) -> (
        Cow<'_, ShardedParams>,
        Cow<'_, ShardedParams>,
        Cow<'_, [f32]>,
        Cow<'_, [f32]>,
    ) {
        let resident = match (&self.resident, self.placement) {
            (Some(resident), StatePlacement::Device) => resident,
            _ => {
                return (
                    Cow::Borrowed(&self.params),
                    Cow::Borrowed(&self.frozen),
                    Cow::Borrowed(&self.state.exp_avg),
                    Cow::Borrowed(&self.state.exp_avg_sq),
                );
            }
        };
        let read = |sharded: &ShardedParams, part: Option<&Tensor<I, 1>>| {
            let mut local = resident::download(part);
            local.resize(sharded.shards.shard_len(), 0.0);
            Cow::Owned(ShardedParams {
                local,
                ..sharded.clone()
            })
        };
        let moment = |part: Option<&Tensor<I, 1>>| {
            let mut values = resident::download(part);
            values.resize(self.params.shards.shard_len(), 0.0);
            Cow::Owned(values)
        };
        // Frozen values kept on the host (a half compute dtype) are the f32 originals.
        let frozen = match self.frozen.local.is_empty() {
            true => read(&self.frozen, resident.frozen.as_ref()),
            false => Cow::Borrowed(&self.frozen),
        };
        (
            read(&self.params, resident.params.as_ref()),
            frozen,
            moment(resident.exp_avg.as_ref()),
            moment(resident.exp_avg_sq.as_ref()),
        )
    }

    /// This rank's gradient slice on the host (read back from the device there).
    fn host_grad(&self) -> Cow<'_, [f32]> {
        match &self.resident {
            None => Cow::Borrowed(&self.grad),
            Some(resident) => {
                let mut values = resident::download(resident.grad.as_ref());
                values.resize(self.params.shards.shard_len(), 0.0);
                Cow::Owned(values)
            }
        }
    }

    /// Every parameter's place in the segment's combined buffer (trainable, then frozen).
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The gradients of the trainable parameters of `module` (this segment's working copy), as
    /// one buffer laid out as `params.layout`, where the state lives.
    fn grads_of<B: AutodiffBackend<InnerBackend = I>>(
        &self,
        module: &M,
        grads: &B::Gradients,
        device: &B::Device,
    ) -> Flat<I>
    where
        M: Module<B>,
    {
        let trainable = self.params.layout.len;
        match self.resident {
            None => Flat::Host(flat_grads_below::<B, M>(
                module,
                &self.layout,
                trainable,
                grads,
            )),
            Some(_) => Flat::Device(flat_grad_tensor::<B, M>(
                module,
                &self.layout,
                trainable,
                grads,
                device,
            )),
        }
    }

    /// Sums a full gradient across ranks and returns this rank's slice of the sum.
    fn reduce_scatter(
        &self,
        comm: &dyn Communicator,
        device: &I::Device,
        full: Flat<I>,
    ) -> Result<Flat<I>, CommError> {
        self.start_reduce_scatter(comm, device, full)?.finish(comm)
    }

    /// [`Segment::reduce_scatter`], left running where the communicator can (NCCL on the GPU's
    /// buffers), so that other work is queued meanwhile.
    fn start_reduce_scatter(
        &self,
        comm: &dyn Communicator,
        device: &I::Device,
        full: Flat<I>,
    ) -> Result<SliceInFlight<I>, CommError> {
        Ok(match full {
            Flat::Host(full) => {
                SliceInFlight::Ready(Flat::Host(self.params.reduce_scatter(comm, full)?))
            }
            Flat::Device(None) => SliceInFlight::Ready(Flat::Device(None)),
            Flat::Device(Some(full)) => SliceInFlight::Device(resident::start_reduce_scatter(
                full,
                &self.params.shards,
                comm,
                device,
            )?),
        })
    }

    /// Adds this rank's slice of a reduced gradient to the accumulated one.
    fn add_grad(&mut self, slice: Flat<I>) {
        match (slice, self.resident.as_mut()) {
            (Flat::Host(slice), _) => {
                for (acc, g) in self.grad.iter_mut().zip(slice) {
                    *acc += g;
                }
            }
            (Flat::Device(Some(slice)), Some(resident)) => resident.accumulate(slice),
            (Flat::Device(_), _) => {}
        }
    }

    /// Whether some of the segment's parameters are frozen.
    pub fn has_frozen(&self) -> bool {
        !self.frozen.layout.entries.is_empty()
    }

    /// The combined buffer (trainable then frozen), all-gathered, on the host.
    fn gather_host(&self, comm: &dyn Communicator) -> Result<Vec<f32>, CommError> {
        let (params, frozen, _, _) = self.host_state();
        let mut full = params.gather(comm)?;
        if self.has_frozen() {
            full.extend(frozen.gather(comm)?);
        }
        Ok(full)
    }

    /// The segment's parameters all-gathered where its state lives; on a device, in `dtype`
    /// (the compute dtype) when more than one rank makes them cross.
    fn gather(
        &self,
        comm: &dyn Communicator,
        device: &I::Device,
        dtype: Option<DType>,
    ) -> Result<Gathered<I>, CommError> {
        self.start_gather(comm, device, dtype)?.finish(comm)
    }

    /// [`Segment::gather`], left running where the communicator can (NCCL on the GPU's
    /// buffers), so that other work is queued meanwhile.
    fn start_gather(
        &self,
        comm: &dyn Communicator,
        device: &I::Device,
        dtype: Option<DType>,
    ) -> Result<GatherInFlight<I>, CommError> {
        match &self.resident {
            None => self.gather_host(comm).map(GatherInFlight::Host),
            Some(resident) => {
                let start =
                    |local, shards| resident::start_gather(local, shards, comm, device, dtype);
                Ok(GatherInFlight::Device(
                    start(resident.params.as_ref(), &self.params.shards)?,
                    start(resident.frozen.as_ref(), &self.frozen.shards)?,
                ))
            }
        }
    }
}

/// Bytes this rank holds for parameters, gradients and optimizer state (f32 slices), and for
/// the weights held as codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankBytes {
    /// Parameter slices.
    pub params: usize,
    /// Gradient slices.
    pub grads: usize,
    /// AdamW moments.
    pub optimizer: usize,
    /// Codes and scales of the weights held quantized (QLoRA's base).
    pub quantized: usize,
}

/// What [`ZeroTrainer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// False when the loss scaler found inf/NaN and skipped the update.
    pub applied: bool,
    /// Global gradient norm before clipping (unscaled), when computed.
    pub grad_norm: Option<f32>,
}

/// Trains a [`ZeroSpec`] model on one rank of a communicator.
pub struct ZeroTrainer<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator> {
    spec: S,
    comm: C,
    device: B::Device,
    /// The embedding segment.
    pub embed: Segment<S::Embed, B::InnerBackend>,
    /// The blocks.
    pub blocks: Vec<Segment<S::Block, B::InnerBackend>>,
    /// The head.
    pub head: Segment<S::Head, B::InnerBackend>,
    options: ZeroOptions,
    steps: u64,
    micro_batches: u32,
    dropout_seed: Option<u64>,
    /// The device allocator's highest readings, sampled after every segment (GPU backends).
    memory_peak: MemoryPeak,
}

impl<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator> ZeroTrainer<B, S, C> {
    /// Shards initialised modules: every rank passes the same full modules (same seed), and keeps
    /// its slice, so the values do not depend on the world size. Each module's values are freed
    /// as soon as its segment is sharded.
    pub fn new(
        spec: S,
        comm: C,
        device: B::Device,
        embed: S::Embed,
        blocks: Vec<S::Block>,
        head: S::Head,
        options: ZeroOptions,
    ) -> Self {
        let no_source =
            |_: SegmentId, _: &str, _: &FlatLayout| -> Result<Vec<f32>, std::convert::Infallible> {
                unreachable!("every segment is read from its module")
            };
        match Self::build(
            spec, comm, device, embed, blocks, head, options, true, no_source,
        ) {
            Ok(trainer) => trainer,
        }
    }

    /// Shards a model whose values come from `source`, one segment at a time, so that no
    /// whole-model copy ever exists: the modules are templates (lazily initialised ones cost
    /// nothing), and `source(segment, prefix, layout)` returns a segment's whole f32 buffer in
    /// `layout`'s order (its tensors are named `prefix.` + the layout's names: the checkpoint
    /// names). Every rank asks for every segment and keeps its slice, so the values do not
    /// depend on the world size.
    #[allow(clippy::too_many_arguments)]
    pub fn from_source<E>(
        spec: S,
        comm: C,
        device: B::Device,
        embed: S::Embed,
        blocks: Vec<S::Block>,
        head: S::Head,
        options: ZeroOptions,
        source: impl FnMut(SegmentId, &str, &FlatLayout) -> Result<Vec<f32>, E>,
    ) -> Result<Self, E> {
        Self::build(
            spec, comm, device, embed, blocks, head, options, false, source,
        )
    }

    /// Shards every segment in model order, its values read from its module (`from_modules`) or
    /// from `source`; each segment's whole buffer lives only until its slice is kept.
    #[allow(clippy::too_many_arguments)]
    fn build<E>(
        spec: S,
        comm: C,
        device: B::Device,
        embed: S::Embed,
        blocks: Vec<S::Block>,
        head: S::Head,
        options: ZeroOptions,
        from_modules: bool,
        mut source: impl FnMut(SegmentId, &str, &FlatLayout) -> Result<Vec<f32>, E>,
    ) -> Result<Self, E> {
        let (rank, world) = (comm.rank(), comm.world_size());
        // Device placements move each segment's state as soon as it is sharded.
        let on_device = (&device, options.placement, options.compute_dtype);
        let embed = segment::<B, _, E>(
            embed,
            SegmentId::Embed,
            &spec.prefix(SegmentId::Embed),
            from_modules,
            &mut source,
            (rank, world),
            (options.frozen.as_ref(), options.quantized.as_ref()),
            on_device,
        )?;
        let mut sharded = Vec::with_capacity(blocks.len());
        for (i, block) in blocks.into_iter().enumerate() {
            let id = SegmentId::Block(i);
            sharded.push(segment::<B, _, E>(
                block,
                id,
                &spec.prefix(id),
                from_modules,
                &mut source,
                (rank, world),
                (options.frozen.as_ref(), options.quantized.as_ref()),
                on_device,
            )?);
        }
        let head = segment::<B, _, E>(
            head,
            SegmentId::Head,
            &spec.prefix(SegmentId::Head),
            from_modules,
            &mut source,
            (rank, world),
            (options.frozen.as_ref(), options.quantized.as_ref()),
            on_device,
        )?;
        Ok(Self {
            embed,
            blocks: sharded,
            head,
            spec,
            comm,
            device,
            options,
            steps: 0,
            micro_batches: 0,
            dropout_seed: None,
            memory_peak: MemoryPeak::default(),
        })
    }

    /// Seeds the backend's random generator before every segment runs, from `seed`, the step,
    /// the micro-batch, the rank and the segment. A checkpointed block then draws the same
    /// dropout masks when it is recomputed in backward as in forward (so its gradient is exact),
    /// and a run is reproducible. The backend's generator is process-global: thread ranks that
    /// use dropout interleave their draws, so only one rank per process is bit-reproducible.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = Some(seed);
    }

    /// Seeds the backend for `segment` (0 = embedding, 1 + i = block i, last = head).
    fn seed_segment(&self, segment: usize) {
        if let Some(seed) = self.dropout_seed {
            let mixed = mix(&[
                seed,
                self.steps,
                u64::from(self.micro_batches),
                self.comm.rank() as u64,
                segment as u64,
            ]);
            B::seed(&self.device, mixed);
            // The fused kernels draw from a per-thread stream: thread ranks do not interleave.
            crate::kernels::seed_thread(mixed);
        }
    }

    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// Optimizer steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Parameters of the whole model (every segment, unpadded; those held as codes too).
    pub fn parameter_count(&self) -> usize {
        self.embed.layout.len
            + self.blocks.iter().map(|b| b.layout.len).sum::<usize>()
            + self.head.layout.len
            + self.quantized_count()
    }

    /// Parameters held as codes (QLoRA's base: see [`ZeroOptions::quantized`]).
    pub fn quantized_count(&self) -> usize {
        self.embed.codes.count()
            + self.blocks.iter().map(|b| b.codes.count()).sum::<usize>()
            + self.head.codes.count()
    }

    /// Parameters that train (all of them unless some are frozen).
    pub fn trainable_count(&self) -> usize {
        self.embed.params.layout.len
            + self
                .blocks
                .iter()
                .map(|b| b.params.layout.len)
                .sum::<usize>()
            + self.head.params.layout.len
    }

    /// Bytes of parameter, gradient and optimizer slices on this rank (frozen parameters have
    /// only the first).
    pub fn rank_bytes(&self) -> RankBytes {
        let shard_sum = |of: &dyn Fn(&ShardedParams) -> usize| -> usize {
            std::iter::once(&self.embed.params)
                .chain(std::iter::once(&self.embed.frozen))
                .chain(self.blocks.iter().flat_map(|b| [&b.params, &b.frozen]))
                .chain([&self.head.params, &self.head.frozen])
                .map(of)
                .sum()
        };
        let all = shard_sum(&|p| p.shards.shard_len());
        let trainable: usize = std::iter::once(self.embed.params.shards.shard_len())
            .chain(self.blocks.iter().map(|b| b.params.shards.shard_len()))
            .chain(std::iter::once(self.head.params.shards.shard_len()))
            .sum();
        let f32_bytes = std::mem::size_of::<f32>();
        RankBytes {
            params: all * f32_bytes,
            grads: trainable * f32_bytes,
            optimizer: 2 * trainable * f32_bytes,
            quantized: self.embed.codes.bytes()
                + self.blocks.iter().map(|b| b.codes.bytes()).sum::<usize>()
                + self.head.codes.bytes(),
        }
    }

    /// A working copy of `segment` from its gathered parameters.
    fn module<M: Module<B> + Clone>(
        &self,
        segment: &Segment<M, B::InnerBackend>,
        values: &Gathered<B::InnerBackend>,
        codes: &[HeldCodes],
        trainable: bool,
    ) -> M {
        match values {
            Gathered::Host(full) => self.host_module(segment, full, codes, trainable),
            Gathered::Device(params, frozen) => load_flat_tensors::<B, M>(
                segment.template.clone(),
                &segment.layout,
                (params.as_ref(), frozen.as_ref()),
                segment.params.layout.len,
                trainable,
                self.options.compute_dtype,
                codes,
                &self.device,
            ),
        }
    }

    /// A working copy of `segment` from its combined buffer on the host.
    fn host_module<M: Module<B> + Clone>(
        &self,
        segment: &Segment<M, B::InnerBackend>,
        full: &[f32],
        codes: &[HeldCodes],
        trainable: bool,
    ) -> M {
        // Frozen parameters (placed after the trainable ones) never require gradients.
        let trainable_len = if trainable {
            segment.params.layout.len
        } else {
            0
        };
        load_flat_parts(
            segment.template.clone(),
            &segment.layout,
            full,
            &self.device,
            trainable_len,
            self.options.compute_dtype,
            codes,
        )
    }

    fn gather<M>(&self, segment: &Segment<M, B::InnerBackend>) -> Result<Vec<f32>, CommError> {
        segment.gather_host(&self.comm)
    }

    /// The segment's module, built from its gathered weights: kept ones (`zero_level` 2) when
    /// there are, else gathered now. One rank holds its whole segment already and builds the
    /// module from it without a gathered copy. The gathered buffer is dropped as soon as the
    /// module exists, unless `keep` (stage 2), when it is returned to be kept until backward.
    #[allow(clippy::type_complexity)]
    fn working_copy<M: Module<B> + Clone>(
        &self,
        segment: &Segment<M, B::InnerBackend>,
        kept: Option<Gathered<B::InnerBackend>>,
        trainable: bool,
        keep: bool,
    ) -> Result<(M, Option<Gathered<B::InnerBackend>>), CommError> {
        // The codes (gathered each time: they are small) live as long as the module.
        let codes = segment.codes.held(&self.comm)?;
        self.copy_with(segment, kept, trainable, keep, &codes)
    }

    /// [`Self::working_copy`] with the segment's codes at hand.
    #[allow(clippy::type_complexity)]
    fn copy_with<M: Module<B> + Clone>(
        &self,
        segment: &Segment<M, B::InnerBackend>,
        kept: Option<Gathered<B::InnerBackend>>,
        trainable: bool,
        keep: bool,
        codes: &[HeldCodes],
    ) -> Result<(M, Option<Gathered<B::InnerBackend>>), CommError> {
        if let Some(values) = kept {
            let module = self.module(segment, &values, codes, trainable);
            return Ok((module, keep.then_some(values)));
        }
        let on_host = segment.resident.is_none();
        if on_host && self.comm.world_size() == 1 && !segment.has_frozen() {
            let len = segment.params.layout.len;
            let local = &segment.params.local[..len];
            let module = self.host_module(segment, local, codes, trainable);
            return Ok((module, None));
        }
        // On the device with one rank this is the state itself (views, no copy).
        let values = segment.gather(&self.comm, &self.device, self.options.compute_dtype)?;
        let module = self.module(segment, &values, codes, trainable);
        Ok((module, keep.then_some(values)))
    }

    /// Whether this trainer overlaps communication with computation ([`Overlap`]).
    fn overlaps(&self) -> bool {
        match self.options.overlap {
            Overlap::On => true,
            Overlap::Off => false,
            Overlap::Auto => {
                self.options.placement != StatePlacement::Host
                    && self.comm.device_collectives().is_some()
            }
        }
    }

    /// Starts gathering `segment` ahead of its turn when `ahead`; its values, once landed
    /// ([`Self::landed`]), go to [`Self::working_copy`] as kept ones.
    fn gather_ahead<M>(
        &self,
        ahead: bool,
        segment: &Segment<M, B::InnerBackend>,
    ) -> Result<Option<GatherInFlight<B::InnerBackend>>, CommError> {
        if !ahead {
            return Ok(None);
        }
        let dtype = self.options.compute_dtype;
        segment
            .start_gather(&self.comm, &self.device, dtype)
            .map(Some)
    }

    /// In backward, starts gathering the segment before block `index` (block `index − 1`, or
    /// the embedding before block 0) when overlapping and it needs a gather: it is recomputed
    /// (no graph kept from forward in `graphs`) and no weights were kept for it (ZeRO-2).
    fn backward_gather_ahead(
        &self,
        overlap: bool,
        index: usize,
        graphs: &[Option<KeptGraph<B, S::Block>>],
    ) -> Result<Option<GatherInFlight<B::InnerBackend>>, CommError> {
        match index.checked_sub(1) {
            Some(before) => {
                let recomputed = graphs.get(before).is_some_and(|graph| graph.is_none());
                let block = &self.blocks[before];
                self.gather_ahead(overlap && recomputed && block.kept.is_none(), block)
            }
            None => self.gather_ahead(overlap && self.embed.kept.is_none(), &self.embed),
        }
    }

    /// Starts reduce-scattering segment `id`'s full gradient, and lands the reduce-scatter
    /// started before it (`behind`). Overlapping, the new one stays in flight (returned) until
    /// the next call; otherwise it lands at once too.
    fn reduce_behind(
        &mut self,
        overlap: bool,
        behind: Behind<B::InnerBackend>,
        id: SegmentId,
        full: Flat<B::InnerBackend>,
    ) -> Result<Behind<B::InnerBackend>, CommError> {
        let (comm, device) = (&self.comm, &self.device);
        let started = match id {
            SegmentId::Embed => self.embed.start_reduce_scatter(comm, device, full)?,
            SegmentId::Block(i) => self.blocks[i].start_reduce_scatter(comm, device, full)?,
            SegmentId::Head => self.head.start_reduce_scatter(comm, device, full)?,
        };
        self.land(behind)?;
        if overlap {
            return Ok(Some((id, started)));
        }
        self.land(Some((id, started)))?;
        Ok(None)
    }

    /// Waits for a reduce-scatter started by [`Self::reduce_behind`] and adds this rank's slice
    /// to its segment's gradient.
    fn land(&mut self, in_flight: Behind<B::InnerBackend>) -> Result<(), CommError> {
        let Some((id, in_flight)) = in_flight else {
            return Ok(());
        };
        let slice = in_flight.finish(&self.comm)?;
        match id {
            SegmentId::Embed => self.embed.add_grad(slice),
            SegmentId::Block(i) => self.blocks[i].add_grad(slice),
            SegmentId::Head => self.head.add_grad(slice),
        }
        Ok(())
    }

    /// The values of a gather started ahead, once it has finished.
    fn landed(
        &self,
        in_flight: Option<GatherInFlight<B::InnerBackend>>,
    ) -> Result<Option<Gathered<B::InnerBackend>>, CommError> {
        in_flight.map(|g| g.finish(&self.comm)).transpose()
    }

    /// [`Self::working_copy`] for inference on the inner backend, with the segment's codes,
    /// which must outlive the module (converting it reads its parameters, which releases the
    /// codes they held).
    #[allow(clippy::type_complexity)]
    fn inner_copy<M: AutodiffModule<B> + Clone>(
        &self,
        segment: &Segment<M, B::InnerBackend>,
    ) -> Result<(M::InnerModule, Vec<HeldCodes>), CommError> {
        let codes = segment.codes.held(&self.comm)?;
        let (module, _) = self.copy_with(segment, None, false, false, &codes)?;
        Ok((module.valid(), codes))
    }

    /// The weights held as codes, whole, by checkpoint name (what [`ZeroTrainer::named_parameters`]
    /// leaves out). Every rank must call it.
    pub fn named_codes(&self) -> Result<Vec<(String, Arc<QuantizedMatrix>)>, CommError> {
        fn named<M, I: Backend>(
            prefix: String,
            segment: &Segment<M, I>,
            comm: &dyn Communicator,
            out: &mut Vec<(String, Arc<QuantizedMatrix>)>,
        ) -> Result<(), CommError> {
            let held = segment.codes.held(comm)?;
            for (entry, held) in segment.codes.entries.iter().zip(held) {
                out.push((
                    checkpoint::tensor_name(&prefix, &entry.entry.name),
                    held.matrix,
                ));
            }
            Ok(())
        }
        let mut out = Vec::new();
        named(
            self.spec.prefix(SegmentId::Embed),
            &self.embed,
            &self.comm,
            &mut out,
        )?;
        for (i, b) in self.blocks.iter().enumerate() {
            named(
                self.spec.prefix(SegmentId::Block(i)),
                b,
                &self.comm,
                &mut out,
            )?;
        }
        named(
            self.spec.prefix(SegmentId::Head),
            &self.head,
            &self.comm,
            &mut out,
        )?;
        Ok(out)
    }

    /// Forward and backward of one micro-batch; gradients accumulate into each rank's slices
    /// until [`ZeroTrainer::step`]. Returns this micro-batch's (unscaled) loss.
    ///
    /// What lives at a time besides the sharded state: the saved block inputs (or the graphs of
    /// blocks that are not checkpointed, with their weights), one segment's module and its
    /// gradients, and the tied head's gradient slice; gathered buffers and autodiff gradients
    /// are dropped as soon as they have been read.
    pub fn forward_backward(&mut self, batch: &S::Batch) -> Result<f32, CommError> {
        // One rank has nothing to gather, so nothing to keep between forward and backward.
        let keep = self.options.zero_level <= 2 && self.comm.world_size() > 1;
        let tied = self.spec.head_reads_embed();
        let world = self.comm.world_size() as f32;
        let scale = self.options.loss_scaler.map_or(1.0, |s| s.scale);
        let head_segment = self.blocks.len() + 1;

        // Overlapping, each segment's gather starts before the segment ahead of it computes
        // (`ahead` is the one in flight), and each gradient's reduce-scatter lands after the
        // block behind it has run backward (`behind`), so that NCCL works while the GPU computes.
        let overlap = self.overlaps();
        let blocks = self.blocks.len();

        // 1. Forward without graphs (checkpointed blocks) or with (the others).
        let (embed, kept) = self.working_copy(&self.embed, None, false, keep)?;
        self.embed.kept = kept;
        let mut ahead = match self.blocks.first() {
            Some(first) => self.gather_ahead(overlap, first)?,
            None => self.gather_ahead(overlap, &self.head)?,
        };
        self.seed_segment(0);
        let mut hidden = self.spec.embed(&embed, batch).detach();
        drop(embed);

        let mut saved_inputs = Vec::with_capacity(blocks);
        let mut graphs: Vec<Option<KeptGraph<B, S::Block>>> = Vec::new();
        for index in 0..blocks {
            let checkpointed = self.options.checkpoint.get(index).copied().unwrap_or(false);
            let gathered = self.landed(ahead.take())?;
            ahead = match self.blocks.get(index + 1) {
                Some(next) => self.gather_ahead(overlap, next)?,
                None => self.gather_ahead(overlap, &self.head)?,
            };
            let (block, kept) =
                self.working_copy(&self.blocks[index], gathered, !checkpointed, keep)?;
            self.blocks[index].kept = kept;
            self.seed_segment(1 + index);
            if checkpointed {
                saved_inputs.push(hidden.clone());
                hidden = self.spec.block(index, &block, hidden, batch).detach();
                graphs.push(None);
            } else {
                // Keep the graph: the input leaf, the output and the module (its leaves).
                let input = hidden.clone().require_grad();
                let output = self.spec.block(index, &block, input.clone(), batch);
                saved_inputs.push(hidden.clone());
                hidden = output.clone().detach();
                graphs.push(Some((input, output, block)));
            }
            self.memory_peak.sample(&self.device);
        }

        // 2. Head and loss, differentiated first.
        let gathered = self.landed(ahead.take())?;
        let (head, _) = self.working_copy(&self.head, gathered, true, false)?;
        let tied_embed = match (tied, &self.embed.kept) {
            (false, _) => None,
            (true, Some(kept)) => {
                let codes = self.embed.codes.held(&self.comm)?;
                Some(self.module(&self.embed, kept, &codes, true))
            }
            (true, None) => Some(self.working_copy(&self.embed, None, true, false)?.0),
        };
        // Backward's first gather (the last block, when it is recomputed from gathered weights).
        ahead = self.backward_gather_ahead(overlap, blocks, &graphs)?;
        let input = hidden.require_grad();
        self.seed_segment(head_segment);
        let loss = self
            .spec
            .loss(&head, tied_embed.as_ref(), input.clone(), batch);
        let loss_value: f32 = loss
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("the loss is a float")[0];
        let grads = (loss * (scale / world)).backward();
        let head_grad = self.head.grads_of::<B>(&head, &grads, &self.device);
        // The tied embedding's gradient from the head, reduce-scattered now (only this rank's
        // slice waits for the lookup's gradient in step 4, not the whole table).
        let tied_grad =
            tied_embed.map(|embed| self.embed.grads_of::<B>(&embed, &grads, &self.device));
        let mut upstream = Tensor::<B, 3>::from_inner(
            input
                .grad(&grads)
                .expect("the loss depends on the hidden states"),
        );
        drop((grads, head));
        let mut behind = self.reduce_behind(overlap, None, SegmentId::Head, head_grad)?;
        self.memory_peak.sample(&self.device);
        let tied_slice = match tied_grad {
            Some(full) => Some(self.embed.reduce_scatter(&self.comm, &self.device, full)?),
            None => None,
        };

        // 3. Blocks in reverse: recompute (checkpointed) or reuse the graph, then backward.
        for index in (0..blocks).rev() {
            let graph = graphs.pop().flatten();
            let gathered = self.landed(ahead.take())?;
            ahead = self.backward_gather_ahead(overlap, index, &graphs)?;
            let (input, output, block) = match graph {
                Some(graph) => graph,
                None => {
                    let kept = self.blocks[index].kept.take().or(gathered);
                    let (block, _) = self.working_copy(&self.blocks[index], kept, true, false)?;
                    let input = saved_inputs[index].clone().require_grad();
                    // The same seed as in forward: the same dropout masks.
                    self.seed_segment(1 + index);
                    let output = self.spec.block(index, &block, input.clone(), batch);
                    (input, output, block)
                }
            };
            self.blocks[index].kept = None;
            let grads = (output * upstream).sum().backward();
            let block_grad = self.blocks[index].grads_of::<B>(&block, &grads, &self.device);
            upstream = Tensor::from_inner(input.grad(&grads).expect("a block uses its input"));
            drop((grads, block));
            behind = self.reduce_behind(overlap, behind, SegmentId::Block(index), block_grad)?;
            self.memory_peak.sample(&self.device);
        }

        // 4. The embedding segment.
        let kept = self.embed.kept.take().or(self.landed(ahead.take())?);
        let (embed, _) = self.working_copy(&self.embed, kept, true, false)?;
        self.seed_segment(0);
        let output = self.spec.embed(&embed, batch);
        let grads = (output * upstream).sum().backward();
        let embed_grad = self.embed.grads_of::<B>(&embed, &grads, &self.device);
        drop((grads, embed));
        self.land(behind)?;
        let mut slice = self
            .embed
            .reduce_scatter(&self.comm, &self.device, embed_grad)?;
        if let Some(tied_slice) = tied_slice {
            slice = slice.plus(tied_slice);
        }
        self.embed.add_grad(slice);
        self.memory_peak.sample(&self.device);
        self.micro_batches += 1;
        Ok(loss_value)
    }

    /// The highest readings of the training device's allocator (bytes in use, bytes reserved)
    /// since [`Self::reset_device_memory_peak`], sampled after every segment of forward and
    /// backward and after each optimizer step; `None` on the CPU backend (see
    /// [`crate::device_memory`]).
    pub fn device_memory_peak(&self) -> Option<DeviceMemory> {
        self.memory_peak.get()
    }

    /// Starts [`Self::device_memory_peak`] again.
    pub fn reset_device_memory_peak(&mut self) {
        self.memory_peak.reset();
    }

    /// Hands the device allocator's free pages back to the device (cubecl keeps them otherwise,
    /// so its reservation never shrinks) and starts [`Self::device_memory_peak`] again: after
    /// a micro-batch that went over a memory budget was discarded.
    pub fn release_device_memory(&mut self) {
        B::memory_cleanup(&self.device);
        self.memory_peak.reset();
    }

    fn grad_slices(&mut self) -> Vec<&mut [f32]> {
        grad_slices(&mut self.embed, &mut self.blocks, &mut self.head)
    }

    /// Applies the gradients accumulated since the last step with AdamW at learning rate `lr`,
    /// then zeroes them. Gradients of several micro-batches are averaged (gradient accumulation:
    /// k micro-batches of b rows step like one batch of k·b rows).
    pub fn step(&mut self, lr: f32) -> Result<StepReport, CommError> {
        if self.options.placement != StatePlacement::Host {
            let report = self.step_on_device(lr);
            // AdamW's temporaries on the device are the step's own peak.
            self.memory_peak.sample(&self.device);
            return report;
        }
        let scale =
            self.options.loss_scaler.map_or(1.0, |s| s.scale) * self.micro_batches.max(1) as f32;
        if let Some(mut scaler) = self.options.loss_scaler {
            let slices: Vec<&[f32]> = std::iter::once(self.embed.grad.as_slice())
                .chain(self.blocks.iter().map(|b| b.grad.as_slice()))
                .chain(std::iter::once(self.head.grad.as_slice()))
                .collect();
            let applied = scaler.update(&self.comm, &slices)?;
            self.options.loss_scaler = Some(scaler);
            if !applied {
                self.zero_grad();
                return Ok(StepReport {
                    applied: false,
                    grad_norm: None,
                });
            }
        }
        if scale != 1.0 {
            for slice in self.grad_slices() {
                for g in slice.iter_mut() {
                    *g /= scale;
                }
            }
        }
        let grad_norm = match self.options.max_grad_norm {
            Some(max) => {
                let mut slices = grad_slices(&mut self.embed, &mut self.blocks, &mut self.head);
                Some(clip_grad_norm(&self.comm, &mut slices, max)?)
            }
            None => None,
        };
        self.steps += 1;
        let (config, step) = (self.options.adamw, self.steps);
        // Segments update in parallel on this rank's threads (each element's update is the
        // same IEEE operations whichever thread runs it).
        self.segments_mut()
            .into_par_iter()
            .for_each(|(state, params, grad)| state.step(&config, params, grad, lr, step));
        self.zero_grad();
        Ok(StepReport {
            applied: true,
            grad_norm,
        })
    }

    /// [`ZeroTrainer::step`] with the gradients on the device ([`StatePlacement::Device`] and
    /// [`StatePlacement::Offload`]): the same operations as the host path, as tensor operations,
    /// and one read of two numbers (when the loss scaler or clipping needs them) instead of any
    /// read of the gradients; AdamW on the device, or, offloaded, on the host between one read
    /// of each segment's gradient and one upload of its weights.
    fn step_on_device(&mut self, lr: f32) -> Result<StepReport, CommError> {
        let divisor =
            self.options.loss_scaler.map_or(1.0, |s| s.scale) * self.micro_batches.max(1) as f32;
        // With the state on the device, AdamW applies the unscale and the clipping as it reads
        // the gradient (one pass instead of three); offloaded, the gradient goes down unscaled
        // and clipped.
        let deferred = self.options.placement == StatePlacement::Device;
        let mut factors = GradFactors::default();
        // Unscaling first changes no overflow verdict: the divisor is finite and at least 1, so
        // a gradient is inf or NaN after it exactly when it was before.
        if divisor != 1.0 {
            if deferred {
                factors.divisor = divisor;
            } else {
                for resident in self.residents_mut() {
                    resident.unscale(divisor);
                }
            }
        }
        let wants_health =
            self.options.loss_scaler.is_some() || self.options.max_grad_norm.is_some();
        let (squares, overflow) = match wants_health {
            true => self.grad_health(factors.divisor),
            false => (0.0, false),
        };
        if let Some(mut scaler) = self.options.loss_scaler {
            let applied = scaler.update_from(&self.comm, overflow)?;
            self.options.loss_scaler = Some(scaler);
            if !applied {
                self.zero_grad();
                return Ok(StepReport {
                    applied: false,
                    grad_norm: None,
                });
            }
        }
        let grad_norm = match self.options.max_grad_norm {
            Some(max) => {
                let norm = global_norm_of(&self.comm, squares)?;
                if let Some(coefficient) = clip_coefficient(norm, max) {
                    if deferred {
                        factors.coefficient = coefficient;
                    } else {
                        for resident in self.residents_mut() {
                            resident.scale_grad(coefficient);
                        }
                    }
                }
                Some(norm)
            }
            None => None,
        };
        self.steps += 1;
        let (config, step) = (self.options.adamw, self.steps);
        match self.options.placement {
            StatePlacement::Offload => self.offloaded_adamw(lr),
            _ => {
                for resident in self.residents_mut() {
                    resident.adamw(&config, lr, step, factors);
                }
            }
        }
        self.zero_grad();
        Ok(StepReport {
            applied: true,
            grad_norm,
        })
    }

    /// AdamW on the host for offloaded state, a segment at a time (so the host holds one
    /// segment's gradient, not the model's): its gradient comes down in one read, the update
    /// runs on the host's threads, and its weights go up in one upload.
    fn offloaded_adamw(&mut self, lr: f32) {
        let (config, step) = (self.options.adamw, self.steps);
        let (device, dtype) = (&self.device, self.options.compute_dtype);
        self.embed.offloaded_step(&config, lr, step, device, dtype);
        for block in self.blocks.iter_mut() {
            block.offloaded_step(&config, lr, step, device, dtype);
        }
        self.head.offloaded_step(&config, lr, step, device, dtype);
    }

    /// This rank's squared norm of the gradient divided by `divisor` (summed in f64 where the
    /// device can, as the host path does) and whether some gradient is inf or NaN: one read of
    /// two numbers from the device.
    fn grad_health(&self, divisor: f32) -> (f32, bool) {
        let wide = <B::InnerBackend as Backend>::supports_dtype(&self.device, DType::F64);
        let total = self
            .residents()
            .filter_map(|resident| resident.grad_health(wide, divisor))
            .reduce(|a, b| a.add(b));
        let Some(total) = total else {
            return (0.0, false);
        };
        let values = total
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .expect("two floats");
        (values[0] as f32, !values[1].is_finite() || values[1] != 0.0)
    }

    /// Every segment's device state, embedding first.
    fn residents(&self) -> impl Iterator<Item = &Resident<B::InnerBackend>> {
        std::iter::once(&self.embed.resident)
            .chain(self.blocks.iter().map(|b| &b.resident))
            .chain(std::iter::once(&self.head.resident))
            .flatten()
    }

    /// [`Self::residents`], mutably.
    fn residents_mut(&mut self) -> impl Iterator<Item = &mut Resident<B::InnerBackend>> {
        std::iter::once(&mut self.embed.resident)
            .chain(self.blocks.iter_mut().map(|b| &mut b.resident))
            .chain(std::iter::once(&mut self.head.resident))
            .flatten()
    }

    fn segments_mut(&mut self) -> Vec<(&mut AdamWState, &mut [f32], &[f32])> {
        let mut out = Vec::new();
        let Self {
            embed,
            blocks,
            head,
            ..
        } = self;
        out.push((
            &mut embed.state,
            embed.params.local.as_mut_slice(),
            embed.grad.as_slice(),
        ));
        for b in blocks.iter_mut() {
            out.push((
                &mut b.state,
                b.params.local.as_mut_slice(),
                b.grad.as_slice(),
            ));
        }
        out.push((
            &mut head.state,
            head.params.local.as_mut_slice(),
            head.grad.as_slice(),
        ));
        out
    }

    /// Zeroes the accumulated gradient slices.
    pub fn zero_grad(&mut self) {
        self.micro_batches = 0;
        for slice in self.grad_slices() {
            slice.fill(0.0);
        }
        for resident in self.residents_mut() {
            resident.zero_grad();
        }
    }

    /// Every segment's checkpoint parts in model order: its trainable parameters with their
    /// moments, then (when some are frozen) its frozen parameters alone. With the state on the
    /// device, this reads it back to the host (this rank's slices, every segment).
    fn checkpoint_segments(&self) -> Vec<SegmentState<'_>> {
        fn parts<'a, M, I: Backend>(
            prefix: String,
            segment: &'a Segment<M, I>,
        ) -> Vec<SegmentState<'a>> {
            let (params, frozen, exp_avg, exp_avg_sq) = segment.host_state();
            let mut out = vec![SegmentState {
                prefix: prefix.clone(),
                params,
                exp_avg,
                exp_avg_sq,
                trains: true,
            }];
            if segment.has_frozen() {
                out.push(SegmentState {
                    prefix,
                    params: frozen,
                    exp_avg: Cow::Borrowed(&[]),
                    exp_avg_sq: Cow::Borrowed(&[]),
                    trains: false,
                });
            }
            out
        }
        let mut out = parts(self.spec.prefix(SegmentId::Embed), &self.embed);
        for (i, b) in self.blocks.iter().enumerate() {
            out.extend(parts(self.spec.prefix(SegmentId::Block(i)), b));
        }
        out.extend(parts(self.spec.prefix(SegmentId::Head), &self.head));
        out
    }

    /// Saves a world-size-independent checkpoint into `dir` (every rank must call it; rank 0
    /// writes, one segment at a time), and returns the files rank 0 wrote with their sizes and
    /// hashes. See [`crate::checkpoint`].
    pub fn save(&self, dir: &Path) -> Result<Vec<FileDigest>, CheckpointError> {
        let counters = TrainCounters {
            step: self.steps,
            loss_scale: self.options.loss_scaler.map(|s| s.scale),
            loss_scale_clean_steps: self.options.loss_scaler.map_or(0, |s| s.clean_steps),
        };
        checkpoint::save(&self.comm, dir, &self.checkpoint_segments(), counters)
    }

    /// Loads a checkpoint saved with any number of ranks: this rank keeps its slices of the
    /// weights and of the optimizer state, and the step and loss-scale counters.
    pub fn load(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        // The parts of `checkpoint_segments`, from the layouts alone (nothing read back).
        fn layouts<M, I: Backend>(
            prefix: String,
            segment: &Segment<M, I>,
        ) -> Vec<(String, FlatLayout, bool)> {
            let mut out = vec![(prefix.clone(), segment.params.layout.clone(), true)];
            if segment.has_frozen() {
                out.push((prefix, segment.frozen.layout.clone(), false));
            }
            out
        }
        let mut segments = layouts(self.spec.prefix(SegmentId::Embed), &self.embed);
        for (i, b) in self.blocks.iter().enumerate() {
            segments.extend(layouts(self.spec.prefix(SegmentId::Block(i)), b));
        }
        segments.extend(layouts(self.spec.prefix(SegmentId::Head), &self.head));
        let (loaded, counters) =
            checkpoint::load(dir, &segments, self.comm.rank(), self.comm.world_size())?;
        let mut loaded = loaded.into_iter();
        // The same parts in the same order as `checkpoint_segments`.
        fn apply<M, I: Backend>(
            segment: &mut Segment<M, I>,
            loaded: &mut impl Iterator<Item = LoadedSegment>,
            device: &I::Device,
            dtype: Option<DType>,
        ) {
            let part = loaded.next().expect("one loaded part per part");
            segment.params.local = part.params;
            segment.state.exp_avg = part.exp_avg;
            segment.state.exp_avg_sq = part.exp_avg_sq;
            if segment.has_frozen() {
                segment.frozen.local = loaded.next().expect("the frozen part").params;
            }
            segment.place(device, segment.placement, dtype);
        }
        let dtype = self.options.compute_dtype;
        apply(&mut self.embed, &mut loaded, &self.device, dtype);
        for b in self.blocks.iter_mut() {
            apply(b, &mut loaded, &self.device, dtype);
        }
        apply(&mut self.head, &mut loaded, &self.device, dtype);
        self.steps = counters.step;
        if let (Some(scaler), Some(scale)) =
            (self.options.loss_scaler.as_mut(), counters.loss_scale)
        {
            scaler.scale = scale;
            scaler.clean_steps = counters.loss_scale_clean_steps;
        }
        self.zero_grad();
        Ok(())
    }

    /// Statistics of every parameter and of its accumulated gradient (as the next step would
    /// apply it: unscaled and averaged over micro-batches), gathered across shards. Every rank
    /// must call it; all get the same table.
    pub fn inspect(&self) -> Result<Vec<ParamStats>, CommError> {
        let divisor =
            self.options.loss_scaler.map_or(1.0, |s| s.scale) * self.micro_batches.max(1) as f32;
        let mut out = Vec::new();
        let segments = self.checkpoint_segments();
        let mut grads = std::iter::once(self.embed.host_grad())
            .chain(self.blocks.iter().map(|b| b.host_grad()))
            .chain(std::iter::once(self.head.host_grad()));
        for segment in &segments {
            if segment.params.layout.len == 0 {
                // An empty part (all of the segment frozen): no collective, nothing to report.
                if segment.trains {
                    grads.next();
                }
                continue;
            }
            let values = segment.params.gather(&self.comm)?;
            // Frozen parts have no gradient.
            let grad = match segment.trains {
                true => {
                    let mut grad = self
                        .comm
                        .all_gather(&grads.next().expect("one gradient per trained part"))?;
                    grad.truncate(values.len());
                    Some(grad)
                }
                false => None,
            };
            let has_grad = self.micro_batches > 0 && grad.is_some();
            for entry in &segment.params.layout.entries {
                let range = entry.offset..entry.offset + entry.len();
                let (mean, std, min, max) = moments(&values[range.clone()]);
                let (grad_mean, grad_std) = match &grad {
                    Some(grad) => {
                        let grad_values: Vec<f32> =
                            grad[range].iter().map(|g| g / divisor).collect();
                        let (m, s, _, _) = moments(&grad_values);
                        (m, s)
                    }
                    None => (0.0, 0.0),
                };
                out.push(ParamStats {
                    name: checkpoint::tensor_name(&segment.prefix, &entry.name),
                    shape: entry.shape.clone(),
                    mean,
                    std,
                    min,
                    max,
                    grad_mean: has_grad.then_some(grad_mean),
                    grad_std: has_grad.then_some(grad_std),
                });
            }
        }
        Ok(out)
    }

    /// Every parameter under its checkpoint name (the spec's prefixes, so a model's zoo names),
    /// gathered: `(name, shape, values)`. Every rank must call it.
    pub fn named_parameters(&self) -> Result<Vec<NamedTensor>, CommError> {
        let mut out = Vec::new();
        for segment in self.checkpoint_segments() {
            let values = segment.params.gather(&self.comm)?;
            for entry in &segment.params.layout.entries {
                out.push((
                    checkpoint::tensor_name(&segment.prefix, &entry.name),
                    entry.shape.clone(),
                    values[entry.offset..entry.offset + entry.len()].to_vec(),
                ));
            }
        }
        Ok(out)
    }

    /// The trainable parameters alone under their checkpoint names, gathered (frozen ones are
    /// not: an adapter's few tensors without the base). Every rank must call it.
    pub fn named_trainable_parameters(&self) -> Result<Vec<NamedTensor>, CommError> {
        let mut out = Vec::new();
        for segment in self.checkpoint_segments().into_iter().filter(|s| s.trains) {
            let values = segment.params.gather(&self.comm)?;
            for entry in &segment.params.layout.entries {
                out.push((
                    checkpoint::tensor_name(&segment.prefix, &entry.name),
                    entry.shape.clone(),
                    values[entry.offset..entry.offset + entry.len()].to_vec(),
                ));
            }
        }
        Ok(out)
    }

    /// Gathers every segment's full parameters: `(segment name, layout, values)`, with segments
    /// named `embed`, `blocks.{i}`, `head`. Weights held as codes have entries past the values
    /// and no values here ([`ZeroTrainer::named_codes`] gathers them).
    pub fn gather_all(&self) -> Result<Vec<(String, FlatLayout, Vec<f32>)>, CommError> {
        let mut out = vec![(
            "embed".to_string(),
            self.embed.layout.clone(),
            self.gather(&self.embed)?,
        )];
        for (i, block) in self.blocks.iter().enumerate() {
            out.push((
                format!("blocks.{i}"),
                block.layout.clone(),
                self.gather(block)?,
            ));
        }
        out.push((
            "head".to_string(),
            self.head.layout.clone(),
            self.gather(&self.head)?,
        ));
        Ok(out)
    }
}

/// The module type a spec runs on `B`'s inner backend.
type Inner<B, M> = <M as AutodiffModule<B>>::InnerModule;

impl<B, S, C> ZeroTrainer<B, S, C>
where
    B: AutodiffBackend,
    C: Communicator,
    S: ZeroSpec<B> + ZeroSpec<B::InnerBackend>,
    <S as ZeroSpec<B>>::Embed:
        AutodiffModule<B, InnerModule = <S as ZeroSpec<B::InnerBackend>>::Embed>,
    <S as ZeroSpec<B>>::Block:
        AutodiffModule<B, InnerModule = <S as ZeroSpec<B::InnerBackend>>::Block>,
    <S as ZeroSpec<B>>::Head:
        AutodiffModule<B, InnerModule = <S as ZeroSpec<B::InnerBackend>>::Head>,
{
    /// Runs the model forward for evaluation on `B`'s inner backend (no autodiff graph, so no
    /// dropout either), one gathered segment at a time, and returns what `head` makes of the last
    /// hidden states: `head(spec, head module, embedding module when the head reads it, hidden)`
    /// (logits, a loss). Only one segment's weights exist at a time, never the whole model.
    ///
    /// The gathers are collectives: every rank calls it the same number of times, each with its
    /// own batch (its share of the evaluation data).
    pub fn infer<T>(
        &self,
        batch: &<S as ZeroSpec<B::InnerBackend>>::Batch,
        head: impl FnOnce(
            &S,
            &Inner<B, <S as ZeroSpec<B>>::Head>,
            Option<&Inner<B, <S as ZeroSpec<B>>::Embed>>,
            Tensor<B::InnerBackend, 3>,
        ) -> T,
    ) -> Result<T, CommError> {
        let inner = <S as ZeroSpec<B::InnerBackend>>::embed;
        let embed = self.inner_copy(&self.embed)?;
        let mut hidden = inner(&self.spec, &embed.0, batch);
        drop(embed);
        for (index, block) in self.blocks.iter().enumerate() {
            let (module, _codes) = self.inner_copy(block)?;
            hidden =
                <S as ZeroSpec<B::InnerBackend>>::block(&self.spec, index, &module, hidden, batch);
        }
        let (head_module, _head_codes) = self.inner_copy(&self.head)?;
        // A tied head reads the embedding again (gathered anew: holding it through the blocks
        // would keep the largest segment alive for the whole pass).
        let tied = match ZeroSpec::<B>::head_reads_embed(&self.spec) {
            true => Some(self.inner_copy(&self.embed)?),
            false => None,
        };
        Ok(head(
            &self.spec,
            &head_module,
            tied.as_ref().map(|(module, _)| module),
            hidden,
        ))
    }
}

impl<B, S, C> ZeroTrainer<B, S, C>
where
    B: AutodiffBackend,
    C: Communicator,
    S: ZeroSpec<B> + ZeroSpec<B::InnerBackend>,
    <S as ZeroSpec<B>>::Embed:
        AutodiffModule<B, InnerModule = <S as ZeroSpec<B::InnerBackend>>::Embed>,
    <S as ZeroSpec<B>>::Block:
        AutodiffModule<B, InnerModule = <S as ZeroSpec<B::InnerBackend>>::Block>,
    <S as ZeroSpec<B>>::Head:
        AutodiffModule<B, InnerModule = <S as ZeroSpec<B::InnerBackend>>::Head>,
{
    /// The spec's loss of `batch` on the inner backend ([`ZeroTrainer::infer`] ending in
    /// [`ZeroSpec::loss`]): a validation loss, with the same collectives on every rank.
    pub fn infer_loss(
        &self,
        batch: &<S as ZeroSpec<B::InnerBackend>>::Batch,
    ) -> Result<f32, CommError> {
        let loss = self.infer(batch, |spec, head, embed, hidden| {
            ZeroSpec::<B::InnerBackend>::loss(spec, head, embed, hidden, batch)
        })?;
        Ok(loss
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("the loss is a float")[0])
    }
}

/// One segment of `module`'s structure, its values read from the module itself or from `source`,
/// sharded for `(rank, world)`.
#[allow(clippy::too_many_arguments)]
fn segment<B: AutodiffBackend, M: Module<B>, E>(
    module: M,
    id: SegmentId,
    prefix: &str,
    from_module: bool,
    source: &mut impl FnMut(SegmentId, &str, &FlatLayout) -> Result<Vec<f32>, E>,
    ranks: (usize, usize),
    (frozen, base): (Option<&Frozen>, Option<&QuantizedBase>),
    (device, placement, dtype): (&B::Device, StatePlacement, Option<DType>),
) -> Result<Segment<M, B::InnerBackend>, E> {
    let (layout, full) = if from_module {
        flatten::<B, M>(&module)
    } else {
        let layout = layout_of::<B, M>(&module);
        let full = source(id, prefix, &layout)?;
        (layout, full)
    };
    let name_of = |name: &str| checkpoint::tensor_name(prefix, name);
    let freezes = |name: &str| frozen.is_some_and(|f| f.freezes(&name_of(name)));
    let mut segment =
        Segment::from_full::<B>(module, layout, full, ranks, freezes, (base, name_of));
    segment.place(device, placement, dtype);
    Ok(segment)
}

/// Every segment's gradient slice, embedding first.
fn grad_slices<'a, E, L, H, I: Backend>(
    embed: &'a mut Segment<E, I>,
    blocks: &'a mut [Segment<L, I>],
    head: &'a mut Segment<H, I>,
) -> Vec<&'a mut [f32]> {
    std::iter::once(embed.grad.as_mut_slice())
        .chain(blocks.iter_mut().map(|b| b.grad.as_mut_slice()))
        .chain(std::iter::once(head.grad.as_mut_slice()))
        .collect()
}

/// Mixes numbers into one 64-bit seed (SplitMix64 steps), so nearby inputs give unrelated seeds.
fn mix(parts: &[u64]) -> u64 {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for &part in parts {
        state = state.wrapping_add(part).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        state = z ^ (z >> 31);
    }
    state
}
