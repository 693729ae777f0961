//! What every family's training shares: parameter kinds and initialisation
//! ([`ParamKind`], [`InitScheme`]), and where a trainer's segments take their first values
//! ([`TensorSource`], [`StartValues`]). Each family's cut lives beside it and is re-exported here:
//!
//! - [`Gpt2Spec`] (`models::gpt2::zero`): `GPT2LMHeadModel` with the causal-LM loss;
//! - [`ClassifierSpec`], [`MlmSpec`] (`models::bert::zero`): BERT / RoBERTa classifiers and
//!   masked LMs;
//! - `models::t5::zero::T5Spec`: `T5ForConditionalGeneration` with the seq2seq loss.
//!
//! Segment prefixes are the model's zoo names, so a trainer checkpoint's `model.safetensors` holds
//! exactly the tensors of the full model (`zoo convert --to-hf` and every command read it beside a
//! `zoo.json`).

use std::collections::BTreeMap;

use crate::ModelError;
use bmtrain_backend::zero::{FlatEntry, FlatLayout};
use burn::module::Module;
use burn::tensor::TensorData;
use burn::tensor::backend::Backend;

pub use crate::bert::zero::{
    BertHead, BertPoolerOnly, ClassifierBatch, ClassifierHead, ClassifierSpec, EncoderCut,
    MlmBatch, MlmHeadSegment, MlmSpec, RobertaHead,
};
use crate::gpt2::Gpt2LmHeadModel;
pub use crate::gpt2::zero::{
    Gpt2ClassifierSpec, Gpt2Embedding, Gpt2FinalNorm, Gpt2Head, Gpt2ScoreHead, Gpt2Spec, LmBatch,
};
pub use crate::llama::zero::{
    LlamaClassifierSpec, LlamaEmbedding, LlamaFinalNorm, LlamaHead, LlamaScoreHead, LlamaSpec,
};

/// What a parameter is, from the module that holds it and its field name — not from where it
/// sits in the model, so an RMSNorm scale called `weight` starts at one like a LayerNorm's
/// `gamma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A norm's scale (LayerNorm `gamma`, RMSNorm `weight`): starts at 1.
    NormScale,
    /// A norm's shift or any bias: starts at 0.
    Bias,
    /// An embedding table.
    Embedding,
    /// A weight matrix (or anything else drawn from a normal).
    Matrix,
    /// LoRA's `A` (`[d_input, r]`): PEFT's Kaiming-uniform, `U(−1/√d_input, 1/√d_input)`.
    LoraDown,
    /// LoRA's `B`: starts at 0, so a fresh adapter leaves the model's outputs as they were.
    LoraUp,
}

impl ParamKind {
    /// The kind of a layout entry (its holder's type and the field, the last part of its name).
    pub fn of(entry: &FlatEntry) -> Self {
        let field = entry.name.rsplit('.').next().unwrap_or_default();
        match (entry.owner.as_str(), field) {
            ("LayerNorm" | "RmsNorm", "gamma" | "weight") => Self::NormScale,
            ("Lora", "a") => Self::LoraDown,
            ("Lora", "b") => Self::LoraUp,
            (_, "beta" | "bias") => Self::Bias,
            ("Embedding", _) => Self::Embedding,
            _ => Self::Matrix,
        }
    }
}

