//! `zoo finetune`: sequence classification with BERT or RoBERTa (`--task classify`, this file),
//! or fine-tuning a model that writes text (`--task seq2seq | causal-lm`, [`crate::finetune_lm`]).
//!
//! Data: GLUE-style TSV with a header (`sentence\tlabel`, or `sentence1\tsentence2\tlabel` for
//! pairs), CSV with a header (quoted fields), or JSONL objects; the label is an integer in
//! `0..num_labels`. Batches are padded to their longest row (dynamic padding); each epoch reads
//! the examples in an order drawn from the seed and the epoch. Evaluation after every epoch
//! (accuracy, F1: the positive class's with two labels, the macro average otherwise) keeps
//! `checkpoints/best` and `checkpoints/last`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use bmtrain_backend::comm::Communicator;
use bmtrain_backend::optim::LrSchedule;
use bmtrain_backend::trainer::ZeroSpec;
use bmtrain_backend::trainer::ZeroTrainer;
use bmtrain_backend::{BackendTask, DeviceSpec};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use checkpoints_convert::{TextTokenizer, ZooManifest, ZooWeightsReader, load_tokenizer};
use clap::Args;
use models::adapters::LoraSpec;
use models::bert::BertForSequenceClassification;
use models::gpt2::Gpt2ForSequenceClassification;
use models::llama::LlamaForSequenceClassification;
use models::roberta::RobertaForSequenceClassification;
use models::train::{
    ClassifierBatch, ClassifierSpec, Gpt2ClassifierSpec, InitScheme, LlamaClassifierSpec,
    TensorSource,
};
use models::{Architecture, Head, ModelConfig};
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::run::{
    CheckpointFiles, Cut, MemoryArgs, Progress, RunArgs, RunLock, RunOutputs, StepSplit,
    TrainSetup, any_rank_interrupted, mean_over_ranks, prepared, resume_trainer, run_ranks,
    save_checkpoint,
};
use bmtrain_backend::trainer::QuantizedBase;

/// What `zoo finetune` trains the model to do.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sequence classification (BERT, RoBERTa) from labelled TSV / CSV / JSONL.
    Classify,
    /// Input → target text (T5, mT5, FLAN-T5, CPM-2) from JSONL or TSV.
    Seq2seq,
    /// Prompt → completion, or plain text (GPT-2, GPT-3 sizes, CPM-1) from JSONL.
    CausalLm,
}

impl Task {
    /// The name `--task` takes.
    pub fn name(self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::Seq2seq => "seq2seq",
            Task::CausalLm => "causal-lm",
        }
    }
}

/// The learning-rate schedule after warmup.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Linear decay to 0 at the last step.
    Linear,
    /// Cosine decay to 0 at the last step.
    Cosine,
    /// Constant.
    Constant,
}

impl Schedule {
    /// The learning rate at step `step` of `total`, for peak `lr` after `warmup` steps.
    pub fn lr(self, lr: f32, step: u64, warmup: u64, total: u64) -> f32 {
        let schedule = match self {
            Schedule::Linear => LrSchedule::Linear,
            Schedule::Cosine => LrSchedule::Cosine,
            Schedule::Constant => LrSchedule::Constant,
        };
        schedule.lr(lr, step, warmup, total)
    }
}

