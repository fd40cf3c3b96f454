//! CPU kernels: forward over (batch, head, row block) in parallel; backward over (batch, head,
//! fixed row chunk) with private dk/dv partials summed in chunk order, so every sum has a fixed
//! order and the result is deterministic.

use crate::pq::SENTINEL;
use crate::simd::Vector;
use rayon::prelude::*;

/// Query rows per rayon task.
const ROWS_PER_TASK: usize = 32;
/// Keys per rayon task in the dk/dv reduction.
const KEYS_PER_TASK: usize = 64;
/// Fixed number of row chunks per (batch, head) in the backward; each has private dk/dv
/// partial sums. Fixed (not the thread count) so results are the same on any machine.
const ROW_CHUNKS: usize = 8;

/// Problem dimensions. q is `[bh, lq, d]`, k is `[bh, lk, d]`, v is `[bh, lk, dv]`, idx is
/// `[bh, lq, kk]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub bh: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub kk: usize,
}

/// Number of real entries at the front of a sorted, sentinel-padded row.
#[inline]
fn row_len(idx: &[u32]) -> usize {
    idx.iter().position(|&j| j == SENTINEL).unwrap_or(idx.len())
}

/// Returns `(o [bh, lq, dv], lse [bh, lq])`. Rows with no key output 0 and lse = −∞.
pub(crate) fn forward<T: Vector>(
    q: &[T],
    k: &[T],
    v: &[T],
    idx: &[u32],
    n: Dims,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let Dims {
        lq, lk, d, dv, kk, ..
    } = n;
    let mut o = vec![T::zero(); n.bh * lq * dv];
    let mut lse = vec![T::neg_infinity(); n.bh * lq];
    if dv == 0 || lq == 0 {
        return (o, lse);
    }
    o.par_chunks_mut(ROWS_PER_TASK * dv)
        .zip(lse.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(blk, (o, lse))| {
            let mut s = vec![T::zero(); kk];
            for (r, (oi, lse_i)) in o.chunks_mut(dv).zip(lse.iter_mut()).enumerate() {
                let row = blk * ROWS_PER_TASK + r; // = bh·lq + i
                let bh = row / lq;
                let ids = &idx[row * kk..(row + 1) * kk];
                let m = row_len(ids);
                if m == 0 {
                    continue;
                }
                let qi = &q[row * d..(row + 1) * d];
                let kb = &k[bh * lk * d..(bh + 1) * lk * d];
                let vb = &v[bh * lk * dv..(bh + 1) * lk * dv];
                let krow = |j: u32| &kb[j as usize * d..(j as usize + 1) * d];
                let vrow = |j: u32| &vb[j as usize * dv..(j as usize + 1) * dv];
                let mut t = 0;
                while t + 4 <= m {
                    let x = T::dot4(
                        qi,
                        [krow(ids[t]), krow(ids[t + 1]), krow(ids[t + 2]), krow(ids[t + 3])],
                    );
                    s[t..t + 4].copy_from_slice(&x);
                    t += 4;
                }
                for t in t..m {
                    s[t] = T::dot(qi, krow(ids[t]));
                }
                let mut max = T::neg_infinity();
                for st in s[..m].iter_mut() {
                    *st = *st * scale;
                    max = max.max(*st);
                }
                let sum = T::exp_shift(&mut s[..m], max);
                let inv = sum.recip();
                let mut t = 0;
                while t + 4 <= m {
                    let a = [s[t] * inv, s[t + 1] * inv, s[t + 2] * inv, s[t + 3] * inv];
                    T::axpy4(
                        a,
                        [vrow(ids[t]), vrow(ids[t + 1]), vrow(ids[t + 2]), vrow(ids[t + 3])],
                        oi,
                    );
                    t += 4;
                }
                for t in t..m {
                    T::axpy(s[t] * inv, vrow(ids[t]), oi);
                }
                *lse_i = max + sum.ln();
            }
        });
    (o, lse)
}

