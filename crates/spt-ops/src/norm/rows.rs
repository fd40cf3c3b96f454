//! One row of layer normalisation, forward and backward, shared by `layer_norm` and
//! `residual_layer_norm`.
//!
//! Row sums are kept in [`LANES`] independent partial sums, combined in a fixed tree: with a
//! single running sum every element waits for the previous add (~4 cycles), which made these
//! kernels latency-bound; independent lanes let the compiler vectorise them. The order is fixed,
//! so results do not depend on the thread count or the CPU.

use crate::util::Float;

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

/// The row's mean and reciprocal standard deviation (biased variance).
#[inline]
pub(super) fn stats<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::lit(row.len() as f64);
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, (var + T::lit(eps)).sqrt().recip())
}

/// `y = (y − mean)·rstd·g + b`, in place.
#[inline]
pub(super) fn normalize<T: Float>(y: &mut [T], (mean, rstd): (T, T), g: &[T], b: &[T]) {
    for ((y, &g), &b) in y.iter_mut().zip(g).zip(b) {
        *y = (*y - mean) * rstd * g + b;
    }
}

/// `y = (x − mean)·rstd·g + b`.
#[inline]
pub(super) fn normalize_from<T: Float>(y: &mut [T], x: &[T], (mean, rstd): (T, T), g: &[T], b: &[T]) {
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
        *y = (x - mean) * rstd * g + b;
    }
}

/// The backward of one row whose input was `x` (statistics `mean`, `rstd`): writes
/// `dx = rstd·(dy ⊙ g − mean(dy ⊙ g) − x̂·mean(dy ⊙ g ⊙ x̂))` and, when `params` holds the
/// parameter gradients' accumulators `(dg, db)`, adds `dy ⊙ x̂` and `dy` to them (frozen
/// parameters, as in LoRA fine-tuning, skip that pass).
#[inline]
pub(super) fn backward<T: Float>(
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
