//! CPU kernels of block-sparse attention. Per (batch, head, query tile): gather the selected key
//! and value blocks, `S = Q Kᵀ` as one GEMM, a masked stable softmax over the whole gathered row
//! (it is at most `top_blocks · key_block` wide, so no online rescaling is needed), `O = P V` as a
//! second GEMM. Backward recomputes `P` from the row log-sum-exp and runs the same GEMMs.
//!
//! Forward tiles run in parallel (each writes its own rows). Backward runs one rayon task per
//! (batch, head) that walks its tiles in order and accumulates dk and dv itself; GEMMs run
//! single-threaded. So every sum has a fixed order and the result is bit-identical across runs
//! and thread counts.

use crate::blas::{gemm_into, gemm_scaled, transpose, Mat};
use crate::pq::SENTINEL;
use crate::simd::Vector;
use crate::util::{row_max, Float};
use gemm::Parallelism;
use rayon::prelude::*;

/// Problem dimensions. q is `[bh, lq, d]`, k is `[bh, lk, d]`, v is `[bh, lk, dv]`, blocks is
/// `[bh, n_tiles, width]`; `key_ok` is `[B, lk]` (None: every key allowed).
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    pub h: usize,
    pub bh: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub qt: usize,
    pub kb: usize,
    pub width: usize,
    pub causal: bool,
    pub key_ok: Option<Vec<bool>>,
}

impl Dims {
    fn tiles(&self) -> usize {
        self.lq.div_ceil(self.qt)
    }
}

/// One tile's gathered keys and values and the global index of each gathered key. The scores'
/// and dP's GEMMs read `Kᵀ` and `Vᵀ`: gathered row-major from the head's transposes, because
/// gemm repacks a transposed view one strided scalar at a time (see `blas::transpose`).
struct Gathered<T> {
    keys: Vec<T>,
    vals: Vec<T>,
    /// `[d, nk]`.
    keys_t: Vec<T>,
    /// `[dv, nk]` (backward only; so are `keys`, which dQ reads).
    vals_t: Vec<T>,
    idx: Vec<usize>,
}

/// A head's `Kᵀ [d, lk]` and, for backward, `Vᵀ [dv, lk]` (which also asks for the
/// row-major keys).
struct HeadT<'a, T> {
    kt: &'a [T],
    vt: Option<&'a [T]>,
}

impl<T: Float> Gathered<T> {
    fn new() -> Self {
        Self {
            keys: Vec::new(),
            vals: Vec::new(),
            keys_t: Vec::new(),
            vals_t: Vec::new(),
            idx: Vec::new(),
        }
    }

    /// Copies the rows of the listed blocks of one (batch, head), vb `[lk, dv]` and, for
    /// backward, kb `[lk, d]`, and their columns of the head's transposes.
    fn gather(&mut self, list: &[u32], kb: &[T], vb: &[T], ht: &HeadT<'_, T>, n: &Dims) {
        self.keys.clear();
        self.vals.clear();
        self.idx.clear();
        let spans: Vec<(usize, usize)> = list
            .iter()
            .take_while(|&&x| x != SENTINEL)
            .map(|&blk| {
                let j0 = blk as usize * n.kb;
                (j0, (j0 + n.kb).min(n.lk))
            })
            .collect();
        for &(j0, j1) in &spans {
            if ht.vt.is_some() {
                self.keys.extend_from_slice(&kb[j0 * n.d..j1 * n.d]);
            }
            self.vals.extend_from_slice(&vb[j0 * n.dv..j1 * n.dv]);
            self.idx.extend(j0..j1);
        }
        gather_columns(ht.kt, n.lk, n.d, &spans, &mut self.keys_t);
        if let Some(vt) = ht.vt {
            gather_columns(vt, n.lk, n.dv, &spans, &mut self.vals_t);
        }
    }

    fn len(&self) -> usize {
        self.idx.len()
    }
}

/// The column spans `[j0, j1)` of `src [rows, lk]`, side by side, into `dst [rows, Σ len]`.
fn gather_columns<T: Float>(src: &[T], lk: usize, rows: usize, spans: &[(usize, usize)], dst: &mut Vec<T>) {
    dst.clear();
    for a in 0..rows {
        let row = &src[a * lk..(a + 1) * lk];
        for &(j0, j1) in spans {
            dst.extend_from_slice(&row[j0..j1]);
        }
    }
}

