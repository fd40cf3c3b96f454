//! The two row moves around the routed GEMMs, as custom ops that are each other's adjoint:
//!
//! - [`gather_rows`] `x [T, d] → [R, d]`: routed row `r` is a copy of its token's row.
//! - [`sum_rows`] `y [R, n] → [T, n]`: each token's routed rows summed, slots in order.
//!
//! They are what the composed routed path (`composed.rs`) is built from off the CPU, where they
//! run `kernels/routed_ffn.cu`; candle's `index_add` on CUDA gives one thread per column and
//! leaves the GPU mostly idle. Their CPU versions are the reference for the CUDA kernels and sum
//! in the same order.

use super::router::Routing;
use crate::util::{check_float, contiguous, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x_g[r] = x[row_token[r]]`, `[T, d] → [R, d]`. Differentiable in `x`.
pub fn gather_rows(x: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    check_float("gather_rows", "x", x)?;
    match x.dims() {
        &[t, _] if t == routing.n_tokens() => {}
        d => bail!(
            "gather_rows: x is {d:?}, expected [T, d] with T = {} routed tokens",
            routing.n_tokens()
        ),
    }
    x.contiguous()?.apply_op1(GatherRows(routing.clone()))
}

/// `out[t] = Σ_s y[row of (t, s)]`, `[R, n] → [T, n]`. Differentiable in `y`.
pub fn sum_rows(y: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    check_float("sum_rows", "y", y)?;
    match y.dims() {
        &[r, _] if r == routing.n_rows() => {}
        d => bail!(
            "sum_rows: y is {d:?}, expected [R, n] with R = {} routed rows",
            routing.n_rows()
        ),
    }
    y.contiguous()?.apply_op1(SumRows(routing.clone()))
}

/// The routed row of each (token, slot) pair `t·k + s`: the inverse of `row_src`.
pub(crate) fn token_rows(routing: &Routing) -> Vec<u32> {
    let mut out = vec![0u32; routing.n_rows()];
    for (r, &p) in routing.row_src().iter().enumerate() {
        out[p as usize] = r as u32;
    }
    out
}

fn gather_cpu<T: Float>(x: &[T], d: usize, routing: &Routing) -> Vec<T> {
    let mut out = Vec::with_capacity(routing.n_rows() * d);
    for &t in routing.row_token() {
        out.extend_from_slice(&x[t as usize * d..(t as usize + 1) * d]);
    }
    out
}

fn sum_cpu<T: Float>(y: &[T], n: usize, routing: &Routing) -> Vec<T> {
    let k = routing.k();
    let rows = token_rows(routing);
    let mut out = vec![T::zero(); routing.n_tokens() * n];
    for (o, slots) in out.chunks_mut(n.max(1)).zip(rows.chunks(k)) {
        for &r in slots {
            let src = &y[r as usize * n..(r as usize + 1) * n];
            for (o, &v) in o.iter_mut().zip(src) {
                *o = *o + v;
            }
        }
    }
    out
}

/// Applies a row move to CPU storage of either float type.
fn cpu_move(
    op: &str,
    s: &CpuStorage,
    l: &Layout,
    out_rows: usize,
    f32_fn: impl FnOnce(&[f32], usize) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64], usize) -> Vec<f64>,
) -> Result<(CpuStorage, Shape)> {
    let width = l.dims()[1];
    let out = match s {
        CpuStorage::F32(_) => CpuStorage::F32(f32_fn(contiguous(op, "input", s, l)?, width)),
        CpuStorage::F64(_) => CpuStorage::F64(f64_fn(contiguous(op, "input", s, l)?, width)),
        other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
    };
    Ok((out, Shape::from((out_rows, width))))
}

/// See [`gather_rows`].
struct GatherRows(Arc<Routing>);

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "gather_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let r = &self.0;
        cpu_move(
            self.name(),
            s,
            l,
            r.n_rows(),
            |x, d| gather_cpu(x, d, r),
            |x, d| gather_cpu(x, d, r),
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gather_rows(&self.0, s, l)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(sum_rows(grad, &self.0)?))
    }
}

/// See [`sum_rows`].
struct SumRows(Arc<Routing>);

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let r = &self.0;
        cpu_move(
            self.name(),
            s,
            l,
            r.n_tokens(),
            |y, n| sum_cpu(y, n, r),
            |y, n| sum_cpu(y, n, r),
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::sum_rows(&self.0, s, l)
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gather_rows(grad, &self.0)?))
    }
}
