//! A linear layer `y = x·W + b` on `gemm` directly, forward and backward.
//!
//! burn-flex's matmul allocates each output zeroed and then copies it into an aligned buffer, and
//! burn's linear backward reshapes the transposed weight through a contiguous copy; together they
//! were a sixth of a CPU training step. Here the bias is the accumulator's starting value, the
//! outputs are written once, and the transposes are strides given to `gemm`:
//!
//! ```text
//!   y = x·W + b      dx = dy·Wᵀ      dW = xᵀ·dy      db = Σ_rows dy
//! ```

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::{
    Kernel, OnCpu, View, contiguous, flex, flex_from, from_cpu, gemm, on_cpu, output_grad, record,
    register_grads, tensor_from, values,
};
use crate::Cpu;

/// Rows per task when summing the bias gradient.
const ROWS: usize = 64;

/// `x·weight + bias` over the last dimension of `x`, or `None` where the kernel does not apply
/// (see [`super`]).
///
/// - x: `[..., d_input]`, weight: `[d_input, d_output]` (burn's row layout), bias: `[d_output]`
/// - output: `[..., d_output]`
pub fn linear<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, D>> {
    if !Kernel::Linear.enabled() {
        return None;
    }
    let mut shape = x.dims().to_vec();
    let [d_input, d_output] = weight.dims();
    if shape[D - 1] != d_input || bias.is_some_and(|b| b.dims() != [d_output]) {
        return None;
    }
    shape[D - 1] = d_output;
    let bias = match bias {
        Some(bias) => Some(on_cpu(bias)?),
        None => None,
    };
    match (on_cpu(x)?, on_cpu(weight)?, bias) {
        (OnCpu::Infer(x), OnCpu::Infer(w), bias) => {
            let bias = match bias {
                None => None,
                Some(OnCpu::Infer(b)) => Some(flex(b)),
                Some(OnCpu::Train(_)) => return None,
            };
            let (x, w) = (flex(x), flex(w));
            let y = forward(values(&x), values(&w), bias.as_ref().map(values), d_output);
            Some(from_cpu(tensor_from::<D>(flex_from(y, shape))))
        }
        (OnCpu::Train(x), OnCpu::Train(w), bias) => {
            let bias = match bias {
                None => None,
                Some(OnCpu::Train(b)) => Some(b.into_primitive().tensor()),
                Some(OnCpu::Infer(_)) => return None,
            };
            let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
            let input = contiguous(x.primitive.clone());
            let weights = contiguous(w.primitive.clone());
            let bias_values = bias.as_ref().map(|b| contiguous(b.primitive.clone()));
            let y = forward(
                values(&input),
                values(&weights),
                bias_values.as_ref().map(values),
                d_output,
            );
            let y = flex_from(y, shape);
            let saved = Saved {
                input,
                weights,
                d_output,
            };
            Some(match &bias {
                Some(b) => record(LinearBackward, [&x, &w, b], saved, y),
                None => record(LinearBackward, [&x, &w], saved, y),
            })
        }
        _ => None,
    }
}

/// `dst[m×n] = lhs·rhs`, or `dst + lhs·rhs` when `accumulate`, threaded over rayon's current
/// pool when the product is large.
///
/// # Safety
/// As [`gemm`]'s, with `dst` a contiguous `m×n` buffer.
unsafe fn gemm_into(
    dst: *mut f32,
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
) {
    let threaded = m * n * k >= 1 << 21 && rayon::current_num_threads() > 1;
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm(
            m,
            n,
            k,
            (dst, n as isize, 1),
            lhs,
            rhs,
            1.0,
            accumulate,
            threaded,
        )
    }
}

/// An `m·n` buffer filled by `fill` through its raw pointer (which must write every element).
fn filled(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(len);
    fill(out.as_mut_ptr());
    // SAFETY: `fill` initialised all `len` elements (gemm without accumulation writes them all).
    unsafe { out.set_len(len) };
    out
}

/// `x·W (+ b)`, rows of `x` being its last dimension.
fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, d_output: usize) -> Vec<f32> {
    let d_input = w.len() / d_output;
    let rows = x.len() / d_input;
    let lhs = (x.as_ptr(), d_input as isize, 1);
    let rhs = (w.as_ptr(), d_output as isize, 1);
    match bias {
        Some(bias) => {
            // The bias is the accumulator's starting value.
            let mut y = Vec::with_capacity(rows * d_output);
            for _ in 0..rows {
                y.extend_from_slice(bias);
            }
            // SAFETY: y holds rows·d_output initialised values; x and w cover their shapes.
            unsafe { gemm_into(y.as_mut_ptr(), rows, d_output, d_input, lhs, rhs, true) };
            y
        }
        // SAFETY: as above; without accumulation gemm writes every element of the fresh buffer.
        None => filled(rows * d_output, |y| unsafe {
            gemm_into(y, rows, d_output, d_input, lhs, rhs, false)
        }),
    }
}

