//! What every training job shares: ranks (threads, processes or GPUs), the memory options, the
//! run directory with its `metrics.jsonl` and checkpoints, the progress bar, and Ctrl-C.
//!
//! A run directory:
//! - `metrics.jsonl`: one JSON object per logged step (`step`, `loss`, `lr`, `tokens_per_s`, …)
//!   and per evaluation (`step`, `valid_loss`, `accuracy`, …);
//! - `checkpoints/step-NNNNNNN/` (pretrain) or `checkpoints/{last,best}/` (finetune): each a zoo
//!   model directory (`zoo.json`, `model.safetensors` under zoo names, `tokenizer.json`) plus
//!   `optimizer.safetensors` and `trainer_state.json`, written in a staging directory and renamed;
//! - `checkpoints/latest`: the name of the newest checkpoint (written, then renamed).

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bmtrain_backend::DeviceSpec;
use bmtrain_backend::checkpoint::{self, FileDigest};
use bmtrain_backend::comm::{Communicator, ReduceOp, SingleRank, ThreadGroup};
use bmtrain_backend::device_memory::DeviceMemory;
use bmtrain_backend::dist::DistEnv;
use bmtrain_backend::optim::{AdamWConfig, LossScaler};
use bmtrain_backend::quant::QuantFormat;
use bmtrain_backend::trainer::{
    Frozen, Overlap, QuantizedBase, StatePlacement, ZeroOptions, ZeroSpec, ZeroTrainer,
};
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use checkpoints_convert::ZooManifest;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use models::adapters::LoraSpec;
use serde_json::{Value, json};

/// How long a collective waits for its peers by default (`--comm-timeout`): every rank joins
/// evaluation and checkpointing segment by segment, so no rank waits long on another in a healthy
/// job; the first collective also waits for every rank's setup (reading and tokenising the data).
pub const DEFAULT_COMM_TIMEOUT_S: u64 = 600;

/// The memory and placement options of every training job.
#[derive(Args, Debug, Clone)]
pub struct MemoryArgs {
    /// Recompute every block in backward instead of storing its activations.
    #[arg(long)]
    pub checkpointing: bool,
    /// 3: gather each block's weights again in backward; 2: keep them from forward to backward.
    /// Parameters, gradients and optimizer state are sharded over the ranks either way.
    #[arg(long, default_value_t = 3)]
    pub zero_stage: u8,
    /// Compute dtype; master weights, gradients and AdamW state stay f32 [default: f32; with
    /// --auto on a GPU: bf16].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Choose the memory settings: from --batch (the global batch of a step) and the memory
    /// budget, the fastest split into micro-batch × grad-accum, with or without --checkpointing,
    /// ZeRO stage 3 or 2, that `zoo memory` says fits (within 85% of the budget); bf16 on a GPU
    /// unless --dtype. The choice is printed and recorded in trainer_state.json; a micro-batch
    /// that goes over the budget anyway is halved (grad-accum doubled) and its step retried once.
    #[arg(long)]
    pub auto: bool,
    /// Host memory budget of --auto, e.g. 24GB (default: what is available now: MemAvailable,
    /// or the cgroup's limit).
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// GPU memory budget of --auto on a GPU, e.g. 11GB (default: the GPU's free memory).
    #[arg(long, value_name = "SIZE")]
    pub gpu_mem: Option<String>,
    /// Hold the GPU allocator to this many bytes, e.g. 11GB, to simulate a smaller card on a
    /// larger one: the job stops with an error naming the limit and what was reserved when a
    /// micro-batch takes more (with --auto: the micro-batch is halved and the step retried, as
    /// for --auto's own budget, which this also sets). Checked after every micro-batch against
    /// the allocator's highest reading, taken after every block.
    #[arg(long, value_name = "SIZE")]
    pub gpu_mem_limit: Option<String>,
    /// On a GPU, keep the f32 master weights and AdamW moments in host memory (ZeRO-Offload:
    /// 12 bytes a parameter off the GPU), the gradients and a copy of the weights in the compute
    /// dtype on it; gradients come down and weights go up once per optimizer step, and AdamW
    /// runs on the host's threads. Without it all the state lives on the GPU, where unscale,
    /// the overflow check, clipping and AdamW run as tensor operations. On the CPU the host is
    /// the device: nothing changes.
    #[arg(long)]
    pub offload_optimizer: bool,
    /// Which parameters train.
    #[command(flatten)]
    pub freezing: FreezeArgs,
    /// Ranks as threads of this process (data parallel + ZeRO). Under `zoo launch` or torchrun
    /// the ranks are processes instead, and this stays 1.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Where to run: cpu or cuda:N (under a launcher: cuda, and LOCAL_RANK picks the GPU).
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    pub device: DeviceSpec,
    /// Seconds a collective waits for the other ranks before the job stops with an error naming
    /// the ranks that did not answer (thread, TCP and NCCL ranks alike). A rank that dies is
    /// noticed at once; this bounds one that hangs.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_COMM_TIMEOUT_S)]
    pub comm_timeout: u64,
}

/// Which parameters train: shared by the training jobs and `zoo memory`.
#[derive(Args, Debug, Clone, Default)]
pub struct FreezeArgs {
    /// Freeze the parameters whose zoo name (as in a checkpoint's `model.safetensors`, e.g.
    /// `bert.embeddings.word_embeddings.weight`) matches this regular expression, searched
    /// anywhere in the name; repeat for several. Frozen parameters are sharded like the others
    /// but have no gradient, no optimizer state and no gradient reduce-scatter.
    #[arg(long, value_name = "REGEX")]
    pub freeze: Vec<String>,
    /// BitFit (Ben Zaken et al. 2022): train only the biases (linear biases and layer norms'
    /// shifts), a classifier's head and the parameters the checkpoint does not have; freeze the
    /// rest.
    #[arg(long)]
    pub bitfit: bool,
    /// LoRA (Hu et al. 2021, as PEFT): attach rank-R updates to the --lora-targets layers and
    /// train only those, a classifier's head (PEFT's modules_to_save) and any parameter the
    /// checkpoint lacks; every other parameter is frozen. 0: no LoRA.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub lora_r: usize,
    /// LoRA's `lora_alpha`: updates are scaled by alpha / r (PEFT's default 8).
    #[arg(long, value_name = "ALPHA", default_value_t = 8.0)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA updates' inputs.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// The layers LoRA adapts, comma-separated: the Llama family q_proj, k_proj, v_proj, o_proj,
    /// gate_proj, up_proj, down_proj; BERT / RoBERTa query, key, value, attention_output,
    /// intermediate, output; GPT-2 query, key, value, attn_c_proj, c_fc, mlp_c_proj; T5 q, k, v,
    /// o, wi (wi_0, wi_1 when gated), wo. Default: PEFT's per family (query and value; GPT-2's
    /// c_attn: query, key and value).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// QLoRA (Dettmers et al. 2023): hold the frozen base's linear layers (the layers
    /// --lora-targets names from; every block projection) as 4-bit NF4 (blocks of 64) or int8
    /// (per output channel) codes, quantized as `zoo quantize` does when the model is sharded,
    /// and train the adapters (--lora-r) or biases (--bitfit) on them. The codes are sharded
    /// over the ranks like the other weights and dequantized one strip at a time in forward and
    /// backward; no f32 copy of those layers is kept. Checkpoints hold the adapters and the
    /// other parameters; the codes are made again from --model on resume.
    #[arg(long, value_name = "BITS")]
    pub quantize_base: Option<u32>,
}

impl FreezeArgs {
    /// The LoRA setup of --lora-r (`None` without), with the family's default targets.
    pub fn lora(&self, family: models::Family) -> anyhow::Result<Option<LoraSpec>> {
        if self.lora_r == 0 {
            ensure!(
                self.lora_targets.is_empty(),
                "--lora-targets needs --lora-r (the rank)"
            );
            return Ok(None);
        }
        let targets = match self.lora_targets.is_empty() {
            true => models::adapters::default_targets(family)
                .iter()
                .map(|t| t.to_string())
                .collect(),
            false => self.lora_targets.clone(),
        };
        let spec = LoraSpec {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
        };
        spec.validate().map_err(|e| anyhow::anyhow!("LoRA: {e}"))?;
        Ok(Some(spec))
    }

    /// The format of `--quantize-base`, checked: 4 (NF4) or 8 (int8), and only with a frozen
    /// base (`--lora-r` or `--bitfit`).
    pub fn quantize_format(&self) -> anyhow::Result<Option<QuantFormat>> {
        let Some(bits) = self.quantize_base else {
            return Ok(None);
        };
        let format = QuantFormat::from_bits(bits).with_context(|| {
            format!("--quantize-base {bits}: zoo quantizes a base to 4 bits (NF4) or 8 (int8)")
        })?;
        ensure!(
            self.lora_r > 0 || self.bitfit,
            "--quantize-base quantizes a frozen base: give --lora-r R (QLoRA) or --bitfit"
        );
        Ok(Some(format))
    }

