//! `zoo pretrain`: train a model on a corpus with its family's objective: a GPT (GPT-2, GPT-3
//! sizes, CPM-1) with the causal-LM loss, a BERT / RoBERTa with masked LM
//! (`models::bert::mlm_mask`), a T5 (v1.0 / v1.1, mT5, FLAN-T5, CPM-2) with span corruption
//! (`models::t5::random_noise_spans`).
//!
//! Without `--model` and `--data` it trains a tiny GPT on the corpus shipped in the repository
//! (chapters of *Around the World in Eighty Days*) with a byte-level tokenizer, about a minute on
//! two CPU cores, and prints a sample.
//!
//! Data: plain text, JSONL with a `text` field (one document per line), or token files
//! ([`crate::tokens`]). Text is tokenised once into `RUN_DIR/data/*.bin` (reused on resume).
//! Training samples random fixed-length windows; which windows a step reads depends only on the
//! seed and the step, so `--resume` continues exactly where the run stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use bmtrain_backend::comm::Communicator;
use bmtrain_backend::optim::LrSchedule;
use bmtrain_backend::trainer::{ZeroSpec, ZeroTrainer};
use bmtrain_backend::{BackendTask, DeviceSpec};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use checkpoints_convert::{
    DirKind, LoadOptions, ModelSpec, TextTokenizer, ZooManifest, ZooWeightsReader, load_tokenizer,
};
use clap::{Args, ValueEnum};
use models::adapters::LoraSpec;
use models::bert::{BertConfig, BertForMaskedLM, mlm_mask, whole_word_mask};
use models::generation::{Decoding, GenerationConfig, TokenIds};
use models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use models::llama::LlamaForCausalLM;
use models::roberta::RobertaForMaskedLM;
use models::t5::zero::{Seq2SeqBatch, T5Spec};
use models::t5::{
    T5Config, T5ForConditionalGeneration, random_noise_spans, shift_right, span_corrupt,
};
use models::train::{Gpt2Spec, InitScheme, LlamaSpec, LmBatch, MlmBatch, MlmSpec, TensorSource};
use models::{AnyModel, Architecture, Family, Head, ModelConfig};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::run::{
    CheckpointFiles, Cut, MemoryArgs, Progress, RunArgs, RunLock, RunOutputs, StepSplit,
    TrainSetup, any_rank_interrupted, mean_over_ranks, on_lead_model, prepared, resume_trainer,
    run_ranks, save_checkpoint,
};
use crate::tokens::{TokenFile, TokenWidth, write_token_file};
use bmtrain_backend::trainer::QuantizedBase;

/// The corpus shipped with zoo (public domain; see `zoo-cli/corpus/README.md`).
const SHIPPED_CORPUS: &str = include_str!("../corpus/around-the-world-in-80-days.txt");

/// `zoo pretrain` arguments.
#[derive(Args, Debug, Clone)]
pub struct PretrainArgs {
    /// A preset (`zoo list`), an HF `config.json` (random weights), or a model directory (its
    /// weights and tokenizer). Default: a tiny GPT (4 blocks of 128) for the shipped corpus.
    #[arg(long, value_name = "PRESET|CONFIG|DIR")]
    model: Option<String>,
    /// Training data: text, JSONL (`text` field), or token files (.bin: zoo/llm.c, nanoGPT,
    /// Megatron with its .idx); repeat to concatenate. Default: the shipped corpus.
    #[arg(long, value_name = "PATH")]
    data: Vec<PathBuf>,
    /// Validation data (same formats). Default: the last --valid-fraction of the training tokens.
    #[arg(long, value_name = "PATH")]
    valid: Option<PathBuf>,
    /// Share of the training tokens held out for validation when there is no --valid.
    #[arg(long, default_value_t = 0.1)]
    valid_fraction: f64,
    /// Tokenizer (a directory or a tokenizer.json) when the model has none. Default: bytes.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Width of a headerless (nanoGPT) token file.
    #[arg(long, value_enum, default_value_t = TokenWidth::U16)]
    token_dtype: TokenWidth,
    /// Tokens per training window (default: the context, at most 256; 64 for the tiny GPT).
    #[arg(long)]
    seq: Option<usize>,
    /// Windows per micro-batch, over all ranks.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Optimizer steps in all (a resumed run continues up to it). The default takes the tiny GPT
    /// to about 1.9 nats per byte on the shipped corpus in about a minute on two cores.
    #[arg(long, default_value_t = 1500)]
    steps: u64,
    /// Peak learning rate (after warmup; cosine decay to --min-lr-ratio × it).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Final learning rate as a share of --lr.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f32,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.99)]
    beta2: f32,
    /// Clip gradients to this global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Dropout in every layer (transformers' resid/embd/attn_pdrop).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Validation micro-batches per evaluation.
    #[arg(long, default_value_t = 4)]
    eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end or on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Step checkpoints to keep (the newest).
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Seed of the initial weights, the windows and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The objective; the model's family decides it (GPT: causal, BERT/RoBERTa: mlm, T5: span),
    /// and a different one is an error naming both.
    #[arg(long, value_enum)]
    objective: Option<Objective>,
    /// Masked LM (BERT, RoBERTa): share of the tokens chosen (80% masked, 10% random, 10% kept).
    #[arg(long, default_value_t = 0.15)]
    mlm_probability: f64,
    /// Masked LM with a WordPiece tokenizer: choose whole words (a token and its `##` pieces),
    /// as transformers' `DataCollatorForWholeWordMask`.
    #[arg(long)]
    whole_word_mask: bool,
    /// Span corruption (T5): share of each window's tokens hidden behind sentinels.
    #[arg(long, default_value_t = 0.15)]
    noise_density: f64,
    /// Span corruption (T5): mean length of a hidden span.
    #[arg(long, default_value_t = 3.0)]
    mean_span: f64,
    /// Tokens to sample at the end (0: none; causal LMs).
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// Prompt of the sample (default: the start of the validation data).
    #[arg(long)]
    sample_prompt: Option<String>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// Everything the ranks share, prepared once.
struct Job {
    /// The LoRA adapters trained (`--lora-r`), recorded in the manifest as `zoo_lora`.
    lora: Option<LoraSpec>,
    args: PretrainArgs,
    run_dir: PathBuf,
    /// The run directory's lock, held until the job ends.
    _lock: Option<RunLock>,
    model: Pretrained,
    /// The sentinels and special ids of span corruption (T5).
    span: Option<SpanIds>,
    /// The special ids of masked LM (BERT, RoBERTa).
    mlm: Option<MlmIds>,
    manifest: ZooManifest,
    tokenizer_json: Option<String>,
    /// Weights of a model directory (zoo names, read when the shards are built), or `None` for a
    /// fresh GPT-2 initialisation.
    initial: Option<ZooWeightsReader>,
    train: Split,
    valid: Split,
    seq: usize,
    resume: Option<PathBuf>,
    /// What `--auto` chose (`args.batch` and `args.grad_accum` hold its split).
    auto: Option<crate::memory::AutoPlan>,
    sample_prompt: Vec<u32>,
    /// Only for decoding the sample.
    tokenizer: Option<Arc<TextTokenizer>>,
}

/// The model being pretrained: its config and the family's pretraining class, whose head
/// decides the objective.
#[derive(Debug, Clone)]
struct Pretrained {
    config: ModelConfig,
    architecture: Architecture,
}

impl Pretrained {
    /// The family's pretraining class: its causal LM, else its masked LM, else its seq2seq LM.
    fn new(config: ModelConfig, family: Family) -> anyhow::Result<Self> {
        let architecture = [Head::CausalLm, Head::MaskedLm, Head::Seq2seq]
            .into_iter()
            .find_map(|head| Architecture::for_head(family, &config, head))
            .with_context(|| format!("zoo pretrain has no objective for a {family:?} model"))?;
        Ok(Self {
            config,
            architecture,
        })
    }

