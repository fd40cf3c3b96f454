//! Sparse attention over selected keys: `o_i = Σ_{j∈sel(i)} softmax_j(scale·q_i·k_j) v_j`.
//!
//! The fused CPU kernel computes the scores (SDDMM), a max-subtracted softmax and the weighted
//! sum (SpMM) in one pass per row and keeps only the row log-sum-exp for backward, so what
//! backward holds beyond q, k, v and o is O(B·H·L·k): the selection indices and `lse`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod reference;

use crate::pq::{KeySelection, SENTINEL};
use crate::simd::Vector;
use crate::util::{check_qkv, contiguous, if_tracked, reduce_all, with_cpu};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use cpu::Dims;
use std::sync::Mutex;

pub use crate::attention::{dense_attention, AttentionMask};
pub use reference::sparse_attention_reference;

/// Sparse attention of `q [B, H, L_q, d]` over the keys `k [B, H, L_k, d]` / values
/// `v [B, H, L_k, d_v]` listed in `sel`, with softmax scale `scale` (usually `1/√d`).
/// Differentiable in q, k and v; the selection is a constant. q, k and v must be contiguous (a
/// strided one is refused by name; call `.contiguous()`), f32 or f64 on the CPU, also bf16 on
/// CUDA.
pub fn sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sel: &KeySelection,
    scale: f64,
) -> Result<Tensor> {
    let op = "sparse_attention";
    let [b, h, lq, lk, d, dv] = check_qkv(op, q, k, v)?;
    let kk = sel.k();
    if sel.indices.dtype() != DType::U32 || sel.indices.dims() != [b, h, lq, kk] {
        bail!(
            "{op}: selection indices are {:?} {:?}, expected u32 [B, H, L_q, k] = [{b}, {h}, {lq}, k] for q {:?}",
            sel.indices.dims(),
            sel.indices.dtype(),
            q.dims()
        );
    }
    if kk == 0 {
        bail!(
            "{op}: the selection has k = 0 keys per row, expected k ≥ 1 (q {:?})",
            q.dims()
        );
    }
    if !sel.indices.device().same_device(q.device()) {
        bail!(
            "{op}: the selection is on {:?} but q is on {:?}",
            sel.indices.device().location(),
            q.device().location()
        );
    }
    for (name, t) in [("q", q), ("k", k), ("v", v), ("selection indices", &sel.indices)] {
        if !t.is_contiguous() {
            bail!(
                "{op}: {name} {:?} is not contiguous (strides {:?}); call .contiguous() first",
                t.dims(),
                t.stride()
            );
        }
    }
    // Out-of-range indices would read another head's keys: reject them up front.
    if let Some(j) = max_real_index(op, &sel.indices)?.filter(|&j| j as usize >= lk) {
        bail!("{op}: selection holds key index {j}, but k has only L_k = {lk} keys");
    }
    let dims = Dims {
        bh: b * h,
        lq,
        lk,
        d,
        dv,
        kk,
    };
    q.apply_op3(
        k,
        v,
        SparseAttention {
            indices: sel.indices.clone(),
            dims,
            scale,
            lse: Mutex::new(None),
        },
    )
}

/// The largest real (non-sentinel) key index of a selection `[B, H, L_q, k]`, if it has any,
/// after checking each row's layout (real indices ascending and unique, then the padding): a
/// hand-built selection with a repeated key would count it twice, and the CUDA kernel stops a
/// row at its first padding entry. On the CPU a scan; elsewhere [`device_check`].
fn max_real_index(op: &str, indices: &Tensor) -> Result<Option<u32>> {
    if !indices.device().is_cpu() {
        return device_check(op, indices);
    }
    let kk = indices.dims().last().copied().unwrap_or(1).max(1);
    let v = indices.flatten_all()?.to_vec1::<u32>()?;
    if let Some(r) = v.chunks(kk).position(|row| !well_laid_out(row)) {
        return Err(bad_row(op, r, &v[r * kk..][..kk]));
    }
    Ok(v.into_iter().filter(|&j| j != SENTINEL).max())
}

fn well_laid_out(row: &[u32]) -> bool {
    let n = row.iter().position(|&j| j == SENTINEL).unwrap_or(row.len());
    row[n..].iter().all(|&j| j == SENTINEL) && row[..n].windows(2).all(|w| w[0] < w[1])
}

fn bad_row(op: &str, r: usize, row: &[u32]) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: selection row {r} is {row:?}; expected ascending, unique key indices, then u32::MAX \
         padding (as select_keys returns them)"
    ))
}

