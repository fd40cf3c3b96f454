//! The routed FFN with LoRA on both projections as one op (CPU, f32 and f64).
//!
//! Composed from the routed GEMMs, LoRA on fc2 is a second, rank-r scatter GEMM whose gradient
//! is a second `[R, b]` tensor for h, which candle then zero-fills and adds to the first; on fc1
//! it is a routed base `[R, b]` that is written, read back and passed back. On the ffn bench
//! (d 384, 4096 tokens, half the blocks) LoRA added ~23 ms to an 80 ms layer, 15 of them on fc2;
//! fused into the projections it added 7–8 ms.
//!
//! Here each projection multiplies by the merged weight `W' = W + s·B A` (formed per call, as
//! `lora::lora_linear` does), so the block GEMMs are computed once, and the rank-r products that
//! give the adapters' gradients run beside them (`chunked.rs`). The adapters stay unmerged. Both
//! projections are one op, so the hidden rows never become a candle tensor: the op keeps only
//! the pre-activation for its backward, which recomputes h from it.
//!
//! This is the layer's function only when the adapters see the base weights' input, so the layer
//! uses this op when LoRA dropout is off (the default) or in evaluation, and when W and b are
//! frozen. candle's custom ops take at most three inputs, so the four adapters travel packed in
//! one vector (the concatenation's backward splits the gradient again).

use super::chunked;
use super::cpu::HostRouting;
use super::router::Routing;
use crate::activation::{ActScalar, Activation};
use crate::blas::{row_major, transpose, transpose_blocks};
use crate::lora::{merged_column_blocks, merged_into, merged_t, merged_t_blocks};
use crate::util::{check_frozen, contiguous, with_slices, Float};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Error, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The op's name in its errors.
const OP: &str = "routed_ffn (LoRA)";

