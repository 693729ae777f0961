//! `zoo pretrain` and `zoo finetune` end to end: the loss falls on the shipped corpus, a run killed
//! with SIGKILL resumes to the bits of an uninterrupted run, thread ranks train like one rank, a
//! tiny BERT learns a synthetic rule, and bad input fails clearly without overwriting anything.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::*;

#[test]
fn pretraining_the_tiny_gpt_on_the_shipped_corpus_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let output = pretrain(&run, &["--steps", "60", "--sample-tokens", "20"]);
    assert!(output.status.success(), "{}", text(&output));
    let losses = losses(&run);
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    println!("pretrain: mean loss of steps 1–10 {first:.3}, of steps 51–60 {last:.3}");
    // A uniform guess over the 257 ids is ln 257 ≈ 5.55: the loss must fall by 1.5 nats and below
    // 3.3 within 60 steps of 8 × 32 tokens.
    assert!(first - last > 1.5 && last < 3.3, "{losses:?}");
    assert!(text(&output).contains("--- sample ---"));
    // The checkpoint is a model directory every command reads.
    let checkpoint = run.join("checkpoints/step-0000060");
    let generated = zoo(&[
        "generate",
        "--model",
        checkpoint.to_str().unwrap(),
        "--prompt",
        "Phileas",
        "--max-new-tokens",
        "5",
        "--ids",
    ]);
    assert!(generated.status.success(), "{}", text(&generated));
}

#[test]
fn a_run_killed_mid_way_resumes_to_the_weights_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "--steps",
        "40",
        "--save-every",
        "10",
        "--seed",
        "3",
        "--dropout",
        "0.1",
    ];
    let whole = dir.path().join("whole");
    let output = pretrain(&whole, &common);
    assert!(output.status.success(), "{}", text(&output));

    // The same run, killed hard once its first checkpoint is on disk, then resumed.
    let killed = dir.path().join("killed");
    let at_kill = kill_and_resume(&killed, &common, "step-0000040");
    let want = weights(&whole.join("checkpoints/step-0000040"));
    let got = weights(&killed.join("checkpoints/step-0000040"));
    assert_eq!(want.len(), got.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "{name} differs after resuming from {at_kill}");
    }
    // metrics.jsonl reads as one run: each logged step once.
    let steps: Vec<u64> = losses(&killed).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![10, 20, 30, 40]);
}

#[test]
fn two_thread_ranks_train_like_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut finals = Vec::new();
    for ranks in ["1", "2"] {
        let run = dir.path().join(format!("ranks{ranks}"));
        let output = pretrain(
            &run,
            &["--steps", "20", "--ranks", ranks, "--save-every", "0"],
        );
        assert!(output.status.success(), "{}", text(&output));
        finals.push(weights(&run.join("checkpoints/step-0000020")));
    }
    // The two runs sum gradients in different orders, so they agree to round-off, not to the bit;
    // AdamW then turns round-off into steps of up to ±lr where a gradient is ~0 (attention key
    // biases, whose exact gradient is zero), hence an absolute bound well below one lr step.
    let worst = assert_weights_close(&finals[0], &finals[1], 1e-4);
    let (one, two) = (
        losses(&dir.path().join("ranks1")),
        losses(&dir.path().join("ranks2")),
    );
    for ((step, a), (_, b)) in one.iter().zip(&two) {
        assert!(
            (a - b).abs() < 1e-4 * a.abs(),
            "step {step}: loss {a} vs {b}"
        );
    }
    println!(
        "pretrain: ranks 2 vs 1 after 20 steps, worst weight difference {worst:.2e}, losses {one:?} vs {two:?}"
    );
}

/// A synthetic set a tiny BERT can learn: label 1 iff the sentence has "hello".
fn synthetic(path: &Path, rows: usize, seed: u64) {
    let words = [
        "the", "and", "token", "model", "from", "is", "world", "to", "com", "la", "do", "wor",
    ];
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n as u64) as usize
    };
    let mut out = String::from("sentence\tlabel\n");
    for _ in 0..rows {
        let mut sentence: Vec<&str> = (0..3 + next(5)).map(|_| words[next(words.len())]).collect();
        let label = next(2);
        if label == 1 {
            let at = next(sentence.len() + 1);
            sentence.insert(at, "hello");
        }
        out.push_str(&format!("{}\t{label}\n", sentence.join(" ")));
    }
    fs::write(path, out).unwrap();
}

