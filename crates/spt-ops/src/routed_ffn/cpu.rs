//! CPU kernels of the routed FFN: grouped "gather-in" and "scatter-out" GEMMs and their
//! backward passes, over the block-sorted routing of [`Routing`].
//!
//! Layout conventions (all row-major, contiguous):
//! - `x`  `[T, d_in]`, tokens; `h` `[R, b]`, one row per routed (token, block) pair, rows sorted
//!   by block, then by token (see [`Routing`]);
//! - gather weight `w` `[n_blocks·b, d_in]` (HF Linear `[out, in]`): block `e` is rows
//!   `[e·b, (e+1)·b)`, read in place;
//! - scatter weight `w` `[d_out, n_blocks·b]`: block `e` is columns `[e·b, (e+1)·b)`, read in place
//!   through its row stride (no copy of the weights, unlike the reference implementation).
//!
//! Parallelism and determinism: work that writes routed rows runs in parallel over
//! (block, token chunk) groups; work that accumulates into token rows runs in parallel over token
//! chunks and visits blocks in a fixed order; weight gradients run in parallel over blocks and
//! accumulate row tiles in a fixed order. No atomics, so results do not depend on the thread
//! count.

use super::router::{token_run, Routing};
use crate::activation::{ActScalar, Activation};
use crate::blas::{gemm_into, gemm_raw, inner_par, splits, transpose, Mat, SendPtr};
use crate::row_gemm::RowGemm;
use crate::util::Float;
use rayon::prelude::*;

/// A routing whose routed rows' tokens are in host memory, as these kernels read them.
#[derive(Clone, Copy)]
pub(crate) struct HostRouting<'a> {
    routing: &'a Routing,
    /// [`Routing::row_token`].
    pub(super) tok: &'a [u32],
}

impl<'a> HostRouting<'a> {
    pub(crate) fn new(routing: &'a Routing) -> candle_core::Result<Self> {
        Ok(Self {
            routing,
            tok: routing.row_token()?,
        })
    }
}

impl std::ops::Deref for HostRouting<'_> {
    type Target = Routing;

    fn deref(&self) -> &Routing {
        self.routing
    }
}

/// Routed rows per weight-gradient GEMM (fixed so results don't depend on the thread count).
const ROW_TILE: usize = 512;

/// Copies the rows `idx` of `src` (`[*, width]`) into `buf` (`[idx.len(), width]`).
fn gather_rows<T: Float>(src: &[T], width: usize, idx: &[u32], buf: &mut Vec<T>) {
    buf.clear();
    buf.reserve(idx.len() * width);
    for &t in idx {
        let t = t as usize;
        buf.extend_from_slice(&src[t * width..(t + 1) * width]);
    }
}

/// `rows` of `src` (`[T, width]`) as a GEMM operand: in place when they are consecutive tokens,
/// else copied into `buf`.
pub(super) fn token_rows<T: Float>(
    hr: &HostRouting<'_>,
    src: &[T],
    width: usize,
    rows: std::ops::Range<usize>,
    buf: &mut Vec<T>,
) -> Mat<T> {
    Mat::new(group_rows(hr, src, width, rows, buf), 0, width, 1)
}

/// [`token_rows`] as one slice: in place when the group's tokens are consecutive, else
/// gathered into `buf`.
pub(super) fn group_rows<'a, T: Float>(
    hr: &HostRouting<'_>,
    src: &'a [T],
    width: usize,
    rows: std::ops::Range<usize>,
    buf: &'a mut Vec<T>,
) -> &'a [T] {
    match token_run(hr.tok, rows.clone()) {
        Some(t) => &src[t * width..(t + rows.len()) * width],
        None => {
            gather_rows(src, width, &hr.tok[rows], buf);
            &buf[..]
        }
    }
}