/// The routed FFN with LoRA on both projections, as one op:
/// `y[t] = b2 + Σ_{rows r of t} g[r] · act(x[t] W1'_eᵀ + b1_e) W2'_eᵀ` with `W' = W + s·B A`,
/// `[T, d_out]`, for `x [T, d]`, `gates [R]`, frozen `base = [W1 [d_ff, d], b1 [d_ff],
/// W2 [d_out, d_ff], b2 [d_out]]` and `adapters = [A1 [r, d], B1 [d_ff, r], A2 [r, d_ff],
/// B2 [d_out, r]]`. Differentiable in x, the gates and the adapters. CPU only (f32, f64).
pub fn routed_lora_ffn(
    x: &Tensor,
    gates: &Tensor,
    base: [&Tensor; 4],
    adapters: [&Tensor; 4],
    scale: f64,
    act: Activation,
    routing: &Arc<Routing>,
) -> Result<Tensor> {
    let op = OP;
    let &[t, d] = x.dims() else {
        bail!("{op}: x is {:?}, expected [tokens, d]", x.dims());
    };
    // From the frozen weights and A1, so that the check below names a misshapen adapter.
    let rows = |t: &Tensor| t.dims().first().copied().unwrap_or(0);
    let (d_ff, d_out, r) = (rows(base[0]), rows(base[2]), rows(adapters[0]));
    if d_ff % routing.n_blocks() != 0 {
        bail!(
            "{op}: d_ff = {d_ff} is not divisible by the routing's {} blocks",
            routing.n_blocks()
        );
    }
    // The kernels index weight blocks by their widths: an empty one has nothing to compute.
    for (name, n) in [
        ("d (x's width)", d),
        ("d_ff (W1's rows)", d_ff),
        ("d_out (W2's rows)", d_out),
    ] {
        if n == 0 {
            bail!("{op}: {name} is 0, expected at least 1");
        }
    }
    // The op computes no gradient for them (see `lora_linear` for trained weights).
    check_frozen(
        op,
        &[("W1", base[0]), ("b1", base[1]), ("W2", base[2]), ("b2", base[3])],
    )?;
    let names = ["x", "gates", "W1", "b1", "W2", "b2", "A1", "B1", "A2", "B2"];
    let [w1, b1, w2, b2] = base;
    let [a1, bb1, a2, bb2] = adapters;
    let shapes: [&[usize]; 10] = [
        &[t, d],
        &[routing.n_rows()],
        &[d_ff, d],
        &[d_ff],
        &[d_out, d_ff],
        &[d_out],
        &[r, d],
        &[d_ff, r],
        &[r, d_ff],
        &[d_out, r],
    ];
    check_lora(
        op,
        &names,
        &[x, gates, w1, b1, w2, b2, a1, bb1, a2, bb2],
        &shapes,
        routing.n_tokens(),
    )?;
    let packed = Tensor::cat(
        &adapters
            .map(|a| a.flatten_all())
            .into_iter()
            .collect::<Result<Vec<_>>>()?,
        0,
    )?;
    let op = LoraFfn {
        routing: routing.clone(),
        // Kept in their layout: the forward reads each once, in parallel (`blas::row_major`).
        w1: w1.detach(),
        b1: b1.detach().contiguous()?,
        w2: w2.detach(),
        b2: b2.detach().contiguous()?,
        scale,
        act,
        block: d_ff / routing.n_blocks(),
        r,
        // Inference (nothing tracked) keeps nothing for a backward.
        keep: x.track_op() || gates.track_op() || packed.track_op(),
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op3(&gates.contiguous()?, &packed, op)
}

/// See [`routed_lora_ffn`].
struct LoraFfn {
    routing: Arc<Routing>,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: f64,
    act: Activation,
    block: usize,
    r: usize,
    keep: bool,
    /// The pre-activation `[R, b]`, kept for the backward. The merged weights are formed again
    /// there, as `lora_linear` does: kept, they would be two weight-sized copies per layer
    /// (GPT-2 small: 226 MB over its 12 FFNs).
    saved: Mutex<Option<Tensor>>,
}

impl LoraFfn {
    fn forward<T: Float + ActScalar + candle_core::WithDType>(
        &self,
        x: &[T],
        g: &[T],
        packed: &[T],
    ) -> Result<Vec<T>> {
        let op = OP;
        let ((d_ff, d), d_out, r) = (self.w1.dims2()?, self.w2.dim(0)?, self.r);
        let s = T::lit(self.scale);
        let hr = HostRouting::new(&self.routing)?;
        let adapters = Some((unpack(packed, d, d_ff, r), r, s));
        let (w1b, w2t) = operands_t(op, &self.w1, &self.w2, adapters, self.block)?;
        let (y, kept) = with_slices::<T, _>(op, &[&self.b1, &self.b2], |bias| {
            let f = chunked::Forward {
                x,
                w1b: &w1b,
                b1: bias[0],
                gates: g,
                w2t: &w2t,
                b2: bias[1],
                d,
                d_out,
                block: self.block,
                act: self.act,
                packed: None,
            };
            Ok(chunked::forward(hr, &f, self.keep))
        })?;
        if let Some(pre) = kept {
            let pre = Tensor::from_vec(pre, (self.routing.n_rows(), self.block), &Device::Cpu)?;
            *self.saved.lock().map_err(|_| poisoned(op))? = Some(pre);
        }
        Ok(y)
    }

    /// The gradients of x, the gates and the adapters packed (empty where `want` is false);
    /// `s` = x, the gates, the adapters packed, dy, the kept pre-activation.
    fn backward<T: Float + ActScalar + candle_core::WithDType>(
        &self,
        hr: HostRouting<'_>,
        s: &[&[T]],
        want: [bool; 3],
    ) -> Result<chunked::Grads<T>> {
        let op = OP;
        // From the weights, not x: with no tokens x says nothing.
        let ((d_ff, d), d_out, r) = (self.w1.dims2()?, self.w2.dim(0)?, self.r);
        let sc = T::lit(self.scale);
        let [a1, b1, a2, b2] = unpack(s[2], d, d_ff, r);
        let m1 = merged_into(row_major(op, &self.w1)?, a1, b1, (d_ff, d, r), sc);
        let m2 = merged_column_blocks(
            &row_major(op, &self.w2)?,
            a2,
            b2,
            (d_out, d_ff, r),
            sc,
            self.block,
        );
        let p = chunked::Backward {
            x: s[0],
            gates: s[1],
            dy: s[3],
            pre: s[4],
            m1: &m1,
            m2: &m2,
            a1,
            b1,
            a2,
            b2,
            scale: sc,
            d,
            d_out,
            r,
            block: self.block,
            act: self.act,
        };
        Ok(chunked::backward(hr, &p, want))
    }
}

impl CustomOp3 for LoraFfn {
    fn name(&self) -> &'static str {
        OP
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
        let name = self.name();
        let shape = Shape::from((self.routing.n_tokens(), self.w2.dim(0)?));
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let y = self.forward::<$t>(
                    contiguous(name, "x", s1, l1)?,
                    contiguous(name, "gates", s2, l2)?,
                    contiguous(name, "A1, B1, A2, B2", s3, l3)?,
                )?;
                Ok((CpuStorage::$variant(y), shape))
            }};
        }
        match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32, F32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64, F64),
            _ => bail!("{name}: x, the gates and the adapters must all be f32 or all f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let Some(kept) = self.saved.lock().map_err(|_| poisoned(op))?.clone() else {
            bail!("{op}: the forward kept nothing for a backward");
        };
        let hr = HostRouting::new(&self.routing)?;
        let ins = [x, g, packed];
        let want = ins.map(|t| t.track_op());
        let all = [x, g, packed, grad, &kept];
        let dev = x.device();
        macro_rules! run {
            ($t:ty) => {{
                let g = with_slices::<$t, _>(op, &all, |s| self.backward::<$t>(hr, s, want))?;
                let wrap = |i: usize, v: Vec<$t>| {
                    want[i]
                        .then(|| Tensor::from_vec(v, ins[i].shape(), dev))
                        .transpose()
                };
                Ok((wrap(0, g.dx)?, wrap(1, g.dgates)?, wrap(2, g.dadapters)?))
            }};
        }
        match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        }
    }
}

