//! The unmerged LoRA layer as one op: `y = x Wᵀ + b + s·(x Aᵀ) Bᵀ` with W, b frozen.
//!
//! Composed from candle ops this is six graph nodes of `[N, out]` or `[N, in]` (the base matmul,
//! the bias, two LoRA matmuls, the scale, the sum), and candle's backward zero-fills and adds a
//! gradient buffer for every input of every node. One op keeps one node, recomputes the rank-r
//! `x Aᵀ` in backward instead of storing it, and never forms dW.
//!
//! Both passes multiply by the merged weight `W + s·B A`, formed per call (`out·in` elements
//! and a rank-r product, small beside the `N·out·in` GEMM): the forward is then one GEMM instead
//! of three, two of them rank-r ones that each streamed all of x or all of y, and the backward's
//! dx is one GEMM instead of two. The adapters stay unmerged: the gradients are those of A and B.

use super::linear;
use crate::blas::{column_blocks, gemm_into, inner_par, transpose, transpose_blocks, Mat, SendPtr};
use crate::heads::{merge_heads, split_heads, RowLayout};
use crate::precision::{bf16_matmul_t, bf16_products, bf16_weight};
use crate::simd::Vector;
use crate::util::{
    check_float, check_frozen, check_same, contiguous, if_tracked, sum_partials, with_slices, Float,
};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Rows per rayon task; each task runs its own small GEMMs.
const ROWS_PER_TASK: usize = 256;

/// Up to this many rows the forward leaves the update unmerged (decoding runs one row per
/// sequence): forming and transposing `W + s·B A` costs ~1-1.7 ms per GPT-2 weight whatever the
/// rows, the unmerged GEMMs 0.1 ms for one row, 0.4-0.6 ms for 2-16, 1.8-2.4 ms for 64 (the
/// merged 2.6-3.9 ms), and about the same as merged from 128 rows on (2 cores, f32, GPT-2's
/// 2304 × 768, 3072 × 768 and 768 × 3072).
const UNMERGED_ROWS: usize = 64;

/// `x [.., in] Wᵀ + b + scale·(x Aᵀ) Bᵀ` for `W [out, in]`, `b [out]`, `A [r, in]`, `B [out, r]`,
/// differentiable in x, A and B. W and b must be frozen: a tracked one (a `Var`, or a tensor an
/// op recorded) is an error, since the op computes no gradient for them (train a full weight
/// with `linear`). On the CPU in f32/f64 one fused op; elsewhere the composed form, which gives
/// the same values.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    lora_linear_heads(x, w, bias, a, b, scale, HeadsLayout::default())
}

/// Attention-head layouts [`lora_linear_heads`] reads and writes directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadsLayout {
    /// x is attention's context `[B, H, L, d]`, read as `[B, L, H·d]` (`merge_heads` fused in).
    pub input_heads: bool,
    /// y is written as `[B, H, L, out/H]` for this many heads (`split_heads` fused in).
    pub output_heads: Option<usize>,
}

