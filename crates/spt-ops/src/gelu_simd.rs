//! GELU (erf and tanh forms) and its derivative over f32 slices, sixteen lanes at a time with
//! AVX-512F or eight with AVX2+FMA, chosen at run time like the rest of [`crate::simd`].
//!
//! libm's scalar `erff` was most of the FFN's elementwise time (perf: 2.7 % of a routed-FFN
//! step, ~3 % of an SPT step); PyTorch evaluates GELU vectorised too.
//!
//! erf, with z = x/√2, from one formula over the whole line: `erfc(|z|) = e^{−z²}·R(t)`,
//! t = 1/(1 + |z|/2), R a degree-9 polynomial fitted in relative error on [0, 10]
//! (`scripts/fit-erfc.py`: 2.4e-7 relative with f32 Horner). An earlier version used a Taylor
//! series below |z| = 0.875, and as every lane computed both branches, dropping it took the
//! sixteen-lane erf form from 0.51 to 0.41 ns per element forward and from 0.55 to 0.47
//! backward (one core, 32 Ki elements, interleaved), with the worst error against f64 level
//! (1.65e-7 against 1.61e-7 of max(1, |x|) forward, 1.79e-7 against 1.62e-7 derivative).
//!
//! `1 + erf(z)` is formed as `2 − erfc(|z|)` on the positive side and `erfc(|z|)` itself on the
//! negative side, so the left tail of GELU keeps its relative accuracy (the scalar `1 + erf`
//! loses it to cancellation). The tanh form uses `1 + tanh(u) = 2/(1 + e^{−2u})`, which has no
//! cancellation either. `e^{−z²}` serves both erfc and the derivative's density.

use crate::activation::Activation;
use crate::simd::avx2::exp8;
use crate::simd::has_avx512f;
use std::arch::x86_64::*;

/// R(t) = erfc(z)·e^{z²}, t = 1/(1 + z/2): coefficients of t⁰..t⁹ (`scripts/fit-erfc.py`).
const ERFC: [f32; 10] = [
    -6.013_469_4e-6,
    0.282_221_4,
    0.281_098_57,
    0.249_790_97,
    0.181_263_79,
    0.017_037_125,
    0.221_26,
    -0.441_546_47,
    0.263_940_3,
    -0.055_059_724,
];
const GELU_C: f32 = 0.044_715;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// 1/√(2π): the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The GELU forms this module vectorises; `None` for activations it leaves to the scalar path.
#[derive(Clone, Copy)]
pub(crate) enum Gelu {
    Erf,
    Tanh,
}

impl Gelu {
    pub(crate) fn of(act: Activation) -> Option<Self> {
        match act {
            Activation::GeluErf => Some(Self::Erf),
            Activation::GeluTanh => Some(Self::Tanh),
            Activation::Relu => None,
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn horner(x: __m256, coeffs: &[f32]) -> __m256 {
    let (last, rest) = coeffs.split_last().expect("non-empty coefficients");
    let mut y = _mm256_set1_ps(*last);
    for &c in rest.iter().rev() {
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
    }
    y
}

/// `(1 + erf(x/√2), e^{−x²/2})` per lane.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn erf_cdf2(x: __m256) -> (__m256, __m256) {
    let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let az = _mm256_andnot_ps(_mm256_set1_ps(-0.0), z);
    let z2 = _mm256_mul_ps(az, az);
    // SAFETY: AVX2 and FMA are enabled for this function.
    let e = unsafe { exp8(_mm256_sub_ps(_mm256_setzero_ps(), z2)) };
    let one = _mm256_set1_ps(1.0);
    let t = _mm256_div_ps(one, _mm256_fmadd_ps(az, _mm256_set1_ps(0.5), one));
    let erfc = _mm256_mul_ps(e, horner(t, &ERFC));
    let positive = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ);
    (
        _mm256_blendv_ps(erfc, _mm256_sub_ps(_mm256_set1_ps(2.0), erfc), positive),
        e,
    )
}

/// `(1 + tanh(u), e^{−2u}, du/dx)` with u = √(2/π)(x + c·x³).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tanh_s(x: __m256) -> (__m256, __m256, __m256) {
    let x2 = _mm256_mul_ps(x, x);
    let k = _mm256_set1_ps(SQRT_2_OVER_PI);
    let inner = _mm256_fmadd_ps(_mm256_set1_ps(GELU_C), x2, _mm256_set1_ps(1.0));
    let u = _mm256_mul_ps(k, _mm256_mul_ps(x, inner));
    // SAFETY: AVX2 and FMA are enabled for this function.
    let e = unsafe { exp8(_mm256_mul_ps(u, _mm256_set1_ps(-2.0))) };
    let s = _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(_mm256_set1_ps(1.0), e));
    let du = _mm256_mul_ps(
        k,
        _mm256_fmadd_ps(_mm256_set1_ps(3.0 * GELU_C), x2, _mm256_set1_ps(1.0)),
    );
    (s, e, du)
}