/// How a family's parameters start when no checkpoint gives them (transformers'
/// `_init_weights`). Norm scales start at 1 and biases at 0 ([`ParamKind`]); the family says the
/// standard deviation of each matrix and embedding. Every parameter is drawn from the seed and
/// its own name alone, so it starts the same whatever segment holds it, whichever other
/// parameters the model has and however many ranks train it; the draws run on all threads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitScheme {
    /// GPT-2 (transformers' `GPT2PreTrainedModel._init_weights`, nanoGPT): every weight matrix
    /// and embedding `N(0, 0.02)`, the two residual projections of each block
    /// (`attention.output`, `mlp.output`) `N(0, 0.02 / √(2 · n_layer))`.
    Gpt2 {
        /// Blocks, for the residual scaling.
        n_layer: usize,
    },
    /// BERT and RoBERTa (`BertPreTrainedModel._init_weights`): weights and embeddings
    /// `N(0, 0.02)`.
    Bert,
    /// Every matrix and embedding `N(0, std)`: the Llama family's `_init_weights` with the
    /// config's `initializer_range`.
    Normal {
        /// The standard deviation.
        std: f64,
    },
    /// T5 and its descendants (`T5PreTrainedModel._init_weights`, factor 1): `shared` and
    /// `lm_head` `N(0, 1)`; attention queries `N(0, (d_model · d_kv)^-½)`, keys, values and the
    /// relative-position tables `N(0, d_model^-½)`, outputs `N(0, (heads · d_kv)^-½)`; FFN inputs
    /// (and gates) `N(0, d_model^-½)`, outputs `N(0, d_ff^-½)`.
    T5 {
        /// `d_model`.
        d_model: usize,
        /// `d_kv` (per-head width).
        d_kv: usize,
        /// `num_heads`.
        heads: usize,
        /// `d_ff`.
        d_ff: usize,
    },
}

/// Elements drawn from one generator: the unit of parallel initialisation.
const INIT_CHUNK: usize = 1 << 16;

impl InitScheme {
    /// The standard deviation of the matrix or embedding named `name`.
    fn std(&self, name: &str) -> f64 {
        match *self {
            InitScheme::Gpt2 { n_layer }
                if name.ends_with("attention.output.weight")
                    || name.ends_with("mlp.output.weight") =>
            {
                0.02 / (2.0 * n_layer as f64).sqrt()
            }
            InitScheme::Gpt2 { .. } | InitScheme::Bert => 0.02,
            InitScheme::Normal { std } => std,
            InitScheme::T5 {
                d_model,
                d_kv,
                heads,
                d_ff,
            } => {
                let inverse_root = |n: usize| (n as f64).powf(-0.5);
                let attention = name.contains("attention.");
                if name.ends_with("position_bias.weight") {
                    inverse_root(d_model)
                } else if attention && name.ends_with("query.weight") {
                    inverse_root(d_model * d_kv)
                } else if attention && name.ends_with("output.weight") {
                    inverse_root(heads * d_kv)
                } else if attention {
                    inverse_root(d_model)
                } else if name.ends_with("ffn.output.weight") {
                    inverse_root(d_ff)
                } else if name.contains("ffn.") {
                    inverse_root(d_model)
                } else {
                    // `shared`, `lm_head`.
                    1.0
                }
            }
        }
    }

    /// The initial values of the parameter `entry` of a segment whose prefix made `name` its
    /// zoo name: by kind, then the family's standard deviation.
    pub fn values(&self, seed: u64, name: &str, entry: &FlatEntry) -> Vec<f32> {
        use rand::{RngExt, SeedableRng, rngs::StdRng};
        use rayon::prelude::*;
        let len = entry.len();
        // FNV-1a of the name: parameters of one seed get unrelated streams.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        match ParamKind::of(entry) {
            ParamKind::NormScale => return vec![1.0; len],
            ParamKind::Bias | ParamKind::LoraUp => return vec![0.0; len],
            ParamKind::LoraDown => {
                use rand::{RngExt, SeedableRng, rngs::StdRng};
                let bound = 1.0 / (entry.shape[0].max(1) as f64).sqrt();
                let mut rng = StdRng::seed_from_u64(seed ^ name_hash.rotate_left(17));
                return (0..len)
                    .map(|_| ((2.0 * rng.random::<f64>() - 1.0) * bound) as f32)
                    .collect();
            }
            ParamKind::Embedding | ParamKind::Matrix => {}
        }
        let std = self.std(name);
        let mut out = vec![0.0f32; len];
        out.par_chunks_mut(INIT_CHUNK)
            .enumerate()
            .for_each(|(chunk, values)| {
                let mut rng = StdRng::seed_from_u64(
                    seed ^ name_hash.rotate_left(17) ^ (chunk as u64).wrapping_mul(0x9E37_79B9),
                );
                for value in values {
                    // Box–Muller: two uniforms in (0, 1] give one standard normal.
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    *value =
                        (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
                }
            });
        out
    }
}

