//! The two grouped-GEMM custom ops the routed FFN (and its LoRA factors) are composed of.
//!
//! - [`gather_matmul`] `(x [T, d_in], W [n·b, d_in], bias [n·b]?) → [R, b]`: fc1, or LoRA's B1.
//! - [`scatter_matmul`] `(h [R, b], gates [R], W [d_out, n·b]) → [T, d_out]`: fc2 scaled by the
//!   gates, or LoRA's A2.
//!
//! The routing (block ids, permutation, group offsets) is not differentiable and lives in the op
//! struct. Each backward computes only the gradients of tracked inputs: a frozen weight costs no
//! weight-gradient GEMM.

use super::cpu;
use super::router::Routing;
use crate::util::{check_float, check_same, contiguous, with_cpu, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Validates `gather_matmul`'s inputs and returns the block size b.
fn gather_dims(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, routing: &Routing) -> Result<usize> {
    let op = "gather_matmul";
    check_float(op, "x", x.dtype())?;
    check_same(op, &[("x", x), ("w", w)])?;
    if let Some(bias) = bias {
        check_same(op, &[("x", x), ("bias", bias)])?;
    }
    let (t, d_in) = x
        .dims2()
        .map_err(|_| candle_core::Error::Msg(format!("{op}: x is {:?}, expected [T, d_in]", x.dims())))?;
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
    if let Some(bias) = bias {
        if bias.dims() != [rows] {
            bail!("{op}: bias is {:?}, expected [{rows}]", bias.dims());
        }
    }
    Ok(rows / n)
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
    let block = gather_dims(x, w, bias, routing)?;
    let op = GatherMatmul {
        routing: routing.clone(),
        block,
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        Some(bias) => x.apply_op3(&w, &bias.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// The gather-in op; see [`gather_matmul`].
pub struct GatherMatmul {
    pub routing: Arc<Routing>,
    pub block: usize,
}

impl GatherMatmul {
    fn fwd<T: Float + candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        bias: Option<&[T]>,
        d_in: usize,
    ) -> Result<(Vec<T>, Shape)> {
        let out = cpu::gather_mm_fwd(&self.routing, x, w, bias, d_in, self.block);
        Ok((out, Shape::from((self.routing.n_rows(), self.block))))
    }

    fn cpu(&self, ss: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let op = "gather_matmul";
        let d_in = ss[1].1.dims()[1];
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let x = contiguous::<$t>(op, "x", ss[0].0, ss[0].1)?;
                let w = contiguous::<$t>(op, "w", ss[1].0, ss[1].1)?;
                let bias = match ss.get(2) {
                    Some((s, l)) => Some(contiguous::<$t>(op, "bias", s, l)?),
                    None => None,
                };
                let (out, shape) = self.fwd(x, w, bias, d_in)?;
                Ok((CpuStorage::$variant(out), shape))
            }};
        }
        match ss[0].0.dtype() {
            DType::F32 => run!(f32, F32),
            DType::F64 => run!(f64, F64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        }
    }

    /// `(dx, dw, dbias)`, each only if its input is tracked.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "gather_matmul_backward";
        let (want_x, want_w) = (x.track_op(), w.track_op());
        let want_b = bias.is_some_and(|b| b.track_op());
        let (b, d_in) = (self.block, x.dim(1)?);
        let r = &*self.routing;
        let dev = x.device();
        macro_rules! run {
            ($t:ty) => {
                with_cpu::<$t, _>(op, grad, |dh| {
                    let dx = if want_x {
                        let v = with_cpu::<$t, _>(op, w, |w| Ok(cpu::gather_mm_bwd_x(r, dh, w, d_in, b)))?;
                        Some(Tensor::from_vec(v, x.shape(), dev)?)
                    } else {
                        None
                    };
                    let (dw, db) = if want_w || want_b {
                        with_cpu::<$t, _>(op, x, |xs| {
                            Ok(cpu::gather_mm_bwd_w(r, dh, xs, d_in, b, want_w, want_b))
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
        match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        }
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
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, Some(bias), grad)
    }
}

/// Grouped "scatter-out" GEMM: `y[t] = Σ_{routed rows r of t} gates[r] · h[r] · W_eᵀ`, where `W_e`
/// is columns `[e·b, (e+1)·b)` of `w` (`[d_out, n·b]`, read in place). Returns `[T, d_out]`.
/// Differentiable in `h`, `gates` and `w`.
pub fn scatter_matmul(h: &Tensor, gates: &Tensor, w: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    let op = "scatter_matmul";
    check_float(op, "h", h.dtype())?;
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
    h.contiguous()?.apply_op3(
        &gates.contiguous()?,
        &w.contiguous()?,
        ScatterMatmul {
            routing: routing.clone(),
            block,
            d_out,
        },
    )
}

/// The scatter-out op; see [`scatter_matmul`].
pub struct ScatterMatmul {
    pub routing: Arc<Routing>,
    pub block: usize,
    pub d_out: usize,
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
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let h = contiguous::<$t>(op, "h", s1, l1)?;
                let g = contiguous::<$t>(op, "gates", s2, l2)?;
                let w = contiguous::<$t>(op, "w", s3, l3)?;
                let y = cpu::scatter_mm_fwd(&self.routing, h, g, w, self.d_out, self.block);
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
        let (b, d_out) = (self.block, self.d_out);
        let dev = h.device();
        macro_rules! run {
            ($t:ty) => {
                with_cpu::<$t, _>(op, grad, |dy| {
                    with_cpu::<$t, _>(op, h, |hs| {
                        with_cpu::<$t, _>(op, gates, |gs| {
                            let (dh, dg) = if want_h || want_g {
                                let (dh, dg) = with_cpu::<$t, _>(op, w, |ws| {
                                    Ok(cpu::scatter_mm_bwd_hg(r, dy, hs, gs, ws, d_out, b, want_g))
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
                                let v = cpu::scatter_mm_bwd_w(r, dy, hs, gs, d_out, b);
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