/// `dst[tok(r) - t0] += src[i]` (times `scale[r]` when given) for the group's rows `rows`.
pub(super) fn scatter_add<T: Float>(
    hr: &HostRouting<'_>,
    dst: &mut [T],
    t0: usize,
    src: &[T],
    width: usize,
    rows: std::ops::Range<usize>,
    scale: Option<&[T]>,
) {
    for (i, (r, &t)) in rows.clone().zip(&hr.tok[rows]).enumerate() {
        let off = (t as usize - t0) * width;
        let row = &src[i * width..(i + 1) * width];
        let out = &mut dst[off..off + width];
        match scale {
            Some(s) => out.iter_mut().zip(row).for_each(|(o, &v)| *o = *o + s[r] * v),
            None => out.iter_mut().zip(row).for_each(|(o, &v)| *o = *o + v),
        }
    }
}

/// Splits `out` (`[R, width]`) into the row ranges of the routing's (block, chunk) groups.
pub(super) fn split_groups<'a, T>(routing: &Routing, out: &'a mut [T], width: usize) -> Vec<&'a mut [T]> {
    let starts = routing.group_starts();
    let mut parts = Vec::with_capacity(starts.len().saturating_sub(1));
    let mut rest = out;
    for w in starts.windows(2) {
        let (head, tail) = rest.split_at_mut((w[1] - w[0]) * width);
        parts.push(head);
        rest = tail;
    }
    parts
}

/// What the gather-in GEMM adds to its product.
#[derive(Clone, Copy)]
pub(crate) enum Addend<'a, T> {
    None,
    /// `[n_blocks·b]`: block e's slice is added to every routed row of block e.
    Bias(&'a [T]),
    /// `[R, b]`: added row by row (e.g. LoRA's routed contribution, already with the bias).
    Base(&'a [T]),
}

/// Forward of the gather-in GEMM: `pre[r] = x[tok(r)] · W_eᵀ (+ addend)` for routed row `r` of
/// block `e`, `[R, b]`; with `act`, also `h = act(pre)`, computed on each group while it is in
/// cache.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather_mm_fwd<T: Float + ActScalar>(
    routing: HostRouting<'_>,
    x: &[T],
    w: &[T],
    add: Addend<'_, T>,
    d_in: usize,
    b: usize,
    act: Option<Activation>,
) -> (Vec<T>, Option<Vec<T>>) {
    // Wᵀ `[d_in, n_blocks·b]`, so that every group's GEMM reads its weight block row by row.
    let nb = routing.n_blocks() * b;
    let wt = transpose(&w[..nb * d_in], nb, d_in);
    let mut pre = vec![T::zero(); routing.n_rows() * b];
    let mut h = if act.is_some() {
        vec![T::zero(); pre.len()]
    } else {
        vec![]
    };
    let nc = routing.n_chunks();
    let par = inner_par(routing.n_blocks() * nc);
    let parallel = splits(par);
    let pre_parts = split_groups(&routing, &mut pre, b);
    let h_parts: Vec<&mut [T]> = if act.is_some() {
        split_groups(&routing, &mut h, b)
    } else {
        pre_parts.iter().map(|_| &mut [][..]).collect()
    };
    pre_parts
        .into_par_iter()
        .zip(h_parts)
        .enumerate()
        .for_each_init(Vec::new, |buf, (g, (dst, h_dst))| {
            if dst.is_empty() {
                return;
            }
            let e = g / nc.max(1);
            let rows = routing.group_rows(g);
            let m = rows.len();
            let accumulate = match add {
                Addend::None => false,
                Addend::Bias(bias) => {
                    for row in dst.chunks_mut(b) {
                        row.copy_from_slice(&bias[e * b..(e + 1) * b]);
                    }
                    true
                }
                Addend::Base(base) => {
                    dst.copy_from_slice(&base[rows.start * b..rows.end * b]);
                    true
                }
            };
            // B (k = i, n = j) = W[e·b + j, i] = Wᵀ[i, e·b + j].
            let fc = RowGemm {
                a_idx: Some(&routing.tok[rows.clone()]),
                accumulate,
                ..RowGemm::new([m, b, d_in], (x, d_in), (&wt, e * b, nb), b, parallel)
            };
            if !T::row_gemm(&fc, dst) {
                let lhs = token_rows(&routing, x, d_in, rows.clone(), buf);
                let rhs = Mat::new(&wt, e * b, nb, 1);
                gemm_into(m, b, d_in, dst, accumulate, lhs, rhs, par);
            }
            if let Some(act) = act {
                T::eval_slice(act, dst, h_dst);
            }
        });
    (pre, act.map(|_| h))
}

