//! Tokenizers of model directories, through the `tokenizers` crate.
//!
//! `tokenizer.json` is loaded as it is. When a directory has none, one is built the way
//! transformers builds it: from `vocab.txt` a BERT WordPiece tokenizer (lower-casing and accent
//! stripping as `tokenizer_config.json` says), from `vocab.json` + `merges.txt` a byte-level BPE
//! with RoBERTa's `<s> … </s>` template. A directory whose `tokenizer_config.json` names
//! `CpmTokenizer` gets CPM's jieba + SentencePiece tokenizer ([`crate::cpm`]) from `spiece.model`,
//! even when it also ships a `tokenizer.json` (which cannot express the jieba step); one naming
//! `CPM2Tokenizer` gets CPM-2's jieba + greedy longest-match tokenizer ([`crate::cpm2`]) from
//! `vocab.txt`.

use std::path::Path;

use serde::Deserialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::cpm::{CpmOptions, CpmTokenizer};
use crate::cpm2::Cpm2Tokenizer;
use crate::error::{ConvertError, Result};

/// The fields of `tokenizer_config.json` that change how a vocab-file tokenizer is built.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    /// BERT: lower-case the text (default true).
    do_lower_case: Option<bool>,
    /// BERT: strip accents; `None` means "as do_lower_case".
    strip_accents: Option<bool>,
    /// BERT: put spaces around CJK characters (default true).
    tokenize_chinese_chars: Option<bool>,
    /// BPE: prepend a space to the first word (RoBERTa default false).
    add_prefix_space: Option<bool>,
    unk_token: Option<SpecialToken>,
    cls_token: Option<SpecialToken>,
    sep_token: Option<SpecialToken>,
    pad_token: Option<SpecialToken>,
    mask_token: Option<SpecialToken>,
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    /// The transformers class, e.g. `CpmTokenizer`.
    tokenizer_class: Option<String>,
    /// XLNet / CPM: trim and collapse whitespace (default true).
    remove_space: Option<bool>,
    /// XLNet / CPM: keep accents (default false).
    keep_accents: Option<bool>,
    /// GPT-2 style: put `bos_token` before the text (transformers' default false).
    add_bos_token: Option<bool>,
    /// GPT-2 / Llama style: put `eos_token` after the text (default false).
    add_eos_token: Option<bool>,
}

/// Which special tokens a byte-level BPE tokenizer built from vocab files adds, as transformers
/// decides it: by `tokenizer_class`, else by the model's `model_type` (its `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BpeTemplate {
    /// RoBERTa / BART: `<s> A </s>` and `<s> A </s></s> B </s>`.
    Roberta,
    /// GPT-2: nothing, unless `add_bos_token` / `add_eos_token` ask for them.
    Gpt2,
}

impl BpeTemplate {
    fn of(dir: &Path, config: &TokenizerConfig) -> Result<Self> {
        let class = config.tokenizer_class.as_deref().unwrap_or_default();
        const GPT2_CLASSES: [&str; 4] = [
            "GPT2Tokenizer",
            "CodeGenTokenizer",
            "GPTNeoXTokenizer",
            "GPTJTokenizer",
        ];
        const ROBERTA_CLASSES: [&str; 4] = [
            "RobertaTokenizer",
            "BartTokenizer",
            "LongformerTokenizer",
            "MvpTokenizer",
        ];
        let is = |names: &[&str]| names.iter().any(|n| class.starts_with(n));
        if is(&GPT2_CLASSES) {
            return Ok(Self::Gpt2);
        }
        if is(&ROBERTA_CLASSES) {
            return Ok(Self::Roberta);
        }
        if !class.is_empty() {
            return Err(tokenizer_error(
                &dir.join("tokenizer_config.json"),
                format!(
                    "tokenizer_class {class} with vocab.json + merges.txt: zoo builds GPT-2 and \
                     RoBERTa style tokenizers from them; give the directory a tokenizer.json"
                ),
            ));
        }
        // No class: the model's family, as AutoTokenizer maps it.
        let config_path = dir.join("config.json");
        let model_type = if config_path.is_file() {
            let value: serde_json::Value = crate::tensors::read_json(&config_path)?;
            value["model_type"].as_str().unwrap_or_default().to_string()
        } else {
            String::new()
        };
        Ok(match model_type.as_str() {
            "gpt2" | "gpt_neox" | "gptj" | "codegen" => Self::Gpt2,
            _ => Self::Roberta,
        })
    }
}

