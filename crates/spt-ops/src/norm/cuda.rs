//! CUDA launchers for `kernels/norm.cu`: layer_norm and softmax forward/backward (f32 or bf16;
//! statistics and dgamma/dbeta partials in f32).

use crate::cuda::{
    cfg_blocks, check_kernel_float, cuda_storage, func, i32_arg, kname, launched, tensor, view, KernelFloat,
    NORM,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result, Shape, Tensor};

/// Threads per block (one block per row).
const THREADS: u32 = 256;
/// Rows per block in the layer-norm backward (each block writes one partial dgamma/dbeta row).
const LN_BWD_ROWS: usize = 32;

fn rows_d(l: &Layout) -> (usize, usize) {
    let d = l.dims().last().copied().unwrap_or(1);
    let rows = l.shape().elem_count().checked_div(d).unwrap_or(0);
    (rows, d)
}

/// `layer_norm` forward over `(x, gamma, beta)`, for `T` the storages' element type.
pub(crate) fn layer_norm_fwd<T: KernelFloat>(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "layer_norm";
    let x = view::<T>(op, "x", s1, l1)?;
    let g = view::<T>(op, "gamma", s2, l2)?;
    let b = view::<T>(op, "beta", s3, l3)?;
    let dev = &s1.device;
    let (rows, d) = rows_d(l1);
    let mut y = dev.alloc_zeros::<T>(rows * d)?;
    if rows > 0 {
        let name = kname::<T>("layer_norm_fwd");
        let f = func(dev, NORM, &name)?;
        let mut a = f.builder();
        a.arg(&x).arg(&g).arg(&b).arg(&mut y);
        candle_core::builder_arg!(a, i32_arg(op, "d", d)?, eps as f32);
        i32_arg(op, "rows", rows)?;
        launched(op, &name, unsafe { a.launch(cfg_blocks(rows, THREADS, 0)) })?;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l1.shape().clone()))
}

/// `(dx, dgamma, dbeta)` on CUDA; dgamma/dbeta are reduced deterministically (per-block
/// partials, then a fixed-order sum); `T` is the dtype of x.
pub(crate) fn layer_norm_bwd<T: KernelFloat>(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "layer_norm_backward";
    for (n, t) in [("x", x), ("gamma", gamma), ("dy", dy)] {
        check_kernel_float(op, n, t, x.dtype())?;
    }
    let (x, gamma, dy) = (x.contiguous()?, gamma.contiguous()?, dy.contiguous()?);
    let dev = x.device().as_cuda_device()?.clone();
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = gamma.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let xv = view::<T>(op, "x", cuda_storage(op, "x", &xs)?, xl)?;
    let gv = view::<T>(op, "gamma", cuda_storage(op, "gamma", &gs)?, gl)?;
    let dv = view::<T>(op, "dy", cuda_storage(op, "dy", &ds)?, dl)?;
    let (rows, d) = rows_d(xl);
    let nblk = rows.div_ceil(LN_BWD_ROWS).max(1);
    let mut dx = dev.alloc_zeros::<T>(rows * d)?;
    let mut pg = dev.alloc_zeros::<f32>(nblk * d)?;
    let mut pb = dev.alloc_zeros::<f32>(nblk * d)?;
    let mut dg = dev.alloc_zeros::<T>(d)?;
    let mut db = dev.alloc_zeros::<T>(d)?;
    if rows > 0 && d > 0 {
        let name = kname::<T>("layer_norm_bwd");
        let f = func(&dev, NORM, &name)?;
        let mut a = f.builder();
        a.arg(&xv)
            .arg(&gv)
            .arg(&dv)
            .arg(&mut dx)
            .arg(&mut pg)
            .arg(&mut pb);
        candle_core::builder_arg!(
            a,
            i32_arg(op, "rows", rows)?,
            i32_arg(op, "d", d)?,
            LN_BWD_ROWS as i32,
            eps as f32
        );
        launched(op, &name, unsafe { a.launch(cfg_blocks(nblk, THREADS, 0)) })?;
        let name = kname::<T>("layer_norm_bwd_reduce");
        let f = func(&dev, NORM, &name)?;
        let mut a = f.builder();
        a.arg(&pg).arg(&pb).arg(&mut dg).arg(&mut db);
        candle_core::builder_arg!(a, nblk as i32, d as i32);
        let cfg = cfg_blocks(d.div_ceil(THREADS as usize), THREADS, 0);
        launched(op, &name, unsafe { a.launch(cfg) })?;
    }
    Ok((
        tensor(dx, &dev, x.shape()),
        tensor(dg, &dev, d),
        tensor(db, &dev, d),
    ))
}

/// Softmax forward over the last dimension, for `T` the storage's element type.
pub(crate) fn softmax_fwd<T: KernelFloat>(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let op = "softmax";
    let x = view::<T>(op, "x", s, l)?;
    let dev = &s.device;
    let (rows, d) = rows_d(l);
    let mut y = dev.alloc_zeros::<T>(rows * d)?;
    if rows > 0 {
        i32_arg(op, "rows", rows)?;
        let name = kname::<T>("softmax_fwd");
        let f = func(dev, NORM, &name)?;
        let mut a = f.builder();
        a.arg(&x).arg(&mut y);
        candle_core::builder_arg!(a, i32_arg(op, "d", d)?);
        launched(op, &name, unsafe { a.launch(cfg_blocks(rows, THREADS, 0)) })?;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
}

/// Softmax backward `dx = y ⊙ (dy − Σ y·dy)` over `(y, dy)`.
pub(crate) fn softmax_bwd<T: KernelFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "softmax_backward";
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op}: y is {:?} but grad is {:?}", l1.dims(), l2.dims());
    }
    if s1.dtype() != s2.dtype() {
        candle_core::bail!("{op}: y is {:?} but grad is {:?}", s1.dtype(), s2.dtype());
    }
    let y = view::<T>(op, "y", s1, l1)?;
    let g = view::<T>(op, "grad", s2, l2)?;
    let dev = &s1.device;
    let (rows, d) = rows_d(l1);
    let mut dx = dev.alloc_zeros::<T>(rows * d)?;
    if rows > 0 {
        i32_arg(op, "rows", rows)?;
        let name = kname::<T>("softmax_bwd");
        let f = func(dev, NORM, &name)?;
        let mut a = f.builder();
        a.arg(&y).arg(&g).arg(&mut dx);
        candle_core::builder_arg!(a, i32_arg(op, "d", d)?);
        launched(op, &name, unsafe { a.launch(cfg_blocks(rows, THREADS, 0)) })?;
    }
    Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), l1.shape().clone()))
}
