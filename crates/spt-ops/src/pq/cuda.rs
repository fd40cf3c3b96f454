//! CUDA launchers for `kernels/pq.cu`: PQ encode and ADC top-k key selection.
//!
//! Same outputs as the CPU paths (`Codebook::encode`, `select_keys`): codes `u8 [B, H, L, S]`;
//! indices `u32 [B, H, L_q, k]` ascending with [`super::SENTINEL`] padding, counts `u32 [B, H, L_q]`.
//! Keys and queries are read as bf16 when they are bf16 (other dtypes are converted to f32).

use super::{Codebook, KeySelection};
use crate::attention::AttentionMask;
use crate::cuda::{
    by_float, cfg_blocks, cuda_storage, func, i32_arg, kname, launched, tensor, view, KernelFloat, PQ,
};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

const THREADS: u32 = 256;
/// Shared memory the selection kernel may use for its tables without an opt-in.
const MAX_TABLE_BYTES: usize = 48 * 1024;

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
    let pad = match &mask.key_padding {
        Some(m) => {
            if m.dims() != [b, lk] {
                bail!(
                    "{op}: key_padding mask is {:?}, expected [B, L] = [{b}, {lk}]",
                    m.dims()
                );
            }
            Some(
                m.to_dtype(DType::F32)?
                    .ne(0f64)?
                    .to_dtype(DType::U8)?
                    .contiguous()?,
            )
        }
        None => None,
    };
    let dev = q.device().as_cuda_device()?.clone();
    let cen = dev.clone_htod(&cb.centroids)?;
    let rows = b * h * lq;
    let mut out = dev.alloc_zeros::<u32>(rows * kk)?;
    let mut counts = dev.alloc_zeros::<u32>(rows)?;
    if rows > 0 {
        i32_arg(op, "B·H·L_q·k", rows * kk)?;
        i32_arg(op, "B·H·L_k·S", b * h * lk * s)?;
        let (qs, ql) = q.storage_and_layout();
        let (cs, cl) = codes.storage_and_layout();
        let qv = view::<T>(op, "q", cuda_storage(op, "q", &qs)?, ql)?;
        let cv = view::<u8>(op, "codes", cuda_storage(op, "codes", &cs)?, cl)?;
        let pad_guard = pad.as_ref().map(|p| p.storage_and_layout());
        let pad_view = match &pad_guard {
            Some((ps, pl)) => Some(view::<u8>(
                op,
                "key_padding",
                cuda_storage(op, "key_padding", ps)?,
                pl,
            )?),
            None => None,
        };
        let name = kname::<T>("adc_select");
        let f = func(&dev, PQ, &name)?;
        let mut a = f.builder();
        a.arg(&qv).arg(&cv).arg(&cen);
        let null = 0u64;
        match &pad_view {
            Some(p) => a.arg(p),
            None => a.arg(&null),
        };
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
