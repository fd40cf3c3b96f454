//! The attention slot: the part of multi-head attention after the q/k/v projections, which
//! `sparsify` swaps per layer.
//!
//! Every model computes `q, k, v: [B, H, L, d]` with its own (HF-named) projections, then calls
//! [`AttentionCore::forward_t`] with a [`PreparedMask`] built once per forward pass. The dense core
//! is `softmax(scale·q·kᵀ + mask)·v` with dropout on the probabilities. On the CPU it runs
//! spt-ops' fused `flash_attention` (no `[B, H, L, L]` tensor kept for backward); elsewhere, and
//! for batches where some query row has no allowed key (HF then averages every value; the fused
//! op outputs 0), it runs the composed form with HF's additive mask and spt-ops' differentiable
//! softmax (candle's `softmax_last_dim` has no backward).
//!
//! The sparse core ([`SparseAttention`]) encodes the keys with a product-quantisation codebook,
//! keeps the top-k keys per query by ADC score (under the same causal / padding mask), and runs
//! spt-ops' `sparse_attention` over them. It has no attention-probability dropout (the op keeps
//! only the row log-sum-exp for backward); the model's other dropouts still apply.

use crate::error::{ModelError, Result};
use crate::layers::Dropout;
use candle_core::{DType, Device, Tensor};
use spt_ops::lora::HeadsLayout;
use spt_ops::pq::{BlockTiling, Codebook, KeyTopK, PqConfig, Selection};

/// Which keys each query may attend to (`key_padding`: `[B, L]` of 0 / 1, 1 = attend); spt-ops' type.
pub use spt_ops::AttentionMask;

/// An [`AttentionMask`] plus its additive form for dense attention, computed once per forward.
#[derive(Debug, Clone)]
pub struct PreparedMask {
    pub mask: AttentionMask,
    /// `0` where allowed and the dtype's most negative finite value elsewhere (as HF does), of
    /// shape `[B|1, 1, L|1, L]`; `None` when everything is allowed.
    pub additive: Option<Tensor>,
    /// Every query row has at least one allowed key, so the fused kernel gives HF's numbers.
    pub rows_nonempty: bool,
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
            let l = match p.dims() {
                &[_, l] => l,
                dims => {
                    return Err(ModelError::BadInput {
                        name: "attention_mask",
                        reason: format!("is {dims:?}, expected [B, L]"),
                    })
                }
            };
            if l != len {
                return Err(ModelError::BadInput {
                    name: "attention_mask",
                    reason: format!("has length {l}, expected {len}"),
                });
            }
        }
        let rows_nonempty = rows_nonempty(&mask, len)?;
        if let Some(p) = &mask.key_padding {
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
        Ok(Self {
            mask,
            additive,
            rows_nonempty,
        })
    }
}

/// Whether every query row sees a key: with key padding, each sequence needs one allowed key
/// (under a causal mask: key 0, which row 0 needs). One host read of the `[B, L]` mask, which
/// also refuses values other than 0 and 1.
fn rows_nonempty(mask: &AttentionMask, len: usize) -> Result<bool> {
    let Some(p) = &mask.key_padding else {
        return Ok(true);
    };
    if len == 0 || p.elem_count() == 0 {
        // No keys or no sequences (B = 0): no row to empty.
        return Ok(true);
    }
    let values = crate::layers::binary_mask_values(p)?;
    let any = |row: &[f64]| row.iter().any(|&v| v != 0.0);
    Ok(values.chunks(len).all(|row| match mask.causal {
        true => row[0] != 0.0,
        false => any(row),
    }))
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
        let dropout_on = self.dropout.is_active(train)?;
        if mask.rows_nonempty && spt_ops::flash_attention_is_fused(q, v, dropout_on) {
            let dropout = self.dropout.seeded(train)?;
            return Ok(spt_ops::flash_attention(q, k, v, &mask.mask, scale, dropout)?);
        }
        let scores = (q.matmul(&k.t()?)? * scale)?; // [B, H, L, L]
        let scores = match &mask.additive {
            Some(m) => {
                // A mask prepared for another length would broadcast silently, and so would one
                // sequence's key padding over a batch (the fused kernel refuses that too).
                let (b, lq, lk) = (q.dim(0)?, q.dim(2)?, k.dim(2)?);
                // Without key padding the mask is the causal one, shared by the batch.
                let shared = mask.mask.key_padding.is_none();
                let fits = m.rank() == 4
                    && m.dim(3)? == lk
                    && [1, lq].contains(&m.dim(2)?)
                    && (m.dim(0)? == b || (shared && m.dim(0)? == 1));
                if !fits {
                    let rows = if shared { format!("{b}|1") } else { b.to_string() };
                    return Err(ModelError::BadInput {
                        name: "attention mask",
                        reason: format!(
                            "is prepared as {:?}, expected [{rows}, 1, {lq}|1, {lk}] for a batch of {b}, \
                             {lq} queries and {lk} keys",
                            m.dims()
                        ),
                    });
                }
                scores.broadcast_add(m)?
            }
            None => scores,
        };
        let probs = spt_ops::softmax_last_dim(&scores)?;
        let probs = self.dropout.forward_t(&probs, train)?;
        Ok(probs.matmul(v)?) // [B, H, L, d]
    }
}

