//! CPM-2's tokenizer, as OpenBMB's `CPM2Tokenizer` (ModelCenter `model_center/tokenizer/
//! cpm2_tokenizer.py`, from the CPM-2 release):
//!
//! 1. newlines and `▃` become an internal line mark, spaces and `▂` an internal space mark;
//! 2. jieba word segmentation (with its HMM, as `jieba.cut(text)`);
//! 3. in each word, greedy longest match over `vocab.txt` from the left; a character that starts
//!    no vocabulary entry becomes `<unk>` (one per character), and a word over 200 characters is
//!    one `<unk>`;
//! 4. the internal marks become the ids of `▂` / `▃`.
//!
//! Decoding joins the entries and turns `▂` / `▃` back into space / newline. The vocabulary holds
//! the 190 span sentinels `<s_0>` … `<s_189>` used for T5-style span corruption.
//!
//! The greedy match is written here (twenty lines): `tokenizers`' WordPiece turns a whole word
//! into `[UNK]` when any part fails, which CPM-2 does not.

use std::collections::HashMap;
use std::path::Path;

use jieba_rs::Jieba;

use crate::error::{ConvertError, Result};

/// CPM-2's space token.
pub const SPACE: &str = "\u{2582}";
/// CPM-2's newline token.
pub const NEWLINE: &str = "\u{2583}";
/// Internal marks that jieba keeps as single characters.
const SPACE_MARK: char = '\u{FFF2}';
const LINE_MARK: char = '\u{FFF3}';
/// Longest word matched piece by piece; longer words are one `<unk>`.
const MAX_WORD_CHARS: usize = 200;
/// Number of span sentinels in CPM-2's vocabulary.
pub const SENTINELS: usize = 190;

/// jieba + greedy longest match, as `CPM2Tokenizer`.
pub struct Cpm2Tokenizer {
    jieba: Jieba,
    vocab: HashMap<String, u32>,
    tokens: Vec<String>,
    longest: usize,
    unk_id: u32,
    space_id: u32,
    line_id: u32,
}

impl std::fmt::Debug for Cpm2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpm2Tokenizer")
            .field("vocab", &self.tokens.len())
            .finish()
    }
}

impl Cpm2Tokenizer {
    /// Reads `vocab.txt` (one entry per line; the line number is the id).
    pub fn from_vocab(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ConvertError::io(path, e))?;
        let tokens: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let need = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| ConvertError::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!("CPM-2 vocab.txt has no '{token}' entry"),
                })
        };
        Ok(Self {
            jieba: Jieba::new(),
            unk_id: need("<unk>")?,
            space_id: need(SPACE)?,
            line_id: need(NEWLINE)?,
            longest: tokens.iter().map(|t| t.chars().count()).max().unwrap_or(1),
            vocab,
            tokens,
        })
    }

    /// Number of ids.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Id of an entry.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Id of span sentinel `<s_index>`.
    pub fn sentinel_id(&self, index: usize) -> Option<u32> {
        self.token_to_id(&format!("<s_{index}>"))
    }

    /// Token ids of `text` (no special tokens are added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let marked: String = text
            .replace('\n', &LINE_MARK.to_string())
            .replace(NEWLINE, &LINE_MARK.to_string())
            .replace(' ', &SPACE_MARK.to_string())
            .replace(SPACE, &SPACE_MARK.to_string());
        let mut ids = Vec::new();
        for word in self.jieba.cut(&marked, true) {
            self.match_word(word.word, &mut ids);
        }
        ids
    }

    /// Greedy longest match of one word, appending ids.
    fn match_word(&self, word: &str, ids: &mut Vec<u32>) {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > MAX_WORD_CHARS {
            ids.push(self.unk_id);
            return;
        }
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len().min(start + self.longest);
            let mut found = None;
            while end > start {
                let piece: String = chars[start..end].iter().collect();
                if let Some(id) = self.mark_or_vocab(&piece) {
                    found = Some(id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => {
                    ids.push(id);
                    start = end;
                }
                None => {
                    ids.push(self.unk_id);
                    start += 1;
                }
            }
        }
    }

    fn mark_or_vocab(&self, piece: &str) -> Option<u32> {
        let mut chars = piece.chars();
        match (chars.next(), chars.next()) {
            (Some(SPACE_MARK), None) => Some(self.space_id),
            (Some(LINE_MARK), None) => Some(self.line_id),
            _ => self.vocab.get(piece).copied(),
        }
    }

    /// Text of `ids`; with `skip_special_tokens`, `<pad>`, `<s>`, `</s>`, `<eod>`, `<unk>` and
    /// the sentinels are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        ids.iter()
            .filter_map(|&id| self.tokens.get(id as usize))
            .filter(|t| !(skip_special_tokens && is_special(t)))
            .map(|t| t.replace(SPACE, " ").replace(NEWLINE, "\n"))
            .collect()
    }
}

fn is_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<s>" | "</s>" | "<eod>" | "<unk>")
        || token
            .strip_prefix("<s_")
            .and_then(|t| t.strip_suffix('>'))
            .is_some_and(|n| n.parse::<usize>().is_ok())
}
