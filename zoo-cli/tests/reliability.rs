//! Trustworthy runs, end to end: a 124M-parameter model trains and saves within what `zoo memory`
//! promises, a run directory is held by one job at a time, checkpoints are verified on resume and
//! survive a full disk, thread ranks with dropout are reproducible, and a hung rank ends its peers.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// Starts `zoo ARGS` in the background, its output discarded.
fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (at most two minutes) until `ready()`, failing if `child` ends first.
fn wait_until(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: timed out"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "{what}: ended too early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The quick pretraining arguments into `run`, plus `extra`.
fn quick(run: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = QUICK.iter().map(|s| s.to_string()).collect();
    args.extend(["--out", run.to_str().unwrap(), "--sample-tokens", "0"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A second job into a run directory a live job holds is refused, naming the holder's pid and
/// host, whether it is fresh or resuming; once the holder is dead (SIGKILL, before its first
/// checkpoint) its lock no longer blocks, and `--resume` starts afresh, saying so.
#[test]
fn a_run_directory_is_held_by_one_job_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let args = quick(&run, &["--steps", "100000", "--save-every", "0"]);
    let mut holder = spawn(&strs(&args));
    let lock = run.join(".lock");
    wait_until(&mut holder, "the first job's lock", || {
        fs::read_to_string(&lock).is_ok_and(|t| t.contains("pid"))
    });
    let pid = holder.id().to_string();

    for extra in [&[][..], &["--resume", run.to_str().unwrap()][..]] {
        let second = zoo(&strs(&quick(
            &run,
            &[&["--steps", "5"][..], extra].concat(),
        )));
        let message = text(&second);
        assert!(!second.status.success(), "{message}");
        assert!(
            message.contains("in use by another job") && message.contains(&format!("pid {pid}")),
            "{message}"
        );
    }
    holder.kill().unwrap();
    holder.wait().unwrap();

    let resumed = zoo(&strs(&quick(
        &run,
        &["--steps", "5", "--resume", run.to_str().unwrap()],
    )));
    let message = text(&resumed);
    assert!(resumed.status.success(), "{message}");
    assert!(message.contains("no checkpoint was saved yet"), "{message}");
    assert!(run.join("checkpoints/step-0000005").is_dir(), "{message}");
}

/// `--resume RUN_DIR` takes the newest checkpoint whose files match the sizes and hashes its
/// `trainer_state.json` recorded, names the damaged one it skipped, and continues to the weights of
/// an uninterrupted run. A save that fails part-way (here: files may not grow past 64 KiB, as on a
/// full disk) stops the job with the file named and leaves the previous checkpoint, and `latest`,
/// whole and loadable.
#[test]
fn resume_skips_damaged_checkpoints_and_a_failed_save_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["--save-every", "10", "--keep", "5", "--dropout", "0.1"];
    let whole = dir.path().join("whole");
    let output = zoo(&strs(&quick(
        &whole,
        &[&["--steps", "30"][..], &common].concat(),
    )));
    assert!(output.status.success(), "{}", text(&output));

    let run = dir.path().join("run");
    let output = zoo(&strs(&quick(
        &run,
        &[&["--steps", "20"][..], &common].concat(),
    )));
    assert!(output.status.success(), "{}", text(&output));
    // One flipped byte in the newest checkpoint's weights.
    let damaged = run.join("checkpoints/step-0000020/model.safetensors");
    let mut bytes = fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&damaged, &bytes).unwrap();
    let resume = ["--resume", run.to_str().unwrap()];
    let output = zoo(&strs(&quick(
        &run,
        &[&["--steps", "30"][..], &common, &resume].concat(),
    )));
    let message = text(&output);
    assert!(output.status.success(), "{message}");
    assert!(
        message.contains("skipping")
            && message.contains("step-0000020")
            && message.contains("corrupt"),
        "{message}"
    );
    // Resumed from step 10, it still ends with the uninterrupted run's weights.
    let want = weights(&whole.join("checkpoints/step-0000030"));
    let got = weights(&run.join("checkpoints/step-0000030"));
    assert!(want == got, "resuming from step 10 changed the weights");

    // Now the disk is "full": no file may grow past 64 KiB (RLIMIT_FSIZE; EFBIG instead of the
    // default SIGXFSZ), so the step-40 checkpoint cannot be written.
    let args = quick(&run, &[&["--steps", "40"][..], &common, &resume].concat());
    let mut command = Command::new(env!("CARGO_BIN_EXE_zoo"));
    command.args(&args);
    // SAFETY: setrlimit and signal are async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output: Output = command.output().unwrap();
    let message = text(&output);
    assert!(!output.status.success(), "{message}");
    assert!(
        message.contains(".safetensors") && message.contains("File too large"),
        "{message}"
    );
    let checkpoints = run.join("checkpoints");
    assert_eq!(
        fs::read_to_string(checkpoints.join("latest"))
            .unwrap()
            .trim(),
        "step-0000030"
    );
    assert!(!checkpoints.join("step-0000040").exists());
    let leftovers: Vec<String> = fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The last good checkpoint still verifies and resumes.
    let output = zoo(&strs(&quick(
        &run,
        &[&["--steps", "31"][..], &common, &resume].concat(),
    )));
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains("skipping"), "{}", text(&output));
}

