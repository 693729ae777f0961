//! T5's cut for the ZeRO trainer ([`bmtrain_backend::trainer`]): `T5ForConditionalGeneration`
//! (T5 v1.0 / v1.1, mT5, FLAN-T5, CPM-2) as one embedding segment, the encoder blocks then the
//! decoder blocks, and a head that ends in the seq2seq loss.
//!
//! The trainer runs a chain of segments, each reading the one before. An encoder-decoder is not a
//! chain, so the hidden state between segments is a **stream** that carries everything later
//! blocks read, concatenated along the sequence axis:
//!
//! ```text
//! [batch, src + tgt + rows, d_model] = [ encoder states | decoder states | carried parameters ]
//! ```
//!
//! - encoder blocks update the encoder part and pass the rest through; the last one applies the
//!   encoder's final norm (and dropout) once, as the model does;
//! - decoder blocks read the (final) encoder part in their cross-attention and update the decoder
//!   part. The encoder part passes through every decoder block, so its gradient arrives at the
//!   last encoder block summed over all decoder blocks, before the encoder's backward runs;
//! - the carried rows hold the parameters every block of a stack reads but that live once in the
//!   model: the two relative-position tables (HF keeps them in block 0 of each stack) and the
//!   encoder's final norm scale — a few hundred numbers, not a model. They are parameters of the
//!   embedding segment; each block rebuilds its bias from them, so their gradients flow back
//!   through the stream and reach the embedding segment as one sum over all blocks;
//! - `shared` (both stacks' `embed_tokens`) is looked up once for encoder and decoder in the
//!   embedding segment, and a tied LM head reads it through [`ZeroSpec::head_reads_embed`]: one
//!   summed gradient.
//!
//! Segment names are the model's own zoo names (prefix `""` for the embedding and head), so a
//! trainer checkpoint is a T5 model directory.

use crate::layers::Embedding;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::{
    Buckets, CrossInput, OutputLayer, T5Block, T5ForConditionalGeneration, decoder_self_mask,
    lm_logits, padding_mask, relative_bias, seq2seq_loss,
};
use crate::ModelError;
use crate::layers::{Dropout, Linear, RmsNorm, rms_norm};
use bmtrain_backend::trainer::{SegmentId, ZeroSpec};

/// One seq2seq micro-batch (right-padded rows).
#[derive(Debug, Clone)]
pub struct Seq2SeqBatch<B: Backend> {
    /// `[batch, src]` encoder ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, src]`: 1 for real source tokens, 0 for padding (`None`: no padding).
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// `[batch, tgt]` decoder ids: the start token, then the labels shifted right
    /// ([`super::shift_right`]).
    pub decoder_input_ids: Tensor<B, 2, Int>,
    /// `[batch, tgt]` labels; -100 is not scored.
    pub labels: Tensor<B, 2, Int>,
}

/// What the embedding segment holds of one stack: its relative-position table and (encoder)
/// its final norm. Named as in the model (`encoder.position_bias`, `encoder.final_norm`).
#[derive(Module, Debug)]
pub struct T5StackShared<B: Backend> {
    /// HF `block.0.layer.0.SelfAttention.relative_attention_bias`.
    pub position_bias: Embedding<B>,
    /// HF `final_layer_norm`: the encoder's, applied by its last block; the decoder's lives in
    /// the head.
    pub final_norm: Option<RmsNorm<B>>,
}

/// The embedding segment: `shared` and what every block of a stack reads.
#[derive(Module, Debug)]
pub struct T5Embed<B: Backend> {
    /// HF `shared`.
    pub shared: Embedding<B>,
    /// The encoder's table and final norm.
    pub encoder: T5StackShared<B>,
    /// The decoder's table.
    pub decoder: T5StackShared<B>,
}

/// The decoder's final norm under its zoo name `decoder.final_norm`.
#[derive(Module, Debug)]
pub struct T5DecoderNorm<B: Backend> {
    /// HF `decoder.final_layer_norm`.
    pub final_norm: RmsNorm<B>,
}

/// The head segment: the decoder's final norm and, when untied, `lm_head`.
#[derive(Module, Debug)]
pub struct T5Head<B: Backend> {
    /// `decoder.final_norm`.
    pub decoder: T5DecoderNorm<B>,
    /// HF `lm_head`, only when untied.
    pub lm_head: Option<Linear<B>>,
}

/// The spec and the segments [`T5Spec::split`] cuts: embedding, blocks (encoder's, then
/// decoder's), head.
pub type T5Segments<B> = (T5Spec, T5Embed<B>, Vec<T5Block<B>>, T5Head<B>);