/// `zoo finetune` arguments.
#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    /// A model directory (HF or zoo): BERT or RoBERTa for `classify` (any of their classes: the
    /// encoder is kept and a classification head is added when it has none), a
    /// T5ForConditionalGeneration for `seq2seq`, a GPT2LMHeadModel for `causal-lm`.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// What to train the model to do.
    #[arg(long, value_enum, default_value_t = Task::Classify)]
    pub task: Task,
    /// Training examples: .tsv, .csv or .jsonl (`classify`); .jsonl or .tsv (`seq2seq`); .jsonl
    /// (`causal-lm`).
    #[arg(long, value_name = "FILE")]
    pub train: PathBuf,
    /// Evaluation examples (same formats).
    #[arg(long, value_name = "FILE")]
    pub valid: Option<PathBuf>,
    /// Number of classes (`classify`).
    #[arg(long)]
    num_labels: Option<usize>,
    /// Column of the text (default: sentence, sentence1, text or question, whichever exists).
    #[arg(long)]
    text_column: Option<String>,
    /// Column of the second text of a pair (default: sentence2 when it exists).
    #[arg(long)]
    pair_column: Option<String>,
    /// Column of the label.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Longest input in tokens (`causal-lm`: prompt and completion together); longer examples
    /// are truncated (and counted in the log).
    #[arg(long, default_value_t = 128)]
    pub max_seq: usize,
    /// Longest target in tokens (`seq2seq`).
    #[arg(long, default_value_t = 128)]
    pub max_target_seq: usize,
    /// Passes over the training set.
    #[arg(long, default_value_t = 3)]
    pub epochs: u64,
    /// Examples per micro-batch, over all ranks.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (after the warmup).
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f32,
    /// The learning rate after the warmup.
    #[arg(long, value_enum, default_value_t = Schedule::Linear)]
    pub schedule: Schedule,
    /// Share of the steps spent warming up (linearly).
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// AdamW β2 (β1 0.9 and ε 1e-8, as torch's defaults).
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f32,
    /// Clip gradients to this global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Dropout everywhere (default: the model's config).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Seed of the new head's weights, the example order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `seq2seq`: tokens a greedy answer may have in the exact-match evaluation (0: no
    /// generation, loss only).
    #[arg(long, default_value_t = 32)]
    pub eval_max_new_tokens: usize,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

impl FinetuneArgs {
    /// `--num-labels` (checked present for `classify` before anything reads it).
    fn labels(&self) -> usize {
        self.num_labels.unwrap_or(2)
    }
}

/// A BERT or RoBERTa directory's weights as the classifier names them: a base model's
/// (`BertModel`, `RobertaModel`) names gain the encoder's prefix.
struct ClassifierWeights {
    reader: ZooWeightsReader,
    /// `bert.` / `roberta.` for a base model's directory.
    base_prefix: Option<&'static str>,
}

impl ClassifierWeights {
    /// The directory's key of the classifier's tensor `name`.
    fn key<'a>(&self, name: &'a str) -> Option<&'a str> {
        match self.base_prefix {
            Some(prefix) => name.strip_prefix(prefix),
            None => Some(name),
        }
    }
}

impl TensorSource for ClassifierWeights {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.reader.shape(self.key(name)?)
    }

    fn read(&self, name: &str) -> Option<Result<TensorData, String>> {
        TensorSource::read(&self.reader, self.key(name)?)
    }
}

/// One tokenised example.
#[derive(Debug, Clone)]
struct Example {
    ids: Vec<u32>,
    types: Vec<u32>,
    label: usize,
}

struct Job {
    /// The LoRA adapters trained (`--lora-r`), recorded in the manifest as `zoo_lora`.
    lora: Option<LoraSpec>,
    args: FinetuneArgs,
    run_dir: PathBuf,
    /// The run directory's lock, held until the job ends.
    _lock: Option<RunLock>,
    architecture: Architecture,
    /// The classifier's config (labels, padding id and dropout set).
    config: ModelConfig,
    manifest: ZooManifest,
    tokenizer_json: Option<String>,
    /// The directory's weights under the classifier's zoo names (missing ones start fresh),
    /// read when the shards are built.
    initial: ClassifierWeights,
    train: Vec<Example>,
    valid: Vec<Example>,
    pad_id: u32,
    resume: Option<PathBuf>,
    /// What `--auto` chose (`args.batch` and `args.grad_accum` hold its split).
    auto: Option<crate::memory::AutoPlan>,
}

#[derive(Debug)]
struct Summary {
    steps: u64,
    best_accuracy: Option<f32>,
    last_eval: Option<Evaluation>,
    interrupted: bool,
}

/// Accuracy and F1 of one evaluation.
#[derive(Debug, Clone, Copy)]
struct Evaluation {
    loss: f32,
    accuracy: f32,
    f1: f32,
}

