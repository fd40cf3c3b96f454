//! CUDA path of [`super::flash_attention`] and [`crate::block_sparse_attention`]: the tiled
//! tensor-core kernels of `kernels/flash_attention.cu` (bf16 in and out, f32 accumulation and
//! log-sum-exp), dense or over a block selection, with the deterministic FlashAttention-2-style
//! backward (a dq pass and a dk/dv pass; no float atomics).
//!
//! Everything stays on the device: the key-padding mask is converted to `u8` there, and the
//! block lists are read by the kernels (their transpose for the dk/dv pass is built by a kernel
//! too). The CPU op validates a selection's lists on the host; this path trusts lists made by
//! [`crate::select_blocks`] and only guards against out-of-range entries (which end a list).

use crate::attention::AttentionMask;
use crate::cuda::{
    cfg_blocks, cuda_storage, func, i32_arg, launched, opt_view, tensor, view, FLASH_ATTENTION,
};
use crate::util::if_tracked;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Rows per query tile and per key block: the kernels' tile (and the CPU block mode's default).
pub(crate) const TILE: usize = 64;
/// Head dimensions the kernels are built for.
const HEAD_DIMS: [usize; 2] = [64, 128];
const THREADS: u32 = 128;

/// Whether the tensor-core kernels take these inputs: bf16 on CUDA, d = d_v ∈ {64, 128}.
pub(crate) fn supported(q: &Tensor, d: usize, dv: usize) -> bool {
    q.device().is_cuda() && q.dtype() == DType::BF16 && d == dv && HEAD_DIMS.contains(&d)
}

/// The fused op on CUDA: dense when `blocks` is None, else block-sparse over `blocks`
/// (`u32 [B, H, n_tiles, width]`, tiles of [`TILE`]).
pub(crate) struct FlashCuda {
    pub op: &'static str,
    pub h: usize,
    pub causal: bool,
    pub scale: f64,
    /// `u8 [B, L_k]` on the device, nonzero = attend.
    pub key_ok: Option<Tensor>,
    pub blocks: Option<Tensor>,
    pub lse: Mutex<Option<Tensor>>,
}

impl FlashCuda {
    pub(crate) fn new(
        op: &'static str,
        [b, h, lk]: [usize; 3],
        mask: &AttentionMask,
        scale: f64,
        blocks: Option<&Tensor>,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let key_ok = mask.key_allowed_on(op, b, lk, dev)?;
        let blocks = blocks.map(|b| b.to_device(dev)?.contiguous()).transpose()?;
        Ok(Self {
            op,
            h,
            causal: mask.causal,
            scale,
            key_ok,
            blocks,
            lse: Mutex::new(None),
        })
    }

    fn width(&self) -> Result<usize> {
        Ok(match &self.blocks {
            Some(b) => b.dim(3)?,
            None => 0,
        })
    }
}

/// Loads kernel `name` and lets it use `smem` bytes of dynamic shared memory (above 48 KB a
/// kernel must opt in).
fn kernel(dev: &candle_core::CudaDevice, name: &str, smem: usize) -> Result<crate::cuda::Kernel> {
    let f = func(dev, FLASH_ATTENTION, name)?;
    if smem > 48 * 1024 {
        f.func()
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| {
                candle_core::Error::Msg(format!("flash_attention: {name}: shared memory {smem} B: {e}"))
            })?;
    }
    Ok(f)
}

fn tile_bytes(d: usize) -> usize {
    TILE * (d + 8) * 2
}

fn check_sizes(op: &str, bh: usize, lq: usize, lk: usize, d: usize) -> Result<()> {
    if bh > 65535 {
        bail!("{op}: B·H = {bh} exceeds the CUDA grid's 65535 (batch and heads share grid.y)");
    }
    i32_arg(op, "B·H·L_q·d", bh * lq * d)?;
    i32_arg(op, "B·H·L_k·d", bh * lk * d)?;
    Ok(())
}

