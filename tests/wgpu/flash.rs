//! The flash attention kernels on wgpu (Mesa's lavapipe in CI) against burn's composition of the
//! same attention on the same device: values and the gradients of q, k, v and a learned bias.

use burn::tensor::{Distribution, Tensor, TensorData, activation};

use bmtrain_backend::kernels::flash::{FlashGeometry, flash_attention_train};
use bmtrain_backend::{Wgpu, WgpuTrain};
use burn::tensor::DType;
use burn::tensor::backend::Backend as _;

use super::{device_lock, flat, leaf, random, relative};

/// burn's composition: heads split to `[batch, heads, len, dim]`, kv heads repeated, the scores
/// and probabilities materialised, in f32.
fn composed(
    q: Tensor<WgpuTrain, 3>,
    k: Tensor<WgpuTrain, 3>,
    v: Tensor<WgpuTrain, 3>,
    bias: Option<Tensor<WgpuTrain, 4>>,
    mask: Option<Tensor<WgpuTrain, 4>>,
    g: &FlashGeometry,
) -> Tensor<WgpuTrain, 3> {
    let split = |x: Tensor<WgpuTrain, 3>, heads: usize, dim: usize| {
        let [b, len, _] = x.dims();
        x.cast(DType::F32)
            .reshape([b, len, heads, dim])
            .swap_dims(1, 2)
    };
    let repeat = |x: Tensor<WgpuTrain, 4>| {
        if g.heads / g.kv_heads == 1 {
            return x;
        }
        let [b, kvh, len, dim] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .repeat_dim(2, g.heads / g.kv_heads)
            .reshape([b, kvh * (g.heads / g.kv_heads), len, dim])
    };
    let q = split(q, g.heads, g.head_dim);
    let k = repeat(split(k, g.kv_heads, g.head_dim));
    let v = repeat(split(v, g.kv_heads, g.value_dim));
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(g.scale);
    if let Some(bias) = bias {
        scores = scores + bias.cast(DType::F32);
    }
    if g.causal {
        let causal: Vec<f32> = (0..g.q_len)
            .flat_map(|i| {
                (0..g.k_len).map(move |j| {
                    if j + g.q_len <= i + g.k_len {
                        0.0
                    } else {
                        f32::MIN
                    }
                })
            })
            .collect();
        let causal = Tensor::<WgpuTrain, 4>::from_data(
            TensorData::new(causal, [1, 1, g.q_len, g.k_len]),
            &Default::default(),
        );
        scores = scores + causal;
    }
    let mut probs = activation::softmax(scores, 3);
    if let Some(mask) = mask {
        probs = probs * mask;
    }
    let out = probs.matmul(v).swap_dims(1, 2);
    out.reshape([g.batch, g.q_len, g.heads * g.value_dim])
}

/// Runs the kernel and the composition on the same inputs and returns the relative errors of the
/// output and of the gradients of q, k, v and (when learned) the bias.
/// `dropout_mask` (`[batch, heads, q_len, k_len]`, scaled) is what the composition multiplies the
/// probabilities by when `g.dropout` is set.
fn compare(
    g: &FlashGeometry,
    dtype: DType,
    learned_bias: bool,
    padding: bool,
    dropout_mask: Option<&[f32]>,
) -> Vec<(String, f32)> {
    let _device = device_lock();
    let q_values = random(g.batch * g.q_len * g.heads * g.head_dim, 1, 2.0);
    let k_values = random(g.batch * g.k_len * g.kv_heads * g.head_dim, 2, 2.0);
    let v_values = random(g.batch * g.k_len * g.kv_heads * g.value_dim, 3, 1.0);
    let weights = random(g.batch * g.q_len * g.heads * g.value_dim, 4, 1.0);
    let bias_values = random(g.heads * g.q_len * g.k_len, 5, 3.0);
    // Padding: row b masks its last 3·b keys (a most-negative additive bias, as the models make).
    let padding_mask: Vec<f32> = (0..g.batch)
        .flat_map(|b| (0..g.k_len).map(move |j| if j + 3 * b >= g.k_len { f32::MIN } else { 0.0 }))
        .collect();
    let run = |flash: bool| {
        let q = leaf(
            q_values.clone(),
            [g.batch, g.q_len, g.heads * g.head_dim],
            dtype,
        );
        let k = leaf(
            k_values.clone(),
            [g.batch, g.k_len, g.kv_heads * g.head_dim],
            dtype,
        );
        let v = leaf(
            v_values.clone(),
            [g.batch, g.k_len, g.kv_heads * g.value_dim],
            dtype,
        );
        let learned = leaf(
            bias_values.clone(),
            [1, g.heads, g.q_len, g.k_len],
            DType::F32,
        );
        let mut bias: Option<Tensor<WgpuTrain, 4>> = None;
        if learned_bias {
            bias = Some(learned.clone());
        }
        if padding {
            let mask = Tensor::<WgpuTrain, 4>::from_data(
                TensorData::new(padding_mask.clone(), [g.batch, 1, 1, g.k_len]),
                &Default::default(),
            );
            bias = Some(match bias {
                Some(bias) => bias + mask,
                None => mask,
            });
        }
        let out = if flash {
            flash_attention_train::<Wgpu>(q.clone(), k.clone(), v.clone(), bias, g)
        } else {
            let mask = dropout_mask.map(|mask| {
                Tensor::<WgpuTrain, 4>::from_data(
                    TensorData::new(mask.to_vec(), [g.batch, g.heads, g.q_len, g.k_len]),
                    &Default::default(),
                )
            });
            composed(q.clone(), k.clone(), v.clone(), bias, mask, g)
        };
        let w = Tensor::<WgpuTrain, 3>::from_data(
            TensorData::new(weights.clone(), out.dims()),
            &Default::default(),
        );
        let grads = (out.clone().cast(DType::F32) * w).sum().backward();
        let mut results = vec![
            ("out", flat(out)),
            ("dq", q.grad(&grads).unwrap().flatten(0, 2)),
            ("dk", k.grad(&grads).unwrap().flatten(0, 2)),
            ("dv", v.grad(&grads).unwrap().flatten(0, 2)),
        ];
        if learned_bias {
            results.push(("dbias", learned.grad(&grads).unwrap().flatten(0, 3)));
        }
        results
    };
    let (flash, reference) = (run(true), run(false));
    flash
        .into_iter()
        .zip(reference)
        .map(|((name, got), (_, want))| (name.to_string(), relative(got, want)))
        .collect()
}

