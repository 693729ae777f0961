//! ZeRO-3 parameter sharding: a module's float parameters flattened into one f32 buffer, padded
//! to a multiple of the world size, each rank owning one contiguous slice.
//!
//! ```text
//!  module params   q.weight  q.bias  k.weight …          (visit order, zoo names)
//!  flat buffer     [──────────────── len ────────────────][pad]
//!  rank r owns     [r·shard, (r+1)·shard)                   shard = ceil(len / world)
//! ```
//!
//! Before a segment runs, its full buffer is all-gathered and loaded into a copy of the module;
//! after, the copy is dropped. Its gradient buffer is reduce-scattered (summed) into the owner's
//! slice. Initialisation materialises the full buffer once, from a seed, and keeps the slice, so
//! the values do not depend on the world size.

use std::ops::Range;
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::quant::QuantizedMatrix;

/// How a flat buffer of `len` elements is split over `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    /// Real elements.
    pub len: usize,
    /// Ranks.
    pub world: usize,
}

impl ShardLayout {
    /// Elements each rank owns (the last ranks' slices end in padding).
    pub fn shard_len(&self) -> usize {
        self.len.div_ceil(self.world)
    }

    /// The buffer length with padding: `world · shard_len`.
    pub fn padded_len(&self) -> usize {
        self.shard_len() * self.world
    }

    /// The padded range rank `rank` owns.
    pub fn range(&self, rank: usize) -> Range<usize> {
        let shard = self.shard_len();
        rank * shard..(rank + 1) * shard
    }

    /// Rank `rank`'s slice of a full (unpadded) buffer, zero-padded to `shard_len`.
    pub fn slice_of(&self, full: &[f32], rank: usize) -> Vec<f32> {
        let range = self.range(rank);
        let mut out = vec![0.0; self.shard_len()];
        let end = range.end.min(full.len());
        if range.start < end {
            out[..end - range.start].copy_from_slice(&full[range.start..end]);
        }
        out
    }
}

/// One parameter's place in a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatEntry {
    /// Dotted zoo name within the module.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
    /// The type of the module that holds the parameter (`RmsNorm`, `Linear`, `Embedding`, …;
    /// empty when unknown): with the last part of the name, what kind of parameter it is.
    pub owner: String,
}

impl FlatEntry {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the parameter is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where every float parameter of a module sits in its flat buffer, in visit order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlatLayout {
    /// The parameters.
    pub entries: Vec<FlatEntry>,
    /// Total elements.
    pub len: usize,
}

/// Follows module names like zoo's key tables (enum variants are not part of names).
#[derive(Default)]
struct Names {
    segments: Vec<String>,
    /// The containers entered, innermost last (burn names the struct that holds a field).
    containers: Vec<String>,
}

impl Names {
    fn enter(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.segments.push(name.to_string());
        }
        self.containers.push(container.to_string());
    }
    fn exit(&mut self, container: &str) {
        if !container.starts_with("Enum:") {
            self.segments.pop();
        }
        self.containers.pop();
    }
    fn name(&self) -> String {
        self.segments.join(".")
    }
    /// The struct holding the parameter being visited.
    fn owner(&self) -> String {
        self.containers
            .last()
            .and_then(|c| c.strip_prefix("Struct:"))
            .unwrap_or_default()
            .to_string()
    }
}

/// Flattens a module's float parameters (f32) into one buffer, with its layout.
pub fn flatten<B: Backend, M: Module<B>>(module: &M) -> (FlatLayout, Vec<f32>) {
    struct Collect {
        names: Names,
        layout: FlatLayout,
        data: Vec<f32>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.names.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.names.exit(container);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let tensor = param.val();
            let shape = tensor.dims().to_vec();
            let values: Vec<f32> = tensor
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("float parameters convert to f32");
            self.layout.entries.push(FlatEntry {
                name: self.names.name(),
                shape,
                offset: self.layout.len,
                owner: self.names.owner(),
            });
            self.layout.len += values.len();
            self.data.extend(values);
        }
    }
    let mut collect = Collect {
        names: Names::default(),
        layout: FlatLayout::default(),
        data: Vec::new(),
    };
    module.visit(&mut collect);
    (collect.layout, collect.data)
}

