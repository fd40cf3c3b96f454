//! The whole routed FFN, fc1 → activation → fc2, token chunk by token chunk (CPU, f32 and f64):
//! the kernels of the one-op LoRA FFN (`lora_ops.rs`) and of a frozen layer (`frozen.rs`).
//!
//! Why whole: as two grouped GEMMs (`cpu.rs`), the hidden rows `[R, b]` go to memory between
//! them, and the backward passes over `[R, b]` buffers once per product: h's gradient, the
//! activation's backward, fc1's input gradient, and LoRA's four adapter products. Here a chunk
//! runs each block's two GEMMs while that group's rows are in cache; only the pre-activation,
//! from which the backward recomputes h, is written (and not at all in inference).
//! The GEMMs that read token rows (x, dy) or add into them (y, dx) do so in place through
//! [`crate::row_gemm`] where it runs (f32 on AVX-512), instead of a gather, gemm and a scatter.
//!
//! Parallel over token chunks. Each chunk owns its tokens' rows, its groups' routed rows and its
//! partial adapter gradients, which are summed in chunk order: no atomics, and results do not
//! depend on the thread count.

use super::cpu::{group_rows, scatter_add, split_groups, token_rows, HostRouting};
use super::router::token_run;
use crate::activation::{ActScalar, Activation};
use crate::amx::Bf16Matrix;
use crate::blas::{gemm_into, inner_par, splits, transpose, Mat};
use crate::precision::{bf16_matmul_t, bf16_weight};
use crate::row_gemm::RowGemm;
use crate::util::{sum_partials, Float};
use rayon::prelude::*;

/// `buf` split into `n` consecutive parts of `per` elements (the last ones shorter or empty).
fn split_chunks<T>(buf: &mut [T], per: usize, n: usize) -> Vec<&mut [T]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = buf;
    for _ in 0..n {
        let k = per.min(rest.len());
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(k);
        parts.push(head);
        rest = tail;
    }
    parts
}

/// The routed rows of `buf` (`[R, width]`, or empty: then every part is empty) by chunk: entry
/// `c` holds group `(e, c)`'s rows at index `e`.
fn groups_by_chunk<'a, T>(hr: &HostRouting<'_>, buf: &'a mut [T], width: usize) -> Vec<Vec<&'a mut [T]>> {
    let (nc, n) = (hr.n_chunks(), hr.n_blocks());
    let mut by_chunk: Vec<Vec<&mut [T]>> = (0..nc).map(|_| Vec::with_capacity(n)).collect();
    if buf.is_empty() {
        for parts in &mut by_chunk {
            parts.extend((0..n).map(|_| &mut [][..]));
        }
        return by_chunk;
    }
    for (g, part) in split_groups(hr, buf, width).into_iter().enumerate() {
        by_chunk[g % nc].push(part);
    }
    by_chunk
}

/// Each block's `M_e` packed for bf16 products (`precision`) from `Mᵀ` by blocks (`mt`: block e
/// is `M_eᵀ [cols, rows]` row-major), where `T`'s products take bf16 inputs.
fn bf16_blocks<T: Float>(mt: &[T], n: usize, rows: usize, cols: usize) -> Option<Vec<Bf16Matrix>> {
    if n == 0 {
        return None;
    }
    let size = rows * cols;
    (0..n)
        .map(|e| bf16_weight(&mt[e * size..(e + 1) * size], rows, cols, true))
        .collect()
}

/// fc1's and fc2's blocks packed for bf16 products, as [`forward`] packs them from its operands.
pub(crate) type PackedBlocks = (Vec<Bf16Matrix>, Vec<Bf16Matrix>);

/// [`forward`]'s packing of `f`'s weights for `n` blocks, where `T`'s products take bf16 inputs:
/// a frozen layer keeps it (`frozen.rs`).
pub(crate) fn pack_forward<T: Float>(f: &Forward<'_, T>, n: usize) -> Option<PackedBlocks> {
    bf16_blocks(f.w1b, n, f.block, f.d).zip(bf16_blocks(f.w2t, n, f.d_out, f.block))
}

