//! The routed GEMMs composed from row moves (`rows.rs`: on CUDA, `kernels/routed_ffn.cu`) and
//! candle `matmul`s, differentiated by candle's autograd. This is what runs on devices without
//! our fused kernel (CUDA today). It computes the same function as the fused CPU ops, which the
//! tests check on the CPU, but it copies the routed rows and computes every weight gradient
//! candle's matmul backward produces.
//!
//! Two layouts, chosen per routing ([`uses_padding`]):
//! - **padded** (balanced routings): the routed rows laid out per block, each padded with zero
//!   rows to the fullest block's count, so each projection is one batched GEMM over all blocks
//!   and the autograd graph has a fixed handful of nodes;
//! - **per block** (skewed routings, where padding would more than double the rows): one GEMM per
//!   block on its row range. Each range is a `narrow`, whose backward candle pads to the full
//!   tensor and adds: on an H200 this path spent more time in those adds and copies than in its
//!   GEMMs (BERT-base-like FFN, 8192 tokens, 4 of 8 blocks).
//!
//! Both need the per-block row counts on the host, which is the one copy a device routing makes
//! (`Routing::from_scores`). A cuBLAS grouped GEMM would too (its group sizes are host
//! arguments), so it would save no copy; for the balanced routings load balancing aims at, the
//! padded batched GEMM is already a single launch per projection.

use super::ops::{gather_dims, scatter_dims, AddKind};
use super::router::Routing;
use super::rows::{gather_rows, move_rows, padded_rows, sum_rows, Move, RowMap};
use crate::activation::Activation;
use crate::lora::few_rows_matmul;
use candle_core::{bail, Result, Tensor};
use std::sync::Arc;

/// Padding may at most double the routed rows (`n_blocks · R_max ≤ 2R`).
const MAX_PADDING: usize = 2;

/// Whether the composed path runs `routing` padded (one batched GEMM per projection) rather than
/// one GEMM per block: when the padded layout has at most twice the routed rows.
pub fn uses_padding(routing: &Routing) -> bool {
    let rm = padded_rows(routing);
    rm > 0 && routing.n_blocks() * rm <= MAX_PADDING * routing.n_rows()
}

/// `act(x[t] · W_eᵀ + add)` for every routed row, `[R, b]`, padded: one batched GEMM.
fn gather_matmul_act_padded(
    x: &Tensor,
    w: &Tensor,
    add: Option<(&Tensor, AddKind)>,
    act: Option<Activation>,
    routing: &Arc<Routing>,
    block: usize,
) -> Result<Tensor> {
    let (n, rm, d_in) = (routing.n_blocks(), padded_rows(routing), x.dim(1)?);
    let xp = move_rows(x, Move::Gather, RowMap::padded(routing)?)?.reshape((n, rm, d_in))?;
    let we = w.contiguous()?.reshape((n, block, d_in))?;
    let mut h = xp.matmul(&we.t()?)?; // [n, R_max, b]
    if let Some((bias, AddKind::Bias)) = add {
        // A broadcast add, so the bias gradient is a sum (f32-accumulated in bf16 too).
        h = h.broadcast_add(&bias.reshape((n, 1, block))?)?;
    }
    let unpad = RowMap::unpad(routing)?;
    let mut h = move_rows(&h.reshape((n * rm, block))?, Move::Gather, unpad)?; // [R, b]
    if let Some((base, AddKind::Base)) = add {
        h = (h + base)?;
    }
    match act {
        Some(a) => a.forward(&h),
        None => Ok(h),
    }
}

/// `y[t] = Σ_{rows r of t} gates[r] · h[r] · W_eᵀ`, `[T, d_out]`, padded: one batched GEMM.
fn scatter_matmul_padded(
    hg: &Tensor,
    w: &Tensor,
    routing: &Arc<Routing>,
    block: usize,
    d_out: usize,
) -> Result<Tensor> {
    let (n, rm) = (routing.n_blocks(), padded_rows(routing));
    let hp = move_rows(hg, Move::Sum, RowMap::unpad(routing)?)?.reshape((n, rm, block))?;
    // W's column blocks as [n, d_out, b]: one copy of W (small next to the GEMM), so each block
    // is a plain transposed operand of the batched GEMM.
    let we = w.reshape((d_out, n, block))?.transpose(0, 1)?.contiguous()?;
    let yp = hp.matmul(&we.t()?)?; // [n, R_max, d_out]
    move_rows(&yp.reshape((n * rm, d_out))?, Move::Sum, RowMap::padded(routing)?)
}

/// `act(x[t] · W_eᵀ + add)` for every routed row, `[R, b]`: see `gather_matmul_act`. The
/// shapes are checked as there, and `block` and `add`'s kind must be the ones they imply: the
/// GEMMs slice `w` by `block`, so another value would read other rows, silently.
pub fn gather_matmul_act(
    x: &Tensor,
    w: &Tensor,
    add: Option<(&Tensor, AddKind)>,
    act: Option<Activation>,
    routing: &Arc<Routing>,
    block: usize,
) -> Result<Tensor> {
    let (b, kind) = gather_dims(x, w, add.map(|(a, _)| a), routing)?;
    if block != b {
        bail!(
            "gather_matmul: block = {block}, but w {:?} over {} blocks has blocks of {b} rows",
            w.dims(),
            routing.n_blocks()
        );
    }
    if let Some((a, given)) = add.filter(|(_, given)| *given != kind) {
        bail!(
            "gather_matmul: the addend {:?} is a {kind:?} here, but was passed as {given:?}",
            a.dims()
        );
    }
    gather_matmul_act_checked(x, w, add, act, routing, block)
}

