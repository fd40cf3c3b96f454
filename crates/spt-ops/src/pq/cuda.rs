//! CUDA launchers for `kernels/pq.cu` (PQ encode and ADC top-k key selection) and
//! `kernels/block_select.cu` (block selection for block-sparse attention).
//!
//! Same outputs as the CPU paths (`Codebook::encode`, `select_keys`): codes `u8 [B, H, L, S]`;
//! indices `u32 [B, H, L_q, k]` ascending with [`super::SENTINEL`] padding, counts `u32 [B, H, L_q]`.
//! Keys and queries are read as bf16 when they are bf16 (other dtypes are converted to f32).

use super::{BlockScore, BlockSelection, BlockTiling, Codebook, KeySelection};
use crate::attention::AttentionMask;
use crate::cuda::{
    by_float, cfg_blocks, cuda_storage, func, i32_arg, kname, launched, opt_view, push_opt, tensor, view,
    KernelFloat, BLOCK_SELECT, PQ,
};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

const THREADS: u32 = 256;
/// Shared memory a kernel may use without an opt-in, static and dynamic together.
const MAX_SHARED_BYTES: usize = 48 * 1024;
/// Of that, what adc_select's tables may take: its static arrays (`hist[256]`,
/// `scan_scratch[33]` and two scalars: 1,164 bytes, rounded up here) take the rest.
const MAX_TABLE_BYTES: usize = MAX_SHARED_BYTES - 2048;

/// `t` detached and contiguous, as bf16 if it is bf16 and as f32 otherwise.
fn kernel_input(t: &Tensor) -> Result<Tensor> {
    let t = t.detach();
    let t = if t.dtype() == DType::BF16 {
        t
    } else {
        t.to_dtype(DType::F32)?
    };
    t.contiguous()
}

/// Nearest codeword per subspace for keys `[B, H, L, d]` on CUDA.
pub(crate) fn encode(cb: &Codebook, keys: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
    let keys = kernel_input(keys)?;
    by_float!("Codebook::encode", keys.dtype(), encode_t(cb, &keys, dims))
}

fn encode_t<T: KernelFloat>(
    cb: &Codebook,
    keys: &Tensor,
    dims: (usize, usize, usize, usize),
) -> Result<Tensor> {
    let op = "Codebook::encode";
    let (b, h, l, _d) = dims;
    let dev = keys.device().as_cuda_device()?.clone();
    let cen = dev.clone_htod(&cb.centroids)?;
    let (ks, kl) = keys.storage_and_layout();
    let kv = view::<T>(op, "keys", cuda_storage(op, "keys", &ks)?, kl)?;
    let rows = b * h * l;
    let s = cb.n_subspaces;
    let mut codes = dev.alloc_zeros::<u8>(rows * s)?;
    if rows * s > 0 {
        let name = kname::<T>("pq_encode");
        let f = func(&dev, PQ, &name)?;
        let mut a = f.builder();
        a.arg(&kv).arg(&cen).arg(&mut codes);
        candle_core::builder_arg!(
            a,
            i32_arg(op, "B·H·L", rows)?,
            h as i32,
            l as i32,
            cb.groups as i32,
            s as i32,
            cb.n_codewords as i32,
            cb.d_codeword as i32
        );
        i32_arg(op, "B·H·L·S", rows * s)?;
        let cfg = cfg_blocks((rows * s).div_ceil(THREADS as usize), THREADS, 0);
        launched(op, &name, unsafe { a.launch(cfg) })?;
    }
    drop(ks);
    Ok(tensor(codes, &dev, (b, h, l, s)))
}

/// ADC top-k selection on CUDA; arguments already checked by `select_keys`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn select(
    q: &Tensor,
    codes: &Tensor,
    cb: &Codebook,
    kk: usize,
    mask: &AttentionMask,
    dims: (usize, usize, usize, usize),
    lk: usize,
) -> Result<KeySelection> {
    let q = kernel_input(q)?;
    by_float!(
        "select_keys",
        q.dtype(),
        select_t(&q, codes, cb, kk, mask, dims, lk)
    )
}

