//! CUDA launchers for `kernels/activation.cu`: GELU (erf/tanh) and ReLU forward and backward,
//! f32 or bf16.

use super::{cfg_elems, func, i32_arg, kname, launched, view, KernelFloat, ACTIVATION};
use crate::activation::Activation;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result, Shape};

const THREADS: u32 = 256;

fn kind(a: Activation) -> i32 {
    match a {
        Activation::GeluErf => 0,
        Activation::GeluTanh => 1,
        Activation::Relu => 2,
    }
}

/// `act(x)`, for `T` the storage's element type (see `by_float!`).
pub(crate) fn forward<T: KernelFloat>(
    act: Activation,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "activation";
    let x = view::<T>(op, "x", s, l)?;
    let dev = &s.device;
    let n = l.shape().elem_count();
    let mut y = dev.alloc_zeros::<T>(n)?;
    if n > 0 {
        let name = kname::<T>("act_fwd");
        let f = func(dev, ACTIVATION, &name)?;
        let mut a = f.builder();
        a.arg(&x).arg(&mut y);
        candle_core::builder_arg!(a, i32_arg(op, "n", n)?, kind(act));
        launched(op, &name, unsafe { a.launch(cfg_elems(n, THREADS)) })?;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
}

/// `grad · act'(x)` over `(x, grad)`.
pub(crate) fn backward<T: KernelFloat>(
    act: Activation,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "activation_backward";
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op}: x is {:?} but grad is {:?}", l1.dims(), l2.dims());
    }
    if s1.dtype() != s2.dtype() {
        candle_core::bail!("{op}: x is {:?} but grad is {:?}", s1.dtype(), s2.dtype());
    }
    let x = view::<T>(op, "x", s1, l1)?;
    let g = view::<T>(op, "grad", s2, l2)?;
    let dev = &s1.device;
    let n = l1.shape().elem_count();
    let mut dx = dev.alloc_zeros::<T>(n)?;
    if n > 0 {
        let name = kname::<T>("act_bwd");
        let f = func(dev, ACTIVATION, &name)?;
        let mut a = f.builder();
        a.arg(&x).arg(&g).arg(&mut dx);
        candle_core::builder_arg!(a, i32_arg(op, "n", n)?, kind(act));
        launched(op, &name, unsafe { a.launch(cfg_elems(n, THREADS)) })?;
    }
    Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), l1.shape().clone()))
}
