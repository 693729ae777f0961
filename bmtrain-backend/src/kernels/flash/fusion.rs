//! The kernels under burn's `Fusion` (what `burn::backend::{Cuda, Wgpu}` are): each call becomes a
//! custom operation in fusion's stream ([`register`]).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::{FlashBackend, FlashGeometry};
use crate::kernels::custom_op::register;

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
