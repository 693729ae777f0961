//! Property tests of every parser of outside bytes in the libraries: safetensors headers and
//! offsets (the checkpoint reader and zoo's own checkpoint files), PyTorch pickles (`.bin`),
//! `config.json`, and the tokenizer files (`vocab.txt`, `vocab.json` + `merges.txt`,
//! `spiece.model`, CPM-2's vocabulary). Each takes random bytes and good files damaged at random
//! (above all in their length fields), and must return a value or an error naming the file:
//! never a panic. The process runs under an address-space limit, so that an allocation sized by
//! a length field nobody checked aborts the run instead of passing unnoticed. (The token files
//! and the TSV / CSV / JSONL readers of the `zoo` binary have theirs in `zoo-cli/src`.)
//!
//! proptest keeps the inputs that ever failed under `tests/proptest-regressions/` and replays
//! them first on every run.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;

use checkpoints_convert::{index_weights_file, load_tokenizer, read_spec};
use proptest::prelude::*;

/// No allocation of this test may exceed this address space (the tests' own needs are far below).
const ADDRESS_SPACE: u64 = 3 << 30;

fn limit_memory() {
    static LIMIT: Once = Once::new();
    LIMIT.call_once(|| {
        let limit = libc::rlimit {
            rlim_cur: ADDRESS_SPACE,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
    });
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(path)
}

/// Values that break length fields: any, and above all the edges.
fn length_field() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0..64u32).prop_map(|shift| 1u64 << shift),
        (0..64u32).prop_map(|shift| u64::MAX >> shift),
        Just(0u64),
    ]
}

/// A damage to a file: 8 bytes overwritten with `value` at `at` (mostly in the first `head`
/// bytes, where the headers are), some bytes inserted, or the file cut short.
#[derive(Debug, Clone)]
enum Damage {
    Overwrite { at: usize, value: u64 },
    Insert { at: usize, bytes: Vec<u8> },
    Cut { keep: usize },
}

fn damage(head: usize) -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0..head, length_field()).prop_map(|(at, value)| Damage::Overwrite { at, value }),
        (any::<usize>(), length_field()).prop_map(|(at, value)| Damage::Overwrite { at, value }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
        any::<usize>().prop_map(|keep| Damage::Cut { keep }),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    match damage {
        Damage::Overwrite { at, value } => {
            if bytes.len() >= 8 {
                let at = at % (bytes.len() - 7);
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        Damage::Insert { at, bytes: extra } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, extra.iter().copied());
        }
        Damage::Cut { keep } => bytes.truncate(keep % (bytes.len() + 1)),
    }
}

/// Copies fixture directory `from` into `to`, then writes `file` there as `bytes`.
fn damaged_dir(from: &str, to: &Path, file: &str, bytes: &[u8]) -> PathBuf {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(fixture(from)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "reference.safetensors" && name != "pytorch_model.bin" || name == file {
            fs::copy(&path, to.join(name)).unwrap();
        }
    }
    fs::write(to.join(file), bytes).unwrap();
    to.to_path_buf()
}

/// The error must name the file (or its directory).
fn names(error: &impl std::fmt::Display, what: &str) -> Result<(), TestCaseError> {
    let message = error.to_string();
    prop_assert!(
        message.contains(what),
        "error without '{}': {}",
        what,
        message
    );
    Ok(())
}

