//! `zoo convert` both ways: HF → zoo → HF gives back the original tensors bit for bit, and a zoo
//! directory runs like the HF one.

use checkpoints_convert::{WeightsFormat, convert_hf_to_zoo, export_zoo_to_hf, read_weights_file};
use zoo_tests::{MODEL_FIXTURES, fixture};

/// A directory's weights: `model.safetensors`, or every shard of its index.
fn weights_of(dir: &std::path::Path) -> checkpoints_convert::TensorMap {
    let single = dir.join("model.safetensors");
    let path = if single.is_file() {
        single
    } else {
        dir.join("model.safetensors.index.json")
    };
    read_weights_file(&path).unwrap()
}

/// Every fixture, and the sharded Llama.
#[test]
fn hf_to_zoo_to_hf_round_trip_is_bit_identical() {
    for name in MODEL_FIXTURES.into_iter().chain(["llama"]) {
        let work = tempfile::tempdir().unwrap();
        let zoo_dir = work.path().join("zoo");
        let hf_dir = work.path().join("hf");
        convert_hf_to_zoo(&fixture(name), &zoo_dir, WeightsFormat::Safetensors, false).unwrap();
        export_zoo_to_hf(&zoo_dir, &hf_dir, false).unwrap();
        let original = weights_of(&fixture(name));
        let exported = weights_of(&hf_dir);
        let keys = |m: &checkpoints_convert::TensorMap| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&original), keys(&exported), "{name}: key sets differ");
        for (key, tensor) in &original {
            let back = &exported[key].data;
            assert_eq!(tensor.data.dtype, back.dtype, "{name}: {key} dtype");
            assert_eq!(tensor.data.shape, back.shape, "{name}: {key} shape");
            assert!(
                tensor.data.as_bytes() == back.as_bytes(),
                "{name}: {key} bytes differ"
            );
        }
        // The config and tokenizer come back too. A transformers-5 T5 config with its own head
        // (`tie_word_embeddings: true`, `scale_decoder_outputs: false`, an lm_head in the file)
        // comes back untied, which transformers 4 and 5 both read as the same model.
        let config = |dir: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap()
        };
        let mut want = config(&fixture(name));
        if original.contains_key("lm_head.weight") && want["scale_decoder_outputs"] == false {
            want["tie_word_embeddings"] = serde_json::Value::Bool(false);
        }
        assert_eq!(want, config(&hf_dir), "{name}: config.json");
        assert!(
            hf_dir.join("tokenizer.json").is_file(),
            "{name}: tokenizer.json"
        );
    }
}

#[test]
fn pytorch_bin_converts_to_the_same_tensors_as_safetensors() {
    let work = tempfile::tempdir().unwrap();
    for (format, out) in [
        (WeightsFormat::Safetensors, "st"),
        (WeightsFormat::PytorchBin, "bin"),
    ] {
        convert_hf_to_zoo(&fixture("bert_mlm"), &work.path().join(out), format, false).unwrap();
    }
    let a = read_weights_file(&work.path().join("st/model.safetensors")).unwrap();
    let b = read_weights_file(&work.path().join("bin/model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (key, tensor) in &a {
        assert!(tensor.data.as_bytes() == b[key].data.as_bytes(), "{key}");
    }
}

#[test]
fn conversion_refuses_to_overwrite_unless_asked() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("zoo");
    convert_hf_to_zoo(&fixture("bert"), &out, WeightsFormat::Auto, false).unwrap();
    let err = convert_hf_to_zoo(&fixture("bert"), &out, WeightsFormat::Auto, false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    convert_hf_to_zoo(&fixture("bert_mlm"), &out, WeightsFormat::Auto, true).unwrap();
    let manifest = std::fs::read_to_string(out.join("zoo.json")).unwrap();
    assert!(manifest.contains("BertForMaskedLM"));
    // Nothing but the output directory is left in the parent.
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 1);
}