/// GPT-2's initialisation ([`InitScheme::Gpt2`]) of a whole model, from `seed`.
pub fn gpt2_init<B: Backend>(
    model: Gpt2LmHeadModel<B>,
    n_layer: usize,
    seed: u64,
    device: &B::Device,
) -> Gpt2LmHeadModel<B> {
    init_module(model, InitScheme::Gpt2 { n_layer }, seed, device)
}

/// BERT's initialisation ([`InitScheme::Bert`]) of a whole model, from `seed`.
pub fn bert_init<B: Backend, M: Module<B>>(model: M, seed: u64, device: &B::Device) -> M {
    init_module(model, InitScheme::Bert, seed, device)
}

/// [`InitScheme::Normal`] of a whole model: every matrix and embedding `N(0, std)`, from `seed`.
pub fn normal_init<B: Backend, M: Module<B>>(
    model: M,
    std: f64,
    seed: u64,
    device: &B::Device,
) -> M {
    init_module(model, InitScheme::Normal { std }, seed, device)
}

/// `model` with every parameter drawn by `scheme` (names are the module's own).
fn init_module<B: Backend, M: Module<B>>(
    model: M,
    scheme: InitScheme,
    seed: u64,
    device: &B::Device,
) -> M {
    let layout = bmtrain_backend::zero::layout_of::<B, _>(&model);
    let mut values = Vec::with_capacity(layout.len);
    for entry in &layout.entries {
        values.extend(scheme.values(seed, &entry.name, entry));
    }
    bmtrain_backend::zero::load_flat(model, &layout, &values, device, false)
}

/// Tensors by zoo name a trainer can start from: a checkpoint's, read when asked (so that a
/// model's segments are built one at a time, never the whole checkpoint at once).
pub trait TensorSource {
    /// The shape of `name`, if the source has it.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Reads `name` (any float dtype); `None` if the source lacks it.
    fn read(&self, name: &str) -> Option<Result<TensorData, String>>;
}

impl TensorSource for BTreeMap<String, TensorData> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|data| data.shape.to_vec())
    }

    fn read(&self, name: &str) -> Option<Result<TensorData, String>> {
        self.get(name).cloned().map(Ok)
    }
}

/// Where a trainer's segments take their first values ([`ZeroTrainer::from_source`]): a
/// checkpoint's tensors (zoo names, any float dtype) where it has them, the family's
/// initialisation for the rest. One segment's buffer is built at a time, so a model is never
/// held twice.
///
/// [`ZeroTrainer::from_source`]: bmtrain_backend::trainer::ZeroTrainer::from_source
pub struct StartValues<'a> {
    /// The checkpoint's tensors by zoo name, if training starts from one.
    pub tensors: Option<&'a dyn TensorSource>,
    /// With a checkpoint: whether every parameter must come from it (continuing a model), or
    /// missing and differently shaped ones start fresh (a new classification head).
    pub strict: bool,
    /// The initialisation of the parameters the checkpoint lacks.
    pub init: InitScheme,
    /// Its seed.
    pub seed: u64,
    /// The names of the parameters that started fresh although a checkpoint was given.
    pub fresh: Vec<String>,
}

