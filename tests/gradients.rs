//! One training step of the classification fixtures and of the GPT-2 LM: loss and every
//! parameter's gradient against transformers (dropout off on both sides).

use std::collections::BTreeMap;

use bmtrain_backend::CpuTrain;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use checkpoints_convert::families::Layout;
use checkpoints_convert::{LoadOptions, load_model, tensors};
use models::bert::cross_entropy;
use models::gpt2::causal_lm_loss;
use models::t5::seq2seq_loss;
use models::{Family, Logits, ParamPath};
use zoo_tests::{fixture, floats, int_tensor, ints, max_relative_diff, reference, reference_input};

/// Gradients within this, relative to the largest value of each reference tensor.
const TOLERANCE: f32 = 1e-4;

/// A reference gradient whose largest value is below this is zero up to round-off.
const NUMERICALLY_ZERO: f32 = 1e-8;

/// Collects the gradient of every float parameter, by zoo name.
struct GradCollector<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    path: ParamPath,
    found: BTreeMap<String, TensorData>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = param.val().grad(self.grads) {
            self.found.insert(self.path.name(), grad.into_data());
        }
    }
}

/// The loss transformers computes from the fixture's `labels`: cross-entropy over classes for the
/// classifiers, the shifted causal-LM loss (ignore index -100) for GPT-2, the per-position loss
/// against the labels for T5 (its decoder input is already shifted).
fn loss_of(
    name: &str,
    family: Family,
    logits: Option<Logits<CpuTrain>>,
    reference: &checkpoints_convert::TensorMap,
) -> Tensor<CpuTrain, 1> {
    let device = Default::default();
    match logits {
        Some(Logits::PerSequence(logits)) => {
            let labels = Tensor::<CpuTrain, 1, Int>::from_data(
                TensorData::new(ints(&reference["labels"].data), [2]),
                &device,
            );
            cross_entropy(logits, labels)
        }
        Some(Logits::PerToken(logits)) if family == Family::T5 => {
            seq2seq_loss(logits, int_tensor(reference, "labels", &device))
        }
        Some(Logits::PerToken(logits)) => {
            causal_lm_loss(logits, int_tensor(reference, "labels", &device))
        }
        None => panic!("{name}: no head"),
    }
}

fn check_training_step(name: &str) {
    let device = Default::default();
    let options = LoadOptions {
        dropout: Some(0.0),
        ..Default::default()
    };
    let loaded = load_model::<CpuTrain>(&fixture(name), &device, &options).unwrap();
    let reference = reference(name);
    let input = reference_input(&reference, &device);
    let family = loaded.spec.architecture.family();
    let loss = loss_of(
        name,
        family,
        loaded.model.forward(&input).logits,
        &reference,
    );
    let loss_value = floats(&loss.clone().into_data())[0];
    let want_loss = floats(&reference["loss"].data)[0];
    eprintln!("gradients {name}: loss {loss_value} vs transformers {want_loss}");
    assert!(
        (loss_value - want_loss).abs() < 1e-5,
        "{name}: loss {loss_value} vs {want_loss}"
    );

    let grads = loss.backward();
    let mut collector = GradCollector::<CpuTrain> {
        grads: &grads,
        path: ParamPath::default(),
        found: BTreeMap::new(),
    };
    loaded.model.visit(&mut collector);
    let mut worst = (0.0f32, String::new());
    let pairs = loaded.spec.key_pairs();
    assert_eq!(
        pairs.len(),
        collector.found.len(),
        "{name}: every parameter has a gradient"
    );
    for pair in pairs {
        let got = &collector.found[&pair.zoo];
        // The HF gradient, in zoo's layout.
        let hf_grad = &reference[&format!("grad.{}", pair.hf)].data;
        let want = &match pair.layout {
            Layout::Same => hf_grad.clone(),
            Layout::Transposed => tensors::transpose_2d(hf_grad),
            Layout::Split { part, parts } => tensors::split_last_dim(hf_grad, part, parts),
        };
        let largest = floats(want).iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if largest < NUMERICALLY_ZERO {
            // Key biases shift every score of a row equally, which softmax cancels: their exact
            // gradient is 0 and both sides hold round-off. Compare absolutely.
            let got_largest = floats(got).iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(
                got_largest < NUMERICALLY_ZERO,
                "{name}: gradient of {} is {got_largest}, want ~0",
                pair.hf
            );
            continue;
        }
        let error = max_relative_diff(got, want);
        if error > worst.0 {
            worst = (error, pair.hf.clone());
        }
        assert!(
            error < TOLERANCE,
            "{name}: gradient of {} off by {error} (relative)",
            pair.hf
        );
    }
    eprintln!(
        "gradients {name}: worst relative error {:.3e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn bert_classification_gradients_match_transformers() {
    check_training_step("bert_cls");
}

#[test]
fn roberta_classification_gradients_match_transformers() {
    check_training_step("roberta_cls");
}

#[test]
fn gpt2_causal_lm_gradients_match_transformers() {
    check_training_step("gpt2");
}

#[test]
fn gpt2_classification_gradients_match_transformers() {
    check_training_step("gpt2_cls");
}

#[test]
fn t5_gradients_match_transformers() {
    check_training_step("t5");
}

#[test]
fn t5_v1_1_gradients_match_transformers() {
    check_training_step("t5_v1_1");
}

#[test]
fn llama_family_gradients_match_transformers() {
    for name in ["llama", "mistral", "qwen2", "llama_cls"] {
        check_training_step(name);
    }
}