/// Scratch buffers a chunk's task reuses from group to group.
struct Scratch<T> {
    rows: Vec<T>,
    pre: Vec<T>,
    h: Vec<T>,
    out: Vec<T>,
    small: Vec<T>,
    small2: Vec<T>,
    act: Vec<T>,
    /// act'(pre) of a group's rows (backward).
    deriv: Vec<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            pre: Vec::new(),
            h: Vec::new(),
            out: Vec::new(),
            small: Vec::new(),
            small2: Vec::new(),
            act: Vec::new(),
            deriv: Vec::new(),
        }
    }
}

/// The operands of the forward: `w1b = W1ᵀ` by blocks, `[n, d, b]` (block e is `W1_eᵀ`, so
/// fc1's B is compact), `w2t = W2ᵀ [n·b, d_out]` (LoRA folded in).
pub(crate) struct Forward<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) w1b: &'a [T],
    pub(crate) b1: &'a [T],
    pub(crate) gates: &'a [T],
    pub(crate) w2t: &'a [T],
    pub(crate) b2: &'a [T],
    pub(crate) d: usize,
    pub(crate) d_out: usize,
    pub(crate) block: usize,
    pub(crate) act: Activation,
    /// The weights already packed for bf16 products ([`pack_forward`]); None: packed per call
    /// where `T`'s products take bf16 inputs.
    pub(crate) packed: Option<&'a PackedBlocks>,
}

/// `y[t] = b2 + Σ_{rows r of t} g[r] · act(x[t] W1_eᵀ + b1_e) W2_eᵀ`, `[T, d_out]`. With `keep`,
/// also the pre-activation `[R, b]`, all the backward needs of the hidden rows.
pub(crate) fn forward<T: Float + ActScalar>(
    hr: HostRouting<'_>,
    f: &Forward<'_, T>,
    keep: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let (nc, b, d, d_out) = (hr.n_chunks(), f.block, f.d, f.d_out);
    let chunk = hr.chunk_tokens();
    let mut y = f.b2.repeat(hr.n_tokens());
    let mut pre = vec![T::zero(); if keep { hr.n_rows() * b } else { 0 }];
    let pre_parts = groups_by_chunk(&hr, &mut pre, b);
    let par = inner_par(nc);
    let parallel = splits(par);
    // bf16: fc1's `W1_e` from `W1_eᵀ` (w1b), fc2's `W2_e` from `W2_eᵀ` (w2t's rows).
    let n = hr.n_blocks();
    let per_call = f.packed.is_none().then(|| pack_forward(f, n)).flatten();
    let bf16 = f.packed.or(per_call.as_ref());
    split_chunks(&mut y, chunk * d_out, nc)
        .into_par_iter()
        .zip(pre_parts)
        .enumerate()
        .for_each_init(Scratch::default, |s, (c, (y, pre_c))| {
            let t0 = c * chunk;
            for (e, pre_kept) in pre_c.into_iter().enumerate() {
                let rows = hr.group_rows(e * nc + c);
                let m = rows.len();
                if m == 0 {
                    continue;
                }
                let tok = &hr.tok[rows.clone()];
                let pre_g: &mut [T] = if keep {
                    pre_kept
                } else {
                    s.pre.resize(m * b, T::zero());
                    &mut s.pre[..m * b]
                };
                s.h.resize(m * b, T::zero());
                let h_g = &mut s.h[..m * b];
                for row in pre_g.chunks_mut(b) {
                    row.copy_from_slice(&f.b1[e * b..(e + 1) * b]);
                }
                // B (k = i, n = j) = W1[e·b + j, i] = w1b[e, i, j].
                let fc1 = RowGemm {
                    a_idx: Some(tok),
                    accumulate: true,
                    ..RowGemm::new([m, b, d], (f.x, d), (f.w1b, e * d * b, b), b, parallel)
                };
                if let Some((w1, _)) = &bf16 {
                    let x_g = group_rows(&hr, f.x, d, rows.clone(), &mut s.rows);
                    bf16_matmul_t(Some(&w1[e]), x_g, m, pre_g, true);
                } else if !T::row_gemm(&fc1, pre_g) {
                    let lhs = token_rows(&hr, f.x, d, rows.clone(), &mut s.rows);
                    gemm_into(m, b, d, pre_g, true, lhs, Mat::new(f.w1b, e * d * b, b, 1), par);
                }
                T::eval_slice(f.act, pre_g, h_g);
                if d_out == 0 {
                    continue;
                }
                // B (k = j, n = o) = W2[o, e·b + j] = W2ᵀ[e·b + j, o]; y's rows += g · out.
                let fc2 = RowGemm {
                    c_idx: Some((tok, t0)),
                    alpha: Some(&f.gates[rows.clone()]),
                    accumulate: true,
                    ..RowGemm::new(
                        [m, d_out, b],
                        (h_g, b),
                        (f.w2t, e * b * d_out, d_out),
                        d_out,
                        parallel,
                    )
                };
                if let Some((_, w2)) = &bf16 {
                    s.out.resize(m * d_out, T::zero());
                    bf16_matmul_t(Some(&w2[e]), h_g, m, &mut s.out, false);
                    scatter_add(&hr, y, t0, &s.out, d_out, rows, Some(f.gates));
                } else if !T::row_gemm(&fc2, y) {
                    s.out.resize(m * d_out, T::zero());
                    let rhs = Mat::new(f.w2t, e * b * d_out, d_out, 1);
                    gemm_into(m, d_out, b, &mut s.out, false, Mat::new(h_g, 0, b, 1), rhs, par);
                    scatter_add(&hr, y, t0, &s.out, d_out, rows, Some(f.gates));
                }
            }
        });
    (y, keep.then_some(pre))
}

