//! The two grouped-GEMM custom ops the routed FFN (and its LoRA factors) are composed of.
//!
//! - [`gather_matmul_act`] `(x [T, d_in], W [n·b, d_in], bias [n·b] | base [R, b]) → [R, b]`, with
//!   an optional fused activation: fc1 (+ bias or LoRA's routed rows), or LoRA's B1 alone.
//! - [`scatter_matmul`] `(h [R, b], gates [R], W [d_out, n·b]) → [T, d_out]`: fc2 scaled by the
//!   gates, or LoRA's A2.
//!
//! The routing (block ids, permutation, group offsets) is not differentiable and lives in the op
//! struct. Each backward computes only the gradients of tracked inputs: a frozen weight costs no
//! weight-gradient GEMM.

use super::composed;
use super::cpu;
use super::router::Routing;
use crate::activation::Activation;
use crate::util::{check_float, check_same, contiguous, with_cpu};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Error, Layout, Result, Shape, Tensor,
};
use std::sync::Arc;
use std::sync::Mutex;

/// What the third input of [`GatherMatmul`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddKind {
    /// No third input.
    None,
    /// A bias `[n_blocks·b]`.
    Bias,
    /// A per-routed-row base `[R, b]`.
    Base,
}

/// Validates `gather_matmul`'s inputs and returns the block size b and the addend's kind.
pub(super) fn gather_dims(
    x: &Tensor,
    w: &Tensor,
    add: Option<&Tensor>,
    routing: &Routing,
) -> Result<(usize, AddKind)> {
    let op = "gather_matmul";
    check_float(op, "x", x)?;
    check_same(op, &[("x", x), ("w", w)])?;
    if let Some(add) = add {
        check_same(op, &[("x", x), ("bias", add)])?;
    }
    let (t, d_in) = match x.dims() {
        &[t, d] => (t, d),
        d => bail!("{op}: x is {d:?}, expected [T, d_in]"),
    };
    if t != routing.n_tokens() {
        bail!(
            "{op}: x has {t} tokens but the routing has {}",
            routing.n_tokens()
        );
    }
    let n = routing.n_blocks();
    let (rows, w_in) = match w.dims() {
        &[r, c] => (r, c),
        d => bail!("{op}: w is {d:?}, expected [n_blocks·b, d_in] = [*, {d_in}]"),
    };
    if w_in != d_in || rows == 0 || rows % n != 0 {
        bail!("{op}: w is [{rows}, {w_in}], expected [n_blocks·b, d_in] with n_blocks = {n}, d_in = {d_in}");
    }
    let b = rows / n;
    let kind = match add.map(|a| a.dims()) {
        None => AddKind::None,
        Some(&[r]) if r == rows => AddKind::Bias,
        Some(&[r, c]) if r == routing.n_rows() && c == b => AddKind::Base,
        Some(d) => bail!(
            "{op}: bias is {d:?}, expected a bias [{rows}] or a routed base [R, b] = [{}, {b}]",
            routing.n_rows()
        ),
    };
    Ok((b, kind))
}

/// Grouped "gather-in" GEMM: routed row `r` (token t, block e) is `x[t] · W_eᵀ + bias_e`, where
/// `W_e` is rows `[e·b, (e+1)·b)` of `w`. Returns `[R, b]` with rows in the routing's
/// block-sorted order. Differentiable in `x`, `w` and `bias`.
pub fn gather_matmul(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    routing: &Arc<Routing>,
) -> Result<Tensor> {
    gather_matmul_act(x, w, bias, None, routing)
}

