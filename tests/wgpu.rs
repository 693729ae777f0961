//! Device-resident training on a device that is not the host (feature `wgpu`; CI runs it on
//! Mesa's lavapipe, a Vulkan software GPU): GPT-2 trained 10 steps by the ZeRO trainer with its
//! state on the wgpu device ([`StatePlacement::Device`]: master weights, gradients and moments
//! as wgpu tensors; unscale, the overflow check, clipping and AdamW as wgpu operations) ends
//! within 1e-5 of the same run on burn-flex with the state on the host, on 1 and 2 thread ranks;
//! so does the offloaded placement ([`StatePlacement::Offload`]: master weights and moments on
//! the host, gradients and the weights' copy on the wgpu device).
//! The two backends share no kernel: burn-flex runs zoo's fused CPU kernels, wgpu burn's
//! composition in WGSL shaders.
//!
//! The allocator's readings ([`bmtrain_backend::device_memory`]) are checked against the bytes
//! each placement must keep on the device, and the chunked head loss
//! ([`bmtrain_backend::kernels::lm_head_loss`]) against burn's composition on the device.
//! The cubecl kernels (flash attention, layer norm / RMS norm, AdamW) are tested one by one in
//! [`gpu_kernels`].

use std::sync::Mutex;
use std::time::Duration;

use bmtrain_backend::comm::{Communicator, SingleRank, ThreadComm, ThreadGroup};
use bmtrain_backend::device_memory::{self, DeviceMemory};
use bmtrain_backend::kernels::{self, Head, HeadLayout};
use bmtrain_backend::optim::LossScaler;
use bmtrain_backend::resident::StatePlacement;
use bmtrain_backend::trainer::{ZeroOptions, ZeroSpec, ZeroTrainer};
use bmtrain_backend::zero::{flatten, layout_of, load_flat};
use bmtrain_backend::{CpuTrain, WgpuTrain};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use checkpoints_convert::{LoadOptions, load_model};
use models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use models::t5::zero::{Seq2SeqBatch, T5Spec};
use models::train::{Gpt2Spec, LmBatch, MlmBatch, MlmSpec};
use zoo_tests::{fixture, int_tensor, max_slice_diff, reference};

const ROWS: usize = 4;
const SEQ: usize = 8;
const VOCAB: usize = 37;
const STEPS: usize = 10;
/// AdamW moves a weight whose gradient is near its rounding noise by up to the learning rate
/// in either backend (it divides by the gradient's own size), so the backends' difference
/// scales with it: at 1e-3 one weight of `mlp.input` ended 1.4e-5 apart; at 1e-4 the weights
/// still move 100× the tolerance.
const LR: f32 = 1e-4;

#[path = "wgpu/gpu_kernels.rs"]
mod gpu_kernels;

/// The tests share one wgpu device, whose allocator readings count every tensor on it: they take
/// turns.
static DEVICE: Mutex<()> = Mutex::new(());

fn config() -> Gpt2Config {
    let mut config = Gpt2Config::new();
    (config.vocab_size, config.n_positions, config.n_embd) = (VOCAB, 16, 32);
    (config.n_layer, config.n_head) = (2, 2);
    (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) = (0.0, 0.0, 0.0);
    config
}

/// Token ids of `rows` (the same every step, so that the loss falls at a small learning rate).
fn ids<B: AutodiffBackend>(rows: std::ops::Range<usize>, device: &B::Device) -> Tensor<B, 2, Int> {
    let n = rows.len();
    let values: Vec<i64> = rows
        .flat_map(|r| (0..SEQ).map(move |t| ((r * 11 + t * 5 + t * t) % VOCAB) as i64))
        .collect();
    Tensor::from_data(TensorData::new(values, [n, SEQ]), device)
}

/// Every parameter by name (model order) and every step's loss after [`STEPS`] steps.
type Run = (Vec<(String, Vec<f32>)>, Vec<f32>);

