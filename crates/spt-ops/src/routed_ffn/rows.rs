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
    x.contiguous()?.apply_op1(RowMove(Move::Gather, routing.clone()))
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
    y.contiguous()?.apply_op1(RowMove(Move::Sum, routing.clone()))
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

/// Which way rows move: tokens → routed rows, or routed rows → tokens (each other's adjoint).
#[derive(Clone, Copy)]
enum Move {
    Gather,
    Sum,
}

/// See [`gather_rows`] and [`sum_rows`].
struct RowMove(Move, Arc<Routing>);

impl CustomOp1 for RowMove {
    fn name(&self) -> &'static str {
        match self.0 {
            Move::Gather => "gather_rows",
            Move::Sum => "sum_rows",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (op, r, width) = (self.name(), &*self.1, l.dims()[1]);
        let out_rows = match self.0 {
            Move::Gather => r.n_rows(),
            Move::Sum => r.n_tokens(),
        };
        fn run<T: Float>(m: Move, x: &[T], width: usize, r: &Routing) -> Vec<T> {
            match m {
                Move::Gather => gather_cpu(x, width, r),
                Move::Sum => sum_cpu(x, width, r),
            }
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(run(self.0, contiguous(op, "input", s, l)?, width, r)),
            CpuStorage::F64(_) => CpuStorage::F64(run(self.0, contiguous(op, "input", s, l)?, width, r)),
            other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((out_rows, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::by_float;
        let (op, r) = (self.name(), &*self.1);
        match self.0 {
            Move::Gather => by_float!(op, s.dtype(), super::cuda::gather_rows(r, s, l)),
            Move::Sum => by_float!(op, s.dtype(), super::cuda::sum_rows(r, s, l)),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.0 {
            Move::Gather => sum_rows(grad, &self.1)?,
            Move::Sum => gather_rows(grad, &self.1)?,
        }))
    }
}