/// The layout of a module's parameters from their shapes alone (lazy parameters stay lazy).
pub fn layout_of<B: Backend, M: Module<B>>(module: &M) -> FlatLayout {
    struct Shapes {
        names: Names,
        layout: FlatLayout,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.names.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.names.exit(container);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.lazy_shape().to_vec();
            let len: usize = shape.iter().product();
            self.layout.entries.push(FlatEntry {
                name: self.names.name(),
                shape,
                offset: self.layout.len,
                owner: self.names.owner(),
            });
            self.layout.len += len;
        }
    }
    let mut shapes = Shapes {
        names: Names::default(),
        layout: FlatLayout::default(),
    };
    module.visit(&mut shapes);
    shapes.layout
}

/// `module` with every float parameter replaced by a lazy one of the same shape that holds no
/// values: what a segment keeps as its structure once its values live in the flat shards. A
/// template's values are never read ([`load_flat`] replaces them), so the whole model's weights
/// are not kept twice.
pub fn hollow<B: Backend, M: Module<B>>(module: M) -> M {
    struct Hollow;
    impl<B: Backend> ModuleMapper<B> for Hollow {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let shape = param.lazy_shape();
            let device = param.lazy_device();
            // Never called by zoo (templates are only mapped and measured); zeros if someone does.
            let init_shape = shape.clone();
            Param::uninitialized(
                ParamId::new(),
                move |device, require_grad| {
                    Tensor::zeros(init_shape.clone(), device).set_require_grad(require_grad)
                },
                device,
                false,
                shape,
            )
        }
    }
    module.map(&mut Hollow)
}

/// A copy of `module` whose parameters are `data` (laid out as `layout`), as fresh leaves that
/// require gradients when `trainable`. The template's own values are never read, so a lazily
/// initialised template costs nothing.
pub fn load_flat<B: Backend, M: Module<B>>(
    module: M,
    layout: &FlatLayout,
    data: &[f32],
    device: &B::Device,
    trainable: bool,
) -> M {
    load_flat_as(module, layout, data, device, trainable, None)
}

/// [`load_flat`] with the parameters in `dtype` (f16 / bf16 compute from f32 master values).
pub fn load_flat_as<B: Backend, M: Module<B>>(
    module: M,
    layout: &FlatLayout,
    data: &[f32],
    device: &B::Device,
    trainable: bool,
    dtype: Option<DType>,
) -> M {
    let trainable_len = if trainable { usize::MAX } else { 0 };
    load_flat_parts(module, layout, data, device, trainable_len, dtype, &[])
}

/// A frozen weight a working copy holds as codes (QLoRA's base) rather than as values.
#[derive(Debug, Clone)]
pub struct HeldCodes {
    /// The codes, `[d_output, d_input]` for a linear layer.
    pub matrix: Arc<QuantizedMatrix>,
    /// Whether the module's tensor is the codes' transpose (a linear layer's `[d_input,
    /// d_output]`).
    pub transposed: bool,
}