/// Trains the model whose flat values are `initial` on `B` (device `device`) with the state
/// placed as `placement`: ZeRO-3, blocks checkpointed, a loss scaler, clipping that bites.
fn train<B: AutodiffBackend>(
    initial: &[f32],
    comm: ThreadComm,
    device: B::Device,
    placement: StatePlacement,
) -> Run {
    let model = Gpt2LmHeadModel::<B>::new(&config(), &device).unwrap();
    let layout = layout_of::<B, _>(&model);
    let model = load_flat(model, &layout, initial, &device, true);
    let (spec, embed, blocks, head) = Gpt2Spec::split(model);
    let options = ZeroOptions {
        max_grad_norm: Some(0.5),
        loss_scaler: Some(LossScaler::new(1024.0)),
        placement,
        ..ZeroOptions::checkpoint_all(blocks.len())
    };
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut trainer = ZeroTrainer::new(spec, comm, device.clone(), embed, blocks, head, options);
    let per_rank = ROWS / world;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let rows = rank * per_rank..(rank + 1) * per_rank;
        let batch = LmBatch {
            input_ids: ids::<B>(rows, &device),
            labels: None,
        };
        losses.push(trainer.forward_backward(&batch).unwrap());
        assert!(trainer.step(LR).unwrap().applied, "step {step} skipped");
    }
    let params = trainer
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(name, _, values)| (name, values))
        .collect();
    (params, losses)
}

/// Runs `train` on `world` thread ranks and returns rank 0's result.
fn on_ranks<B: AutodiffBackend>(world: usize, initial: &[f32], placement: StatePlacement) -> Run
where
    B::Device: Default,
{
    let initial = initial.to_vec();
    let mut runs = ThreadGroup::run(world, Duration::from_secs(300), move |comm| {
        train::<B>(&initial, comm, Default::default(), placement)
    });
    runs.remove(0).unwrap()
}

/// Whether the parameter's exact gradient is zero: attention's key bias adds the same
/// `q · b_k` to every score of a query, which softmax ignores. Its computed gradient is rounding
/// noise (~1e-9), and AdamW divides by the noise's own size (`m / (√v + ε)`), so each backend
/// moves it by a different fraction of the learning rate: no tolerance on it is meaningful.
fn gradient_is_zero_in_exact_arithmetic(name: &str) -> bool {
    name.ends_with("attention.key.bias")
}

/// The largest difference between two runs' parameters (those with a real gradient), and the
/// parameter it is in.
fn worst_parameter(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, String) {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|((name, _), _)| !gradient_is_zero_in_exact_arithmetic(name))
        .map(|((name, x), (_, y))| (max_slice_diff(x, y), name.clone()))
        .fold((0.0, String::new()), |worst, next| match next.0 > worst.0 {
            true => next,
            false => worst,
        })
}

#[test]
fn device_and_offloaded_training_on_wgpu_match_burn_flex_after_ten_steps() {
    let _turn = DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = Default::default();
    // A fixed initialisation, so that the figures printed are the same on every run.
    <CpuTrain as Backend>::seed(&device, 7);
    let model = Gpt2LmHeadModel::<CpuTrain>::new(&config(), &device).unwrap();
    let (_, initial) = flatten::<CpuTrain, _>(&model);
    for world in [1, 2] {
        let (flex_params, flex_losses) =
            on_ranks::<CpuTrain>(world, &initial, StatePlacement::Host);
        // Training moved the weights by far more than the tolerance.
        let trained: Vec<f32> = flex_params.iter().flat_map(|(_, v)| v.clone()).collect();
        let moved = max_slice_diff(&trained, &initial);
        assert!(
            moved > 5e-4,
            "N={world}: training moved the weights by {moved}"
        );
        assert!(
            flex_losses.last() < flex_losses.first(),
            "N={world}: the loss did not fall: {flex_losses:?}"
        );
        for placement in [StatePlacement::Device, StatePlacement::Offload] {
            let (wgpu_params, wgpu_losses) = on_ranks::<WgpuTrain>(world, &initial, placement);
            let (params_error, worst) = worst_parameter(&flex_params, &wgpu_params);
            let loss_error = max_slice_diff(&flex_losses, &wgpu_losses);
            eprintln!(
                "wgpu {placement:?} N={world}: after {STEPS} steps the weights are within \
                 {params_error:.2e} of burn-flex's host path (worst: {worst}; they moved \
                 {moved:.2e}); losses within {loss_error:.2e} ({:.4} → {:.4})",
                flex_losses[0],
                flex_losses[STEPS - 1]
            );
            assert!(
                params_error <= 1e-5,
                "{placement:?} N={world}: weights {params_error} ({worst})"
            );
            assert!(
                loss_error <= 1e-5,
                "{placement:?} N={world}: losses {loss_error}"
            );
        }
    }
}

