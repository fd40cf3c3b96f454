//! ADC scoring and exact top-k per query row (CPU).

use super::{Codebook, KeySelection, KeyTopK, SENTINEL};
use crate::attention::AttentionMask;
use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

/// Query rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// Writes into `out` the indices of the `k` best allowed scores of `sc` (higher score first, then
/// lower index: deterministic ties), ascending, padded with [`SENTINEL`]. `allowed[j]` gates key j;
/// `tmp` is scratch. Returns how many are real.
///
/// Finds the k-th best score with a selection on a scratch copy, then one ascending scan takes
/// every key above it and the lowest-indexed ties at it, so the output needs no sort.
pub(crate) fn top_k_into(
    sc: &[f32],
    allowed: Option<&[bool]>,
    k: usize,
    tmp: &mut Vec<u32>,
    out: &mut [u32],
) -> usize {
    let ok = |j: usize| allowed.is_none_or(|a| a[j]);
    // Order-preserving u32 keys (larger score ⇒ larger key), so selection compares integers.
    let key = |v: f32| {
        let b = v.to_bits();
        if b >> 31 == 1 {
            !b
        } else {
            b | 0x8000_0000
        }
    };
    tmp.clear();
    tmp.extend(
        sc.iter()
            .enumerate()
            .filter(|&(j, _)| ok(j))
            .map(|(_, &v)| key(v)),
    );
    let n = tmp.len().min(k);
    if tmp.len() <= k {
        for (o, j) in out.iter_mut().zip((0..sc.len()).filter(|&j| ok(j))) {
            *o = j as u32;
        }
    } else {
        let (_, &mut thr, _) = tmp.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        let above = tmp[..k - 1].iter().filter(|&&v| v > thr).count();
        let mut ties = k - above;
        let mut w = 0;
        for (j, &v) in sc.iter().enumerate() {
            if !ok(j) {
                continue;
            }
            let v = key(v);
            if v < thr || (v == thr && ties == 0) {
                continue;
            }
            if v == thr {
                ties -= 1;
            }
            out[w] = j as u32;
            w += 1;
        }
        debug_assert_eq!(w, k);
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
    k: KeyTopK,
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
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return super::cuda::select(q, codes, codebook, kk, mask, (b, h, lq, d), lk);
    }
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
            let packed = Scorer::pack(&cv[bh * lk * s..(bh + 1) * lk * s], s, c, lk);
            let allowed: Vec<bool> = (0..lk)
                .map(|j| keys_ok.as_ref().is_none_or(|m| m[bi * lk + j]))
                .collect();
            let allowed = allowed.iter().any(|&a| !a).then_some(allowed.as_slice());
            idx.par_chunks_mut(ROWS_PER_TASK * kk)
                .zip(cnt.par_chunks_mut(ROWS_PER_TASK))
                .enumerate()
                .for_each(|(blk, (idx, cnt))| {
                    let mut scorer = Scorer::new(s, c);
                    let mut scores = vec![0f32; lk];
                    let mut tmp = Vec::with_capacity(lk);
                    for (r, (out, n)) in idx.chunks_mut(kk).zip(cnt.iter_mut()).enumerate() {
                        let i = blk * ROWS_PER_TASK + r;
                        let qi = &qv[(bh * lq + i) * d..(bh * lq + i + 1) * d];
                        scorer.build(qi, codebook, g, dc);
                        let end = if causal { (i + 1).min(lk) } else { lk };
                        scorer.score(&packed, lk, &mut scores[..end]);
                        *n = top_k_into(&scores[..end], allowed.map(|a| &a[..end]), kk, &mut tmp, out) as u32;
                    }
                });
        });
    let dev = q.device();
    Ok(KeySelection {
        indices: Tensor::from_vec(indices, (b, h, lq, kk), dev)?,
        counts: Tensor::from_vec(counts, (b, h, lq), dev)?,
    })
}