proptest! {
    // 256 cases each (PROPTEST_CASES=N for more).
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/proptest-regressions/fuzz.txt"
            )),
        )),
        ..ProptestConfig::default()
    })]

    /// A safetensors file of random bytes, or a good one damaged, indexes (every tensor it lists
    /// then reads) or fails naming the file.
    #[test]
    fn safetensors_files_index_or_name_the_file(
        random in proptest::collection::vec(any::<u8>(), 0..256),
        damage in damage(512),
        use_random in proptest::bool::weighted(0.2),
    ) {
        limit_memory();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut bytes = fs::read(fixture("bert/model.safetensors")).unwrap();
        if use_random {
            bytes = random;
        } else {
            apply(&mut bytes, &damage);
        }
        fs::write(&path, &bytes).unwrap();
        match index_weights_file(&path) {
            Ok(index) => {
                for tensor in index.values() {
                    if let Err(error) = tensor.read() {
                        names(&error, "model.safetensors")?;
                    }
                }
            }
            Err(error) => names(&error, "model.safetensors")?,
        }
    }

    /// zoo's own checkpoint files (the trainer's resume reader) behave the same.
    #[test]
    fn checkpoint_files_open_or_name_the_file(damage in damage(512)) {
        limit_memory();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let mut bytes = fs::read(fixture("gpt2/model.safetensors")).unwrap();
        apply(&mut bytes, &damage);
        fs::write(&path, &bytes).unwrap();
        match bmtrain_backend::checkpoint::TensorFile::open(&path) {
            Ok(file) => {
                let _ = file.metadata();
                let mut out = Vec::new();
                if let Err(error) = file.read_f32("transformer.wte.weight", &[400, 32], 0..8, &mut out) {
                    names(&error, "optimizer.safetensors")?;
                }
            }
            Err(error) => names(&error, "optimizer.safetensors")?,
        }
    }

    /// A PyTorch pickle of random bytes, or a good one damaged, reads or fails naming the file
    /// (and never runs anything: the reader interprets opcodes).
    #[test]
    fn pickles_read_or_name_the_file(
        random in proptest::collection::vec(any::<u8>(), 0..256),
        damage in damage(4096),
        use_random in proptest::bool::weighted(0.2),
    ) {
        limit_memory();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pytorch_model.bin");
        let mut bytes = fs::read(fixture("bert/pytorch_model.bin")).unwrap();
        if use_random {
            bytes = random;
        } else {
            apply(&mut bytes, &damage);
        }
        fs::write(&path, &bytes).unwrap();
        if let Err(error) = index_weights_file(&path) {
            names(&error, "pytorch_model.bin")?;
        }
    }

    /// A `config.json` whose fields take random JSON values (numbers at the edges, wrong types,
    /// deleted keys) parses or fails naming the file.
    #[test]
    fn configs_parse_or_name_the_file(
        family in 0..3usize,
        key in any::<prop::sample::Index>(),
        value in prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            length_field().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,8}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            Just(serde_json::json!([1, 2])),
        ],
        delete in any::<bool>(),
    ) {
        limit_memory();
        let name = ["gpt2", "bert", "t5"][family];
        let path = fixture(&format!("{name}/config.json"));
        let mut config: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        let object = config.as_object_mut().unwrap();
        let keys: Vec<String> = object.keys().cloned().collect();
        let key = key.get(&keys).clone();
        if delete {
            object.remove(&key);
        } else {
            object.insert(key, value);
        }
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        match read_spec(dir.path()) {
            // The model it describes is counted from shapes alone: never allocated.
            Ok(spec) => {
                let _ = spec.parameter_count();
            }
            Err(error) => names(&error, "config.json")?,
        }
    }

    /// Tokenizer files of every layout zoo builds a tokenizer from, damaged, load or fail naming
    /// the file; a loaded one encodes text.
    #[test]
    fn tokenizer_files_load_or_name_the_file(
        layout in 0..5usize,
        damage in damage(64),
        text in "\\PC{0,20}",
    ) {
        limit_memory();
        let (from, file) = [
            ("bert_cls", "vocab.txt"),
            ("tokenizers/roberta_bpe", "merges.txt"),
            ("tokenizers/roberta_bpe", "vocab.json"),
            ("tokenizers/cpm_unigram", "spiece.model"),
            ("tokenizers/cpm2", "vocab.txt"),
        ][layout];
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = fs::read(fixture(&format!("{from}/{file}"))).unwrap();
        apply(&mut bytes, &damage);
        let target = damaged_dir(from, &dir.path().join("tok"), file, &bytes);
        if layout == 0 {
            // Built from vocab.txt, not the fixture's tokenizer.json.
            let _ = fs::remove_file(target.join("tokenizer.json"));
        }
        match load_tokenizer(&target) {
            Ok(Some(tokenizer)) => {
                let _ = tokenizer.encode(&text, true);
            }
            Ok(None) => {}
            Err(error) => names(&error, "tok")?,
        }
    }

    /// SentencePiece models of random bytes (the protobuf parser alone).
    #[test]
    fn sentencepiece_models_of_any_bytes_parse_or_fail(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        limit_memory();
        let _ = checkpoints_convert::sentencepiece::SentencePieceModel::from_bytes(&bytes);
    }
}

/// The inputs these properties once found allocating without bound (kept as a corpus): a pickle
/// whose BINUNICODE declares 3.5 GB, a config with 10¹⁵ layers, one 10¹⁰ wide (its LayerNorm
/// was built eagerly).
#[test]
fn inputs_that_once_allocated_without_bound_are_refused() {
    limit_memory();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    let mut pickle = vec![0x80, 0x02, b'X'];
    pickle.extend(3_495_179_869u32.to_le_bytes());
    pickle.extend(b"short");
    fs::write(&path, &pickle).unwrap();
    let err = index_weights_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("pytorch_model.bin") && err.contains("declares"),
        "{err}"
    );

    for (key, value) in [
        ("num_hidden_layers", 1_025_528_721_093_174u64),
        ("hidden_size", 10_000_000_000),
    ] {
        let mut config: serde_json::Value =
            serde_json::from_slice(&fs::read(fixture("bert/config.json")).unwrap()).unwrap();
        config[key] = value.into();
        config["num_attention_heads"] = 1.into();
        fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        match read_spec(dir.path()) {
            Err(error) => assert!(error.to_string().contains(key), "{error}"),
            // Counted from shapes alone, nothing allocated.
            Ok(spec) => assert!(spec.parameter_count().unwrap() > u128::from(value)),
        }
    }
}