/// What the classification loop needs of a cut beyond [`ZeroSpec`]: the logits of a batch run
/// through the trainer's segments on the inference backend.
trait Classifies<AB: AutodiffBackend>: ZeroSpec<AB, Batch = ClassifierBatch<AB>> + Sized {
    fn eval_logits(
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        batch: &ClassifierBatch<AB::InnerBackend>,
    ) -> Result<Tensor<AB::InnerBackend, 2>, bmtrain_backend::comm::CommError>;
}

impl<AB: AutodiffBackend> Classifies<AB> for ClassifierSpec {
    fn eval_logits(
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        batch: &ClassifierBatch<AB::InnerBackend>,
    ) -> Result<Tensor<AB::InnerBackend, 2>, bmtrain_backend::comm::CommError> {
        trainer.infer(batch, |_, head, _, hidden| head.logits(hidden))
    }
}

/// The decoder classifiers (GPT-2's, the Llama family's) read the score at the last real token.
macro_rules! last_token_classifies {
    ($spec:ty) => {
        impl<AB: AutodiffBackend> Classifies<AB> for $spec {
            fn eval_logits(
                trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
                batch: &ClassifierBatch<AB::InnerBackend>,
            ) -> Result<Tensor<AB::InnerBackend, 2>, bmtrain_backend::comm::CommError> {
                trainer.infer(batch, |spec, head, _, hidden| {
                    spec.logits(head, hidden, batch)
                })
            }
        }
    };
}

last_token_classifies!(Gpt2ClassifierSpec);
last_token_classifies!(LlamaClassifierSpec);

/// Runs `zoo finetune`.
pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    if args.task != Task::Classify {
        return crate::finetune_lm::run(args);
    }
    let _ = crate::run::interrupted();
    let job = Arc::new(prepare(args)?);
    let summary = job
        .args
        .memory
        .device
        .run(FinetuneTask { job: job.clone() })??;
    if !crate::run::is_lead_process() {
        if summary.interrupted {
            std::process::exit(130);
        }
        return Ok(());
    }
    let last = summary
        .last_eval
        .map(|e| {
            format!(
                ", last evaluation: accuracy {:.4}, F1 {:.4}, loss {:.4}",
                e.accuracy, e.f1, e.loss
            )
        })
        .unwrap_or_default();
    println!(
        "finetune: {} steps{last}{}; run directory {}",
        summary.steps,
        summary
            .best_accuracy
            .map(|a| format!(", best accuracy {a:.4}"))
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
    let labels = args
        .num_labels
        .context("--task classify needs --num-labels")?;
    ensure!(labels >= 2, "--num-labels must be at least 2");
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
    let family = spec.architecture.family();
    let architecture =
        Architecture::for_head(family, &spec.config, Head::Classify).with_context(|| {
            format!(
                "{}: a {} — zoo finetune --task classify classifies with BERT, RoBERTa, GPT-2 or \
                 the Llama family",
                args.model.display(),
                spec.architecture.hf_name()
            )
        })?;
    let mut config = spec.config.clone();
    config.set_num_labels(args.labels());
    if let Some(p) = args.dropout {
        config = config.with_dropout(p);
    }
    // BERT and RoBERTa name their padding id. GPT-2 and Llama configs rarely do: transformers'
    // fine-tuning recipes pad with end-of-text, and the score is read at the last token that
    // is not it.
    let pad_id = match &config {
        ModelConfig::Bert(c) => c.pad_token_id.unwrap_or(0) as u32,
        _ => {
            let pad = config
                .pad_token_id()
                .or_else(|| config.eos_token_ids().first().copied())
                .with_context(|| {
                    format!(
                        "{}: {} classification needs pad_token_id or eos_token_id in \
                         config.json (the score is read at each row's last non-padding token)",
                        args.model.display(),
                        family.model_type()
                    )
                })?;
            config.set_pad_token_id(pad);
            pad
        }
    };
    // A model this machine cannot hold is refused now, before anything is read.
    args.memory.check_fits(
        architecture,
        &config,
        args.max_seq,
        args.batch,
        &args.model.display().to_string(),
    )?;
    // Checked now (every key and shape, from the headers), read segment by segment in training.
    let reader = spec.open_for_training(Default::default())?;
    // Base-model names gain the encoder's prefix; heads of other tasks are not read.
    let initial = ClassifierWeights {
        reader,
        base_prefix: spec.architecture.is_base().then_some(family.body_prefix()),
    };

    let tokenizer = load_tokenizer(&args.model)?
        .with_context(|| format!("{}: no tokenizer files", args.model.display()))?;
    let max_seq = args
        .max_seq
        .min(config.max_positions(family).unwrap_or(usize::MAX));
    let read = |path: &Path| read_examples(path, &args, &tokenizer, max_seq);
    let train = read(&args.train)?;
    let valid = match &args.valid {
        Some(path) => read(path)?,
        None => Vec::new(),
    };
    let global_batch = if args.memory.auto {
        args.batch
    } else {
        args.batch * args.grad_accum
    };
    ensure!(
        train.len() >= global_batch,
        "{}: {} examples, fewer than one step's batch of {global_batch} (--batch × --grad-accum)",
        args.train.display(),
        train.len(),
    );

    let mut hf_config = spec.hf_config.clone();
    hf_config["architectures"] = json!([architecture.hf_name()]);
    hf_config["num_labels"] = json!(args.labels());
    if !matches!(config, ModelConfig::Bert(_)) {
        hf_config["pad_token_id"] = json!(pad_id);
    }
    hf_config["id2label"] = json!(
        (0..args.labels())
            .map(|i| (i.to_string(), format!("LABEL_{i}")))
            .collect::<BTreeMap<_, _>>()
    );
    hf_config["label2id"] = json!(
        (0..args.labels())
            .map(|i| (format!("LABEL_{i}"), i))
            .collect::<BTreeMap<_, _>>()
    );
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
    // --auto: the memory settings for a step of --batch examples.
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
        let longest = train.iter().map(|e| e.ids.len()).max().unwrap_or(1);
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
        architecture,
        config,
        manifest,
        tokenizer_json,
        initial,
        train,
        valid,
        pad_id,
        resume,
        auto,
    })
}

