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
}

impl Vector for f64 {
    #[inline]
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
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
fn has_avx2() -> bool {
    // std caches the CPUID result, so this is a load and a test.
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Which inner-product path this CPU uses (reported by the benchmarks).
pub fn simd_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return "avx2+fma";
    }
    "scalar"
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
}
