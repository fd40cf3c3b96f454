//! Block-sparse attention: each tile of `query_tile` queries of one (batch, head) attends to the
//! keys of the key blocks a [`BlockSelection`] lists for it.
//!
//! Contract, for `q [B, H, L_q, d]`, `k [B, H, L_k, d]`, `v [B, H, L_k, d_v]` (on the CPU: f32
//! or f64, contiguous):
//!
//! - Query `i` belongs to tile `i / query_tile` (the last tile may be shorter) and sees key `j`
//!   iff `j` lies in one of its tile's selected blocks `[blk·key_block, (blk+1)·key_block)`
//!   (the last block may be shorter), `j ≤ i` under a causal mask, and `j` is not padding.
//! - `o_i = Σ_j softmax_j(scale·q_i·k_j) v_j` over those keys; a row with none outputs 0.
//! - Differentiable in q, k and v; the selection is a constant.
//! - Backward keeps the selection (`B·H·n_tiles·top_blocks` block indices) and one log-sum-exp
//!   per query row: `O(B·H·L)`, well under the per-query mode's `O(B·H·L·k)`.
//! - dk and dv are summed in a fixed order: bit-identical across runs and thread counts.
//!
//! With every block selected the op equals [`crate::dense_attention`] under the same mask.
//!
//! Off the CPU it runs the tensor-core kernel on CUDA in bf16 with d = d_v ∈ {64, 128}
//! (the flash-attention kernel of `kernels/flash_attention.cu` over the listed blocks, 64 × 64
//! tiles), and anything else the composed
//! reference over `[B, H, L_q, L_k]` scores.

mod cpu;
pub mod reference;

use crate::pq::{BlockSelection, SENTINEL};
use crate::util::{check_qkv, contiguous, if_tracked, with_slices, MadeBy};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use cpu::Dims;
use std::sync::Mutex;

pub use reference::block_sparse_attention_reference;

/// Block-sparse attention of `q` over the key blocks `sel` lists per query tile, with softmax
/// scale `scale` (usually `1/√d`). See the module docs for the contract.
pub fn block_sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sel: &BlockSelection,
    scale: f64,
) -> Result<Tensor> {
    with_lists(q, k, v, sel, scale, MadeBy::Caller)
}

/// [`block_sparse_attention`], told who made the block lists.
pub(crate) fn with_lists(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sel: &BlockSelection,
    scale: f64,
    lists: MadeBy,
) -> Result<Tensor> {
    let op = "block_sparse_attention";
    let [b, h, lq, lk, d, dv] = check_qkv(op, q, k, v)?;
    let tiling = sel.tiling;
    let (qt, kblk) = (tiling.query_tile, tiling.key_block);
    if qt == 0 || kblk == 0 {
        bail!("{op}: selection tiling {tiling:?} has a zero tile size");
    }
    let (nt, nb) = (lq.div_ceil(qt), lk.div_ceil(kblk));
    let Ok((sb, sh, snt, width)) = sel.blocks.dims4() else {
        bail!(
            "{op}: selection blocks are {:?}, expected u32 [B, H, n_tiles, top_blocks]",
            sel.blocks.dims()
        )
    };
    if sel.blocks.dtype() != DType::U32 || (sb, sh, snt) != (b, h, nt) || width == 0 {
        bail!(
            "{op}: selection blocks are {:?} {:?}, expected u32 [B, H, n_tiles, top_blocks ≥ 1] = [{b}, {h}, {nt}, *] \
             for q {:?} and query_tile = {qt}",
            sel.blocks.dims(),
            sel.blocks.dtype(),
            q.dims()
        );
    }
    if !q.device().is_cpu() {
        if lists == MadeBy::Caller {
            check_lists_on_device(op, &sel.blocks, nb, lk, kblk)?;
        }
        return on_device(q, k, v, sel, scale, [b, h, lk, d, dv]);
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if !t.is_contiguous() {
            bail!(
                "{op}: {name} {:?} is not contiguous (strides {:?}); call .contiguous() first",
                t.dims(),
                t.stride()
            );
        }
    }
    let blocks = sel.blocks.flatten_all()?.to_vec1::<u32>()?;
    check_lists(op, &blocks, width, nb, lk, kblk)?;
    let dims = Dims {
        h,
        bh: b * h,
        lq,
        lk,
        d,
        dv,
        // A tile or block past the sequence is the whole sequence (same lists); clamped, the
        // kernel's buffer arithmetic stays in range.
        qt: qt.min(lq.max(1)),
        kb: kblk.min(lk.max(1)),
        width,
        causal: sel.mask.causal,
        key_ok: sel.mask.key_allowed(op, b, lk)?,
    };
    q.apply_op3(
        k,
        v,
        BlockSparseAttention {
            blocks,
            dims,
            scale,
            lse: Mutex::new(None),
        },
    )
}

