//! Inner products and axpy for the attention kernels, with AVX2+FMA chosen at run time
//! (binaries may run on another x86-64 machine, so no `target-cpu=native`).

use crate::util::Float;

/// Element types with fast `dot` and `axpy`.
pub(crate) trait Vector: Float {
    fn dot(a: &[Self], b: &[Self]) -> Self;
    /// `y += alpha · x`
    fn axpy(alpha: Self, x: &[Self], y: &mut [Self]);
    /// Four inner products sharing `a`: one pass over `a`, one horizontal reduction.
    fn dot4(a: &[Self], b: [&[Self]; 4]) -> [Self; 4] {
        [
            Self::dot(a, b[0]),
            Self::dot(a, b[1]),
            Self::dot(a, b[2]),
            Self::dot(a, b[3]),
        ]
    }
    /// `y += Σ_r alpha[r] · x[r]`: one load and store of `y` for four rows.
    fn axpy4(alpha: [Self; 4], x: [&[Self]; 4], y: &mut [Self]) {
        for r in 0..4 {
            Self::axpy(alpha[r], x[r], y);
        }
    }
    /// `x ← exp(x − shift)` in place, with −∞ (and anything below the smallest normal result)
    /// giving exactly 0; returns the sum of the results. The softmax inner loop.
    fn exp_shift(x: &mut [Self], shift: Self) -> Self {
        let mut sum = Self::zero();
        for v in x.iter_mut() {
            *v = (*v - shift).exp();
            sum = sum + *v;
        }
        sum
    }
}

impl Vector for f64 {
    /// In eight running sums, which the compiler keeps in vector registers (one running sum
    /// would serialise every addition).
    #[inline]
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        let mut acc = [0f64; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f64 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] * y[k];
            }
        }
        acc.iter().sum::<f64>() + tail
    }
    #[inline]
    fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }
}

impl Vector for f32 {
    #[inline]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { avx2::dot(a, b) };
        }
        dot_scalar(a, b)
    }
    #[inline]
    fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { avx2::axpy(alpha, x, y) };
        }
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }
    #[inline]
    fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { avx2::dot4(a, b) };
        }
        [
            dot_scalar(a, b[0]),
            dot_scalar(a, b[1]),
            dot_scalar(a, b[2]),
            dot_scalar(a, b[3]),
        ]
    }
    #[inline]
    fn exp_shift(x: &mut [f32], shift: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512f() {
            // SAFETY: AVX-512F was detected on this CPU.
            return unsafe { avx512::exp_shift(x, shift) };
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { avx2::exp_shift(x, shift) };
        }
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = (*v - shift).exp();
            sum += *v;
        }
        sum
    }
    #[inline]
    fn axpy4(alpha: [f32; 4], x: [&[f32]; 4], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { avx2::axpy4(alpha, x, y) };
        }
        for r in 0..4 {
            Self::axpy(alpha[r], x[r], y);
        }
    }
}

/// Four independent accumulators so the scalar fallback still pipelines.
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; 4];
    let mut i = 0;
    while i + 4 <= n {
        for l in 0..4 {
            acc[l] += a[i + l] * b[i + l];
        }
        i += 4;
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    // std caches the CPUID result, so this is a load and a test.
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// AVX-512F: 16-lane exp for the softmaxes (`avx512`).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512f() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// The vector exp's constants, shared by `avx2::exp8` and `avx512::exp16` so that the two give
/// the same bits: inputs are clamped to [`EXP_LO`, `EXP_HI`] (below `EXP_LO` gives 0), reduced
/// by ln 2 split in two so that `n·LN2_HI` is exact, and `e^r` is the Taylor polynomial with
/// coefficients 1/k! for k = 7..0, in Horner order.
#[cfg(target_arch = "x86_64")]
const EXP_LO: f32 = -87.0;
#[cfg(target_arch = "x86_64")]
const EXP_HI: f32 = 88.0;
#[cfg(target_arch = "x86_64")]
const LN2_HI: f32 = 0.693_359_4;
#[cfg(target_arch = "x86_64")]
const LN2_LO: f32 = -2.121_944_4e-4;
#[cfg(target_arch = "x86_64")]
const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// Which vector paths spt-ops' own kernels take on this CPU (reported by the benchmarks).
pub fn simd_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return if has_avx512f() {
            "avx2+fma, avx512f exp"
        } else {
            "avx2+fma"
        };
    }
    "scalar"
}

