//! RoBERTa (Liu et al., 2019), as transformers' `modeling_roberta.py`. The encoder is BERT's; what
//! differs is here:
//! - position ids count real tokens from `padding_idx + 1`, and padding gets `padding_idx`
//!   (`create_position_ids_from_input_ids`), hence `max_position_embeddings = 514` for 512 tokens;
//! - the MLM head always uses GELU;
//! - the classification head is `out_proj(tanh(dense(h[:, 0])))` instead of BERT's pooler + linear.

use crate::layers::{Dropout, DropoutConfig};
use crate::layers::{Linear, LinearConfig};
use burn::module::Module;
use burn::tensor::{Int, Tensor, backend::Backend};

use crate::ModelError;
use crate::bert::{
    BertConfig, BertEncoder, BertModel, BertPooler, EncoderInput, EncoderOutput, MlmHead,
    first_token,
};
use crate::io::{Logits, ModelClass, ModelOutput};
use crate::layers::{Activation, Embeddings};

/// RoBERTa's `config.json` has BERT's schema.
pub type RobertaConfig = BertConfig;

/// RoBERTa's encoder. HF `RobertaModel`.
#[derive(Module, Debug)]
pub struct RobertaModel<B: Backend> {
    /// Word + position + token-type embeddings, LayerNorm, dropout.
    pub embeddings: Embeddings<B>,
    /// The layers (BERT's).
    pub encoder: BertEncoder<B>,
    /// Present in `RobertaModel`, absent under the heads.
    pub pooler: Option<BertPooler<B>>,
    pub(crate) padding_idx: usize,
}

impl<B: Backend> RobertaModel<B> {
    /// Builds the model with freshly initialised weights.
    pub fn new(
        config: &RobertaConfig,
        with_pooler: bool,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        // BERT's constructor validates the config and builds the same parts.
        let BertModel {
            embeddings,
            encoder,
            pooler,
        } = BertModel::new(config, with_pooler, device)?;
        let padding_idx = config.pad_token_id.unwrap_or(1);
        if padding_idx + 1 >= config.max_position_embeddings {
            return Err(ModelError::config(
                "max_position_embeddings",
                format!("must exceed pad_token_id + 1 = {}", padding_idx + 1),
            ));
        }
        Ok(Self {
            embeddings,
            encoder,
            pooler,
            padding_idx,
        })
    }

    /// Longest input: positions start at `padding_idx + 1`.
    pub fn max_sequence_length(&self) -> usize {
        self.embeddings
            .max_positions()
            .unwrap_or(0)
            .saturating_sub(self.padding_idx + 1)
    }

    /// Runs the encoder.
    pub fn forward(&self, input: &EncoderInput<B>) -> EncoderOutput<B> {
        let positions = position_ids(input.input_ids.clone(), self.padding_idx);
        let embedded = self.embeddings.forward(
            input.input_ids.clone(),
            Some(positions),
            input.token_type_ids.clone(),
        );
        let last_hidden_state = self.encoder.forward(embedded, &input.mask());
        let pooler_output = self
            .pooler
            .as_ref()
            .map(|p| p.forward(last_hidden_state.clone()));
        EncoderOutput {
            last_hidden_state,
            pooler_output,
        }
    }
}

/// `padding_idx + 1, padding_idx + 2, …` over real tokens; `padding_idx` on padding.
pub fn position_ids<B: Backend>(
    input_ids: Tensor<B, 2, Int>,
    padding_idx: usize,
) -> Tensor<B, 2, Int> {
    let is_token = input_ids.not_equal_elem(padding_idx as i64).int();
    is_token.clone().cumsum(1) * is_token + padding_idx as i64
}

/// RoBERTa with the masked-LM head. HF `RobertaForMaskedLM`.
#[derive(Module, Debug)]
pub struct RobertaForMaskedLM<B: Backend> {
    /// The encoder (HF `roberta.*`), without pooler.
    pub roberta: RobertaModel<B>,
    /// HF `lm_head.*`.
    pub lm_head: MlmHead<B>,
}

impl<B: Backend> RobertaForMaskedLM<B> {
    /// Builds the model with freshly initialised weights.
    pub fn new(config: &RobertaConfig, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            roberta: RobertaModel::new(config, false, device)?,
            // transformers' RobertaLMHead calls `gelu` whatever `hidden_act` is.
            lm_head: MlmHead::new(config, Activation::Gelu, device),
        })
    }

    /// Returns the encoder output and the logits `[batch, seq, vocab]`.
    pub fn forward(&self, input: &EncoderInput<B>) -> (EncoderOutput<B>, Tensor<B, 3>) {
        let output = self.roberta.forward(input);
        let logits = self.lm_head.forward(
            output.last_hidden_state.clone(),
            &self.roberta.embeddings.word,
        );
        (output, logits)
    }
}