#[allow(clippy::too_many_arguments)]
fn select_t<T: KernelFloat>(
    q: &Tensor,
    codes: &Tensor,
    cb: &Codebook,
    kk: usize,
    mask: &AttentionMask,
    dims: (usize, usize, usize, usize),
    lk: usize,
) -> Result<KeySelection> {
    let op = "select_keys";
    let (b, h, lq, _d) = dims;
    let (s, c) = (cb.n_subspaces, cb.n_codewords);
    let paired = c <= 16 && s >= 2;
    let table_floats = s * c + if paired { s.div_ceil(2) * 256 } else { 0 };
    if 4 * table_floats > MAX_TABLE_BYTES {
        bail!(
            "{op}: the ADC tables need {} bytes of shared memory (S = {s}, C = {c}), over the CUDA kernel's {MAX_TABLE_BYTES}",
            4 * table_floats
        );
    }
    let codes = codes.contiguous()?;
    let pad = mask.key_allowed_on(op, b, lk, q.device())?;
    let dev = q.device().as_cuda_device()?.clone();
    let cen = dev.clone_htod(&cb.centroids)?;
    let rows = b * h * lq;
    let mut out = dev.alloc_zeros::<u32>(rows * kk)?;
    let mut counts = dev.alloc_zeros::<u32>(rows)?;
    if rows > 0 {
        // Rows on their own too: with k = 0 the product says nothing about them.
        i32_arg(op, "B·H·L_q", rows)?;
        i32_arg(op, "B·H·L_q·k", rows * kk)?;
        i32_arg(op, "B·H·L_k·S", b * h * lk * s)?;
        let (qs, ql) = q.storage_and_layout();
        let (cs, cl) = codes.storage_and_layout();
        let qv = view::<T>(op, "q", cuda_storage(op, "q", &qs)?, ql)?;
        let cv = view::<u8>(op, "codes", cuda_storage(op, "codes", &cs)?, cl)?;
        opt_view!(op, "key_padding", u8, pad.as_ref(), pad_guard, pad_view);
        let name = kname::<T>("adc_select");
        let f = func(&dev, PQ, &name)?;
        let mut a = f.builder();
        a.arg(&qv).arg(&cv).arg(&cen);
        push_opt(&mut a, &pad_view);
        a.arg(&mut out).arg(&mut counts);
        candle_core::builder_arg!(
            a,
            h as i32,
            lq as i32,
            i32_arg(op, "L_k", lk)?,
            cb.groups as i32,
            s as i32,
            c as i32,
            cb.d_codeword as i32,
            kk as i32,
            mask.causal as i32
        );
        let cfg = cfg_blocks(rows, THREADS, (4 * table_floats) as u32);
        launched(op, &name, unsafe { a.launch(cfg) })?;
    }
    Ok(KeySelection {
        indices: tensor(out, &dev, (b, h, lq, kk)),
        counts: tensor(counts, &dev, (b, h, lq)),
    })
}

/// Block selection on CUDA (`select_blocks`' rules; `tiling.top_blocks` is already the list
/// width): codeword counts per key block, then per query tile its table, block scores and the
/// kept blocks. Nothing goes through the host but the codebook (uploaded per call, as in
/// [`select`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn select_blocks(
    q: &Tensor,
    codes: &Tensor,
    cb: &Codebook,
    tiling: BlockTiling,
    mask: &AttentionMask,
    score: BlockScore,
    dims: (usize, usize, usize, usize),
    lk: usize,
) -> Result<BlockSelection> {
    let q = kernel_input(q)?;
    by_float!(
        "select_blocks",
        q.dtype(),
        select_blocks_t(&q, codes, cb, tiling, mask, score, dims, lk)
    )
}