/// [`load_flat_as`] for a layout whose trainable parameters sit below `trainable_len` (see
/// [`FlatLayout::split`]): only those require gradients; the frozen ones above it are plain
/// values, so autodiff computes no gradient for them.
///
/// Entries whose offset lies past `layout.len` are held as codes: entry `layout.len + k` is
/// `codes[k]`, and the parameter becomes a frozen lazy dequantization of it that nothing reads
/// (the layer multiplies by the codes) and that keeps the codes alive as long as the module.
pub fn load_flat_parts<B: Backend, M: Module<B>>(
    module: M,
    layout: &FlatLayout,
    data: &[f32],
    device: &B::Device,
    trainable_len: usize,
    dtype: Option<DType>,
    codes: &[HeldCodes],
) -> M {
    struct Load<'a, B: Backend> {
        entries: std::slice::Iter<'a, FlatEntry>,
        data: &'a [f32],
        device: &'a B::Device,
        trainable_len: usize,
        dtype: Option<DType>,
        values_len: usize,
        codes: &'a [HeldCodes],
    }
    impl<B: Backend> ModuleMapper<B> for Load<'_, B> {
        fn map_float<const D: usize>(
            &mut self,
            _param: Param<Tensor<B, D>>,
        ) -> Param<Tensor<B, D>> {
            let entry = self.entries.next().expect("layout covers every parameter");
            if entry.offset >= self.values_len {
                let held = self.codes[entry.offset - self.values_len].clone();
                return lazy_dequantized(held, entry.shape.clone(), self.device);
            }
            let values = self.data[entry.offset..entry.offset + entry.len()].to_vec();
            let data = TensorData::new(values, entry.shape.clone());
            let tensor = match self.dtype {
                // Created in `dtype` (`from_data` alone makes the device's default float dtype,
                // f32, of the converted values: compute would run in f32).
                Some(dtype) => {
                    Tensor::<B, D>::from_data(data.convert_dtype(dtype), (self.device, dtype))
                }
                None => Tensor::<B, D>::from_data(data, self.device),
            };
            let tensor = if entry.offset < self.trainable_len {
                tensor.require_grad()
            } else {
                tensor
            };
            Param::initialized(ParamId::new(), tensor)
        }
    }
    module.map(&mut Load {
        entries: layout.entries.iter(),
        data,
        device,
        trainable_len,
        dtype,
        values_len: layout.len,
        codes,
    })
}

/// A gathered segment on the device: its trainable part and its frozen part (`None` when empty).
pub type DeviceParts<'a, B> = (Option<&'a Tensor<B, 1>>, Option<&'a Tensor<B, 1>>);

/// [`load_flat_parts`] from device tensors ([`crate::resident`]): the entries below `split`
/// are views of `trainable` (the gathered trainable part), those from `split` to `layout.len`
/// views of `frozen`, those past it the codes. Nothing is copied to or from the host: each
/// parameter is a slice of its part, cast to `dtype` when given, and requires gradients when
/// `trains` and it is trainable.
#[allow(clippy::too_many_arguments)]
pub fn load_flat_tensors<B: AutodiffBackend, M: Module<B>>(
    module: M,
    layout: &FlatLayout,
    (trainable, frozen): DeviceParts<'_, B::InnerBackend>,
    split: usize,
    trains: bool,
    dtype: Option<DType>,
    codes: &[HeldCodes],
    device: &B::Device,
) -> M {
    struct Load<'a, B: AutodiffBackend> {
        entries: std::slice::Iter<'a, FlatEntry>,
        parts: [Option<&'a Tensor<B::InnerBackend, 1>>; 2],
        split: usize,
        trains: bool,
        dtype: Option<DType>,
        values_len: usize,
        codes: &'a [HeldCodes],
        device: &'a B::Device,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Load<'_, B> {
        fn map_float<const D: usize>(
            &mut self,
            _param: Param<Tensor<B, D>>,
        ) -> Param<Tensor<B, D>> {
            let entry = self.entries.next().expect("layout covers every parameter");
            if entry.offset >= self.values_len {
                let held = self.codes[entry.offset - self.values_len].clone();
                return lazy_dequantized(held, entry.shape.clone(), self.device);
            }
            let (part, start) = match entry.offset < self.split {
                true => (self.parts[0], entry.offset),
                false => (self.parts[1], entry.offset - self.split),
            };
            let part = part.expect("a part holds every entry placed in it");
            let dims: [usize; D] = entry
                .shape
                .clone()
                .try_into()
                .expect("a parameter's rank matches its shape");
            let mut values = part.clone().slice(start..start + entry.len()).reshape(dims);
            if let Some(dtype) = self.dtype {
                values = values.cast(dtype);
            }
            let tensor = Tensor::<B, D>::from_inner(values);
            let tensor = match self.trains && entry.offset < self.split {
                true => tensor.require_grad(),
                false => tensor,
            };
            Param::initialized(ParamId::new(), tensor)
        }
    }
    module.map(&mut Load::<B> {
        entries: layout.entries.iter(),
        parts: [trainable, frozen],
        split,
        trains,
        dtype,
        values_len: layout.len,
        codes,
        device,
    })
}

/// [`flat_grads_below`] as one f32 tensor on the device (`None` when `trainable_len` is 0):
/// the parameters' gradients flattened and concatenated, zeros where one got none, never read
/// back to the host.
pub fn flat_grad_tensor<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    layout: &FlatLayout,
    trainable_len: usize,
    grads: &B::Gradients,
    device: &B::Device,
) -> Option<Tensor<B::InnerBackend, 1>> {
    struct Grads<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        entries: std::slice::Iter<'a, FlatEntry>,
        trainable_len: usize,
        device: &'a B::Device,
        out: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let entry = self.entries.next().expect("layout covers every parameter");
            if entry.offset >= self.trainable_len {
                return;
            }
            let flat = match param.val().grad(self.grads) {
                Some(grad) => {
                    let grad = grad.reshape([entry.len()]);
                    match grad.dtype() {
                        DType::F32 => grad,
                        _ => grad.cast(DType::F32),
                    }
                }
                None => Tensor::zeros([entry.len()], self.device),
            };
            self.out.push(flat);
        }
    }
    let mut collect = Grads::<B> {
        grads,
        entries: layout.entries.iter(),
        trainable_len: trainable_len.min(layout.len),
        device,
        out: Vec::new(),
    };
    module.visit(&mut collect);
    match collect.out.len() {
        0 => None,
        1 => collect.out.pop(),
        _ => Some(Tensor::cat(collect.out, 0)),
    }
}