    /// The objective of the class's head.
    fn objective(&self) -> Objective {
        match self.architecture.head() {
            Head::MaskedLm => Objective::Mlm,
            Head::Seq2seq => Objective::Span,
            _ => Objective::Causal,
        }
    }

    /// Positions a window may have (`None`: relative or rotary positions, no table).
    fn context(&self) -> Option<usize> {
        self.config.max_positions(self.architecture.family())
    }
}

/// The ids span corruption writes: one sentinel per hidden span (and one after the last), the
/// end of text, and the decoder's start and padding.
#[derive(Debug, Clone)]
struct SpanIds {
    sentinels: Vec<u32>,
    eos: Option<u32>,
    decoder_start: u32,
    pad: u32,
}

/// The ids masked LM writes: the mask, and the specials that frame each window (`[CLS]` /
/// `<s>` and `[SEP]` / `</s>`, when the tokenizer has them), which are never chosen.
#[derive(Debug, Clone)]
struct MlmIds {
    mask: u32,
    first: Option<u32>,
    last: Option<u32>,
    /// With `--whole-word-mask`: by id, whether the token continues a word (`##…`).
    continues: Option<Vec<bool>>,
}

/// `--objective`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Objective {
    /// Next-token prediction (GPT-2, the GPT-3 sizes, CPM-1).
    Causal,
    /// Masked LM (BERT, RoBERTa).
    Mlm,
    /// T5's span corruption (T5, mT5, FLAN-T5, CPM-2).
    Span,
}

/// A token range of a token file.
#[derive(Clone)]
struct Split {
    file: Arc<TokenFile>,
    start: usize,
    end: usize,
}

