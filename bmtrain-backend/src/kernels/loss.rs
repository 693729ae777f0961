//! Token cross-entropy in one pass over the logits, and its gradient `softmax − one-hot` in one
//! more. For a language model's head these are the largest tensors of the step (GPT-2 small at
//! 4 × 256: 51 M logits); burn's log-softmax, gather and mask make several passes and copies.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::{
    Kernel, OnCpu, contiguous, flex, flex_from, from_cpu, on_cpu, output_grad, record,
    register_grads, tensor_from, values,
};
use crate::Cpu;

/// Rows per rayon task.
const ROWS: usize = 4;

/// The mean over rows whose target is not `ignore` of `−log softmax(logits)[target]`, as `[1]`
/// (0 when every row is ignored), or `None` where the kernel does not apply (see [`super`]) or a
/// target is outside the vocabulary (the caller's composition reports it).
///
/// - logits: `[rows, vocab]`; targets: one per row, asked for only once the kernel applies (on
///   other backends, reading labels to the host would be a wasted device sync)
pub fn cross_entropy<B: Backend>(
    logits: &Tensor<B, 2>,
    targets: impl FnOnce() -> Vec<i64>,
    ignore: i64,
) -> Option<Tensor<B, 1>> {
    if !Kernel::CrossEntropy.enabled() {
        return None;
    }
    let route = on_cpu(logits)?;
    let [rows, vocab] = logits.dims();
    let targets = targets();
    let in_range = |t: i64| t == ignore || (0..vocab as i64).contains(&t);
    if targets.len() != rows || !targets.iter().all(|&t| in_range(t)) {
        return None;
    }
    let targets: Vec<Option<usize>> = targets
        .iter()
        .map(|&t| (t != ignore).then_some(t as usize))
        .collect();
    match route {
        OnCpu::Infer(logits) => {
            let logits = flex(logits);
            let (loss, _) = forward(values(&logits), vocab, &targets);
            Some(from_cpu(tensor_from::<1>(flex_from(vec![loss], vec![1]))))
        }
        OnCpu::Train(logits) => {
            let logits = logits.into_primitive().tensor();
            let input = contiguous(logits.primitive.clone());
            let (loss, lse) = forward(values(&input), vocab, &targets);
            let loss = flex_from(vec![loss], vec![1]);
            let saved = Saved {
                logits: input,
                lse: Arc::new(lse),
                targets: Arc::new(targets),
            };
            Some(record(CrossEntropyBackward, [&logits], saved, loss))
        }
    }
}

/// Forward: the mean loss and each row's log-sum-exp.
fn forward(logits: &[f32], vocab: usize, targets: &[Option<usize>]) -> (f32, Vec<f32>) {
    let mut lse = vec![0.0f32; targets.len()];
    // Partial sums per task, added in task order: independent of rayon's scheduling.
    let partials: Vec<(f64, usize)> = lse
        .par_chunks_mut(ROWS)
        .zip(logits.par_chunks(ROWS * vocab))
        .zip(targets.par_chunks(ROWS))
        .map(|((lse, logits), targets)| {
            let (mut total, mut count) = (0.0f64, 0usize);
            for ((lse, row), target) in lse.iter_mut().zip(logits.chunks(vocab)).zip(targets) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
                *lse = max + sum.ln();
                if let Some(t) = *target {
                    total += f64::from(*lse - row[t]);
                    count += 1;
                }
            }
            (total, count)
        })
        .collect();
    let (total, count) = partials
        .iter()
        .fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    ((total / count.max(1) as f64) as f32, lse)
}

/// Backward: `d logits = g/N · (softmax − one-hot)` on kept rows, 0 on ignored ones.
fn backward(
    logits: &[f32],
    vocab: usize,
    lse: &[f32],
    targets: &[Option<usize>],
    g: f32,
) -> Vec<f32> {
    let count = targets.iter().filter(|t| t.is_some()).count().max(1);
    let scale = g / count as f32;
    let mut grad = vec![0.0f32; logits.len()];
    grad.par_chunks_mut(ROWS * vocab)
        .zip(logits.par_chunks(ROWS * vocab))
        .zip(lse.par_chunks(ROWS).zip(targets.par_chunks(ROWS)))
        .for_each(|((grad, logits), (lse, targets))| {
            for (((grad, row), &lse), target) in grad
                .chunks_mut(vocab)
                .zip(logits.chunks(vocab))
                .zip(lse)
                .zip(targets)
            {
                let Some(t) = *target else { continue };
                for (d, &x) in grad.iter_mut().zip(row) {
                    *d = (x - lse).exp() * scale;
                }
                grad[t] -= scale;
            }
        });
    grad
}

#[derive(Debug, Clone)]
struct Saved {
    logits: FlexTensor,
    lse: Arc<Vec<f32>>,
    targets: Arc<Vec<Option<usize>>>,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Cpu, 1> for CrossEntropyBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, [Some(parent)]) = output_grad(&ops, grads) else {
            return;
        };
        let g = values(&g)[0];
        let saved = ops.state;
        let shape = saved.logits.layout().shape().to_vec();
        let vocab = shape[1];
        let grad = backward(values(&saved.logits), vocab, &saved.lse, &saved.targets, g);
        register_grads(grads, [Some(parent)], [(grad, shape)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTrain;
    use crate::kernels::testing::{leaf, max_diff, random};
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, TensorData};

    #[test]
    fn loss_and_gradient_match_burns_log_softmax_with_ignored_rows() {
        let (rows, vocab) = (9, 37);
        let targets: Vec<i64> = vec![3, -100, 36, 0, 5, -100, 17, 2, 30];
        let logit_values = random(rows * vocab, 11, 6.0);
        let run = |fused: bool| {
            let logits = leaf(logit_values.clone(), [rows, vocab]);
            let loss = if fused {
                cross_entropy(&logits, || targets.clone(), -100).expect("fused path")
            } else {
                let device = Default::default();
                let kept: Vec<(usize, i64)> = targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| **t != -100)
                    .map(|(i, &t)| (i, t))
                    .collect();
                let rows_t = Tensor::<CpuTrain, 1, Int>::from_data(
                    TensorData::new(
                        kept.iter().map(|k| k.0 as i64).collect::<Vec<_>>(),
                        [kept.len()],
                    ),
                    &device,
                );
                let picked = Tensor::<CpuTrain, 2, Int>::from_data(
                    TensorData::new(
                        kept.iter().map(|k| k.1).collect::<Vec<_>>(),
                        [kept.len(), 1],
                    ),
                    &device,
                );
                let chosen = log_softmax(logits.clone(), 1)
                    .select(0, rows_t)
                    .gather(1, picked);
                chosen.mean().neg().reshape([1])
            };
            let grads = (loss.clone() * 3.0).sum().backward();
            (loss.inner(), logits.grad(&grads).unwrap())
        };
        let (fused, reference) = (run(true), run(false));
        assert!(max_diff(fused.0, reference.0) < 1e-5);
        assert!(max_diff(fused.1, reference.1) < 1e-6, "grad");
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_left_to_the_caller() {
        let logits = leaf(random(6, 1, 1.0), [2, 3]);
        assert!(cross_entropy(&logits, || vec![0, 3], -100).is_none());
    }
}
