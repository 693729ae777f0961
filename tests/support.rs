//! Helpers shared by zoo's cross-crate tests: fixture paths, reference tensors and error measures.
//!
//! The fixtures under `tests/fixtures/` are made by `tests/fixtures/generate.py` with torch and
//! transformers; the expected numbers in every parity test come from there, never from zoo.

#![warn(missing_docs)]

use std::path::PathBuf;

use bmtrain_backend::CpuTrain;
use bmtrain_backend::comm::Communicator;
use bmtrain_backend::trainer::{ZeroOptions, ZeroSpec, ZeroTrainer};
use bmtrain_backend::zero::{flat_grads, layout_of};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use checkpoints_convert::TensorMap;
use models::bert::EncoderInput;

/// The HF model fixtures, each a directory with `model.safetensors`, `pytorch_model.bin` and
/// `reference.safetensors`.
pub const MODEL_FIXTURES: [&str; 13] = [
    "bert",
    "bert_mlm",
    "bert_cls",
    "roberta",
    "roberta_mlm",
    "roberta_cls",
    "gpt2",
    "gpt2_cls",
    "t5",
    "t5_v1_1",
    "mistral",
    "qwen2",
    "llama_cls",
];

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// transformers' inputs and outputs for a model fixture.
pub fn reference(name: &str) -> TensorMap {
    checkpoints_convert::read_weights_file(&fixture(name).join("reference.safetensors"))
        .expect("reference tensors")
}

/// The values of a tensor as f32.
pub fn floats(data: &TensorData) -> Vec<f32> {
    data.clone().convert::<f32>().to_vec().expect("float data")
}

/// The values of a tensor as i64.
pub fn ints(data: &TensorData) -> Vec<i64> {
    data.clone().convert::<i64>().to_vec().expect("int data")
}

/// Largest absolute difference; panics when the shapes differ.
pub fn max_abs_diff(got: &TensorData, want: &TensorData) -> f32 {
    assert_eq!(got.shape, want.shape, "shapes differ");
    floats(got)
        .iter()
        .zip(floats(want))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Largest absolute difference between two slices; panics when their lengths differ.
pub fn max_slice_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest absolute difference divided by the largest magnitude of `want`.
pub fn max_relative_diff(got: &TensorData, want: &TensorData) -> f32 {
    let scale = floats(want)
        .iter()
        .map(|x| x.abs())
        .fold(0.0, f32::max)
        .max(f32::MIN_POSITIVE);
    max_abs_diff(got, want) / scale
}

/// The reference's `input_ids`, `attention_mask` and (when there) `token_type_ids` as model input.
pub fn reference_input<B: Backend>(reference: &TensorMap, device: &B::Device) -> EncoderInput<B> {
    let tensor = |name: &str| {
        reference.get(name).map(|stored| {
            let data = &stored.data;
            Tensor::<B, 2, Int>::from_data(TensorData::new(ints(data), data.shape.clone()), device)
        })
    };
    EncoderInput {
        input_ids: tensor("input_ids").expect("reference has input_ids"),
        attention_mask: tensor("attention_mask"),
        token_type_ids: tensor("token_type_ids"),
        decoder_input_ids: tensor("decoder_input_ids"),
    }
}

/// A 2-D int tensor from a reference entry.
pub fn int_tensor<B: Backend>(
    reference: &TensorMap,
    name: &str,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let data = &reference[name].data;
    Tensor::from_data(TensorData::new(ints(data), data.shape.clone()), device)
}

/// A model cut into ZeRO segments: the spec, the embedding, the blocks, the head.
pub type Cut<S> = (
    S,
    <S as ZeroSpec<CpuTrain>>::Embed,
    Vec<<S as ZeroSpec<CpuTrain>>::Block>,
    <S as ZeroSpec<CpuTrain>>::Head,
);

/// The gradients of whole-model autodiff, per segment of `cut` in the trainer's order
/// (embedding, blocks, head), as flat layouts.
pub fn segment_gradients<S: ZeroSpec<CpuTrain>>(
    (_, embed, blocks, head): &Cut<S>,
    grads: &<CpuTrain as AutodiffBackend>::Gradients,
) -> Vec<Vec<f32>> {
    let mut out = vec![flat_grads::<CpuTrain, _>(
        embed,
        &layout_of::<CpuTrain, _>(embed),
        grads,
    )];
    for block in blocks {
        out.push(flat_grads::<CpuTrain, _>(
            block,
            &layout_of::<CpuTrain, _>(block),
            grads,
        ));
    }
    out.push(flat_grads::<CpuTrain, _>(
        head,
        &layout_of::<CpuTrain, _>(head),
        grads,
    ));
    out
}

/// The trainer's accumulated gradient slices on one rank after one micro-batch, per segment;
/// every block checkpointed when `checkpoint`.
pub fn trainer_gradients<S: ZeroSpec<CpuTrain>, C: Communicator + 'static>(
    (spec, embed, blocks, head): Cut<S>,
    comm: C,
    batch: &S::Batch,
    checkpoint: bool,
) -> Vec<Vec<f32>> {
    let mut options = ZeroOptions::checkpoint_all(blocks.len());
    options.checkpoint = vec![checkpoint; blocks.len()];
    let mut trainer =
        ZeroTrainer::new(spec, comm, Default::default(), embed, blocks, head, options);
    trainer.forward_backward(batch).expect("a training step");
    std::iter::once(trainer.embed.grad.clone())
        .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
        .chain(std::iter::once(trainer.head.grad.clone()))
        .collect()
}