/// [`gather_matmul`] with an optional fused activation, `act(x[t] · W_eᵀ + add)`, where `add` is
/// a bias `[n_blocks·b]` or a routed base `[R, b]` (e.g. LoRA's routed rows plus the bias). The
/// pre-activation is kept for the backward pass. Differentiable in `x`, `w` and `add`.
pub fn gather_matmul_act(
    x: &Tensor,
    w: &Tensor,
    add: Option<&Tensor>,
    act: Option<Activation>,
    routing: &Arc<Routing>,
) -> Result<Tensor> {
    let (block, add_kind) = gather_dims(x, w, add, routing)?;
    if composed::needs_composed(x) {
        return composed::gather_matmul_act_checked(x, w, add.map(|a| (a, add_kind)), act, routing, block);
    }
    let op = GatherMatmul {
        routing: routing.clone(),
        block,
        act,
        add_kind,
        saved_pre: Mutex::new(None),
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match add {
        Some(add) => x.apply_op3(&w, &add.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// The gather-in op; see [`gather_matmul_act`]. Made only by the functions, which check the
/// shapes its kernels read by.
pub struct GatherMatmul {
    pub(crate) routing: Arc<Routing>,
    pub(crate) block: usize,
    pub(crate) act: Option<Activation>,
    pub(crate) add_kind: AddKind,
    /// The pre-activation `[R, b]`, saved by the forward for the backward (with `act` only).
    saved_pre: Mutex<Option<Tensor>>,
}

impl GatherMatmul {
    fn cpu(&self, ss: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let op = "gather_matmul";
        let d_in = ss[1].1.dims()[1];
        let shape = Shape::from((self.routing.n_rows(), self.block));
        let hr = cpu::HostRouting::new(&self.routing)?;
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let x = contiguous::<$t>(op, "x", ss[0].0, ss[0].1)?;
                let w = contiguous::<$t>(op, "w", ss[1].0, ss[1].1)?;
                let add = match (ss.get(2), self.add_kind) {
                    (Some((s, l)), AddKind::Bias) => cpu::Addend::Bias(contiguous::<$t>(op, "bias", s, l)?),
                    (Some((s, l)), AddKind::Base) => cpu::Addend::Base(contiguous::<$t>(op, "base", s, l)?),
                    _ => cpu::Addend::None,
                };
                let (pre, h) = cpu::gather_mm_fwd(hr, x, w, add, d_in, self.block, self.act);
                match h {
                    Some(h) => {
                        let pre = Tensor::from_vec(pre, shape.clone(), &Device::Cpu)?;
                        *self
                            .saved_pre
                            .lock()
                            .map_err(|_| Error::Msg(format!("{op}: poisoned lock")))? = Some(pre);
                        Ok((CpuStorage::$variant(h), shape))
                    }
                    None => Ok((CpuStorage::$variant(pre), shape)),
                }
            }};
        }
        match ss[0].0.dtype() {
            DType::F32 => run!(f32, F32),
            DType::F64 => run!(f64, F64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        }
    }

    /// `(dx, dw, d_add)`, each only if its input is tracked.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        add: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "gather_matmul_backward";
        let (want_x, want_w) = (x.track_op(), w.track_op());
        let want_add = add.is_some_and(|b| b.track_op());
        let want_b = want_add && self.add_kind == AddKind::Bias;
        let (b, d_in) = (self.block, x.dim(1)?);
        let r = &*self.routing;
        let hr = cpu::HostRouting::new(r)?;
        let dev = x.device();
        // The gradient of the pre-activation.
        let dpre = match self.act {
            None => grad.contiguous()?,
            Some(act) => {
                let pre = self
                    .saved_pre
                    .lock()
                    .map_err(|_| Error::Msg(format!("{op}: poisoned lock")))?
                    .clone();
                let Some(pre) = pre else {
                    bail!("{op}: the forward did not save its pre-activation")
                };
                macro_rules! act_bwd {
                    ($t:ty) => {
                        with_cpu::<$t, _>(op, grad, |g| {
                            with_cpu::<$t, _>(op, &pre, |p| {
                                Tensor::from_vec(cpu::act_backward(g, p, act), pre.shape(), dev)
                            })
                        })?
                    };
                }
                match x.dtype() {
                    DType::F32 => act_bwd!(f32),
                    DType::F64 => act_bwd!(f64),
                    dt => bail!("{op}: unsupported dtype {dt:?}"),
                }
            }
        };
        macro_rules! run {
            ($t:ty) => {
                with_cpu::<$t, _>(op, &dpre, |dh| {
                    let dx = if want_x {
                        let v = with_cpu::<$t, _>(op, w, |w| Ok(cpu::gather_mm_bwd_x(hr, dh, w, d_in, b)))?;
                        Some(Tensor::from_vec(v, x.shape(), dev)?)
                    } else {
                        None
                    };
                    let (dw, db) = if want_w || want_b {
                        with_cpu::<$t, _>(op, x, |xs| {
                            Ok(cpu::gather_mm_bwd_w(hr, dh, xs, d_in, b, want_w, want_b))
                        })?
                    } else {
                        (None, None)
                    };
                    let dw = dw
                        .map(|v| Tensor::from_vec(v, w.shape(), dev))
                        .transpose()?;
                    let db = db
                        .map(|v| Tensor::from_vec(v, w.dim(0)?, dev))
                        .transpose()?;
                    Ok((dx, dw, db))
                })
            };
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => run!(f32)?,
            DType::F64 => run!(f64)?,
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        };
        let d_add = match self.add_kind {
            AddKind::Base if want_add => Some(dpre),
            _ => db,
        };
        Ok((dx, dw, d_add))
    }
}

impl CustomOp2 for GatherMatmul {
    fn name(&self) -> &'static str {
        "gather_matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(&[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for GatherMatmul {
    fn name(&self) -> &'static str {
        "gather_matmul"
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
        self.cpu(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        add: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, Some(add), grad)
    }
}

