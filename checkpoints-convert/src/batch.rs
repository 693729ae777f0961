//! Turning token id sequences into a padded batch of model inputs.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use models::bert::EncoderInput;

/// A right-padded batch, kept on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[batch, seq]` token ids, padded with the pad id.
    pub input_ids: Vec<i64>,
    /// `[batch, seq]`, 1 for tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// `[batch, seq]` segment ids (zeros: one segment per row).
    pub token_type_ids: Vec<i64>,
    /// Number of rows.
    pub batch: usize,
    /// Padded length.
    pub seq: usize,
}

impl Batch {
    /// Pads `rows` on the right to the longest row.
    pub fn pad(rows: &[Vec<u32>], pad_id: u32) -> Self {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = Self {
            input_ids: Vec::with_capacity(rows.len() * seq),
            attention_mask: Vec::with_capacity(rows.len() * seq),
            token_type_ids: vec![0; rows.len() * seq],
            batch: rows.len(),
            seq,
        };
        for row in rows {
            batch.input_ids.extend(row.iter().map(|&id| id as i64));
            batch
                .input_ids
                .extend(std::iter::repeat_n(pad_id as i64, seq - row.len()));
            batch
                .attention_mask
                .extend(std::iter::repeat_n(1, row.len()));
            batch
                .attention_mask
                .extend(std::iter::repeat_n(0, seq - row.len()));
        }
        batch
    }

    /// The batch as model input on `device`.
    pub fn to_input<B: Backend>(&self, device: &B::Device) -> EncoderInput<B> {
        let tensor = |values: &[i64]| {
            Tensor::<B, 2, Int>::from_data(
                TensorData::new(values.to_vec(), [self.batch, self.seq]),
                device,
            )
        };
        EncoderInput {
            decoder_input_ids: None,
            input_ids: tensor(&self.input_ids),
            attention_mask: Some(tensor(&self.attention_mask)),
            token_type_ids: Some(tensor(&self.token_type_ids)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_right_padded_with_a_mask() {
        let batch = Batch::pad(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!((batch.batch, batch.seq), (2, 3));
        assert_eq!(batch.input_ids, [5, 6, 7, 8, 0, 0]);
        assert_eq!(batch.attention_mask, [1, 1, 1, 1, 0, 0]);
    }
}
