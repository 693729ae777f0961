//! The Llama family, as transformers' `modeling_llama.py`, `modeling_mistral.py` and
//! `modeling_qwen2.py` (the three differ only in config): pre-norm decoder blocks with RMSNorm,
//! rotary position embeddings applied to each head's two halves (`rotate_half`), grouped-query
//! attention (`num_key_value_heads`; the KV cache keeps the kv heads), the SwiGLU MLP
//! (`down(silu(gate(x)) · up(x))`), and a tied or untied LM head. Covers Llama 2 / 3.x,
//! Mistral (sliding-window attention) and Qwen2 / 2.5 (q/k/v biases).
//!
//! Reading order: config → rotary embeddings → attention → block → model (with its KV cache) →
//! LM head.

use crate::layers::{Embedding, EmbeddingConfig};
use burn::module::Module;
use burn::tensor::{
    ElementConversion, FloatDType, Int, Tensor, TensorData, activation::softmax, backend::Backend,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod zero;

use crate::ModelError;
use crate::io::{
    DecoderCache, DecoderInput, EncoderInput, Logits, ModelClass, ModelOutput, TokenIds,
    last_position_logits, last_token_score, positions, vocab_logits,
};
use crate::layers::{
    Activation, AttentionMask, Dropout, DropoutConfig, FeedForward, FeedForwardConfig, KvCache,
    Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use bmtrain_backend::kernels;

// ---------------------------------------------------------------------------------------------
// Config

/// A Llama-family `config.json` (`model_type` `llama`, `mistral` or `qwen2`), with transformers'
/// field names; fields a file leaves out take the defaults of its `model_type`'s config class
/// ([`LlamaConfig::from_hf`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`: which transformers class reads the file.
    pub model_type: String,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Inner width of the gated MLP.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); `num_attention_heads` when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (`silu` in every published model).
    pub hidden_act: String,
    /// The longest context the model was trained for (dynamic NTK scaling starts beyond it).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// transformers 4: RoPE base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers 4: RoPE scaling (`{"rope_type" | "type": "llama3" | "linear" | "dynamic", …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5: base and scaling in one object (`{"rope_type", "rope_theta", …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// Llama: biases on q/k/v/o (Qwen2 always has q/k/v biases and no o bias; Mistral none).
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: biases on the MLP's projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Dropout on attention probabilities.
    #[serde(default)]
    pub attention_dropout: f64,
    /// Whether `lm_head` is the token embeddings.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Mistral / Qwen2: width of the attention window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether the window is used at all (transformers 5 keeps `sliding_window` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: blocks from this index on use the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `full_attention` / `sliding_attention` per block, when the file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Standard deviation of fresh weights (`_init_weights`).
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// Start-of-text id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-text id(s): Llama 3 instruct configs list several.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Number of labels of `LlamaForSequenceClassification`, when the config says it directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Label names by id; its length is the number of labels when `num_labels` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<serde_json::Map<String, Value>>,
}

fn default_initializer_range() -> f64 {
    0.02
}

/// The RoPE variants zoo applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (inverse frequencies divided by it).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// NTK-aware: beyond `max_position_embeddings` the base grows with the sequence.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth band between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
}

impl LlamaConfig {
    /// Reads a `config.json` value: fields it leaves out take the defaults of
    /// `LlamaConfig` / `MistralConfig` / `Qwen2Config` (by `model_type`, `llama` when absent).
    pub fn from_hf(value: &Value) -> Result<Self, serde_json::Error> {
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        let defaults = match model_type.as_str() {
            "mistral" => serde_json::json!({
                "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096,
                "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
            }),
            "qwen2" => serde_json::json!({
                "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 32768, "use_sliding_window": false,
                "sliding_window": 4096, "max_window_layers": 28, "rope_theta": 10000.0,
            }),
            _ => serde_json::json!({
                "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32,
                "max_position_embeddings": 2048, "rope_theta": 10000.0,
                "bos_token_id": 1, "eos_token_id": 2,
            }),
        };
        let mut merged = value.clone();
        if let (Some(object), Value::Object(defaults)) = (merged.as_object_mut(), defaults) {
            object.insert("model_type".into(), Value::String(model_type));
            for (key, default) in defaults {
                object.entry(key).or_insert(default);
            }
            object.entry("hidden_act").or_insert("silu".into());
            object.entry("rms_norm_eps").or_insert(1e-6.into());
        }
        // A theta inside rope_parameters wins; keep rope_theta only where the file has it.
        if merged.get("rope_parameters").is_some_and(Value::is_object)
            && value.get("rope_theta").is_none()
            && let Some(object) = merged.as_object_mut()
        {
            object.remove("rope_theta");
        }
        serde_json::from_value(merged)
    }

