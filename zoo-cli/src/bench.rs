//! `zoo bench`: the speed of BERT-base/-large and GPT-2 (124M, random weights) forward, training step
//! (forward, backward and AdamW through zoo's ZeRO trainer: what `zoo finetune` and `zoo pretrain`
//! run) and generation, as the median of repeated runs after a warm-up. `bench/torch_reference.py`
//! measures the same shapes in PyTorch and `bench/compare.py` runs both and prints the table.
//!
//! Achieved FLOP/s count the matrix products only: per token, `2 ·` the weights of the linear
//! layers (and the LM head), plus `4 · layers · seq · width` for the attention scores and their
//! product with the values; a training step is three forwards' worth.
//!
//! On a GPU a training step keeps the ZeRO state as training does (on the device, or offloaded
//! with `--offload-optimizer`), in `--dtype`, and the record gains the allocator's peak;
//! `--gpu-mem-limit` holds it to a smaller card's memory (`scripts/gpu-bench.sh`).

use std::time::Instant;

use anyhow::ensure;
use bmtrain_backend::comm::Communicator;
use bmtrain_backend::optim::AdamWConfig;
use bmtrain_backend::trainer::{ZeroOptions, ZeroSpec, ZeroTrainer};
use bmtrain_backend::{BackendTask, DeviceSpec};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Args, ValueEnum};
use models::bert::{BertConfig, BertForSequenceClassification, EncoderInput};
use models::generation::{Decoding, GenerationConfig};
use models::gpt2::{DecoderInput, Gpt2Config, Gpt2LmHeadModel};
use models::llama::{LlamaConfig, LlamaForCausalLM};
use models::train::{
    ClassifierBatch, ClassifierSpec, Gpt2Spec, LlamaSpec, LmBatch, bert_init, gpt2_init,
};
use models::{AnyModel, ModelConfig, preset};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde_json::json;

use crate::run::{DtypeArg, run_ranks};
use bmtrain_backend::device_memory::DeviceMemory;

/// `zoo bench` arguments.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Which model (random weights, the preset's shapes).
    #[arg(long, value_enum)]
    model: BenchModel,
    /// What to time.
    #[arg(long, value_enum)]
    mode: BenchMode,
    /// Rows.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per row (the prompt length for generate).
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Tokens to generate per row (generate).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Recompute blocks in backward (train).
    #[arg(long)]
    checkpointing: bool,
    /// Data-parallel thread ranks for a training step (train): the batch is split between them
    /// and each runs on its share of the cores, as `zoo finetune --ranks N` does.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// LoRA of this rank on the family's default targets (PEFT's: the query and value
    /// projections), every other weight frozen (train); 0: full training.
    #[arg(long, default_value_t = 0)]
    lora_r: usize,
    /// Where to run: cpu or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceSpec,
    /// Compute dtype of a training step (mixed precision: f32 master weights and AdamW state;
    /// f16 with dynamic loss scaling), as `zoo finetune --dtype`.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// On a GPU, keep the master weights and AdamW moments on the host (train), as
    /// `zoo finetune --offload-optimizer`.
    #[arg(long)]
    offload_optimizer: bool,
    /// On a GPU, fail when the allocator reserves more than this (train), e.g. 11GB, as
    /// `zoo finetune --gpu-mem-limit`: a smaller card simulated on a larger one.
    #[arg(long, value_name = "SIZE")]
    gpu_mem_limit: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// `--model`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchModel {
    /// bert-base-uncased's shapes, as a 2-label sequence classifier.
    BertBase,
    /// bert-large-uncased's shapes (340M), as a 2-label sequence classifier.
    BertLarge,
    /// GPT-2 small (124M), LM head tied.
    Gpt2,
    /// A Llama-shaped ~134M model (`llama_config`): width 768, 12 blocks, 12 query heads over
    /// 4 kv heads, SwiGLU 2048, Llama 2's 32000-token vocabulary, untied head.
    Llama,
}