    /// The freezing rule of `--freeze`, `--bitfit` and `--lora-r`, if any; `fresh` holds (once
    /// each segment has been read) the names that started fresh, which BitFit and LoRA train. A
    /// pattern that is not a regular expression is an error naming it.
    pub fn frozen(&self, fresh: Arc<Mutex<HashSet<String>>>) -> anyhow::Result<Option<Frozen>> {
        let lora = self.lora_r > 0;
        if self.freeze.is_empty() && !self.bitfit && !lora {
            return Ok(None);
        }
        let patterns = self
            .freeze
            .iter()
            .map(|p| regex::Regex::new(p).with_context(|| format!("--freeze '{p}'")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (bitfit, restrict) = (self.bitfit, self.bitfit || lora);
        Ok(Some(Frozen::new(move |name| {
            let is_fresh = || fresh.lock().is_ok_and(|f| f.contains(name));
            let trains = (bitfit && is_bias(name))
                || (lora && is_lora(name))
                || is_classifier_head(name)
                || is_fresh();
            patterns.iter().any(|p| p.is_match(name)) || (restrict && !trains)
        })))
    }
}

/// Whether a zoo parameter name is a sequence classifier's head (`classifier.…`, `score.…`):
/// it trains under BitFit and LoRA, as PEFT's `modules_to_save` for `SEQ_CLS`.
fn is_classifier_head(name: &str) -> bool {
    name.starts_with("classifier.") || name.starts_with("score.")
}

/// Whether a zoo parameter name is a LoRA update's (`….lora.a`, `….lora.b`).
fn is_lora(name: &str) -> bool {
    name.contains(".lora.")
}

/// `model` with the LoRA adapters of `lora` attached (as it was without).
pub fn adapted<B: burn::tensor::backend::Backend, M: models::io::ModelClass<B>>(
    mut model: M,
    lora: Option<&LoraSpec>,
    device: &B::Device,
) -> anyhow::Result<M> {
    if let Some(lora) = lora {
        lora.attach(model.adaptable(), device)
            .map_err(|e| anyhow::anyhow!("LoRA: {e}"))?;
    }
    Ok(model)
}

/// `model` with the LoRA adapters of `lora` attached and, with `--quantize-base`, its base
/// linear layers made to run on codes the trainer lends them (QLoRA): the second value is what
/// the trainer needs for that ([`TrainSetup::quantized`]). Each rank prepares its own model.
pub fn prepared<B: burn::tensor::backend::Backend, M>(
    model: M,
    lora: Option<&LoraSpec>,
    freezing: &FreezeArgs,
    device: &B::Device,
) -> anyhow::Result<(M, Option<QuantizedBase>)>
where
    M: models::io::ModelClass<B> + burn::module::Module<B>,
{
    let mut model = adapted(model, lora, device)?;
    let quantized = freezing
        .quantize_format()?
        .map(|format| models::quantize::lend_base(&mut model, format));
    Ok((model, quantized))
}

/// Whether a zoo parameter name is a bias: linear biases, and layer norms' shifts (`beta`).
fn is_bias(name: &str) -> bool {
    name.ends_with(".bias") || name.ends_with(".beta") || name == "bias"
}

/// Where a training job writes and how it reports: shared by `zoo pretrain` and `zoo finetune`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The run directory (default: runs/<job>-<timestamp>).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Continue from a checkpoint or a run directory's latest checkpoint.
    #[arg(long, value_name = "PATH")]
    pub resume: Option<PathBuf>,
    /// Log to metrics.jsonl every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// No progress bar (log lines instead).
    #[arg(long)]
    pub no_progress: bool,
    /// Print the measured peak resident memory of training at the end (Linux).
    #[arg(long)]
    pub report_memory: bool,
}

impl RunArgs {
    /// The run directory for `job` (see [`run_dir`]), created and locked for this job's lifetime
    /// (by rank 0 of a launched job: its ranks share the lock); refuses a directory another live
    /// job holds, and one that already holds a run unless resuming.
    pub fn open_run_dir(&self, job: &str) -> anyhow::Result<(PathBuf, Option<RunLock>)> {
        let dir = run_dir(self.out.as_deref(), self.resume.as_deref(), job);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = if is_lead_process() {
            Some(RunLock::acquire(&dir)?)
        } else {
            None
        };
        check_fresh_run_dir(&dir, self.resume.as_deref())?;
        Ok((dir, lock))
    }

    /// The checkpoint `--resume` names (see [`find_checkpoint`]), if any: `None` also when a run
    /// directory has no checkpoint yet (the run starts afresh, and says so).
    pub fn resume_checkpoint(&self) -> anyhow::Result<Option<PathBuf>> {
        match self.resume.as_deref() {
            None => Ok(None),
            Some(path) => find_checkpoint(path),
        }
    }
}

/// An advisory lock (`flock`) on `RUN_DIR/.lock`, held while the job runs: a second job into the
/// same directory (a double launch, a requeued job whose predecessor still lives) is refused with
/// the holder's pid and host. The kernel releases it when the holder dies, so a lock file left by
/// a crash never blocks.
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    /// Takes the lock of `dir`, or explains who holds it.
    pub fn acquire(dir: &Path) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd;
        let path = dir.join(".lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "{} is in use by another job ({}; lock {}): wait for it to end, or choose another \
                 --out",
                dir.display(),
                if holder.is_empty() {
                    "holder unknown".to_string()
                } else {
                    holder.to_string()
                },
                path.display()
            );
        }
        let record = format!("pid {} on host {}\n", std::process::id(), hostname());
        file.set_len(0)
            .and_then(|()| std::io::Seek::rewind(&mut file))
            .and_then(|()| file.write_all(record.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

/// This machine's host name (for lock records).
fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match ok {
        true => String::from_utf8_lossy(&buffer[..end]).into_owned(),
        false => "unknown".into(),
    }
}

/// `--dtype`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats with dynamic loss scaling.
    F16,
    /// bfloat16.
    Bf16,
}

impl DtypeArg {
    /// The trainer's compute dtype (`None`: f32) and loss scaler (f16 only: dynamic, from 2^16).
    pub fn mixed_precision(self) -> (Option<DType>, Option<LossScaler>) {
        match self {
            DtypeArg::F32 => (None, None),
            DtypeArg::F16 => (Some(DType::F16), Some(LossScaler::new(65536.0))),
            DtypeArg::Bf16 => (Some(DType::BF16), None),
        }
    }
}

impl MemoryArgs {
    /// This job's setup as `zoo memory` models it, for micro-batches of `batch` rows of `seq`
    /// tokens over all ranks.
    pub fn setup(&self, seq: usize, batch: usize) -> crate::memory::Setup {
        crate::memory::Setup {
            seq,
            batch,
            dtype_bytes: match self.dtype.unwrap_or(DtypeArg::F32) {
                DtypeArg::F32 => 4,
                DtypeArg::F16 | DtypeArg::Bf16 => 2,
            },
            checkpointing: self.checkpointing,
            zero_stage: self.zero_stage,
            ranks: self.ranks.max(world_size_from_env()),
            ranks_in_process: self.ranks,
            gpu: matches!(self.device, DeviceSpec::Cuda(_)),
            offload: self.offload_optimizer,
        }
    }

    /// The memory budget of `--auto`: `--gpu-mem` / `--mem`, or what this machine has free.
    pub fn budget(&self) -> anyhow::Result<f64> {
        let gpu = matches!(self.device, DeviceSpec::Cuda(_));
        let budget = match (gpu, &self.gpu_mem, &self.mem) {
            (true, Some(size), _) | (false, _, Some(size)) => crate::memory::parse_size(size),
            (false, _, None) => crate::memory::available_memory()
                .context("--auto: the free memory is unknown here; give it with --mem"),
            (true, None, _) => match self.gpu_limit()? {
                Some(limit) => return Ok(limit),
                None => gpu_free_memory(&self.device),
            },
        }?;
        Ok(self.gpu_limit()?.map_or(budget, |limit| budget.min(limit)))
    }

    /// `--gpu-mem-limit` in bytes; an error on a device with no GPU allocator.
    pub fn gpu_limit(&self) -> anyhow::Result<Option<f64>> {
        gpu_limit(self.gpu_mem_limit.as_deref(), &self.device)
    }

