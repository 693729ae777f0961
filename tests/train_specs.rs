//! The training specs of `models::train` under the ZeRO trainer: GPT-2 with its LM head tied to
//! the token embeddings (the head reads the embedding segment) gives the gradients of plain burn
//! autodiff over the whole model, on 1 and 2 ranks; and seeded dropout under block checkpointing
//! recomputes the masks of the forward pass.

use std::time::Duration;

use bmtrain_backend::CpuTrain;
use bmtrain_backend::comm::{Communicator, SingleRank, ThreadGroup};
use bmtrain_backend::trainer::{ZeroOptions, ZeroTrainer};
use bmtrain_backend::zero::{flat_grads, flatten, layout_of, load_flat};
use burn::tensor::{Int, Tensor, TensorData};
use models::gpt2::{DecoderInput, Gpt2Config, Gpt2LmHeadModel, causal_lm_loss};
use models::train::{Gpt2Spec, LmBatch};

type B = CpuTrain;

const ROWS: usize = 4;
const SEQ: usize = 7;

fn config(tied: bool, dropout: f64) -> Gpt2Config {
    let mut config = Gpt2Config::new();
    (config.vocab_size, config.n_positions, config.n_embd) = (37, 16, 16);
    (config.n_layer, config.n_head) = (3, 2);
    config.tie_word_embeddings = tied;
    (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) = (dropout, dropout, dropout);
    config
}

/// A model with materialised random weights.
fn model(config: &Gpt2Config) -> Gpt2LmHeadModel<B> {
    let device = Default::default();
    let model = Gpt2LmHeadModel::<B>::new(config, &device).unwrap();
    let (layout, values) = flatten::<B, _>(&model);
    load_flat(model, &layout, &values, &device, true)
}

fn ids(rows: std::ops::Range<usize>) -> Tensor<B, 2, Int> {
    let n = rows.len();
    let values: Vec<i64> = rows
        .flat_map(|r| (0..SEQ).map(move |t| ((r * 11 + t * 5 + t * t) % 37) as i64))
        .collect();
    Tensor::from_data(TensorData::new(values, [n, SEQ]), &Default::default())
}

/// Reference: one autodiff graph over the whole model; gradients per segment, in the
/// trainer's order (embedding, blocks, head).
fn reference_gradients(model: Gpt2LmHeadModel<B>) -> Vec<Vec<f32>> {
    let input = ids(0..ROWS);
    let (_, logits) = model.forward(&DecoderInput::new(input.clone()));
    let grads = causal_lm_loss(logits, input).backward();
    let (_, embed, blocks, head) = Gpt2Spec::split(model);
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
    model: Gpt2LmHeadModel<B>,
    comm: C,
    rows: std::ops::Range<usize>,
    checkpoint: bool,
    seed: Option<u64>,
) -> Vec<Vec<f32>> {
    let (spec, embed, blocks, head) = Gpt2Spec::split(model);
    let mut options = ZeroOptions::checkpoint_all(blocks.len());
    options.checkpoint = vec![checkpoint; blocks.len()];
    let mut trainer =
        ZeroTrainer::new(spec, comm, Default::default(), embed, blocks, head, options);
    if let Some(seed) = seed {
        trainer.set_dropout_seed(seed);
    }
    trainer
        .forward_backward(&LmBatch {
            input_ids: ids(rows),
        })
        .unwrap();
    std::iter::once(trainer.embed.grad.clone())
        .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
        .chain(std::iter::once(trainer.head.grad.clone()))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tied_and_untied_gpt2_gradients_match_whole_model_autodiff_on_one_and_two_ranks() {
    for tied in [true, false] {
        let config = config(tied, 0.0);
        let initial = model(&config);
        let want = reference_gradients(initial.clone());

        let one = trainer_gradients(initial.clone(), SingleRank, 0..ROWS, true, None);
        let two = ThreadGroup::run(2, Duration::from_secs(60), move |comm| {
            // Each rank takes half the rows; the trainer averages over ranks.
            let rows = comm.rank() * ROWS / 2..(comm.rank() + 1) * ROWS / 2;
            trainer_gradients(initial.clone(), comm, rows, true, None)
        });
        let two: Vec<Vec<Vec<f32>>> = two.into_iter().map(|r| r.unwrap()).collect();
        let mut worst: f32 = 0.0;
        for (segment, reference) in want.iter().enumerate() {
            let scale = reference.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            let got_one = &one[segment][..reference.len()];
            let got_two: Vec<f32> = [two[0][segment].clone(), two[1][segment].clone()].concat();
            for got in [got_one, &got_two[..reference.len()]] {
                worst = worst.max(max_abs_diff(got, reference) / scale);
            }
        }
        println!("train specs: GPT-2 (tied {tied}) worst relative gradient difference {worst:.2e}");
        assert!(worst < 1e-5, "tied {tied}: {worst}");
    }
}

#[test]
fn seeded_dropout_is_recomputed_exactly_under_checkpointing() {
    let initial = model(&config(true, 0.2));
    let kept = trainer_gradients(initial.clone(), SingleRank, 0..ROWS, false, Some(7));
    let recomputed = trainer_gradients(initial.clone(), SingleRank, 0..ROWS, true, Some(7));
    assert_eq!(
        kept, recomputed,
        "checkpointed blocks must redraw the same masks"
    );
    // And the masks are really there: another seed gives other gradients.
    let other = trainer_gradients(initial, SingleRank, 0..ROWS, true, Some(8));
    assert_ne!(kept, other);
}
