//! `LayerNorm(dropout(x) + residual)` as one [`CustomOp3`]: the output of every post-LN
//! sublayer (BERT's `*Output` modules).
//!
//! Why one op: composed it is three graph nodes over `[N, d]` (mask multiply, add, layer norm),
//! and candle's backward zero-fills and adds a gradient buffer for every input of every node.
//! Fused, the forward makes one pass and keeps nothing (the sum is recomputed from `x` and
//! `residual`, which the graph holds anyway; the mask is regenerated from its seed), and the
//! backward makes one pass that writes `d residual` and `dx = d residual ⊙ mask`.

use super::layer_norm::{layer_norm, ROWS_PER_TASK};
use super::residual_dropout::mask_rows;
use super::rows::Rows;
use crate::flash_attention::{attention_dropout_mask, RowDropout, SeededDropout};
use crate::util::{check_float, check_same, contiguous, if_tracked, sum_partials, with_slices, Float};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `LayerNorm(dropout(x) + residual)` over the last dimension, with an exact backward for `x`,
/// `residual`, `gamma` and `beta`. `x` and `residual` are `[.., d]` of one shape; `gamma` and
/// `beta` are `[d]`. Dropout (none when `None` or `p = 0`) zeroes element `(row, j)` of `x` with
/// the mask [`attention_dropout_mask`] gives for shape `(1, 1, rows, d)` and scales the rest by
/// `1/(1−p)`.
///
/// f32 and f64 on the CPU run the fused kernel; other dtypes and CUDA run the composed form
/// (same values).
pub fn residual_layer_norm(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout: Option<SeededDropout>,
) -> Result<Tensor> {
    let op = "residual_layer_norm";
    check_float(op, "x", x)?;
    check_same(
        op,
        &[("x", x), ("residual", residual), ("gamma", gamma), ("beta", beta)],
    )?;
    if x.dims() != residual.dims() {
        bail!(
            "{op}: x is {:?} but residual is {:?}: they must have one shape",
            x.dims(),
            residual.dims()
        );
    }
    let d = x.dim(candle_core::D::Minus1)?;
    if gamma.dims() != [d] || beta.dims() != [d] {
        bail!(
            "{op}: x is {:?}, expected gamma and beta of shape [{d}], got {:?} and {:?}",
            x.dims(),
            gamma.dims(),
            beta.dims()
        );
    }
    if eps.is_nan() || eps <= 0.0 {
        bail!("{op}: eps must be positive, got {eps}");
    }
    let dropout = SeededDropout::active(dropout, op)?;
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return residual_layer_norm_reference(x, residual, gamma, beta, eps, dropout);
    }
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    x.contiguous()?.apply_op3(
        &residual.contiguous()?,
        &gb,
        ResidualLayerNormOp {
            eps,
            dropout: dropout.map(RowDropout::new),
        },
    )
}

/// The composed form (candle ops and [`layer_norm`], never optimised): the reference in tests
/// and the path for CUDA and other dtypes.
pub fn residual_layer_norm_reference(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout: Option<SeededDropout>,
) -> Result<Tensor> {
    let dropped = match SeededDropout::active(dropout, "residual_layer_norm_reference")? {
        Some(dr) => {
            let d = x.dim(candle_core::D::Minus1)?;
            let rows = x.elem_count() / d.max(1);
            let mask = attention_dropout_mask(dr, (1, 1, rows, d), x.device())?;
            x.mul(&mask.reshape(x.shape())?.to_dtype(x.dtype())?)?
        }
        _ => x.clone(),
    };
    layer_norm(&(dropped + residual)?, gamma, beta, eps)
}

/// The fused op on `(x, residual, [gamma; beta])`.
struct ResidualLayerNormOp {
    eps: f64,
    dropout: Option<RowDropout>,
}

/// Row `i` of `dropout(x) + residual` into `s`.
fn row_sum<T: Float + crate::flash_attention::DropoutElem>(
    s: &mut [T],
    x: &[T],
    r: &[T],
    i: usize,
    dropout: Option<&RowDropout>,
) {
    s.copy_from_slice(x);
    if let Some(dr) = dropout {
        dr.apply_scaled(s, 0, i, T::lit(1.0));
    }
    for (s, &r) in s.iter_mut().zip(r) {
        *s = *s + r;
    }
}