/// The allocator's highest readings over two steps of a GPT-2 (4 blocks, width 128) on one rank
/// with the state placed as `placement`, and the model's parameter count.
fn allocator_peak(placement: StatePlacement) -> (DeviceMemory, usize) {
    type B = WgpuTrain;
    let device = Default::default();
    let mut config = config();
    (
        config.vocab_size,
        config.n_embd,
        config.n_layer,
        config.n_head,
    ) = (256, 128, 4, 4);
    let model = Gpt2LmHeadModel::<B>::new(&config, &device).unwrap();
    let (spec, embed, blocks, head) = Gpt2Spec::split(model);
    let options = ZeroOptions {
        placement,
        ..ZeroOptions::checkpoint_all(blocks.len())
    };
    let mut trainer = ZeroTrainer::new(
        spec,
        SingleRank,
        device.clone(),
        embed,
        blocks,
        head,
        options,
    );
    for _ in 0..2 {
        let batch = LmBatch {
            input_ids: ids::<B>(0..ROWS, &device),
            labels: None,
        };
        trainer.forward_backward(&batch).unwrap();
        trainer.step(LR).unwrap();
    }
    let peak = trainer
        .device_memory_peak()
        .expect("wgpu reports its allocator");
    let parameters = trainer.parameter_count();
    drop(trainer);
    // The next run's reservation starts from what it needs, not from this run's pages.
    B::memory_cleanup(&device);
    (peak, parameters)
}

#[test]
fn the_allocator_readings_hold_what_each_placement_keeps_on_the_device() {
    let _turn = DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (host, p) = allocator_peak(StatePlacement::Host);
    let (device, _) = allocator_peak(StatePlacement::Device);
    let (offload, _) = allocator_peak(StatePlacement::Offload);
    let p = p as u64;
    let mb = |bytes: u64| bytes as f64 / 1e6;
    for (name, peak) in [("host", host), ("device", device), ("offload", offload)] {
        eprintln!(
            "{name}: allocator peak in use {:.2} MB ({:.1} bytes a parameter), reserved {:.2} MB",
            mb(peak.in_use),
            peak.in_use as f64 / p as f64,
            mb(peak.reserved)
        );
        assert!(peak.reserved >= peak.in_use, "{name}: {peak:?}");
    }
    // The state on the device: f32 master weights, gradient accumulator and two moments,
    // 16 bytes a parameter; offloaded, the gradient and an f32 copy of the weights, 8.
    assert!(
        device.in_use >= 16 * p,
        "device: {device:?}, {p} parameters"
    );
    assert!(
        offload.in_use >= 8 * p,
        "offload: {offload:?}, {p} parameters"
    );
    // Both run the same forward and backward, so the difference is the state's: master and
    // moments (12 bytes) less the copy (4). Measured 7.4 bytes: the peaks fall at different
    // points of the step, and burn's fusion may not have allocated its queued operations' outputs
    // when a sample is taken.
    let difference = device.in_use.saturating_sub(offload.in_use);
    assert!(
        difference >= 6 * p,
        "device {device:?} − offload {offload:?} = {difference} bytes, {p} parameters"
    );
    // With the state on the host the device holds one segment's weights and gradients at a
    // time, besides the activations.
    assert!(
        host.in_use < offload.in_use,
        "host {host:?} is not below offload {offload:?}"
    );
}