/// `s [m, nk] = scale · Q_tile Kᵀ`, then −∞ where key `idx[c]` is not allowed for query `i0 + r`.
fn masked_scores<T: Float>(
    q_tile: &[T],
    g: &Gathered<T>,
    s: &mut Vec<T>,
    i0: usize,
    b: usize,
    n: &Dims,
    scale: T,
) {
    let (m, nk, d) = (q_tile.len() / n.d, g.len(), n.d);
    // The GEMM overwrites every element: only a size change needs the (zero-filling) resize.
    s.resize(m * nk, T::zero());
    // Scaled inside the GEMM.
    gemm_scaled(
        m,
        nk,
        d,
        s,
        Mat::new(q_tile, 0, d, 1),
        Mat::new(&g.keys_t, 0, nk, 1),
        scale,
    );
    let pad_ok: Option<Vec<bool>> = n
        .key_ok
        .as_ref()
        .map(|k| g.idx.iter().map(|&j| k[b * n.lk + j]).collect::<Vec<bool>>())
        // Every gathered key allowed (unpadded batches): no per-element pass.
        .filter(|ok| !ok.iter().all(|&x| x));
    for (r, row) in s.chunks_mut(nk.max(1)).enumerate().take(m) {
        // Gathered keys ascend, so the causally allowed ones are a prefix of the row.
        let cut = if n.causal {
            g.idx.partition_point(|&j| j <= i0 + r)
        } else {
            nk
        };
        row[cut..].fill(T::neg_infinity());
        if let Some(ok) = &pad_ok {
            for (x, &ok) in row[..cut].iter_mut().zip(ok) {
                if !ok {
                    *x = T::neg_infinity();
                }
            }
        }
    }
}

/// Returns `(o [bh, lq, dv], lse [bh, lq])`. Rows with no allowed key output 0 and lse = −∞.
pub(crate) fn forward<T: Vector>(
    q: &[T],
    k: &[T],
    v: &[T],
    blocks: &[u32],
    n: &Dims,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let (lq, lk, d, dv, qt, nt) = (n.lq, n.lk, n.d, n.dv, n.qt, n.tiles());
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
            let kt = transpose(kb, lk, d);
            let ht = HeadT { kt: &kt, vt: None };
            ob.par_chunks_mut(qt * dv)
                .zip(lseb.par_chunks_mut(qt))
                .enumerate()
                .for_each_init(
                    || (Gathered::new(), Vec::new()),
                    |(g, s), (t, (ot, lset))| {
                        let list = &blocks[(bh * nt + t) * n.width..(bh * nt + t + 1) * n.width];
                        g.gather(list, kb, vb, &ht, n);
                        let (m, nk, i0) = (lset.len(), g.len(), t * qt);
                        if nk == 0 {
                            return;
                        }
                        let q_tile = &q[(bh * lq + i0) * d..(bh * lq + i0 + m) * d];
                        masked_scores(q_tile, g, s, i0, bh / n.h, n, scale);
                        for (row, l) in s.chunks_mut(nk).zip(lset.iter_mut()) {
                            let max = row_max(row);
                            if max == T::neg_infinity() {
                                row.fill(T::zero());
                                continue;
                            }
                            // Vectorised exp (simd.rs): scalar libm exp was 14 % of fwd+bwd.
                            let sum = T::exp_shift(row, max);
                            let inv = sum.recip();
                            for x in row.iter_mut() {
                                *x = *x * inv;
                            }
                            *l = max + sum.ln();
                        }
                        gemm_into(
                            m,
                            dv,
                            nk,
                            ot,
                            false,
                            Mat::new(s, 0, nk, 1),
                            Mat::new(&g.vals, 0, dv, 1),
                            Parallelism::None,
                        );
                    },
                );
        });
    (o, lse)
}

