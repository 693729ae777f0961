//! LoRA adapters in PEFT's format: adapters made by peft (tests/fixtures/peft, `generate.py peft`)
//! load onto zoo's models with peft's outputs, write back to peft's exact tensors, and adapters
//! zoo cannot take are refused by name.

use bmtrain_backend::Cpu;
use checkpoints_convert::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, write_adapter};
use checkpoints_convert::{LoadOptions, load_model, read_spec, read_weights_file};
use models::Logits;

use zoo_tests::{fixture, floats, max_abs_diff, reference, reference_input};

/// Each fixture's adapter on its base: the output peft computed, within 1e-4 (GPT-2's on its
/// fused `c_attn`, split onto zoo's query, key and value; llama_cls's with its saved head).
#[test]
fn peft_adapters_give_peft_outputs() {
    for (name, output) in [
        ("llama", "logits"),
        ("bert", "last_hidden_state"),
        ("t5_v1_1", "logits"),
        ("gpt2", "logits"),
        ("llama_cls", "logits"),
    ] {
        let device = Default::default();
        let options = LoadOptions {
            adapter: Some(fixture("peft").join(name)),
            dropout: Some(0.0),
            ..Default::default()
        };
        let loaded = load_model::<Cpu>(&fixture(name), &device, &options).unwrap();
        let lora = loaded
            .spec
            .lora()
            .unwrap()
            .expect("the adapter is recorded");
        let reference = reference(&format!("peft/{name}"));
        let input = reference_input(&reference, &device);
        let result = loaded.model.forward(&input);
        let got = match output {
            "logits" => match result.logits {
                Some(Logits::PerToken(logits)) => logits.into_data(),
                Some(Logits::PerSequence(logits)) => logits.into_data(),
                None => panic!("{name}: no logits"),
            },
            _ => result.last_hidden_state.into_data(),
        };
        let want = &reference[output].data;
        let diff = max_abs_diff(&got, want);
        // Without the adapter the outputs differ: the update is real.
        let plain = load_model::<Cpu>(&fixture(name), &device, &LoadOptions::default()).unwrap();
        let base = match plain.model.forward(&input) {
            r if output == "logits" => match r.logits {
                Some(Logits::PerToken(logits)) => logits.into_data(),
                Some(Logits::PerSequence(logits)) => logits.into_data(),
                None => panic!("no logits"),
            },
            r => r.last_hidden_state.into_data(),
        };
        let moved = max_abs_diff(&base, want);
        println!(
            "peft {name}: r {} alpha {} targets {:?}: max |zoo − peft| {diff:.2e} (the base alone \
             is {moved:.2e} away)",
            lora.r, lora.alpha, lora.targets
        );
        assert!(diff < 1e-4, "{name}: {diff}");
        assert!(
            moved > 1e3 * diff.max(1e-7),
            "{name}: the adapter changes nothing"
        );
    }
}

/// Read and written again, an adapter has peft's keys, shapes and values exactly, and its config
/// peft's rank, scale and target modules.
#[test]
fn adapters_write_back_to_peft_tensors() {
    for name in ["llama", "bert", "t5_v1_1", "llama_cls"] {
        let spec = read_spec(&fixture(name)).unwrap();
        let source = fixture("peft").join(name);
        let adapter = read_adapter(&source, &spec).unwrap();
        let out = tempfile::tempdir().unwrap();
        write_adapter(out.path(), &spec, &adapter.lora, &adapter.tensors, "base").unwrap();
        let want = read_weights_file(&source.join(ADAPTER_WEIGHTS)).unwrap();
        let got = read_weights_file(&out.path().join(ADAPTER_WEIGHTS)).unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (key, tensor) in &want {
            assert_eq!(got[key].data.shape, tensor.data.shape, "{name} {key}");
            assert_eq!(floats(&got[key].data), floats(&tensor.data), "{name} {key}");
        }
        let read = |dir: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap())
                .unwrap()
        };
        let (ours, theirs) = (read(out.path()), read(&source));
        assert_eq!(ours["peft_type"], theirs["peft_type"], "{name}");
        assert_eq!(ours["r"], theirs["r"], "{name}");
        assert_eq!(
            ours["lora_alpha"].as_f64(),
            theirs["lora_alpha"].as_f64(),
            "{name}"
        );
        // A set in peft (its order varies).
        let modules = |config: &serde_json::Value| {
            let mut names: Vec<String> = config["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_string())
                .collect();
            names.sort();
            names
        };
        assert_eq!(modules(&ours), modules(&theirs), "{name}");
    }
}

