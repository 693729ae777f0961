//! Trustworthy runs, end to end: a 124M-parameter model trains and saves within what `zoo memory`
//! promises, a run directory is held by one job at a time, checkpoints are verified on resume and
//! survive a full disk, thread ranks with dropout are reproducible, and a hung rank ends its peers.

use std::fs;
use std::path::Path;

mod support;

use support::*;

/// `KEY=<bytes>` from a `--report-memory` line.
fn reported(output: &str, key: &str) -> f64 {
    let at = output
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key} in {output}"));
    output[at + key.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key} is not a number in {output}"))
}

/// The real-scale check of memory: GPT-2 124M (the `gpt2` preset, fresh weights) trains two
/// steps and saves its checkpoint (1.5 GB of weights and moments). The save may add at most 10%
/// to the training peak (it streams one segment at a time), and the training peak is within 15%
/// of `zoo memory`'s estimate for the same setup.
#[test]
fn a_124m_model_trains_and_saves_within_the_planners_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let setup = ["--seq", "64", "--batch", "2"];
    let mut args = vec![
        "pretrain",
        "--model",
        "gpt2",
        "--steps",
        "2",
        "--save-every",
        "0",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--sample-tokens",
        "0",
        "--no-progress",
        "--report-memory",
        "--out",
        run.to_str().unwrap(),
    ];
    args.extend(setup);
    let output = zoo(&args);
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    let training = reported(&printed, "MEASURED_TRAINING_PEAK_BYTES");
    let with_save = reported(&printed, "MEASURED_FINAL_PEAK_BYTES");

    let mut args = vec!["memory", "--model", "gpt2", "--json", "--mem", "100GB"];
    args.extend(setup);
    let estimate = zoo(&args);
    assert!(estimate.status.success(), "{}", text(&estimate));
    let estimate: serde_json::Value = serde_json::from_slice(&estimate.stdout).unwrap();
    let planned = estimate["process_bytes"].as_f64().unwrap();
    println!(
        "gpt2 124M, 2 × 64 tokens: training peak {:.0} MB, with the checkpoint and evaluation \
         {:.0} MB (+{:.1}%), zoo memory {:.0} MB ({:+.1}%)",
        training / 1e6,
        with_save / 1e6,
        (with_save / training - 1.0) * 100.0,
        planned / 1e6,
        (planned / training - 1.0) * 100.0
    );
    // ZeRO state alone is 16 bytes per parameter: the run did hold a real model.
    assert!(training > 16.0 * 124e6, "{printed}");
    assert!(with_save < training * 1.10, "{printed}");
    assert!(
        (planned / training - 1.0).abs() <= 0.15,
        "{printed}\n{estimate}"
    );
    // The checkpoint is whole: weights and both moments of every parameter.
    let checkpoint = run.join("checkpoints/step-0000002");
    let model = fs::metadata(checkpoint.join("model.safetensors"))
        .unwrap()
        .len();
    let optimizer = fs::metadata(checkpoint.join("optimizer.safetensors"))
        .unwrap()
        .len();
    assert!(model > 4 * 124_000_000 && optimizer > 2 * model - 1_000_000);
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["files"]["model.safetensors"]["bytes"], model);
}

/// Unused in this file's first test, kept for the ones below.
#[allow(dead_code)]
fn exists(path: &Path) -> bool {
    path.exists()
}
