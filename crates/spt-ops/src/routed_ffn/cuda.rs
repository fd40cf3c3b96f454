//! CUDA launchers for `kernels/routed_ffn.cu`: the row gather and its adjoint row sum of
//! `rows.rs` over a host-built [`RowMap`] (a few u32 per row), f32 or bf16.

use super::rows::RowMap;
use crate::cuda::{cfg_blocks, func, i32_arg, kname, launched, view, KernelFloat, ROUTED_FFN};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result, Shape};

const THREADS: u32 = 128;

/// `out[i] = x[src[i]]` (zero where src is the sentinel) on CUDA, for `T` the storage's type.
pub(crate) fn gather_rows<T: KernelFloat>(
    m: &RowMap,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "gather_rows";
    let x = view::<T>(op, "x", s, l)?;
    let dev = &s.device;
    let (rows, d) = (m.dst_rows(), l.dims()[1]);
    let mut out = dev.alloc_zeros::<T>(rows * d)?;
    if rows * d > 0 {
        i32_arg(op, "rows·d", rows * d)?;
        i32_arg(op, "source rows·d", m.src_rows * d)?;
        let idx = dev.clone_htod(&m.src)?;
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

/// `out[j] = Σ_s y[copies[j·per + s]]` (sentinels skipped, slots in order) on CUDA, for `T` the
/// storage's element type.
pub(crate) fn sum_rows<T: KernelFloat>(
    m: &RowMap,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "sum_rows";
    let y = view::<T>(op, "y", s, l)?;
    let dev = &s.device;
    let (rows, n) = (m.src_rows, l.dims()[1]);
    let mut out = dev.alloc_zeros::<T>(rows * n)?;
    if rows * n > 0 {
        i32_arg(op, "rows·n", m.dst_rows() * n)?;
        i32_arg(op, "rows·n", rows * n)?;
        let idx = dev.clone_htod(&m.copies)?;
        let name = kname::<T>("route_sum");
        let f = func(dev, ROUTED_FFN, &name)?;
        let mut a = f.builder();
        a.arg(&y).arg(&idx).arg(&mut out);
        candle_core::builder_arg!(a, i32_arg(op, "copies per row", m.per)?, n as i32);
        launched(op, &name, unsafe { a.launch(cfg_blocks(rows, THREADS, 0)) })?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((rows, n)),
    ))
}