impl Split {
    /// All of a file's tokens.
    fn whole(file: Arc<TokenFile>) -> Self {
        Self {
            start: 0,
            end: file.len(),
            file,
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// What `zoo pretrain` prints at the end.
#[derive(Debug)]
struct Summary {
    first_loss: f32,
    last_loss: f32,
    valid_loss: Option<f32>,
    steps: u64,
    interrupted: bool,
    sample: Option<String>,
    checkpoint: Option<PathBuf>,
}

/// Runs `zoo pretrain`.
pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let interrupted = crate::run::interrupted();
    let _ = interrupted; // installs the handlers before any work
    let job = Arc::new(prepare(args)?);
    let device = job.args.memory.device;
    let summary = device.run(PretrainTask { job: job.clone() })??;
    if !crate::run::is_lead_process() {
        if summary.interrupted {
            std::process::exit(130);
        }
        return Ok(());
    }
    if let Some(sample) = &summary.sample {
        println!("--- sample ---\n{sample}\n--------------");
    }
    println!(
        "pretrain: {} steps, loss {:.4} → {:.4}{}; run directory {}{}",
        summary.steps,
        summary.first_loss,
        summary.last_loss,
        summary
            .valid_loss
            .map(|v| format!(", validation loss {v:.4} (perplexity {:.2})", v.exp()))
            .unwrap_or_default(),
        job.run_dir.display(),
        summary
            .checkpoint
            .as_ref()
            .map(|c| format!(", checkpoint {}", c.display()))
            .unwrap_or_default()
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

/// The tiny GPT of the shipped corpus: 4 blocks of 128, 4 heads, 128 positions, 257 byte ids.
fn tiny_config() -> Gpt2Config {
    let mut config = Gpt2Config::new();
    (config.vocab_size, config.n_positions, config.n_embd) = (257, 128, 128);
    (config.n_layer, config.n_head) = (4, 4);
    config.bos_token_id = Some(256);
    config.eos_token_id = Some(TokenIds::One(256));
    config
}

/// Resolves the model, tokenizer and data, and tokenises text into the run directory.
fn prepare(mut args: PretrainArgs) -> anyhow::Result<Job> {
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.grad_accum >= 1, "--grad-accum must be at least 1");
    ensure!(args.steps >= 1, "--steps must be at least 1");
    let ranks = args.memory.ranks.max(crate::run::world_size_from_env());
    ensure!(
        args.batch.is_multiple_of(ranks),
        "--batch {} does not split over {ranks} ranks",
        args.batch
    );
    // The model.
    let (config, family, directory, model_tokenizer) = match &args.model {
        None => (ModelConfig::Gpt2(tiny_config()), Family::Gpt2, None, None),
        Some(name) => resolve_model(name)?,
    };
    let mut model = Pretrained::new(config, family)?;
    let objective = model.objective();
    if let Some(asked) = args.objective
        && asked != objective
    {
        bail!(
            "--objective {}: a {} trains with --objective {} (zoo pretrain's objective is the \
             family's)",
            asked.to_possible_value().expect("named").get_name(),
            model.architecture.hf_name(),
            objective.to_possible_value().expect("named").get_name()
        );
    }
    ensure!(
        !args.whole_word_mask || objective == Objective::Mlm,
        "--whole-word-mask is for masked LM (BERT, RoBERTa)"
    );
    model.config = model.config.with_dropout(args.dropout);
    model.config.validate()?;
    let default_seq = if args.model.is_none() {
        64
    } else {
        model.context().unwrap_or(256).min(256)
    };
    let seq = args.seq.unwrap_or(default_seq);
    // A model this machine cannot hold is refused now, before the data or the model is touched.
    args.memory.check_fits(
        model.architecture,
        &model.config,
        seq,
        args.batch,
        args.model.as_deref().unwrap_or("the default model"),
    )?;
    // A directory's weights: checked now (every key and shape, from the headers), read segment
    // by segment when training starts.
    let initial = match directory {
        Some(mut spec) => {
            let reader = spec.open_for_training(LoadOptions::default().format)?;
            // Reading the headers settles a head the config leaves open (transformers 5 writes
            // every T5 as tied and keeps v1.1's own lm_head): train the model the weights hold.
            if spec.config.tie_word_embeddings() != model.config.tie_word_embeddings() {
                model.config = spec.config.clone().with_dropout(args.dropout);
            }
            Some(reader)
        }
        None => None,
    };
    let (run_dir, lock) = args.run.open_run_dir("pretrain")?;
    let resume = args.run.resume_checkpoint()?;
    // --auto: the memory settings for a step of --batch rows.
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
        let plan = args.memory.apply_auto(
            model.architecture,
            &model.config,
            seq,
            args.batch,
            state.as_ref(),
        )?;
        (args.batch, args.grad_accum) = (plan.micro_batch, plan.grad_accum);
        Some(plan)
    } else {
        None
    };

    // The tokenizer: the model's, --tokenizer, or bytes.
    let tokenizer = match (&args.tokenizer, model_tokenizer) {
        (Some(path), _) => Some(open_tokenizer(path)?),
        (None, Some(t)) => Some(t),
        (None, None) => None,
    }
    .unwrap_or_else(|| {
        TextTokenizer::Hf(Box::new(
            checkpoints_convert::tokenizer::byte_level_tokenizer(),
        ))
    });
    let tokenizer = Arc::new(tokenizer);
    let tokenizer_json = tokenizer.as_hf().and_then(|t| t.to_string(false).ok());
    let eos = model
        .config
        .end_of_text(|token| tokenizer.token_to_id(token));

    // The data.
    let data_dir = run_dir.join("data");
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let sources: Vec<Source> = if args.data.is_empty() {
        vec![Source::Shipped]
    } else {
        args.data.iter().cloned().map(Source::File).collect()
    };
    let load = |sources: &[Source], name: &str| {
        load_tokens(
            sources,
            &data_dir.join(name),
            &tokenizer,
            tokenizer_json.as_deref(),
            eos,
            &args,
            model.config.vocab_size(),
        )
        .map(Arc::new)
    };
    let train_file = load(&sources, "train.bin")?;
    let (train, valid) = match &args.valid {
        Some(path) => (
            Split::whole(train_file),
            Split::whole(load(&[Source::File(path.clone())], "valid.bin")?),
        ),
        None => {
            ensure!(
                args.valid_fraction > 0.0 && args.valid_fraction < 1.0,
                "--valid-fraction must be between 0 and 1"
            );
            let cut = ((train_file.len() as f64) * (1.0 - args.valid_fraction)) as usize;
            let end = train_file.len();
            (
                Split {
                    file: train_file.clone(),
                    start: 0,
                    end: cut,
                },
                Split {
                    file: train_file,
                    start: cut,
                    end,
                },
            )
        }
    };
    ensure!(seq >= 2, "--seq {seq}: a window needs 2 tokens");
    if let Some(context) = model.context() {
        ensure!(
            seq <= context,
            "--seq {seq}: the model's context is {context} positions"
        );
    }
    let mlm = match &model.config {
        ModelConfig::Bert(config) => Some(mlm_ids(
            config,
            &tokenizer,
            seq,
            args.whole_word_mask,
            [&train, &valid],
        )?),
        _ => None,
    };
    let span = match &model.config {
        ModelConfig::T5(config) => Some(span_ids(
            config,
            &tokenizer,
            eos,
            seq,
            &args,
            [&train, &valid],
        )?),
        _ => None,
    };
    for (name, split) in [("training", &train), ("validation", &valid)] {
        ensure!(
            split.len() > seq,
            "the {name} data has {} tokens, fewer than one window of --seq {seq} + 1 ({})",
            split.len(),
            split.file.path().display()
        );
    }

    let sample_prompt = match &args.sample_prompt {
        Some(text) => tokenizer.encode(text, false)?,
        None => valid.file.window(valid.start, 16.min(seq)),
    };
    let lora = args.memory.freezing.lora(family)?;
    let mut hf_config = model.config.to_hf(model.architecture);
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
        architecture: model.architecture.hf_name().into(),
        hf_config,
    };
    Ok(Job {
        lora,
        run_dir,
        _lock: lock,
        model,
        span,
        mlm,
        manifest,
        tokenizer_json,
        initial,
        train,
        valid,
        seq,
        resume,
        auto,
        sample_prompt,
        tokenizer: Some(tokenizer),
        args,
    })
}

/// `--model`: a preset, a config.json, or a model directory.
/// Its config and family, and a directory's spec and tokenizer when there are any.
type ResolvedModel = (
    ModelConfig,
    Family,
    Option<ModelSpec>,
    Option<TextTokenizer>,
);

fn resolve_model(name: &str) -> anyhow::Result<ResolvedModel> {
    let path = Path::new(name);
    if path.is_dir() {
        let spec = checkpoints_convert::read_spec(path)?;
        let tokenizer = load_tokenizer(path)?;
        let family = spec.architecture.family();
        return Ok((spec.config.clone(), family, Some(spec), tokenizer));
    }
    if path.is_file() {
        let value: Value = serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        let model_type = value["model_type"].as_str().unwrap_or("gpt2");
        let family = Family::from_model_type(model_type)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let config = family
            .parse_config(&value)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok((config, family, None, None));
    }
    match models::preset(name) {
        Some(preset) => Ok((preset.config, preset.architecture.family(), None, None)),
        None => {
            bail!("--model {name}: not a directory, a config file or a preset (see `zoo list`)")
        }
    }
}

fn open_tokenizer(path: &Path) -> anyhow::Result<TextTokenizer> {
    if path.is_dir() {
        return load_tokenizer(path)?
            .with_context(|| format!("{}: no tokenizer files", path.display()));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(TextTokenizer::Hf(Box::new(tokenizer)))
}

/// One input of the corpus.
#[derive(Debug, Clone)]
enum Source {
    Shipped,
    File(PathBuf),
}

/// Opens token files as they are, or tokenises text into `cache` (reused when its record of the
/// sources and the tokenizer matches).
fn load_tokens(
    sources: &[Source],
    cache: &Path,
    tokenizer: &TextTokenizer,
    tokenizer_json: Option<&str>,
    eos: Option<u32>,
    args: &PretrainArgs,
    vocab_size: usize,
) -> anyhow::Result<TokenFile> {
    let is_token_file =
        |s: &Source| matches!(s, Source::File(p) if p.extension().is_some_and(|e| e == "bin"));
    if let [source] = sources
        && is_token_file(source)
    {
        let Source::File(path) = source else {
            unreachable!()
        };
        let file = TokenFile::open(path, args.token_dtype)?;
        file.check_vocab(vocab_size)?;
        return Ok(file);
    }
    ensure!(
        !sources.iter().any(is_token_file),
        "token files (.bin) cannot be mixed with text in one --data list"
    );
    // The record of what the cache was made from.
    let mut record = Vec::new();
    for source in sources {
        match source {
            Source::Shipped => record.push(json!({"shipped": SHIPPED_CORPUS.len()})),
            Source::File(path) => {
                let meta = std::fs::metadata(path)
                    .with_context(|| format!("reading the corpus {}", path.display()))?;
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                record.push(json!({
                    "path": path.display().to_string(),
                    "bytes": meta.len(),
                    "modified": modified.to_string()
                }));
            }
        }
    }
    let record = json!({
        "sources": record,
        "tokenizer_bytes": tokenizer_json.map(str::len),
        "tokenizer_hash": tokenizer_json.map(fnv1a),
        "eos": eos,
    });
    let record_path = cache.with_extension("json");
    if cache.is_file()
        && std::fs::read_to_string(&record_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|r| r == record)
    {
        return TokenFile::open(cache, args.token_dtype);
    }
    let mut tokens = Vec::new();
    for source in sources {
        let before = tokens.len();
        match source {
            Source::Shipped => tokenize_text(SHIPPED_CORPUS, tokenizer, eos, &mut tokens)?,
            Source::File(path) => tokenize_file(path, tokenizer, eos, &mut tokens)?,
        }
        if tokens.len() == before {
            let name = match source {
                Source::Shipped => "the shipped corpus".to_string(),
                Source::File(p) => p.display().to_string(),
            };
            bail!("the corpus {name} is empty: no text to train on");
        }
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        bail!("the tokenizer produced id {bad}, outside the model's vocabulary of {vocab_size}");
    }
    write_token_file(cache, &tokens, TokenWidth::for_vocab(vocab_size))?;
    let partial = record_path.with_extension(format!("json.partial-{}", std::process::id()));
    std::fs::write(&partial, serde_json::to_string_pretty(&record)?)
        .and_then(|()| std::fs::rename(&partial, &record_path))
        .with_context(|| format!("writing {}", record_path.display()))?;
    TokenFile::open(cache, args.token_dtype)
}

/// A 64-bit FNV-1a hash of a text, in hex (identifies a tokenizer in the cache record).
fn fnv1a(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Plain text: one document, then EOS. JSONL (`.jsonl`, `.json`): one document per line's `text`.
fn tokenize_file(
    path: &Path,
    tokenizer: &TextTokenizer,
    eos: Option<u32>,
    out: &mut Vec<u32>,
) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the corpus {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    if !jsonl {
        return tokenize_text(&text, tokenizer, eos, out);
    }
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), number + 1))?;
        let document = value["text"].as_str().with_context(|| {
            format!(
                "{}:{}: no string field \"text\"",
                path.display(),
                number + 1
            )
        })?;
        tokenize_text(document, tokenizer, eos, out)?;
    }
    Ok(())
}

