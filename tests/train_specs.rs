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
            labels: None,
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

/// A tiny BERT or RoBERTa masked LM with materialised random weights.
#[derive(Clone)]
enum Mlm {
    Bert(models::bert::BertForMaskedLM<B>),
    Roberta(models::roberta::RobertaForMaskedLM<B>),
}

type MlmCut = (
    models::train::MlmSpec,
    models::layers::Embeddings<B>,
    Vec<models::bert::BertLayer<B>>,
    models::train::MlmHeadSegment<B>,
);

impl Mlm {
    fn new(roberta: bool) -> Self {
        let device = Default::default();
        let mut config = models::bert::BertConfig::new(37);
        (config.hidden_size, config.num_hidden_layers) = (16, 2);
        (config.num_attention_heads, config.intermediate_size) = (2, 32);
        (
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob,
        ) = (0.0, 0.0);
        (config.max_position_embeddings, config.pad_token_id) = (16, Some(1));
        if roberta {
            let model = models::roberta::RobertaForMaskedLM::<B>::new(&config, &device).unwrap();
            let (layout, values) = flatten::<B, _>(&model);
            Self::Roberta(load_flat(model, &layout, &values, &device, true))
        } else {
            let model = models::bert::BertForMaskedLM::<B>::new(&config, &device).unwrap();
            let (layout, values) = flatten::<B, _>(&model);
            Self::Bert(load_flat(model, &layout, &values, &device, true))
        }
    }

    /// The whole model's logits (the forward the parity tests hold to transformers').
    fn logits(&self, batch: &models::train::MlmBatch<B>) -> Tensor<B, 3> {
        let input = models::bert::EncoderInput {
            input_ids: batch.input_ids.clone(),
            attention_mask: Some(batch.attention_mask.clone()),
            token_type_ids: None,
            decoder_input_ids: None,
        };
        match self {
            Self::Bert(model) => model.forward(&input).1,
            Self::Roberta(model) => model.forward(&input).1,
        }
    }

    fn split(self) -> MlmCut {
        match self {
            Self::Bert(model) => models::train::MlmSpec::split_bert(model),
            Self::Roberta(model) => models::train::MlmSpec::split_roberta(model),
        }
    }
}

/// Rows of a masked batch: every third position masked (id 3) and labelled, the last row padded.
fn mlm_batch(rows: std::ops::Range<usize>) -> models::train::MlmBatch<B> {
    let device = Default::default();
    let n = rows.len();
    let (mut ids, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        for t in 0..SEQ {
            let id = ((r * 7 + t * 3 + t * t) % 30 + 5) as i64;
            let padded = r == ROWS - 1 && t >= SEQ - 2;
            let masked = (t + r) % 3 == 0 && !padded;
            ids.push(if masked { 3 } else { id });
            labels.push(if masked { id } else { -100 });
            mask.push(if padded { 0 } else { 1 });
        }
    }
    let tensor =
        |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [n, SEQ]), &device);
    models::train::MlmBatch {
        input_ids: tensor(ids),
        attention_mask: tensor(mask),
        token_type_ids: None,
        labels: tensor(labels),
    }
}

#[test]
fn bert_and_roberta_mlm_gradients_match_whole_model_autodiff_on_two_ranks() {
    for roberta in [false, true] {
        let model = Mlm::new(roberta);
        // Reference: the whole model in one graph, the loss averaged as two ranks average it
        // (each rank's mean over its own masked tokens).
        let mut loss: Option<Tensor<B, 1>> = None;
        for rows in [0..ROWS / 2, ROWS / 2..ROWS] {
            let batch = mlm_batch(rows);
            let [n, seq, vocab] = model.logits(&batch).dims();
            let part = models::gpt2::token_cross_entropy(
                model.logits(&batch).reshape([n * seq, vocab]),
                batch.labels.reshape([n * seq]),
                models::gpt2::IGNORE_INDEX,
            ) / 2.0;
            loss = Some(match loss {
                Some(sum) => sum + part,
                None => part,
            });
        }
        let grads = loss.unwrap().backward();
        let (_, embed, blocks, head) = model.clone().split();
        let mut want = vec![flat_grads::<B, _>(
            &embed,
            &layout_of::<B, _>(&embed),
            &grads,
        )];
        for block in &blocks {
            want.push(flat_grads::<B, _>(block, &layout_of::<B, _>(block), &grads));
        }
        want.push(flat_grads::<B, _>(&head, &layout_of::<B, _>(&head), &grads));

        let mut worst: f32 = 0.0;
        for checkpoint in [true, false] {
            let initial = model.clone();
            let ranks = ThreadGroup::run(2, Duration::from_secs(60), move |comm| {
                let rows = comm.rank() * ROWS / 2..(comm.rank() + 1) * ROWS / 2;
                let (spec, embed, blocks, head) = initial.clone().split();
                let mut options = ZeroOptions::checkpoint_all(blocks.len());
                options.checkpoint = vec![checkpoint; blocks.len()];
                let mut trainer =
                    ZeroTrainer::new(spec, comm, Default::default(), embed, blocks, head, options);
                trainer.forward_backward(&mlm_batch(rows)).unwrap();
                std::iter::once(trainer.embed.grad.clone())
                    .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
                    .chain(std::iter::once(trainer.head.grad.clone()))
                    .collect::<Vec<Vec<f32>>>()
            });
            let ranks: Vec<Vec<Vec<f32>>> = ranks.into_iter().map(|r| r.unwrap()).collect();
            for (segment, reference) in want.iter().enumerate() {
                let scale = reference.iter().fold(0.0f32, |m, g| m.max(g.abs()));
                let got = [ranks[0][segment].clone(), ranks[1][segment].clone()].concat();
                worst = worst.max(max_abs_diff(&got[..reference.len()], reference) / scale);
            }
        }
        println!(
            "train specs: MLM (roberta {roberta}) on 2 ranks, worst relative gradient difference {worst:.2e}"
        );
        assert!(worst < 1e-5, "roberta {roberta}: {worst}");
    }
}