fn geometry() -> FlashGeometry {
    FlashGeometry {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        q_len: 37,
        k_len: 45,
        head_dim: 16,
        value_dim: 24,
        scale: 0.25,
        causal: false,
        dropout: 0.0,
        seed: 0,
    }
}

fn check(errors: &[(String, f32)], bound: f32) {
    println!("{errors:?}");
    for (name, error) in errors {
        assert!(
            *error <= bound,
            "{name}: {error:e} > {bound:e} ({errors:?})"
        );
    }
}

/// f32 with grouped-query heads, ragged tiles, a padding mask and T5's learned bias: outputs and
/// all four gradients within 1e-5 (relative) of burn's composition.
#[test]
fn flash_attention_matches_burns_composition_in_f32() {
    let g = geometry();
    check(&compare(&g, DType::F32, true, true, None), 1e-5);
    check(&compare(&g, DType::F32, true, false, None), 1e-5);
    // One kv head per query head, no bias at all, keys fewer than a tile.
    let g = FlashGeometry {
        kv_heads: 4,
        k_len: 5,
        ..geometry()
    };
    check(&compare(&g, DType::F32, false, false, None), 1e-5);
}

/// The kernel's own causal masking equals the composition's causal mask, for self-attention and
/// for queries that are the last positions of longer keys.
#[test]
fn flash_attention_causal_masking_matches_the_additive_mask() {
    // The models leave causal masks to these kernels on wgpu (and CUDA), training or not.
    assert!(bmtrain_backend::kernels::computes_causal_masks::<WgpuTrain>());
    assert!(bmtrain_backend::kernels::computes_causal_masks::<Wgpu>());
    // Several tiles of queries and keys (a cube holds at most 64 rows): whole tiles past the
    // diagonal are skipped in forward and in both backward kernels.
    for (q_len, k_len) in [(40, 40), (9, 70), (150, 150), (70, 200)] {
        let g = FlashGeometry {
            q_len,
            k_len,
            causal: true,
            ..geometry()
        };
        check(&compare(&g, DType::F32, false, true, None), 1e-5);
    }
}

/// f16 inputs: statistics in f32, outputs rounded to f16; against the composition in f32 on the
/// same (f16-rounded) inputs.
#[test]
fn flash_attention_in_f16_stays_within_f16_rounding() {
    check(&compare(&geometry(), DType::F16, true, true, None), 2e-3);
}

