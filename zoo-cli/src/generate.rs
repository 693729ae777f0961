//! `zoo generate`: continue a prompt with a causal LM, streaming the text to stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use bmtrain_backend::{BackendTask, DeviceSpec};
use burn::tensor::backend::Backend;
use checkpoints_convert::{LoadOptions, TextTokenizer, load_model, load_tokenizer};
use clap::{Args, ValueEnum};
use models::Family;
use models::generation::{Decoding, EarlyStopping, GenerationConfig, TokenIds};
use serde_json::Value;

use crate::FormatArg;

/// `zoo generate` arguments. With an encoder-decoder model (T5), the prompt is the encoder's input
/// and the output is the decoder's text alone.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A model directory with an LM head (a causal LM or a T5): HF (config.json) or zoo (zoo.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors, as
    /// PEFT or a `zoo finetune --lora-r` checkpoint writes it) to run on top of --model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Prompt text (for T5: the encoder input); repeat for a batch.
    #[arg(
        long,
        value_name = "TEXT",
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    prompt: Vec<String>,
    /// Prompt as comma-separated token ids (e.g. 464,2068,7586); repeat for a batch.
    #[arg(long, value_name = "IDS")]
    prompt_ids: Vec<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless a sampling option is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Sample with this temperature.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample from the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    top_p: Option<f32>,
    /// Beam search with this many beams (1: no beam search).
    #[arg(long, default_value_t = 1, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    num_beams: usize,
    /// Beam search: finished beams score `log p / length^length_penalty`.
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Beam search stopping rule, as transformers' early_stopping.
    #[arg(long, value_enum, default_value_t = EarlyStoppingArg::False)]
    early_stopping: EarlyStoppingArg,
    /// Penalty on tokens already in the sequence (1: none).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the token ids as JSON instead of text.
    #[arg(long)]
    ids: bool,
    /// Where to run: cpu or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceSpec,
    /// Which HF weights file to read.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
}

/// `--early-stopping`.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum EarlyStoppingArg {
    /// Stop when no running beam can beat the finished ones (transformers' default heuristic).
    False,
    /// Stop as soon as num_beams hypotheses are finished.
    True,
    /// Canonical beam search.
    Never,
}

/// Encodes the prompts, then loads and runs the model on the chosen device.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let spec = checkpoints_convert::read_spec(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    // An encoder reads a whole input, with its special tokens (T5 appends </s>); a decoder-only
    // model continues the text as it is.
    let seq2seq = spec.architecture.family() == Family::T5;
    let tokenizer = load_tokenizer(&args.model)
        .with_context(|| format!("reading the tokenizer of {}", args.model.display()))?;
    let prompts = if args.prompt.is_empty() {
        crate::forward::parse_ids(&args.prompt_ids, "--prompt-ids")?
    } else {
        let tokenizer = tokenizer.as_ref().with_context(|| {
            format!(
                "{}: no tokenizer (tokenizer.json, vocab.json + merges.txt, or spiece.model with \
                 CpmTokenizer); pass --prompt-ids instead of --prompt",
                args.model.display()
            )
        })?;
        encode_prompts(tokenizer, &args.prompt, seq2seq)?
    };
    if args.ids && tokenizer.is_none() {
        // Fine: ids need no tokenizer.
    } else if tokenizer.is_none() {
        bail!(
            "{}: no tokenizer to decode the output; pass --ids to print token ids",
            args.model.display()
        );
    }
    let device = args.device;
    device.run(GenerateTask {
        args,
        prompts,
        tokenizer,
    })?
}

/// Decoder-only prompts are encoded without the special-token template (generation continues
/// the text); encoder inputs with it.
fn encode_prompts(
    tokenizer: &TextTokenizer,
    prompts: &[String],
    add_special_tokens: bool,
) -> anyhow::Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(row, text)| {
            let ids = tokenizer.encode(text, add_special_tokens)?;
            ensure!(
                !ids.is_empty(),
                "--prompt value {} encodes to no tokens",
                row + 1
            );
            Ok(ids)
        })
        .collect()
}

/// End-of-text and padding ids: `generation_config.json` first, then `config.json`; padding falls
/// back to the first end-of-text id, as transformers does.
fn special_ids(dir: &Path, hf_config: &Value) -> anyhow::Result<(Vec<u32>, Option<u32>)> {
    let generation_path = dir.join("generation_config.json");
    let generation: Value = if generation_path.is_file() {
        checkpoints_convert::tensors::read_json(&generation_path)?
    } else {
        Value::Null
    };
    let field = |name: &str| {
        generation
            .get(name)
            .filter(|v| !v.is_null())
            .or_else(|| hf_config.get(name).filter(|v| !v.is_null()))
    };
    let eos = match field("eos_token_id") {
        Some(value) => serde_json::from_value::<TokenIds>(value.clone())
            .context("eos_token_id is neither an id nor a list of ids")?
            .to_vec(),
        None => Vec::new(),
    };
    let pad = field("pad_token_id")
        .and_then(Value::as_u64)
        .map(|id| id as u32);
    Ok((eos, pad))
}

impl GenerateArgs {
    fn config(&self, eos: Vec<u32>, pad: u32) -> GenerationConfig {
        let decoding = if self.num_beams > 1 {
            Decoding::Beam {
                num_beams: self.num_beams,
                length_penalty: self.length_penalty,
                early_stopping: match self.early_stopping {
                    EarlyStoppingArg::False => EarlyStopping::Heuristic,
                    EarlyStoppingArg::True => EarlyStopping::Eager,
                    EarlyStoppingArg::Never => EarlyStopping::Never,
                },
            }
        } else if !self.greedy
            && (self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some())
        {
            Decoding::Sample {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            }
        } else {
            Decoding::Greedy
        };
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            decoding,
            repetition_penalty: self.repetition_penalty,
            eos_token_ids: eos,
            pad_token_id: pad,
        }
    }
}