/// Tokenises one document in pieces of about 64 KB cut after a blank line (so memory stays
/// bounded and no pre-tokenizer word is split), then appends EOS.
fn tokenize_text(
    text: &str,
    tokenizer: &TextTokenizer,
    eos: Option<u32>,
    out: &mut Vec<u32>,
) -> anyhow::Result<()> {
    if text.trim().is_empty() {
        return Ok(());
    }
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len();
        if rest.len() > 65536 {
            let window = &rest[..rest.floor_char_boundary(65536)];
            cut = window.rfind("\n\n").map_or(window.len(), |i| i + 2);
        }
        out.extend(tokenizer.encode(&rest[..cut], false)?);
        rest = &rest[cut..];
    }
    out.extend(eos);
    Ok(())
}

struct PretrainTask {
    job: Arc<Job>,
}

impl BackendTask for PretrainTask {
    type Output = anyhow::Result<Summary>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let job = self.job;
        let ranks = job.args.memory.ranks;
        let device_spec: DeviceSpec = job.args.memory.device;
        let timeout = std::time::Duration::from_secs(job.args.memory.comm_timeout);
        run_ranks(ranks, &device_spec, timeout, move |comm| {
            train::<Autodiff<B>>(comm, device.clone(), &job)
        })
    }
}

/// The `count` window start offsets of step `step`, from the seed alone: a step reads the same
/// windows however its batch is split into micro-batches (`--grad-accum`, `--auto`) and ranks.
fn step_windows(seed: u64, step: u64, count: usize, split: &Split, seq: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9),
    );
    (0..count)
        .map(|_| split.start + rng.random_range(0..split.len() - seq))
        .collect()
}

