//! The named presets: published checkpoints' configurations (and, for GPT-3, the paper's table),
//! by family, with parameter-count tests against transformers.

use crate::bert::BertConfig;
use crate::gpt2::Gpt2Config;
use crate::llama::LlamaConfig;
use crate::registry::{Architecture, Family, Head, ModelConfig};
use crate::t5::T5Config;

/// A named configuration of a published checkpoint (or, for GPT-3, of a paper's table row).
#[derive(Debug, Clone)]
pub struct Preset {
    /// The hub name, e.g. `bert-base-uncased`.
    pub name: &'static str,
    /// The class the hub checkpoint is saved as.
    pub architecture: Architecture,
    /// Its config.
    pub config: ModelConfig,
}

/// One row of Table 2.1 of the GPT-3 paper (Brown et al., 2020, "Language Models are Few-Shot
/// Learners"): the name, `n_params` as printed, `n_layers`, `d_model`, `n_heads`, `d_head`.
#[derive(Debug, Clone, Copy)]
pub struct Gpt3Row {
    /// Preset name.
    pub name: &'static str,
    /// `n_params` as the paper prints it.
    pub paper_params: f64,
    /// `n_layers`.
    pub layers: usize,
    /// `d_model`.
    pub d_model: usize,
    /// `n_heads`.
    pub heads: usize,
    /// `d_head`.
    pub head_dim: usize,
}

/// The eight GPT-3 sizes. Every model has a 2048-token context and GPT-2's 50257-token vocabulary.
///
/// The paper's XL row is inconsistent: 24 heads × 128 = 3072 ≠ d_model 2048, and with a
/// 3072-wide attention the model would have 1.52B parameters, not 1.3B. The preset keeps
/// d_model and d_head and uses 16 heads, which gives the printed 1.3B. The 13B row (5140 wide,
/// 40 × 128 = 5120 attention) is kept as printed, with `head_dim` set.
pub const GPT3_TABLE: [Gpt3Row; 8] = [
    Gpt3Row {
        name: "gpt3-small",
        paper_params: 125e6,
        layers: 12,
        d_model: 768,
        heads: 12,
        head_dim: 64,
    },
    Gpt3Row {
        name: "gpt3-medium",
        paper_params: 350e6,
        layers: 24,
        d_model: 1024,
        heads: 16,
        head_dim: 64,
    },
    Gpt3Row {
        name: "gpt3-large",
        paper_params: 760e6,
        layers: 24,
        d_model: 1536,
        heads: 16,
        head_dim: 96,
    },
    Gpt3Row {
        name: "gpt3-xl",
        paper_params: 1.3e9,
        layers: 24,
        d_model: 2048,
        heads: 16,
        head_dim: 128,
    },
    Gpt3Row {
        name: "gpt3-2.7b",
        paper_params: 2.7e9,
        layers: 32,
        d_model: 2560,
        heads: 32,
        head_dim: 80,
    },
    Gpt3Row {
        name: "gpt3-6.7b",
        paper_params: 6.7e9,
        layers: 32,
        d_model: 4096,
        heads: 32,
        head_dim: 128,
    },
    Gpt3Row {
        name: "gpt3-13b",
        paper_params: 13.0e9,
        layers: 40,
        d_model: 5140,
        heads: 40,
        head_dim: 128,
    },
    Gpt3Row {
        name: "gpt3-175b",
        paper_params: 175.0e9,
        layers: 96,
        d_model: 12288,
        heads: 96,
        head_dim: 128,
    },
];

