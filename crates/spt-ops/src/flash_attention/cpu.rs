//! CPU kernels of fused dense attention, FlashAttention-style: per (batch, head, query tile),
//! `S = scale · Q Kᵀ` as one GEMM over the keys the tile may see, a masked softmax over the whole
//! row (a tile row is at most `L_k` wide, so no online rescaling is needed), dropout drawn from a
//! counter hash, `O = P V` as a second GEMM. Only one log-sum-exp per row is kept; backward
//! recomputes `P` (and the dropout mask) tile by tile with the same GEMMs.
//!
//! Forward tiles run in parallel (each writes its own rows). Backward runs one rayon task per
//! (batch, head) that walks its tiles in order and accumulates dk and dv itself, with
//! single-threaded GEMMs: every sum has a fixed order, so results are bit-identical across runs
//! and thread counts.
//!
//! Under `MatmulPrecision::Bf16` (f32) every product takes bf16 inputs on the AMX kernel, as
//! PyTorch's attention runs under bf16 autocast: K, V (and Kᵀ, Vᵀ) are packed once per (batch,
//! head), over the keys the sequence's tiles may see (so trailing padding is never read, as in
//! f32), and each tile multiplies by its prefix of them; the backward's `Pᵀ dO` and `dSᵀ Q`
//! pack the tile's dO and Q (a tile's worth, small beside the products). The probabilities,
//! their gradients and every sum stay f32. Packing takes the place of the f32 path's transposes
//! of K and V, so one-row decoding costs about the same (12 heads, d 64, one query over 128 /
//! 1024 keys: 31 / 302 µs against f32's 24 / 331).

use super::dropout::{DropoutElem, RowDropout};
use crate::amx::Bf16Matrix;
use crate::blas::{gemm_into, gemm_scaled, transpose, transpose_into, Mat};
use crate::precision::{bf16_matmul_t, bf16_matmul_t_part, bf16_products, bf16_weight};
use crate::simd::Vector;
use crate::util::{row_max, Float};
use gemm::Parallelism;
use rayon::prelude::*;

/// Problem dimensions. q is `[bh, lq, d]`, k is `[bh, lk, d]`, v is `[bh, lk, dv]`; `key_ok`
/// is `[B, lk]` (None: every key allowed).
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    pub h: usize,
    pub bh: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub causal: bool,
    pub key_ok: Option<Vec<bool>>,
    pub dropout: Option<RowDropout>,
}

/// Query rows per tile with a causal mask: the diagonal tile computes scores that the mask then
/// drops (half a tile's worth), so a smaller tile wastes less.
const CAUSAL_TILE: usize = 64;

/// Query rows per tile otherwise: each tile packs K and V once per GEMM, and the backward's
/// `Pᵀ dO` / `dSᵀ Q` GEMMs get an inner dimension of 128. Against 64 rows (B 1, H 12, d 64,
/// fwd+bwd; B 8, H 12, L 512, d 32 is MiniLM's): L 512 17.3 → 16.8 ms, 1024 62.6 → 60.3,
/// 2048 209 → 202, 4096 939 → 865; MiniLM's shape ~3 % (the `[128, L_k]` score tile is 1 MiB
/// at L_k 2048, in L2). With a causal mask, 128 rows were no faster (B 4, L 512).
const TILE: usize = 128;

impl Dims {
    /// Query rows per tile.
    fn tile(&self) -> usize {
        if self.causal {
            CAUSAL_TILE
        } else {
            TILE
        }
    }

    fn tiles(&self) -> usize {
        self.lq.div_ceil(self.tile())
    }

    /// Keys `0..n` that a tile of rows `i0..i0 + m` of batch `b` may see: causal masks cut keys
    /// after the tile's last row, and trailing padding is never read.
    fn key_span(&self, b: usize, i0: usize, m: usize) -> usize {
        let mut n = self.lk;
        if self.causal {
            n = n.min(i0 + m);
        }
        if let Some(ok) = &self.key_ok {
            let row = &ok[b * self.lk..b * self.lk + n];
            n = row.iter().rposition(|&x| x).map_or(0, |j| j + 1);
        }
        n
    }
}

