//! Helpers shared by the training-job tests: running `zoo`, reading a run's metrics and a
//! checkpoint's weights, the quick pretraining setup.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use checkpoints_convert::read_weights_file;
use serde_json::Value;

pub fn zoo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .output()
        .expect("zoo runs")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn metrics(run: &Path) -> Vec<Value> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The training-loss records (not the evaluations).
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run)
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m["loss"].as_f64()?)))
        .collect()
}

/// Every tensor of a checkpoint's model.safetensors as f32 values.
pub fn weights(checkpoint: &Path) -> Vec<(String, Vec<f32>)> {
    read_weights_file(&checkpoint.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.data.convert::<f32>().to_vec().unwrap()))
        .collect()
}

/// A small, quick pretraining setup on the shipped corpus (the tiny GPT, short windows).
pub const QUICK: &[&str] = &[
    "pretrain",
    "--seq",
    "32",
    "--batch",
    "8",
    "--log-every",
    "10",
    "--eval-every",
    "0",
    "--eval-batches",
    "1",
    "--no-progress",
];

pub fn pretrain(out: &Path, extra: &[&str]) -> Output {
    let mut args = QUICK.to_vec();
    args.extend(["--out", out.to_str().unwrap()]);
    if !extra.contains(&"--sample-tokens") {
        args.extend(["--sample-tokens", "0"]);
    }
    args.extend_from_slice(extra);
    zoo(&args)
}