fn forward<T: Rows + crate::flash_attention::DropoutElem>(
    x: &[T],
    r: &[T],
    gb: &[T],
    eps: f64,
    dropout: Option<&RowDropout>,
) -> Vec<T> {
    let d = gb.len() / 2;
    if d == 0 {
        return vec![T::zero(); x.len()];
    }
    let (g, b) = gb.split_at(d);
    let chunk = d * ROWS_PER_TASK;
    crate::util::par_vec(x.len(), chunk, T::zero(), |task, y| {
        let rows = task * chunk..task * chunk + y.len();
        let (x, r) = (&x[rows.clone()], &r[rows]);
        for (k, (y, (x, r))) in y.chunks_mut(d).zip(x.chunks(d).zip(r.chunks(d))).enumerate() {
            row_sum(y, x, r, task * ROWS_PER_TASK + k, dropout);
            let st = T::stats(y, eps);
            T::normalize(y, st, g, b);
        }
    })
}

/// Returns `(d residual, [dgamma; dbeta])`; `dx` is `d residual ⊙ mask`, made by the caller.
/// The parameter gradients are zeros unless `params`.
fn backward<T: Rows + crate::flash_attention::DropoutElem>(
    x: &[T],
    r: &[T],
    gb: &[T],
    dy: &[T],
    eps: f64,
    dropout: Option<&RowDropout>,
    params: bool,
) -> (Vec<T>, Vec<T>) {
    let d = gb.len() / 2;
    let mut ds = vec![T::zero(); x.len()];
    if d == 0 {
        return (ds, vec![]);
    }
    let g = &gb[..d];
    let chunk = d * ROWS_PER_TASK;
    // Per-task partial sums of dgamma/dbeta, reduced in task order: deterministic.
    let partials: Vec<Vec<T>> = ds
        .par_chunks_mut(chunk)
        .zip(
            x.par_chunks(chunk)
                .zip(r.par_chunks(chunk))
                .zip(dy.par_chunks(chunk)),
        )
        .enumerate()
        .map(|(task, (ds, ((x, r), dy)))| {
            let mut dgb = vec![T::zero(); if params { 2 * d } else { 0 }];
            let (dg, db) = dgb.split_at_mut(if params { d } else { 0 });
            let mut s = vec![T::zero(); d];
            for (k, (ds, ((x, r), dy))) in ds
                .chunks_mut(d)
                .zip(x.chunks(d).zip(r.chunks(d)).zip(dy.chunks(d)))
                .enumerate()
            {
                row_sum(&mut s, x, r, task * ROWS_PER_TASK + k, dropout);
                let acc = params.then_some((&mut dg[..], &mut db[..]));
                T::backward(ds, &s, dy, g, T::stats(&s, eps), acc);
            }
            dgb
        })
        .collect();
    if !params {
        return (ds, vec![T::zero(); 2 * d]);
    }
    (ds, sum_partials(partials, 2 * d))
}

impl CustomOp3 for ResidualLayerNormOp {
    fn name(&self) -> &'static str {
        "residual_layer_norm"
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
        let op = "residual_layer_norm";
        let dr = self.dropout.as_ref();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(forward(
                contiguous::<f32>(op, "x", s1, l1)?,
                contiguous::<f32>(op, "residual", s2, l2)?,
                contiguous::<f32>(op, "gamma/beta", s3, l3)?,
                self.eps,
                dr,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(forward(
                contiguous::<f64>(op, "x", s1, l1)?,
                contiguous::<f64>(op, "residual", s2, l2)?,
                contiguous::<f64>(op, "gamma/beta", s3, l3)?,
                self.eps,
                dr,
            )),
            _ => bail!("{op}: x, residual, gamma and beta must all be f32 or all f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "residual_layer_norm backward";
        let dy = grad.contiguous()?;
        let dr = self.dropout.as_ref();
        let dev = x.device();
        let d = gb.dim(1)?.max(1);
        // dx = d residual ⊙ mask; without dropout (or with x frozen) no second buffer.
        let masked_dx = dr.filter(|_| x.track_op());
        macro_rules! run {
            ($t:ty) => {
                with_slices::<$t, _>(op, &[x, residual, gb, &dy], |s| {
                    let (ds, dgb) = backward(s[0], s[1], s[2], s[3], self.eps, dr, gb.track_op());
                    let dx = masked_dx.map(|dr| {
                        let mut dx = ds.clone();
                        mask_rows(&mut dx, None, d, dr);
                        Tensor::from_vec(dx, x.shape(), dev)
                    });
                    Ok((
                        dx.transpose()?,
                        Tensor::from_vec(ds, x.shape(), dev)?,
                        Tensor::from_vec(dgb, gb.shape(), dev)?,
                    ))
                })
            };
        }
        let (dx, ds, dgb) = match x.dtype() {
            DType::F32 => run!(f32)?,
            DType::F64 => run!(f64)?,
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        };
        let dx = match dx {
            Some(dx) => Some(dx),
            None if dr.is_none() => if_tracked(x, ds.clone()),
            None => None,
        };
        Ok((dx, if_tracked(residual, ds), if_tracked(gb, dgb)))
    }
}
