//! T5 on the ZeRO trainer (`models::t5::zero`): the trainer's gradients equal whole-model
//! autodiff on 1 and 2 ranks, with and without block checkpointing, for T5 v1.0 (ReLU, head tied
//! to `shared`, output scaling) and v1.1 (gated GELU, untied head); and equal transformers'
//! one-step gradients of the fixtures (`tests/fixtures/generate.py`).

use std::ops::Range;
use std::time::Duration;

use bmtrain_backend::CpuTrain;
use bmtrain_backend::checkpoint::tensor_name;
use bmtrain_backend::comm::{Communicator, SingleRank, ThreadGroup};
use bmtrain_backend::trainer::{SegmentId, ZeroOptions, ZeroSpec, ZeroTrainer};
use bmtrain_backend::zero::{FlatLayout, flat_grads, layout_of};
use burn::tensor::{Int, Tensor, TensorData};
use checkpoints_convert::families::Layout;
use checkpoints_convert::{LoadOptions, TensorMap, load_model, tensors};
use models::AnyModel;
use models::t5::zero::{Seq2SeqBatch, T5Spec};
use models::t5::{Seq2SeqInput, T5ForConditionalGeneration, seq2seq_loss};
use zoo_tests::{fixture, floats, int_tensor, max_relative_diff, reference};

type B = CpuTrain;

/// The fixture's model in f32 with dropout off, and its key table.
fn load(
    name: &str,
) -> (
    T5ForConditionalGeneration<B>,
    Vec<checkpoints_convert::families::KeyPair>,
) {
    let options = LoadOptions {
        dropout: Some(0.0),
        ..Default::default()
    };
    let loaded = load_model::<B>(&fixture(name), &Default::default(), &options).unwrap();
    let pairs = loaded.spec.key_pairs();
    match loaded.model {
        AnyModel::T5ForConditionalGeneration(model) => (model, pairs),
        _ => panic!("{name} is a T5ForConditionalGeneration"),
    }
}

/// Rows `rows` of the fixture's batch (the one transformers' gradients were taken on).
fn batch(reference: &TensorMap, rows: Range<usize>) -> Seq2SeqBatch<B> {
    let device = Default::default();
    let take = |name: &str| {
        let all: Tensor<B, 2, Int> = int_tensor(reference, name, &device);
        let width = all.dims()[1];
        all.slice([rows.clone(), 0..width])
    };
    Seq2SeqBatch {
        input_ids: take("input_ids"),
        attention_mask: Some(take("attention_mask")),
        decoder_input_ids: take("decoder_input_ids"),
        labels: take("labels"),
    }
}

/// Layouts of the segments in the trainer's order: embedding, blocks, head.
fn layouts(spec: &T5Spec, model: T5ForConditionalGeneration<B>) -> Vec<(String, FlatLayout)> {
    let (_, embed, blocks, head) = T5Spec::split(model).unwrap();
    let mut out = vec![(
        ZeroSpec::<B>::prefix(spec, SegmentId::Embed),
        layout_of::<B, _>(&embed),
    )];
    for (i, block) in blocks.iter().enumerate() {
        out.push((
            ZeroSpec::<B>::prefix(spec, SegmentId::Block(i)),
            layout_of::<B, _>(block),
        ));
    }
    out.push((
        ZeroSpec::<B>::prefix(spec, SegmentId::Head),
        layout_of::<B, _>(&head),
    ));
    out
}

/// Reference: one autodiff graph over the whole model. The loss is the mean over `groups` of
/// each group's seq2seq loss — what ranks that each take one group compute together (each rank
/// averages its own tokens, the trainer averages over ranks). Gradients per segment.
fn reference_gradients(
    model: T5ForConditionalGeneration<B>,
    reference: &TensorMap,
    groups: &[Range<usize>],
) -> Vec<Vec<f32>> {
    let mut loss: Option<Tensor<B, 1>> = None;
    for rows in groups {
        let batch = batch(reference, rows.clone());
        let (_, _, logits) = model.forward(&Seq2SeqInput {
            input_ids: batch.input_ids,
            attention_mask: batch.attention_mask,
            decoder_input_ids: batch.decoder_input_ids,
        });
        let part = seq2seq_loss(logits, batch.labels) / groups.len() as f32;
        loss = Some(match loss {
            Some(sum) => sum + part,
            None => part,
        });
    }
    let grads = loss.unwrap().backward();
    let (_, embed, blocks, head) = T5Spec::split(model).unwrap();
    let mut out = vec![flat_grads::<B, _>(
        &embed,
        &layout_of::<B, _>(&embed),
        &grads,
    )];
    for block in &blocks {
        out.push(flat_grads::<B, _>(block, &layout_of::<B, _>(block), &grads));
    }
    out.push(flat_grads::<B, _>(&head, &layout_of::<B, _>(&head), &grads));
    out
}

