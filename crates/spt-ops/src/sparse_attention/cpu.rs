//! CPU kernels: forward over (batch, head, row block) in parallel; backward in two phases,
//! rows in parallel for dq, then keys in parallel (through a key→query transpose) for dk and
//! dv, so every sum has a fixed order and the result is deterministic.

use crate::pq::SENTINEL;
use crate::simd::Vector;
use rayon::prelude::*;

/// Query rows per rayon task.
const ROWS_PER_TASK: usize = 32;
/// Keys per rayon task in the dk/dv phase.
const KEYS_PER_TASK: usize = 64;

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
                let mut sum = T::zero();
                for st in s[..m].iter_mut() {
                    *st = (*st - max).exp();
                    sum = sum + *st;
                }
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
    // Per selected entry: p_ij and ds_ij = p_ij (dp_ij − Σ_j p_ij dp_ij), laid out like idx.
    let mut p = vec![T::zero(); nbh * lq * kk];
    let mut ds = vec![T::zero(); nbh * lq * kk];
    if lq > 0 && kk > 0 && d > 0 {
        dq.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(
                p.par_chunks_mut(ROWS_PER_TASK * kk)
                    .zip(ds.par_chunks_mut(ROWS_PER_TASK * kk)),
            )
            .enumerate()
            .for_each(|(blk, (dq, (p, ds)))| {
                for (r, ((dqi, pi), dsi)) in dq
                    .chunks_mut(d)
                    .zip(p.chunks_mut(kk))
                    .zip(ds.chunks_mut(kk))
                    .enumerate()
                {
                    let row = blk * ROWS_PER_TASK + r;
                    let bh = row / lq;
                    let ids = &idx[row * kk..(row + 1) * kk];
                    let m = row_len(ids);
                    if m == 0 {
                        continue;
                    }
                    let qi = &q[row * d..(row + 1) * d];
                    let gi = &g[row * dv..(row + 1) * dv];
                    // Σ_j p_ij dp_ij = do_i · o_i, since o_i = Σ_j p_ij v_j.
                    let delta = T::dot(gi, &o[row * dv..(row + 1) * dv]);
                    let kb = &k[bh * lk * d..(bh + 1) * lk * d];
                    let vb = &v[bh * lk * dv..(bh + 1) * lk * dv];
                    let krow = |t: usize| &kb[ids[t] as usize * d..(ids[t] as usize + 1) * d];
                    let vrow = |t: usize| &vb[ids[t] as usize * dv..(ids[t] as usize + 1) * dv];
                    let mut t = 0;
                    while t + 4 <= m {
                        let ks = [krow(t), krow(t + 1), krow(t + 2), krow(t + 3)];
                        let qk = T::dot4(qi, ks);
                        let dp = T::dot4(gi, [vrow(t), vrow(t + 1), vrow(t + 2), vrow(t + 3)]);
                        let mut a = [T::zero(); 4];
                        for r in 0..4 {
                            pi[t + r] = (scale * qk[r] - lse[row]).exp();
                            dsi[t + r] = pi[t + r] * (dp[r] - delta);
                            a[r] = scale * dsi[t + r];
                        }
                        T::axpy4(a, ks, dqi);
                        t += 4;
                    }
                    for t in t..m {
                        let kj = krow(t);
                        pi[t] = (scale * T::dot(qi, kj) - lse[row]).exp();
                        dsi[t] = pi[t] * (T::dot(gi, vrow(t)) - delta);
                        T::axpy(scale * dsi[t], kj, dqi);
                    }
                }
            });
    }

    // dk_j = scale Σ_i ds_ij q_i and dv_j = Σ_i p_ij do_i over the queries that selected j,
    // in increasing i: a counting-sort transpose per (batch, head).
    let mut dk = vec![T::zero(); nbh * lk * d];
    let mut dvv = vec![T::zero(); nbh * lk * dv];
    if lk > 0 {
        dk.par_chunks_mut(lk * d.max(1))
            .zip(dvv.par_chunks_mut(lk * dv.max(1)))
            .enumerate()
            .for_each(|(bh, (dkb, dvb))| {
                let ids = &idx[bh * lq * kk..(bh + 1) * lq * kk];
                let mut start = vec![0usize; lk + 1];
                for &j in ids.iter().filter(|&&j| j != SENTINEL) {
                    start[j as usize + 1] += 1;
                }
                for j in 0..lk {
                    start[j + 1] += start[j];
                }
                let mut fill = start.clone();
                // Entry e = i·kk + t of this (b, h); rows visited in order, so each key's list is
                // sorted by query.
                let mut entries = vec![0usize; start[lk]];
                for (e, &j) in ids.iter().enumerate() {
                    if j != SENTINEL {
                        entries[fill[j as usize]] = e;
                        fill[j as usize] += 1;
                    }
                }
                let base = bh * lq * kk;
                let (d1, dv1) = (d.max(1), dv.max(1));
                dkb.par_chunks_mut(KEYS_PER_TASK * d1)
                    .zip(dvb.par_chunks_mut(KEYS_PER_TASK * dv1))
                    .enumerate()
                    .for_each(|(blk, (dkc, dvc))| {
                        for (r, (dkj, dvj)) in dkc.chunks_mut(d1).zip(dvc.chunks_mut(dv1)).enumerate() {
                            let j = blk * KEYS_PER_TASK + r;
                            let list = &entries[start[j]..start[j + 1]];
                            let qrow = |e: usize| &q[(bh * lq + e / kk) * d..(bh * lq + e / kk + 1) * d];
                            let grow = |e: usize| &g[(bh * lq + e / kk) * dv..(bh * lq + e / kk + 1) * dv];
                            let mut chunks = list.chunks_exact(4);
                            for c in &mut chunks {
                                let a = [ds[base + c[0]], ds[base + c[1]], ds[base + c[2]], ds[base + c[3]]];
                                T::axpy4(
                                    a.map(|x| scale * x),
                                    [qrow(c[0]), qrow(c[1]), qrow(c[2]), qrow(c[3])],
                                    dkj,
                                );
                                let a = [p[base + c[0]], p[base + c[1]], p[base + c[2]], p[base + c[3]]];
                                T::axpy4(a, [grow(c[0]), grow(c[1]), grow(c[2]), grow(c[3])], dvj);
                            }
                            for &e in chunks.remainder() {
                                T::axpy(scale * ds[base + e], qrow(e), dkj);
                                T::axpy(p[base + e], grow(e), dvj);
                            }
                        }
                    });
            });
    }
    (dq, dk, dvv)
}
