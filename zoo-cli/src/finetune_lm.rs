//! `zoo finetune --task seq2seq | causal-lm`: fine-tune a model that writes text.
//!
//! - `seq2seq`: a `T5ForConditionalGeneration` (T5, mT5, FLAN-T5, CPM-2) from JSONL
//!   `{"input": …, "target": …}` or a TSV with an `input\ttarget` header; both sides encoded with
//!   the tokenizer's special tokens (T5's appends `</s>`), the loss on the target tokens.
//!   Evaluation: validation loss, and the exact match of greedy generation
//!   (`--eval-max-new-tokens`) against the target.
//! - `causal-lm`: a `GPT2LMHeadModel` (GPT-2, GPT-3 sizes, CPM-1) from JSONL
//!   `{"prompt": …, "completion": …}` (encoded apart without special tokens and joined; the
//!   prompt's labels are -100; an end-of-text token ends the completion) or `{"text": …}` (all
//!   scored). Rows are right-padded and the padding is not scored.
//!
//! Each epoch reads the examples in an order drawn from the seed and the epoch; a step of
//! `--batch × --grad-accum` examples reads the same examples however it is split. After every
//! epoch: `checkpoints/best` (lowest validation loss) and `checkpoints/last`, model directories
//! that `zoo generate`, `zoo forward` and `zoo convert --to-hf` read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, ensure};
use bmtrain_backend::comm::Communicator;
use bmtrain_backend::trainer::{ZeroSpec, ZeroTrainer};
use bmtrain_backend::{BackendTask, DeviceSpec};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use checkpoints_convert::{
    DirKind, ModelSpec, TextTokenizer, ZooManifest, ZooWeightsReader, load_tokenizer,
};
use models::adapters::LoraSpec;
use models::generation::GenerationConfig;
use models::gpt2::{Gpt2LmHeadModel, IGNORE_INDEX};
use models::llama::LlamaForCausalLM;
use models::t5::zero::{Seq2SeqBatch, T5Spec};
use models::t5::{T5ForConditionalGeneration, generate_seq2seq, shift_right};
use models::train::{Gpt2Spec, InitScheme, LlamaSpec, LmBatch, TensorSource};
use models::{AnyModel, Architecture, Head, ModelConfig};
use serde_json::{Value, json};

use crate::finetune::{FinetuneArgs, Task, epoch_order};
use crate::run::{
    CheckpointFiles, Cut, Progress, RunLock, RunOutputs, StepSplit, TrainSetup,
    any_rank_interrupted, mean_over_ranks, on_lead_model, prepared, resume_trainer, run_ranks,
    save_checkpoint,
};
use bmtrain_backend::trainer::QuantizedBase;

/// One tokenised example: the source (seq2seq input, or the causal prompt) and the target
/// (seq2seq target, or the completion and its end-of-text).
#[derive(Debug, Clone)]
struct Pair {
    source: Vec<u32>,
    target: Vec<u32>,
}

struct Job {
    /// The LoRA adapters trained (`--lora-r`), recorded in the manifest as `zoo_lora`.
    lora: Option<LoraSpec>,
    args: FinetuneArgs,
    run_dir: PathBuf,
    _lock: Option<RunLock>,
    /// The model's config (dropout applied).
    config: ModelConfig,
    /// The class trained: the family's seq2seq or causal LM.
    architecture: Architecture,
    manifest: ZooManifest,
    tokenizer_json: Option<String>,
    /// The directory's weights by zoo name, read when the shards are built.
    initial: ZooWeightsReader,
    train: Vec<Pair>,
    valid: Vec<Pair>,
    pad: u32,
    eos: Option<u32>,
    /// T5's first decoder input.
    decoder_start: u32,
    resume: Option<PathBuf>,
    /// What `--auto` chose (`args.batch` and `args.grad_accum` hold its split).
    auto: Option<crate::memory::AutoPlan>,
}

