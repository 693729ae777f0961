//! `zoo memory`: the peak memory per rank of a training setup, from the model's shapes and what
//! zoo's ZeRO trainer keeps, without allocating anything.
//!
//! The model of one training step on one rank (N ranks, micro-batch of b = batch / N rows of T
//! tokens, compute dtype of d bytes; P parameters, of which P_L in the L blocks; the segments as
//! the trainer cuts them: embedding E, largest block K, head J):
//!
//! - state: the f32 master shard, gradient shard and AdamW's two moments, `16P/N`;
//! - kept weights: a block that is not checkpointed keeps its module (its weights, `dP_L/L`) in its
//!   autodiff graph until backward; stage 2 also keeps every gathered f32 buffer (`4P_L`);
//! - working set: one segment's module, its autodiff gradients and its flat gradient buffer at
//!   once, `c_work · d · W` with `W` the largest of K, E and J (plus E when the head is tied to the
//!   embeddings: it reads the embedding module too);
//! - activations: per block and token `c_H·H + c_F·F + c_S·a·T` values of d bytes (H the width,
//!   F the FFN width, a the heads), kept for every block, or, with `--checkpointing`, each block's
//!   input (`H` values) plus one block's full set while it is recomputed; an LM head's logits and
//!   their gradient, `c_V · 4 · V` per token (on a GPU an LM head runs in chunks of rows, so
//!   only one chunk's, plus the f32 gradients of the hidden states, `4H` per token, and
//!   of a trained head's weight, `4VH`);
//! - per rank, a fixed `c_rank` (its thread's heap, its rayon pool, the runtime).
//!
//! Thread ranks share one process, which holds every rank's share ([`Estimate::process`]).
//! The constants are fitted, per backend path: the CPU's (fused kernels, which keep fewer
//! intermediates than burn's composition) on measured CPU runs (`bench/memory_check.py --fit`,
//! then checked on a separate report set: the README has the table); the GPU's still describe
//! burn's composed ops, which the CUDA path runs, and have not been measured on a GPU. On a GPU the
//! state is on the device with the working copies, activations and workspace; with
//! `--offload-optimizer` the f32 master weights and moments are host memory and the device holds
//! the gradient shard and a compute-dtype copy of the weight shard instead.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use bmtrain_backend::Cpu;
use bmtrain_backend::zero::layout_of;
use clap::Args;
use models::bert::{BertForMaskedLM, BertForSequenceClassification};
use models::gpt2::{Gpt2ForSequenceClassification, Gpt2LmHeadModel};
use models::llama::{LlamaForCausalLM, LlamaForSequenceClassification};
use models::roberta::{RobertaForMaskedLM, RobertaForSequenceClassification};
use models::t5::T5ForConditionalGeneration;
use models::t5::zero::T5Spec;
use models::train::{
    ClassifierSpec, Gpt2ClassifierSpec, Gpt2Spec, LlamaClassifierSpec, LlamaSpec, MlmSpec,
};
use models::{Architecture, Head, ModelConfig};
use serde_json::json;

use crate::run::DtypeArg;
use bmtrain_backend::quant::QuantFormat;

/// The fitted constants of one backend path (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Constants {
    /// Values a block keeps per token and unit of width, not counting the FFN.
    width: f64,
    /// … per token and unit of FFN width.
    ffn: f64,
    /// … per token and attention score (`heads × seq`).
    scores: f64,
    /// Bytes per checkpointed block input value (d bytes each).
    saved: f64,
    /// Share of a non-checkpointed block's weights its graph keeps.
    kept: f64,
    /// Copies of the largest segment live at once (module, gradients, flat buffer).
    working: f64,
    /// f32 values per token and vocabulary entry of an LM head (logits, their gradient).
    logits: f64,
    /// The same for a masked-LM head, where ~85% of the rows are not scored and the fused loss
    /// keeps nothing for them.
    mlm_logits: f64,
    /// Bytes per rank besides (thread heap, rayon pool, runtime).
    per_rank: f64,
}

/// The CPU path (fused kernels), fitted on `bench/memory_check.py --fit`.
const CPU: Constants = Constants {
    width: 10.6,
    ffn: 2.5,
    scores: 1.27,
    saved: 3.4,
    kept: 0.8,
    working: 3.9,
    logits: 6.8,
    // Fitted on the masked-LM cases of `bench/memory_check.py` (fit set).
    mlm_logits: 1.3,
    per_rank: 15e6,
};