/// `T5ForConditionalGeneration` as ZeRO segments (see the module docs for the stream).
#[derive(Debug, Clone)]
pub struct T5Spec {
    encoder_layers: usize,
    encoder_buckets: Buckets,
    decoder_buckets: Buckets,
    /// `[buckets, heads]` of each table.
    table_shape: [usize; 2],
    d_model: usize,
    epsilon: f64,
    output_scale: f64,
    tied: bool,
    dropout: Dropout,
}

/// The parts of a stream.
struct Parts<B: Backend> {
    encoder: Tensor<B, 3>,
    decoder: Tensor<B, 3>,
    carried: Tensor<B, 3>,
}

impl T5Spec {
    /// Cuts a model into the spec and its segments: the embedding segment, the encoder's blocks
    /// followed by the decoder's, and the head.
    pub fn split<B: Backend>(
        model: T5ForConditionalGeneration<B>,
    ) -> Result<T5Segments<B>, ModelError> {
        let (encoder, decoder) = (model.encoder, model.decoder);
        if encoder.blocks.is_empty() || decoder.blocks.is_empty() {
            return Err(ModelError::Config {
                field: "num_layers".into(),
                message: format!(
                    "training needs at least one encoder and one decoder block (the config has \
                     {} and {})",
                    encoder.blocks.len(),
                    decoder.blocks.len()
                ),
            });
        }
        let table_shape = encoder.position_bias.weight.lazy_shape().dims::<2>();
        let spec = Self {
            encoder_layers: encoder.blocks.len(),
            encoder_buckets: encoder.buckets(),
            decoder_buckets: decoder.buckets(),
            table_shape,
            d_model: encoder.final_norm.weight.lazy_shape().dims::<1>()[0],
            epsilon: encoder.final_norm.epsilon(),
            output_scale: model.output_scale,
            tied: model.lm_head.is_none(),
            dropout: encoder.dropout.clone(),
        };
        let embed = T5Embed {
            shared: model.shared,
            encoder: T5StackShared {
                position_bias: encoder.position_bias,
                final_norm: Some(encoder.final_norm),
            },
            decoder: T5StackShared {
                position_bias: decoder.position_bias,
                final_norm: None,
            },
        };
        let head = T5Head {
            decoder: T5DecoderNorm {
                final_norm: decoder.final_norm,
            },
            lm_head: model.lm_head,
        };
        let blocks = encoder.blocks.into_iter().chain(decoder.blocks).collect();
        Ok((spec, embed, blocks, head))
    }

    /// Numbers carried per stream: both tables and the encoder's norm scale.
    fn carried_len(&self) -> usize {
        2 * self.table_shape[0] * self.table_shape[1] + self.d_model
    }

    /// Rows of `d_model` the carried numbers take (the last one zero-padded).
    fn carried_rows(&self) -> usize {
        self.carried_len().div_ceil(self.d_model)
    }

    /// Splits a stream into its parts, by the batch's source and target lengths.
    fn parts<B: Backend>(&self, stream: Tensor<B, 3>, batch: &Seq2SeqBatch<B>) -> Parts<B> {
        let src = batch.input_ids.dims()[1];
        let tgt = batch.decoder_input_ids.dims()[1];
        let mut parts = stream
            .split_with_sizes(vec![src, tgt, self.carried_rows()], 1)
            .into_iter();
        let mut next = || parts.next().expect("three parts");
        Parts {
            encoder: next(),
            decoder: next(),
            carried: next(),
        }
    }

    /// The carried numbers (from batch row 0; every row holds the same), as
    /// `(encoder table, decoder table, encoder norm scale)`.
    fn carried<B: Backend>(
        &self,
        carried: &Tensor<B, 3>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>) {
        let [rows, width] = [self.carried_rows(), self.d_model];
        let table = self.table_shape[0] * self.table_shape[1];
        let flat = carried
            .clone()
            .slice([0..1, 0..rows, 0..width])
            .reshape([rows * width]);
        let encoder = flat.clone().slice(0..table).reshape(self.table_shape);
        let decoder = flat
            .clone()
            .slice(table..2 * table)
            .reshape(self.table_shape);
        let scale = flat.slice(2 * table..2 * table + width);
        (encoder, decoder, scale)
    }

    fn join<B: Backend>(parts: Parts<B>) -> Tensor<B, 3> {
        Tensor::cat(vec![parts.encoder, parts.decoder, parts.carried], 1)
    }
}

