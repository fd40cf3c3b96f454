//! CUDA launchers for `kernels/sparse_attention.cu`: the fused forward (saving the row lse) and
//! the deterministic two-phase backward (rows → dq, p, ds; a CSC key→query transpose per (b, h)
//! built by histogram / prefix sum / ordered scatter; keys → dk, dv). No float atomics. q, k, v,
//! o and the gradients are f32 or bf16; lse, p and ds are f32.

use super::Dims;
use crate::cuda::{
    cfg_blocks, check_kernel_float, cuda_storage, func, i32_arg, kname, launched, tensor, view, KernelFloat,
    SPARSE_ATTENTION,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, CudaStorage, Layout, Result, Shape, Tensor};

/// Warps per block in the row and key kernels (one warp per query row / per key).
const WARPS: usize = 4;
/// Largest head dimension the kernels keep in registers (4 columns per lane).
const MAX_D: usize = 128;
/// Query rows per block of the CSC histogram and scatter.
const CSC_ROWS: usize = 256;

fn check_dims(op: &str, n: Dims) -> Result<()> {
    if n.d > MAX_D || n.dv > MAX_D {
        bail!(
            "{op}: head dims d = {}, d_v = {} exceed the CUDA kernel's limit of {MAX_D}",
            n.d,
            n.dv
        );
    }
    i32_arg(op, "B·H·L_q·k", n.bh * n.lq * n.kk)?;
    i32_arg(op, "B·H·L_q·d", n.bh * n.lq * n.d.max(n.dv))?;
    i32_arg(op, "B·H·L_k·d", n.bh * n.lk * n.d.max(n.dv))?;
    Ok(())
}

/// 1 when k and v rows can be read 16 bytes at a time (float4, or 8 bf16): d, d_v multiples of
/// the values per 16 bytes and both tensors start 16-byte aligned (candle's allocations are
/// 256-byte aligned; a view's offset may not be).
fn vec4<T>(n: Dims, k: &Layout, v: &Layout) -> i32 {
    let w = 16 / std::mem::size_of::<T>();
    (n.d.is_multiple_of(w)
        && n.dv.is_multiple_of(w)
        && k.start_offset().is_multiple_of(w)
        && v.start_offset().is_multiple_of(w)) as i32
}

/// Forward: `(o [B, H, L_q, d_v], lse [B, H, L_q])`, for `T` the storages' element type.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: KernelFloat>(
    indices: &Tensor,
    n: Dims,
    scale: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape, Tensor)> {
    let op = "sparse_attention";
    if s2.dtype() != s1.dtype() || s3.dtype() != s1.dtype() {
        bail!(
            "{op}: q, k, v have dtypes {:?}, {:?}, {:?}; expected one dtype",
            s1.dtype(),
            s2.dtype(),
            s3.dtype()
        );
    }
    check_dims(op, n)?;
    let q = view::<T>(op, "q", s1, l1)?;
    let k = view::<T>(op, "k", s2, l2)?;
    let v = view::<T>(op, "v", s3, l3)?;
    let indices = indices.contiguous()?;
    let (is, il) = indices.storage_and_layout();
    let idx = view::<u32>(
        op,
        "selection indices",
        cuda_storage(op, "selection indices", &is)?,
        il,
    )?;
    let dev = &s1.device;
    let rows = n.bh * n.lq;
    let mut o = dev.alloc_zeros::<T>(rows * n.dv)?;
    let mut lse = dev.alloc_zeros::<f32>(rows)?;
    if rows > 0 {
        let name = kname::<T>("sparse_attn_fwd");
        let f = func(dev, SPARSE_ATTENTION, &name)?;
        let mut a = f.builder();
        a.arg(&q).arg(&k).arg(&v).arg(&idx).arg(&mut o).arg(&mut lse);
        candle_core::builder_arg!(
            a,
            rows as i32,
            n.lq as i32,
            n.lk as i32,
            n.d as i32,
            n.dv as i32,
            n.kk as i32,
            scale as f32,
            vec4::<T>(n, l2, l3)
        );
        let cfg = cfg_blocks(rows.div_ceil(WARPS), (32 * WARPS) as u32, 0);
        launched(op, &name, unsafe { a.launch(cfg) })?;
    }
    drop(is);
    let (b, h) = (l1.dims()[0], l1.dims()[1]);
    let lse = tensor(lse, dev, (b, h, n.lq));
    Ok((
        CudaStorage::wrap_cuda_slice(o, dev.clone()),
        Shape::from((b, h, n.lq, n.dv)),
        lse,
    ))
}

