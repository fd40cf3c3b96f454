//! The attention slot: the part of multi-head attention after the q/k/v projections, which
//! `sparsify` swaps per layer.
//!
//! Every model computes `q, k, v: [B, H, L, d]` with its own (HF-named) projections, then calls
//! [`AttentionCore::forward_t`] with a [`PreparedMask`] built once per forward pass. The dense core
//! is `softmax(scale·q·kᵀ + mask)·v` with dropout on the probabilities; its softmax is spt-ops'
//! differentiable one (candle's `softmax_last_dim` has no backward).

use crate::error::{ModelError, Result};
use crate::layers::Dropout;
use candle_core::{DType, Device, Tensor};

/// Which keys each query may attend to. `key_padding`: `[B, L]`, nonzero = attend.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    pub causal: bool,
    pub key_padding: Option<Tensor>,
}

/// An [`AttentionMask`] plus its additive form for dense attention, computed once per forward.
#[derive(Debug, Clone)]
pub struct PreparedMask {
    pub mask: AttentionMask,
    /// `0` where allowed and the dtype's most negative finite value elsewhere (as HF does), of
    /// shape `[B|1, 1, L|1, L]`; `None` when everything is allowed.
    pub additive: Option<Tensor>,
}

/// The most negative finite value of a float dtype (HF's `torch.finfo(dtype).min`).
fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F16 => -65504.0,
        DType::BF16 => -3.389_531_389_251_535e38,
        _ => f32::MIN as f64,
    }
}

impl PreparedMask {
    /// Builds the additive mask for sequences of length `len` in `dtype`.
    pub fn new(mask: AttentionMask, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        // allowed: u8, broadcastable to [B, 1, L, L].
        let mut allowed: Option<Tensor> = None;
        if let Some(p) = &mask.key_padding {
            let (_b, l) = p.dims2()?;
            if l != len {
                return Err(ModelError::BadInput {
                    name: "attention_mask",
                    reason: format!("has length {l}, expected {len}"),
                });
            }
            let pad = p.ne(0f64)?.unsqueeze(1)?.unsqueeze(1)?; // [B, 1, 1, L]
            allowed = Some(pad);
        }
        if mask.causal {
            let tri: Vec<u8> = (0..len)
                .flat_map(|i| (0..len).map(move |j| u8::from(j <= i)))
                .collect();
            let tri = Tensor::from_vec(tri, (1, 1, len, len), device)?;
            allowed = Some(match allowed {
                Some(a) => a.broadcast_mul(&tri)?,
                None => tri,
            });
        }
        let additive = match allowed {
            None => None,
            Some(a) => {
                let zeros = Tensor::zeros(a.shape(), dtype, device)?;
                let neg = Tensor::full(dtype_min(dtype), a.shape(), device)?.to_dtype(dtype)?;
                Some(a.where_cond(&zeros, &neg)?)
            }
        };
        Ok(Self { mask, additive })
    }
}

/// Dense softmax attention with attention-probability dropout.
#[derive(Debug, Clone)]
pub struct DenseAttention {
    pub dropout: Dropout,
}

impl DenseAttention {
    pub fn forward_t(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &PreparedMask,
        scale: f64,
        train: bool,
    ) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * scale)?; // [B, H, L, L]
        let scores = match &mask.additive {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = spt_ops::softmax_last_dim(&scores)?;
        let probs = self.dropout.forward_t(&probs, train)?;
        Ok(probs.matmul(v)?) // [B, H, L, d]
    }
}

/// The per-layer attention slot. Phase 2 adds `Sparse` (PQ key selection + sparse attention op).
#[derive(Debug, Clone)]
pub enum AttentionCore {
    Dense(DenseAttention),
}

impl AttentionCore {
    /// Dense attention with dropout probability `p` on the attention probabilities.
    pub fn dense(p: f64) -> Result<Self> {
        Ok(Self::Dense(DenseAttention {
            dropout: Dropout::new(p)?,
        }))
    }

    /// `q, k, v: [B, H, L, d]` (contiguous) → `[B, H, L, d]`.
    pub fn forward_t(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &PreparedMask,
        scale: f64,
        train: bool,
    ) -> Result<Tensor> {
        match self {
            Self::Dense(d) => d.forward_t(q, k, v, mask, scale, train),
        }
    }

    /// Short name for reports ("dense").
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense(_) => "dense",
        }
    }
}

/// `[B, L, H·d] → [B, H, L, d]`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    Ok(x.reshape((b, l, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[B, H, L, d] → [B, L, H·d]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))?)
}