/// Backward: `(dx, dW, db)`, each only when `need` says its input takes a gradient (a frozen
/// weight's — LoRA's base, BitFit's matrices — is never computed: a third of the layer's work).
fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d_output: usize,
    need: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    let d_input = w.len() / d_output;
    let rows = x.len() / d_input;
    // SAFETY (all three): the buffers have the lengths the shapes say; the transposes are strides.
    let dx = need[0].then(|| {
        filled(rows * d_input, |dx| unsafe {
            let dy_view = (dy.as_ptr(), d_output as isize, 1);
            let w_t = (w.as_ptr(), 1, d_output as isize);
            gemm_into(dx, rows, d_input, d_output, dy_view, w_t, false)
        })
    });
    let dw = need[1].then(|| {
        filled(d_input * d_output, |dw| unsafe {
            let x_t = (x.as_ptr(), 1, d_input as isize);
            let dy_view = (dy.as_ptr(), d_output as isize, 1);
            gemm_into(dw, d_input, d_output, rows, x_t, dy_view, false)
        })
    });
    if !need[2] {
        return [dx, dw, None];
    }
    // Column sums by fixed blocks of rows, added in block order (bit-identical at any thread count).
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(ROWS * d_output)
        .map(|block| {
            let mut sum = vec![0.0f32; d_output];
            for row in block.chunks(d_output) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sum
        })
        .collect();
    let mut db = vec![0.0f32; d_output];
    for partial in partials {
        db.iter_mut().zip(partial).for_each(|(s, v)| *s += v);
    }
    [dx, dw, Some(db)]
}

#[derive(Debug, Clone)]
struct Saved {
    input: FlexTensor,
    weights: FlexTensor,
    d_output: usize,
}

#[derive(Debug)]
struct LinearBackward;

impl LinearBackward {
    fn run<const N: usize>(ops: Ops<Saved, N>, grads: &mut Gradients) {
        let (dy, parents) = output_grad(&ops, grads);
        let saved = ops.state;
        // Without a bias there are two parents; the bias gradient has none to go to.
        let need = std::array::from_fn(|i| parents.get(i).is_some_and(Option::is_some));
        let [dx, dw, db] = backward(
            values(&saved.input),
            values(&saved.weights),
            values(&dy),
            saved.d_output,
            need,
        );
        let computed = [
            (dx, saved.input.layout().shape().to_vec()),
            (dw, saved.weights.layout().shape().to_vec()),
            (db, vec![saved.d_output]),
        ];
        // Gradients not computed go to parents that take none.
        let (parents, computed): (Vec<_>, Vec<_>) = parents
            .into_iter()
            .zip(computed)
            .filter_map(|(parent, (values, shape))| Some((parent, (values?, shape))))
            .unzip();
        register_grads(grads, parents, computed);
    }
}

impl Backward<Cpu, 3> for LinearBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run(ops, grads);
    }
}

impl Backward<Cpu, 2> for LinearBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run(ops, grads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{leaf, max_diff, random};

    #[test]
    fn forward_and_gradients_match_burns_linear_with_and_without_bias() {
        let (batch, seq, d_in, d_out) = (3, 70, 40, 56);
        for with_bias in [true, false] {
            let run = |fused: bool| {
                let x = leaf(random(batch * seq * d_in, 1, 1.0), [batch, seq, d_in]);
                let w = leaf(random(d_in * d_out, 2, 0.3), [d_in, d_out]);
                let b = leaf(random(d_out, 3, 0.5), [d_out]);
                let bias = with_bias.then_some(&b);
                let y = if fused {
                    linear(&x, &w, bias).expect("fused path")
                } else {
                    burn::tensor::module::linear(x.clone(), w.clone(), bias.cloned())
                };
                let weights = leaf(random(batch * seq * d_out, 4, 1.0), [batch, seq, d_out]);
                let grads = (y.clone() * weights).sum().backward();
                let db = b.grad(&grads);
                (
                    y.inner(),
                    x.grad(&grads).unwrap(),
                    w.grad(&grads).unwrap(),
                    db,
                )
            };
            let (fused, reference) = (run(true), run(false));
            assert!(max_diff(fused.0, reference.0) < 1e-5, "y, bias {with_bias}");
            assert!(max_diff(fused.1, reference.1) < 1e-5, "dx");
            assert!(max_diff(fused.2, reference.2) < 1e-4, "dw");
            match (fused.3, reference.3) {
                (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-4, "db"),
                (None, None) => assert!(!with_bias),
                _ => panic!("bias gradient present in one path only"),
            }
        }
    }

    /// A frozen weight and bias (no `require_grad`: LoRA's base) get no gradient, and the
    /// input's is burn's.
    #[test]
    fn a_frozen_weight_gets_no_gradient_and_the_input_gets_burns() {
        let (rows, d_in, d_out) = (70, 40, 56);
        let frozen = |values: Vec<f32>, shape: [usize; 2]| {
            Tensor::<crate::CpuTrain, 2>::from_data(
                burn::tensor::TensorData::new(values, shape),
                &Default::default(),
            )
        };
        let run = |fused: bool| {
            let x = leaf(random(rows * d_in, 1, 1.0), [rows, d_in]);
            let w = frozen(random(d_in * d_out, 2, 0.3), [d_in, d_out]);
            let b = frozen(random(d_out, 3, 0.5), [1, d_out]).reshape([d_out]);
            let y = if fused {
                linear(&x, &w, Some(&b)).expect("fused path")
            } else {
                burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()))
            };
            let grads = (y * leaf(random(rows * d_out, 4, 1.0), [rows, d_out]))
                .sum()
                .backward();
            assert!(w.grad(&grads).is_none() && b.grad(&grads).is_none());
            x.grad(&grads).unwrap()
        };
        assert!(max_diff(run(true), run(false)) < 1e-5);
    }

    #[test]
    fn large_products_thread_and_agree() {
        // Above the threading threshold, on a two-thread pool.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (rows, d_in, d_out) = (256, 128, 96);
        let x = random(rows * d_in, 5, 1.0);
        let w = random(d_in * d_out, 6, 1.0);
        let threaded = pool.install(|| forward(&x, &w, None, d_out));
        let naive: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let (x, w) = (&x, &w);
                (0..d_out).map(move |c| (0..d_in).map(|i| x[r * d_in + i] * w[i * d_out + c]).sum())
            })
            .collect();
        let worst = threaded
            .iter()
            .zip(&naive)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "{worst}");
    }
}