#[derive(Debug)]
struct Summary {
    steps: u64,
    best_loss: Option<f32>,
    last: Option<Evaluation>,
    interrupted: bool,
}

/// One evaluation: the validation loss, and (seq2seq) the share of exact greedy answers.
#[derive(Debug, Clone, Copy)]
struct Evaluation {
    loss: f32,
    exact_match: Option<f32>,
}

/// Runs `zoo finetune --task seq2seq|causal-lm`.
pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let _ = crate::run::interrupted();
    let job = Arc::new(prepare(args)?);
    let summary = job
        .args
        .memory
        .device
        .run(WriterTask { job: job.clone() })??;
    if !crate::run::is_lead_process() {
        if summary.interrupted {
            std::process::exit(130);
        }
        return Ok(());
    }
    let last = summary
        .last
        .map(|e| {
            format!(
                ", last validation loss {:.4}{}",
                e.loss,
                e.exact_match
                    .map(|m| format!(", exact match {m:.4}"))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
    println!(
        "finetune: {} steps{last}{}; run directory {}",
        summary.steps,
        summary
            .best_loss
            .map(|l| format!(", best validation loss {l:.4}"))
            .unwrap_or_default(),
        job.run_dir.display()
    );
    if summary.interrupted {
        eprintln!(
            "interrupted: resume with the same command and --resume {}",
            job.run_dir.display()
        );
        std::process::exit(130);
    }
    Ok(())
}

fn prepare(mut args: FinetuneArgs) -> anyhow::Result<Job> {
    ensure!(
        args.batch >= 1 && args.grad_accum >= 1,
        "--batch and --grad-accum must be at least 1"
    );
    let ranks = args.memory.ranks.max(crate::run::world_size_from_env());
    ensure!(
        args.batch.is_multiple_of(ranks),
        "--batch {} does not split over {ranks} ranks",
        args.batch
    );
    let mut spec = checkpoints_convert::read_spec(&args.model)?;
    // Checked now (every key and shape, from the headers); this also settles a head the config
    // leaves open (transformers 5 writes every T5 as tied and keeps v1.1's own lm_head).
    let initial = spec.open_for_training(Default::default())?;
    let family = spec.architecture.family();
    let head = match args.task {
        Task::Seq2seq => Head::Seq2seq,
        _ => Head::CausalLm,
    };
    let architecture = Architecture::for_head(family, &spec.config, head)
        .filter(|&a| a == spec.architecture)
        .with_context(|| {
            format!(
                "{}: a {} — --task {} needs {}",
                args.model.display(),
                spec.architecture.hf_name(),
                args.task.name(),
                match head {
                    Head::Seq2seq => "a T5ForConditionalGeneration (T5, mT5, FLAN-T5, CPM-2)",
                    _ =>
                        "a causal LM: GPT2LMHeadModel (GPT-2, the GPT-3 sizes, CPM-1), \
                          LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM",
                }
            )
        })?;
    let config = match args.dropout {
        Some(p) => spec.config.clone().with_dropout(p),
        None => spec.config.clone(),
    };
    args.memory.check_fits(
        architecture,
        &config,
        args.max_seq,
        args.batch,
        &args.model.display().to_string(),
    )?;
    let tokenizer = load_tokenizer(&args.model)?
        .with_context(|| format!("{}: no tokenizer files", args.model.display()))?;
    // Seq2seq: T5's padding id also starts the decoder. Causal: right padding is masked, so the
    // pad id only has to be a real id.
    let eos = config.end_of_text(|token| tokenizer.token_to_id(token));
    let (pad, decoder_start) = match &config {
        ModelConfig::T5(c) => {
            let pad = c.pad_token_id.unwrap_or(0);
            (pad, c.decoder_start_token_id.unwrap_or(pad))
        }
        _ => (config.pad_token_id().or(eos).unwrap_or(0), 0),
    };
    if let Some(context) = config.max_positions(family) {
        ensure!(
            args.max_seq <= context,
            "--max-seq {}: the model's context is {context} positions",
            args.max_seq,
        );
    }
    let read = |path: &Path| read_pairs(path, args.task, &tokenizer, eos, &args);
    let train = read(&args.train)?;
    let valid = match &args.valid {
        Some(path) => read(path)?,
        None => Vec::new(),
    };
    let global = if args.memory.auto {
        args.batch
    } else {
        args.batch * args.grad_accum
    };
    ensure!(
        train.len() >= global,
        "{}: {} examples, fewer than one step's batch of {global} (--batch × --grad-accum)",
        args.train.display(),
        train.len(),
    );
    let mut hf_config = spec.hf_config.clone();
    hf_config["architectures"] = json!([architecture.hf_name()]);
    let lora = args.memory.freezing.lora(family)?;
    if let Some(lora) = &lora {
        hf_config["zoo_lora"] = serde_json::to_value(lora)?;
    }
    // A QLoRA checkpoint holds no base layers: its manifest says so (see --quantize-base).
    if let Some(format) = args.memory.freezing.quantize_format()? {
        hf_config[checkpoints_convert::QLORA_KEY] = format.name().into();
    }
    let manifest = ZooManifest {
        format: "zoo".into(),
        format_version: 1,
        architecture: architecture.hf_name().into(),
        hf_config,
    };
    let (run_dir, lock) = args.run.open_run_dir("finetune")?;
    let resume = args.run.resume_checkpoint()?;
    // --auto: the memory settings for a step of --batch examples, planned for the longest row.
    let auto = if args.memory.auto {
        ensure!(
            args.grad_accum == 1,
            "--auto chooses the micro-batch and --grad-accum itself: give the global batch of a \
             step with --batch"
        );
        let state = match &resume {
            Some(checkpoint) => Some(crate::run::trainer_state(checkpoint)?),
            None => None,
        };
        let longest = train
            .iter()
            .map(|p| p.source.len() + p.target.len())
            .max()
            .unwrap_or(1);
        let plan =
            args.memory
                .apply_auto(architecture, &config, longest, args.batch, state.as_ref())?;
        (args.batch, args.grad_accum) = (plan.micro_batch, plan.grad_accum);
        Some(plan)
    } else {
        None
    };
    let tokenizer_json = tokenizer.as_hf().and_then(|t| t.to_string(false).ok());
    Ok(Job {
        lora,
        args,
        run_dir,
        _lock: lock,
        config,
        architecture,
        manifest,
        tokenizer_json,
        initial,
        train,
        valid,
        pad,
        eos,
        decoder_start,
        resume,
        auto,
    })
}

/// The two texts of one line: seq2seq's `input` / `target`, or causal-LM's `prompt` /
/// `completion` (a `text` alone is a completion without prompt).
fn fields_of(task: Task, get: impl Fn(&str) -> Option<String>) -> Result<(String, String), String> {
    match task {
        Task::Seq2seq => match (get("input"), get("target")) {
            (Some(input), Some(target)) => Ok((input, target)),
            (None, _) => Err("no \"input\"".into()),
            (_, None) => Err("no \"target\"".into()),
        },
        _ => match (get("prompt"), get("completion"), get("text")) {
            (Some(prompt), Some(completion), _) => Ok((prompt, completion)),
            (None, None, Some(text)) => Ok((String::new(), text)),
            (Some(_), None, _) => Err("a \"prompt\" without \"completion\"".into()),
            _ => Err("no \"completion\" (with a \"prompt\") or \"text\"".into()),
        },
    }
}

/// Reads and tokenises the examples of `path` (JSONL, or TSV with a header); errors name the
/// file and line. Sources and targets longer than `--max-seq` / `--max-target-seq` (causal: the
/// joined row longer than `--max-seq`) are cut, and counted in the log.
fn read_pairs(
    path: &Path,
    task: Task,
    tokenizer: &TextTokenizer,
    eos: Option<u32>,
    args: &FinetuneArgs,
) -> anyhow::Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the examples {}", path.display()))?;
    let tsv = path.extension().is_some_and(|e| e == "tsv");
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let header: Vec<String> = match tsv {
        true => lines
            .next()
            .map(|(_, h)| h.split('\t').map(|c| c.trim().to_string()).collect())
            .with_context(|| format!("{}: empty", path.display()))?,
        false => Vec::new(),
    };
    let (mut pairs, mut cut) = (Vec::new(), 0usize);
    for (number, line) in lines {
        let at = || format!("{}:{}", path.display(), number + 1);
        let fields = if tsv {
            let cells: Vec<&str> = line.split('\t').collect();
            fields_of(task, |name| {
                let column = header.iter().position(|h| h == name)?;
                cells.get(column).map(|c| c.to_string())
            })
        } else {
            let value: Value =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            fields_of(task, |name| value.get(name)?.as_str().map(str::to_string))
        };
        let (source, target) = fields.map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        ensure!(!target.trim().is_empty(), "{}: empty target", at());
        let pair = match task {
            Task::Seq2seq => {
                let mut source = tokenizer.encode(&source, true)?;
                let mut target = tokenizer.encode(&target, true)?;
                let long = source.len() > args.max_seq || target.len() > args.max_target_seq;
                cut += usize::from(long);
                source.truncate(args.max_seq);
                target.truncate(args.max_target_seq);
                Pair { source, target }
            }
            _ => {
                let prompt = tokenizer.encode(&source, false)?;
                let mut target = tokenizer.encode(&target, false)?;
                target.extend(eos);
                let room = args.max_seq.saturating_sub(prompt.len());
                ensure!(
                    room > 0,
                    "{}: the prompt's {} tokens leave no room in --max-seq {}",
                    at(),
                    prompt.len(),
                    args.max_seq
                );
                cut += usize::from(target.len() > room);
                target.truncate(room);
                Pair {
                    source: prompt,
                    target,
                }
            }
        };
        ensure!(!pair.target.is_empty(), "{}: empty target", at());
        pairs.push(pair);
    }
    ensure!(!pairs.is_empty(), "{}: no examples", path.display());
    if cut > 0 && crate::run::is_lead_process() {
        eprintln!(
            "{}: {cut} of {} examples cut to --max-seq {} / --max-target-seq {}",
            path.display(),
            pairs.len(),
            args.max_seq,
            args.max_target_seq
        );
    }
    Ok(pairs)
}

struct WriterTask {
    job: Arc<Job>,
}

impl BackendTask for WriterTask {
    type Output = anyhow::Result<Summary>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let job = self.job;
        let ranks = job.args.memory.ranks;
        let spec: DeviceSpec = job.args.memory.device;
        let timeout = std::time::Duration::from_secs(job.args.memory.comm_timeout);
        run_ranks(ranks, &spec, timeout, move |comm| {
            train::<Autodiff<B>>(comm, device.clone(), &job)
        })
    }
}