    /// A config of the given shape (`model_type` llama, the rest as transformers' defaults).
    pub fn sized(
        layers: usize,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
    ) -> Self {
        let mut config = Self::from_hf(&serde_json::json!({})).expect("the defaults parse");
        config.num_hidden_layers = layers;
        config.hidden_size = hidden;
        config.num_attention_heads = heads;
        config.num_key_value_heads = Some(kv_heads);
        config.intermediate_size = intermediate;
        config
    }

    /// Number of labels of a classification head: `num_labels`, else `id2label`'s length, else 2
    /// (transformers' default).
    pub fn labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(2)
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v have biases (Qwen2 always; Llama with `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        match self.model_type.as_str() {
            "qwen2" => true,
            "mistral" => false,
            _ => self.attention_bias,
        }
    }

    /// Whether the attention output projection has a bias (Llama with `attention_bias` only).
    pub fn o_bias(&self) -> bool {
        self.model_type == "llama" && self.attention_bias
    }

    /// Whether the MLP has biases (Llama with `mlp_bias` only).
    pub fn mlp_has_bias(&self) -> bool {
        self.model_type == "llama" && self.mlp_bias
    }

    /// The window of block `index`, if it has one: Mistral's `sliding_window` on every block;
    /// Qwen2's when `use_sliding_window`, from `max_window_layers` on; `layer_types` when given.
    pub fn window_of_block(&self, index: usize) -> Option<usize> {
        let window = self.sliding_window?;
        if let Some(types) = &self.layer_types {
            return (types.get(index).map(String::as_str) == Some("sliding_attention"))
                .then_some(window);
        }
        match self.model_type.as_str() {
            "mistral" => (self.use_sliding_window != Some(false)).then_some(window),
            "qwen2" => (self.use_sliding_window == Some(true)
                && index >= self.max_window_layers.unwrap_or(0))
            .then_some(window),
            _ => None,
        }
    }

    /// The RoPE base: `rope_parameters.rope_theta` (transformers 5), else `rope_theta`, else
    /// 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// The RoPE scaling, from `rope_parameters` (transformers 5) or `rope_scaling` (4); a type zoo
    /// does not apply is an error naming the field.
    pub fn rope_scaling(&self) -> Result<RopeScaling, ModelError> {
        let (field, params) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) if p.is_object() => ("rope_parameters", p),
            (_, Some(s)) if s.is_object() => ("rope_scaling", s),
            _ => return Ok(RopeScaling::None),
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| {
            params.get(key).and_then(Value::as_f64).ok_or_else(|| {
                ModelError::config(field, format!("rope type '{kind}' needs a number '{key}'"))
            })
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: number("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            },
            other => {
                return Err(ModelError::config(
                    field,
                    format!(
                        "rope type '{other}' is not supported (zoo applies default, linear, dynamic, llama3)"
                    ),
                ));
            }
        })
    }

    /// Checks what the model code relies on, naming the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !["llama", "mistral", "qwen2"].contains(&self.model_type.as_str()) {
            return Err(ModelError::config(
                "model_type",
                format!("'{}' is not a Llama-family type", self.model_type),
            ));
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim()),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::config(field, "must be positive".into()));
            }
        }
        crate::check_blocks("num_hidden_layers", self.num_hidden_layers)?;
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::config(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(ModelError::config(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads,
                    self.kv_heads()
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ModelError::config(
                "head_dim",
                format!("{} is odd; rotary embeddings rotate pairs", self.head_dim()),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(ModelError::config(
                "sliding_window",
                "must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.attention_dropout) {
            return Err(ModelError::config(
                "attention_dropout",
                format!("dropout {} is not in [0, 1)", self.attention_dropout),
            ));
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 1.0) {
            return Err(ModelError::config(
                "rope_theta",
                format!("{theta} must be a finite number above 1"),
            ));
        }
        self.rope_scaling()?;
        self.activation()?;
        Ok(())
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation, ModelError> {
        Activation::from_hf(&self.hidden_act)
            .map_err(|e| ModelError::config("hidden_act", e.to_string()))
    }

    /// The same config with every dropout probability set to `p` (attention dropout is the only
    /// one these models have).
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.attention_dropout = p;
        self
    }
}

impl crate::io::FamilyConfig for LlamaConfig {
    fn from_hf(value: &Value) -> Result<Self, serde_json::Error> {
        LlamaConfig::from_hf(value)
    }
    fn validate(&self) -> Result<(), ModelError> {
        LlamaConfig::validate(self)
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }
    fn untie_word_embeddings(&mut self) {
        self.tie_word_embeddings = false;
    }
    fn gated_ffn(&self) -> bool {
        true
    }
    fn optional_biases(&self) -> [bool; 3] {
        [self.qkv_bias(), self.o_bias(), self.mlp_has_bias()]
    }
    fn with_dropout(self, p: f64) -> Self {
        LlamaConfig::with_dropout(self, p)
    }
    fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }
    fn set_pad_token_id(&mut self, id: u32) {
        self.pad_token_id = Some(id);
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
    /// Llama 2 / Mistral end with `</s>`, Llama 3 with `<|end_of_text|>`, Qwen2 with
    /// `<|endoftext|>`.
    fn end_of_text_tokens(&self) -> &'static [&'static str] {
        &["</s>", "<|end_of_text|>", "<|endoftext|>"]
    }
    /// Rotary positions have no table.
    fn max_positions(&self, _: crate::Family) -> Option<usize> {
        None
    }
    fn set_num_labels(&mut self, labels: usize) {
        self.num_labels = Some(labels);
    }
    fn model_type(&self) -> Option<&str> {
        Some(&self.model_type)
    }
    fn activation_dims(&self) -> [usize; 3] {
        [
            self.hidden_size,
            2 * self.intermediate_size,
            self.num_attention_heads,
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary position embeddings

/// The rotary embedding of a config: inverse frequencies (`head_dim / 2` of them) computed as
/// transformers' `ROPE_INIT_FUNCTIONS` do, in f32.
#[derive(Debug, Clone)]
pub struct Rope {
    theta: f64,
    head_dim: usize,
    scaling: RopeScaling,
    max_positions: usize,
}

impl Rope {
    /// The rotary embedding a config asks for.
    pub fn new(config: &LlamaConfig) -> Result<Self, ModelError> {
        Ok(Self {
            theta: config.rope_theta(),
            head_dim: config.head_dim(),
            scaling: config.rope_scaling()?,
            max_positions: config.max_position_embeddings,
        })
    }

    /// The inverse frequencies for a forward whose largest position is `seq_len - 1` (only
    /// dynamic NTK scaling depends on it).
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let dim = self.head_dim;
        let base = match self.scaling {
            RopeScaling::Dynamic { factor } if seq_len > self.max_positions => {
                let ratio = factor * seq_len as f64 / self.max_positions as f64 - (factor - 1.0);
                self.theta * ratio.powf(dim as f64 / (dim as f64 - 2.0))
            }
            _ => self.theta,
        };
        // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in f32.
        let plain: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        match self.scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// `(cos, sin)` of every position, `[batch, seq, 1, head_dim]` in `dtype`, to rotate
    /// `[batch, seq, heads, head_dim]` (the two halves repeat the `head_dim / 2` angles, as
    /// transformers' `cat((freqs, freqs))`).
    pub fn tables<B: Backend>(
        &self,
        position_ids: &Tensor<B, 2, Int>,
        dtype: FloatDType,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, seq] = position_ids.dims();
        let device = position_ids.device();
        // Only dynamic NTK scaling depends on the longest position (reading it syncs the device).
        let longest = match self.scaling {
            RopeScaling::Dynamic { .. } => {
                position_ids
                    .clone()
                    .max()
                    .into_scalar()
                    .elem::<i64>()
                    .max(0) as usize
                    + 1
            }
            _ => 0,
        };
        let inv_freq = self.inv_freq(longest);
        let half = inv_freq.len();
        let inv_freq = Tensor::<B, 1>::from_data(TensorData::new(inv_freq, [half]), &device)
            .cast(FloatDType::F32)
            .reshape([1, 1, half]);
        let positions = position_ids
            .clone()
            .float()
            .cast(FloatDType::F32)
            .reshape([batch, seq, 1]);
        let angles = positions * inv_freq;
        let angles =
            Tensor::cat(vec![angles.clone(), angles], 2).reshape([batch, seq, 1, 2 * half]);
        (angles.clone().cos().cast(dtype), angles.sin().cast(dtype))
    }
}

/// `x · cos + rotate_half(x) · sin` on `[batch, seq, heads, head_dim]` (cos, sin:
/// `[batch, seq, 1, head_dim]`), where `rotate_half` maps the halves `(x₁, x₂)` to `(−x₂, x₁)`.
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    if let Some(rotated) = kernels::rotary(&x, cos, sin) {
        return rotated;
    }
    let [batch, seq, heads, dim] = x.dims();
    let half = dim / 2;
    let first = x.clone().slice([0..batch, 0..seq, 0..heads, 0..half]);
    let second = x.clone().slice([0..batch, 0..seq, 0..heads, half..dim]);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos.clone() + rotated * sin.clone()
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Grouped-query self-attention with rotary embeddings. HF `self_attn`.
#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    /// HF `q_proj`: `[hidden, heads · head_dim]`.
    pub q_proj: Linear<B>,
    /// HF `k_proj`: `[hidden, kv_heads · head_dim]`.
    pub k_proj: Linear<B>,
    /// HF `v_proj`: `[hidden, kv_heads · head_dim]`.
    pub v_proj: Linear<B>,
    /// HF `o_proj`: `[heads · head_dim, hidden]`.
    pub o_proj: Linear<B>,
    dropout: Dropout,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> LlamaAttention<B> {
    fn new(config: &LlamaConfig, device: &B::Device) -> Self {
        let (hidden, head_dim) = (config.hidden_size, config.head_dim());
        let linear =
            |d_in, d_out, bias| LinearConfig::new(d_in, d_out).with_bias(bias).init(device);
        Self {
            q_proj: linear(
                hidden,
                config.num_attention_heads * head_dim,
                config.qkv_bias(),
            ),
            k_proj: linear(hidden, config.kv_heads() * head_dim, config.qkv_bias()),
            v_proj: linear(hidden, config.kv_heads() * head_dim, config.qkv_bias()),
            o_proj: linear(
                config.num_attention_heads * head_dim,
                hidden,
                config.o_bias(),
            ),
            dropout: DropoutConfig::new(config.attention_dropout).init(),
            heads: config.num_attention_heads,
            kv_heads: config.kv_heads(),
            head_dim,
        }
    }

    /// Attention over the cached positions and `hidden`'s; returns the grown cache, which holds
    /// the kv heads only (rotated keys, as transformers caches them), `[batch, len,
    /// kv_heads · head_dim]`.
    ///
    /// - hidden: `[batch, seq, hidden]`; cos / sin: `[batch, seq, 1, head_dim]`
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        rotary: &(Tensor<B, 4>, Tensor<B, 4>),
        cache: Option<KvCache<B>>,
        mask: &AttentionMask<B>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let [batch, seq, _] = hidden.dims();
        let (cos, sin) = rotary;
        // Rotated in the projections' own layout ([batch, seq, heads, head_dim] is a view).
        let rotate = |x: Tensor<B, 3>, heads: usize| {
            let x = x.reshape([batch, seq, heads, self.head_dim]);
            apply_rotary(x, cos, sin).reshape([batch, seq, heads * self.head_dim])
        };
        let q = rotate(self.q_proj.forward(hidden.clone()), self.heads);
        let k = rotate(self.k_proj.forward(hidden.clone()), self.kv_heads);
        let v = self.v_proj.forward(hidden);
        let cache = KvCache::extended(cache, k, v);
        let context = self.attend(q, &cache.key, &cache.value, mask);
        (self.o_proj.forward(context), cache)
    }

    /// `softmax(q·kᵀ/√d + mask)·v` on `[batch, len, heads · head_dim]` projections (k and v with
    /// the kv heads): the fused kernel where it applies (it reads each kv head for its whole
    /// group), else the composition on kv heads repeated per group (softmax in f32, as
    /// transformers' eager path).
    fn attend(
        &self,
        q: Tensor<B, 3>,
        k: &Tensor<B, 3>,
        v: &Tensor<B, 3>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 3> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if let Some(context) = kernels::attention(
            &q,
            k,
            v,
            mask.additive(),
            mask.causal(),
            self.heads,
            scale,
            self.dropout.prob,
        ) {
            return context;
        }
        let [batch, q_len, _] = q.dims();
        let k_len = k.dims()[1];
        let split = |x: Tensor<B, 3>, len: usize, heads: usize| {
            x.reshape([batch, len, heads, self.head_dim])
                .swap_dims(1, 2)
        };
        let q = split(q, q_len, self.heads);
        let k = self.repeat_kv(split(k.clone(), k_len, self.kv_heads));
        let v = self.repeat_kv(split(v.clone(), k_len, self.kv_heads));
        let dtype = q.dtype();
        let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
        if let Some(additive) = mask.dense(q_len, k_len, &scores.device()) {
            scores = scores + additive.cast(dtype);
        }
        let probs = softmax(scores.cast(FloatDType::F32), 3).cast(dtype);
        let context = self.dropout.forward(probs).matmul(v);
        context
            .swap_dims(1, 2)
            .reshape([batch, q_len, self.heads * self.head_dim])
    }

    /// `[batch, kv_heads, len, d]` → `[batch, heads, len, d]`, each kv head serving
    /// `heads / kv_heads` query heads in a row (transformers' `repeat_kv`).
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let group = self.heads / self.kv_heads;
        if group == 1 {
            return x;
        }
        let [batch, kv_heads, len, dim] = x.dims();
        x.reshape([batch, kv_heads, 1, len, dim])
            .expand([batch, kv_heads, group, len, dim])
            .reshape([batch, kv_heads * group, len, dim])
    }
}