/// How the sparse core groups its key selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyGrouping {
    /// Each query keeps its own top-k keys by ADC score (the paper's method; exact mode).
    #[default]
    PerQuery,
    /// Each tile of `tile` queries shares its top `⌈k / tile⌉` key blocks of `tile` keys, run as
    /// small dense GEMMs (spt-ops' block-sparse attention). Faster per kept key, but on MiniLM
    /// it captures less attention mass than per-query selection at the same k
    /// (bench/results/attention-fidelity.json), so it is opt-in.
    Blocks { tile: usize },
}

/// Refuses a k that selects nothing: checked when a layer is made, since at the forward an
/// invalid k could only mean every key, dense attention that looks sparse.
pub(crate) fn check_top_k(top_k: KeyTopK) -> Result<()> {
    // spt-ops' own rule (k ≥ 1, a fraction in (0, 1]); with no key limit a count never exceeds.
    top_k
        .resolve(usize::MAX)
        .map(drop)
        .map_err(|e| ModelError::InvalidConfig {
            field: "attention.top_k",
            value: format!("{top_k:?}"),
            reason: e.to_string(),
        })
}

/// Refuses block mode with empty tiles (checked when a layer is made, and at the forward since
/// the field is public).
pub(crate) fn check_grouping(grouping: KeyGrouping) -> Result<()> {
    if let KeyGrouping::Blocks { tile: 0 } = grouping {
        return Err(ModelError::InvalidConfig {
            field: "attention tile",
            value: "0".into(),
            reason: "block mode needs tiles of at least one token".into(),
        });
    }
    Ok(())
}

/// PQ-selected sparse attention: each query attends to its `top_k` keys of largest ADC score
/// (or, with [`KeyGrouping::Blocks`], to the key blocks its query tile selected).
#[derive(Debug, Clone)]
pub struct SparseAttention {
    pub codebook: Codebook,
    /// Keys kept per query; a count above the sequence length keeps every allowed key. Keeping
    /// every key (e.g. `Fraction(1.0)`) runs the fused dense kernel on the CPU.
    pub top_k: KeyTopK,
    pub grouping: KeyGrouping,
}

impl SparseAttention {
    /// Fits the codebook to sample keys `[B, H, L, d]` (k-means++ and Lloyd, seeded by `pq.seed`).
    pub fn fit(keys: &Tensor, pq: &PqConfig, top_k: KeyTopK, grouping: KeyGrouping) -> Result<Self> {
        check_grouping(grouping)?;
        check_top_k(top_k)?;
        Ok(Self {
            codebook: Codebook::fit(keys, pq)?,
            top_k,
            grouping,
        })
    }

    /// The top-k for `lk` keys (counts are clamped to `lk`).
    pub fn resolve_top_k(&self, lk: usize) -> KeyTopK {
        match self.top_k {
            KeyTopK::Count(k) if k > lk => KeyTopK::Count(lk),
            t => t,
        }
    }

    /// `q, k, v: [B, H, L, d]` → `[B, H, L, d]`. Rows with no allowed key give zeros.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
        scale: f64,
    ) -> Result<Tensor> {
        check_grouping(self.grouping)?;
        let (lq, lk) = (q.dim(2)?, k.dim(2)?);
        let top_k = self.resolve_top_k(lk);
        // An invalid k (the field is public) is an error, not every key.
        let kept = if lk == 0 { 0 } else { top_k.resolve(lk)? };
        // The sparse kernels read rows in place; a strided view (heads split by `transpose`)
        // is laid out here, as the dense path does, so swapping one for the other works alike.
        let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
        if kept >= lk && spt_ops::flash_attention_is_fused(q, v, false) {
            // Every key is kept, so this is dense attention (same zeros for rows with no
            // allowed key, no dropout): the fused dense kernel computes it faster than a
            // selection that gathers every key.
            return Ok(spt_ops::flash_attention(q, k, v, mask, scale, None)?);
        }
        let selection = match self.grouping {
            KeyGrouping::PerQuery => Selection::PerQuery { k: top_k },
            KeyGrouping::Blocks { tile } => {
                let keys = kept.max(1);
                let mut tiling = BlockTiling {
                    query_tile: tile,
                    key_block: tile,
                    top_blocks: keys.div_ceil(tile).max(1),
                };
                if mask.causal {
                    // Every tile keeps its diagonal blocks.
                    tiling.top_blocks = tiling.top_blocks.max(tiling.diagonal_blocks(lq, lk));
                }
                Selection::Blocks(tiling)
            }
        };
        Ok(spt_ops::pq_attention(
            q,
            k,
            v,
            &self.codebook,
            selection,
            mask,
            scale,
        )?)
    }
}

