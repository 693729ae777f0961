//! `zoo memory`: the peak memory per rank of a training setup, from the model's shapes and what
//! zoo's ZeRO trainer keeps, without allocating anything.
//!
//! The model of one training step on one rank (N ranks, micro-batch of b = batch / N rows of T
//! tokens, compute dtype of d bytes; P parameters, the largest segment S of them):
//!
//! - parameters: the f32 master shard `4P/N`, plus the gathered working copy of the segment being
//!   run (`4S` as the gathered f32 buffer and `dS` as the module); stage 2 keeps every block's
//!   gathered buffer from forward to backward (`4P`);
//! - gradients: the f32 shard `4P/N`, plus one segment's autodiff gradients and flat buffer
//!   (`(d + 4)S`);
//! - optimizer: AdamW's two f32 moments, `8P/N` (always in host memory: zoo's optimizer runs on
//!   the host, so `--offload-optimizer` changes nothing);
//! - activations: per block and token, `c_H·H + c_F·F + c_S·a·T` values of d bytes (H the width,
//!   F the FFN width, a the heads), kept for every block, or, with `--checkpointing`, only each
//!   block's input (`H` values) plus one block's full set while it is recomputed; plus the
//!   head's (the LM head's logits: 3 f32 values per token and vocabulary entry);
//! - workspace: the transients of one block's backward, about one block's activations, plus the
//!   runtime on a GPU (CUDA context and kernels, `RUNTIME_GPU_BYTES`).
//!
//! The constants come from counting what burn's autodiff saves, fitted on CPU runs of
//! `zoo pretrain --report-memory` (c_H + 4 c_F = 31.5 per token and unit of width, c_S = 2.65 per
//! attention score): `bench/memory_check.py` measures the error on other shapes. On a GPU the
//! master weights, gradient shards and optimizer state live in host memory; the device holds
//! the working copies, activations and workspace.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use bmtrain_backend::Cpu;
use clap::Args;
use models::{AnyModel, Architecture, Family, ModelConfig, param_infos};
use serde_json::json;

use crate::run::DtypeArg;

/// Values an autodiff block keeps per token and unit of width, not counting the FFN.
const C_WIDTH: f64 = 11.5;
/// … per token and unit of FFN width.
const C_FFN: f64 = 5.0;
/// … per token and attention score (`heads × seq`).
const C_SCORES: f64 = 2.65;
/// CUDA context, cubecl's kernels and pools: what a GPU holds before the model.
const RUNTIME_GPU_BYTES: f64 = 0.5e9;

/// `zoo memory` arguments.
#[derive(Args, Debug, Clone)]
pub struct EstimateArgs {
    /// A preset (`zoo list`), a model directory or a config.json. BERT and RoBERTa are estimated
    /// as `zoo finetune` trains them (sequence classification), GPTs as `zoo pretrain` does.
    #[arg(long, value_name = "PRESET|DIR|CONFIG")]
    model: String,
    /// Tokens per row.
    #[arg(long)]
    seq: usize,
    /// Rows per micro-batch, over all ranks.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Recompute blocks in backward.
    #[arg(long)]
    checkpointing: bool,
    /// ZeRO stage (2 or 3).
    #[arg(long, default_value_t = 3)]
    zero_stage: u8,
    /// Ranks sharing the parameters, gradients and optimizer state.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// Accepted for symmetry with the training jobs (the optimizer is always on the host).
    #[arg(long)]
    offload_optimizer: bool,
    /// Memory per rank to fit in, e.g. 11GB, 24GiB, 512MB. With it the setup is a GPU's: the
    /// device holds working copies, activations and workspace. Without, a CPU's: everything.
    #[arg(long, value_name = "SIZE")]
    gpu_mem: Option<String>,
    /// Memory to fit in on CPU (e.g. 24GB); default: this machine's total.
    #[arg(long, value_name = "SIZE", conflicts_with = "gpu_mem")]
    mem: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// The shapes that decide memory.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The class trained.
    pub architecture: Architecture,
    /// All parameters.
    pub params: usize,
    /// The largest segment (embedding, one block, head).
    pub largest_segment: usize,
    /// The embedding segment (also read by a tied LM head).
    pub embedding: usize,
    /// Blocks.
    pub layers: usize,
    /// Width.
    pub hidden: usize,
    /// FFN width.
    pub ffn: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary of an LM head (0 for a classifier).
    pub lm_vocab: usize,
}

/// One rank's training setup.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Tokens per row.
    pub seq: usize,
    /// Rows per micro-batch over all ranks.
    pub batch: usize,
    /// Compute dtype bytes.
    pub dtype_bytes: usize,
    /// Block checkpointing.
    pub checkpointing: bool,
    /// 2 or 3.
    pub zero_stage: u8,
    /// Ranks.
    pub ranks: usize,
    /// Whether the estimate is for a GPU (device vs host split).
    pub gpu: bool,
}