// ---------------------------------------------------------------------------------------------
// Block

/// One decoder block: `x + attn(norm(x))`, then `h + mlp(norm(h))`. HF `layers.{i}`.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<B: Backend> {
    /// HF `input_layernorm`.
    pub input_layernorm: RmsNorm<B>,
    /// HF `self_attn`.
    pub self_attn: LlamaAttention<B>,
    /// HF `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm<B>,
    /// HF `mlp`: `gate_proj` is `gate`, `up_proj` is `input`, `down_proj` is `output`.
    pub mlp: FeedForward<B>,
}

impl<B: Backend> LlamaDecoderLayer<B> {
    fn new(config: &LlamaConfig, device: &B::Device) -> Result<Self, ModelError> {
        let norm = || {
            RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.rms_norm_eps)
                .init(device)
        };
        Ok(Self {
            input_layernorm: norm(),
            self_attn: LlamaAttention::new(config, device),
            post_attention_layernorm: norm(),
            mlp: FeedForwardConfig::new(
                config.hidden_size,
                config.intermediate_size,
                config.activation()?,
            )
            .with_gated(true)
            .with_bias(config.mlp_has_bias())
            .init(device),
        })
    }

    /// - hidden: `[batch, seq, hidden]` → same shape, and the block's grown KV cache.
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        rotary: &(Tensor<B, 4>, Tensor<B, 4>),
        cache: Option<KvCache<B>>,
        mask: &AttentionMask<B>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let (attended, cache) = self.self_attn.forward(
            self.input_layernorm.forward(hidden.clone()),
            rotary,
            cache,
            mask,
        );
        let hidden = hidden + attended;
        let fed = self
            .mlp
            .forward(self.post_attention_layernorm.forward(hidden.clone()));
        (hidden + fed, cache)
    }
}