/// [`gather_matmul_act`] for inputs already checked (`ops::gather_dims`).
pub(crate) fn gather_matmul_act_checked(
    x: &Tensor,
    w: &Tensor,
    add: Option<(&Tensor, AddKind)>,
    act: Option<Activation>,
    routing: &Arc<Routing>,
    block: usize,
) -> Result<Tensor> {
    if uses_padding(routing) {
        return gather_matmul_act_padded(x, w, add, act, routing, block);
    }
    gather_matmul_act_per_block(x, w, add, act, routing, block)
}

/// [`gather_matmul_act`] as one GEMM per block with routed rows, W's block rows read in place.
pub(crate) fn gather_matmul_act_per_block(
    x: &Tensor,
    w: &Tensor,
    add: Option<(&Tensor, AddKind)>,
    act: Option<Activation>,
    routing: &Arc<Routing>,
    block: usize,
) -> Result<Tensor> {
    let dev = x.device();
    let xr = gather_rows(x, routing)?; // [R, d_in]
    let mut parts = Vec::new();
    for e in 0..routing.n_blocks() {
        let r = routing.block_rows(e);
        if r.is_empty() {
            continue;
        }
        let we = w.narrow(0, e * block, block)?;
        let mut part = few_rows_matmul(&xr.narrow(0, r.start, r.len())?, &we)?;
        if let Some((bias, AddKind::Bias)) = add {
            // Per block, so the bias gradient is a column sum (f32-accumulated in bf16 too)
            // rather than an index_add that rounds at every row.
            part = part.broadcast_add(&bias.narrow(0, e * block, block)?)?;
        }
        parts.push(part);
    }
    let mut h = if parts.is_empty() {
        Tensor::zeros((0, block), x.dtype(), dev)?
    } else {
        Tensor::cat(&parts, 0)?
    };
    if let Some((base, AddKind::Base)) = add {
        h = (h + base)?;
    }
    match act {
        Some(a) => a.forward(&h),
        None => Ok(h),
    }
}

/// `y[t] = Σ_{rows r of t} gates[r] · h[r] · W_eᵀ (+ bias)`, `[T, d_out]`: see `scatter_matmul_bias`.
/// The shapes are checked as there, and `block` and `d_out` must be the ones they imply (the
/// GEMMs slice `w` and lay out `y` by them).
pub fn scatter_matmul_bias(
    h: &Tensor,
    gates: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    routing: &Arc<Routing>,
    block: usize,
    d_out: usize,
) -> Result<Tensor> {
    let (b, o) = scatter_dims(h, gates, w, bias, routing)?;
    if (block, d_out) != (b, o) {
        bail!(
            "scatter_matmul: block = {block}, d_out = {d_out}, but w {:?} over {} blocks has \
             blocks of {b} columns and {o} outputs",
            w.dims(),
            routing.n_blocks()
        );
    }
    scatter_matmul_bias_with(h, gates, w, bias, routing, block, d_out, uses_padding(routing))
}

/// [`scatter_matmul_bias`], padded (one batched GEMM) or one GEMM per block as `padded` says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scatter_matmul_bias_with(
    h: &Tensor,
    gates: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    routing: &Arc<Routing>,
    block: usize,
    d_out: usize,
    padded: bool,
) -> Result<Tensor> {
    let dev = h.device();
    let hg = h.broadcast_mul(&gates.unsqueeze(1)?)?;
    let y = if padded {
        scatter_matmul_padded(&hg, w, routing, block, d_out)?
    } else {
        scatter_matmul_per_block(&hg, w, routing, block, d_out, dev)?
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn scatter_matmul_per_block(
    hg: &Tensor,
    w: &Tensor,
    routing: &Arc<Routing>,
    block: usize,
    d_out: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    for e in 0..routing.n_blocks() {
        let r = routing.block_rows(e);
        if r.is_empty() {
            continue;
        }
        // A column block of w is strided ([d_out, b] with row stride d_ff), which candle's cuBLAS
        // matmul rejects once transposed; one copy of the block (d_out·b values, small next to
        // the GEMM's R·b·d_out) makes it a plain transposed operand. The CPU's GEMM reads it in
        // place (what few-token decoding needs: there the copy is most of the work).
        let we = w.narrow(1, e * block, block)?; // [d_out, b]
        let we = if dev.is_cpu() { we } else { we.contiguous()? };
        parts.push(few_rows_matmul(&hg.narrow(0, r.start, r.len())?, &we)?);
    }
    if parts.is_empty() {
        Tensor::zeros((routing.n_tokens(), d_out), hg.dtype(), dev)
    } else {
        sum_rows(&Tensor::cat(&parts, 0)?, routing)
    }
}

/// Whether `t` lives where the fused kernels do not run (any device but the CPU).
pub(crate) fn needs_composed(t: &Tensor) -> bool {
    !t.device().is_cpu()
}
