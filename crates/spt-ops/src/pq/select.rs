//! ADC scoring and exact top-k per query row (CPU).

use super::{Codebook, KeySelection, TopK, SENTINEL};
use crate::attention::AttentionMask;
use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Query rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// Higher score first; equal scores go to the lower key index (deterministic ties).
#[inline]
pub(crate) fn rank(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Keeps the best `k` of `cand` (by [`rank`]) and writes their indices, ascending, into `out`,
/// padding with [`SENTINEL`]. Returns how many are real.
pub(crate) fn top_k_into(cand: &mut [(f32, u32)], k: usize, out: &mut [u32]) -> usize {
    let n = cand.len().min(k);
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, rank);
    }
    let kept = &mut cand[..n];
    kept.sort_unstable_by_key(|c| c.1);
    for (o, c) in out.iter_mut().zip(kept.iter()) {
        *o = c.1;
    }
    out[n..].fill(SENTINEL);
    n
}

/// Selects, for every query row of `q [B, H, L_q, d]`, the `k` allowed keys with the largest
/// ADC score `Σ_s ⟨q_s, c[s, code_s(key)]⟩`, from key codes `u8 [B, H, L_k, S]`.
///
/// Allowed keys: `j ≤ i` when `mask.causal`, and `key_padding[b, j] ≠ 0` when given. Rows with
/// fewer than k allowed keys keep all of them and pad with [`super::SENTINEL`].
pub fn select_keys(
    q: &Tensor,
    codes: &Tensor,
    codebook: &Codebook,
    k: TopK,
    mask: &AttentionMask,
) -> Result<KeySelection> {
    let op = "select_keys";
    let (b, h, lq, d) = codebook.check(op, "q", q)?;
    let s = codebook.n_subspaces();
    let Ok((cb, ch, lk, cs)) = codes.dims4() else {
        bail!("{op}: codes are {:?}, expected [B, H, L, S]", codes.dims())
    };
    if codes.dtype() != DType::U8 || (cb, ch, cs) != (b, h, s) {
        bail!(
            "{op}: codes are {:?} {:?}, expected u8 [B, H, L, S] = [{b}, {h}, *, {s}] for q {:?}",
            codes.dims(),
            codes.dtype(),
            q.dims()
        );
    }
    if !q.device().same_device(codes.device()) {
        bail!(
            "{op}: q is on {:?} but codes are on {:?}",
            q.device().location(),
            codes.device().location()
        );
    }
    let kk = k.resolve(lk)?;
    let keys_ok = mask.key_allowed(op, b, lk)?;
    let qv = q.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let cv = codes.flatten_all()?.to_vec1::<u8>()?;
    let (c, dc) = (codebook.n_codewords(), codebook.d_codeword());

    let mut indices = vec![SENTINEL; b * h * lq * kk];
    let mut counts = vec![0u32; b * h * lq];
    let causal = mask.causal;
    indices
        .par_chunks_mut(lq * kk)
        .zip(counts.par_chunks_mut(lq))
        .enumerate()
        .for_each(|(bh, (idx, cnt))| {
            let (bi, hi) = (bh / h, bh % h);
            let g = codebook.group(hi);
            // Codes transposed to [S, L_k] so each subspace's lookups stream through memory.
            let mut ct = vec![0u8; s * lk];
            for j in 0..lk {
                for si in 0..s {
                    ct[si * lk + j] = cv[(bh * lk + j) * s + si];
                }
            }
            let allowed: Vec<bool> = (0..lk)
                .map(|j| keys_ok.as_ref().is_none_or(|m| m[bi * lk + j]))
                .collect();
            idx.par_chunks_mut(ROWS_PER_TASK * kk)
                .zip(cnt.par_chunks_mut(ROWS_PER_TASK))
                .enumerate()
                .for_each(|(blk, (idx, cnt))| {
                    let mut table = vec![0f32; s * c];
                    let mut scores = vec![0f32; lk];
                    let mut cand: Vec<(f32, u32)> = Vec::with_capacity(lk);
                    for (r, (out, n)) in idx.chunks_mut(kk).zip(cnt.iter_mut()).enumerate() {
                        let i = blk * ROWS_PER_TASK + r;
                        let qi = &qv[(bh * lq + i) * d..(bh * lq + i + 1) * d];
                        for si in 0..s {
                            let cw = codebook.sub(g, si);
                            for ci in 0..c {
                                table[si * c + ci] = crate::simd::Vector::dot(
                                    &qi[si * dc..(si + 1) * dc],
                                    &cw[ci * dc..(ci + 1) * dc],
                                );
                            }
                        }
                        let end = if causal { (i + 1).min(lk) } else { lk };
                        let sc = &mut scores[..end];
                        sc.fill(0.0);
                        for si in 0..s {
                            let t = &table[si * c..(si + 1) * c];
                            for (acc, &code) in sc.iter_mut().zip(&ct[si * lk..si * lk + end]) {
                                *acc += t[code as usize];
                            }
                        }
                        cand.clear();
                        cand.extend(
                            sc.iter()
                                .enumerate()
                                .filter(|(j, _)| allowed[*j])
                                .map(|(j, &v)| (v, j as u32)),
                        );
                        *n = top_k_into(&mut cand, kk, out) as u32;
                    }
                });
        });
    let dev = q.device();
    Ok(KeySelection {
        indices: Tensor::from_vec(indices, (b, h, lq, kk), dev)?,
        counts: Tensor::from_vec(counts, (b, h, lq), dev)?,
    })
}