/// The GPU path: burn's composed ops, counted from what burn's autodiff saves and fitted on CPU
/// runs before the fused kernels existed (not yet measured on a GPU).
const GPU: Constants = Constants {
    width: 11.5,
    ffn: 5.0,
    scores: 2.65,
    saved: 1.0,
    kept: 1.0,
    working: 3.0,
    logits: 3.0,
    mlm_logits: 3.0,
    per_rank: 0.0,
};

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
    /// With --gpu-mem: the f32 master weights and AdamW moments in host memory, a copy of the
    /// weights in the compute dtype on the GPU (as `--offload-optimizer` trains). Without, all
    /// the state is on the GPU.
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
    /// Which parameters train (frozen ones have no gradient or AdamW moments).
    #[command(flatten)]
    freezing: crate::run::FreezeArgs,
}

/// The shapes that decide memory.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The class trained.
    pub architecture: Architecture,
    /// All parameters.
    pub params: usize,
    /// Parameters that train (the others, frozen, have no gradient or AdamW moments).
    pub trainable: usize,
    /// Every parameter's checkpoint name and size, in model order.
    pub sizes: Vec<(String, usize)>,
    /// The embedding segment (also read by a tied LM head).
    pub embedding: usize,
    /// The largest block.
    pub largest_block: usize,
    /// Parameters of all blocks.
    pub block_params: usize,
    /// The head segment.
    pub head: usize,
    /// Whether the head reads the embedding segment (a tied LM head).
    pub tied: bool,
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
    /// Parameters held as codes (`--quantize-base`: QLoRA's base), all frozen.
    pub coded: usize,
    /// Their codes' and scales' bytes.
    pub coded_bytes: f64,
}

impl Shape {
    /// Holds the base's linear layers as `format` codes (`--quantize-base`), as the trainer does:
    /// every block's projections (the layers `zoo quantize` quantizes), from `config`'s model.
    pub fn quantize_base(
        &mut self,
        config: &ModelConfig,
        format: QuantFormat,
    ) -> anyhow::Result<()> {
        let mut model =
            models::AnyModel::<Cpu>::new(self.architecture, config, &Default::default())?;
        let targets = models::quantize::targets(&mut model, false)?;
        self.coded = targets.iter().map(|t| t.shape[0] * t.shape[1]).sum();
        self.coded_bytes = targets
            .iter()
            .map(|t| {
                let [rows, cols] = t.shape;
                (format.code_bytes(rows, cols) + 4 * format.scale_count(rows, cols)) as f64
            })
            .sum();
        Ok(())
    }

    /// Bytes of all parameter values (f32, or codes for those held as codes).
    pub fn value_bytes(&self) -> f64 {
        4.0 * (self.params - self.coded) as f64 + self.coded_bytes
    }

    /// Counts the parameters `frozen` freezes out of the trainable ones.
    pub fn freeze(&mut self, frozen: &bmtrain_backend::trainer::Frozen) {
        let still: usize = self
            .sizes
            .iter()
            .filter(|(name, _)| frozen.freezes(name))
            .map(|(_, len)| len)
            .sum();
        self.trainable = self.params - still;
    }
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
    /// Ranks (the world the state is sharded over).
    pub ranks: usize,
    /// How many of them run as threads of one process (the process holds all their shares):
    /// `ranks` for `--ranks N`, 1 under a launcher.
    pub ranks_in_process: usize,
    /// Whether the estimate is for a GPU (device vs host split).
    pub gpu: bool,
    /// GPU only: the master weights and moments in host memory (`--offload-optimizer`).
    pub offload: bool,
}

/// Bytes per category, and what must fit in the budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    /// Master weights, and the weights kept between forward and backward.
    pub parameters: f64,
    /// Gradient shard.
    pub gradients: f64,
    /// AdamW moments.
    pub optimizer: f64,
    /// Saved activations and an LM head's logits.
    pub activations: f64,
    /// One segment's working copies and gradients, and the per-rank runtime.
    pub workspace: f64,
    /// What the device holds (GPU), or everything (CPU), per rank.
    pub peak: f64,
    /// Host memory besides (GPU setups), per rank.
    pub host: f64,
    /// The terms whose constants `bench/memory_check.py --fit` refits, per rank.
    pub features: Features,
}

/// The fitted terms of an estimate, in bytes with the current constants, per rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// `16P/N`.
    pub state: f64,
    /// Weights kept in graphs (no checkpointing) or gathered buffers kept (stage 2).
    pub kept: f64,
    /// The largest segment's working set.
    pub working: f64,
    /// Activations proportional to the width.
    pub act_width: f64,
    /// … to the FFN width.
    pub act_ffn: f64,
    /// … to the attention scores.
    pub act_scores: f64,
    /// Checkpointed blocks' inputs.
    pub saved_inputs: f64,
    /// An LM head's logits and their gradient.
    pub head_logits: f64,
    /// The fixed per-rank bytes.
    pub ranks: f64,
}