/// The trainer's accumulated gradient slices on one rank after one micro-batch of `rows`.
fn trainer_gradients<C: Communicator>(
    model: T5ForConditionalGeneration<B>,
    reference: &TensorMap,
    comm: C,
    rows: Range<usize>,
    checkpoint: bool,
) -> Vec<Vec<f32>> {
    let (spec, embed, blocks, head) = T5Spec::split(model).unwrap();
    let mut options = ZeroOptions::checkpoint_all(blocks.len());
    options.checkpoint = vec![checkpoint; blocks.len()];
    let mut trainer =
        ZeroTrainer::new(spec, comm, Default::default(), embed, blocks, head, options);
    trainer.forward_backward(&batch(reference, rows)).unwrap();
    std::iter::once(trainer.embed.grad.clone())
        .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
        .chain(std::iter::once(trainer.head.grad.clone()))
        .collect()
}

/// The largest difference of `got` from `want` over all segments, relative to each segment's
/// largest reference value.
fn worst_relative(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let mut worst: f32 = 0.0;
    for (got, want) in got.iter().zip(want) {
        let scale = want.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g - w).abs() / scale);
        }
    }
    worst
}

#[test]
fn t5_trainer_gradients_match_whole_model_autodiff_on_one_and_two_ranks() {
    for name in ["t5", "t5_v1_1"] {
        let (model, _) = load(name);
        let reference = reference(name);

        // One rank, the whole batch: with and without checkpointing.
        let want = reference_gradients(model.clone(), &reference, std::slice::from_ref(&(0..2)));
        for checkpoint in [true, false] {
            let got = trainer_gradients(model.clone(), &reference, SingleRank, 0..2, checkpoint);
            for (segment, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.len() >= w.len(),
                    "segment {segment}: slice shorter than the layout"
                );
            }
            let worst = worst_relative(&got, &want);
            println!("t5 trainer {name} (1 rank, checkpointing {checkpoint}): worst {worst:.2e}");
            assert!(worst < 1e-5, "{name}, checkpointing {checkpoint}: {worst}");
        }

        // Two ranks, a row each (16 and 8 target tokens: each rank's own mean, then averaged).
        let want = reference_gradients(model.clone(), &reference, &[0..1, 1..2]);
        for checkpoint in [true, false] {
            let initial = model.clone();
            let shared = reference.clone();
            let ranks = ThreadGroup::run(2, Duration::from_secs(120), move |comm| {
                let rank = comm.rank();
                trainer_gradients(initial.clone(), &shared, comm, rank..rank + 1, checkpoint)
            });
            let ranks: Vec<Vec<Vec<f32>>> = ranks.into_iter().map(|r| r.unwrap()).collect();
            // Each rank holds a contiguous slice of every segment: rank 0's, then rank 1's.
            let got: Vec<Vec<f32>> = (0..want.len())
                .map(|s| [ranks[0][s].clone(), ranks[1][s].clone()].concat())
                .collect();
            let worst = worst_relative(&got, &want);
            println!("t5 trainer {name} (2 ranks, checkpointing {checkpoint}): worst {worst:.2e}");
            assert!(
                worst < 1e-5,
                "{name}, 2 ranks, checkpointing {checkpoint}: {worst}"
            );
        }
    }
}

#[test]
fn t5_trainer_gradients_match_transformers() {
    for name in ["t5", "t5_v1_1"] {
        let (model, pairs) = load(name);
        let reference = reference(name);
        let (spec, ..) = T5Spec::split(model.clone()).unwrap();
        let layouts = layouts(&spec, model.clone());
        let got = trainer_gradients(model, &reference, SingleRank, 0..2, true);

        // Every trainer gradient by zoo name.
        let mut by_name = std::collections::BTreeMap::new();
        for ((prefix, layout), grad) in layouts.iter().zip(&got) {
            for entry in &layout.entries {
                let values = grad[entry.offset..entry.offset + entry.len()].to_vec();
                by_name.insert(
                    tensor_name(prefix, &entry.name),
                    TensorData::new(values, entry.shape.clone()),
                );
            }
        }
        assert_eq!(
            by_name.len(),
            pairs.len(),
            "{name}: a gradient for every key"
        );
        let mut worst = (0.0f32, String::new());
        for pair in &pairs {
            let got = by_name
                .get(&pair.zoo)
                .unwrap_or_else(|| panic!("{name}: no trainer gradient for {}", pair.zoo));
            let hf = &reference[&format!("grad.{}", pair.hf)].data;
            let want = match pair.layout {
                Layout::Same => hf.clone(),
                Layout::Transposed => tensors::transpose_2d(hf),
                Layout::Split { part, parts } => tensors::split_last_dim(hf, part, parts),
            };
            let largest = floats(&want).iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(
                largest > 1e-8,
                "{name}: {} has a zero reference gradient",
                pair.hf
            );
            let error = max_relative_diff(got, &want);
            if error > worst.0 {
                worst = (error, pair.hf.clone());
            }
            assert!(error < 1e-4, "{name}: {} off by {error}", pair.hf);
        }
        println!(
            "t5 trainer {name} vs transformers: worst relative {:.2e} ({})",
            worst.0, worst.1
        );
    }
}