/// Exact backward. Inputs as in [`forward`] plus `o`, `lse` and upstream `g = dL/do`.
/// Returns `(dq, dk, dv)`.
///
/// Per tile: `P = exp(S − lse)`, `dV_sel = Pᵀ dO`, `dP = dO V_selᵀ`,
/// `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = scale · dS K_sel`, `dK_sel = scale · dSᵀ Q`; the
/// gathered dK and dV rows are added back to their keys in tile order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Vector>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    go: &[T],
    blocks: &[u32],
    n: &Dims,
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (lq, lk, d, dv, qt, nt) = (n.lq, n.lk, n.d, n.dv, n.qt, n.tiles());
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
            let (kt, vt) = (transpose(kb, lk, d), transpose(vb, lk, dv));
            let ht = HeadT {
                kt: &kt,
                vt: Some(&vt),
            };
            let mut g = Gathered::new();
            let (mut p, mut dp, mut gk, mut gv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for t in 0..nt {
                let list = &blocks[(bh * nt + t) * n.width..(bh * nt + t + 1) * n.width];
                g.gather(list, kb, vb, &ht, n);
                let (i0, nk) = (t * qt, g.len());
                let m = qt.min(lq - i0);
                if nk == 0 {
                    continue;
                }
                let (r0, r1) = (bh * lq + i0, bh * lq + i0 + m);
                let q_tile = &q[r0 * d..r1 * d];
                let go_tile = &go[r0 * dv..r1 * dv];
                masked_scores(q_tile, &g, &mut p, i0, bh / n.h, n, scale);
                for (r, row) in p.chunks_mut(nk).enumerate() {
                    let l = lse[r0 + r];
                    if l == T::neg_infinity() {
                        // A row with no allowed key: P = 0.
                        row.fill(T::zero());
                    } else {
                        // Masked entries are −∞ and give exactly 0.
                        T::exp_shift(row, l);
                    }
                }
                // dV_sel [nk, dv] = Pᵀ dO.
                gv.clear();
                gv.resize(nk * dv, T::zero());
                gemm_into(
                    nk,
                    dv,
                    m,
                    &mut gv,
                    false,
                    Mat::new(&p, 0, 1, nk),
                    Mat::new(go_tile, 0, dv, 1),
                    Parallelism::None,
                );
                // dP [m, nk] = dO V_selᵀ.
                dp.clear();
                dp.resize(m * nk, T::zero());
                gemm_into(
                    m,
                    nk,
                    dv,
                    &mut dp,
                    false,
                    Mat::new(go_tile, 0, dv, 1),
                    Mat::new(&g.vals_t, 0, nk, 1),
                    Parallelism::None,
                );
                // dS·scale, in place of P: Σ_j p_ij dp_ij = dO_i · O_i since O_i = Σ_j p_ij v_j.
                for (r, (prow, dprow)) in p.chunks_mut(nk).zip(dp.chunks(nk)).enumerate() {
                    let row = r0 + r;
                    let delta = go[row * dv..(row + 1) * dv]
                        .iter()
                        .zip(&o[row * dv..(row + 1) * dv])
                        .fold(T::zero(), |a, (&x, &y)| a + x * y);
                    for (x, &y) in prow.iter_mut().zip(dprow) {
                        *x = scale * *x * (y - delta);
                    }
                }
                // dQ_tile [m, d] = dS K_sel (each tile owns its dq rows).
                gemm_into(
                    m,
                    d,
                    nk,
                    &mut dqb[i0 * d..(i0 + m) * d],
                    false,
                    Mat::new(&p, 0, nk, 1),
                    Mat::new(&g.keys, 0, d, 1),
                    Parallelism::None,
                );
                // dK_sel [nk, d] = dSᵀ Q_tile.
                gk.clear();
                gk.resize(nk * d, T::zero());
                gemm_into(
                    nk,
                    d,
                    m,
                    &mut gk,
                    false,
                    Mat::new(&p, 0, 1, nk),
                    Mat::new(q_tile, 0, d, 1),
                    Parallelism::None,
                );
                for (c, &j) in g.idx.iter().enumerate() {
                    for (x, &y) in dkb[j * d..(j + 1) * d].iter_mut().zip(&gk[c * d..(c + 1) * d]) {
                        *x = *x + y;
                    }
                    for (x, &y) in dvb[j * dv..(j + 1) * dv]
                        .iter_mut()
                        .zip(&gv[c * dv..(c + 1) * dv])
                    {
                        *x = *x + y;
                    }
                }
            }
        });
    (dq, dk, dvv)
}
