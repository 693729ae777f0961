//! Custom operations under burn's `Fusion` (what `burn::backend::{Cuda, Wgpu}` are): a call
//! becomes one operation in fusion's stream, which runs the inner backend's kernels on the
//! tensors' handles when the stream executes (the pattern burn-vision's GPU operations use), so
//! a hand-written kernel queues behind the fused operations before it instead of flushing them.

use std::marker::PhantomData;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

/// The handles of an operation's inner backend.
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// Registers `inputs` → `outputs` (shape, dtype) as one custom operation running `run` on the
/// inner backend's tensors, and returns the outputs.
pub(crate) fn register<B: FusionBackend>(
    name: &'static str,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: &[(Shape, DType)],
    run: impl Fn(Vec<FloatTensor<B>>) -> Vec<FloatTensor<B>> + Send + Sync + 'static,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(&inputs);
    let outputs: Vec<TensorIr> = outputs
        .iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape.clone(), *dtype))
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = CustomOp::<B, _> {
        desc: desc.clone(),
        run,
        backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// A custom operation: its description and what runs it.
struct CustomOp<B, F> {
    desc: CustomOpIr,
    run: F,
    backend: PhantomData<fn() -> B>,
}

impl<B, F> std::fmt::Debug for CustomOp<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomOp")
            .field("desc", &self.desc)
            .finish()
    }
}

impl<B, F> Operation<B::FusionRuntime> for CustomOp<B, F>
where
    B: FusionBackend,
    F: Fn(Vec<FloatTensor<B>>) -> Vec<FloatTensor<B>> + Send + Sync,
{
    fn execute(&self, handles: &mut Handles<B>) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|input| handles.get_float_tensor::<B>(input))
            .collect();
        for (output, tensor) in self.desc.outputs.iter().zip((self.run)(inputs)) {
            handles.register_float_tensor::<B>(&output.id, tensor);
        }
    }
}