#[test]
fn gpt2_classifier_gradients_match_whole_model_autodiff_on_two_ranks() {
    use models::gpt2::Gpt2ForSequenceClassification;
    use models::train::{ClassifierBatch, Gpt2ClassifierSpec};
    let device = Default::default();
    let mut config = config(false, 0.0);
    (config.num_labels, config.pad_token_id) = (Some(3), Some(0));
    let model = Gpt2ForSequenceClassification::<B>::new(&config, &device).unwrap();
    let (layout, values) = flatten::<B, _>(&model);
    let model = load_flat(model, &layout, &values, &device, true);
    // Rows padded with id 0 at different lengths: the score is read at each row's last real token.
    let batch = move |rows: std::ops::Range<usize>| {
        let device = Default::default();
        let n = rows.len();
        let mut ids = ids(rows.clone())
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap();
        for (r, row) in rows.clone().enumerate() {
            for t in SEQ - row % 3..SEQ {
                ids[r * SEQ + t] = 0;
            }
        }
        let labels: Vec<i64> = rows.map(|r| (r % 3) as i64).collect();
        ClassifierBatch {
            input_ids: Tensor::from_data(TensorData::new(ids, [n, SEQ]), &device),
            attention_mask: Tensor::ones([n, SEQ], &device),
            token_type_ids: None,
            labels: Tensor::from_data(TensorData::new(labels, [n]), &device),
        }
    };
    let mut loss: Option<Tensor<B, 1>> = None;
    for rows in [0..ROWS / 2, ROWS / 2..ROWS] {
        let batch = batch(rows);
        let (_, logits) = model.forward(&DecoderInput::new(batch.input_ids.clone()));
        let part = models::bert::cross_entropy(logits, batch.labels) / 2.0;
        loss = Some(match loss {
            Some(sum) => sum + part,
            None => part,
        });
    }
    let grads = loss.unwrap().backward();
    let (_, embed, blocks, head) = Gpt2ClassifierSpec::split(model.clone());
    let mut want = vec![flat_grads::<B, _>(
        &embed,
        &layout_of::<B, _>(&embed),
        &grads,
    )];
    for block in &blocks {
        want.push(flat_grads::<B, _>(block, &layout_of::<B, _>(block), &grads));
    }
    want.push(flat_grads::<B, _>(&head, &layout_of::<B, _>(&head), &grads));
    let ranks = ThreadGroup::run(2, Duration::from_secs(60), move |comm| {
        let rows = comm.rank() * ROWS / 2..(comm.rank() + 1) * ROWS / 2;
        let (spec, embed, blocks, head) = Gpt2ClassifierSpec::split(model.clone());
        let options = ZeroOptions::checkpoint_all(blocks.len());
        let mut trainer =
            ZeroTrainer::new(spec, comm, Default::default(), embed, blocks, head, options);
        trainer.forward_backward(&batch(rows)).unwrap();
        std::iter::once(trainer.embed.grad.clone())
            .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
            .chain(std::iter::once(trainer.head.grad.clone()))
            .collect::<Vec<Vec<f32>>>()
    });
    let ranks: Vec<Vec<Vec<f32>>> = ranks.into_iter().map(|r| r.unwrap()).collect();
    let mut worst: f32 = 0.0;
    for (segment, reference) in want.iter().enumerate() {
        let scale = reference.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        assert!(scale > 0.0, "segment {segment}: a zero reference gradient");
        let got = [ranks[0][segment].clone(), ranks[1][segment].clone()].concat();
        let diff = max_abs_diff(&got[..reference.len()], reference) / scale;
        assert!(diff.is_finite(), "segment {segment}: {diff}");
        worst = worst.max(diff);
    }
    println!(
        "train specs: GPT-2 classifier on 2 ranks, worst relative gradient difference {worst:.2e}"
    );
    assert!(worst < 1e-5, "{worst}");
}
