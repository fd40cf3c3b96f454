//! Fused output projection + cross-entropy: `loss = Σ_i m_i · (lse(h_i Wᵀ) − h_i·W_{t_i})`, without
//! ever holding the `[N, V]` logits.
//!
//! A language model's head (GPT-2: 768 × 50257) is neither sparse nor routed, and the usual
//! `logits → log_softmax → gather` keeps several `[N, V]` tensors alive for the backward (0.4 GB
//! each at 2048 tokens) and makes candle compute the weight gradient even when the weight is
//! frozen. Here the rows are processed in fixed chunks of [`ROW_CHUNK`]: for each chunk the
//! logits are formed, turned into `softmax − onehot` in place, and immediately multiplied back
//! into the gradients. So the gradients are computed during the forward, as Liger-Kernel's fused
//! linear cross-entropy does, and the backward only scales them by the upstream scalar; this is
//! exact because the loss is a scalar. The weight-gradient GEMM runs only when `w` is tracked.
//!
//! Cost: one `[N, d]·[d, V]` GEMM forward, one for `dh`, one more for `dW` if tracked — the same
//! products as the unfused path, minus `dW` for a frozen head, and with O(chunk·V) memory.
//! The gradients are computed only when an input is tracked, so evaluation pays one GEMM.
//! On the CPU it takes f32 or f64 (other dtypes are refused by name); on CUDA it runs
//! [`linear_cross_entropy_reference`] (f32, f64 or bf16), which materialises the logits.

use crate::blas::{gemm_into, inner_par, transpose, Mat};
use crate::precision::{bf16_matmul_t_par, bf16_weight};
use crate::simd::Vector;
use crate::util::{check_float, check_same, contiguous, row_max};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows per chunk: fixed, so results do not depend on the thread count. Each chunk's two GEMMs
/// repack all of W (gemm packs its large operand per call), so fewer, larger chunks repack it
/// less: 1024 rows of a 50257-token vocabulary is a 206 MB f32 buffer.
pub const ROW_CHUNK: usize = 1024;

/// How the per-row losses are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Σ over counted rows.
    Sum,
    /// Σ over counted rows / their number (an error when no row counts).
    Mean,
}

/// The rows that count and the label of each, validated on the host.
struct Targets {
    /// Indices of the counted rows, ascending.
    rows: Vec<u32>,
    /// Label of every row (only counted rows are read).
    labels: Vec<u32>,
}

/// `Σ_i m_i · CE(h_i Wᵀ, t_i)` (or its mean over counted rows) for `h [N, d]`, `w [V, d]`,
/// `targets [N]` (u32/i64 ids in `0..V`) and an optional 0/1 `mask [N]` (rows with 0 are
/// ignored, like HF's label −100). Returns a scalar of `h`'s dtype whose backward gives exact
/// gradients for `h` and (only if tracked) `w`.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    reduction: Reduction,
) -> Result<Tensor> {
    let op = "linear_cross_entropy";
    check_float(op, "h", h)?;
    check_same(op, &[("h", h), ("w", w)])?;
    let (n, d) = match h.dims() {
        &[n, d] => (n, d),
        dims => bail!("{op}: h is {dims:?}, expected [rows, hidden]"),
    };
    let v = match w.dims() {
        &[v, dw] if dw == d => v,
        dims => bail!("{op}: w is {dims:?}, expected [vocab, {d}] to match h [{n}, {d}]"),
    };
    if v == 0 {
        bail!("{op}: w is [0, {d}], expected at least one class");
    }
    let t = read_targets(op, targets, mask, n, v)?;
    let scale = match reduction {
        Reduction::Sum => 1.0,
        Reduction::Mean if n == 0 => bail!("{op}: h has no rows to average over"),
        Reduction::Mean if t.rows.is_empty() => {
            bail!("{op}: the mask leaves no row to average over (all {n} rows are masked)")
        }
        Reduction::Mean => 1.0 / t.rows.len() as f64,
    };
    if !matches!(h.device(), Device::Cpu) {
        return linear_cross_entropy_reference(h, w, targets, mask, reduction);
    }
    let fused = LinearCrossEntropy {
        targets: t,
        scale,
        grad_h: h.track_op(),
        grad_w: w.track_op(),
        saved: Mutex::new(None),
    };
    h.contiguous()?.apply_op2(&w.contiguous()?, fused)
}

/// The dense reference: `logits = h Wᵀ`, max-subtracted log-softmax, gather, masked reduction,
/// all from candle ops (autograd through it is the tests' oracle).
pub fn linear_cross_entropy_reference(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    reduction: Reduction,
) -> Result<Tensor> {
    cross_entropy(&h.matmul(&w.t()?)?, targets, mask, reduction)
}