impl CustomOp3 for FlashCuda {
    fn name(&self) -> &'static str {
        self.op
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("{}: the CUDA kernel was given CPU tensors", self.op)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.op;
        let (b, h, lq, d) = l1.shape().dims4()?;
        let lk = l2.dims()[2];
        let bh = b * h;
        check_sizes(op, bh, lq, lk, d)?;
        for (name, l) in [("q", l1), ("k", l2), ("v", l3)] {
            if l.start_offset() % 8 != 0 {
                bail!("{op}: {name} starts at element {} of its buffer; the kernel reads 16-byte rows (make it contiguous)", l.start_offset());
            }
        }
        let q = view::<half::bf16>(op, "q", s1, l1)?;
        let k = view::<half::bf16>(op, "k", s2, l2)?;
        let v = view::<half::bf16>(op, "v", s3, l3)?;
        let dev = &s1.device;
        let mut o = dev.alloc_zeros::<half::bf16>(bh * lq * d)?;
        let mut lse = dev.alloc_zeros::<f32>(bh * lq)?;
        if bh * lq > 0 {
            opt_view!(op, "key padding mask", u8, self.key_ok.as_ref(), kg, kok);
            opt_view!(op, "block lists", u32, self.blocks.as_ref(), bg, blk);
            let name = format!("fa_fwd_d{d}");
            let smem = 5 * tile_bytes(d);
            let f = kernel(dev, &name, smem)?;
            let mut a = f.builder();
            a.arg(&q).arg(&k).arg(&v).arg(&mut o).arg(&mut lse);
            crate::cuda::push_opt(&mut a, &kok);
            crate::cuda::push_opt(&mut a, &blk);
            candle_core::builder_arg!(
                a,
                self.width()? as i32,
                self.h as i32,
                lq as i32,
                lk as i32,
                self.causal as i32,
                self.scale as f32
            );
            let cfg = grid(lq.div_ceil(TILE), bh, smem);
            launched(op, &name, unsafe { a.launch(cfg) })?;
            drop((kg, bg));
        }
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))? =
            Some(tensor(lse, dev, (b, h, lq)));
        Ok((
            CudaStorage::wrap_cuda_slice(o, dev.clone()),
            Shape::from((b, h, lq, d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.op;
        let Some(lse) = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))?
            .clone()
        else {
            bail!("{op}: backward called before forward")
        };
        if grad.dims() != o.dims() {
            bail!("{op}: grad is {:?} but the output is {:?}", grad.dims(), o.dims());
        }
        let (dq, dk, dv) = self.backward(q, k, v, o, &lse, &grad.to_dtype(DType::BF16)?)?;
        Ok((if_tracked(q, dq), if_tracked(k, dk), if_tracked(v, dv)))
    }
}