// ---------------------------------------------------------------------------------------------
// Model

/// The masks of the blocks of a stack for `seq` new positions after `past`, on top of `padding`:
/// causal, and banded (`window` keys up to the query's own) on the blocks that have a window.
pub fn block_masks<B: Backend>(
    windows: &[Option<usize>],
    padding: AttentionMask<B>,
    seq: usize,
    past: usize,
    device: &B::Device,
) -> Vec<AttentionMask<B>> {
    let dense = padding.clone().with_causal(seq, past + seq, device);
    let mut banded: Vec<(usize, AttentionMask<B>)> = Vec::new();
    windows
        .iter()
        .map(|window| match window {
            None => dense.clone(),
            Some(window) => {
                if let Some((_, mask)) = banded.iter().find(|(w, _)| w == window) {
                    return mask.clone();
                }
                let mask = padding
                    .clone()
                    .with_local_causal(seq, past + seq, *window, device);
                banded.push((*window, mask.clone()));
                mask
            }
        })
        .collect()
}

/// The decoder stack without a head. HF `LlamaModel` (`model.` under the LM head).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// HF `embed_tokens`: `[vocab, hidden]`, also the LM head when tied.
    pub embed_tokens: Embedding<B>,
    /// HF `layers`.
    pub layers: Vec<LlamaDecoderLayer<B>>,
    /// HF `norm`.
    pub norm: RmsNorm<B>,
    #[module(skip)]
    pub(crate) rope: Rope,
    pub(crate) windows: Vec<Option<usize>>,
    pub(crate) max_positions: usize,
}