struct GenerateTask {
    args: GenerateArgs,
    prompts: Vec<Vec<u32>>,
    tokenizer: Option<TextTokenizer>,
}

impl BackendTask for GenerateTask {
    type Output = anyhow::Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let Self {
            args,
            prompts,
            tokenizer,
        } = self;
        let options = LoadOptions {
            format: args.format.into(),
            memory_limit: crate::memory::available_memory().map(|b| b as u64),
            adapter: args.adapter.clone(),
            ..Default::default()
        };
        let loaded = load_model::<B>(&args.model, &device, &options)
            .with_context(|| format!("loading {}", args.model.display()))?;
        // The checkpoint's bytes are freed: give them back (a quantized model's footprint is its
        // codes, not the file it was read from).
        crate::alloc::release_free_memory();
        let loaded_resident = resident_mb();
        let (eos, pad) = special_ids(&args.model, &loaded.spec.hf_config)?;
        let pad = pad.or(eos.first().copied()).unwrap_or(0);
        let config = args.config(eos.clone(), pad);
        let seq2seq = loaded.spec.architecture.family() == Family::T5;
        // Stream one prompt's text as it comes; batches and beams print when done. A decoder-only
        // model's output starts with its prompt; an encoder-decoder's is the decoder's text alone.
        let stream = !args.ids && prompts.len() == 1 && args.num_beams <= 1;
        let echoed: &[u32] = if seq2seq { &[] } else { &prompts[0] };
        let mut streamer = tokenizer
            .as_ref()
            .filter(|_| stream)
            .map(|t| TextStreamer::new(t, echoed));
        let on_tokens = |tokens: &[Option<u32>]| {
            if let (Some(streamer), Some(Some(token))) = (streamer.as_mut(), tokens.first()) {
                streamer.push(*token, &eos);
            }
        };
        let started = Instant::now();
        let mut on_tokens = on_tokens;
        let Some(generated) = loaded
            .model
            .generate(&prompts, &config, &device, &mut on_tokens)
        else {
            bail!(
                "{} holds a {}, which has no LM head; zoo generate needs a causal LM (such as \
                 GPT2LMHeadModel, LlamaForCausalLM) or an encoder-decoder LM \
                 (T5ForConditionalGeneration)",
                args.model.display(),
                loaded.spec.architecture.hf_name()
            );
        };
        let generated = generated?;
        let elapsed = started.elapsed().as_secs_f64();

        let new_tokens: Vec<Vec<u32>> = (0..prompts.len())
            .map(|row| generated.new_tokens(row, &eos))
            .collect();
        if args.ids {
            let json = serde_json::json!({ "prompts": prompts, "generated": new_tokens });
            println!("{json}");
        } else if let Some(streamer) = streamer {
            streamer.finish();
        } else {
            let tokenizer = tokenizer.as_ref().expect("checked before loading");
            for (row, prompt) in prompts.iter().enumerate() {
                let mut all = if seq2seq { Vec::new() } else { prompt.clone() };
                all.extend(&new_tokens[row]);
                let text = tokenizer.decode(&all, true)?;
                if prompts.len() > 1 {
                    println!("[{}] {text}", row + 1);
                } else {
                    println!("{text}");
                }
            }
        }
        let count: usize = new_tokens.iter().map(Vec::len).sum();
        // What the model and its results hold, not the pages freed in the last milliseconds.
        crate::alloc::release_free_memory();
        eprintln!(
            "generated {count} tokens in {elapsed:.2} s ({:.1} tokens/s, {} row(s), {}{})",
            count as f64 / elapsed.max(1e-9),
            prompts.len(),
            match config.decoding {
                Decoding::Greedy => "greedy".to_string(),
                Decoding::Sample { .. } => "sampling".to_string(),
                Decoding::Beam { num_beams, .. } => format!("{num_beams} beams"),
            },
            match (loaded_resident, resident_mb()) {
                (Some(loaded), Some(now)) =>
                    format!("; {loaded:.0} MB resident with the model loaded, {now:.0} MB after"),
                _ => String::new(),
            },
        );
        Ok(())
    }
}

/// Prints a growing sequence's text as tokens arrive: decodes everything so far and prints what
/// is new, holding back while the text ends in an incomplete character.
struct TextStreamer<'a> {
    tokenizer: &'a TextTokenizer,
    tokens: Vec<u32>,
    printed: String,
}

impl<'a> TextStreamer<'a> {
    fn new(tokenizer: &'a TextTokenizer, prompt: &[u32]) -> Self {
        let mut streamer = Self {
            tokenizer,
            tokens: prompt.to_vec(),
            printed: String::new(),
        };
        streamer.flush(false);
        streamer
    }

    fn push(&mut self, token: u32, eos: &[u32]) {
        if eos.contains(&token) {
            return;
        }
        self.tokens.push(token);
        self.flush(false);
    }

    fn flush(&mut self, last: bool) {
        let Ok(text) = self.tokenizer.decode(&self.tokens, true) else {
            return;
        };
        if !last && text.ends_with('\u{FFFD}') {
            return;
        }
        let mut out = std::io::stdout().lock();
        match text.strip_prefix(self.printed.as_str()) {
            Some(new) => {
                let _ = write!(out, "{new}");
            }
            // A decoder that changed earlier text (rare): start a new line with the whole text.
            None => {
                let _ = write!(out, "\n{text}");
            }
        }
        let _ = out.flush();
        self.printed = text;
    }

    fn finish(mut self) {
        self.flush(true);
        println!();
    }
}

/// This process's resident memory now (Linux's `VmRSS`), in MB; `None` where unreadable.
fn resident_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1000.0)
}