impl FlashCuda {
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let op = self.op;
        let (b, h, lq, d) = q.dims4()?;
        let lk = k.dim(2)?;
        let bh = b * h;
        let (nt, nb) = (lq.div_ceil(TILE), lk.div_ceil(TILE));
        check_sizes(op, bh, lq, lk, d)?;
        // Fresh row-major copies start at offset 0, so every row is 16-byte aligned
        // (`Tensor::copy` would keep the layout, offset and strides included).
        let c = |t: &Tensor| -> Result<Tensor> {
            if t.is_contiguous() && t.layout().start_offset().is_multiple_of(8) {
                Ok(t.clone())
            } else {
                t.force_contiguous()
            }
        };
        let (q, k, v, o, grad) = (c(q)?, c(k)?, c(v)?, c(o)?, c(grad)?);
        let dev = q.device().as_cuda_device()?.clone();
        let mut dq = dev.alloc_zeros::<half::bf16>(bh * lq * d)?;
        let mut dk = dev.alloc_zeros::<half::bf16>(bh * lk * d)?;
        let mut dv = dev.alloc_zeros::<half::bf16>(bh * lk * d)?;
        if bh * lq > 0 && lk > 0 {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (os, ol) = o.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (ls, ll) = lse.storage_and_layout();
            let qv = view::<half::bf16>(op, "q", cuda_storage(op, "q", &qs)?, ql)?;
            let kv = view::<half::bf16>(op, "k", cuda_storage(op, "k", &ks)?, kl)?;
            let vv = view::<half::bf16>(op, "v", cuda_storage(op, "v", &vs)?, vl)?;
            let ov = view::<half::bf16>(op, "o", cuda_storage(op, "o", &os)?, ol)?;
            let gv = view::<half::bf16>(op, "grad", cuda_storage(op, "grad", &gs)?, gl)?;
            let lv = view::<f32>(op, "lse", cuda_storage(op, "lse", &ls)?, ll)?;
            opt_view!(op, "key padding mask", u8, self.key_ok.as_ref(), kg, kok);
            opt_view!(op, "block lists", u32, self.blocks.as_ref(), bg, blk);
            let (hi, lqi, lki, causal, scale) = (
                self.h as i32,
                lq as i32,
                lk as i32,
                self.causal as i32,
                self.scale as f32,
            );

            // delta_i = do_i · o_i.
            let rows = bh * lq;
            let mut delta = dev.alloc_zeros::<f32>(rows)?;
            let f = kernel(&dev, "fa_bwd_delta", 0)?;
            let mut a = f.builder();
            a.arg(&ov).arg(&gv).arg(&mut delta);
            candle_core::builder_arg!(a, rows as i32, d as i32);
            launched(op, "fa_bwd_delta", unsafe {
                a.launch(cfg_blocks(rows.div_ceil(4), THREADS, 0))
            })?;

            // dq: per query tile, over its key blocks.
            let name = format!("fa_bwd_dq_d{d}");
            let smem = 6 * tile_bytes(d);
            let f = kernel(&dev, &name, smem)?;
            let mut a = f.builder();
            a.arg(&qv)
                .arg(&kv)
                .arg(&vv)
                .arg(&gv)
                .arg(&lv)
                .arg(&delta)
                .arg(&mut dq);
            crate::cuda::push_opt(&mut a, &kok);
            crate::cuda::push_opt(&mut a, &blk);
            candle_core::builder_arg!(a, self.width()? as i32, hi, lqi, lki, causal, scale);
            launched(op, &name, unsafe { a.launch(grid(nt, bh, smem)) })?;

            // Block-sparse: per key block, the query tiles that list it (ascending).
            let transposed = match &blk {
                Some(bv) => {
                    i32_arg(op, "B·H·n_blocks·n_tiles", bh * nb * nt)?;
                    let mut tiles = dev.alloc_zeros::<u32>(bh * nb * nt)?;
                    let mut ntiles = dev.alloc_zeros::<u32>(bh * nb)?;
                    let f = kernel(&dev, "fa_block_tiles", 0)?;
                    let mut a = f.builder();
                    a.arg(bv).arg(&mut tiles).arg(&mut ntiles);
                    candle_core::builder_arg!(a, bh as i32, nt as i32, nb as i32, self.width()? as i32);
                    launched(op, "fa_block_tiles", unsafe {
                        a.launch(cfg_blocks((bh * nb).div_ceil(THREADS as usize), THREADS, 0))
                    })?;
                    Some((tiles, ntiles))
                }
                None => None,
            };

            // dk, dv: per key block, over the query tiles that see it.
            let name = format!("fa_bwd_dkdv_d{d}");
            let smem = 6 * tile_bytes(d) + 4 * TILE * 4;
            let null = 0u64;
            let f = kernel(&dev, &name, smem)?;
            let mut a = f.builder();
            a.arg(&qv)
                .arg(&kv)
                .arg(&vv)
                .arg(&gv)
                .arg(&lv)
                .arg(&delta)
                .arg(&mut dk)
                .arg(&mut dv);
            crate::cuda::push_opt(&mut a, &kok);
            match &transposed {
                Some((tiles, ntiles)) => {
                    a.arg(tiles).arg(ntiles);
                }
                None => {
                    a.arg(&null).arg(&null);
                }
            }
            candle_core::builder_arg!(a, hi, lqi, lki, causal, scale);
            launched(op, &name, unsafe { a.launch(grid(nb, bh, smem)) })?;
            drop((kg, bg));
        }
        Ok((
            tensor(dq, &dev, q.shape()),
            tensor(dk, &dev, k.shape()),
            tensor(dv, &dev, v.shape()),
        ))
    }
}

fn grid(x: usize, y: usize, smem: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (x.max(1) as u32, y.max(1) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}