/// `rows` of `width` ids from `row(i)`, right-padded with `pad`.
fn padded<B: Backend>(
    rows: usize,
    width: usize,
    pad: i64,
    row: impl Fn(usize) -> Vec<i64>,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut flat = Vec::with_capacity(rows * width);
    for i in 0..rows {
        let values = row(i);
        flat.extend(
            values
                .iter()
                .copied()
                .chain(std::iter::repeat(pad))
                .take(width),
        );
    }
    Tensor::from_data(TensorData::new(flat, [rows, width]), device)
}

/// A seq2seq micro-batch: sources padded and masked, targets as labels (-100 padding), the
/// decoder input the labels shifted right.
fn seq2seq_batch<B: Backend>(job: &Job, pairs: &[&Pair], device: &B::Device) -> Seq2SeqBatch<B> {
    let n = pairs.len();
    let src = pairs
        .iter()
        .map(|p| p.source.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let tgt = pairs.iter().map(|p| p.target.len()).max().unwrap_or(1);
    let ids = |v: &[u32]| v.iter().map(|&t| i64::from(t)).collect::<Vec<_>>();
    let input_ids = padded::<B>(
        n,
        src,
        i64::from(job.pad),
        |i| ids(&pairs[i].source),
        device,
    );
    let attention_mask = padded::<B>(n, src, 0, |i| vec![1; pairs[i].source.len()], device);
    let labels = padded::<B>(n, tgt, IGNORE_INDEX, |i| ids(&pairs[i].target), device);
    Seq2SeqBatch {
        input_ids,
        attention_mask: Some(attention_mask),
        decoder_input_ids: shift_right(labels.clone(), job.decoder_start, job.pad),
        labels,
    }
}

/// A causal-LM micro-batch: prompt then completion, right-padded; only the completion scored.
fn causal_batch<B: Backend>(job: &Job, pairs: &[&Pair], device: &B::Device) -> LmBatch<B> {
    let n = pairs.len();
    let width = pairs
        .iter()
        .map(|p| p.source.len() + p.target.len())
        .max()
        .unwrap_or(1);
    let joined = |p: &Pair| {
        p.source
            .iter()
            .chain(&p.target)
            .map(|&t| i64::from(t))
            .collect::<Vec<_>>()
    };
    let scored = |p: &Pair| {
        std::iter::repeat_n(IGNORE_INDEX, p.source.len())
            .chain(p.target.iter().map(|&t| i64::from(t)))
            .collect::<Vec<_>>()
    };
    LmBatch {
        input_ids: padded::<B>(n, width, i64::from(job.pad), |i| joined(pairs[i]), device),
        labels: Some(padded::<B>(
            n,
            width,
            IGNORE_INDEX,
            |i| scored(pairs[i]),
            device,
        )),
    }
}

/// What the step loop needs of a task's cut beyond [`ZeroSpec`]: its micro-batch of examples
/// and their loss on the inference backend.
trait WritingTask<AB: AutodiffBackend>: ZeroSpec<AB> + Sized {
    fn batch(job: &Job, pairs: &[&Pair], device: &AB::Device) -> Self::Batch;

    fn eval_loss(
        job: &Job,
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        pairs: &[&Pair],
        device: &AB::Device,
    ) -> anyhow::Result<f32>;
}

impl<AB: AutodiffBackend> WritingTask<AB> for T5Spec {
    fn batch(job: &Job, pairs: &[&Pair], device: &AB::Device) -> Seq2SeqBatch<AB> {
        seq2seq_batch::<AB>(job, pairs, device)
    }

    fn eval_loss(
        job: &Job,
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        pairs: &[&Pair],
        device: &AB::Device,
    ) -> anyhow::Result<f32> {
        let batch = seq2seq_batch::<AB::InnerBackend>(job, pairs, device);
        Ok(trainer.infer_loss(&batch)?)
    }
}

/// A causal LM's examples (GPT-2's and the Llama family's cuts take the same batch).
macro_rules! causal_writing {
    ($spec:ty) => {
        impl<AB: AutodiffBackend> WritingTask<AB> for $spec {
            fn batch(job: &Job, pairs: &[&Pair], device: &AB::Device) -> LmBatch<AB> {
                causal_batch::<AB>(job, pairs, device)
            }

            fn eval_loss(
                job: &Job,
                trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
                pairs: &[&Pair],
                device: &AB::Device,
            ) -> anyhow::Result<f32> {
                let batch = causal_batch::<AB::InnerBackend>(job, pairs, device);
                Ok(trainer.infer_loss(&batch)?)
            }
        }
    };
}

causal_writing!(Gpt2Spec);
causal_writing!(LlamaSpec);

/// The validation loss (each chunk of `--batch` examples shared by the ranks, the chunk means
/// averaged), and for seq2seq the exact match of greedy answers (on rank 0, from the assembled
/// model; the other ranks get `None`).
fn evaluate<AB: AutodiffBackend, S: WritingTask<AB>>(
    job: &Job,
    trainer: &ZeroTrainer<AB, S, Box<dyn Communicator>>,
    device: &AB::Device,
) -> anyhow::Result<Option<Evaluation>> {
    if job.valid.is_empty() {
        return Ok(None);
    }
    let (rank, world) = (trainer.comm().rank(), trainer.comm().world_size());
    let (mut total, mut chunks) = (0.0f32, 0usize);
    for chunk in job.valid.chunks(job.args.batch) {
        // Every rank joins every gather; one whose share is empty reruns a row and ignores it.
        let share = chunk.len() * rank / world..chunk.len() * (rank + 1) / world;
        let mine: Vec<&Pair> = match chunk[share.clone()].iter().collect::<Vec<_>>() {
            rows if rows.is_empty() => vec![&chunk[0]],
            rows => rows,
        };
        let loss = S::eval_loss(job, trainer, &mine, device)?;
        let mut weighted = [loss * share.len() as f32, share.len() as f32];
        trainer
            .comm()
            .all_reduce(&mut weighted, bmtrain_backend::comm::ReduceOp::Sum)?;
        total += weighted[0] / weighted[1].max(1.0);
        chunks += 1;
    }
    let loss = total / chunks.max(1) as f32;
    let exact_match = match job.architecture.head() {
        Head::Seq2seq if job.args.eval_max_new_tokens > 0 => {
            on_lead_model(trainer, &model_spec(job), device, |model| {
                let AnyModel::T5ForConditionalGeneration(model) = model else {
                    unreachable!("built as a T5ForConditionalGeneration")
                };
                exact_matches(job, &model, device)
            })?
        }
        _ => None,
    };
    Ok(Some(Evaluation { loss, exact_match }))
}

/// The share of validation examples whose greedy answer is the target (up to its end-of-text).
fn exact_matches<B: Backend>(
    job: &Job,
    model: &T5ForConditionalGeneration<B>,
    device: &B::Device,
) -> anyhow::Result<f32> {
    let eos: Vec<u32> = job.eos.into_iter().collect();
    let config = GenerationConfig::greedy(job.args.eval_max_new_tokens, eos.clone(), job.pad);
    let mut right = 0;
    for chunk in job.valid.chunks(job.args.batch.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|p| p.source.clone()).collect();
        let generated = generate_seq2seq(model, &prompts, &config, job.pad, device, |_| {})?;
        for (row, pair) in chunk.iter().enumerate() {
            let strip = |ids: &[u32]| -> Vec<u32> {
                ids.iter().copied().filter(|id| !eos.contains(id)).collect()
            };
            right += usize::from(strip(&generated.new_tokens(row, &eos)) == strip(&pair.target));
        }
    }
    Ok(right as f32 / job.valid.len() as f32)
}

