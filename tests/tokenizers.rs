//! Token ids against transformers, from vocab files (zoo builds the tokenizer) and from
//! `tokenizer.json` (the `tokenizers` crate loads it).

use std::path::Path;

use checkpoints_convert::{TextTokenizer, encode, load_tokenizer};
use serde_json::Value;
use zoo_tests::fixture;

fn reference_ids(name: &str) -> (Vec<String>, Vec<Vec<u32>>) {
    let file = if name.starts_with("gpt2") {
        "gpt2_reference.json"
    } else {
        "reference.json"
    };
    let text = std::fs::read_to_string(fixture("tokenizers").join(file)).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let entry = &all[name];
    let sentences = entry["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let ids = entry["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    (sentences, ids)
}

fn assert_same_ids(dir: &Path, reference: &str) {
    let tokenizer = load_tokenizer(dir).unwrap().expect("a tokenizer");
    let (sentences, want) = reference_ids(reference);
    for (sentence, want) in sentences.iter().zip(want) {
        let got = encode(&tokenizer, sentence).unwrap();
        assert_eq!(got, want, "{}: {sentence:?}", dir.display());
    }
}

#[test]
fn wordpiece_from_vocab_txt_matches_transformers_uncased() {
    assert!(!fixture("tokenizers/bert_uncased/tokenizer.json").exists());
    assert_same_ids(&fixture("tokenizers/bert_uncased"), "bert_uncased");
}

#[test]
fn wordpiece_from_vocab_txt_matches_transformers_cased() {
    assert_same_ids(&fixture("tokenizers/bert_cased"), "bert_cased");
}

#[test]
fn byte_level_bpe_from_vocab_and_merges_matches_transformers() {
    assert_same_ids(&fixture("tokenizers/roberta_bpe"), "roberta_bpe");
}

#[test]
fn gpt2_vocab_files_get_gpt2s_specials_not_robertas() {
    // GPT2Tokenizer adds nothing (a RoBERTa template would wrap every text in <|endoftext|>)…
    assert!(!fixture("tokenizers/gpt2_bpe/tokenizer.json").exists());
    assert_same_ids(&fixture("tokenizers/gpt2_bpe"), "gpt2_bpe");
    // …unless add_bos_token asks for the bos token.
    assert_same_ids(&fixture("tokenizers/gpt2_bpe_bos"), "gpt2_bpe_bos");
    // Without tokenizer_class, the model's model_type decides, as AutoTokenizer does.
    let dir = tempfile::tempdir().unwrap();
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(
            fixture("tokenizers/gpt2_bpe").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    assert_same_ids(dir.path(), "gpt2_bpe");
    // A class zoo cannot build from these files is an error naming it, not a guess.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "FancyTokenizer"}"#,
    )
    .unwrap();
    let error = load_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(error.contains("FancyTokenizer"), "{error}");
}

#[test]
fn tokenizer_json_of_the_model_fixtures_matches_transformers() {
    // The model fixtures carry the same vocabularies as tokenizer.json.
    assert_same_ids(&fixture("bert"), "bert_uncased");
    assert_same_ids(&fixture("roberta"), "roberta_bpe");
}

/// CPM-1's tokenizer: jieba segmentation, ids and decoded text against the fixture, which ran
/// rjieba (jieba-rs) and transformers' `CpmTokenizer` over the sentencepiece library.
fn assert_cpm_matches(name: &str) {
    let text = std::fs::read_to_string(fixture("tokenizers").join("cpm_reference.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let entry = &all[name];
    let dir = fixture("tokenizers").join(name);
    let tokenizer = load_tokenizer(&dir).unwrap().expect("a tokenizer");
    let TextTokenizer::Cpm(cpm) = &tokenizer else {
        panic!("{name}: tokenizer_config.json names CpmTokenizer");
    };
    let strings =
        |key: &str| -> Vec<String> { serde_json::from_value(entry[key].clone()).unwrap() };
    let ids: Vec<Vec<u32>> = serde_json::from_value(entry["ids"].clone()).unwrap();
    let (sentences, segmented, decoded) = (
        strings("sentences"),
        strings("segmented"),
        strings("decoded"),
    );
    assert!(sentences.len() >= 7);
    for (i, sentence) in sentences.iter().enumerate() {
        assert_eq!(
            cpm.segment(sentence),
            segmented[i],
            "{name}: jieba of {sentence:?}"
        );
        let got = encode(&tokenizer, sentence).unwrap();
        assert_eq!(got, ids[i], "{name}: ids of {sentence:?}");
        assert_eq!(
            tokenizer.decode(&got, true).unwrap(),
            decoded[i],
            "{name}: decode of {sentence:?}"
        );
    }
}

#[test]
fn cpm_unigram_tokenizer_matches_transformers() {
    assert_cpm_matches("cpm_unigram");
}

#[test]
fn cpm_bpe_tokenizer_matches_transformers() {
    assert_cpm_matches("cpm_bpe");
}

/// CPM-2's tokenizer against ModelCenter's `CPM2Tokenizer` (run by the fixture script), and the
/// round trip: text in the vocabulary decodes back to itself.
#[test]
fn cpm2_tokenizer_matches_modelcenter_and_round_trips() {
    let text = std::fs::read_to_string(fixture("tokenizers").join("cpm2_reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let tokenizer = load_tokenizer(&fixture("tokenizers/cpm2"))
        .unwrap()
        .expect("a tokenizer");
    let TextTokenizer::Cpm2(cpm2) = &tokenizer else {
        panic!("tokenizer_config.json names CPM2Tokenizer");
    };
    assert_eq!(
        cpm2.vocab_size(),
        reference["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(cpm2.sentinel_id(189), cpm2.token_to_id("<s_189>"));
    assert!(cpm2.sentinel_id(189).is_some() && cpm2.sentinel_id(190).is_none());
    let sentences: Vec<String> = serde_json::from_value(reference["sentences"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["ids"].clone()).unwrap();
    let decoded: Vec<String> = serde_json::from_value(reference["decoded"].clone()).unwrap();
    for (i, sentence) in sentences.iter().enumerate() {
        let got = tokenizer.encode(sentence, true).unwrap();
        assert_eq!(got, ids[i], "ids of {sentence:?}");
        assert_eq!(
            cpm2.decode(&got, false),
            decoded[i],
            "decode of {sentence:?}"
        );
    }
    // Round trip on text whose every character is in the vocabulary.
    for text in [
        "今天天气很好，我们去公园散步。",
        "春眠不觉晓，处处闻啼鸟。\n夜来风雨声 花落知多少。",
        "价格是1,000元。",
    ] {
        let ids = cpm2.encode(text);
        assert!(
            !ids.contains(&cpm2.token_to_id("<unk>").unwrap()),
            "{text:?}"
        );
        assert_eq!(cpm2.decode(&ids, false), text);
    }
}