/// `--mode`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// Inference forward.
    Forward,
    /// Forward, backward and AdamW.
    Train,
    /// Greedy generation with the KV cache (GPT-2).
    Generate,
}

/// Runs `zoo bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.iters >= 1 && args.batch >= 1 && args.seq >= 1,
        "--iters, --batch and --seq must be at least 1"
    );
    ensure!(
        args.ranks >= 1 && args.batch.is_multiple_of(args.ranks),
        "--batch {} must split evenly between --ranks {}",
        args.batch,
        args.ranks
    );
    // The models are fixed (124M parameters at most), but the machine may still be too small.
    if let Some(available) = crate::memory::available_memory() {
        let (architecture, config) = match args.model {
            BenchModel::BertBase | BenchModel::BertLarge => (
                models::Architecture::BertForSequenceClassification,
                ModelConfig::Bert(bert_config(args.model)),
            ),
            BenchModel::Gpt2 => (
                models::Architecture::Gpt2LmHeadModel,
                ModelConfig::Gpt2(gpt2_config()),
            ),
            BenchModel::Llama => (
                models::Architecture::LlamaForCausalLM,
                ModelConfig::Llama(llama_config()),
            ),
        };
        let shape = crate::memory::shape_of_config(architecture, &config)?;
        let setup = crate::memory::Setup {
            seq: args.seq,
            batch: args.batch,
            dtype_bytes: if args.dtype == DtypeArg::F32 { 4 } else { 2 },
            checkpointing: args.checkpointing,
            zero_stage: 3,
            ranks: args.ranks,
            ranks_in_process: args.ranks,
            gpu: matches!(args.device, DeviceSpec::Cuda(_)),
            offload: args.offload_optimizer,
        };
        crate::memory::check_training_fits(&shape, &setup, available, "zoo bench")?;
    }
    ensure!(
        args.ranks == 1 || args.mode == BenchMode::Train,
        "--ranks applies to --mode train"
    );
    ensure!(
        !(matches!(args.model, BenchModel::BertBase | BenchModel::BertLarge)
            && args.mode == BenchMode::Generate),
        "--mode generate needs a causal LM (--model gpt2 or llama)"
    );
    gpu_limit(&args)?;
    let Timed { times, gpu } = args.device.run(BenchTask { args: args.clone() })??;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let tokens = match args.mode {
        BenchMode::Generate => args.batch * args.new_tokens,
        _ => args.batch * args.seq,
    } as f64;
    let flops = flops_per_run(&args);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let record = json!({
        "engine": "zoo",
        "model": format!("{:?}", args.model).to_lowercase(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "batch": args.batch,
        "seq": args.seq,
        "new_tokens": (args.mode == BenchMode::Generate).then_some(args.new_tokens),
        "iters": args.iters,
        "median_ms": median * 1e3,
        "min_ms": sorted[0] * 1e3,
        "max_ms": sorted[sorted.len() - 1] * 1e3,
        "times_ms": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
        "tokens_per_s": tokens / median,
        "gflops": flops / median / 1e9,
        "threads": threads,
        "ranks": args.ranks,
        "device": args.device.to_string(),
        "dtype": crate::run::dtype_name(args.dtype),
        "placement": format!("{:?}", crate::run::placement(&args.device, args.offload_optimizer))
            .to_lowercase(),
        "gpu_mem_in_use_peak": gpu.map(|g| g.in_use),
        "gpu_mem_reserved_peak": gpu.map(|g| g.reserved),
    });
    if args.json {
        println!("{record}");
    } else {
        println!(
            "{:?} {:?}, {} × {}: median {:.1} ms over {} runs ({:.1}–{:.1}), {:.1} tokens/s, {:.1} GFLOP/s",
            args.model,
            args.mode,
            args.batch,
            args.seq,
            median * 1e3,
            args.iters,
            sorted[0] * 1e3,
            sorted[sorted.len() - 1] * 1e3,
            tokens / median,
            flops / median / 1e9
        );
    }
    Ok(())
}