/// `s [m, nk] = scale · Q_tile K[0..nk]ᵀ`, then −∞ where a key is not allowed for its query.
/// `keys_t` is the head's `Kᵀ [d, lk]`, row-major (see `blas::transpose`), or `keys` the head's
/// K packed for bf16 products.
#[allow(clippy::too_many_arguments)]
fn masked_scores<T: Float>(
    q_tile: &[T],
    keys_t: &[T],
    keys: Option<&Bf16Matrix>,
    nk: usize,
    s: &mut Vec<T>,
    i0: usize,
    b: usize,
    n: &Dims,
    scale: T,
) {
    let (m, d) = (q_tile.len() / n.d, n.d);
    // The GEMM overwrites every element: only a size change needs the (zero-filling) resize.
    s.resize(m * nk, T::zero());
    // The scale is applied inside the GEMM (after the bf16 product, in the mask's pass).
    let bf16 = bf16_matmul_t_part(keys, q_tile, m, (nk, d), s, false);
    if !bf16 {
        debug_assert!(keys_t.len() >= d * n.lk, "f32 scores without Kᵀ");
        gemm_scaled(
            m,
            nk,
            d,
            s,
            Mat::new(q_tile, 0, d, 1),
            Mat::new(keys_t, 0, n.lk, 1),
            scale,
        );
    }
    let ok = n
        .key_ok
        .as_ref()
        .map(|k| &k[b * n.lk..b * n.lk + nk])
        // Every key of the span allowed (an unpadded batch): skip the per-element pass, which
        // otherwise reads a flag per score (4 % of a MiniLM SPT step, perf).
        .filter(|ok| !ok.iter().all(|&x| x));
    for (r, row) in s.chunks_mut(nk.max(1)).enumerate().take(m) {
        let cut = if n.causal { (i0 + r + 1).min(nk) } else { nk };
        if bf16 {
            row[..cut].iter_mut().for_each(|x| *x = *x * scale);
        }
        row[cut..].fill(T::neg_infinity());
        if let Some(ok) = ok {
            for (x, &ok) in row[..cut].iter_mut().zip(ok) {
                if !ok {
                    *x = T::neg_infinity();
                }
            }
        }
    }
}

/// Returns `(o [bh, lq, dv], lse [bh, lq])`. Rows with no allowed key output 0 and lse = −∞.
pub(crate) fn forward<T: Float + Vector + DropoutElem>(
    q: &[T],
    k: &[T],
    v: &[T],
    n: &Dims,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let (lq, lk, d, dv, qt) = (n.lq, n.lk, n.d, n.dv, n.tile());
    let mut o = vec![T::zero(); n.bh * lq * dv];
    let mut lse = vec![T::neg_infinity(); n.bh * lq];
    if lq == 0 || dv == 0 || d == 0 {
        return (o, lse);
    }
    o.par_chunks_mut(lq * dv)
        .zip(lse.par_chunks_mut(lq))
        .enumerate()
        .for_each(|(bh, (ob, lseb))| {
            let (kb, vb) = (
                &k[bh * lk * d..(bh + 1) * lk * d],
                &v[bh * lk * dv..(bh + 1) * lk * dv],
            );
            // bf16: K and Vᵀ packed over the keys this sequence's tiles see (each tile reads a
            // prefix of them; none: no tile runs a product); f32: Kᵀ.
            let bf16 = bf16_products::<T>();
            let nb = n.key_span(bh / n.h, 0, lq);
            let (keys, values_t) = match bf16 {
                true => (
                    bf16_weight(&kb[..nb * d], nb, d, false),
                    bf16_weight(&vb[..nb * dv], dv, nb, true),
                ),
                false => (None, None),
            };
            let kt = if bf16 { Vec::new() } else { transpose(kb, lk, d) };
            ob.par_chunks_mut(qt * dv)
                .zip(lseb.par_chunks_mut(qt))
                .enumerate()
                .for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(s, inv), (t, (ot, lset))| {
                        let (m, i0, b) = (lset.len(), t * qt, bh / n.h);
                        let nk = n.key_span(b, i0, m);
                        if nk == 0 {
                            return;
                        }
                        let q_tile = &q[(bh * lq + i0) * d..(bh * lq + i0 + m) * d];
                        masked_scores(q_tile, &kt, keys.as_ref(), nk, s, i0, b, n, scale);
                        // Without dropout, P stays unnormalised and O's rows are scaled by `inv`
                        // after the GEMM: dv values a row instead of nk. (A row with no key keeps
                        // P = 0.)
                        inv.clear();
                        inv.resize(m, T::zero());
                        for (r, (row, l)) in s.chunks_mut(nk).zip(lset.iter_mut()).enumerate() {
                            let max = row_max(row);
                            if max == T::neg_infinity() {
                                row.fill(T::zero());
                                continue;
                            }
                            let sum = T::exp_shift(row, max);
                            match &n.dropout {
                                Some(drop) => drop.apply_scaled(row, bh, i0 + r, sum.recip()),
                                None => inv[r] = sum.recip(),
                            }
                            *l = max + sum.ln();
                        }
                        if !bf16_matmul_t_part(values_t.as_ref(), s, m, (dv, nk), ot, false) {
                            debug_assert!(!bf16, "bf16 attention without packed V");
                            gemm_into(
                                m,
                                dv,
                                nk,
                                ot,
                                false,
                                Mat::new(s, 0, nk, 1),
                                Mat::new(vb, 0, dv, 1),
                                Parallelism::None,
                            );
                        }
                        if n.dropout.is_none() {
                            for (row, &c) in ot.chunks_mut(dv).zip(inv.iter()) {
                                row.iter_mut().for_each(|x| *x = *x * c);
                            }
                        }
                    },
                );
        });
    (o, lse)
}