/// Reads labelled examples from a TSV, CSV or JSONL file; errors name the file and line.
fn read_examples(
    path: &Path,
    args: &FinetuneArgs,
    tokenizer: &TextTokenizer,
    max_seq: usize,
) -> anyhow::Result<Vec<Example>> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Rows as (line number, field map).
    let mut rows: Vec<(usize, BTreeMap<String, String>)> = Vec::new();
    match extension.as_str() {
        "tsv" | "csv" => {
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(if extension == "tsv" { b'\t' } else { b',' })
                .quoting(extension == "csv")
                .flexible(true)
                .from_reader(text.as_bytes());
            let header: Vec<String> = reader
                .headers()
                .with_context(|| format!("{}: reading the header", path.display()))?
                .iter()
                .map(str::to_string)
                .collect();
            for record in reader.records() {
                let record =
                    record.with_context(|| format!("{}: malformed row", path.display()))?;
                let line = record.position().map_or(0, |p| p.line() as usize);
                let fields = header
                    .iter()
                    .zip(record.iter())
                    .map(|(h, v)| (h.clone(), v.to_string()))
                    .collect();
                rows.push((line, fields));
            }
        }
        "jsonl" | "json" => {
            for (number, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not JSON", path.display(), number + 1))?;
                let object = value.as_object().with_context(|| {
                    format!("{}:{}: not a JSON object", path.display(), number + 1)
                })?;
                let fields = object
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), v)
                    })
                    .collect();
                rows.push((number + 1, fields));
            }
        }
        _ => bail!(
            "{}: unknown format (zoo finetune reads .tsv, .csv and .jsonl)",
            path.display()
        ),
    }
    ensure!(!rows.is_empty(), "{}: no examples", path.display());
    let columns: Vec<&String> = rows[0].1.keys().collect();
    let text_column = match &args.text_column {
        Some(c) => c.clone(),
        None => ["sentence", "sentence1", "text", "question"]
            .into_iter()
            .find(|c| rows.iter().any(|(_, r)| r.contains_key(*c)))
            .with_context(|| {
                format!(
                    "{}: no text column (sentence, sentence1, text or question; columns are \
                     {columns:?}); name it with --text-column",
                    path.display()
                )
            })?
            .to_string(),
    };
    let pair_column = args.pair_column.clone().or_else(|| {
        rows.iter()
            .any(|(_, r)| r.contains_key("sentence2"))
            .then(|| "sentence2".to_string())
    });
    let hf = tokenizer.as_hf();
    let mut truncated = 0;
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in &rows {
        let at = || format!("{}:{line}", path.display());
        let label_text = row
            .get(&args.label_column)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{}: no label (column '{}')", at(), args.label_column))?;
        let label: usize = label_text.parse().map_err(|_| {
            anyhow::anyhow!(
                "{}: label '{label_text}' is not a class index 0..{}",
                at(),
                args.labels() - 1
            )
        })?;
        ensure!(
            label < args.labels(),
            "{}: label {label} is outside --num-labels {} (0..{})",
            at(),
            args.labels(),
            args.labels() - 1
        );
        let first = row
            .get(&text_column)
            .with_context(|| format!("{}: no text (column '{text_column}')", at()))?;
        let (mut ids, mut types) = match (&pair_column, hf) {
            (Some(column), Some(hf)) => {
                let second = row
                    .get(column)
                    .with_context(|| format!("{}: no second text (column '{column}')", at()))?;
                let encoding = hf
                    .encode((first.as_str(), second.as_str()), true)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
                (
                    encoding.get_ids().to_vec(),
                    encoding.get_type_ids().to_vec(),
                )
            }
            (Some(_), None) => bail!("sentence pairs need a tokenizer.json tokenizer"),
            (None, _) => {
                let ids = tokenizer.encode(first, true)?;
                let types = vec![0; ids.len()];
                (ids, types)
            }
        };
        if ids.len() > max_seq {
            // Keep the final special token ([SEP] / </s>) after the cut.
            let last = *ids.last().expect("non-empty");
            ids.truncate(max_seq - 1);
            ids.push(last);
            types.truncate(max_seq);
            truncated += 1;
        }
        out.push(Example { ids, types, label });
    }
    if truncated > 0 {
        eprintln!(
            "{}: {truncated} of {} examples truncated to --max-seq {max_seq} tokens",
            path.display(),
            out.len()
        );
    }
    Ok(out)
}