/// Per-query ADC lookup tables. With C ≤ 16, two 4-bit codes share a byte and the table for a
/// subspace pair has 256 entries `T[2p][lo] + T[2p+1][hi]`, halving the lookups per key.
struct Scorer {
    s: usize,
    c: usize,
    paired: bool,
    table: Vec<f32>,
    pairs: Vec<f32>,
}

impl Scorer {
    fn new(s: usize, c: usize) -> Self {
        let paired = c <= 16 && s >= 2;
        let pairs = if paired {
            vec![0f32; s.div_ceil(2) * 256]
        } else {
            Vec::new()
        };
        Self {
            s,
            c,
            paired,
            table: vec![0f32; s * c],
            pairs,
        }
    }

    /// Key codes `[L_k, S]` regrouped as `[slots, L_k]` bytes, a slot per subspace (or pair), so
    /// each slot's lookups stream through memory.
    fn pack(codes: &[u8], s: usize, c: usize, lk: usize) -> Vec<u8> {
        if c <= 16 && s >= 2 {
            let np = s.div_ceil(2);
            let mut out = vec![0u8; np * lk];
            for j in 0..lk {
                for p in 0..np {
                    let lo = codes[j * s + 2 * p];
                    let hi = if 2 * p + 1 < s {
                        codes[j * s + 2 * p + 1]
                    } else {
                        0
                    };
                    out[p * lk + j] = lo | (hi << 4);
                }
            }
            out
        } else {
            let mut out = vec![0u8; s * lk];
            for j in 0..lk {
                for si in 0..s {
                    out[si * lk + j] = codes[j * s + si];
                }
            }
            out
        }
    }

    fn build(&mut self, qi: &[f32], cb: &Codebook, g: usize, dc: usize) {
        let (s, c) = (self.s, self.c);
        for si in 0..s {
            let cw = cb.sub(g, si);
            for ci in 0..c {
                self.table[si * c + ci] =
                    crate::simd::Vector::dot(&qi[si * dc..(si + 1) * dc], &cw[ci * dc..(ci + 1) * dc]);
            }
        }
        if self.paired {
            for p in 0..s.div_ceil(2) {
                let t = &mut self.pairs[p * 256..(p + 1) * 256];
                let lo_t = &self.table[2 * p * c..(2 * p + 1) * c];
                let hi_t = if 2 * p + 1 < s {
                    Some(&self.table[(2 * p + 1) * c..(2 * p + 2) * c])
                } else {
                    None
                };
                for (byte, v) in t.iter_mut().enumerate() {
                    let (lo, hi) = (byte & 15, byte >> 4);
                    *v = match hi_t {
                        Some(h) if lo < c && hi < c => lo_t[lo] + h[hi],
                        None if lo < c => lo_t[lo],
                        _ => 0.0,
                    };
                }
            }
        }
    }

    /// `scores[j] = Σ_slot T[slot][packed[slot][j]]` for the first `scores.len()` keys.
    fn score(&self, packed: &[u8], lk: usize, scores: &mut [f32]) {
        let end = scores.len();
        let (slots, width, table) = if self.paired {
            (self.s.div_ceil(2), 256, &self.pairs)
        } else {
            (self.s, self.c, &self.table)
        };
        let col = |slot: usize| &packed[slot * lk..slot * lk + end];
        let tab = |slot: usize| &table[slot * width..(slot + 1) * width];
        // Four slots at a time, summed in registers: one store per key instead of one per slot.
        let mut slot = 0;
        scores.fill(0.0);
        while slot + 4 <= slots {
            let (c0, c1, c2, c3) = (col(slot), col(slot + 1), col(slot + 2), col(slot + 3));
            let (t0, t1, t2, t3) = (tab(slot), tab(slot + 1), tab(slot + 2), tab(slot + 3));
            for (j, acc) in scores.iter_mut().enumerate() {
                *acc += (t0[c0[j] as usize] + t1[c1[j] as usize]) + (t2[c2[j] as usize] + t3[c3[j] as usize]);
            }
            slot += 4;
        }
        for slot in slot..slots {
            let t = tab(slot);
            for (acc, &code) in scores.iter_mut().zip(col(slot)) {
                *acc += t[code as usize];
            }
        }
    }
}
