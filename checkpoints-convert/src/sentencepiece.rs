//! SentencePiece `.model` files (`spiece.model`), read in Rust and turned into a `tokenizers`
//! tokenizer, as transformers' `SpmConverter` does in Python.
//!
//! A `.model` file is a protobuf `ModelProto` (sentencepiece's `sentencepiece_model.proto`). zoo
//! declares only the fields it reads, with `prost` derives; protobuf skips the others. The
//! `sentencepiece-model` crate would give the full schema, but it compiles the `.proto` at build
//! time with `protox` + `prost-build`, which costs CI more than these forty lines.
//!
//! The tokenizer built here:
//! - normalizer: the model's precompiled character map (NFKC-style rules, as sentencepiece applies);
//! - pre-tokenizer: `Metaspace` (spaces become `▁`, one is prepended, words are split at spaces);
//! - model: `Unigram` with the pieces' log-probabilities, or `BPE` with merges derived from the
//!   piece scores (a BPE model's pieces are stored best merge first);
//! - decoder: `Metaspace`.
//!
//! Control pieces (`<s>`, `<cls>`, …) are never produced from text by sentencepiece; they keep
//! their ids here but get the lowest score so no segmentation prefers them.

use std::path::Path;

use prost::Message;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{ModelWrapper, Tokenizer};

use crate::error::{ConvertError, Result};

/// The `▁` that stands for a space inside pieces.
pub const SPACE_MARK: char = '\u{2581}';

/// `ModelProto`: the fields zoo reads.
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<PieceProto>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpecProto>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpecProto>,
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, Message)]
struct PieceProto {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

/// `TrainerSpec`: model type, byte fallback and the unknown piece's id.
#[derive(Clone, PartialEq, Message)]
struct TrainerSpecProto {
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
}

/// `NormalizerSpec`: the precompiled character map and whitespace handling.
#[derive(Clone, PartialEq, Message)]
struct NormalizerSpecProto {
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    add_dummy_prefix: Option<bool>,
}

/// What a piece is for (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// A piece of text.
    Normal,
    /// The unknown piece.
    Unknown,
    /// `<s>`, `</s>`, `<cls>`…: never produced from text.
    Control,
    /// Matched as a whole in text.
    UserDefined,
    /// Reserved, never produced.
    Unused,
    /// `<0x41>`: a raw byte (byte fallback).
    Byte,
}

impl PieceKind {
    fn from_proto(value: Option<i32>) -> Self {
        match value.unwrap_or(1) {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// The segmentation algorithm a model was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentencePieceType {
    /// Unigram language model (T5, XLNet, most CPM vocabularies).
    Unigram,
    /// Byte-pair encoding.
    Bpe,
}

/// A parsed `.model` file.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    /// `(piece, score, kind)` by id.
    pub pieces: Vec<(String, f32, PieceKind)>,
    /// Unigram or BPE.
    pub model_type: SentencePieceType,
    /// Id of the unknown piece.
    pub unk_id: usize,
    /// Whether unknown characters become byte pieces instead of the unknown piece.
    pub byte_fallback: bool,
    /// The normalisation rules, compiled (empty: no normalisation).
    pub precompiled_charsmap: Vec<u8>,
    /// Whether a `▁` is put before the text.
    pub add_dummy_prefix: bool,
}

impl SentencePieceModel {
    /// Reads a `.model` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ConvertError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|message| ConvertError::Tokenizer {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the bytes of a `.model` file.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let proto = ModelProto::decode(bytes)
            .map_err(|e| format!("not a SentencePiece model (protobuf: {e})"))?;
        if proto.pieces.is_empty() {
            return Err("a SentencePiece model without pieces".into());
        }
        let trainer = proto.trainer_spec.unwrap_or_default();
        let model_type = match trainer.model_type.unwrap_or(1) {
            1 => SentencePieceType::Unigram,
            2 => SentencePieceType::Bpe,
            3 => return Err("model_type WORD is not supported (zoo reads UNIGRAM and BPE)".into()),
            other => {
                return Err(format!(
                    "model_type {other} is not supported (zoo reads UNIGRAM and BPE)"
                ));
            }
        };
        let pieces: Vec<(String, f32, PieceKind)> = proto
            .pieces
            .into_iter()
            .enumerate()
            .map(|(id, p)| {
                let piece = p.piece.filter(|s| !s.is_empty()).ok_or(id)?;
                Ok((piece, p.score.unwrap_or(0.0), PieceKind::from_proto(p.kind)))
            })
            .collect::<std::result::Result<_, usize>>()
            .map_err(|id| format!("piece {id} is empty"))?;
        let unk_id = match trainer.unk_id {
            Some(id) if id >= 0 && (id as usize) < pieces.len() => id as usize,
            None => pieces
                .iter()
                .position(|p| p.2 == PieceKind::Unknown)
                .unwrap_or(0),
            Some(id) => return Err(format!("unk_id {id} is not a piece id")),
        };
        let normalizer = proto.normalizer_spec.unwrap_or_default();
        Ok(Self {
            pieces,
            model_type,
            unk_id,
            byte_fallback: trainer.byte_fallback.unwrap_or(false),
            precompiled_charsmap: normalizer.precompiled_charsmap.unwrap_or_default(),
            add_dummy_prefix: normalizer.add_dummy_prefix.unwrap_or(true),
        })
    }

