//! The routed FFN's two projections with LoRA, each as one op (CPU, f32 and f64).
//!
//! Composed from the routed GEMMs, LoRA on fc2 is a second, rank-r scatter GEMM whose gradient
//! is a second `[R, b]` tensor for h, which candle then zero-fills and adds to the first; on fc1
//! it is a routed base `[R, b]` that is written, read back and passed back. On the ffn bench
//! (d 384, 4096 tokens, half the blocks) LoRA added ~23 ms to an 80 ms layer, 15 of them on fc2;
//! with these ops it adds 7–8 ms.
//!
//! Here each projection multiplies by the merged weight `W' = W + s·B A` (formed per call, as
//! `lora::lora_linear` does), so the block GEMMs and h's gradient are computed once, and the
//! rank-r products that give the adapters' gradients run beside them. The adapters stay unmerged.
//! - fc1, `h = act(x W1'_eᵀ + b1_e)`: dx through W1'; `dB1 = s·dpreᵀ u` per block with
//!   `u = x A1ᵀ`; `dA1 = s·duᵀ x` with `du[t] = Σ_{rows of t} dpre B1_e`.
//! - fc2, `y = Σ g·h W2'_eᵀ + b2`: dh and the gates' gradient through W2'; `dA2` is the block
//!   weight gradient of `dv = s·dy B2`; `dB2 = s·dyᵀ v` with `v = Σ g·h A2_eᵀ`.
//!
//! This is the layer's function only when the adapters see the base weights' input, so the layer
//! uses these ops when LoRA dropout is off (the default) or in evaluation, and when W and b are
//! frozen. candle's custom ops take at most three inputs, so fc2's A2 and B2 travel packed in
//! one vector (the concatenation's backward splits the gradient again).

use super::cpu::{self, Addend, HostRouting};
use super::router::Routing;
use crate::activation::{ActScalar, Activation};
use crate::blas::{gemm_into, inner_par, row_major, transpose, Mat};
use crate::lora::merged_into;
use crate::util::{contiguous, with_slices, Float};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Error, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// `act(x[t] · (W1 + s·B1 A1)_eᵀ + b1_e)` for every routed row, `[R, b]`: fc1 with LoRA, for
/// `x [T, d]`, frozen `W1 [d_ff, d]` and `b1 [d_ff]`, `A1 [r, d]`, `B1 [d_ff, r]`.
/// Differentiable in x, A1 and B1. CPU only (f32, f64).
#[allow(clippy::too_many_arguments)]
pub fn gather_lora_act(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    a1: &Tensor,
    bb1: &Tensor,
    scale: f64,
    act: Activation,
    routing: &Arc<Routing>,
) -> Result<Tensor> {
    let (t, d) = x.dims2()?;
    let (d_ff, r) = bb1.dims2()?;
    let op = "routed_ffn fc1 (LoRA)";
    if d_ff % routing.n_blocks() != 0 {
        bail!(
            "{op}: d_ff = {d_ff} is not divisible by the routing's {} blocks",
            routing.n_blocks()
        );
    }
    let names = ["x", "W1", "b1", "A1", "B1"];
    let shapes = [(t, d), (d_ff, d), (d_ff, 1), (r, d), (d_ff, r)];
    check_lora(op, &names, &[x, w1, b1, a1, bb1], &shapes, routing.n_tokens())?;
    let op = GatherLora {
        routing: routing.clone(),
        // Kept in its layout: the forward reads it once, in parallel (`blas::row_major`).
        w: w1.detach(),
        bias: b1.detach().contiguous()?,
        scale,
        act,
        block: w1.dim(0)? / routing.n_blocks(),
        r: a1.dim(0)?,
        saved: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&a1.contiguous()?, &bb1.contiguous()?, op)
}