#[allow(clippy::too_many_arguments)]
fn select_blocks_t<T: KernelFloat>(
    q: &Tensor,
    codes: &Tensor,
    cb: &Codebook,
    tiling: BlockTiling,
    mask: &AttentionMask,
    score: BlockScore,
    dims: (usize, usize, usize, usize),
    lk: usize,
) -> Result<BlockSelection> {
    let op = "select_blocks";
    let (b, h, lq, d) = dims;
    let (s, c) = (cb.n_subspaces, cb.n_codewords);
    let (qt, kb, width) = (tiling.query_tile, tiling.key_block, tiling.top_blocks);
    let (nt, nb) = (lq.div_ceil(qt), lk.div_ceil(kb));
    let bh = b * h;
    let smem = 4 * (d + s * c + 3 * nb);
    // block_select has no static shared arrays.
    if smem > MAX_SHARED_BYTES {
        bail!(
            "{op}: the CUDA kernel needs {smem} bytes of shared memory (d = {d}, S·C = {}, {nb} key blocks), over {MAX_SHARED_BYTES}; \
             use larger key blocks",
            s * c
        );
    }
    if bh > 65535 {
        bail!("{op}: B·H = {bh} exceeds the CUDA grid's 65535");
    }
    i32_arg(op, "B·H·n_blocks·S·C", bh * nb * s * c)?;
    i32_arg(op, "B·H·L_q·d", bh * lq * d)?;
    i32_arg(op, "B·H·L_k·S", bh * lk * s)?;
    i32_arg(op, "B·H·n_tiles·top_blocks", bh * nt * width)?;
    let codes = codes.contiguous()?;
    let pad = mask.key_allowed_on(op, b, lk, q.device())?;
    let dev = q.device().as_cuda_device()?.clone();
    let cen = dev.clone_htod(&cb.centroids)?;
    // Scratch of at least one element: with no key blocks it is unused, and the driver may
    // refuse a 0-byte allocation (cuMemAlloc does).
    let mut hist = dev.alloc_zeros::<u32>((bh * nb * s * c).max(1))?;
    let mut nkeys = dev.alloc_zeros::<u32>((bh * nb).max(1))?;
    // With no key blocks the kernels do not run: every list is then all padding, as on the CPU.
    let mut blocks = if nb == 0 {
        dev.clone_htod(&vec![u32::MAX; bh * nt * width])?
    } else {
        dev.alloc_zeros::<u32>(bh * nt * width)?
    };
    let mut counts = dev.alloc_zeros::<u32>(bh * nt)?;
    if bh * nt > 0 && nb > 0 {
        let (qs, ql) = q.storage_and_layout();
        let (cs, cl) = codes.storage_and_layout();
        let qv = view::<T>(op, "q", cuda_storage(op, "q", &qs)?, ql)?;
        let cv = view::<u8>(op, "codes", cuda_storage(op, "codes", &cs)?, cl)?;
        opt_view!(op, "key_padding", u8, pad.as_ref(), pad_guard, pad_view);
        let f = func(&dev, BLOCK_SELECT, "block_hist_u8")?;
        let mut a = f.builder();
        a.arg(&cv);
        push_opt(&mut a, &pad_view);
        a.arg(&mut hist).arg(&mut nkeys);
        candle_core::builder_arg!(a, h as i32, lk as i32, s as i32, c as i32, kb as i32);
        let grid = |x: usize, smem: usize| candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (x as u32, bh as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        launched(op, "block_hist_u8", unsafe { a.launch(grid(nb, 0)) })?;

        let name = kname::<T>("block_select");
        let f = func(&dev, BLOCK_SELECT, &name)?;
        let mut a = f.builder();
        a.arg(&qv)
            .arg(&cen)
            .arg(&hist)
            .arg(&nkeys)
            .arg(&mut blocks)
            .arg(&mut counts);
        candle_core::builder_arg!(
            a,
            h as i32,
            lq as i32,
            lk as i32,
            d as i32,
            cb.groups as i32,
            s as i32,
            c as i32,
            cb.d_codeword as i32,
            qt as i32,
            kb as i32,
            width as i32,
            mask.causal as i32,
            (score == BlockScore::UpperBound) as i32
        );
        launched(op, &name, unsafe { a.launch(grid(nt, smem)) })?;
    }
    Ok(BlockSelection {
        blocks: tensor(blocks, &dev, (b, h, nt, width)),
        counts: tensor(counts, &dev, (b, h, nt)),
        tiling,
        mask: mask.clone(),
    })
}
