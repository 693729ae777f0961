//! Forward outputs of every fixture, loaded from safetensors and from `.bin`, against transformers.

use bmtrain_backend::Cpu;
use burn::tensor::TensorData;
use checkpoints_convert::{LoadOptions, WeightsFormat, load_model};
use models::Logits;
use zoo_tests::{MODEL_FIXTURES, fixture, max_abs_diff, reference, reference_input};

/// fp32 outputs must be within this of transformers (max-abs).
const TOLERANCE: f32 = 1e-4;

/// Loads `dir`, runs the reference inputs of `reference_name`, and returns the largest error.
fn max_error(dir: &str, reference_name: &str, format: WeightsFormat) -> f32 {
    let device = Default::default();
    let loaded = load_model::<Cpu>(
        &fixture(dir),
        &device,
        &LoadOptions {
            format,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{dir}: {e}"));
    assert!(
        loaded.unused.is_empty(),
        "{dir}: unused keys {:?}",
        loaded.unused
    );
    let reference = reference(reference_name);
    let input = reference_input(&reference, &device);
    let output = loaded.model.forward(&input);
    let mut worst = max_abs_diff(
        &output.last_hidden_state.into_data(),
        &reference["last_hidden_state"].data,
    );
    match (
        output.encoder_last_hidden_state,
        reference.get("encoder_last_hidden_state"),
    ) {
        (Some(got), Some(want)) => worst = worst.max(max_abs_diff(&got.into_data(), &want.data)),
        (None, None) => {}
        (got, _) => panic!("{dir}: encoder output present: {}", got.is_some()),
    }
    // transformers returns a pooler output from the bare models only; the classification head
    // consumes it, and the logits check covers it there.
    if let Some(want) = reference.get("pooler_output") {
        let got = output
            .pooler_output
            .unwrap_or_else(|| panic!("{dir}: no pooler output"));
        worst = worst.max(max_abs_diff(&got.into_data(), &want.data));
    }
    match (output.logits, reference.get("logits")) {
        (Some(Logits::PerToken(got)), Some(want)) => {
            worst = worst.max(max_abs_diff(&got.into_data(), &want.data))
        }
        (Some(Logits::PerSequence(got)), Some(want)) => {
            worst = worst.max(max_abs_diff(&got.into_data(), &want.data))
        }
        (None, None) => {}
        (got, want) => panic!(
            "{dir}: logits present {} vs reference {}",
            got.is_some(),
            want.is_some()
        ),
    }
    worst
}

#[test]
fn fixture_outputs_match_transformers_from_safetensors() {
    for name in MODEL_FIXTURES {
        let error = max_error(name, name, WeightsFormat::Safetensors);
        eprintln!("parity {name} (safetensors): max abs error {error:.3e}");
        assert!(error < TOLERANCE, "{name}: max abs error {error}");
    }
}

#[test]
fn fixture_outputs_match_transformers_from_pytorch_bin() {
    for name in MODEL_FIXTURES {
        let error = max_error(name, name, WeightsFormat::PytorchBin);
        eprintln!("parity {name} (pytorch_model.bin): max abs error {error:.3e}");
        assert!(error < TOLERANCE, "{name}: max abs error {error}");
    }
}

#[test]
fn sharded_safetensors_load_like_the_single_file() {
    let error = max_error("bert_sharded", "bert_mlm", WeightsFormat::Auto);
    eprintln!("parity bert_sharded (index.json): max abs error {error:.3e}");
    assert!(error < TOLERANCE, "max abs error {error}");
}

/// A Llama saved in shards (as every real Llama checkpoint is), with GQA and llama3 RoPE
/// scaling.
#[test]
fn sharded_llama_matches_transformers() {
    let error = max_error("llama", "llama", WeightsFormat::Auto);
    eprintln!("parity llama (sharded, index.json): max abs error {error:.3e}");
    assert!(error < TOLERANCE, "max abs error {error}");
}

/// The Llama fixture's config rewritten in transformers 4's style (`rope_theta` beside
/// `rope_scaling` with `type`, what the hub's Llama 3.1 files hold) gives the same outputs as
/// transformers 5's `rope_parameters`.
#[test]
fn transformers_4_rope_config_style_gives_the_same_llama() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("llama_v4");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut scaling = config
        .as_object_mut()
        .unwrap()
        .remove("rope_parameters")
        .unwrap();
    let scaling_fields = scaling.as_object_mut().unwrap();
    config["rope_theta"] = scaling_fields.remove("rope_theta").unwrap();
    let kind = scaling_fields.remove("rope_type").unwrap();
    scaling_fields.insert("type".into(), kind);
    config["rope_scaling"] = scaling;
    std::fs::write(&path, config.to_string()).unwrap();

    let device = Default::default();
    let loaded = load_model::<Cpu>(&dir, &device, &LoadOptions::default()).unwrap();
    let reference = reference("llama");
    let output = loaded.model.forward(&reference_input(&reference, &device));
    let Some(Logits::PerToken(logits)) = output.logits else {
        panic!("no logits")
    };
    let error = max_abs_diff(&logits.into_data(), &reference["logits"].data);
    eprintln!("parity llama (transformers-4 config style): max abs error {error:.3e}");
    assert!(error < TOLERANCE, "{error}");
}

/// A bf16 checkpoint (as the hub's Llama and Qwen files are) loads widened to f32: the same
/// outputs as the f32 checkpoint whose every weight is rounded to bf16 first, and a `zoo convert`
/// round trip keeps its bf16 bytes.
#[test]
fn bf16_checkpoints_load_and_convert_bit_identically() {
    let work = tempfile::tempdir().unwrap();
    let (bf16_dir, rounded_dir) = (work.path().join("bf16"), work.path().join("rounded"));
    let original =
        checkpoints_convert::read_weights_file(&fixture("qwen2").join("model.safetensors"))
            .unwrap();
    for (dir, keep_bf16) in [(&bf16_dir, true), (&rounded_dir, false)] {
        std::fs::create_dir(dir).unwrap();
        for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture("qwen2").join(file), dir.join(file)).unwrap();
        }
        let tensors: std::collections::BTreeMap<String, TensorData> = original
            .iter()
            .map(|(k, t)| {
                let bf16 = t.data.clone().convert::<half::bf16>();
                (
                    k.clone(),
                    if keep_bf16 {
                        bf16
                    } else {
                        bf16.convert::<f32>()
                    },
                )
            })
            .collect();
        checkpoints_convert::write_safetensors(&dir.join("model.safetensors"), &tensors, None)
            .unwrap();
    }
    let device = Default::default();
    let reference = reference("qwen2");
    let logits = |dir: &std::path::Path| {
        let loaded = load_model::<Cpu>(dir, &device, &LoadOptions::default()).unwrap();
        match loaded
            .model
            .forward(&reference_input(&reference, &device))
            .logits
        {
            Some(Logits::PerToken(logits)) => logits.into_data(),
            _ => panic!("no logits"),
        }
    };
    assert_eq!(max_abs_diff(&logits(&bf16_dir), &logits(&rounded_dir)), 0.0);

    let (zoo_dir, hf_dir) = (work.path().join("zoo"), work.path().join("hf"));
    checkpoints_convert::convert_hf_to_zoo(&bf16_dir, &zoo_dir, WeightsFormat::Auto, false)
        .unwrap();
    checkpoints_convert::export_zoo_to_hf(&zoo_dir, &hf_dir, false).unwrap();
    let before =
        checkpoints_convert::read_weights_file(&bf16_dir.join("model.safetensors")).unwrap();
    let after = checkpoints_convert::read_weights_file(&hf_dir.join("model.safetensors")).unwrap();
    assert_eq!(before.len(), after.len());
    for (key, tensor) in &before {
        assert_eq!(tensor.data.dtype, burn::tensor::DType::BF16, "{key}");
        assert!(
            tensor.data.as_bytes() == after[key].data.as_bytes(),
            "{key}"
        );
    }
}