/// Exact backward. Inputs as in [`forward`] plus `o`, `lse` and upstream `g = dL/do`.
/// Returns `(dq, dk, dv)`.
///
/// One fused pass over the selected entries of each row gives `p_ij`, `ds_ij`, `dq_i`, and the
/// contributions to `dk_j` and `dv_j`. Those go into a private buffer per fixed chunk of rows,
/// summed afterwards in chunk order: the result does not depend on the thread count, and no
/// `[L, k]`-sized intermediate or transpose is materialised.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Vector>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    g: &[T],
    idx: &[u32],
    n: Dims,
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        bh: nbh,
        lq,
        lk,
        d,
        dv,
        kk,
    } = n;
    let mut dq = vec![T::zero(); nbh * lq * d];
    let mut dk = vec![T::zero(); nbh * lk * d];
    let mut dvv = vec![T::zero(); nbh * lk * dv];
    if lq == 0 || lk == 0 || d == 0 || dv == 0 || kk == 0 {
        return (dq, dk, dvv);
    }
    let chunks = ROW_CHUNKS.min(lq);
    let rows_per = lq.div_ceil(chunks);
    dq.par_chunks_mut(lq * d)
        .zip(dk.par_chunks_mut(lk * d).zip(dvv.par_chunks_mut(lk * dv)))
        .enumerate()
        .for_each(|(bh, (dqb, (dkb, dvb)))| {
            let kb = &k[bh * lk * d..(bh + 1) * lk * d];
            let vb = &v[bh * lk * dv..(bh + 1) * lk * dv];
            // Per chunk: its rows of dq, and private dk / dv partial sums.
            let partials: Vec<(Vec<T>, Vec<T>)> = dqb
                .par_chunks_mut(rows_per * d)
                .enumerate()
                .map(|(c, dqc)| {
                    let mut pk = vec![T::zero(); lk * d];
                    let mut pv = vec![T::zero(); lk * dv];
                    for (r, dqi) in dqc.chunks_mut(d).enumerate() {
                        let row = bh * lq + c * rows_per + r;
                        let ids = &idx[row * kk..(row + 1) * kk];
                        let m = row_len(ids);
                        if m == 0 {
                            continue;
                        }
                        let qi = &q[row * d..(row + 1) * d];
                        let gi = &g[row * dv..(row + 1) * dv];
                        // Σ_j p_ij dp_ij = do_i · o_i, since o_i = Σ_j p_ij v_j.
                        let delta = T::dot(gi, &o[row * dv..(row + 1) * dv]);
                        let krow = |t: usize| &kb[ids[t] as usize * d..(ids[t] as usize + 1) * d];
                        let vrow = |t: usize| &vb[ids[t] as usize * dv..(ids[t] as usize + 1) * dv];
                        let mut accumulate = |t: usize, p: T, ds: T| {
                            let j = ids[t] as usize;
                            T::axpy(scale * ds, qi, &mut pk[j * d..(j + 1) * d]);
                            T::axpy(p, gi, &mut pv[j * dv..(j + 1) * dv]);
                        };
                        let mut t = 0;
                        while t + 4 <= m {
                            let ks = [krow(t), krow(t + 1), krow(t + 2), krow(t + 3)];
                            let qk = T::dot4(qi, ks);
                            let dp = T::dot4(gi, [vrow(t), vrow(t + 1), vrow(t + 2), vrow(t + 3)]);
                            let mut a = [T::zero(); 4];
                            for r in 0..4 {
                                let p = (scale * qk[r] - lse[row]).exp();
                                let ds = p * (dp[r] - delta);
                                a[r] = scale * ds;
                                accumulate(t + r, p, ds);
                            }
                            T::axpy4(a, ks, dqi);
                            t += 4;
                        }
                        for t in t..m {
                            let kj = krow(t);
                            let p = (scale * T::dot(qi, kj) - lse[row]).exp();
                            let ds = p * (T::dot(gi, vrow(t)) - delta);
                            T::axpy(scale * ds, kj, dqi);
                            accumulate(t, p, ds);
                        }
                    }
                    (pk, pv)
                })
                .collect();
            // Fixed-order reduction of the chunk partials, parallel over key blocks.
            dkb.par_chunks_mut(KEYS_PER_TASK * d)
                .zip(dvb.par_chunks_mut(KEYS_PER_TASK * dv))
                .enumerate()
                .for_each(|(blk, (dkc, dvc))| {
                    let (k0, v0) = (blk * KEYS_PER_TASK * d, blk * KEYS_PER_TASK * dv);
                    for (pk, pv) in &partials {
                        let (nk, nv) = (dkc.len(), dvc.len());
                        for (x, y) in dkc.iter_mut().zip(&pk[k0..k0 + nk]) {
                            *x = *x + *y;
                        }
                        for (x, y) in dvc.iter_mut().zip(&pv[v0..v0 + nv]) {
                            *x = *x + *y;
                        }
                    }
                });
        });
    (dq, dk, dvv)
}