impl Estimate {
    /// What one process holds: thread ranks of a CPU job share it, so every rank's share.
    pub fn process(&self, setup: &Setup) -> f64 {
        if setup.gpu {
            self.peak
        } else {
            self.peak * setup.ranks_in_process.max(1) as f64
        }
    }
}

/// The estimate of one rank's peak.
pub fn estimate(shape: &Shape, setup: &Setup) -> Estimate {
    let c = if setup.gpu { GPU } else { CPU };
    let n = setup.ranks.max(1) as f64;
    // Frozen parameters keep their f32 values; only trainable ones have gradients and moments.
    let trained = shape.trainable as f64;
    let d = setup.dtype_bytes as f64;
    let rows = setup.batch as f64 / n;
    let tokens = rows * setup.seq as f64;
    let (h, f, a, t) = (
        shape.hidden as f64,
        shape.ffn as f64,
        shape.heads as f64,
        setup.seq as f64,
    );
    let layers = shape.layers as f64;
    // A checkpointed model keeps one block's graph (while it is recomputed), the others all.
    let graphs = if setup.checkpointing { 1.0 } else { layers };
    let act_width = graphs * tokens * c.width * h * d;
    let act_ffn = graphs * tokens * c.ffn * f * d;
    // On a GPU, attention is the flash kernels (`kernels::flash`, heads up to
    // FLASH_MAX_HEAD_DIM wide): no scores or probabilities kept, one f32 log-sum-exp per query row
    // and head, and the f32 mask they read, built once per forward. T5's position bias is itself
    // a `[batch, heads, q, k]` tensor, kept with its f32 copy, and its f32 gradient in backward.
    let flash = setup.gpu
        && shape.heads > 0
        && shape.hidden / shape.heads <= bmtrain_backend::kernels::FLASH_MAX_HEAD_DIM;
    let act_scores = if flash {
        let position_bias = if shape.architecture.family() == models::Family::T5 {
            (d + 8.0) * t
        } else {
            0.0
        };
        graphs * tokens * a * (4.0 + position_bias) + tokens * t * 4.0
    } else {
        graphs * tokens * c.scores * a * t * d
    };
    let saved_inputs = if setup.checkpointing {
        c.saved * layers * tokens * h * d
    } else {
        0.0
    };
    let logits_copies = match shape.architecture {
        Architecture::BertForMaskedLM | Architecture::RobertaForMaskedLM => c.mlm_logits,
        _ => c.logits,
    };
    let vocab = shape.lm_vocab as f64;
    let head_logits = if setup.gpu && shape.lm_vocab > 0 {
        // The chunked head loss (`kernels::lm_head_loss`, every LM head on a GPU): one chunk's
        // logits and their copies,
        // and the f32 gradients it holds from forward to backward: the hidden states', and the
        // weight's when the head trains (a full run; LoRA and BitFit freeze it).
        let chunk = tokens.min(bmtrain_backend::kernels::chunk_rows(shape.lm_vocab) as f64);
        let weight_grad = if shape.trainable == shape.params {
            4.0 * vocab * h
        } else {
            0.0
        };
        chunk * vocab * logits_copies * 4.0 + 4.0 * tokens * h + weight_grad
    } else {
        tokens * vocab * logits_copies * 4.0
    };
    let stage2 = setup.zero_stage == 2 && setup.ranks > 1;
    // Codes are block weights (every block alike): a block's working copy holds its codes
    // instead of their dense values, counted here in compute-dtype parameters.
    let coded = shape.coded as f64;
    let blocks = shape.block_params as f64 - coded + shape.coded_bytes / d;
    let block = shape.largest_block as f64 - (coded - shape.coded_bytes / d) / layers.max(1.0);
    let kept = if setup.checkpointing {
        0.0
    } else {
        c.kept * d * blocks
    } + if stage2 {
        4.0 * (shape.block_params as f64 - coded + shape.embedding as f64) + shape.coded_bytes
    } else {
        0.0
    };
    let tied = if shape.tied { shape.embedding } else { 0 };
    let widest = block
        .max(shape.embedding as f64)
        .max((shape.head + tied) as f64);
    let working = c.working * d * widest;
    // On a GPU: the runtime, and burn's composed backward, whose transients are about one
    // block's activations again (the CPU kernels' are within the fitted terms).
    let runtime = if setup.gpu {
        RUNTIME_GPU_BYTES + (act_width + act_ffn + act_scores) / graphs
    } else {
        0.0
    };
    let features = Features {
        state: (shape.value_bytes() + 12.0 * trained) / n,
        kept,
        working,
        act_width,
        act_ffn,
        act_scores,
        saved_inputs,
        head_logits,
        ranks: c.per_rank,
    };

    let master = shape.value_bytes() / n;
    let grad_shard = 4.0 * trained / n;
    let optimizer = 8.0 * trained / n;
    let activations = act_width + act_ffn + act_scores + saved_inputs + head_logits;
    let workspace = working + c.per_rank + runtime;
    let parameters = master + kept;
    let gradients = grad_shard;
    // On a GPU the device holds the working copies, kept weights, activations and workspace,
    // and, with more ranks (NCCL on the device's buffers, overlapping computation), the next
    // segment gathered ahead in the compute dtype and a block's f32 gradient whose
    // reduce-scatter is still in flight. The state is on the device too, unless offloaded:
    // then the device holds the gradient shard and a compute-dtype copy of the weight shard,
    // the host the f32 master and the moments (and one segment's gradient while it steps).
    // On a CPU all is one memory.
    let staging = match n > 1.0 {
        true => (d + 4.0) * widest,
        false => 0.0,
    };
    let (peak, host) = if setup.gpu && setup.offload {
        let copy = (d * (shape.params - shape.coded) as f64 + shape.coded_bytes) / n;
        (
            copy + grad_shard + kept + activations + workspace + staging,
            master + optimizer + 4.0 * widest,
        )
    } else if setup.gpu {
        // In a half compute dtype the frozen weights (LoRA's base) are on the device in it,
        // their f32 values on the host for checkpoints.
        let frozen = (shape.params - shape.coded - shape.trainable) as f64 / n;
        let (on_device, on_host) = match d < 4.0 {
            true => (master - (4.0 - d) * frozen, 4.0 * frozen),
            false => (master, 0.0),
        };
        (
            on_device + grad_shard + optimizer + kept + activations + workspace + staging,
            on_host,
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
        features,
    }
}

/// The largest global batch (a multiple of the ranks) whose peak fits `budget`.
pub fn max_batch(shape: &Shape, setup: &Setup, budget: f64) -> usize {
    let fits = |batch: usize| {
        let setup = Setup { batch, ..*setup };
        estimate(shape, &setup).process(&setup) <= budget
    };
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

/// The trained class and shapes of `--model`, with its segments as the trainer cuts them.
pub fn shape_of(model: &str, freezing: &crate::run::FreezeArgs) -> anyhow::Result<Shape> {
    let (architecture, config) = config_of(model)?;
    let lora = freezing.lora(architecture.family())?;
    shape_of_adapted(architecture, &config, lora.as_ref())
        .with_context(|| format!("--model {model}"))
}

/// The class and config `--model` names: a directory's, a `config.json`'s or a preset's.
pub fn config_of(model: &str) -> anyhow::Result<(Architecture, ModelConfig)> {
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
    Ok((architecture, config))
}

/// The trained class and shapes of a config: the segments of the lazily built model (nothing
/// is allocated), cut as the training jobs cut it. A class with a head trains as itself; a bare
/// body as the family's causal or seq2seq LM, or (BERT, RoBERTa) as a sequence classifier.
pub fn shape_of_config(architecture: Architecture, config: &ModelConfig) -> anyhow::Result<Shape> {
    shape_of_adapted(architecture, config, None)
}

/// [`shape_of_config`] with LoRA adapters attached (their parameters are in the segments).
pub fn shape_of_adapted(
    architecture: Architecture,
    config: &ModelConfig,
    lora: Option<&models::adapters::LoraSpec>,
) -> anyhow::Result<Shape> {
    let family = architecture.family();
    let trained = match architecture.head() {
        Head::Body => [Head::CausalLm, Head::Seq2seq, Head::Classify]
            .into_iter()
            .find_map(|head| Architecture::for_head(family, config, head))
            .with_context(|| format!("zoo trains no {family:?} model"))?,
        _ => architecture,
    };
    // A classifier's labels are its config's (`num_labels`, `id2label`, else 2, as the model
    // builds them); its head holds no vocabulary.
    let lm_vocab = match trained.head() {
        Head::Classify => 0,
        _ => config.vocab_size(),
    };
    let [hidden, ffn, heads] = config.activation_dims();
    let dims = [hidden, ffn, heads, lm_vocab];
    let device = Default::default();
    Ok(match (config, trained) {
        (ModelConfig::Gpt2(c), Architecture::Gpt2ForSequenceClassification) => {
            let model = crate::run::adapted(
                Gpt2ForSequenceClassification::<Cpu>::new(c, &device)?,
                lora,
                &device,
            )?;
            shape_of_cut(trained, Gpt2ClassifierSpec::split(model), dims)
        }
        (ModelConfig::Gpt2(c), _) => {
            let model =
                crate::run::adapted(Gpt2LmHeadModel::<Cpu>::new(c, &device)?, lora, &device)?;
            shape_of_cut(trained, Gpt2Spec::split(model), dims)
        }
        (ModelConfig::Bert(c), Architecture::BertForMaskedLM) => {
            let model =
                crate::run::adapted(BertForMaskedLM::<Cpu>::new(c, &device)?, lora, &device)?;
            shape_of_cut(trained, MlmSpec::split_bert(model), dims)
        }
        (ModelConfig::Bert(c), Architecture::RobertaForMaskedLM) => {
            let model =
                crate::run::adapted(RobertaForMaskedLM::<Cpu>::new(c, &device)?, lora, &device)?;
            shape_of_cut(trained, MlmSpec::split_roberta(model), dims)
        }
        (ModelConfig::Bert(c), Architecture::RobertaForSequenceClassification) => {
            let model = crate::run::adapted(
                RobertaForSequenceClassification::<Cpu>::new(c, &device)?,
                lora,
                &device,
            )?;
            shape_of_cut(trained, ClassifierSpec::split_roberta(model), dims)
        }
        (ModelConfig::Bert(c), _) => {
            let model = crate::run::adapted(
                BertForSequenceClassification::<Cpu>::new(c, &device)?,
                lora,
                &device,
            )?;
            shape_of_cut(trained, ClassifierSpec::split_bert(model, c), dims)
        }
        (ModelConfig::T5(c), _) => {
            let model = crate::run::adapted(
                T5ForConditionalGeneration::<Cpu>::new(c, &device)?,
                lora,
                &device,
            )?;
            shape_of_cut(trained, T5Spec::split(model)?, dims)
        }
        (ModelConfig::Llama(c), _) if trained.head() == Head::Classify => {
            let model = crate::run::adapted(
                LlamaForSequenceClassification::<Cpu>::new(c, &device)?,
                lora,
                &device,
            )?;
            shape_of_cut(trained, LlamaClassifierSpec::split(model), dims)
        }
        (ModelConfig::Llama(c), _) => {
            let model =
                crate::run::adapted(LlamaForCausalLM::<Cpu>::new(c, &device)?, lora, &device)?;
            shape_of_cut(trained, LlamaSpec::split(model), dims)
        }
    })
}

/// The [`Shape`] of a cut: its segments' sizes, and `[hidden, ffn, heads, lm_vocab]` of its
/// blocks and head (`lm_vocab` 0 for a classifier).
fn shape_of_cut<S: bmtrain_backend::trainer::ZeroSpec<Cpu>>(
    architecture: Architecture,
    (spec, embed, blocks, head): (S, S::Embed, Vec<S::Block>, S::Head),
    [hidden, ffn, heads, lm_vocab]: [usize; 4],
) -> Shape {
    use bmtrain_backend::trainer::SegmentId;
    let mut sizes = Vec::new();
    let mut measure = |id: SegmentId, layout: bmtrain_backend::zero::FlatLayout| {
        let prefix = spec.prefix(id);
        sizes.extend(layout.entries.iter().map(|e| {
            let name = bmtrain_backend::checkpoint::tensor_name(&prefix, &e.name);
            (name, e.len())
        }));
        layout.len
    };
    let embedding = measure(SegmentId::Embed, layout_of::<Cpu, _>(&embed));
    let block_sizes: Vec<usize> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| measure(SegmentId::Block(i), layout_of::<Cpu, _>(b)))
        .collect();
    let head = measure(SegmentId::Head, layout_of::<Cpu, _>(&head));
    let block_params = block_sizes.iter().sum::<usize>();
    let params = embedding + block_params + head;
    Shape {
        architecture,
        params,
        trainable: params,
        sizes,
        embedding,
        largest_block: block_sizes.iter().copied().max().unwrap_or(0),
        block_params,
        head,
        tied: spec.head_reads_embed(),
        layers: blocks.len(),
        hidden,
        ffn,
        heads,
        lm_vocab,
        coded: 0,
        coded_bytes: 0.0,
    }
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

/// A `/proc/meminfo` field in bytes.
fn meminfo(field: &str) -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb * 1024.0)
}