/// Backward: `(dq, dk, dv)`, deterministic (every sum in a fixed order), for `T` the dtype of q.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: KernelFloat>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    indices: &Tensor,
    n: Dims,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "sparse_attention_backward";
    check_dims(op, n)?;
    for (name, t) in [("q", q), ("k", k), ("v", v), ("o", o), ("grad", grad)] {
        check_kernel_float(op, name, t, q.dtype())?;
    }
    let c = |t: &Tensor| t.contiguous();
    let (q, k, v, o, grad, indices) = (c(q)?, c(k)?, c(v)?, c(o)?, c(grad)?, c(indices)?);
    let lse = lse.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let dev = q.device().as_cuda_device()?.clone();
    let Dims {
        bh,
        lq,
        lk,
        d,
        dv,
        kk,
    } = n;
    let rows = bh * lq;
    let mut dq = dev.alloc_zeros::<T>(rows * d)?;
    let mut dk = dev.alloc_zeros::<T>(bh * lk * d)?;
    let mut dvv = dev.alloc_zeros::<T>(bh * lk * dv)?;
    if rows > 0 && lk > 0 {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (ls, ll) = lse.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (is, il) = indices.storage_and_layout();
        let qv = view::<T>(op, "q", cuda_storage(op, "q", &qs)?, ql)?;
        let kv = view::<T>(op, "k", cuda_storage(op, "k", &ks)?, kl)?;
        let vv = view::<T>(op, "v", cuda_storage(op, "v", &vs)?, vl)?;
        let ov = view::<T>(op, "o", cuda_storage(op, "o", &os)?, ol)?;
        let lv = view::<f32>(op, "lse", cuda_storage(op, "lse", &ls)?, ll)?;
        let gv = view::<T>(op, "grad", cuda_storage(op, "grad", &gs)?, gl)?;
        let iv = view::<u32>(op, "indices", cuda_storage(op, "indices", &is)?, il)?;
        let mut p = dev.alloc_zeros::<f32>(rows * kk)?;
        let mut ds = dev.alloc_zeros::<f32>(rows * kk)?;
        let (ri, lqi, lki, di, dvi, kki, sc) = (
            rows as i32,
            lq as i32,
            lk as i32,
            d as i32,
            dv as i32,
            kk as i32,
            scale as f32,
        );
        let warp_cfg = |items: usize| cfg_blocks(items.div_ceil(WARPS), (32 * WARPS) as u32, 0);

        // Phase 1: rows → dq, p, ds.
        let name = kname::<T>("sparse_attn_bwd_rows");
        let f = func(&dev, SPARSE_ATTENTION, &name)?;
        let mut a = f.builder();
        a.arg(&qv).arg(&kv).arg(&vv).arg(&ov).arg(&lv).arg(&gv).arg(&iv);
        a.arg(&mut dq).arg(&mut p).arg(&mut ds);
        candle_core::builder_arg!(a, ri, lqi, lki, di, dvi, kki, sc, vec4::<T>(n, kl, vl));
        launched(op, &name, unsafe { a.launch(warp_cfg(rows)) })?;

        // Phase 2: CSC transpose per (b, h): histogram, two prefix sums, ordered scatter.
        let nrb = lq.div_ceil(CSC_ROWS);
        i32_arg(op, "B·H·row blocks·L_k", bh * nrb * lk)?;
        let mut cnt = dev.alloc_zeros::<u32>(bh * nrb * lk)?;
        let mut tot = dev.alloc_zeros::<u32>(bh * lk)?;
        let mut start = dev.alloc_zeros::<u32>(bh * (lk + 1))?;
        let mut entries = dev.alloc_zeros::<u32>(rows * kk)?;
        let (nrbi, csc_rows, bhi) = (nrb as i32, CSC_ROWS as i32, bh as i32);

        let f = func(&dev, SPARSE_ATTENTION, "csc_hist_u32")?;
        let mut a = f.builder();
        a.arg(&iv).arg(&mut cnt);
        candle_core::builder_arg!(a, lqi, lki, kki, nrbi, csc_rows);
        launched(op, "csc_hist_u32", unsafe {
            a.launch(cfg_blocks(bh * nrb, 256, 0))
        })?;

        let f = func(&dev, SPARSE_ATTENTION, "csc_scan_rb_u32")?;
        let mut a = f.builder();
        a.arg(&mut cnt).arg(&mut tot);
        candle_core::builder_arg!(a, bhi, lki, nrbi);
        launched(op, "csc_scan_rb_u32", unsafe {
            a.launch(cfg_blocks((bh * lk).div_ceil(256), 256, 0))
        })?;

        let f = func(&dev, SPARSE_ATTENTION, "csc_scan_keys_u32")?;
        let mut a = f.builder();
        a.arg(&tot).arg(&mut start);
        candle_core::builder_arg!(a, lki);
        launched(op, "csc_scan_keys_u32", unsafe {
            a.launch(cfg_blocks(bh, 1024, 0))
        })?;

        let f = func(&dev, SPARSE_ATTENTION, "csc_scatter_u32")?;
        let mut a = f.builder();
        a.arg(&iv).arg(&start).arg(&mut cnt).arg(&mut entries);
        candle_core::builder_arg!(a, lqi, lki, kki, nrbi, csc_rows);
        launched(op, "csc_scatter_u32", unsafe {
            a.launch(cfg_blocks(bh * nrb, 256, 0))
        })?;

        // Phase 3: keys → dk, dv, walking each key's query list in order.
        let name = kname::<T>("sparse_attn_bwd_keys");
        let f = func(&dev, SPARSE_ATTENTION, &name)?;
        let mut a = f.builder();
        a.arg(&qv).arg(&gv).arg(&p).arg(&ds).arg(&start).arg(&entries);
        a.arg(&mut dk).arg(&mut dvv);
        candle_core::builder_arg!(a, bhi, lqi, lki, di, dvi, kki, sc);
        launched(op, &name, unsafe { a.launch(warp_cfg(bh * lk)) })?;
    }
    Ok((
        tensor(dq, &dev, q.shape()),
        tensor(dk, &dev, k.shape()),
        tensor(dvv, &dev, v.shape()),
    ))
}
