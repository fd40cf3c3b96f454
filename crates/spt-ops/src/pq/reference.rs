//! Brute-force selection: decode every key, score in f64, full sort. The oracle for tests.

use super::{Codebook, KeySelection, KeyTopK, SENTINEL};
use crate::attention::AttentionMask;
use candle_core::{DType, Result, Tensor};

/// ADC scores `[B, H, L_q, L_k]` in f64: `q · decode(codes)`, computed the slow way.
pub fn adc_scores(q: &Tensor, codes: &Tensor, codebook: &Codebook) -> Result<Tensor> {
    let recon = codebook.decode(codes)?.to_dtype(DType::F64)?;
    q.to_dtype(DType::F64)?.matmul(&recon.t()?)
}

/// Exact top-k by fully sorting the ADC scores of the allowed keys of each row (score
/// descending, then key index ascending), indices returned ascending with sentinel padding.
pub fn select_keys_brute_force(
    q: &Tensor,
    codes: &Tensor,
    codebook: &Codebook,
    k: KeyTopK,
    mask: &AttentionMask,
) -> Result<KeySelection> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = codes.dim(2)?;
    let kk = k.resolve(lk)?;
    let scores = adc_scores(q, codes, codebook)?.flatten_all()?.to_vec1::<f64>()?;
    let keys_ok = mask.key_allowed("select_keys_brute_force", b, lk)?;
    let mut indices = Vec::with_capacity(b * h * lq * kk);
    let mut counts = Vec::with_capacity(b * h * lq);
    for bh in 0..b * h {
        for i in 0..lq {
            let row = &scores[(bh * lq + i) * lk..(bh * lq + i + 1) * lk];
            let mut cand: Vec<(f64, u32)> = (0..lk)
                .filter(|&j| {
                    (!mask.causal || j <= i) && keys_ok.as_ref().is_none_or(|m| m[(bh / h) * lk + j])
                })
                .map(|j| (row[j], j as u32))
                .collect();
            cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            cand.truncate(kk);
            let mut sel: Vec<u32> = cand.iter().map(|c| c.1).collect();
            sel.sort_unstable();
            counts.push(sel.len() as u32);
            sel.resize(kk, SENTINEL);
            indices.extend(sel);
        }
    }
    let dev = q.device();
    Ok(KeySelection {
        indices: Tensor::from_vec(indices, (b, h, lq, kk), dev)?,
        counts: Tensor::from_vec(counts, (b, h, lq), dev)?,
    })
}
