//! The routed GEMMs composed from a row gather, one candle `matmul` per block and a per-token row
//! sum ([`gather_rows`], [`sum_rows`]: on CUDA, `kernels/routed_ffn.cu`), differentiated by
//! candle's autograd. This is what runs on devices without our fused kernel (CUDA today: one
//! cuBLAS GEMM per block through candle's matmul). It computes the same function as the fused CPU
//! ops, which the tests check on the CPU, but it copies the routed rows and computes every weight
//! gradient candle's matmul backward produces.

use super::ops::AddKind;
use super::router::Routing;
use super::rows::{gather_rows, sum_rows};
use crate::activation::Activation;
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// Block `e` of each routed row, `[R]` u32.
fn row_blocks(routing: &Routing) -> Vec<u32> {
    let mut out = Vec::with_capacity(routing.n_rows());
    for e in 0..routing.n_blocks() {
        out.extend(std::iter::repeat_n(e as u32, routing.block_rows(e).len()));
    }
    out
}

/// `act(x[t] · W_eᵀ + add)` for every routed row, `[R, b]`: see `gather_matmul_act`.
pub fn gather_matmul_act(
    x: &Tensor,
    w: &Tensor,
    add: Option<(&Tensor, AddKind)>,
    act: Option<Activation>,
    routing: &Arc<Routing>,
    block: usize,
) -> Result<Tensor> {
    let dev = x.device();
    let rows = routing.n_rows();
    let xr = gather_rows(x, routing)?; // [R, d_in]
    let mut parts = Vec::new();
    for e in 0..routing.n_blocks() {
        let r = routing.block_rows(e);
        if r.is_empty() {
            continue;
        }
        let we = w.narrow(0, e * block, block)?;
        parts.push(xr.narrow(0, r.start, r.len())?.matmul(&we.t()?)?);
    }
    let mut h = if parts.is_empty() {
        Tensor::zeros((0, block), x.dtype(), dev)?
    } else {
        Tensor::cat(&parts, 0)?
    };
    match add {
        Some((bias, AddKind::Bias)) => {
            let per_block = bias.reshape((routing.n_blocks(), block))?;
            let idx = Tensor::from_vec(row_blocks(routing), rows, dev)?;
            h = (h + per_block.index_select(&idx, 0)?)?;
        }
        Some((base, AddKind::Base)) => h = (h + base)?,
        _ => {}
    }
    match act {
        Some(a) => a.forward(&h),
        None => Ok(h),
    }
}

/// `y[t] = Σ_{rows r of t} gates[r] · h[r] · W_eᵀ (+ bias)`, `[T, d_out]`: see `scatter_matmul_bias`.
pub fn scatter_matmul_bias(
    h: &Tensor,
    gates: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    routing: &Arc<Routing>,
    block: usize,
    d_out: usize,
) -> Result<Tensor> {
    let dev = h.device();
    let hg = h.broadcast_mul(&gates.unsqueeze(1)?)?;
    let mut parts = Vec::new();
    for e in 0..routing.n_blocks() {
        let r = routing.block_rows(e);
        if r.is_empty() {
            continue;
        }
        let we = w.narrow(1, e * block, block)?; // [d_out, b]
        parts.push(hg.narrow(0, r.start, r.len())?.matmul(&we.t()?)?);
    }
    let y = if parts.is_empty() {
        Tensor::zeros((routing.n_tokens(), d_out), h.dtype(), dev)?
    } else {
        sum_rows(&Tensor::cat(&parts, 0)?, routing)?
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Whether `t` lives where the fused kernels do not run (any device but the CPU).
pub(crate) fn needs_composed(t: &Tensor) -> bool {
    !t.device().is_cpu()
}