/// Exact backward. Inputs as in [`forward`] plus `o`, `lse` and upstream `go = dL/do`.
/// Returns `(dq, dk, dv)`.
///
/// Per tile, with `D` the dropout multipliers (0 or 1/(1−p); all 1 without dropout):
/// `P = exp(S − lse)`, `dV += (P⊙D)ᵀ dO`, `dP = (dO Vᵀ) ⊙ D`,
/// `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = scale · dS K`, `dK += scale · dSᵀ Q`.
/// (`Σ_j P_ij dP_ij = dO_i · O_i` because `O_i = Σ_j (P⊙D)_ij v_j`.)
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Float + Vector + DropoutElem>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    go: &[T],
    n: &Dims,
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (lq, lk, d, dv, qt, nt) = (n.lq, n.lk, n.d, n.dv, n.tile(), n.tiles());
    let mut dq = vec![T::zero(); n.bh * lq * d];
    let mut dk = vec![T::zero(); n.bh * lk * d];
    let mut dvv = vec![T::zero(); n.bh * lk * dv];
    if lq == 0 || lk == 0 || d == 0 || dv == 0 {
        return (dq, dk, dvv);
    }
    dq.par_chunks_mut(lq * d)
        .zip(dk.par_chunks_mut(lk * d).zip(dvv.par_chunks_mut(lk * dv)))
        .enumerate()
        .for_each(|(bh, (dqb, (dkb, dvb)))| {
            let (kb, vb) = (
                &k[bh * lk * d..(bh + 1) * lk * d],
                &v[bh * lk * dv..(bh + 1) * lk * dv],
            );
            // bf16: K (scores), V (dP) and Kᵀ (dQ) packed over the keys this sequence's tiles
            // see, as in the forward; f32: Kᵀ and Vᵀ.
            let bf16 = bf16_products::<T>();
            let nb = n.key_span(bh / n.h, 0, lq);
            let (kp, vp) = (&kb[..nb * d], &vb[..nb * dv]);
            let (keys, values, keys_t) = match bf16 {
                true => (
                    bf16_weight(kp, nb, d, false),
                    bf16_weight(vp, nb, dv, false),
                    bf16_weight(kp, d, nb, true),
                ),
                false => (None, None, None),
            };
            let (kt, vt) = if bf16 {
                (Vec::new(), Vec::new())
            } else {
                (transpose(kb, lk, d), transpose(vb, lk, dv))
            };
            let b = bh / n.h;
            let (mut p, mut dp, mut pd) = (Vec::new(), Vec::new(), Vec::new());
            // bf16: `(P⊙D)ᵀ` and `dSᵀ` for the AMX kernel's row operand, one buffer per head.
            let mut t_buf = Vec::new();
            for t in 0..nt {
                let i0 = t * qt;
                let m = qt.min(lq - i0);
                let nk = n.key_span(b, i0, m);
                if nk == 0 {
                    continue;
                }
                let (r0, r1) = (bh * lq + i0, bh * lq + i0 + m);
                let q_tile = &q[r0 * d..r1 * d];
                let go_tile = &go[r0 * dv..r1 * dv];
                masked_scores(q_tile, &kt, keys.as_ref(), nk, &mut p, i0, b, n, scale);
                for (r, row) in p.chunks_mut(nk).enumerate() {
                    let l = lse[r0 + r];
                    if l == T::neg_infinity() {
                        // A row with no allowed key: its output is the constant 0.
                        row.fill(T::zero());
                    } else {
                        T::exp_shift(row, l);
                    }
                }
                // P⊙D, the probabilities the forward multiplied V by.
                let p_used = match &n.dropout {
                    Some(drop) => {
                        pd.clear();
                        pd.extend_from_slice(&p);
                        for (r, row) in pd.chunks_mut(nk).enumerate() {
                            drop.apply_scaled(row, bh, i0 + r, T::one());
                        }
                        &pd
                    }
                    None => &p,
                };
                // dV[0..nk] += (P⊙D)ᵀ dO; bf16: as (P⊙D)ᵀ (dOᵀ)ᵀ with the tile's dOᵀ packed.
                if bf16 {
                    let go_t = bf16_weight(go_tile, dv, m, true);
                    transpose_into(p_used, m, nk, &mut t_buf);
                    let done = bf16_matmul_t(go_t.as_ref(), &t_buf, nk, &mut dvb[..nk * dv], true);
                    debug_assert!(done, "bf16 dV not computed");
                } else {
                    gemm_into(
                        nk,
                        dv,
                        m,
                        &mut dvb[..nk * dv],
                        true,
                        Mat::new(p_used, 0, 1, nk),
                        Mat::new(go_tile, 0, dv, 1),
                        Parallelism::None,
                    );
                }
                // dP [m, nk] = dO V[0..nk]ᵀ (then ⊙ D).
                // The GEMM overwrites every element: only a size change needs the resize.
                dp.resize(m * nk, T::zero());
                if !bf16_matmul_t_part(values.as_ref(), go_tile, m, (nk, dv), &mut dp, false) {
                    debug_assert!(!bf16, "bf16 attention without packed V");
                    gemm_into(
                        m,
                        nk,
                        dv,
                        &mut dp,
                        false,
                        Mat::new(go_tile, 0, dv, 1),
                        Mat::new(&vt, 0, lk, 1),
                        Parallelism::None,
                    );
                }
                if let Some(drop) = &n.dropout {
                    for (r, row) in dp.chunks_mut(nk).enumerate() {
                        drop.apply_scaled(row, bh, i0 + r, T::one());
                    }
                }
                // scale · dS, in place of P.
                for (r, (prow, dprow)) in p.chunks_mut(nk).zip(dp.chunks(nk)).enumerate() {
                    let row = r0 + r;
                    let delta = T::dot(&go[row * dv..(row + 1) * dv], &o[row * dv..(row + 1) * dv]);
                    for (x, &y) in prow.iter_mut().zip(dprow) {
                        *x = scale * *x * (y - delta);
                    }
                }
                // dQ_tile = dS K[0..nk] (each tile owns its dq rows).
                let dq_tile = &mut dqb[i0 * d..(i0 + m) * d];
                if !bf16_matmul_t_part(keys_t.as_ref(), &p, m, (d, nk), dq_tile, false) {
                    debug_assert!(!bf16, "bf16 attention without packed Kᵀ");
                    gemm_into(
                        m,
                        d,
                        nk,
                        dq_tile,
                        false,
                        Mat::new(&p, 0, nk, 1),
                        Mat::new(kb, 0, d, 1),
                        Parallelism::None,
                    );
                }
                // dK[0..nk] += dSᵀ Q_tile; bf16: as dSᵀ (Qᵀ)ᵀ with the tile's Qᵀ packed.
                if bf16 {
                    let q_t = bf16_weight(q_tile, d, m, true);
                    transpose_into(&p, m, nk, &mut t_buf);
                    let done = bf16_matmul_t(q_t.as_ref(), &t_buf, nk, &mut dkb[..nk * d], true);
                    debug_assert!(done, "bf16 dK not computed");
                } else {
                    gemm_into(
                        nk,
                        d,
                        m,
                        &mut dkb[..nk * d],
                        true,
                        Mat::new(&p, 0, 1, nk),
                        Mat::new(q_tile, 0, d, 1),
                        Parallelism::None,
                    );
                }
            }
        });
    (dq, dk, dvv)
}