/// `dh ⊙ act'(pre)`, in parallel.
pub(crate) fn act_backward<T: Float + ActScalar>(dh: &[T], pre: &[T], act: Activation) -> Vec<T> {
    crate::activation::grad_par(act, pre, dh)
}

/// Input gradient of the gather-in GEMM: `dx[t] = Σ_{r of t} dh[r] · W_e`. Returns `[T, d_in]`.
pub(crate) fn gather_mm_bwd_x<T: Float>(
    routing: HostRouting<'_>,
    dh: &[T],
    w: &[T],
    d_in: usize,
    b: usize,
) -> Vec<T> {
    let chunk = routing.chunk_tokens();
    let mut dx = vec![T::zero(); routing.n_tokens() * d_in];
    let nc = routing.n_chunks();
    let par = inner_par(nc);
    let parallel = splits(par);
    dx.par_chunks_mut(chunk * d_in.max(1)).enumerate().for_each_init(
        Vec::new,
        |tmp: &mut Vec<T>, (c, dx)| {
            let t0 = c * chunk;
            for e in 0..routing.n_blocks() {
                let rows = routing.group_rows(e * nc + c);
                let m = rows.len();
                if m == 0 || d_in == 0 {
                    continue;
                }
                // B (k = j, n = i) = W[e·b + j, i].
                let back = RowGemm {
                    c_idx: Some((&routing.tok[rows.clone()], t0)),
                    accumulate: true,
                    ..RowGemm::new(
                        [m, d_in, b],
                        (&dh[rows.start * b..], b),
                        (w, e * b * d_in, d_in),
                        d_in,
                        parallel,
                    )
                };
                if T::row_gemm(&back, dx) {
                    continue;
                }
                let rhs = Mat::new(w, e * b * d_in, d_in, 1);
                let lhs = Mat::new(dh, rows.start * b, b, 1);
                if let Some(t) = token_run(routing.tok, rows.clone()) {
                    // Consecutive tokens: add into their dx rows in place (dx starts at zero).
                    let off = (t - t0) * d_in;
                    gemm_into(m, d_in, b, &mut dx[off..off + m * d_in], true, lhs, rhs, par);
                    continue;
                }
                tmp.resize(m * d_in, T::zero());
                gemm_into(m, d_in, b, tmp, false, lhs, rhs, par);
                scatter_add(&routing, dx, t0, tmp, d_in, rows, None);
            }
        },
    );
    dx
}

/// Weight and bias gradients of the gather-in GEMM: `dW_e = dh_eᵀ · x_e`, `db_e = Σ_r dh_e[r]`.
/// Returns `([n_blocks·b, d_in], [n_blocks·b])`; either is skipped when not wanted.
pub(crate) fn gather_mm_bwd_w<T: Float>(
    routing: HostRouting<'_>,
    dh: &[T],
    x: &[T],
    d_in: usize,
    b: usize,
    want_w: bool,
    want_b: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let n = routing.n_blocks();
    let mut dw = if want_w {
        vec![T::zero(); n * b * d_in]
    } else {
        vec![]
    };
    let mut db = if want_b { vec![T::zero(); n * b] } else { vec![] };
    let par = inner_par(n);
    let dw_chunks: Vec<&mut [T]> = if want_w {
        dw.chunks_mut((b * d_in).max(1)).collect()
    } else {
        (0..n).map(|_| &mut [][..]).collect()
    };
    let db_chunks: Vec<&mut [T]> = if want_b {
        db.chunks_mut(b.max(1)).collect()
    } else {
        (0..n).map(|_| &mut [][..]).collect()
    };
    dw_chunks
        .into_par_iter()
        .zip(db_chunks)
        .enumerate()
        .for_each_init(Vec::new, |buf, (e, (dw_e, db_e))| {
            let rows = routing.block_rows(e);
            let mut start = rows.start;
            while start < rows.end {
                let end = (start + ROW_TILE).min(rows.end);
                let m = end - start;
                if want_w && d_in > 0 && b > 0 {
                    let rhs = token_rows(&routing, x, d_in, start..end, buf);
                    // lhs (i = j, k = r) = dh[start + r, j].
                    let lhs = Mat::new(dh, start * b, 1, b);
                    gemm_into(b, d_in, m, dw_e, true, lhs, rhs, par);
                }
                if want_b {
                    for row in dh[start * b..end * b].chunks(b.max(1)) {
                        for (o, &v) in db_e.iter_mut().zip(row) {
                            *o = *o + v;
                        }
                    }
                }
                start = end;
            }
        });
    (want_w.then_some(dw), want_b.then_some(db))
}