/// A model directory's tokenizer.
#[derive(Debug)]
pub enum TextTokenizer {
    /// Anything the `tokenizers` crate runs by itself.
    Hf(Box<Tokenizer>),
    /// CPM-1's jieba + SentencePiece tokenizer.
    Cpm(Box<CpmTokenizer>),
    /// CPM-2's jieba + greedy longest-match tokenizer.
    Cpm2(Box<Cpm2Tokenizer>),
}

impl TextTokenizer {
    /// Token ids of `text`; with `add_special_tokens`, the model's template (`[CLS] … [SEP]`,
    /// `<s> … </s>`, CPM's `… <sep> <cls>`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match self {
            Self::Hf(tokenizer) => {
                let encoding = tokenizer
                    .encode(text, add_special_tokens)
                    .map_err(|e| tokenizer_error(Path::new("tokenizer"), e))?;
                Ok(encoding.get_ids().to_vec())
            }
            Self::Cpm(tokenizer) => tokenizer.encode(text, add_special_tokens),
            // CPM-2 adds no special tokens (its callers place <s>, <eod> and sentinels).
            Self::Cpm2(tokenizer) => Ok(tokenizer.encode(text)),
        }
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match self {
            Self::Hf(tokenizer) => tokenizer
                .decode(ids, skip_special_tokens)
                .map_err(|e| tokenizer_error(Path::new("tokenizer"), e)),
            Self::Cpm(tokenizer) => Ok(tokenizer.decode(ids, skip_special_tokens)),
            Self::Cpm2(tokenizer) => Ok(tokenizer.decode(ids, skip_special_tokens)),
        }
    }

    /// Id of a token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::Hf(tokenizer) => tokenizer.token_to_id(token),
            Self::Cpm(tokenizer) => tokenizer.token_to_id(token),
            Self::Cpm2(tokenizer) => tokenizer.token_to_id(token),
        }
    }

    /// The `tokenizers` tokenizer, when this is one (not CPM's).
    pub fn as_hf(&self) -> Option<&Tokenizer> {
        match self {
            Self::Hf(tokenizer) => Some(tokenizer),
            Self::Cpm(_) | Self::Cpm2(_) => None,
        }
    }
}

/// A special token is a string, or `{"content": "..."}` in newer configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Plain(String),
    Added { content: String },
}

impl SpecialToken {
    fn text(&self) -> &str {
        match self {
            Self::Plain(s) => s,
            Self::Added { content } => content,
        }
    }
}

fn pick(token: &Option<SpecialToken>, default: &str) -> String {
    token
        .as_ref()
        .map(|t| t.text().to_string())
        .unwrap_or_else(|| default.to_string())
}

/// Loads the tokenizer of a model directory, or `None` when it has no tokenizer files.
pub fn load_tokenizer(dir: &Path) -> Result<Option<TextTokenizer>> {
    let config = read_config(dir)?;
    let class = config.tokenizer_class.as_deref().unwrap_or_default();
    let spiece = dir.join("spiece.model");
    if class == "CPM2Tokenizer" {
        let tokenizer = Cpm2Tokenizer::from_vocab(&dir.join("vocab.txt"))?;
        return Ok(Some(TextTokenizer::Cpm2(Box::new(tokenizer))));
    }
    if class.starts_with("CpmTokenizer") {
        if !spiece.is_file() {
            return Err(tokenizer_error(
                dir,
                format!(
                    "{class} needs spiece.model (tokenizer.json cannot express its jieba step)"
                ),
            ));
        }
        let options = CpmOptions {
            do_lower_case: config.do_lower_case.unwrap_or(false),
            remove_space: config.remove_space.unwrap_or(true),
            keep_accents: config.keep_accents.unwrap_or(false),
        };
        let tokenizer = CpmTokenizer::from_spiece(&spiece, options)?;
        return Ok(Some(TextTokenizer::Cpm(Box::new(tokenizer))));
    }
    Ok(load_hf_tokenizer(dir)?.map(|t| TextTokenizer::Hf(Box::new(t))))
}

/// The `tokenizers` tokenizer of a directory (`tokenizer.json`, or one built from vocab files).
fn load_hf_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let json = dir.join("tokenizer.json");
    let tokenizer = if json.is_file() {
        Tokenizer::from_file(&json).map_err(|e| tokenizer_error(&json, e))?
    } else if dir.join("vocab.txt").is_file() {
        wordpiece_from_vocab(dir)?
    } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
        byte_level_bpe_from_files(dir)?
    } else if dir.join("spiece.model").is_file() {
        // T5-style directories: the special-token template depends on the class, which zoo does
        // not guess.
        return Err(tokenizer_error(
            dir,
            "spiece.model without tokenizer.json: zoo builds it only for CpmTokenizer \
             (tokenizer_config.json's tokenizer_class)",
        ));
    } else {
        return Ok(None);
    };
    Ok(Some(without_padding_or_truncation(tokenizer)))
}