/// Deterministic values in `[-scale, scale)` (an LCG).
fn random(len: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// burn's composition of a head's loss: the whole logits, log-softmax in f32, pick, mean over
/// kept rows.
fn composed_head_loss<B: Backend>(
    hidden: Tensor<B, 2>,
    head: &Head<B>,
    targets: &[i64],
) -> Tensor<B, 1> {
    let device = hidden.device();
    let rhs = match head.layout {
        HeadLayout::HiddenByVocab => head.weight.clone(),
        HeadLayout::VocabByHidden => head.weight.clone().transpose(),
    };
    let mut logits = hidden.matmul(rhs);
    if let Some(bias) = &head.bias {
        logits = logits.add(bias.clone().unsqueeze());
    }
    let n = targets.len();
    let safe: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
    let keep: Vec<f32> = targets.iter().map(|&t| f32::from(t >= 0)).collect();
    let count = keep.iter().sum::<f32>();
    let index = Tensor::<B, 2, Int>::from_data(TensorData::new(safe, [n, 1]), &device);
    let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [n, 1]), &device);
    let picked = log_softmax(logits.cast(DType::F32), 1).gather(1, index);
    picked.mul(keep).sum().neg().div_scalar(count)
}

/// The largest difference relative to the reference's largest magnitude.
fn relative(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    max_slice_diff(got, want) / scale
}

fn host<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().to_vec().unwrap()
}

