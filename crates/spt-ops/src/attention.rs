//! Attention masks and the dense attention baseline, built from differentiable candle ops.

use crate::norm::softmax_last_dim;
use candle_core::{bail, DType, Device, Result, Tensor};

/// Which keys a query may attend to: an optional causal constraint (key j ≤ query i) and an
/// optional key-padding mask `[B, L_k]` (nonzero = attend; any dtype).
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    pub causal: bool,
    pub key_padding: Option<Tensor>,
}

/// Score added to disallowed entries in the dense path: exp underflows to exactly 0.
const MASKED: f64 = -1e30;

impl AttentionMask {
    /// Every query sees every key.
    pub fn none() -> Self {
        Self::default()
    }

    /// Query i sees keys 0..=i (GPT-2).
    pub fn causal() -> Self {
        Self {
            causal: true,
            key_padding: None,
        }
    }

    /// Adds a key-padding mask `[B, L_k]`, nonzero = attend (BERT's attention_mask).
    pub fn with_key_padding(mut self, mask: Tensor) -> Self {
        self.key_padding = Some(mask);
        self
    }

    /// The key-padding mask as host booleans `[B·L_k]`, checked against `(b, lk)`.
    pub(crate) fn key_allowed(&self, op: &str, b: usize, lk: usize) -> Result<Option<Vec<bool>>> {
        let Some(m) = &self.key_padding else {
            return Ok(None);
        };
        if m.dims() != [b, lk] {
            bail!(
                "{op}: key_padding mask is {:?}, expected [B, L] = [{b}, {lk}]",
                m.dims()
            );
        }
        let v = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(Some(v.into_iter().map(|x| x != 0.0).collect()))
    }

    /// Additive mask `[B|1, 1, L_q|1, L_k]` (0 or −1e30) and, when some query row has no
    /// allowed key at all, a `[B, 1, L_q, 1]` multiplier that zeroes those rows.
    fn dense_bias(
        &self,
        b: usize,
        lq: usize,
        lk: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let keys = self.key_allowed("dense_attention", b, lk)?;
        if !self.causal && keys.is_none() {
            return Ok((None, None));
        }
        let (bb, qq) = (
            if keys.is_some() { b } else { 1 },
            if self.causal { lq } else { 1 },
        );
        let mut bias = vec![0f64; bb * qq * lk];
        let mut row_ok = vec![1f64; b * lq];
        let mut any_empty = false;
        for bi in 0..bb {
            for i in 0..qq {
                for j in 0..lk {
                    let ok = (!self.causal || j <= i) && keys.as_ref().is_none_or(|k| k[bi * lk + j]);
                    if !ok {
                        bias[(bi * qq + i) * lk + j] = MASKED;
                    }
                }
            }
        }
        for bi in 0..b {
            for i in 0..lq {
                let (bs, qs) = (if bb == 1 { 0 } else { bi }, if qq == 1 { 0 } else { i });
                let row = &bias[(bs * qq + qs) * lk..(bs * qq + qs + 1) * lk];
                if row.iter().all(|&x| x == MASKED) {
                    row_ok[bi * lq + i] = 0.0;
                    any_empty = true;
                }
            }
        }
        let bias = Tensor::from_vec(bias, (bb, 1, qq, lk), dev)?.to_dtype(dtype)?;
        let rows = if any_empty {
            Some(Tensor::from_vec(row_ok, (b, 1, lq, 1), dev)?.to_dtype(dtype)?)
        } else {
            None
        };
        Ok((Some(bias), rows))
    }
}

/// Dense masked attention `softmax(scale·q kᵀ + mask) v` over `[B, H, L, d]` tensors: the
/// baseline, differentiable through candle's autograd and our softmax. Rows with no allowed key
/// output zero (as the sparse op does).
pub fn dense_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, _h, lq, _d) = q.dims4()?;
    let lk = k.dim(2)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let (bias, rows) = mask.dense_bias(b, lq, lk, q.dtype(), q.device())?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(&bias)?,
        None => scores,
    };
    let p = softmax_last_dim(&scores)?;
    let p = match rows {
        Some(r) => p.broadcast_mul(&r)?,
        None => p,
    };
    p.matmul(&v.contiguous()?)
}