/// BERT-base's or (`BertLarge`) BERT-large's shapes, with a 2-label head.
fn bert_config(model: BenchModel) -> BertConfig {
    let name = match model {
        BenchModel::BertLarge => "bert-large-uncased",
        _ => "bert-base-uncased",
    };
    let Some(ModelConfig::Bert(mut config)) = preset(name).map(|p| p.config) else {
        unreachable!("{name} is a BERT preset")
    };
    config.num_labels = Some(2);
    config
}

fn gpt2_config() -> Gpt2Config {
    let Some(ModelConfig::Gpt2(config)) = preset("gpt2").map(|p| p.config) else {
        unreachable!("gpt2 is a GPT-2 preset")
    };
    config
}

/// Matrix-product FLOPs of one timed run.
fn flops_per_run(args: &BenchArgs) -> f64 {
    // (layers, width, q/k/v/o projection weights per block, MLP weights per block, head vocab)
    let (layers, width, attention, mlp, head) = match args.model {
        BenchModel::BertBase | BenchModel::BertLarge => {
            let c = bert_config(args.model);
            let (h, f) = (c.hidden_size, c.intermediate_size);
            (c.num_hidden_layers, h, 4 * h * h, 2 * h * f, 0)
        }
        BenchModel::Gpt2 => {
            let c = gpt2_config();
            let (h, f) = (c.n_embd, c.n_inner.unwrap_or(4 * c.n_embd));
            (c.n_layer, h, 4 * h * h, 2 * h * f, c.vocab_size)
        }
        BenchModel::Llama => {
            let c = llama_config();
            let (h, f, kv) = (
                c.hidden_size,
                c.intermediate_size,
                c.kv_heads() * c.head_dim(),
            );
            (
                c.num_hidden_layers,
                h,
                2 * h * h + 2 * h * kv,
                3 * h * f,
                c.vocab_size,
            )
        }
    };
    let (l, h, v) = (layers as f64, width as f64, head as f64);
    let linear = l * (attention + mlp) as f64 + h * v;
    let per_token = |context: f64| 2.0 * linear + 4.0 * l * context * h;
    let (b, t) = (args.batch as f64, args.seq as f64);
    match args.mode {
        BenchMode::Forward => b * t * per_token(t),
        BenchMode::Train => 3.0 * b * t * per_token(t),
        BenchMode::Generate => {
            // The prompt once, then one token at a time against a growing cache.
            let prompt = b * t * per_token(t);
            let steps: f64 = (0..args.new_tokens.saturating_sub(1))
                .map(|i| b * per_token(t + 1.0 + i as f64))
                .sum();
            prompt + steps
        }
    }
}

struct BenchTask {
    args: BenchArgs,
}