fn batch_of<B: Backend>(
    split: &Split,
    starts: &[usize],
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = starts
        .iter()
        .flat_map(|&s| split.file.window(s, seq).into_iter().map(i64::from))
        .collect();
    Tensor::from_data(TensorData::new(ids, [starts.len(), seq]), device)
}

fn learning_rate(args: &PretrainArgs, step: u64) -> f32 {
    let factor = LrSchedule::Cosine.lr(1.0, step, args.warmup, args.steps);
    if step < args.warmup {
        args.lr * factor
    } else {
        let min = args.lr * args.min_lr_ratio;
        min + (args.lr - min) * factor
    }
}

/// What the trainer's parameters assemble into (for sampling on rank 0).
fn model_spec(job: &Job) -> ModelSpec {
    ModelSpec {
        kind: DirKind::Zoo,
        dir: job.run_dir.clone(),
        architecture: job.model.architecture,
        config: job.model.config.clone(),
        hf_config: job.manifest.hf_config.clone(),
    }
}

/// The sentinels of span corruption on windows of `seq` tokens: the tokenizer's `<extra_id_N>`
/// (T5, mT5) or `<s_N>` (CPM-2), else the last ids of the vocabulary, `vocab_size − 1 − N`, as
/// T5 numbers them; those must be ids the corpus does not use.
fn span_ids(
    config: &T5Config,
    tokenizer: &TextTokenizer,
    eos: Option<u32>,
    seq: usize,
    args: &PretrainArgs,
    splits: [&Split; 2],
) -> anyhow::Result<SpanIds> {
    ensure!(
        args.noise_density > 0.0 && args.noise_density < 1.0,
        "--noise-density must be between 0 and 1"
    );
    ensure!(args.mean_span >= 1.0, "--mean-span must be at least 1");
    let (_, spans) = models::t5::noise_counts(seq, args.noise_density, args.mean_span);
    let named = |pattern: &str| -> Option<Vec<u32>> {
        (0..=spans)
            .map(|k| tokenizer.token_to_id(&pattern.replace("{}", &k.to_string())))
            .collect()
    };
    let sentinels = match named("<extra_id_{}>").or_else(|| named("<s_{}>")) {
        Some(ids) => ids,
        None => {
            ensure!(
                config.vocab_size > spans + 1,
                "span corruption of --seq {seq} needs {} sentinel ids, more than the vocabulary \
                 of {} holds",
                spans + 1,
                config.vocab_size
            );
            let ids: Vec<u32> = (0..=spans)
                .map(|k| (config.vocab_size - 1 - k) as u32)
                .collect();
            let lowest = *ids.last().expect("at least one sentinel");
            for split in splits {
                if let Some(used) = split.file.max_id(split.start, split.end)
                    && used >= lowest
                {
                    bail!(
                        "span corruption of --seq {seq} takes ids {lowest}..={} of the vocabulary \
                         ({} entries) for its {} sentinels, but the corpus {} uses id {used}: \
                         use a tokenizer with <extra_id_N> tokens, a larger vocab_size, or a \
                         shorter --seq",
                        config.vocab_size - 1,
                        config.vocab_size,
                        spans + 1,
                        split.file.path().display()
                    );
                }
            }
            ids
        }
    };
    Ok(SpanIds {
        sentinels,
        eos,
        decoder_start: config
            .decoder_start_token_id
            .unwrap_or(config.pad_token_id.unwrap_or(0)),
        pad: config.pad_token_id.unwrap_or(0),
    })
}

/// The ids of masked LM: the tokenizer's `[MASK]` / `<mask>`, else the vocabulary's last id
/// (which the corpus must not use); the window's frame from `[CLS]`/`[SEP]` or `<s>`/`</s>`.
fn mlm_ids(
    config: &BertConfig,
    tokenizer: &TextTokenizer,
    seq: usize,
    whole_words: bool,
    splits: [&Split; 2],
) -> anyhow::Result<MlmIds> {
    let pair = |a: &str, b: &str| {
        tokenizer
            .token_to_id(a)
            .or_else(|| tokenizer.token_to_id(b))
    };
    let (first, last) = (pair("[CLS]", "<s>"), pair("[SEP]", "</s>"));
    let frame = usize::from(first.is_some()) + usize::from(last.is_some());
    ensure!(
        seq > frame,
        "--seq {seq}: a masked-LM window needs room for its {frame} framing tokens and one more"
    );
    let mask = match pair("[MASK]", "<mask>") {
        Some(id) => id,
        None => {
            let id = (config.vocab_size - 1) as u32;
            for split in splits {
                if let Some(used) = split.file.max_id(split.start, split.end)
                    && used >= id
                {
                    bail!(
                        "the tokenizer has no [MASK] or <mask>, so masked LM takes the last id \
                         of the vocabulary ({id}), but the corpus {} uses id {used}: use a \
                         tokenizer with a mask token or a larger vocab_size",
                        split.file.path().display()
                    );
                }
            }
            id
        }
    };
    let continues = match whole_words {
        false => None,
        true => {
            let hf = tokenizer
                .as_hf()
                .context("--whole-word-mask needs a WordPiece tokenizer (## pieces)")?;
            let mut table = vec![false; config.vocab_size];
            for (token, id) in hf.get_vocab(true) {
                if token.starts_with("##") && (id as usize) < table.len() {
                    table[id as usize] = true;
                }
            }
            ensure!(
                table.contains(&true),
                "--whole-word-mask: the tokenizer has no ## pieces (it is not WordPiece)"
            );
            Some(table)
        }
    };
    Ok(MlmIds {
        mask,
        first,
        last,
        continues,
    })
}