/// Dropout: the forward's mask, read off through `V = I` (the output is then `P̃` itself), keeps
/// about `1 − p` of the probabilities, scales them by `1/(1 − p)`, leaves the rest of `P`
/// untouched, and is the mask backward uses: outputs and gradients equal the composition's with
/// that mask within 1e-5.
#[test]
fn flash_attention_dropout_is_one_mask_in_forward_and_backward() {
    let g = FlashGeometry {
        heads: 2,
        kv_heads: 2,
        q_len: 33,
        k_len: 40,
        value_dim: 40,
        dropout: 0.25,
        seed: 0x1234_5678_9abc_def0,
        ..geometry()
    };
    let device = Default::default();
    let guard = device_lock();
    let q = Tensor::<Wgpu, 3>::from_data(
        TensorData::new(
            random(g.batch * g.q_len * g.heads * g.head_dim, 1, 2.0),
            [g.batch, g.q_len, g.heads * g.head_dim],
        ),
        &device,
    );
    let k = Tensor::<Wgpu, 3>::from_data(
        TensorData::new(
            random(g.batch * g.k_len * g.kv_heads * g.head_dim, 2, 2.0),
            [g.batch, g.k_len, g.kv_heads * g.head_dim],
        ),
        &device,
    );
    // V = I per batch row and head: out[b, i, h·k_len + j] = P̃[b, h, i, j].
    let identity = Tensor::<Wgpu, 2>::eye(g.k_len, &device)
        .unsqueeze::<3>()
        .repeat_dim(2, g.kv_heads)
        .repeat_dim(0, g.batch);
    // Dropout applies under autodiff only, so run the training op and read its values.
    let train = |t: Tensor<Wgpu, 3>| Tensor::<WgpuTrain, 3>::from_inner(t);
    let probs = flash_attention_train::<Wgpu>(
        train(q.clone()),
        train(k.clone()),
        train(identity),
        None,
        &g,
    )
    .inner()
    .reshape([g.batch, g.q_len, g.heads, g.k_len])
    .swap_dims(1, 2);
    let dropped: Vec<f32> = probs.clone().into_data().to_vec().unwrap();
    let keep_scale = 1.0 / (1.0 - g.dropout);
    let mask: Vec<f32> = dropped
        .iter()
        .map(|&p| if p != 0.0 { keep_scale } else { 0.0 })
        .collect();
    let kept = mask.iter().filter(|&&m| m != 0.0).count() as f32 / mask.len() as f32;
    println!("kept {kept} of {} probabilities", mask.len());
    assert!((kept - 0.75).abs() < 0.03, "kept {kept}");
    drop(guard);
    check(&compare(&g, DType::F32, false, true, Some(&mask)), 1e-5);
    // Another seed draws another mask.
    let _device = device_lock();
    let other = FlashGeometry {
        seed: 7,
        ..g.clone()
    };
    let v = Tensor::<Wgpu, 3>::random(
        [g.batch, g.k_len, g.kv_heads * g.value_dim],
        Distribution::Default,
        &device,
    );
    let a = flash_attention_train::<Wgpu>(
        train(q.clone()),
        train(k.clone()),
        train(v.clone()),
        None,
        &g,
    );
    let b = flash_attention_train::<Wgpu>(train(q), train(k), train(v), None, &other);
    assert!(relative(flat(a), flat(b)) > 1e-3);
}

/// What a training forward leaves on the device for backward (the allocator's bytes in use,
/// inputs excluded): the composition keeps `[batch, heads, q_len, k_len]` probabilities; flash
/// attention keeps its output and one f32 per query row and head.
#[test]
fn flash_attention_keeps_no_scores_for_backward() {
    let g = FlashGeometry {
        heads: 4,
        kv_heads: 4,
        q_len: 256,
        k_len: 256,
        head_dim: 32,
        value_dim: 32,
        ..geometry()
    };
    let _device = device_lock();
    let device: burn::backend::wgpu::WgpuDevice = Default::default();
    let in_use = || {
        Wgpu::sync(&device).expect("the device runs");
        bmtrain_backend::device_memory::usage(&device)
            .expect("wgpu's allocator")
            .in_use as i64
    };
    let held = |flash: bool| {
        let input = |width: usize, seed: u32| {
            let values = random(g.batch * g.q_len * width, seed, 1.0);
            leaf(values, [g.batch, g.q_len, width], DType::F32)
        };
        let (q, k, v) = (input(128, 1), input(128, 2), input(128, 3));
        let before = in_use();
        let out = if flash {
            flash_attention_train::<Wgpu>(q.clone(), k.clone(), v.clone(), None, &g)
        } else {
            composed(q.clone(), k.clone(), v.clone(), None, None, &g)
        };
        let held = in_use() - before;
        // Backward runs (and frees the graph) before the inputs go.
        let grads = out.sum().backward();
        drop((grads, q, k, v));
        held
    };
    let (flash, composed) = (held(true), held(false));
    let out_bytes = (g.batch * g.q_len * g.heads * g.value_dim * 4) as i64;
    let lse_bytes = (g.batch * g.heads * g.q_len * 4) as i64;
    let probs_bytes = (g.batch * g.heads * g.q_len * g.k_len * 4) as i64;
    println!(
        "held for backward: flash {flash} bytes (output {out_bytes} + lse {lse_bytes}), \
         composition {composed} bytes (probabilities alone {probs_bytes})"
    );
    assert!(flash <= 2 * (out_bytes + lse_bytes), "flash held {flash}");
    assert!(
        composed - flash >= probs_bytes,
        "composition {composed}, flash {flash}"
    );
}