/// Forward of the scatter-out GEMM: `y[t] = (bias +) Σ_{r of t} g[r] · h[r] · W_eᵀ`, where `W_e`
/// is the column block `e` of `w` (`[d_out, n_blocks·b]`). Returns `[T, d_out]`.
pub(crate) fn scatter_mm_fwd<T: Float>(
    routing: HostRouting<'_>,
    h: &[T],
    g: &[T],
    w: &[T],
    d_out: usize,
    b: usize,
    bias: Option<&[T]>,
) -> Vec<T> {
    let nb = routing.n_blocks() * b;
    // Wᵀ `[n_blocks·b, d_out]`: block e is a contiguous row range (see `transpose`).
    let wt = transpose(&w[..d_out * nb], d_out, nb);
    let chunk = routing.chunk_tokens();
    let mut y = match bias {
        Some(bias) => bias.repeat(routing.n_tokens()),
        None => vec![T::zero(); routing.n_tokens() * d_out],
    };
    let nc = routing.n_chunks();
    let par = inner_par(nc);
    let parallel = splits(par);
    y.par_chunks_mut(chunk * d_out.max(1))
        .enumerate()
        .for_each_init(Vec::new, |tmp: &mut Vec<T>, (c, y)| {
            let t0 = c * chunk;
            for e in 0..routing.n_blocks() {
                let rows = routing.group_rows(e * nc + c);
                let m = rows.len();
                if m == 0 || d_out == 0 {
                    continue;
                }
                // B (k = j, n = o) = w[o, e·b + j] = Wᵀ[e·b + j, o]; y's rows += g · out.
                let gm = RowGemm {
                    c_idx: Some((&routing.tok[rows.clone()], t0)),
                    alpha: Some(&g[rows.clone()]),
                    accumulate: true,
                    ..RowGemm::new(
                        [m, d_out, b],
                        (&h[rows.start * b..], b),
                        (&wt, e * b * d_out, d_out),
                        d_out,
                        parallel,
                    )
                };
                if T::row_gemm(&gm, y) {
                    continue;
                }
                tmp.resize(m * d_out, T::zero());
                let rhs = Mat::new(&wt, e * b * d_out, d_out, 1);
                gemm_into(
                    m,
                    d_out,
                    b,
                    tmp,
                    false,
                    Mat::new(h, rows.start * b, b, 1),
                    rhs,
                    par,
                );
                scatter_add(&routing, y, t0, tmp, d_out, rows, Some(g));
            }
        });
    y
}

