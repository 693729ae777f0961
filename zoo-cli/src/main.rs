//! `zoo`: the command line of the zoo model zoo.
//!
//! - `zoo list`: families, presets and parameter counts;
//! - `zoo download`: a model repository from the HF hub or a mirror (`HF_ENDPOINT`);
//! - `zoo convert`: HF directory → zoo directory, and back with `--to-hf`;
//! - `zoo forward`: run a model directory on text or token ids, write the outputs as safetensors;
//! - `zoo generate`: continue a prompt with a causal LM (greedy, sampling, beam search);
//! - `zoo pretrain`: train a GPT on a corpus (default: a tiny GPT on the shipped corpus);
//! - `zoo finetune`: sequence classification with BERT or RoBERTa, seq2seq with T5, prompt →
//!   completion with GPT-2 (`--task`);
//! - `zoo memory`: peak memory per rank of a training setup, and the largest batch that fits;
//! - `zoo launch`: a torchrun-style launcher for multi-process (multi-GPU, multi-node) jobs;
//! - `zoo plot`: a run's loss, learning rate and accuracy curves as a PNG;
//! - `zoo bench`: BERT-base / GPT-2 speed (forward, training step, generation);
//! - `zoo env`: version, backends, this rank's device, what it finds of CUDA and NCCL.

#![warn(missing_docs)]

mod alloc;
mod bench;
mod env;
mod finetune;
mod finetune_lm;
mod forward;
mod generate;
mod launch;
mod list;
mod memory;
mod plot;
mod pretrain;
mod run;
mod tokens;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bmtrain_backend::DeviceSpec;
use checkpoints_convert::WeightsFormat;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// zoo: HuggingFace-compatible Transformers in Rust, on burn.
#[derive(Parser, Debug)]
#[command(name = "zoo", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the model families, their classes and presets, with parameter counts.
    List,
    /// Download a model repository (config, weights, tokenizer) from the HF hub or a mirror.
    Download(DownloadArgs),
    /// Convert an HF model directory to a zoo directory, or back with --to-hf.
    Convert(ConvertArgs),
    /// Quantize a model directory's weights to int8 or 4-bit NF4 (a zoo directory that forward
    /// and generate run directly).
    Quantize(QuantizeArgs),
    /// Run a model directory (HF or zoo) and write its outputs to a safetensors file.
    Forward(forward::ForwardArgs),
    /// Continue a prompt with a causal LM (or answer it with T5) and stream the text (or --ids).
    Generate(generate::GenerateArgs),
    /// Pretrain a GPT on text or token files (default: a tiny GPT on the shipped corpus).
    Pretrain(pretrain::PretrainArgs),
    /// Fine-tune BERT or RoBERTa for sequence classification on TSV, CSV or JSONL examples.
    Finetune(finetune::FinetuneArgs),
    /// Estimate the peak memory per rank of a training setup, and the largest batch that fits.
    Memory(memory::EstimateArgs),
    /// Start the ranks of a training job (torchrun's variables), forward signals, stop all on a failure.
    Launch(launch::LaunchArgs),
    /// Draw a run's metrics.jsonl (loss, learning rate, accuracy) into a PNG.
    Plot(plot::PlotArgs),
    /// Time BERT-base / GPT-2 forward, training step or generation (median of repeated runs).
    Bench(bench::BenchArgs),
    /// Print zoo's version and backends, this rank's variables and device, and what it finds of
    /// CUDA (driver, NVRTC, headers) and NCCL: what a bug report needs.
    Env(env::EnvArgs),
}