    /// Applies `--auto` for a step of `global_batch` rows of `seq` tokens: sets the checkpointing,
    /// ZeRO stage and (on a GPU, unless given) dtype, and returns the plan, whose micro-batch and
    /// grad-accum the job then uses. Resuming a run that `--auto` planned (`resumed_state`, its
    /// `trainer_state.json`) keeps that run's settings, so that it continues as it would have.
    pub fn apply_auto(
        &mut self,
        architecture: models::Architecture,
        config: &models::ModelConfig,
        seq: usize,
        global_batch: usize,
        resumed_state: Option<&Value>,
    ) -> anyhow::Result<crate::memory::AutoPlan> {
        let lead = is_lead_process();
        if let Some(recorded) = resumed_state.map(|state| &state["auto"])
            && recorded.is_object()
        {
            let plan = crate::memory::AutoPlan {
                micro_batch: recorded["micro_batch"]
                    .as_u64()
                    .context("auto.micro_batch")? as usize,
                grad_accum: recorded["grad_accum"].as_u64().context("auto.grad_accum")? as usize,
                checkpointing: recorded["checkpointing"].as_bool().unwrap_or(false),
                zero_stage: recorded["zero_stage"].as_u64().unwrap_or(3) as u8,
                estimate: recorded["estimate_bytes"].as_f64().unwrap_or(0.0),
                budget: recorded["budget_bytes"].as_f64().unwrap_or(0.0),
            };
            self.checkpointing = plan.checkpointing;
            self.zero_stage = plan.zero_stage;
            if let Some(dtype) = recorded["dtype"].as_str() {
                self.dtype = DtypeArg::from_str(dtype, true).ok();
            }
            if recorded["offload_optimizer"].as_bool() == Some(true) {
                self.offload_optimizer = true;
            }
            if lead {
                eprintln!(
                    "auto: resuming with the run's settings: micro-batch {} × grad-accum {}{}, \
                     ZeRO stage {}",
                    plan.micro_batch,
                    plan.grad_accum,
                    if plan.checkpointing {
                        ", checkpointing"
                    } else {
                        ""
                    },
                    plan.zero_stage
                );
            }
            return Ok(plan);
        }
        let budget = self.budget()?;
        if self.dtype.is_none() && matches!(self.device, DeviceSpec::Cuda(_)) {
            self.dtype = Some(DtypeArg::Bf16);
        }
        let shape = self.shape(architecture, config)?;
        let base = self.setup(seq, global_batch);
        ensure!(
            global_batch.is_multiple_of(base.ranks),
            "--auto: --batch {global_batch} (the global batch) does not split over {} ranks",
            base.ranks
        );
        let resident = if base.gpu {
            0.0
        } else {
            proc_status_bytes("VmRSS:").unwrap_or(0) as f64
        };
        let mut plan = crate::memory::choose(&shape, &base, global_batch, resident, budget);
        if plan.is_none() && base.gpu && !base.offload {
            plan = self.offloaded_plan(&shape, &base, global_batch, budget);
        }
        let plan = plan.with_context(|| {
            format!(
                "--auto: nothing fits in {:.2} GB, not even one row per rank with \
                     checkpointing (the weights and optimizer state alone are {:.2} GB)",
                budget / 1e9,
                16.0 * shape.params as f64 / base.ranks as f64 * base.ranks_in_process as f64 / 1e9
            )
        })?;
        self.checkpointing = plan.checkpointing;
        self.zero_stage = plan.zero_stage;
        if lead {
            eprintln!(
                "auto:{} micro-batch {} × grad-accum {} (global batch {global_batch}){}, ZeRO stage \
                 {}, {}: zoo memory estimates {:.2} GB of the {:.2} GB budget",
                if self.offload_optimizer {
                    " --offload-optimizer,"
                } else {
                    ""
                },
                plan.micro_batch,
                plan.grad_accum,
                if plan.checkpointing {
                    ", checkpointing"
                } else {
                    ", no checkpointing"
                },
                plan.zero_stage,
                dtype_name(self.dtype.unwrap_or(DtypeArg::F32)),
                plan.estimate / 1e9,
                plan.budget / 1e9
            );
        }
        Ok(plan)
    }

    /// `--auto` on a GPU where nothing fits with the state on it: the plan with the master
    /// weights and moments offloaded to the host (and `--offload-optimizer` set), when one fits
    /// the GPU budget and the host has room for its share (within `--auto`'s margin of the free
    /// memory, when known). The state on the GPU is preferred whenever it fits: offloading
    /// costs a gradient read and a weight upload per step and a host AdamW, not yet measured.
    fn offloaded_plan(
        &mut self,
        shape: &crate::memory::Shape,
        base: &crate::memory::Setup,
        global_batch: usize,
        budget: f64,
    ) -> Option<crate::memory::AutoPlan> {
        let offloaded = crate::memory::Setup {
            offload: true,
            ..*base
        };
        let plan = crate::memory::choose(shape, &offloaded, global_batch, 0.0, budget)?;
        let chosen = crate::memory::Setup {
            batch: plan.micro_batch,
            checkpointing: plan.checkpointing,
            zero_stage: plan.zero_stage,
            ..offloaded
        };
        let host = crate::memory::estimate(shape, &chosen).host;
        let room = crate::memory::available_memory();
        if room.is_some_and(|free| host > crate::memory::AUTO_MARGIN * free) {
            return None;
        }
        self.offload_optimizer = true;
        if is_lead_process() {
            eprintln!(
                "auto: with the state on the GPU nothing fits in {:.2} GB; offloading the master \
                 weights and AdamW moments to the host ({:.2} GB there)",
                budget / 1e9,
                host / 1e9
            );
        }
        Some(plan)
    }

    /// Refuses, from its config alone (nothing is allocated), a model this machine cannot hold
    /// (see [`crate::memory::check_training_fits`]); `what` names it in the message.
    pub fn check_fits(
        &self,
        architecture: models::Architecture,
        config: &models::ModelConfig,
        seq: usize,
        batch: usize,
        what: &str,
    ) -> anyhow::Result<()> {
        let Some(available) = crate::memory::available_memory() else {
            return Ok(());
        };
        let shape = self.shape(architecture, config)?;
        crate::memory::check_training_fits(&shape, &self.setup(seq, batch), available, what)
    }

    /// The shapes `zoo memory` estimates for `config`, with the parameters --freeze / --bitfit
    /// freeze (BitFit's new head, unknown before the checkpoint is read, counts as frozen).
    fn shape(
        &self,
        architecture: models::Architecture,
        config: &models::ModelConfig,
    ) -> anyhow::Result<crate::memory::Shape> {
        let lora = self.freezing.lora(architecture.family())?;
        let mut shape = crate::memory::shape_of_adapted(architecture, config, lora.as_ref())?;
        if let Some(rule) = self.freezing.frozen(Default::default())? {
            shape.freeze(&rule);
        }
        if let Some(format) = self.freezing.quantize_format()? {
            shape.quantize_base(config, format)?;
        }
        Ok(shape)
    }

    /// The trainer options for a model of `blocks` blocks.
    pub fn zero_options(
        &self,
        blocks: usize,
        adamw: AdamWConfig,
        max_grad_norm: Option<f32>,
    ) -> anyhow::Result<ZeroOptions> {
        ensure!(
            matches!(self.zero_stage, 2 | 3),
            "--zero-stage {}: zoo shards parameters, gradients and optimizer state over the ranks \
             (stage 3), or keeps gathered weights between forward and backward (stage 2)",
            self.zero_stage
        );
        // Checked here, before the model is built, so that a bad limit fails fast.
        self.gpu_limit()?;
        let (compute_dtype, loss_scaler) = self.dtype.unwrap_or(DtypeArg::F32).mixed_precision();
        Ok(ZeroOptions {
            zero_level: self.zero_stage,
            checkpoint: vec![self.checkpointing; blocks],
            adamw,
            max_grad_norm,
            loss_scaler,
            compute_dtype,
            // Set from the model by the training setup.
            frozen: None,
            quantized: None,
            placement: placement(&self.device, self.offload_optimizer),
            // On where NCCL works on the GPU's buffers (overlapping computation), off elsewhere.
            overlap: Overlap::Auto,
        })
    }
}

/// `--gpu-mem-limit SIZE` in bytes (`None` when not given); an error when `device` has no GPU
/// allocator to hold to it, or the size does not parse.
pub fn gpu_limit(size: Option<&str>, device: &DeviceSpec) -> anyhow::Result<Option<f64>> {
    let Some(size) = size else {
        return Ok(None);
    };
    ensure!(
        matches!(device, DeviceSpec::Cuda(_)),
        "--gpu-mem-limit {size}: --device {device} has no GPU allocator to hold to it"
    );
    let limit = crate::memory::parse_size(size).context("--gpu-mem-limit")?;
    ensure!(
        limit >= 1.0,
        "--gpu-mem-limit {size}: must be at least 1 byte"
    );
    Ok(Some(limit))
}

/// Where the ZeRO state lives on `device`: on a GPU, on it (`offload`: master weights and
/// moments on the host); on the CPU, the host is the device.
pub fn placement(device: &DeviceSpec, offload: bool) -> StatePlacement {
    match (device, offload) {
        (DeviceSpec::Cuda(_), false) => StatePlacement::Device,
        (DeviceSpec::Cuda(_), true) => StatePlacement::Offload,
        _ => StatePlacement::Host,
    }
}

