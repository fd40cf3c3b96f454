//! Dense, obviously-correct block-sparse attention: full scores with every entry outside the
//! selected blocks (or masked by causality or padding) set to −1e30. Autograd through it is the
//! oracle for the kernel's backward.

use crate::attention::AttentionMask;
use crate::pq::{BlockSelection, KeySelection, SENTINEL};
use candle_core::{DType, Result, Tensor};

/// `keep [B·H·L_q·L_k]`: whether query i sees key j under `sel` (selected block of i's tile,
/// causal and padding constraints included).
pub fn block_keep_mask(sel: &BlockSelection, b: usize, h: usize, lq: usize, lk: usize) -> Result<Vec<bool>> {
    let (qt, kb) = (sel.tiling.query_tile, sel.tiling.key_block);
    let (nt, width) = (lq.div_ceil(qt.max(1)), sel.blocks.dim(3)?);
    if qt == 0 || kb == 0 || sel.blocks.dims() != [b, h, nt, width] {
        candle_core::bail!(
            "block_keep_mask: selection blocks {:?} with tiling {:?} do not fit B = {b}, H = {h}, \
             L_q = {lq} (expected [B, H, ⌈L_q / query_tile⌉, top_blocks], tiles of at least 1)",
            sel.blocks.dims(),
            sel.tiling
        );
    }
    let blocks = sel.blocks.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&blk) = blocks
        .iter()
        .find(|&&x| x != SENTINEL && x as usize >= lk.div_ceil(kb))
    {
        candle_core::bail!("block_keep_mask: key block {blk} is past L_k = {lk} (blocks of {kb})");
    }
    let keys_ok = sel.mask.key_allowed("block_keep_mask", b, lk)?;
    let mut keep = vec![false; b * h * lq * lk];
    for bh in 0..b * h {
        for i in 0..lq {
            let (r, t) = (bh * lq + i, i / qt);
            for &blk in &blocks[(bh * nt + t) * width..(bh * nt + t + 1) * width] {
                if blk == SENTINEL {
                    continue;
                }
                let j0 = blk as usize * kb;
                for j in j0..(j0 + kb).min(lk) {
                    let causal_ok = !sel.mask.causal || j <= i;
                    let pad_ok = keys_ok.as_ref().is_none_or(|m| m[(bh / h) * lk + j]);
                    keep[r * lk + j] = causal_ok && pad_ok;
                }
            }
        }
    }
    Ok(keep)
}

/// `keep [B·H·L_q·L_k]` of a per-query selection.
pub fn key_keep_mask(sel: &KeySelection, lk: usize) -> Result<Vec<bool>> {
    let kk = sel.k();
    let idx = sel.indices.flatten_all()?.to_vec1::<u32>()?;
    let rows = idx.len() / kk.max(1);
    let mut keep = vec![false; rows * lk];
    for (r, row) in idx.chunks(kk.max(1)).enumerate() {
        for &j in row.iter().filter(|&&j| j != SENTINEL) {
            if j as usize >= lk {
                candle_core::bail!("key_keep_mask: query row {r} selects key {j}, but L_k = {lk}");
            }
            keep[r * lk + j as usize] = true;
        }
    }
    Ok(keep)
}

/// Fidelity of a selection: the mean over query rows (with at least one allowed key) of the
/// dense masked softmax mass `Σ_j keep_ij · softmax_j(scale·q_i·k_j)` the selection keeps.
pub fn captured_mass(q: &Tensor, k: &Tensor, mask: &AttentionMask, scale: f64, keep: &[bool]) -> Result<f64> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    if keep.len() != b * h * lq * lk {
        candle_core::bail!(
            "captured_mass: keep has {} entries, expected B·H·L_q·L_k = {}",
            keep.len(),
            b * h * lq * lk
        );
    }
    let scores = (q.to_dtype(DType::F64)?.matmul(&k.to_dtype(DType::F64)?.t()?)? * scale)?;
    let scores = scores.flatten_all()?.to_vec1::<f64>()?;
    let keys_ok = mask.key_allowed("captured_mass", b, lk)?;
    let (mut total, mut rows) = (0f64, 0usize);
    for (r, row) in scores.chunks(lk.max(1)).enumerate().take(b * h * lq) {
        let (bi, i) = (r / (h * lq), r % lq);
        let ok = |j: usize| (!mask.causal || j <= i) && keys_ok.as_ref().is_none_or(|m| m[bi * lk + j]);
        let max = (0..lk)
            .filter(|&j| ok(j))
            .map(|j| row[j])
            .fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue;
        }
        let (mut all, mut kept) = (0f64, 0f64);
        for j in (0..lk).filter(|&j| ok(j)) {
            let p = (row[j] - max).exp();
            all += p;
            if keep[r * lk + j] {
                kept += p;
            }
        }
        total += kept / all;
        rows += 1;
    }
    Ok(if rows == 0 { 0.0 } else { total / rows as f64 })
}

/// `softmax(scale·q kᵀ + M) v` where `M[i, j] = 0` iff key j lies in a block selected for the
/// tile of query i and is allowed by the selection's mask, else −1e30; empty rows output zero.
pub fn block_sparse_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sel: &BlockSelection,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let keep = block_keep_mask(sel, b, h, lq, k.dim(2)?)?;
    attention_over(q, k, v, &keep, scale)
}

/// `softmax(scale·q kᵀ + M) v` with `M = 0` where `keep [B·H·L_q·L_k]` and −1e30 elsewhere; rows
/// that keep nothing (and every row when there are no keys) output zero. The shared body of the
/// references, whose autograd is the kernels' backward oracle.
pub(crate) fn attention_over(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &[bool],
    scale: f64,
) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    if lk == 0 {
        // Softmax has nothing to normalise. Built from q, so the graph still reaches it.
        return (q.sum_keepdim(3)? * 0.0)?
            .broadcast_as((b, h, lq, v.dim(3)?))?
            .contiguous();
    }
    let bias: Vec<f64> = keep.iter().map(|&k| if k { 0.0 } else { -1e30 }).collect();
    let rows: Vec<f64> = keep
        .chunks(lk)
        .take(b * h * lq)
        .map(|r| if r.iter().any(|&k| k) { 1.0 } else { 0.0 })
        .collect();
    let dev = q.device();
    let bias = Tensor::from_vec(bias, (b, h, lq, lk), dev)?.to_dtype(q.dtype())?;
    let rows = Tensor::from_vec(rows, (b, h, lq, 1), dev)?.to_dtype(q.dtype())?;
    let scores = ((q.matmul(&k.t()?)? * scale)? + bias)?;
    let p = crate::norm::reference::softmax(&scores)?.broadcast_mul(&rows)?;
    p.matmul(&v.contiguous()?)
}