/// The chunked head loss (`kernels::lm_head_loss`, which GPT-2's and Llama's causal-LM heads
/// call on a GPU backend) against burn's composition on the wgpu device: the loss and the
/// gradients of the hidden states, the weight and the bias with ignored rows and a loss-scaled
/// upstream gradient; f32 in the tied and the linear layout (bound 1e-5), f16 in the linear one
/// with a bias (bound 1e-2: f16's rounding of the inputs, the logits and their gradient); and
/// the allocator's reservation for each, which the chunks exist to keep down.
#[test]
fn the_chunked_head_loss_on_wgpu_matches_burns_composition_and_reserves_less() {
    let _turn = DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    type B = WgpuTrain;
    let device = Default::default();
    let (n, width, vocab) = (512, 64, 2048);
    let targets: Vec<i64> = (0..n)
        .map(|i| match i % 7 {
            3 => -100,
            _ => ((i * 2654435761) % vocab) as i64,
        })
        .collect();
    let ids = || Tensor::<B, 1, Int>::from_data(TensorData::new(targets.clone(), [n]), &device);
    // Each case compiles its own shaders on lavapipe (tens of seconds): f16 runs the linear
    // layout, whose bias covers every gradient.
    for (dtype, layouts, bound) in [
        (
            DType::F32,
            &[HeadLayout::VocabByHidden, HeadLayout::HiddenByVocab][..],
            1e-5f32,
        ),
        (DType::F16, &[HeadLayout::HiddenByVocab][..], 1e-2),
    ] {
        for &layout in layouts {
            let shape = match layout {
                HeadLayout::HiddenByVocab => [width, vocab],
                HeadLayout::VocabByHidden => [vocab, width],
            };
            let leaf = |values, shape: [usize; 2]| {
                Tensor::<B, 2>::from_data(TensorData::new(values, shape), &device)
                    .cast(dtype)
                    .require_grad()
            };
            let hidden = leaf(random(n * width, 1, 2.0), [n, width]);
            let weight = leaf(random(width * vocab, 2, 0.5), shape);
            let bias = (layout == HeadLayout::HiddenByVocab).then(|| {
                Tensor::<B, 1>::from_data(TensorData::new(random(vocab, 3, 0.5), [vocab]), &device)
                    .cast(dtype)
                    .require_grad()
            });
            let head = Head {
                weight: weight.clone(),
                layout,
                bias: bias.clone(),
            };
            let routed = kernels::lm_head_loss(hidden.clone(), head.clone(), ids(), -100)
                .expect("the chunked loss runs on wgpu");
            // Chunks of 96 rows: five full ones and a short one.
            let ours =
                kernels::chunked_head_loss_train(hidden.clone(), head.clone(), ids(), -100, 96);
            let theirs = composed_head_loss(hidden.clone(), &head, &targets);
            let (a, r, b) = (host(ours.clone()), host(routed), host(theirs.clone()));
            let loss_error = relative(&a, &b).max(relative(&r, &b));
            let ours = ours.mul_scalar(1024.0).backward();
            let theirs = theirs.mul_scalar(1024.0).backward();
            let grad_error = |got: Vec<f32>, want: Vec<f32>| relative(&got, &want);
            let hidden_error = grad_error(
                host(hidden.grad(&ours).unwrap()),
                host(hidden.grad(&theirs).unwrap()),
            );
            let weight_error = grad_error(
                host(weight.grad(&ours).unwrap()),
                host(weight.grad(&theirs).unwrap()),
            );
            let bias_error = bias.as_ref().map_or(0.0, |bias| {
                grad_error(
                    host(bias.grad(&ours).unwrap()),
                    host(bias.grad(&theirs).unwrap()),
                )
            });
            eprintln!(
                "chunked head loss {dtype:?} {layout:?}: loss {loss_error:.2e}, gradients: hidden \
                 {hidden_error:.2e}, weight {weight_error:.2e}, bias {bias_error:.2e} (relative, \
                 bound {bound:.0e})"
            );
            for (what, error) in [
                ("loss", loss_error),
                ("hidden", hidden_error),
                ("weight", weight_error),
                ("bias", bias_error),
            ] {
                assert!(error <= bound, "{dtype:?} {layout:?} {what}: {error}");
            }
        }
    }

    // The allocator's reservation for one forward and backward of each, from a clean pool.
    let reserved = |chunked: bool| {
        <B as Backend>::memory_cleanup(&device);
        let hidden = Tensor::<B, 2>::from_data(
            TensorData::new(random(n * width, 4, 2.0), [n, width]),
            &device,
        )
        .require_grad();
        let weight = Tensor::<B, 2>::from_data(
            TensorData::new(random(width * vocab, 5, 0.5), [vocab, width]),
            &device,
        )
        .require_grad();
        let head = Head {
            weight: weight.clone(),
            layout: HeadLayout::VocabByHidden,
            bias: None,
        };
        let loss = match chunked {
            true => kernels::chunked_head_loss_train(hidden.clone(), head, ids(), -100, 64),
            false => composed_head_loss(hidden.clone(), &head, &targets),
        };
        let grads = loss.backward();
        let _ = (
            host(hidden.grad(&grads).unwrap()),
            host(weight.grad(&grads).unwrap()),
        );
        let usage = device_memory::usage(&device).expect("wgpu reports its allocator");
        usage.reserved
    };
    let composed = reserved(false);
    let chunked = reserved(true);
    let logits = (n * vocab * 4) as u64;
    eprintln!(
        "{n} rows × {vocab} vocabulary ({:.1} MB of f32 logits): allocator reserved {:.1} MB \
         for burn's composition, {:.1} MB in chunks of 64 rows",
        logits as f64 / 1e6,
        composed as f64 / 1e6,
        chunked as f64 / 1e6
    );
    // The allocator reserves 8 MiB pages at least, so the chunks' figure is that floor.
    assert!(
        chunked * 4 < composed,
        "chunked {chunked} bytes, composed {composed}, logits {logits}"
    );
}

/// One micro-batch's gradients per segment (embedding, blocks, head), from the ZeRO trainer on
/// one rank with the state on the host, every block checkpointed.
fn trainer_grads<B: AutodiffBackend, S: ZeroSpec<B>>(
    cut: (S, S::Embed, Vec<S::Block>, S::Head),
    batch: &S::Batch,
) -> Vec<Vec<f32>>
where
    B::Device: Default,
{
    let checkpoint = vec![true; cut.2.len()];
    trainer_grads_with(cut, batch, checkpoint, None)
}