/// An adapter for another base, a method zoo does not implement, and a damaged config are errors
/// naming the key or option.
#[test]
fn adapters_zoo_cannot_take_are_refused_by_name() {
    let bert = read_spec(&fixture("bert")).unwrap();
    let err = read_adapter(&fixture("peft").join("llama"), &bert)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0") && err.contains("another base"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("peft").join("bert");
    std::fs::copy(
        source.join(ADAPTER_WEIGHTS),
        dir.path().join(ADAPTER_WEIGHTS),
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    for (field, value, expect) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("peft_type", serde_json::json!("IA3"), "peft_type"),
        (
            "rank_pattern",
            serde_json::json!({"query": 8}),
            "rank_pattern",
        ),
        ("r", serde_json::json!(3), "rank is 3"),
    ] {
        let mut changed = config.clone();
        changed[field] = value;
        std::fs::write(dir.path().join(ADAPTER_CONFIG), changed.to_string()).unwrap();
        let err = read_adapter(dir.path(), &bert).unwrap_err().to_string();
        assert!(err.contains(expect), "{field}: {err}");
    }
}

/// GPT-2's fused `c_attn` adapter, written by zoo as one rank-3r update with a block-diagonal B
/// (`rank_pattern` / `alpha_pattern` 3r / 3α), reads back to the same zoo tensors and gives peft's
/// outputs again.
#[test]
fn a_fused_gpt2_adapter_writes_as_a_block_diagonal_update_and_reads_back() {
    let spec = read_spec(&fixture("gpt2")).unwrap();
    let adapter = read_adapter(&fixture("peft").join("gpt2"), &spec).unwrap();
    assert_eq!(
        adapter.lora.targets,
        ["c_fc", "key", "query", "value"],
        "c_attn is zoo's query, key and value"
    );
    let out = tempfile::tempdir().unwrap();
    write_adapter(out.path(), &spec, &adapter.lora, &adapter.tensors, "base").unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(config["rank_pattern"]["c_attn"], 3 * adapter.lora.r);
    assert_eq!(
        config["alpha_pattern"]["c_attn"].as_f64(),
        Some(3.0 * adapter.lora.alpha)
    );
    let again = read_adapter(out.path(), &spec).unwrap();
    assert_eq!(again.lora, adapter.lora);
    assert_eq!(again.tensors, adapter.tensors);
    let device = Default::default();
    let options = LoadOptions {
        adapter: Some(out.path().to_path_buf()),
        ..Default::default()
    };
    let loaded = load_model::<Cpu>(&fixture("gpt2"), &device, &options).unwrap();
    let reference = reference("peft/gpt2");
    let Some(Logits::PerToken(logits)) = loaded
        .model
        .forward(&reference_input(&reference, &device))
        .logits
    else {
        panic!("an LM head")
    };
    let diff = max_abs_diff(&logits.into_data(), &reference["logits"].data);
    println!("peft gpt2: zoo's block-diagonal c_attn adapter, max |zoo − peft| {diff:.2e}");
    assert!(diff < 1e-4, "{diff}");
}

/// `zoo convert --merge-adapter`: each fixture's base with peft's adapter folded in, written in
/// HF's layout and as a zoo directory, runs (as a plain model) to peft's outputs within 1e-4.
#[test]
fn merged_adapters_give_peft_outputs_without_an_adapter() {
    for (name, output) in [
        ("llama", "logits"),
        ("t5_v1_1", "logits"),
        ("gpt2", "logits"),
        ("bert", "last_hidden_state"),
        ("llama_cls", "logits"),
    ] {
        for to_hf in [true, false] {
            let out = tempfile::tempdir().unwrap();
            let merged = out.path().join("merged");
            checkpoints_convert::merge_adapter_within(
                &fixture(name),
                &fixture("peft").join(name),
                &merged,
                to_hf,
                Default::default(),
                false,
                None,
            )
            .unwrap();
            let device = Default::default();
            let loaded = load_model::<Cpu>(&merged, &device, &LoadOptions::default()).unwrap();
            assert!(loaded.spec.lora().unwrap().is_none());
            let reference = reference(&format!("peft/{name}"));
            let result = loaded.model.forward(&reference_input(&reference, &device));
            let got = match result.logits {
                Some(Logits::PerToken(logits)) if output == "logits" => logits.into_data(),
                Some(Logits::PerSequence(logits)) if output == "logits" => logits.into_data(),
                _ => result.last_hidden_state.into_data(),
            };
            let diff = max_abs_diff(&got, &reference[output].data);
            println!("peft {name}: merged (to_hf {to_hf}), max |zoo − peft| {diff:.2e}");
            assert!(diff < 1e-4, "{name}: {diff}");
        }
    }
}