impl BackendTask for BenchTask {
    type Output = anyhow::Result<Timed>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let args = &self.args;
        let mut rng = StdRng::seed_from_u64(0);
        let vocab = match args.model {
            BenchModel::BertBase | BenchModel::BertLarge => bert_config(args.model).vocab_size,
            BenchModel::Gpt2 => gpt2_config().vocab_size,
            BenchModel::Llama => llama_config().vocab_size,
        };
        let ids: Vec<i64> = (0..args.batch * args.seq)
            .map(|_| rng.random_range(0..vocab as i64))
            .collect();
        let time =
            |mut body: Box<dyn FnMut() -> anyhow::Result<()> + '_>| -> anyhow::Result<Timed> {
                for _ in 0..args.warmup {
                    body()?;
                }
                let times = (0..args.iters)
                    .map(|_| {
                        let started = Instant::now();
                        body()?;
                        B::sync(&device)?;
                        Ok(started.elapsed().as_secs_f64())
                    })
                    .collect::<anyhow::Result<_>>()?;
                Ok(Timed { times, gpu: None })
            };
        match (args.model, args.mode) {
            (BenchModel::BertBase | BenchModel::BertLarge, BenchMode::Forward) => {
                let model = bert_init(
                    BertForSequenceClassification::<B>::new(&bert_config(args.model), &device)?,
                    0,
                    &device,
                );
                let input = EncoderInput {
                    input_ids: ids_tensor::<B>(&ids, args, &device),
                    attention_mask: None,
                    token_type_ids: None,
                    decoder_input_ids: None,
                };
                time(Box::new(|| {
                    let (_, logits) = model.forward(&input);
                    let _ = logits.into_data();
                    Ok(())
                }))
            }
            (BenchModel::Gpt2, BenchMode::Forward) => {
                let model = random_gpt2::<B>(&device)?;
                let input = DecoderInput::new(ids_tensor::<B>(&ids, args, &device));
                time(Box::new(|| {
                    let (_, logits) = model.forward(&input);
                    let _ = logits.sum().into_data();
                    Ok(())
                }))
            }
            (BenchModel::Llama, BenchMode::Forward) => {
                let model = random_llama::<B>(&device)?;
                let input = DecoderInput::new(ids_tensor::<B>(&ids, args, &device));
                time(Box::new(|| {
                    let (_, logits) = model.forward(&input);
                    let _ = logits.sum().into_data();
                    Ok(())
                }))
            }
            (BenchModel::Gpt2 | BenchModel::Llama, BenchMode::Generate) => {
                let model = match args.model {
                    BenchModel::Llama => AnyModel::LlamaForCausalLM(random_llama::<B>(&device)?),
                    _ => AnyModel::Gpt2LmHeadModel(random_gpt2::<B>(&device)?),
                };
                let prompts: Vec<Vec<u32>> = ids
                    .chunks(args.seq)
                    .map(|row| row.iter().map(|&i| i as u32).collect())
                    .collect();
                let config = GenerationConfig {
                    max_new_tokens: args.new_tokens,
                    decoding: Decoding::Greedy,
                    repetition_penalty: 1.0,
                    eos_token_ids: Vec::new(),
                    pad_token_id: 0,
                };
                time(Box::new(|| {
                    model
                        .generate(&prompts, &config, &device, &mut |_| {})
                        .expect("a causal LM generates")?;
                    Ok(())
                }))
            }
            (_, BenchMode::Train) => {
                let args = args.clone();
                run_ranks(
                    args.ranks,
                    &args.device.clone(),
                    std::time::Duration::from_secs(crate::run::DEFAULT_COMM_TIMEOUT_S),
                    move |comm| train_times::<Autodiff<B>>(comm, device.clone(), &args, &ids),
                )
            }
            (BenchModel::BertBase | BenchModel::BertLarge, BenchMode::Generate) => {
                unreachable!("refused above")
            }
        }
    }
}

/// The Llama-shaped bench model of `--model llama`.
fn llama_config() -> LlamaConfig {
    let mut config = LlamaConfig::sized(12, 768, 12, 4, 2048);
    config.max_position_embeddings = 2048;
    config
}

/// The Llama-shaped model with random weights (`N(0, 0.02)`, seed 0).
fn random_llama<B: Backend>(device: &B::Device) -> anyhow::Result<LlamaForCausalLM<B>> {
    let model = LlamaForCausalLM::<B>::new(&llama_config(), device)?;
    Ok(models::train::normal_init(model, 0.02, 0, device))
}

/// GPT-2 small with random weights (GPT-2's initialisation, seed 0).
fn random_gpt2<B: Backend>(device: &B::Device) -> anyhow::Result<Gpt2LmHeadModel<B>> {
    let config = gpt2_config();
    let model = Gpt2LmHeadModel::<B>::new(&config, device)?;
    Ok(gpt2_init(model, config.n_layer, 0, device))
}