/// Runs `body` on every rank and returns rank 0's result. Ranks come from a launcher's
/// environment (processes: TCP on CPU, NCCL on GPU) or from `ranks` (threads of this process).
/// When ranks fail, the first rank's own error is returned rather than its peers' "rank gone".
pub fn run_ranks<T: Send + 'static>(
    ranks: usize,
    device: &DeviceSpec,
    timeout: Duration,
    body: impl Fn(Box<dyn Communicator>) -> anyhow::Result<T> + Send + Sync + 'static,
) -> anyhow::Result<T> {
    ensure!(ranks >= 1, "--ranks must be at least 1");
    ensure!(
        !timeout.is_zero(),
        "--comm-timeout must be at least 1 second"
    );
    let env = DistEnv::from_env()?;
    if env.world_size > 1 {
        ensure!(
            ranks == 1,
            "--ranks {ranks} under a launcher (WORLD_SIZE={}): the launcher's processes are the \
             ranks",
            env.world_size
        );
        let comm: Box<dyn Communicator> = match device {
            DeviceSpec::Cpu => Box::new(bmtrain_backend::tcp::TcpComm::connect(&env, timeout)?),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(_) => {
                // The GPU burn computes on: this rank's.
                let DeviceSpec::Cuda(Some(gpu)) = device.for_this_rank()? else {
                    unreachable!("a CUDA device resolves to an index")
                };
                Box::new(bmtrain_backend::nccl::NcclComm::init(&env, gpu, timeout)?)
            }
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => bail!("{device}: this zoo was built without the `cuda` feature"),
        };
        return body(comm);
    }
    if ranks == 1 {
        return body(Box::new(SingleRank));
    }
    let results = ThreadGroup::run(ranks, timeout, move |comm| body(Box::new(comm)));
    let mut first_error = None;
    let mut value = None;
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Ok(Ok(v)) if rank == 0 => value = Some(v),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // A peer's failure shows on the others as a communication error; keep the cause.
                let is_echo = e
                    .downcast_ref::<bmtrain_backend::comm::CommError>()
                    .is_some_and(|c| {
                        matches!(c, bmtrain_backend::comm::CommError::PeerGone { .. })
                    });
                if first_error.is_none()
                    || (!is_echo && first_error.as_ref().is_some_and(|(echo, _)| *echo))
                {
                    first_error = Some((is_echo, e.context(format!("rank {rank}"))));
                }
            }
            Err(panic) => {
                if first_error.as_ref().is_none_or(|(echo, _)| *echo) {
                    first_error = Some((false, anyhow::anyhow!("rank {rank} panicked: {panic}")));
                }
            }
        }
    }
    match (first_error, value) {
        (Some((_, e)), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => bail!("rank 0 returned nothing"),
    }
}

/// The segments of a model cut for the trainer: the spec, the embedding, the blocks and the head.
pub type Cut<B, S> = (
    S,
    <S as ZeroSpec<B>>::Embed,
    Vec<<S as ZeroSpec<B>>::Block>,
    <S as ZeroSpec<B>>::Head,
);

/// How every training job starts its trainer: AdamW (β1 0.9, ε 1e-8, as torch's defaults) and
/// clipping, the memory options, and where the weights come from (a checkpoint's tensors, the
/// family's initialisation for the rest).
pub struct TrainSetup<'a> {
    /// AdamW β2.
    pub beta2: f32,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Global-norm clipping (0: none).
    pub max_grad_norm: f32,
    /// The checkpoint's tensors by zoo name, if training starts from one.
    pub tensors: Option<&'a dyn models::train::TensorSource>,
    /// Whether every parameter must come from `tensors` (continuing a model) or missing ones
    /// start fresh (a new head), named in the log.
    pub strict: bool,
    /// The family's initialisation.
    pub init: models::train::InitScheme,
    /// Seed of the initialisation and of dropout.
    pub seed: u64,
    /// What `tensors` are, for messages (`--model`).
    pub source: String,
    /// QLoRA's base ([`prepared`]): weights held as codes, quantized from `tensors`.
    pub quantized: Option<QuantizedBase>,
}

impl TrainSetup<'_> {
    /// Builds the trainer from `cut`, its shards taken one segment at a time (the model is never
    /// whole in memory), then gives back what the setup freed, says the model is ready, names the
    /// parameters that started fresh, and seeds dropout.
    pub fn build<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator>(
        self,
        (spec, embed, blocks, head): Cut<B, S>,
        comm: C,
        device: B::Device,
        memory: &MemoryArgs,
    ) -> anyhow::Result<ZeroTrainer<B, S, C>> {
        let adamw = AdamWConfig {
            beta1: 0.9,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        };
        let clip = (self.max_grad_norm > 0.0).then_some(self.max_grad_norm);
        let mut options = memory.zero_options(blocks.len(), adamw, clip)?;
        // The names that start fresh, known segment by segment before each is sharded.
        let fresh = Arc::new(Mutex::new(HashSet::new()));
        options.frozen = memory.freezing.frozen(fresh.clone())?;
        // The quantized base comes from the checkpoint: a weight it lacks would start fresh (and
        // train), which codes cannot.
        let coded: HashSet<String> = self
            .quantized
            .as_ref()
            .map(|base| base.weights.keys().cloned().collect())
            .unwrap_or_default();
        options.quantized = self.quantized;
        let mut start = models::train::StartValues {
            tensors: self.tensors,
            strict: self.strict,
            init: self.init,
            seed: self.seed,
            fresh: Vec::new(),
        };
        let lead = comm.rank() == 0;
        let mut trainer = ZeroTrainer::from_source(
            spec,
            comm,
            device,
            embed,
            blocks,
            head,
            options,
            |_, prefix, layout| {
                let before = start.fresh.len();
                let values = start.segment(prefix, layout)?;
                if let Some(name) = start.fresh[before..].iter().find(|n| coded.contains(*n)) {
                    return Err(models::ModelError::Weights {
                        name: name.clone(),
                        message: "not in the checkpoint: --quantize-base quantizes a base it \
                                  reads (a model directory with these weights)"
                            .into(),
                    });
                }
                if let Ok(mut names) = fresh.lock() {
                    names.extend(start.fresh[before..].iter().cloned());
                }
                Ok(values)
            },
        )
        .with_context(|| format!("starting from {}", self.source))?;
        // What building the shards read and freed (segment buffers, tensors) goes back to the OS.
        crate::alloc::release_free_memory();
        report_ready(&trainer);
        if lead && !start.fresh.is_empty() {
            // LoRA's adapters are counted, not listed (there are two per adapted layer).
            let (adapters, others): (Vec<&String>, Vec<&String>) =
                start.fresh.iter().partition(|name| is_lora(name));
            let mut parts: Vec<String> = others.into_iter().cloned().collect();
            if !adapters.is_empty() {
                parts.push(format!("{} LoRA tensors", adapters.len()));
            }
            eprintln!(
                "initialised fresh (not in {}): {}",
                self.source,
                parts.join(", ")
            );
        }
        trainer.set_dropout_seed(self.seed);
        Ok(trainer)
    }
}

/// When this process started (first asked for in `main`).
pub fn process_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// Rank 0's line once the shards are built: how large the model is and how long the setup took
/// (from the start of the process: reading the data and the checkpoint, building the shards).
pub fn report_ready<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator>(
    trainer: &ZeroTrainer<B, S, C>,
) {
    if trainer.comm().rank() == 0 {
        let (all, trained) = (trainer.parameter_count(), trainer.trainable_count());
        let coded = trainer.quantized_count();
        let trainable = match (trained == all, coded) {
            (true, _) => String::new(),
            (false, 0) => format!(
                " ({:.3}M trainable, {:.2}%; the rest frozen)",
                trained as f64 / 1e6,
                100.0 * trained as f64 / all.max(1) as f64
            ),
            (false, _) => format!(
                " ({:.3}M trainable, {:.2}%; the rest frozen, {:.1}M of it held as codes in \
                 {:.1} MB on this rank)",
                trained as f64 / 1e6,
                100.0 * trained as f64 / all.max(1) as f64,
                coded as f64 / 1e6,
                trainer.rank_bytes().quantized as f64 / 1e6
            ),
        };
        eprintln!(
            "model ready: {:.1}M parameters{trainable} sharded over {} rank(s), {:.1} s after start",
            all as f64 / 1e6,
            trainer.comm().world_size(),
            process_start().elapsed().as_secs_f64()
        );
    }
}

/// The free memory of the GPU `device` names.
#[cfg(feature = "cuda")]
fn gpu_free_memory(device: &DeviceSpec) -> anyhow::Result<f64> {
    let Some(index) = device.gpu_index() else {
        bail!("{device} is not a GPU (or not this rank's: see zoo env)")
    };
    let (free, _) = bmtrain_backend::cuda_memory(index)
        .map_err(|e| anyhow::anyhow!("--auto: {e}; give the budget with --gpu-mem"))?;
    Ok(free as f64)
}

/// The free memory of the GPU `device` names: unknown in a build without CUDA.
#[cfg(not(feature = "cuda"))]
fn gpu_free_memory(device: &DeviceSpec) -> anyhow::Result<f64> {
    bail!("--auto on {device}: this zoo was built without the `cuda` feature")
}

/// What `--auto` chose, as `trainer_state.json` records it (`retries`: micro-batches halved
/// since, because a step went over the budget).
fn auto_record(
    plan: &crate::memory::AutoPlan,
    dtype: Option<DtypeArg>,
    offload: bool,
    retries: u32,
) -> Value {
    json!({
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "checkpointing": plan.checkpointing,
        "zero_stage": plan.zero_stage,
        "dtype": dtype_name(dtype.unwrap_or(DtypeArg::F32)),
        "offload_optimizer": offload,
        "estimate_bytes": plan.estimate.round(),
        "budget_bytes": plan.budget.round(),
        "retries": retries,
    })
}