/// A number in a cgroup file, or `None` for "max", absent or unreadable.
fn cgroup_number(path: &str) -> Option<f64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The cgroup's memory limit and usage (v2, else v1), when the process is limited.
fn cgroup_memory() -> Option<(f64, f64)> {
    let v2 = cgroup_number("/sys/fs/cgroup/memory.max")
        .zip(cgroup_number("/sys/fs/cgroup/memory.current"));
    let v1 = || {
        cgroup_number("/sys/fs/cgroup/memory/memory.limit_in_bytes")
            .zip(cgroup_number("/sys/fs/cgroup/memory/memory.usage_in_bytes"))
            // v1 reports "no limit" as a huge number.
            .filter(|(limit, _)| *limit < 1e18)
    };
    v2.or_else(v1)
}

/// The memory this machine has for the budget of `zoo memory` (without `--mem`): the cgroup's
/// limit when the process has one, else the machine's total.
fn machine_memory() -> Option<f64> {
    match cgroup_memory() {
        Some((limit, _)) => Some(meminfo("MemTotal:").map_or(limit, |total| total.min(limit))),
        None => meminfo("MemTotal:"),
    }
}

/// The memory this process may still take: `MemAvailable`, or what the cgroup's limit leaves
/// when that is less. What commands check a model against before building it.
pub fn available_memory() -> Option<f64> {
    let available = meminfo("MemAvailable:");
    let cgroup = cgroup_memory().map(|(limit, used)| (limit - used).max(0.0));
    match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// What `--auto` chose: the memory settings of a job and the estimate they were chosen by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoPlan {
    /// Rows per micro-batch over all ranks.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step (`micro_batch × grad_accum` = the global batch).
    pub grad_accum: usize,
    /// Block checkpointing.
    pub checkpointing: bool,
    /// ZeRO stage.
    pub zero_stage: u8,
    /// The estimate of this process's peak with these settings (plus what it already holds).
    pub estimate: f64,
    /// The budget they were fitted into.
    pub budget: f64,
}