/// What the backward reads: the forward's inputs and kept pre-activation, the merged weights
/// `m1 = W1' [d_ff, d]` and `m2 = W2'` by blocks of columns, `[n, d_out, b]` (block e is
/// `W2'_e`), and the adapters `A1 [r, d]`, `B1 [d_ff, r]`, `A2 [r, d_ff]`, `B2 [d_out, r]` with
/// their scale.
pub(crate) struct Backward<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) gates: &'a [T],
    pub(crate) pre: &'a [T],
    pub(crate) dy: &'a [T],
    pub(crate) m1: &'a [T],
    pub(crate) m2: &'a [T],
    pub(crate) a1: &'a [T],
    pub(crate) b1: &'a [T],
    pub(crate) a2: &'a [T],
    pub(crate) b2: &'a [T],
    pub(crate) scale: T,
    pub(crate) d: usize,
    pub(crate) d_out: usize,
    pub(crate) r: usize,
    pub(crate) block: usize,
    pub(crate) act: Activation,
}

/// The gradients of x `[T, d]`, the gates `[R]` and the adapters, `[A1, B1, A2, B2]` flattened
/// in that order; each empty when not wanted.
pub(crate) struct Grads<T> {
    pub(crate) dx: Vec<T>,
    pub(crate) dgates: Vec<T>,
    pub(crate) dadapters: Vec<T>,
}

/// One chunk's share of the outputs.
struct ChunkOut<'a, T> {
    dx: &'a mut [T],
    dgates: Vec<&'a mut [T]>,
    /// Σ over the chunk's rows of `dpre · B1_e` per token, `[chunk, r]`.
    du: &'a mut [T],
    /// Σ over the chunk's rows of `g·h · A2_eᵀ` per token, `[chunk, r]`.
    v: &'a mut [T],
    /// The chunk's part of `dB1 / s` `[d_ff, r]` and of `dA2ᵀ` `[d_ff, r]`.
    db1: &'a mut [T],
    da2t: &'a mut [T],
}