/// Bytes per category, and what must fit in the budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    /// Master weights and working copies.
    pub parameters: f64,
    /// Gradient shard and one segment's gradients.
    pub gradients: f64,
    /// AdamW moments.
    pub optimizer: f64,
    /// Saved activations.
    pub activations: f64,
    /// Backward transients and runtime.
    pub workspace: f64,
    /// What the device holds (GPU), or everything (CPU).
    pub peak: f64,
    /// Host memory besides (GPU setups).
    pub host: f64,
}

/// The estimate of one rank's peak.
pub fn estimate(shape: &Shape, setup: &Setup) -> Estimate {
    let n = setup.ranks.max(1) as f64;
    let p = shape.params as f64;
    let s = shape.largest_segment as f64;
    let d = setup.dtype_bytes as f64;
    let rows = setup.batch as f64 / n;
    let tokens = rows * setup.seq as f64;
    let (h, f, a, t) = (
        shape.hidden as f64,
        shape.ffn as f64,
        shape.heads as f64,
        setup.seq as f64,
    );
    let block = tokens * (C_WIDTH * h + C_FFN * f + C_SCORES * a * t) * d;
    let saved_inputs = shape.layers as f64 * tokens * h * d;
    let graphs = if setup.checkpointing {
        saved_inputs + block
    } else {
        shape.layers as f64 * block
    };
    let head = tokens * shape.lm_vocab as f64 * 3.0 * 4.0;
    let activations = graphs + head;

    // Host-side shards and optimizer; device-side working copies.
    let master = 4.0 * p / n;
    let grad_shard = 4.0 * p / n;
    let optimizer = 8.0 * p / n;
    let gathered = 4.0 * s + if setup.zero_stage == 2 { 4.0 * p } else { 0.0 };
    // A tied LM head holds the embedding module beside the head's.
    let tied = if shape.lm_vocab > 0 {
        d * shape.embedding as f64
    } else {
        0.0
    };
    let module = d * s + tied;
    let segment_grads = (d + 4.0) * s;
    let runtime = if setup.gpu { RUNTIME_GPU_BYTES } else { 0.0 };
    let workspace = block + runtime;
    let parameters = master + gathered + module;
    let gradients = grad_shard + segment_grads;
    // On a GPU the device holds the module, one segment's gradients, activations and workspace;
    // the f32 shards, moments and gathered buffers are host memory. On a CPU all is one memory.
    let (peak, host) = if setup.gpu {
        (
            module + d * s + activations + workspace,
            master + grad_shard + optimizer + gathered + 4.0 * s,
        )
    } else {
        (
            parameters + gradients + optimizer + activations + workspace,
            0.0,
        )
    };
    Estimate {
        parameters,
        gradients,
        optimizer,
        activations,
        workspace,
        peak,
        host,
    }
}

/// The largest global batch (a multiple of the ranks) whose peak fits `budget`.
pub fn max_batch(shape: &Shape, setup: &Setup, budget: f64) -> usize {
    let fits = |batch: usize| estimate(shape, &Setup { batch, ..*setup }).peak <= budget;
    let step = setup.ranks.max(1);
    if !fits(step) {
        return 0;
    }
    let mut high = step;
    while fits(high * 2) && high < 1 << 24 {
        high *= 2;
    }
    let (mut low, mut high) = (high / step, high * 2 / step);
    while high - low > 1 {
        let mid = (low + high) / 2;
        if fits(mid * step) {
            low = mid;
        } else {
            high = mid;
        }
    }
    low * step
}

/// The trained class and shapes of `--model`.
pub fn shape_of(model: &str) -> anyhow::Result<Shape> {
    let path = Path::new(model);
    let (architecture, config) = if path.is_dir() {
        let spec = checkpoints_convert::read_spec(path)?;
        (spec.architecture, spec.config)
    } else if path.is_file() {
        let value: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        let architecture = Architecture::from_hf_config(&value)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let config = architecture
            .family()
            .parse_config(&value)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        (architecture, config)
    } else {
        let preset = models::preset(model)
            .with_context(|| format!("--model {model}: not a directory, config or preset"))?;
        (preset.architecture, preset.config)
    };
    let (architecture, hidden, ffn, heads, layers, lm_vocab) =
        match (&config, architecture.family()) {
            (ModelConfig::Gpt2(c), _) => (
                Architecture::Gpt2LmHeadModel,
                c.n_embd,
                c.n_inner.unwrap_or(4 * c.n_embd),
                c.n_head,
                c.n_layer,
                c.vocab_size,
            ),
            (ModelConfig::Bert(c), family) => (
                if family == Family::Roberta {
                    Architecture::RobertaForSequenceClassification
                } else {
                    Architecture::BertForSequenceClassification
                },
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.num_hidden_layers,
                0,
            ),
            (ModelConfig::T5(_), _) => {
                bail!("{model}: zoo's training jobs train GPTs and BERT/RoBERTa, not T5 yet")
            }
        };
    let device = Default::default();
    let built = AnyModel::<Cpu>::new(architecture, &config, &device)?;
    let mut embedding = 0;
    let mut blocks = std::collections::BTreeMap::<usize, usize>::new();
    let mut head = 0;
    for info in param_infos::<Cpu, _>(&built) {
        let size: usize = info.shape.iter().product();
        let parts: Vec<&str> = info.name.split('.').collect();
        let block = parts
            .windows(2)
            .find(|w| w[0] == "blocks" || w[0] == "layers")
            .and_then(|w| w[1].parse::<usize>().ok());
        match block {
            Some(i) => *blocks.entry(i).or_default() += size,
            None if info.name.contains("embeddings.")
                || info.name.contains(".wte.")
                || info.name.contains(".wpe.") =>
            {
                embedding += size
            }
            None => head += size,
        }
    }
    let largest_block = blocks.values().copied().max().unwrap_or(0);
    Ok(Shape {
        architecture,
        params: embedding + head + blocks.values().sum::<usize>(),
        largest_segment: embedding.max(head).max(largest_block),
        embedding,
        layers,
        hidden,
        ffn,
        heads,
        lm_vocab,
    })
}

