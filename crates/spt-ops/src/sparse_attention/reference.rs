//! Dense, obviously-correct sparse attention: full scores with every unselected entry masked.
//! Autograd through it is the oracle for the kernel's backward.

use crate::pq::KeySelection;
use candle_core::{Result, Tensor};

/// `softmax(scale·q kᵀ + M) v` where `M[i, j] = 0` if `j ∈ sel(i)` else −1e30; rows with an
/// empty selection output zero.
pub fn sparse_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sel: &KeySelection,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    // Checks every index against L_k.
    let keep = crate::block_sparse_attention::reference::key_keep_mask(sel, lk)?;
    if keep.len() != b * h * lq * lk || sel.indices.elem_count() != b * h * lq * sel.k() {
        candle_core::bail!(
            "sparse_attention_reference: selection indices {:?} do not have one row per query of q {:?} \
             (expected [{b}, {h}, {lq}, k])",
            sel.indices.dims(),
            q.dims()
        );
    }
    let bias: Vec<f64> = keep.iter().map(|&k| if k { 0.0 } else { -1e30 }).collect();
    if lk == 0 {
        // No keys: every row is empty (softmax has nothing to normalise). Built from q, so the
        // oracle's graph still reaches it (a zero gradient).
        return (q.sum_keepdim(3)? * 0.0)?
            .broadcast_as((b, h, lq, v.dim(3)?))?
            .contiguous();
    }
    let rows = crate::block_sparse_attention::reference::rows_with_a_key(&keep, b * h * lq, lk);
    let dev = q.device();
    let bias = Tensor::from_vec(bias, (b, h, lq, lk), dev)?.to_dtype(q.dtype())?;
    let rows = Tensor::from_vec(rows, (b, h, lq, 1), dev)?.to_dtype(q.dtype())?;
    let scores = ((q.matmul(&k.t()?)? * scale)? + bias)?;
    let p = crate::norm::reference::softmax(&scores)?.broadcast_mul(&rows)?;
    p.matmul(v)
}