/// With dropout, two runs of two thread ranks give the same bits, and two launched process ranks
/// give those bits too: every mask is drawn from a stream seeded by (seed, step, micro-batch, rank,
/// segment) on the rank's own thread.
#[test]
fn thread_ranks_with_dropout_are_reproducible_and_match_process_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--steps", "6", "--dropout", "0.1", "--save-every", "0"];
    let file = "checkpoints/step-0000006/model.safetensors";
    let mut finals = Vec::new();
    for name in ["threads-a", "threads-b"] {
        let run = dir.path().join(name);
        let output = zoo(&strs(&quick(
            &run,
            &[&extra[..], &["--ranks", "2"]].concat(),
        )));
        assert!(output.status.success(), "{}", text(&output));
        finals.push(fs::read(run.join(file)).unwrap());
    }
    assert!(
        finals[0] == finals[1],
        "two thread-rank runs with dropout differ"
    );
    let processes = dir.path().join("processes");
    let mut args = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        "2".into(),
        "--".into(),
        env!("CARGO_BIN_EXE_zoo").into(),
    ];
    args.extend(quick(&processes, &extra));
    let output = zoo(&strs(&args));
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        fs::read(processes.join(file)).unwrap() == finals[0],
        "process ranks with dropout differ from thread ranks"
    );
}

/// The pid of the launched rank `rank` whose command line names `marker`.
fn rank_pid(rank: usize, marker: &str) -> Option<i32> {
    for entry in fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = fs::read(entry.path().join("environ")).unwrap_or_default();
        let has = |bytes: &[u8], needle: &str| {
            bytes
                .split(|&b| b == 0)
                .any(|part| part == needle.as_bytes())
        };
        let names = String::from_utf8_lossy(&cmdline).contains(marker);
        if names && has(&environ, &format!("RANK={rank}")) && !cmdline.starts_with(b"launch") {
            let first = cmdline.split(|&b| b == 0).nth(1).unwrap_or_default();
            if first == b"pretrain" {
                return Some(pid);
            }
        }
    }
    None
}

/// A process rank that stops answering (SIGSTOP: alive, silent) ends the job within
/// `--comm-timeout`, with an error naming it, instead of a hang.
#[test]
fn a_hung_rank_ends_the_job_within_the_comm_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("hung");
    let mut args = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        "2".into(),
        "--".into(),
        env!("CARGO_BIN_EXE_zoo").into(),
    ];
    args.extend(quick(
        &run,
        &[
            "--steps",
            "100000",
            "--save-every",
            "0",
            "--comm-timeout",
            "4",
        ],
    ));
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = run.join("metrics.jsonl");
    wait_until(&mut launcher, "training", || {
        fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 1)
    });
    let marker = run.to_str().unwrap().to_string();
    let pid = rank_pid(1, &marker).expect("rank 1 is running");
    // SAFETY: stopping a child process of this test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let output = launcher.wait_with_output().unwrap();
    let elapsed = stopped.elapsed();
    let message = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("a stopped rank ended the job after {elapsed:.1?}");
    assert!(!output.status.success(), "{message}");
    assert!(
        message.contains("timed out") && message.contains("ranks [1]"),
        "{message}"
    );
    assert!(
        elapsed < Duration::from_secs(25),
        "took {elapsed:?}: {message}"
    );
}

/// A model whose weights alone exceed the memory (a config with a vocabulary of 10¹² tokens) is
/// refused by every command that would build it, with the estimate and the limit, before
/// anything is allocated or written.
#[test]
fn a_model_larger_than_memory_is_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let huge = |fixture_name: &str| {
        let to = dir.path().join(fixture_name);
        fs::create_dir_all(&to).unwrap();
        for entry in fs::read_dir(fixture(fixture_name)).unwrap() {
            let path = entry.unwrap().path();
            fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
        let config = to.join("config.json");
        let mut value: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&config).unwrap()).unwrap();
        value["vocab_size"] = serde_json::json!(1_000_000_000_000u64);
        fs::write(&config, value.to_string()).unwrap();
        to
    };
    let (gpt2, bert) = (huge("gpt2"), huge("bert_cls"));
    let train = dir.path().join("train.tsv");
    fs::write(&train, "sentence\tlabel\nhello world\t0\ngood bye\t1\n").unwrap();
    let out = dir.path().join("out");
    let (gpt2, bert, train, out) = (
        gpt2.to_str().unwrap(),
        bert.to_str().unwrap(),
        train.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let commands: [&[&str]; 6] = [
        &["forward", "--model", gpt2, "--ids", "1,2", "--out", out],
        &["generate", "--model", gpt2, "--prompt-ids", "1,2", "--ids"],
        &["convert", "--from", gpt2, "--out", out],
        &["pretrain", "--model", gpt2, "--out", out, "--no-progress"],
        &[
            "finetune",
            "--model",
            bert,
            "--train",
            train,
            "--num-labels",
            "2",
            "--batch",
            "2",
            "--out",
            out,
        ],
        &["memory", "--model", gpt2, "--seq", "8", "--json"],
    ];
    for command in commands {
        let started = Instant::now();
        let output = zoo(command);
        let message = text(&output);
        if command[0] == "memory" {
            // zoo memory only estimates: it says the model does not fit.
            assert!(output.status.success(), "{message}");
            assert!(message.contains("\"fits\":false"), "{message}");
            continue;
        }
        assert!(!output.status.success(), "{}: {message}", command[0]);
        assert!(
            message.contains("need") && message.contains("GB of memory available"),
            "{}: {message}",
            command[0]
        );
        assert!(!Path::new(out).exists(), "{}: wrote {out}", command[0]);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            command[0]
        );
    }
}

