//! ADC scoring and exact top-k per query row (CPU).

use super::{Codebook, KeySelection, KeyTopK, SENTINEL};
use crate::attention::AttentionMask;
use crate::blas::{gemm_into, transpose, Mat};
use crate::util::MadeBy;
use candle_core::{bail, DType, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per rayon task: one score GEMM per tile of this many rows.
const ROWS_PER_TASK: usize = 32;

/// Rows shorter than this skip the sampled threshold and filter nothing.
const SAMPLE_MIN_ROW: usize = 128;
/// Strided sample size for the threshold guess.
const SAMPLE: usize = 64;

/// Order-preserving u32 key of a score (larger score ⇒ larger key), so comparisons are integer.
#[inline]
fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Writes into `out` the indices of the `k` best allowed scores of `sc` (higher score first, then
/// lower index: deterministic ties), ascending, padded with [`SENTINEL`]. `allowed[j]` gates key j;
/// `tmp` is scratch. Returns how many are real.
///
/// Each candidate is packed as `key << 32 | (u32::MAX − j)`, a total order that is the tie rule
/// itself. A strided sample gives a threshold that about 1.5·k scores pass; one branch-free pass
/// keeps those (in index order), a selection among them finds the k-th best, and a scan of the
/// kept ones writes the answer in index order. When fewer than k pass, every allowed score is a
/// candidate: the answer never depends on the guess, only the time does.
pub(crate) fn top_k_into(
    sc: &[f32],
    allowed: Option<&[bool]>,
    k: usize,
    tmp: &mut Vec<u64>,
    out: &mut [u32],
) -> usize {
    let n = sc.len();
    let ok = |j: usize| allowed.is_none_or(|a| a[j]);
    if tmp.len() < 2 * n + 1 {
        tmp.resize(2 * n + 1, 0);
    }
    let guess = if n >= SAMPLE_MIN_ROW && k > 0 {
        let step = n / SAMPLE;
        let mut buf = [0u32; SAMPLE];
        let mut len = 0;
        for j in (0..SAMPLE).map(|t| t * step).filter(|&j| ok(j)) {
            buf[len] = order_key(sc[j]);
            len += 1;
        }
        let sample = &mut buf[..len];
        let rank = (sample.len() * k * 3).div_ceil(2 * n) + 2;
        if rank < sample.len() {
            let (_, &mut g, _) = sample.select_nth_unstable_by(rank - 1, |a, b| b.cmp(a));
            g
        } else {
            0
        }
    } else {
        0
    };
    // Branch-free: every candidate is written, the cursor only moves past the kept ones.
    let collect = |buf: &mut [u64], floor: u32| -> usize {
        let buf = &mut buf[..n + 1];
        let mut w = 0;
        match allowed {
            None => {
                for (j, &v) in sc.iter().enumerate() {
                    let key = order_key(v);
                    buf[w] = (u64::from(key) << 32) | u64::from(u32::MAX - j as u32);
                    w += usize::from(key >= floor);
                }
            }
            Some(a) => {
                for (j, (&v, &okj)) in sc.iter().zip(a).enumerate() {
                    let key = order_key(v);
                    buf[w] = (u64::from(key) << 32) | u64::from(u32::MAX - j as u32);
                    w += usize::from(key >= floor && okj);
                }
            }
        }
        w
    };
    let mut m = collect(tmp, guess);
    if m < k && guess > 0 {
        m = collect(tmp, 0);
    }
    let (cand, scratch) = tmp.split_at_mut(n + 1);
    let taken = m.min(k);
    if m <= k {
        for (o, &p) in out.iter_mut().zip(&cand[..m]) {
            *o = u32::MAX - p as u32;
        }
    } else {
        let sel = &mut scratch[..m];
        sel.copy_from_slice(&cand[..m]);
        let (_, &mut thr, _) = sel.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        // Branch-free again (about half the candidates pass), into the scratch.
        let mut w = 0;
        for &p in &cand[..m] {
            scratch[w] = u64::from(u32::MAX - p as u32);
            w += usize::from(p >= thr);
        }
        debug_assert_eq!(w, k);
        for (o, &j) in out.iter_mut().zip(&scratch[..k]) {
            *o = j as u32;
        }
    }
    out[taken..].fill(SENTINEL);
    taken
}

/// A code names one of the codebook's C codewords; a larger one (codes made by hand, or by
/// another codebook) would index past its tables. `max` is the codes' largest.
pub(super) fn check_codes(op: &str, max: u8, codebook: &Codebook) -> Result<()> {
    let c = codebook.n_codewords();
    if max as usize >= c {
        bail!(
            "{op}: codes hold {max}, but the codebook has C = {c} codewords (0..{}); codes come from \
             Codebook::encode with the same codebook",
            c - 1
        );
    }
    Ok(())
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
    select_keys_from(q, codes, codebook, k, mask, MadeBy::Caller)
}

/// [`select_keys`], told who made the codes.
pub(crate) fn select_keys_from(
    q: &Tensor,
    codes: &Tensor,
    codebook: &Codebook,
    k: KeyTopK,
    mask: &AttentionMask,
    from: MadeBy,
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
    if b * h * lq == 0 {
        // No query rows: an empty selection (the kernels below chunk by rows).
        let dev = q.device();
        return Ok(KeySelection {
            indices: Tensor::zeros((b, h, lq, kk), DType::U32, dev)?,
            counts: Tensor::zeros((b, h, lq), DType::U32, dev)?,
        });
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        if lk > 0 && from == MadeBy::Caller {
            check_codes(
                op,
                crate::util::reduce_all(codes, true)?.to_scalar::<u8>()?,
                codebook,
            )?;
        }
        return super::cuda::select(q, codes, codebook, kk, mask, (b, h, lq, d), lk);
    }
    let keys_ok = mask.key_allowed(op, b, lk)?;
    let qv = q.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let cv = codes.flatten_all()?.to_vec1::<u8>()?;
    if from == MadeBy::Caller {
        check_codes(op, cv.iter().copied().max().unwrap_or(0), codebook)?;
    }
    let dc = codebook.d_codeword();

    let mut indices = vec![SENTINEL; b * h * lq * kk];
    let mut counts = vec![0u32; b * h * lq];
    let causal = mask.causal;
    indices
        .par_chunks_mut(lq * kk)
        .zip(counts.par_chunks_mut(lq))
        .enumerate()
        .for_each(|(bh, (idx, cnt))| {
            let (bi, hi) = (bh / h, bh % h);
            let recon = reconstruct(
                &cv[bh * lk * s..(bh + 1) * lk * s],
                codebook,
                codebook.group(hi),
                dc,
            );
            // Row-major ĉᵀ `[d, lk]`: the GEMMs read it without gemm's strided repacking.
            let recon_t = transpose(&recon, lk, d);
            let allowed: Vec<bool> = (0..lk)
                .map(|j| keys_ok.as_ref().is_none_or(|m| m[bi * lk + j]))
                .collect();
            let allowed = allowed.iter().any(|&a| !a).then_some(allowed.as_slice());
            let qb = &qv[bh * lq * d..(bh + 1) * lq * d];
            idx.par_chunks_mut(ROWS_PER_TASK * kk)
                .zip(cnt.par_chunks_mut(ROWS_PER_TASK))
                .enumerate()
                .for_each(|(blk, (idx, cnt))| {
                    let (i0, rows) = (blk * ROWS_PER_TASK, cnt.len());
                    // Under a causal mask the tile's last row sees the most keys.
                    let width = if causal { (i0 + rows).min(lk) } else { lk };
                    let mut scores = vec![0f32; rows * width];
                    // One GEMM per tile: q · ĉ(key) over every key equals Σ_s ⟨q_s, c[s, code_s]⟩.
                    gemm_into(
                        rows,
                        width,
                        d,
                        &mut scores,
                        false,
                        Mat::new(qb, i0 * d, d, 1),
                        Mat::new(&recon_t, 0, lk, 1),
                        Parallelism::None,
                    );
                    let mut tmp = Vec::with_capacity(width);
                    for (r, (out, n)) in idx.chunks_mut(kk).zip(cnt.iter_mut()).enumerate() {
                        let i = i0 + r;
                        let end = if causal { (i + 1).min(lk) } else { lk };
                        let sc = &scores[r * width..r * width + end];
                        *n = top_k_into(sc, allowed.map(|a| &a[..end]), kk, &mut tmp, out) as u32;
                    }
                });
        });
    let dev = q.device();
    Ok(KeySelection {
        indices: Tensor::from_vec(indices, (b, h, lq, kk), dev)?,
        counts: Tensor::from_vec(counts, (b, h, lq), dev)?,
    })
}

/// Decoded keys `[L_k, d]` of one (batch, head) from its codes `[L_k, S]`: codeword `code_s` of
/// subspace s in columns `s·dc..(s+1)·dc`. Scoring against these with a GEMM gives the ADC
/// scores at GEMM speed; per-query lookup tables cost more than the GEMM at any head dim here.
fn reconstruct(codes: &[u8], cb: &Codebook, g: usize, dc: usize) -> Vec<f32> {
    let s = cb.n_subspaces();
    let lk = codes.len() / s.max(1);
    let mut out = vec![0f32; lk * s * dc];
    for (j, row) in out.chunks_mut(s * dc).enumerate() {
        for si in 0..s {
            let c = codes[j * s + si] as usize;
            row[si * dc..(si + 1) * dc].copy_from_slice(&cb.sub(g, si)[c * dc..(c + 1) * dc]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Full sort: score descending, then index ascending; the k first, ascending.
    fn brute(sc: &[f32], allowed: Option<&[bool]>, k: usize) -> Vec<u32> {
        let mut c: Vec<usize> = (0..sc.len()).filter(|&j| allowed.is_none_or(|a| a[j])).collect();
        c.sort_by(|&a, &b| sc[b].total_cmp(&sc[a]).then(a.cmp(&b)));
        c.truncate(k);
        let mut c: Vec<u32> = c.into_iter().map(|j| j as u32).collect();
        c.sort_unstable();
        c
    }

    fn check(sc: &[f32], allowed: Option<&[bool]>, k: usize) {
        let mut out = vec![0u32; k];
        let mut tmp = Vec::new();
        let n = top_k_into(sc, allowed, k, &mut tmp, &mut out);
        let want = brute(sc, allowed, k);
        assert_eq!(n, want.len());
        assert_eq!(&out[..n], &want[..]);
        assert!(out[n..].iter().all(|&j| j == SENTINEL));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Long rows take the sampled-threshold path; few distinct values force ties at the
        /// threshold, and a skewed tail makes the guess miss (the fallback path).
        #[test]
        fn sampled_threshold_equals_full_sort(
            n in 1usize..1500, k in 1usize..300, levels in 1u32..1000, skew in 0usize..3,
            masked in any::<bool>(), seed in any::<u64>(),
        ) {
            let mut x = seed | 1;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let sc: Vec<f32> = (0..n)
                .map(|j| {
                    let v = (next() % u64::from(levels)) as f32 - levels as f32 / 2.0;
                    match skew { 1 => v + j as f32, 2 if j % 97 == 0 => v + 1e4, _ => v }
                })
                .collect();
            let allowed: Vec<bool> = (0..n).map(|_| next() % 4 != 0).collect();
            check(&sc, masked.then_some(allowed.as_slice()), k.min(n));
        }
    }

    #[test]
    fn constant_and_sorted_rows() {
        for n in [128usize, 513, 2048] {
            for k in [1, n / 8, n - 1, n] {
                check(&vec![0.5; n], None, k);
                check(&(0..n).map(|j| j as f32).collect::<Vec<_>>(), None, k);
                check(&(0..n).map(|j| -(j as f32)).collect::<Vec<_>>(), None, k);
                check(
                    &(0..n)
                        .map(|j| if j % 2 == 0 { -0.0 } else { 0.0 })
                        .collect::<Vec<_>>(),
                    None,
                    k,
                );
            }
        }
    }
}