#[derive(Args, Debug)]
struct QuantizeArgs {
    /// The directory to read (HF or zoo).
    #[arg(long = "from", value_name = "DIR")]
    from: PathBuf,
    /// The directory to write. It must not exist, unless --overwrite.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// 8: int8, one absmax per output channel; 4: NF4, one absmax per block of 64 (QLoRA's).
    #[arg(long, value_name = "BITS")]
    bits: u32,
    /// Also quantize the token embeddings and untied LM heads (by default they, like norms,
    /// biases and classifiers, keep their dtype).
    #[arg(long)]
    embeddings: bool,
    /// Replace --out if it exists (only once the new directory is complete).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args, Debug)]
struct DownloadArgs {
    /// `org/name` on the hub.
    repo_id: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The directory to write (default: the repository's name). It must not exist, unless
    /// --overwrite.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The hub's address (default: HF_ENDPOINT, else https://huggingface.co).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Replace --out if it exists (only once the new directory is complete).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// The directory to read: HF (config.json) or, with --to-hf, zoo (zoo.json); with
    /// --merge-adapter, either.
    #[arg(long = "from", value_name = "DIR")]
    from: PathBuf,
    /// The directory to write. It must not exist, unless --overwrite.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Export a zoo directory back to the HF layout (a LoRA checkpoint's adapters merged in).
    #[arg(long)]
    to_hf: bool,
    /// Fold this PEFT LoRA adapter into --from's weights (HF or zoo directory) and write the
    /// merged model: a zoo directory, or HF's layout with --to-hf.
    #[arg(long, value_name = "DIR")]
    merge_adapter: Option<PathBuf>,
    /// Which HF weights file to read.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// Replace --out if it exists (only once the new directory is complete).
    #[arg(long)]
    overwrite: bool,
}

/// `--format`: which weights file of an HF directory to read.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum FormatArg {
    /// model.safetensors (or its index) when present, else pytorch_model.bin.
    Auto,
    /// model.safetensors or model.safetensors.index.json.
    Safetensors,
    /// pytorch_model.bin or pytorch_model.bin.index.json.
    Bin,
}

impl From<FormatArg> for WeightsFormat {
    fn from(arg: FormatArg) -> Self {
        match arg {
            FormatArg::Auto => WeightsFormat::Auto,
            FormatArg::Safetensors => WeightsFormat::Safetensors,
            FormatArg::Bin => WeightsFormat::PytorchBin,
        }
    }
}

/// Parses `--device`.
fn parse_device(text: &str) -> Result<DeviceSpec, String> {
    text.parse()
        .map_err(|e: bmtrain_backend::DeviceError| e.to_string())
}

fn main() -> ExitCode {
    // Like C programs, end quietly when stdout's reader goes away (`zoo list | head`).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    run::process_start();
    let cli = Cli::parse();
    // Training steps churn the same buffers: keep them. Inference keeps mimalloc's prompt purge,
    // so a (quantized) model's resident set stays what it holds.
    if !matches!(cli.command, Command::Forward(_) | Command::Generate(_)) {
        alloc::keep_freed_memory();
    }
    if let Command::Launch(args) = cli.command {
        return launch::run(args).unwrap_or_else(|error| {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        });
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::List => list::run(),
        Command::Download(args) => download(args),
        Command::Convert(args) => convert(args),
        Command::Quantize(args) => quantize(args),
        Command::Forward(args) => forward::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Memory(args) => memory::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Env(args) => env::run(args),
        Command::Launch(_) => unreachable!("handled in main"),
    }
}

fn download(args: DownloadArgs) -> anyhow::Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(args.repo_id.rsplit('/').next().unwrap_or(&args.repo_id)));
    let options = checkpoints_convert::hub::DownloadOptions {
        repo_id: args.repo_id.clone(),
        revision: args.revision,
        endpoint: args.endpoint,
        token: None,
        cache_dir: None,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = checkpoints_convert::hub::download(&options, &out, args.overwrite)
        .with_context(|| format!("downloading {}", args.repo_id))?;
    println!(
        "wrote {} ({} files, {:.1} MB: {})",
        out.display(),
        report.files.len(),
        report.bytes as f64 / 1e6,
        report.files.join(", ")
    );
    Ok(())
}

fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    let report = checkpoints_convert::quantize::quantize_dir(
        &args.from,
        &args.out,
        args.bits,
        args.embeddings,
        args.overwrite,
    )
    .with_context(|| format!("quantizing {}", args.from.display()))?;
    println!(
        "wrote {} ({}: {} weights quantized, {} tensors kept; {:.1} MB -> {:.1} MB of tensors)",
        args.out.display(),
        report.format,
        report.quantized,
        report.kept,
        report.bytes.0 as f64 / 1e6,
        report.bytes.1 as f64 / 1e6,
    );
    Ok(())
}

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    // A conversion holds every tensor at once: a model larger than memory is refused first.
    let limit = memory::available_memory().map(|b| b as u64);
    let report = if let Some(adapter) = &args.merge_adapter {
        checkpoints_convert::merge_adapter_within(
            &args.from,
            adapter,
            &args.out,
            args.to_hf,
            args.format.into(),
            args.overwrite,
            limit,
        )
    } else if args.to_hf {
        checkpoints_convert::export_zoo_to_hf_within(&args.from, &args.out, args.overwrite, limit)
    } else {
        checkpoints_convert::convert_hf_to_zoo_within(
            &args.from,
            &args.out,
            args.format.into(),
            args.overwrite,
            limit,
        )
    }
    .with_context(|| format!("converting {}", args.from.display()))?;
    for key in &report.unused {
        eprintln!("warning: unused checkpoint key '{key}' (not written)");
    }
    println!(
        "wrote {} ({}, {} tensors, tokenizer files: {})",
        args.out.display(),
        report.architecture.hf_name(),
        report.tensors,
        if report.tokenizer_files.is_empty() {
            "none".to_string()
        } else {
            report.tokenizer_files.join(", ")
        }
    );
    Ok(())
}