/// Some hub `tokenizer.json` files carry fixed padding/truncation (MiniLM pads to 128); zoo pads
/// batches itself.
fn without_padding_or_truncation(mut tokenizer: Tokenizer) -> Tokenizer {
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .expect("disabling truncation cannot fail");
    tokenizer
}

fn tokenizer_error(path: &Path, error: impl std::fmt::Display) -> ConvertError {
    ConvertError::Tokenizer {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

fn read_config(dir: &Path) -> Result<TokenizerConfig> {
    let path = dir.join("tokenizer_config.json");
    if path.is_file() {
        crate::tensors::read_json(&path)
    } else {
        Ok(TokenizerConfig::default())
    }
}

/// BERT's WordPiece tokenizer from `vocab.txt`, as transformers' `BertTokenizer`.
fn wordpiece_from_vocab(dir: &Path) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.txt");
    let config = read_config(dir)?;
    let lowercase = config.do_lower_case.unwrap_or(true);
    let unk = pick(&config.unk_token, "[UNK]");
    let cls = pick(&config.cls_token, "[CLS]");
    let sep = pick(&config.sep_token, "[SEP]");
    let specials = [
        unk.clone(),
        cls.clone(),
        sep.clone(),
        pick(&config.pad_token, "[PAD]"),
        pick(&config.mask_token, "[MASK]"),
    ];
    let vocab = vocab_path
        .to_str()
        .ok_or_else(|| tokenizer_error(&vocab_path, "path is not UTF-8"))?;
    let model = WordPiece::from_file(vocab)
        .unk_token(unk)
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| tokenizer_error(&vocab_path, e))?;
    let mut tokenizer = Tokenizer::new(model);
    let id = |token: &str| {
        tokenizer.token_to_id(token).ok_or_else(|| {
            tokenizer_error(
                &vocab_path,
                format!("special token '{token}' is not in the vocabulary"),
            )
        })
    };
    let (cls_id, sep_id) = (id(&cls)?, id(&sep)?);
    let template = TemplateProcessing::builder()
        .try_single(format!("{cls}:0 $A:0 {sep}:0"))
        .and_then(|b| b.try_pair(format!("{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1")))
        .map_err(|e| tokenizer_error(&vocab_path, e))?
        .special_tokens(vec![(cls.clone(), cls_id), (sep.clone(), sep_id)])
        .build()
        .map_err(|e| tokenizer_error(&vocab_path, e))?;
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(
            true,
            config.tokenize_chinese_chars.unwrap_or(true),
            config.strip_accents,
            lowercase,
        )))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(template))
        .with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    add_specials(&mut tokenizer, &specials);
    Ok(tokenizer)
}