/// A frozen parameter that dequantizes `held` only if read (transposed back to the module's
/// layout when the codes are its transpose).
fn lazy_dequantized<B: Backend, const D: usize>(
    held: HeldCodes,
    shape: Vec<usize>,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let init_shape = shape.clone();
    Param::uninitialized(
        ParamId::new(),
        move |device, _| {
            let (rows, cols) = (held.matrix.rows(), held.matrix.cols());
            let dense = Tensor::<B, 2>::from_data(
                TensorData::new(held.matrix.dequantize(), [rows, cols]),
                device,
            );
            let dense = if held.transposed {
                dense.transpose()
            } else {
                dense
            };
            dense.reshape(burn::tensor::Shape::from(init_shape.clone()))
        },
        device.clone(),
        false,
        burn::tensor::Shape::from(shape),
    )
}

/// The gradients of a module's parameters as one flat buffer (zeros where a parameter got none).
pub fn flat_grads<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    layout: &FlatLayout,
    grads: &B::Gradients,
) -> Vec<f32> {
    flat_grads_below(module, layout, layout.len, grads)
}

/// The gradients of the parameters of `layout` placed below `trainable_len` (the trainable part
/// of a [`FlatLayout::split`] layout), as one buffer of that length; frozen parameters are not
/// read.
pub fn flat_grads_below<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    layout: &FlatLayout,
    trainable_len: usize,
    grads: &B::Gradients,
) -> Vec<f32> {
    struct Grads<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        entries: std::slice::Iter<'a, FlatEntry>,
        out: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let entry = self.entries.next().expect("layout covers every parameter");
            if entry.offset >= self.out.len() {
                return;
            }
            let out = &mut self.out[entry.offset..entry.offset + entry.len()];
            let Some(grad) = param.val().grad(self.grads) else {
                // No gradient: the buffer's zeros stand.
                return;
            };
            if crate::kernels::read_f32(&grad, |values| out.copy_from_slice(values)) {
                return;
            }
            let data = grad.into_data();
            // f32 gradients are read in place: one copy, into the flat buffer.
            match data.as_slice::<f32>() {
                Ok(values) => out.copy_from_slice(values),
                Err(_) => out.copy_from_slice(
                    &data
                        .convert::<f32>()
                        .to_vec::<f32>()
                        .expect("gradients convert to f32"),
                ),
            }
        }
    }
    let mut collect = Grads {
        grads,
        entries: layout.entries.iter(),
        // Zeroed pages cost nothing until written.
        out: vec![0.0; trainable_len.min(layout.len)],
    };
    module.visit(&mut collect);
    collect.out
}

