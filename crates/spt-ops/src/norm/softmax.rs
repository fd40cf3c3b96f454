//! Max-subtracted softmax over the last dimension, as a [`CustomOp1`] whose backward uses only
//! the output: `dx = y ⊙ (dy − Σ y·dy)`.

use crate::simd::Vector;
use crate::util::{check_float, contiguous, row_max, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Softmax over the last dimension with an exact backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    check_float("softmax", "x", x)?;
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// The softmax op.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxOp;

fn forward<T: Vector>(x: &[T], d: usize) -> Vec<T> {
    let mut y = x.to_vec();
    if d == 0 {
        return y;
    }
    y.par_chunks_mut(d).for_each(|y| {
        let max = row_max(y);
        let sum = T::exp_shift(y, max);
        let inv = sum.recip();
        y.iter_mut().for_each(|y| *y = *y * inv);
    });
    y
}

fn backward<T: Float>(y: &[T], dy: &[T], d: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    if d == 0 {
        return dx;
    }
    dx.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(dx, (y, dy))| {
            let dot: T = y.iter().zip(dy).map(|(&a, &b)| a * b).sum();
            for i in 0..d {
                dx[i] = y[i] * (dy[i] - dot);
            }
        });
    dx
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(forward(contiguous::<f32>("softmax", "x", s, l)?, d)),
            CpuStorage::F64(_) => CpuStorage::F64(forward(contiguous::<f64>("softmax", "x", s, l)?, d)),
            other => bail!("softmax: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        crate::cuda::by_float!("softmax", s.dtype(), super::cuda::softmax_fwd(s, l))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?))
    }
}

/// Backward op over `(y, dy)`.
pub struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "softmax_backward";
        if l1.shape() != l2.shape() {
            bail!("{op}: y is {:?} but grad is {:?}", l1.dims(), l2.dims());
        }
        let d = l1.dims().last().copied().unwrap_or(1);
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(backward(
                contiguous::<f32>(op, "y", s1, l1)?,
                contiguous::<f32>(op, "grad", s2, l2)?,
                d,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(backward(
                contiguous::<f64>(op, "y", s1, l1)?,
                contiguous::<f64>(op, "grad", s2, l2)?,
                d,
            )),
            _ => bail!("{op}: y and grad must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        crate::cuda::by_float!(
            "softmax_backward",
            s1.dtype(),
            super::cuda::softmax_bwd(s1, l1, s2, l2)
        )
    }
}