/// Out-of-range blocks would read another head's keys; duplicates would count keys twice, and
/// the kernels stop a list at its first [`SENTINEL`].
fn check_lists(op: &str, blocks: &[u32], width: usize, nb: usize, lk: usize, kblk: usize) -> Result<()> {
    for (t, list) in blocks.chunks(width).enumerate() {
        let real: Vec<u32> = list.iter().copied().filter(|&x| x != SENTINEL).collect();
        if let Some(&blk) = real.iter().find(|&&x| x as usize >= nb) {
            bail!("{op}: tile {t} selects key block {blk}, but L_k = {lk} has only {nb} blocks of {kblk}");
        }
        if real.windows(2).any(|w| w[0] >= w[1])
            || real.len() != list.iter().take_while(|&&x| x != SENTINEL).count()
        {
            bail!("{op}: tile {t} block list {list:?} is not ascending, unique and SENTINEL-padded");
        }
    }
    Ok(())
}

/// [`check_lists`] for lists `[B, H, n_tiles, width]` on a device: the same conditions as tensor
/// ops there, one count read back; the lists come to the host only to name a bad one.
fn check_lists_on_device(op: &str, blocks: &Tensor, nb: usize, lk: usize, kblk: usize) -> Result<()> {
    let width = blocks.dim(3)?;
    let sentinel = blocks.eq(SENTINEL)?;
    let real = sentinel.eq(0u8)?;
    // A real block past the keys.
    let mut bad = real
        .mul(&blocks.ge(nb as u32)?)?
        .to_dtype(DType::U32)?
        .sum_all()?;
    if width > 1 {
        // A real entry after a SENTINEL, or not above the entry before it.
        let (cur, next) = (blocks.narrow(3, 0, width - 1)?, blocks.narrow(3, 1, width - 1)?);
        let unordered = sentinel
            .narrow(3, 0, width - 1)?
            .maximum(&cur.ge(&next)?)?
            .mul(&real.narrow(3, 1, width - 1)?)?;
        bad = (bad + unordered.to_dtype(DType::U32)?.sum_all()?)?;
    }
    if bad.to_scalar::<u32>()? > 0 {
        let host = blocks.flatten_all()?.to_vec1::<u32>()?;
        check_lists(op, &host, width, nb, lk, kblk)?;
        bail!("{op}: the block lists are not ascending, unique, in range and SENTINEL-padded");
    }
    Ok(())
}

/// Block-sparse attention off the CPU (the selection's shape already checked): the tensor-core
/// kernel (bf16 on CUDA, d = d_v ∈ {64, 128}, 64 × 64 tiles), else the dense reference (f32 or
/// other shapes; `[B, H, L_q, L_k]` scores).
fn on_device(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sel: &BlockSelection,
    scale: f64,
    [b, h, lk, d, dv]: [usize; 5],
) -> Result<Tensor> {
    let op = "block_sparse_attention";
    #[cfg(feature = "cuda")]
    if crate::flash_attention::cuda::supported(q, d, dv) {
        use crate::flash_attention::cuda::{FlashCuda, TILE};
        let tiling = sel.tiling;
        if (tiling.query_tile, tiling.key_block) != (TILE, TILE) {
            bail!(
                "{op}: the CUDA kernel works on {TILE} × {TILE} tiles; the selection has query_tile = {}, key_block = {}",
                tiling.query_tile,
                tiling.key_block
            );
        }
        let cuda_op = FlashCuda::new(op, [b, h, lk], &sel.mask, scale, Some(&sel.blocks), q.device())?;
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, cuda_op);
    }
    let _ = (b, h, lk, d, dv);
    if !matches!(q.dtype(), DType::F32 | DType::F64 | DType::BF16) {
        bail!("{op}: dtype {:?} is not supported", q.dtype());
    }
    block_sparse_attention_reference(q, k, v, sel, scale)
}