/// Every preset zoo knows, in `zoo list` order.
pub fn presets() -> Vec<Preset> {
    let bert = |name, vocab, large: bool| {
        let mut config = BertConfig::new(vocab);
        if large {
            config.hidden_size = 1024;
            config.num_hidden_layers = 24;
            config.num_attention_heads = 16;
            config.intermediate_size = 4096;
        }
        config.pad_token_id = Some(0);
        (name, Architecture::BertForMaskedLM, config)
    };
    let roberta = |name, large: bool| {
        let (name, _, mut config) = bert(name, 50265, large);
        config.max_position_embeddings = 514;
        config.type_vocab_size = 1;
        config.layer_norm_eps = 1e-5;
        config.pad_token_id = Some(1);
        (name, Architecture::RobertaForMaskedLM, config)
    };
    let encoders = [
        bert("bert-base-uncased", 30522, false),
        bert("bert-base-cased", 28996, false),
        bert("bert-large-uncased", 30522, true),
        bert("bert-large-cased", 28996, true),
        bert("bert-base-chinese", 21128, false),
        roberta("roberta-base", false),
        roberta("roberta-large", true),
    ];
    let gpt = |name, config: Gpt2Config| Preset {
        name,
        architecture: Architecture::Gpt2LmHeadModel,
        config: ModelConfig::Gpt2(config),
    };
    let gpt2 = [
        ("gpt2", 12, 768, 12),
        ("gpt2-medium", 24, 1024, 16),
        ("gpt2-large", 36, 1280, 20),
        ("gpt2-xl", 48, 1600, 25),
    ]
    .map(|(name, layers, width, heads)| {
        let mut config = Gpt2Config::sized(layers, width, heads, 1024);
        config.bos_token_id = Some(50256);
        config.eos_token_id = Some(crate::generation::TokenIds::One(50256));
        gpt(name, config)
    });
    let gpt3 = GPT3_TABLE.map(|row| {
        let mut config = Gpt2Config::sized(row.layers, row.d_model, row.heads, 2048);
        config.head_dim = Some(row.head_dim);
        config.bos_token_id = Some(50256);
        config.eos_token_id = Some(crate::generation::TokenIds::One(50256));
        gpt(row.name, config)
    });
    // TsinghuaAI/CPM-Generate: GPT-2 blocks, 30000 SentencePiece ids, 1024 positions.
    let cpm = gpt(
        "cpm-generate",
        Gpt2Config {
            vocab_size: 30000,
            ..Gpt2Config::sized(32, 2560, 32, 1024)
        },
    );
    // (name, d_model, d_kv, d_ff, layers, heads, vocab, v1.1-style: gated gelu_new + untied head)
    let t5_rows = [
        ("t5-small", 512, 64, 2048, 6, 8, 32128, false),
        ("t5-base", 768, 64, 3072, 12, 12, 32128, false),
        ("t5-large", 1024, 64, 4096, 24, 16, 32128, false),
        ("t5-3b", 1024, 128, 16384, 24, 32, 32128, false),
        ("t5-11b", 1024, 128, 65536, 24, 128, 32128, false),
        ("t5-v1_1-small", 512, 64, 1024, 8, 6, 32128, true),
        ("t5-v1_1-base", 768, 64, 2048, 12, 12, 32128, true),
        ("t5-v1_1-large", 1024, 64, 2816, 24, 16, 32128, true),
        ("t5-v1_1-xl", 2048, 64, 5120, 24, 32, 32128, true),
        ("t5-v1_1-xxl", 4096, 64, 10240, 24, 64, 32128, true),
        ("mt5-small", 512, 64, 1024, 8, 6, 250112, true),
        ("mt5-base", 768, 64, 2048, 12, 12, 250112, true),
        ("mt5-large", 1024, 64, 2816, 24, 16, 250112, true),
        ("mt5-xl", 2048, 64, 5120, 24, 32, 250112, true),
        ("mt5-xxl", 4096, 64, 10240, 24, 64, 250112, true),
        ("flan-t5-small", 512, 64, 1024, 8, 6, 32128, true),
        ("flan-t5-base", 768, 64, 2048, 12, 12, 32128, true),
        ("flan-t5-large", 1024, 64, 2816, 24, 16, 32128, true),
        ("flan-t5-xl", 2048, 64, 5120, 24, 32, 32128, true),
        ("flan-t5-xxl", 4096, 64, 10240, 24, 64, 32128, true),
    ];
    let t5 = t5_rows.map(
        |(name, d_model, d_kv, d_ff, layers, heads, vocab, v11)| Preset {
            name,
            architecture: Architecture::T5ForConditionalGeneration,
            config: ModelConfig::T5(T5Config {
                vocab_size: vocab,
                d_model,
                d_kv,
                d_ff,
                num_layers: layers,
                num_heads: heads,
                feed_forward_proj: if v11 { "gated-gelu" } else { "relu" }.into(),
                tie_word_embeddings: !v11,
                decoder_start_token_id: Some(0),
                pad_token_id: Some(0),
                eos_token_id: Some(crate::generation::TokenIds::One(1)),
                ..T5Config::new()
            }),
        },
    );
    encoders
        .into_iter()
        .map(|(name, architecture, config)| Preset {
            name,
            architecture,
            config: ModelConfig::Bert(config),
        })
        .chain(gpt2)
        .chain(gpt3)
        .chain([cpm])
        .chain(t5)
        .chain([Preset {
            name: "cpm2",
            architecture: Architecture::T5ForConditionalGeneration,
            config: ModelConfig::T5(cpm2_config()),
        }])
        .chain(llama_presets())
        .collect()
}

