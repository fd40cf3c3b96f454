//! Layer normalisation over the last dimension, as a [`CustomOp3`] over `(x, gamma, beta)`.

use crate::util::{check_float, check_same, contiguous, if_tracked, sum_partials, with_cpu, Float};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per rayon task in the backward's parameter-gradient reduction.
pub(super) const ROWS_PER_TASK: usize = 64;

/// `y = (x − mean(x)) / sqrt(var(x) + eps) · gamma + beta` over the last dimension, with an exact
/// backward for all three inputs. `gamma` and `beta` have shape `[d]` where `x` is `[.., d]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let op = "layer_norm";
    check_float(op, "x", x)?;
    check_same(op, &[("x", x), ("gamma", gamma), ("beta", beta)])?;
    let d = x.dim(candle_core::D::Minus1)?;
    if gamma.dims() != [d] || beta.dims() != [d] {
        bail!(
            "layer_norm: x is {:?}, expected gamma and beta of shape [{d}], got {:?} and {:?}",
            x.dims(),
            gamma.dims(),
            beta.dims()
        );
    }
    if eps.is_nan() || eps <= 0.0 {
        bail!("layer_norm: eps must be positive, got {eps}");
    }
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNormOp { eps })
}

/// The layer-norm op; `eps` is the variance epsilon.
pub struct LayerNormOp {
    pub eps: f64,
}

/// Per-row mean and reciprocal standard deviation.
pub(super) fn row_stats<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::lit(row.len() as f64);
    let mean = row.iter().copied().sum::<T>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, (var + T::lit(eps)).sqrt().recip())
}

fn forward<T: Float>(x: &[T], g: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = g.len();
    let mut y = vec![T::zero(); x.len()];
    if d == 0 {
        return y;
    }
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let (mean, rstd) = row_stats(x, eps);
        for i in 0..d {
            y[i] = (x[i] - mean) * rstd * g[i] + b[i];
        }
    });
    y
}

/// Returns `(dx, dgamma, dbeta)`.
fn backward<T: Float>(x: &[T], g: &[T], dy: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = g.len();
    let mut dx = vec![T::zero(); x.len()];
    if d == 0 {
        return (dx, vec![], vec![]);
    }
    let inv_d = T::lit(1.0 / d as f64);
    // dx per row, and per-task partial sums of dgamma/dbeta reduced in a fixed order.
    let partials: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(
            x.par_chunks(d * ROWS_PER_TASK)
                .zip(dy.par_chunks(d * ROWS_PER_TASK)),
        )
        .map(|(dx, (x, dy))| {
            let mut dg = vec![T::zero(); d];
            let mut db = vec![T::zero(); d];
            for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                let (mean, rstd) = row_stats(x, eps);
                let mut sum_gd = T::zero();
                let mut sum_gd_xhat = T::zero();
                for i in 0..d {
                    let xhat = (x[i] - mean) * rstd;
                    let gd = dy[i] * g[i];
                    sum_gd = sum_gd + gd;
                    sum_gd_xhat = sum_gd_xhat + gd * xhat;
                    dg[i] = dg[i] + dy[i] * xhat;
                    db[i] = db[i] + dy[i];
                }
                let (m1, m2) = (sum_gd * inv_d, sum_gd_xhat * inv_d);
                for i in 0..d {
                    let xhat = (x[i] - mean) * rstd;
                    dx[i] = rstd * (dy[i] * g[i] - m1 - xhat * m2);
                }
            }
            (dg, db)
        })
        .collect();
    let (dg, db): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    (dx, sum_partials(dg, d), sum_partials(db, d))
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer_norm"
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
        let op = "layer_norm";
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(forward(
                contiguous::<f32>(op, "x", s1, l1)?,
                contiguous::<f32>(op, "gamma", s2, l2)?,
                contiguous::<f32>(op, "beta", s3, l3)?,
                self.eps,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(forward(
                contiguous::<f64>(op, "x", s1, l1)?,
                contiguous::<f64>(op, "gamma", s2, l2)?,
                contiguous::<f64>(op, "beta", s3, l3)?,
                self.eps,
            )),
            _ => bail!("layer_norm: x, gamma and beta must all be f32 or all f64"),
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        crate::cuda::by_float!(
            "layer_norm",
            s1.dtype(),
            super::cuda::layer_norm_fwd(self.eps, s1, l1, s2, l2, s3, l3)
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dg, db) = layer_norm_backward(x, gamma, grad, self.eps)?;
        Ok((if_tracked(x, dx), if_tracked(gamma, dg), if_tracked(beta, db)))
    }
}

/// The exact layer-norm backward: `(dx, dgamma, dbeta)` for upstream gradient `dy`.
pub fn layer_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::cuda::by_float!(
            "layer_norm_backward",
            x.dtype(),
            super::cuda::layer_norm_bwd(x, gamma, dy, eps)
        );
    }
    let op = "layer_norm_backward";
    let d = gamma.dim(0)?;
    let dev = x.device();
    macro_rules! run {
        ($t:ty) => {
            with_cpu::<$t, _>(op, x, |xs| {
                with_cpu::<$t, _>(op, gamma, |gs| {
                    with_cpu::<$t, _>(op, dy, |dys| {
                        let (dx, dg, db) = backward(xs, gs, dys, eps);
                        Ok((
                            Tensor::from_vec(dx, x.shape(), dev)?,
                            Tensor::from_vec(dg, d, dev)?,
                            Tensor::from_vec(db, d, dev)?,
                        ))
                    })
                })
            })
        };
    }
    match x.dtype() {
        candle_core::DType::F32 => run!(f32),
        candle_core::DType::F64 => run!(f64),
        dt => bail!("{op}: unsupported dtype {dt:?}"),
    }
}