/// The forward op. The block lists and mask ride along as non-differentiable fields; `lse` is
/// filled by the forward for the backward.
struct BlockSparseAttention {
    blocks: Vec<u32>,
    dims: Dims,
    scale: f64,
    lse: Mutex<Option<Tensor>>,
}

impl BlockSparseAttention {
    fn lse(&self) -> Result<std::sync::MutexGuard<'_, Option<Tensor>>> {
        self.lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("block_sparse_attention: poisoned lock".into()))
    }
}

impl CustomOp3 for BlockSparseAttention {
    fn name(&self) -> &'static str {
        "block_sparse_attention"
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
        let op = "block_sparse_attention";
        let n = &self.dims;
        let (b, h) = (l1.dims()[0], l1.dims()[1]);
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let (o, lse) = cpu::forward::<$t>(
                    contiguous(op, "q", s1, l1)?,
                    contiguous(op, "k", s2, l2)?,
                    contiguous(op, "v", s3, l3)?,
                    &self.blocks,
                    n,
                    self.scale as $t,
                );
                *self.lse()? = Some(Tensor::from_vec(
                    lse,
                    (b, h, n.lq),
                    &candle_core::Device::Cpu,
                )?);
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

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "block_sparse_attention";
        let Some(lse) = self.lse()?.clone() else {
            bail!("{op}: backward called before forward")
        };
        if grad.dims() != o.dims() {
            bail!("{op}: grad is {:?} but the output is {:?}", grad.dims(), o.dims());
        }
        let dev = q.device();
        let n = &self.dims;
        // Borrow the inputs' storage instead of copying them (6 tensors of B·H·L·d).
        macro_rules! run {
            ($t:ty) => {{
                let (dq, dk, dvv) = with_slices::<$t, _>(op, &[q, k, v, o, &lse, grad], |s| {
                    Ok(cpu::backward::<$t>(
                        s[0],
                        s[1],
                        s[2],
                        s[3],
                        s[4],
                        s[5],
                        &self.blocks,
                        n,
                        self.scale as $t,
                    ))
                })?;
                (
                    Tensor::from_vec(dq, q.shape(), dev)?,
                    Tensor::from_vec(dk, k.shape(), dev)?,
                    Tensor::from_vec(dvv, v.shape(), dev)?,
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        };
        Ok((if_tracked(q, dq), if_tracked(k, dk), if_tracked(v, dv)))
    }
}

/// Bytes the block-sparse op keeps for backward beyond its inputs and output: the block lists
/// and one log-sum-exp per query row (`elem` bytes each).
pub fn block_saved_bytes(sel: &BlockSelection, lq: usize, elem: usize) -> Result<usize> {
    let (b, h, _, _) = sel.blocks.dims4()?;
    Ok(4 * sel.blocks.elem_count() + b * h * lq * elem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The device check (tensor ops, run here on the CPU) accepts and refuses exactly the lists
    /// the host check does, over random lists of in-range, out-of-range and SENTINEL entries.
    #[test]
    fn device_list_check_agrees_with_the_host_check() -> Result<()> {
        let (nb, lk, kblk) = (4, 30, 8);
        let mut rng = StdRng::seed_from_u64(7);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..2000 {
            let width = rng.random_range(1..5);
            let tiles = rng.random_range(1..4);
            let lists: Vec<u32> = (0..tiles * width)
                .map(|_| match rng.random_range(0..8) {
                    0 | 1 => SENTINEL,
                    6 => nb as u32 + rng.random_range(0..2),
                    _ => rng.random_range(0..nb as u32),
                })
                .collect();
            let t = Tensor::from_vec(lists.clone(), (1, 1, tiles, width), &Device::Cpu)?;
            let host = check_lists("t", &lists, width, nb, lk, kblk);
            let device = check_lists_on_device("t", &t, nb, lk, kblk);
            assert_eq!(host.is_ok(), device.is_ok(), "{lists:?} in rows of {width}");
            if let (Err(h), Err(d)) = (&host, &device) {
                // The first line: errors carry a backtrace when RUST_BACKTRACE is set.
                let first = |e: &candle_core::Error| e.to_string().lines().next().map(str::to_owned);
                assert_eq!(first(h), first(d));
            }
            if host.is_ok() {
                accepted += 1
            } else {
                refused += 1
            }
        }
        assert!(
            accepted > 100 && refused > 100,
            "{accepted} accepted, {refused} refused"
        );
        Ok(())
    }
}