/// The Llama-family presets, from the hub checkpoints' `config.json` (meta-llama/Llama-2-*,
/// meta-llama/Llama-3.1-* and 3.2-*, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-*).
fn llama_presets() -> Vec<Preset> {
    // Llama 3.1 / 3.2's RoPE: theta 500000, llama3 scaling from an 8192-token pretraining context.
    let llama3 = |factor: f64| {
        serde_json::json!({"rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "bos_token_id": 128000, "eos_token_id": 128001, "vocab_size": 128256})
    };
    let llama2 = serde_json::json!({"max_position_embeddings": 4096, "rms_norm_eps": 1e-5});
    let qwen = |vocab: usize, tied: bool| {
        serde_json::json!({"model_type": "qwen2", "vocab_size": vocab, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": tied,
            "bos_token_id": 151643, "eos_token_id": 151643, "use_sliding_window": false,
            "sliding_window": 32768})
    };
    let mistral = serde_json::json!({"model_type": "mistral", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "sliding_window": 4096});
    // (name, base config, hidden, intermediate, layers, heads, kv heads, tied)
    let rows = [
        ("llama-2-7b", llama2.clone(), 4096, 11008, 32, 32, 32, false),
        (
            "llama-2-13b",
            llama2.clone(),
            5120,
            13824,
            40,
            40,
            40,
            false,
        ),
        ("llama-2-70b", llama2, 8192, 28672, 80, 64, 8, false),
        ("llama-3.1-8b", llama3(8.0), 4096, 14336, 32, 32, 8, false),
        ("llama-3.1-70b", llama3(8.0), 8192, 28672, 80, 64, 8, false),
        (
            "llama-3.1-405b",
            llama3(8.0),
            16384,
            53248,
            126,
            128,
            8,
            false,
        ),
        ("llama-3.2-1b", llama3(32.0), 2048, 8192, 16, 32, 8, true),
        ("llama-3.2-3b", llama3(32.0), 3072, 8192, 28, 24, 8, true),
        ("mistral-7b-v0.1", mistral, 4096, 14336, 32, 32, 8, false),
        (
            "qwen2.5-0.5b",
            qwen(151936, true),
            896,
            4864,
            24,
            14,
            2,
            true,
        ),
        (
            "qwen2.5-1.5b",
            qwen(151936, true),
            1536,
            8960,
            28,
            12,
            2,
            true,
        ),
        (
            "qwen2.5-7b",
            qwen(152064, false),
            3584,
            18944,
            28,
            28,
            4,
            false,
        ),
        (
            "qwen2.5-72b",
            qwen(152064, false),
            8192,
            29568,
            80,
            64,
            8,
            false,
        ),
    ];
    rows.into_iter()
        .map(
            |(name, mut value, hidden, inter, layers, heads, kv, tied)| {
                let shape = serde_json::json!({"hidden_size": hidden, "intermediate_size": inter,
                "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv, "tie_word_embeddings": tied});
                for (key, v) in shape.as_object().expect("an object") {
                    value[key] = v.clone();
                }
                let config =
                    ModelConfig::Llama(LlamaConfig::from_hf(&value).expect("preset configs parse"));
                Preset {
                    name,
                    architecture: Architecture::for_head(Family::Llama, &config, Head::CausalLm)
                        .expect("the Llama family has causal LMs"),
                    config,
                }
            },
        )
        .collect()
}

/// CPM-2 (Zhang et al., 2021, "CPM-2: Large-scale Cost-effective Pre-trained Language Models"):
/// a T5 v1.1-style encoder-decoder, 24 + 24 blocks, d_model 4096, 64 heads × 64, d_ff 10240 with
/// gated GELU, relative buckets 32 / max distance 128, RMSNorm eps 1e-6, no biases, untied head,
/// and a 26240-id Chinese vocabulary whose 190 span sentinels are `<s_0>` … `<s_189>`.
pub fn cpm2_config() -> T5Config {
    T5Config {
        vocab_size: 26240,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_decoder_layers: Some(24),
        num_heads: 64,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward_proj: "gated-gelu".into(),
        tie_word_embeddings: false,
        ..T5Config::new()
    }
}

/// CPM-2's layout at test size: the preset's choices (gated GELU, untied head, relative buckets,
/// RMSNorm, no biases) with 2 + 2 blocks of width 32, 4 heads × 8, d_ff 64, dropout 0, for a
/// vocabulary of `vocab_size` (a test `vocab.txt`).
pub fn cpm2_tiny_config(vocab_size: usize) -> T5Config {
    T5Config {
        vocab_size,
        d_model: 32,
        d_kv: 8,
        num_heads: 4,
        d_ff: 64,
        num_layers: 2,
        num_decoder_layers: Some(2),
        dropout_rate: 0.0,
        ..cpm2_config()
    }
}

/// Finds a preset by name.
pub fn preset(name: &str) -> Option<Preset> {
    presets().into_iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::count_params;
    use crate::registry::AnyModel;
    use bmtrain_backend::Cpu;

    /// Parameter counts of the bare encoders (with pooler), as transformers counts them:
    /// `sum(p.numel() for p in BertModel(BertConfig(...)).parameters())`.
    #[test]
    fn preset_parameter_counts_match_transformers() {
        let device = Default::default();
        let expected = [
            ("bert-base-uncased", 109_482_240),
            ("bert-large-cased", 333_579_264),
            ("bert-base-chinese", 102_267_648),
            ("roberta-base", 124_645_632),
        ];
        for (name, count) in expected {
            let preset = preset(name).unwrap();
            let base = Architecture::base(preset.architecture.family());
            let model = AnyModel::<Cpu>::new(base, &preset.config, &device).unwrap();
            assert_eq!(count_params::<Cpu, _>(&model), count, "{name}");
        }
    }

    /// GPT-2 counts as transformers gives them:
    /// `sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(...)).parameters())` (tied head once).
    #[test]
    fn gpt2_preset_counts_match_transformers() {
        let device = Default::default();
        let expected = [
            ("gpt2", 124_439_808),
            ("gpt2-medium", 354_823_168),
            ("gpt2-large", 774_030_080),
            ("gpt2-xl", 1_557_611_200),
        ];
        for (name, count) in expected {
            let preset = preset(name).unwrap();
            let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device).unwrap();
            assert_eq!(count_params::<Cpu, _>(&model), count, "{name}");
        }
    }

    /// T5 counts as transformers gives them:
    /// `sum(p.numel() for p in T5ForConditionalGeneration(T5Config(...)).parameters())`.
    #[test]
    fn t5_preset_counts_match_transformers() {
        let device = Default::default();
        let expected = [
            ("t5-small", 60_506_624),
            ("t5-base", 222_903_552),
            ("t5-large", 737_668_096),
            ("flan-t5-small", 76_961_152),
            ("mt5-small", 300_176_768),
        ];
        for (name, count) in expected {
            let preset = preset(name).unwrap();
            let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device).unwrap();
            assert_eq!(count_params::<Cpu, _>(&model), count, "{name}");
        }
    }

    /// The GPT-3 presets against the paper's Table 2.1: exactly the closed-form count of the
    /// architecture (embeddings, per-block attention + MLP + norms, final norm), and within 2% of
    /// the printed `n_params` (the paper rounds: "350M" is 355.9M, "175.0B" is 174.6B).
    #[test]
    fn gpt3_preset_counts_match_the_paper() {
        let device = Default::default();
        let (vocab, context) = (50257usize, 2048usize);
        for row in GPT3_TABLE {
            let preset = preset(row.name).unwrap();
            let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device).unwrap();
            let count = count_params::<Cpu, _>(&model);
            let (d, a) = (row.d_model, row.heads * row.head_dim);
            let attention = 3 * (d * a + a) + (a * d + d);
            let mlp = (d * 4 * d + 4 * d) + (4 * d * d + d);
            let norms = 2 * 2 * d;
            let closed_form =
                vocab * d + context * d + row.layers * (attention + mlp + norms) + 2 * d;
            assert_eq!(count, closed_form, "{}", row.name);
            let off = (count as f64 - row.paper_params).abs() / row.paper_params;
            assert!(
                off < 0.02,
                "{}: {count} vs the paper's {}",
                row.name,
                row.paper_params
            );
        }
    }

    /// The Llama-family presets against transformers' own count of the same shapes,
    /// `sum(p.numel() for p in LlamaForCausalLM(config).parameters())` on the meta device
    /// (`tests/fixtures/llama_presets.json`, written by `generate.py llama`).
    #[test]
    fn llama_preset_counts_match_transformers() {
        let counts: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(include_str!("../../tests/fixtures/llama_presets.json")).unwrap();
        assert_eq!(counts.len(), 13);
        let device = Default::default();
        for (name, count) in counts {
            let preset = preset(&name).unwrap_or_else(|| panic!("{name} is a preset"));
            let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device).unwrap();
            assert_eq!(
                count_params::<Cpu, _>(&model) as u64,
                count.as_u64().unwrap(),
                "{name}"
            );
        }
    }
}
