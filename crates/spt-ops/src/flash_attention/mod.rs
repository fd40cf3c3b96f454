//! Fused dense attention with exact backward, FlashAttention-style: the `[B, H, L, L]` scores
//! and probabilities are never stored.
//!
//! Contract, for `q [B, H, L_q, d]`, `k [B, H, L_k, d]`, `v [B, H, L_k, d_v]` (f32 or f64):
//!
//! - `o = (softmax(scale·q kᵀ + mask) ⊙ D) v`, where the mask is an [`AttentionMask`] (causal
//!   and/or key padding) and `D` is the dropout multiplier (0 with probability `p`, else
//!   `1/(1−p)`; all ones without dropout). A row with no allowed key outputs 0.
//! - Without dropout it equals [`crate::dense_attention`]; with dropout it equals
//!   [`flash_attention_reference`], which applies [`attention_dropout_mask`] explicitly (to
//!   bf16 rounding where the products take bf16 inputs, below).
//! - Differentiable in q, k and v. Backward keeps one log-sum-exp per query row and the seed,
//!   and recomputes the probabilities and the dropout mask tile by tile: `O(B·H·L)` beyond
//!   q, k, v and o, against the composed form's `O(B·H·L²)` per intermediate.
//! - dk and dv are summed in a fixed order: bit-identical across runs and thread counts.
//!
//! The fused kernel runs on the CPU (f32, f64; f32's products take bf16 inputs under
//! [`MatmulPrecision::Bf16`](crate::MatmulPrecision)) and on CUDA in bf16 with d = d_v ∈ {64, 128}
//! and no dropout (`kernels/flash_attention.cu`: tensor cores, f32 accumulation, the same
//! deterministic backward). Anything else on a GPU (f32, other head sizes, dropout) runs the
//! composed reference: candle autograd over `[B, H, L_q, L_k]` scores, the dropout mask built on
//! the host.

mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dropout;

use crate::attention::dense_probs;
use crate::simd::Vector;
use crate::util::{check_qkv, contiguous, if_tracked, with_slices};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use cpu::Dims;
pub(crate) use dropout::{DropoutElem, RowDropout};
use std::sync::Mutex;

pub use crate::attention::AttentionMask;
pub use dropout::{attention_dropout_mask, SeededDropout};

/// Fused dense attention of `q` over `k`, `v` under `mask`, with softmax scale `scale` (usually
/// `1/√d`) and optional dropout on the probabilities. See the module docs for the contract.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    dropout: Option<SeededDropout>,
) -> Result<Tensor> {
    let op = "flash_attention";
    let [b, h, lq, lk, d, dv] = check_qkv(op, q, k, v)?;
    let dropout = SeededDropout::active(dropout, op)?;
    // No heads: an empty output, which the composed form gives without the kernels' per-head
    // bookkeeping.
    if !flash_attention_is_fused(q, v, dropout.is_some()) || b * h == 0 {
        return flash_attention_reference(q, k, v, mask, scale, dropout);
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let op = cuda::FlashCuda::new(op, [b, h, lk], mask, scale, None, q.device())?;
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let dims = Dims {
        h,
        bh: b * h,
        lq,
        lk,
        d,
        dv,
        causal: mask.causal,
        key_ok: mask.key_allowed(op, b, lk)?,
        dropout: dropout.map(RowDropout::new),
    };
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        FlashAttention {
            dims,
            scale,
            lse: Mutex::new(None),
        },
    )
}

/// Whether [`flash_attention`] runs a fused kernel for `q`, `v` (with or without dropout) rather
/// than its composed `[B, H, L_q, L_k]` form: f32 or f64 on the CPU; bf16 with d = d_v ∈ {64, 128}
/// and no dropout on CUDA.
pub fn flash_attention_is_fused(q: &Tensor, v: &Tensor, dropout: bool) -> bool {
    if q.device().is_cpu() {
        return matches!(q.dtype(), DType::F32 | DType::F64);
    }
    #[cfg(feature = "cuda")]
    if let (Some(&d), Some(&dv)) = (q.dims().last(), v.dims().last()) {
        return !dropout && cuda::supported(q, d, dv);
    }
    let _ = (v, dropout);
    false
}