/// `(gelu(x), gelu'(x))` per lane; a caller that uses one of them leaves the other's
/// operations to the optimiser.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn both8(kind: Gelu, x: __m256) -> (__m256, __m256) {
    let half = _mm256_set1_ps(0.5);
    let hx = _mm256_mul_ps(half, x);
    match kind {
        Gelu::Erf => {
            // Φ(x) + x·φ(x)
            // SAFETY: AVX2 and FMA are enabled for this function.
            let (s, e) = unsafe { erf_cdf2(x) };
            let pdf = _mm256_mul_ps(e, _mm256_set1_ps(INV_SQRT_2PI));
            (
                _mm256_mul_ps(hx, s),
                _mm256_fmadd_ps(x, pdf, _mm256_mul_ps(half, s)),
            )
        }
        Gelu::Tanh => {
            // ½(1 + t) + ½x(1 − t²)u', with 1 − t² = s²·e^{−2u} for s = 1 + t (no cancellation).
            // SAFETY: AVX2 and FMA are enabled for this function.
            let (s, e, du) = unsafe { tanh_s(x) };
            let one_minus_t2 = _mm256_mul_ps(_mm256_mul_ps(s, s), e);
            let d = _mm256_fmadd_ps(_mm256_mul_ps(hx, one_minus_t2), du, _mm256_mul_ps(half, s));
            (_mm256_mul_ps(hx, s), d)
        }
    }
}

/// `out[i] = gelu(x[i])`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
pub(crate) unsafe fn forward(kind: Gelu, x: &[f32], out: &mut [f32]) {
    if has_avx512f() {
        // SAFETY: AVX-512F was detected.
        unsafe { avx512::forward(kind, x, out) }
    } else {
        // SAFETY: AVX2 and FMA are the caller's contract.
        unsafe { forward_avx2(kind, x, out) }
    }
}

/// `g[i] · gelu'(x[i])` into `out[i]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
pub(crate) unsafe fn backward(kind: Gelu, x: &[f32], g: &[f32], out: &mut [f32]) {
    if has_avx512f() {
        // SAFETY: AVX-512F was detected.
        unsafe { avx512::backward(kind, x, g, out) }
    } else {
        // SAFETY: AVX2 and FMA are the caller's contract.
        unsafe { backward_avx2(kind, x, g, out) }
    }
}