struct FinetuneTask {
    job: Arc<Job>,
}

impl BackendTask for FinetuneTask {
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

/// A padded batch of examples.
fn batch_of<B: Backend>(
    job: &Job,
    examples: &[&Example],
    device: &B::Device,
) -> ClassifierBatch<B> {
    let width = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let n = examples.len();
    let mut ids = Vec::with_capacity(n * width);
    let mut mask = Vec::with_capacity(n * width);
    let mut types = Vec::with_capacity(n * width);
    for e in examples {
        for t in 0..width {
            let real = t < e.ids.len();
            ids.push(if real { e.ids[t] } else { job.pad_id } as i64);
            mask.push(i64::from(real));
            types.push(if real { e.types[t] as i64 } else { 0 });
        }
    }
    let labels: Vec<i64> = examples.iter().map(|e| e.label as i64).collect();
    let tensor = |values: Vec<i64>| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(values, [n, width]), device)
    };
    ClassifierBatch {
        input_ids: tensor(ids),
        attention_mask: tensor(mask),
        token_type_ids: Some(tensor(types)),
        labels: Tensor::from_data(TensorData::new(labels, [n]), device),
    }
}

/// The example order of an epoch, from the seed.
pub(crate) fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order
}

/// Accuracy, F1 and loss on the validation set, run through the trainer's segments (one
/// gathered at a time, on the inference backend: no dropout). Each chunk of `--batch` examples
/// is shared between the ranks; a rank whose share is empty runs one padding row it then
/// ignores, since every rank joins every gather. The confusion counts and the loss are summed
/// over the ranks, so all ranks return the same evaluation.
fn evaluate<AB: AutodiffBackend, S: Classifies<AB>>(
    job: &Job,
    trainer: &ZeroTrainer<AB, S, Box<dyn Communicator>>,
    device: &AB::Device,
) -> anyhow::Result<Option<Evaluation>> {
    if job.valid.is_empty() {
        return Ok(None);
    }
    let (rank, world) = (trainer.comm().rank(), trainer.comm().world_size());
    let k = job.args.labels();
    // k × k confusion counts (true label, predicted), then the summed loss.
    let mut totals = vec![0.0f32; k * k + 1];
    for chunk in job.valid.chunks(job.args.batch) {
        let share = chunk.len() * rank / world..chunk.len() * (rank + 1) / world;
        let mine: Vec<&Example> = match chunk[share].iter().collect::<Vec<_>>() {
            rows if rows.is_empty() => vec![&chunk[0]],
            rows => rows,
        };
        let real = chunk.len() * (rank + 1) / world - chunk.len() * rank / world;
        let batch = batch_of::<AB::InnerBackend>(job, &mine, device);
        let labels = batch.labels.clone();
        let logits = S::eval_logits(trainer, &batch)?;
        if real == 0 {
            continue;
        }
        let batch_loss: f32 = models::bert::cross_entropy(logits.clone(), labels)
            .into_scalar()
            .elem();
        totals[k * k] += batch_loss * real as f32;
        let predicted: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("int data");
        for (e, p) in mine.iter().zip(predicted) {
            totals[e.label * k + p as usize] += 1.0;
        }
    }
    trainer
        .comm()
        .all_reduce(&mut totals, bmtrain_backend::comm::ReduceOp::Sum)?;
    let confusion = |actual: usize, predicted: usize| totals[actual * k + predicted] as usize;
    let total = job.valid.len().max(1) as f32;
    let correct: usize = (0..k).map(|c| confusion(c, c)).sum();
    let f1_of = |c: usize| {
        let tp = confusion(c, c) as f32;
        let predicted: usize = (0..k).map(|r| confusion(r, c)).sum();
        let actual: usize = (0..k).map(|p| confusion(c, p)).sum();
        if predicted + actual == 0 {
            0.0
        } else {
            2.0 * tp / (predicted + actual) as f32
        }
    };
    let f1 = if k == 2 {
        f1_of(1)
    } else {
        (0..k).map(f1_of).sum::<f32>() / k as f32
    };
    Ok(Some(Evaluation {
        loss: totals[k * k] / total,
        accuracy: correct as f32 / total,
        f1,
    }))
}

