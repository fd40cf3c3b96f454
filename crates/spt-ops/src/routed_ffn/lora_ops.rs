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
use crate::blas::{row_major, transpose};
use crate::lora::merged_into;
use crate::util::{contiguous, with_slices, Float};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Error, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

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
    let op = "routed_ffn (LoRA)";
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
    let names = ["x", "gates", "W1", "b1", "W2", "b2", "A1", "B1", "A2", "B2"];
    let [w1, b1, w2, b2] = base;
    let [a1, bb1, a2, bb2] = adapters;
    let shapes = [
        (t, d),
        (routing.n_rows(), 1),
        (d_ff, d),
        (d_ff, 1),
        (d_out, d_ff),
        (d_out, 1),
        (r, d),
        (d_ff, r),
        (r, d_ff),
        (d_out, r),
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
    /// The pre-activation `[R, b]` and the merged weights `W1' [d_ff, d]` and
    /// `W2' [d_out, d_ff]`, kept for the backward.
    saved: Mutex<Option<[Tensor; 3]>>,
}

impl LoraFfn {
    fn forward<T: Float + ActScalar + candle_core::WithDType>(
        &self,
        x: &[T],
        g: &[T],
        packed: &[T],
    ) -> Result<Vec<T>> {
        let op = "routed_ffn (LoRA)";
        let ((d_ff, d), d_out, r) = (self.w1.dims2()?, self.w2.dim(0)?, self.r);
        let s = T::lit(self.scale);
        let hr = HostRouting::new(&self.routing)?;
        let (a1, rest) = packed.split_at(r * d);
        let (bb1, rest) = rest.split_at(d_ff * r);
        let (a2, bb2) = rest.split_at(r * d_ff);
        let m1 = merged_into(row_major(op, &self.w1)?, a1, bb1, (d_ff, d, r), s);
        let m2 = merged_into(row_major(op, &self.w2)?, a2, bb2, (d_out, d_ff, r), s);
        let (w1t, w2t) = (transpose(&m1, d_ff, d), transpose(&m2, d_out, d_ff));
        let (y, kept) = with_slices::<T, _>(op, &[&self.b1, &self.b2], |bias| {
            let f = chunked::Forward {
                x,
                w1t: &w1t,
                b1: bias[0],
                gates: g,
                w2t: &w2t,
                b2: bias[1],
                d,
                d_out,
                block: self.block,
                act: self.act,
            };
            Ok(chunked::forward(hr, &f, self.keep))
        })?;
        if let Some(pre) = kept {
            let dev = &Device::Cpu;
            *self.saved.lock().map_err(|_| poisoned(op))? = Some([
                Tensor::from_vec(pre, (self.routing.n_rows(), self.block), dev)?,
                Tensor::from_vec(m1, (d_ff, d), dev)?,
                Tensor::from_vec(m2, (d_out, d_ff), dev)?,
            ]);
        }
        Ok(y)
    }

    /// The gradients of x, the gates and the adapters packed (empty where `want` is false);
    /// `s` = x, the gates, the adapters packed, dy, then what the forward kept (pre, W1', W2').
    fn backward<T: Float + ActScalar>(
        &self,
        hr: HostRouting<'_>,
        s: &[&[T]],
        want: [bool; 3],
    ) -> chunked::Grads<T> {
        // From the weights, not x: with no tokens x says nothing.
        let (d_ff, d) = (self.w1.dims()[0], self.w1.dims()[1]);
        let r = self.r;
        let packed = s[2];
        let (a1, rest) = packed.split_at(r * d);
        let (b1, rest) = rest.split_at(d_ff * r);
        let (a2, b2) = rest.split_at(r * d_ff);
        let p = chunked::Backward {
            x: s[0],
            gates: s[1],
            dy: s[3],
            pre: s[4],
            m1: s[5],
            m2: s[6],
            a1,
            b1,
            a2,
            b2,
            scale: T::lit(self.scale),
            d,
            d_out: self.w2.dims()[0],
            r,
            block: self.block,
            act: self.act,
        };
        chunked::backward(hr, &p, want)
    }
}

impl CustomOp3 for LoraFfn {
    fn name(&self) -> &'static str {
        "routed_ffn_lora"
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
        let all: Vec<&Tensor> = ins.iter().copied().chain([grad]).chain(&kept).collect();
        let dev = x.device();
        macro_rules! run {
            ($t:ty) => {{
                let g = with_slices::<$t, _>(op, &all, |s| Ok(self.backward::<$t>(hr, s, want)))?;
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

/// Checks the inputs (named `names`) against their shapes (`(n, 1)` for a vector `[n]`), that
/// they are all f32 or all f64 on the CPU, and that the first has `rows` rows.
fn check_lora(op: &str, names: &[&str], ts: &[&Tensor], want: &[(usize, usize)], rows: usize) -> Result<()> {
    for ((t, &(r, c)), name) in ts.iter().zip(want).zip(names) {
        let ok = match *t.dims() {
            [n] => c == 1 && n == r,
            [n, m] => (n, m) == (r, c),
            _ => false,
        };
        if !ok {
            let shape = if c == 1 {
                format!("[{r}]")
            } else {
                format!("[{r}, {c}]")
            };
            bail!("{op}: {name} is {:?}, expected {shape}", t.dims());
        }
        if !t.device().is_cpu() || !matches!(t.dtype(), DType::F32 | DType::F64) || t.dtype() != ts[0].dtype()
        {
            bail!("{op}: {name} must be f32 or f64 on the CPU, like {}", names[0]);
        }
    }
    if want[0].0 != rows {
        bail!(
            "{op}: {} has {} rows, expected {rows} for this routing",
            names[0],
            want[0].0
        );
    }
    Ok(())
}

fn poisoned(op: &str) -> Error {
    Error::Msg(format!("{op}: poisoned lock"))
}