/// A segment's layout split by a freezing rule (see [`FlatLayout::split`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitLayout {
    /// Every parameter in visit order; trainable ones at `0..trainable.len`, frozen ones after.
    pub combined: FlatLayout,
    /// The trainable parameters, packed.
    pub trainable: FlatLayout,
    /// The frozen parameters, packed.
    pub frozen: FlatLayout,
}

impl FlatLayout {
    /// Splits the parameters into trainable and frozen ones (`frozen(name)`), each packed in
    /// visit order, and the combined layout whose offsets address the trainable buffer followed
    /// by the frozen one: what a module loads from.
    pub fn split(&self, frozen: impl Fn(&str) -> bool) -> SplitLayout {
        let (mut trainable, mut still) = (FlatLayout::default(), FlatLayout::default());
        let mut placed = Vec::with_capacity(self.entries.len());
        for entry in &self.entries {
            let part = if frozen(&entry.name) {
                &mut still
            } else {
                &mut trainable
            };
            let mut packed = entry.clone();
            packed.offset = part.len;
            part.len += entry.len();
            placed.push(frozen(&entry.name));
            part.entries.push(packed);
        }
        let (mut t, mut f) = (trainable.entries.iter(), still.entries.iter());
        let entries = placed
            .into_iter()
            .map(|is_frozen| match is_frozen {
                false => t.next().expect("one per trainable entry").clone(),
                true => {
                    let mut entry = f.next().expect("one per frozen entry").clone();
                    entry.offset += trainable.len;
                    entry
                }
            })
            .collect();
        SplitLayout {
            combined: FlatLayout {
                entries,
                len: self.len,
            },
            trainable,
            frozen: still,
        }
    }
}

impl SplitLayout {
    /// Splits a buffer laid out as the original layout into the trainable and frozen buffers.
    pub fn split_values(&self, original: &FlatLayout, full: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut trainable = Vec::with_capacity(self.trainable.len);
        let mut frozen = Vec::with_capacity(self.frozen.len);
        for (entry, placed) in original.entries.iter().zip(&self.combined.entries) {
            let values = &full[entry.offset..entry.offset + entry.len()];
            match placed.offset < self.trainable.len {
                true => trainable.extend_from_slice(values),
                false => frozen.extend_from_slice(values),
            }
        }
        (trainable, frozen)
    }
}

/// One segment's parameters, sharded: the layout and this rank's slice (the f32 master copy).
#[derive(Debug, Clone)]
pub struct ShardedParams {
    /// Where each parameter sits.
    pub layout: FlatLayout,
    /// How the buffer is split.
    pub shards: ShardLayout,
    /// This rank's slice, `shard_len` long.
    pub local: Vec<f32>,
}

impl ShardedParams {
    /// The parameters of `layout` of which this rank holds `local` (its `shard_len`-long slice).
    pub fn from_slice(layout: FlatLayout, local: Vec<f32>, world: usize) -> Self {
        let shards = ShardLayout {
            len: layout.len,
            world,
        };
        debug_assert_eq!(local.len(), shards.shard_len());
        Self {
            layout,
            shards,
            local,
        }
    }

    /// Keeps `rank`'s slice of a full buffer.
    pub fn from_full(layout: FlatLayout, full: &[f32], rank: usize, world: usize) -> Self {
        let shards = ShardLayout {
            len: layout.len,
            world,
        };
        Self {
            local: shards.slice_of(full, rank),
            layout,
            shards,
        }
    }

