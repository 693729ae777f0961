//! The kernels under burn's `Fusion` (what `burn::backend::{Cuda, Wgpu}` are): each call becomes a
//! custom operation in fusion's stream, which runs the inner backend's kernels on the tensors'
//! handles when the stream executes (the pattern burn-vision's GPU operations use).

use std::marker::PhantomData;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{FlashBackend, FlashGeometry};

/// The handles of an operation's inner backend.
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// Registers `inputs` → `outputs` (shape, dtype) as one custom operation running `run` on the
/// inner backend's tensors, and returns the outputs.
fn register<B: FusionBackend>(
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

impl<B: FusionBackend + FlashBackend> FlashBackend for Fusion<B> {
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        geometry: &FlashGeometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let g = geometry.clone();
        let outputs = [
            (
                Shape::new([g.batch, g.q_len, g.heads * g.value_dim]),
                q.dtype,
            ),
            (Shape::new([g.batch * g.heads * g.q_len]), DType::F32),
        ];
        let inputs = [Some(q), Some(k), Some(v), bias]
            .into_iter()
            .flatten()
            .collect();
        let run = move |mut inputs: Vec<FloatTensor<B>>| {
            let bias = (inputs.len() == 4).then(|| inputs.pop()).flatten();
            let [q, k, v]: [FloatTensor<B>; 3] = inputs.try_into().expect("q, k, v");
            let (out, lse) = B::flash_forward(q, k, v, bias, &g);
            vec![out, lse]
        };
        let [out, lse]: [FusionTensor<B::FusionRuntime>; 2] =
            register::<B>("zoo_flash_attention_forward", inputs, &outputs, run)
                .try_into()
                .expect("two outputs");
        (out, lse)
    }

    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        geometry: &FlashGeometry,
        bias_grad: bool,
    ) -> [Option<FloatTensor<Self>>; 4] {
        let g = geometry.clone();
        let bias_grad = bias_grad && bias.is_some();
        let mut outputs = vec![
            (q.shape.clone(), q.dtype),
            (k.shape.clone(), k.dtype),
            (v.shape.clone(), v.dtype),
        ];
        if bias_grad {
            outputs.push((Shape::new([g.batch, g.heads, g.q_len, g.k_len]), DType::F32));
        }
        let inputs = [
            Some(q),
            Some(k),
            Some(v),
            Some(out),
            Some(lse),
            Some(d_out),
            bias,
        ]
        .into_iter()
        .flatten()
        .collect();
        let run = move |mut inputs: Vec<FloatTensor<B>>| {
            let bias = (inputs.len() == 7).then(|| inputs.pop()).flatten();
            let [q, k, v, out, lse, d_out]: [FloatTensor<B>; 6] =
                inputs.try_into().expect("six inputs");
            B::flash_backward(q, k, v, bias, out, lse, d_out, &g, bias_grad)
                .into_iter()
                .flatten()
                .collect()
        };
        let mut grads = register::<B>("zoo_flash_attention_backward", inputs, &outputs, run)
            .into_iter()
            .map(Some);
        [(); 4].map(|_| grads.next().flatten())
    }
}
