//! Dense, obviously-correct sparse attention: full scores with every unselected entry masked.
//! Autograd through it is the oracle for the kernel's backward.

use crate::pq::{KeySelection, SENTINEL};
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
    let kk = sel.k();
    let idx = sel.indices.flatten_all()?.to_vec1::<u32>()?;
    let mut bias = vec![-1e30f64; b * h * lq * lk];
    let mut rows = vec![0f64; b * h * lq];
    for r in 0..b * h * lq {
        for &j in &idx[r * kk..(r + 1) * kk] {
            if j != SENTINEL {
                bias[r * lk + j as usize] = 0.0;
                rows[r] = 1.0;
            }
        }
    }
    let dev = q.device();
    let bias = Tensor::from_vec(bias, (b, h, lq, lk), dev)?.to_dtype(q.dtype())?;
    let rows = Tensor::from_vec(rows, (b, h, lq, 1), dev)?.to_dtype(q.dtype())?;
    let scores = ((q.matmul(&k.t()?)? * scale)? + bias)?;
    let p = crate::norm::reference::softmax(&scores)?.broadcast_mul(&rows)?;
    p.matmul(v)
}