/// Cross-entropy of `logits [N, V]` against `targets [N]` with an optional 0/1 `mask [N]`, from
/// candle ops (max-subtracted log-softmax, gather, masked sum or mean): for callers that already
/// hold the logits. Inputs are checked as [`linear_cross_entropy`] checks them: integer class
/// ids inside `0..V` on every counted row (a masked row may hold any id, as HF's −100), a mask of
/// 0 and 1 only.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    reduction: Reduction,
) -> Result<Tensor> {
    let op = "cross_entropy";
    check_float(op, "logits", logits)?;
    let (n, v) = match logits.dims() {
        &[n, v] if v > 0 => (n, v),
        dims => bail!("{op}: logits are {dims:?}, expected [rows, classes] with at least one class"),
    };
    let t = read_targets(op, targets, mask, n, v)?;
    if reduction == Reduction::Mean && t.rows.is_empty() {
        if n == 0 {
            bail!("{op}: logits have no rows to average over");
        }
        bail!("{op}: the mask leaves no row to average over (all {n} rows are masked)");
    }
    // Masked rows gather class 0 (their id may be anything) and are then multiplied by 0.
    let (mut ids, mut keep) = (vec![0u32; n], vec![0f32; n]);
    for &r in &t.rows {
        ids[r as usize] = t.labels[r as usize];
        keep[r as usize] = 1.0;
    }
    let dev = logits.device();
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let nll = logp
        .gather(&Tensor::from_vec(ids, (n, 1), dev)?, 1)?
        .neg()?
        .reshape(n)?;
    let nll = match mask {
        Some(_) => (nll * Tensor::from_vec(keep, n, dev)?.to_dtype(logits.dtype())?)?,
        None => nll,
    };
    let sum = nll.sum_all()?;
    match reduction {
        Reduction::Sum => Ok(sum),
        Reduction::Mean => sum / t.rows.len() as f64,
    }
}

fn read_targets(op: &str, targets: &Tensor, mask: Option<&Tensor>, n: usize, v: usize) -> Result<Targets> {
    if targets.dims() != [n] {
        bail!(
            "{op}: targets is {:?}, expected [{n}] (one label per row)",
            targets.dims()
        );
    }
    if targets.dtype().is_float() {
        bail!(
            "{op}: targets are {:?}, expected class ids as an integer dtype (u32 or i64)",
            targets.dtype()
        );
    }
    let labels: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
    let keep: Vec<bool> = match mask {
        None => vec![true; n],
        Some(m) => {
            if m.dims() != [n] {
                bail!("{op}: mask is {:?}, expected [{n}]", m.dims());
            }
            let m = m.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            // A mask is not a weight: 0.5 would silently count as 1.
            if let Some(i) = m.iter().position(|&x| x != 0.0 && x != 1.0) {
                bail!("{op}: mask[{i}] = {}, expected 0 or 1 (1 = the row counts)", m[i]);
            }
            m.into_iter().map(|x| x != 0.0).collect()
        }
    };
    let mut rows = Vec::new();
    for (i, (&l, &k)) in labels.iter().zip(&keep).enumerate() {
        if !k {
            continue;
        }
        if l < 0 || l as u64 >= v as u64 {
            bail!("{op}: targets[{i}] = {l} is outside the {v} classes of w");
        }
        rows.push(i as u32);
    }
    Ok(Targets {
        rows,
        labels: labels
            .into_iter()
            .map(|l| l.clamp(0, u32::MAX as i64) as u32)
            .collect(),
    })
}

/// The fused op; holds the gradients its forward computed until the backward asks.
struct LinearCrossEntropy {
    targets: Targets,
    /// 1 for a sum, 1/count for a mean.
    scale: f64,
    grad_h: bool,
    grad_w: bool,
    /// `(dh [N, d], dW [V, d])` of the loss, set by the forward.
    saved: Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
}

struct Output<T> {
    loss: T,
    dh: Option<Vec<T>>,
    dw: Option<Vec<T>>,
}

