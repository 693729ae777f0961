//! CPM-1's tokenizer (`TsinghuaAI/CPM-Generate`), with transformers' `CpmTokenizer` behaviour:
//!
//! 1. jieba word segmentation without the HMM (`jieba-rs`, which is what transformers' `rjieba`
//!    wraps); inside each word a space becomes `▂` (U+2582) and a newline `▃` (U+2583); the
//!    words are joined with single spaces;
//! 2. XLNet's `preprocess_text`: whitespace runs collapsed and trimmed, ``` `` ``` and `''` become
//!    `"`, accents removed (NFKD, then combining marks dropped) unless `keep_accents`, lower-casing
//!    when `do_lower_case`;
//! 3. SentencePiece (`spiece.model`, read by [`crate::sentencepiece`]), then XLNet's rule that
//!    re-splits a piece ending in digit + comma (`"9,"` → `"9"`, `","`);
//! 4. `<sep>` `<cls>` appended (XLNet's template) when special tokens are asked for.
//!
//! Decoding joins the pieces, removes every space (jieba's joins and sentencepiece's `▁`), and maps
//! `▂` / `▃` back to space / newline.
//!
//! transformers 5.24 lost step 1 (its `CpmTokenizer._tokenize` no longer calls jieba, and
//! `CpmTokenizerFast` overrides `_batch_encode_plus`, which 5.x never calls). zoo keeps the step,
//! as CPM was trained with it and transformers 4.x did it; the fixture script applies it explicitly.

use std::collections::HashSet;
use std::path::Path;

use jieba_rs::Jieba;
use tokenizers::Tokenizer;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::canonical_combining_class;

use crate::error::{ConvertError, Result};
use crate::sentencepiece::{SPACE_MARK, SentencePieceModel};

/// What CPM writes for a space inside a word.
pub const SPACE_TOKEN: char = '\u{2582}';
/// What CPM writes for a newline.
pub const NEWLINE_TOKEN: char = '\u{2583}';

/// Options of `tokenizer_config.json` that change CPM's preprocessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpmOptions {
    /// Lower-case the text (default false).
    pub do_lower_case: bool,
    /// Trim and collapse whitespace (default true).
    pub remove_space: bool,
    /// Keep accents instead of stripping them (default false).
    pub keep_accents: bool,
}

impl Default for CpmOptions {
    fn default() -> Self {
        Self {
            do_lower_case: false,
            remove_space: true,
            keep_accents: false,
        }
    }
}

/// The special tokens of a CPM tokenizer (XLNet's set, plus `<eop>` and `<eod>`).
pub const CPM_SPECIAL_TOKENS: [&str; 9] = [
    "<s>", "</s>", "<unk>", "<sep>", "<pad>", "<cls>", "<mask>", "<eop>", "<eod>",
];

/// jieba + SentencePiece, as `CpmTokenizer`.
pub struct CpmTokenizer {
    jieba: Jieba,
    pieces: Tokenizer,
    id_to_piece: Vec<String>,
    special_ids: HashSet<u32>,
    sep_id: Option<u32>,
    cls_id: Option<u32>,
    unk_id: u32,
    options: CpmOptions,
}

impl std::fmt::Debug for CpmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpmTokenizer")
            .field("pieces", &self.id_to_piece.len())
            .field("options", &self.options)
            .finish()
    }
}

impl CpmTokenizer {
    /// Builds the tokenizer from a `spiece.model`.
    pub fn from_spiece(path: &Path, options: CpmOptions) -> Result<Self> {
        let model = SentencePieceModel::from_file(path)?;
        let pieces = model
            .to_tokenizer()
            .map_err(|message| ConvertError::Tokenizer {
                path: path.to_path_buf(),
                message,
            })?;
        let id_to_piece: Vec<String> = model.pieces.iter().map(|p| p.0.clone()).collect();
        let id = |token: &str| model.piece_to_id(token);
        Ok(Self {
            jieba: Jieba::new(),
            pieces,
            special_ids: CPM_SPECIAL_TOKENS.iter().filter_map(|t| id(t)).collect(),
            sep_id: id("<sep>"),
            cls_id: id("<cls>"),
            unk_id: model.unk_id as u32,
            id_to_piece,
            options,
        })
    }

    /// Step 1: jieba words, `▂`/`▃` inside them, joined by spaces.
    pub fn segment(&self, text: &str) -> String {
        self.jieba
            .cut(text, false)
            .iter()
            .map(|word| {
                word.word
                    .chars()
                    .map(|c| match c {
                        ' ' => SPACE_TOKEN,
                        '\n' => NEWLINE_TOKEN,
                        c => c,
                    })
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Step 2: XLNet's `preprocess_text`.
    fn preprocess(&self, text: &str) -> String {
        let mut out = if self.options.remove_space {
            text.split(is_python_whitespace)
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            text.to_string()
        };
        out = out.replace("``", "\"").replace("''", "\"");
        if !self.options.keep_accents {
            out = out
                .nfkd()
                .filter(|c| canonical_combining_class(*c) == 0)
                .collect();
        }
        if self.options.do_lower_case {
            out = out.to_lowercase();
        }
        out
    }

    /// SentencePiece pieces of already preprocessed text.
    fn encode_pieces(&self, text: &str) -> Result<Vec<String>> {
        let encoding = self
            .pieces
            .encode(text, false)
            .map_err(|e| ConvertError::Tokenizer {
                path: "spiece.model".into(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_tokens().to_vec())
    }

    /// Step 3: pieces, with XLNet's digit-comma rule.
    fn tokenize(&self, text: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for piece in self.encode_pieces(&self.preprocess(text))? {
            let chars: Vec<char> = piece.chars().collect();
            let n = chars.len();
            if n > 1 && chars[n - 1] == ',' && chars[n - 2].is_numeric() {
                let head: String = chars[..n - 1]
                    .iter()
                    .filter(|&&c| c != SPACE_MARK)
                    .collect();
                let mut split = self.encode_pieces(&head)?;
                if chars[0] != SPACE_MARK
                    && let Some(first) = split.first_mut()
                    && first.starts_with(SPACE_MARK)
                {
                    if first.chars().count() == 1 {
                        split.remove(0);
                    } else {
                        *first = first.chars().skip(1).collect();
                    }
                }
                split.push(",".into());
                out.extend(split);
            } else {
                out.push(piece);
            }
        }
        Ok(out)
    }

    /// Token ids of `text` (steps 1–4).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self
            .tokenize(&self.segment(text))?
            .iter()
            .map(|piece| self.pieces.token_to_id(piece).unwrap_or(self.unk_id))
            .collect();
        if add_special_tokens {
            ids.extend(self.sep_id);
            ids.extend(self.cls_id);
        }
        Ok(ids)
    }

    /// Text of `ids`: pieces joined, spaces removed, `▂`/`▃` mapped back.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let joined: String = ids
            .iter()
            .filter(|id| !(skip_special_tokens && self.special_ids.contains(id)))
            .filter_map(|&id| self.id_to_piece.get(id as usize))
            .map(String::as_str)
            .collect();
        joined
            .chars()
            .filter(|&c| c != ' ' && c != SPACE_MARK)
            .map(|c| match c {
                SPACE_TOKEN => ' ',
                NEWLINE_TOKEN => '\n',
                c => c,
            })
            .collect()
    }

    /// Id of a piece or special token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.pieces.token_to_id(token)
    }

    /// Number of ids.
    pub fn vocab_size(&self) -> usize {
        self.id_to_piece.len()
    }
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators U+001C..U+001F.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}