/// Masked-LM batch of the windows at `starts`: each window framed by the tokenizer's specials,
/// then corrupted as transformers' `DataCollatorForLanguageModeling` does, its randomness drawn
/// from the seed, `salt` (the step) and the window's start.
fn mlm_batch<B: Backend>(
    job: &Job,
    split: &Split,
    starts: &[usize],
    salt: u64,
    device: &B::Device,
) -> MlmBatch<B> {
    let ids = job.mlm.as_ref().expect("a masked-LM job has mask ids");
    let frame = usize::from(ids.first.is_some()) + usize::from(ids.last.is_some());
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    for &start in starts {
        let mut window: Vec<u32> = ids.first.into_iter().collect();
        window.extend(split.file.window(start, job.seq - frame));
        window.extend(ids.last);
        let mut rng = window_rng(job.args.seed, salt, start);
        let is_special = |id: u32| Some(id) == ids.first || Some(id) == ids.last;
        let (vocab, p) = (job.model.config.vocab_size(), job.args.mlm_probability);
        let (input, label) = match &ids.continues {
            None => mlm_mask(&window, is_special, ids.mask, vocab, p, &mut rng),
            Some(table) => {
                let continues = |id: u32| table.get(id as usize).copied().unwrap_or(false);
                whole_word_mask(&window, is_special, continues, ids.mask, vocab, p, &mut rng)
            }
        };
        inputs.extend(input.into_iter().map(i64::from));
        labels.extend(label);
    }
    let shape = [starts.len(), job.seq];
    MlmBatch {
        input_ids: Tensor::from_data(TensorData::new(inputs, shape), device),
        attention_mask: Tensor::ones(shape, device),
        token_type_ids: None,
        labels: Tensor::from_data(TensorData::new(labels, shape), device),
    }
}

/// The generator of one window's objective noise: from the seed, the step (or evaluation
/// batch) and the window's start, so it does not depend on how a batch is split.
fn window_rng(seed: u64, salt: u64, start: usize) -> StdRng {
    StdRng::seed_from_u64(
        seed.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (start as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9),
    )
}

/// Span corruption of the windows at `starts`: each window's noise is drawn from the seed,
/// `salt` (the step) and the window's start, so a step corrupts the same way however its batch is
/// split. Every row corrupts to the same lengths (no padding).
fn span_batch<B: Backend>(
    job: &Job,
    split: &Split,
    starts: &[usize],
    salt: u64,
    device: &B::Device,
) -> Seq2SeqBatch<B> {
    let ids = job.span.as_ref().expect("a T5 job has span ids");
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for &start in starts {
        let window = split.file.window(start, job.seq);
        let mut rng = window_rng(job.args.seed, salt, start);
        let spans = random_noise_spans(
            window.len(),
            job.args.noise_density,
            job.args.mean_span,
            &mut rng,
        );
        let (mut input, target) = span_corrupt(&window, &spans, |k| ids.sentinels[k], ids.eos);
        input.extend(ids.eos);
        inputs.push(input);
        targets.push(target);
    }
    let tensor = |rows: Vec<Vec<u32>>| {
        let width = rows.first().map_or(0, Vec::len);
        let flat: Vec<i64> = rows.into_iter().flatten().map(i64::from).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [starts.len(), width]), device)
    };
    let labels = tensor(targets);
    Seq2SeqBatch {
        input_ids: tensor(inputs),
        attention_mask: None,
        decoder_input_ids: shift_right(labels.clone(), ids.decoder_start, ids.pad),
        labels,
    }
}

/// What the step loop needs of a family's cut beyond [`ZeroSpec`]: its micro-batch from token
/// windows, its validation loss and its end-of-run sample.
trait Pretraining<AB: AutodiffBackend>: ZeroSpec<AB> + Sized {
    /// The micro-batch of the windows at `starts` (`salt`: the step, for the objective's noise).
    fn batch(
        job: &Job,
        split: &Split,
        starts: &[usize],
        salt: u64,
        device: &AB::Device,
    ) -> Self::Batch;

    /// The validation loss of one batch of this rank's windows, through the trainer's segments.
    fn validation_batch_loss(
        job: &Job,
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        starts: &[usize],
        salt: u64,
        device: &AB::Device,
    ) -> anyhow::Result<f32>;

    /// Rank 0's sample from the trained model (`None` on the other ranks, or none to show).
    fn sample(
        job: &Job,
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        device: &AB::Device,
    ) -> anyhow::Result<Option<String>>;
}

/// Pretraining of a causal LM's cut (GPT-2's, the Llama family's): windows are their own
/// labels; the sample continues the prompt with the trained model.
macro_rules! causal_pretraining {
    ($spec:ty) => {
        impl<AB: AutodiffBackend> Pretraining<AB> for $spec {
            fn batch(
                job: &Job,
                split: &Split,
                starts: &[usize],
                _: u64,
                device: &AB::Device,
            ) -> LmBatch<AB> {
                LmBatch {
                    input_ids: batch_of::<AB>(split, starts, job.seq, device),
                    labels: None,
                }
            }

            fn validation_batch_loss(
                job: &Job,
                trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
                starts: &[usize],
                _: u64,
                device: &AB::Device,
            ) -> anyhow::Result<f32> {
                let batch = LmBatch {
                    input_ids: batch_of::<AB::InnerBackend>(&job.valid, starts, job.seq, device),
                    labels: None,
                };
                Ok(trainer.infer_loss(&batch)?)
            }

            fn sample(
                job: &Job,
                trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
                device: &AB::Device,
            ) -> anyhow::Result<Option<String>> {
                on_lead_model(trainer, &model_spec(job), device, |model| {
                    causal_sample(job, &model, device)
                })
            }
        }
    };
}

causal_pretraining!(Gpt2Spec);
causal_pretraining!(LlamaSpec);