/// How a step's batch is split into micro-batches: `--batch` × `--grad-accum`, or `--auto`'s
/// plan, whose micro-batch shrinks when a step goes over its budget anyway (the step is then
/// run again, once, with half the rows per rank and twice the micro-batches). It also keeps the
/// GPU allocator's readings (for `metrics.jsonl` and `--report-memory`) and holds them to
/// `--gpu-mem-limit`.
#[derive(Debug, Clone)]
pub struct StepSplit {
    /// Rows per micro-batch over all ranks.
    pub micro_batch: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// `--auto`'s plan, when it chose the split.
    auto: Option<crate::memory::AutoPlan>,
    /// `--dtype` (for the record).
    dtype: Option<DtypeArg>,
    /// `--offload-optimizer`, given or set by `--auto` (for the record).
    offload: bool,
    /// Micro-batches halved so far.
    retries: u32,
    /// `--gpu-mem-limit` in bytes.
    gpu_limit: Option<f64>,
    /// The GPU allocator's highest readings since the last logged step, and over the run.
    gpu_window: Option<DeviceMemory>,
    gpu_run: Option<DeviceMemory>,
}

/// Why a micro-batch went over its memory budget: what was measured against what.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Overrun {
    /// The GPU allocator's reservation (GPU) or the heap's high-water mark (CPU), in bytes.
    measured: f64,
    /// The budget it went over, in bytes.
    budget: f64,
    /// Whether `measured` is the GPU allocator's.
    on_gpu: bool,
}

impl StepSplit {
    /// The split of `micro_batch × grad_accum`, guarded by `auto`'s budget when given and by
    /// `--gpu-mem-limit` ([`MemoryArgs::gpu_limit`]); `memory` after `--auto` applied.
    pub fn new(
        micro_batch: usize,
        grad_accum: usize,
        auto: Option<crate::memory::AutoPlan>,
        memory: &MemoryArgs,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            micro_batch,
            grad_accum,
            auto,
            dtype: memory.dtype,
            offload: memory.offload_optimizer,
            retries: 0,
            gpu_limit: memory.gpu_limit()?,
            gpu_window: None,
            gpu_run: None,
        })
    }

    /// Call before each attempt at a step: the heap's high-water mark starts again.
    pub fn start_attempt(&self) {
        crate::alloc::reset_peak();
    }

    /// Takes the trainer's GPU allocator peak since it was last taken into the window and run
    /// maxima, and returns it (`None` on the CPU backend).
    pub fn observe<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator>(
        &mut self,
        trainer: &mut ZeroTrainer<B, S, C>,
    ) -> Option<DeviceMemory> {
        let reading = trainer.device_memory_peak()?;
        trainer.reset_device_memory_peak();
        let fold = |peak: Option<DeviceMemory>| Some(peak.map_or(reading, |p| p.max(reading)));
        self.gpu_window = fold(self.gpu_window);
        self.gpu_run = fold(self.gpu_run);
        Some(reading)
    }

    /// `metrics.jsonl`'s GPU memory fields for the steps since the last logged one (bytes:
    /// the allocator's most in use, and its reservation), then starts a new window; an empty
    /// object on the CPU backend.
    pub fn memory_fields<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator>(
        &mut self,
        trainer: &mut ZeroTrainer<B, S, C>,
    ) -> Value {
        self.observe(trainer);
        match self.gpu_window.take() {
            Some(peak) => json!({
                "gpu_mem_in_use_peak": peak.in_use,
                "gpu_mem_reserved": peak.reserved,
            }),
            None => json!({}),
        }
    }

    /// The GPU allocator's highest readings over the whole run so far, for `--report-memory`.
    pub fn gpu_run_peak<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator>(
        &mut self,
        trainer: &mut ZeroTrainer<B, S, C>,
    ) -> Option<DeviceMemory> {
        self.observe(trainer);
        self.gpu_run
    }

    /// The budget a micro-batch is held to: `--auto`'s, or `--gpu-mem-limit` on a GPU (`on_gpu`:
    /// the trainer reports a device allocator), the smaller when both apply.
    fn budget(&self, on_gpu: bool) -> Option<f64> {
        let limit = self.gpu_limit.filter(|_| on_gpu);
        match (self.auto.map(|plan| plan.budget), limit) {
            (Some(auto), Some(limit)) => Some(auto.min(limit)),
            (auto, limit) => auto.or(limit),
        }
    }

    /// After a micro-batch whose GPU allocator peak was `reading` (`None` on the CPU): whether
    /// it went over the budget on any rank (a collective: every rank calls it after every
    /// micro-batch when a budget applies), with the largest overrun of the ranks.
    fn over_budget(
        &self,
        comm: &dyn Communicator,
        reading: Option<DeviceMemory>,
    ) -> anyhow::Result<Option<Overrun>> {
        let Some(budget) = self.budget(reading.is_some()) else {
            return Ok(None);
        };
        let measured = match reading {
            Some(gpu) => gpu.reserved as f64,
            None => crate::alloc::peak_bytes() as f64,
        };
        let over = over_budget(comm, measured, budget)?;
        Ok(over.map(|(measured, budget)| Overrun {
            measured,
            budget,
            on_gpu: reading.is_some(),
        }))
    }

    /// After an attempt that went over the budget: the next smaller split (rows per rank at most
    /// halved, micro-batches multiplied to keep the global batch), logged through `log`; an error
    /// when the step was already retried, one row per rank is already too much, or the budget
    /// is `--gpu-mem-limit` alone (no `--auto` to choose a smaller split).
    fn shrink(
        &mut self,
        step: u64,
        world: usize,
        retried: &mut bool,
        over: Overrun,
        log: impl Fn(&str),
    ) -> anyhow::Result<()> {
        let rows = self.micro_batch / world;
        let what = if over.on_gpu {
            "the GPU allocator reserved"
        } else {
            "the heap reached"
        };
        let (measured, budget) = (over.measured / 1e9, over.budget / 1e9);
        if self.auto.is_none() {
            bail!(
                "step {}: out of memory: {what} {measured:.2} GB, over --gpu-mem-limit \
                 {budget:.2} GB, with {rows} row(s) per rank and micro-batch; lower --batch, \
                 raise --grad-accum, add --checkpointing or --offload-optimizer, or let --auto \
                 choose",
                step + 1,
            );
        }
        let smaller = (1..rows)
            .rev()
            .find(|r| rows.is_multiple_of(*r) && *r <= rows / 2);
        let (Some(smaller), false) = (smaller, *retried) else {
            bail!(
                "step {}: out of memory: {what} {measured:.2} GB, over --auto's budget of \
                 {budget:.2} GB, with {rows} row(s) per rank and micro-batch",
                step + 1,
            );
        };
        self.grad_accum *= rows / smaller;
        self.micro_batch = smaller * world;
        self.retries += 1;
        *retried = true;
        log(&format!(
            "step {}: over the memory budget ({what} {measured:.2} GB of {budget:.2} GB): \
             retrying with micro-batch {} × grad-accum {}",
            step + 1,
            self.micro_batch,
            self.grad_accum
        ));
        Ok(())
    }

    /// Forward and backward of one step's micro-batches, `batch(micro_batch, index)` giving this
    /// rank's share of micro-batch `index` (of `micro_batch` rows over all ranks). A step that goes
    /// over `--auto`'s budget is discarded and run again once with a smaller split; one that goes
    /// over `--gpu-mem-limit` without `--auto` ends the job. Returns this rank's mean loss of the
    /// step.
    pub fn accumulate<B: AutodiffBackend, S: ZeroSpec<B>>(
        &mut self,
        trainer: &mut ZeroTrainer<B, S, Box<dyn Communicator>>,
        step: u64,
        progress: &Progress,
        mut batch: impl FnMut(usize, usize) -> S::Batch,
    ) -> anyhow::Result<f32> {
        let world = trainer.comm().world_size();
        let mut retried = false;
        loop {
            self.start_attempt();
            let mut loss = 0.0;
            let mut over = None;
            for micro in 0..self.grad_accum {
                let rows = batch(self.micro_batch, micro);
                loss += trainer.forward_backward(&rows)? / self.grad_accum as f32;
                let reading = self.observe(trainer);
                over = self.over_budget(trainer.comm().as_ref(), reading)?;
                if over.is_some() {
                    break;
                }
            }
            let Some(over) = over else {
                return Ok(loss);
            };
            // Over the budget: the same step again with a smaller micro-batch, once, after the
            // GPU allocator gave back what the failed attempt reserved.
            trainer.zero_grad();
            trainer.release_device_memory();
            self.gpu_window = None;
            self.shrink(step, world, &mut retried, over, |line| {
                progress.println(line)
            })?;
        }
    }

    /// `--auto`'s record for `trainer_state.json`: the plan with the split as it is now.
    pub fn record(&self) -> Option<Value> {
        self.auto.map(|plan| {
            let now = crate::memory::AutoPlan {
                micro_batch: self.micro_batch,
                grad_accum: self.grad_accum,
                ..plan
            };
            auto_record(&now, self.dtype, self.offload, self.retries)
        })
    }
}