impl<B: Backend> LlamaModel<B> {
    /// Every block's projections under PEFT's names: `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`.
    pub fn adaptable(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            let attention = &mut layer.self_attn;
            out.extend([
                ("q_proj", &mut attention.q_proj),
                ("k_proj", &mut attention.k_proj),
                ("v_proj", &mut attention.v_proj),
                ("o_proj", &mut attention.o_proj),
            ]);
            out.extend(
                layer
                    .mlp
                    .named_linears(["up_proj", "gate_proj", "down_proj"]),
            );
        }
        out
    }

    /// Builds the stack from a config (weights lazily initialised).
    pub fn new(config: &LlamaConfig, device: &B::Device) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            embed_tokens: EmbeddingConfig::new(config.vocab_size, config.hidden_size).init(device),
            layers: (0..config.num_hidden_layers)
                .map(|_| LlamaDecoderLayer::new(config, device))
                .collect::<Result<_, _>>()?,
            norm: RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.rms_norm_eps)
                .init(device),
            rope: Rope::new(config)?,
            windows: (0..config.num_hidden_layers)
                .map(|i| config.window_of_block(i))
                .collect(),
            max_positions: config.max_position_embeddings,
        })
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.lazy_shape().dims::<2>()[0]
    }

    /// Full-sequence forward: `[batch, seq]` → `[batch, seq, hidden]`, after the final norm.
    pub fn forward(&self, input: &DecoderInput<B>) -> Tensor<B, 3> {
        self.forward_cached(input, None).0
    }

    /// Forward that continues `cache` (or starts one) and returns the grown cache.
    pub fn forward_cached(
        &self,
        input: &DecoderInput<B>,
        cache: Option<DecoderCache<B>>,
    ) -> (Tensor<B, 3>, DecoderCache<B>) {
        let [batch, seq] = input.input_ids.dims();
        let device = input.input_ids.device();
        let past = cache.as_ref().map_or(0, DecoderCache::len);
        let position_ids = match &input.position_ids {
            Some(p) => p.clone(),
            None => positions(batch, seq, past, &device),
        };
        let mut hidden = self.embed_tokens.forward(input.input_ids.clone());
        let rotary = self.rope.tables(&position_ids, hidden.dtype().into());
        let padding = match &input.attention_mask {
            Some(mask) => AttentionMask::padding(mask.clone()),
            None => AttentionMask::none(),
        };
        let masks = block_masks(&self.windows, padding, seq, past, &device);
        let mut caches = cache.map(|c| c.layers.into_iter());
        let mut grown = Vec::with_capacity(self.layers.len());
        for (layer, mask) in self.layers.iter().zip(&masks) {
            let past = caches.as_mut().and_then(Iterator::next);
            let (out, layer_cache) = layer.forward(hidden, &rotary, past, mask);
            hidden = out;
            grown.push(layer_cache);
        }
        (self.norm.forward(hidden), DecoderCache { layers: grown })
    }
}