/// The end-of-run sample of a causal LM: the prompt continued by sampling (temperature 0.8,
/// top-k 40) up to `--sample-tokens` or the training window (`--seq`).
fn causal_sample<B: Backend>(
    job: &Job,
    model: &AnyModel<B>,
    device: &B::Device,
) -> anyhow::Result<String> {
    let args = &job.args;
    let eos = job.model.config.eos_token_ids();
    // Positions past the training window were never trained (a learned position table's rows
    // there are still random; rotary models extrapolate badly): the sample stays inside it.
    let context = job.model.context().unwrap_or(usize::MAX).min(job.seq);
    let generation = GenerationConfig {
        max_new_tokens: args
            .sample_tokens
            .min(context.saturating_sub(job.sample_prompt.len())),
        decoding: Decoding::Sample {
            temperature: 0.8,
            top_k: Some(40),
            top_p: None,
            seed: args.seed,
        },
        repetition_penalty: 1.0,
        eos_token_ids: eos.clone(),
        pad_token_id: eos.first().copied().unwrap_or(0),
    };
    let generated = model
        .generate(
            std::slice::from_ref(&job.sample_prompt),
            &generation,
            device,
            &mut |_| {},
        )
        .expect("a causal LM generates")?;
    let mut ids = job.sample_prompt.clone();
    ids.extend(generated.new_tokens(0, &eos));
    Ok(match &job.tokenizer {
        Some(t) => t.decode(&ids, true)?,
        None => format!("{ids:?}"),
    })
}

impl<AB: AutodiffBackend> Pretraining<AB> for T5Spec {
    fn batch(
        job: &Job,
        split: &Split,
        starts: &[usize],
        salt: u64,
        device: &AB::Device,
    ) -> Seq2SeqBatch<AB> {
        span_batch::<AB>(job, split, starts, salt, device)
    }

    fn validation_batch_loss(
        job: &Job,
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        starts: &[usize],
        salt: u64,
        device: &AB::Device,
    ) -> anyhow::Result<f32> {
        let batch = span_batch::<AB::InnerBackend>(job, &job.valid, starts, salt, device);
        Ok(trainer.infer_loss(&batch)?)
    }

    fn sample(
        _: &Job,
        _: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        _: &AB::Device,
    ) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
}

impl<AB: AutodiffBackend> Pretraining<AB> for MlmSpec {
    fn batch(
        job: &Job,
        split: &Split,
        starts: &[usize],
        salt: u64,
        device: &AB::Device,
    ) -> MlmBatch<AB> {
        mlm_batch::<AB>(job, split, starts, salt, device)
    }

    fn validation_batch_loss(
        job: &Job,
        trainer: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        starts: &[usize],
        salt: u64,
        device: &AB::Device,
    ) -> anyhow::Result<f32> {
        let batch = mlm_batch::<AB::InnerBackend>(job, &job.valid, starts, salt, device);
        Ok(trainer.infer_loss(&batch)?)
    }

    fn sample(
        _: &Job,
        _: &ZeroTrainer<AB, Self, Box<dyn Communicator>>,
        _: &AB::Device,
    ) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
}

/// Mean validation loss over fixed windows, run through the trainer's segments (one gathered at
/// a time, on the inference backend: no dropout); each rank runs its share of every batch's rows
/// and all get the mean.
fn validation_loss<AB: AutodiffBackend, S: Pretraining<AB>>(
    job: &Job,
    trainer: &ZeroTrainer<AB, S, Box<dyn Communicator>>,
    device: &AB::Device,
) -> anyhow::Result<f32> {
    let (rank, world) = (trainer.comm().rank(), trainer.comm().world_size());
    let rows = job.args.batch / world;
    let mut total = 0.0;
    for i in 0..job.args.eval_batches {
        let salt = u64::MAX - i as u64;
        let starts = step_windows(
            job.args.seed ^ 0x5A5A,
            salt,
            job.args.batch,
            &job.valid,
            job.seq,
        );
        let mine = &starts[rank * rows..(rank + 1) * rows];
        total += S::validation_batch_loss(job, trainer, mine, salt, device)?;
    }
    mean_over_ranks(
        trainer.comm().as_ref(),
        total / job.args.eval_batches.max(1) as f32,
    )
}

/// One rank's job: the family's cut, then its training loop.
fn train<AB: AutodiffBackend>(
    comm: Box<dyn Communicator>,
    device: AB::Device,
    job: &Job,
) -> anyhow::Result<Summary> {
    match &job.model.config {
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
        ModelConfig::Bert(config) => {
            let freezing = &job.args.memory.freezing;
            let (cut, quantized) = match job.model.architecture {
                Architecture::RobertaForMaskedLM => {
                    let (model, quantized) = prepared(
                        RobertaForMaskedLM::<AB>::new(config, &device)?,
                        job.lora.as_ref(),
                        freezing,
                        &device,
                    )?;
                    (MlmSpec::split_roberta(model), quantized)
                }
                _ => {
                    let (model, quantized) = prepared(
                        BertForMaskedLM::<AB>::new(config, &device)?,
                        job.lora.as_ref(),
                        freezing,
                        &device,
                    )?;
                    (MlmSpec::split_bert(model), quantized)
                }
            };
            train_loop(comm, device, job, cut, InitScheme::Bert, quantized)
        }
    }
}

