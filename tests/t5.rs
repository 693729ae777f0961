//! T5 specifics: f16 inference, checkpoints in bf16, both transformers versions' ways of writing
//! an untied head, and the bad inputs the T5 loader must refuse.

use std::collections::BTreeMap;
use std::path::Path;

use bmtrain_backend::Cpu;
use burn::tensor::{DType, FloatDType, TensorData};
use checkpoints_convert::{LoadOptions, load_model, read_weights_file, write_safetensors};
use models::{AnyModel, ModelOutput};
use serde_json::Value;
use zoo_tests::{fixture, floats, max_abs_diff, reference, reference_input};

fn run(dir: &Path, options: &LoadOptions) -> ModelOutput<Cpu> {
    let device = Default::default();
    let loaded = load_model::<Cpu>(dir, &device, options).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.unused.is_empty(), "{:?}", loaded.unused);
    loaded
        .model
        .forward(&reference_input(&reference("t5_v1_1"), &device))
}

fn logits(output: ModelOutput<Cpu>) -> TensorData {
    match output.logits {
        Some(models::Logits::PerToken(l)) => l.into_data(),
        _ => panic!("T5ForConditionalGeneration has per-token logits"),
    }
}

/// A copy of a fixture's config and weights (safetensors only) in a temporary directory.
fn copy_of(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.join(file)).unwrap();
    }
    (work, dir)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, TensorData>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: BTreeMap<String, TensorData> = read_weights_file(&path)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect();
    edit(&mut tensors);
    write_safetensors(&path, &tensors, None).unwrap();
}

#[test]
fn f16_forward_is_finite_and_close_to_f32() {
    let dir = fixture("t5_v1_1");
    let f32_logits = logits(run(&dir, &LoadOptions::default()));
    let options = LoadOptions {
        dtype: Some(FloatDType::F16),
        ..Default::default()
    };
    let output = run(&dir, &options);
    let half = logits(output);
    assert_eq!(half.dtype, DType::F16);
    let values = floats(&half);
    assert!(
        values.iter().all(|x| x.is_finite()),
        "inf or NaN in f16 logits"
    );
    let error = max_abs_diff(&half, &f32_logits);
    let scale = floats(&f32_logits)
        .iter()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    eprintln!("t5 f16: max abs logit difference {error:.3e} (logits up to {scale:.1})");
    assert!(
        error < 0.02 * scale,
        "f16 logits off by {error} (scale {scale})"
    );
}

#[test]
fn bf16_checkpoints_load_as_f32() {
    let (_work, dir) = copy_of("t5_v1_1");
    edit_weights(&dir, |tensors| {
        for data in tensors.values_mut() {
            *data = data.clone().convert::<half::bf16>();
        }
    });
    let output = run(&dir, &LoadOptions::default());
    let got = logits(output);
    assert_eq!(got.dtype, DType::F32);
    let want = &reference("t5_v1_1")["logits"].data;
    let error = max_abs_diff(&got, want);
    // bf16 keeps 8 bits of mantissa: the outputs move, but stay near.
    assert!(error > 0.0 && error < 0.5, "{error}");
}

/// transformers 4 writes v1.1 configs with `tie_word_embeddings: false` and no
/// `scale_decoder_outputs`; transformers 5 writes `true` plus `scale_decoder_outputs: false`.
/// Both load to the same model.
#[test]
fn transformers_4_style_untied_config_loads_the_same() {
    let (_work, dir) = copy_of("t5_v1_1");
    edit_config(&dir, |config| {
        config.insert("tie_word_embeddings".into(), Value::Bool(false));
        config.remove("scale_decoder_outputs");
    });
    let got = logits(run(&dir, &LoadOptions::default()));
    let error = max_abs_diff(&got, &reference("t5_v1_1")["logits"].data);
    assert!(error < 1e-4, "{error}");
}

