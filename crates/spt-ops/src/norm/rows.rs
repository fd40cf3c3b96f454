//! One row of layer normalisation, forward and backward, shared by `layer_norm` and
//! `residual_layer_norm`.
//!
//! Row sums are kept in [`LANES`] independent partial sums, combined in a fixed tree: with a
//! single running sum every element waits for the previous add (~4 cycles), which made these
//! kernels latency-bound. The order is fixed, so results do not depend on the thread count or the
//! CPU.
//!
//! The generic code serves f64 (gradient checks). f32 runs [`avx2`]'s kernels where the CPU has
//! AVX2: the compiler split the generic lanes into SSE pieces and scalar loads (perf annotate),
//! and the crate builds for baseline x86-64. They keep the generic code's order of operations
//! (two registers of eight lanes, the same reduction tree, no FMA), so f32 gives the same bits
//! on either path; a test compares them.

use crate::util::Float;

/// Element types with layer-norm row kernels: the generic ones by default.
pub(super) trait Rows: Float {
    /// The row's mean and reciprocal standard deviation (biased variance).
    fn stats(row: &[Self], eps: f64) -> (Self, Self) {
        stats(row, eps)
    }
    /// `y = (x − mean)·rstd·g + b`.
    fn normalize_from(y: &mut [Self], x: &[Self], st: (Self, Self), g: &[Self], b: &[Self]) {
        normalize_from(y, x, st, g, b)
    }
    /// [`Rows::normalize_from`] in place.
    fn normalize(y: &mut [Self], st: (Self, Self), g: &[Self], b: &[Self]) {
        normalize(y, st, g, b)
    }
    /// See [`backward`].
    fn backward(
        dx: &mut [Self],
        x: &[Self],
        dy: &[Self],
        g: &[Self],
        st: (Self, Self),
        params: Option<(&mut [Self], &mut [Self])>,
    ) {
        backward(dx, x, dy, g, st, params)
    }
}

impl Rows for f64 {}

impl Rows for f32 {
    fn stats(row: &[f32], eps: f64) -> (f32, f32) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // SAFETY: AVX2 was detected on this CPU.
            return unsafe { avx2::stats(row, eps) };
        }
        stats(row, eps)
    }
    fn normalize_from(y: &mut [f32], x: &[f32], st: (f32, f32), g: &[f32], b: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            assert!(x.len() == y.len() && g.len() == y.len() && b.len() == y.len());
            // SAFETY: AVX2 was detected; all four rows have y's length (asserted).
            return unsafe { avx2::normalize(x.as_ptr(), y.as_mut_ptr(), y.len(), st, g, b) };
        }
        normalize_from(y, x, st, g, b)
    }
    fn normalize(y: &mut [f32], st: (f32, f32), g: &[f32], b: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            assert!(g.len() == y.len() && b.len() == y.len());
            let p = y.as_mut_ptr();
            // SAFETY: AVX2 was detected; the rows have y's length, and each element is read
            // before it is written in place.
            return unsafe { avx2::normalize(p, p, y.len(), st, g, b) };
        }
        normalize(y, st, g, b)
    }
    fn backward(
        dx: &mut [f32],
        x: &[f32],
        dy: &[f32],
        g: &[f32],
        st: (f32, f32),
        params: Option<(&mut [f32], &mut [f32])>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // SAFETY: AVX2 was detected on this CPU.
            return unsafe { avx2::backward(dx, x, dy, g, st, params) };
        }
        backward(dx, x, dy, g, st, params)
    }
}

/// Partial sums per row reduction.
const LANES: usize = 16;

/// The lanes' total, added pairwise in a fixed order.
#[inline(always)]
fn total<T: Float>(mut acc: [T; LANES]) -> T {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            acc[k] = acc[k] + acc[k + w];
        }
    }
    acc[0]
}

/// `Σ f(v)` over a row: lanes for the whole chunks, then the tail in order.
#[inline(always)]
fn lane_sum<T: Float>(row: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] = acc[k] + f(c[k]);
        }
    }
    chunks.remainder().iter().fold(total(acc), |s, &v| s + f(v))
}