/// [`lora_linear`] reading x from, or writing y to, the attention-head layout: the same values
/// as `split_heads(lora_linear(merge_heads(x)), H)` with each step present only when asked.
/// Why: each of those steps is a graph node, and candle's backward zero-fills and adds an
/// activation-sized gradient for every node's input (four per attention layer); here the
/// fused kernel gathers and scatters the rows of each task instead.
pub fn lora_linear_heads(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    layout: HeadsLayout,
) -> Result<Tensor> {
    let op = "lora_linear";
    check_float(op, "x", x)?;
    check_same(op, &[("x", x), ("w", w), ("a", a), ("b", b)])?;
    // On every device, so that a model gets the same answer on the CPU and off it.
    check_frozen(op, &[("w", w)])?;
    if let Some(bias) = bias {
        check_frozen(op, &[("bias", bias)])?;
    }
    let (out, d_in) = match w.dims() {
        &[o, i] if o > 0 && i > 0 => (o, i),
        d => bail!("{op}: w is {d:?}, expected [out, in] with out, in ≥ 1"),
    };
    let r = match a.dims() {
        &[r, i] if i == d_in && r > 0 => r,
        d => bail!("{op}: a is {d:?}, expected [r, {d_in}] for w [{out}, {d_in}]"),
    };
    if b.dims() != [out, r] {
        bail!(
            "{op}: b is {:?}, expected [{out}, {r}] for w [{out}, {d_in}], a [{r}, {d_in}]",
            b.dims()
        );
    }
    if let Some(bias) = bias {
        check_same(op, &[("x", x), ("bias", bias)])?;
        if bias.dims() != [out] {
            bail!("{op}: bias is {:?}, expected [{out}]", bias.dims());
        }
    }
    // The dims that index rows ([B, L] for a heads input), and x's row layout.
    let (lead, input) = match (layout.input_heads, x.dims()) {
        (false, [lead @ .., last]) if *last == d_in => (lead.to_vec(), RowLayout::Plain),
        (true, &[bs, h, l, dh]) if h * dh == d_in => (vec![bs, l], RowLayout::Heads { h, l }),
        (true, d) => bail!("{op}: x is {d:?}, expected heads [B, H, L, d] with H·d = {d_in}"),
        (false, d) => bail!("{op}: x is {d:?}, expected [.., {d_in}] to match w [{out}, {d_in}]"),
    };
    let (shape, output) = match (layout.output_heads, lead.as_slice()) {
        (None, _) => ([lead.as_slice(), &[out]].concat(), RowLayout::Plain),
        (Some(h), &[bs, l]) if h > 0 && out % h == 0 => (vec![bs, h, l, out / h], RowLayout::Heads { h, l }),
        (Some(h), _) => bail!(
            "{op}: cannot write {out} outputs as {h} heads of x {:?} (needs [B, L, in] or heads input, and H dividing {out})",
            x.dims()
        ),
    };
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        let x = if layout.input_heads {
            merge_heads(x)?
        } else {
            x.clone()
        };
        let delta = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        let y = linear(&x, w, bias)?.add(&(delta * scale)?)?;
        return match layout.output_heads {
            Some(h) => split_heads(&y, h),
            None => Ok(y),
        };
    }
    let fused = FusedLora {
        w: w.contiguous()?,
        bias: bias.map(|t| t.contiguous()).transpose()?,
        dims: (out, d_in, r),
        scale,
        io: (input, output),
        shape: Shape::from(shape),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, fused)
}

struct FusedLora {
    w: Tensor,
    bias: Option<Tensor>,
    /// (out, in, r).
    dims: (usize, usize, usize),
    scale: f64,
    /// Where x's and y's rows are.
    io: (RowLayout, RowLayout),
    /// y's shape.
    shape: Shape,
}

/// `W + s·B A`, `[out, in]`.
pub(crate) fn merged<T: Float>(w: &[T], a: &[T], b: &[T], dims: (usize, usize, usize), s: T) -> Vec<T> {
    merged_into(w.to_vec(), a, b, dims, s)
}

/// `s·B` (`[out, r]`), the factor every merge multiplies by.
fn scaled<T: Float>(b: &[T], s: T) -> Vec<T> {
    b.iter().map(|&v| v * s).collect()
}

/// `(W + s·B A)ᵀ`, `[in, out]`: W transposed in tiles, then `s·Aᵀ Bᵀ` added by one GEMM, a
/// pass over the weight fewer than merging a copy and transposing it.
pub(crate) fn merged_t<T: Float>(w: &[T], a: &[T], b: &[T], dims: (usize, usize, usize), s: T) -> Vec<T> {
    let (out, d_in, r) = dims;
    let mut m = transpose(w, out, d_in);
    let sb = scaled(b, s);
    gemm_into(
        d_in,
        out,
        r,
        &mut m,
        true,
        Mat::new(a, 0, 1, d_in),
        Mat::new(&sb, 0, 1, r),
        inner_par(1),
    );
    m
}