impl StartValues<'_> {
    /// The whole f32 buffer of the segment whose tensors are `prefix.` + `layout`'s names.
    pub fn segment(&mut self, prefix: &str, layout: &FlatLayout) -> Result<Vec<f32>, ModelError> {
        let mut values = Vec::with_capacity(layout.len);
        for entry in &layout.entries {
            let name = bmtrain_backend::checkpoint::tensor_name(prefix, &entry.name);
            let stored = self.tensors.and_then(|t| t.shape(&name));
            let error = |message: String| ModelError::Weights {
                name: name.clone(),
                message,
            };
            match (stored, self.tensors) {
                (Some(shape), Some(tensors)) if shape == entry.shape => {
                    let data = tensors
                        .read(&name)
                        .expect("a tensor the source has a shape for")
                        .map_err(error)?;
                    match data.as_slice::<f32>() {
                        Ok(slice) => values.extend_from_slice(slice),
                        Err(_) => values.extend(data.convert::<f32>().iter::<f32>()),
                    }
                }
                // A LoRA update is new by nature: it starts fresh even when every base tensor
                // must come from the checkpoint.
                (shape, Some(_))
                    if self.strict
                        && !matches!(
                            ParamKind::of(entry),
                            ParamKind::LoraDown | ParamKind::LoraUp
                        ) =>
                {
                    return Err(error(match shape {
                        Some(shape) => format!(
                            "the checkpoint's is {shape:?}, the model's {:?}",
                            entry.shape
                        ),
                        None => "not in the checkpoint".into(),
                    }));
                }
                (_, tensors) => {
                    if tensors.is_some() {
                        self.fresh.push(name.clone());
                    }
                    values.extend(self.init.values(self.seed, &name, entry));
                }
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::{BertConfig, BertForSequenceClassification};
    use crate::gpt2::Gpt2Config;
    use crate::param_infos;
    use crate::roberta::RobertaForSequenceClassification;
    use bmtrain_backend::CpuTrain;
    use bmtrain_backend::trainer::{SegmentId, ZeroSpec};
    use bmtrain_backend::zero::layout_of;

    type B = CpuTrain;

    /// Every segment's names under its prefix, in model order.
    fn segment_names<S: ZeroSpec<B>>(
        spec: &S,
        embed: &S::Embed,
        blocks: &[S::Block],
        head: &S::Head,
    ) -> Vec<(String, Vec<usize>)> {
        let named = |segment, layout: bmtrain_backend::zero::FlatLayout| {
            let prefix = spec.prefix(segment);
            layout
                .entries
                .into_iter()
                .map(move |e| {
                    let name = bmtrain_backend::checkpoint::tensor_name(&prefix, &e.name);
                    (name, e.shape)
                })
                .collect::<Vec<_>>()
        };
        let mut out = named(SegmentId::Embed, layout_of::<B, _>(embed));
        for (i, block) in blocks.iter().enumerate() {
            out.extend(named(SegmentId::Block(i), layout_of::<B, _>(block)));
        }
        out.extend(named(SegmentId::Head, layout_of::<B, _>(head)));
        out.sort();
        out
    }

    fn model_names<M: Module<B>>(model: &M) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<_> = param_infos::<B, M>(model)
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn gpt2_segments_carry_the_full_models_zoo_names() {
        let device = Default::default();
        for tied in [true, false] {
            let mut config = Gpt2Config::new();
            (config.vocab_size, config.n_positions, config.n_embd) = (50, 16, 8);
            (config.n_layer, config.n_head) = (2, 2);
            config.tie_word_embeddings = tied;
            let model = Gpt2LmHeadModel::<B>::new(&config, &device).unwrap();
            let want = model_names(&model);
            let (spec, embed, blocks, head) = Gpt2Spec::split(model);
            assert_eq!(ZeroSpec::<B>::head_reads_embed(&spec), tied);
            assert_eq!(segment_names(&spec, &embed, &blocks, &head), want);
        }
    }

    #[test]
    fn classifier_segments_carry_the_full_models_zoo_names() {
        let device = Default::default();
        let mut config = BertConfig::new(40);
        (config.hidden_size, config.num_hidden_layers) = (8, 2);
        (config.num_attention_heads, config.intermediate_size) = (2, 16);
        config.num_labels = Some(3);
        let bert = BertForSequenceClassification::<B>::new(&config, &device).unwrap();
        let want = model_names(&bert);
        let (spec, embed, blocks, head) = ClassifierSpec::split_bert(bert, &config);
        assert_eq!(segment_names(&spec, &embed, &blocks, &head), want);

        let roberta = RobertaForSequenceClassification::<B>::new(&config, &device).unwrap();
        let want = model_names(&roberta);
        let (spec, embed, blocks, head) = ClassifierSpec::split_roberta(roberta);
        assert_eq!(segment_names(&spec, &embed, &blocks, &head), want);
    }
}