/// `11GB` → 11e9, `24GiB` → 24·2³⁰, `512MB`, `1.5TB`; a bare number is bytes.
pub fn parse_size(text: &str) -> anyhow::Result<f64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("'{text}' is not a size like 11GB or 24GiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => bail!("'{text}': unknown unit '{other}' (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
    };
    Ok(value * scale)
}

fn machine_memory() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb * 1024.0)
}

/// Runs `zoo memory`.
pub fn run(args: EstimateArgs) -> anyhow::Result<()> {
    ensure!(
        args.seq >= 1 && args.batch >= 1,
        "--seq and --batch must be at least 1"
    );
    ensure!(args.ranks >= 1, "--ranks must be at least 1");
    ensure!(
        matches!(args.zero_stage, 2 | 3),
        "--zero-stage must be 2 or 3"
    );
    let shape = shape_of(&args.model)?;
    let setup = Setup {
        seq: args.seq,
        batch: args.batch,
        dtype_bytes: match args.dtype {
            DtypeArg::F32 => 4,
            DtypeArg::F16 | DtypeArg::Bf16 => 2,
        },
        checkpointing: args.checkpointing,
        zero_stage: args.zero_stage,
        ranks: args.ranks,
        gpu: args.gpu_mem.is_some(),
    };
    let budget = match (&args.gpu_mem, &args.mem) {
        (Some(size), _) | (None, Some(size)) => Some(parse_size(size)?),
        (None, None) => machine_memory(),
    };
    let estimate = estimate(&shape, &setup);
    let fits = budget.map(|b| estimate.peak <= b);
    let max = budget.map(|b| max_batch(&shape, &setup, b));
    if args.json {
        println!(
            "{}",
            json!({
                "model": args.model,
                "architecture": shape.architecture.hf_name(),
                "params": shape.params,
                "seq": args.seq,
                "batch": args.batch,
                "ranks": args.ranks,
                "device": if setup.gpu { "gpu" } else { "cpu" },
                "parameters_bytes": estimate.parameters.round(),
                "gradients_bytes": estimate.gradients.round(),
                "optimizer_bytes": estimate.optimizer.round(),
                "activations_bytes": estimate.activations.round(),
                "workspace_bytes": estimate.workspace.round(),
                "peak_bytes": estimate.peak.round(),
                "host_bytes": estimate.host.round(),
                "budget_bytes": budget.map(f64::round),
                "fits": fits,
                "max_batch": max,
            })
        );
        return Ok(());
    }
    let gb = |b: f64| format!("{:>9.3} GB", b / 1e9);
    println!(
        "{} ({}, {:.1}M parameters), {} × {} tokens over {} rank(s), {:?}{}, ZeRO stage {}",
        args.model,
        shape.architecture.hf_name(),
        shape.params as f64 / 1e6,
        args.batch,
        args.seq,
        args.ranks,
        args.dtype,
        if args.checkpointing {
            ", checkpointing"
        } else {
            ""
        },
        args.zero_stage
    );
    println!("per rank:");
    println!(
        "  parameters   {}  (f32 master shard + gathered working copy)",
        gb(estimate.parameters)
    );
    println!(
        "  gradients    {}  (f32 shard + one segment's)",
        gb(estimate.gradients)
    );
    println!(
        "  optimizer    {}  (AdamW moments, host)",
        gb(estimate.optimizer)
    );
    println!("  activations  {}", gb(estimate.activations));
    println!("  workspace    {}", gb(estimate.workspace));
    if setup.gpu {
        println!(
            "  peak on the GPU {}  (host memory besides: {})",
            gb(estimate.peak),
            gb(estimate.host).trim()
        );
    } else {
        println!("  peak         {}", gb(estimate.peak));
    }
    match (budget, fits, max) {
        (Some(budget), Some(fits), Some(max)) => println!(
            "{} in {:.2} GB; the largest batch that fits is {max}",
            if fits { "fits" } else { "does not fit" },
            budget / 1e9
        ),
        _ => println!("(no memory budget known: give --gpu-mem or --mem)"),
    }
    Ok(())
}
