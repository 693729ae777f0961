//! AVX-512 versions of the kernels' loops, chosen at run time, and the branch-free `exp` and
//! normal CDF those loops need to vectorise.
//!
//! The workspace builds for baseline x86-64 (SSE2), so that one binary runs on any x86-64 CPU;
//! loops LLVM vectorises then use 4-lane vectors, and a call to libm's scalar `erff`/`expf`/
//! `tanhf` stops vectorisation altogether. [`avx512_version!`] compiles a loop a second time for
//! AVX-512 (16 lanes) and calls that copy when the CPU has it. Inside such loops the transcendental
//! functions are [`exp`] and [`normal_cdf`]: polynomials without branches, so they vectorise too.

use std::sync::OnceLock;

/// Whether the CPU runs the AVX-512 versions (x86-64-v4: AVX-512 F/BW/DQ/VL, AVX2, FMA).
pub(crate) fn has_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512f")
                && has!("avx512bw")
                && has!("avx512dq")
                && has!("avx512vl")
                && has!("avx2")
                && has!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines `fn name(args) -> ret { body }` whose body is compiled twice, for baseline x86-64
/// and for AVX-512, the second used when [`has_avx512`]. The body should be plain loops over
/// slices (and `#[inline(always)]` helpers), which LLVM vectorises for the features it is
/// compiled with.
macro_rules! avx512_version {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::kernels::simd::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` is compiled for (checked).
                    return unsafe { avx512($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use avx512_version;

/// `eˣ` without branches (vectorisable): `2ⁿ·e^r` with `r = x − n·ln 2`, `|r| ≤ ln2/2`, and a
/// degree-7 Taylor polynomial for `e^r` (relative error below 2e-7 against libm). Below -87
/// (where `eˣ` leaves the normal floats) it is 0; above 88 it stays at `e⁸⁸`.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let underflow = x < -87.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in float arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n sits in the low mantissa bits of `shifted`: integer arithmetic on the bits gives 2ⁿ
    // (`n as i32` would be a saturating conversion, which LLVM does lane by lane).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if underflow { 0.0 } else { p * scale }
}

/// `Σ x` in 16 interleaved partial sums, added up at the end: a fixed order (the same result
/// in both versions of a loop) that vectorises, where a sequential float sum cannot.
#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().chain(rest).fold(0.0, |total, v| total + v)
}

/// `Σ aᵢ·bᵢ`, summed as [`sum`] does.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (chunks_a, chunks_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest = chunks_a.remainder().iter().zip(chunks_b.remainder());
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for ((lane, x), y) in lanes.iter_mut().zip(ca).zip(cb) {
            *lane += x * y;
        }
    }
    let total = lanes.iter().fold(0.0, |total, v| total + v);
    rest.fold(total, |total, (x, y)| total + x * y)
}

/// `Φ(x)`, the standard normal CDF (`½·erfc(−x/√2)`), without branches: the erfc Chebyshev
/// fit of Numerical Recipes (§6.2, fractional error below 1.2e-7) on `|x|/√2`, reflected for
/// positive `x`. Absolute error against libm's `½(1 + erf(x/√2))` below 3e-7.
#[inline(always)]
pub(super) fn normal_cdf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    let half_erfc = 0.5 * t * exp(-z * z + poly);
    if x >= 0.0 { 1.0 - half_erfc } else { half_erfc }
}

/// `tanh(x) = 1 − 2/(e²ˣ + 1)` through [`exp`] (absolute error below 3e-7).
#[inline(always)]
pub(super) fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_cdf_and_tanh_match_libm() {
        let (mut worst_exp, mut worst_cdf, mut worst_tanh) = (0.0f64, 0.0f64, 0.0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4 * 8.0; // [-160, 160] for exp's clamp, fine steps near 0
            let e = libm::expf(x.min(88.0)) as f64;
            if x < -87.0 {
                assert_eq!(exp(x), 0.0);
            } else {
                worst_exp = worst_exp.max(((exp(x) as f64 - e) / e).abs());
            }
            let cdf = 0.5 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            worst_cdf = worst_cdf.max((normal_cdf(x) as f64 - cdf).abs());
            worst_tanh = worst_tanh.max((tanh(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst_exp < 2e-7, "exp relative error {worst_exp}");
        assert!(worst_cdf < 3e-7, "normal CDF absolute error {worst_cdf}");
        assert!(worst_tanh < 3e-7, "tanh absolute error {worst_tanh}");
        assert!(normal_cdf(f32::NAN).is_nan() && exp(f32::NAN).is_nan());
    }

    avx512_version! {
        fn sum_of_squares(x: &[f32]) -> f32 {
            x.iter().map(|v| v * v).sum()
        }
    }

    #[test]
    fn partial_sums_add_every_value() {
        let x: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 - 8.0).collect();
        let y: Vec<f32> = (0..1000).map(|i| (i % 5) as f32).collect();
        // Small integers: every order of summation gives the exact result.
        assert_eq!(sum(&x), x.iter().sum::<f32>());
        assert_eq!(
            dot(&x, &y),
            x.iter().zip(&y).map(|(a, b)| a * b).sum::<f32>()
        );
        assert_eq!(sum(&x[..7]), x[..7].iter().sum::<f32>());
    }

    #[test]
    fn both_versions_compute_the_same() {
        // Whichever version the CPU picks, the result is the plain loop's.
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let plain: f32 = x.iter().map(|v| v * v).sum();
        assert_eq!(sum_of_squares(&x), plain);
    }
}