/// Share of the budget a plan may take: the estimate errs by up to ±25% (README: *Memory*).
pub const AUTO_MARGIN: f64 = 0.85;

/// Chooses the fastest memory settings that fit: for a global batch of `global_batch` rows
/// (a multiple of the ranks), every split into micro-batch × grad-accum, with and without block
/// checkpointing, ZeRO stage 3 or (several ranks) 2, whose estimate plus `resident` (what the
/// process holds already) is within [`AUTO_MARGIN`] of `budget`; of those, the one with the
/// least relative step time, modelled as ×4/3 for checkpointing (a second forward), ×1.05 for
/// stage 3 over 2 (a second gather), and ×(r + 1)/r for r rows per rank and micro-batch (small
/// products and a gather of every segment per micro-batch). `None` when nothing fits, not even
/// one row with checkpointing.
pub fn choose(
    shape: &Shape,
    base: &Setup,
    global_batch: usize,
    resident: f64,
    budget: f64,
) -> Option<AutoPlan> {
    let world = base.ranks.max(1);
    let rows = global_batch / world;
    let mut best: Option<(f64, AutoPlan)> = None;
    for per_rank in (1..=rows).rev().filter(|r| rows.is_multiple_of(*r)) {
        for checkpointing in [false, true] {
            for zero_stage in [3u8, 2] {
                if zero_stage == 2 && world == 1 {
                    continue;
                }
                let setup = Setup {
                    batch: per_rank * world,
                    checkpointing,
                    zero_stage,
                    ..*base
                };
                let estimate = estimate(shape, &setup).process(&setup) + resident;
                if estimate > AUTO_MARGIN * budget {
                    continue;
                }
                let time = if checkpointing { 4.0 / 3.0 } else { 1.0 }
                    * if zero_stage == 3 && world > 1 {
                        1.05
                    } else {
                        1.0
                    }
                    * (per_rank as f64 + 1.0)
                    / per_rank as f64;
                let plan = AutoPlan {
                    micro_batch: per_rank * world,
                    grad_accum: rows / per_rank,
                    checkpointing,
                    zero_stage,
                    estimate,
                    budget,
                };
                if best.as_ref().is_none_or(|(t, _)| time < *t - 1e-12) {
                    best = Some((time, plan));
                }
            }
        }
    }
    best.map(|(_, plan)| plan)
}