/// `out_proj(dropout(tanh(dense(dropout(h[:, 0])))))`. HF `RobertaClassificationHead`.
#[derive(Module, Debug)]
pub struct RobertaClassificationHead<B: Backend> {
    /// `[hidden, hidden]`.
    pub dense: Linear<B>,
    /// `[hidden, num_labels]`.
    pub out_proj: Linear<B>,
    dropout: Dropout,
}

impl<B: Backend> RobertaClassificationHead<B> {
    /// - hidden: `[batch, seq, hidden]` → logits `[batch, num_labels]`
    pub fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let x = self.dropout.forward(first_token(hidden));
        let x = self.dropout.forward(self.dense.forward(x).tanh());
        self.out_proj.forward(x)
    }
}

/// RoBERTa with its classification head. HF `RobertaForSequenceClassification`.
#[derive(Module, Debug)]
pub struct RobertaForSequenceClassification<B: Backend> {
    /// The encoder (HF `roberta.*`), without pooler.
    pub roberta: RobertaModel<B>,
    /// HF `classifier.*`.
    pub classifier: RobertaClassificationHead<B>,
}

impl<B: Backend> RobertaForSequenceClassification<B> {
    /// Builds the model with `config.labels()` outputs.
    pub fn new(config: &RobertaConfig, device: &B::Device) -> Result<Self, ModelError> {
        let dropout = config
            .classifier_dropout
            .unwrap_or(config.hidden_dropout_prob);
        Ok(Self {
            roberta: RobertaModel::new(config, false, device)?,
            classifier: RobertaClassificationHead {
                dense: LinearConfig::new(config.hidden_size, config.hidden_size).init(device),
                out_proj: LinearConfig::new(config.hidden_size, config.labels()).init(device),
                dropout: DropoutConfig::new(dropout).init(),
            },
        })
    }

    /// Returns the encoder output and the logits `[batch, num_labels]`.
    pub fn forward(&self, input: &EncoderInput<B>) -> (EncoderOutput<B>, Tensor<B, 2>) {
        let output = self.roberta.forward(input);
        let logits = self.classifier.forward(output.last_hidden_state.clone());
        (output, logits)
    }
}

// ---------------------------------------------------------------------------------------------
// The classes as the registry runs them

impl<B: Backend> ModelClass<B> for RobertaModel<B> {
    type Config = RobertaConfig;
    fn build(config: &RobertaConfig, device: &B::Device) -> Result<Self, ModelError> {
        RobertaModel::new(config, true, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        ModelOutput::encoder(self.forward(input), None)
    }
    fn max_sequence_length(&self) -> usize {
        RobertaModel::max_sequence_length(self)
    }
    fn vocab_size(&self) -> usize {
        self.embeddings.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.encoder.adaptable()
    }
}

impl<B: Backend> ModelClass<B> for RobertaForMaskedLM<B> {
    type Config = RobertaConfig;
    fn build(config: &RobertaConfig, device: &B::Device) -> Result<Self, ModelError> {
        RobertaForMaskedLM::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (output, logits) = self.forward(input);
        ModelOutput::encoder(output, Some(Logits::PerToken(logits)))
    }
    fn max_sequence_length(&self) -> usize {
        self.roberta.max_sequence_length()
    }
    fn vocab_size(&self) -> usize {
        self.roberta.embeddings.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.roberta.encoder.adaptable()
    }
}

impl<B: Backend> ModelClass<B> for RobertaForSequenceClassification<B> {
    type Config = RobertaConfig;
    fn build(config: &RobertaConfig, device: &B::Device) -> Result<Self, ModelError> {
        RobertaForSequenceClassification::new(config, device)
    }
    fn run(&self, input: &EncoderInput<B>) -> ModelOutput<B> {
        let (output, logits) = self.forward(input);
        ModelOutput::encoder(output, Some(Logits::PerSequence(logits)))
    }
    fn max_sequence_length(&self) -> usize {
        self.roberta.max_sequence_length()
    }
    fn vocab_size(&self) -> usize {
        self.roberta.embeddings.vocab_size()
    }
    fn adaptable(&mut self) -> Vec<(&'static str, &mut crate::layers::Linear<B>)> {
        self.roberta.encoder.adaptable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmtrain_backend::Cpu;
    use burn::tensor::TensorData;

    #[test]
    fn position_ids_skip_padding_like_transformers() {
        let device = Default::default();
        let ids = Tensor::<Cpu, 2, Int>::from_data(
            TensorData::from([[0i64, 7, 9, 2, 1, 1], [0, 5, 2, 1, 1, 1]]),
            &device,
        );
        let got: Vec<i64> = position_ids(ids, 1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(got, [2, 3, 4, 5, 1, 1, 2, 3, 4, 1, 1, 1]);
    }
}