    /// Id of a piece.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.pieces
            .iter()
            .position(|(p, _, _)| p == piece)
            .map(|id| id as u32)
    }

    /// The equivalent `tokenizers` tokenizer (no special-token template: callers add their own).
    pub fn to_tokenizer(&self) -> std::result::Result<Tokenizer, String> {
        let model: ModelWrapper = match self.model_type {
            SentencePieceType::Unigram => self.unigram()?.into(),
            SentencePieceType::Bpe => self.bpe()?.into(),
        };
        let mut tokenizer = Tokenizer::new(model);
        if !self.precompiled_charsmap.is_empty() {
            let normalizer = Precompiled::from(&self.precompiled_charsmap)
                .map_err(|e| format!("precompiled_charsmap: {e}"))?;
            tokenizer.with_normalizer(Some(normalizer));
        }
        let prepend = if self.add_dummy_prefix {
            PrependScheme::Always
        } else {
            PrependScheme::Never
        };
        tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPACE_MARK, prepend, true)));
        tokenizer.with_decoder(Some(MetaspaceDecoder::new(SPACE_MARK, prepend, true)));
        Ok(tokenizer)
    }

    fn unigram(&self) -> std::result::Result<Unigram, String> {
        let lowest = self
            .pieces
            .iter()
            .filter(|p| p.2 == PieceKind::Normal)
            .map(|p| p.1 as f64)
            .fold(0.0, f64::min);
        let vocab = self
            .pieces
            .iter()
            .map(|(piece, score, kind)| {
                let score = match kind {
                    PieceKind::Control | PieceKind::Unused => lowest - 1000.0,
                    _ => *score as f64,
                };
                (piece.clone(), score)
            })
            .collect();
        Unigram::from(vocab, Some(self.unk_id), self.byte_fallback).map_err(|e| e.to_string())
    }

    /// BPE merges from the pieces: every split of a normal piece into two pieces is a merge,
    /// ranked by the merged piece's score (sentencepiece merges the best-scoring pair first).
    fn bpe(&self) -> std::result::Result<BPE, String> {
        let vocab: Vocab = self
            .pieces
            .iter()
            .enumerate()
            .map(|(id, (piece, _, _))| (piece.clone(), id as u32))
            .collect();
        let mut ranked: Vec<(f32, u32, u32, String, String)> = Vec::new();
        for (piece, score, kind) in &self.pieces {
            if *kind != PieceKind::Normal {
                continue;
            }
            for (split, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(split);
                if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                    ranked.push((*score, l, r, left.to_string(), right.to_string()));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let merges = ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect();
        BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(self.pieces[self.unk_id].0.clone())
            .fuse_unk(true)
            .byte_fallback(self.byte_fallback)
            .build()
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_bytes(model_type: i32) -> Vec<u8> {
        let piece = |p: &str, score: f32, kind: i32| PieceProto {
            piece: Some(p.into()),
            score: Some(score),
            kind: Some(kind),
        };
        ModelProto {
            pieces: vec![
                piece("<unk>", 0.0, 2),
                piece("<s>", 0.0, 3),
                piece("▁ab", -1.0, 1),
                piece("▁a", -2.0, 1),
                piece("ab", -3.0, 1),
                piece("▁", -4.0, 1),
                piece("a", -5.0, 1),
                piece("b", -6.0, 1),
            ],
            trainer_spec: Some(TrainerSpecProto {
                model_type: Some(model_type),
                byte_fallback: None,
                unk_id: Some(0),
            }),
            normalizer_spec: None,
        }
        .encode_to_vec()
    }

    fn ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn unigram_picks_the_most_likely_segmentation() {
        let model = SentencePieceModel::from_bytes(&model_bytes(1)).unwrap();
        assert_eq!(model.model_type, SentencePieceType::Unigram);
        let tokenizer = model.to_tokenizer().unwrap();
        // "▁ab" (-1) beats "▁a" + "b" (-8) and "▁" + "ab" (-7); "c" is unknown.
        assert_eq!(ids(&tokenizer, "ab ab"), [2, 2]);
        assert_eq!(ids(&tokenizer, "abc"), [2, 0]);
    }

    #[test]
    fn bpe_merges_the_best_scoring_pair_first() {
        let model = SentencePieceModel::from_bytes(&model_bytes(2)).unwrap();
        let tokenizer = model.to_tokenizer().unwrap();
        // ▁ a b: the merge into "▁ab" needs "▁a" + "b" or "▁" + "ab"; "▁a" (-2) outranks "ab"
        // (-3), so "▁a" forms first, then "▁ab".
        assert_eq!(ids(&tokenizer, "ab"), [2]);
        assert_eq!(ids(&tokenizer, "ba"), [5, 7, 6]);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = SentencePieceModel::from_bytes(b"definitely not protobuf").unwrap_err();
        assert!(err.contains("SentencePiece"), "{err}");
        let err = SentencePieceModel::from_bytes(&model_bytes(3)).unwrap_err();
        assert!(err.contains("WORD"), "{err}");
    }
}