/// What the trainer's parameters assemble into (for generation on rank 0).
fn model_spec(job: &Job) -> ModelSpec {
    ModelSpec {
        kind: DirKind::Zoo,
        dir: job.run_dir.clone(),
        architecture: job.architecture,
        config: job.config.clone(),
        hf_config: job.manifest.hf_config.clone(),
    }
}

/// One rank's job: the model's cut, then the step loop.
fn train<AB: AutodiffBackend>(
    comm: Box<dyn Communicator>,
    device: AB::Device,
    job: &Job,
) -> anyhow::Result<Summary> {
    match &job.config {
        ModelConfig::T5(config) => {
            let (model, quantized) = prepared(
                T5ForConditionalGeneration::<AB>::new(config, &device)?,
                job.lora.as_ref(),
                &job.args.memory.freezing,
                &device,
            )?;
            let cut = T5Spec::split(model)?;
            let init = InitScheme::T5 {
                d_model: config.d_model,
                d_kv: config.d_kv,
                heads: config.num_heads,
                d_ff: config.d_ff,
            };
            train_loop(comm, device, job, cut, init, quantized)
        }
        ModelConfig::Gpt2(config) => {
            let (model, quantized) = prepared(
                Gpt2LmHeadModel::<AB>::new(config, &device)?,
                job.lora.as_ref(),
                &job.args.memory.freezing,
                &device,
            )?;
            let cut = Gpt2Spec::split(model);
            let init = InitScheme::Gpt2 {
                n_layer: config.n_layer,
            };
            train_loop(comm, device, job, cut, init, quantized)
        }
        ModelConfig::Llama(config) => {
            let (model, quantized) = prepared(
                LlamaForCausalLM::<AB>::new(config, &device)?,
                job.lora.as_ref(),
                &job.args.memory.freezing,
                &device,
            )?;
            let cut = LlamaSpec::split(model);
            let init = InitScheme::Normal {
                std: config.initializer_range,
            };
            train_loop(comm, device, job, cut, init, quantized)
        }
        ModelConfig::Bert(_) => unreachable!("prepare picks a seq2seq or causal LM"),
    }
}