#[test]
fn finetuning_a_tiny_bert_learns_a_synthetic_rule() {
    let dir = tempfile::tempdir().unwrap();
    let (train, valid) = (dir.path().join("train.tsv"), dir.path().join("dev.tsv"));
    synthetic(&train, 256, 1);
    synthetic(&valid, 64, 2);
    let run = dir.path().join("run");
    let output = zoo(&[
        "finetune",
        "--model",
        fixture("bert").to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        valid.to_str().unwrap(),
        "--num-labels",
        "2",
        "--lr",
        "1e-3",
        "--epochs",
        "3",
        "--out",
        run.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let accuracy = metrics(&run)
        .iter()
        .filter_map(|m| m["accuracy"].as_f64())
        .fold(0.0, f64::max);
    println!("finetune: best validation accuracy {accuracy:.3}");
    assert!(accuracy >= 0.9, "{}", text(&output));
    assert!(run.join("checkpoints/best/model.safetensors").is_file());
    assert!(run.join("checkpoints/last/optimizer.safetensors").is_file());
}

/// BitFit on the tiny BERT: only the biases and the new classification head train (the model
/// says how many), the frozen weights end bit-identical to the base model's, the loss falls,
/// a run killed mid-way resumes to the bits of an uninterrupted one, and `zoo memory` counts
/// the frozen parameters without gradients or moments.
#[test]
fn bitfit_trains_only_biases_and_the_new_head_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (train, valid) = (dir.path().join("train.tsv"), dir.path().join("dev.tsv"));
    synthetic(&train, 128, 1);
    synthetic(&valid, 32, 2);
    let base = dir.path().join("base");
    let converted = zoo(&[
        "convert",
        "--from",
        fixture("bert").to_str().unwrap(),
        "--out",
        base.to_str().unwrap(),
    ]);
    assert!(converted.status.success(), "{}", text(&converted));
    let finetune = |run: &Path, epochs: &str, extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--model",
            base.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--valid",
            valid.to_str().unwrap(),
            "--num-labels",
            "2",
            "--lr",
            "1e-2",
            "--epochs",
            epochs,
            "--batch",
            "16",
            "--log-every",
            "1",
            "--bitfit",
            "--schedule",
            "constant",
            "--warmup-ratio",
            "0",
            "--out",
            run.to_str().unwrap(),
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        zoo(&args)
    };
    let run = dir.path().join("run");
    let output = finetune(&run, "4", &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("trainable"), "{}", text(&output));
    let before: std::collections::HashMap<_, _> = weights(&base).into_iter().collect();
    let after = weights(&run.join("checkpoints/last"));
    let (mut frozen, mut trained) = (0, 0);
    for (name, values) in &after {
        // The base directory is a bare BertModel: its names lack the classifier's `bert.`.
        let bias = name.ends_with(".bias") || name.ends_with(".beta");
        match before.get(name.strip_prefix("bert.").unwrap_or(name)) {
            Some(start) if !bias => {
                assert_eq!(start, values, "{name}: a frozen weight moved");
                frozen += 1;
            }
            Some(start) => trained += usize::from(start != values),
            // The new head.
            None => trained += 1,
        }
    }
    let losses = losses(&run);
    let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
    println!(
        "bitfit: {frozen} frozen tensors unchanged, {trained} trained; loss {first:.4} → {last:.4}"
    );
    assert!(frozen > 10 && trained > 10);
    assert!(last < first, "{losses:?}");
    // The optimizer state holds the trained parameters only.
    let optimizer =
        checkpoints_convert::read_weights_file(&run.join("checkpoints/last/optimizer.safetensors"))
            .unwrap();
    assert_eq!(optimizer.len(), 2 * (after.len() - frozen));

    // Two epochs, then resumed for all four (a constant schedule without warmup does not depend
    // on the total):
    // the same weights as the uninterrupted run.
    let halted = dir.path().join("halted");
    let output = finetune(&halted, "2", &[]);
    assert!(output.status.success(), "{}", text(&output));
    let output = finetune(&halted, "4", &["--resume", halted.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    // Bit-identical: every difference is 0.
    let worst = assert_weights_close(&weights(&halted.join("checkpoints/last")), &after, 1e-30);
    println!("bitfit: resumed after two epochs, worst weight difference {worst:.2e}");

    let memory = |extra: &[&str]| {
        let mut args = vec![
            "memory",
            "--model",
            "bert-large-uncased",
            "--seq",
            "512",
            "--json",
        ];
        args.extend_from_slice(extra);
        let output = zoo(&args);
        assert!(output.status.success(), "{}", text(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let (all, bitfit) = (memory(&[]), memory(&["--bitfit"]));
    let trainable = bitfit["trainable_params"].as_f64().unwrap();
    assert!(trainable < 1e6, "{bitfit}");
    assert_eq!(
        bitfit["optimizer_bytes"].as_f64().unwrap(),
        (8.0 * trainable).round()
    );
    assert!(all["optimizer_bytes"].as_f64().unwrap() > 2.6e9);
    let bad = zoo(&["memory", "--model", "gpt2", "--seq", "8", "--freeze", "a("]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("--freeze 'a('"), "{}", text(&bad));
}

/// Four prompt/completion pairs as `pairs.jsonl` in `dir`.
fn write_pairs(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("pairs.jsonl");
    let rows = [
        ("The cat", " sat on the mat."),
        ("A dog", " ran in the park."),
        ("The sun", " rose over the hill."),
        ("My friend", " likes green tea."),
    ];
    fs::write(
        &data,
        rows.iter()
            .map(|(p, c)| format!("{{\"prompt\": \"{p}\", \"completion\": \"{c}\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    data
}

/// `zoo finetune --task causal-lm --lora-r 8` of `base` on `data` (batch 4, lr 1e-2, constant),
/// for `epochs`, into `run`, with `extra` flags.
fn lora_finetune(base: &Path, data: &Path, run: &Path, epochs: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "finetune",
        "--task",
        "causal-lm",
        "--model",
        base.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "--valid",
        data.to_str().unwrap(),
        "--batch",
        "4",
        "--epochs",
        epochs,
        "--lr",
        "1e-2",
        "--schedule",
        "constant",
        "--warmup-ratio",
        "0",
        "--lora-r",
        "8",
        "--log-every",
        "1",
        "--out",
        run.to_str().unwrap(),
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    zoo(&args)
}

/// The logits `zoo forward` writes for "The cat sat" with `extra` flags, through `out`.
fn forward_logits(extra: &[&str], out: &Path) -> Vec<f32> {
    let mut args = vec![
        "forward",
        "--text",
        "The cat sat",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = zoo(&args);
    assert!(output.status.success(), "{}", text(&output));
    checkpoints_convert::read_weights_file(out).unwrap()["logits"]
        .data
        .to_vec::<f32>()
        .unwrap()
}

/// `zoo finetune --task causal-lm --lora-r 8` on the GPT-2 fixture: the loss falls, the base
/// weights stay bit-identical, the checkpoint is also a PEFT adapter directory (GPT-2's c_attn as
/// one block-diagonal rank-24 update) that `--adapter` runs on the base with the checkpoint's own
/// outputs, and a run halted after 2 epochs resumes to the bits of the uninterrupted one.
#[test]
fn lora_finetuning_trains_adapters_only_and_saves_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_pairs(dir.path());
    let base = fixture("gpt2");
    let finetune =
        |run: &Path, epochs: &str, extra: &[&str]| lora_finetune(&base, &data, run, epochs, extra);
    let run = dir.path().join("run");
    let output = finetune(&run, "6", &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("trainable"), "{}", text(&output));
    let losses = losses(&run);
    let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
    println!("lora: loss {first:.4} → {last:.4}");
    assert!(last < first, "{losses:?}");
    let last_dir = run.join("checkpoints/last");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(last_dir.join(file).is_file(), "{file}");
    }
    // Every base weight as it was in the fixture (read through the key table: zoo names).
    let mut spec = checkpoints_convert::read_spec(&base).unwrap();
    let fixture_weights = spec.read_weights(Default::default()).unwrap().tensors;
    let mut frozen = 0;
    for (name, values) in weights(&last_dir) {
        match fixture_weights.get(&name) {
            Some(start) => {
                assert_eq!(start.to_vec::<f32>().unwrap(), values, "{name} moved");
                frozen += 1;
            }
            None => assert!(name.contains(".lora."), "{name}"),
        }
    }
    assert_eq!(frozen, fixture_weights.len());
    // The adapter on the base gives the checkpoint's logits.
    let forward = forward_logits;
    let adapted = forward(
        &[
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            last_dir.to_str().unwrap(),
        ],
        &dir.path().join("a.safetensors"),
    );
    let own = forward(
        &["--model", last_dir.to_str().unwrap()],
        &dir.path().join("b.safetensors"),
    );
    let plain = forward(
        &["--model", base.to_str().unwrap()],
        &dir.path().join("c.safetensors"),
    );
    let worst = adapted
        .iter()
        .zip(&own)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-5, "{worst}");
    assert!(
        adapted
            .iter()
            .zip(&plain)
            .any(|(a, b)| (a - b).abs() > 1e-2)
    );
    // Exported to HF's layout, the adapters are merged in: the same logits without them.
    let hf = dir.path().join("hf");
    let output = zoo(&[
        "convert",
        "--to-hf",
        "--from",
        last_dir.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let merged = forward(
        &["--model", hf.to_str().unwrap()],
        &dir.path().join("d.safetensors"),
    );
    let worst_merged = merged
        .iter()
        .zip(&own)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!("lora: --adapter vs the checkpoint {worst:.2e}, merged HF export {worst_merged:.2e}");
    assert!(worst_merged < 1e-4, "{worst_merged}");
    // Halted after two epochs and resumed: the uninterrupted run's bits.
    let halted = dir.path().join("halted");
    let output = finetune(&halted, "2", &[]);
    assert!(output.status.success(), "{}", text(&output));
    let output = finetune(&halted, "6", &["--resume", halted.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    let worst = assert_weights_close(
        &weights(&halted.join("checkpoints/last")),
        &weights(&last_dir),
        1e-30,
    );
    println!("lora: {frozen} frozen tensors unchanged; resumed worst difference {worst:.2e}");
    let bad = finetune(&dir.path().join("bad"), "1", &["--lora-targets", "q_proj"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("'q_proj'"), "{}", text(&bad));
}

/// QLoRA: `zoo finetune --task causal-lm --lora-r 8 --quantize-base 4` on the GPT-2 fixture
/// trains the adapters on an NF4 base (the loss falls); the checkpoint holds the adapters and
/// the unquantized parameters (bit-identical) but none of the quantized layers, refuses to run
/// alone with a message saying how, runs as `--adapter` on the `zoo quantize --bits 4` base (the
/// codes the trainer made), and a halted run resumes to the uninterrupted run's bits (the
/// codes are made again identically). Bad flags are refused.
#[test]
fn qlora_finetuning_trains_adapters_on_a_4bit_base() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_pairs(dir.path());
    let base = fixture("gpt2");
    let finetune =
        |run: &Path, epochs: &str, extra: &[&str]| lora_finetune(&base, &data, run, epochs, extra);
    let run = dir.path().join("run");
    let output = finetune(&run, "6", &["--quantize-base", "4"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("held as codes"), "{}", text(&output));
    let losses = losses(&run);
    let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
    println!("qlora: loss {first:.4} → {last:.4}");
    assert!(last < first, "{losses:?}");
    let last_dir = run.join("checkpoints/last");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(last_dir.join(file).is_file(), "{file}");
    }
    // The base quantized as zoo quantize does: the layers the checkpoint leaves out.
    let quantized = dir.path().join("nf4");
    let output = zoo(&[
        "quantize",
        "--from",
        base.to_str().unwrap(),
        "--out",
        quantized.to_str().unwrap(),
        "--bits",
        "4",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(quantized.join("zoo.json")).unwrap()).unwrap();
    let coded = manifest["hf_config"]["zoo_quantization"]["weights"]
        .as_object()
        .unwrap()
        .clone();
    assert!(!coded.is_empty());
    let mut spec = checkpoints_convert::read_spec(&base).unwrap();
    let fixture_weights = spec.read_weights(Default::default()).unwrap().tensors;
    let saved = weights(&last_dir);
    let by_name: std::collections::BTreeMap<&str, &Vec<f32>> =
        saved.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut kept = 0;
    for (name, start) in &fixture_weights {
        match (coded.contains_key(name), by_name.get(name.as_str())) {
            (true, saved) => assert!(saved.is_none(), "{name}: a quantized layer was saved"),
            (false, Some(values)) => {
                assert_eq!(&start.to_vec::<f32>().unwrap(), *values, "{name} moved");
                kept += 1;
            }
            (false, None) => panic!("{name} is missing from the checkpoint"),
        }
    }
    assert_eq!(kept + coded.len(), fixture_weights.len());
    // Alone, the checkpoint is refused with what to do instead.
    let alone_out = dir.path().join("alone.safetensors");
    let alone = zoo(&[
        "forward",
        "--model",
        last_dir.to_str().unwrap(),
        "--text",
        "The cat",
        "--out",
        alone_out.to_str().unwrap(),
    ]);
    assert!(!alone_out.exists());
    assert!(!alone.status.success());
    assert!(
        text(&alone).contains("QLoRA") && text(&alone).contains("--adapter"),
        "{}",
        text(&alone)
    );
    assert!(!text(&alone).contains("panicked"), "{}", text(&alone));
    let forward = forward_logits;
    let on_codes = forward(
        &[
            "--model",
            quantized.to_str().unwrap(),
            "--adapter",
            last_dir.to_str().unwrap(),
        ],
        &dir.path().join("a.safetensors"),
    );
    let codes_alone = forward(
        &["--model", quantized.to_str().unwrap()],
        &dir.path().join("b.safetensors"),
    );
    let on_f32 = forward(
        &[
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            last_dir.to_str().unwrap(),
        ],
        &dir.path().join("c.safetensors"),
    );
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let range = on_codes.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let (adapter_effect, nf4_error) = (
        max_diff(&on_codes, &codes_alone),
        max_diff(&on_codes, &on_f32),
    );
    println!(
        "qlora: the adapter moves the NF4 model's logits by {adapter_effect:.3}; the f32 base \
         with it differs by {nf4_error:.3} (max |logit| {range:.3}); {kept} tensors kept, \
         {} quantized",
        coded.len()
    );
    assert!(adapter_effect > 1e-2);
    assert!(nf4_error < 0.25 * range, "{nf4_error} vs {range}");
    // Halted after two epochs and resumed: the uninterrupted run's bits.
    let halted = dir.path().join("halted");
    let output = finetune(&halted, "2", &["--quantize-base", "4"]);
    assert!(output.status.success(), "{}", text(&output));
    let output = finetune(
        &halted,
        "6",
        &["--quantize-base", "4", "--resume", halted.to_str().unwrap()],
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_weights_close(&weights(&halted.join("checkpoints/last")), &saved, 1e-30);
    let bad = finetune(&dir.path().join("bad"), "1", &["--quantize-base", "3"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("--quantize-base 3"), "{}", text(&bad));
    // Nothing frozen to quantize without LoRA or BitFit.
    let bad_run = dir.path().join("bad");
    let bad = zoo(&[
        "finetune",
        "--task",
        "causal-lm",
        "--model",
        base.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "--batch",
        "4",
        "--quantize-base",
        "4",
        "--out",
        bad_run.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("--lora-r R"), "{}", text(&bad));
    assert!(!bad_run.join("checkpoints").exists());
    // A quantized directory has no dense weights to start from (its layers would start fresh).
    let bad = zoo(&[
        "finetune",
        "--task",
        "causal-lm",
        "--model",
        quantized.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "--batch",
        "4",
        "--lora-r",
        "8",
        "--out",
        bad_run.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("is quantized") && text(&bad).contains("--quantize-base 4"),
        "{}",
        text(&bad)
    );
}

/// `zoo memory --quantize-base` counts the base's block projections as codes: for
/// llama-3.2-1b (16 blocks of q, o 2048², k, v 2048×512, gate, up, down 2048×8192) 973M
/// parameters, at 9/16 byte each in NF4 (half a byte and a 4-byte absmax per 64) and 1 byte
/// plus a 4-byte scale per output row in int8; the state term drops by their f32 bytes less that.
#[test]
fn zoo_memory_models_a_quantized_base() {
    let memory = |extra: &[&str]| {
        let mut args = vec![
            "memory",
            "--model",
            "llama-3.2-1b",
            "--seq",
            "512",
            "--batch",
            "4",
            "--checkpointing",
            "--dtype",
            "bf16",
            "--gpu-mem",
            "11GB",
            "--lora-r",
            "8",
            "--offload-optimizer",
            "--json",
        ];
        args.extend_from_slice(extra);
        let output = zoo(&args);
        assert!(output.status.success(), "{}", text(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let (hidden, kv, ffn) = (2048.0, 512.0, 8192.0);
    let per_block = 2.0 * hidden * hidden + 2.0 * hidden * kv + 3.0 * hidden * ffn;
    let coded = 16.0 * per_block;
    let out_rows = 16.0 * (2.0 * hidden + 2.0 * kv + 2.0 * ffn + hidden);
    let lora = memory(&[]);
    assert_eq!(lora["quantized_params"].as_f64().unwrap(), 0.0);
    for (bits, bytes) in [("4", coded * 9.0 / 16.0), ("8", coded + 4.0 * out_rows)] {
        let qlora = memory(&["--quantize-base", bits]);
        assert_eq!(
            qlora["quantized_params"].as_f64().unwrap(),
            coded,
            "{qlora}"
        );
        assert_eq!(qlora["quantized_bytes"].as_f64().unwrap(), bytes, "{qlora}");
        let saved = lora["features"]["state"].as_f64().unwrap()
            - qlora["features"]["state"].as_f64().unwrap();
        assert!((saved - (4.0 * coded - bytes)).abs() < 1.0, "{saved}");
        let host_gb = |v: &serde_json::Value| v["host_bytes"].as_f64().unwrap() / 1e9;
        println!(
            "zoo memory llama-3.2-1b --lora-r 8 --quantize-base {bits}: host {:.2} → {:.2} GB",
            host_gb(&lora),
            host_gb(&qlora)
        );
    }
}

#[test]
fn bad_training_input_fails_clearly_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let check = |output: Output, needles: &[&str]| {
        let message = text(&output);
        assert!(!output.status.success(), "{message}");
        assert!(!message.contains("panicked"), "{message}");
        for needle in needles {
            assert!(message.contains(needle), "no '{needle}' in: {message}");
        }
    };

    // An empty and a missing corpus.
    let empty = dir.path().join("empty.txt");
    fs::write(&empty, "\n\n").unwrap();
    check(
        pretrain(&run, &["--data", empty.to_str().unwrap()]),
        &["empty.txt", "empty"],
    );
    let missing = dir.path().join("missing.txt");
    check(
        pretrain(&run, &["--data", missing.to_str().unwrap()]),
        &["missing.txt"],
    );

    // A TSV line without a label, and a label outside --num-labels.
    let finetune = |train: &Path, out: &Path| {
        zoo(&[
            "finetune",
            "--model",
            fixture("bert").to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--num-labels",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
        ])
    };
    let no_label = dir.path().join("no_label.tsv");
    fs::write(&no_label, "sentence\tlabel\nthe model\t1\nthe world\n").unwrap();
    check(finetune(&no_label, &run), &["no_label.tsv:3", "no label"]);
    let outside = dir.path().join("outside.tsv");
    fs::write(&outside, "sentence\tlabel\nthe model\t1\nthe world\t2\n").unwrap();
    check(
        finetune(&outside, &run),
        &["outside.tsv:3", "label 2 is outside --num-labels 2"],
    );

    // --resume pointing at another model's checkpoint: a BERT classifier for a GPT.
    let classifier = dir.path().join("classifier");
    let train = dir.path().join("train.tsv");
    synthetic(&train, 32, 3);
    let output = zoo(&[
        "finetune",
        "--model",
        fixture("bert").to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--num-labels",
        "2",
        "--epochs",
        "1",
        "--out",
        classifier.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let last = classifier.join("checkpoints/last");
    let before = fs::read(last.join("model.safetensors")).unwrap();
    check(
        pretrain(&run, &["--steps", "2", "--resume", last.to_str().unwrap()]),
        &["BertForSequenceClassification", "GPT2LMHeadModel"],
    );
    assert_eq!(fs::read(last.join("model.safetensors")).unwrap(), before);
    // And a GPT of another width.
    let gpt = dir.path().join("gpt");
    let output = pretrain(&gpt, &["--steps", "2"]);
    assert!(output.status.success(), "{}", text(&output));
    // A fresh run into a directory that holds one would overwrite it.
    let checkpoint = gpt.join("checkpoints/step-0000002/model.safetensors");
    let before = fs::read(&checkpoint).unwrap();
    check(
        pretrain(&gpt, &["--steps", "2", "--seed", "9"]),
        &["already holds a run", "--resume"],
    );
    assert_eq!(fs::read(&checkpoint).unwrap(), before);
    let config = dir.path().join("wide.json");
    fs::write(
        &config,
        r#"{"model_type": "gpt2", "vocab_size": 257, "n_positions": 128, "n_embd": 64,
            "n_layer": 2, "n_head": 2}"#,
    )
    .unwrap();
    check(
        pretrain(
            &dir.path().join("other"),
            &[
                "--model",
                config.to_str().unwrap(),
                "--resume",
                gpt.to_str().unwrap(),
            ],
        ),
        &["n_embd", "128", "64"],
    );
}

#[test]
fn launched_process_ranks_train_to_the_bits_of_thread_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let (threads, processes) = (dir.path().join("threads"), dir.path().join("processes"));
    let output = pretrain(&threads, &["--steps", "6", "--ranks", "2"]);
    assert!(output.status.success(), "{}", text(&output));
    let mut args = vec![
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        env!("CARGO_BIN_EXE_zoo"),
    ];
    args.extend_from_slice(QUICK);
    args.extend([
        "--out",
        processes.to_str().unwrap(),
        "--steps",
        "6",
        "--sample-tokens",
        "0",
    ]);
    let output = zoo(&args);
    assert!(output.status.success(), "{}", text(&output));
    // One summary (rank 0's), and the same weights: TCP ranks reduce in the threads' order.
    assert_eq!(
        text(&output).matches("pretrain: 6 steps").count(),
        1,
        "{}",
        text(&output)
    );
    let file = "checkpoints/step-0000006/model.safetensors";
    assert!(fs::read(threads.join(file)).unwrap() == fs::read(processes.join(file)).unwrap());
}

#[test]
fn launch_stops_every_rank_when_one_fails() {
    let started = Instant::now();
    let output = zoo(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--",
        "sh",
        "-c",
        r#"echo "rank $RANK of $WORLD_SIZE local $LOCAL_RANK port $MASTER_PORT threads $RAYON_NUM_THREADS"; if [ "$RANK" = 1 ]; then exit 7; fi; sleep 60"#,
    ]);
    // The node's cores are shared between its three ranks (or the caller's setting is kept).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads =
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| (cores / 3).max(1).to_string());
    let message = text(&output);
    assert_eq!(output.status.code(), Some(7), "{message}");
    assert!(started.elapsed() < Duration::from_secs(20), "{message}");
    // Ranks the failure stopped early may not have printed; those that did saw torchrun's variables.
    assert!(message.contains("rank 1 of 3 local 1"), "{message}");
    for line in message
        .lines()
        .filter(|l| l.starts_with("rank ") && l.contains(" of "))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((words[3], words[1]), ("3", words[5]), "{line}");
        assert_eq!(words[9], threads, "{line}");
    }
    assert!(message.contains("rank 1 exited"), "{message}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = QUICK.to_vec();
    let out = run.to_str().unwrap().to_string();
    args.extend([
        "--out",
        &out,
        "--steps",
        "100000",
        "--save-every",
        "0",
        "--sample-tokens",
        "0",
    ]);
    let child = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first logged step, then interrupt as a terminal's Ctrl-C does.
    let started = Instant::now();
    while fs::read_to_string(run.join("metrics.jsonl")).map_or(true, |m| m.is_empty()) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", text(&output));
    assert!(
        text(&output).contains("checkpoint saved"),
        "{}",
        text(&output)
    );
    let latest = fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let step: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!((10..100000).contains(&step), "{latest}");
    // It resumes from there.
    let target = (step + 2).to_string();
    let output = pretrain(&run, &["--steps", &target, "--resume", &out]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains(&format!("pretrain: {target} steps")));
}

#[test]
fn plot_draws_the_metrics_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    fs::create_dir_all(&run).unwrap();
    fs::write(
        run.join("metrics.jsonl"),
        [
            r#"{"step": 10, "loss": 2.0, "lr": 0.001}"#,
            r#"{"step": 20, "loss": 1.5, "lr": 0.002}"#,
            r#"{"step": 20, "valid_loss": 1.6, "accuracy": 0.7, "f1": 0.6}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let output = zoo(&["plot", run.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    let png = fs::read(run.join("metrics.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width 1000, three panels of 330 rows.
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1000);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 990);
    assert!(text(&output).contains("3 panel(s)"));

    // A run without metrics is an error naming the file.
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let output = zoo(&["plot", empty.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(text(&output).contains("metrics.jsonl"), "{}", text(&output));
}

/// A tiny T5 v1.1-style config (gated GELU, untied head) for the byte tokenizer: 257 byte ids
/// and end of text, and room above them for the span-corruption sentinels.
fn tiny_t5(dir: &Path, tied: bool) -> std::path::PathBuf {
    let path = dir.join(if tied { "t5-tied.json" } else { "t5.json" });
    let (ffn, tie) = if tied {
        ("relu", "true")
    } else {
        ("gated-gelu", "false")
    };
    fs::write(
        &path,
        format!(
            r#"{{"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                "vocab_size": 320, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
                "num_decoder_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 16,
                "relative_attention_max_distance": 64, "feed_forward_proj": "{ffn}",
                "tie_word_embeddings": {tie}, "decoder_start_token_id": 0, "pad_token_id": 0,
                "eos_token_id": 256}}"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn pretraining_a_tiny_t5_with_span_corruption_lowers_the_loss_and_saves_a_t5_directory() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [false, true] {
        let config = tiny_t5(dir.path(), tied);
        let run = dir.path().join(format!("run-{tied}"));
        let output = pretrain(
            &run,
            &["--model", config.to_str().unwrap(), "--steps", "60"],
        );
        assert!(output.status.success(), "{}", text(&output));
        let losses = losses(&run);
        let (first, last) = (losses[0].1, losses.last().unwrap().1);
        println!(
            "pretrain t5 (tied {tied}): mean loss of steps 1–10 {first:.3}, of 51–60 {last:.3}"
        );
        // A uniform guess over the 320 ids is ln 320 ≈ 5.77 nats; the targets are sentinels
        // (predictable from their order) and hidden bytes.
        assert!(last < 4.0 && first - last > 1.0, "{losses:?}");

        // The checkpoint is a T5 directory: zoo reads it, and converts it to transformers' layout.
        let checkpoint = run.join("checkpoints/step-0000060");
        let state: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(checkpoint.join("zoo.json")).unwrap())
                .unwrap();
        assert_eq!(state["architecture"], "T5ForConditionalGeneration");
        let generated = zoo(&[
            "generate",
            "--model",
            checkpoint.to_str().unwrap(),
            "--prompt",
            "Phileas Fogg",
            "--max-new-tokens",
            "4",
            "--ids",
        ]);
        assert!(generated.status.success(), "{}", text(&generated));
        let hf = dir.path().join(format!("hf-{tied}"));
        let converted = zoo(&[
            "convert",
            "--from",
            checkpoint.to_str().unwrap(),
            "--to-hf",
            "--out",
            hf.to_str().unwrap(),
        ]);
        assert!(converted.status.success(), "{}", text(&converted));
        let names: Vec<String> = weights(&hf).into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(
                &"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into()
            ),
            "{names:?}"
        );
        assert_eq!(
            names.contains(&"lm_head.weight".to_string()),
            !tied,
            "{names:?}"
        );
    }
}

#[test]
fn t5_pretraining_on_two_ranks_and_after_a_sigkill_matches_one_uninterrupted_rank() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_t5(dir.path(), false);
    let common = [
        "--model",
        config.to_str().unwrap(),
        "--steps",
        "20",
        "--save-every",
        "5",
        "--keep",
        "10",
        "--seed",
        "5",
    ];
    // Two thread ranks: the same windows and noise, gradients summed in another order (no
    // dropout: its masks are drawn per rank's rows).
    let mut finals = Vec::new();
    for ranks in ["1", "2"] {
        let run = dir.path().join(format!("ranks{ranks}"));
        let output = pretrain(&run, &[&common[..], &["--ranks", ranks]].concat());
        assert!(output.status.success(), "{}", text(&output));
        finals.push(weights(&run.join("checkpoints/step-0000020")));
    }
    let worst = assert_weights_close(&finals[0], &finals[1], 1e-5);
    println!("pretrain t5: ranks 2 vs 1 after 20 steps, worst weight difference {worst:.2e}");

    // With dropout and 8 micro-batches a step (so that a step takes long enough to kill between
    // checkpoints): killed with SIGKILL after its first checkpoint and resumed, the run ends
    // with the bits of an uninterrupted one.
    let common = [&common[..], &["--dropout", "0.1", "--grad-accum", "8"]].concat();
    let whole = dir.path().join("whole");
    let output = pretrain(&whole, &common);
    assert!(output.status.success(), "{}", text(&output));
    let want = weights(&whole.join("checkpoints/step-0000020"));
    let killed = dir.path().join("killed");
    let at_kill = kill_and_resume(&killed, &common, "step-0000020");
    let got = weights(&killed.join("checkpoints/step-0000020"));
    assert_eq!(want.len(), got.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "{name} differs after resuming from {at_kill}");
    }
    println!("pretrain t5: killed at {at_kill}, resumed to the same bits");
}

#[test]
fn pretraining_a_tiny_bert_with_masked_lm_lowers_the_loss_and_saves_a_bert_mlm_directory() {
    let dir = tempfile::tempdir().unwrap();
    // The byte tokenizer has no [MASK]: masked LM takes the last id, 259, which bytes never use.
    let config = dir.path().join("bert.json");
    fs::write(
        &config,
        r#"{"model_type": "bert", "vocab_size": 260, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64}"#,
    )
    .unwrap();
    let run = dir.path().join("run");
    let output = pretrain(
        &run,
        &["--model", config.to_str().unwrap(), "--steps", "60"],
    );
    assert!(output.status.success(), "{}", text(&output));
    let losses = losses(&run);
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    println!("pretrain bert (MLM): mean loss of steps 1–10 {first:.3}, of 51–60 {last:.3}");
    // ln 260 ≈ 5.56 nats for a uniform guess at the masked bytes.
    assert!(last < 4.0 && first - last > 1.0, "{losses:?}");

    let checkpoint = run.join("checkpoints/step-0000060");
    let forward = zoo(&[
        "forward",
        "--model",
        checkpoint.to_str().unwrap(),
        "--text",
        "Phileas Fogg",
        "--out",
        dir.path().join("out.safetensors").to_str().unwrap(),
    ]);
    assert!(forward.status.success(), "{}", text(&forward));
    assert!(
        text(&forward).contains("BertForMaskedLM"),
        "{}",
        text(&forward)
    );
    let hf = dir.path().join("hf");
    let converted = zoo(&[
        "convert",
        "--from",
        checkpoint.to_str().unwrap(),
        "--to-hf",
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(converted.status.success(), "{}", text(&converted));
    let names: Vec<String> = weights(&hf).into_iter().map(|(n, _)| n).collect();
    for key in [
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "bert.embeddings.word_embeddings.weight",
    ] {
        assert!(names.contains(&key.to_string()), "{key} not in {names:?}");
    }
    // transformers 5 refuses `num_labels: null`; the exported config leaves unset fields out.
    let hf_config = fs::read_to_string(hf.join("config.json")).unwrap();
    assert!(!hf_config.contains("null"), "{hf_config}");

    // The family decides the objective; whole words need WordPiece's `##` pieces.
    for (extra, needles) in [
        (
            &["--objective", "span"][..],
            &["--objective span", "BertForMaskedLM", "mlm"][..],
        ),
        (&["--whole-word-mask"][..], &["##"][..]),
    ] {
        let other = dir.path().join("other");
        let mut args = vec!["--model", config.to_str().unwrap(), "--steps", "2"];
        args.extend_from_slice(extra);
        let output = pretrain(&other, &args);
        let message = text(&output);
        assert!(!output.status.success(), "{message}");
        for needle in needles {
            assert!(message.contains(needle), "no '{needle}' in {message}");
        }
    }
    // With a WordPiece vocabulary, whole-word masking trains.
    let output = pretrain(
        &dir.path().join("wwm"),
        &[
            "--model",
            fixture("bert_mlm").to_str().unwrap(),
            "--whole-word-mask",
            "--steps",
            "4",
            "--lr",
            "1e-3",
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
}

/// `zoo finetune --task seq2seq|causal-lm` on a fixture's trajectory examples: 5 full-batch
/// steps, constant lr, no clipping, dropout 0, as `tests/fixtures/generate.py` ran them in
/// transformers with `torch.optim.AdamW`.
fn check_trajectory(fixture_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("trajectory").join(fixture_name);
    let reference: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(source.join("trajectory.json")).unwrap()).unwrap();
    let run = dir.path().join("run");
    let number = |key: &str| reference[key].to_string();
    let output = zoo(&[
        "finetune",
        "--task",
        reference["task"].as_str().unwrap(),
        "--model",
        fixture(fixture_name).to_str().unwrap(),
        "--train",
        source.join("examples.jsonl").to_str().unwrap(),
        "--batch",
        &number("batch"),
        "--epochs",
        &number("steps"),
        "--lr",
        &number("lr"),
        "--weight-decay",
        &number("weight_decay"),
        "--schedule",
        "constant",
        "--warmup-ratio",
        "0",
        "--max-grad-norm",
        "0",
        "--dropout",
        "0",
        "--log-every",
        "1",
        "--out",
        run.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let got: Vec<f64> = losses(&run).iter().map(|(_, l)| *l).collect();
    let want: Vec<f64> = reference["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "{got:?}");
    let worst_loss = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs())
        .fold(0.0, f64::max);
    assert!(
        worst_loss < 1e-4,
        "{fixture_name}: losses {got:?} vs {want:?}"
    );

    // The final weights, in transformers' names and layout.
    let hf = dir.path().join("hf");
    let last = run.join("checkpoints/last");
    let converted = zoo(&[
        "convert",
        "--from",
        last.to_str().unwrap(),
        "--to-hf",
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(converted.status.success(), "{}", text(&converted));
    let ours: std::collections::BTreeMap<String, Vec<f32>> = weights(&hf).into_iter().collect();
    let lr = reference["lr"].as_f64().unwrap() as f32;
    let mut worst = (0.0f32, String::new());
    let reference_weights =
        checkpoints_convert::read_weights_file(&source.join("weights.safetensors")).unwrap();
    for (name, theirs) in reference_weights {
        let theirs: Vec<f32> = theirs.data.convert::<f32>().to_vec().unwrap();
        // T5's embed_tokens are `shared` itself.
        let key = if name.ends_with("embed_tokens.weight") {
            "shared.weight".to_string()
        } else {
            name.clone()
        };
        let mine = &ours[&key];
        assert_eq!(mine.len(), theirs.len(), "{name}");
        let width = theirs.len() / 3;
        for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
            let diff = (a - b).abs();
            // GPT-2's attention key biases have an exact gradient of 0 (softmax cancels them):
            // both sides step on round-off, which AdamW scales to up to ±lr a step.
            let key_bias = name.ends_with("attn.c_attn.bias") && (width..2 * width).contains(&i);
            // Elsewhere a wrong update would be off by about lr per step; parameters with
            // tiny gradients (rare tokens' embeddings) differ by round-off that AdamW scales up.
            let bound = if key_bias { 5.0 * lr + 1e-6 } else { 0.5 * lr };
            assert!(diff <= bound, "{fixture_name}: {name}[{i}] {a} vs {b}");
            if !key_bias && diff > worst.0 {
                worst = (diff, name.clone());
            }
        }
    }
    println!(
        "trajectory {fixture_name}: losses within {worst_loss:.1e} relative of transformers', \
         final weights within {:.1e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn seq2seq_and_causal_lm_finetuning_follow_transformers_adamw_trajectory() {
    check_trajectory("t5_v1_1");
    check_trajectory("gpt2");
}

#[test]
fn bad_seq2seq_and_causal_lm_input_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let finetune = |task: &str, model: &str, train: &Path| {
        zoo(&[
            "finetune",
            "--task",
            task,
            "--model",
            fixture(model).to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--batch",
            "1",
            "--out",
            run.to_str().unwrap(),
            "--no-progress",
        ])
    };
    let check = |output: Output, needles: &[&str]| {
        let message = text(&output);
        assert!(!output.status.success(), "{message}");
        assert!(!message.contains("panicked"), "{message}");
        for needle in needles {
            assert!(message.contains(needle), "no '{needle}' in: {message}");
        }
        assert!(!run.join("checkpoints").exists(), "{message}");
    };
    let file = |name: &str, body: &str| {
        let path = dir.path().join(name);
        fs::write(&path, body).unwrap();
        path
    };
    let no_target = file(
        "no_target.jsonl",
        "{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"c\"}\n",
    );
    check(
        finetune("seq2seq", "t5_v1_1", &no_target),
        &["no_target.jsonl:2", "target"],
    );
    let empty = file(
        "empty.jsonl",
        "{\"prompt\": \"a\", \"completion\": \" \"}\n",
    );
    check(
        finetune("causal-lm", "gpt2", &empty),
        &["empty.jsonl:1", "empty target"],
    );
    let good = file("good.jsonl", "{\"input\": \"a\", \"target\": \"b\"}\n");
    check(
        finetune("seq2seq", "gpt2", &good),
        &[
            "GPT2LMHeadModel",
            "--task seq2seq",
            "T5ForConditionalGeneration",
        ],
    );
    check(finetune("classify", "bert", &good), &["--num-labels"]);
}

#[test]
fn seq2seq_and_causal_lm_finetuning_keep_a_best_checkpoint_that_answers() {
    // (task, model, whose trajectory examples, prompt); Qwen2 learns GPT-2's examples.
    for (task, model, examples, prompt) in [
        ("seq2seq", "t5_v1_1", "t5_v1_1", "first words: The cat sat"),
        ("causal-lm", "gpt2", "gpt2", "The cat"),
        ("causal-lm", "qwen2", "gpt2", "The cat"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let examples = fixture("trajectory").join(examples).join("examples.jsonl");
        let run = dir.path().join("run");
        let output = zoo(&[
            "finetune",
            "--task",
            task,
            "--model",
            fixture(model).to_str().unwrap(),
            "--train",
            examples.to_str().unwrap(),
            "--valid",
            examples.to_str().unwrap(),
            "--batch",
            "3",
            "--epochs",
            "15",
            "--lr",
            "3e-3",
            "--dropout",
            "0",
            "--out",
            run.to_str().unwrap(),
            "--no-progress",
        ]);
        assert!(output.status.success(), "{}", text(&output));
        let evaluations: Vec<serde_json::Value> = metrics(&run)
            .into_iter()
            .filter(|m| m.get("valid_loss").is_some())
            .collect();
        let (first, last) = (
            evaluations[0]["valid_loss"].as_f64().unwrap(),
            evaluations.last().unwrap()["valid_loss"].as_f64().unwrap(),
        );
        println!(
            "finetune {task} ({model}): validation loss {first:.3} → {last:.3}{}",
            evaluations.last().unwrap()["exact_match"]
                .as_f64()
                .map(|m| format!(", exact match {m:.2}"))
                .unwrap_or_default()
        );
        assert!(last < 0.5 * first, "{evaluations:?}");
        if task == "seq2seq" {
            // The examples it was trained on: most greedy answers are the targets.
            let exact = evaluations.last().unwrap()["exact_match"].as_f64().unwrap();
            assert!(exact >= 0.5, "{evaluations:?}");
        }
        let best = run.join("checkpoints/best");
        let answer = zoo(&[
            "generate",
            "--model",
            best.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "8",
            "--greedy",
        ]);
        assert!(answer.status.success(), "{}", text(&answer));
        println!(
            "finetune {task}: {prompt:?} → {:?}",
            String::from_utf8_lossy(&answer.stdout).trim()
        );
    }
}

#[test]
fn finetuning_decoders_as_classifiers_learns_a_synthetic_rule() {
    // GPT-2 and the Llama family (the qwen2 fixture, a causal LM: its head is replaced by a
    // fresh score) read the score at the last real token.
    for (model, class) in [
        ("gpt2", "GPT2ForSequenceClassification"),
        ("qwen2", "Qwen2ForSequenceClassification"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (train, valid) = (dir.path().join("train.tsv"), dir.path().join("dev.tsv"));
        synthetic(&train, 256, 1);
        synthetic(&valid, 64, 2);
        let run = dir.path().join("run");
        let output = zoo(&[
            "finetune",
            "--model",
            fixture(model).to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--valid",
            valid.to_str().unwrap(),
            "--num-labels",
            "2",
            "--lr",
            "2e-3",
            "--epochs",
            "6",
            "--out",
            run.to_str().unwrap(),
            "--no-progress",
        ]);
        assert!(output.status.success(), "{}", text(&output));
        let accuracy = metrics(&run)
            .iter()
            .filter_map(|m| m["accuracy"].as_f64())
            .fold(0.0, f64::max);
        println!("finetune {model} classify: best validation accuracy {accuracy:.3}");
        assert!(accuracy >= 0.9, "{model}: {}", text(&output));
        // The checkpoint is a classifier that pads (and pools) with end-of-text.
        let manifest: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(run.join("checkpoints/best/zoo.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["architecture"], class);
        assert!(manifest["hf_config"]["pad_token_id"].is_u64(), "{manifest}");
    }
}

#[test]
fn auto_plans_the_writing_tasks_and_records_its_choice() {
    let dir = tempfile::tempdir().unwrap();
    let examples = fixture("trajectory").join("gpt2").join("examples.jsonl");
    let run = dir.path().join("run");
    let output = zoo(&[
        "finetune",
        "--task",
        "causal-lm",
        "--model",
        fixture("gpt2").to_str().unwrap(),
        "--train",
        examples.to_str().unwrap(),
        "--batch",
        "6",
        "--epochs",
        "2",
        "--auto",
        "--mem",
        "1GB",
        "--out",
        run.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("auto: micro-batch"),
        "{}",
        text(&output)
    );
    let state: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(run.join("checkpoints/last/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let auto = &state["auto"];
    assert_eq!(
        auto["micro_batch"].as_u64().unwrap() * auto["grad_accum"].as_u64().unwrap(),
        6,
        "{state}"
    );
}

/// A tiny Llama-shaped config: GQA (4 heads, 2 kv heads), llama3 RoPE scaling, untied head.
fn tiny_llama(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("llama.json");
    fs::write(
        &path,
        r#"{"model_type": "llama", "vocab_size": 260, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "eos_token_id": 256,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}}"#,
    )
    .unwrap();
    path
}

#[test]
fn pretraining_a_tiny_llama_lowers_the_loss_matches_on_two_ranks_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_llama(dir.path());
    let run = dir.path().join("run");
    let output = pretrain(
        &run,
        &["--model", config.to_str().unwrap(), "--steps", "60"],
    );
    assert!(output.status.success(), "{}", text(&output));
    let losses = losses(&run);
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    println!("pretrain llama: mean loss of steps 1–10 {first:.3}, of steps 51–60 {last:.3}");
    assert!(first - last > 1.5 && last < 3.3, "{losses:?}");
    let checkpoint = run.join("checkpoints/step-0000060");
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(checkpoint.join("zoo.json")).unwrap()).unwrap();
    assert_eq!(state["architecture"], "LlamaForCausalLM");
    let generated = zoo(&[
        "generate",
        "--model",
        checkpoint.to_str().unwrap(),
        "--prompt",
        "Phileas",
        "--max-new-tokens",
        "5",
        "--ids",
    ]);
    assert!(generated.status.success(), "{}", text(&generated));

    let common = [
        "--model",
        config.to_str().unwrap(),
        "--steps",
        "20",
        "--save-every",
        "5",
        "--keep",
        "10",
        "--seed",
        "5",
        "--grad-accum",
        "4",
    ];
    let mut finals = Vec::new();
    for ranks in ["1", "2"] {
        let run = dir.path().join(format!("ranks{ranks}"));
        let output = pretrain(&run, &[&common[..], &["--ranks", ranks]].concat());
        assert!(output.status.success(), "{}", text(&output));
        finals.push(weights(&run.join("checkpoints/step-0000020")));
    }
    let worst = assert_weights_close(&finals[0], &finals[1], 1e-5);
    println!("pretrain llama: ranks 2 vs 1 after 20 steps, worst weight difference {worst:.2e}");

    let killed = dir.path().join("killed");
    let at_kill = kill_and_resume(&killed, &common, "step-0000020");
    let want = &finals[0];
    let got = weights(&killed.join("checkpoints/step-0000020"));
    assert_eq!(want.len(), got.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "{name} differs after resuming from {at_kill}");
    }
    println!("pretrain llama: killed at {at_kill}, resumed to the same bits");
}