// ---------------------------------------------------------------------------------------------
// LM head

/// The stack and its LM head. HF `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    /// HF `model.*`.
    pub model: LlamaModel<B>,
    /// HF `lm_head`, only when `tie_word_embeddings` is false; otherwise the head is
    /// `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Builds the model from a config.
    pub fn new(config: &LlamaConfig, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            model: LlamaModel::new(config, device)?,
            lm_head: (!config.tie_word_embeddings).then(|| {
                LinearConfig::new(config.hidden_size, config.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        })
    }

    /// Hidden states → logits: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        vocab_logits(hidden, self.lm_head.as_ref(), &self.model.embed_tokens)
    }

    /// Full-sequence forward: hidden states and logits.
    pub fn forward(&self, input: &DecoderInput<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let hidden = self.model.forward(input);
        let logits = self.logits(hidden.clone());
        (hidden, logits)
    }

    /// One generation step: the logits of each row's last position (`[batch, vocab]`) and the
    /// grown cache.
    pub fn next_token_logits(
        &self,
        input: &DecoderInput<B>,
        cache: Option<DecoderCache<B>>,
    ) -> (Tensor<B, 2>, DecoderCache<B>) {
        let (hidden, cache) = self.model.forward_cached(input, cache);
        (last_position_logits(hidden, |h| self.logits(h)), cache)
    }
}

// ---------------------------------------------------------------------------------------------
// Sequence classification

/// The stack with a linear score (no bias) read at each row's last non-padding token. HF
/// `LlamaForSequenceClassification` (and Mistral's, Qwen2's).
#[derive(Module, Debug)]
pub struct LlamaForSequenceClassification<B: Backend> {
    /// HF `model.*`.
    pub model: LlamaModel<B>,
    /// HF `score`: `[hidden, num_labels]`.
    pub score: Linear<B>,
    pub(crate) pad_token_id: Option<u32>,
}

