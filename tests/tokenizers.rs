//! Token ids against transformers, from vocab files (zoo builds the tokenizer) and from
//! `tokenizer.json` (the `tokenizers` crate loads it).

use std::path::Path;

use checkpoints_convert::{encode, load_tokenizer};
use serde_json::Value;
use zoo_tests::fixture;

fn reference_ids(name: &str) -> (Vec<String>, Vec<Vec<u32>>) {
    let text = std::fs::read_to_string(fixture("tokenizers").join("reference.json")).unwrap();
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
fn tokenizer_json_of_the_model_fixtures_matches_transformers() {
    // The model fixtures carry the same vocabularies as tokenizer.json.
    assert_same_ids(&fixture("bert"), "bert_uncased");
    assert_same_ids(&fixture("roberta"), "roberta_bpe");
}