/// [`merged_t`] by blocks of `block` output rows, `[out / block, in, block]` (see
/// `blas::transpose_blocks`): block e is `(W_e + s·B_e A)ᵀ`.
pub(crate) fn merged_t_blocks<T: Float>(
    w: &[T],
    a: &[T],
    b: &[T],
    dims: (usize, usize, usize),
    s: T,
    block: usize,
) -> Vec<T> {
    let (out, d_in, r) = dims;
    let mut m = transpose_blocks(w, out, d_in, block);
    if r == 0 {
        return m;
    }
    let sb = scaled(b, s);
    m.par_chunks_mut((d_in * block).max(1))
        .enumerate()
        .for_each(|(e, m_e)| {
            let sb_e = Mat::new(&sb, e * block * r, 1, r);
            gemm_into(
                d_in,
                block,
                r,
                m_e,
                true,
                Mat::new(a, 0, 1, d_in),
                sb_e,
                Parallelism::None,
            );
        });
    m
}

/// [`merged`] by blocks of `block` input columns, `[in / block, out, block]` (see
/// `blas::column_blocks`): block e is `W_e + s·B A_e`, W's and A's columns of the block.
pub(crate) fn merged_column_blocks<T: Float>(
    w: &[T],
    a: &[T],
    b: &[T],
    dims: (usize, usize, usize),
    s: T,
    block: usize,
) -> Vec<T> {
    let (out, d_in, r) = dims;
    let mut m = column_blocks(w, out, d_in, block);
    if r == 0 {
        return m; // no adapter to add (and A has no columns to offset into)
    }
    let sb = scaled(b, s);
    m.par_chunks_mut((out * block).max(1))
        .enumerate()
        .for_each(|(e, m_e)| {
            let a_e = Mat::new(a, e * block, d_in, 1);
            gemm_into(
                out,
                block,
                r,
                m_e,
                true,
                Mat::new(&sb, 0, r, 1),
                a_e,
                Parallelism::None,
            );
        });
    m
}

/// [`merged`] on `w`'s own copy, `m` (`[out, in]`): `m + s·B A`.
pub(crate) fn merged_into<T: Float>(
    mut m: Vec<T>,
    a: &[T],
    b: &[T],
    dims: (usize, usize, usize),
    s: T,
) -> Vec<T> {
    let (out, d_in, r) = dims;
    let sb = scaled(b, s);
    gemm_into(
        out,
        d_in,
        r,
        &mut m,
        true,
        Mat::new(&sb, 0, r, 1),
        Mat::new(a, 0, d_in, 1),
        inner_par(1),
    );
    m
}

/// Forward over row tasks: `y = b + x (W + s·B A)ᵀ`, x's and y's rows laid out as `io` says.
#[allow(clippy::too_many_arguments)]
fn forward<T: Vector>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    a: &[T],
    b: &[T],
    dims: (usize, usize, usize),
    s: T,
    io: (RowLayout, RowLayout),
) -> Vec<T> {
    let (out, d_in, _) = dims;
    let n = x.len() / d_in;
    let mut y = vec![T::zero(); n * out];
    let tasks = n.div_ceil(ROWS_PER_TASK);
    let par = inner_par(tasks);
    if n <= UNMERGED_ROWS {
        forward_unmerged(x, w, bias, a, b, dims, s, io, &mut y, par);
        return y;
    }
    // bf16: the merged weight packed for the AMX kernel; f32: read as `[in, out]` row by row
    // (see `blas::transpose`).
    let packed = bf16_products::<T>()
        .then(|| bf16_weight(&merged(w, a, b, dims, s), out, d_in, false))
        .flatten();
    let wt = if packed.is_some() {
        Vec::new()
    } else {
        merged_t(w, a, b, dims, s)
    };
    let dst = SendPtr(y.as_mut_ptr());
    (0..tasks).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(xbuf, ybuf), c| {
            let r0 = c * ROWS_PER_TASK;
            let m = ROWS_PER_TASK.min(n - r0);
            let xc = io.0.read(x, d_in, r0, m, xbuf);
            let fill = |yc: &mut [T]| {
                if let Some(bias) = bias {
                    yc.chunks_mut(out).for_each(|row| row.copy_from_slice(bias));
                }
                if bf16_matmul_t(packed.as_ref(), xc, m, yc, bias.is_some()) {
                    return;
                }
                let xc = Mat::new(xc, 0, d_in, 1);
                gemm_into(
                    m,
                    out,
                    d_in,
                    yc,
                    bias.is_some(),
                    xc,
                    Mat::new(&wt, 0, out, 1),
                    par,
                );
            };
            // SAFETY: `y` holds all n rows and each task writes only its own.
            unsafe { io.1.write(dst, out, r0, m, ybuf, fill) };
        },
    );
    y
}

