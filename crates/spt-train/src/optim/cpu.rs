//! The optimizer's CPU passes over f32 parameters: AdamW updating θ, m and v in place, and the
//! sum of squares for the gradient norm, each one multithreaded pass without allocation.
//!
//! For full fine-tuning these are the step's largest non-GEMM costs: MiniLM has 22 M parameters,
//! 11.7 M of them in the word embeddings, so each pass streams ~90 MB per tensor. The tensor-op
//! forms allocated (and the kernel zeroed) three new parameter-sized buffers per update and
//! converted every gradient to f64 for its norm.

use super::Hyper;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::sync::Mutex;

/// Elements per parallel task: fixed, so every result is independent of the thread count.
const CHUNK: usize = 1 << 15;

/// Whether `var` gets host moments and the in-place update: an f32 CPU tensor with contiguous
/// storage (a `Var` keeps its layout, so this holds for its whole life).
pub(super) fn applies(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous()
}

/// `θ, m, v ← AdamW(θ, grad_scale · g, m, v)` in place, in the tensor-op form's order of
/// operations (so both give the same bits). `θ` must satisfy [`applies`]; `m`, `v` have its
/// element count.
pub(super) fn update_in_place(
    var: &Var,
    g: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    h: &Hyper,
    grad_scale: f64,
) -> Result<()> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let f = |x: f64| x as f32;
    let op = Update {
        moments: Mutex::new((m, v)),
        k: Coeffs {
            b1: f(h.beta1),
            c1: f(1.0 - h.beta1),
            b2: f(h.beta2),
            c2: f(1.0 - h.beta2),
            bc1: f(1.0 / (1.0 - h.beta1.powi(h.t))),
            bc2: f(1.0 / (1.0 - h.beta2.powi(h.t))),
            keep: (h.decay != 0.0).then(|| f(1.0 - h.decay)),
            eps: f(h.eps),
            lr: f(h.lr),
            scale: (grad_scale != 1.0).then(|| f(grad_scale)),
        },
    };
    var.as_tensor().inplace_op2(&g, &op)
}

/// The update's constants in f32, as the tensor ops round them.
#[derive(Clone, Copy)]
struct Coeffs {
    b1: f32,
    c1: f32,
    b2: f32,
    c2: f32,
    bc1: f32,
    bc2: f32,
    /// `1 − lr·λ` in the decay group.
    keep: Option<f32>,
    eps: f32,
    lr: f32,
    /// The gradient's clipping factor, when not 1.
    scale: Option<f32>,
}

/// candle's in-place op on θ (source: g); the moments are the optimizer's own host vectors.
struct Update<'a> {
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    k: Coeffs,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (s1, s2) else {
            bail!("adamw: the parameter and its gradient must be f32");
        };
        let (Some((t0, t1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            bail!("adamw: the parameter and its gradient must be contiguous");
        };
        let (theta, grad) = (&mut theta[t0..t1], &grad[g0..g1]);
        let mut guard = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *guard;
        if grad.len() != theta.len() || m.len() != theta.len() || v.len() != theta.len() {
            bail!(
                "adamw: {} parameters, {} gradients, {} / {} moments",
                theta.len(),
                grad.len(),
                m.len(),
                v.len()
            );
        }
        let k = self.k;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((th, m), v), g)| update_chunk(th, m, v, g, k));
        Ok(())
    }
}

/// One chunk, written as zipped iterators so that it vectorises (sqrt and division included).
fn update_chunk(th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: Coeffs) {
    let items = th.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g);
    match (k.keep, k.scale) {
        (None, None) => items.for_each(|(((x, m), v), &g)| step(x, m, v, g, None, k)),
        (Some(keep), None) => items.for_each(|(((x, m), v), &g)| step(x, m, v, g, Some(keep), k)),
        (None, Some(s)) => items.for_each(|(((x, m), v), &g)| step(x, m, v, g * s, None, k)),
        (Some(keep), Some(s)) => items.for_each(|(((x, m), v), &g)| step(x, m, v, g * s, Some(keep), k)),
    }
}

#[inline(always)]
fn step(x: &mut f32, m: &mut f32, v: &mut f32, g: f32, keep: Option<f32>, k: Coeffs) {
    let m1 = *m * k.b1 + g * k.c1;
    let v1 = *v * k.b2 + (g * g) * k.c2;
    let x0 = match keep {
        Some(keep) => *x * keep,
        None => *x,
    };
    let update = (m1 * k.bc1) / ((v1 * k.bc2).sqrt() + k.eps);
    *x = x0 - update * k.lr;
    *m = m1;
    *v = v1;
}

/// `Σ g²` in f64 for an f32 or f64 tensor on the CPU, in fixed chunks (deterministic); `None`
/// for other devices and dtypes.
pub(super) fn sum_squares(g: &Tensor) -> Result<Option<f64>> {
    if !g.device().is_cpu() || !matches!(g.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let g = g.contiguous()?;
    let (storage, layout) = g.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let total = match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(x)) => chunked_sum(&x[a..b]),
        candle_core::Storage::Cpu(CpuStorage::F64(x)) => chunked_sum(&x[a..b]),
        _ => return Ok(None),
    };
    Ok(Some(total))
}

fn chunked_sum<T: Copy + Into<f64> + Sync>(x: &[T]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(sum_sq).collect();
    parts.iter().sum()
}

/// Eight f64 accumulators, so the additions pipeline (and vectorise) without reassociation.
fn sum_sq<T: Copy + Into<f64>>(x: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let mut rows = x.chunks_exact(8);
    for r in &mut rows {
        for (a, &e) in acc.iter_mut().zip(r) {
            let e: f64 = e.into();
            *a += e * e;
        }
    }
    let tail: f64 = rows
        .remainder()
        .iter()
        .map(|&e| {
            let e: f64 = e.into();
            e * e
        })
        .sum();
    acc.iter().sum::<f64>() + tail
}