/// `Σ_{rows r of t} g[r] · h[r] · (W2 + s·B2 A2)_eᵀ + b2`, `[T, d]`: fc2 with LoRA, for
/// `h [R, b]`, `gates [R]`, frozen `W2 [d, d_ff]` and `b2 [d]`, `A2 [r, d_ff]`, `B2 [d, r]`.
/// Differentiable in h, the gates, A2 and B2. CPU only (f32, f64).
#[allow(clippy::too_many_arguments)]
pub fn scatter_lora(
    h: &Tensor,
    gates: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
    a2: &Tensor,
    bb2: &Tensor,
    scale: f64,
    routing: &Arc<Routing>,
) -> Result<Tensor> {
    let (rows, b) = h.dims2()?;
    let (d, r) = bb2.dims2()?;
    let d_ff = b * routing.n_blocks();
    let shapes = [(rows, b), (rows, 1), (d, d_ff), (d, 1), (r, d_ff), (d, r)];
    let names = ["h", "gates", "W2", "b2", "A2", "B2"];
    check_lora(
        "routed_ffn fc2 (LoRA)",
        &names,
        &[h, gates, w2, b2, a2, bb2],
        &shapes,
        routing.n_rows(),
    )?;
    let op = ScatterLora {
        routing: routing.clone(),
        w: w2.detach(),
        bias: b2.detach().contiguous()?,
        scale,
        block: w2.dim(1)? / routing.n_blocks(),
        r: a2.dim(0)?,
        saved: Mutex::new(None),
    };
    let packed = Tensor::cat(&[a2.flatten_all()?, bb2.flatten_all()?], 0)?;
    h.contiguous()?.apply_op3(&gates.contiguous()?, &packed, op)
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

/// One of this file's ops, for either float type.
trait Fused3: CustomOp3 {
    fn routing(&self) -> &Routing;

    fn forward<T: Float + ActScalar + candle_core::WithDType>(
        &self,
        a: &[T],
        b: &[T],
        c: &[T],
    ) -> Result<Vec<T>>;

    /// The gradients of the three inputs (an empty vector where `want` is false), from
    /// `s` = the inputs, the output's gradient and the tensors the forward saved.
    fn backward<T: Float + ActScalar>(&self, hr: HostRouting<'_>, s: &[&[T]], want: [bool; 3])
        -> [Vec<T>; 3];
}

/// `cpu_fwd` of a [`Fused3`] op: its inputs (named `names`) all f32 or all f64.
fn cpu_fwd3<O: Fused3>(
    op: &O,
    names: [&str; 3],
    ins: [(&CpuStorage, &Layout); 3],
    shape: Shape,
) -> Result<(CpuStorage, Shape)> {
    let name = op.name();
    let [(s1, l1), (s2, l2), (s3, l3)] = ins;
    macro_rules! run {
        ($t:ty, $variant:ident) => {{
            let y = op.forward::<$t>(
                contiguous(name, names[0], s1, l1)?,
                contiguous(name, names[1], s2, l2)?,
                contiguous(name, names[2], s3, l3)?,
            )?;
            Ok((CpuStorage::$variant(y), shape))
        }};
    }
    match (s1, s2, s3) {
        (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32, F32),
        (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64, F64),
        _ => bail!("{name}: {} must all be f32 or all f64", names.join(", ")),
    }
}

/// `bwd` of a [`Fused3`] op: the gradient of each tracked input, from the output's gradient
/// and the tensors the forward saved.
fn bwd3<O: Fused3>(
    op: &O,
    ins: [&Tensor; 3],
    grad: &Tensor,
    saved: &[Tensor],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let name = op.name();
    let hr = HostRouting::new(op.routing())?;
    let want = ins.map(|t| t.track_op());
    let all: Vec<&Tensor> = ins.iter().copied().chain([grad]).chain(saved).collect();
    let dev = ins[0].device();
    macro_rules! run {
        ($t:ty) => {{
            let g = with_slices::<$t, _>(name, &all, |s| Ok(op.backward::<$t>(hr, s, want)))?;
            let [a, b, c] = g;
            let wrap = |i: usize, v: Vec<$t>| {
                want[i]
                    .then(|| Tensor::from_vec(v, ins[i].shape(), dev))
                    .transpose()
            };
            Ok((wrap(0, a)?, wrap(1, b)?, wrap(2, c)?))
        }};
    }
    match ins[0].dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dt => bail!("{name}: unsupported dtype {dt:?}"),
    }
}

fn poisoned(op: &str) -> Error {
    Error::Msg(format!("{op}: poisoned lock"))
}

/// `x Aᵀ`, `[n, r]`, for `x [n, d]` and `A [r, d]`.
fn times_at<T: Float>(x: &[T], a: &[T], d: usize, r: usize) -> Vec<T> {
    let n = x.len() / d.max(1);
    let at = transpose(a, r, d);
    let mut u = vec![T::zero(); n * r];
    gemm_into(
        n,
        r,
        d,
        &mut u,
        false,
        Mat::new(x, 0, d, 1),
        Mat::new(&at, 0, r, 1),
        inner_par(1),
    );
    u
}

/// `s · pᵀ q`, `[m, n]`, for `p [k, m]` and `q [k, n]` (both row-major).
fn scaled_at_b<T: Float>(p: &[T], q: &[T], m: usize, n: usize, s: T) -> Vec<T> {
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

/// See [`gather_lora_act`].
struct GatherLora {
    routing: Arc<Routing>,
    w: Tensor,
    bias: Tensor,
    scale: f64,
    act: Activation,
    block: usize,
    r: usize,
    /// The pre-activation `[R, b]` and the merged weight `[d_ff, d]`, kept for the backward.
    saved: Mutex<Option<(Tensor, Tensor)>>,
}

impl Fused3 for GatherLora {
    fn routing(&self) -> &Routing {
        &self.routing
    }

    fn forward<T: Float + ActScalar + candle_core::WithDType>(
        &self,
        x: &[T],
        a: &[T],
        bb: &[T],
    ) -> Result<Vec<T>> {
        let op = "routed_ffn fc1 (LoRA)";
        let (d_ff, d) = self.w.dims2()?;
        let hr = HostRouting::new(&self.routing)?;
        let m = merged_into(
            row_major(op, &self.w)?,
            a,
            bb,
            (d_ff, d, self.r),
            T::lit(self.scale),
        );
        let (pre, h) = with_slices::<T, _>(op, &[&self.bias], |b1| {
            Ok(cpu::gather_mm_fwd(
                hr,
                x,
                &m,
                Addend::Bias(b1[0]),
                d,
                self.block,
                Some(self.act),
            ))
        })?;
        let Some(h) = h else {
            bail!("{op}: the activation output is missing");
        };
        let pre = Tensor::from_vec(pre, (self.routing.n_rows(), self.block), &Device::Cpu)?;
        let m = Tensor::from_vec(m, (d_ff, d), &Device::Cpu)?;
        *self.saved.lock().map_err(|_| poisoned(op))? = Some((pre, m));
        Ok(h)
    }
    /// `[dx, dA1, dB1]`; `s` = x, A1, B1, dh, the pre-activation, the merged weight.
    fn backward<T: Float + ActScalar>(
        &self,
        hr: HostRouting<'_>,
        s: &[&[T]],
        want: [bool; 3],
    ) -> [Vec<T>; 3] {
        let [x, a, bb, grad, pre, m] = [s[0], s[1], s[2], s[3], s[4], s[5]];
        let (b, r, sc) = (self.block, self.r, T::lit(self.scale));
        // From W1 [d_ff, d], not x: with no tokens x says nothing.
        let d = self.w.dims()[1];
        let dpre = cpu::act_backward(grad, pre, self.act);
        let dx = if want[0] {
            cpu::gather_mm_bwd_x(hr, &dpre, m, d, b)
        } else {
            vec![]
        };
        if !want[1] && !want[2] {
            return [dx, vec![], vec![]];
        }
        // dB1 = s·dpreᵀ u per block, u = x A1ᵀ; dA1 = s·duᵀ x, du[t] = Σ dpre B1_e.
        let u = times_at(x, a, d, r);
        let (dbb, _) = cpu::gather_mm_bwd_w(hr, &dpre, &u, r, b, true, false);
        let dbb: Vec<T> = dbb.unwrap_or_default().into_iter().map(|v| v * sc).collect();
        let du = cpu::gather_mm_bwd_x(hr, &dpre, bb, r, b);
        let da = scaled_at_b(&du, x, r, d, sc);
        [dx, da, dbb]
    }
}

impl CustomOp3 for GatherLora {
    fn name(&self) -> &'static str {
        "routed_ffn_fc1_lora"
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
        let shape = Shape::from((self.routing.n_rows(), self.block));
        cpu_fwd3(self, ["x", "A1", "B1"], [(s1, l1), (s2, l2), (s3, l3)], shape)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let Some((pre, m)) = self.saved.lock().map_err(|_| poisoned(op))?.clone() else {
            bail!("{op}: the forward did not save its pre-activation");
        };
        bwd3(self, [x, a, bb], grad, &[pre, m])
    }
}

/// See [`scatter_lora`].
struct ScatterLora {
    routing: Arc<Routing>,
    w: Tensor,
    bias: Tensor,
    scale: f64,
    block: usize,
    r: usize,
    /// The merged weight `[d, d_ff]`, kept for the backward.
    saved: Mutex<Option<Tensor>>,
}

impl Fused3 for ScatterLora {
    fn routing(&self) -> &Routing {
        &self.routing
    }

    fn forward<T: Float + ActScalar + candle_core::WithDType>(
        &self,
        h: &[T],
        g: &[T],
        packed: &[T],
    ) -> Result<Vec<T>> {
        let op = "routed_ffn fc2 (LoRA)";
        let (d, d_ff) = self.w.dims2()?;
        let (a, bb) = packed.split_at(self.r * d_ff);
        let hr = HostRouting::new(&self.routing)?;
        let m = merged_into(
            row_major(op, &self.w)?,
            a,
            bb,
            (d, d_ff, self.r),
            T::lit(self.scale),
        );
        let y = with_slices::<T, _>(op, &[&self.bias], |b2| {
            Ok(cpu::scatter_mm_fwd(hr, h, g, &m, d, self.block, Some(b2[0])))
        })?;
        *self.saved.lock().map_err(|_| poisoned(op))? = Some(Tensor::from_vec(m, (d, d_ff), &Device::Cpu)?);
        Ok(y)
    }
    /// `[dh, dgates, d(A2, B2)]`; `s` = h, the gates, A2 and B2 packed, dy, the merged weight.
    fn backward<T: Float + ActScalar>(
        &self,
        hr: HostRouting<'_>,
        s: &[&[T]],
        want: [bool; 3],
    ) -> [Vec<T>; 3] {
        let [h, g, packed, dy, m] = [s[0], s[1], s[2], s[3], s[4]];
        let (b, r, sc) = (self.block, self.r, T::lit(self.scale));
        // From W2 [d, d_ff], not dy: with no tokens dy says nothing.
        let d = self.w.dims()[0];
        let (dh, dg) = if want[0] || want[1] {
            cpu::scatter_mm_bwd_hg(hr, dy, h, g, m, d, b, want[1])
        } else {
            (vec![], vec![])
        };
        if !want[2] {
            return [dh, dg, vec![]];
        }
        let (a, bb) = packed.split_at(packed.len() - d * r);
        // dA2: the block weight gradient of dv = s·dy B2; dB2 = s·dyᵀ v, v = Σ g·h A2_eᵀ.
        let n = dy.len() / d.max(1);
        let mut dv = vec![T::zero(); n * r];
        gemm_into(
            n,
            r,
            d,
            &mut dv,
            false,
            Mat::new(dy, 0, d, 1),
            Mat::new(bb, 0, r, 1),
            inner_par(1),
        );
        dv.iter_mut().for_each(|v| *v = *v * sc);
        let mut dp = cpu::scatter_mm_bwd_w(hr, &dv, h, g, r, b);
        let v = cpu::scatter_mm_fwd(hr, h, g, a, r, b, None);
        dp.extend(scaled_at_b(dy, &v, d, r, sc));
        [dh, dg, dp]
    }
}

impl CustomOp3 for ScatterLora {
    fn name(&self) -> &'static str {
        "routed_ffn_fc2_lora"
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
        let shape = Shape::from((self.routing.n_tokens(), self.w.dim(0)?));
        cpu_fwd3(
            self,
            ["h", "gates", "A2, B2"],
            [(s1, l1), (s2, l2), (s3, l3)],
            shape,
        )
    }

    fn bwd(
        &self,
        h: &Tensor,
        g: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let Some(m) = self.saved.lock().map_err(|_| poisoned(op))?.clone() else {
            bail!("{op}: the forward did not save its merged weight");
        };
        bwd3(self, [h, g, packed], grad, &[m])
    }
}