fn options(args: &BenchArgs, blocks: usize) -> ZeroOptions {
    let (compute_dtype, loss_scaler) = args.dtype.mixed_precision();
    ZeroOptions {
        checkpoint: vec![args.checkpointing; blocks],
        compute_dtype,
        loss_scaler,
        placement: crate::run::placement(&args.device, args.offload_optimizer),
        overlap: bmtrain_backend::trainer::Overlap::Auto,
        adamw: AdamWConfig::default(),
        // With LoRA only the adapters and a classifier's head train, as PEFT's SEQ_CLS does.
        frozen: (args.lora_r > 0).then(|| {
            bmtrain_backend::trainer::Frozen::new(|name| {
                !(name.contains(".lora.") || name.starts_with("classifier."))
            })
        }),
        ..ZeroOptions::checkpoint_all(blocks)
    }
}

/// `--lora-r`'s setup for `family`: PEFT's default targets, alpha 2r.
fn bench_lora(args: &BenchArgs, family: models::Family) -> Option<models::adapters::LoraSpec> {
    (args.lora_r > 0).then(|| models::adapters::LoraSpec {
        r: args.lora_r,
        alpha: 2.0 * args.lora_r as f64,
        dropout: 0.0,
        targets: models::adapters::default_targets(family)
            .iter()
            .map(|t| t.to_string())
            .collect(),
    })
}

/// Times training steps on one rank: its share of the batch (rows `rank · B/N ..`), forward,
/// backward and AdamW through the ZeRO trainer. Every step ends in collectives, so the ranks'
/// clocks agree; rank 0's are reported.
fn train_times<AB: AutodiffBackend>(
    comm: Box<dyn Communicator>,
    device: AB::Device,
    args: &BenchArgs,
    ids: &[i64],
) -> anyhow::Result<Timed> {
    progress(format_args!("building the model on {device:?}"));
    let rows = args.batch / comm.world_size();
    let rank_args = BenchArgs {
        batch: rows,
        ..args.clone()
    };
    let rank_ids = &ids[comm.rank() * rows * args.seq..][..rows * args.seq];
    // Every rank builds the same weights (seed 0) and labels (seed 1), then keeps its shard.
    let mut rng = StdRng::seed_from_u64(1);
    let labels: Vec<i64> = (0..args.batch).map(|_| rng.random_range(0..2)).collect();
    let rank_labels = labels[comm.rank() * rows..][..rows].to_vec();
    match args.model {
        BenchModel::BertBase | BenchModel::BertLarge => {
            let config = bert_config(args.model);
            let model = bert_init(
                BertForSequenceClassification::<AB>::new(&config, &device)?,
                0,
                &device,
            );
            let lora = bench_lora(args, models::Family::Bert);
            let model = crate::run::adapted(model, lora.as_ref(), &device)?;
            let split = ClassifierSpec::split_bert(model, &config);
            let batch = ClassifierBatch {
                input_ids: ids_tensor::<AB>(rank_ids, &rank_args, &device),
                attention_mask: Tensor::ones([rows, args.seq], &device),
                token_type_ids: None,
                labels: Tensor::from_data(TensorData::new(rank_labels, [rows]), &device),
            };
            time_steps(split, comm, &batch, args, &device)
        }
        BenchModel::Gpt2 => {
            let lora = bench_lora(args, models::Family::Gpt2);
            let model = crate::run::adapted(random_gpt2::<AB>(&device)?, lora.as_ref(), &device)?;
            let split = Gpt2Spec::split(model);
            let batch = LmBatch {
                input_ids: ids_tensor::<AB>(rank_ids, &rank_args, &device),
                labels: None,
            };
            time_steps(split, comm, &batch, args, &device)
        }
        BenchModel::Llama => {
            let lora = bench_lora(args, models::Family::Llama);
            let model = crate::run::adapted(random_llama::<AB>(&device)?, lora.as_ref(), &device)?;
            let split = LlamaSpec::split(model);
            let batch = LmBatch {
                input_ids: ids_tensor::<AB>(rank_ids, &rank_args, &device),
                labels: None,
            };
            time_steps(split, comm, &batch, args, &device)
        }
    }
}