impl<B: Backend> ZeroSpec<B> for T5Spec {
    type Embed = T5Embed<B>;
    type Block = T5Block<B>;
    type Head = T5Head<B>;
    type Batch = Seq2SeqBatch<B>;

    fn embed(&self, module: &Self::Embed, batch: &Self::Batch) -> Tensor<B, 3> {
        // As each stack's forward starts: dropout over the looked-up embeddings.
        let encoder = self
            .dropout
            .forward(module.shared.forward(batch.input_ids.clone()));
        let decoder = self
            .dropout
            .forward(module.shared.forward(batch.decoder_input_ids.clone()));
        let [rows, _, width] = encoder.dims();
        let scale = module
            .encoder
            .final_norm
            .as_ref()
            .expect("the embedding segment holds the encoder's final norm")
            .weight
            .val();
        let dtype = encoder.dtype();
        let mut carried = vec![
            module.encoder.position_bias.weight.val().reshape([-1]),
            module.decoder.position_bias.weight.val().reshape([-1]),
            scale,
        ];
        let padding = self.carried_rows() * width - self.carried_len();
        if padding > 0 {
            carried.push(Tensor::<B, 1>::zeros([padding], &encoder.device()).cast(dtype));
        }
        let carried = Tensor::cat(carried, 0)
            .cast(dtype)
            .reshape([1, self.carried_rows(), width])
            .expand([rows, self.carried_rows(), width]);
        Self::join(Parts {
            encoder,
            decoder,
            carried,
        })
    }

    fn block(
        &self,
        index: usize,
        module: &Self::Block,
        stream: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 3> {
        let mut parts = self.parts(stream, batch);
        let (encoder_table, decoder_table, scale) = self.carried(&parts.carried);
        let padding = padding_mask(batch.attention_mask.clone());
        if index < self.encoder_layers {
            let src = parts.encoder.dims()[1];
            let bias = relative_bias(encoder_table, self.encoder_buckets, src, src, 0);
            let mask = padding.with_bias(bias);
            let mut hidden = module.forward(parts.encoder, &mask, None, None).0;
            if index + 1 == self.encoder_layers {
                // The encoder's end, once: final norm, then dropout.
                hidden = self.dropout.forward(rms_norm(hidden, scale, self.epsilon));
            }
            parts.encoder = hidden;
        } else {
            let tgt = parts.decoder.dims()[1];
            let bias = relative_bias(decoder_table, self.decoder_buckets, tgt, tgt, 0);
            let self_mask = decoder_self_mask(bias, tgt, 0);
            let keys_values = module
                .cross_attention
                .as_ref()
                .expect("decoder blocks have cross-attention")
                .keys_values(parts.encoder.clone());
            let cross = CrossInput {
                keys_values: &keys_values,
                mask: &padding,
            };
            parts.decoder = module
                .forward(parts.decoder, &self_mask, None, Some(cross))
                .0;
        }
        Self::join(parts)
    }

    fn loss(
        &self,
        module: &Self::Head,
        embed: Option<&Self::Embed>,
        stream: Tensor<B, 3>,
        batch: &Self::Batch,
    ) -> Tensor<B, 1> {
        let decoder = self.parts(stream, batch).decoder;
        let hidden = self
            .dropout
            .forward(module.decoder.final_norm.forward(decoder));
        let (head, tied) = (module.lm_head.as_ref(), embed.map(|embed| &embed.shared));
        if let Some(dense) = crate::io::dense_head(head, tied) {
            // As `lm_logits` scales (v1.0 when tied).
            let scaled = if self.output_scale == 1.0 {
                hidden.clone()
            } else {
                hidden.clone() * self.output_scale
            };
            if let Some(loss) = crate::io::chunked_token_loss(scaled, dense, batch.labels.clone()) {
                return loss;
            }
        }
        let output = match (head, tied) {
            (Some(head), _) => OutputLayer::Head(head),
            (None, Some(shared)) => OutputLayer::Tied(shared),
            (None, None) => unreachable!("a tied head is given the embedding segment"),
        };
        let logits = lm_logits(hidden, output, self.output_scale);
        seq2seq_loss(logits, batch.labels.clone())
    }

    fn head_reads_embed(&self) -> bool {
        self.tied
    }

    fn prefix(&self, segment: SegmentId) -> String {
        match segment {
            SegmentId::Embed | SegmentId::Head => String::new(),
            SegmentId::Block(i) if i < self.encoder_layers => format!("encoder.blocks.{i}"),
            SegmentId::Block(i) => format!("decoder.blocks.{}", i - self.encoder_layers),
        }
    }
}