impl LinearCrossEntropy {
    fn forward<T: Vector>(&self, h: &[T], w: &[T], n: usize, d: usize, v: usize) -> Output<T> {
        let scale = T::lit(self.scale);
        let mut dh = self.grad_h.then(|| vec![T::zero(); n * d]);
        let mut dw = self.grad_w.then(|| vec![T::zero(); v * d]);
        let grads = self.grad_h || self.grad_w;
        let mut hc: Vec<T> = Vec::with_capacity(ROW_CHUNK * d);
        let mut logits = vec![T::zero(); ROW_CHUNK.min(self.targets.rows.len()) * v];
        let mut dhc = vec![T::zero(); if self.grad_h { ROW_CHUNK * d } else { 0 }];
        let mut nll = Vec::with_capacity(self.targets.rows.len());
        let par = inner_par(1);
        // bf16 (`precision`): W packed once for the logits and, with dh, once more for
        // `P W = P (Wᵀ)ᵀ`. f32: Wᵀ `[d, V]` once (see `blas::transpose`): every chunk's logits
        // GEMM would otherwise repack all of W one strided scalar at a time (GPT-2's head: 38.6 M
        // elements a chunk).
        let w_bf16 = bf16_weight(w, v, d, false);
        let wt_bf16 = if self.grad_h {
            bf16_weight(w, d, v, true)
        } else {
            None
        };
        let wt = if w_bf16.is_some() {
            Vec::new()
        } else {
            transpose(w, v, d)
        };
        for (ci, rows) in self.targets.rows.chunks(ROW_CHUNK).enumerate() {
            let c = rows.len();
            hc.clear();
            for &r in rows {
                let r = r as usize;
                hc.extend_from_slice(&h[r * d..(r + 1) * d]);
            }
            let z = &mut logits[..c * v];
            // z [c, V] = hc [c, d] · Wᵀ.
            if !bf16_matmul_t_par(w_bf16.as_ref(), &hc, c, z, false) {
                gemm_into(
                    c,
                    v,
                    d,
                    z,
                    false,
                    Mat::new(&hc, 0, d, 1),
                    Mat::new(&wt, 0, v, 1),
                    par,
                );
            }
            let labels: Vec<usize> = rows
                .iter()
                .map(|&r| self.targets.labels[r as usize] as usize)
                .collect();
            // Each row becomes scale·(softmax − onehot) in place; its NLL comes back.
            let row_nll: Vec<T> = z
                .par_chunks_mut(v)
                .zip(labels.par_iter())
                .map(|(z, &t)| {
                    let max = row_max(z);
                    let target = z[t];
                    let sum = T::exp_shift(z, max);
                    if grads {
                        let k = scale / sum;
                        z.iter_mut().for_each(|x| *x = *x * k);
                        z[t] = z[t] - scale;
                    }
                    max + sum.ln() - target
                })
                .collect();
            nll.extend(row_nll);
            if let Some(dh) = dh.as_mut() {
                let dhc = &mut dhc[..c * d];
                // dh_c [c, d] = P [c, V] · W [V, d]
                if !bf16_matmul_t_par(wt_bf16.as_ref(), z, c, dhc, false) {
                    gemm_into(
                        c,
                        d,
                        v,
                        dhc,
                        false,
                        Mat::new(z, 0, v, 1),
                        Mat::new(w, 0, d, 1),
                        par,
                    );
                }
                for (j, &r) in rows.iter().enumerate() {
                    let r = r as usize;
                    dh[r * d..(r + 1) * d].copy_from_slice(&dhc[j * d..(j + 1) * d]);
                }
            }
            if let Some(dw) = dw.as_mut() {
                // dW [V, d] += Pᵀ [V, c] · hc [c, d]; Pᵀ's (i, j) element is z[j·V + i].
                gemm_into(
                    v,
                    d,
                    c,
                    dw,
                    ci > 0,
                    Mat::new(z, 0, 1, v),
                    Mat::new(&hc, 0, d, 1),
                    par,
                );
            }
        }
        // Summed in row order, in f64: deterministic and accurate for large N.
        let total: f64 = nll.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).sum();
        Output {
            loss: T::lit(total * self.scale),
            dh,
            dw,
        }
    }

    fn run<T: Vector + candle_core::WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<CpuStorage> {
        let op = "linear_cross_entropy";
        let h = contiguous::<T>(op, "h", s1, l1)?;
        let w = contiguous::<T>(op, "w", s2, l2)?;
        let (n, d) = l1.shape().dims2()?;
        let v = l2.dims()[0];
        let out = self.forward(h, w, n, d, v);
        let dh = out
            .dh
            .map(|g| Tensor::from_vec(g, (n, d), &Device::Cpu))
            .transpose()?;
        let dw = out
            .dw
            .map(|g| Tensor::from_vec(g, (v, d), &Device::Cpu))
            .transpose()?;
        if dh.is_some() || dw.is_some() {
            *self
                .saved
                .lock()
                .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))? = Some((dh, dw));
        }
        Ok(T::to_cpu_storage_owned(vec![out.loss]))
    }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.run::<f32>(s1, l1, s2, l2)?,
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.run::<f64>(s1, l1, s2, l2)?,
            _ => bail!("linear_cross_entropy: h and w must both be f32 or both f64"),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("linear_cross_entropy: poisoned lock".into()))?;
        let Some((dh, dw)) = saved.as_ref() else {
            bail!("linear_cross_entropy: backward without saved gradients (no input was tracked in the forward)")
        };
        let scale = |g: &Option<Tensor>| g.as_ref().map(|g| g.broadcast_mul(grad)).transpose();
        Ok((scale(dh)?, scale(dw)?))
    }
}