/// [`max_real_index`] with tensor ops on the selection's device and one read of three scalars,
/// so the check never copies the selection (4·B·H·L_q·k bytes) to the host: a row is well laid
/// out when each adjacent pair ascends (a real index before the padding does, the padding being
/// `u32::MAX`) or is padding twice. Only a bad selection reads its rows back, to name one.
fn device_check(op: &str, indices: &Tensor) -> Result<Option<u32>> {
    if indices.elem_count() == 0 {
        return Ok(None);
    }
    let last = indices.rank() - 1;
    let kk = indices.dim(last)?;
    let over_rows = |t: Tensor, max: bool| reduce_all(&t, max)?.to_dtype(DType::U32);
    let real = indices.ne(SENTINEL)?;
    let masked = real.where_cond(indices, &indices.zeros_like()?)?;
    let row_ok = if kk > 1 {
        let (a, b) = (indices.narrow(last, 0, kk - 1)?, indices.narrow(last, 1, kk - 1)?);
        let both_padding = a.eq(SENTINEL)?.minimum(&b.eq(SENTINEL)?)?;
        Some(a.lt(&b)?.maximum(&both_padding)?)
    } else {
        None
    };
    let ok = match &row_ok {
        Some(t) => over_rows(t.clone(), false)?,
        None => Tensor::new(1u32, indices.device())?,
    };
    let summary = Tensor::stack(&[over_rows(real, true)?, over_rows(masked, true)?, ok], 0)?;
    let [any, max, ok] = <[u32; 3]>::try_from(summary.to_vec1::<u32>()?).expect("three scalars");
    if ok == 0 {
        let rows = row_ok
            .expect("a bad row has two entries")
            .min(last)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let r = rows.iter().position(|&o| o == 0).expect("a row failed");
        let all = indices.flatten_all()?;
        return Err(bad_row(op, r, &all.narrow(0, r * kk, kk)?.to_vec1::<u32>()?));
    }
    Ok((any != 0).then_some(max))
}

/// The forward op. The selection rides along as a non-differentiable field; `lse` is filled by
/// the forward for the backward.
pub struct SparseAttention {
    indices: Tensor,
    dims: Dims,
    scale: f64,
    lse: Mutex<Option<Tensor>>,
}

fn indices_u32(t: &Tensor) -> Result<Vec<u32>> {
    with_cpu::<u32, _>("sparse_attention", t, |s| Ok(s.to_vec()))
}

impl CustomOp3 for SparseAttention {
    fn name(&self) -> &'static str {
        "sparse_attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "sparse_attention";
        let idx = indices_u32(&self.indices)?;
        let n = self.dims;
        let (b, h) = (l1.dims()[0], l1.dims()[1]);
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let (o, lse) = cpu::forward::<$t>(
                    contiguous(op, "q", s1, l1)?,
                    contiguous(op, "k", s2, l2)?,
                    contiguous(op, "v", s3, l3)?,
                    &idx,
                    n,
                    self.scale as $t,
                );
                let lse = Tensor::from_vec(lse, (b, h, n.lq), &candle_core::Device::Cpu)?;
                *self
                    .lse
                    .lock()
                    .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))? = Some(lse);
                CpuStorage::$variant(o)
            }};
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32, F32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64, F64),
            _ => bail!("{op}: q, k and v must all be f32 or all f64"),
        };
        Ok((out, Shape::from((b, h, n.lq, n.dv))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (o, shape, lse) = crate::cuda::by_float!(
            "sparse_attention",
            s1.dtype(),
            cuda::forward(&self.indices, self.dims, self.scale, s1, l1, s2, l2, s3, l3)
        )?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("sparse_attention: poisoned lock".into()))? = Some(lse);
        Ok((o, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("sparse_attention: poisoned lock".into()))?
            .clone();
        let Some(lse) = lse else {
            bail!("sparse_attention: backward called before forward")
        };
        // Shapes and indices were checked by the forward.
        let (dq, dk, dv) = backward(q, k, v, o, &lse, grad, &self.indices, self.scale)?;
        Ok((if_tracked(q, dq), if_tracked(k, dk), if_tracked(v, dv)))
    }
}

/// The exact backward as a plain function (testable alone): `(dq, dk, dv)` given the forward's
/// output `o`, its row log-sum-exp `lse [B, H, L_q]` and the upstream gradient `grad`.
#[allow(clippy::too_many_arguments)]
pub fn sparse_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    indices: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "sparse_attention_backward";
    let [b, h, lq, lk, _, dv] = check_qkv(op, q, k, v)?;
    let kk = indices.dims().last().copied().unwrap_or(0);
    for (name, t, want) in [
        ("o", o, vec![b, h, lq, dv]),
        ("grad", grad, vec![b, h, lq, dv]),
        ("lse", lse, vec![b, h, lq]),
        ("indices", indices, vec![b, h, lq, kk]),
    ] {
        if t.dims() != want {
            bail!(
                "{op}: {name} is {:?}, expected {want:?} for q {:?}, v {:?}",
                t.dims(),
                q.dims(),
                v.dims()
            );
        }
    }
    if indices.dtype() != DType::U32 {
        bail!(
            "{op}: indices are {:?}, expected u32 (as select_keys returns them)",
            indices.dtype()
        );
    }
    if let Some(j) = max_real_index(op, indices)?.filter(|&j| j as usize >= lk) {
        bail!("{op}: indices hold key index {j}, but k has only L_k = {lk} keys");
    }
    backward(q, k, v, o, lse, grad, indices, scale)
}