/// The CPU's model name from `/proc/cpuinfo`, where there is one (reported by the benchmarks:
/// this project's machines change CPU between runs, and ratios compare where seconds do not).
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{EXP_HI, EXP_LO, EXP_TAYLOR, LN2_HI, LN2_LO};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let hi = _mm256_extractf128_ps(acc, 1);
        let lo = _mm256_castps256_ps128(acc);
        let s4 = _mm_add_ps(hi, lo);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        let mut s = _mm_cvtss_f32(s1);
        while i < n {
            s += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        s
    }

    /// Horizontal sum of one 8-lane register.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
        let n = b.iter().fold(a.len(), |n, x| n.min(x.len()));
        let pa = a.as_ptr();
        let pb = [b[0].as_ptr(), b[1].as_ptr(), b[2].as_ptr(), b[3].as_ptr()];
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let va = _mm256_loadu_ps(pa.add(i));
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(va, _mm256_loadu_ps(pb[r].add(i)), acc[r]);
            }
            i += 8;
        }
        let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
        while i < n {
            for r in 0..4 {
                out[r] += *pa.add(i) * *pb[r].add(i);
            }
            i += 1;
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy4(alpha: [f32; 4], x: [&[f32]; 4], y: &mut [f32]) {
        let n = x.iter().fold(y.len(), |n, r| n.min(r.len()));
        let py = y.as_mut_ptr();
        let px = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()];
        let va = [
            _mm256_set1_ps(alpha[0]),
            _mm256_set1_ps(alpha[1]),
            _mm256_set1_ps(alpha[2]),
            _mm256_set1_ps(alpha[3]),
        ];
        let mut i = 0;
        while i + 8 <= n {
            let mut acc = _mm256_loadu_ps(py.add(i));
            for r in 0..4 {
                acc = _mm256_fmadd_ps(va[r], _mm256_loadu_ps(px[r].add(i)), acc);
            }
            _mm256_storeu_ps(py.add(i), acc);
            i += 8;
        }
        while i < n {
            for r in 0..4 {
                *py.add(i) += alpha[r] * *px[r].add(i);
            }
            i += 1;
        }
    }

    /// `dst[c·ds + r] = src[r·ss + c]` for an 8 × 8 block: eight row loads, three rounds of
    /// shuffles, eight row stores.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn transpose8x8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
        // Pairs of rows interleaved, then quads, then the 128-bit halves swapped into place.
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for i in 0..4 {
            _mm256_storeu_ps(dst.add(i * ds), _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]));
            _mm256_storeu_ps(
                dst.add((i + 4) * ds),
                _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]),
            );
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
    }

    /// `x ← exp(x − shift)`, returning the sum. exp by range reduction, `x = n·ln 2 + r` with
    /// |r| ≤ ln 2 / 2, a degree-7 polynomial for `e^r` (relative error ~1e-7, within 2 ulp of
    /// libm on [−87, 0]) and `2^n` built in the exponent bits. Inputs below −87 (and −∞) give 0;
    /// NaN gives NaN.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shift(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let vshift = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vshift));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = hsum(acc);
        if i < n {
            // The tail through the same polynomial, so every element rounds the same way.
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..n - i].copy_from_slice(&x[i..]);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), vshift));
            _mm256_storeu_ps(buf.as_mut_ptr(), e);
            x[i..].copy_from_slice(&buf[..n - i]);
            sum += buf[..n - i].iter().sum::<f32>();
        }
        sum
    }

    /// e^x for 8 lanes; lanes below −87 (including −∞, masked scores) give 0, NaN stays NaN.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        // Unordered "not less than" keeps NaN lanes, and max / min return their second operand
        // when one is NaN: a diverged score must come out NaN, not as a masked 0.
        let keep = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_NLT_UQ);
        let x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x);
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(EXP_TAYLOR[0]);
        for c in &EXP_TAYLOR[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
        }
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        _mm256_and_ps(_mm256_mul_ps(y, pow2), keep)
    }
}

