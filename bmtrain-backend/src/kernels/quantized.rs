//! Linear layers and embedding lookups on quantized weights ([`crate::quant`]): the product reads
//! the codes directly, so a quantized model never holds a dequantized matrix (a prompt's product
//! decodes 64 rows at a time). Backward gives the input's gradient only (and the bias's): the
//! quantized weight is frozen, as QLoRA's base is.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::{
    OnCpu, flex, flex_from, from_cpu, on_cpu, output_grad, record, register_grads, tensor_from,
    values,
};
use crate::Cpu;
use crate::quant::QuantizedMatrix;

/// `x·Wᵀ + bias` with `W` the quantized `[d_output, d_input]` matrix.
///
/// - x: `[..., d_input]`, bias: `[d_output]` → `[..., d_output]`
///
/// On the CPU backends (f32) the product runs on the codes; elsewhere the matrix is dequantized
/// for this call and burn's linear runs.
pub fn quantized_linear<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Arc<QuantizedMatrix>,
    bias: Option<&Tensor<B, 1>>,
) -> Tensor<B, D> {
    let (d_output, d_input) = (weight.rows(), weight.cols());
    let mut shape = x.dims().to_vec();
    assert_eq!(
        shape[D - 1],
        d_input,
        "a quantized {d_output}x{d_input} layer's input"
    );
    shape[D - 1] = d_output;
    let rows = shape[..D - 1].iter().product::<usize>();
    let product: Tensor<B, D> = match on_cpu(x) {
        Some(OnCpu::Infer(xs)) => {
            let xs = flex(xs);
            let y = weight.mul_transposed(values(&xs), rows);
            from_cpu(tensor_from::<D>(flex_from(y, shape)))
        }
        Some(OnCpu::Train(xs)) => {
            let xs = xs.into_primitive().tensor();
            let input = super::contiguous(xs.primitive.clone());
            let y = weight.mul_transposed(values(&input), rows);
            let saved = Saved {
                weight: weight.clone(),
                input_shape: input.layout().shape().to_vec(),
            };
            record(QuantizedBackward, [&xs], saved, flex_from(y, shape))
        }
        None => {
            let dense = Tensor::<B, 2>::from_data(
                TensorData::new(weight.dequantize(), [d_output, d_input]),
                &x.device(),
            )
            .cast(x.dtype())
            .transpose();
            return burn::tensor::module::linear(x.clone(), dense, bias.cloned());
        }
    };
    match bias {
        Some(b) => product + b.clone().unsqueeze(),
        None => product,
    }
}

/// Rows `ids` of a quantized `[vocab, width]` table (an embedding lookup): `[batch, seq]` →
/// `[batch, seq, width]`, `None` when an id is outside the table.
pub fn quantized_embedding<B: Backend>(
    table: &QuantizedMatrix,
    ids: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 3>> {
    let [batch, seq] = ids.dims();
    let device = ids.device();
    let ids: Vec<usize> = ids
        .to_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .ok()?
        .into_iter()
        .map(|id| usize::try_from(id).unwrap_or(usize::MAX))
        .collect();
    let rows = table.gather_rows(&ids)?;
    Some(Tensor::from_data(
        TensorData::new(rows, [batch, seq, table.cols()]),
        &device,
    ))
}

#[derive(Debug, Clone)]
struct Saved {
    weight: Arc<QuantizedMatrix>,
    input_shape: Vec<usize>,
}

#[derive(Debug)]
struct QuantizedBackward;

impl Backward<Cpu, 1> for QuantizedBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (dy, parents) = output_grad(&ops, grads);
        let saved = ops.state;
        let rows = saved.input_shape[..saved.input_shape.len() - 1]
            .iter()
            .product::<usize>();
        let dx = saved.weight.mul(values(&dy), rows);
        register_grads(grads, parents, [(dx, saved.input_shape)]);
    }
}