/// [`Rows::stats`], generic.
#[inline]
fn stats<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::lit(row.len() as f64);
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, (var + T::lit(eps)).sqrt().recip())
}

/// `y = (y − mean)·rstd·g + b`, in place.
#[inline]
fn normalize<T: Float>(y: &mut [T], (mean, rstd): (T, T), g: &[T], b: &[T]) {
    for ((y, &g), &b) in y.iter_mut().zip(g).zip(b) {
        *y = (*y - mean) * rstd * g + b;
    }
}

/// `y = (x − mean)·rstd·g + b`.
#[inline]
fn normalize_from<T: Float>(y: &mut [T], x: &[T], (mean, rstd): (T, T), g: &[T], b: &[T]) {
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
        *y = (x - mean) * rstd * g + b;
    }
}

/// The backward of one row whose input was `x` (statistics `mean`, `rstd`): writes
/// `dx = rstd·(dy ⊙ g − mean(dy ⊙ g) − x̂·mean(dy ⊙ g ⊙ x̂))` and, when `params` holds the
/// parameter gradients' accumulators `(dg, db)`, adds `dy ⊙ x̂` and `dy` to them (frozen
/// parameters, as in LoRA fine-tuning, skip that pass).
#[inline]
fn backward<T: Float>(
    dx: &mut [T],
    x: &[T],
    dy: &[T],
    g: &[T],
    (mean, rstd): (T, T),
    params: Option<(&mut [T], &mut [T])>,
) {
    let d = x.len();
    let (mut s1, mut s2) = ([T::zero(); LANES], [T::zero(); LANES]);
    let whole = d - d % LANES;
    for ((x, dy), g) in x[..whole]
        .chunks_exact(LANES)
        .zip(dy[..whole].chunks_exact(LANES))
        .zip(g[..whole].chunks_exact(LANES))
    {
        for k in 0..LANES {
            let gd = dy[k] * g[k];
            s1[k] = s1[k] + gd;
            s2[k] = s2[k] + gd * ((x[k] - mean) * rstd);
        }
    }
    let (mut sum_gd, mut sum_gd_xhat) = (total(s1), total(s2));
    for j in whole..d {
        let gd = dy[j] * g[j];
        sum_gd = sum_gd + gd;
        sum_gd_xhat = sum_gd_xhat + gd * ((x[j] - mean) * rstd);
    }
    if let Some((dg, db)) = params {
        for (((dg, db), &x), &dy) in dg.iter_mut().zip(db.iter_mut()).zip(x).zip(dy) {
            *dg = *dg + dy * ((x - mean) * rstd);
            *db = *db + dy;
        }
    }
    let inv_d = T::lit(1.0 / d as f64);
    let (m1, m2) = (sum_gd * inv_d, sum_gd_xhat * inv_d);
    for (((dx, &x), &dy), &g) in dx.iter_mut().zip(x).zip(dy).zip(g) {
        *dx = rstd * (dy * g - m1 - (x - mean) * rstd * m2);
    }
}