/// The softmax exp sixteen lanes at a time: the same operations as `avx2::exp8` lane for lane
/// (so each element is the same to the bit; a row's sum is added in another order), twice the
/// lanes per instruction. exp was 3.7 % of an SPT fast step's samples on an AVX-512 Xeon, 2.6 %
/// with this.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{EXP_HI, EXP_LO, EXP_TAYLOR, LN2_HI, LN2_LO};
    use std::arch::x86_64::*;

    /// `x ← exp(x − shift)`, returning the sum; see `avx2::exp_shift`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shift(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let vshift = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vshift));
            _mm512_storeu_ps(p.add(i), e);
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        if i < n {
            // The tail through the same polynomial; lanes past the end are neither stored nor
            // summed (x − shift is NaN there when shift is −∞).
            let m: __mmask16 = (1u16 << (n - i)) - 1;
            let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, p.add(i));
            let e = exp16(_mm512_sub_ps(v, vshift));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            acc = _mm512_mask_add_ps(acc, m, acc, e);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// e^x for 16 lanes; lanes below −87 (including −∞) give 0, NaN stays NaN.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP_LO));
        let x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
        let x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut y = _mm512_set1_ps(EXP_TAYLOR[0]);
        for c in &EXP_TAYLOR[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
        }
        let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        )));
        _mm512_maskz_mul_ps(keep, y, pow2)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every exp path against f64, and the AVX-512 path equal to the AVX2 one element for element,
    /// at lengths around both vector widths, with −∞, NaN and underflowing inputs.
    #[test]
    fn exp_shift_paths_agree_and_match_f64() {
        for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100] {
            let base: Vec<f32> = (0..n)
                .map(|i| match i % 11 {
                    3 => f32::NEG_INFINITY,
                    5 => -120.0,
                    _ => (i as f32 * 0.37).sin() * 20.0,
                })
                .collect();
            for shift in [0.0f32, 3.5, f32::NEG_INFINITY] {
                let mut paths = Vec::new();
                if has_avx2() {
                    let mut x = base.clone();
                    let s = unsafe { avx2::exp_shift(&mut x, shift) };
                    paths.push((x, s));
                }
                if has_avx512f() {
                    let mut x = base.clone();
                    let s = unsafe { avx512::exp_shift(&mut x, shift) };
                    paths.push((x, s));
                }
                for (x, s) in &paths {
                    let mut want_sum = 0f64;
                    for (&got, &b) in x.iter().zip(&base) {
                        // exp of the f32 difference the kernels form: the test is of exp.
                        let want = ((b - shift) as f64).exp();
                        if want.is_nan() {
                            assert!(got.is_nan(), "exp({b} - {shift}) = {got}, expected NaN");
                            want_sum = f64::NAN;
                            continue;
                        }
                        want_sum += want;
                        let tol = if b - shift < -87.0 { 1e-37 } else { 3e-7 * want };
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "exp({b} - {shift}) = {got}, want {want}"
                        );
                    }
                    if want_sum.is_nan() {
                        assert!(s.is_nan(), "sum {s}, expected NaN");
                    } else {
                        assert!(
                            (*s as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1.0),
                            "sum {s}, want {want_sum}"
                        );
                    }
                }
                if let [(a, _), (b, _)] = &paths[..] {
                    let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "n {n}, shift {shift}: AVX-512 and AVX2 exp differ");
                }
            }
        }
    }
}