/// Whether a micro-batch that took `measured` bytes (this rank's) went over `budget` on any rank
/// (all ranks then agree to retry): the largest rank's bytes and the budget. `ZOO_TEST_AUTO_GUARD_BYTES` replaces the
/// budget here (and only here), so that tests can make a step go over it.
fn over_budget(
    comm: &dyn Communicator,
    measured: f64,
    budget: f64,
) -> anyhow::Result<Option<(f64, f64)>> {
    static TEST_GUARD: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    let budget = TEST_GUARD
        .get_or_init(|| {
            std::env::var("ZOO_TEST_AUTO_GUARD_BYTES")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(budget);
    // f32 holds byte counts to 7 digits: enough to compare and to print in GB.
    let mut over = [if measured > budget {
        measured as f32
    } else {
        0.0
    }];
    comm.all_reduce(&mut over, ReduceOp::Max)?;
    Ok((over[0] > 0.0).then_some((over[0] as f64, budget)))
}

/// `--dtype`'s spelling of a dtype.
pub fn dtype_name(dtype: DtypeArg) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// `WORLD_SIZE` of a launched job, 1 otherwise.
pub fn world_size_from_env() -> usize {
    std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1)
}

/// Whether this process is rank 0 of a launched job (or not launched): the one that prints.
pub fn is_lead_process() -> bool {
    DistEnv::from_env().map_or(true, |env| env.rank == 0)
}

/// Set by SIGINT / SIGTERM.
pub fn interrupted() -> &'static AtomicBool {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Registration only fails for forbidden signals; these two are allowed.
            let _ = signal_hook::flag::register(signal, flag.clone());
        }
        flag
    })
}

/// Whether any rank was interrupted: every rank stops at the same step.
pub fn any_rank_interrupted(comm: &dyn Communicator) -> anyhow::Result<bool> {
    let mut flag = [if interrupted().load(Ordering::Relaxed) {
        1.0
    } else {
        0.0
    }];
    comm.all_reduce(&mut flag, ReduceOp::Max)?;
    Ok(flag[0] > 0.0)
}

/// Averages a per-rank number over the ranks.
pub fn mean_over_ranks(comm: &dyn Communicator, value: f32) -> anyhow::Result<f32> {
    let mut data = [value];
    comm.all_reduce(&mut data, ReduceOp::Avg)?;
    Ok(data[0])
}

/// The run directory: `--out`, or the directory holding a resumed checkpoint, or
/// `runs/<job>-<timestamp>`.
fn run_dir(out: Option<&Path>, resume: Option<&Path>, job: &str) -> PathBuf {
    if let Some(out) = out {
        return out.to_path_buf();
    }
    if let Some(resume) = resume {
        // RUN_DIR, or RUN_DIR/checkpoints/NAME.
        if resume.join("checkpoints").is_dir() {
            return resume.to_path_buf();
        }
        if let Some(run) = resume.parent().and_then(Path::parent) {
            return run.to_path_buf();
        }
    }
    // `zoo launch` gives every rank the same stamp.
    let stamp = std::env::var("ZOO_RUN_STAMP").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string()
    });
    PathBuf::from("runs").join(format!("{job}-{stamp}"))
}

/// Refuses to start a fresh run in a directory that already holds one: its checkpoints and
/// metrics would be overwritten. Resuming (`resume` given) is the way to continue it.
fn check_fresh_run_dir(run_dir: &Path, resume: Option<&Path>) -> anyhow::Result<()> {
    let latest = run_dir.join("checkpoints").join("latest");
    ensure!(
        resume.is_some() || !latest.exists(),
        "{} already holds a run ({} exists): continue it with --resume {}, or choose another --out",
        run_dir.display(),
        latest.display(),
        run_dir.display()
    );
    Ok(())
}

/// Appends JSON lines to `metrics.jsonl`.
#[derive(Debug)]
pub struct Metrics {
    path: PathBuf,
}

impl Metrics {
    /// Opens `RUN_DIR/metrics.jsonl`. When resuming at `resumed_step`, lines of later steps (from
    /// the interrupted run) are dropped so the file reads as one run.
    pub fn open(run_dir: &Path, resumed_step: Option<u64>) -> anyhow::Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        if let Some(step) = resumed_step
            && path.is_file()
        {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|line| format!("{line}\n"))
                .collect();
            fs::write(&path, kept).with_context(|| format!("writing {}", path.display()))?;
        } else if resumed_step.is_none() {
            fs::write(&path, "").with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(Self { path })
    }

    /// Appends one record.
    pub fn log(&self, record: &Value) -> anyhow::Result<()> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(file, "{record}").with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The progress bar (on a terminal) or plain log lines (otherwise).
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    /// Rank 0 reports; the other ranks stay silent.
    silent: bool,
}

impl Progress {
    /// A bar over `total` steps starting at `start`, shown by rank 0 (`lead`) on a terminal unless
    /// `bar` is false; elsewhere rank 0 prints log lines.
    pub fn new(total: u64, start: u64, lead: bool, bar: bool) -> Self {
        let bar = if lead && bar && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressBar::new(total)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} {msg} ETA {eta_precise}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_position(start);
        bar.reset_eta();
        Self { bar, silent: !lead }
    }

    /// Moves to `step` with a status message (loss, lr, tokens/s).
    pub fn update(&self, step: u64, message: String) {
        self.bar.set_position(step);
        self.bar.set_message(message);
    }

    /// A line above the bar, or on stderr when there is no bar.
    pub fn println(&self, line: &str) {
        if self.silent {
        } else if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// What a checkpoint holds besides the trainer's tensors.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// `zoo.json`: the model class and its HF config.
    pub manifest: ZooManifest,
    /// `tokenizer.json`, when the model has one.
    pub tokenizer_json: Option<String>,
    /// With LoRA (`zoo_lora` in the manifest): the base model's path, which each checkpoint's
    /// PEFT adapter files (`adapter_config.json`, `adapter_model.safetensors`) name.
    pub lora_base: Option<String>,
}

/// Saves a checkpoint to `dir` (a staging directory beside it, then one rename), with
/// `trainer_state.json` = `state` plus the size and xxh3 hash of every file (what `--resume`
/// verifies), and points `checkpoints/latest` at it. Every rank must call it. Tensors are
/// streamed one segment at a time; a write error (a full disk) stops the job with the file named
/// and leaves the previous checkpoint, and `latest`, as they were.
pub fn save_checkpoint<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator>(
    trainer: &ZeroTrainer<B, S, C>,
    dir: &Path,
    files: &CheckpointFiles,
    state: &Value,
) -> anyhow::Result<()> {
    let rank = trainer.comm().rank();
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("a checkpoint directory has a name")?;
    let staging = dir.with_file_name(format!(".{name}.partial"));
    if rank == 0 {
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    }
    trainer.comm().barrier()?;
    let saved = trainer
        .save(&staging)
        .with_context(|| format!("saving the checkpoint {}", dir.display()));
    // A LoRA run's checkpoint is also a PEFT adapter directory (the adapters are gathered on
    // every rank: a collective, however the save went).
    let saved = match (saved, &files.lora_base) {
        (Ok(digests), Some(base)) => {
            let named = trainer.named_trainable_parameters()?;
            match rank {
                0 => write_peft_adapter(&staging, files, base, named).map(|extra| {
                    let mut digests = digests;
                    digests.extend(extra);
                    digests
                }),
                _ => Ok(digests),
            }
        }
        (saved, _) => saved,
    };
    let result = match saved {
        Ok(digests) if rank == 0 => publish_checkpoint(dir, &staging, name, files, state, digests),
        Ok(_) => Ok(()),
        Err(error) => Err(error),
    };
    if result.is_err() && rank == 0 {
        let _ = fs::remove_dir_all(&staging);
    }
    result?;
    trainer.comm().barrier()?;
    // The file buffers and the gathered segments of the save are given back.
    crate::alloc::release_free_memory();
    Ok(())
}