/// Byte-level BPE from `vocab.json` + `merges.txt`, with the specials of its class
/// ([`BpeTemplate`]): RoBERTa's `<s> $A </s>`, or GPT-2's none (or `add_bos_token`'s).
fn byte_level_bpe_from_files(dir: &Path) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let config = read_config(dir)?;
    let as_str = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| tokenizer_error(p, "path is not UTF-8"))
    };
    let model = BPE::from_file(&as_str(&vocab_path)?, &as_str(&merges_path)?)
        .build()
        .map_err(|e| tokenizer_error(&vocab_path, e))?;
    let mut tokenizer = Tokenizer::new(model);
    let add_prefix_space = config.add_prefix_space.unwrap_or(false);
    let bos = pick(&config.bos_token, "<s>");
    let eos = pick(&config.eos_token, "</s>");
    let cls = pick(&config.cls_token, &bos);
    let sep = pick(&config.sep_token, &eos);
    let specials = [
        bos,
        eos,
        cls.clone(),
        sep.clone(),
        pick(&config.unk_token, "<unk>"),
        pick(&config.pad_token, "<pad>"),
        pick(&config.mask_token, "<mask>"),
    ];
    let id = |token: &str| {
        tokenizer.token_to_id(token).ok_or_else(|| {
            tokenizer_error(
                &vocab_path,
                format!("special token '{token}' is not in the vocabulary"),
            )
        })
    };
    let post: Option<PostProcessorWrapper> = match BpeTemplate::of(dir, &config)? {
        BpeTemplate::Roberta => Some(
            RobertaProcessing::new((sep.clone(), id(&sep)?), (cls.clone(), id(&cls)?))
                .trim_offsets(true)
                .add_prefix_space(add_prefix_space)
                .into(),
        ),
        BpeTemplate::Gpt2 => {
            let around = |add: Option<bool>, token: &String| -> Result<Option<(String, u32)>> {
                Ok(match add.unwrap_or(false) {
                    true => Some((token.clone(), id(token)?)),
                    false => None,
                })
            };
            let bos = around(config.add_bos_token, &specials[0])?;
            let eos = around(config.add_eos_token, &specials[1])?;
            if bos.is_none() && eos.is_none() {
                None
            } else {
                // transformers' GPT2Tokenizer: `bos A eos` and `bos A eos bos B eos`, each
                // special present only when asked for.
                let piece = |part: &str, type_id: u32| {
                    let mut out: Vec<String> = Vec::new();
                    out.extend(bos.iter().map(|(t, _)| format!("{t}:{type_id}")));
                    out.push(format!("${part}:{type_id}"));
                    out.extend(eos.iter().map(|(t, _)| format!("{t}:{type_id}")));
                    out.join(" ")
                };
                let template = TemplateProcessing::builder()
                    .try_single(piece("A", 0))
                    .and_then(|b| b.try_pair(format!("{} {}", piece("A", 0), piece("B", 1))))
                    .map_err(|e| tokenizer_error(&vocab_path, e))?
                    .special_tokens(bos.iter().chain(eos.iter()).cloned().collect::<Vec<_>>())
                    .build()
                    .map_err(|e| tokenizer_error(&vocab_path, e))?;
                Some(template.into())
            }
        }
    };
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    if let Some(post) = post {
        tokenizer.with_post_processor(Some(post));
    }
    add_specials(&mut tokenizer, &specials);
    Ok(tokenizer)
}

/// Registers the special tokens that are in the vocabulary, so they are never split.
fn add_specials(tokenizer: &mut Tokenizer, specials: &[String]) {
    let tokens: Vec<AddedToken> = specials
        .iter()
        .filter(|t| tokenizer.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&tokens);
}

/// Writes `tokenizer.json`.
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let json = tokenizer
        .to_string(true)
        .map_err(|e| tokenizer_error(path, e))?;
    crate::tensors::write_atomic(path, json.as_bytes())
}

/// Token ids of `text`, with the model's special tokens (`[CLS] … [SEP]`, `<s> … </s>`).
pub fn encode(tokenizer: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    tokenizer.encode(text, true)
}

/// The end-of-text token of [`byte_level_tokenizer`], id 256.
pub const BYTE_LEVEL_EOS: &str = "<|endoftext|>";

/// A tokenizer with one token per byte (ids 0–255 are the byte values, in GPT-2's byte-to-char
/// alphabet) and `<|endoftext|>` as id 256: what `zoo pretrain` uses when the model comes without a
/// tokenizer. It is an ordinary byte-level BPE without merges, so it saves as a `tokenizer.json`
/// that transformers and every zoo command read.
pub fn byte_level_tokenizer() -> Tokenizer {
    let vocab: tokenizers::models::bpe::Vocab = gpt2_byte_alphabet()
        .into_iter()
        .enumerate()
        .map(|(byte, c)| (c.to_string(), byte as u32))
        .chain(std::iter::once((BYTE_LEVEL_EOS.to_string(), 256)))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .expect("a vocabulary without merges is a valid BPE");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, false, false)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.add_special_tokens(&[AddedToken::from(BYTE_LEVEL_EOS, true)]);
    tokenizer
}

/// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the others are shifted past
/// U+0100, so every byte has a visible character.
fn gpt2_byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a Latin-1 code point")
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).expect("a code point below U+0200")
            }
        })
        .collect()
}

#[cfg(test)]
mod byte_level_tests {
    use super::*;

    #[test]
    fn byte_level_ids_are_the_bytes_and_decode_back() {
        let tokenizer = byte_level_tokenizer();
        let text = "Phileas Fogg, 1872 — à Paris!\n";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes);
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        let eos = tokenizer.encode(BYTE_LEVEL_EOS, false).unwrap();
        assert_eq!(eos.get_ids(), &[256]);
        assert_eq!(tokenizer.get_vocab_size(true), 257);
    }
}