/// [`trainer_grads`] with the blocks `checkpoint` names recomputed in backward, and dropout
/// seeded from `dropout_seed` (per step, micro-batch, rank and segment, as training seeds it).
fn trainer_grads_with<B: AutodiffBackend, S: ZeroSpec<B>>(
    (spec, embed, blocks, head): (S, S::Embed, Vec<S::Block>, S::Head),
    batch: &S::Batch,
    checkpoint: Vec<bool>,
    dropout_seed: Option<u64>,
) -> Vec<Vec<f32>>
where
    B::Device: Default,
{
    let options = ZeroOptions {
        checkpoint,
        ..ZeroOptions::checkpoint_all(blocks.len())
    };
    let device = Default::default();
    let mut trainer = ZeroTrainer::new(spec, SingleRank, device, embed, blocks, head, options);
    if let Some(seed) = dropout_seed {
        trainer.set_dropout_seed(seed);
    }
    trainer.forward_backward(batch).unwrap();
    std::iter::once(trainer.embed.grad.clone())
        .chain(trainer.blocks.iter().map(|b| b.grad.clone()))
        .chain(std::iter::once(trainer.head.grad.clone()))
        .collect()
}

/// A fixture's model on `B`, in f32 with dropout off.
fn fixture_model<B: Backend>(name: &str) -> models::AnyModel<B>
where
    B::Device: Default,
{
    fixture_model_with_dropout(name, 0.0)
}

/// A fixture's model on `B`, in f32 with every dropout at `dropout`.
fn fixture_model_with_dropout<B: Backend>(name: &str, dropout: f64) -> models::AnyModel<B>
where
    B::Device: Default,
{
    let options = LoadOptions {
        dropout: Some(dropout),
        ..Default::default()
    };
    load_model::<B>(&fixture(name), &Default::default(), &options)
        .unwrap()
        .model
}

/// The worst segment's largest gradient difference relative to its largest burn-flex value.
fn worst_segment(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len());
    let errors: Vec<f32> = got.iter().zip(want).map(|(g, w)| relative(g, w)).collect();
    eprintln!(
        "per segment: {:?}",
        errors
            .iter()
            .map(|e| format!("{e:.2e}"))
            .collect::<Vec<_>>()
    );
    errors.into_iter().fold(0.0, f32::max)
}

fn t5_cut<B: AutodiffBackend>(name: &str) -> (T5Spec, Cut<B, T5Spec>)
where
    B::Device: Default,
{
    let models::AnyModel::T5ForConditionalGeneration(model) = fixture_model::<B>(name) else {
        panic!("{name} is a T5ForConditionalGeneration");
    };
    let cut = T5Spec::split(model).unwrap();
    (cut.0.clone(), cut)
}

/// A model's ZeRO segments on `B` under spec `S`.
type Cut<B, S> = (
    S,
    <S as ZeroSpec<B>>::Embed,
    Vec<<S as ZeroSpec<B>>::Block>,
    <S as ZeroSpec<B>>::Head,
);

fn t5_batch<B: Backend>(name: &str) -> Seq2SeqBatch<B>
where
    B::Device: Default,
{
    let reference = reference(name);
    let device = Default::default();
    Seq2SeqBatch {
        input_ids: int_tensor(&reference, "input_ids", &device),
        attention_mask: Some(int_tensor(&reference, "attention_mask", &device)),
        decoder_input_ids: int_tensor(&reference, "decoder_input_ids", &device),
        labels: int_tensor(&reference, "labels", &device),
    }
}

/// Masked ids of the BERT fixture's vocabulary, a third of the positions scored, one row padded.
fn mlm_batch<B: Backend>() -> MlmBatch<B>
where
    B::Device: Default,
{
    let (rows, seq) = (3, 9);
    let (mut ids, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rows {
        for t in 0..seq {
            let id = ((r * 7 + t * 3 + t * t) % 300 + 5) as i64;
            let padded = r == rows - 1 && t >= seq - 2;
            let masked = (t + r) % 3 == 0 && !padded;
            ids.push(if masked { 4 } else { id });
            labels.push(if masked { id } else { -100 });
            mask.push(i64::from(!padded));
        }
    }
    let device = Default::default();
    let tensor =
        |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [rows, seq]), &device);
    MlmBatch {
        input_ids: tensor(ids),
        attention_mask: tensor(mask),
        token_type_ids: None,
        labels: tensor(labels),
    }
}