    /// All-gathers the full buffer (padding removed).
    pub fn gather(&self, comm: &dyn Communicator) -> Result<Vec<f32>, CommError> {
        // An empty part (a segment whose parameters are all frozen, or none are): every rank
        // knows, so none takes part in a collective.
        if self.layout.len == 0 {
            return Ok(Vec::new());
        }
        let mut full = comm.all_gather(&self.local)?;
        full.truncate(self.layout.len);
        Ok(full)
    }

    /// Sums a full gradient buffer across ranks and returns this rank's slice of the sum. The
    /// buffer is given away: padded in place and handed to the communicator, which need not copy.
    pub fn reduce_scatter(
        &self,
        comm: &dyn Communicator,
        mut full_grad: Vec<f32>,
    ) -> Result<Vec<f32>, CommError> {
        if self.layout.len == 0 {
            return Ok(Vec::new());
        }
        full_grad.resize(self.shards.padded_len(), 0.0);
        comm.reduce_scatter_owned(full_grad, ReduceOp::Sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ThreadGroup;
    use crate::{Cpu, CpuTrain};
    use burn::nn::{Linear, LinearConfig};
    use std::time::Duration;

    #[test]
    fn shards_cover_the_buffer_once_with_padding_last() {
        let layout = ShardLayout { len: 10, world: 4 };
        assert_eq!(layout.shard_len(), 3);
        assert_eq!(layout.padded_len(), 12);
        let full: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let joined: Vec<f32> = (0..4).flat_map(|r| layout.slice_of(&full, r)).collect();
        assert_eq!(&joined[..10], &full[..]);
        assert_eq!(&joined[10..], &[0.0, 0.0]);
    }

    #[test]
    fn flatten_and_load_round_trip_in_visit_order() {
        let device = Default::default();
        let linear: Linear<Cpu> = LinearConfig::new(3, 2).init(&device);
        let (layout, data) = flatten(&linear);
        assert_eq!(layout.len, 3 * 2 + 2);
        let names: Vec<&str> = layout.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["weight", "bias"]);
        assert_eq!(layout_of(&linear), layout);
        let doubled: Vec<f32> = data.iter().map(|x| x * 2.0).collect();
        let loaded = load_flat(linear.clone(), &layout, &doubled, &device, false);
        assert_eq!(flatten(&loaded).1, doubled);
    }

    /// A compute dtype makes the parameters that dtype's tensors (not f32 tensors of rounded
    /// values, which would compute in f32 and hold twice the bytes).
    #[test]
    fn parameters_load_in_the_compute_dtype() {
        let device = Default::default();
        let linear: Linear<Cpu> = LinearConfig::new(3, 2).init(&device);
        let (layout, data) = flatten(&linear);
        for dtype in [DType::F16, DType::BF16] {
            let loaded = load_flat_as(linear.clone(), &layout, &data, &device, true, Some(dtype));
            assert_eq!(loaded.weight.val().dtype(), dtype);
            assert_eq!(loaded.bias.as_ref().unwrap().val().dtype(), dtype);
        }
    }

    #[test]
    fn gather_and_reduce_scatter_invert_sharding() {
        let results = ThreadGroup::run(3, Duration::from_secs(10), |comm| {
            let device = Default::default();
            let linear: Linear<CpuTrain> = LinearConfig::new(3, 2).init(&device);
            let layout = layout_of(&linear);
            let full: Vec<f32> = (0..layout.len).map(|i| i as f32).collect();
            let sharded = ShardedParams::from_full(layout, &full, comm.rank(), 3);
            let gathered = sharded.gather(&comm).unwrap();
            let grad_slice = sharded.reduce_scatter(&comm, full.clone()).unwrap();
            (gathered, grad_slice, sharded.shards.range(comm.rank()))
        });
        for result in results {
            let (gathered, grad_slice, range) = result.unwrap();
            let full: Vec<f32> = (0..8).map(|i| i as f32).collect();
            assert_eq!(gathered, full);
            let want: Vec<f32> = range
                .map(|i| if i < 8 { 3.0 * i as f32 } else { 0.0 })
                .collect();
            assert_eq!(grad_slice, want);
        }
    }
}