/// The f32 row kernels in AVX2: lanes 0..8 of the generic code's [`LANES`] partial sums in one
/// register and 8..16 in another, every operation in the generic code's order.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// The two registers' lanes combined in [`super::total`]'s tree: `k + 8`, `k + 4`, `k + 2`,
    /// `k + 1`.
    #[target_feature(enable = "avx2")]
    fn total(a: __m256, b: __m256) -> f32 {
        let v = _mm256_add_ps(a, b);
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let r = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps::<1>(r, r)))
    }

    /// One chunk's two halves.
    #[target_feature(enable = "avx2")]
    fn load(c: &[f32; LANES]) -> (__m256, __m256) {
        // SAFETY: the chunk holds 16 f32, so both 8-lane reads are in bounds.
        unsafe { (_mm256_loadu_ps(c.as_ptr()), _mm256_loadu_ps(c.as_ptr().add(8))) }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn stats(row: &[f32], eps: f64) -> (f32, f32) {
        let n = row.len() as f64 as f32;
        let (chunks, tail) = row.as_chunks::<LANES>();
        let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in chunks {
            let (lo, hi) = load(c);
            (a, b) = (_mm256_add_ps(a, lo), _mm256_add_ps(b, hi));
        }
        let mean = tail.iter().fold(total(a, b), |s, &v| s + v) / n;
        let m = _mm256_set1_ps(mean);
        let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in chunks {
            let (lo, hi) = load(c);
            let (lo, hi) = (_mm256_sub_ps(lo, m), _mm256_sub_ps(hi, m));
            a = _mm256_add_ps(a, _mm256_mul_ps(lo, lo));
            b = _mm256_add_ps(b, _mm256_mul_ps(hi, hi));
        }
        let var = tail.iter().fold(total(a, b), |s, &v| s + (v - mean) * (v - mean)) / n;
        (mean, (var + eps as f32).sqrt().recip())
    }

    /// `dst = (src − mean)·rstd·g + b` over `n` elements; `src` may be `dst`.
    ///
    /// # Safety
    /// The CPU must support AVX2; `src` and `dst` must be valid for `n` reads and writes, and
    /// `g`, `b` hold at least `n` elements.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn normalize(
        src: *const f32,
        dst: *mut f32,
        n: usize,
        (mean, rstd): (f32, f32),
        g: &[f32],
        b: &[f32],
    ) {
        assert!(g.len() >= n && b.len() >= n);
        let (m, r) = (_mm256_set1_ps(mean), _mm256_set1_ps(rstd));
        let whole = n - n % 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 ≤ n, within every row (caller's contract and the assert).
            unsafe {
                let x = _mm256_sub_ps(_mm256_loadu_ps(src.add(i)), m);
                let y = _mm256_mul_ps(_mm256_mul_ps(x, r), _mm256_loadu_ps(g.as_ptr().add(i)));
                let y = _mm256_add_ps(y, _mm256_loadu_ps(b.as_ptr().add(i)));
                _mm256_storeu_ps(dst.add(i), y);
            }
        }
        for i in whole..n {
            // SAFETY: i < n (caller's contract); read before the write, as `src` may be `dst`.
            unsafe { *dst.add(i) = (*src.add(i) - mean) * rstd * g[i] + b[i] };
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn backward(
        dx: &mut [f32],
        x: &[f32],
        dy: &[f32],
        g: &[f32],
        (mean, rstd): (f32, f32),
        params: Option<(&mut [f32], &mut [f32])>,
    ) {
        let d = x.len();
        assert!(dx.len() == d && dy.len() == d && g.len() == d);
        let (m, r) = (_mm256_set1_ps(mean), _mm256_set1_ps(rstd));
        let (xs, dys, gs) = (
            x.as_chunks::<LANES>().0,
            dy.as_chunks::<LANES>().0,
            g.as_chunks::<LANES>().0,
        );
        let (mut s1a, mut s1b, mut s2a, mut s2b) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        for ((x, dy), g) in xs.iter().zip(dys).zip(gs) {
            let ((xl, xh), (dl, dh), (gl, gh)) = (load(x), load(dy), load(g));
            let (gdl, gdh) = (_mm256_mul_ps(dl, gl), _mm256_mul_ps(dh, gh));
            s1a = _mm256_add_ps(s1a, gdl);
            s1b = _mm256_add_ps(s1b, gdh);
            let xhl = _mm256_mul_ps(_mm256_sub_ps(xl, m), r);
            let xhh = _mm256_mul_ps(_mm256_sub_ps(xh, m), r);
            s2a = _mm256_add_ps(s2a, _mm256_mul_ps(gdl, xhl));
            s2b = _mm256_add_ps(s2b, _mm256_mul_ps(gdh, xhh));
        }
        let (mut sum_gd, mut sum_gd_xhat) = (total(s1a, s1b), total(s2a, s2b));
        for j in d - d % LANES..d {
            let gd = dy[j] * g[j];
            sum_gd += gd;
            sum_gd_xhat += gd * ((x[j] - mean) * rstd);
        }
        let whole = d - d % 8;
        if let Some((dg, db)) = params {
            assert!(dg.len() == d && db.len() == d);
            for i in (0..whole).step_by(8) {
                // SAFETY: i + 8 ≤ d, the length of all four rows (asserted).
                unsafe {
                    let dyv = _mm256_loadu_ps(dy.as_ptr().add(i));
                    let xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), m), r);
                    let pg = dg.as_mut_ptr().add(i);
                    _mm256_storeu_ps(pg, _mm256_add_ps(_mm256_loadu_ps(pg), _mm256_mul_ps(dyv, xh)));
                    let pb = db.as_mut_ptr().add(i);
                    _mm256_storeu_ps(pb, _mm256_add_ps(_mm256_loadu_ps(pb), dyv));
                }
            }
            for i in whole..d {
                dg[i] += dy[i] * ((x[i] - mean) * rstd);
                db[i] += dy[i];
            }
        }
        let inv_d = (1.0 / d as f64) as f32;
        let (m1, m2) = (sum_gd * inv_d, sum_gd_xhat * inv_d);
        let (m1v, m2v) = (_mm256_set1_ps(m1), _mm256_set1_ps(m2));
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 ≤ d, the length of every row (asserted).
            unsafe {
                let xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), m), r);
                let gd = _mm256_mul_ps(
                    _mm256_loadu_ps(dy.as_ptr().add(i)),
                    _mm256_loadu_ps(g.as_ptr().add(i)),
                );
                let v = _mm256_sub_ps(_mm256_sub_ps(gd, m1v), _mm256_mul_ps(xh, m2v));
                _mm256_storeu_ps(dx.as_mut_ptr().add(i), _mm256_mul_ps(r, v));
            }
        }
        for i in whole..d {
            dx[i] = rstd * (dy[i] * g[i] - m1 - (x[i] - mean) * rstd * m2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-2, 2) from a fixed LCG, with a per-row offset so the mean matters.
    fn row(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0 + seed as f32 * 0.1
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// f32's kernels (AVX2 where this CPU has it) give the generic code's bits: whole chunks of
    /// 16, ragged tails and rows shorter than one chunk.
    #[test]
    fn f32_kernels_match_the_generic_code_bit_for_bit() {
        for (i, n) in [1usize, 5, 8, 15, 16, 17, 31, 40, 384, 389, 768]
            .into_iter()
            .enumerate()
        {
            let seed = i as u64 + 1;
            let (x, dy, g, b) = (
                row(n, seed),
                row(n, seed + 50),
                row(n, seed + 100),
                row(n, seed + 150),
            );
            let st = <f32 as Rows>::stats(&x, 1e-5);
            let want = stats(&x, 1e-5);
            assert_eq!(
                (st.0.to_bits(), st.1.to_bits()),
                (want.0.to_bits(), want.1.to_bits()),
                "stats, n = {n}"
            );

            let (mut y, mut want_y) = (vec![0f32; n], vec![0f32; n]);
            <f32 as Rows>::normalize_from(&mut y, &x, st, &g, &b);
            normalize_from(&mut want_y, &x, st, &g, &b);
            assert_eq!(bits(&y), bits(&want_y), "normalize_from, n = {n}");
            let mut in_place = x.clone();
            <f32 as Rows>::normalize(&mut in_place, st, &g, &b);
            assert_eq!(bits(&in_place), bits(&want_y), "normalize, n = {n}");

            for params in [false, true] {
                let (mut dx, mut want_dx) = (vec![0f32; n], vec![0f32; n]);
                let (mut dg, mut db) = (row(n, seed + 200), row(n, seed + 250));
                let (mut want_dg, mut want_db) = (dg.clone(), db.clone());
                <f32 as Rows>::backward(
                    &mut dx,
                    &x,
                    &dy,
                    &g,
                    st,
                    params.then_some((&mut dg[..], &mut db[..])),
                );
                backward(
                    &mut want_dx,
                    &x,
                    &dy,
                    &g,
                    st,
                    params.then_some((&mut want_dg[..], &mut want_db[..])),
                );
                assert_eq!(bits(&dx), bits(&want_dx), "backward dx, n = {n}, params {params}");
                assert_eq!(bits(&dg), bits(&want_dg), "backward dgamma, n = {n}");
                assert_eq!(bits(&db), bits(&want_db), "backward dbeta, n = {n}");
            }
        }
    }
}