fn bert_mlm_cut<B: AutodiffBackend>() -> Cut<B, MlmSpec>
where
    B::Device: Default,
{
    bert_mlm_cut_with_dropout(0.0)
}

fn bert_mlm_cut_with_dropout<B: AutodiffBackend>(dropout: f64) -> Cut<B, MlmSpec>
where
    B::Device: Default,
{
    let models::AnyModel::BertForMaskedLM(model) =
        fixture_model_with_dropout::<B>("bert_mlm", dropout)
    else {
        panic!("bert_mlm is a BertForMaskedLM");
    };
    MlmSpec::split_bert(model)
}

/// The other LM heads that run in chunks on a GPU backend, end to end through the trainer:
/// T5 v1.0 (tied, its output scaled) and v1.1 (untied) seq2seq, BERT's masked LM (tied, with a
/// bias, most rows ignored). Their gradients on wgpu match burn-flex's (zoo's CPU kernels and
/// full logits, checked against transformers in `t5_train.rs` and `train_specs.rs`). BERT's
/// exact GELU also runs here: with burn's own GELU backward (the tanh approximation's
/// derivative) its gradients were 3.3e-4 off.
#[test]
fn t5_and_masked_lm_heads_train_on_wgpu_as_on_burn_flex() {
    let _turn = DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for name in ["t5", "t5_v1_1"] {
        let flex = trainer_grads(t5_cut::<CpuTrain>(name).1, &t5_batch(name));
        let wgpu = trainer_grads(t5_cut::<WgpuTrain>(name).1, &t5_batch(name));
        let error = worst_segment(&wgpu, &flex);
        eprintln!("{name} on wgpu: gradients within {error:.2e} of burn-flex (relative)");
        assert!(error <= 1e-4, "{name}: {error}");
    }
    let flex = trainer_grads(bert_mlm_cut::<CpuTrain>(), &mlm_batch());
    let wgpu = trainer_grads(bert_mlm_cut::<WgpuTrain>(), &mlm_batch());
    let error = worst_segment(&wgpu, &flex);
    eprintln!("bert_mlm on wgpu: gradients within {error:.2e} of burn-flex (relative)");
    assert!(error <= 1e-4, "bert_mlm: {error}");
}

/// Attention dropout in the flash kernels replays under block checkpointing: BERT's masked LM
/// with every dropout at 0.3 (attention's in the flash kernels, the hidden states' burn's) gives
/// the same gradients with every block recomputed in backward as without recomputation, the
/// masks regenerated from the segment's seed; and dropout is on (they differ from dropout 0's).
#[test]
fn flash_attention_dropout_replays_when_blocks_are_recomputed() {
    let _turn = DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let blocks = bert_mlm_cut_with_dropout::<WgpuTrain>(0.0).2.len();
    let run = |dropout: f64, checkpoint: bool| {
        trainer_grads_with(
            bert_mlm_cut_with_dropout::<WgpuTrain>(dropout),
            &mlm_batch(),
            vec![checkpoint; blocks],
            Some(0x5eed),
        )
    };
    let recomputed = run(0.3, true);
    let kept = run(0.3, false);
    let error = worst_segment(&recomputed, &kept);
    eprintln!("dropout 0.3, recomputed vs kept graphs: gradients within {error:.2e} (relative)");
    assert!(error <= 1e-5, "recomputed blocks drew other masks: {error}");
    let without = worst_segment(&run(0.0, true), &kept);
    eprintln!("dropout 0.3 against dropout 0: {without:.2e}");
    assert!(without > 1e-2, "dropout had no effect: {without}");
}