/// The backward of [`forward`] with LoRA on both projections (`y = b2 + Σ g · act(x W1'_eᵀ +
/// b1_e) W2'_eᵀ`, `W' = W + s·B A`):
/// - per group: `u = dy W2'_e`, `dg = ⟨h, u⟩`, `dh = g·u`, `dpre = dh ⊙ act'(pre)`,
///   `dx += dpre W1'_e`;
/// - adapters: `dA1 = s·duᵀ x` with `du = Σ dpre B1_e`; `dB1_e = s·dpre_eᵀ (x A1ᵀ)`;
///   `dA2_eᵀ = (g·h)_eᵀ dv` with `dv = s·dy B2`; `dB2 = s·dyᵀ v` with `v = Σ g·h A2_eᵀ`.
pub(crate) fn backward<T: Float + ActScalar>(
    hr: HostRouting<'_>,
    p: &Backward<'_, T>,
    want: [bool; 3],
) -> Grads<T> {
    let (nc, n, b, d, r, d_out) = (hr.n_chunks(), hr.n_blocks(), p.block, p.d, p.r, p.d_out);
    let (nb, tokens, chunk) = (n * b, hr.n_tokens(), hr.chunk_tokens());
    let [want_dx, want_dg, want_ad] = want;
    let par = inner_par(nc);
    let parallel = splits(par);
    let mut dx = vec![T::zero(); if want_dx { tokens * d } else { 0 }];
    let mut dgates = vec![T::zero(); if want_dg { hr.n_rows() } else { 0 }];
    let lr = if want_ad { r } else { 0 };
    let (mut du, mut v) = (vec![T::zero(); tokens * lr], vec![T::zero(); tokens * lr]);
    let (mut db1, mut da2t) = (vec![T::zero(); nc * nb * lr], vec![T::zero(); nc * nb * lr]);
    // x A1ᵀ and s·dy B2, `[T, r]`: the adapters' side of the routed rows.
    let (u1, dv) = if want_ad {
        (
            times_bt(p.x, p.a1, d, r, T::one()),
            times(p.dy, p.b2, d_out, r, p.scale),
        )
    } else {
        (vec![], vec![])
    };
    let a2t = if want_ad { transpose(p.a2, r, nb) } else { vec![] };
    // bf16: `u = dy W2'_e` with `W2'_eᵀ` from m2's blocks, `dx += dpre W1'_e` with `W1'_eᵀ`
    // from m1's rows.
    let bf16 = bf16_blocks(p.m2, n, b, d_out).zip(if want_dx {
        bf16_blocks(p.m1, n, d, b)
    } else {
        Some(vec![])
    });
    // All parts empty when the gates' gradient is not wanted.
    let dg_parts = groups_by_chunk(&hr, &mut dgates, 1);
    let outs: Vec<ChunkOut<'_, T>> = split_chunks(&mut dx, chunk * d, nc)
        .into_iter()
        .zip(dg_parts)
        .zip(split_chunks(&mut du, chunk * lr, nc))
        .zip(split_chunks(&mut v, chunk * lr, nc))
        .zip(split_chunks(&mut db1, nb * lr, nc))
        .zip(split_chunks(&mut da2t, nb * lr, nc))
        .map(|(((((dx, dgates), du), v), db1), da2t)| ChunkOut {
            dx,
            dgates,
            du,
            v,
            db1,
            da2t,
        })
        .collect();
    outs.into_par_iter()
        .enumerate()
        .for_each_init(Scratch::default, |s, (c, mut out)| {
            let t0 = c * chunk;
            for e in 0..n {
                let rows = hr.group_rows(e * nc + c);
                let m = rows.len();
                if m == 0 {
                    continue;
                }
                let (lo, hi) = (rows.start * b, rows.end * b);
                // h again from the kept pre-activation: one [R, b] tensor fewer held per layer;
                // act'(pre) in the same pass where dpre is wanted (they share erf).
                let pre_g = &p.pre[lo..hi];
                let want_dpre = want_dx || want_ad;
                s.act.resize(m * b, T::zero());
                if want_dpre {
                    s.deriv.resize(m * b, T::zero());
                    T::eval_grad_slice(p.act, pre_g, &mut s.act, &mut s.deriv);
                } else {
                    T::eval_slice(p.act, pre_g, &mut s.act);
                }
                let h_g = &s.act[..];
                // u = dy_rows · W2'_e, B (k = o, n = j) = W2'[o, e·b + j] = m2[e, o, j]; then
                // dh in place.
                let tok = &hr.tok[rows.clone()];
                s.h.resize(m * b, T::zero());
                let m2_e = (p.m2, e * d_out * b, b);
                let u = RowGemm {
                    a_idx: Some(tok),
                    ..RowGemm::new([m, b, d_out], (p.dy, d_out), m2_e, b, parallel)
                };
                if let Some((w2, _)) = &bf16 {
                    let dy_g = group_rows(&hr, p.dy, d_out, rows.clone(), &mut s.rows);
                    bf16_matmul_t(Some(&w2[e]), dy_g, m, &mut s.h, false);
                } else if !T::row_gemm(&u, &mut s.h) {
                    let dy_rows = token_rows(&hr, p.dy, d_out, rows.clone(), &mut s.rows);
                    let rhs = Mat::new(p.m2, e * d_out * b, b, 1);
                    gemm_into(m, b, d_out, &mut s.h, false, dy_rows, rhs, par);
                }
                s.pre.clear();
                for (i, (hrow, urow)) in h_g.chunks(b).zip(s.h.chunks_mut(b)).enumerate() {
                    let gr = p.gates[rows.start + i];
                    if want_dg {
                        out.dgates[e][i] = hrow
                            .iter()
                            .zip(urow.iter())
                            .fold(T::zero(), |acc, (&a, &u)| acc + a * u);
                    }
                    urow.iter_mut().for_each(|u| *u = *u * gr);
                    if want_ad {
                        s.pre.extend(hrow.iter().map(|&v| v * gr));
                    }
                }
                if want_ad {
                    // dA2ᵀ_e += (g·h)ᵀ dv_rows; v_rows += (g·h) A2_eᵀ.
                    let gh = Mat::new(&s.pre, 0, 1, b);
                    let dv_rows = token_rows(&hr, &dv, r, rows.clone(), &mut s.small);
                    gemm_into(
                        b,
                        r,
                        m,
                        &mut out.da2t[e * b * r..(e + 1) * b * r],
                        true,
                        gh,
                        dv_rows,
                        par,
                    );
                    s.small2.resize(m * r, T::zero());
                    let a2_e = Mat::new(&a2t, e * b * r, r, 1);
                    gemm_into(
                        m,
                        r,
                        b,
                        &mut s.small2,
                        false,
                        Mat::new(&s.pre, 0, b, 1),
                        a2_e,
                        par,
                    );
                    scatter_add(&hr, out.v, t0, &s.small2, r, rows.clone(), None);
                }
                if !want_dpre {
                    continue; // the gates' gradient was all this group owed
                }
                // dpre = dh ⊙ act'(pre), into the gh buffer (no longer read).
                s.pre.clear();
                s.pre.extend(s.h.iter().zip(&s.deriv).map(|(&g, &d)| g * d));
                let dpre = Mat::new(&s.pre, 0, b, 1);
                // dx_rows += dpre · W1'_e, B (k = j, n = i) = W1'[e·b + j, i].
                let dx_g = RowGemm {
                    c_idx: Some((tok, t0)),
                    accumulate: true,
                    ..RowGemm::new([m, d, b], (&s.pre, b), (p.m1, e * b * d, d), d, parallel)
                };
                let bf16_dx = bf16.as_ref().filter(|_| want_dx).map(|(_, w1)| &w1[e]);
                if want_dx && d > 0 && (bf16_dx.is_some() || !T::row_gemm(&dx_g, out.dx)) {
                    let rhs = Mat::new(p.m1, e * b * d, d, 1);
                    let product = |c: &mut [T], accumulate| {
                        if !bf16_matmul_t(bf16_dx, &s.pre, m, c, accumulate) {
                            gemm_into(m, d, b, c, accumulate, dpre, rhs, par);
                        }
                    };
                    match token_run(hr.tok, rows.clone()) {
                        Some(t) => {
                            let off = (t - t0) * d;
                            product(&mut out.dx[off..off + m * d], true);
                        }
                        None => {
                            let mut prod = std::mem::take(&mut s.out);
                            prod.resize(m * d, T::zero());
                            product(&mut prod, false);
                            scatter_add(&hr, out.dx, t0, &prod, d, rows.clone(), None);
                            s.out = prod;
                        }
                    }
                }
                if want_ad {
                    // du_rows += dpre · B1_e; dB1_e += dpreᵀ u1_rows.
                    s.small2.resize(m * r, T::zero());
                    let b1_e = Mat::new(p.b1, e * b * r, r, 1);
                    gemm_into(m, r, b, &mut s.small2, false, dpre, b1_e, par);
                    scatter_add(&hr, out.du, t0, &s.small2, r, rows.clone(), None);
                    let u1_rows = token_rows(&hr, &u1, r, rows.clone(), &mut s.small);
                    let dpre_t = Mat::new(&s.pre, 0, 1, b);
                    gemm_into(
                        b,
                        r,
                        m,
                        &mut out.db1[e * b * r..(e + 1) * b * r],
                        true,
                        dpre_t,
                        u1_rows,
                        par,
                    );
                }
            }
        });
    let dadapters = if want_ad {
        // [A1 r·d, B1 d_ff·r, A2 r·d_ff, B2 d·r], the chunks' parts summed in chunk order.
        let mut g = times_at_b(&du, p.x, r, d, p.scale);
        g.extend(
            sum_partials(db1.chunks((nb * r).max(1)), nb * r)
                .into_iter()
                .map(|v| v * p.scale),
        );
        g.extend(transpose(
            &sum_partials(da2t.chunks((nb * r).max(1)), nb * r),
            nb,
            r,
        ));
        g.extend(times_at_b(p.dy, &v, d_out, r, p.scale));
        g
    } else {
        vec![]
    };
    Grads {
        dx,
        dgates,
        dadapters,
    }
}