/// `y[i] = gelu(x[i])` and `d[i] = gelu'(x[i])` in one pass: the routed FFN's backward needs
/// both of the pre-activation it kept, and the two share erf (or tanh) and its exponential.
/// The same bits as [`forward`] and [`backward`] with `g = 1`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
pub(crate) unsafe fn value_and_grad(kind: Gelu, x: &[f32], y: &mut [f32], d: &mut [f32]) {
    if has_avx512f() {
        // SAFETY: AVX-512F was detected.
        unsafe { avx512::value_and_grad(kind, x, y, d) }
    } else {
        // SAFETY: AVX2 and FMA are the caller's contract.
        unsafe { value_and_grad_avx2(kind, x, y, d) }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(kind: Gelu, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "gelu: input and output lengths");
    let mut xs = x.chunks_exact(8);
    let mut os = out.chunks_exact_mut(8);
    for (x, o) in (&mut xs).zip(&mut os) {
        // SAFETY: both chunks hold exactly 8 f32; AVX2 is enabled here.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), both8(kind, _mm256_loadu_ps(x.as_ptr())).0) };
    }
    let (x, o) = (xs.remainder(), os.into_remainder());
    if !x.is_empty() {
        // The tail through the same lanes, so every element rounds the same way.
        let mut buf = [0f32; 8];
        buf[..x.len()].copy_from_slice(x);
        // SAFETY: buf holds 8 f32; AVX2 is enabled here.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), both8(kind, _mm256_loadu_ps(buf.as_ptr())).0) };
        o.copy_from_slice(&buf[..x.len()]);
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(kind: Gelu, x: &[f32], g: &[f32], out: &mut [f32]) {
    assert!(
        x.len() == g.len() && x.len() == out.len(),
        "gelu backward: input, gradient and output lengths"
    );
    let mut xs = x.chunks_exact(8);
    let mut gs = g.chunks_exact(8);
    let mut os = out.chunks_exact_mut(8);
    for ((x, g), o) in (&mut xs).zip(&mut gs).zip(&mut os) {
        // SAFETY: the chunks hold exactly 8 f32; AVX2 is enabled here.
        unsafe {
            let r = _mm256_mul_ps(
                _mm256_loadu_ps(g.as_ptr()),
                both8(kind, _mm256_loadu_ps(x.as_ptr())).1,
            );
            _mm256_storeu_ps(o.as_mut_ptr(), r);
        }
    }
    let (x, g, o) = (xs.remainder(), gs.remainder(), os.into_remainder());
    if !x.is_empty() {
        let (mut bx, mut bg) = ([0f32; 8], [0f32; 8]);
        bx[..x.len()].copy_from_slice(x);
        bg[..g.len()].copy_from_slice(g);
        // SAFETY: the buffers hold 8 f32; AVX2 is enabled here.
        unsafe {
            let r = _mm256_mul_ps(
                _mm256_loadu_ps(bg.as_ptr()),
                both8(kind, _mm256_loadu_ps(bx.as_ptr())).1,
            );
            _mm256_storeu_ps(bx.as_mut_ptr(), r);
        }
        o.copy_from_slice(&bx[..x.len()]);
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn value_and_grad_avx2(kind: Gelu, x: &[f32], y: &mut [f32], d: &mut [f32]) {
    assert!(
        x.len() == y.len() && x.len() == d.len(),
        "gelu value and gradient: input and output lengths"
    );
    let mut xs = x.chunks_exact(8);
    let mut ys = y.chunks_exact_mut(8);
    let mut ds = d.chunks_exact_mut(8);
    for ((x, y), d) in (&mut xs).zip(&mut ys).zip(&mut ds) {
        // SAFETY: the chunks hold exactly 8 f32; AVX2 is enabled here.
        unsafe {
            let (v, dv) = both8(kind, _mm256_loadu_ps(x.as_ptr()));
            _mm256_storeu_ps(y.as_mut_ptr(), v);
            _mm256_storeu_ps(d.as_mut_ptr(), dv);
        }
    }
    let (x, y, d) = (xs.remainder(), ys.into_remainder(), ds.into_remainder());
    if !x.is_empty() {
        let (mut bx, mut by) = ([0f32; 8], [0f32; 8]);
        bx[..x.len()].copy_from_slice(x);
        // SAFETY: the buffers hold 8 f32; AVX2 is enabled here.
        unsafe {
            let (v, dv) = both8(kind, _mm256_loadu_ps(bx.as_ptr()));
            _mm256_storeu_ps(by.as_mut_ptr(), v);
            _mm256_storeu_ps(bx.as_mut_ptr(), dv);
        }
        y.copy_from_slice(&by[..x.len()]);
        d.copy_from_slice(&bx[..x.len()]);
    }
}

/// The same operations sixteen lanes at a time, lane for lane as the AVX2 code above (a test
/// checks the bits). The eight-lane code, compiled with AVX-512VL's 32 registers, was 4.5 + 2.3 %
/// of the routed FFN op's samples on an AVX-512 Xeon; this takes 0.76–0.96 ns per element
/// forward against 1.10–1.36, and 0.82–1.14 backward against 1.20–1.40 (erf form, 2²⁰ elements,
/// one core, interleaved rounds). Not measured on Zen 4, which runs 512-bit operations as two
/// halves and where the VL copy was ~22 % faster than plain AVX2.
mod avx512 {
    use super::{Gelu, ERFC, GELU_C, INV_SQRT_2PI, SQRT_2_OVER_PI};
    use crate::simd::avx512::exp16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn horner(x: __m512, coeffs: &[f32]) -> __m512 {
        let (last, rest) = coeffs.split_last().expect("non-empty coefficients");
        let mut y = _mm512_set1_ps(*last);
        for &c in rest.iter().rev() {
            y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
        }
        y
    }

    /// See `super::erf_cdf2`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn erf_cdf2(x: __m512) -> (__m512, __m512) {
        let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let az = _mm512_abs_ps(z);
        let z2 = _mm512_mul_ps(az, az);
        // SAFETY: AVX-512F is enabled for this function.
        let e = unsafe { exp16(_mm512_sub_ps(_mm512_setzero_ps(), z2)) };
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(az, _mm512_set1_ps(0.5), one));
        let erfc = _mm512_mul_ps(e, horner(t, &ERFC));
        let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
        (
            _mm512_mask_blend_ps(positive, erfc, _mm512_sub_ps(_mm512_set1_ps(2.0), erfc)),
            e,
        )
    }

    /// See `super::tanh_s`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tanh_s(x: __m512) -> (__m512, __m512, __m512) {
        let x2 = _mm512_mul_ps(x, x);
        let k = _mm512_set1_ps(SQRT_2_OVER_PI);
        let inner = _mm512_fmadd_ps(_mm512_set1_ps(GELU_C), x2, _mm512_set1_ps(1.0));
        let u = _mm512_mul_ps(k, _mm512_mul_ps(x, inner));
        // SAFETY: AVX-512F is enabled for this function.
        let e = unsafe { exp16(_mm512_mul_ps(u, _mm512_set1_ps(-2.0))) };
        let s = _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(_mm512_set1_ps(1.0), e));
        let du = _mm512_mul_ps(
            k,
            _mm512_fmadd_ps(_mm512_set1_ps(3.0 * GELU_C), x2, _mm512_set1_ps(1.0)),
        );
        (s, e, du)
    }

    /// See `super::both8`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn both16(kind: Gelu, x: __m512) -> (__m512, __m512) {
        let half = _mm512_set1_ps(0.5);
        let hx = _mm512_mul_ps(half, x);
        match kind {
            Gelu::Erf => {
                // SAFETY: AVX-512F is enabled for this function.
                let (s, e) = unsafe { erf_cdf2(x) };
                let pdf = _mm512_mul_ps(e, _mm512_set1_ps(INV_SQRT_2PI));
                (
                    _mm512_mul_ps(hx, s),
                    _mm512_fmadd_ps(x, pdf, _mm512_mul_ps(half, s)),
                )
            }
            Gelu::Tanh => {
                // SAFETY: AVX-512F is enabled for this function.
                let (s, e, du) = unsafe { tanh_s(x) };
                let one_minus_t2 = _mm512_mul_ps(_mm512_mul_ps(s, s), e);
                let d = _mm512_fmadd_ps(_mm512_mul_ps(hx, one_minus_t2), du, _mm512_mul_ps(half, s));
                (_mm512_mul_ps(hx, s), d)
            }
        }
    }

    /// Lanes `i..min(i + 16, n)`: all sixteen, or the tail's (the rest read as 0, not stored).
    fn lanes(i: usize, n: usize) -> __mmask16 {
        (((1u32 << (n - i).min(16)) - 1) & 0xffff) as __mmask16
    }

    /// See `super::forward`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward(kind: Gelu, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), out.len(), "gelu: input and output lengths");
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        for i in (0..x.len()).step_by(16) {
            let m = lanes(i, x.len());
            // SAFETY: the mask keeps every access inside both slices; AVX-512F is enabled.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, xp.add(i));
                _mm512_mask_storeu_ps(op.add(i), m, both16(kind, v).0);
            }
        }
    }

    /// See `super::backward`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn backward(kind: Gelu, x: &[f32], g: &[f32], out: &mut [f32]) {
        assert!(
            x.len() == g.len() && x.len() == out.len(),
            "gelu backward: input, gradient and output lengths"
        );
        let (xp, gp, op) = (x.as_ptr(), g.as_ptr(), out.as_mut_ptr());
        for i in (0..x.len()).step_by(16) {
            let m = lanes(i, x.len());
            // SAFETY: the mask keeps every access inside the three slices; AVX-512F is enabled.
            unsafe {
                let (v, gv) = (
                    _mm512_maskz_loadu_ps(m, xp.add(i)),
                    _mm512_maskz_loadu_ps(m, gp.add(i)),
                );
                _mm512_mask_storeu_ps(op.add(i), m, _mm512_mul_ps(gv, both16(kind, v).1));
            }
        }
    }

    /// See `super::value_and_grad`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn value_and_grad(kind: Gelu, x: &[f32], y: &mut [f32], d: &mut [f32]) {
        assert!(
            x.len() == y.len() && x.len() == d.len(),
            "gelu value and gradient: input and output lengths"
        );
        let (xp, yp, dp) = (x.as_ptr(), y.as_mut_ptr(), d.as_mut_ptr());
        for i in (0..x.len()).step_by(16) {
            let m = lanes(i, x.len());
            // SAFETY: the mask keeps every access inside the three slices; AVX-512F is enabled.
            unsafe {
                let (v, dv) = both16(kind, _mm512_maskz_loadu_ps(m, xp.add(i)));
                _mm512_mask_storeu_ps(yp.add(i), m, v);
                _mm512_mask_storeu_ps(dp.add(i), m, dv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{has_avx2, has_avx512f};

    /// Every x in [−12, 12] at steps of 1/1024, plus special values.
    fn grid() -> Vec<f32> {
        let mut v: Vec<f32> = (-12 * 1024..=12 * 1024).map(|i| i as f32 / 1024.0).collect();
        v.extend([1e-30, -1e-30, 3e-8, 30.0, -30.0]);
        v
    }

    /// Within `tol · max(1, |x|)` of f64 for GELU and its derivative, and no worse than twice the
    /// scalar f32 path it replaces (which rounds `1 + erf` to f32, ~6e-8 of 1).
    #[test]
    fn matches_f64_gelu_and_derivative() {
        if !has_avx2() {
            eprintln!("no AVX2+FMA on this CPU: the scalar path is what runs (tested elsewhere)");
            return;
        }
        let x = grid();
        let g: Vec<f32> = (0..x.len()).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect();
        for (act, kind) in [
            (Activation::GeluErf, Gelu::Erf),
            (Activation::GeluTanh, Gelu::Tanh),
        ] {
            let mut y = vec![0f32; x.len()];
            let mut dx = vec![0f32; x.len()];
            // SAFETY: AVX2 and FMA were detected above.
            unsafe {
                forward(kind, &x, &mut y);
                backward(kind, &x, &g, &mut dx);
            }
            // [simd forward, simd derivative, scalar forward, scalar derivative]
            let mut worst = [0f64; 4];
            for i in 0..x.len() {
                let (ey, ed) = (act.eval(x[i] as f64), g[i] as f64 * act.derivative(x[i] as f64));
                let scalar_d = g[i] * act.derivative(x[i]);
                let scale = (x[i].abs() as f64).max(1.0);
                for (w, got, want) in [
                    (0, y[i], ey),
                    (1, dx[i], ed),
                    (2, act.eval(x[i]), ey),
                    (3, scalar_d, ed),
                ] {
                    // Not f64::max, which passes NaN over.
                    let e = (got as f64 - want).abs() / scale;
                    if e.is_nan() || e > worst[w] {
                        worst[w] = e;
                    }
                }
            }
            assert!(worst[0] < 2e-7, "{act:?} forward off by {:e}", worst[0]);
            assert!(worst[1] < 1e-6, "{act:?} derivative off by {:e}", worst[1]);
            for (simd, scalar, what) in [(0, 2, "forward"), (1, 3, "derivative")] {
                assert!(
                    worst[simd] <= 2.0 * worst[scalar].max(1.2e-7),
                    "{act:?} {what}: {:e}, scalar f32 {:e}",
                    worst[simd],
                    worst[scalar]
                );
            }
        }
    }

    /// The left tail keeps relative accuracy where `1 + erf` in f32 cancels to zero (the scalar
    /// path returns 0 from x ≈ −5.5 on); the rounding of z² in `e^{−z²}` costs some of it.
    #[test]
    fn left_tail_is_relatively_accurate() {
        if !has_avx2() {
            return;
        }
        let x: Vec<f32> = (0..=64).map(|i| -4.0 - i as f32 / 8.0).collect(); // −4 … −12
        let mut y = vec![0f32; x.len()];
        // SAFETY: AVX2 and FMA were detected above.
        unsafe { forward(Gelu::Erf, &x, &mut y) };
        for (&x, &y) in x.iter().zip(&y) {
            // ½·x·erfc(−x/√2): f64's `1 + erf` would cancel here too.
            let x64 = x as f64;
            let e = 0.5 * x64 * candle_core::cpu::erf::erfc_f64(-x64 * std::f64::consts::FRAC_1_SQRT_2);
            assert!(((y as f64 - e) / e).abs() < 2e-5, "gelu({x}) = {y}, f64 {e}");
        }
    }

    /// One pass for both gives the bits of the two passes, gradient taken with g = 1, at
    /// every length from 1 to 40 and over the grid with ±∞, NaN and ±0.
    #[test]
    fn value_and_grad_is_forward_and_backward() {
        if !has_avx2() {
            return;
        }
        let mut x = grid();
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for kind in [Gelu::Erf, Gelu::Tanh] {
            for n in (1..=40).chain([x.len()]) {
                let x = &x[x.len() - n..];
                let ones = vec![1f32; n];
                let [mut y, mut d, mut y1, mut d1] = std::array::from_fn(|_| vec![0f32; n]);
                // SAFETY: AVX2 and FMA were detected above.
                unsafe {
                    value_and_grad(kind, x, &mut y, &mut d);
                    forward(kind, x, &mut y1);
                    backward(kind, x, &ones, &mut d1);
                }
                assert_eq!(bits(&y), bits(&y1), "value, length {n}");
                assert_eq!(bits(&d), bits(&d1), "gradient, length {n}");
            }
        }
    }

    /// Lengths that are not multiples of 8 give the same values as the full lanes.
    #[test]
    fn tails_match_full_lanes() {
        if !has_avx2() {
            return;
        }
        let x: Vec<f32> = (0..29).map(|i| i as f32 * 0.37 - 5.0).collect();
        let g = vec![1.5f32; 29];
        let (mut full, mut full_d) = (vec![0f32; 29], vec![0f32; 29]);
        // SAFETY: AVX2 and FMA were detected above.
        unsafe {
            forward(Gelu::Erf, &x, &mut full);
            backward(Gelu::Erf, &x, &g, &mut full_d);
        }
        for n in 1..29 {
            let (mut y, mut d) = (vec![0f32; n], vec![0f32; n]);
            // SAFETY: as above.
            unsafe {
                forward(Gelu::Erf, &x[29 - n..], &mut y);
                backward(Gelu::Erf, &x[29 - n..], &g[29 - n..], &mut d);
            }
            assert_eq!(y, full[29 - n..], "forward, length {n}");
            assert_eq!(d, full_d[29 - n..], "backward, length {n}");
        }
    }

    /// The AVX-512 code (what the other tests run on such a CPU) and the AVX2 code give the same
    /// bits, at every length from 1 to 40 (full vectors and tails of both widths), so the tests
    /// above hold for both.
    #[test]
    fn both_widths_agree_bit_for_bit() {
        if !has_avx2() || !has_avx512f() {
            eprintln!("this CPU runs one width only (no AVX2 or no AVX-512F): nothing to compare");
            return;
        }
        let mut x = grid();
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
        let g: Vec<f32> = (0..x.len()).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for kind in [Gelu::Erf, Gelu::Tanh] {
            for n in (1..=40).chain([x.len()]) {
                let (x, g) = (&x[x.len() - n..], &g[g.len() - n..]);
                let mut out = [vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]];
                // SAFETY: AVX2, FMA and AVX-512F were detected above.
                unsafe {
                    forward_avx2(kind, x, &mut out[0]);
                    avx512::forward(kind, x, &mut out[1]);
                    backward_avx2(kind, x, g, &mut out[2]);
                    avx512::backward(kind, x, g, &mut out[3]);
                }
                assert_eq!(bits(&out[0]), bits(&out[1]), "forward, length {n}");
                assert_eq!(bits(&out[2]), bits(&out[3]), "backward, length {n}");
                let mut both = [vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]];
                let [y2, d2, y5, d5] = &mut both;
                // SAFETY: as above.
                unsafe {
                    value_and_grad_avx2(kind, x, y2, d2);
                    avx512::value_and_grad(kind, x, y5, d5);
                }
                assert_eq!(bits(y2), bits(y5), "value, length {n}");
                assert_eq!(bits(d2), bits(d5), "gradient, length {n}");
            }
        }
    }

    #[test]
    fn non_finite_inputs_follow_the_formula() {
        if !has_avx2() {
            return;
        }
        let x = [f32::INFINITY, f32::NAN, 0.0, -0.0];
        let mut y = [0f32; 4];
        // SAFETY: AVX2 and FMA were detected above.
        unsafe { forward(Gelu::Erf, &x, &mut y) };
        assert_eq!(y[0], f32::INFINITY);
        assert!(y[1].is_nan());
        assert_eq!((y[2], y[3]), (0.0, 0.0));
    }
}