use burn::tensor::ElementConversion;

/// One rank's job: the classifier's cut, then the step loop.
fn train<AB: AutodiffBackend>(
    comm: Box<dyn Communicator>,
    device: AB::Device,
    job: &Job,
) -> anyhow::Result<Summary> {
    match (&job.config, job.architecture) {
        (ModelConfig::Bert(config), Architecture::RobertaForSequenceClassification) => {
            let (model, quantized) = prepared(
                RobertaForSequenceClassification::<AB>::new(config, &device)?,
                job.lora.as_ref(),
                &job.args.memory.freezing,
                &device,
            )?;
            let cut = ClassifierSpec::split_roberta(model);
            train_loop(comm, device, job, cut, InitScheme::Bert, quantized)
        }
        (ModelConfig::Bert(config), _) => {
            let (model, quantized) = prepared(
                BertForSequenceClassification::<AB>::new(config, &device)?,
                job.lora.as_ref(),
                &job.args.memory.freezing,
                &device,
            )?;
            let cut = ClassifierSpec::split_bert(model, config);
            train_loop(comm, device, job, cut, InitScheme::Bert, quantized)
        }
        (ModelConfig::Gpt2(config), _) => {
            let (model, quantized) = prepared(
                Gpt2ForSequenceClassification::<AB>::new(config, &device)?,
                job.lora.as_ref(),
                &job.args.memory.freezing,
                &device,
            )?;
            let cut = Gpt2ClassifierSpec::split(model);
            let init = InitScheme::Gpt2 {
                n_layer: config.n_layer,
            };
            train_loop(comm, device, job, cut, init, quantized)
        }
        (ModelConfig::Llama(config), _) => {
            let (model, quantized) = prepared(
                LlamaForSequenceClassification::<AB>::new(config, &device)?,
                job.lora.as_ref(),
                &job.args.memory.freezing,
                &device,
            )?;
            let cut = LlamaClassifierSpec::split(model);
            let init = InitScheme::Normal {
                std: config.initializer_range,
            };
            train_loop(comm, device, job, cut, init, quantized)
        }
        (ModelConfig::T5(_), _) => unreachable!("T5 has no classification class"),
    }
}

