//! `zoo forward`: run a model directory on a batch and write the outputs as safetensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use bmtrain_backend::{BackendTask, DeviceSpec};
use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use checkpoints_convert::{Batch, LoadOptions, load_model, load_tokenizer};
use clap::Args;
use models::Logits;

use crate::FormatArg;

/// `zoo forward` arguments.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// A model directory: HF (config.json) or zoo (zoo.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors, as
    /// PEFT or a `zoo finetune --lora-r` checkpoint writes it) to run on top of --model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Input text; repeat for a padded batch.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "ids",
        required_unless_present = "ids"
    )]
    text: Vec<String>,
    /// Token ids, comma-separated (e.g. 101,7592,102); repeat for a padded batch.
    #[arg(long, value_name = "IDS")]
    ids: Vec<String>,
    /// Output safetensors file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Where to run: cpu or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceSpec,
    /// Which HF weights file to read.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
}

/// Tokenises (or parses) the inputs, then loads and runs the model on the chosen device.
pub fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let rows = if args.text.is_empty() {
        parse_ids(&args.ids, "--ids")?
    } else {
        tokenize(&args.model, &args.text)?
    };
    let device = args.device;
    device.run(ForwardTask { args, rows })?
}

/// Parses each value of the id flag `flag`: comma-separated non-negative integers.
pub fn parse_ids(values: &[String], flag: &str) -> anyhow::Result<Vec<Vec<u32>>> {
    values
        .iter()
        .enumerate()
        .map(|(row, value)| {
            let ids = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<u32>().with_context(|| {
                        format!("{flag} value {}: '{s}' is not a token id", row + 1)
                    })
                })
                .collect::<anyhow::Result<Vec<u32>>>()?;
            ensure!(!ids.is_empty(), "{flag} value {} is empty", row + 1);
            Ok(ids)
        })
        .collect()
}

fn tokenize(model_dir: &Path, texts: &[String]) -> anyhow::Result<Vec<Vec<u32>>> {
    if let Some(row) = texts.iter().position(|t| t.trim().is_empty()) {
        bail!(
            "--text value {} is empty: give some text to encode",
            row + 1
        );
    }
    let tokenizer = load_tokenizer(model_dir)?.with_context(|| {
        format!(
            "{}: no tokenizer (tokenizer.json, vocab.txt or vocab.json + merges.txt); pass --ids instead of --text",
            model_dir.display()
        )
    })?;
    texts
        .iter()
        .map(|t| Ok(checkpoints_convert::encode(&tokenizer, t)?))
        .collect()
}

/// The backend-generic part of `zoo forward`: load, check the inputs, run, write.
struct ForwardTask {
    args: ForwardArgs,
    rows: Vec<Vec<u32>>,
}

impl BackendTask for ForwardTask {
    type Output = anyhow::Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let Self { args, rows } = self;
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
        for key in &loaded.unused {
            eprintln!("warning: unused checkpoint key '{key}'");
        }
        let model = &loaded.model;
        let vocab = model.vocab_size();
        for (row, ids) in rows.iter().enumerate() {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                bail!(
                    "input {}: token id {bad} is out of range (vocab_size {vocab})",
                    row + 1
                );
            }
            let max = model.max_sequence_length();
            ensure!(
                ids.len() <= max,
                "input {}: {} tokens, but the model takes at most {max}",
                row + 1,
                ids.len()
            );
        }
        let pad = loaded.spec.config.pad_token_id().unwrap_or(0);
        let batch = Batch::pad(&rows, pad);
        let output = model.forward(&batch.to_input::<B>(&device));

        let mut tensors = BTreeMap::new();
        tensors.insert(
            "input_ids".to_string(),
            TensorData::new(batch.input_ids.clone(), [batch.batch, batch.seq]),
        );
        tensors.insert(
            "attention_mask".to_string(),
            TensorData::new(batch.attention_mask.clone(), [batch.batch, batch.seq]),
        );
        tensors.insert(
            "last_hidden_state".to_string(),
            output.last_hidden_state.into_data().convert::<f32>(),
        );
        if let Some(encoded) = output.encoder_last_hidden_state {
            tensors.insert(
                "encoder_last_hidden_state".to_string(),
                encoded.into_data().convert::<f32>(),
            );
        }
        if let Some(pooled) = output.pooler_output {
            tensors.insert(
                "pooler_output".to_string(),
                pooled.into_data().convert::<f32>(),
            );
        }
        if let Some(logits) = output.logits {
            let data = match logits {
                Logits::PerToken(l) => l.into_data(),
                Logits::PerSequence(l) => l.into_data(),
            };
            tensors.insert("logits".to_string(), data.convert::<f32>());
        }
        checkpoints_convert::write_safetensors(&args.out, &tensors, None)
            .with_context(|| format!("writing {}", args.out.display()))?;
        println!(
            "wrote {} ({}: {} row(s) × {} tokens; {})",
            args.out.display(),
            loaded.spec.architecture.hf_name(),
            batch.batch,
            batch.seq,
            tensors.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }
}
