//! The `zoo` binary end to end: outputs against transformers' reference, conversion both ways,
//! and bad input (a clear message naming the file, key or shape; exit code ≠ 0; no panic; nothing
//! written).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::TensorData;
use checkpoints_convert::{TensorMap, read_weights_file, write_safetensors};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn zoo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .output()
        .expect("zoo runs")
}

/// `zoo generate --model DIR ARGS…`.
fn zoo_generate(model: &str, args: &[&str]) -> Output {
    let mut all = vec!["generate", "--model", model];
    all.extend_from_slice(args);
    zoo(&all)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn floats(data: &TensorData) -> Vec<f32> {
    data.clone().convert::<f32>().to_vec().unwrap()
}

fn ints(data: &TensorData) -> Vec<i64> {
    data.clone().convert::<i64>().to_vec().unwrap()
}

/// Row `row` of a `[batch, ...]` tensor, flattened.
fn row(data: &TensorData, row: usize) -> Vec<f32> {
    let values = floats(data);
    let width = values.len() / data.shape[0];
    values[row * width..(row + 1) * width].to_vec()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `zoo forward` on the reference's first row (unpadded, one segment) given as ids, and
/// compares it with transformers' outputs for that row.
fn forward_matches_reference(model: &Path, reference_name: &str) -> f32 {
    let reference =
        read_weights_file(&fixture(reference_name).join("reference.safetensors")).unwrap();
    let ids = &reference["input_ids"].data;
    let first: Vec<String> = ints(ids)[..ids.shape[1]]
        .iter()
        .map(i64::to_string)
        .collect();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.safetensors");
    let result = zoo(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &first.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let got = read_weights_file(&out).unwrap();
    let mut worst = max_abs_diff(
        &row(&got["last_hidden_state"].data, 0),
        &row(&reference["last_hidden_state"].data, 0),
    );
    if let Some(want) = reference.get("logits") {
        worst = worst.max(max_abs_diff(
            &row(&got["logits"].data, 0),
            &row(&want.data, 0),
        ));
    }
    worst
}

#[test]
fn forward_on_the_bert_fixture_matches_transformers() {
    let error = forward_matches_reference(&fixture("bert"), "bert");
    eprintln!("zoo forward bert: max abs error {error:.3e}");
    assert!(error < 1e-4, "{error}");
    let error = forward_matches_reference(&fixture("roberta_mlm"), "roberta_mlm");
    assert!(error < 1e-4, "{error}");
}

#[test]
fn forward_tokenizes_text_like_transformers_and_pads_a_batch() {
    let reference = read_weights_file(&fixture("bert_mlm").join("reference.safetensors")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.safetensors");
    let text = "The quick brown fox jumps over the lazy dog. Hello world!";
    let model = fixture("bert_mlm");
    let result = zoo(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text,
        "--text",
        "Hello",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let got = read_weights_file(&out).unwrap();
    let ids = &reference["input_ids"].data;
    assert_eq!(
        ints(&got["input_ids"].data)[..ids.shape[1]],
        ints(ids)[..ids.shape[1]]
    );
    assert_eq!(
        got["attention_mask"].data.shape[0], 2,
        "two texts, one padded batch"
    );
    let error = max_abs_diff(
        &row(&got["logits"].data, 0),
        &row(&reference["logits"].data, 0),
    );
    assert!(error < 1e-4, "{error}");
}

#[test]
fn convert_and_back_round_trips_and_the_zoo_dir_runs() {
    let work = tempfile::tempdir().unwrap();
    let zoo_dir = work.path().join("zoo");
    let hf_dir = work.path().join("hf");
    let from = fixture("bert_cls");
    let result = zoo(&[
        "convert",
        "--from",
        from.to_str().unwrap(),
        "--out",
        zoo_dir.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let result = zoo(&[
        "convert",
        "--to-hf",
        "--from",
        zoo_dir.to_str().unwrap(),
        "--out",
        hf_dir.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let original = read_weights_file(&from.join("model.safetensors")).unwrap();
    let exported = read_weights_file(&hf_dir.join("model.safetensors")).unwrap();
    assert_eq!(original.len(), exported.len());
    for (key, tensor) in &original {
        assert!(
            tensor.data.as_bytes() == exported[key].data.as_bytes(),
            "{key}"
        );
    }
    let error = forward_matches_reference(&zoo_dir, "bert_cls");
    assert!(error < 1e-4, "zoo dir: {error}");
}

#[test]
fn list_shows_presets_with_parameter_counts() {
    let result = zoo(&["list"]);
    assert!(result.status.success());
    let text = String::from_utf8_lossy(&result.stdout);
    for preset in [
        "bert-base-uncased",
        "bert-large-cased",
        "bert-base-chinese",
        "roberta-base",
        "roberta-large",
    ] {
        assert!(text.contains(preset), "{preset} missing from:\n{text}");
    }
    // bert-base-uncased's encoder has 109,482,240 parameters in transformers.
    assert!(text.contains("109.5M"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Bad input

/// A copy of a fixture directory to break.
fn broken_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join(name);
    fs::create_dir(&dir).unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "pytorch_model.bin" {
            fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    (work, dir)
}

fn rewrite_weights(dir: &Path, change: impl FnOnce(&mut TensorMap)) {
    let path = dir.join("model.safetensors");
    let mut tensors = read_weights_file(&path).unwrap();
    change(&mut tensors);
    let plain = tensors.into_iter().map(|(k, t)| (k, t.data)).collect();
    write_safetensors(&path, &plain, None).unwrap();
}

/// `zoo convert` must fail with every `needles` in its message, without panicking or writing.
fn assert_convert_fails(dir: &Path, needles: &[&str]) {
    let out = dir.parent().unwrap().join("converted");
    let result = zoo(&[
        "convert",
        "--from",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let message = stderr(&result);
    assert!(!result.status.success(), "convert succeeded on bad input");
    assert!(!message.contains("panicked"), "{message}");
    for needle in needles {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }
    assert!(
        !out.exists(),
        "convert wrote {} although it failed",
        out.display()
    );
    let leftovers: Vec<_> = fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
}

#[test]
fn truncated_safetensors_is_an_error_naming_the_file() {
    let (_work, dir) = broken_copy("bert");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_convert_fails(&dir, &["model.safetensors", "safetensors"]);

    // `zoo forward` refuses it too, and writes no output file.
    assert_forward_fails(&dir, &["--ids", "2,5,3"], &["model.safetensors"]);
}

#[test]
fn wrong_shape_is_an_error_naming_the_key_and_both_shapes() {
    let (_work, dir) = broken_copy("bert");
    rewrite_weights(&dir, |tensors| {
        let key = "encoder.layer.1.attention.self.query.weight";
        let tensor = tensors.get_mut(key).unwrap();
        tensor.data = TensorData::new(vec![0.0f32; 32 * 31], [32, 31]);
    });
    assert_convert_fails(
        &dir,
        &[
            "encoder.layer.1.attention.self.query.weight",
            "[32, 31]",
            "[32, 32]",
        ],
    );
}

#[test]
fn missing_key_is_an_error_naming_the_key() {
    let (_work, dir) = broken_copy("bert");
    rewrite_weights(&dir, |tensors| {
        tensors.remove("pooler.dense.bias");
    });
    assert_convert_fails(&dir, &["missing", "pooler.dense.bias"]);
}

#[test]
fn unknown_model_type_is_an_error_naming_it() {
    let (_work, dir) = broken_copy("bert");
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("\"model_type\": \"bert\"", "\"model_type\": \"llama-x\"");
    fs::write(&path, text).unwrap();
    assert_convert_fails(&dir, &["config.json", "model_type", "'llama-x'"]);
}

#[test]
fn malformed_json_is_an_error_naming_the_file_and_line() {
    let (_work, dir) = broken_copy("bert");
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert_convert_fails(&dir, &["config.json", "line"]);
}

/// `zoo forward --model MODEL ARGS --out FILE` must fail with every `needles` in its message,
/// without panicking or writing FILE.
fn assert_forward_fails(model: &Path, args: &[&str], needles: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.safetensors");
    let mut all = vec!["forward", "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--out", out.to_str().unwrap()]);
    let result = zoo(&all);
    let message = stderr(&result);
    assert!(!result.status.success(), "forward succeeded with {args:?}");
    assert!(!message.contains("panicked"), "{message}");
    for needle in needles {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }
    assert!(
        !out.exists(),
        "forward wrote {} although it failed",
        out.display()
    );
}

#[test]
fn empty_text_is_an_error_and_writes_nothing() {
    assert_forward_fails(&fixture("bert"), &["--text", "  "], &["--text", "empty"]);
}

#[test]
fn out_of_range_ids_and_unknown_devices_are_errors() {
    assert_forward_fails(&fixture("bert"), &["--ids", "2,99999,3"], &["99999"]);
    assert_forward_fails(
        &fixture("bert"),
        &["--ids", "2,3", "--device", "tpu:0"],
        &["tpu:0"],
    );
}

// ---------------------------------------------------------------------------------------------
// GPT-2: forward and generate

#[test]
fn forward_on_the_gpt2_fixture_writes_logits_matching_transformers() {
    let error = forward_matches_reference(&fixture("gpt2"), "gpt2");
    eprintln!("zoo forward gpt2: max abs error {error:.3e}");
    assert!(error < 1e-4, "{error}");
}

/// The first greedy case of transformers' generate ids (tests/fixtures/gpt2/generation.json).
fn reference_greedy_case() -> (Vec<u32>, Vec<u32>, String) {
    let text = fs::read_to_string(fixture("gpt2").join("generation.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &reference["cases"][0];
    assert_eq!(case["name"], "greedy");
    let prompt: Vec<u32> = serde_json::from_value(case["input_ids"][0].clone()).unwrap();
    let output: Vec<u32> = serde_json::from_value(case["output_ids"][0].clone()).unwrap();
    let text = case["prompts"][0].as_str().unwrap().to_string();
    (prompt, output, text)
}

/// Runs `zoo generate --greedy --ids` on `model` with the GPT-2 fixture's greedy case and checks
/// the prompt and the continuation against transformers'; returns the run.
fn assert_generates_transformers_greedy_ids(model: &Path) -> Output {
    let (prompt, output, text) = reference_greedy_case();
    let max_new = (output.len() - prompt.len()).to_string();
    let result = zoo_generate(
        model.to_str().unwrap(),
        &[
            "--prompt",
            &text,
            "--greedy",
            "--max-new-tokens",
            &max_new,
            "--ids",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let json: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(json["prompts"].clone()).unwrap();
    let generated: Vec<Vec<u32>> = serde_json::from_value(json["generated"].clone()).unwrap();
    assert_eq!(prompts[0], prompt);
    // transformers pads after end-of-text; zoo stops at it.
    let eos_at = output[prompt.len()..]
        .iter()
        .position(|&t| t == 0)
        .map_or(output.len(), |p| prompt.len() + p + 1);
    assert_eq!(generated[0], output[prompt.len()..eos_at]);
    result
}

#[test]
fn generate_prints_transformers_greedy_ids_and_streams_text() {
    let (prompt, output, text) = reference_greedy_case();
    let max_new = (output.len() - prompt.len()).to_string();
    let model = fixture("gpt2");
    assert_generates_transformers_greedy_ids(&model);

    let result = zoo_generate(
        model.to_str().unwrap(),
        &["--prompt", &text, "--max-new-tokens", &max_new],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let printed = String::from_utf8(result.stdout.clone()).unwrap();
    assert!(printed.starts_with(&text), "{printed}");
    assert!(printed.trim_end().len() > text.len(), "{printed}");
    assert!(stderr(&result).contains("tokens/s"), "{}", stderr(&result));
}

/// `zoo generate` must fail with every `needles` in its message, without panicking.
fn assert_generate_fails(model: &Path, args: &[&str], needles: &[&str]) {
    let mut all = vec!["generate", "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    let result = zoo(&all);
    let message = stderr(&result);
    assert!(!result.status.success(), "generate succeeded with {args:?}");
    assert!(!message.contains("panicked"), "{message}");
    for needle in needles {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }
}

#[test]
fn generate_refuses_long_prompts_unknown_ids_and_missing_tokenizers() {
    let model = fixture("gpt2");
    // The fixture's context is 128 positions.
    let long = vec!["5"; 129].join(",");
    assert_generate_fails(&model, &["--prompt-ids", &long], &["129 tokens", "128"]);
    let long_text = "The quick brown fox. ".repeat(60);
    assert_generate_fails(&model, &["--prompt", &long_text], &["does not fit", "128"]);
    assert_generate_fails(
        &model,
        &["--prompt-ids", "5,70000,6"],
        &["70000", "vocabulary"],
    );
    assert_generate_fails(&model, &["--prompt-ids", "5,x"], &["'x'"]);

    let (_work, dir) = broken_copy("gpt2");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ] {
        fs::remove_file(dir.join(file)).unwrap();
    }
    assert_generate_fails(
        &dir,
        &["--prompt", "Hello"],
        &["no tokenizer", "--prompt-ids"],
    );
    // With ids in and ids out, no tokenizer is needed.
    let result = zoo_generate(
        dir.to_str().unwrap(),
        &["--prompt-ids", "5,6", "--ids", "--max-new-tokens", "3"],
    );
    assert!(result.status.success(), "{}", stderr(&result));

    assert_generate_fails(
        &fixture("bert_mlm"),
        &["--prompt", "Hello"],
        &["BertForMaskedLM", "causal LM"],
    );
    assert_generate_fails(&model, &["--prompt", "Hello", "--top-p", "1.5"], &["top_p"]);
}

/// A GPT-2 directory with CPM's tokenizer (as TsinghuaAI/CPM-Generate ships): the prompt goes
/// through jieba + SentencePiece, and the printed text starts with the prompt decoded back.
#[test]
fn generate_runs_on_a_cpm_style_directory() {
    let (_work, dir) = broken_copy("gpt2");
    for file in ["tokenizer.json", "vocab.json", "merges.txt"] {
        fs::remove_file(dir.join(file)).unwrap();
    }
    let cpm = fixture("tokenizers/cpm_unigram");
    for file in ["spiece.model", "tokenizer_config.json"] {
        fs::copy(cpm.join(file), dir.join(file)).unwrap();
    }
    let prompt = "今天天气很好，我们去公园散步。";
    let result = zoo_generate(
        dir.to_str().unwrap(),
        &["--prompt", prompt, "--max-new-tokens", "5"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let printed = String::from_utf8(result.stdout.clone()).unwrap();
    // NFKD turns the full-width comma into ","; cpm_reference.json decodes this prompt to:
    assert!(
        printed.starts_with("今天天气很好,我们去公园散步。"),
        "{printed}"
    );
}

// ---------------------------------------------------------------------------------------------
// T5: forward and generate

#[test]
fn forward_on_t5_writes_the_encoder_output_matching_transformers() {
    let reference = read_weights_file(&fixture("t5").join("reference.safetensors")).unwrap();
    let ids = &reference["input_ids"].data;
    // Row 0 is the longest: no padding.
    let first: Vec<String> = ints(ids)[..ids.shape[1]]
        .iter()
        .map(i64::to_string)
        .collect();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.safetensors");
    let model = fixture("t5");
    let result = zoo(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &first.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let got = read_weights_file(&out).unwrap();
    let error = max_abs_diff(
        &row(&got["encoder_last_hidden_state"].data, 0),
        &row(&reference["encoder_last_hidden_state"].data, 0),
    );
    assert!(error < 1e-4, "{error}");
    assert!(got.contains_key("logits"));
}

#[test]
fn generate_on_t5_prints_transformers_ids_and_the_decoded_answer() {
    let text = fs::read_to_string(fixture("t5_v1_1").join("generation.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &reference["cases"][1];
    assert_eq!(case["name"], "greedy");
    let prompt = case["prompts"][0].as_str().unwrap();
    let output: Vec<u32> = serde_json::from_value(case["output_ids"][0].clone()).unwrap();
    let model = fixture("t5_v1_1");
    let result = zoo_generate(
        model.to_str().unwrap(),
        &["--prompt", prompt, "--max-new-tokens", "12", "--ids"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let json: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let generated: Vec<u32> = serde_json::from_value(json["generated"][0].clone()).unwrap();
    // transformers' row: the start token, then the answer (padded after </s>).
    let end = output
        .iter()
        .position(|&t| t == 1)
        .map_or(output.len(), |p| p + 1);
    assert_eq!(generated, output[1..end]);

    let result = zoo_generate(
        model.to_str().unwrap(),
        &["--prompt", prompt, "--max-new-tokens", "12"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let printed = String::from_utf8(result.stdout.clone()).unwrap();
    assert!(
        !printed.contains("summarize"),
        "the answer alone: {printed}"
    );
    assert!(!printed.trim().is_empty());
}

// ---------------------------------------------------------------------------------------------
// zoo download, against a mock hub on 127.0.0.1

/// How the mock hub misbehaves with `model.safetensors`.
#[derive(Clone, Copy, PartialEq)]
enum Truncate {
    Never,
    /// Every full-body response stops halfway (the connection closes early).
    Always,
    /// Only the first one does.
    Once,
}

/// A hub that serves one directory as repository `repo`, answering hf-hub's requests (repo info,
/// one-byte range probes, ranged downloads). It logs `path range` per request.
struct MockHub {
    endpoint: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn mock_hub(root: PathBuf, repo: &'static str, truncate: Truncate) -> MockHub {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let served_log = log.clone();
    std::thread::spawn(move || {
        let mut truncations_left = match truncate {
            Truncate::Never => 0,
            Truncate::Always => usize::MAX,
            Truncate::Once => 1,
        };
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_string();
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("range")
                {
                    range = Some(value.trim().trim_start_matches("bytes=").to_string());
                }
            }
            served_log
                .lock()
                .unwrap()
                .push(format!("{path} {}", range.clone().unwrap_or_default()));
            let respond = |stream: &mut std::net::TcpStream,
                           status: &str,
                           headers: &[String],
                           body: &[u8]| {
                let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
                for h in headers {
                    head.push_str(h);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            };
            let info_prefix = format!("/api/models/{repo}/revision/");
            let file_prefix = format!("/{repo}/resolve/");
            if path.starts_with(&info_prefix) {
                let siblings: Vec<serde_json::Value> = fs::read_dir(&root)
                    .unwrap()
                    .map(|e| serde_json::json!({"rfilename": e.unwrap().file_name().into_string().unwrap()}))
                    .collect();
                let body =
                    serde_json::json!({"siblings": siblings, "sha": "0".repeat(40)}).to_string();
                respond(
                    &mut stream,
                    "200 OK",
                    &[format!("Content-Length: {}", body.len())],
                    body.as_bytes(),
                );
                continue;
            }
            let file = path
                .strip_prefix(&file_prefix)
                .and_then(|rest| rest.split_once('/'))
                .map(|(_, name)| root.join(name));
            let Some(file) = file.filter(|f| f.is_file()) else {
                respond(
                    &mut stream,
                    "404 Not Found",
                    &["Content-Length: 0".into()],
                    b"",
                );
                continue;
            };
            let data = fs::read(&file).unwrap();
            let size = data.len();
            let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                Some((a, b)) => (
                    a.parse().unwrap_or(0),
                    b.parse().unwrap_or(size - 1).min(size - 1),
                ),
                None => (0, size - 1),
            };
            let body = &data[start..=end];
            let headers = vec![
                format!("Content-Length: {}", body.len()),
                format!("Content-Range: bytes {start}-{end}/{size}"),
                format!(
                    "ETag: \"{size:x}-{}\"",
                    file.file_name().unwrap().to_string_lossy().len()
                ),
                format!("X-Repo-Commit: {}", "0".repeat(40)),
            ];
            let full_body = end + 1 - start > 1;
            let cut = file.ends_with("model.safetensors") && full_body && truncations_left > 0;
            if cut {
                truncations_left -= 1;
                respond(
                    &mut stream,
                    "206 Partial Content",
                    &headers,
                    &body[..body.len() / 2],
                );
            } else {
                respond(&mut stream, "206 Partial Content", &headers, body);
            }
        }
    });
    MockHub { endpoint, log }
}

fn zoo_download(hub: &MockHub, repo: &str, out: &Path, hf_home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args([
            "download",
            repo,
            "--endpoint",
            &hub.endpoint,
            "--out",
            out.to_str().unwrap(),
        ])
        .env("HF_HOME", hf_home)
        .env_remove("HF_ENDPOINT")
        .output()
        .expect("zoo runs")
}

#[test]
fn download_fetches_a_repository_that_every_command_loads() {
    let hub = mock_hub(fixture("gpt2"), "zoo-test/gpt2", Truncate::Never);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("gpt2");
    let result = zoo_download(&hub, "zoo-test/gpt2", &out, &work.path().join("hf"));
    assert!(result.status.success(), "{}", stderr(&result));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert!(
        !out.join("pytorch_model.bin").exists(),
        "safetensors preferred over .bin"
    );
    assert_eq!(
        fs::read(out.join("model.safetensors")).unwrap(),
        fs::read(fixture("gpt2").join("model.safetensors")).unwrap()
    );
    let generate = |dir: &Path| {
        zoo_generate(
            dir.to_str().unwrap(),
            &[
                "--prompt",
                "The quick brown",
                "--ids",
                "--max-new-tokens",
                "8",
            ],
        )
        .stdout
    };
    assert_eq!(generate(&out), generate(&fixture("gpt2")));
}

#[test]
fn download_of_a_missing_repository_is_an_error_and_writes_nothing() {
    let hub = mock_hub(fixture("gpt2"), "zoo-test/gpt2", Truncate::Never);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("missing");
    let result = zoo_download(&hub, "zoo-test/missing", &out, &work.path().join("hf"));
    let message = stderr(&result);
    assert!(!result.status.success());
    assert!(
        message.contains("zoo-test/missing") && message.contains("404"),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
    assert!(!out.exists());
}

#[test]
fn a_truncated_download_is_an_error_and_writes_nothing() {
    let hub = mock_hub(fixture("gpt2"), "zoo-test/gpt2", Truncate::Always);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("gpt2");
    let result = zoo_download(&hub, "zoo-test/gpt2", &out, &work.path().join("hf"));
    let message = stderr(&result);
    assert!(!result.status.success(), "a truncated file was accepted");
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(!out.exists());
}

#[test]
fn a_broken_download_resumes_from_the_bytes_it_has() {
    let hub = mock_hub(fixture("gpt2"), "zoo-test/gpt2", Truncate::Once);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("gpt2");
    let hf_home = work.path().join("hf");
    let first = zoo_download(&hub, "zoo-test/gpt2", &out, &hf_home);
    assert!(!first.status.success(), "the first transfer breaks");
    assert!(!out.exists());
    let second = zoo_download(&hub, "zoo-test/gpt2", &out, &hf_home);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(
        fs::read(out.join("model.safetensors")).unwrap(),
        fs::read(fixture("gpt2").join("model.safetensors")).unwrap()
    );
    let log = hub.log.lock().unwrap().clone();
    let resumed = log.iter().any(|l| {
        l.contains("model.safetensors")
            && l.rsplit(' ')
                .next()
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse::<u64>().ok())
                > Some(0)
    });
    assert!(resumed, "no ranged request resumed the transfer: {log:?}");
}

/// `zoo env` resolves this rank's device as training does: under a launcher `cuda` is GPU
/// `LOCAL_RANK`, or GPU 0 when the rank sees one GPU; an explicit index wins; a GPU that is not
/// visible is an error naming both variables. It works without a GPU, saying what it did not find.
#[test]
fn env_reports_the_rank_and_resolves_its_gpu() {
    let env = |vars: &[(&str, &str)], device: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_zoo"));
        command.args(["env", "--device", device, "--json"]);
        for name in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "CUDA_VISIBLE_DEVICES",
            "SLURM_LOCALID",
        ] {
            command.env_remove(name);
        }
        command.envs(vars.iter().copied());
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let launched = [("LOCAL_RANK", "3"), ("WORLD_SIZE", "4"), ("RANK", "3")];
    let report = env(&launched, "cuda");
    for key in [
        "rank",
        "local_rank",
        "world_size",
        "device",
        "backends",
        "cuda",
        "nccl",
    ] {
        assert!(report.get(key).is_some(), "no {key}: {report}");
    }
    assert_eq!(report["device"], "cuda:3");
    assert_eq!(
        (report["rank"].as_u64(), report["world_size"].as_u64()),
        (Some(3), Some(4))
    );
    assert!(report["cuda"]["driver"].is_string() || report["cuda"]["driver"].is_object());
    let one_gpu = [&launched[..], &[("CUDA_VISIBLE_DEVICES", "5")]].concat();
    assert_eq!(env(&one_gpu, "cuda")["device"], "cuda:0");
    assert_eq!(env(&launched, "cuda:1")["device"], "cuda:1");
    assert_eq!(env(&[], "cuda")["device"], "cuda:0");
    let two_gpus = [&launched[..], &[("CUDA_VISIBLE_DEVICES", "0,1")]].concat();
    let error = env(&two_gpus, "cuda")["device"]["error"].to_string();
    assert!(
        error.contains("LOCAL_RANK=3") && error.contains("CUDA_VISIBLE_DEVICES=0,1"),
        "{error}"
    );
}

/// `zoo quantize` writes a directory `zoo generate` runs with transformers' greedy ids (int8 on
/// the trained fixture), reports the sizes, and refuses `--bits 3` with exit code 1, writing
/// nothing.
#[test]
fn quantize_writes_a_directory_generate_runs_and_refuses_other_widths() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("q8");
    let from = fixture("gpt2");
    let result = zoo(&[
        "quantize",
        "--from",
        from.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--bits",
        "8",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let printed = String::from_utf8_lossy(&result.stdout);
    assert!(printed.contains("int8: 12 weights quantized"), "{printed}");
    let result = assert_generates_transformers_greedy_ids(&out);
    assert!(
        stderr(&result).contains("MB resident"),
        "{}",
        stderr(&result)
    );

    let bad = work.path().join("q3");
    let result = zoo(&[
        "quantize",
        "--from",
        from.to_str().unwrap(),
        "--out",
        bad.to_str().unwrap(),
        "--bits",
        "3",
    ]);
    assert_eq!(result.status.code(), Some(1));
    assert!(stderr(&result).contains("--bits 3"), "{}", stderr(&result));
    assert!(!bad.exists());
}