/// `[A1 [r, d], B1 [d_ff, r], A2 [r, d_ff], B2 [d_out, r]]` from their packed concatenation.
fn unpack<T>(packed: &[T], d: usize, d_ff: usize, r: usize) -> [&[T]; 4] {
    let (a1, rest) = packed.split_at(r * d);
    let (b1, rest) = rest.split_at(d_ff * r);
    let (a2, b2) = rest.split_at(r * d_ff);
    [a1, b1, a2, b2]
}

/// `W1'ᵀ` by blocks, `[n, d, b]` (block e is `W1'_eᵀ`), and `W2'ᵀ [d_ff, d_out]`: the operands
/// of [`chunked::forward`], for `W' = W + s·B A` (`adapters`: the factors as [`unpack`] gives
/// them, their rank and s) or W alone, with blocks of `block` hidden units. The op and a frozen
/// layer's kept operands both come from here, so they agree to the bit.
pub(super) fn operands_t<T: Float + candle_core::WithDType>(
    op: &str,
    w1: &Tensor,
    w2: &Tensor,
    adapters: Option<([&[T]; 4], usize, T)>,
    block: usize,
) -> Result<(Vec<T>, Vec<T>)> {
    let ((d_ff, d), d_out) = (w1.dims2()?, w2.dim(0)?);
    let (w1, w2) = (row_major::<T>(op, w1)?, row_major::<T>(op, w2)?);
    Ok(match adapters {
        Some(([a1, b1, a2, b2], r, s)) => (
            merged_t_blocks(&w1, a1, b1, (d_ff, d, r), s, block),
            merged_t(&w2, a2, b2, (d_out, d_ff, r), s),
        ),
        None => (transpose_blocks(&w1, d_ff, d, block), transpose(&w2, d_out, d_ff)),
    })
}

/// Checks the inputs (named `names`) against their shapes, that they are all f32 or all f64 on
/// the CPU, and that the first has `rows` rows.
fn check_lora(op: &str, names: &[&str], ts: &[&Tensor], want: &[&[usize]], rows: usize) -> Result<()> {
    for ((t, &shape), name) in ts.iter().zip(want).zip(names) {
        if t.dims() != shape {
            bail!("{op}: {name} is {:?}, expected {shape:?}", t.dims());
        }
        if !t.device().is_cpu() || !matches!(t.dtype(), DType::F32 | DType::F64) || t.dtype() != ts[0].dtype()
        {
            bail!("{op}: {name} must be f32 or f64 on the CPU, like {}", names[0]);
        }
    }
    if want[0][0] != rows {
        bail!(
            "{op}: {} has {} rows, expected {rows} for this routing",
            names[0],
            want[0][0]
        );
    }
    Ok(())
}

fn poisoned(op: &str) -> Error {
    Error::Msg(format!("{op}: poisoned lock"))
}