impl<B: Backend> LlamaForSequenceClassification<B> {
    /// Builds the model from a config (`num_labels` or `id2label`, default 2).
    pub fn new(config: &LlamaConfig, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            model: LlamaModel::new(config, device)?,
            score: LinearConfig::new(config.hidden_size, config.labels())
                .with_bias(false)
                .init(device),
            pad_token_id: config.pad_token_id,
        })
    }

    /// Full-sequence forward: hidden states and the logits `[batch, num_labels]` of each row's
    /// last token that is not `pad_token_id`.
    pub fn forward(&self, input: &DecoderInput<B>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let hidden = self.model.forward(input);
        let logits = last_token_score(
            &self.score,
            hidden.clone(),
            &input.input_ids,
            self.pad_token_id,
        );
        (hidden, logits)
    }
}

impl<B: Backend> crate::generation::Decoder<B> for LlamaForCausalLM<B> {
    type State = DecoderCache<B>;

    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    /// Rotary embeddings have no table: any length positions (quality beyond the trained
    /// context is the model's business, as in transformers).
    fn max_positions(&self) -> usize {
        usize::MAX
    }

    fn step(
        &self,
        input: &DecoderInput<B>,
        state: Option<Self::State>,
    ) -> (Tensor<B, 2>, Self::State) {
        self.next_token_logits(input, state)
    }

    fn reorder(&self, state: &Self::State, indices: Tensor<B, 1, Int>) -> Self::State {
        state.select(indices)
    }
}

// ---------------------------------------------------------------------------------------------
// The classes as the registry runs them

impl<B: Backend> ModelClass<B> for LlamaModel<B> {
    type Config = LlamaConfig;
    fn build(config: &LlamaConfig, device: &B::Device) -> Result<Self, ModelError> {
        LlamaModel::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        ModelOutput::hidden(self.forward(&input.decoder_input()), None)
    }
    fn max_sequence_length(&self) -> usize {
        usize::MAX
    }
    fn vocab_size(&self) -> usize {
        LlamaModel::vocab_size(self)
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        LlamaModel::adaptable(self)
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        crate::io::VocabTables {
            embeddings: vec![&mut self.embed_tokens],
            heads: Vec::new(),
        }
    }
}

impl<B: Backend> ModelClass<B> for LlamaForCausalLM<B> {
    type Config = LlamaConfig;
    fn build(config: &LlamaConfig, device: &B::Device) -> Result<Self, ModelError> {
        LlamaForCausalLM::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (hidden, logits) = self.forward(&input.decoder_input());
        ModelOutput::hidden(hidden, Some(logits))
    }
    fn max_sequence_length(&self) -> usize {
        usize::MAX
    }
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.model.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        crate::io::VocabTables {
            embeddings: vec![&mut self.model.embed_tokens],
            heads: self.lm_head.iter_mut().collect(),
        }
    }
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &crate::generation::GenerationConfig,
        device: &B::Device,
        on_tokens: &mut dyn FnMut(&[Option<u32>]),
    ) -> Option<Result<crate::generation::Generated, crate::generation::GenerationError>> {
        Some(crate::generation::generate(
            self, prompts, config, device, on_tokens,
        ))
    }
}

