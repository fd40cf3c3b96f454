//! CUDA launchers for `kernels/routed_ffn.cu`: the row gather and the per-token row sum of
//! `rows.rs`, f32 or bf16. The index arrays come from the host-side `Routing` (a few u32 per
//! token).

use super::router::Routing;
use super::rows::token_rows;
use crate::cuda::{cfg_blocks, func, i32_arg, kname, launched, view, KernelFloat, ROUTED_FFN};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result, Shape};

const THREADS: u32 = 128;

/// `x_g[r] = x[row_token[r]]` on CUDA, for `T` the storage's element type.
pub(crate) fn gather_rows<T: KernelFloat>(
    routing: &Routing,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "gather_rows";
    let x = view::<T>(op, "x", s, l)?;
    let dev = &s.device;
    let (rows, d) = (routing.n_rows(), l.dims()[1]);
    let mut out = dev.alloc_zeros::<T>(rows * d)?;
    if rows * d > 0 {
        i32_arg(op, "R·d", rows * d)?;
        i32_arg(op, "T·d", routing.n_tokens() * d)?;
        let idx = dev.clone_htod(routing.row_token())?;
        let name = kname::<T>("route_gather");
        let f = func(dev, ROUTED_FFN, &name)?;
        let mut a = f.builder();
        a.arg(&x).arg(&idx).arg(&mut out);
        candle_core::builder_arg!(a, d as i32);
        launched(op, &name, unsafe { a.launch(cfg_blocks(rows, THREADS, 0)) })?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((rows, d)),
    ))
}

/// `out[t] = Σ_s y[row of (t, s)]` on CUDA, slots in order, for `T` the storage's element type.
pub(crate) fn sum_rows<T: KernelFloat>(
    routing: &Routing,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "sum_rows";
    let y = view::<T>(op, "y", s, l)?;
    let dev = &s.device;
    let (t, n) = (routing.n_tokens(), l.dims()[1]);
    let mut out = dev.alloc_zeros::<T>(t * n)?;
    if t * n > 0 {
        i32_arg(op, "R·n", routing.n_rows() * n)?;
        let idx = dev.clone_htod(&token_rows(routing))?;
        let name = kname::<T>("route_sum");
        let f = func(dev, ROUTED_FFN, &name)?;
        let mut a = f.builder();
        a.arg(&y).arg(&idx).arg(&mut out);
        candle_core::builder_arg!(a, i32_arg(op, "k", routing.k())?, n as i32);
        launched(op, &name, unsafe { a.launch(cfg_blocks(t, THREADS, 0)) })?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((t, n)),
    ))
}