/// `s · x M`, `[n, r]`, for `x [n, k]` and `M [k, r]`.
fn times<T: Float>(x: &[T], m: &[T], k: usize, r: usize, s: T) -> Vec<T> {
    let n = x.len() / k.max(1);
    let mut out = vec![T::zero(); n * r];
    gemm_into(
        n,
        r,
        k,
        &mut out,
        false,
        Mat::new(x, 0, k, 1),
        Mat::new(m, 0, r, 1),
        inner_par(1),
    );
    if s != T::one() {
        out.iter_mut().for_each(|v| *v = *v * s);
    }
    out
}

/// `s · x Mᵀ`, `[n, r]`, for `x [n, k]` and `M [r, k]`.
fn times_bt<T: Float>(x: &[T], m: &[T], k: usize, r: usize, s: T) -> Vec<T> {
    times(x, &transpose(m, r, k), k, r, s)
}

/// `s · pᵀ q`, `[m, n]`, for `p [k, m]` and `q [k, n]`.
fn times_at_b<T: Float>(p: &[T], q: &[T], m: usize, n: usize, s: T) -> Vec<T> {
    let k = p.len() / m.max(1);
    let mut out = vec![T::zero(); m * n];
    gemm_into(
        m,
        n,
        k,
        &mut out,
        false,
        Mat::new(p, 0, 1, m),
        Mat::new(q, 0, n, 1),
        inner_par(1),
    );
    out.iter_mut().for_each(|v| *v = *v * s);
    out
}
