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

/// Asserts that two checkpoints' weights (as [`weights`] lists them) differ by less than `bound`
/// in every value, naming the first tensor that does not; returns the largest difference.
pub fn assert_weights_close(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], bound: f32) -> f32 {
    let mut worst: f32 = 0.0;
    for ((name, a), (_, b)) in a.iter().zip(b) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        worst = worst.max(diff);
        assert!(diff < bound, "{name}: {diff}");
    }
    worst
}

/// Starts `zoo pretrain` with `extra` into `out`, kills it with SIGKILL once its first checkpoint
/// is on disk (before its last step, `last_step`), then resumes it to the end; returns the
/// checkpoint the kill left as `latest`.
pub fn kill_and_resume(out: &Path, extra: &[&str], last_step: &str) -> String {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut args = QUICK.to_vec();
    args.extend(["--out", out.to_str().unwrap(), "--sample-tokens", "0"]);
    args.extend_from_slice(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("checkpoints/latest").is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    assert_ne!(
        at_kill.trim(),
        last_step,
        "the kill came too late to test anything"
    );
    let output = pretrain(out, &[extra, &["--resume", out.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", text(&output));
    at_kill.trim().to_string()
}