/// Refuses, before anything is allocated, a training job whose sharded state (f32 master
/// weights, gradients and AdamW moments: 16 bytes a parameter, this process's share of them)
/// exceeds `budget`; warns when the whole estimate does (the job may still fit with
/// `--checkpointing` or a smaller batch: `--auto` picks them).
pub fn check_training_fits(
    shape: &Shape,
    setup: &Setup,
    budget: f64,
    what: &str,
) -> anyhow::Result<()> {
    let world = setup.ranks.max(1);
    let ranks_here = setup.ranks_in_process.max(1);
    let state =
        (shape.value_bytes() + 12.0 * shape.trainable as f64) * ranks_here as f64 / world as f64;
    ensure!(
        state <= budget,
        "{what}: the weights alone, with their gradients and AdamW moments, need {:.2} GB \
         ({:.1}M parameters × 4 bytes + {:.1}M trainable × 12 bytes{}), more than the {:.2} GB \
         of memory available",
        state / 1e9,
        shape.params as f64 / 1e6,
        shape.trainable as f64 / 1e6,
        if world > ranks_here {
            format!(", this process's share of {world} ranks")
        } else {
            String::new()
        },
        budget / 1e9
    );
    let estimate = estimate(shape, setup);
    let peak = estimate.process(setup);
    if peak > budget {
        eprintln!(
            "warning: {what}: zoo memory estimates {:.2} GB for this setup, more than the {:.2} GB \
             available (--checkpointing, a smaller --batch with --grad-accum, or --auto would fit it)",
            peak / 1e9,
            budget / 1e9
        );
    }
    Ok(())
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
    let mut shape = shape_of(&args.model, &args.freezing)?;
    if let Some(rule) = args.freezing.frozen(Default::default())? {
        shape.freeze(&rule);
    }
    if let Some(format) = args.freezing.quantize_format()? {
        let (_, config) = config_of(&args.model)?;
        shape.quantize_base(&config, format)?;
    }
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
        ranks_in_process: args.ranks,
        gpu: args.gpu_mem.is_some(),
        offload: args.offload_optimizer,
    };
    let budget = match (&args.gpu_mem, &args.mem) {
        (Some(size), _) | (None, Some(size)) => Some(parse_size(size)?),
        (None, None) => machine_memory(),
    };
    let estimate = estimate(&shape, &setup);
    let fits = budget.map(|b| estimate.process(&setup) <= b);
    // The fitted terms are reported for the whole process (thread ranks share it).
    let n = if setup.gpu {
        1.0
    } else {
        setup.ranks_in_process as f64
    };
    let max = budget.map(|b| max_batch(&shape, &setup, b));
    if args.json {
        println!(
            "{}",
            json!({
                "model": args.model,
                "architecture": shape.architecture.hf_name(),
                "params": shape.params,
                "trainable_params": shape.trainable,
                "quantized_params": shape.coded,
                "quantized_bytes": shape.coded_bytes.round(),
                "seq": args.seq,
                "batch": args.batch,
                "ranks": args.ranks,
                "device": if setup.gpu { "gpu" } else { "cpu" },
                "offload_optimizer": setup.gpu && setup.offload,
                "parameters_bytes": estimate.parameters.round(),
                "gradients_bytes": estimate.gradients.round(),
                "optimizer_bytes": estimate.optimizer.round(),
                "activations_bytes": estimate.activations.round(),
                "workspace_bytes": estimate.workspace.round(),
                "peak_bytes": estimate.peak.round(),
                "process_bytes": estimate.process(&setup).round(),
                "host_bytes": estimate.host.round(),
                "features": {
                    "state": estimate.features.state * n,
                    "kept": estimate.features.kept * n,
                    "working": estimate.features.working * n,
                    "act_width": estimate.features.act_width * n,
                    "act_ffn": estimate.features.act_ffn * n,
                    "act_scores": estimate.features.act_scores * n,
                    "saved_inputs": estimate.features.saved_inputs * n,
                    "head_logits": estimate.features.head_logits * n,
                    "ranks": estimate.features.ranks * n,
                },
                "budget_bytes": budget.map(f64::round),
                "fits": fits,
                "max_batch": max,
            })
        );
        return Ok(());
    }
    let gb = |b: f64| format!("{:>9.3} GB", b / 1e9);
    let mut trainable = match shape.trainable == shape.params {
        true => String::new(),
        false => format!(", {:.2}M trainable", shape.trainable as f64 / 1e6),
    };
    if shape.coded > 0 {
        trainable += &format!(
            ", {:.1}M held as codes in {:.2} GB (f32: {:.2} GB)",
            shape.coded as f64 / 1e6,
            shape.coded_bytes / 1e9,
            4.0 * shape.coded as f64 / 1e9
        );
    }
    println!(
        "{} ({}, {:.1}M parameters{trainable}), {} × {} tokens over {} rank(s), {:?}{}, ZeRO \
         stage {}",
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
        "  parameters   {}  (f32 master shard{} + weights kept for backward)",
        gb(estimate.parameters),
        match setup.gpu && setup.offload {
            true => " on the host, its copy in the compute dtype on the GPU,",
            false => "",
        }
    );
    println!("  gradients    {}  (f32 shard)", gb(estimate.gradients));
    println!(
        "  optimizer    {}  (AdamW moments, {})",
        gb(estimate.optimizer),
        match (setup.gpu, setup.offload) {
            (true, false) => "on the GPU",
            (true, true) => "offloaded to the host",
            (false, _) => "host",
        }
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
        if setup.ranks > 1 {
            println!(
                "  process      {}  ({} thread ranks share one process)",
                gb(estimate.process(&setup)),
                setup.ranks
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2_shape() -> Shape {
        let preset = models::preset("gpt2").unwrap();
        shape_of_config(Architecture::Gpt2LmHeadModel, &preset.config).unwrap()
    }

    fn setup(batch: usize) -> Setup {
        Setup {
            seq: 512,
            batch,
            dtype_bytes: 4,
            checkpointing: false,
            zero_stage: 3,
            ranks: 1,
            ranks_in_process: 1,
            gpu: false,
            offload: false,
        }
    }

    #[test]
    fn segments_come_from_the_trainers_cut() {
        let shape = gpt2_shape();
        assert_eq!(shape.params, 124_439_808);
        // wte (50257 × 768) + wpe (1024 × 768), and the tied head reads it.
        assert_eq!(shape.embedding, 50257 * 768 + 1024 * 768);
        assert!(shape.tied);
        assert_eq!(shape.layers, 12);
        assert_eq!(shape.block_params, 12 * shape.largest_block);
    }

    /// On a GPU the f32 master, gradient and moments are device memory; offloaded, the master
    /// and moments (12 bytes a parameter) move to the host and a compute-dtype copy of the
    /// weights (2 bytes in f16) takes their place on the device.
    #[test]
    fn gpu_state_lives_on_the_device_unless_offloaded() {
        let preset = models::preset("bert-large-uncased").unwrap();
        let shape =
            shape_of_config(Architecture::BertForSequenceClassification, &preset.config).unwrap();
        let gpu = |offload| Setup {
            dtype_bytes: 2,
            checkpointing: true,
            gpu: true,
            offload,
            ..setup(8)
        };
        let (device, offloaded) = (estimate(&shape, &gpu(false)), estimate(&shape, &gpu(true)));
        let p = shape.params as f64;
        let moved = device.peak - offloaded.peak;
        assert!((moved - 10.0 * p).abs() < 1.0, "{moved} vs {}", 10.0 * p);
        assert_eq!(device.host, 0.0);
        assert!(
            offloaded.host > 12.0 * p && offloaded.host < 12.5 * p,
            "{}",
            offloaded.host
        );
        // The same activations and workspace either way.
        assert_eq!(device.activations, offloaded.activations);
    }

    /// With the state on the GPU in a half dtype, a frozen weight (LoRA's base) costs the device
    /// 2 bytes, not the trained weight's 16 (master, gradient, moments), and the host its 4.
    #[test]
    fn frozen_weights_sit_on_the_gpu_in_the_compute_dtype() {
        let preset = models::preset("bert-large-uncased").unwrap();
        let mut shape =
            shape_of_config(Architecture::BertForSequenceClassification, &preset.config).unwrap();
        let gpu = |dtype_bytes| Setup {
            dtype_bytes,
            checkpointing: true,
            gpu: true,
            ..setup(8)
        };
        let (trained_f16, trained_f32) = (estimate(&shape, &gpu(2)), estimate(&shape, &gpu(4)));
        shape.trainable = 1000;
        let (frozen_f16, frozen_f32) = (estimate(&shape, &gpu(2)), estimate(&shape, &gpu(4)));
        let frozen = (shape.params - 1000) as f64;
        let saved = trained_f16.peak - frozen_f16.peak;
        assert!(
            (saved - 14.0 * frozen).abs() < 1.0,
            "{saved} vs {}",
            14.0 * frozen
        );
        assert!((frozen_f16.host - trained_f16.host - 4.0 * frozen).abs() < 1.0);
        // In f32 the frozen weights stay on the device: 12 bytes saved, nothing on the host.
        let saved = trained_f32.peak - frozen_f32.peak;
        assert!(
            (saved - 12.0 * frozen).abs() < 1.0,
            "{saved} vs {}",
            12.0 * frozen
        );
        assert_eq!(frozen_f32.host, trained_f32.host);
    }

    #[test]
    fn auto_takes_the_whole_batch_when_it_fits_and_splits_it_when_not() {
        let shape = gpt2_shape();
        let roomy = choose(&shape, &setup(8), 8, 0.0, 1e12).unwrap();
        assert_eq!((roomy.micro_batch, roomy.grad_accum), (8, 1));
        assert!(!roomy.checkpointing);
        // Between the estimates of 2 and 8 rows without checkpointing: a split, still fitting.
        let two = estimate(&shape, &setup(2)).process(&setup(2));
        let eight = estimate(&shape, &setup(8)).process(&setup(8));
        let budget = (two + eight) / 2.0 / AUTO_MARGIN;
        let tight = choose(&shape, &setup(8), 8, 0.0, budget).unwrap();
        assert_eq!(tight.micro_batch * tight.grad_accum, 8);
        assert!(tight.micro_batch < 8 && tight.estimate <= AUTO_MARGIN * budget);
        // Less than the sharded state alone: nothing fits.
        assert!(choose(&shape, &setup(8), 8, 0.0, 16.0 * shape.params as f64).is_none());
    }
}