/// Writes the LoRA tensors of `named` as a PEFT adapter into `dir` for the manifest's model and
/// returns the two files' digests. An adapter PEFT's format cannot hold yet (GPT-2's fused
/// `c_attn`) is skipped with a warning: the checkpoint stays a zoo directory with its adapters.
fn write_peft_adapter(
    dir: &Path,
    files: &CheckpointFiles,
    base: &str,
    named: Vec<bmtrain_backend::trainer::NamedTensor>,
) -> anyhow::Result<Vec<FileDigest>> {
    let manifest = &files.manifest;
    let architecture = models::Architecture::from_hf_name(&manifest.architecture)?;
    let config = architecture
        .family()
        .parse_config(&manifest.hf_config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let spec = checkpoints_convert::ModelSpec {
        kind: checkpoints_convert::DirKind::Zoo,
        dir: dir.to_path_buf(),
        architecture,
        config,
        hf_config: manifest.hf_config.clone(),
    };
    let lora = spec.lora()?.context("a LoRA run records zoo_lora")?;
    // The adapters, and what else trains (a classifier's new head, which the adapter saves).
    let tensors = named
        .into_iter()
        .map(|(name, shape, values)| (name, burn::tensor::TensorData::new(values, shape)))
        .collect();
    match checkpoints_convert::peft::write_adapter(dir, &spec, &lora, &tensors, base) {
        Ok(()) => {}
        Err(checkpoints_convert::ConvertError::Adapter { message, .. }) => {
            eprintln!(
                "warning: no PEFT adapter files in {}: {message}",
                dir.display()
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    }
    [
        checkpoints_convert::peft::ADAPTER_CONFIG,
        checkpoints_convert::peft::ADAPTER_WEIGHTS,
    ]
    .into_iter()
    .map(|file| Ok(checkpoint::digest(&dir.join(file))?))
    .collect()
}

/// Rank 0's part of [`save_checkpoint`] once the tensors are written: the small files, the
/// digests in `trainer_state.json`, the rename into place and `latest`.
fn publish_checkpoint(
    dir: &Path,
    staging: &Path,
    name: &str,
    files: &CheckpointFiles,
    state: &Value,
    mut digests: Vec<FileDigest>,
) -> anyhow::Result<()> {
    let write = |file: &str, text: String| -> anyhow::Result<FileDigest> {
        let path = staging.join(file);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(checkpoint::digest(&path)?)
    };
    digests.push(write(
        "zoo.json",
        serde_json::to_string_pretty(&files.manifest)?,
    )?);
    if let Some(tokenizer) = &files.tokenizer_json {
        digests.push(write("tokenizer.json", tokenizer.clone())?);
    }
    let mut state = state.clone();
    state["files"] = digests
        .iter()
        .map(|d| (d.name.clone(), json!({ "bytes": d.bytes, "xxh3": d.xxh3 })))
        .collect::<serde_json::Map<_, _>>()
        .into();
    write("trainer_state.json", serde_json::to_string_pretty(&state)?)?;
    if dir.exists() {
        let old = dir.with_file_name(format!(".{name}.old"));
        let _ = fs::remove_dir_all(&old);
        fs::rename(dir, &old).with_context(|| format!("replacing {}", dir.display()))?;
        fs::rename(staging, dir).with_context(|| format!("writing {}", dir.display()))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(staging, dir).with_context(|| format!("writing {}", dir.display()))?;
    }
    let latest = dir.with_file_name("latest");
    let partial = dir.with_file_name(".latest.partial");
    fs::write(&partial, name).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, &latest).with_context(|| format!("writing {}", latest.display()))?;
    Ok(())
}

/// Where a job writes: rank 0's `metrics.jsonl` (reopened at `resumed_step`), the files every
/// checkpoint carries, and `RUN_DIR/checkpoints` (created by rank 0).
pub struct RunOutputs {
    /// `metrics.jsonl`, on rank 0 only.
    pub metrics: Option<Metrics>,
    /// `zoo.json` and `tokenizer.json` of every checkpoint.
    pub files: CheckpointFiles,
    /// `RUN_DIR/checkpoints`.
    pub checkpoints: PathBuf,
}

impl RunOutputs {
    /// Opens them for rank `lead`-or-not.
    pub fn open(
        run_dir: &Path,
        lead: bool,
        resumed_step: Option<u64>,
        files: CheckpointFiles,
    ) -> anyhow::Result<Self> {
        let checkpoints = run_dir.join("checkpoints");
        let metrics = if lead {
            fs::create_dir_all(&checkpoints)
                .with_context(|| format!("creating {}", checkpoints.display()))?;
            Some(Metrics::open(run_dir, resumed_step)?)
        } else {
            None
        };
        Ok(Self {
            metrics,
            files,
            checkpoints,
        })
    }

    /// Appends a record to `metrics.jsonl` (rank 0; a no-op elsewhere).
    pub fn log(&self, step: u64, fields: Value) -> anyhow::Result<()> {
        match &self.metrics {
            Some(metrics) => metrics.log(&record(step, fields)),
            None => Ok(()),
        }
    }
}

/// `--resume`: checks the checkpoint against the model, loads it into the trainer, and returns the
/// step it reached and its `trainer_state.json`.
pub fn resume_trainer<B: AutodiffBackend, S: ZeroSpec<B>, C: Communicator>(
    trainer: &mut ZeroTrainer<B, S, C>,
    checkpoint: &Path,
    manifest: &ZooManifest,
) -> anyhow::Result<(u64, Value)> {
    let state = check_resume_matches(checkpoint, manifest)?;
    trainer
        .load(checkpoint)
        .with_context(|| format!("--resume {}", checkpoint.display()))?;
    Ok((trainer.steps(), state))
}

/// Gathers the trainer's parameters on every rank and, on rank 0, builds `spec`'s model from them
/// on the inference backend and runs `use_model` (evaluation, sampling); a barrier follows.
pub fn on_lead_model<AB: AutodiffBackend, S: ZeroSpec<AB>, C: Communicator, T>(
    trainer: &ZeroTrainer<AB, S, C>,
    spec: &checkpoints_convert::ModelSpec,
    device: &AB::Device,
    use_model: impl FnOnce(models::AnyModel<AB::InnerBackend>) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    let named = trainer.named_parameters()?;
    // QLoRA's base: its codes, which the model runs on as the trainer does.
    let codes = trainer.named_codes()?;
    let result = if trainer.comm().rank() == 0 {
        let tensors = named
            .into_iter()
            .map(|(name, shape, values)| (name, burn::tensor::TensorData::new(values, shape)))
            .collect();
        let model = checkpoints_convert::build_model::<AB::InnerBackend>(
            spec,
            tensors,
            codes.into_iter().collect(),
            device,
        )?;
        Some(use_model(model)?)
    } else {
        None
    };
    trainer.comm().barrier()?;
    Ok(result)
}

/// The checkpoint `path` names: a checkpoint itself (it must verify), or a run directory, whose
/// newest checkpoint that verifies is taken (by step; those skipped are named, with why). A run
/// directory without any checkpoint (killed before its first) gives `None`: the run starts
/// afresh, and says so.
fn find_checkpoint(path: &Path) -> anyhow::Result<Option<PathBuf>> {
    let lead = is_lead_process();
    if path.join("optimizer.safetensors").is_file() || path.join("trainer_state.json").is_file() {
        verify_checkpoint(path).with_context(|| format!("--resume {}", path.display()))?;
        return Ok(Some(path.to_path_buf()));
    }
    let checkpoints = path.join("checkpoints");
    // A run directory: a job locked it, logged into it or saved into it.
    let run_dir = [".lock", "metrics.jsonl", "checkpoints"]
        .iter()
        .any(|name| path.join(name).exists());
    if !run_dir {
        bail!(
            "--resume {}: neither a checkpoint (no optimizer.safetensors) nor a run directory \
             (no checkpoints/)",
            path.display()
        )
    }
    // Every complete checkpoint directory, newest step first.
    let mut candidates: Vec<(u64, PathBuf)> = Vec::new();
    if checkpoints.is_dir() {
        for entry in fs::read_dir(&checkpoints)
            .with_context(|| format!("listing {}", checkpoints.display()))?
        {
            let dir = entry?.path();
            let hidden = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            if hidden || !dir.is_dir() {
                continue;
            }
            let step = fs::read_to_string(dir.join("trainer_state.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .and_then(|state| state["step"].as_u64());
            candidates.push((step.unwrap_or(0), dir));
        }
    }
    candidates.sort_by(|a, b| b.cmp(a));
    for (_, dir) in &candidates {
        match verify_checkpoint(dir) {
            Ok(()) => return Ok(Some(dir.clone())),
            Err(error) => {
                if lead {
                    eprintln!("--resume: skipping {}: {error:#}", dir.display());
                }
            }
        }
    }
    if !candidates.is_empty() {
        bail!(
            "--resume {}: none of its {} checkpoints is intact (see above)",
            path.display(),
            candidates.len()
        );
    }
    if lead {
        eprintln!(
            "--resume {}: no checkpoint was saved yet; starting a fresh run there",
            path.display()
        );
    }
    Ok(None)
}

/// Checks a checkpoint directory against its `trainer_state.json`: every file it records is
/// there with its size and xxh3 hash. A checkpoint from before zoo recorded hashes is accepted
/// when its files are there.
fn verify_checkpoint(dir: &Path) -> anyhow::Result<()> {
    let state_path = dir.join("trainer_state.json");
    let state: Value = serde_json::from_str(
        &fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("parsing {}", state_path.display()))?;
    let Some(files) = state["files"].as_object() else {
        for file in ["model.safetensors", "optimizer.safetensors", "zoo.json"] {
            ensure!(
                dir.join(file).is_file(),
                "{} is missing",
                dir.join(file).display()
            );
        }
        return Ok(());
    };
    let expected: Vec<FileDigest> = files
        .iter()
        .map(|(name, record)| {
            Ok(FileDigest {
                name: name.clone(),
                bytes: record["bytes"]
                    .as_u64()
                    .with_context(|| format!("{}: files.{name}.bytes", state_path.display()))?,
                xxh3: record["xxh3"]
                    .as_str()
                    .with_context(|| format!("{}: files.{name}.xxh3", state_path.display()))?
                    .to_string(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    for required in ["model.safetensors", "optimizer.safetensors"] {
        ensure!(
            expected.iter().any(|d| d.name == required),
            "{} does not record {required}",
            state_path.display()
        );
    }
    checkpoint::verify(dir, &expected)?;
    Ok(())
}

/// Checks that a checkpoint was saved for this model (class and config), before any weights are
/// read, so resuming from another model's checkpoint fails with both named.
pub fn check_resume_matches(checkpoint: &Path, manifest: &ZooManifest) -> anyhow::Result<Value> {
    let path = checkpoint.join("zoo.json");
    let theirs: ZooManifest = serde_json::from_str(
        &fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    ensure!(
        theirs.architecture == manifest.architecture,
        "--resume {}: that checkpoint is a {}, this run trains a {}",
        checkpoint.display(),
        theirs.architecture,
        manifest.architecture
    );
    // Shape-defining fields must agree; dropout and the like may change on resume.
    for key in SHAPE_KEYS {
        let (a, b) = (&theirs.hf_config[key], &manifest.hf_config[key]);
        ensure!(
            a == b,
            "--resume {}: that checkpoint has {key} = {a}, this run's model has {key} = {b}",
            checkpoint.display()
        );
    }
    trainer_state(checkpoint)
}

/// A checkpoint's `trainer_state.json`.
pub fn trainer_state(checkpoint: &Path) -> anyhow::Result<Value> {
    let state_path = checkpoint.join("trainer_state.json");
    serde_json::from_str(
        &fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("parsing {}", state_path.display()))
}

/// Config fields that fix parameter shapes, over the families that train.
const SHAPE_KEYS: &[&str] = &[
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "num_labels",
    "id2label",
];

/// `{"step": …, …}` with the wall-clock time added.
pub fn record(step: u64, mut fields: Value) -> Value {
    let mut out = json!({ "step": step });
    if let (Some(out), Some(fields)) = (out.as_object_mut(), fields.as_object_mut()) {
        out.append(fields);
        out.insert(
            "time".into(),
            json!(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64())
            ),
        );
    }
    out
}

/// A field of `/proc/self/status` in bytes (`VmRSS:`, `VmHWM:`), on Linux.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// `--report-memory`: the resident set before the model was built, the peak of the training
/// steps (read before the final checkpoint and evaluation), and the peak of the whole job after
/// them, from `/proc/self/status`; what `zoo memory` is checked against. On a GPU also the
/// allocator's highest readings over the run (`gpu`: bytes in use, bytes reserved).
pub fn report_memory(
    baseline: Option<u64>,
    steps_peak: Option<u64>,
    final_peak: Option<u64>,
    gpu: Option<DeviceMemory>,
) {
    if let Some(gpu) = gpu {
        println!(
            "gpu memory: allocator peak in use {:.1} MB, reserved {:.1} MB \
             (MEASURED_GPU_IN_USE_PEAK_BYTES={} MEASURED_GPU_RESERVED_PEAK_BYTES={})",
            gpu.in_use as f64 / 1e6,
            gpu.reserved as f64 / 1e6,
            gpu.in_use,
            gpu.reserved
        );
    }
    match (baseline, steps_peak, final_peak) {
        (Some(base), Some(peak), Some(last)) => println!(
            "memory: resident {:.1} MB before the model, peak {:.1} MB, training peak {:.1} MB, \
             with the last checkpoint and evaluation {:.1} MB (MEASURED_TRAINING_PEAK_BYTES={} \
             MEASURED_FINAL_PEAK_BYTES={} MEASURED_PEAK_RSS_BYTES={last})",
            base as f64 / 1e6,
            last as f64 / 1e6,
            peak.saturating_sub(base) as f64 / 1e6,
            last.saturating_sub(base) as f64 / 1e6,
            peak.saturating_sub(base),
            last.saturating_sub(base)
        ),
        _ => eprintln!("--report-memory needs Linux's /proc/self/status"),
    }
}

/// `fields` with `extra`'s fields added (both JSON objects; `extra` wins a clash).
pub fn merged(mut fields: Value, extra: Value) -> Value {
    if let (Some(out), Value::Object(extra)) = (fields.as_object_mut(), extra) {
        out.extend(extra);
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        memory: MemoryArgs,
    }

    fn memory(args: &[&str]) -> MemoryArgs {
        Flags::try_parse_from(std::iter::once("zoo").chain(args.iter().copied()))
            .unwrap()
            .memory
    }

    #[test]
    fn the_gpu_memory_limit_needs_a_gpu_and_sets_autos_budget() {
        let err = memory(&["--gpu-mem-limit", "11GB"])
            .gpu_limit()
            .unwrap_err();
        assert!(
            err.to_string().contains("--gpu-mem-limit 11GB") && err.to_string().contains("cpu"),
            "{err}"
        );
        let err = memory(&["--device", "cuda:0", "--gpu-mem-limit", "11XB"])
            .gpu_limit()
            .unwrap_err();
        assert!(format!("{err:#}").contains("unknown unit 'xb'"), "{err:#}");
        let limited = memory(&["--device", "cuda:0", "--gpu-mem-limit", "11GB"]);
        assert_eq!(limited.gpu_limit().unwrap(), Some(11e9));
        // --auto's budget on a GPU: the limit, or the smaller of it and --gpu-mem.
        assert_eq!(limited.budget().unwrap(), 11e9);
        let both = [
            "--device",
            "cuda:0",
            "--gpu-mem-limit",
            "11GB",
            "--gpu-mem",
            "8GB",
        ];
        assert_eq!(memory(&both).budget().unwrap(), 8e9);
    }

    #[test]
    fn a_micro_batch_over_the_gpu_limit_ends_the_job_naming_the_limit_and_the_reservation() {
        let limited = memory(&["--device", "cuda:0", "--gpu-mem-limit", "11GB"]);
        let split = StepSplit::new(8, 1, None, &limited).unwrap();
        let reading = |reserved| {
            Some(DeviceMemory {
                in_use: 9_000_000_000,
                reserved,
            })
        };
        // Under the limit, and on the CPU (no allocator reading), nothing is over.
        assert_eq!(
            split
                .over_budget(&SingleRank, reading(10_000_000_000))
                .unwrap(),
            None
        );
        assert_eq!(split.over_budget(&SingleRank, None).unwrap(), None);
        let over = split
            .over_budget(&SingleRank, reading(12_000_000_000))
            .unwrap()
            .expect("12 GB reserved is over 11 GB");
        assert_eq!(
            (over.measured, over.budget, over.on_gpu),
            (12e9, 11e9, true)
        );
        let mut split = split;
        let err = split
            .shrink(4, 1, &mut false, over, |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step 5")
                && err.contains("reserved 12.00 GB")
                && err.contains("--gpu-mem-limit 11.00 GB")
                && err.contains("8 row(s)"),
            "{err}"
        );
    }

    #[test]
    fn with_auto_the_gpu_limit_halves_the_micro_batch_once() {
        let plan = crate::memory::AutoPlan {
            micro_batch: 8,
            grad_accum: 1,
            checkpointing: true,
            zero_stage: 3,
            estimate: 9e9,
            budget: 20e9,
        };
        let limited = memory(&["--device", "cuda:0", "--gpu-mem-limit", "11GB"]);
        let mut split = StepSplit::new(8, 1, Some(plan), &limited).unwrap();
        // The smaller of --auto's budget and the limit applies on a GPU; on the CPU only --auto's.
        assert_eq!(split.budget(true), Some(11e9));
        assert_eq!(split.budget(false), Some(20e9));
        let over = Overrun {
            measured: 12e9,
            budget: 11e9,
            on_gpu: true,
        };
        let mut retried = false;
        split.shrink(0, 1, &mut retried, over, |_| {}).unwrap();
        assert_eq!((split.micro_batch, split.grad_accum, retried), (4, 2, true));
        let err = split.shrink(0, 1, &mut retried, over, |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("over --auto's budget of 11.00 GB"),
            "{err}"
        );
    }

    #[test]
    fn auto_offloads_the_state_only_when_nothing_fits_with_it_on_the_gpu() {
        let config = models::preset("bert-large-uncased").unwrap().config;
        let architecture = models::Architecture::BertForSequenceClassification;
        let plan_on = |gpu_mem: &str| {
            let mut args = memory(&["--auto", "--device", "cuda:0", "--gpu-mem", gpu_mem]);
            let plan = args.apply_auto(architecture, &config, 512, 8, None);
            (plan, args.offload_optimizer)
        };
        // 11 GB holds BERT-Large's 16 bytes a parameter (5.4 GB) and a split of the batch.
        let (plan, offloaded) = plan_on("11GB");
        assert!(plan.is_ok() && !offloaded, "{plan:?}");
        // 6 GB does not (85% of it is 5.1 GB): the master weights and moments go to the host,
        // and the GPU keeps the gradient and the bf16 copy (6 bytes a parameter).
        let (plan, offloaded) = plan_on("6GB");
        let plan = plan.unwrap();
        assert!(offloaded, "{plan:?}");
        assert!(
            plan.estimate <= crate::memory::AUTO_MARGIN * 6e9,
            "{plan:?}"
        );
        assert_eq!(
            auto_record(&plan, Some(DtypeArg::Bf16), true, 0)["offload_optimizer"],
            true
        );
        // 2 GB holds neither.
        let (plan, _) = plan_on("2GB");
        assert!(plan.is_err());
    }
}