/// [`sparse_attention_backward`] without its checks (the op's backward: the forward made them).
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    indices: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "sparse_attention_backward";
    let (b, h, lq, d) = q.dims4()?;
    let (lk, dv) = (k.dim(2)?, v.dim(3)?);
    let kk = indices.dim(3)?;
    let n = Dims {
        bh: b * h,
        lq,
        lk,
        d,
        dv,
        kk,
    };
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return crate::cuda::by_float!(
            op,
            q.dtype(),
            cuda::backward(q, k, v, o, lse, grad, indices, n, scale)
        );
    }
    let idx = indices_u32(indices)?;
    let dev = q.device();
    if !matches!(&*q.storage_and_layout().0, Storage::Cpu(_)) {
        bail!("{op}: only the CPU backward is available in this build");
    }
    macro_rules! run {
        ($t:ty) => {{
            let f = |t: &Tensor| with_cpu::<$t, _>(op, t, |s| Ok(s.to_vec()));
            let (dq, dk, dvv) = cpu::backward::<$t>(
                &f(q)?,
                &f(k)?,
                &f(v)?,
                &f(o)?,
                &f(&lse.to_dtype(q.dtype())?)?,
                &f(grad)?,
                &idx,
                n,
                scale as $t,
            );
            Ok((
                Tensor::from_vec(dq, q.shape(), dev)?,
                Tensor::from_vec(dk, k.shape(), dev)?,
                Tensor::from_vec(dvv, v.shape(), dev)?,
            ))
        }};
    }
    match q.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dt => bail!("{op}: unsupported dtype {dt:?}"),
    }
}

/// Bytes the sparse op keeps for backward beyond its inputs and output: indices + row lse
/// (saturating at `usize::MAX` for sizes past memory, as `activation_bytes` does).
pub fn sparse_saved_bytes(b: usize, h: usize, l: usize, k: usize, elem: usize) -> usize {
    [b, h, l, k.saturating_mul(4).saturating_add(elem)]
        .into_iter()
        .fold(1, usize::saturating_mul)
}

#[allow(dead_code)]
fn _assert_vector_impls() {
    fn f<T: Vector>() {}
    f::<f32>();
    f::<f64>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The saved-bytes estimates count what they say and saturate where a product of absurd
    /// sizes would overflow (it panicked in debug builds).
    #[test]
    fn saved_bytes_count_and_saturate() {
        assert_eq!(sparse_saved_bytes(2, 12, 512, 64, 4), 2 * 12 * 512 * (4 * 64 + 4));
        assert_eq!(sparse_saved_bytes(usize::MAX / 2, 12, 512, 64, 4), usize::MAX);
        assert_eq!(
            crate::flash_attention::flash_saved_bytes(2, 12, 512, 4),
            2 * 12 * 512 * 4
        );
        assert_eq!(
            crate::flash_attention::flash_saved_bytes(usize::MAX, 2, 1, 1),
            usize::MAX
        );
    }

    /// The device form of the selection check gives the CPU scan's answer, error included (run
    /// here on CPU tensors: the same tensor ops run on a GPU).
    #[test]
    fn device_check_agrees_with_the_scan() -> Result<()> {
        let s = SENTINEL;
        let cases: [[u32; 4]; 9] = [
            [0, 1, 2, 3],
            [3, 5, s, s],
            [s, s, s, s],
            [2, 2, s, s],
            [1, 0, s, s],
            [0, s, 3, s],
            [s, 1, s, s],
            [0, 1, 2, 9],
            [0, 9, s, s],
        ];
        for case in cases {
            // Row 2 of a [1, 2, 2, 4] selection whose other rows are well laid out.
            let mut v = vec![0, 1, 2, 3, 4, s, s, s, 0, 0, 0, 0, 0, 3, s, s];
            v[8..12].copy_from_slice(&case);
            let t = Tensor::from_vec(v, (1, 2, 2, 4), &Device::Cpu)?;
            match (max_real_index("op", &t), device_check("op", &t)) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{case:?}"),
                (Err(a), Err(b)) => {
                    assert_eq!(a.to_string(), b.to_string(), "{case:?}");
                    assert!(a.to_string().contains("row 2 is"), "{a}");
                }
                (a, b) => panic!("{case:?}: scan {a:?}, device ops {b:?}"),
            }
        }
        // Every entry padding, and one key per row.
        let pad = Tensor::from_vec(vec![s; 4], (1, 1, 2, 2), &Device::Cpu)?;
        assert_eq!(device_check("op", &pad)?, None);
        let one = Tensor::from_vec(vec![5u32, s], (1, 1, 2, 1), &Device::Cpu)?;
        assert_eq!(device_check("op", &one)?, Some(5));
        Ok(())
    }
}