/// `--auto --batch 64 --mem 1GB` on a 12-block GPT, whose batch of 64 × 128 tokens does not fit
/// in one micro-batch: the chosen split fits (the measured peak of the whole process is under the
/// budget), is recorded in `trainer_state.json`, and trains to the bits of the same split set by
/// hand. When a micro-batch goes over the budget anyway (here the guard is lowered for the test),
/// the step is retried once with half the micro-batch, and the run equals that split set by hand;
/// when the smaller one is over too, the job stops with an out-of-memory error naming the budget.
#[test]
fn auto_chooses_settings_that_fit_and_retries_a_step_that_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gpt12.json");
    fs::write(
        &config,
        r#"{"model_type": "gpt2", "vocab_size": 257, "n_positions": 256, "n_embd": 256,
            "n_layer": 12, "n_head": 4}"#,
    )
    .unwrap();
    let run = |name: &str, extra: &[&str], guard: Option<&str>| {
        let out = dir.path().join(name);
        let mut args = vec![
            "pretrain",
            "--model",
            config.to_str().unwrap(),
            "--seq",
            "128",
            "--steps",
            "2",
            "--eval-every",
            "0",
            "--eval-batches",
            "1",
            "--sample-tokens",
            "0",
            "--no-progress",
            "--report-memory",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let mut command = Command::new(env!("CARGO_BIN_EXE_zoo"));
        command.args(&args);
        if let Some(guard) = guard {
            command.env("ZOO_TEST_AUTO_GUARD_BYTES", guard);
        }
        let output = command.output().unwrap();
        (out, output)
    };
    let auto = ["--auto", "--batch", "64", "--mem", "1GB"];
    let (chosen, output) = run("auto", &auto, None);
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    let line = printed.lines().find(|l| l.starts_with("auto:")).unwrap();
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let (micro, accum) = (numbers[0], numbers[1]);
    println!("{line}");
    assert_eq!(micro * accum, 64, "{line}");
    assert!(
        micro < 64,
        "the whole batch was not expected to fit: {line}"
    );
    let peak = reported(&printed, "MEASURED_PEAK_RSS_BYTES");
    assert!(peak < 1e9, "the process peaked at {peak} bytes: {printed}");
    let weights_of =
        |run: &Path| fs::read(run.join("checkpoints/step-0000002/model.safetensors")).unwrap();
    let state: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(chosen.join("checkpoints/step-0000002/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["auto"]["micro_batch"], micro);
    assert_eq!(state["auto"]["grad_accum"], accum);
    assert_eq!(state["auto"]["budget_bytes"], 1e9);

    let (micro_s, accum_s) = (micro.to_string(), accum.to_string());
    let (by_hand, output) = run(
        "hand",
        &["--batch", &micro_s, "--grad-accum", &accum_s],
        None,
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        weights_of(&chosen) == weights_of(&by_hand),
        "--auto differs from its split by hand"
    );

    // Between the heap peaks of micro-batches of 16 and 8 rows (0.66 and 0.43 GB).
    let (retried, output) = run("retried", &auto, Some("550000000"));
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("over the memory budget") && printed.contains("retrying"),
        "{printed}"
    );
    let (half, half_accum) = ((micro / 2).to_string(), (accum * 2).to_string());
    let (by_hand, output) = run(
        "hand-half",
        &["--batch", &half, "--grad-accum", &half_accum],
        None,
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        weights_of(&retried) == weights_of(&by_hand),
        "the retried run differs"
    );

    let (_, output) = run("never", &auto, Some("1"));
    let printed = text(&output);
    assert!(!output.status.success(), "{printed}");
    assert!(
        printed.contains("out of memory") && printed.contains("--auto's budget"),
        "{printed}"
    );
}