/// Validates `scatter_matmul`'s inputs and returns the block size b and `d_out`.
pub(super) fn scatter_dims(
    h: &Tensor,
    gates: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    routing: &Routing,
) -> Result<(usize, usize)> {
    let op = "scatter_matmul";
    check_float(op, "h", h)?;
    check_same(op, &[("h", h), ("gates", gates), ("w", w)])?;
    let n = routing.n_blocks();
    let r_total = routing.n_rows();
    let (d_out, cols) = match w.dims() {
        &[o, c] => (o, c),
        d => bail!("{op}: w is {d:?}, expected [d_out, n_blocks·b]"),
    };
    if cols == 0 || cols % n != 0 {
        bail!("{op}: w is [{d_out}, {cols}], expected [d_out, n_blocks·b] with n_blocks = {n}");
    }
    let block = cols / n;
    if h.dims() != [r_total, block] {
        bail!(
            "{op}: h is {:?}, expected [R, b] = [{r_total}, {block}]",
            h.dims()
        );
    }
    if gates.dims() != [r_total] {
        bail!("{op}: gates is {:?}, expected [R] = [{r_total}]", gates.dims());
    }
    if let Some(bias) = bias {
        check_same(op, &[("h", h), ("bias", bias)])?;
        if bias.dims() != [d_out] {
            bail!("{op}: bias is {:?}, expected [d_out] = [{d_out}]", bias.dims());
        }
    }
    Ok((block, d_out))
}

/// Grouped "scatter-out" GEMM: `y[t] = Σ_{routed rows r of t} gates[r] · h[r] · W_eᵀ`, where `W_e`
/// is columns `[e·b, (e+1)·b)` of `w` (`[d_out, n·b]`, read in place). Returns `[T, d_out]`.
/// Differentiable in `h`, `gates` and `w`.
pub fn scatter_matmul(h: &Tensor, gates: &Tensor, w: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    scatter_matmul_bias(h, gates, w, None, routing)
}

