//! The fused AdamW kernel (`kernels::fused_adamw`) on wgpu against the host loop.

use bmtrain_backend::Wgpu;
use bmtrain_backend::kernels::fused_adamw;
use bmtrain_backend::optim::{AdamWConfig, AdamWState, GradFactors};
use burn::tensor::{Tensor as BurnTensor, TensorData};

use super::{device_lock, random};

/// Three steps of the kernel on wgpu against the host loop ([`AdamWState::step`]) on the
/// same values, one of them with the gradient unscaled and clipped in the kernel:
/// bit-identical weights and moments.
#[test]
fn fused_adamw_on_wgpu_matches_the_host_loop() {
    let len = 10_007;
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let _device = device_lock();
    let mut host_params = random(len, 1, 1.0);
    let mut host = AdamWState::new(len);
    let device = Default::default();
    let upload =
        |v: &[f32]| BurnTensor::<Wgpu, 1>::from_data(TensorData::new(v.to_vec(), [len]), &device);
    let mut params = upload(&host_params);
    let mut exp_avg = upload(&vec![0.0; len]);
    let mut exp_avg_sq = upload(&vec![0.0; len]);
    // Step 2 reads a loss-scaled gradient and clips it, as the trainer's device step asks.
    let factors = |step: u64| match step {
        2 => GradFactors {
            divisor: 2048.0 * 3.0,
            coefficient: 0.37,
        },
        _ => GradFactors::default(),
    };
    for step in 1..=3u64 {
        let f = factors(step);
        let grads: Vec<f32> = random(len, 10 + step as u32, 0.1)
            .iter()
            .map(|g| g * f.divisor)
            .collect();
        // The host path: unscale, clip, then the step, each a pass of its own.
        let host_grads: Vec<f32> = grads
            .iter()
            .map(|g| g / f.divisor * f.coefficient)
            .collect();
        host.step(&config, &mut host_params, &host_grads, 1e-3, step);
        let [p, m, v] = fused_adamw(
            &params,
            &upload(&grads),
            (&exp_avg, &exp_avg_sq),
            &config,
            (1e-3, step),
            f,
        )
        .expect("the wgpu route");
        (params, exp_avg, exp_avg_sq) = (p, m, v);
    }
    let read = |t: BurnTensor<Wgpu, 1>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
    let diff = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
            / scale
    };
    let params_error = diff(&read(params), &host_params);
    let avg_error = diff(&read(exp_avg), &host.exp_avg);
    let avg_sq_error = diff(&read(exp_avg_sq), &host.exp_avg_sq);
    println!(
        "fused AdamW vs host after 3 steps: params {params_error:e}, moments {avg_error:e} / {avg_sq_error:e}"
    );
    // The same operations in the same order: the same bits.
    assert_eq!((params_error, avg_error, avg_sq_error), (0.0, 0.0, 0.0));
}