/// Input gradients of the scatter-out GEMM, from `u[r] = dy[tok(r)] · W_e`:
/// `dh[r] = g[r]·u[r]` (`[R, b]`) and `dg[r] = ⟨h[r], u[r]⟩` (`[R]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn scatter_mm_bwd_hg<T: Float>(
    routing: HostRouting<'_>,
    dy: &[T],
    h: &[T],
    g: &[T],
    w: &[T],
    d_out: usize,
    b: usize,
    want_dg: bool,
) -> (Vec<T>, Vec<T>) {
    let nb = routing.n_blocks() * b;
    let nc = routing.n_chunks();
    let r_total = routing.n_rows();
    let mut dh = vec![T::zero(); r_total * b];
    let mut dg = vec![T::zero(); if want_dg { r_total } else { 0 }];
    let par = inner_par(routing.n_blocks() * nc);
    let parallel = splits(par);
    let dh_parts = split_groups(&routing, &mut dh, b);
    let dg_parts: Vec<&mut [T]> = if want_dg {
        split_groups(&routing, &mut dg, 1)
    } else {
        dh_parts.iter().map(|_| &mut [][..]).collect()
    };
    dh_parts
        .into_par_iter()
        .zip(dg_parts)
        .enumerate()
        .for_each_init(Vec::new, |buf, (gi, (dh_g, dg_g))| {
            if dh_g.is_empty() {
                return;
            }
            let e = gi / nc.max(1);
            let rows = routing.group_rows(gi);
            let m = rows.len();
            // u = dy_rows · W_e, B (k = o, n = j) = w[o, e·b + j].
            let u = RowGemm {
                a_idx: Some(&routing.tok[rows.clone()]),
                ..RowGemm::new([m, b, d_out], (dy, d_out), (w, e * b, nb), b, parallel)
            };
            if !T::row_gemm(&u, dh_g) {
                gather_rows(dy, d_out, &routing.tok[rows.clone()], buf);
                let rhs = Mat::new(w, e * b, nb, 1);
                gemm_into(m, b, d_out, dh_g, false, Mat::new(buf, 0, d_out, 1), rhs, par);
            }
            for (i, u) in dh_g.chunks_mut(b).enumerate() {
                let r = rows.start + i;
                if want_dg {
                    let hr = &h[r * b..(r + 1) * b];
                    dg_g[i] = hr
                        .iter()
                        .zip(u.iter())
                        .fold(T::zero(), |acc, (&a, &c)| acc + a * c);
                }
                let gr = g[r];
                for v in u.iter_mut() {
                    *v = *v * gr;
                }
            }
        });
    (dh, dg)
}

/// Weight gradient of the scatter-out GEMM: `dW[:, block e] = Σ_r dy[tok(r)]ᵀ · (g[r]·h[r])`.
/// Returns `[d_out, n_blocks·b]`.
pub(crate) fn scatter_mm_bwd_w<T: Float>(
    routing: HostRouting<'_>,
    dy: &[T],
    h: &[T],
    g: &[T],
    d_out: usize,
    b: usize,
) -> Vec<T> {
    let n = routing.n_blocks();
    let nb = n * b;
    let mut dw = vec![T::zero(); d_out * nb];
    let dst = SendPtr(dw.as_mut_ptr());
    let par = inner_par(n);
    (0..n).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(dybuf, ghbuf): &mut (Vec<T>, Vec<T>), e| {
            let rows = routing.block_rows(e);
            let mut start = rows.start;
            while start < rows.end {
                let end = (start + ROW_TILE).min(rows.end);
                let m = end - start;
                gather_rows(dy, d_out, &routing.tok[start..end], dybuf);
                ghbuf.clear();
                for r in start..end {
                    let gr = g[r];
                    ghbuf.extend(h[r * b..(r + 1) * b].iter().map(|&v| v * gr));
                }
                // lhs (i = o, k = r) = dybuf[r, o]; rhs (k = r, n = j) = ghbuf[r, j].
                let lhs = Mat::new(dybuf, 0, 1, d_out);
                let rhs = Mat::new(ghbuf, 0, b, 1);
                let p = dst;
                // SAFETY: block e's tasks are the only writers of columns [e·b, (e+1)·b) of the
                // [d_out, n·b] buffer, which outlives the parallel loop.
                unsafe { gemm_raw(d_out, b, m, p.0.add(e * b), nb, true, lhs, rhs, par) };
                start = end;
            }
        },
    );
    dw
}