/// The forward for a few rows (decoding): `b + x Wᵀ + s·(x Aᵀ) Bᵀ` as three GEMMs, W read in
/// place, instead of forming and transposing the merged weight (three passes over W for one
/// row's GEMV, which reads it once).
#[allow(clippy::too_many_arguments)]
fn forward_unmerged<T: Vector>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    a: &[T],
    b: &[T],
    dims: (usize, usize, usize),
    s: T,
    io: (RowLayout, RowLayout),
    y: &mut [T],
    par: Parallelism,
) {
    let (out, d_in, r) = dims;
    let n = x.len() / d_in;
    let mut xbuf = Vec::new();
    let xc = io.0.read(x, d_in, 0, n, &mut xbuf);
    let mut su = vec![T::zero(); n * r];
    gemm_into(
        n,
        r,
        d_in,
        &mut su,
        false,
        Mat::new(xc, 0, d_in, 1),
        Mat::new(a, 0, 1, d_in),
        par,
    );
    su.iter_mut().for_each(|v| *v = *v * s);
    // yᵀ = W xᵀ with W read row-major as the left operand (as the right one, read down its
    // columns, gemm would pack W one strided element at a time), then y = (yᵀ)ᵀ. One row
    // (decoding) is a matrix-vector product, which gemm runs on one thread: `gemv` uses all.
    let mut yt = vec![T::zero(); out * n];
    if n == 1 {
        crate::gemv::rows_dot(w, xc, &mut yt);
    } else {
        gemm_into(
            out,
            n,
            d_in,
            &mut yt,
            false,
            Mat::new(w, 0, d_in, 1),
            Mat::new(xc, 0, 1, d_in),
            par,
        );
    }
    // Back to rows in tiles: a strided scalar loop here was ~8 % of a one-text SPT forward.
    let yr = if n == 1 { yt } else { transpose(&yt, out, n) };
    let fill = |yc: &mut [T]| {
        for (row, src) in yc.chunks_mut(out).zip(yr.chunks(out)) {
            match bias {
                Some(bias) => {
                    for ((v, &p), &bj) in row.iter_mut().zip(src).zip(bias) {
                        *v = p + bj;
                    }
                }
                None => row.copy_from_slice(src),
            }
        }
        gemm_into(
            n,
            out,
            r,
            yc,
            true,
            Mat::new(&su, 0, r, 1),
            Mat::new(b, 0, 1, r),
            par,
        );
    };
    let mut ybuf = Vec::new();
    // SAFETY: `y` holds all n rows, and this one call writes them.
    unsafe { io.1.write(SendPtr(y.as_mut_ptr()), out, 0, n, &mut ybuf, fill) };
}