/// The composed form of [`flash_attention`]: softmax from candle ops, the dropout mask as an
/// explicit `[B, H, L_q, L_k]` tensor. The oracle the tests compare with, and the path on
/// devices without the fused kernel.
pub fn flash_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    dropout: Option<SeededDropout>,
) -> Result<Tensor> {
    let p = dense_probs(q, k, mask, scale)?;
    let p = match SeededDropout::active(dropout, "flash_attention_reference")? {
        Some(dr) => {
            let dims = p.dims4()?;
            let m = attention_dropout_mask(dr, dims, &candle_core::Device::Cpu)?;
            p.mul(&m.to_device(p.device())?.to_dtype(p.dtype())?)?
        }
        None => p,
    };
    p.matmul(&v.contiguous()?)
}

/// The forward op; `lse` is filled by the forward for the backward.
struct FlashAttention {
    dims: Dims,
    scale: f64,
    lse: Mutex<Option<Tensor>>,
}

impl FlashAttention {
    fn lse(&self) -> Result<std::sync::MutexGuard<'_, Option<Tensor>>> {
        self.lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("flash_attention: poisoned lock".into()))
    }
}

/// The forward in `T`: reads q, k, v from their storages, keeps the log-sum-exp for backward.
fn run_forward<T: Float3>(op: &FlashAttention, s: [(&CpuStorage, &Layout); 3]) -> Result<Vec<T>> {
    let n = &op.dims;
    let [q, k, v] = [("q", s[0]), ("k", s[1]), ("v", s[2])]
        .map(|(name, (st, l))| contiguous::<T>("flash_attention", name, st, l));
    let (o, lse) = cpu::forward::<T>(q?, k?, v?, n, T::lit(op.scale));
    *op.lse()? = Some(Tensor::from_vec(
        lse,
        (n.bh / n.h, n.h, n.lq),
        &candle_core::Device::Cpu,
    )?);
    Ok(o)
}

/// The element types the kernels run in.
trait Float3: crate::util::Float + Vector + DropoutElem + candle_core::WithDType {}
impl Float3 for f32 {}
impl Float3 for f64 {}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash_attention"
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
        let op = "flash_attention";
        let n = &self.dims;
        let (b, h) = (l1.dims()[0], l1.dims()[1]);
        let args = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run_forward::<f32>(self, args)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run_forward::<f64>(self, args)?)
            }
            _ => bail!("{op}: q, k and v must all be f32 or all f64"),
        };
        Ok((out, Shape::from((b, h, n.lq, n.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "flash_attention";
        let Some(lse) = self.lse()?.clone() else {
            bail!("{op}: backward called before forward")
        };
        if grad.dims() != o.dims() {
            bail!("{op}: grad is {:?} but the output is {:?}", grad.dims(), o.dims());
        }
        let dev = q.device();
        // Borrow the inputs' storage instead of copying them (6 tensors of B·H·L·d).
        macro_rules! run {
            ($t:ty) => {{
                let (dq, dk, dvv) = with_slices::<$t, _>(op, &[q, k, v, o, &lse, grad], |s| {
                    Ok(cpu::backward::<$t>(
                        s[0],
                        s[1],
                        s[2],
                        s[3],
                        s[4],
                        s[5],
                        &self.dims,
                        self.scale as $t,
                    ))
                })?;
                (
                    Tensor::from_vec(dq, q.shape(), dev)?,
                    Tensor::from_vec(dk, k.shape(), dev)?,
                    Tensor::from_vec(dvv, v.shape(), dev)?,
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        };
        Ok((if_tracked(q, dq), if_tracked(k, dk), if_tracked(v, dv)))
    }
}

/// Bytes the fused op keeps for backward beyond its inputs and output: one log-sum-exp per
/// query row (`elem` bytes each), saturating at `usize::MAX`.
pub fn flash_saved_bytes(b: usize, h: usize, lq: usize, elem: usize) -> usize {
    [b, h, lq, elem].into_iter().fold(1, usize::saturating_mul)
}