/// [`scatter_matmul`] `+ bias` (`[d_out]`). A frozen (untracked) bias is added inside the kernel
/// (no extra graph node); a trainable one through a differentiable broadcast add.
pub fn scatter_matmul_bias(
    h: &Tensor,
    gates: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    routing: &Arc<Routing>,
) -> Result<Tensor> {
    let (block, d_out) = scatter_dims(h, gates, w, bias, routing)?;
    if composed::needs_composed(h) {
        return composed::scatter_matmul_bias_with(
            h,
            gates,
            w,
            bias,
            routing,
            block,
            d_out,
            composed::uses_padding(routing),
        );
    }
    let const_bias = match bias {
        Some(b) if !b.track_op() => Some(b.contiguous()?),
        _ => None,
    };
    let y = h.contiguous()?.apply_op3(
        &gates.contiguous()?,
        &w.contiguous()?,
        ScatterMatmul {
            routing: routing.clone(),
            block,
            d_out,
            const_bias,
        },
    )?;
    match bias {
        Some(b) if b.track_op() => y.broadcast_add(b),
        _ => Ok(y),
    }
}

/// The scatter-out op; see [`scatter_matmul`]. Made only by the functions, which check the
/// shapes its kernels read by (a field set by hand could read past `h`).
pub struct ScatterMatmul {
    pub(crate) routing: Arc<Routing>,
    pub(crate) block: usize,
    pub(crate) d_out: usize,
    /// A frozen `[d_out]` bias the forward starts every output row from (not differentiated).
    pub(crate) const_bias: Option<Tensor>,
}

impl CustomOp3 for ScatterMatmul {
    fn name(&self) -> &'static str {
        "scatter_matmul"
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
        let op = "scatter_matmul";
        let shape = Shape::from((self.routing.n_tokens(), self.d_out));
        let hr = cpu::HostRouting::new(&self.routing)?;
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let h = contiguous::<$t>(op, "h", s1, l1)?;
                let g = contiguous::<$t>(op, "gates", s2, l2)?;
                let w = contiguous::<$t>(op, "w", s3, l3)?;
                let y = match &self.const_bias {
                    Some(bias) => with_cpu::<$t, _>(op, bias, |bias| {
                        Ok(cpu::scatter_mm_fwd(
                            hr,
                            h,
                            g,
                            w,
                            self.d_out,
                            self.block,
                            Some(bias),
                        ))
                    })?,
                    None => cpu::scatter_mm_fwd(hr, h, g, w, self.d_out, self.block, None),
                };
                Ok((CpuStorage::$variant(y), shape))
            }};
        }
        match s1.dtype() {
            DType::F32 => run!(f32, F32),
            DType::F64 => run!(f64, F64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        }
    }

    fn bwd(
        &self,
        h: &Tensor,
        gates: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "scatter_matmul_backward";
        let (want_h, want_g, want_w) = (h.track_op(), gates.track_op(), w.track_op());
        let r = &*self.routing;
        let hr = cpu::HostRouting::new(r)?;
        let (b, d_out) = (self.block, self.d_out);
        let dev = h.device();
        macro_rules! run {
            ($t:ty) => {
                with_cpu::<$t, _>(op, grad, |dy| {
                    with_cpu::<$t, _>(op, h, |hs| {
                        with_cpu::<$t, _>(op, gates, |gs| {
                            let (dh, dg) = if want_h || want_g {
                                let (dh, dg) = with_cpu::<$t, _>(op, w, |ws| {
                                    Ok(cpu::scatter_mm_bwd_hg(hr, dy, hs, gs, ws, d_out, b, want_g))
                                })?;
                                let dh = if want_h {
                                    Some(Tensor::from_vec(dh, h.shape(), dev)?)
                                } else {
                                    None
                                };
                                let dg = if want_g {
                                    Some(Tensor::from_vec(dg, gates.shape(), dev)?)
                                } else {
                                    None
                                };
                                (dh, dg)
                            } else {
                                (None, None)
                            };
                            let dw = if want_w {
                                let v = cpu::scatter_mm_bwd_w(hr, dy, hs, gs, d_out, b);
                                Some(Tensor::from_vec(v, w.shape(), dev)?)
                            } else {
                                None
                            };
                            Ok((dh, dg, dw))
                        })
                    })
                })
            };
        }
        match h.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        }
    }
}