/// Backward over row tasks: `du = s·g B`, `dx = g (W + s·B A)`, and per-task partials of
/// `dA = duᵀ x` and `dB = s·gᵀ (x Aᵀ)`, summed in task order (deterministic for any thread count).
#[allow(clippy::too_many_arguments)]
fn backward<T: Float>(
    x: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    g: &[T],
    dims: (usize, usize, usize),
    s: T,
    io: (RowLayout, RowLayout),
    want_dx: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (out, d_in, r) = dims;
    let n = x.len() / d_in;
    let mut dx = vec![T::zero(); if want_dx { n * d_in } else { 0 }];
    let tasks = n.div_ceil(ROWS_PER_TASK);
    let par = inner_par(tasks);
    let at = transpose(a, r, d_in);
    let wm = if want_dx { merged(w, a, b, dims, s) } else { vec![] };
    // bf16: `dx = g W'` as `g (W'ᵀ)ᵀ`, W' row-major being W'ᵀ column-major.
    let packed = want_dx.then(|| bf16_weight(&wm, d_in, out, true)).flatten();
    let dst = SendPtr(dx.as_mut_ptr());
    let per_task = |c: usize, bufs: &mut [Vec<T>; 3]| -> (Vec<T>, Vec<T>) {
        let r0 = c * ROWS_PER_TASK;
        let m = ROWS_PER_TASK.min(n - r0);
        let [xbuf, gbuf, dxbuf] = bufs;
        let xs = io.0.read(x, d_in, r0, m, xbuf);
        let gs = io.1.read(g, out, r0, m, gbuf);
        let (xc, gc) = (Mat::new(xs, 0, d_in, 1), Mat::new(gs, 0, out, 1));
        let mut su = vec![T::zero(); m * r];
        gemm_into(m, r, d_in, &mut su, false, xc, Mat::new(&at, 0, r, 1), par);
        su.iter_mut().for_each(|v| *v = *v * s);
        let mut du = vec![T::zero(); m * r];
        gemm_into(m, r, out, &mut du, false, gc, Mat::new(b, 0, r, 1), par);
        du.iter_mut().for_each(|v| *v = *v * s);
        if want_dx {
            let fill = |dxc: &mut [T]| {
                if !bf16_matmul_t(packed.as_ref(), gs, m, dxc, false) {
                    gemm_into(m, d_in, out, dxc, false, gc, Mat::new(&wm, 0, d_in, 1), par);
                }
            };
            // SAFETY: `dx` holds all n rows of x and each task writes only its own.
            unsafe { io.0.write(dst, d_in, r0, m, dxbuf, fill) };
        }
        let mut da = vec![T::zero(); r * d_in];
        gemm_into(r, d_in, m, &mut da, false, Mat::new(&du, 0, 1, r), xc, par);
        let mut db = vec![T::zero(); out * r];
        gemm_into(
            out,
            r,
            m,
            &mut db,
            false,
            Mat::new(gs, 0, 1, out),
            Mat::new(&su, 0, r, 1),
            par,
        );
        (da, db)
    };
    let partials: Vec<(Vec<T>, Vec<T>)> = (0..tasks)
        .into_par_iter()
        .map_init(Default::default, |bufs, c| per_task(c, bufs))
        .collect();
    let (pa, pb): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    (dx, sum_partials(pa, r * d_in), sum_partials(pb, out * r))
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "lora_linear";
        let fixed: Vec<&Tensor> = std::iter::once(&self.w).chain(self.bias.as_ref()).collect();
        macro_rules! run {
            ($t:ty, $x:expr, $a:expr, $b:expr) => {{
                let (x, a, b) = (
                    contiguous::<$t>(op, "x", $x, l1)?,
                    contiguous::<$t>(op, "a", $a, l2)?,
                    contiguous::<$t>(op, "b", $b, l3)?,
                );
                with_slices::<$t, _>(op, &fixed, |wb| {
                    Ok(forward::<$t>(
                        x,
                        wb[0],
                        wb.get(1).copied(),
                        a,
                        b,
                        self.dims,
                        self.scale as $t,
                        self.io,
                    ))
                })?
            }};
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run!(f32, s1, s2, s3))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run!(f64, s1, s2, s3))
            }
            _ => bail!("{op}: x, a and b must all be f32 or all f64"),
        };
        Ok((y, self.shape.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "lora_linear";
        if grad.dims() != y.dims() {
            bail!("{op}: grad is {:?} but the output is {:?}", grad.dims(), y.dims());
        }
        let want_dx = x.track_op();
        let dev = x.device();
        let (out, d_in, r) = self.dims;
        macro_rules! run {
            ($t:ty) => {{
                let (dx, da, db) = with_slices::<$t, _>(op, &[x, &self.w, a, b, grad], |s| {
                    Ok(backward::<$t>(
                        s[0],
                        s[1],
                        s[2],
                        s[3],
                        s[4],
                        self.dims,
                        self.scale as $t,
                        self.io,
                        want_dx,
                    ))
                })?;
                (
                    want_dx
                        .then(|| Tensor::from_vec(dx, x.shape(), dev))
                        .transpose()?,
                    Tensor::from_vec(da, (r, d_in), dev)?,
                    Tensor::from_vec(db, (out, r), dev)?,
                )
            }};
        }
        let (dx, da, db) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        };
        Ok((dx, if_tracked(a, da), if_tracked(b, db)))
    }
}
