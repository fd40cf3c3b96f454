//! Attention masks and the dense attention baseline, built from differentiable candle ops.

use crate::norm::softmax_last_dim;
use candle_core::{bail, DType, Device, Result, Tensor};

/// Which keys a query may attend to: an optional causal constraint (key j ≤ query i, both counted
/// from 0: top-left aligned when L_q ≠ L_k, unlike flash-attn's bottom-right; a one-token decoding
/// step over a key cache sees every cached key, so it passes no causal mask) and an optional
/// key-padding mask `[B, L_k]` of 0 / 1 (1 = attend; any dtype).
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    pub causal: bool,
    pub key_padding: Option<Tensor>,
}

/// The error for a key-padding mask entry other than 0 / 1 at flat index `i` of `dims` `[B, L_k]`.
fn non_binary(op: &str, dims: &[usize], i: usize, x: f64) -> Result<()> {
    let lk = dims.get(1).copied().unwrap_or(1).max(1);
    bail!(
        "{op}: key_padding mask holds {x} at [{}, {}]; expected 0 / 1 (1 = attend). An additive \
         mask (0 / -10000 or -inf, HF's extended attention mask) must be turned back into 0 / 1",
        i / lk,
        i % lk
    )
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

    /// Adds a key-padding mask `[B, L_k]` of 0 / 1, 1 = attend (BERT's attention_mask). Other
    /// values are refused by the ops: an additive mask (0 / −10000, HF's extended mask) would
    /// otherwise read as "attend" everywhere.
    pub fn with_key_padding(mut self, mask: Tensor) -> Self {
        self.key_padding = Some(mask);
        self
    }

    /// The key-padding mask `[B, L_k]`, checked against `(b, lk)`.
    fn key_padding_checked(&self, op: &str, b: usize, lk: usize) -> Result<Option<&Tensor>> {
        let Some(m) = &self.key_padding else {
            return Ok(None);
        };
        if m.dims() != [b, lk] {
            bail!(
                "{op}: key_padding mask is {:?}, expected [B, L] = [{b}, {lk}]",
                m.dims()
            );
        }
        Ok(Some(m))
    }

    /// Refuses a key-padding mask holding anything but 0 and 1, naming the first such entry.
    /// Reads one scalar back from the device; the mask itself only on the error path.
    fn check_binary(op: &str, m: &Tensor) -> Result<()> {
        // In f64, which holds every mask dtype's values exactly (in f32, 1e-60 would pass as 0).
        let m = m.to_dtype(DType::F64)?;
        let bad = m.ne(0f64)?.mul(&m.ne(1f64)?)?;
        if bad.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? == 0 {
            return Ok(());
        }
        let v = m.flatten_all()?.to_vec1::<f64>()?;
        let i = v.iter().position(|&x| x != 0.0 && x != 1.0).unwrap_or(0);
        non_binary(op, m.dims(), i, v[i])
    }

    /// The key-padding mask as host booleans `[B·L_k]`, checked against `(b, lk)`.
    pub(crate) fn key_allowed(&self, op: &str, b: usize, lk: usize) -> Result<Option<Vec<bool>>> {
        let Some(m) = self.key_padding_checked(op, b, lk)? else {
            return Ok(None);
        };
        let v = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if let Some(i) = v.iter().position(|&x| x != 0.0 && x != 1.0) {
            non_binary(op, m.dims(), i, v[i])?;
        }
        Ok(Some(v.into_iter().map(|x| x != 0.0).collect()))
    }

    /// The key-padding mask as a contiguous `u8 [B, L_k]` tensor on `dev` (1 = attend), checked
    /// against `(b, lk)`: what the CUDA kernels read, with no host copy.
    #[cfg(feature = "cuda")]
    pub(crate) fn key_allowed_on(
        &self,
        op: &str,
        b: usize,
        lk: usize,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        let Some(m) = self.key_padding_checked(op, b, lk)? else {
            return Ok(None);
        };
        Self::check_binary(op, m)?;
        Ok(Some(
            m.to_device(dev)?
                .to_dtype(DType::F32)?
                .ne(0f64)?
                .to_dtype(DType::U8)?
                .contiguous()?,
        ))
    }

    /// Additive mask `[B|1, 1, L_q|1, L_k]` (0 or −1e30) and, when some query row has no
    /// allowed key at all, a `[B|1, 1, L_q|1, 1]` multiplier that zeroes those rows. Built with
    /// tensor ops on `dev`, so a GPU run never builds an `L_q × L_k` mask on the host.
    fn dense_bias(
        &self,
        b: usize,
        lq: usize,
        lk: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let causal = if self.causal {
            let i = Tensor::arange(0u32, lq as u32, dev)?.reshape((1, 1, lq, 1))?;
            let j = Tensor::arange(0u32, lk as u32, dev)?.reshape((1, 1, 1, lk))?;
            Some(j.broadcast_le(&i)?) // u8 [1, 1, L_q, L_k]
        } else {
            None
        };
        let keys = match &self.key_padding {
            Some(m) => {
                if m.dims() != [b, lk] {
                    bail!(
                        "dense_attention: key_padding mask is {:?}, expected [B, L] = [{b}, {lk}]",
                        m.dims()
                    );
                }
                Self::check_binary("dense_attention", m)?;
                let m = m.to_device(dev)?.to_dtype(DType::F32)?;
                Some(m.ne(0f32)?.reshape((b, 1, 1, lk))?) // u8 [B, 1, 1, L_k]
            }
            None => None,
        };
        let allowed = match (causal, keys) {
            (None, None) => return Ok((None, None)),
            (Some(c), None) => c,
            (None, Some(k)) => k,
            (Some(c), Some(k)) => c.broadcast_mul(&k)?,
        };
        // 1 → 0, 0 → −1e30: the two constants cancel exactly in every float dtype.
        let bias = allowed.to_dtype(dtype)?.affine(-MASKED, MASKED)?;
        // Causal rows always keep key 0, so only padding (or no keys at all) can empty a row.
        // (No rows at all, B or L_q = 0: nothing to zero, and candle refuses empty reductions.)
        let rows = if b * lq == 0 {
            None
        } else if self.key_padding.is_some() || lk == 0 {
            let row_ok = if lk == 0 {
                Tensor::zeros((1, 1, lq, 1), DType::U8, dev)?
            } else {
                allowed.max_keepdim(3)?
            };
            if row_ok.flatten_all()?.min(0)?.to_scalar::<u8>()? == 0 {
                Some(row_ok.to_dtype(dtype)?)
            } else {
                None
            }
        } else {
            None
        };
        Ok((Some(bias), rows))
    }
}

/// Dense masked attention `softmax(scale·q kᵀ + mask) v` over `[B, H, L, d]` tensors: the
/// baseline, differentiable through candle's autograd and our softmax. Rows with no allowed key
/// output zero (as the sparse op does). [`fn@crate::flash_attention`] computes the same without
/// keeping the `[B, H, L, L]` intermediates (with f32 products; see its bf16 note).
pub fn dense_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    crate::util::check_qkv("dense_attention", q, k, v)?;
    dense_probs(q, k, mask, scale)?.matmul(&v.contiguous()?)
}

/// The attention probabilities `[B, H, L_q, L_k]` of [`dense_attention`] (zero rows where no
/// key is allowed).
pub(crate) fn dense_probs(q: &Tensor, k: &Tensor, mask: &AttentionMask, scale: f64) -> Result<Tensor> {
    let (b, _h, lq, _d) = q.dims4()?;
    let lk = k.dim(2)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let (bias, rows) = mask.dense_bias(b, lq, lk, q.dtype(), q.device())?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(&bias)?,
        None => scores,
    };
    let p = softmax_last_dim(&scores)?;
    match rows {
        Some(r) => p.broadcast_mul(&r),
        None => Ok(p),
    }
}
