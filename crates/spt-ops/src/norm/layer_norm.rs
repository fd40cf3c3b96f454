//! Layer normalisation over the last dimension, as a [`CustomOp3`] over `(x, gamma, beta)`.

use super::rows::Rows;
use crate::util::{check_float, check_same, contiguous, if_tracked, sum_partials, with_cpu};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per rayon task (and per partial sum of the parameter gradients in the backward).
pub(super) const ROWS_PER_TASK: usize = 64;

/// `y = (x − mean(x)) / sqrt(var(x) + eps) · gamma + beta` over the last dimension, with an exact
/// backward for all three inputs. `gamma` and `beta` have shape `[d]` where `x` is `[.., d]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let op = "layer_norm";
    check_float(op, "x", x)?;
    check_same(op, &[("x", x), ("gamma", gamma), ("beta", beta)])?;
    let Some(&d) = x.dims().last() else {
        bail!("layer_norm: x is a scalar, expected [.., d]")
    };
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

/// The layer-norm op; `eps` is the variance epsilon. Applied directly (`apply_op3`) rather than
/// through [`layer_norm`], it still refuses parameters that do not match x's last dimension.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormOp {
    pub eps: f64,
}

impl LayerNormOp {
    /// gamma and beta `[d]` for x `[.., d]`: another length would normalise over the wrong rows.
    fn check(&self, x: &Layout, gamma: &Layout, beta: &Layout) -> Result<()> {
        let d = x.dims().last().copied();
        if d.is_none() || [gamma.dims(), beta.dims()] != [&[d.unwrap_or(0)][..]; 2] {
            bail!(
                "layer_norm: x is {:?}, expected gamma and beta of shape [d] = its last dimension, got {:?} and {:?}",
                x.dims(),
                gamma.dims(),
                beta.dims()
            );
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            bail!("layer_norm: eps must be positive, got {}", self.eps);
        }
        Ok(())
    }
}

fn forward<T: Rows>(x: &[T], g: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = g.len();
    let mut y = vec![T::zero(); x.len()];
    if d == 0 {
        return y;
    }
    let chunk = d * ROWS_PER_TASK;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                T::normalize_from(y, x, T::stats(x, eps), g, b);
            }
        });
    y
}

/// Returns `(dx, dgamma, dbeta)`; the parameter gradients are zeros unless `params`.
fn backward<T: Rows>(x: &[T], g: &[T], dy: &[T], eps: f64, params: bool) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = g.len();
    let mut dx = vec![T::zero(); x.len()];
    if d == 0 {
        return (dx, vec![], vec![]);
    }
    // dx per row, and per-task partial sums of dgamma/dbeta reduced in a fixed order.
    let partials: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(
            x.par_chunks(d * ROWS_PER_TASK)
                .zip(dy.par_chunks(d * ROWS_PER_TASK)),
        )
        .map(|(dx, (x, dy))| {
            let n = if params { d } else { 0 };
            let (mut dg, mut db) = (vec![T::zero(); n], vec![T::zero(); n]);
            for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                let acc = params.then_some((&mut dg[..], &mut db[..]));
                T::backward(dx, x, dy, g, T::stats(x, eps), acc);
            }
            (dg, db)
        })
        .collect();
    if !params {
        return (dx, vec![T::zero(); d], vec![T::zero(); d]);
    }
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
        self.check(l1, l2, l3)?;
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
        self.check(l1, l2, l3)?;
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
        let params = gamma.track_op() || beta.track_op();
        let (dx, dg, db) = layer_norm_backward(x, gamma, grad, self.eps, params)?;
        Ok((if_tracked(x, dx), if_tracked(gamma, dg), if_tracked(beta, db)))
    }
}

/// The exact layer-norm backward: `(dx, dgamma, dbeta)` for upstream gradient `dy`. Without
/// `params` (gamma and beta frozen) the CPU kernel skips the parameter gradients and returns
/// zeros for them.
pub fn layer_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    eps: f64,
    params: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "layer_norm_backward";
    let d = x.dims().last().copied().unwrap_or(0);
    if gamma.dims() != [d] || dy.dims() != x.dims() {
        bail!(
            "{op}: x is {:?}, expected gamma [{d}] and dy of x's shape, got {:?} and {:?}",
            x.dims(),
            gamma.dims(),
            dy.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::cuda::by_float!(
            "layer_norm_backward",
            x.dtype(),
            super::cuda::layer_norm_bwd(x, gamma, dy, eps)
        );
    }
    let dev = x.device();
    macro_rules! run {
        ($t:ty) => {
            with_cpu::<$t, _>(op, x, |xs| {
                with_cpu::<$t, _>(op, gamma, |gs| {
                    with_cpu::<$t, _>(op, dy, |dys| {
                        let (dx, dg, db) = backward(xs, gs, dys, eps, params);
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