#[test]
fn a_head_contradicting_tie_word_embeddings_is_an_error() {
    // A v1.0 config (tied, as transformers 4 writes it) with a separate, different lm_head.
    let (_work, dir) = copy_of("t5");
    edit_config(&dir, |config| {
        config.remove("scale_decoder_outputs");
    });
    edit_weights(&dir, |tensors| {
        let shared = tensors["shared.weight"].clone();
        let doubled: Vec<f32> = floats(&shared).iter().map(|x| x * 2.0).collect();
        tensors.insert(
            "lm_head.weight".into(),
            TensorData::new(doubled, shared.shape.clone()),
        );
    });
    let device = Default::default();
    let err = load_model::<Cpu>(&dir, &device, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lm_head.weight") && err.contains("tie_word_embeddings"),
        "{err}"
    );

    // An untied config without a head: the missing key is named.
    let (_work, dir) = copy_of("t5");
    edit_config(&dir, |config| {
        config.insert("tie_word_embeddings".into(), Value::Bool(false));
        config.remove("scale_decoder_outputs");
    });
    let err = load_model::<Cpu>(&dir, &device, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
}

#[test]
fn generation_without_decoder_start_token_id_is_an_error() {
    let (_work, dir) = copy_of("t5");
    edit_config(&dir, |config| {
        config.remove("decoder_start_token_id");
    });
    let device = Default::default();
    let loaded = load_model::<Cpu>(&dir, &device, &LoadOptions::default()).unwrap();
    let AnyModel::T5ForConditionalGeneration(model) = loaded.model else {
        panic!("T5ForConditionalGeneration");
    };
    let config = models::generation::GenerationConfig::greedy(4, vec![1], 0);
    let err = models::t5::generate_seq2seq(&model, &[vec![5, 6, 1]], &config, 0, &device, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("decoder_start_token_id"), "{err}");
}

#[test]
fn t5_tokenizer_json_matches_transformers() {
    let dir = fixture("t5");
    let text = std::fs::read_to_string(dir.join("tokenizer_reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let tokenizer = checkpoints_convert::load_tokenizer(&dir)
        .unwrap()
        .expect("a tokenizer");
    let sentences: Vec<String> = serde_json::from_value(reference["sentences"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["ids"].clone()).unwrap();
    for (sentence, want) in sentences.iter().zip(ids) {
        assert_eq!(
            tokenizer.encode(sentence, true).unwrap(),
            want,
            "{sentence:?}"
        );
    }
}

/// A tiny CPM-2 (the cpm2 preset's layout, scaled down) trained on span-corruption examples of
/// Chinese text tokenized by CPM-2's tokenizer: the loss falls.
#[test]
fn tiny_cpm2_learns_span_corruption() {
    use bmtrain_backend::CpuTrain;
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use burn::tensor::{Int, Tensor};
    use models::t5::{Seq2SeqInput, T5ForConditionalGeneration, seq2seq_loss, span_corrupt};

    let tokenizer = checkpoints_convert::load_tokenizer(&fixture("tokenizers/cpm2"))
        .unwrap()
        .unwrap();
    let checkpoints_convert::TextTokenizer::Cpm2(cpm2) = &tokenizer else {
        panic!("CPM-2 tokenizer");
    };
    let pad = cpm2.token_to_id("<pad>").unwrap();
    let eod = cpm2.token_to_id("<eod>").unwrap();
    let texts = [
        "今天天气很好，我们去公园散步。",
        "深度学习模型需要大量的数据和计算资源。",
        "清华大学的研究人员发布了一个中文预训练语言模型。",
        "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    ];
    let mut pairs = Vec::new();
    for text in texts {
        let ids = cpm2.encode(text);
        // Hide about 15% of the tokens in spans of two, as T5's objective does on average.
        let spans: Vec<(usize, usize)> = (1..ids.len().saturating_sub(2))
            .step_by(7)
            .map(|s| (s, 2))
            .collect();
        pairs.push(span_corrupt(
            &ids,
            &spans,
            |k| cpm2.sentinel_id(k).unwrap(),
            Some(eod),
        ));
    }
    let device = Default::default();
    let pad_rows = |rows: Vec<&Vec<u32>>, fill: i64| {
        let width = rows.iter().map(|r| r.len()).max().unwrap();
        let flat: Vec<i64> = rows
            .iter()
            .flat_map(|r| {
                r.iter()
                    .map(|&t| t as i64)
                    .chain(std::iter::repeat_n(fill, width - r.len()))
            })
            .collect();
        Tensor::<CpuTrain, 2, Int>::from_data(TensorData::new(flat, [rows.len(), width]), &device)
    };
    let input_ids = pad_rows(pairs.iter().map(|p| &p.0).collect(), pad as i64);
    let attention_mask = input_ids.clone().not_equal_elem(pad as i64).int();
    let labels = pad_rows(pairs.iter().map(|p| &p.1).collect(), -100);
    let decoder_input_ids = models::t5::shift_right(labels.clone(), pad, pad);

    let config = models::t5::T5Config {
        decoder_start_token_id: Some(pad),
        ..models::presets::cpm2_tiny_config(cpm2.vocab_size())
    };
    let mut model = T5ForConditionalGeneration::<CpuTrain>::new(&config, &device).unwrap();
    let mut optimizer = AdamWConfig::new().init();
    let input = Seq2SeqInput {
        input_ids,
        attention_mask: Some(attention_mask),
        decoder_input_ids,
    };
    let mut losses = Vec::new();
    for _ in 0..40 {
        let (_, _, logits) = model.forward(&input);
        let loss = seq2seq_loss(logits, labels.clone());
        losses.push(floats(&loss.clone().into_data())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads);
    }
    eprintln!(
        "cpm2: span-corruption loss {:.3} → {:.3} in 40 steps",
        losses[0], losses[39]
    );
    assert!(losses[39] < 0.5 * losses[0], "{losses:?}");
}
