//! Quantized weights: int8 and NF4 codes against bitsandbytes' (tests/fixtures/quant,
//! `generate.py quant`), and `zoo quantize` directories run by `load_model` end to end.

use std::collections::BTreeMap;

use bmtrain_backend::Cpu;
use bmtrain_backend::quant::{NF4_BLOCK, NF4_CODE, QuantFormat, QuantizedMatrix};
use checkpoints_convert::quantize::quantize_dir;
use checkpoints_convert::{LoadOptions, load_model};
use models::Logits;
use models::generation::GenerationConfig;
use serde_json::Value;

use zoo_tests::{fixture, floats, reference};

/// Unpacks NF4's two codes a byte (high nibble first).
fn unpacked(codes: &[u8], len: usize) -> Vec<u8> {
    codes
        .iter()
        .flat_map(|b| [b >> 4, b & 0x0f])
        .take(len)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// zoo's NF4 code book is bitsandbytes', and both formats give bitsandbytes' codes, absmax and
/// dequantized values for the same weights (one matrix whose blocks of 64 run across rows).
#[test]
fn codes_equal_bitsandbytes() {
    let want = reference("quant");
    assert_eq!(max_diff(&NF4_CODE, &floats(&want["nf4_code"].data)), 0.0);
    for name in ["narrow", "wide"] {
        let weight = &want[&format!("{name}.weight")].data;
        let (rows, cols) = (weight.shape[0], weight.shape[1]);
        let values = floats(weight);
        let nf4 = QuantizedMatrix::quantize(QuantFormat::Nf4, &values, rows, cols);
        let bnb_codes: Vec<u8> = want[&format!("{name}.nf4.codes")].data.to_vec().unwrap();
        assert_eq!(
            unpacked(nf4.codes(), rows * cols),
            bnb_codes,
            "{name} NF4 codes"
        );
        assert_eq!(nf4.absmax().len(), (rows * cols).div_ceil(NF4_BLOCK));
        let absmax = floats(&want[&format!("{name}.nf4.absmax")].data);
        assert_eq!(max_diff(nf4.absmax(), &absmax), 0.0, "{name} NF4 absmax");
        let dequantized = floats(&want[&format!("{name}.nf4.dequantized")].data);
        assert!(
            max_diff(&nf4.dequantize(), &dequantized) < 1e-7,
            "{name} NF4 values"
        );

        let int8 = QuantizedMatrix::quantize(QuantFormat::Int8, &values, rows, cols);
        let bnb_codes: Vec<i8> = want[&format!("{name}.int8.codes")].data.to_vec().unwrap();
        let codes: Vec<i8> = int8.codes().iter().map(|&b| b as i8).collect();
        assert_eq!(codes, bnb_codes, "{name} int8 codes");
        let absmax = floats(&want[&format!("{name}.int8.absmax")].data);
        assert_eq!(max_diff(int8.absmax(), &absmax), 0.0, "{name} int8 absmax");
        let dequantized = floats(&want[&format!("{name}.int8.dequantized")].data);
        assert!(
            max_diff(&int8.dequantize(), &dequantized) < 1e-7,
            "{name} int8 values"
        );
    }
}

/// A fixture's `generation.json` and its greedy case's prompt and transformers' output ids.
fn greedy_case(name: &str) -> (Value, Vec<u32>, Vec<u32>) {
    let text = std::fs::read_to_string(fixture(name).join("generation.json")).unwrap();
    let generation: Value = serde_json::from_str(&text).unwrap();
    let greedy = generation["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "greedy")
        .unwrap();
    let prompt = serde_json::from_value(greedy["input_ids"][0].clone()).unwrap();
    let want = serde_json::from_value(greedy["output_ids"][0].clone()).unwrap();
    (generation, prompt, want)
}

/// The logits of `dir` on the GPT-2 fixture's reference input.
fn gpt2_logits(dir: &std::path::Path) -> Vec<f32> {
    let device = Default::default();
    let loaded = load_model::<Cpu>(dir, &device, &LoadOptions::default()).unwrap();
    let input = zoo_tests::reference_input::<Cpu>(&reference("gpt2"), &device);
    match loaded.model.forward(&input).logits {
        Some(Logits::PerToken(logits)) => floats(&logits.into_data()),
        _ => unreachable!("GPT-2's LM head gives per-token logits"),
    }
}

/// `zoo quantize` on the GPT-2 fixture (trained, so its greedy continuations mean something):
/// int8 keeps transformers' greedy ids and logits within 1% of their range; NF4 with the
/// embeddings is 4.5× smaller on disk and its logits stay within the error its grid allows.
#[test]
fn quantized_gpt2_directories_run_and_keep_transformers_greedy_ids() {
    let dir = tempfile::tempdir().unwrap();
    let dense = gpt2_logits(&fixture("gpt2"));
    let range = dense.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (generation, prompt, want) = greedy_case("gpt2");
    let eos = generation["eos_token_id"].as_u64().unwrap() as u32;
    let stored = |path: &std::path::Path| {
        std::fs::metadata(path.join("model.safetensors"))
            .unwrap()
            .len()
    };
    for (bits, embeddings, tolerance) in [(8, false, 0.01), (4, true, 0.25)] {
        let out = dir.path().join(format!("q{bits}"));
        let report = quantize_dir(&fixture("gpt2"), &out, bits, embeddings, false).unwrap();
        assert_eq!(report.quantized, 2 * 6 + if embeddings { 2 } else { 0 });
        let logits = gpt2_logits(&out);
        let error = max_diff(&logits, &dense);
        assert!(
            error > 0.0 && error < tolerance * range,
            "{bits} bits: {error} of {range}"
        );
        if bits == 8 {
            let device = Default::default();
            let loaded = load_model::<Cpu>(&out, &device, &LoadOptions::default()).unwrap();
            let config = GenerationConfig::greedy(want.len() - prompt.len(), vec![eos], eos);
            let got = loaded
                .model
                .generate(std::slice::from_ref(&prompt), &config, &device, &mut |_| {})
                .unwrap()
                .unwrap();
            assert_eq!(got.sequences[0], want, "int8 greedy ids");
        } else {
            let ratio = stored(&fixture("gpt2")) as f64 / stored(&out) as f64;
            assert!(ratio > 4.5, "NF4 + embeddings: {ratio}x smaller");
        }
    }
}

/// What zoo cannot quantize or read is refused by name: `--bits 3`, a directory quantized
/// already, embeddings of a class without quantized tables, and codes of the wrong shape.
#[test]
fn bad_quantizations_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = quantize_dir(&fixture("gpt2"), &dir.path().join("q3"), 3, false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--bits 3") && err.contains("8 (int8) or 4 (NF4)"),
        "{err}"
    );
    assert!(!dir.path().join("q3").exists());

    let q8 = dir.path().join("q8");
    quantize_dir(&fixture("gpt2"), &q8, 8, false, false).unwrap();
    let err = quantize_dir(&q8, &dir.path().join("again"), 4, false, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantized already"), "{err}");
    // RoBERTa's tables are not ones zoo runs quantized (yet): asked for, it is an error.
    let err = quantize_dir(
        &fixture("roberta"),
        &dir.path().join("roberta"),
        8,
        true,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no token tables"), "{err}");

    // Codes cut short: the loader names the tensor and the shape it needs.
    let weights = q8.join("model.safetensors");
    let mut tensors: BTreeMap<String, burn::tensor::TensorData> =
        checkpoints_convert::read_weights_file(&weights)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.data))
            .collect();
    let key = "transformer.blocks.0.attention.query.weight.int8";
    let short = burn::tensor::TensorData::from_bytes_vec(
        vec![0u8; 32 * 31],
        [32, 31],
        burn::tensor::DType::I8,
    );
    tensors.insert(key.into(), short);
    checkpoints_convert::write_safetensors(&weights, &tensors, None).unwrap();
    let err = load_model::<Cpu>(&q8, &Default::default(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(key) && err.contains("[32, 32]"), "{err}");
}

/// T5 with its blocks and its shared table (encoder input, decoder input and tied head) in int8
/// keeps transformers' greedy answer on the trained fixture.
#[test]
fn an_int8_t5_keeps_transformers_greedy_answer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t5");
    let report = quantize_dir(&fixture("t5"), &out, 8, true, false).unwrap();
    assert!(report.quantized > 0);
    let (generation, prompt, want) = greedy_case("t5");
    let (eos, pad) = (
        generation["eos_token_id"].as_u64().unwrap() as u32,
        generation["pad_token_id"].as_u64().unwrap() as u32,
    );
    let device = Default::default();
    let loaded = load_model::<Cpu>(&out, &device, &LoadOptions::default()).unwrap();
    let config = GenerationConfig::greedy(want.len() - 1, vec![eos], pad);
    let got = loaded
        .model
        .generate(std::slice::from_ref(&prompt), &config, &device, &mut |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(got.sequences[0], want);
}
