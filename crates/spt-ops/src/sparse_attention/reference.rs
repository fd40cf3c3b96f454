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
    crate::block_sparse_attention::reference::attention_over(q, k, v, &keep, scale)
}