impl<B: Backend> ModelClass<B> for LlamaForSequenceClassification<B> {
    type Config = LlamaConfig;
    fn build(config: &LlamaConfig, device: &B::Device) -> Result<Self, ModelError> {
        LlamaForSequenceClassification::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (hidden, logits) = self.forward(&input.decoder_input());
        let mut output = ModelOutput::hidden(hidden, None);
        output.logits = Some(Logits::PerSequence(logits));
        output
    }
    fn max_sequence_length(&self) -> usize {
        usize::MAX
    }
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.model.adaptable()
    }
    fn vocab_tables(&mut self) -> crate::io::VocabTables<'_, B> {
        self.model.vocab_tables()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;

    fn config(json: Value) -> LlamaConfig {
        let config = LlamaConfig::from_hf(&json).unwrap();
        config.validate().unwrap();
        config
    }

    /// Both config styles give the same RoPE: transformers 4's `rope_theta` + `rope_scaling`
    /// (`type` or `rope_type`) and transformers 5's `rope_parameters`.
    #[test]
    fn both_rope_config_styles_agree() {
        let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = llama3.clone();
        v5["rope_theta"] = 500000.0.into();
        let old = config(serde_json::json!({"rope_theta": 500000.0, "rope_scaling": llama3}));
        let new = config(serde_json::json!({"rope_parameters": v5}));
        assert_eq!(old.rope_theta(), 500000.0);
        assert_eq!(new.rope_theta(), 500000.0);
        assert_eq!(old.rope_scaling().unwrap(), new.rope_scaling().unwrap());
        let typed = config(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}));
        assert_eq!(
            typed.rope_scaling().unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        let yarn = LlamaConfig::from_hf(
            &serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        )
        .unwrap();
        let err = yarn.validate().unwrap_err().to_string();
        assert!(
            err.contains("rope_scaling") && err.contains("yarn"),
            "{err}"
        );
    }

    /// Llama 3.1's frequencies against the closed form of Meta's `apply_scaling` (reference
    /// values computed in f64 from the published formula, not from this code).
    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = config(
            serde_json::json!({"hidden_size": 256, "num_attention_heads": 2,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        let rope = Rope::new(&c).unwrap();
        let got = rope.inv_freq(16);
        let dim = 128.0f64;
        for (i, g) in got.iter().enumerate() {
            let f = 1.0 / 500000f64.powf(2.0 * i as f64 / dim);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let want = if wavelen < 8192.0 / 4.0 {
                f
            } else if wavelen > 8192.0 {
                f / 8.0
            } else {
                let s = (8192.0 / wavelen - 1.0) / 3.0;
                (1.0 - s) * f / 8.0 + s * f
            };
            assert!(
                ((*g as f64) - want).abs() <= 1e-6 * want,
                "{i}: {g} vs {want}"
            );
        }
    }

    /// Dynamic NTK leaves frequencies alone within the trained context and lowers them beyond.
    #[test]
    fn dynamic_scaling_grows_the_base_beyond_the_context() {
        let c = config(
            serde_json::json!({"hidden_size": 64, "num_attention_heads": 2,
            "max_position_embeddings": 16, "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
        );
        let rope = Rope::new(&c).unwrap();
        let plain = config(serde_json::json!({"hidden_size": 64, "num_attention_heads": 2}));
        assert_eq!(rope.inv_freq(16), Rope::new(&plain).unwrap().inv_freq(16));
        let long = rope.inv_freq(32);
        // base' = 10000 · (2·32/16 − 1)^(32/30)
        let base = 10000f64 * 3f64.powf(32.0 / 30.0);
        let want = 1.0 / base.powf(2.0 / 32.0);
        assert!(
            ((long[1] as f64) - want).abs() < 1e-6 * want,
            "{} vs {want}",
            long[1]
        );
    }

    #[test]
    fn model_types_take_their_own_defaults_and_windows() {
        let mistral = config(serde_json::json!({"model_type": "mistral", "num_hidden_layers": 2}));
        assert_eq!((mistral.kv_heads(), mistral.intermediate_size), (8, 14336));
        assert_eq!(mistral.window_of_block(1), Some(4096));
        let qwen = config(
            serde_json::json!({"model_type": "qwen2", "num_hidden_layers": 4,
            "use_sliding_window": true, "max_window_layers": 2, "sliding_window": 8}),
        );
        assert!(qwen.qkv_bias() && !qwen.o_bias());
        assert_eq!(
            (0..4).map(|i| qwen.window_of_block(i)).collect::<Vec<_>>(),
            [None, None, Some(8), Some(8)]
        );
        let llama = config(serde_json::json!({}));
        assert_eq!(
            (llama.vocab_size, llama.kv_heads(), llama.window_of_block(0)),
            (32000, 32, None)
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let bad = LlamaConfig::from_hf(
            &serde_json::json!({"num_attention_heads": 32, "num_key_value_heads": 5}),
        )
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    /// The cache holds kv heads, and a cached step equals the full forward.
    #[test]
    fn cached_steps_equal_the_full_forward() {
        let device = Default::default();
        let c = config(
            serde_json::json!({"vocab_size": 11, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "model_type": "mistral", "sliding_window": 3}),
        );
        let model = LlamaForCausalLM::<Cpu>::new(&c, &device).unwrap();
        let ids =
            Tensor::<Cpu, 2, Int>::from_data(TensorData::from([[1i64, 5, 7, 2, 9, 3]]), &device);
        let full: Vec<f32> = model
            .forward(&DecoderInput::new(ids.clone()))
            .1
            .into_data()
            .to_vec()
            .unwrap();
        let (_, cache) =
            model.next_token_logits(&DecoderInput::new(ids.clone().slice([0..1, 0..4])), None);
        assert_eq!(cache.layers[0].key.dims(), [1, 4, 2 * 4]);
        let (_, cache) = model.next_token_logits(
            &DecoderInput::new(ids.clone().slice([0..1, 4..5])),
            Some(cache),
        );
        let (last, _) =
            model.next_token_logits(&DecoderInput::new(ids.slice([0..1, 5..6])), Some(cache));
        let last: Vec<f32> = last.into_data().to_vec().unwrap();
        for (g, w) in last.iter().zip(&full[5 * 11..]) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }
}