/// The per-layer attention slot.
#[derive(Debug, Clone)]
pub enum AttentionCore {
    /// `softmax(scale·q·kᵀ + mask)·v` with attention dropout.
    Dense(DenseAttention),
    /// PQ key selection + sparse attention.
    Sparse(SparseAttention),
}

impl AttentionCore {
    /// Dense attention with dropout probability `p` on the attention probabilities, drawing
    /// its masks from a seed source of its own ([`Dropout::new`]; build a [`DenseAttention`]
    /// with [`Dropout::with_rng`] to share one).
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
        let _span = tracing::trace_span!("attention", kind = self.kind()).entered();
        match self {
            Self::Dense(d) => d.forward_t(q, k, v, mask, scale, train),
            Self::Sparse(s) => s.forward(q, k, v, &mask.mask, scale),
        }
    }

    /// How many leading query rows of a `len`-token sequence the first row's output depends on:
    /// one, except in block mode, where a query tile shares one key selection.
    pub fn first_query_rows(&self, len: usize) -> usize {
        match self {
            Self::Sparse(SparseAttention {
                grouping: KeyGrouping::Blocks { tile },
                ..
            }) => (*tile).max(1).min(len),
            _ => 1.min(len),
        }
    }

    /// How this slot is accounted in [`crate::memory::activation_bytes`] for `seq_len` keys.
    pub fn cost(&self, seq_len: usize) -> crate::memory::AttentionCost {
        match self {
            Self::Dense(_) => crate::memory::AttentionCost::Dense,
            Self::Sparse(s) => crate::memory::AttentionCost::Sparse {
                k: s.resolve_top_k(seq_len).resolve(seq_len).unwrap_or(seq_len),
            },
        }
    }

    /// Short name for reports ("dense" / "sparse").
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense(_) => "dense",
            Self::Sparse(_) => "sparse",
        }
    }
}

/// Reads attention's context `[B, heads, L, d]` as `[B, L, heads·d]` (an output projection's input).
pub(crate) const FROM_HEADS: HeadsLayout = HeadsLayout {
    input_heads: true,
    output_heads: None,
};

/// `[B, H, L, d] → [B, L, H·d]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    Ok(spt_ops::merge_heads(x)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key-padding mask of no sequences prepares (candle refuses an empty reduction), one of
    /// another rank or length is refused by name, and a mask prepared for another length is
    /// refused at the forward instead of broadcasting over the scores.
    #[test]
    fn masks_of_no_rows_or_another_length() -> Result<()> {
        let dev = Device::Cpu;
        for causal in [false, true] {
            let base = if causal {
                AttentionMask::causal()
            } else {
                AttentionMask::none()
            };
            let none = base
                .clone()
                .with_key_padding(Tensor::zeros((0, 5), DType::U8, &dev)?);
            assert!(PreparedMask::new(none, 5, DType::F32, &dev)?.rows_nonempty);
            let flat = base.clone().with_key_padding(Tensor::ones(5, DType::U8, &dev)?);
            let e = PreparedMask::new(flat, 5, DType::F32, &dev)
                .unwrap_err()
                .to_string();
            assert!(e.contains("attention_mask") && e.contains("[B, L]"), "{e}");
            let short = base.with_key_padding(Tensor::ones((2, 0), DType::U8, &dev)?);
            let e = PreparedMask::new(short, 5, DType::F32, &dev)
                .unwrap_err()
                .to_string();
            assert!(e.contains("length 0, expected 5"), "{e}");
        }
        // Both paths: the fused kernel (every row has a key) and the composed one (key 0 padded
        // under a causal mask empties row 0).
        let att = DenseAttention {
            dropout: Dropout::new(0.0)?,
        };
        let x = Tensor::ones((1, 1, 2, 4), DType::F32, &dev)?;
        let x3 = Tensor::ones((1, 1, 3, 4), DType::F32, &dev)?;
        for (pad, fused) in [([[1u8, 0]], true), ([[0u8, 1]], false)] {
            let mask = AttentionMask::causal().with_key_padding(Tensor::new(&pad, &dev)?);
            let two = PreparedMask::new(mask, 2, DType::F32, &dev)?;
            assert_eq!(two.rows_nonempty, fused);
            assert_eq!(att.forward_t(&x, &x, &x, &two, 0.5, false)?.dims(), &[1, 1, 2, 4]);
            let e = att
                .forward_t(&x3, &x3, &x3, &two, 0.5, false)
                .unwrap_err()
                .to_string();
            let named = if fused {
                e.contains("key_padding mask is [1, 2], expected [B, L] = [1, 3]")
            } else {
                e.contains("attention mask") && e.contains("3 queries and 3 keys")
            };
            assert!(named, "{e}");
        }
        Ok(())
    }
}
