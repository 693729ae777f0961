//! The Llama family under the ZeRO trainer: `LlamaSpec`'s gradients (embedding, blocks with
//! rotary tables and windows, a tied or untied head) equal plain burn autodiff over the whole
//! model, on 1 and 2 ranks, with and without block checkpointing.

use std::time::Duration;

use bmtrain_backend::CpuTrain;
use bmtrain_backend::comm::{Communicator, SingleRank, ThreadGroup};
use bmtrain_backend::zero::{flatten, load_flat};
use burn::tensor::{Int, Tensor, TensorData};
use models::io::{DecoderInput, causal_lm_loss};
use models::llama::{LlamaConfig, LlamaForCausalLM};
use models::train::{LlamaSpec, LmBatch};
use zoo_tests::{segment_gradients, trainer_gradients};

type B = CpuTrain;

const ROWS: usize = 4;
const SEQ: usize = 9;
const VOCAB: usize = 37;

/// Tiny configs of the three variants: Llama with GQA and llama3 scaling, Mistral with a window
/// shorter than the sequence, Qwen2 with biases, one kv head and a tied head.
fn configs() -> Vec<(&'static str, LlamaConfig)> {
    let common = serde_json::json!({"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 32});
    let with = |extra: serde_json::Value| {
        let mut value = common.clone();
        for (k, v) in extra.as_object().unwrap() {
            value[k] = v.clone();
        }
        LlamaConfig::from_hf(&value).unwrap()
    };
    vec![
        (
            "llama",
            with(
                serde_json::json!({"num_key_value_heads": 2, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
            ),
        ),
        (
            "mistral",
            with(
                serde_json::json!({"model_type": "mistral", "num_key_value_heads": 2,
            "sliding_window": 4}),
            ),
        ),
        (
            "qwen2",
            with(
                serde_json::json!({"model_type": "qwen2", "num_key_value_heads": 1,
            "tie_word_embeddings": true}),
            ),
        ),
    ]
}

fn model(config: &LlamaConfig) -> LlamaForCausalLM<B> {
    let device = Default::default();
    let model = LlamaForCausalLM::<B>::new(config, &device).unwrap();
    let (layout, values) = flatten::<B, _>(&model);
    load_flat(model, &layout, &values, &device, true)
}

fn ids(rows: std::ops::Range<usize>) -> Tensor<B, 2, Int> {
    let n = rows.len();
    let values: Vec<i64> = rows
        .flat_map(|r| (0..SEQ).map(move |t| ((r * 13 + t * 7 + t * t) % VOCAB) as i64))
        .collect();
    Tensor::from_data(TensorData::new(values, [n, SEQ]), &Default::default())
}

/// One autodiff graph over the whole model; gradients per segment in the trainer's order.
fn reference_gradients(model: LlamaForCausalLM<B>) -> Vec<Vec<f32>> {
    let input = ids(0..ROWS);
    let (_, logits) = model.forward(&DecoderInput::new(input.clone()));
    let grads = causal_lm_loss(logits, input).backward();
    segment_gradients(&LlamaSpec::split(model), &grads)
}

/// The trainer's gradients of one micro-batch of `rows` on one rank.
fn llama_trainer_gradients<C: Communicator + 'static>(
    model: LlamaForCausalLM<B>,
    comm: C,
    rows: std::ops::Range<usize>,
    checkpoint: bool,
) -> Vec<Vec<f32>> {
    let batch = LmBatch {
        input_ids: ids(rows),
        labels: None,
    };
    trainer_gradients(LlamaSpec::split(model), comm, &batch, checkpoint)
}

#[test]
fn llama_family_trainer_gradients_match_whole_model_autodiff_on_one_and_two_ranks() {
    for (name, config) in configs() {
        let initial = model(&config);
        let want = reference_gradients(initial.clone());
        let mut worst: f32 = 0.0;
        for checkpoint in [false, true] {
            let one = llama_trainer_gradients(initial.clone(), SingleRank, 0..ROWS, checkpoint);
            let shared = initial.clone();
            let two = ThreadGroup::run(2, Duration::from_secs(60), move |comm| {
                let rows = comm.rank() * ROWS / 2..(comm.rank() + 1) * ROWS / 2;
                llama_trainer_gradients(shared.clone(), comm, rows, checkpoint)
            });
            let two: Vec<Vec<Vec<f32>>> = two.into_iter().map(|r| r.unwrap()).collect();
            for (segment, reference) in want.iter().enumerate() {
                let scale = reference.iter().fold(0.0f32, |m, g| m.max(g.abs()));
                let got_two: Vec<f32> = [two[0][segment].clone(), two[1][segment].clone()].concat();
                for got in [
                    &one[segment][..reference.len()],
                    &got_two[..reference.len()],
                ] {
                    let diff = got
                        .iter()
                        .zip(reference)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max);
                    worst = worst.max(diff / scale);
                }
            }
        }
        println!("llama train: {name} worst relative gradient difference {worst:.2e}");
        assert!(worst < 1e-5, "{name}: {worst}");
    }
}

/// `LlamaForSequenceClassification`'s cut: the score at each row's last non-padding token (rows
/// right-padded with the pad id), 2 ranks against whole-model autodiff.
#[test]
fn llama_classifier_gradients_match_whole_model_autodiff_on_two_ranks() {
    use models::io::{ClassifierBatch, cross_entropy};
    use models::llama::LlamaForSequenceClassification;
    use models::train::LlamaClassifierSpec;
    let (_, mut config) = configs().remove(0);
    (config.num_labels, config.pad_token_id) = (Some(3), Some(0));
    let device = Default::default();
    let model = LlamaForSequenceClassification::<B>::new(&config, &device).unwrap();
    let (layout, values) = flatten::<B, _>(&model);
    let initial = load_flat(model, &layout, &values, &device, true);
    // Row r keeps SEQ - r real tokens, then padding (id 0, which the ids never use).
    let batch = move |rows: std::ops::Range<usize>| {
        let n = rows.len();
        let ids: Vec<i64> = rows
            .clone()
            .flat_map(|r| {
                (0..SEQ).map(move |t| {
                    if t < SEQ - r {
                        1 + ((r * 5 + t * 3) % (VOCAB - 1)) as i64
                    } else {
                        0
                    }
                })
            })
            .collect();
        let labels: Vec<i64> = rows.map(|r| (r % 3) as i64).collect();
        ClassifierBatch {
            input_ids: Tensor::from_data(TensorData::new(ids, [n, SEQ]), &Default::default()),
            attention_mask: Tensor::ones([n, SEQ], &Default::default()),
            token_type_ids: None,
            labels: Tensor::from_data(TensorData::new(labels, [n]), &Default::default()),
        }
    };
    let whole = batch(0..ROWS);
    let (_, logits) = initial.forward(&DecoderInput::new(whole.input_ids.clone()));
    let grads = cross_entropy(logits, whole.labels.clone()).backward();
    let want = segment_gradients(&LlamaClassifierSpec::split(initial.clone()), &grads);
    let two = ThreadGroup::run(2, Duration::from_secs(60), move |comm| {
        let rows = comm.rank() * ROWS / 2..(comm.rank() + 1) * ROWS / 2;
        let cut = LlamaClassifierSpec::split(initial.clone());
        trainer_gradients(cut, comm, &batch(rows), true)
    });
    let two: Vec<Vec<Vec<f32>>> = two.into_iter().map(|r| r.unwrap()).collect();
    let mut worst: f32 = 0.0;
    for (segment, reference) in want.iter().enumerate() {
        let scale = reference.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let got: Vec<f32> = [two[0][segment].clone(), two[1][segment].clone()].concat();
        let diff = got[..reference.len()]
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst = worst.max(diff / scale);
    }
    println!("llama train: classifier worst relative gradient difference {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
}

/// The first config's Llama with LoRA (r 2, α 4) on q_proj, v_proj and down_proj, B drawn
/// non-zero (so that A's gradient is not zero either), every value drawn and held as a leaf.
fn adapted_llama() -> LlamaForCausalLM<B> {
    use models::adapters::LoraSpec;
    use models::io::ModelClass;
    let (_, config) = configs().remove(0);
    let device = Default::default();
    let mut base = LlamaForCausalLM::<B>::new(&config, &device).unwrap();
    let lora = LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    lora.attach(base.adaptable(), &device).unwrap();
    // A non-zero B, so that A's gradient is not zero either.
    for (_, linear) in base.adaptable() {
        if let Some(adapter) = linear.lora.as_mut() {
            let shape = adapter.b.val().dims();
            adapter.b = burn::module::Param::from_tensor(Tensor::random(
                shape,
                burn::tensor::Distribution::Normal(0.0, 0.3),
                &device,
            ));
        }
    }
    let (layout, values) = flatten::<B, _>(&base);
    load_flat(base, &layout, &values, &device, true)
}

/// Per segment of `cut` (embedding, blocks, head), the LoRA parameters' part of whole-model
/// autodiff's gradients, in visit order.
fn lora_gradients(
    cut: &zoo_tests::Cut<LlamaSpec>,
    grads: &<B as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Vec<Vec<f32>> {
    use bmtrain_backend::zero::layout_of;
    let (_, e, b, h) = cut;
    let mut layouts = vec![layout_of::<B, _>(e)];
    layouts.extend(b.iter().map(layout_of::<B, _>));
    layouts.push(layout_of::<B, _>(h));
    segment_gradients(cut, grads)
        .into_iter()
        .zip(layouts)
        .map(|(full, layout)| {
            layout
                .entries
                .iter()
                .filter(|e| e.name.contains(".lora."))
                .flat_map(|e| full[e.offset..e.offset + e.len()].to_vec())
                .collect()
        })
        .collect()
}

/// LoRA through the trainer: with every base weight frozen, the adapters' gradients (shards of
/// the trainable part alone) equal whole-model autodiff's on 1 and 2 ranks, with and without
/// checkpointing, and the frozen weights get none.
#[test]
fn lora_gradients_through_the_trainer_match_whole_model_autodiff() {
    use bmtrain_backend::trainer::{Frozen, ZeroOptions, ZeroTrainer};
    let initial = adapted_llama();
    // The reference: each segment's LoRA gradients, in visit order.
    let want: Vec<Vec<f32>> = {
        let cut = LlamaSpec::split(initial.clone());
        let input = ids(0..ROWS);
        let (_, logits) = initial.forward(&DecoderInput::new(input.clone()));
        let grads = causal_lm_loss(logits, input).backward();
        lora_gradients(&cut, &grads)
    };
    let lora_total: usize = want.iter().map(Vec::len).sum();
    assert!(lora_total > 0 && want.iter().flatten().any(|g| *g != 0.0));
    let run = move |model: LlamaForCausalLM<B>, comm: Box<dyn Communicator>, checkpoint: bool| {
        let rows =
            comm.rank() * ROWS / comm.world_size()..(comm.rank() + 1) * ROWS / comm.world_size();
        let (spec, embed, blocks, head) = LlamaSpec::split(model);
        let mut options = ZeroOptions::checkpoint_all(blocks.len());
        options.checkpoint = vec![checkpoint; blocks.len()];
        options.frozen = Some(Frozen::new(move |name| !name.contains(".lora.")));
        let mut trainer =
            ZeroTrainer::new(spec, comm, Default::default(), embed, blocks, head, options);
        assert_eq!(trainer.trainable_count(), lora_total);
        let batch = LmBatch {
            input_ids: ids(rows),
            labels: None,
        };
        trainer.forward_backward(&batch).unwrap();
        std::iter::once(trainer.embed.grad.clone())
            .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
            .chain(std::iter::once(trainer.head.grad.clone()))
            .collect::<Vec<_>>()
    };
    let mut worst: f32 = 0.0;
    for checkpoint in [false, true] {
        let one = run(initial.clone(), Box::new(SingleRank), checkpoint);
        let shared = initial.clone();
        let two: Vec<Vec<Vec<f32>>> = ThreadGroup::run(2, Duration::from_secs(60), move |comm| {
            run(shared.clone(), Box::new(comm), checkpoint)
        })
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
        for (segment, reference) in want.iter().enumerate() {
            let scale = reference
                .iter()
                .fold(f32::MIN_POSITIVE, |m, g| m.max(g.abs()));
            let got_two = [two[0][segment].clone(), two[1][segment].clone()].concat();
            for got in [&one[segment], &got_two] {
                assert!(got.len() >= reference.len());
                let diff = got
                    .iter()
                    .zip(reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                worst = worst.max(diff / scale);
            }
        }
    }
    println!(
        "llama train: LoRA worst relative gradient difference {worst:.2e} ({lora_total} trained)"
    );
    assert!(worst < 1e-5, "{worst}");
}

/// QLoRA through the trainer: with the base linear layers held as int8 / NF4 codes (quantized
/// by the trainer from their f32 values, sharded as packed words on 2 ranks), the loss and the
/// adapters' gradients equal whole-model autodiff of the same model with those layers'
/// weights replaced by their dequantized values, on 1 and 2 ranks with and without
/// checkpointing; evaluation gives the same loss; the codes stay bit-identical through a step,
/// and the rank holds them instead of f32 copies.
#[test]
fn qlora_gradients_through_the_trainer_match_autodiff_of_the_dequantized_model() {
    use bmtrain_backend::quant::QuantFormat;
    use bmtrain_backend::trainer::{Frozen, ZeroOptions, ZeroTrainer};
    use models::io::ModelClass;
    let initial = adapted_llama();
    let coded: usize = initial
        .clone()
        .adaptable()
        .iter()
        .map(|(_, l)| l.weight.lazy_shape().num_elements())
        .sum();
    for format in [QuantFormat::Int8, QuantFormat::Nf4] {
        // The reference: the base layers' weights are their dequantized codes, dense.
        let mut dense = initial.clone();
        for (_, linear) in dense.adaptable() {
            linear.quantize(format);
            let values = linear.weight.val().require_grad();
            linear.quantized = None;
            linear.weight = burn::module::Param::from_tensor(values);
        }
        let input = ids(0..ROWS);
        let (_, logits) = dense.forward(&DecoderInput::new(input.clone()));
        let loss = causal_lm_loss(logits, input);
        let want_loss: f32 = loss.clone().into_scalar();
        let grads = loss.backward();
        let cut = LlamaSpec::split(dense);
        let want = lora_gradients(&cut, &grads);
        let lora_total: usize = want.iter().map(Vec::len).sum();
        assert!(want.iter().flatten().any(|g| *g != 0.0));
        let run =
            move |mut model: LlamaForCausalLM<B>, comm: Box<dyn Communicator>, checkpoint: bool| {
                let world = comm.world_size();
                let rows = comm.rank() * ROWS / world..(comm.rank() + 1) * ROWS / world;
                // Each rank lends its own model's layers.
                let quantized = models::quantize::lend_base(&mut model, format);
                let (spec, embed, blocks, head) = LlamaSpec::split(model);
                let mut options = ZeroOptions::checkpoint_all(blocks.len());
                options.checkpoint = vec![checkpoint; blocks.len()];
                options.frozen = Some(Frozen::new(move |name| !name.contains(".lora.")));
                options.quantized = Some(quantized);
                let mut trainer =
                    ZeroTrainer::new(spec, comm, Default::default(), embed, blocks, head, options);
                assert_eq!(trainer.trainable_count(), lora_total);
                assert_eq!(trainer.quantized_count(), coded);
                let bytes = trainer.rank_bytes();
                assert!(bytes.quantized > 0 && bytes.quantized * world < coded * 4 / 3);
                let batch = LmBatch {
                    input_ids: ids(rows.clone()),
                    labels: None,
                };
                let before = trainer.named_codes().unwrap();
                let loss = trainer.forward_backward(&batch).unwrap();
                let grads = std::iter::once(trainer.embed.grad.clone())
                    .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
                    .chain(std::iter::once(trainer.head.grad.clone()))
                    .collect::<Vec<_>>();
                let eval_batch = LmBatch {
                    input_ids: Tensor::<bmtrain_backend::Cpu, 2, Int>::from_data(
                        batch.input_ids.to_data(),
                        &Default::default(),
                    ),
                    labels: None,
                };
                let eval = trainer.infer_loss(&eval_batch).unwrap();
                trainer.step(1e-2).unwrap();
                let after = trainer.named_codes().unwrap();
                assert_eq!(before.len(), after.len());
                for ((name, a), (_, b)) in before.iter().zip(&after) {
                    assert!(a == b, "{name}: the codes changed");
                }
                (grads, loss, eval)
            };
        let mut worst: f32 = 0.0;
        for checkpoint in [false, true] {
            let one = run(initial.clone(), Box::new(SingleRank), checkpoint);
            let shared = initial.clone();
            let two: Vec<_> = ThreadGroup::run(2, Duration::from_secs(60), move |comm| {
                run(shared.clone(), Box::new(comm), checkpoint)
            })
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
            // One rank's loss and evaluation are the whole batch's; two ranks' average to it.
            for got in [one.1, one.2, (two[0].1 + two[1].1) / 2.0] {
                assert!(
                    (got - want_loss).abs() < 1e-5,
                    "{format}: {got} vs {want_loss}"
                );
            }
            for (segment, reference) in want.iter().enumerate() {
                let scale = reference
                    .iter()
                    .fold(f32::MIN_POSITIVE, |m, g| m.max(g.abs()));
                let got_two = [two[0].0[segment].clone(), two[1].0[segment].clone()].concat();
                for got in [&one.0[segment], &got_two] {
                    assert!(got.len() >= reference.len());
                    let diff = got
                        .iter()
                        .zip(reference)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max);
                    worst = worst.max(diff / scale);
                }
            }
        }
        println!(
            "llama train: QLoRA ({format}) worst relative gradient difference {worst:.2e} \
             ({lora_total} trained, {coded} held as codes)"
        );
        assert!(worst < 1e-5, "{format}: {worst}");
    }
}