/// Older checkpoints: a `bert.` prefix on a bare `BertModel`, TF-era `LayerNorm.gamma`/`beta`
/// names, and a `position_ids` buffer. They load to the same outputs.
#[test]
fn prefixed_gamma_beta_checkpoints_with_buffers_load_the_same() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("old_bert");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixture("bert").join("config.json"), dir.join("config.json")).unwrap();
    let original =
        checkpoints_convert::read_weights_file(&fixture("bert").join("model.safetensors")).unwrap();
    let mut renamed = std::collections::BTreeMap::new();
    for (key, tensor) in original {
        let key = key
            .replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta");
        renamed.insert(format!("bert.{key}"), tensor.data);
    }
    let positions: Vec<i64> = (0..40).collect();
    renamed.insert(
        "bert.embeddings.position_ids".into(),
        TensorData::new(positions, [1, 40]),
    );
    checkpoints_convert::write_safetensors(&dir.join("model.safetensors"), &renamed, None).unwrap();

    let device = Default::default();
    let loaded = load_model::<Cpu>(&dir, &device, &LoadOptions::default()).unwrap();
    assert!(loaded.unused.is_empty(), "{:?}", loaded.unused);
    let reference = reference("bert");
    let input = reference_input(&reference, &device);
    let output = loaded.model.forward(&input);
    let error = max_abs_diff(
        &output.last_hidden_state.into_data(),
        &reference["last_hidden_state"].data,
    );
    assert!(error < TOLERANCE, "{error}");
}

/// A GPT-2 checkpoint saved from a bare `GPT2Model` (no `transformer.` prefix), with the
/// `attn.bias` / `attn.masked_bias` buffers older transformers saved, loads into
/// `GPT2LMHeadModel` with the same logits.
#[test]
fn gpt2_without_prefix_and_with_mask_buffers_loads_the_same() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("old_gpt2");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixture("gpt2").join("config.json"), dir.join("config.json")).unwrap();
    let original =
        checkpoints_convert::read_weights_file(&fixture("gpt2").join("model.safetensors")).unwrap();
    let mut renamed = std::collections::BTreeMap::new();
    for (key, tensor) in original {
        renamed.insert(
            key.trim_start_matches("transformer.").to_string(),
            tensor.data,
        );
    }
    for layer in 0..2 {
        let causal: Vec<u8> = (0..128 * 128)
            .map(|i| u8::from(i % 128 <= i / 128))
            .collect();
        renamed.insert(
            format!("h.{layer}.attn.bias"),
            TensorData::new(causal, [1, 1, 128, 128]),
        );
        renamed.insert(
            format!("h.{layer}.attn.masked_bias"),
            TensorData::new(vec![-1e4f32], [1]),
        );
    }
    checkpoints_convert::write_safetensors(&dir.join("model.safetensors"), &renamed, None).unwrap();

    let device = Default::default();
    let loaded = load_model::<Cpu>(&dir, &device, &LoadOptions::default()).unwrap();
    assert!(loaded.unused.is_empty(), "{:?}", loaded.unused);
    let reference = reference("gpt2");
    let output = loaded.model.forward(&reference_input(&reference, &device));
    let Some(Logits::PerToken(logits)) = output.logits else {
        panic!("GPT2LMHeadModel has per-token logits");
    };
    let error = max_abs_diff(&logits.into_data(), &reference["logits"].data);
    assert!(error < TOLERANCE, "{error}");
}