/// One rank's training loop, top to bottom.
fn train_loop<AB: AutodiffBackend, S: Pretraining<AB>>(
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

    // The model, one segment at a time: the directory's weights, or the family's initialisation
    // from the seed. The model is never whole in memory.
    let setup = TrainSetup {
        beta2: args.beta2,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        tensors: job.initial.as_ref().map(|r| r as &dyn TensorSource),
        strict: true,
        init,
        seed: args.seed,
        source: args
            .model
            .clone()
            .unwrap_or_else(|| "the default model".into()),
        quantized,
    };
    let mut trainer = setup.build(cut, comm, device.clone(), &args.memory)?;

    let mut start = 0;
    if let Some(checkpoint) = &job.resume {
        let (step, state) = resume_trainer(&mut trainer, checkpoint, &job.manifest)?;
        start = step;
        if lead && state["seed"].as_u64() != Some(args.seed) {
            eprintln!(
                "warning: the checkpoint was trained with --seed {}, this run uses {}: the \
                 windows after step {start} differ from an uninterrupted run",
                state["seed"], args.seed
            );
        }
    }
    let files = CheckpointFiles {
        manifest: job.manifest.clone(),
        tokenizer_json: job.tokenizer_json.clone(),
        lora_base: job
            .lora
            .as_ref()
            .map(|_| job.args.model.clone().unwrap_or_default()),
    };
    let outputs = RunOutputs::open(
        &job.run_dir,
        lead,
        job.resume.as_ref().map(|_| start),
        files,
    )?;
    // `auto`: --auto's settings as they are now (a retry may have halved the micro-batch).
    let save = |trainer: &ZeroTrainer<AB, S, Box<dyn Communicator>>,
                step: u64,
                auto: Option<Value>|
     -> anyhow::Result<PathBuf> {
        let dir = outputs.checkpoints.join(format!("step-{step:07}"));
        let mut state = json!({ "step": step, "seed": args.seed, "job": "pretrain" });
        if let Some(auto) = auto {
            state["auto"] = auto;
        }
        save_checkpoint(trainer, &dir, &outputs.files, &state)?;
        if trainer.comm().rank() == 0 {
            prune_checkpoints(&outputs.checkpoints, args.keep)?;
        }
        Ok(dir)
    };

    // The split of a step's batch: --batch × --grad-accum, or --auto's (which may halve it).
    let mut split = StepSplit::new(args.batch, args.grad_accum, job.auto, &args.memory)?;
    let tokens_per_step = (args.batch * args.grad_accum * job.seq) as f64;
    let progress = Progress::new(args.steps, start, lead, !args.run.no_progress);

    let mut first_loss = None;
    let mut last_loss = f32::NAN;
    let mut valid_loss = None;
    let mut window_loss = 0.0;
    let mut window_steps = 0;
    let mut window_start = Instant::now();
    let mut interrupted = false;
    let mut last_saved = None;
    for step in start..args.steps {
        let lr = learning_rate(args, step);
        let starts = step_windows(
            args.seed,
            step,
            split.micro_batch * split.grad_accum,
            &job.train,
            job.seq,
        );
        let loss = split.accumulate(&mut trainer, step, &progress, |micro_batch, micro| {
            let rows = micro_batch / world;
            let micro_starts = &starts[micro * micro_batch..(micro + 1) * micro_batch];
            let mine = &micro_starts[rank * rows..(rank + 1) * rows];
            S::batch(job, &job.train, mine, step, &device)
        })?;
        let report = trainer.step(lr)?;
        let loss = mean_over_ranks(trainer.comm().as_ref(), loss)?;
        first_loss.get_or_insert(loss);
        last_loss = loss;
        window_loss += loss;
        window_steps += 1;
        let done = step + 1;
        let elapsed = window_start.elapsed().as_secs_f64();
        let tokens_per_s = tokens_per_step * window_steps as f64 / elapsed.max(1e-9);
        progress.update(
            done,
            format!("loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"),
        );
        if done % args.run.log_every == 0 || done == args.steps {
            let mean = window_loss / window_steps as f32;
            let gpu = split.memory_fields(&mut trainer);
            outputs.log(
                done,
                crate::run::merged(
                    json!({
                        "loss": mean,
                        "lr": lr,
                        "tokens_per_s": tokens_per_s,
                        "grad_norm": report.grad_norm,
                        "applied": report.applied,
                    }),
                    gpu,
                ),
            )?;
            progress.println(&format!(
                "step {done:>6}  loss {mean:.4}  lr {lr:.2e}  {tokens_per_s:.0} tokens/s"
            ));
            (window_loss, window_steps, window_start) = (0.0, 0, Instant::now());
        }
        if args.eval_every > 0 && done % args.eval_every == 0 && done != args.steps {
            let v = validation_loss(job, &trainer, &device)?;
            progress.println(&format!(
                "step {done:>6}  validation loss {v:.4}  perplexity {:.2}",
                v.exp()
            ));
            outputs.log(done, json!({"valid_loss": v, "valid_perplexity": v.exp()}))?;
        }
        if args.save_every > 0 && done % args.save_every == 0 {
            last_saved = Some(save(&trainer, done, split.record())?);
        }
        if any_rank_interrupted(trainer.comm().as_ref())? {
            interrupted = true;
            if last_saved
                .as_ref()
                .is_none_or(|d: &PathBuf| !d.ends_with(format!("step-{done:07}")))
            {
                last_saved = Some(save(&trainer, done, split.record())?);
            }
            progress.println(&format!("interrupted at step {done}: checkpoint saved"));
            break;
        }
    }
    let steps_peak = crate::run::proc_status_bytes("VmHWM:");
    let steps = trainer.steps();
    if !interrupted {
        if last_saved
            .as_ref()
            .is_none_or(|d: &PathBuf| !d.ends_with(format!("step-{steps:07}")))
        {
            last_saved = Some(save(&trainer, steps, split.record())?);
        }
        let v = validation_loss(job, &trainer, &device)?;
        outputs.log(steps, json!({"valid_loss": v, "valid_perplexity": v.exp()}))?;
        valid_loss = Some(v);
    }
    progress.finish();
    if args.run.report_memory && lead {
        let final_peak = crate::run::proc_status_bytes("VmHWM:");
        crate::run::report_memory(
            baseline,
            steps_peak,
            final_peak,
            split.gpu_run_peak(&mut trainer),
        );
    }

    // A sample from the trained model.
    let sample = if args.sample_tokens > 0 && !interrupted {
        S::sample(job, &trainer, &device)?
    } else {
        None
    };
    Ok(Summary {
        first_loss: first_loss.unwrap_or(f32::NAN),
        last_loss,
        valid_loss,
        steps,
        interrupted,
        sample,
        checkpoint: last_saved,
    })
}

/// Deletes all but the newest `keep` `step-*` checkpoints.
fn prune_checkpoints(dir: &Path, keep: usize) -> anyhow::Result<()> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for old in &steps[..excess] {
        std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}