/// One rank's fine-tuning loop, top to bottom.
fn train_loop<AB: AutodiffBackend, S: WritingTask<AB>>(
    comm: Box<dyn Communicator>,
    device: AB::Device,
    job: &Job,
    cut: Cut<AB, S>,
    init: InitScheme,
    quantized: Option<QuantizedBase>,
) -> anyhow::Result<Summary> {
    let args = &job.args;
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    crate::alloc::release_free_memory();
    let baseline = crate::run::proc_status_bytes("VmRSS:");

    // The model, one segment at a time from the directory (which has every tensor).
    let setup = TrainSetup {
        beta2: args.beta2,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        tensors: Some(&job.initial as &dyn TensorSource),
        strict: false,
        init,
        seed: args.seed,
        source: args.model.display().to_string(),
        quantized,
    };
    let mut trainer = setup.build(cut, comm, device.clone(), &args.memory)?;

    let global = args.batch * args.grad_accum;
    let steps_per_epoch = (job.train.len() / global) as u64;
    let total_steps = steps_per_epoch * args.epochs;
    let warmup = (total_steps as f64 * args.warmup_ratio).round() as u64;
    let mut best: Option<f32> = None;
    let mut start = 0;
    if let Some(checkpoint) = &job.resume {
        let (step, state) = resume_trainer(&mut trainer, checkpoint, &job.manifest)?;
        start = step;
        best = state["best_valid_loss"].as_f64().map(|b| b as f32);
    }
    let files = CheckpointFiles {
        manifest: job.manifest.clone(),
        tokenizer_json: job.tokenizer_json.clone(),
        lora_base: job
            .lora
            .as_ref()
            .map(|_| job.args.model.display().to_string()),
    };
    let outputs = RunOutputs::open(
        &job.run_dir,
        lead,
        job.resume.as_ref().map(|_| start),
        files,
    )?;
    let state = |step: u64, best: Option<f32>, auto: Option<Value>| {
        let mut state = json!({
            "step": step, "seed": args.seed, "job": "finetune", "task": args.task.name(),
            "best_valid_loss": best,
        });
        if let Some(auto) = auto {
            state["auto"] = auto;
        }
        state
    };

    // The split of a step's batch: --batch × --grad-accum, or --auto's (which may halve it).
    let mut split = StepSplit::new(args.batch, args.grad_accum, job.auto, &args.memory)?;
    let progress = Progress::new(total_steps, start, lead, !args.run.no_progress);
    let mut last = None;
    let mut interrupted = false;
    let mut steps_peak = None;
    let mut window = (0.0f32, 0u64, Instant::now(), 0usize);
    let mut step = start;
    while step < total_steps {
        let epoch = step / steps_per_epoch;
        let order = epoch_order(args.seed, epoch, job.train.len());
        let lr = args.schedule.lr(args.lr, step, warmup, total_steps);
        let first = (step % steps_per_epoch) as usize * global;
        let examples: Vec<&Pair> = order[first..first + global]
            .iter()
            .map(|&i| &job.train[i])
            .collect();
        window.3 += examples
            .iter()
            .map(|p| p.source.len() + p.target.len())
            .sum::<usize>();
        let loss = split.accumulate(&mut trainer, step, &progress, |micro_batch, micro| {
            let rows = micro_batch / world;
            let micro = &examples[micro * micro_batch..(micro + 1) * micro_batch];
            S::batch(job, &micro[rank * rows..(rank + 1) * rows], &device)
        })?;
        let report = trainer.step(lr)?;
        let loss = mean_over_ranks(trainer.comm().as_ref(), loss)?;
        step += 1;
        window.0 += loss;
        window.1 += 1;
        let tokens_per_s = window.3 as f64 / window.2.elapsed().as_secs_f64().max(1e-9);
        progress.update(
            step,
            format!("epoch {} loss {loss:.4} lr {lr:.2e}", epoch + 1),
        );
        if step % args.run.log_every == 0 || step == total_steps {
            let mean = window.0 / window.1 as f32;
            let gpu = split.memory_fields(&mut trainer);
            outputs.log(
                step,
                crate::run::merged(
                    json!({
                        "epoch": epoch + 1, "loss": mean, "lr": lr, "tokens_per_s": tokens_per_s,
                        "grad_norm": report.grad_norm, "applied": report.applied,
                    }),
                    gpu,
                ),
            )?;
            progress.println(&format!(
                "step {step:>6}  epoch {}  loss {mean:.4}  lr {lr:.2e}  {tokens_per_s:.0} tokens/s",
                epoch + 1
            ));
            window = (0.0, 0, Instant::now(), 0);
        }
        let stop = any_rank_interrupted(trainer.comm().as_ref())?;
        if step == total_steps || stop {
            // The steps' peak (with earlier epochs' evaluations and saves), before the last ones.
            steps_peak = crate::run::proc_status_bytes("VmHWM:");
        }
        if step % steps_per_epoch == 0 {
            last = evaluate(job, &trainer, &device)?;
            if let Some(e) = last {
                let exact = e
                    .exact_match
                    .map(|m| format!("  exact match {m:.4}"))
                    .unwrap_or_default();
                progress.println(&format!(
                    "epoch {}  validation loss {:.4}{exact}",
                    epoch + 1,
                    e.loss
                ));
                let mut record = json!({ "epoch": epoch + 1, "valid_loss": e.loss });
                if let Some(m) = e.exact_match {
                    record["exact_match"] = json!(m);
                }
                outputs.log(step, record)?;
            }
            // Every rank has the same validation loss (summed over the ranks).
            if let Some(loss) = last.map(|e| e.loss)
                && best.is_none_or(|b| loss < b)
            {
                best = Some(loss);
                let dir = outputs.checkpoints.join("best");
                save_checkpoint(
                    &trainer,
                    &dir,
                    &outputs.files,
                    &state(step, best, split.record()),
                )?;
            }
        }
        if step % steps_per_epoch == 0 || stop {
            let dir = outputs.checkpoints.join("last");
            save_checkpoint(
                &trainer,
                &dir,
                &outputs.files,
                &state(step, best, split.record()),
            )?;
        }
        if stop {
            interrupted = true;
            progress.println(&format!("interrupted at step {step}: checkpoint saved"));
            break;
        }
    }
    progress.finish();
    if args.run.report_memory && lead {
        let final_peak = crate::run::proc_status_bytes("VmHWM:");
        crate::run::report_memory(
            baseline,
            steps_peak.or(final_peak),
            final_peak,
            split.gpu_run_peak(&mut trainer),
        );
    }
    Ok(Summary {
        steps: trainer.steps(),
        best_loss: best,
        last,
        interrupted,
    })
}