/// A progress line on stderr, with the seconds since the first one: on a GPU the first steps
/// compile and autotune the kernels (minutes, on a cold cache), and a run cut off by a timeout
/// still says how far it got. stdout keeps the record.
fn progress(message: std::fmt::Arguments<'_>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!("bench [{:7.1} s]: {message}", start.elapsed().as_secs_f64());
}

/// A model cut into ZeRO segments: the spec, the embedding, the blocks, the head.
type Split<AB, S> = (
    S,
    <S as ZeroSpec<AB>>::Embed,
    Vec<<S as ZeroSpec<AB>>::Block>,
    <S as ZeroSpec<AB>>::Head,
);

/// Builds the trainer, runs the warm-up steps, then the timed ones.
fn time_steps<AB: AutodiffBackend, S: ZeroSpec<AB>>(
    (spec, embed, blocks, head): Split<AB, S>,
    comm: Box<dyn Communicator>,
    batch: &S::Batch,
    args: &BenchArgs,
    device: &AB::Device,
) -> anyhow::Result<Timed> {
    let options = options(args, blocks.len());
    let limit = gpu_limit(args)?;
    let rows = args.batch / comm.world_size();
    let started = Instant::now();
    let mut trainer = ZeroTrainer::new(spec, comm, device.clone(), embed, blocks, head, options);
    progress(format_args!(
        "trainer ready in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let step = |trainer: &mut ZeroTrainer<AB, S, Box<dyn Communicator>>,
                index: usize|
     -> anyhow::Result<()> {
        trainer.forward_backward(batch)?;
        trainer.step(1e-4)?;
        if let (Some(limit), Some(peak)) = (limit, trainer.device_memory_peak()) {
            ensure!(
                peak.reserved as f64 <= limit,
                "step {}: out of memory: the GPU allocator reserved {:.2} GB, over \
                 --gpu-mem-limit {:.2} GB, with {} row(s) of {} tokens",
                index + 1,
                peak.reserved as f64 / 1e9,
                limit / 1e9,
                rows,
                args.seq
            );
        }
        Ok(())
    };
    // One step, synchronised, its seconds reported as step `ordinal` of `count` of `kind`.
    let mut timed = |index: usize, kind: &str, ordinal: usize, count: usize| {
        let started = Instant::now();
        step(&mut trainer, index)?;
        AB::sync(device)?;
        let seconds = started.elapsed().as_secs_f64();
        progress(format_args!("{kind} {ordinal}/{count}: {seconds:.3} s"));
        anyhow::Ok(seconds)
    };
    for index in 0..args.warmup {
        timed(index, "warm-up step", index + 1, args.warmup)?;
    }
    let times = (0..args.iters)
        .map(|index| timed(args.warmup + index, "step", index + 1, args.iters))
        .collect::<anyhow::Result<_>>()?;
    Ok(Timed {
        times,
        gpu: trainer.device_memory_peak(),
    })
}

/// What a benchmark measured: each timed run's seconds, and on a GPU the allocator's highest
/// readings over the warm-up and timed runs.
struct Timed {
    times: Vec<f64>,
    gpu: Option<DeviceMemory>,
}

/// `--gpu-mem-limit` in bytes: only on a GPU.
fn gpu_limit(args: &BenchArgs) -> anyhow::Result<Option<f64>> {
    crate::run::gpu_limit(args.gpu_mem_limit.as_deref(), &args.device)
}

fn ids_tensor<B: Backend>(ids: &[i64], args: &BenchArgs, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [args.batch, args.seq]),
        device,
    )
}