/// One rank's classification loop, top to bottom.
fn train_loop<AB: AutodiffBackend, S: Classifies<AB>>(
    comm: Box<dyn Communicator>,
    device: AB::Device,
    job: &Job,
    cut: Cut<AB, S>,
    init: InitScheme,
    quantized: Option<QuantizedBase>,
) -> anyhow::Result<Summary> {
    let args = &job.args;
    let rank = comm.rank();
    let world = comm.world_size();
    let lead = rank == 0;
    // What the setup freed (tokenising, reading) goes back first: the baseline is what is live.
    crate::alloc::release_free_memory();
    let baseline = crate::run::proc_status_bytes("VmRSS:");

    // The classifier, one segment at a time: every tensor the directory has, the family's
    // initialisation from the seed for the rest (a new head). The model is never whole in memory.
    let setup = TrainSetup {
        beta2: args.beta2,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        tensors: Some(&job.initial),
        strict: false,
        init,
        seed: args.seed,
        source: job.args.model.display().to_string(),
        quantized,
    };
    let mut trainer = setup.build(cut, comm, device.clone(), &args.memory)?;

    // A step reads `global` examples of the epoch's order, however they are split.
    let global = args.batch * args.grad_accum;
    let steps_per_epoch = (job.train.len() / global) as u64;
    let total_steps = steps_per_epoch * args.epochs;
    let warmup = (total_steps as f64 * args.warmup_ratio).round() as u64;
    let mut best: Option<f32> = None;
    let mut start = 0;
    if let Some(checkpoint) = &job.resume {
        let (step, state) = resume_trainer(&mut trainer, checkpoint, &job.manifest)?;
        start = step;
        best = state["best_accuracy"].as_f64().map(|b| b as f32);
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
        let mut state =
            json!({ "step": step, "seed": args.seed, "job": "finetune", "best_accuracy": best });
        if let Some(auto) = auto {
            state["auto"] = auto;
        }
        state
    };

    // The split of a step's batch: --batch × --grad-accum, or --auto's (which may halve it).
    let mut split = StepSplit::new(args.batch, args.grad_accum, job.auto, &args.memory)?;
    let progress = Progress::new(total_steps, start, lead, !args.run.no_progress);
    let mut last_eval = None;
    let mut interrupted = false;
    let mut window = (0.0f32, 0u64, Instant::now(), 0usize);
    let mut step = start;
    while step < total_steps {
        let epoch = step / steps_per_epoch;
        let order = epoch_order(args.seed, epoch, job.train.len());
        let lr = args.schedule.lr(args.lr, step, warmup, total_steps);
        let first = (step % steps_per_epoch) as usize * global;
        let step_examples: Vec<&Example> = order[first..first + global]
            .iter()
            .map(|&i| &job.train[i])
            .collect();
        window.3 += step_examples.iter().map(|e| e.ids.len()).sum::<usize>();
        let loss = split.accumulate(&mut trainer, step, &progress, |micro_batch, micro| {
            let rows = micro_batch / world;
            let examples = &step_examples[micro * micro_batch..(micro + 1) * micro_batch];
            batch_of::<AB>(job, &examples[rank * rows..(rank + 1) * rows], &device)
        })?;
        let report = trainer.step(lr)?;
        let loss = mean_over_ranks(trainer.comm().as_ref(), loss)?;
        step += 1;
        window.0 += loss;
        window.1 += 1;
        let tokens_per_s = window.3 as f64 / window.2.elapsed().as_secs_f64().max(1e-9);
        progress.update(
            step,
            format!(
                "epoch {} loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s",
                epoch + 1
            ),
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
        if step % steps_per_epoch == 0 || stop {
            if step % steps_per_epoch == 0 {
                last_eval = evaluate(job, &trainer, &device)?;
                if let Some(e) = last_eval {
                    progress.println(&format!(
                        "epoch {}  validation accuracy {:.4}  F1 {:.4}  loss {:.4}",
                        epoch + 1,
                        e.accuracy,
                        e.f1,
                        e.loss
                    ));
                    outputs.log(
                        step,
                        json!({
                            "epoch": epoch + 1, "valid_loss": e.loss, "accuracy": e.accuracy,
                            "f1": e.f1,
                        }),
                    )?;
                }
                // Every rank has the same evaluation (its counts are summed over the ranks).
                if let Some(accuracy) = last_eval.map(|e| e.accuracy)
                    && best.is_none_or(|b| accuracy > b)
                {
                    best = Some(accuracy);
                    save_checkpoint(
                        &trainer,
                        &outputs.checkpoints.join("best"),
                        &outputs.files,
                        &state(step, best, split.record()),
                    )?;
                }
            }
            save_checkpoint(
                &trainer,
                &outputs.checkpoints.join("last"),
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
    let steps_peak = crate::run::proc_status_bytes("VmHWM:");
    progress.finish();
    if args.run.report_memory && lead {
        crate::run::report_memory(
            baseline,
            steps_peak,
            steps_peak,
            split.gpu_run_peak(&mut trainer),
        );
    }
    Ok(Summary {
        steps: trainer.steps(),
        best_accuracy: best,
        last_eval,
        interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use proptest::prelude::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    fn fixture_tokenizer() -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bert_cls");
        load_tokenizer(&dir).unwrap().unwrap()
    }

    /// Good files of each format, for the property test to damage.
    const GOOD: [(&str, &str); 3] = [
        (
            "tsv",
            "sentence1\tsentence2\tlabel\nhello there\tgood bye\t1\n\"quoted\ttab\tfield\t0\n",
        ),
        (
            "csv",
            "text,label\n\"a, quoted, text\",0\nplain text,1\n\"unterminated,1\n",
        ),
        (
            "jsonl",
            "{\"sentence\": \"hello\", \"label\": 1}\n{\"sentence\": \"bye\", \"label\": 0}\n",
        ),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Any bytes in a TSV, CSV or JSONL file, and any damage to good ones (bytes replaced,
        /// inserted, the file cut), read as examples or give an error naming the file: never a
        /// panic, and no example longer than --max-seq.
        #[test]
        fn example_files_of_any_bytes_read_or_name_the_file(
            format in 0..3usize,
            noise in proptest::collection::vec(any::<u8>(), 0..200),
            at in 0..400usize,
            replace in any::<bool>(),
            cut in 0..400usize,
            max_seq in 2..16usize,
        ) {
            let (extension, good) = GOOD[format];
            let mut bytes = good.as_bytes().to_vec();
            if noise.len() > 150 {
                bytes = noise.clone();
            } else {
                let at = at % (bytes.len() + 1);
                if replace {
                    let end = (at + noise.len()).min(bytes.len());
                    bytes.splice(at..end, noise.iter().copied());
                } else {
                    bytes.splice(at..at, noise.iter().copied());
                }
                if cut % 3 == 0 {
                    bytes.truncate(cut / 3 % (bytes.len() + 1));
                }
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("examples.{extension}"));
            std::fs::write(&path, &bytes).unwrap();
            let cli = Cli::parse_from([
                "finetune", "--model", "m", "--train", "t", "--num-labels", "2",
            ]);
            match read_examples(&path, &cli.args, &fixture_tokenizer(), max_seq) {
                Ok(examples) => {
                    for example in examples {
                        prop_assert!(example.ids.len() <= max_seq);
                        prop_assert!(example.label < 2);
                    }
                }
                Err(error) => {
                    let message = format!("{error:#}");
                    prop_assert!(message.contains("examples."), "{}", message);
                }
            }
        }
    }
}
